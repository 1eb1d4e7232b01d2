"""Graph elements: one :class:`Node` per pruning-relevant module, parameter or autograd op,
one :class:`Edge` per tensor flowing between them, and one :class:`Dependency` per pruning
dependency between two nodes (a node lists the dependencies that start at it, so the two live
in one module)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .ops import OpType

if TYPE_CHECKING:
    from ..layers import LayerPruner

_MAPPING_TYPES = {OpType.CONCAT, OpType.SPLIT, OpType.RESHAPE, OpType.PERMUTE, OpType.SLICE, OpType.EXPAND}


@dataclass(eq=False, slots=True)
class Edge:
    """A tensor produced by ``src`` (its output ``src_pos``) and read by ``dsts``."""

    src: Node
    src_pos: int
    shape: tuple[int, ...]
    dsts: list[tuple[Node, int]] = field(default_factory=list)
    is_output: bool = False

    def __repr__(self) -> str:
        return (
            f"<Edge {self.src.name}[{self.src_pos}] {list(self.shape)} -> {[d.name for d, _ in self.dsts]}>"
        )


class Node:
    """A module, a bare parameter or a virtual op in the dependency graph.

    ``inputs``/``outputs`` are the computational neighbours; ``dependencies`` the pruning
    dependencies that start here. ``in_edges``/``out_edges`` hold the tensors (with shapes)
    that connect it, which is what index mapping works on. ``plain_name`` is the module or
    parameter name (the op name for a virtual op, ``input`` for the input).
    """

    __slots__ = (
        "module",
        "grad_fn",
        "plain_name",
        "type",
        "pruner",
        "inputs",
        "outputs",
        "in_edges",
        "out_edges",
        "dependencies",
        "pruning_dim",
        "enable_index_mapping",
        "owner",
        "owner_name",
        "attrs",
    )

    def __init__(
        self, module: Any, grad_fn: Any, name: str, op_type: OpType, pruner: LayerPruner | None = None
    ) -> None:
        self.module = module
        self.grad_fn = grad_fn
        self.plain_name = name
        self.type = op_type
        self.pruner = pruner
        self.inputs: list[Node] = []
        self.outputs: list[Node] = []
        self.in_edges: list[Edge | None] = []
        self.out_edges: list[Edge] = []
        self.dependencies: list[Dependency] = []
        self.pruning_dim: int | None = -1
        self.enable_index_mapping = op_type in _MAPPING_TYPES
        self.owner: nn.Module | None = None
        self.owner_name: str | None = None
        self.attrs: dict[str, Any] = {}

    @property
    def name(self) -> str:
        """Module (or parameter) name followed by its kind, e.g. ``layer1.0.conv1 (Conv2d)``."""
        kind = type(self.module).__name__ if not self.type.is_virtual else self.type.name.lower()
        if self.type == OpType.PARAMETER:
            kind = f"Parameter{list(self.module.shape)}"
        return f"{self.plain_name} ({kind})"

    @property
    def is_module(self) -> bool:
        """True for nodes that own parameters (modules and bare parameters)."""
        return not self.type.is_virtual

    def add_input(self, node: Node) -> None:
        if node not in self.inputs:
            self.inputs.append(node)

    def add_output(self, node: Node) -> None:
        if node not in self.outputs:
            self.outputs.append(node)

    def details(self) -> str:
        """Multi-line description: inputs, outputs, dependencies and metadata."""
        lines = [
            "-" * 60,
            f"Node: {self.name}",
            f"  type: {self.type.name}   pruning_dim: {self.pruning_dim}   "
            f"index mapping: {self.enable_index_mapping}",
        ]
        if self.owner_name is not None:
            lines.append(f"  inside module: {self.owner_name or '<root>'}")
        lines.append("  inputs:")
        lines += [
            f"    [{i}] {e.src.name} {list(e.shape)}" if e else f"    [{i}] <constant>"
            for i, e in enumerate(self.in_edges)
        ]
        lines.append("  outputs:")
        lines += [f"    {n.name}" for n in self.outputs]
        lines.append("  dependencies:")
        lines += [f"    {d}" for d in self.dependencies]
        lines.append("-" * 60)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Node: {self.name}>"


IndexMapping = tuple[Callable[[Sequence[int]], list[int]], Callable[[Sequence[int]], list[int]]]


class Dependency:
    """Edge of the dependency graph: ``trigger`` on ``source`` implies ``handler`` on ``target``.

    ``index_mapping`` is a pair of callables: the first maps indices of the group's root to this
    dependency's target indices, the second maps target indices back to the root. It may be given
    as the target's ``{channel: root channel}`` dict instead; the pair is then made on first use
    (a group has one dependency per layer and most are never asked).
    """

    __slots__ = ("trigger", "handler", "source", "target", "_index_mapping")

    def __init__(
        self,
        trigger: Callable,
        handler: Callable,
        source: Node,
        target: Node,
        index_mapping: IndexMapping | Mapping[int, int] | None = None,
    ) -> None:
        self.trigger = trigger
        self.handler = handler
        self.source = source
        self.target = target
        self._index_mapping: IndexMapping | Mapping[int, int] = (
            index_mapping if index_mapping is not None else (_identity, _identity)
        )

    @property
    def index_mapping(self) -> IndexMapping:
        m = self._index_mapping
        if isinstance(m, Mapping):
            m = self._index_mapping = (_RootToTarget(m), _TargetToRoot(m))
        return m

    def retargeted(self, trigger: Callable, handler: Callable, source: Node, target: Node) -> Dependency:
        """The same index mapping between other ends: the counterpart of this dependency in a
        repeated block (the channel-to-root record is shared, not copied)."""
        return Dependency(trigger, handler, source, target, self._index_mapping)

    def __call__(self, idxs: Sequence[int] | torch.Tensor) -> Any:
        """Apply the handler to the target module (``idxs``: a list, or a long tensor for the
        pruning functions that take one, see :func:`~prune_callbacks.layers.takes_index_tensors`)."""
        return self.handler(self.target.module, idxs)

    def is_triggered_by(self, pruning_fn: Callable) -> bool:
        return self.trigger is pruning_fn

    def __repr__(self) -> str:
        return f"[{self.source.name}] {fn_name(self.trigger)} => [{self.target.name}] {fn_name(self.handler)}"


def fn_name(fn: Callable) -> str:
    """Name of a pruning function (its ``__name__``, else its repr)."""
    return getattr(fn, "__name__", repr(fn))


def _identity(idxs: Sequence[int]) -> list[int]:
    return list(idxs)


class _RootToTarget:
    """Index mapping of a dependency: root indices -> the target's indices."""

    __slots__ = ("rec",)

    def __init__(self, rec: Mapping[int, int]) -> None:
        self.rec = rec

    def __call__(self, idxs: Sequence[int]) -> list[int]:
        wanted = set(idxs)
        return sorted(c for c, r in self.rec.items() if r in wanted)


class _TargetToRoot(_RootToTarget):
    """Index mapping of a dependency: the target's indices -> root indices."""

    __slots__ = ()

    def __call__(self, idxs: Sequence[int]) -> list[int]:
        rec = self.rec
        return sorted({rec[i] for i in idxs if i in rec})
