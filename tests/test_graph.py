"""API tests for the dependency graph: op vocabulary, nodes, dependencies, groups, building from
any input/output structure, coupled-channel discovery, group checks, atomic pruning, warnings,
bare parameters, customized pruners and the less common layer families."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import prune_callbacks as pc
import prune_callbacks.layers as pcl
from prune_callbacks import DependencyGraph, Group, PruningError
from prune_callbacks.graph import Dependency, GroupItem, Node, OpType
from prune_callbacks.graph.ops import (
    KNOWN_ELEMENTWISE,
    grad_fn2type,
    grad_fn_name,
    is_known_grad_fn,
    module2type,
)
from prune_callbacks.layers import LayerPruner, PruningFunction, get_pruning_functions
from prune_callbacks.reference.models import DigitsResNet, cifar_resnet, densenet
from prune_callbacks.reference.models.densenet import DenseBlock, DenseLayer, Transition
from prune_callbacks.reference.models.resnet import BasicBlock
from randnet import zero_channels

# Groups that reach a model output are skipped; the current graph also warns about them (see
# test_get_all_groups_is_silent_about_model_outputs). Tests that check warnings record them
# explicitly, so the noise is filtered everywhere else.
pytestmark = pytest.mark.filterwarnings("ignore:prune_callbacks. these layers cannot be pruned")


# ---------------------------------------------------------------------------------------------
# Small models and helpers
# ---------------------------------------------------------------------------------------------


def build(model: nn.Module, example_inputs: Any, **kwargs: Any) -> DependencyGraph:
    return DependencyGraph().build_dependency(model, example_inputs, **kwargs)


def names_of(model: nn.Module) -> dict[Any, str]:
    out: dict[Any, str] = {m: n for n, m in model.named_modules()}
    out.update({p: n for n, p in model.named_parameters()})
    return out


def side_key(item: GroupItem) -> tuple[Any, str]:
    """(target, side) with the two sides of a coupled layer (BN, depthwise conv...) merged."""
    target = item.dep.target
    if target.type == OpType.PARAMETER or item.dep.handler.pruner.coupled(target.module):
        return target.module, "both"
    return target.module, item.dep.handler.side


def items_by_name(group: Group, model: nn.Module) -> dict[tuple[str, str], list[int]]:
    names = names_of(model)
    return {(names[it.dep.target.module], it.dep.handler.side): list(it.idxs) for it in group}


def groups_containing(groups: list[Group], module: Any, side: str) -> list[Group]:
    return [
        g for g in groups if any(it.dep.target.module is module and it.dep.handler.side == side for it in g)
    ]


def summary(groups: list[Group], model: nn.Module) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    names = names_of(model)
    return sorted(
        sorted((names[it.dep.target.module], it.dep.handler.__name__, tuple(it.idxs)) for it in g)
        for g in groups
    )


def assert_each_set_once(groups: list[Group]) -> None:
    """No channel of any layer side is in two groups, and every group is full-index at its root."""
    seen: dict[tuple[Any, str, int], int] = {}
    for gi, g in enumerate(groups):
        for item in g:
            module, side = side_key(item)
            for c in item.idxs:
                first = seen.setdefault((module, side, c), gi)
                assert first == gi, f"channel {c} of {item.dep.target.name} is in groups {first} and {gi}"
        assert g.root.idxs == list(range(len(g.root.idxs)))


class CatNet(nn.Module):
    """Cascaded concat and concat of a concat: ``cat(d(cat(cat(a, b), c)), e(cat(a, b)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(3, 6, 1)
        self.d, self.e = nn.Conv2d(15, 7, 1), nn.Conv2d(9, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ab = torch.cat([self.a(x), self.b(x)], 1)
        abc = torch.cat([ab, self.c(x)], 1)
        return torch.cat([self.d(abc), self.e(ab)], 1)


class SplitCatNet(nn.Module):
    """Split into halves, process them, concatenate in swapped order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.a(x).chunk(2, 1)
        return self.d(torch.cat([self.c(q), self.b(p)], 1))


class SizedSplit(nn.Module):
    """Uneven split whose sizes are a module attribute the graph must keep true."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 7, 1)
        self.sizes = [3, 4]
        self.b, self.c = nn.Conv2d(3, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.split(self.a(x), self.sizes, 1)
        return self.b(p) + self.c(q)


class TwoInputs(nn.Module):
    """Two image inputs whose branches meet in an add; an optional non-tensor scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, image: torch.Tensor, extra: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.c(torch.relu(self.a(image) + self.b(extra)) * scale)


def conv_bn(cin: int, cout: int, **kw: Any) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU()
    )


# ---------------------------------------------------------------------------------------------
# Op vocabulary
# ---------------------------------------------------------------------------------------------

MODULE_TYPES = [
    (lambda: nn.Conv1d(3, 4, 3), OpType.CONV),
    (lambda: nn.Conv2d(3, 4, 3), OpType.CONV),
    (lambda: nn.Conv3d(3, 4, 3), OpType.CONV),
    (lambda: nn.ConvTranspose2d(3, 4, 3), OpType.CONV),
    (lambda: nn.Conv2d(4, 8, 3, groups=2), OpType.CONV),
    (lambda: nn.Conv2d(4, 4, 3, groups=4), OpType.DEPTHWISE_CONV),
    (lambda: nn.Conv2d(4, 8, 3, groups=4), OpType.DEPTHWISE_CONV),
    (lambda: nn.Conv1d(4, 4, 3, groups=4), OpType.DEPTHWISE_CONV),
    (lambda: nn.Linear(3, 4), OpType.LINEAR),
    (lambda: nn.BatchNorm1d(4), OpType.BN),
    (lambda: nn.BatchNorm2d(4), OpType.BN),
    (lambda: nn.SyncBatchNorm(4), OpType.BN),
    (lambda: nn.LayerNorm(4), OpType.LN),
    (lambda: nn.RMSNorm(4), OpType.LN),
    (lambda: nn.GroupNorm(2, 4), OpType.GN),
    (lambda: nn.InstanceNorm1d(4), OpType.IN),
    (lambda: nn.InstanceNorm2d(4, affine=True), OpType.IN),
    (lambda: nn.PReLU(4), OpType.PRELU),
    (lambda: nn.Embedding(10, 4), OpType.EMBED),
    (lambda: nn.Parameter(torch.zeros(4)), OpType.PARAMETER),
    (lambda: nn.MultiheadAttention(4, 2), OpType.MHA),
    (lambda: nn.LSTM(3, 4), OpType.LSTM),
    (lambda: nn.GRU(3, 4), OpType.LSTM),
    (lambda: nn.ReLU(), OpType.ELEMENTWISE),
    (lambda: nn.Sequential(nn.Linear(2, 2)), OpType.ELEMENTWISE),
    (lambda: CatNet(), OpType.ELEMENTWISE),
]


@pytest.mark.parametrize(
    ("factory", "expected"), MODULE_TYPES, ids=[f"{i}-{t.name}" for i, (_, t) in enumerate(MODULE_TYPES)]
)
def test_module2type(factory: Callable, expected: OpType) -> None:
    assert module2type(factory()) is expected
    # Unknown modules fall back to the (virtual) elementwise type; known ones own parameters.
    assert expected.is_virtual == (expected is OpType.ELEMENTWISE)


def _x() -> torch.Tensor:
    return torch.randn(2, 4, 3, 3, requires_grad=True)


VIRTUAL_OPS = [
    ("cat", lambda x: torch.cat([x, x], 1), OpType.CONCAT),
    ("stack", lambda x: torch.stack([x, x]), OpType.CONCAT),
    ("split", lambda x: x.split(2, 1)[0], OpType.SPLIT),
    ("split-sizes", lambda x: x.split([1, 3], 1)[0], OpType.SPLIT),
    ("chunk", lambda x: x.chunk(2, 1)[1], OpType.SPLIT),
    ("unbind", lambda x: x.unbind(1)[0], OpType.SPLIT),
    ("view", lambda x: x.view(2, -1), OpType.RESHAPE),
    ("reshape", lambda x: x.reshape(2, 4, 9), OpType.RESHAPE),
    ("flatten", lambda x: x.flatten(1), OpType.RESHAPE),
    ("unsqueeze", lambda x: x.unsqueeze(0), OpType.RESHAPE),
    ("permute", lambda x: x.permute(0, 2, 3, 1), OpType.PERMUTE),
    ("transpose", lambda x: x.transpose(1, 2), OpType.PERMUTE),
    ("add", lambda x: x + x, OpType.ELEMENTWISE),
    ("mul", lambda x: x * 2, OpType.ELEMENTWISE),
    ("relu", torch.relu, OpType.ELEMENTWISE),
    ("gelu", F.gelu, OpType.ELEMENTWISE),
    ("sigmoid", torch.sigmoid, OpType.ELEMENTWISE),
    ("max-pool", lambda x: F.max_pool2d(x, 2), OpType.ELEMENTWISE),
    ("avg-pool", lambda x: F.avg_pool2d(x, 2), OpType.ELEMENTWISE),
    ("adaptive-pool", lambda x: F.adaptive_avg_pool2d(x, 2), OpType.ELEMENTWISE),
    ("dropout", lambda x: F.dropout(x, 0.5, training=True), OpType.ELEMENTWISE),
    ("slice", lambda x: x[:, :2], OpType.SLICE),
    ("index", lambda x: x[:, [0, 2]], OpType.SLICE),
    ("select", lambda x: x[:, 0], OpType.SLICE),
    ("expand", lambda x: x[:, :1].expand(2, 4, 3, 3), OpType.EXPAND),
    ("mean", lambda x: x.mean((2, 3)), OpType.REDUCE),
]


@pytest.mark.parametrize(("fn", "expected"), [v[1:] for v in VIRTUAL_OPS], ids=[v[0] for v in VIRTUAL_OPS])
def test_virtual_op_types_from_autograd(fn: Callable, expected: OpType) -> None:
    out = fn(_x())
    assert grad_fn2type(out.grad_fn) is expected
    assert is_known_grad_fn(out.grad_fn)
    assert expected.is_virtual


def _unknown_elementwise_op() -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """An elementwise op the graph does not know (the first candidate that is still unknown)."""
    candidates = [
        torch.special.i0,
        torch.frac,
        torch.erfc,
        torch.sinc,
        torch.special.ndtr,
        torch.special.erfcx,
    ]
    for fn in candidates:
        out = fn(_x())
        if out.grad_fn is not None and not is_known_grad_fn(out.grad_fn):
            return fn, grad_fn_name(out.grad_fn)
    pytest.fail("every candidate op is known now: add an unknown elementwise op to the list")


def test_unknown_ops_fall_back_to_elementwise() -> None:
    fn, name = _unknown_elementwise_op()
    grad_fn = fn(_x()).grad_fn
    assert name not in KNOWN_ELEMENTWISE
    assert grad_fn2type(grad_fn) is OpType.ELEMENTWISE
    assert not is_known_grad_fn(grad_fn)


# ---------------------------------------------------------------------------------------------
# Node and Dependency
# ---------------------------------------------------------------------------------------------


def test_node_fields_and_details() -> None:
    model = CatNet()
    dg = build(model, torch.randn(1, 3, 4, 4))
    node = dg.get_node(model.d)
    assert isinstance(node, Node)
    assert node.module is model.d
    assert node.grad_fn is not None and "Convolution" in str(node.grad_fn)
    assert node.name == "d (Conv2d)"
    assert node.type is OpType.CONV and node.is_module
    assert node.enable_index_mapping is False
    assert isinstance(node.pruning_dim, int)
    # d reads cat(cat(a, b), c) and feeds the final cat.
    (cat_in,) = node.inputs
    (cat_out,) = node.outputs
    for cat in (cat_in, cat_out):
        assert cat.type is OpType.CONCAT and cat.enable_index_mapping and cat.module is None
    assert node in cat_in.outputs and node in cat_out.inputs
    assert {dg.get_node(m) for m in (model.a, model.b)} <= set(cat_in.inputs[0].inputs)
    assert node.dependencies
    for dep in node.dependencies:
        assert isinstance(dep, Dependency)
        assert dep.source is node
        assert dep.target in node.inputs + node.outputs
        assert dep.trigger.side in ("out", "in")
    triggers = {dep.trigger for dep in node.dependencies}
    assert triggers == {pc.prune_conv_out_channels, pcl.prune_conv_in_channels}
    text = node.details()
    assert "d (Conv2d)" in text and "CONV" in text
    assert "inputs:" in text and "outputs:" in text and "dependencies:" in text
    assert "[1, 15, 4, 4]" in text  # the input tensor's shape
    for dep in node.dependencies:
        assert repr(dep) in text


def test_parameter_node_fields() -> None:
    model = LayerScaleNet()
    dg = build(model, torch.randn(1, 3, 4, 4), unwrapped_parameters={model.gamma: 0})
    node = dg.get_node(model.gamma)
    assert node.module is model.gamma
    assert node.type is OpType.PARAMETER
    assert node.pruning_dim == 0
    assert node.name == "gamma (Parameter[8])"
    assert "PARAMETER" in node.details()


def test_dependency_fields_and_index_mapping_pair() -> None:
    model = CatNet()
    dg = build(model, torch.randn(1, 3, 4, 4))
    (group,) = [g for g in dg.get_all_groups() if g.root.dep.target.module is model.b]
    by_target = {it.dep.target.module: it for it in group}
    assert set(by_target) == {model.b, model.d, model.e}
    # b's channels sit after a's 4 channels in cat(a, b), which both d and e read.
    for module in (model.d, model.e):
        item = by_target[module]
        assert item.idxs == [4, 5, 6, 7, 8] and item.root_idxs == [0, 1, 2, 3, 4]
        dep = item.dep
        assert dep.handler is pcl.prune_conv_in_channels
        assert dep.target is dg.get_node(module)
        assert dep.source.is_module and dep.trigger.side in ("out", "in")
        to_target, to_root = dep.index_mapping
        assert to_target([1]) == [5] and to_target([3, 1]) == [5, 7] and to_target([]) == []
        assert to_root([5, 7]) == [1, 3] and to_root([8]) == [4]
    root = group.root.dep
    assert root.target is root.source is dg.get_node(model.b)
    assert root.trigger is root.handler is pc.prune_conv_out_channels
    assert root.index_mapping[0]([1, 3]) == [1, 3] and root.index_mapping[1]([2]) == [2]
    assert "prune_conv_out_channels" in repr(root) and "b (Conv2d)" in repr(root)
    # A subset group chosen from the root carries the same target indices.
    sub = dg.get_pruning_group(model.b, pc.prune_conv_out_channels, [3, 1])
    assert {it.dep.target.module: it.idxs for it in sub} == {
        model.b: [1, 3],
        model.d: [5, 7],
        model.e: [5, 7],
    }


# ---------------------------------------------------------------------------------------------
# Group
# ---------------------------------------------------------------------------------------------


def test_group_protocol() -> None:
    model = CatNet()
    dg = build(model, torch.randn(1, 3, 4, 4))
    group = dg.get_pruning_group(model.a, pc.prune_conv_out_channels, [0, 2])
    assert isinstance(group, Group)
    items = list(group)
    assert len(group) == len(items) == 3
    assert all(isinstance(it, GroupItem) for it in items)
    assert group[0] is items[0] is group.root
    assert group[-1] is items[-1]
    assert group.items == items
    assert group.root.dep.target.module is model.a
    for (dep, idxs), item in zip(group, items):
        assert dep is item.dep and idxs == item.idxs
        assert len(item.root_idxs) == len(item.idxs)
    assert group.has_dep(items[1].dep)


def test_group_details_is_a_readable_table() -> None:
    model = SizedSplit()
    dg = build(model, torch.randn(1, 3, 4, 4))
    group = dg.get_pruning_group(model.a, pc.prune_conv_out_channels, [0, 5])
    text = group.details()
    lines = text.splitlines()
    assert "Pruning Group" in text
    assert lines[0].startswith("---") and lines[-1].startswith("---")
    rows = [line for line in lines if line.startswith("[") and not line.startswith("[attr]")]
    assert len(rows) == len(group)
    assert rows[0].startswith("[0]") and rows[0].endswith("(root)")
    assert sum("(root)" in r for r in rows) == 1
    for i, item in enumerate(group):
        assert rows[i].startswith(f"[{i}]")
        assert item.dep.target.name in rows[i] and item.dep.handler.__name__ in rows[i]
        assert f"#idxs={len(item.idxs)}" in rows[i]
    assert "idxs=[0, 5]" in text
    # The split sizes attribute that follows the prune is shown too.
    assert any(line.startswith("[attr]") and "sizes" in line and "[2, 3]" in line for line in lines)
    assert repr(group) == text


def test_group_prune_with_idxs_prunes_the_root_subset() -> None:
    model = CatNet()
    x = torch.randn(1, 3, 4, 4)
    dg = build(model, x)
    (full,) = [g for g in dg.get_all_groups() if g.root.dep.target.module is model.b]
    assert full.root.idxs == list(range(5))
    full.prune(idxs=[4, 0])
    assert model.b.out_channels == 3 and model.d.in_channels == 13 and model.e.in_channels == 7
    assert model(x).shape == (1, 9, 4, 4)
    record = dg.pruning_history[-1]
    assert record["root"] == "b" and record["idxs"] == [0, 4]
    assert {(it["target"], tuple(it["idxs"])) for it in record["items"]} == {
        ("b", (0, 4)),
        ("d", (4, 8)),
        ("e", (4, 8)),
    }


# ---------------------------------------------------------------------------------------------
# Building: inputs, outputs, model state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tuple", "dict", "dict-with-scalar", "list"])
def test_build_with_positional_and_keyword_inputs(form: str) -> None:
    model = TwoInputs()
    image, extra = torch.randn(1, 3, 5, 5), torch.randn(1, 2, 5, 5)
    inputs = {
        "tuple": (image, extra),
        "list": [image, extra],
        "dict": {"image": image, "extra": extra},
        "dict-with-scalar": {"extra": extra, "image": image, "scale": 2.0},
    }[form]
    dg = build(model, inputs)
    (group,) = dg.get_all_groups()
    assert items_by_name(group, model) == {
        ("a", "out"): list(range(8)),
        ("b", "out"): list(range(8)),
        ("c", "in"): list(range(8)),
    }
    for module in (model.a, model.b):
        assert len(dg.get_node(module).inputs) == 1
        assert dg.get_node(module).inputs[0].type is OpType.INPUT
        with pytest.raises(ValueError, match="model input"):
            dg.get_pruning_group(module, pcl.prune_conv_in_channels, [0])
    group.prune(idxs=[1, 2, 3])
    assert model(image, extra).shape == (1, 4, 5, 5)
    assert model.a.out_channels == model.b.out_channels == model.c.in_channels == 5


def test_single_tensor_input() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    dg = build(model, torch.randn(1, 3, 5, 5))
    assert summary(dg.get_all_groups(), model) == [
        [("0", "prune_conv_out_channels", tuple(range(6))), ("2", "prune_conv_in_channels", tuple(range(6)))]
    ]


def test_forward_fn_and_output_transform() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Conv2d(3, 6, 3)
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, batch: dict) -> tuple[torch.Tensor, str]:
            feat = self.enc(batch["pixels"])
            return self.head(feat), "not a tensor"

    model = Wrapped()
    calls = []

    def forward_fn(m: nn.Module, inputs: Any) -> Any:
        calls.append(inputs)
        return m({"pixels": inputs})

    dg = build(model, torch.randn(1, 3, 5, 5), forward_fn=forward_fn, output_transform=lambda out: out[0])
    assert len(calls) >= 1
    (group,) = dg.get_all_groups()
    assert group.root.dep.target.module is model.enc
    with pytest.raises(RuntimeError, match="output_transform"):
        build(model, torch.randn(1, 3, 5, 5), forward_fn=forward_fn, output_transform=lambda out: out[1])


@dataclasses.dataclass
class PlainOutput:
    main: torch.Tensor
    aux: list


class NestedOutputs(nn.Module):
    """A trunk and four heads whose results come back inside dicts, lists, tuples and a dataclass."""

    def __init__(self, wrap: str) -> None:
        super().__init__()
        self.wrap = wrap
        self.trunk = nn.Conv2d(3, 8, 3, padding=1)
        self.h1, self.h2, self.h3, self.h4 = (nn.Conv2d(8, k, 1) for k in (2, 3, 4, 5))

    def forward(self, x: torch.Tensor) -> Any:
        t = torch.relu(self.trunk(x))
        o1, o2, o3, o4 = self.h1(t), self.h2(t), self.h3(t), self.h4(t)
        if self.wrap == "dict":
            return {"a": o1, "b": [o2, {"c": (o3, None, "text")}], "d": o4}
        if self.wrap == "dataclass":
            return PlainOutput(main=o1, aux=[o2, (o3,), {"deep": o4}])
        from transformers.utils import ModelOutput

        @dataclasses.dataclass
        class Out(ModelOutput):
            logits: torch.Tensor | None = None
            hidden_states: tuple | None = None
            extra: dict | None = None

        return Out(logits=o1, hidden_states=(o2, o3), extra={"x": o4})


@pytest.mark.parametrize("wrap", ["dict", "dataclass", "model-output"])
def test_outputs_of_any_nesting_are_found(wrap: str) -> None:
    if wrap == "model-output":
        pytest.importorskip("transformers")
    model = NestedOutputs(wrap)
    dg = build(model, torch.randn(1, 3, 4, 4))
    for head in (model.h1, model.h2, model.h3, model.h4):
        with pytest.raises(ValueError, match="output"):
            dg.get_pruning_group(head, pc.prune_conv_out_channels, [0])
    (group,) = dg.get_all_groups()
    assert group.root.dep.target.module is model.trunk
    assert {it.dep.target.module for it in group} == {model.trunk, model.h1, model.h2, model.h3, model.h4}


def test_hugging_face_model_output_and_pruning() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    model = transformers.ResNetForImageClassification(config).eval()
    x = torch.randn(1, 3, 32, 32)
    dg = build(model, {"pixel_values": x})
    groups = dg.get_all_groups()
    assert groups
    assert_each_set_once(groups)
    for g in groups:
        if len(g.root.idxs) >= 4:
            g.prune(idxs=[0, 2])
    out = model(pixel_values=x)
    assert out.logits.shape == (1, 3)
    assert len(dg.pruning_history) == len([g for g in groups if len(g.root.idxs) >= 4]) > 0


class ModeNet(nn.Module):
    def __init__(self, data_dependent: bool) -> None:
        super().__init__()
        self.data_dependent = data_dependent
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        if self.data_dependent and h.sum() > 0:  # needs real values: traced without meta tensors
            h = h * 2
        return self.fc(self.bn2(self.conv2(h)).mean((2, 3)))


def _module_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes (sizes, flags, modes) of every module, deep-copied."""
    simple = (int, float, bool, str, tuple, list, type(None))
    return {
        name: {
            k: copy.deepcopy(v) for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, simple)
        }
        for name, m in model.named_modules()
    }


class StateSnapshot:
    """Everything a build or a failed prune must leave as it was, bit for bit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {n: (p, p.data, p.data.clone(), p.requires_grad) for n, p in model.named_parameters()}
        self.grads = {
            n: (p.grad, p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()
        }
        self.buffers = {n: (b, b.clone()) for n, b in model.named_buffers()}
        self.attrs = _module_attrs(model)
        self.modes = {n: m.training for n, m in model.named_modules()}

    def assert_unchanged(self) -> None:
        model = self.model
        params = dict(model.named_parameters())
        assert params.keys() == self.params.keys()
        for n, (p, data, copy_, requires_grad) in self.params.items():
            assert params[n] is p, n
            assert p.data.data_ptr() == data.data_ptr() and p.shape == data.shape, n
            assert torch.equal(p.data, copy_) and p.dtype == copy_.dtype, n
            assert p.requires_grad == requires_grad, n
            grad, grad_copy = self.grads[n]
            if grad is None:
                assert p.grad is None, n
            else:
                assert p.grad is grad and torch.equal(p.grad, grad_copy), n
        buffers = dict(model.named_buffers())
        assert buffers.keys() == self.buffers.keys()
        for n, (b, copy_) in self.buffers.items():
            assert buffers[n] is b and torch.equal(b, copy_), n
        assert _module_attrs(model) == self.attrs
        assert {n: m.training for n, m in model.named_modules()} == self.modes


@pytest.mark.parametrize("data_dependent", [False, True], ids=["meta-trace", "real-trace"])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_build_leaves_model_state_untouched(data_dependent: bool, mode: str) -> None:
    torch.manual_seed(0)
    model = ModeNet(data_dependent)
    x = torch.randn(2, 3, 6, 6)
    model.train()
    model(x).sum().backward()  # real gradients and updated BN statistics
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn.eval()
        model.drop.eval()
    model.conv2.weight.requires_grad_(False)
    model.conv2.weight.grad = None
    model.bn2.bias.grad = None
    snap = StateSnapshot(model)
    dg = build(model, x)
    assert dg.traced_on_meta is not data_dependent
    snap.assert_unchanged()
    groups = dg.get_all_groups()
    snap.assert_unchanged()
    assert {g.root.dep.target.module for g in groups} == {model.conv, model.conv2}


# ---------------------------------------------------------------------------------------------
# Queries and their errors
# ---------------------------------------------------------------------------------------------


def test_get_node_errors() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b = nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.a(x)))

    model = Net()
    dg = build(model, torch.randn(1, 3, 4, 4))
    assert dg.get_node(model.a).module is model.a
    with pytest.raises(KeyError, match="unused is not in the dependency graph.*not used"):
        dg.get_node(model.unused)
    with pytest.raises(KeyError, match="act is not in the dependency graph.*customized pruner"):
        dg.get_node(model.act)
    with pytest.raises(KeyError, match="not in the dependency graph"):
        dg.get_node(nn.Conv2d(3, 8, 1))
    with pytest.raises(KeyError, match="not in the dependency graph"):
        dg.get_pruning_group(model.unused, pc.prune_linear_out_channels, [0])
    with pytest.raises(TypeError, match="not a pruning function"):
        dg.get_pruning_group(model.a, lambda m, idxs: m, [0])
    assert dg.get_out_channels(model.a) == 8 and dg.get_in_channels(model.a) == 3
    assert dg.get_in_channels(model.b) == 8


def test_get_pruning_group_rejects_out_of_range_idxs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1))
    dg = build(model, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="out of range"):
        dg.get_pruning_group(model[0], pc.prune_conv_out_channels, [100])


def test_get_pruning_group_rejects_negative_idxs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1))
    dg = build(model, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="out of range"):
        dg.get_pruning_group(model[0], pc.prune_conv_out_channels, [-1])


# ---------------------------------------------------------------------------------------------
# get_all_groups: coupled sets, each exactly once
# ---------------------------------------------------------------------------------------------


def test_residual_stream_is_one_group() -> None:
    model = cifar_resnet(20).eval()
    dg = build(model, torch.randn(1, 3, 8, 8))
    groups = dg.get_all_groups()
    assert_each_set_once(groups)
    stages = list(model.layers)
    blocks = [b for stage in stages for b in stage]
    assert all(isinstance(b, BasicBlock) for b in blocks)
    # One group per stage's residual stream plus one per block's inner conv1 -> conv2 channels.
    assert len(groups) == len(stages) + len(blocks)
    for s, stage in enumerate(stages):
        members = [b.conv2 for b in stage] + [b.bn2 for b in stage]
        if stage[0].downsample is not None:
            members += list(stage[0].downsample)
        if s == 0:
            members += [model.stem[0], model.stem[1]]
        (group,) = groups_containing(groups, stage[0].conv2, "out")
        n = stage[0].conv2.out_channels
        got = {it.dep.target.module: it.idxs for it in group}
        for m in members:
            assert got.get(m) == list(range(n)), m
        # The stream's readers: every block's conv1, the next stage's entry and finally fc.
        readers = [b.conv1 for b in stage[1:]]
        if stage[0].downsample is None:
            readers.append(stage[0].conv1)
        if s + 1 < len(stages):
            readers += [stages[s + 1][0].conv1, stages[s + 1][0].downsample[0]]
        else:
            readers.append(model.fc)
        in_items = {it.dep.target.module for it in group if it.dep.handler.side == "in"}
        assert set(readers) <= in_items
    for b in blocks:
        (group,) = groups_containing(groups, b.conv1, "out")
        assert {it.dep.target.module for it in group} == {b.conv1, b.bn1, b.conv2}


def test_concat_and_concat_of_concat_offsets() -> None:
    model = CatNet()
    dg = build(model, torch.randn(1, 3, 4, 4))
    groups = dg.get_all_groups()
    assert_each_set_once(groups)
    by_root = {g.root.dep.target.module: items_by_name(g, model) for g in groups}
    assert by_root == {
        model.a: {("a", "out"): list(range(4)), ("d", "in"): list(range(4)), ("e", "in"): list(range(4))},
        model.b: {
            ("b", "out"): list(range(5)),
            ("d", "in"): list(range(4, 9)),
            ("e", "in"): list(range(4, 9)),
        },
        model.c: {("c", "out"): list(range(6)), ("d", "in"): list(range(9, 15))},
    }
    # d and e feed the model output and have no group of their own.
    for g in groups:
        for it in g:
            if it.dep.target.module in (model.d, model.e):
                assert it.dep.handler.side == "in"


def test_split_then_concat_mapping() -> None:
    model = SplitCatNet()
    x = torch.randn(1, 3, 4, 4)
    dg = build(model, x)
    groups = dg.get_all_groups()
    assert_each_set_once(groups)
    by_root = {g.root.dep.target.module: g for g in groups}
    assert set(by_root) == {model.a, model.b, model.c}
    a_group = by_root[model.a]
    assert items_by_name(a_group, model) == {
        ("a", "out"): list(range(8)),
        ("b", "in"): [0, 1, 2, 3],
        ("c", "in"): [0, 1, 2, 3],
    }
    c_item = next(it for it in a_group if it.dep.target.module is model.c)
    assert c_item.root_idxs == [4, 5, 6, 7]  # the second half of a's channels
    assert (
        dg.explain_pruning_group(dg.get_pruning_group(model.a, pc.prune_conv_out_channels, [1])) is not None
    )
    # cat([c(q), b(p)]): c's channels come first in d's input.
    assert items_by_name(by_root[model.c], model)[("d", "in")] == [0, 1, 2, 3]
    assert items_by_name(by_root[model.b], model)[("d", "in")] == [4, 5, 6, 7]
    sub = dg.get_pruning_group(model.a, pc.prune_conv_out_channels, [1, 6])
    assert items_by_name(sub, model) == {("a", "out"): [1, 6], ("b", "in"): [1], ("c", "in"): [2]}
    sub.prune()
    assert model(x).shape == (1, 2, 4, 4) and model.b.in_channels == model.c.in_channels == 3


class LiteralSplit(nn.Module):
    """``torch.split`` with a literal size: nothing the graph can update after a prune."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b, self.c = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.split(self.a(x), 4, 1)
        return self.b(p) + self.c(q)


def test_literal_split_size_is_refused_or_still_runs() -> None:
    model = LiteralSplit()
    x = torch.randn(1, 3, 4, 4)
    dg = build(model, x)
    group = dg.get_pruning_group(model.a, pc.prune_conv_out_channels, [1, 6])
    if dg.check_pruning_group(group):
        group.prune()
        assert model(x).shape == (1, 2, 4, 4)


def test_flatten_into_linear_maps_channel_blocks() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 2)
    )
    x = torch.randn(2, 3, 5, 5)
    dg = build(model, x)
    (full,) = [g for g in dg.get_all_groups() if g.root.dep.target.module is model[0]]
    (lin,) = [it for it in full if it.dep.target.module is model[3]]
    assert lin.idxs == list(range(36))
    assert lin.root_idxs == [c for c in range(4) for _ in range(9)]  # each channel owns 9 features
    group = dg.get_pruning_group(model[0], pc.prune_conv_out_channels, [1, 3])
    (lin,) = [it for it in group if it.dep.target.module is model[3]]
    assert lin.idxs == list(range(9, 18)) + list(range(27, 36))
    group.prune()
    assert model[3].in_features == 18 and model(x).shape == (2, 2)


def _dense_layers(model: nn.Module) -> list[tuple[DenseBlock, int, DenseLayer]]:
    return [
        (blk, i, layer)
        for blk in model.modules()
        if isinstance(blk, DenseBlock)
        for i, layer in enumerate(blk.layers)
    ]


def test_densenet_blocks() -> None:
    model = densenet(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    dg = build(model, x)
    groups = dg.get_all_groups()
    assert_each_set_once(groups)
    layers = _dense_layers(model)
    transitions = [m for m in model.modules() if isinstance(m, Transition)]
    assert len(groups) == 1 + 2 * len(layers) + len(transitions)
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    for blk, i, layer in layers:
        growth = layer.conv2.out_channels
        (group,) = groups_containing(groups, layer.conv2, "out")
        got = {(it.dep.target.module, it.dep.handler.side): it.idxs for it in group}
        offset = blk.layers[0].conv1.in_channels + i * growth
        expected_cols = list(range(offset, offset + growth))
        for later in blk.layers[i + 1 :]:
            assert got[(later.conv1, "in")] == expected_cols
            assert got[(later.norm1, "out")] == expected_cols
        # After the block: the next transition, or norm5 and the classifier.
        b = blocks.index(blk)
        if b < len(transitions):
            assert got[(transitions[b].conv, "in")] == expected_cols
        else:
            assert got[(model.features.norm5, "out")] == expected_cols
            assert got[(model.classifier, "in")] == expected_cols
        # Nothing before this layer reads its channels.
        for earlier in blk.layers[: i + 1]:
            assert (earlier.conv1, "in") not in got
    # Prune one channel from every dense layer output; channel offsets stay right.
    for _blk, _i, layer in layers:
        dg.get_pruning_group(layer.conv2, pc.prune_conv_out_channels, [1]).prune()
    assert model(x).shape == (1, 5)
    for blk in blocks:
        for i, layer in enumerate(blk.layers):
            assert layer.conv1.in_channels == blk.layers[0].conv1.in_channels + i * (layer.conv2.out_channels)


def test_ignored_layers() -> None:
    model = DigitsResNet(width=8).eval()
    x = torch.randn(1, 1, 8, 8)
    dg = build(model, x)
    groups = dg.get_all_groups()
    stem_bn = model.stem[1]
    assert groups_containing(groups, stem_bn, "out")
    # Ignoring a BN in the first residual stream removes the whole stream, nothing else.
    for dg2, kw in ((dg, {"ignored_layers": [stem_bn]}), (build(model, x, ignored_layers=[stem_bn]), {})):
        remaining = dg2.get_all_groups(**kw)
        assert not groups_containing(remaining, stem_bn, "out")
        assert not groups_containing(remaining, model.stem[0], "out")
        assert len(remaining) == len(groups) - 1
    dg3 = build(model, x, ignored_layers=[model.stem[0]])
    with pytest.raises(ValueError, match="ignored"):
        dg3.get_pruning_group(model.layers[0][0].conv2, pc.prune_conv_out_channels, [0])
    # Ignoring a layer keeps its output channels; its input side may still be pruned.
    conv1 = model.layers[0][0].conv1
    remaining = dg.get_all_groups(ignored_layers=[conv1])
    assert not groups_containing(remaining, conv1, "out")
    assert groups_containing(remaining, conv1, "in")


def test_root_module_types() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 6), nn.ReLU(), nn.Linear(6, 2)
    )
    dg = build(model, torch.randn(1, 3, 5, 5))
    default = dg.get_all_groups()
    assert {g.root.dep.target.module for g in default} == {model[0], model[3]}
    only_linear = dg.get_all_groups(root_module_types=(nn.Linear,))
    assert [g.root.dep.target.module for g in only_linear] == [model[3]]
    assert dg.get_all_groups(root_module_types=(nn.LSTM,)) == []


