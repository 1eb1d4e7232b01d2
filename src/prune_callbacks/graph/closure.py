"""The closure search: every (layer, channels) pair that must go with a chosen set of channels.

:class:`ClosureSearch` is a breadth-first search over tensors. A channel set on a layer puts a
:class:`~.index_mapping.RootMap` on each of the layer's tensors (:meth:`ClosureSearch.at_module`);
a changed map on a tensor is queued (:meth:`ClosureSearch.visit`) and carried through the ops
that read or made it by the rules of :mod:`.propagation` and into the layers at its ends, which
read channels back from it (:meth:`ClosureSearch.drain`). Each root channel carries an id; in a
full-index search ids found on one element are joined (:class:`~.index_mapping.RootUnion`), so
channels that cannot be told apart end up with one id. Besides tensors, the search follows
weights tied between modules and the head size shared by one module's query, key and value
reshapes. The records become a :class:`~.dependency.Group`.

Channel sets move as *channel sets* (1-D maps over a layer's channels, see
:func:`~.index_mapping.channel_set`): a layer's record is one, kept as a few runs in the common
case, so the cost of a search does not grow with the width of the layers; the channel lists of
the group's items are written once, at the end.

The state of one search lives in the fields of one :class:`ClosureSearch` (made per search).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext

import torch

from ..layers.base import Side
from . import index_mapping as im
from . import propagation
from .attributes import attribute_updates_for
from .dependency import Dependency, Group, GroupGraph, GroupItem
from .facts import LayerFacts, NodeSide
from .index_mapping import Barrier, RootMap
from .node import Edge, Node
from .ops import OpType

#: A queued tensor: (edge, the group item that caused the change, the module the change came
#: from: it has already put its channels on all its tensors, so it is not asked again).
QueueEntry = tuple[Edge, NodeSide, "Node | None"]


class OutputBarrier(Barrier):
    """The channels reach a model output, whose shape pruning must keep."""


class ClosureSearch:
    """One closure search from ``root``'s ``side`` (see the module docstring).

    Fields: ``facts`` (per-layer facts), ``owner`` (the graph the group will belong to),
    ``ignored`` (ids of modules whose output channels must not change), ``edge_maps`` (the map
    of every tensor reached), ``records`` (per module side, its channel set: a 1-D
    :class:`~.index_mapping.RootMap` of the root id of every channel), ``sources``
    (per module side, the module side that first reached it), ``param_dims`` (the channel
    dimension of bare parameters, given for the root or found on the way), ``queue`` (changed
    tensors not yet carried on) and ``union`` (root ids joined so far; None for a subset search,
    whose channels all share one id).
    """

    __slots__ = (
        "facts",
        "owner",
        "root",
        "side",
        "ignored",
        "edge_maps",
        "records",
        "sources",
        "param_dims",
        "queue",
        "union",
    )

    def __init__(
        self,
        facts: LayerFacts,
        owner: GroupGraph,
        root: Node,
        side: Side,
        ignored: set[int],
        root_dim: int | None = None,
    ) -> None:
        self.facts = facts
        self.owner = owner
        self.root = root
        self.side = side
        self.ignored = ignored
        self.edge_maps: dict[Edge, RootMap] = {}
        self.records: dict[NodeSide, RootMap] = {}
        self.sources: dict[NodeSide, NodeSide] = {}
        self.param_dims: dict[Node, int] = {root: root_dim} if root_dim is not None else {}
        self.queue: deque[QueueEntry] = deque()
        self.union: im.RootUnion | None = None

    def run(self, idxs: list[int], roots: list[int]) -> Group:
        """The group of channels ``idxs`` of the root with root ids ``roots`` (one id per channel
        for a full-index group, one id for all for a subset). Raises :class:`Barrier` (or
        :class:`OutputBarrier`) when the channels cannot be pruned."""
        # Full-index closures give every root channel its own id; ids found to share an element
        # are joined (see im.RootUnion). A subset closure has one id, so nothing to join.
        union = self.union = im.RootUnion() if len(set(roots)) > 1 else None
        start = (self.root, self.side)
        n = self.facts.channel_count(self.root, self.side, self.param_dims.get(self.root))
        if n is None:
            n = max(idxs, default=0) + 1
        with im.joining_roots(union) if union is not None else nullcontext():
            self.at_module(self.root, self.side, im.channel_map(1, 0, n, idxs, roots), start)
            self.drain(start)
        if union is not None and union.parent:
            records = self.records
            for key, rec in records.items():
                records[key] = RootMap(union.canonical(rec.t), rec.explicit)
            edge_maps = self.edge_maps
            for edge, m in edge_maps.items():
                edge_maps[edge] = RootMap(union.canonical(m.t), m.explicit)
        return self.make_group()

    # ------------------------------------------------------------------ the search
    def visit(self, edge: Edge, m: RootMap, origin: NodeSide, via: Node | None = None) -> None:
        """Merge ``m`` into the map of ``edge``; queue the edge if that changed it."""
        merged, changed = im.merge(self.edge_maps.get(edge), m)
        if changed:
            if edge.is_output:
                raise OutputBarrier(
                    f"it would change the shape of the model's output (produced by {edge.src.name})"
                )
            self.edge_maps[edge] = merged
            self.queue.append((edge, origin, via))

    def at_module(
        self,
        node: Node,
        s: Side,
        chans: RootMap,
        origin: NodeSide,
        from_edge: Edge | None = None,
    ) -> None:
        """Record the channel set ``chans`` (a 1-D map of root ids, see
        :func:`~.index_mapping.channel_set`) on the module's side ``s`` and put the record, when
        it grew, on the module's other tensors and tied modules."""
        if not chans.any():
            return
        facts = self.facts
        coupled = facts.coupled(node)
        rec_side: Side = "out" if coupled else s
        if coupled and facts.dw_mult(node):
            from_edge = None  # whole blocks may add channels to the edge they came from
            chans, rec_side = self.depthwise_to_in(node, s, chans)
        if id(node.module) in self.ignored and (rec_side == "out" or coupled):
            raise Barrier(f"{node.name} is ignored, so its output channels cannot change")
        here = (node, rec_side)
        record = self._record(here, chans)
        if record is None:
            return
        self.sources.setdefault(here, origin)
        for sd in ("in", "out") if coupled else (s,):
            for other, other_side in facts.tied(node, sd):
                self.at_module(other, other_side, record, here)
            for e in node.out_edges if sd == "out" else node.in_edges:
                if e is None or e is from_edge:
                    continue
                m = self.module_map(node, sd, e, record, rec_side)
                if m is not None:
                    self.visit(e, m, here, node)

    def _record(self, key: NodeSide, chans: RootMap) -> RootMap | None:
        """Add a channel set to the record of a module side: the whole record when something was
        new, None otherwise (in a full-index search, ids met on a channel seen before are
        joined by :func:`~.index_mapping.merge`)."""
        old = self.records.get(key)
        if old is not None and old.shape != chans.shape:  # a bare parameter's size found late
            size = max(old.shape[0], chans.shape[0])
            old, chans = im.resize_set(old, size), im.resize_set(chans, size)
        merged, changed = im.merge(old, chans)
        if not changed:
            return None
        self.records[key] = merged
        return merged

    def drain(self, origin0: NodeSide) -> None:
        """Run the queue until no tensor map changes (then couple head sizes, which may queue
        more): carry each changed map back to the op or module that made the tensor and on to
        every reader."""
        queue, edge_maps = self.queue, self.edge_maps
        while queue or self.couple_head_sizes(origin0):
            edge, origin, via = queue.popleft()
            m = edge_maps[edge]
            src = edge.src
            if src is via:
                pass
            elif src.is_module:
                got = self.read_module(src, "out", edge, m)
                if got is not None:
                    self.at_module(src, "out", got, origin, edge)
            else:
                for kind, i, r in _through(propagation.from_output, src, edge.src_pos, m):
                    for e in _edges_at(src, kind, i):
                        self.visit(e, r, origin)
            for dst, pos in edge.dsts:
                if dst is via:
                    continue
                if dst.is_module:
                    got = self.read_module(dst, "in", edge, m)
                    if got is not None:
                        self.at_module(dst, "in", got, origin, edge)
                else:
                    # Going back through this op from an output it gave a map adds nothing then,
                    # so that step is skipped (as for a module's own tensors).
                    back = dst if propagation.round_trip_exact(dst, pos, m) else None
                    for kind, i, r in _through(propagation.from_input, dst, pos, m):
                        for e in _edges_at(dst, kind, i):
                            self.visit(e, r, origin, back if kind == "out" else None)

    def couple_head_sizes(self, origin: NodeSide) -> bool:
        """Reshapes in one module that split channels into (heads, head size) with the same head
        size read it from the same place (one ``head_dim`` for queries, keys and values): when
        offsets inside the heads are removed from one of them, remove them from all of them.
        An offset counts as removed when one root id covers it in every head (whole heads with
        their own ids are not offsets). Returns whether anything new was queued."""
        queued = False
        edge_maps, union = self.edge_maps, self.union
        for edges in self.facts.head_reshape_groups():
            if not any(e in edge_maps for e in edges):
                continue
            cols: dict[int, int] = {}
            for e in edges:
                m = edge_maps.get(e)
                if m is None or m.shape[-1] == 1:
                    continue
                t = m.t.reshape(-1, m.shape[-1]) if m.t.dim() > 1 else m.t[None]
                if union is not None:
                    t = union.canonical(t)
                in_all = ((t >= 0) & (t == t[:1])).all(0).nonzero().flatten().tolist()
                for d in in_all:
                    cols.setdefault(d, int(t[0, d]))
            if not cols:
                continue
            for e in edges:
                size = e.shape[-1]
                flat = torch.full((size,), im.KEPT, dtype=torch.long)
                flat[list(cols)] = torch.tensor(list(cols.values()))
                m = RootMap(
                    flat.view((1,) * (len(e.shape) - 1) + (size,)), (False,) * (len(e.shape) - 1) + (True,)
                )
                before = len(edge_maps)
                old = edge_maps.get(e)
                self.visit(e, m, origin)
                queued = queued or len(edge_maps) != before or edge_maps.get(e) is not old
        return queued

    # ------------------------------------------------------------------ modules and tensors
    def module_map(
        self, node: Node, side: Side, edge: Edge, record: RootMap, rec_side: Side
    ) -> RootMap | None:
        """Channel map on one of a module's tensors for the recorded channel set."""
        facts = self.facts
        dim = facts.channel_dim(node, side, edge.shape, self.param_dims)
        if dim is None:
            return None
        size = edge.shape[dim]
        mult = facts.dw_mult(node)
        n = facts.channel_count(node, side, self.param_dims.get(node))
        expand = bool(mult) and side == "out" and rec_side == "in"
        if (n is None or size == n) and record.shape[0] == size and not expand:
            return im.spread(record, len(edge.shape), dim)  # the common case: no list per channel
        chans, roots = im.channel_lists(record)
        if expand:
            chans, roots = _expand_blocks(chans, roots, mult)
        if n is None or size == n:
            return im.channel_map(len(edge.shape), dim, size, chans, roots)
        if node.type == OpType.LSTM and side == "out" and size % n == 0:
            k = size // n
            return im.channel_map(
                len(edge.shape), dim, size, [c + j * n for j in range(k) for c in chans], roots * k
            )
        return None

    def read_module(self, node: Node, side: Side, edge: Edge, m: RootMap) -> RootMap | None:
        """Channel set of a module implied by a map on one of its tensors."""
        param_dims = self.param_dims
        if node.type == OpType.PARAMETER and node.pruning_dim is None and node not in param_dims:
            sq = im.squeeze_constant(m)
            dims = [d for d in range(sq.ndim) if sq.shape[d] != 1]
            if len(dims) != 1:
                raise Barrier(f"cannot tell which dimension of {node.name} holds the channels")
            param_dims[node] = dims[0]
        dim = self.facts.channel_dim(node, side, edge.shape, param_dims)
        if dim is None:
            return None
        size = edge.shape[dim]
        n = self.facts.channel_count(node, side) if node.type != OpType.PARAMETER else size
        if n is not None and size != n:
            if node.type == OpType.LSTM and side == "out" and size % n == 0:
                return self._fold_directions(node, m, dim, size, n)
            return None
        return im.channel_set(m, dim, size)

    def _fold_directions(self, node: Node, m: RootMap, dim: int, size: int, n: int) -> RootMap:
        """Channels of an LSTM from a map on its output, which holds both directions."""
        chans, roots = im.channels_at(m, dim, size)
        folded: dict[int, int] = {}
        union = self.union
        for c, r in zip(chans, roots):
            first = folded.setdefault(c % n, r)
            if union is not None and first != r:
                union.union(first, r)
        if len(chans) != len(folded) * (size // n):
            raise Barrier(f"{node.name}: forward and backward directions pruned differently")
        return im.channel_map(1, 0, n, list(folded), list(folded.values()))

    def depthwise_to_in(self, node: Node, side: Side, chans: RootMap) -> tuple[RootMap, Side]:
        """A depthwise convolution's channel set as input channels (its record side)."""
        mult = node.module.out_channels // node.module.in_channels
        if side == "in" or mult == 1:
            return chans, "in" if mult > 1 else "out"
        # An output channel of a depthwise convolution goes with its input channel, and so with
        # that input's whole block of outputs: the closure grows to whole blocks.
        blocks: dict[int, int] = {}
        union = self.union
        for c, r in zip(*im.channel_lists(chans)):
            first = blocks.setdefault(c // mult, r)
            if union is not None and first != r:
                union.union(first, r)
        return im.channel_map(1, 0, node.module.in_channels, list(blocks), list(blocks.values())), "in"

    def make_group(self) -> Group:
        """The group of the records, the root's record first."""
        facts, records, sources, param_dims = self.facts, self.records, self.sources, self.param_dims
        root = self.root
        items: list[GroupItem] = []
        root_key = next(k for k in records if k[0] is root)
        keys = [root_key] + [k for k in records if k != root_key]
        for node, s in keys:
            channels = records[(node, s)]
            src_node, src_side = sources[(node, s)]
            fn = facts.function(node, s, param_dims.get(node))
            trigger = facts.function(src_node, src_side, param_dims.get(src_node))
            dep = Dependency(trigger, fn, src_node, node, ChannelRecord(channels))
            items.append(GroupItem(dep, channels=channels))
        return Group(items, self.owner, attribute_updates_for(self.edge_maps), self.edge_maps)


class ChannelRecord(Mapping):
    """A layer's channel set as a dependency's ``{channel: root id}`` index mapping, made on
    first use (most dependencies are never asked, and a wide layer's dict is thousands of
    entries)."""

    __slots__ = ("_channels", "_dict")

    def __init__(self, channels: RootMap) -> None:
        self._channels = channels
        self._dict: dict[int, int] | None = None

    def _get(self) -> dict[int, int]:
        if self._dict is None:
            self._dict = dict(zip(*im.channel_lists(self._channels)))
        return self._dict

    def __getitem__(self, c: int) -> int:
        return self._get()[c]

    def __iter__(self) -> Iterator[int]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _through(rule: Callable, node: Node, i: int, m: RootMap) -> list[tuple[str, int, RootMap]]:
    """Apply a propagation rule; a barrier names the op and the module that ran it."""
    try:
        return rule(node, i, m)
    except Barrier as b:
        where = f" in {node.owner_name}" if node.owner_name else ""
        raise type(b)(f"{b} (at {node.attrs.get('op', node.type.name)}{where})") from None


def _edges_at(node: Node, kind: str, i: int) -> list[Edge]:
    """The node's input edge at position ``i`` or its output edges with output number ``i``."""
    if kind == "in":
        e = node.in_edges[i]
        return [e] if e is not None else []
    return [e for e in node.out_edges if e.src_pos == i]


def _expand_blocks(chans: list[int], roots: list[int], mult: int) -> tuple[list[int], list[int]]:
    if mult == 1:
        return chans, roots
    return [c * mult + j for c in chans for j in range(mult)], [r for r in roots for _ in range(mult)]


__all__ = ["ChannelRecord", "ClosureSearch", "OutputBarrier", "QueueEntry"]
