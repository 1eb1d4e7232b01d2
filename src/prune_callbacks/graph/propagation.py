"""How a pruned channel set crosses each kind of virtual op (forward: input -> outputs,
backward: output -> inputs). Everything is expressed on :class:`~.index_mapping.RootMap`s, so
concat offsets, split regions, reshapes and permutations are handled by the same torch ops the
model used.

The per-op behaviour lives in the rule registry of :mod:`.rules` (one :class:`~.rules.OpRule`
per op family, registered by op name); the functions here are the graph core's entry points and
dispatch each call to the node's rule with one dictionary lookup.
"""

from __future__ import annotations

from .index_mapping import RootMap
from .node import Node
from .rules import (
    KEPT_T,
    MATMUL_ROLES,
    RULES,
    TYPE_RULES,
    OpRule,
    Placed,
    Tagged,
    register_rule,
    rule_for,
    slice_partition,
)

__all__ = [
    "KEPT_T",
    "MATMUL_ROLES",
    "RULES",
    "TYPE_RULES",
    "OpRule",
    "backward",
    "forward",
    "from_input",
    "from_output",
    "register_rule",
    "round_trip_exact",
    "rule_for",
    "slice_partition",
]


def from_input(node: Node, pos: int, m: RootMap) -> list[Tagged]:
    """Maps implied on the node's other tensors by map ``m`` on its input ``pos``, tagged
    ``("out", output number, map)`` or ``("in", input position, map)``."""
    rule = RULES.get(node.attrs.get("op", ""))
    return (rule if rule is not None else TYPE_RULES[node.type]).from_input(node, pos, m)


def from_output(node: Node, nr: int, m: RootMap) -> list[Tagged]:
    """Like :func:`from_input`, for a map on the node's output ``nr``."""
    rule = RULES.get(node.attrs.get("op", ""))
    return (rule if rule is not None else TYPE_RULES[node.type]).from_output(node, nr, m)


def round_trip_exact(node: Node, pos: int, m: RootMap) -> bool:
    """Whether mapping ``m`` from input ``pos`` to the outputs and back gives nothing beyond
    ``m`` on input ``pos`` and nothing on the other inputs: a one-input elementwise op, a permute,
    or a concat along the dimension that holds the channels (the map comes back to its own
    region only). Not a view: closing heads may grow the map (see ``product_closure``)."""
    rule = RULES.get(node.attrs.get("op", ""))
    return (rule if rule is not None else TYPE_RULES[node.type]).round_trip_exact(node, pos, m)


def forward(node: Node, pos: int, m: RootMap) -> list[Placed]:
    """Maps on the node's outputs (by output number) given map ``m`` on its input ``pos``."""
    return rule_for(node).forward(node, pos, m)


def backward(node: Node, nr: int, m: RootMap) -> list[Placed]:
    """Maps on the node's inputs (by input position) given map ``m`` on its output ``nr``."""
    return rule_for(node).backward(node, nr, m)

