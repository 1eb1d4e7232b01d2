"""The per-op propagation rules registry (``prune_callbacks.graph.rules``): every op name the graph
knows has its rule, unknown ops fall back to their family's rule as before, and a registered rule
is the one the graph uses."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from prune_callbacks import DependencyGraph
from prune_callbacks.graph import propagation, rules
from prune_callbacks.graph.index_mapping import Barrier, RootMap
from prune_callbacks.graph.node import Node
from prune_callbacks.graph.ops import GRAD_FN_TYPES, KNOWN_ELEMENTWISE, OpType, op_name2type
from prune_callbacks.graph.rules import (
    RULES,
    TYPE_RULES,
    AttentionRule,
    CatRule,
    ElementwiseRule,
    ExpandRule,
    GatherRule,
    IndexRule,
    InputRule,
    MatmulRule,
    OpRule,
    PermuteRule,
    ReduceRule,
    RepeatRule,
    ReshapeRule,
    SelectRule,
    SliceRule,
    SoftmaxRule,
    SplitRule,
    StackRule,
    UnbindRule,
    register_rule,
    rule_for,
)

# The op names the former if/elif chains of propagation.py switched on, with the rule each gets.
EXPECTED: dict[str, type[OpRule]] = {
    "Cat": CatRule,
    "Stack": StackRule,
    **dict.fromkeys(("Split", "SplitWithSizes", "Chunk", "UnsafeSplit", "UnsafeSplitWithSizes"), SplitRule),
    "Unbind": UnbindRule,
    **dict.fromkeys(
        (
            "View",
            "Reshape",
            "ReshapeAlias",
            "UnsafeView",
            "Flatten",
            "Squeeze",
            "Unsqueeze",
            "SqueezeDim",
            "SqueezeDims",
            "UnsqueezeDim",
            "Unflatten",
        ),
        ReshapeRule,
    ),
    **dict.fromkeys(("Permute", "Transpose", "T"), PermuteRule),
    "Slice": SliceRule,
    "Narrow": SliceRule,
    "Select": SelectRule,
    "Gather": GatherRule,
    "Index": IndexRule,
    "Expand": ExpandRule,
    "RepeatInterleave": ExpandRule,
    "Repeat": RepeatRule,
    **dict.fromkeys(("Mm", "Bmm", "Matmul", "Addmm", "Baddbmm", "Mv", "Dot"), MatmulRule),
    **dict.fromkeys(
        (
            "ScaledDotProductFlashAttentionForCpu",
            "ScaledDotProductEfficientAttention",
            "ScaledDotProductFlashAttention",
            "ScaledDotProductAttentionMath",
            "ScaledDotProductCudnnAttention",
        ),
        AttentionRule,
    ),
    **dict.fromkeys(
        (
            "Mean",
            "Sum",
            "Amax",
            "Amin",
            "Max",
            "Min",
            "Std",
            "Var",
            "VarMean",
            "Norm",
            "LinalgVectorNorm",
            "Logsumexp",
            "Prod",
            "Cumsum",
        ),
        ReduceRule,
    ),
}


@pytest.fixture
def registry():
    """The registry, put back as it was after the test."""
    saved = dict(RULES)
    yield RULES
    RULES.clear()
    RULES.update(saved)


def _node(op_type: OpType, op: str | None = None, **attrs) -> Node:
    node = Node(None, None, op or "op", op_type)
    if op is not None:
        node.attrs["op"] = op
    node.attrs.update(attrs)
    return node


def _channels(n: int, pruned: list[int]) -> RootMap:
    """Map pruning channels ``pruned`` of dimension 1."""
    t = torch.full((1, n, 1, 1), -1)
    for i, c in enumerate(pruned):
        t[0, c] = i
    return RootMap(t, (False, True, False, False))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_op_name_the_chains_handled_has_its_rule(name: str) -> None:
    assert type(RULES[name]) is EXPECTED[name]


def test_the_registry_covers_the_op_vocabulary() -> None:
    vocabulary = {n for names in GRAD_FN_TYPES.values() for n in names}
    assert vocabulary == set(EXPECTED)
    assert set(RULES) == vocabulary | KNOWN_ELEMENTWISE
    assert not vocabulary & KNOWN_ELEMENTWISE
    softmax = {"Softmax", "LogSoftmax", "SafeSoftmax"}  # elementwise except along their dim
    for name in KNOWN_ELEMENTWISE - softmax:
        assert RULES[name] is TYPE_RULES[OpType.ELEMENTWISE]
    for name in softmax:
        assert isinstance(RULES[name], SoftmaxRule) and isinstance(RULES[name], ElementwiseRule)
    # a name's rule is its family's unless it behaves differently from the family
    own = {"Stack", "Unbind", "Repeat", "Slice", "Narrow", "Select", "Gather"}
    for name in vocabulary - own:
        family = TYPE_RULES[op_name2type(name)]
        assert type(RULES[name]) is type(family)
        if not isinstance(family, MatmulRule):
            assert RULES[name] is family


def test_rule_data() -> None:
    assert RULES["Slice"].partition_backward and not RULES["Narrow"].partition_backward
    assert {n: RULES[n].roles for n in ("Mm", "Bmm", "Matmul", "Addmm", "Baddbmm", "Mv", "Dot")} == {
        "Mm": (0, 1, None),
        "Bmm": (0, 1, None),
        "Matmul": (0, 1, None),
        "Addmm": (1, 2, 0),
        "Baddbmm": (1, 2, 0),
        "Mv": None,
        "Dot": None,
    }
    assert dict(rules.MATMUL_ROLES) == {n: r for n in rules.MATMUL_ROLES if (r := RULES[n].roles)}


def test_type_rules_cover_every_op_type() -> None:
    assert set(TYPE_RULES) == set(OpType)
    expected = {
        OpType.INPUT: InputRule,
        OpType.ELEMENTWISE: ElementwiseRule,
        OpType.EXPAND: ExpandRule,
        OpType.REDUCE: ReduceRule,
        OpType.CONCAT: CatRule,
        OpType.SPLIT: SplitRule,
        OpType.RESHAPE: ReshapeRule,
        OpType.PERMUTE: PermuteRule,
        OpType.SLICE: IndexRule,
        OpType.MATMUL: MatmulRule,
        OpType.ATTENTION: AttentionRule,
    }
    for t in OpType:
        assert type(TYPE_RULES[t]) is expected.get(t, OpRule), t


def test_rule_for_prefers_the_op_name_then_the_type() -> None:
    assert rule_for(_node(OpType.CONCAT, "Stack")) is RULES["Stack"]
    assert rule_for(_node(OpType.SLICE, "Index")) is RULES["Index"]
    assert rule_for(_node(OpType.ELEMENTWISE, "SomethingNew")) is TYPE_RULES[OpType.ELEMENTWISE]
    assert rule_for(_node(OpType.ATTENTION)) is TYPE_RULES[OpType.ATTENTION]  # no op name at all
    assert rule_for(_node(OpType.INPUT, "input")) is TYPE_RULES[OpType.INPUT]


def test_unknown_ops_fall_back_as_before() -> None:
    m = _channels(4, [1, 2])
    # an unknown op name is elementwise: the map is broadcast onto the outputs and inputs
    node = _node(OpType.ELEMENTWISE, "SomethingNew", in_shapes=[(1, 4, 3, 3)], out_shapes=[(1, 4, 3, 3)])
    node.in_edges.append(None)
    [(kind, k, r)] = propagation.from_input(node, 0, m)
    assert (kind, k, r.shape) == ("out", 0, (1, 4, 1, 1))
    assert torch.equal(r.t, m.t)
    [(kind, i, r)] = propagation.from_output(node, 0, m)
    assert (kind, i) == ("in", 0) and torch.equal(r.t, m.t)
    # an unknown name of a slicing type indexes; of a product type is refused by name
    index = _node(OpType.SLICE, "Take", in_shapes=[(1, 4, 3, 3)], out_shapes=[(1, 4, 3, 3)], indexed_dims=[2])
    assert torch.equal(propagation.forward(index, 0, m)[0][1].t, m.t)
    product = _node(OpType.MATMUL, "Outer", in_shapes=[(4,), (4,)], out_shapes=[(4, 4)])
    with pytest.raises(Barrier, match=r"^pruning through Outer is not supported$"):
        propagation.from_input(product, 0, m)
    # ops of a type no rule crosses, and one-directional calls on products, are barriers
    shapes = {"in_shapes": [(1, 4, 1, 1)], "out_shapes": [(1, 4, 1, 1)]}
    with pytest.raises(Barrier, match=r"^pruning through Foo \(barrier\) is not supported$"):
        propagation.forward(_node(OpType.BARRIER, "Foo", **shapes), 0, m)
    with pytest.raises(Barrier, match=r"^pruning through Mm \(matmul\) is not supported$"):
        propagation.backward(_node(OpType.MATMUL, "Mm", **shapes), 0, m)
    with pytest.raises(Barrier, match="model input"):
        propagation.from_output(_node(OpType.INPUT, "input"), 0, m)
    assert not propagation.round_trip_exact(_node(OpType.BARRIER, "Foo"), 0, m)


def test_round_trip_exactness_by_family() -> None:
    m = _channels(4, [1])
    one_input = _node(OpType.ELEMENTWISE, "Relu")
    one_input.in_edges.append(None)
    assert not propagation.round_trip_exact(one_input, 0, m)  # no input edge at all
    assert propagation.round_trip_exact(_node(OpType.PERMUTE, "Permute"), 0, m)
    cat = _node(OpType.CONCAT, "Cat", dim=1, out_shapes=[(1, 8, 1, 1)])
    assert propagation.round_trip_exact(cat, 0, m)
    assert not propagation.round_trip_exact(_node(OpType.CONCAT, "Stack", dim=1), 0, m)
    assert not propagation.round_trip_exact(_node(OpType.EXPAND, "Expand"), 0, m)
    assert not propagation.round_trip_exact(_node(OpType.EXPAND, "Repeat"), 0, m)


class Recording(OpRule):
    """Delegates to another rule and records every call."""

    def __init__(self, inner: OpRule) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def from_input(self, node, pos, m):
        self.calls.append("from_input")
        return self.inner.from_input(node, pos, m)

    def from_output(self, node, nr, m):
        self.calls.append("from_output")
        return self.inner.from_output(node, nr, m)

    def round_trip_exact(self, node, pos, m):
        self.calls.append("round_trip_exact")
        return self.inner.round_trip_exact(node, pos, m)


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def _groups(model: nn.Module) -> list:
    graph = DependencyGraph().build_dependency(model, torch.randn(1, 3, 4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = graph.get_all_groups()
    return groups, [str(w.message) for w in caught]


def test_a_registered_rule_is_the_one_the_graph_uses(registry) -> None:
    model = CatNet()
    before, _ = _groups(model)
    recording = Recording(RULES["Cat"])
    assert register_rule("Cat", recording) is recording.inner
    after, _ = _groups(model)
    assert {"from_input", "round_trip_exact"} <= set(recording.calls)
    assert [len(g.items) for g in after] == [len(g.items) for g in before]

    class Refuse(OpRule):
        def forward(self, node, pos, m):
            raise Barrier("custom refusal")

        def backward(self, node, nr, m):
            raise Barrier("custom refusal")

    register_rule("Cat", Refuse())
    refused, messages = _groups(model)
    assert any("custom refusal (at Cat)" in msg for msg in messages)
    assert len(refused) < len(before)


def test_register_rule_returns_the_replaced_rule_and_adds_new_ops(registry) -> None:
    original = RULES["Cat"]
    assert register_rule("Cat", StackRule()) is original
    assert register_rule("Cat", original).__class__ is StackRule
    assert register_rule("MyFusedOp", PermuteRule()) is None
    node = _node(OpType.ELEMENTWISE, "MyFusedOp", in_shapes=[(1, 4, 2, 2)], out_shapes=[(2, 2, 4, 1)])
    node.attrs["dims"] = [3, 2, 1, 0]
    [(k, r)] = propagation.forward(node, 0, _channels(4, [0]))
    assert k == 0 and r.shape == (1, 1, 4, 1)


def test_register_rule_refuses_what_is_not_a_rule(registry) -> None:
    with pytest.raises(TypeError, match="not an OpRule"):
        register_rule("Cat", lambda node, pos, m: [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="op key"):
        register_rule(OpType.CONCAT, CatRule())  # type: ignore[arg-type]
    assert type(RULES["Cat"]) is CatRule
