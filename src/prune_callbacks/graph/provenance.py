"""Size provenance: sizes computed from tensor shapes in Python must stay true after a prune.

The trace hands the model :class:`~.tracing.SizeInt` values for shape reads, so a reshape
called as ``qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)`` records that its
last size is ``C // 4`` with ``C`` read from dim 2 of ``x``. A group that changes ``x``'s width
changes that size too; :func:`derived_size_problem` evaluates the expression with the pruned
sizes and compares it with what the op's output would then be. When they disagree the group is
refused before anything is cut, with the op, its module and the expression named (instead of
a model that fails on its next forward).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .attributes import pruned_shape
from .dependency import Group
from .node import Edge, Node
from .tracing import SizeExpr, evaluate_size, size_sources


def size_readers(nodes: list[Node]) -> dict[Edge, list[Node]]:
    """Per tensor (edge), the ops called with a size computed from one of its dims."""
    readers: dict[Edge, list[Node]] = {}
    for node in nodes:
        for _k, expr in node.attrs.get("size_exprs", ()):
            for edge, _dim in size_sources(expr):
                if edge is not None and node not in readers.setdefault(edge, []):
                    readers[edge].append(node)
    return readers


def derived_size_problem(group: Group, readers: Mapping[Edge, list[Node]]) -> str | None:
    """Why pruning ``group`` (all of it) would make a size computed from a shape wrong, or
    None. Ops of a module whose attributes the prune updates are left to the verifying forward
    (the trace saw those attributes as constants)."""
    maps = group.edge_maps
    # A module whose attributes the prune updates (a head count) computes its sizes from them
    # too, with values the trace saw as constants: the verifying forward judges those.
    updated = {id(obj) for obj, attr, _old, _new in group.attribute_updates if not attr.startswith("<")}
    nodes: dict[int, Node] = {}
    for edge in maps:
        for node in readers.get(edge, ()):
            if id(node.owner) not in updated:
                nodes[id(node)] = node
    if not nodes:
        return None
    shapes: dict[int, tuple[int, ...]] = {}

    def new_shape(edge: Edge) -> tuple[int, ...]:
        got = shapes.get(id(edge))
        if got is None:
            m = maps.get(edge)
            got = shapes[id(edge)] = edge.shape if m is None else pruned_shape(edge.shape, m)
        return got

    for node in nodes.values():
        problem = _node_problem(node, new_shape)
        if problem is not None:
            return problem
    return None


def _node_problem(node: Node, new_shape: Callable[[Edge], tuple[int, ...]]) -> str | None:
    """The first size argument of ``node`` whose new value disagrees with its output's new shape."""
    out = next((e for e in node.out_edges if e.src_pos == 0), None)
    if out is None:
        return None
    want = new_shape(out)
    sizes = node.attrs.get("size_args") or []
    if len(sizes) != len(want):
        return None  # sizes and dims do not line up one to one (-1 and the like)
    for k, expr in node.attrs["size_exprs"]:
        old = evaluate_size(expr, lambda e, d: e.shape[d] if e is not None else None)
        new = evaluate_size(expr, lambda e, d: new_shape(e)[d] if e is not None else None)
        if new is None or new == old or want[k] == new:
            continue
        where = f" in {node.owner_name}" if node.owner_name else ""
        return (
            f"{node.attrs.get('call') or node.attrs.get('op')}{where} is called with size {describe(expr)} "
            f"= {old} at position {k}: pruning these channels changes that size to {new} but "
            f"makes dim {k} of its result {want[k]}"
        )
    return None


_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%"}


def describe(expr: SizeExpr) -> str:
    """A size expression as text: ``(inp(...).shape[2] // 4)``."""
    kind = expr[0]
    if kind == "const":
        return str(expr[1])
    if kind == "src":
        edge = expr[1]
        return f"{edge.src.plain_name}(...).shape[{expr[2]}]" if edge is not None else f"shape[{expr[2]}]"
    return f"({describe(expr[1])} {_SYMBOLS[kind]} {describe(expr[2])})"


__all__ = ["derived_size_problem", "describe", "size_readers"]
