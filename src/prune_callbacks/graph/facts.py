"""Per-layer facts of a built graph, asked again and again by the graph searches.

A closure visits a layer once per tensor that reaches it and asks each time how many channels it
has on a side, whether its two sides are coupled (BatchNorm, depthwise convolutions), which
pruning function prunes it and along which dimension of a tensor its channels lie.
:class:`LayerFacts` answers these and, inside :meth:`LayerFacts.fixed` (no layer changes, as
while all groups are enumerated), computes each answer once per layer and side. It also holds the
two lazily found structure facts of the graph that the closure follows besides tensors: weights
tied between modules and the reshapes of one module that split channels into heads.

The module-level functions are the facts that need no memo (the side of a pruning function,
whether a reshape splits heads...); the other graph modules use them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from ..layers import (
    LayerPruner,
    ParameterPruner,
    ParameterPruningFunction,
    PruningFunction,
    get_pruning_functions,
    prune_depthwise_conv_in_channels,
    prune_depthwise_conv_out_channels,
)
from ..layers.base import Side
from .node import Edge, Node
from .ops import OpType

#: A module side and the module sides that share its channels through a tied weight.
NodeSide = tuple[Node, Side]

_NORM_TYPES = (OpType.BN, OpType.GN, OpType.IN, OpType.PRELU)
_CONV_TYPES = (OpType.CONV, OpType.DEPTHWISE_CONV)


class LayerFacts:
    """Channel counts, coupling, pruning functions and channel dimensions of a graph's layers,
    plus its tied weights and head-splitting reshapes (see the module docstring).

    ``model`` and ``nodes`` are the traced model and its nodes. Pruning functions of bare
    parameters are made once per parameter and dimension and kept for the life of the graph
    (groups compare them by identity); everything else is kept only inside :meth:`fixed`.
    """

    __slots__ = ("model", "nodes", "_memo", "_param_fns", "_tied_sides", "_head_reshapes", "_head_reshape_of")

    def __init__(self, model: nn.Module | None, nodes: list[Node]) -> None:
        self.model = model
        self.nodes = nodes
        self._memo: dict[tuple, Any] | None = None
        self._param_fns: dict[tuple[int, int | None], tuple[PruningFunction, PruningFunction]] = {}
        self._tied_sides: dict[NodeSide, list[NodeSide]] | None = None
        self._head_reshapes: list[list[Edge]] | None = None
        self._head_reshape_of: dict[int, list[Edge]] = {}

    # ------------------------------------------------------------------ memo
    @contextmanager
    def fixed(self) -> Iterator[None]:
        """Within the block no layer changes, so per-layer facts (channel counts, coupling,
        pruning functions) are computed once per layer and side instead of once per visit."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def _memoized(self, key: tuple, compute: Callable[..., Any], *args: Any) -> Any:
        """``compute(*args)``, kept under ``key`` within :meth:`fixed`."""
        memo = self._memo
        if memo is None:
            return compute(*args)
        if key in memo:
            return memo[key]
        value = memo[key] = compute(*args)
        return value

    # ------------------------------------------------------------------ per-layer facts
    def coupled(self, node: Node) -> bool:
        """Whether pruning one side of the layer prunes the other (BatchNorm, depthwise
        convolutions, bare parameters)."""
        if node.type == OpType.PARAMETER:
            return True
        return self._memoized((node, "coupled"), _coupled_layer, node)

    def channel_count(self, node: Node, side: Side, dim: int | None = None) -> int | None:
        """Channels of the layer on ``side`` (of a bare parameter: its size along ``dim`` or its
        pruning dim); None for a virtual op or a side the layer does not have."""
        return self._memoized((node, side, dim), self._count_channels, node, side, dim)

    def _count_channels(self, node: Node, side: Side, dim: int | None) -> int | None:
        if node.type == OpType.PARAMETER:
            dim = node.pruning_dim if node.pruning_dim is not None else dim
            return node.module.shape[dim] if dim is not None else None
        if node.type.is_virtual:
            return None
        pruner: LayerPruner = node.pruner  # type: ignore[assignment]  # every module node has one
        return pruner.out_channels(node.module) if side == "out" else pruner.in_channels(node.module)

    def function(self, node: Node, side: Side, dim: int | None = None) -> Callable:
        """The pruning function of the layer's ``side`` (a name-only one for a virtual op)."""
        return self._memoized((node, side, dim, "fn"), self._pruning_function, node, side, dim)

    def _pruning_function(self, node: Node, side: Side, dim: int | None) -> Callable:
        if node.type == OpType.PARAMETER:
            out_fn, in_fn = self.param_functions(
                node, node.pruning_dim if node.pruning_dim is not None else dim
            )
        elif node.type.is_virtual:
            return virtual_function(node.type)
        else:
            out_fn, in_fn = get_pruning_functions(node.pruner)  # type: ignore[arg-type]  # a module node
            if self.dw_mult(node):
                out_fn, in_fn = prune_depthwise_conv_out_channels, prune_depthwise_conv_in_channels
        return out_fn if side == "out" else in_fn

    def dw_mult(self, node: Node) -> int:
        """:func:`depthwise_mult`, once per layer within :meth:`fixed`."""
        return self._memoized((node, "dw"), depthwise_mult, node)

    def param_functions(self, node: Node, dim: int | None) -> tuple[PruningFunction, PruningFunction]:
        """The (out, in) pruning functions of a bare parameter along ``dim``, made once."""
        key = (id(node), dim)
        fns = self._param_fns.get(key)
        if fns is None:
            pruner = ParameterPruner(dim)
            fns = (
                ParameterPruningFunction(pruner, "out", "prune_parameter_out_channels"),
                ParameterPruningFunction(pruner, "in", "prune_parameter_in_channels"),
            )
            self._param_fns[key] = fns
        return fns

    def pruner(self, node: Node) -> LayerPruner:
        """The layer pruner of a module node (a bare parameter's own :class:`ParameterPruner`)."""
        if node.type == OpType.PARAMETER:
            return self.param_functions(node, node.pruning_dim)[0].pruner
        return _pruner_of(node)

    def channel_dim(
        self, node: Node, side: Side, shape: tuple[int, ...], param_dims: dict[Node, int]
    ) -> int | None:
        """The dimension of a tensor of shape ``shape`` on the layer's ``side`` that holds its
        channels (None when it cannot be told). ``param_dims`` holds the dimensions found so far
        for bare parameters without a given one."""
        nd = len(shape)
        t = node.type
        if t in _CONV_TYPES:
            return 1 if nd == len(node.module.kernel_size) + 2 else 0
        if t in _NORM_TYPES:
            return 1 if nd >= 2 else 0
        if t == OpType.PARAMETER:
            dim = node.pruning_dim if node.pruning_dim is not None else param_dims.get(node)
            return dim % nd if dim is not None else None
        size = self.channel_count(node, side, param_dims.get(node))
        if t == OpType.LN and "channel_dims" in node.attrs:
            d = node.attrs["channel_dims"][side]
            return d if d < nd and shape[d] == size else None
        if t == OpType.LN and getattr(node.module, "data_format", None) == "channels_first" and nd > 1:
            return 1
        if t == OpType.CUSTOMIZED or (t == OpType.LN and size is not None and shape[-1] != size):
            # Unknown layout (or a channels-first LayerNorm that permutes inside): the dimension
            # with the channel count, preferring the channels-first and channels-last positions.
            for d in [1, nd - 1, *range(nd)]:
                if 0 <= d < nd and shape[d] == size:
                    return d
            return None
        return nd - 1

    # ------------------------------------------------------------------ structure facts
    def tied(self, node: Node, side: Side) -> list[NodeSide]:
        """Module sides that prune the same parameter along the same dimension as ``(node, side)``
        (a weight shared by two modules, e.g. an embedding tied to the output layer): their
        channels are the same channels."""
        if self._tied_sides is None:
            self._tied_sides = self._find_tied_sides()
        return self._tied_sides.get((node, side), [])

    def _find_tied_sides(self) -> dict[NodeSide, list[NodeSide]]:
        tied: dict[NodeSide, list[NodeSide]] = {}
        assert self.model is not None, "the graph is not built"
        ids = [id(p) for _, p in self.model.named_parameters(remove_duplicate=False)]
        if len(ids) == len(set(ids)):
            return tied  # no parameter is used twice
        owners: dict[int, set[int]] = {}
        modules = [n for n in self.nodes if n.is_module and n.type != OpType.PARAMETER]
        for n in modules:
            for p in n.module.parameters():
                owners.setdefault(id(p), set()).add(id(n))
        shared = {pid for pid, o in owners.items() if len(o) > 1}
        users: dict[tuple[int, int], list[NodeSide]] = {}
        for n in modules:
            if not any(id(p) in shared for p in n.module.parameters()):
                continue
            for sd in ("out", "in"):
                for p, dim in param_dims(n, sd):
                    users.setdefault((id(p), dim), []).append((n, sd))
        for sides in users.values():
            if len({id(n) for n, _ in sides}) > 1:
                for n, sd in sides:
                    tied.setdefault((n, sd), []).extend((o, osd) for o, osd in sides if o is not n)
        return tied

    def head_reshape_groups(self) -> list[list[Edge]]:
        """Outputs of the reshapes that one module runs to split channels into heads of one size
        (its queries, keys and values), per module and head size, where there are several."""
        if self._head_reshapes is None:
            by_owner: dict[tuple[int, int], list[Edge]] = {}
            for node in self.nodes:
                if node.type == OpType.RESHAPE and node.owner is not None and head_split_shape(node):
                    for e in node.out_edges:
                        by_owner.setdefault((id(node.owner), e.shape[-1]), []).append(e)
            self._head_reshapes = [edges for edges in by_owner.values() if len(edges) > 1]
            self._head_reshape_of = {id(e): edges for edges in self._head_reshapes for e in edges}
        return self._head_reshapes

    def head_reshape_index(self) -> dict[int, list[Edge]]:
        """``id(edge)`` -> the group of :meth:`head_reshape_groups` holding that edge."""
        self.head_reshape_groups()
        return self._head_reshape_of


