"""Repeated layers: the node-for-node correspondence between two parts of the graph.

A transformer or a ResNet stage repeats one block many times, and the closure of a layer in
block k explores the same neighbourhood, op for op, as the closure of the same layer in block 0.
When that neighbourhood matches exactly, the group of block k is the group of block 0 with
every node and tensor replaced by its counterpart, and the search need not run again.

:func:`correspondence` walks the explored nodes of a finished closure and the graph around
another root in lockstep (same input position, same output position, same reader order) and
compares everything a closure reads: each explored node (through a caller-given test) and the
shapes, positions and output flags of all their tensors. Any difference means no match, and the
caller runs the search. Nodes next to the explored region are paired but not compared: the
closure never read them, so it would not read their counterparts either.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from .node import Edge, Node


@dataclass
class Match:
    """Counterparts of the explored nodes and of every tensor they touch."""

    nodes: dict[Node, Node]
    edges: dict[Edge, Edge]


def correspondence(
    explored: Collection[Node], root: Node, other_root: Node, same: Callable[[Node, Node], bool]
) -> Match | None:
    """Pair ``explored`` (a connected region containing ``root``) with the region around
    ``other_root``; None unless the two are identical for a closure."""
    pairing = _Pairing(explored, root, other_root)
    stack = pairing.stack
    nodes = pairing.nodes
    while stack:
        a = stack.pop()
        b = nodes[a]
        if not same(a, b) or len(a.in_edges) != len(b.in_edges) or len(a.out_edges) != len(b.out_edges):
            return None
        for ea, eb in (*zip(a.in_edges, b.in_edges), *zip(a.out_edges, b.out_edges)):
            if ea is None or eb is None:
                if ea is not eb:
                    return None
                continue
            if not pairing.pair_edges(ea, eb):
                return None
    if any(n not in nodes for n in explored):
        return None
    return Match(nodes, pairing.edges)


class _Pairing:
    """The state of one :func:`correspondence` walk: the pairs found so far, the counterparts
    already taken, and the explored nodes whose neighbourhoods are still to compare."""

    __slots__ = ("explored", "nodes", "taken", "edges", "stack")

    def __init__(self, explored: Collection[Node], root: Node, other_root: Node) -> None:
        self.explored = explored
        self.nodes: dict[Node, Node] = {root: other_root}
        self.taken = {id(other_root)}
        self.edges: dict[Edge, Edge] = {}
        self.stack = [root]

    def pair_edges(self, ea: Edge, eb: Edge) -> bool:
        """Pair two tensors and the nodes at their ends; False on any difference."""
        known = self.edges.get(ea)
        if known is not None:
            return known is eb
        if (
            ea.src_pos != eb.src_pos
            or ea.shape != eb.shape
            or ea.is_output != eb.is_output
            or len(ea.dsts) != len(eb.dsts)
        ):
            return False
        self.edges[ea] = eb
        if not self.pair_nodes(ea.src, eb.src):
            return False
        for (x, px), (y, py) in zip(ea.dsts, eb.dsts):  # noqa: SIM110 - no generator per tensor here
            if px != py or not self.pair_nodes(x, y):
                return False
        return True

    def pair_nodes(self, x: Node, y: Node) -> bool:
        """Pair ``x`` with ``y`` (queueing ``x`` when explored); False if either is paired
        otherwise."""
        paired = self.nodes.get(x)
        if paired is not None:
            return paired is y
        if id(y) in self.taken:
            return False
        self.nodes[x] = y
        self.taken.add(id(y))
        if x in self.explored:
            self.stack.append(x)
        return True


def freeze(value: Any) -> Any:
    """A hashable, comparable copy of recorded op attributes (numbers, shapes, nested lists and
    dicts, index tensors)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), tuple(value.flatten().tolist()))
    if isinstance(value, (list, tuple)):
        if all(type(v) is int for v in value):  # a shape: the common case
            return tuple(value)
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    return value
