"""Index mapping: how a set of pruned channels moves through layout operations.

A pruned channel set on a tensor is a :class:`RootMap`: an integer tensor that broadcasts to the
tensor's shape, holding for every element the root channel it belongs to (``-1`` = kept).
Dimensions that carry channel information are *explicit* (stored at full size); the others are
stored with size 1 and mean "every position along this dimension". Layout ops (concat, split,
view, permute, slice, expand...) are applied to the map with the same torch op, so the mapping
is exact by construction; what cannot be expressed per channel raises :class:`Barrier`.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

KEPT = -1


class Barrier(Exception):
    """A channel mapping that cannot be proven correct: the coupled layers are left unprunable."""


Run = tuple[int, int, int, int]


class RootMap:
    """Root-channel ids of one tensor's pruned elements (see module docstring).

    The ids live in ``t``, or, for the common map that varies along one dimension only, in
    ``runs``: sorted, disjoint ``(start, stop, base, step)`` spans of that dimension ``dim``
    where position ``p`` holds root ``base + step * (p - start)`` (step 0 or 1), every other
    position ``KEPT``. Channel sets move through concats, splits and layers as a few integers
    that way; ``t`` is built from the runs only when an op needs the tensor.
    """

    __slots__ = ("_t", "explicit", "shape", "runs", "dim")

    def __init__(self, t: torch.Tensor, explicit: tuple[bool, ...]) -> None:
        self._t: torch.Tensor | None = t
        self.explicit = explicit
        self.shape: tuple[int, ...] = tuple(t.shape)
        self.runs: list[Run] | None = None
        self.dim = 0

    @classmethod
    def of_runs(cls, shape: Sequence[int], dim: int, runs: list[Run], explicit: tuple[bool, ...]) -> RootMap:
        """A map of ``shape`` (size 1 except along ``dim``) holding ``runs`` along ``dim``."""
        m = cls.__new__(cls)
        m._t = None
        m.explicit = explicit
        m.shape = tuple(shape)
        m.runs = runs
        m.dim = dim
        return m

    @property
    def t(self) -> torch.Tensor:
        if self._t is None:
            self._t = _materialize(self.shape, self.dim, self.runs or [])
        return self._t

    @property
    def materialized(self) -> bool:
        """Whether the id tensor ``t`` exists (a map kept as runs builds it on first use)."""
        return self._t is not None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def any(self) -> bool:
        if self.runs is not None:
            return bool(self.runs)
        return bool((self.t >= 0).any())

    def __repr__(self) -> str:
        body = f"runs={self.runs}, dim={self.dim}" if self.runs is not None else f"t={self._t}"
        return f"RootMap({body}, shape={self.shape}, explicit={self.explicit})"


def _materialize(shape: tuple[int, ...], dim: int, runs: list[Run]) -> torch.Tensor:
    size = shape[dim] if shape else 1
    if len(runs) == 1 and runs[0] == (0, size, 0, 1):
        flat = torch.arange(size)
    else:
        flat = torch.full((size,), KEPT, dtype=torch.long)
        for s, e, b, st in runs:
            flat[s:e] = torch.arange(b, b + e - s) if st else b
    return flat.view(shape)


def _root_at(run: Run, p: int) -> int:
    return run[2] + run[3] * (p - run[0])


def _runs_of(idxs: list[int], roots: list[int]) -> list[Run] | None:
    """Runs holding ``roots`` at ascending positions ``idxs``; None when they are not ascending
    or need more than :data:`MAX_RUNS` runs (a tensor is cheaper then)."""
    n = len(idxs)
    if not n:
        return []
    a, r0 = idxs[0], roots[0]
    if idxs[-1] - a == n - 1 and idxs == list(range(a, a + n)):
        if roots == list(range(r0, r0 + n)):
            return [(a, a + n, r0, 1)]
        if roots.count(r0) == n:
            return [(a, a + n, r0, 0)]
    runs: list[Run] = []
    s, b, st, prev, prev_r = a, r0, -1, a, r0
    for p, r in zip(idxs[1:], roots[1:]):
        if p == prev + 1 and (r - prev_r == st or (st == -1 and r - prev_r in (0, 1))):
            st = r - prev_r
        elif p > prev:
            runs.append((s, prev + 1, b, max(st, 0)))
            if len(runs) >= MAX_RUNS:
                return None
            s, b, st = p, r, -1
        else:
            return None
        prev, prev_r = p, r
    runs.append((s, prev + 1, b, max(st, 0)))
    return runs


def _coalesce(runs: list[Run]) -> list[Run]:
    """Sorted disjoint runs with neighbours that continue each other joined."""
    out: list[Run] = []
    for run in sorted(runs):
        if out and out[-1][1] == run[0]:
            s, e, b, st = out[-1]
            for step in (0, 1):
                if (
                    (e - s == 1 or st == step)
                    and (run[1] - run[0] == 1 or run[3] == step)
                    and b + step * (e - s) == run[2]
                ):
                    out[-1] = (s, run[1], b, step)
                    break
            else:
                out.append(run)
            continue
        out.append(run)
    return out


MAX_RUNS = 16


class RootUnion:
    """Root ids that a full-index closure found to be one unit (union-find).

    A full-index group gives every root channel its own id, so that any subset of ids can be
    removed. Sometimes the closure finds two ids on the same element (``cat(x, dw(x))`` read by one
    depthwise conv, a channel-shuffle reshape, ...): removing one without the other would break the
    model, so they become one id. The smallest id of a set represents it.
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        while parent.get(x, x) != x:
            nxt = parent[x]
            parent[x] = parent.get(nxt, nxt)
            x = nxt
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Join ``a[i]`` with ``b[i]`` for every element pair."""
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1).unique(dim=0)
        for x, y in pairs.tolist():
            self.union(x, y)

    def canonical(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with every id replaced by its set's representative (``KEPT`` stays)."""
        if not self.parent:
            return t
        top = max(max(self.parent), int(t.max()) if t.numel() else 0) + 1
        lut = torch.arange(-1, top)
        for x in self.parent:
            lut[x + 1] = self.find(x)
        return lut[t + 1]


