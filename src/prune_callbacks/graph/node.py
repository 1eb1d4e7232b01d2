"""Graph vertices: one :class:`Node` per pruning-relevant module, parameter or autograd op,
and one :class:`Edge` per tensor flowing between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from .ops import OpType

if TYPE_CHECKING:
    from .dependency import Dependency
    from ..layers import LayerPruner

_MAPPING_TYPES = {OpType.CONCAT, OpType.SPLIT, OpType.RESHAPE, OpType.PERMUTE, OpType.SLICE, OpType.EXPAND}


@dataclass(eq=False)
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
    that connect it, which is what index mapping works on.
    """

    def __init__(
        self, module: Any, grad_fn: Any, name: str, op_type: OpType, pruner: LayerPruner | None = None
    ) -> None:
        self.module = module
        self.grad_fn = grad_fn
        self._name = name
        self.type = op_type
        self.pruner = pruner
        self.inputs: list[Node] = []
        self.outputs: list[Node] = []
        self.in_edges: list[Edge | None] = []
        self.out_edges: list[Edge] = []
        self.dependencies: list[Dependency] = []
        self.pruning_dim: int = -1
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
        return f"{self._name} ({kind})"

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
