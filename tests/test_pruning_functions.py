"""Tests for prune_callbacks.layers: structural channel removal for every layer family, and the
registry of layer pruners."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import prune_callbacks.layers as pf
from prune_callbacks import DependencyGraph
from prune_callbacks.layers import (
    DEFAULT_PRUNERS,
    ConvPruner,
    LayerPruner,
    LinearPruner,
    ParameterPruner,
    PruningFunction,
    function_by_name,
    get_pruner,
    get_pruning_functions,
    normalize_idxs,
)
from prune_callbacks.layers.base import CoupledPruner, define_public_functions, register_pruner

FAST = settings(max_examples=20, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Double precision makes the output comparisons tight; restored for other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def keep_of(n: int, removed) -> torch.Tensor:
    removed = set(int(i) for i in removed)
    return torch.tensor([i for i in range(n) if i not in removed], dtype=torch.long)


def zero_channels(x: torch.Tensor, removed, dim: int) -> torch.Tensor:
    x = x.clone()
    if len(removed):
        x.index_fill_(dim, torch.as_tensor(sorted(set(removed)), dtype=torch.long), 0.0)
    return x


def named_params(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Parameter):
        return {"": obj}
    return dict(obj.named_parameters())


def get_param(obj, name: str) -> torch.Tensor:
    return obj if name == "" else obj.get_parameter(name)


def fill_unique(obj) -> None:
    """Give every parameter entry a distinct value so removed entries can be identified."""
    offset = 1
    with torch.no_grad():
        for p in named_params(obj).values():
            p.copy_(torch.arange(offset, offset + p.numel(), dtype=p.dtype).reshape(p.shape))
            offset += p.numel()


def all_values(obj) -> torch.Tensor:
    values = [p.detach().flatten() for p in named_params(obj).values()]
    return torch.cat(values) if values else torch.zeros(0)


def subsets(n: int, min_size: int = 0):
    """Strategy: subsets of range(n) that leave at least one channel."""
    return st.lists(st.integers(0, n - 1), min_size=min_size, max_size=n - 1, unique=True)


# A table of (factory, pruning function, indices): used for the generic invariants.
def _mha_separate() -> nn.MultiheadAttention:
    return nn.MultiheadAttention(8, 2, kdim=5, vdim=7, add_bias_kv=True)


def _param() -> nn.Parameter:
    return nn.Parameter(torch.randn(3, 6))


CASES = [
    (lambda: nn.Linear(5, 7), pf.prune_linear_out_channels, [5, 2]),
    (lambda: nn.Linear(5, 7), pf.prune_linear_in_channels, [0, 4, 4]),
    (lambda: nn.Linear(5, 7, bias=False), pf.prune_linear_out_channels, [6]),
    (lambda: nn.Conv2d(4, 6, 3), pf.prune_conv_out_channels, [1, 5]),
    (lambda: nn.Conv2d(4, 6, 3), pf.prune_conv_in_channels, [3]),
    (lambda: nn.Conv1d(4, 6, 3), pf.prune_conv_out_channels, [0]),
    (lambda: nn.Conv3d(4, 6, 2), pf.prune_conv_in_channels, [1, 2]),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), pf.prune_conv_out_channels, [4, 1]),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), pf.prune_conv_in_channels, [0, 3]),
    (lambda: nn.ConvTranspose2d(4, 6, 3), pf.prune_conv_out_channels, [2]),
    (lambda: nn.ConvTranspose2d(4, 6, 3), pf.prune_conv_in_channels, [1, 3]),
    (lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), pf.prune_conv_out_channels, [0, 5]),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), pf.prune_conv_in_channels, [1, 2]),
    (lambda: nn.Conv2d(4, 4, 3, groups=4), pf.prune_depthwise_conv_out_channels, [2]),
    (lambda: nn.Conv2d(4, 4, 3, groups=4), pf.prune_depthwise_conv_in_channels, [0, 3]),
    (lambda: nn.Conv2d(4, 8, 3, groups=4), pf.prune_depthwise_conv_out_channels, [2, 3]),
    (lambda: nn.Conv2d(4, 8, 3, groups=4), pf.prune_depthwise_conv_in_channels, [1]),
    (lambda: nn.ConvTranspose2d(4, 8, 3, groups=4), pf.prune_depthwise_conv_out_channels, [7, 6]),
    (lambda: nn.ConvTranspose2d(4, 8, 3, groups=4), pf.prune_depthwise_conv_in_channels, [2]),
    (lambda: nn.BatchNorm2d(5), pf.prune_batchnorm_out_channels, [1, 3]),
    (lambda: nn.BatchNorm1d(5, affine=False), pf.prune_batchnorm_in_channels, [0]),
    (lambda: nn.LayerNorm((3, 5)), pf.prune_layernorm_out_channels, [1]),
    (lambda: nn.LayerNorm(6, bias=False), pf.prune_layernorm_in_channels, [0, 5]),
    (lambda: nn.RMSNorm(6), pf.prune_layernorm_out_channels, [2, 3]),
    (lambda: nn.GroupNorm(2, 8), pf.prune_groupnorm_out_channels, [1, 6]),
    (
        lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        pf.prune_instancenorm_in_channels,
        [2],
    ),
    (lambda: nn.PReLU(5), pf.prune_prelu_out_channels, [0, 3]),
    (lambda: nn.Embedding(10, 6), pf.prune_embedding_out_channels, [1, 4]),
    (lambda: nn.MultiheadAttention(8, 2), pf.prune_multihead_attention_out_channels, [1, 6]),
    (lambda: nn.MultiheadAttention(8, 2, bias=False), pf.prune_multihead_attention_in_channels, [0, 1]),
    (_mha_separate, pf.prune_multihead_attention_out_channels, [7, 0]),
    (lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True), pf.prune_lstm_out_channels, [1, 3]),
    (lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True), pf.prune_lstm_in_channels, [0]),
    (lambda: nn.LSTM(3, 5, bias=False), pf.prune_lstm_out_channels, [4]),
    (lambda: nn.GRU(3, 5, num_layers=2), pf.prune_lstm_out_channels, [0, 2]),
    (lambda: nn.GRU(4, 5, bidirectional=True), pf.prune_lstm_in_channels, [3, 1]),
    (_param, pf.prune_parameter_out_channels, [0]),
]
CASE_IDS = [f"{i}-{fn.__name__}" for i, (_, fn, _) in enumerate(CASES)]


def _channels(fn: PruningFunction, obj) -> int:
    return fn.pruner.out_channels(obj) if fn.side == "out" else fn.pruner.in_channels(obj)


# ---------------------------------------------------------------------------------------------
# param_views agree exactly with what pruning removes
# ---------------------------------------------------------------------------------------------


def _unscaled_queries(mha: nn.MultiheadAttention, old_head_dim: int) -> torch.Tensor:
    """All values of a pruned ``mha`` with its query rows divided by the scale the prune applied
    (``sqrt(new head_dim / old head_dim)``), rounded back to the integers ``fill_unique`` wrote."""
    factor = (mha.head_dim / old_head_dim) ** 0.5
    e = mha.embed_dim
    values = []
    for name, p in named_params(mha).items():
        t = p.detach().clone()
        if name in ("in_proj_weight", "in_proj_bias", "q_proj_weight"):
            t[:e] /= factor
        values.append(t.round().flatten())
    return torch.cat(values)


def check_views_match_pruning(obj, fn: PruningFunction, removed) -> None:
    """Rows ``removed`` of all views hold exactly the entries that pruning ``removed`` deletes.

    For one channel the match is exact (no entry counted twice); for several channels an entry
    shared by two removed channels (e.g. ``W_hh[row of a, column b]``) is in both rows, so the
    comparison is on the set of values.
    """
    fill_unique(obj)
    n = _channels(fn, obj)
    rows = []
    for name, view in fn.pruner.param_views(obj, fn.side):
        v = view(get_param(obj, name).detach())
        assert v.dim() == 2 and v.shape[0] == n, (name, tuple(v.shape), n)
        rows.append(v[sorted(set(removed))].flatten())
    collected = torch.cat(rows).sort().values if rows else torch.zeros(0)
    before = all_values(obj)
    head_dim = obj.head_dim if isinstance(obj, nn.MultiheadAttention) else None
    pruned = fn(copy.deepcopy(obj), removed)
    after = all_values(pruned)
    if head_dim is not None:  # the queries of the smaller heads are scaled: undo it to compare
        after = _unscaled_queries(pruned, head_dim)
    expected = before[~torch.isin(before, after)].sort().values
    if len(set(removed)) == 1:
        assert torch.equal(collected, expected)
    else:
        assert torch.equal(torch.unique(collected), expected)


@pytest.mark.parametrize(("factory", "fn", "idxs"), CASES, ids=CASE_IDS)
def test_param_views_rows_are_exactly_the_removed_entries(factory, fn, idxs):
    check_views_match_pruning(factory(), fn, idxs)
    obj = factory()
    singles = 0
    for j in range(_channels(fn, obj)):
        try:
            fn(copy.deepcopy(obj), [j])
        except ValueError:
            continue  # e.g. grouped conv or GroupNorm: a lone channel is not a valid prune
        check_views_match_pruning(obj, fn, [j])
        singles += 1
    assert singles or len(idxs) > 1


PARAM_DIM1_OUT = get_pruning_functions(ParameterPruner(1))[0]


@pytest.mark.parametrize(
    ("factory", "fn"),
    [
        (lambda: nn.Linear(6, 7), pf.prune_linear_in_channels),
        (lambda: nn.Conv2d(6, 5, 3), pf.prune_conv_in_channels),
        (lambda: nn.ConvTranspose3d(6, 5, 2), pf.prune_conv_out_channels),
        (lambda: nn.LSTM(4, 6, num_layers=3, bidirectional=True), pf.prune_lstm_out_channels),
        (lambda: nn.GRU(4, 6, num_layers=2), pf.prune_lstm_out_channels),
        (lambda: nn.MultiheadAttention(6, 1, add_bias_kv=True), pf.prune_multihead_attention_out_channels),
        (lambda: nn.Parameter(torch.zeros(2, 6, 3)), None),
    ],
    ids=["linear-in", "conv-in", "convT3d-out", "lstm-bidir-out", "gru-out", "mha-out", "param-dim1"],
)
@FAST
@given(data=st.data())
def test_param_views_random_subsets(factory, fn, data):
    obj = factory()
    if fn is None:
        fn = PARAM_DIM1_OUT
    removed = data.draw(subsets(_channels(fn, obj), min_size=1))
    check_views_match_pruning(obj, fn, removed)


def test_grouped_conv_in_view_layout():
    conv = nn.Conv2d(4, 6, 1, groups=2, bias=False)
    fill_unique(conv)
    ((name, view),) = ConvPruner().param_views(conv, "in")
    rows = view(conv.weight.detach())
    # Input channel 3 is column 1 of group 1, whose out channels are rows 3..5.
    assert torch.equal(rows[3], conv.weight.detach()[3:6, 1].flatten())
    assert rows.shape == (4, 3)


def test_param_views_rejects_unknown_side():
    with pytest.raises(ValueError, match="side"):
        LinearPruner().param_views(nn.Linear(2, 2), "both")


# ---------------------------------------------------------------------------------------------
# Generic invariants: identity, gradients, optimizer, no in-place writes, empty and bad idxs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("factory", "fn", "idxs"), CASES, ids=CASE_IDS)
def test_parameters_keep_identity_and_grads_are_sliced(factory, fn, idxs):
    obj = factory()
    params = named_params(obj)
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(list(params.values()), lr=0.1) if params else None
    # The same pruning applied to a copy whose weights are the gradients tells what the grads must be.
    grads_as_weights = copy.deepcopy(obj)
    with torch.no_grad():
        for name, p in named_params(grads_as_weights).items():
            p.copy_(params[name].grad)
            p.grad = None
    ids_before = {name: id(p) for name, p in params.items()}

    result = fn(obj, idxs)
    fn(grads_as_weights, idxs)

    assert result is obj
    after = named_params(obj)
    assert {name: id(p) for name, p in after.items()} == ids_before
    if opt is not None:
        assert [id(p) for p in opt.param_groups[0]["params"]] == list(ids_before.values())
    expected = named_params(grads_as_weights)
    for name, p in after.items():
        assert p.grad.shape == p.shape, name
        assert torch.equal(p.grad, expected[name].detach()), name
        assert p.requires_grad and isinstance(p, nn.Parameter)


@pytest.mark.parametrize(("factory", "fn", "idxs"), CASES, ids=CASE_IDS)
def test_old_tensors_are_never_written(factory, fn, idxs):
    obj = factory()
    tensors = {f"p:{k}": p.data for k, p in named_params(obj).items()}
    if isinstance(obj, nn.Module):
        tensors.update({f"b:{k}": b for k, b in obj.named_buffers()})
    copies = {k: t.clone() for k, t in tensors.items()}
    fn(obj, idxs)
    for k, t in tensors.items():
        assert torch.equal(t, copies[k]), k
    if isinstance(obj, nn.Module):
        for k, b in obj.named_buffers():
            if b.dim() and b.shape != copies[f"b:{k}"].shape:
                assert b is not tensors[f"b:{k}"]


@pytest.mark.parametrize(("factory", "fn", "idxs"), CASES, ids=CASE_IDS)
def test_empty_idxs_is_a_noop(factory, fn, idxs):
    obj = factory()
    before = {k: p.data for k, p in named_params(obj).items()}
    n = _channels(fn, obj)
    assert fn(obj, []) is obj
    assert fn(obj, torch.zeros(0, dtype=torch.long)) is obj
    assert _channels(fn, obj) == n
    for k, p in named_params(obj).items():
        assert p.data.data_ptr() == before[k].data_ptr() and p.shape == before[k].shape


@pytest.mark.parametrize(("factory", "fn", "idxs"), CASES, ids=CASE_IDS)
def test_out_of_range_and_all_channels_raise(factory, fn, idxs):
    obj = factory()
    n = _channels(fn, obj)
    shapes = {k: p.shape for k, p in named_params(obj).items()}
    cls = type(obj).__name__
    with pytest.raises(ValueError, match=rf"{cls}.*out of range for {n} channels"):
        fn(obj, [0, n])
    with pytest.raises(ValueError, match=rf"{cls}.*out of range"):
        fn(obj, [-1])
    with pytest.raises(ValueError, match=rf"{cls}.*cannot prune all {n} channels"):
        fn(obj, list(range(n)))
    assert {k: p.shape for k, p in named_params(obj).items()} == shapes


@pytest.mark.parametrize(("factory", "fn", "idxs"), CASES, ids=CASE_IDS)
def test_idxs_forms_are_equivalent(factory, fn, idxs):
    """Unsorted lists with duplicates, tuples and tensors all prune the same channels."""
    torch.manual_seed(0)
    base = factory()
    variants = [list(reversed(idxs)) + list(idxs), tuple(sorted(idxs)), torch.tensor(idxs)]
    results = []
    for v in variants:
        obj = copy.deepcopy(base)
        fn(obj, v)
        results.append({k: p.detach().clone() for k, p in named_params(obj).items()})
    for r in results[1:]:
        assert r.keys() == results[0].keys()
        assert all(torch.equal(r[k], results[0][k]) for k in r)
    obj = copy.deepcopy(base)
    n = _channels(fn, obj)
    fn(obj, variants[0])
    assert _channels(fn, obj) == n - len(set(idxs))


def test_normalize_idxs():
    conv = nn.Conv2d(2, 2, 1)
    assert normalize_idxs([3, 1, 3, 0], 5, conv) == [0, 1, 3]
    assert normalize_idxs(torch.tensor([[2], [2]]), 5, conv) == [2]
    assert normalize_idxs([], 5, conv) == []
    with pytest.raises(TypeError, match="integers"):
        normalize_idxs(torch.tensor([True, False]), 2, conv)
    with pytest.raises(TypeError):
        normalize_idxs([1.5], 5, conv)
    with pytest.raises(ValueError, match=r"Conv2d: channel indices \[7\] are out of range for 5"):
        normalize_idxs([1, 7], 5, conv)


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------


@FAST
@given(removed=subsets(7))
def test_linear_out_preserves_kept_outputs(removed):
    lin = nn.Linear(5, 7)
    old = copy.deepcopy(lin)
    pf.prune_linear_out_channels(lin, removed)
    keep = keep_of(7, removed)
    assert lin.out_features == len(keep) and lin.weight.shape == (len(keep), 5)
    assert lin.bias.shape == (len(keep),)
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(lin(x), old(x)[..., keep])


@FAST
@given(removed=subsets(6))
def test_linear_in_equals_original_with_zeroed_inputs(removed):
    lin = nn.Linear(6, 4)
    old = copy.deepcopy(lin)
    pf.prune_linear_in_channels(lin, removed)
    keep = keep_of(6, removed)
    assert lin.in_features == len(keep) and lin.weight.shape == (4, len(keep))
    x = torch.randn(3, 6)
    torch.testing.assert_close(lin(x[:, keep]), old(zero_channels(x, removed, 1)))


# ---------------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------------


CONV_CASES = [
    (lambda: nn.Conv1d(4, 6, 3, padding=1), 1, [0, 5], [2]),
    (lambda: nn.Conv2d(4, 6, 3, padding=1), 2, [1, 2, 3], [0, 3]),
    (lambda: nn.Conv3d(4, 6, 2), 3, [5], [1]),
    (lambda: nn.Conv2d(6, 4, 3, groups=2), 2, [0, 3], [1, 2, 4, 5]),
    (lambda: nn.Conv2d(6, 9, 1, groups=3, bias=False), 2, [0, 4, 8], [1, 3, 5]),
    (lambda: nn.ConvTranspose1d(4, 6, 3), 1, [1], [0, 1, 2]),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), 2, [4, 5], [3]),
    (lambda: nn.ConvTranspose3d(4, 6, 2), 3, [0], [2]),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), 2, [2, 3], [0, 2]),
]


@pytest.mark.parametrize(("factory", "nd", "out_idx", "in_idx"), CONV_CASES)
def test_conv_out_preserves_kept_outputs(factory, nd, out_idx, in_idx):
    conv = factory()
    old = copy.deepcopy(conv)
    pf.prune_conv_out_channels(conv, out_idx)
    keep = keep_of(old.out_channels, out_idx)
    assert conv.out_channels == len(keep) and conv.groups == old.groups
    assert conv.in_channels == old.in_channels
    w_out_dim = 1 if conv.transposed else 0
    assert conv.weight.shape[w_out_dim] * (conv.groups if conv.transposed else 1) == len(keep)
    x = torch.randn(2, old.in_channels, *([5] * nd))
    torch.testing.assert_close(conv(x), old(x)[:, keep])


@pytest.mark.parametrize(("factory", "nd", "out_idx", "in_idx"), CONV_CASES)
def test_conv_in_equals_original_with_zeroed_inputs(factory, nd, out_idx, in_idx):
    conv = factory()
    old = copy.deepcopy(conv)
    pf.prune_conv_in_channels(conv, in_idx)
    keep = keep_of(old.in_channels, in_idx)
    assert conv.in_channels == len(keep) and conv.out_channels == old.out_channels
    assert conv.groups == old.groups
    x = torch.randn(2, old.in_channels, *([5] * nd))
    torch.testing.assert_close(conv(x[:, keep]), old(zero_channels(x, in_idx, 1)))


@FAST
@given(data=st.data())
def test_grouped_conv_random_equal_per_group(data):
    groups, per_in, per_out = 3, 3, 2
    conv = nn.Conv2d(groups * per_in, groups * per_out, 3, padding=1, groups=groups)
    old = copy.deepcopy(conv)
    k_in = data.draw(st.integers(0, per_in - 1))
    k_out = data.draw(st.integers(0, per_out - 1))
    rm_in = [
        g * per_in + i
        for g in range(groups)
        for i in data.draw(st.lists(st.integers(0, per_in - 1), min_size=k_in, max_size=k_in, unique=True))
    ]
    rm_out = [
        g * per_out + i
        for g in range(groups)
        for i in data.draw(st.lists(st.integers(0, per_out - 1), min_size=k_out, max_size=k_out, unique=True))
    ]
    # Outputs first: a grouped conv left with one input per group counts as depthwise.
    pf.prune_conv_out_channels(conv, rm_out)
    pf.prune_conv_in_channels(conv, rm_in)
    assert conv.weight.shape[:2] == (groups * (per_out - k_out), per_in - k_in)
    x = torch.randn(2, groups * per_in, 4, 4)
    keep_in, keep_out = keep_of(groups * per_in, rm_in), keep_of(groups * per_out, rm_out)
    torch.testing.assert_close(conv(x[:, keep_in]), old(zero_channels(x, rm_in, 1))[:, keep_out])


@pytest.mark.parametrize("fn", [pf.prune_conv_out_channels, pf.prune_conv_in_channels])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_conv_unequal_groups_raise(fn, transposed):
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = cls(4, 6, 3, groups=2)
    shape = conv.weight.shape
    with pytest.raises(ValueError, match="every group must lose the same number") as info:
        fn(conv, [0])
    assert "groups=2" in str(info.value) and cls.__name__ in str(info.value)
    assert conv.weight.shape == shape and conv.in_channels == 4 and conv.out_channels == 6


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_in_prunes_coupled_outputs(transposed, mult):
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = cls(5, 5 * mult, 3, padding=1, groups=5)
    old = copy.deepcopy(conv)
    assert ConvPruner().coupled(conv)
    removed = [3, 0]
    pf.prune_depthwise_conv_in_channels(conv, removed)
    keep_in = keep_of(5, removed)
    keep_out = torch.tensor([i * mult + r for i in keep_in.tolist() for r in range(mult)])
    assert (conv.in_channels, conv.out_channels, conv.groups) == (3, 3 * mult, 3)
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(conv(x[:, keep_in]), old(x)[:, keep_out])


@pytest.mark.parametrize("transposed", [False, True])
def test_depthwise_out_requires_whole_blocks(transposed):
    cls = nn.ConvTranspose1d if transposed else nn.Conv1d
    conv = cls(4, 8, 3, groups=4)
    old = copy.deepcopy(conv)
    with pytest.raises(ValueError, match="whole blocks of 2"):
        pf.prune_depthwise_conv_out_channels(conv, [2])
    with pytest.raises(ValueError, match="whole blocks"):
        pf.prune_depthwise_conv_out_channels(conv, [1, 2])
    assert conv.out_channels == 8 and conv.weight.shape == old.weight.shape
    pf.prune_depthwise_conv_out_channels(conv, [3, 2, 7, 6])
    assert (conv.in_channels, conv.out_channels, conv.groups) == (2, 4, 2)
    x = torch.randn(1, 4, 6)
    torch.testing.assert_close(conv(x[:, [0, 2]]), old(x)[:, [0, 1, 4, 5]])


def test_depthwise_multiplier_one_out_equals_in():
    a = nn.Conv2d(4, 4, 3, groups=4)
    b = copy.deepcopy(a)
    pf.prune_depthwise_conv_out_channels(a, [1, 2])
    pf.prune_depthwise_conv_in_channels(b, [1, 2])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.groups == b.groups == 2


def test_conv_regular_is_not_coupled():
    assert not ConvPruner().coupled(nn.Conv2d(4, 4, 3))
    assert not ConvPruner().coupled(nn.Conv2d(4, 4, 3, groups=2))


# ---------------------------------------------------------------------------------------------
# Norms, PReLU, embedding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [pf.prune_batchnorm_out_channels, pf.prune_batchnorm_in_channels])
@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
def test_batchnorm_preserves_kept_channels(cls, fn):
    bn = cls(6)
    x = torch.randn(4, 6, *([3] * int(cls.__name__[-2])))
    bn(x)  # populate running stats
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    old = copy.deepcopy(bn)
    removed = [4, 1]
    fn(bn, removed)
    keep = keep_of(6, removed)
    assert bn.num_features == 4 and bn.running_mean.shape == (4,) and bn.running_var.shape == (4,)
    assert torch.equal(bn.running_mean, old.running_mean[keep])
    assert torch.equal(bn.num_batches_tracked, old.num_batches_tracked)
    torch.testing.assert_close(bn(x[:, keep]), old(x)[:, keep])


def test_syncbatchnorm_is_batchnorm():
    bn = nn.SyncBatchNorm(4)
    assert get_pruner(bn) is DEFAULT_PRUNERS[nn.modules.batchnorm._BatchNorm]
    pf.prune_batchnorm_out_channels(bn, [0])
    assert bn.num_features == 3 and bn.weight.shape == (3,) and bn.running_var.shape == (3,)


@pytest.mark.parametrize("affine", [True, False])
def test_instancenorm_preserves_kept_channels(affine):
    norm = nn.InstanceNorm2d(5, affine=affine, track_running_stats=True)
    x = torch.randn(2, 5, 4, 4)
    norm(x)
    norm.eval()
    old = copy.deepcopy(norm)
    pf.prune_instancenorm_out_channels(norm, [2])
    keep = keep_of(5, [2])
    assert norm.num_features == 4 and norm.running_mean.shape == (4,)
    if affine:
        assert norm.weight.shape == (4,)
    torch.testing.assert_close(norm(x[:, keep]), old(x)[:, keep])


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nn.LayerNorm((3, 6)),
        lambda: nn.LayerNorm(6, bias=False),
        lambda: nn.LayerNorm(6, elementwise_affine=False),
        lambda: nn.RMSNorm((2, 6)),
    ],
)
def test_layernorm_prunes_last_dim(factory):
    norm = factory()
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 2)
    old = copy.deepcopy(norm)
    removed = [5, 0]
    pf.prune_layernorm_in_channels(norm, removed)
    keep = keep_of(6, removed)
    assert norm.normalized_shape == (*old.normalized_shape[:-1], 4)
    for name, p in norm.named_parameters():
        assert torch.equal(p, old.get_parameter(name)[..., keep])
    x = torch.randn(2, *norm.normalized_shape)
    y = norm(x)
    assert y.shape == x.shape
    # The pruned norm is the original norm's arithmetic applied to the kept features.
    weight = None if norm.weight is None else old.weight[..., keep]
    if isinstance(norm, nn.RMSNorm):
        expected = nn.functional.rms_norm(x, norm.normalized_shape, weight, old.eps)
    else:
        bias = getattr(old, "bias", None)
        bias = None if bias is None else bias[..., keep]
        expected = nn.functional.layer_norm(x, norm.normalized_shape, weight, bias, old.eps)
    torch.testing.assert_close(y, expected)


def test_groupnorm_prunes_and_keeps_divisibility():
    gn = nn.GroupNorm(2, 8)
    old = copy.deepcopy(gn)
    with pytest.raises(ValueError, match=r"leaves 7, which is not divisible by num_groups=2"):
        pf.prune_groupnorm_out_channels(gn, [3])
    assert gn.num_channels == 8 and gn.weight.shape == (8,)
    pf.prune_groupnorm_in_channels(gn, [0, 7])
    keep = keep_of(8, [0, 7])
    assert gn.num_channels == 6 and torch.equal(gn.weight, old.weight[keep]) and gn.bias.shape == (6,)
    assert gn(torch.randn(2, 6, 3)).shape == (2, 6, 3)


def test_prelu_per_channel_and_shared():
    act = nn.PReLU(5, init=0.1)
    with torch.no_grad():
        act.weight.copy_(torch.linspace(0.1, 0.5, 5))
    old = copy.deepcopy(act)
    pf.prune_prelu_out_channels(act, [1])
    keep = keep_of(5, [1])
    assert act.num_parameters == 4
    x = torch.randn(3, 5, 2)
    torch.testing.assert_close(act(x[:, keep]), old(x)[:, keep])

    shared = nn.PReLU()
    pruner = get_pruner(shared)
    assert pruner.out_channels(shared) is None and pruner.in_channels(shared) is None
    assert pruner.param_views(shared, "out") == []
    assert pf.prune_prelu_in_channels(shared, [0, 3, 9]) is shared
    assert shared.weight.shape == (1,)


def test_embedding_out_and_no_in():
    emb = nn.Embedding(10, 6, padding_idx=0)
    old = copy.deepcopy(emb)
    pf.prune_embedding_out_channels(emb, [2, 3])
    keep = keep_of(6, [2, 3])
    assert emb.embedding_dim == 4 and emb.weight.shape == (10, 4)
    ids = torch.tensor([[0, 3, 9]])
    torch.testing.assert_close(emb(ids), old(ids)[..., keep])
    pruner = get_pruner(emb)
    assert pruner.in_channels(emb) is None and not pruner.coupled(emb)
    assert pruner.param_views(emb, "in") == []
    with pytest.raises(ValueError, match="Embedding has no input channels"):
        pf.prune_embedding_in_channels(emb, [1])
    with pytest.raises(ValueError, match="no input channels"):
        pf.prune_embedding_in_channels(emb, [])


# ---------------------------------------------------------------------------------------------
# Multi-head attention
# ---------------------------------------------------------------------------------------------


def _mha_reference(mha: nn.MultiheadAttention, removed, new_head_dim: int) -> nn.MultiheadAttention:
    """Original module rewired to compute what the pruned one computes, on full-size tensors:
    the masked module. Removed query rows are zeroed (their score terms vanish) and removed
    out_proj columns are zeroed (their value channels vanish). The pruned module scales its
    queries so that its smaller heads' 1/sqrt(head_dim) gives the scores of the masked one, so
    the reference keeps the original scale (``new_head_dim`` only documents the pruned size).
    """
    ref = copy.deepcopy(mha)
    e = mha.embed_dim
    assert new_head_dim < mha.head_dim
    rm = torch.tensor(sorted(removed))
    with torch.no_grad():
        q_weight = ref.in_proj_weight[:e] if ref._qkv_same_embed_dim else ref.q_proj_weight
        q_weight[rm] = 0
        if ref.in_proj_bias is not None:
            ref.in_proj_bias[rm] = 0
        ref.out_proj.weight[:, rm] = 0
    return ref


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False},
        {"add_bias_kv": True, "add_zero_attn": True},
        {"kdim": 5, "vdim": 7},
        {"kdim": 5, "vdim": 7, "add_bias_kv": True, "batch_first": True},
    ],
    ids=["plain", "nobias", "bias_kv", "kdim_vdim", "kdim_vdim_bias_kv_bf"],
)
def test_mha_embed_dim_pruning_matches_rewired_original(kwargs):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **kwargs).eval()
    removed = [1, 6]  # one channel of each head, so the heads keep their channels
    ref = _mha_reference(mha, removed, new_head_dim=3)
    pf.prune_multihead_attention_out_channels(mha, removed)
    keep = keep_of(8, removed)
    assert (mha.embed_dim, mha.head_dim, mha.num_heads) == (6, 3, 2)
    assert (mha.kdim, mha.vdim) == ((5, 7) if "kdim" in kwargs else (6, 6))
    assert mha.out_proj.weight.shape == (6, 6)
    assert (mha.out_proj.in_features, mha.out_proj.out_features) == (6, 6)
    if mha._qkv_same_embed_dim:
        assert mha.in_proj_weight.shape == (18, 6)
    else:
        assert mha.q_proj_weight.shape == (6, 6) and mha.k_proj_weight.shape == (6, 5)
        assert mha.v_proj_weight.shape == (6, 7)
    if mha.bias_k is not None:
        assert mha.bias_k.shape == mha.bias_v.shape == (1, 1, 6)
    bf = kwargs.get("batch_first", False)
    shape = (2, 4) if bf else (4, 2)
    q = torch.randn(*shape, 8)
    k = torch.randn(*shape, kwargs.get("kdim", 8))
    v = torch.randn(*shape, kwargs.get("vdim", 8))
    k_new = k[..., keep] if "kdim" not in kwargs else k
    v_new = v[..., keep] if "vdim" not in kwargs else v
    out, attn = mha(q[..., keep], k_new, v_new)
    k_ref = zero_channels(k, removed, 2) if "kdim" not in kwargs else k
    v_ref = zero_channels(v, removed, 2) if "vdim" not in kwargs else v
    out_ref, attn_ref = ref(zero_channels(q, removed, 2), k_ref, v_ref)
    torch.testing.assert_close(out, out_ref[..., keep])
    torch.testing.assert_close(attn, attn_ref)


def test_mha_fast_path_runs_after_pruning():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    pf.prune_multihead_attention_in_channels(mha, [0, 5])
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        fast, _ = mha(x, x, x, need_weights=False)
        slow, _ = mha(x, x, x, need_weights=True)
    torch.testing.assert_close(fast, slow)


def test_mha_divisibility_error_leaves_module_intact():
    mha = nn.MultiheadAttention(8, 2)
    shapes = {k: p.shape for k, p in mha.named_parameters()}
    msg = r"MultiheadAttention.*leaves 7, which is not divisible by num_heads=2"
    with pytest.raises(ValueError, match=msg):
        pf.prune_multihead_attention_out_channels(mha, [3])
    assert {k: p.shape for k, p in mha.named_parameters()} == shapes and mha.embed_dim == 8


# ---------------------------------------------------------------------------------------------
# LSTM / GRU
# ---------------------------------------------------------------------------------------------


def _rnn_reference(rnn: nn.RNNBase, removed) -> nn.RNNBase:
    """Original with every gate pre-activation of the removed units forced to zero.

    From a zero initial state such a unit stays at exactly 0 for both LSTM and GRU, so it is
    invisible to the other units: the pruned module must match this one on the kept units.
    """
    ref = copy.deepcopy(rnn)
    gates = {"LSTM": 4, "GRU": 3}[rnn.mode]
    h = rnn.hidden_size
    rows = torch.tensor([g * h + j for g in range(gates) for j in removed])
    with torch.no_grad():
        for p in ref.parameters():
            p[rows] = 0
    return ref


@pytest.mark.parametrize(
    ("cls", "layers", "bidir"),
    [(nn.LSTM, 1, False), (nn.LSTM, 2, True), (nn.LSTM, 3, False), (nn.GRU, 2, False), (nn.GRU, 2, True)],
)
@settings(max_examples=8, deadline=None)
@given(removed=subsets(5, min_size=1))
def test_rnn_hidden_pruning_matches_zeroed_units(cls, layers, bidir, removed):
    torch.manual_seed(1)
    rnn = cls(3, 5, num_layers=layers, bidirectional=bidir, batch_first=True)
    ref = _rnn_reference(rnn, removed)
    pf.prune_lstm_out_channels(rnn, removed)
    keep = keep_of(5, removed)
    dirs = 2 if bidir else 1
    assert rnn.hidden_size == len(keep) and rnn.input_size == 3
    assert rnn.weight_hh_l0.shape == (ref.weight_hh_l0.shape[0] // 5 * len(keep), len(keep))
    if layers > 1:
        assert rnn.weight_ih_l1.shape[1] == dirs * len(keep)
    assert all(a is b for a, b in zip(rnn._flat_weights, [getattr(rnn, n) for n in rnn._flat_weights_names]))
    x = torch.randn(2, 4, 3)
    out, state = rnn(x)
    out_ref, state_ref = ref(x)
    cols = torch.cat([keep + d * 5 for d in range(dirs)])
    assert out.shape == (2, 4, dirs * len(keep))
    assert torch.count_nonzero(out_ref[..., keep_of(5 * dirs, cols.tolist())]) == 0
    torch.testing.assert_close(out, out_ref[..., cols])
    states = state if isinstance(state, tuple) else (state,)
    states_ref = state_ref if isinstance(state_ref, tuple) else (state_ref,)
    for s, s_ref in zip(states, states_ref):
        torch.testing.assert_close(s, s_ref[..., keep])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@FAST
@given(removed=subsets(6, min_size=1))
def test_rnn_input_pruning_equals_zeroed_inputs(cls, removed):
    torch.manual_seed(2)
    rnn = cls(6, 4, num_layers=2, bidirectional=True)
    old = copy.deepcopy(rnn)
    pf.prune_lstm_in_channels(rnn, removed)
    keep = keep_of(6, removed)
    assert rnn.input_size == len(keep) and rnn.hidden_size == 4
    assert rnn.weight_ih_l0.shape[1] == rnn.weight_ih_l0_reverse.shape[1] == len(keep)
    assert rnn.weight_ih_l1.shape[1] == 8
    x = torch.randn(3, 2, 6)
    out, _ = rnn(x[..., keep])
    out_ref, _ = old(zero_channels(x, removed, 2))
    torch.testing.assert_close(out, out_ref)


def test_lstm_proj_size_is_rejected():
    lstm = nn.LSTM(3, 6, proj_size=2)
    pruner = get_pruner(lstm)
    assert pruner.out_channels(lstm) is None
    with pytest.raises(ValueError, match="LSTM with proj_size=2"):
        pf.prune_lstm_out_channels(lstm, [1])
    with pytest.raises(ValueError, match="proj_size"):
        pruner.param_views(lstm, "out")
    assert lstm.hidden_size == 6
    pf.prune_lstm_in_channels(lstm, [0])
    assert lstm.input_size == 2 and lstm(torch.randn(4, 1, 2))[0].shape == (4, 1, 2)


def test_rnn_is_not_coupled():
    assert not get_pruner(nn.LSTM(2, 3)).coupled(nn.LSTM(2, 3))


# ---------------------------------------------------------------------------------------------
# Bare parameters
# ---------------------------------------------------------------------------------------------


def test_parameter_pruning_dims():
    p = nn.Parameter(torch.arange(24.0).reshape(2, 3, 4))
    p.grad = torch.ones_like(p)
    pid = id(p)
    old = p.detach().clone()
    assert pf.prune_parameter_out_channels(p, [1, 3], dim=2) is p
    assert id(p) == pid and p.shape == (2, 3, 2) and p.grad.shape == (2, 3, 2)
    assert torch.equal(p.detach(), old[..., [0, 2]])
    pf.prune_parameter_in_channels(p, [0])
    assert p.shape == (1, 3, 2)
    q = nn.Parameter(torch.zeros(4, 5))
    q.pruning_dim = 1
    pruner = get_pruner(q)
    assert isinstance(pruner, ParameterPruner) and pruner.coupled(q)
    assert pruner.out_channels(q) == pruner.in_channels(q) == 5
    pf.prune_parameter_out_channels(q, [4])
    assert q.shape == (4, 4)
    with pytest.raises(ValueError, match="Parameter.*cannot prune all 4"):
        pf.prune_parameter_out_channels(q, [0, 1, 2, 3], dim=0)


# ---------------------------------------------------------------------------------------------
# Channel counts and coupling flags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "out_c", "in_c", "coupled"),
    [
        (nn.Conv2d(3, 8, 3), 8, 3, False),
        (nn.ConvTranspose2d(3, 8, 3), 8, 3, False),
        (nn.Conv2d(4, 8, 3, groups=4), 8, 4, True),
        (nn.Linear(3, 5), 5, 3, False),
        (nn.BatchNorm1d(7), 7, 7, True),
        (nn.LayerNorm((2, 9)), 9, 9, True),
        (nn.RMSNorm(4), 4, 4, True),
        (nn.GroupNorm(3, 6), 6, 6, True),
        (nn.InstanceNorm1d(5), 5, 5, True),
        (nn.PReLU(4), 4, 4, True),
        (nn.Embedding(10, 4), 4, None, False),
        (nn.MultiheadAttention(6, 3), 6, 6, True),
        (nn.LSTM(3, 7), 7, 3, False),
        (nn.GRU(2, 4), 4, 2, False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_channel_counts_and_coupling(module, out_c, in_c, coupled):
    pruner = get_pruner(module)
    assert pruner.out_channels(module) == out_c
    assert pruner.in_channels(module) == in_c
    assert pruner.coupled(module) is coupled


# ---------------------------------------------------------------------------------------------
# Registry and pruning function objects
# ---------------------------------------------------------------------------------------------


PUBLIC_NAMES = [
    f"prune_{stem}_{side}_channels"
    for stem in (
        "conv",
        "depthwise_conv",
        "linear",
        "batchnorm",
        "layernorm",
        "groupnorm",
        "instancenorm",
        "prelu",
        "embedding",
        "multihead_attention",
        "lstm",
        "parameter",
    )
    for side in ("out", "in")
]


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_functions_are_named_and_found_by_name(name):
    fn = getattr(pf, name)
    assert isinstance(fn, PruningFunction)
    assert fn.__name__ == name and repr(fn) == name
    assert fn.side == ("out" if "_out_" in name else "in")
    assert isinstance(fn.pruner, LayerPruner)
    assert function_by_name(name) is fn
    assert pickle.loads(pickle.dumps(fn)) is fn
    assert copy.deepcopy(fn) is fn
    assert name in pf.__all__


def test_function_by_name_unknown():
    with pytest.raises(KeyError, match="prune_nothing"):
        function_by_name("prune_nothing")


def test_depthwise_functions_share_the_conv_pruner():
    assert pf.prune_depthwise_conv_out_channels.pruner is pf.prune_conv_out_channels.pruner
    assert get_pruning_functions(pf.prune_conv_in_channels.pruner) == (
        pf.prune_conv_out_channels,
        pf.prune_conv_in_channels,
    )


@pytest.mark.parametrize(
    ("module", "fn_out"),
    [
        (nn.Conv1d(2, 2, 1), pf.prune_conv_out_channels),
        (nn.ConvTranspose3d(2, 2, 1), pf.prune_conv_out_channels),
        (nn.Linear(2, 2), pf.prune_linear_out_channels),
        (nn.BatchNorm3d(2), pf.prune_batchnorm_out_channels),
        (nn.LayerNorm(2), pf.prune_layernorm_out_channels),
        (nn.RMSNorm(2), pf.prune_layernorm_out_channels),
        (nn.GroupNorm(1, 2), pf.prune_groupnorm_out_channels),
        (nn.InstanceNorm3d(2), pf.prune_instancenorm_out_channels),
        (nn.PReLU(2), pf.prune_prelu_out_channels),
        (nn.Embedding(3, 2), pf.prune_embedding_out_channels),
        (nn.MultiheadAttention(2, 1), pf.prune_multihead_attention_out_channels),
        (nn.LSTM(2, 2), pf.prune_lstm_out_channels),
        (nn.GRU(2, 2), pf.prune_lstm_out_channels),
        (nn.Parameter(torch.zeros(2)), pf.prune_parameter_out_channels),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, (nn.Module, nn.Parameter)) else None,
)
def test_registry_lookup(module, fn_out):
    pruner = get_pruner(module)
    assert pruner is fn_out.pruner
    out_fn, in_fn = get_pruning_functions(pruner)
    assert out_fn is fn_out and in_fn.side == "in" and in_fn.pruner is pruner


class _MinimalPruner(LayerPruner):
    """Implements only the abstract methods: one channel per side, pruning does nothing."""

    def out_channels(self, module):
        return 1

    def in_channels(self, module):
        return 1

    def prune_out_channels(self, module, idxs):
        return module

    def prune_in_channels(self, module, idxs):
        return module


def test_registry_subclass_customized_and_unknown():
    class MyConv(nn.Conv2d):
        pass

    class MyNorm(nn.BatchNorm2d):
        pass

    class Custom(_MinimalPruner):
        pass

    custom = Custom()
    assert get_pruner(MyConv(2, 2, 1)) is pf.prune_conv_out_channels.pruner
    assert get_pruner(nn.ReLU()) is None
    assert get_pruner(nn.Sequential()) is None
    assert get_pruner(MyConv(2, 2, 1), {MyConv: custom}) is custom
    # A customized base-class entry wins over the default for the exact class.
    assert get_pruner(MyNorm(2), {nn.modules.batchnorm._BatchNorm: custom}) is custom
    assert get_pruner(nn.Linear(2, 2), {MyConv: custom}) is pf.prune_linear_out_channels.pruner
    assert get_pruner(nn.ReLU(), {nn.ReLU: custom}) is custom


def test_custom_pruner_functions_are_cached_and_dispatch():
    calls = []

    class ScalePruner(_MinimalPruner):
        def prune_out_channels(self, module, idxs):
            calls.append(("out", list(idxs)))
            return module

        def prune_in_channels(self, module, idxs):
            calls.append(("in", list(idxs)))
            return module

    pruner = ScalePruner()
    out_fn, in_fn = get_pruning_functions(pruner)
    assert out_fn.__name__ == "prune_ScalePruner_out_channels"
    assert repr(in_fn) == "prune_ScalePruner_in_channels"
    assert get_pruning_functions(pruner) == (out_fn, in_fn)
    assert get_pruning_functions(pruner)[0] is out_fn
    assert get_pruning_functions(ScalePruner())[0] is not out_fn
    assert out_fn.pruner is pruner and (out_fn.side, in_fn.side) == ("out", "in")
    m = nn.Identity()
    assert out_fn(m, [1]) is m and in_fn(m, [2]) is m
    assert calls == [("out", [1]), ("in", [2])]
    with pytest.raises(KeyError):
        function_by_name(out_fn.__name__)


def test_fresh_builtin_pruner_gets_public_functions():
    expected = (pf.prune_linear_out_channels, pf.prune_linear_in_channels)
    assert get_pruning_functions(LinearPruner()) == expected


def test_parameter_pruner_with_dim_gets_its_own_functions():
    out_fn, _ = get_pruning_functions(ParameterPruner(1))
    assert out_fn.__name__ == "prune_ParameterPruner_out_channels"
    p = nn.Parameter(torch.zeros(3, 4))
    out_fn(p, [0])
    assert p.shape == (3, 3)


def test_base_pruner_is_abstract():
    abstract = {"out_channels", "in_channels", "prune_out_channels", "prune_in_channels"}
    assert LayerPruner.__abstractmethods__ == abstract
    with pytest.raises(TypeError, match="abstract"):
        LayerPruner()

    class OnlyCounts(LayerPruner):
        def out_channels(self, module):
            return 1

        def in_channels(self, module):
            return 1

    with pytest.raises(TypeError, match="prune_in_channels"):
        OnlyCounts()
    # A coupled pruner implements both sides from channels() and prune().
    assert CoupledPruner.__abstractmethods__ == {"channels", "prune"}
    with pytest.raises(TypeError, match="abstract"):
        CoupledPruner()
    # The non-abstract parts have defaults: no views, sides not coupled.
    base = _MinimalPruner()
    assert base.param_views(nn.Identity(), "out") == [] and base.coupled(nn.Identity()) is False
    assert repr(base) == "_MinimalPruner()"


class _Gain(nn.Module):
    """A module type the library does not know: one gain per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.arange(1.0, channels + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class _GainPruner(CoupledPruner):
    def channels(self, module):
        return module.gain.shape[0]

    def prune(self, module, idxs):
        removed = normalize_idxs(idxs, module.gain.shape[0], module)
        keep = [i for i in range(module.gain.shape[0]) if i not in removed]
        module.gain.data = module.gain.data[keep]
        return module


def test_register_pruner_makes_the_registry_find_it():
    class SubGain(_Gain):
        pass

    pruner = _GainPruner()
    assert get_pruner(_Gain(3)) is None and _Gain not in DEFAULT_PRUNERS
    register_pruner(_Gain, pruner)
    try:
        assert DEFAULT_PRUNERS[_Gain] is pruner
        assert get_pruner(_Gain(3)) is pruner and get_pruner(SubGain(3)) is pruner
        # A customized entry still wins over a registered default.
        other = _GainPruner()
        assert get_pruner(_Gain(3), {_Gain: other}) is other
        register_pruner(_Gain, pruner)  # the same pruner again: no-op
        with pytest.raises(ValueError, match="replace=True"):
            register_pruner(_Gain, other)
        assert get_pruner(_Gain(3)) is pruner
        register_pruner(_Gain, other, replace=True)
        assert get_pruner(_Gain(3)) is other
        out_fn, in_fn = get_pruning_functions(other)
        assert out_fn.__name__ == "prune__GainPruner_out_channels" and in_fn.pruner is other
        m = _Gain(4)
        assert out_fn(m, [1]) is m and m.gain.tolist() == [1.0, 3.0, 4.0]
        # A graph built afterwards treats the class as a prunable layer, coupled to its neighbours.
        model = nn.Sequential(nn.Linear(3, 4), _Gain(4), nn.Linear(4, 2))
        dg = DependencyGraph().build_dependency(model, torch.randn(1, 3))
        assert dg.get_pruner_of_module(model[1]) is other
        dg.get_pruning_group(model[0], pf.prune_linear_out_channels, [0, 2]).prune()
        assert model[1].gain.tolist() == [2.0, 4.0] and model[2].in_features == 2
        assert model(torch.randn(1, 3)).shape == (1, 2)
    finally:
        DEFAULT_PRUNERS.pop(_Gain, None)
    assert get_pruner(_Gain(3)) is None
    with pytest.raises(TypeError, match="LayerPruner instance"):
        register_pruner(_Gain, _GainPruner)
    with pytest.raises(TypeError, match="must be a class"):
        register_pruner(_Gain(3), pruner)
    assert _Gain not in DEFAULT_PRUNERS


def test_define_public_functions_refuses_a_taken_name():
    with pytest.raises(ValueError, match="prune_linear_out_channels"):
        define_public_functions(LinearPruner(), "linear")
    assert function_by_name("prune_linear_out_channels") is pf.prune_linear_out_channels


# ---------------------------------------------------------------------------------------------
# Shared parameters: once_per_parameter
# ---------------------------------------------------------------------------------------------


def _tied() -> tuple[nn.Embedding, nn.Linear]:
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    return emb, head


def test_once_per_parameter_slices_a_tied_weight_once():
    emb, head = _tied()
    old = emb.weight.detach().clone()
    with pf.once_per_parameter():
        pf.prune_embedding_out_channels(emb, [1, 4])
        pf.prune_linear_in_channels(head, [1, 4])
    keep = keep_of(6, [1, 4])
    assert head.weight is emb.weight and emb.weight.shape == (10, 4)
    assert torch.equal(emb.weight.detach(), old[:, keep])
    assert (emb.embedding_dim, head.in_features) == (4, 4)
    ids = torch.tensor([[1, 2, 3]])
    assert head(emb(ids)).shape == (1, 3, 10)


def test_without_once_per_parameter_every_call_slices():
    emb, head = _tied()
    pf.prune_embedding_out_channels(emb, [1, 4])
    with pytest.raises((RuntimeError, IndexError)):  # the shared weight is already 4 wide
        pf.prune_linear_in_channels(head, [1, 4])
    lin = nn.Linear(3, 6)
    with pf.once_per_parameter():
        pf.prune_linear_out_channels(lin, [0])
        pf.prune_linear_in_channels(lin, [2])  # another dim of the same weight: applied
    assert lin.weight.shape == (5, 2)


def test_once_per_parameter_nests_and_resets_after_errors():
    lin = nn.Linear(3, 6)
    with pytest.raises(RuntimeError, match="boom"), pf.once_per_parameter():
        with pf.once_per_parameter():
            pf.prune_linear_out_channels(lin, [0])
        ptr = lin.weight.data_ptr()
        pf.prune_linear_out_channels(lin, [0])  # the outer block is still active: not sliced again
        assert lin.weight.data_ptr() == ptr and lin.weight.shape == (5, 3)
        raise RuntimeError("boom")
    other = nn.Linear(3, 6)
    pf.prune_linear_out_channels(other, [1])
    pf.prune_linear_out_channels(other, [1])
    assert other.weight.shape == (4, 3)


def test_once_per_parameter_keeps_multi_dim_prunes_whole():
    """MHA and LSTM slice one parameter along two dims in one call; the guard must not interfere."""
    mha, lstm = nn.MultiheadAttention(8, 2), nn.LSTM(3, 5, num_layers=2)
    expected_mha, expected_lstm = copy.deepcopy(mha), copy.deepcopy(lstm)
    pf.prune_multihead_attention_out_channels(expected_mha, [0, 7])
    pf.prune_lstm_out_channels(expected_lstm, [2])
    with pf.once_per_parameter():
        pf.prune_multihead_attention_out_channels(mha, [0, 7])
        pf.prune_lstm_out_channels(lstm, [2])
    for a, b in ((mha, expected_mha), (lstm, expected_lstm)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name


def test_unnamed_parameter_function_pickles_as_its_own_class() -> None:
    """A parameter pruning function made for an explicit dim keeps its class (and its ``dim`` argument)."""
    import pickle

    from prune_callbacks.layers import ParameterPruner, ParameterPruningFunction

    fn = ParameterPruner(dim=1).function_class(ParameterPruner(dim=1), "out", "prune_param_dim1_out")
    back = pickle.loads(pickle.dumps(fn))
    assert isinstance(back, ParameterPruningFunction)
    p = nn.Parameter(torch.randn(3, 4))
    assert back(p, [0], dim=0).shape == (2, 4)