_UNION: ContextVar[RootUnion | None] = ContextVar("prune_callbacks_root_union", default=None)


@contextmanager
def joining_roots(union: RootUnion) -> Iterator[RootUnion]:
    """Within the block, elements found to carry two root ids join those ids in ``union``."""
    token = _UNION.set(union)
    try:
        yield union
    finally:
        _UNION.reset(token)


def joining() -> bool:
    """Whether root ids found on one element are joined here (a full-index closure) rather than
    a conflict (a subset closure, with one id)."""
    return _UNION.get() is not None


def join_ids(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> None:
    """Join the root ids ``a[where]`` and ``b[where]`` (elementwise) when ids are being joined."""
    union = _UNION.get()
    if union is not None and bool(where.any()):
        union.add(a[where], b[where])


def channel_map(ndim: int, dim: int, size: int, idxs: Sequence[int], roots: Sequence[int]) -> RootMap:
    """Map for a tensor whose channel dimension ``dim`` has ``size`` channels, ``idxs`` pruned."""
    dim = dim % ndim
    idxs, roots = list(idxs), list(roots)
    shape = [1] * ndim
    shape[dim] = size
    explicit = tuple(d == dim for d in range(ndim))
    runs = _runs_of(idxs, roots)
    if runs is None and len(idxs) <= 4 * MAX_RUNS:
        pairs = sorted(zip(idxs, roots))
        runs = _runs_of([i for i, _ in pairs], [r for _, r in pairs])
    if runs is not None and (not runs or (runs[0][0] >= 0 and runs[-1][1] <= size)):
        return RootMap.of_runs(shape, dim, runs, explicit)
    flat = torch.full((size,), KEPT, dtype=torch.long)
    ix = torch.tensor(idxs, dtype=torch.long)
    flat[ix] = ix if idxs == roots else torch.tensor(roots, dtype=torch.long)
    return RootMap(flat.view(shape), explicit)


def _same_layout(a: RootMap, b: RootMap) -> bool:
    """Both maps are runs along the same dimension of the same shape."""
    return (
        a.runs is not None
        and b.runs is not None
        and a.shape == b.shape
        and (a.dim == b.dim or a.shape[a.dim] == 1)
    )


def merge(old: RootMap | None, new: RootMap) -> tuple[RootMap, bool]:
    """Union of two maps of the same tensor; returns (merged, whether anything was added)."""
    if old is None:
        return new, True
    if old is new or (old._t is not None and old._t is new._t):
        return old, False
    explicit = tuple(a or b for a, b in zip(old.explicit, new.explicit))
    if _same_layout(old, new):
        return _merge_runs(old, new, explicit)
    if old.shape == new.shape:
        a, b = old.t, new.t
    else:
        shape = tuple(max(x, y) for x, y in zip(old.shape, new.shape))
        a, b = old.t.expand(shape), new.t.expand(shape)
    diff = a != b
    if not bool(diff.any()):
        return old, False
    if _UNION.get() is not None:
        join_ids(a, b, diff & (a >= 0) & (b >= 0))
    added = (a < 0) & (b >= 0)
    if not bool(added.any()):
        return old, False
    return RootMap(torch.where(a >= 0, a, b).contiguous(), explicit), True


def _merge_runs(old: RootMap, new: RootMap, explicit: tuple[bool, ...]) -> tuple[RootMap, bool]:
    """:func:`merge` of two run maps: the positions only ``new`` covers are added, ids that
    meet on a position are joined (in a full-index closure)."""
    olds = old.runs or []
    union = _UNION.get()
    ends = [r[1] for r in olds]
    added: list[Run] = []
    for run in new.runs or []:
        s, e = run[0], run[1]
        cur = s
        k = bisect_right(ends, s)
        while cur < e and k < len(olds):
            o = olds[k]
            if o[0] >= e:
                break
            if o[0] > cur:
                added.append((cur, o[0], _root_at(run, cur), run[3]))
            lo, hi = max(cur, o[0]), min(e, o[1])
            if union is not None and not (
                _root_at(run, lo) == _root_at(o, lo) and (run[3] == o[3] or hi - lo == 1)
            ):
                for p in range(lo, hi):
                    union.union(_root_at(o, p), _root_at(run, p))
            cur = max(cur, o[1])
            k += 1
        if cur < e:
            added.append((cur, e, _root_at(run, cur), run[3]))
    if not added:
        return old, False
    return RootMap.of_runs(old.shape, old.dim, _coalesce(olds + added), explicit), True


def _constant_runs(m: RootMap) -> bool:
    """Whether a run map holds the same id (or none) at every position along its dimension."""
    runs = m.runs or []
    size = m.shape[m.dim]
    return not runs or (len(runs) == 1 and runs[0][:2] == (0, size) and (runs[0][3] == 0 or size == 1))


def _first_along(m: RootMap, d: int) -> RootMap:
    """The map's first position along ``d``, broadcast along ``d``."""
    explicit = m.explicit[:d] + (False,) + m.explicit[d + 1 :]
    if m.runs is not None:
        shape = m.shape[:d] + (1,) + m.shape[d + 1 :]
        runs = [(0, 1, m.runs[0][2], 0)] if m.runs and m.runs[0][0] == 0 else []
        return RootMap.of_runs(shape, m.dim, runs, explicit)
    return RootMap(m.t.narrow(d, 0, 1), explicit)


def squeeze_constant(m: RootMap, keep: Sequence[int] = ()) -> RootMap:
    """Collapse explicit dimensions along which the map does not vary (except ``keep``)."""
    if m.runs is not None:
        d = m.dim
        if d in keep or m.shape[d] == 1 or not _constant_runs(m):
            return m
        return _first_along(m, d)
    t, explicit = m.t, list(m.explicit)
    for d in range(t.dim()):
        if d in keep or t.shape[d] == 1:
            continue
        first = t.narrow(d, 0, 1)
        if bool((t == first).all()):
            t = first
            explicit[d] = False
    return RootMap(t, tuple(explicit))


def constant_along(m: RootMap, dim: int) -> bool:
    """Whether the map is the same at every position along ``dim``.

    Root ids are compared, not just pruned/kept: in a full-index group every root channel is an
    independent choice, so a pattern is only fixed along ``dim`` if the same roots sit there.
    (Subset groups use a single root id, where this is the pruned/kept pattern.)
    """
    if m.shape[dim] == 1:
        return True
    if m.runs is not None:
        return _constant_runs(m)
    return bool((m.t == m.t.narrow(dim, 0, 1)).all())


def collapse(m: RootMap, dims: Sequence[int], why: str) -> RootMap:
    """Make the map broadcast along ``dims``; it must not vary along them."""
    for d in dims:
        if m.shape[d] == 1:
            continue
        if not constant_along(m, d):
            raise Barrier(why)
        m = _first_along(m, d)
    return m


def channels_at(m: RootMap, dim: int, size: int) -> tuple[list[int], list[int]]:
    """Read the pruned channels of dimension ``dim`` (of ``size`` channels) from a map.

    The map must not vary along any other dimension: otherwise a channel would be pruned at
    some positions only, which no layer can do.
    """
    return channel_lists(channel_set(m, dim, size))


def channel_set(m: RootMap, dim: int, size: int) -> RootMap:
    """The pruned channels of dimension ``dim`` (of ``size`` channels) of a map, as a *channel
    set*: a 1-D map over the ``size`` channels (runs stay runs, so reading the channels of a wide
    layer costs a few integers, not a Python list per channel). Raises :class:`Barrier` like
    :func:`channels_at`."""
    dim = dim % m.ndim
    m = collapse(
        m,
        [d for d in range(m.ndim) if d != dim],
        f"the pruned channels vary along other dimensions than dimension {dim}",
    )
    if m.shape[dim] == 1 and size != 1:
        if m.any():
            raise Barrier(f"every channel of dimension {dim} would be pruned")
        return empty_set(size)
    if m.shape[dim] != size:
        raise Barrier(f"dimension {dim} has {m.shape[dim]} positions, the layer expects {size}")
    if m.runs is not None:
        return RootMap.of_runs((size,), 0, m.runs, (True,))
    return RootMap(m.t.reshape(size), (True,))


def empty_set(size: int) -> RootMap:
    """The channel set of ``size`` channels with none pruned."""
    return RootMap.of_runs((size,), 0, [], (True,))


def channel_lists(s: RootMap) -> tuple[list[int], list[int]]:
    """The pruned channels of a channel set (:func:`channel_set`), ascending, and their root ids."""
    if s.runs is not None:
        idxs: list[int] = []
        roots: list[int] = []
        for a, e, b, st in s.runs:
            idxs.extend(range(a, e))
            roots.extend(range(b, b + e - a) if st else [b] * (e - a))
        return idxs, roots
    flat = s.t.reshape(-1)
    idxs_t = torch.nonzero(flat >= 0).flatten()
    return idxs_t.tolist(), flat[idxs_t].tolist()


def channel_tensors(s: RootMap) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`channel_lists` as two long tensors (built with torch ops, no Python int per channel).
    When every channel is its own root the two are the same tensor. Treat them as read-only."""
    if s.runs is not None:
        if not s.runs:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        if all(st and a == b for a, _e, b, st in s.runs):  # every channel its own root
            idxs = _aranges(s.runs)
            return idxs, idxs
        idxs = _aranges(s.runs)
        roots = torch.cat(
            [torch.arange(b, b + e - a) if st else torch.full((e - a,), b) for a, e, b, st in s.runs]
        )
        return idxs, roots
    flat = s.t.reshape(-1)
    idxs_t = torch.nonzero(flat >= 0).flatten()
    return idxs_t, flat[idxs_t]


def _aranges(runs: list[Run]) -> torch.Tensor:
    """The positions of ``runs``, ascending."""
    if len(runs) == 1:
        return torch.arange(runs[0][0], runs[0][1])
    return torch.cat([torch.arange(a, e) for a, e, _b, _st in runs])


def set_count(s: RootMap) -> int:
    """How many channels a channel set prunes."""
    if s.runs is not None:
        return sum(e - a for a, e, _b, _st in s.runs)
    return int((s.t >= 0).sum())


def resize_set(s: RootMap, size: int) -> RootMap:
    """A channel set over ``size`` channels (at least its own): the positions added are kept."""
    n = s.shape[0]
    if n == size:
        return s
    if s.runs is not None:
        return RootMap.of_runs((size,), 0, s.runs, (True,))
    out = torch.full((size,), KEPT, dtype=torch.long)
    out[:n] = s.t.reshape(-1)
    return RootMap(out, (True,))


def spread(s: RootMap, ndim: int, dim: int) -> RootMap:
    """A channel set as the map of a tensor of ``ndim`` dimensions whose channels lie along
    ``dim`` (the inverse of :func:`channel_set`; runs stay runs, a tensor is viewed)."""
    dim = dim % ndim
    shape = [1] * ndim
    shape[dim] = s.shape[0]
    explicit = tuple(d == dim for d in range(ndim))
    if s.runs is not None:
        return RootMap.of_runs(shape, dim, s.runs, explicit)
    return RootMap(s.t.reshape(shape), explicit)


def pruned_spans(m: RootMap, dim: int) -> list[tuple[int, int]] | None:
    """Intervals of positions along ``dim`` that hold pruned elements, when the map keeps them
    as runs along ``dim`` (None otherwise: read the tensor)."""
    if m.runs is None or m.dim != dim:
        return None
    return [(s, e) for s, e, _b, _st in m.runs]


def _align(m: RootMap, ndim: int) -> RootMap:
    """Right-align a map to ``ndim`` dimensions (broadcasting rules)."""
    if m.ndim == ndim:
        return m
    if m.ndim < ndim:
        pad = ndim - m.ndim
        if m.runs is not None:
            return RootMap.of_runs((1,) * pad + m.shape, m.dim + pad, m.runs, (False,) * pad + m.explicit)
        return RootMap(m.t.reshape((1,) * pad + m.shape), (False,) * pad + m.explicit)
    extra = m.ndim - ndim
    m = collapse(m, range(extra), "channels live on a dimension the result does not have")
    if m.runs is not None and m.dim >= extra:
        return RootMap.of_runs(m.shape[extra:], m.dim - extra, m.runs, m.explicit[extra:])
    return RootMap(m.t.reshape(m.shape[extra:]), m.explicit[extra:])


def broadcast_to(m: RootMap, shape: Sequence[int]) -> RootMap | None:
    """Map onto a broadcast operand or result of ``shape``; None when the operand is broadcast
    along a dimension where the pruned pattern varies (then its elements are shared by pruned and
    kept channels and stay). Along a dimension where the pattern is the same everywhere (e.g. a
    per-head bias broadcast over the batch while whole heads go), the operand is pruned with it."""
    m = _align(m, len(shape))
    for d, size in enumerate(shape):
        msize = m.shape[d]
        if msize == 1:
            continue
        if size == 1:
            if not constant_along(m, d):
                return None
            m = _first_along(m, d)
            continue
        if size != msize:
            raise Barrier(f"an elementwise op changes the size of channel dimension {d} ({msize} -> {size})")
    return m


def _blocks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up groups of dimensions of two shapes with the same number of elements that a
    view maps onto each other (size-1 dimensions are left out)."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [i for i, s in enumerate(b) if s != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia):
                    raise Barrier("reshape between incompatible shapes")
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                if j >= len(ib):
                    raise Barrier("reshape between incompatible shapes")
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        out.append((ga, gb))
    return out


def reshape(m: RootMap, in_shape: Sequence[int], out_shape: Sequence[int]) -> RootMap:
    """Map through a view/reshape/flatten/(un)squeeze. Only the blocks of dimensions that carry
    channels are materialised, so the cost is the size of those blocks."""
    if math.prod(in_shape) != math.prod(out_shape):
        raise Barrier("reshape changes the number of elements")
    m = squeeze_constant(m)
    blocks = _blocks(in_shape, out_shape)
    if m.runs is not None and m.shape[m.dim] != 1:
        # Channels on one dimension that the view keeps whole (e.g. a flatten of 1x1 maps) just
        # move to its new position.
        for ga, gb in blocks:
            if ga == [m.dim] and len(gb) == 1:
                shape = [1] * len(out_shape)
                shape[gb[0]] = out_shape[gb[0]]
                return RootMap.of_runs(shape, gb[0], m.runs, tuple(d == gb[0] for d in range(len(out_shape))))
    red_in = [1] * len(in_shape)
    red_out = [1] * len(out_shape)
    explicit: list[bool] = [False] * len(out_shape)
    splits: list[list[int]] = []
    merges: list[list[int]] = []
    for ga, gb in blocks:
        if any(m.shape[d] != 1 for d in ga):
            for d in ga:
                red_in[d] = in_shape[d]
            for d in gb:
                red_out[d] = out_shape[d]
                explicit[d] = True
            (merges if len(ga) > 1 else splits).append(ga if len(ga) > 1 else gb)
    for d, s in enumerate(m.shape):
        if s != 1 and red_in[d] == 1 and in_shape[d] != 1:
            raise Barrier("reshape lost a channel dimension")
    t = m.t.expand(red_in)
    for dims in merges:
        t = product_closure(t, dims)
    t = t.reshape(red_out)
    for dims in splits:
        t = product_closure(t, dims)
    return RootMap(t, tuple(explicit))


def product_closure(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Close a pruned pattern over dimensions that one reshape splits a channel dimension into
    (e.g. (heads, head size) or (groups, channels per group)).

    A tensor of that shape stays rectangular only if what is removed is whole rows (a head) or
    whole columns (the same offsets in every head): a position pruned in some rows only is
    extended to every row, which is the closure's answer to "what else must go".
    """
    dims = [d for d in dims if t.shape[d] > 1]
    if len(dims) < 2:
        return t
    k = len(dims)
    x = t.movedim(dims, list(range(t.dim() - k, t.dim())))
    shape = x.shape
    x = x.reshape(*shape[:-k], shape[-k], -1)
    mask = x >= 0
    full_rows = mask.all(-1, keepdim=True) & (x == x[..., :1]).all(-1, keepdim=True)
    partial = mask & ~full_rows
    cols = partial.any(-2, keepdim=True)
    if bool(cols.any()):
        fill = torch.where(partial, x, torch.full_like(x, KEPT)).amax(-2, keepdim=True)
        # Every root on a column that some root only partly covers goes with that column.
        join_ids(fill.expand_as(x), x, cols & mask & (x != fill))
        x = torch.where(cols & ~mask, fill.expand_as(x), x)
    x = x.reshape(shape).movedim(list(range(t.dim() - k, t.dim())), dims)
    return product_closure(x, dims[1:])


def permute(m: RootMap, dims: Sequence[int]) -> RootMap:
    """Map through ``permute(dims)``."""
    explicit = tuple(m.explicit[d] for d in dims)
    if m.runs is not None:
        return RootMap.of_runs(tuple(m.shape[d] for d in dims), list(dims).index(m.dim), m.runs, explicit)
    return RootMap(m.t.permute(*dims), explicit)


def inverse_permutation(dims: Sequence[int]) -> list[int]:
    inv = [0] * len(dims)
    for i, d in enumerate(dims):
        inv[d] = i
    return inv


def place(m: RootMap, dim: int, start: int, total: int) -> RootMap:
    """Place a map of a part of a tensor (a concat operand, a split output) at ``start`` along
    ``dim`` of the whole tensor (``total`` long); the rest is kept."""
    if m.shape[dim] == 1:
        return m
    shape = m.shape[:dim] + (total,) + m.shape[dim + 1 :]
    explicit = m.explicit[:dim] + (True,) + m.explicit[dim + 1 :]
    if m.runs is not None and m.dim == dim:
        runs = [(s + start, e + start, b, st) for s, e, b, st in m.runs]
        return RootMap.of_runs(shape, dim, runs, explicit)
    out = torch.full(shape, KEPT, dtype=torch.long)
    out.narrow(dim, start, m.shape[dim]).copy_(m.t)
    return RootMap(out, explicit)


def narrow(m: RootMap, dim: int, start: int, length: int) -> RootMap:
    """Part of a map along ``dim`` (a split/concat operand); broadcast dims pass unchanged."""
    if m.shape[dim] == 1:
        return m
    if m.runs is not None:
        end = start + length
        runs = [
            (max(s, start) - start, min(e, end) - start, _root_at((s, e, b, st), max(s, start)), st)
            for s, e, b, st in m.runs
            if s < end and e > start
        ]
        return RootMap.of_runs(m.shape[:dim] + (length,) + m.shape[dim + 1 :], dim, runs, m.explicit)
    return RootMap(m.t.narrow(dim, start, length), m.explicit)


def unsqueeze(m: RootMap, dim: int) -> RootMap:
    ex = list(m.explicit)
    ex.insert(dim, False)
    if m.runs is not None:
        shape = m.shape[:dim] + (1,) + m.shape[dim:]
        return RootMap.of_runs(shape, m.dim + (dim <= m.dim), m.runs, tuple(ex))
    return RootMap(m.t.unsqueeze(dim), tuple(ex))


def drop_dim(m: RootMap, dim: int) -> RootMap:
    """Remove a dimension along which the map must not vary."""
    m = collapse(m, [dim], f"channels live on dimension {dim}, which the op removes")
    ex = list(m.explicit)
    del ex[dim]
    if m.runs is not None and m.ndim > 1:
        shape = m.shape[:dim] + m.shape[dim + 1 :]
        return RootMap.of_runs(shape, m.dim - (dim < m.dim) if m.dim != dim else 0, m.runs, tuple(ex))
    return RootMap(m.t.squeeze(dim), tuple(ex))
