"""Run maps (channel sets kept as runs of positions, see ``RootMap``) against the same maps held
as tensors: every index-mapping op must give the same ids, the same joins and the same refusals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prune_callbacks.graph.index_mapping as im
from prune_callbacks.graph.index_mapping import Barrier, RootMap, RootUnion


@st.composite
def run_maps(draw: st.DrawFn, ndim: int | None = None, size: int | None = None, dim: int | None = None):
    """A channel map built from positions and root ids (runs when they allow it)."""
    ndim = draw(st.integers(1, 4)) if ndim is None else ndim
    dim = draw(st.integers(0, ndim - 1)) if dim is None else dim
    size = draw(st.integers(1, 12)) if size is None else size
    idxs = sorted(draw(st.sets(st.integers(0, size - 1), max_size=size)))
    pattern = draw(st.sampled_from(["shifted", "constant", "random"]))
    base = draw(st.integers(0, 20))
    if pattern == "shifted":
        roots = [base + i for i in idxs]
    elif pattern == "constant":
        roots = [base] * len(idxs)
    else:
        roots = [draw(st.integers(0, 20)) for _ in idxs]
    return im.channel_map(ndim, dim, size, idxs, roots)


def _as_tensor(m: RootMap) -> RootMap:
    return RootMap(m.t.clone(), m.explicit)


def _outcome(fn: Callable[[], Any]) -> Any:
    """What an op gives, comparable between the two forms: ids and flags, or the refusal."""
    union = RootUnion()
    try:
        with im.joining_roots(union):
            out = fn()
    except Barrier as b:
        return ("barrier", str(b))
    ids = sorted(union.parent)
    joins = [union.find(i) for i in ids]
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], RootMap):
        out = (out[0].t.expand(out[0].shape).tolist(), out[0].shape, out[0].explicit, out[1])
    elif isinstance(out, RootMap):
        out = (out.t.tolist(), out.shape, out.explicit)
    return out, {i: j for i, j in zip(ids, joins) if i != j}


def _same(op: Callable[[RootMap], Any], m: RootMap) -> None:
    assert m.runs is not None or m.shape[m.dim] > 4 * im.MAX_RUNS
    assert _outcome(lambda: op(m)) == _outcome(lambda: op(_as_tensor(m)))


@settings(max_examples=300, deadline=None)
@given(run_maps())
def test_unary_ops_match_the_tensor_form(m: RootMap) -> None:
    nd, d = m.ndim, m.dim
    _same(lambda x: x.t.tolist(), m)
    _same(lambda x: x.any(), m)
    _same(lambda x: im.squeeze_constant(x), m)
    _same(lambda x: [im.constant_along(x, k) for k in range(nd)], m)
    _same(lambda x: im.collapse(x, [d], "varies"), m)
    _same(lambda x: im.channels_at(x, d, m.shape[d]), m)
    _same(lambda x: im.channels_at(x, d, m.shape[d] + 1), m)
    _same(lambda x: im.unsqueeze(x, 0), m)
    _same(lambda x: im.unsqueeze(x, nd), m)
    _same(lambda x: im.drop_dim(x, d), m)
    _same(lambda x: im.permute(x, list(reversed(range(nd)))), m)
    size = m.shape[d]
    for start in range(size):
        _same(lambda x, s=start: im.narrow(x, d, s, size - s), m)
    _same(lambda x: im.place(x, d, 2, size + 3), m)
    full = [3] * nd
    full[d] = size
    _same(lambda x: im.broadcast_to(x, full), m)
    _same(lambda x: im.broadcast_to(x, [2, *full]), m)
    _same(lambda x: im.broadcast_to(x, full[1:]), m)
    squeezed = list(full)
    squeezed[d] = 1
    _same(lambda x: im.broadcast_to(x, squeezed), m)
    # a view that keeps the channel dimension whole, and one that splits it
    out = [*full[:d], 1, size, *full[d + 1 :]]
    _same(lambda x: im.reshape(x, full, out), m)
    if size % 2 == 0:
        split = [*full[:d], 2, size // 2, *full[d + 1 :]]
        _same(lambda x: im.reshape(x, full, split), m)
    spans = im.pruned_spans(m, d)
    assert spans is not None
    hit = [p for s, e in spans for p in range(s, e)]
    assert hit == (m.t.reshape(-1) >= 0).nonzero().flatten().tolist()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_merge_matches_the_tensor_form(data: st.DataObject) -> None:
    ndim = data.draw(st.integers(1, 3))
    dim = data.draw(st.integers(0, ndim - 1))
    size = data.draw(st.integers(1, 12))
    a = data.draw(run_maps(ndim, size, dim))
    b = data.draw(run_maps(ndim, size, dim))
    assert _outcome(lambda: im.merge(a, b)) == _outcome(lambda: im.merge(_as_tensor(a), _as_tensor(b)))


@settings(max_examples=200, deadline=None)
@given(run_maps(), st.integers(0, 5), st.integers(0, 5))
def test_place_is_a_concat_with_kept_neighbours(m: RootMap, before: int, after: int) -> None:
    """A map placed in a longer tensor equals torch.cat of kept filler, the map and kept filler."""
    d = m.dim
    placed = im.place(m, d, before, before + m.shape[d] + after)
    assert _outcome(lambda: placed) == _outcome(lambda: im.place(_as_tensor(m), d, before, placed.shape[d]))
    if m.shape[d] > 1:
        fill = [torch.full(m.shape[:d] + (n,) + m.shape[d + 1 :], -1) for n in (before, after)]
        assert torch.equal(placed.t, torch.cat([fill[0], m.t, fill[1]], d))
    else:
        assert placed is m


def test_common_maps_stay_runs() -> None:
    """The maps a closure passes around most (whole layers, channel blocks at an offset) never
    build a tensor along the way."""
    m = im.channel_map(4, 1, 32, range(32), range(32))
    placed = im.place(m, 1, 64, 112)
    assert placed.runs == [(64, 96, 0, 1)] and not placed.materialized
    merged, added = im.merge(placed, im.narrow(placed, 1, 0, 112))
    assert not added and merged is placed
    read = im.channels_at(im.broadcast_to(placed, (8, 112, 7, 7)), 1, 112)
    assert read == (list(range(64, 96)), list(range(32)))
    assert not placed.materialized
    assert placed.t[0, 64:96, 0, 0].tolist() == list(range(32))


def test_run_maps_join_ids_that_meet() -> None:
    a = im.channel_map(2, 1, 6, [0, 1, 2], [0, 1, 2])
    b = im.channel_map(2, 1, 6, [2, 3], [7, 8])
    union = RootUnion()
    with im.joining_roots(union):
        merged, added = im.merge(a, b)
    assert added and union.find(7) == 2
    assert merged.t.tolist() == [[0, 1, 2, 8, -1, -1]]


@pytest.mark.parametrize("idxs", [[5, 1, 3], [-1], [7]])
def test_unordered_or_out_of_range_channels(idxs: list[int]) -> None:
    """Channels given out of order are placed correctly; an index outside the tensor fails as a
    tensor index would."""
    if max(idxs) >= 6 or min(idxs) < -6:
        with pytest.raises(IndexError):
            im.channel_map(1, 0, 6, idxs, idxs)
        return
    m = im.channel_map(1, 0, 6, idxs, [i + 10 for i in idxs])
    expected = torch.full((6,), -1)
    expected[torch.tensor(idxs)] = torch.tensor(idxs) + 10
    assert torch.equal(m.t, expected)
