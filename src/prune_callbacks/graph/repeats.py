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
    nodes: dict[Node, Node] = {root: other_root}
    taken = {id(other_root)}
    edges: dict[Edge, Edge] = {}
    stack = [root]
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
            known = edges.get(ea)
            if known is not None:
                if known is not eb:
                    return None
                continue
            if (
                ea.src_pos != eb.src_pos
                or ea.shape != eb.shape
                or ea.is_output != eb.is_output
                or len(ea.dsts) != len(eb.dsts)
            ):
                return None
            edges[ea] = eb
            ends = [(ea.src, eb.src)]
            for (x, px), (y, py) in zip(ea.dsts, eb.dsts):
                if px != py:
                    return None
                ends.append((x, y))
            for x, y in ends:
                paired = nodes.get(x)
                if paired is None:
                    if id(y) in taken:
                        return None
                    nodes[x] = y
                    taken.add(id(y))
                    if x in explored:
                        stack.append(x)
                elif paired is not y:
                    return None
    if any(n not in nodes for n in explored):
        return None
    return Match(nodes, edges)


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