def test_groups_are_found_in_module_order_and_deterministic() -> None:
    model = densenet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5).eval()
    x = torch.randn(1, 3, 16, 16)
    first = summary(build(model, x).get_all_groups(), model)
    second = summary(build(model, x).get_all_groups(), model)
    assert first == second


# ---------------------------------------------------------------------------------------------
# check_pruning_group / explain_pruning_group
# ---------------------------------------------------------------------------------------------


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gconv = nn.Conv2d(8, 8, 3, groups=2, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gn(self.gconv(self.a(x))))


class ChunkNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b, self.c = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.a(x).chunk(2, 1)
        return self.b(p) + self.c(q)


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.head(self.mha(h, h, h)[0] + h)


REFUSALS = [
    (
        "all-channels",
        GroupedNet,
        (1, 3, 4, 4),
        "a",
        list(range(8)),
        r"a \(Conv2d\) would be left with no channels",
    ),
    (
        "grouped-in",
        GroupedNet,
        (1, 3, 4, 4),
        "a",
        [0],
        r"gconv.*grouped convolution with 2 groups.*same number",
    ),
    ("grouped-out", GroupedNet, (1, 3, 4, 4), "gconv", [0], r"gconv.*grouped convolution.*output"),
    ("groupnorm", GroupedNet, (1, 3, 4, 4), "gconv", [0, 4], r"gn \(GroupNorm\).*6 channels.*num_groups=4"),
    ("chunks", ChunkNet, (1, 3, 4, 4), "a", [0], r"equal chunks.*unequal sizes"),
    ("heads", AttnNet, (2, 4, 5), "proj", [0], r"mha.*every head must lose the same number"),
]


