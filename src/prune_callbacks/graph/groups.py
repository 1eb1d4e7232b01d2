"""Group enumeration: every coupled set of channels of a model exactly once, for scoring.

:class:`GroupEnumerator` walks the layers in model order. Each layer that can be a root (a module
of the root types, or a bare matrix used as the right operand of a product) and whose output
channels no earlier group covers fully gets a full-index group: a closure search
(:mod:`.closure`), scored per head for attention projections (:meth:`GroupEnumerator.head_group`),
or a copy of the group of the same layer in an earlier repeated block when everything that
search read has an identical counterpart (:meth:`GroupEnumerator.copy_group`, with
:mod:`.repeats`). Groups whose root is contained in a larger later group are dropped at the end.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from ..layers import ParameterPruner
from ..layers.base import Side
from . import repeats
from .attributes import attribute_updates_for
from .closure import ClosureSearch, OutputBarrier
from .dependency import Group, GroupGraph, GroupItem
from .facts import LayerFacts, head_split_shape, param_dim, side_of
from .index_mapping import Barrier, RootMap
from .node import Edge, Node
from .ops import OpType
from .rules import MATMUL_ROLES

#: Identity of a prunable channel set: ``(id(node), side)``, or ``(id(node), "dim<d>")`` for a
#: bare parameter's dimension.
CoverKey = tuple[int, str]

_BLOCK_NUMBER = re.compile(r"\.\d+(?=\.|$)")

#: Ops a short walk from a layer's output crosses to find a head split (see
#: :meth:`GroupEnumerator.head_split`).
_HEAD_WALK_TYPES = (OpType.ELEMENTWISE, OpType.SPLIT, OpType.RESHAPE, OpType.PERMUTE, OpType.MATMUL)


def block_pattern(name: str) -> str:
    """A layer name with its block numbers blanked: ``layers.3.attn.q`` -> ``layers.#.attn.q``."""
    return _BLOCK_NUMBER.sub(".#", name)


def cover_key(node: Node, side: str, dim: int | None = None) -> CoverKey:
    """Identity of a prunable channel set: a module side, or a bare parameter's dimension."""
    if node.type == OpType.PARAMETER:
        return (id(node), f"dim{dim}")
    return (id(node), side)


def item_key(item: GroupItem) -> CoverKey:
    """The :func:`cover_key` of the channel set a group item prunes."""
    handler = item.dep.handler
    pruner = getattr(handler, "pruner", None)
    dim = pruner.dim % item.dep.target.module.dim() if isinstance(pruner, ParameterPruner) else None
    return cover_key(item.dep.target, getattr(handler, "side", "out"), dim)