# ---------------------------------------------------------------------------------------------
# Facts without memo
# ---------------------------------------------------------------------------------------------


def side_of(fn: Callable) -> Side:
    """The side a pruning function prunes (``out`` for the name-only functions of virtual ops)."""
    return getattr(fn, "side", "out")


def param_dim(fn: Callable) -> int | None:
    """The dimension a bare parameter's pruning function prunes along; None for other functions."""
    pruner = getattr(fn, "pruner", None)
    return pruner.dim if isinstance(pruner, ParameterPruner) else None


def depthwise_mult(node: Node) -> int:
    """Output channels per input channel of a depthwise convolution (0 if it is not one now:
    pruning a depthwise convolution down to one channel leaves an ordinary convolution)."""
    m = node.module
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels:
        return m.out_channels // m.in_channels
    return 0


def head_split_shape(node: Node) -> bool:
    """Whether a reshape splits the last dimension into (heads, head size), possibly after
    leading factors such as the 3 of a fused (q, k, v, heads, head size) projection."""
    src, out = node.attrs["in_shapes"][0], node.attrs["out_shapes"][0]
    if src is None or len(out) < len(src) + 1:
        return False
    lead = len(src) - 1
    return (
        out[-2] > 1
        and out[-1] > 1
        and math.prod(out[lead:]) == src[-1]
        and tuple(src[:-1]) == tuple(out[:lead])
    )