@pytest.mark.parametrize(
    ("factory", "shape", "root", "idxs", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_check_pruning_group_refusals(
    factory: Callable, shape: tuple, root: str, idxs: list[int], message: str
) -> None:
    model = factory()
    x = torch.randn(*shape)
    dg = build(model, x)
    module = getattr(model, root)
    fn = get_pruning_functions(dg.get_node(module).pruner)[0]
    group = dg.get_pruning_group(module, fn, idxs)
    assert dg.check_pruning_group(group) is False
    reason = dg.explain_pruning_group(group)
    assert reason is not None
    assert re.search(message, reason), reason
    snap = StateSnapshot(model)
    with pytest.raises(ValueError, match="refusing to prune"):
        group.prune()
    snap.assert_unchanged()
    assert dg.pruning_history == []


@pytest.mark.parametrize(
    ("factory", "shape", "root", "idxs"),
    [
        (GroupedNet, (1, 3, 4, 4), "a", [0, 4]),
        (GroupedNet, (1, 3, 4, 4), "gconv", [0, 1, 4, 5]),
        (ChunkNet, (1, 3, 4, 4), "a", [0, 5]),
        (AttnNet, (2, 4, 5), "proj", [1, 6]),  # one channel of each head
    ],
    ids=["grouped-in", "grouped-out+groupnorm", "chunks", "heads"],
)
def test_check_pruning_group_accepts_valid_groups(
    factory: Callable, shape: tuple, root: str, idxs: list[int]
) -> None:
    model = factory()
    x = torch.randn(*shape)
    dg = build(model, x)
    module = getattr(model, root)
    fn = get_pruning_functions(dg.get_node(module).pruner)[0]
    group = dg.get_pruning_group(module, fn, idxs)
    assert dg.check_pruning_group(group) and dg.explain_pruning_group(group) is None
    out_shape = model(x).shape
    group.prune()
    assert model(x).shape == out_shape
    assert dg.get_out_channels(module) == fn.pruner.out_channels(module)


# ---------------------------------------------------------------------------------------------
# Atomic prune
# ---------------------------------------------------------------------------------------------


class _FailAfterPruning(PruningFunction):
    """Does the real prune (so the model really is half-modified), then fails."""

    def __init__(self, real: PruningFunction) -> None:
        super().__init__(real.pruner, real.side, real.__name__)
        self.real = real

    def __call__(self, module: nn.Module, idxs: Any) -> nn.Module:
        self.real(module, idxs)
        raise RuntimeError("injected failure")


def test_failed_prune_restores_every_tensor_and_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = DigitsResNet(width=8).train()
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()
    dg = build(model, x)
    names = names_of(model)
    stream = groups_containing(dg.get_all_groups(), model.stem[0], "out")[0]
    group = dg.get_pruning_group(model.stem[0], pc.prune_conv_out_channels, [1, 3, 6])
    assert len(group) == len(stream) >= 5
    # The graph prunes output sides first; fail in the middle of that order.
    order = sorted(group, key=lambda it: it.dep.handler.side != "out")
    victim = order[len(order) // 2]
    assert victim is not group.root
    monkeypatch.setattr(victim.dep, "handler", _FailAfterPruning(victim.dep.handler))
    snap = StateSnapshot(model)
    expected_out = model.eval()(x)
    model.train()
    with pytest.raises(PruningError) as err:
        group.prune()
    message = str(err.value)
    assert names[victim.dep.target.module] in message
    assert victim.dep.handler.__name__ in message
    assert "injected failure" in message and "restored" in message
    assert isinstance(err.value.__cause__, RuntimeError)
    snap.assert_unchanged()
    assert dg.pruning_history == []
    assert torch.equal(model.eval()(x), expected_out)
    # The graph is still usable: the same group, without the failure, prunes normally.
    monkeypatch.undo()
    group.prune()
    assert model.stem[0].out_channels == 5 and model(x).shape == (4, 10)
    assert len(dg.pruning_history) == 1


def test_failed_attribute_update_restores_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    class Frozen:
        """A size attribute that refuses to be set (fails after ``sizes`` was updated)."""

        def __set_name__(self, owner: type, name: str) -> None:
            self.name = name

        def __get__(self, obj: Any, owner: type) -> int:
            return 7

        def __set__(self, obj: Any, value: Any) -> None:
            raise AttributeError("frozen size")

    class Model(SizedSplit):
        frozen = Frozen()

    model = Model()
    x = torch.randn(1, 3, 4, 4)
    dg = build(model, x)
    group = dg.get_pruning_group(model.a, pc.prune_conv_out_channels, [0, 5])
    assert [(a, n) for _m, a, _o, n in group.attribute_updates] == [("sizes", [2, 3])]
    group.attribute_updates.append((model, "frozen", 7, 5))
    sizes = model.sizes
    snap = StateSnapshot(model)
    with pytest.raises(PruningError, match="attributes.*frozen size"):
        group.prune()
    snap.assert_unchanged()
    assert model.sizes is sizes and sizes == [3, 4]
    assert model(x).shape == (1, 2, 4, 4)


# ---------------------------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------------------------


def _graph_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("prune_callbacks")]


def test_unknown_op_warns_exactly_once() -> None:
    op, name = _unknown_elementwise_op()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = op(self.a(x))  # used twice: still one warning, naming it once
            return self.c(op(self.b(h)))

    model = Net()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dg = build(model, torch.randn(1, 3, 4, 4))
    (message,) = _graph_warnings(record)
    assert message.count(name) == 1
    assert dg.unknown_ops == {name}
    # The op is treated as elementwise: channels flow through it.
    (group,) = [g for g in dg.get_all_groups() if g.root.dep.target.module is model.a]
    assert {it.dep.target.module for it in group} == {model.a, model.b}


def test_known_ops_build_without_warnings() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dg = build(DigitsResNet(width=8).eval(), torch.randn(1, 1, 8, 8))
        build(CatNet(), torch.randn(1, 3, 4, 4))
        build(SplitCatNet(), torch.randn(1, 3, 4, 4))
    assert _graph_warnings(record) == []
    assert dg.unknown_ops == set()


def test_get_all_groups_is_silent_about_model_outputs() -> None:
    model = DigitsResNet(width=8).eval()
    dg = build(model, torch.randn(1, 1, 8, 8))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        groups = dg.get_all_groups()
    assert groups
    assert _graph_warnings(record) == []


# ---------------------------------------------------------------------------------------------
# Bare parameters and customized pruners
# ---------------------------------------------------------------------------------------------


class LayerScaleNet(nn.Module):
    """Layer-scale style parameter: a per-channel vector multiplying a conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gamma = nn.Parameter(torch.rand(8))
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * self.gamma.view(1, -1, 1, 1))


class TokenNet(nn.Module):
    """Class token and position embedding parameters around a linear patch embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.cls = nn.Parameter(torch.rand(1, 1, 8))
        self.pos = nn.Parameter(torch.rand(1, 5, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos
        return self.head(t[:, 0])


def _unwrapped(form: str, param: nn.Parameter, dim: int) -> Any:
    return {"none": None, "list": [param], "dict": {param: dim}, "pairs": [(param, dim)]}[form]


@pytest.mark.parametrize("form", ["none", "list", "dict", "pairs"])
@pytest.mark.parametrize(
    ("factory", "shape", "root", "param", "dim"),
    [(LayerScaleNet, (1, 3, 4, 4), "a", "gamma", 0), (TokenNet, (2, 4, 5), "embed", "cls", 2)],
    ids=["layer-scale", "cls-token"],
)
def test_unwrapped_parameters(
    factory: Callable, shape: tuple, root: str, param: str, dim: int, form: str
) -> None:
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(*shape)
    p = getattr(model, param)
    old = p.detach().clone()
    dg = build(model, x, unwrapped_parameters=_unwrapped(form, p, dim))
    (group,) = dg.get_all_groups()
    assert group.root.dep.target.module is getattr(model, root)
    (item,) = [it for it in group if it.dep.target.module is p]
    assert item.dep.handler.__name__ == "prune_parameter_out_channels"
    assert item.idxs == list(range(8))
    if form in ("dict", "pairs"):
        assert dg.get_node(p).pruning_dim == dim  # as given; otherwise found from how it is used
    group.prune(idxs=[1, 2])
    assert p.shape[dim] == 6 and isinstance(p, nn.Parameter)
    keep = [i for i in range(8) if i not in (1, 2)]
    assert torch.equal(p.detach(), old.index_select(dim, torch.tensor(keep)))
    assert model(x).shape[1] == (2 if factory is LayerScaleNet else 3)
    (record,) = [it for it in dg.pruning_history[-1]["items"] if it["target"] == param]
    assert record["dim"] == dim and record["idxs"] == [1, 2]


class ScaleShift(nn.Module):
    """A user layer (per-channel affine) the library does not know."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)
        self.shift = nn.Parameter(torch.rand(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class ScaleShiftPruner(LayerPruner):
    """Coupled pruner for ScaleShift: both vectors lose the same entries."""

    def coupled(self, module: nn.Module) -> bool:
        return True

    def out_channels(self, module: nn.Module) -> int | None:
        return module.channels

    def in_channels(self, module: nn.Module) -> int | None:
        return module.channels

    def prune_out_channels(self, module: nn.Module, idxs: Any) -> nn.Module:
        keep = torch.tensor([i for i in range(module.channels) if i not in set(idxs)])
        module.scale.data = module.scale.data[keep]
        module.shift.data = module.shift.data[keep]
        module.channels = len(keep)
        return module

    prune_in_channels = prune_out_channels


class MatmulLinear(nn.Module):
    """A user linear layer computed with a matmul (not traceable channel by channel)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cin, self.cout = cin, cout
        self.w = nn.Parameter(torch.randn(cout, cin) / cin**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.movedim(1, -1) @ self.w.t()).movedim(-1, 1)


class MatmulLinearPruner(LayerPruner):
    def out_channels(self, module: nn.Module) -> int | None:
        return module.cout

    def in_channels(self, module: nn.Module) -> int | None:
        return module.cin

    def prune_out_channels(self, module: nn.Module, idxs: Any) -> nn.Module:
        keep = torch.tensor([i for i in range(module.cout) if i not in set(idxs)])
        module.w.data = module.w.data[keep]
        module.cout = len(keep)
        return module

    def prune_in_channels(self, module: nn.Module, idxs: Any) -> nn.Module:
        keep = torch.tensor([i for i in range(module.cin) if i not in set(idxs)])
        module.w.data = module.w.data[:, keep]
        module.cin = len(keep)
        return module


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.ss = ScaleShift(8)
        self.mm = MatmulLinear(8, 6)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.mm(self.ss(self.a(x)))))


def test_customized_pruners() -> None:
    model = CustomNet()
    x = torch.randn(1, 3, 4, 4)
    pruners = {ScaleShift: ScaleShiftPruner(), MatmulLinear: MatmulLinearPruner()}
    dg = build(model, x, customized_pruners=pruners)
    for m in (model.ss, model.mm):
        node = dg.get_node(m)
        assert node.type is OpType.CUSTOMIZED and node.pruner is pruners[type(m)]
    # The user modules are single nodes: their parameters are not separate nodes.
    with pytest.raises(KeyError):
        dg.get_node(model.ss.scale)
    groups = dg.get_all_groups()
    assert_each_set_once(groups)
    by_root = {g.root.dep.target.module: items_by_name(g, model) for g in groups}
    assert by_root == {
        model.a: {("a", "out"): list(range(8)), ("ss", "out"): list(range(8)), ("mm", "in"): list(range(8))},
        model.mm: {("mm", "out"): list(range(6)), ("b", "in"): list(range(6))},
    }
    for g in groups:
        g.prune(idxs=[0, 3])
    assert model.ss.scale.shape == (6,) and model.mm.w.shape == (4, 6) and model.b.in_channels == 4
    assert model(x).shape == (1, 2, 4, 4)
    names = {rec["root"]: [it["function"] for it in rec["items"]] for rec in dg.pruning_history}
    assert "prune_ScaleShiftPruner_out_channels" in names["a"]
    # Without the pruner the matmul layer cannot be traced channel by channel: no group crosses it.
    plain = build(CustomNet(), x).get_all_groups()
    assert all(type(it.dep.target.module) is not MatmulLinear for g in plain for it in g)


# ---------------------------------------------------------------------------------------------
# Model inputs, sequential prunes, other layer families
# ---------------------------------------------------------------------------------------------


def test_model_input_feeding_a_depthwise_conv_cannot_be_pruned() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, groups=3, padding=1), nn.Conv2d(6, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    dg = build(model, torch.randn(1, 3, 4, 4))
    dw = model[0]
    assert dg.get_node(dw).type is OpType.DEPTHWISE_CONV
    for fn, idxs in (
        (pcl.prune_depthwise_conv_out_channels, [0, 1]),
        (pcl.prune_depthwise_conv_in_channels, [0]),
        (pc.prune_conv_out_channels, [2, 3]),
    ):
        with pytest.raises(ValueError, match="model input"):
            dg.get_pruning_group(dw, fn, idxs)
    groups = dg.get_all_groups()
    assert [g.root.dep.target.module for g in groups] == [model[1]]
    assert all(it.dep.target.module is not dw for g in groups for it in g)


def test_depthwise_conv_couples_its_input_and_output() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)
    )
    x = torch.randn(1, 3, 4, 4)
    dg = build(model, x)
    (group,) = dg.get_all_groups()
    assert items_by_name(group, model)[("0", "out")] == list(range(4))
    sub = dg.get_pruning_group(model[0], pc.prune_conv_out_channels, [1])
    got = items_by_name(sub, model)
    # Input channel 1 of the depthwise conv owns its output channels 2 and 3.
    assert got[("3", "in")] == [2, 3]
    # Asking for output channel 2 alone grows to its whole block: the same group.
    from_out = dg.get_pruning_group(model[1], pcl.prune_depthwise_conv_out_channels, [2])
    assert items_by_name(from_out, model)[("0", "out")] == [1]
    assert items_by_name(from_out, model)[("3", "in")] == [2, 3]
    sub.prune()
    assert (model[1].in_channels, model[1].out_channels, model[1].groups) == (3, 6, 3)
    assert model(x).shape == (1, 2, 4, 4)


