"""The contract every per-op propagation rule fulfils, and the helpers all families share.

A rule says how a map of pruned channels (a :class:`~..index_mapping.RootMap`) crosses one kind
of virtual op: from an input to the outputs (``forward``), from an output to the inputs
(``backward``), and whether going forward and straight back adds nothing (``round_trip_exact``,
which lets the closure skip that step). Rules hold no per-node state: one instance serves every
node of its op family, chosen by op name in :data:`~.RULES`.
"""

from __future__ import annotations

from ..index_mapping import Barrier, RootMap
from ..node import Node

#: A map on one of a node's tensors: ``("in", input position, map)`` or ``("out", output number, map)``.
Tagged = tuple[str, int, RootMap]
#: A map on one input (by position) or one output (by output number) of a node.
Placed = tuple[int, RootMap]


def norm_dim(dim: int, ndim: int) -> int:
    """A possibly negative dimension index as a non-negative one (0 for a 0-d tensor)."""
    return dim % ndim if ndim else 0


def unsupported(node: Node) -> Barrier:
    """The barrier raised for an op no rule knows how to cross."""
    return Barrier(f"pruning through {node.attrs['op']} ({node.type.name.lower()}) is not supported")


class OpRule:
    """Propagation through one family of ops. The base class is the rule of an op nobody
    taught the graph to cross: every direction is a barrier and no round trip is exact.

    Families with a one-to-one input/output layout override :meth:`forward` and
    :meth:`backward`; those that couple inputs with each other (matrix products, fused
    attention) override :meth:`from_input` and :meth:`from_output` instead.
    """

    __slots__ = ()

    def from_input(self, node: Node, pos: int, m: RootMap) -> list[Tagged]:
        """Maps implied on the node's other tensors by map ``m`` on its input ``pos``."""
        return [("out", k, r) for k, r in self.forward(node, pos, m)]

    def from_output(self, node: Node, nr: int, m: RootMap) -> list[Tagged]:
        """Maps implied on the node's other tensors by map ``m`` on its output ``nr``."""
        return [("in", i, r) for i, r in self.backward(node, nr, m)]

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        """Maps on the node's outputs (by output number) given map ``m`` on its input ``pos``."""
        raise unsupported(node)

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        """Maps on the node's inputs (by input position) given map ``m`` on its output ``nr``."""
        raise unsupported(node)

    def round_trip_exact(self, node: Node, pos: int, m: RootMap) -> bool:
        """Whether mapping ``m`` from input ``pos`` to the outputs and back gives nothing beyond
        ``m`` on input ``pos`` and nothing on the other inputs (then the closure skips the way
        back)."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