class GroupEnumerator:
    """One enumeration of all groups (see the module docstring).

    Fields: ``facts`` (per-layer facts, fixed while enumerating), ``owner`` (the graph the groups
    belong to), ``ignored`` (ids of modules whose output channels must not change),
    ``root_types`` (module types that root groups), ``order`` (model order of modules and
    parameters), ``head_block_hints`` (block size found per repeated attention layer; kept by
    the graph across enumerations), ``templates`` (per layer pattern, the last group searched:
    what the next block's layer may copy) and ``signatures`` (cache of :meth:`signature`).
    """

    __slots__ = (
        "facts",
        "owner",
        "ignored",
        "root_types",
        "order",
        "head_block_hints",
        "templates",
        "signatures",
    )

    def __init__(
        self,
        facts: LayerFacts,
        owner: GroupGraph,
        ignored: set[int],
        root_types: tuple[type, ...],
        order: dict[Any, int],
        head_block_hints: dict[tuple[str, int, int], int],
    ) -> None:
        self.facts = facts
        self.owner = owner
        self.ignored = ignored
        self.root_types = root_types
        self.order = order
        self.head_block_hints = head_block_hints
        self.templates: dict[tuple, Group] = {}
        self.signatures: dict[Node, tuple] = {}

    def all_groups(self) -> list[Group]:
        """Every coupled set of channels once, as full-index groups, in model order. Layers that
        a barrier blocks are named in one warning; groups reaching a model output are skipped."""
        covered: set[CoverKey] = set()
        groups: list[tuple[Group, set[CoverKey]]] = []
        blocked: list[str] = []
        for node in self.ordered_module_nodes():
            root = self.root_candidate(node, covered)
            if root is None:
                continue
            n, root_dim = root
            head_dim = self.head_split(node, n)
            key = (block_pattern(node.name), n, head_dim, root_dim)
            template = self.templates.get(key)
            group = self.copy_group(template, node) if template is not None else None
            if group is None:
                try:
                    group = self.search(node, n, head_dim, root_dim)
                except OutputBarrier:
                    continue
                except Barrier as b:
                    blocked.append(f"{node.name}: {b}")
                    continue
                self.templates[key] = group
            full = self.fully_covered(group)
            covered |= full
            groups.append((group, full))
        if blocked:
            warnings.warn(
                "prune_callbacks: these layers cannot be pruned and are skipped:\n  " + "\n  ".join(blocked),
                stacklevel=2,
            )
        return _drop_contained(groups)

    def root_candidate(self, node: Node, covered: set[CoverKey]) -> tuple[int, int | None] | None:
        """``(output channels, root dimension)`` when ``node`` roots a group not yet covered (the
        dimension only for a bare parameter), else None."""
        module = node.module
        if id(module) in self.ignored:
            return None
        root_dim = None
        if node.type == OpType.PARAMETER:
            if not self.matmul_weight(node):
                return None
            root_dim = (node.pruning_dim if node.pruning_dim is not None else 1) % module.dim()
        elif not isinstance(module, self.root_types):
            return None
        if cover_key(node, "out", root_dim) in covered:
            return None
        n = self.facts.channel_count(node, "out", root_dim)
        if not n or n < 2:
            return None
        return n, root_dim

    def search(self, node: Node, n: int, head_dim: int | None, root_dim: int | None) -> Group:
        """The full-index group of ``node``'s ``n`` output channels found by a closure search."""
        if head_dim:
            return self.head_group(node, n, head_dim, root_dim)
        return self.closure(node, list(range(n)), list(range(n)), root_dim)

    def closure(self, node: Node, idxs: list[int], roots: list[int], root_dim: int | None) -> Group:
        """A closure search from ``node``'s outputs with this enumeration's ignored layers."""
        return ClosureSearch(self.facts, self.owner, node, "out", self.ignored, root_dim).run(idxs, roots)

    # ------------------------------------------------------------------ repeated blocks
    def copy_group(self, template: Group, root: Node) -> Group | None:
        """The full group of ``root`` as a copy of ``template`` (the same layer of another block),
        or None unless everything the template's closure read has an identical counterpart."""
        facts = self.facts
        # Cheap differences first (DenseNet layers grow, and each one's output has fewer readers
        # than the last): everything checked here, the correspondence would check too.
        first = template.root.dep.target
        if any(facts.channel_count(first, sd) != facts.channel_count(root, sd) for sd in ("in", "out")):
            return None
        if len(first.out_edges) != len(root.out_edges) or any(
            len(a.dsts) != len(b.dsts) or a.shape != b.shape for a, b in zip(first.out_edges, root.out_edges)
        ):
            return None
        maps: dict[Edge, RootMap] = template.edge_maps
        explored = {it.dep.target for it in template} | {it.dep.source for it in template}
        for e in maps:
            explored.add(e.src)
            explored.update(d for d, _ in e.dsts)
        match = repeats.correspondence(explored, first, root, self.same_signature)
        if match is None or not self.same_head_reshapes(explored, match):
            return None
        items = []
        for it in template:
            dep = it.dep
            src, tgt = match.nodes[dep.source], match.nodes[dep.target]
            trigger = facts.function(src, side_of(dep.trigger), param_dim(dep.trigger))
            handler = facts.function(tgt, side_of(dep.handler), param_dim(dep.handler))
            copied = dep.retargeted(trigger, handler, src, tgt)
            if it.channels is not None:  # the template's channel set (never changed): shared
                items.append(GroupItem(copied, channels=it.channels))
            else:
                items.append(GroupItem(copied, list(it.idxs), list(it.root_idxs)))
        edge_maps = {match.edges[e]: m for e, m in maps.items()}
        return Group(items, self.owner, attribute_updates_for(edge_maps), edge_maps, template.head_blocks)

    def same_signature(self, a: Node, b: Node) -> bool:
        """Whether a closure reads the same from ``a`` as from ``b`` (cached :meth:`signature`)."""
        return self.signature(a) == self.signature(b)

    def signature(self, node: Node) -> tuple:
        """Everything a closure reads from ``node`` itself, as a comparable value: op, recorded
        shapes and arguments, and for layers their kind, sizes, parameters and ignored status.
        (A layer with a tied parameter gets a unique signature: it is never copied.)"""
        sig = self.signatures.get(node)
        if sig is None:
            sig = self.signatures[node] = self._signature(node)
        return sig

    def _signature(self, node: Node) -> tuple:
        # (size expressions name this block's own tensors; the step checks them, not the group)
        attrs = {k: v for k, v in node.attrs.items() if k != "size_exprs"}
        sig: tuple = (node.type, node.pruning_dim, repeats.freeze(attrs))
        if not node.is_module:
            return sig
        module = node.module
        facts = self.facts
        if node.type == OpType.PARAMETER:
            return (*sig, id(module) in self.ignored, tuple(module.shape), module.dtype)
        if facts.tied(node, "in") or facts.tied(node, "out"):
            return (*sig, id(node))
        return (
            *sig,
            id(module) in self.ignored,
            type(module),
            id(node.pruner),
            tuple((k, tuple(p.shape)) for k, p in module.named_parameters()),
            facts.channel_count(node, "out"),
            facts.channel_count(node, "in"),
            facts.coupled(node),
            facts.dw_mult(node),
            getattr(module, "data_format", None),
        )

    def same_head_reshapes(self, explored: set[Node], match: repeats.Match) -> bool:
        """Head-splitting reshapes are coupled per module (see
        :meth:`~.closure.ClosureSearch.couple_head_sizes`): the explored ones must have
        counterparts coupled in the same way."""
        by_edge = self.facts.head_reshape_index()
        for node in explored:
            for e in node.out_edges if node.type == OpType.RESHAPE else ():
                edges = by_edge.get(id(e))
                if edges is None:
                    if id(match.edges[e]) in by_edge:
                        return False
                    continue
                if any(x not in match.edges for x in edges):
                    return False
                mine = by_edge.get(id(match.edges[e]))
                if mine is None or {id(match.edges[x]) for x in edges} != {id(x) for x in mine}:
                    return False
        return True

    # ------------------------------------------------------------------ roots and heads
    def matmul_weight(self, node: Node) -> bool:
        """A bare 2-D parameter used as the right operand of a matrix product is a linear layer
        written by hand (e.g. Hugging Face's ``Conv1D``): a root, pruned along its last dim."""
        if node.module.dim() != 2:
            return False
        for e in node.out_edges:
            for dst, pos in e.dsts:
                roles = MATMUL_ROLES.get(dst.attrs.get("op", ""))
                if dst.type == OpType.MATMUL and roles and pos == roles[1]:
                    return node.pruning_dim in (None, 1, -1)
        return False

    def head_split(self, node: Node, n: int) -> int | None:
        """Head size when the layer's output channels are reshaped into (heads, head size) on the
        way to an attention product (found by a short walk over the ops after the layer)."""
        # (edge, whether a slice or split was passed): the split dimension must be the layer's
        # channels, or a piece of them after a slice (a transposed token dimension is not)
        frontier = [(e, False) for e in node.out_edges]
        seen: set[int] = set()
        for _ in range(8):
            nxt: list[tuple[Edge, bool]] = []
            for e, cut in frontier:
                for dst, _pos in e.dsts:
                    if id(dst) in seen or not dst.type.is_virtual:
                        continue
                    seen.add(id(dst))
                    if dst.type == OpType.RESHAPE and head_split_shape(dst):
                        width = dst.attrs["in_shapes"][0][-1]
                        if width == n or (cut and width < n):
                            return dst.attrs["out_shapes"][0][-1]
                    piece = dst.type == OpType.SPLIT or dst.attrs.get("op") == "Slice"
                    if dst.type in _HEAD_WALK_TYPES or piece:
                        nxt.extend((o, cut or piece) for o in dst.out_edges)
            frontier = nxt
        return None

    def head_group(self, node: Node, n: int, head_dim: int, root_dim: int | None = None) -> Group:
        """Full-index group of an attention projection, scored and pruned by heads: each root
        channel's id is its block's first channel. Under grouped-query attention a block is a
        key/value head with its query heads (the smallest block size that works)."""
        error: Barrier | None = None
        # Repeated layers (same name up to layer numbers) have the same block size: try the one
        # found for an earlier layer first.
        key = (block_pattern(node.name), n, head_dim)
        sizes = [b for b in range(head_dim, n + 1, head_dim) if n % b == 0 and b != n]
        hint = self.head_block_hints.get(key)
        if hint in sizes:
            sizes.remove(hint)
            sizes.insert(0, hint)
        for b in sizes:
            try:
                group = self.closure(node, list(range(n)), [c - c % b for c in range(n)], root_dim)
            except OutputBarrier:
                raise
            except Barrier as exc:
                error = error or exc
                continue
            # heads found to be one unit (a fused q/k/v projection) share one root id
            group.head_blocks = len(set(group.root.root_idxs))
            self.head_block_hints[key] = b
            return group
        raise error or Barrier("no head structure could be pruned")

    # ------------------------------------------------------------------ coverage
    def fully_covered(self, group: Group) -> set[CoverKey]:
        """The channel sets ``group`` prunes whole (a coupled layer's other side with them)."""
        facts = self.facts
        full = set()
        for item in group:
            node = item.dep.target
            handler = item.dep.handler
            side: Side = getattr(handler, "side", "out")  # per item: side_of and param_dim inlined
            pruner = getattr(handler, "pruner", None)
            n = facts.channel_count(node, side, pruner.dim if isinstance(pruner, ParameterPruner) else None)
            if n is not None and item.count >= n:
                full.add(item_key(item))
                if facts.coupled(node) and node.type != OpType.PARAMETER:
                    full.add((id(node), "in" if side == "out" else "out"))
        return full

    def ordered_module_nodes(self) -> list[Node]:
        """The module and parameter nodes in model order."""
        order = self.order
        nodes = [n for n in self.facts.nodes if n.is_module]
        return sorted(nodes, key=lambda n: order.get(n.module, len(order)))


def _drop_contained(groups: list[tuple[Group, set[CoverKey]]]) -> list[Group]:
    """The groups, less each whose root is fully contained in a larger later group (found
    through an index of the covered channel sets, not a pass over all pairs)."""
    root_keys = [item_key(g.root) for g, _ in groups]
    holders: dict[CoverKey, list[int]] = {}
    for i, (_g, full) in enumerate(groups):
        for key in full:
            holders.setdefault(key, []).append(i)
    return [
        g
        for i, (g, full) in enumerate(groups)
        if not any(j != i and root_keys[j] not in full for j in holders.get(root_keys[i], ()))
    ]


__all__ = ["CoverKey", "GroupEnumerator", "block_pattern", "cover_key", "item_key"]