def test_sequential_prunes_on_one_graph() -> None:
    torch.manual_seed(0)
    model = DigitsResNet(width=8).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(3, 1, 8, 8)
    masked = copy.deepcopy(model)
    masked_modules = dict(masked.named_modules())
    names = names_of(model)
    dg = build(model, x)
    original: dict[tuple[str, str], list[int]] = {}

    def prune(module: nn.Module, idxs: list[int]) -> None:
        group = dg.get_pruning_group(module, pc.prune_conv_out_channels, idxs)
        assert dg.check_pruning_group(group)
        for item in group:
            target, side = item.dep.target.module, item.dep.handler.side
            key = (names[target], "both" if isinstance(target, nn.BatchNorm2d) else side)
            size = (
                item.dep.handler.pruner.out_channels(target)
                if side == "out"
                else item.dep.handler.pruner.in_channels(target)
            )
            kept = original.setdefault(key, list(range(size)))
            removed = [kept[i] for i in item.idxs]
            original[key] = [c for c in kept if c not in removed]
            zero_channels(masked_modules[names[target]], side, removed)
        group.prune()

    block = model.layers[1][0]
    prune(model.stem[0], [0, 5])  # stage-1 residual stream
    prune(block.conv2, [1, 2, 3])  # stage-2 residual stream, through the projection shortcut
    prune(model.layers[0][0].conv1, [4])
    prune(block.conv1, [0, 1])
    prune(block.conv1, [0])  # again, in the new numbering
    prune(model.stem[0], [5])
    assert (
        model.stem[0].out_channels == 5 and block.conv2.out_channels == 13 and block.conv1.out_channels == 13
    )
    assert block.conv1.in_channels == block.downsample[0].in_channels == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-5)
    # The reused graph describes the pruned model exactly like a fresh trace does.
    assert summary(dg.get_all_groups(), model) == summary(build(model, x).get_all_groups(), model)
    assert len(dg.pruning_history) == 6


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm that permutes inside (as in many vision models). Its channel
    dimension is read from the permutes it runs, so an 8x8 map with 8 channels is not ambiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TransposedLayerNorm2d(nn.LayerNorm):
    """The same with a transpose (channels to the last dim and back) and a contiguous copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 3).contiguous()).transpose(1, 3)


def _ln2d_model(norm: type = LayerNorm2d) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), norm(8), nn.ReLU(), nn.Conv2d(8, 2, 1))


@pytest.mark.parametrize("norm", [LayerNorm2d, TransposedLayerNorm2d], ids=["permute", "transpose"])
@pytest.mark.parametrize("hw", [6, 10], ids=["4x4-map", "8x8-map-equal-to-channels"])
def test_channels_first_layernorm(hw: int, norm: type) -> None:
    model = _ln2d_model(norm)
    x = torch.randn(1, 3, hw, hw)
    dg = build(model, x)
    (group,) = dg.get_all_groups()
    assert set(items_by_name(group, model)) == {("0", "out"), ("1", "out"), ("3", "in")}
    group.prune(idxs=[0, 5])
    assert model[1].normalized_shape == (6,) and model(x).shape == (1, 2, hw - 2, hw - 2)


class ReusedConv(nn.Module):
    """One conv applied twice in a row: its output channels are also its input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(self.a(x)))))