def param_dims(node: Node, side: Side) -> list[tuple[nn.Parameter, int]]:
    """(parameter, dimension) pairs a module side prunes, when a channel is a slice along one
    dimension (read from the pruner's parameter views)."""
    try:
        views = _pruner_of(node).param_views(node.module, side)
    except (ValueError, NotImplementedError, AttributeError):
        return []
    out = []
    for name, view in views:
        p = node.module if name == "" else node.module.get_parameter(name)
        if p.dim() == 0:
            continue
        index = torch.arange(p.numel()).view(p.shape)
        flat = view(index)
        for d in range(p.dim()):
            coord = (flat // index.stride(d)) % p.shape[d]
            if flat.shape[0] == p.shape[d] and bool((coord == torch.arange(p.shape[d])[:, None]).all()):
                out.append((p, d))
                break
    return out


def _pruner_of(node: Node) -> LayerPruner:
    """The layer pruner the tracer gave a module node (every module node has one)."""
    pruner = node.pruner
    assert pruner is not None, f"{node.name} has no layer pruner"
    return pruner


def _coupled_layer(node: Node) -> bool:
    return bool(node.pruner.coupled(node.module))  # type: ignore[union-attr]  # a module node


class VirtualFunction:
    """Name-only pruning function of a virtual op (it owns no parameters)."""

    side = "out"

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __call__(self, module: Any, idxs: Sequence[int]) -> Any:
        return module

    def __repr__(self) -> str:
        return self.__name__


_VIRTUAL: dict[OpType, VirtualFunction] = {}


def virtual_function(op_type: OpType) -> VirtualFunction:
    """The one name-only pruning function of a virtual op type."""
    fn = _VIRTUAL.get(op_type)
    if fn is None:
        fn = _VIRTUAL[op_type] = VirtualFunction(f"prune_{op_type.name.lower()}")
    return fn


__all__ = [
    "LayerFacts",
    "NodeSide",
    "VirtualFunction",
    "depthwise_mult",
    "head_split_shape",
    "param_dim",
    "param_dims",
    "side_of",
    "virtual_function",
]