class SharedBranches(nn.Module):
    """One conv applied to two branches whose results are multiplied."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(self.a(x)) * self.shared(self.b(x)))


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (ReusedConv, {("a", "out"), ("shared", "in"), ("shared", "out"), ("head", "in")}),
        (SharedBranches, {("a", "out"), ("b", "out"), ("shared", "in")}),
    ],
    ids=["called-in-sequence", "called-on-two-branches"],
)
def test_module_called_twice(factory: Callable, expected: set) -> None:
    model = factory()
    x = torch.randn(1, 3, 5, 5)
    dg = build(model, x)
    groups = dg.get_all_groups()
    assert_each_set_once(groups)
    (group,) = groups_containing(groups, model.a, "out")
    assert set(items_by_name(group, model)) == expected
    group.prune(idxs=[0, 1])
    assert model(x).shape == (1, 2, 5, 5)


class TiedLM(nn.Module):
    """Output layer tied to the embedding table (one shared weight), as in most language models."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(self.emb(ids))))


def test_tied_weights_are_pruned_together() -> None:
    model = TiedLM()
    ids = torch.randint(0, 10, (2, 5))
    dg = build(model, ids)
    group = dg.get_pruning_group(model.emb, pcl.prune_embedding_out_channels, [0, 1])
    assert dg.check_pruning_group(group)
    group.prune()
    assert model.emb.weight is model.out.weight and model.out.in_features == 6
    assert model(ids).shape == (2, 5, 10)


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.ln = nn.LayerNorm(8)
        self.lstm = nn.LSTM(8, 6, batch_first=True, num_layers=2)
        self.proj = nn.Linear(6, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.ln(self.emb(ids)))
        h = self.proj(h)
        return self.head(self.mha(h, h, h)[0] + h)


class NormModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.pr = nn.PReLU(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.inorm(self.c2(self.pr(self.gn(self.c1(x))))))


class RecurrentModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.lstm = nn.LSTM(8, 6, bidirectional=True, batch_first=True, num_layers=2)
        self.gru = nn.GRU(12, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.inp(x))
        h, _ = self.gru(h)
        return self.head(h)


class UpsampleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.up(self.down(x))))


@pytest.mark.parametrize(
    ("factory", "make_input", "expected"),
    [
        (
            SeqModel,
            lambda: torch.randint(0, 20, (2, 7)),
            {
                "emb": {"emb", "ln", "lstm"},
                "lstm": {"lstm", "proj"},
                "proj": {"proj", "mha", "head"},
            },
        ),
        (
            NormModel,
            lambda: torch.randn(2, 3, 5, 5),
            {"c1": {"c1", "gn", "pr", "c2"}, "c2": {"c2", "inorm", "c3"}},
        ),
        (
            RecurrentModel,
            lambda: torch.randn(2, 7, 4),
            {"inp": {"inp", "lstm"}, "lstm": {"lstm", "gru"}, "gru": {"gru", "head"}},
        ),
        (
            UpsampleModel,
            lambda: torch.randn(1, 3, 8, 8),
            {"down": {"down", "up"}, "up": {"up", "bn", "head"}},
        ),
    ],
    ids=[
        "embedding-layernorm-lstm-mha",
        "groupnorm-prelu-instancenorm",
        "bidirectional-lstm-gru",
        "conv-transpose",
    ],
)
def test_other_layer_families_prune_and_run(factory: Callable, make_input: Callable, expected: dict) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    x = make_input()
    out_shape = model(x).shape
    dg = build(model, x)
    groups = dg.get_all_groups()
    assert_each_set_once(groups)
    names = names_of(model)
    got = {names[g.root.dep.target.module]: {names[it.dep.target.module] for it in g} for g in groups}
    assert got == expected
    before = {n: p.shape for n, p in model.named_parameters()}
    for g in groups:
        # two channels: keeps GroupNorm groups divisible; attention loses one channel per head
        mha = any(isinstance(it.dep.target.module, nn.MultiheadAttention) for it in g)
        g.prune(idxs=[0, 5] if mha else [0, 3])
    assert model(x).shape == out_shape
    changed = {n.split(".")[0] for n, p in model.named_parameters() if p.shape != before[n]}
    assert changed == set().union(*expected.values())
    if isinstance(model, SeqModel):
        assert (model.emb.embedding_dim, model.lstm.hidden_size, model.mha.embed_dim) == (6, 4, 6)
        assert model.ln.normalized_shape == (6,) and model.lstm.input_size == 6
    elif isinstance(model, NormModel):
        assert (model.gn.num_channels, model.pr.num_parameters, model.inorm.num_features) == (6, 6, 4)
        assert model.inorm.running_mean.shape == (4,)
    elif isinstance(model, RecurrentModel):
        # Hidden units 0 and 3 of both directions leave the GRU's input: 12 -> 8 features.
        assert (model.lstm.hidden_size, model.gru.input_size, model.gru.hidden_size) == (4, 8, 3)
    else:
        assert (model.up.in_channels, model.up.out_channels, model.bn.num_features) == (6, 4, 4)


def test_bidirectional_lstm_maps_both_directions() -> None:
    model = RecurrentModel()
    dg = build(model, torch.randn(2, 7, 4))
    group = dg.get_pruning_group(model.lstm, pcl.prune_lstm_out_channels, [1])
    assert items_by_name(group, model)[("gru", "in")] == [1, 7]  # forward and backward halves


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(1, 3),
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_meta_convolution_shapes_match_torch(k: int, transposed: bool, groups: int, data: Any) -> None:
    """The trace answers convolutions on meta tensors with a shape formula: it must give torch's
    shape, or step aside (None) where torch refuses or gives an empty result."""
    from prune_callbacks.graph.tracing import conv_result

    ints = lambda lo, hi: data.draw(st.lists(st.integers(lo, hi), min_size=k, max_size=k))  # noqa: E731
    cin, cout = 2 * data.draw(st.integers(1, 3)), 2 * data.draw(st.integers(1, 3))
    kernel, stride, padding, dilation = ints(1, 3), ints(1, 3), ints(0, 2), ints(1, 2)
    out_pad = (
        [data.draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
        if transposed
        else [0] * k
    )
    x = torch.randn(2, data.draw(st.sampled_from([cin, cin + 2])), *ints(2, 8))
    w = torch.randn(cin, cout // groups, *kernel) if transposed else torch.randn(cout, cin // groups, *kernel)
    bias = torch.randn(data.draw(st.sampled_from([cout, cout + 1])))
    args = (stride, padding, dilation, transposed, out_pad, groups)
    got = conv_result(x.to("meta"), w.to("meta"), bias.to("meta"), *args)
    try:
        ref = torch.ops.aten.convolution.default(x, w, bias, *args)
    except RuntimeError:
        assert got is None
        return
    assert (got is None and 0 in ref.shape) or (got.shape == ref.shape and got.dtype == ref.dtype)
