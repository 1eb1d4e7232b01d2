"""Subset groups: the part of a full-index group that removes chosen channels, and the merged
group that removes the choices of a whole pruning step at once.

A full-index group (from :meth:`DependencyGraph.get_all_groups`) lists every channel of every
layer coupled to its root. Removing some root channels removes the entries of those channels:
the subset group is made by filtering the full group's flat index (:func:`.importance.group_index`),
without searching the graph again. All full groups of a step index the model as it is before the
step, so the subsets of all groups can be combined into one group and removed in one atomic prune.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from ..graph import index_mapping as im
from ..graph.apply import describe
from ..graph.dependency import Group, GroupItem, PruningError, VerificationError
from ..graph.dependency_graph import DependencyGraph
from ..graph.index_mapping import RootMap
from .importance import group_index

__all__ = ["Plan", "SubsetGroups", "Unprunable", "root_channels"]

#: What one step removes: ``(full group, positions of its root channels to remove)`` per group.
Plan = list[tuple[Group, list[int]]]

#: Items of a subset group: ``(full item, its channels to remove, their root ids)`` (long tensors).
Selected = list[tuple[GroupItem, Tensor, Tensor]]


class Unprunable:
    """Stands for a subset group the graph refused: it explains itself as unprunable."""

    __slots__ = ("attribute_updates", "items", "reason")

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.items: list = []
        self.attribute_updates: list = []

    def __iter__(self) -> Iterator:
        return iter(())


def _warn_refused(group: Group, reason: str) -> None:
    warnings.warn(
        f"prune_callbacks: refusing {describe(group)}: after pruning it, {reason}. It stays "
        "unpruned in this and later steps.",
        stacklevel=6,  # the caller of Pruner.step()
    )


def root_channels(group: Group, positions: list[int]) -> list[int]:
    """Channels of the root layer that belong to the root ids at ``positions``."""
    ids = group_index(group).ids
    chosen = {ids[p] for p in positions}
    root = group.root
    return [c for c, r in zip(root.idxs, root.root_idxs) if r in chosen]


def position_tensor(positions: list[int] | Tensor) -> Tensor:
    """Root positions as a long tensor."""
    if isinstance(positions, Tensor):
        return positions.long()
    return torch.as_tensor(positions, dtype=torch.long)


def value_lut(group: Group, positions: list[int] | Tensor) -> Tensor:
    """Boolean table over root channel ids + 1 (index 0: kept entries of a map)."""
    ids = group_index(group).id_tensor
    top = (int(ids.max()) if len(ids) else 0) + 2
    lut = torch.zeros(top, dtype=torch.bool)
    lut[ids[position_tensor(positions)] + 1] = True
    return lut


def selected_items(group: Group, positions: list[int] | Tensor) -> Selected:
    """Items of the subset group for root positions ``positions``: (full item, idxs, root ids),
    as tensors cut from the group's flat index (no Python int per channel)."""
    gi = group_index(group)
    lut = torch.zeros(gi.n + 1, dtype=torch.bool)
    lut[position_tensor(positions) + 1] = True
    at = lut[gi.pos + 1].nonzero().flatten()  # ascending: item by item
    idx = gi.idx[at]
    pos = gi.pos[at]
    roots = pos if gi.identity else gi.id_tensor[pos]
    ends = torch.searchsorted(at, torch.as_tensor(gi.offsets, dtype=torch.long)).tolist()
    return [(item, idx[a:b], roots[a:b]) for item, a, b in zip(group.items, ends, ends[1:]) if b > a]


def _item(full: GroupItem, idxs: Tensor, roots: Tensor) -> GroupItem:
    """A subset item of ``full`` (tensors when ``full`` has no repeated channel, else lists)."""
    if full.distinct:
        return GroupItem.of_tensors(full.dep, idxs, roots)
    return GroupItem(full.dep, idxs.tolist(), roots.tolist())


class SubsetGroups:
    """Builds subset groups of the full groups of one step, and prunes a step's plan.

    ``fast=True`` filters the full groups (see the module docstring) and removes a plan in one
    merged prune; ``fast=False`` asks the graph for every subset and prunes group by group
    (slower; exact even for a full group whose root channels are coupled to each other).

    Per full group it remembers, until :meth:`forget`, the items last selected (reused by the
    merged prune) and which of its tensors size attributes are read from.
    """

    __slots__ = ("_attribute_edges", "_selected", "fast", "graph")

    def __init__(self, graph: DependencyGraph, fast: bool = True) -> None:
        self.graph = graph
        self.fast = fast
        self._selected: dict[int, tuple[Group, list[int], Tensor, Selected]] = {}
        self._attribute_edges: dict[int, tuple[Group, list]] = {}

    def forget(self) -> None:
        """Drop what was remembered about the full groups (they are stale after a prune)."""
        self._selected.clear()
        self._attribute_edges.clear()

    # ------------------------------------------------------------------ one group
    def subset(
        self, group: Group, positions: list[int], as_tensor: Tensor | None = None
    ) -> Group | Unprunable:
        """The subset group of ``group`` that removes root positions ``positions`` (``as_tensor``:
        the same positions as a long tensor, when the caller has them).

        Edge maps are only built when the group changes attributes (split sizes, head counts:
        needed to check them), and only for the tensors those are read from.
        """
        if not self.fast:
            root = group.root.dep
            try:
                return self.graph.get_pruning_group(
                    root.target.module, root.handler, root_channels(group, positions)
                )
            except ValueError as e:
                return Unprunable(str(e))
        pos_t = position_tensor(positions if as_tensor is None else as_tensor)
        selected = selected_items(group, pos_t)
        self._selected[id(group)] = (group, positions, pos_t, selected)  # reused by the merged prune
        items = [_item(it, idxs, roots) for it, idxs, roots in selected]
        maps: dict[Any, RootMap] = {}
        attrs: list = []
        if group.attribute_updates:
            lut = value_lut(group, pos_t)
            edge_maps = group.edge_maps
            for edge in self._edges_of(group):
                m = edge_maps[edge]
                keep = lut[(m.t + 1).clamp(min=0, max=len(lut) - 1)]
                if bool(keep.any()):
                    maps[edge] = RootMap(torch.where(keep, m.t, torch.full_like(m.t, im.KEPT)), m.explicit)
            attrs = self.graph.attribute_updates_for(maps)
        return Group(items, self.graph, attrs, maps)

    def _edges_of(self, group: Group) -> list:
        """The tensors of ``group`` whose maps size attributes are read from (computed once)."""
        entry = self._attribute_edges.get(id(group))
        if entry is None or entry[0] is not group:
            entry = self._attribute_edges[id(group)] = (group, self.graph.attribute_edges(group.edge_maps))
        return entry[1]

    # ------------------------------------------------------------------ a whole step
    def merged(self, plan: Plan) -> Group:
        """One group removing everything of ``plan``: per layer and side the union of the channel
        indices, per tensor the union of the pruned positions."""
        items: dict[tuple[int, str], tuple[GroupItem, Selected]] = {}
        position_tensors: dict[int, Tensor] = {}
        for group, positions in plan:
            pos_t, selected = self._selection(group, positions)
            position_tensors[id(group)] = pos_t
            for entry in selected:
                it = entry[0]
                key = (id(it.dep.target), getattr(it.dep.handler, "__name__", repr(it.dep.handler)))
                known = items.get(key)
                if known is None:
                    items[key] = (it, [entry])
                else:
                    known[1].append(entry)
        merged_items = []
        for it, entries in items.values():
            if all(e[0].distinct for e in entries):
                parts = [e[1] for e in entries]
                idxs = parts[0] if len(parts) == 1 else torch.unique(torch.cat(parts), sorted=True)
                merged_items.append(GroupItem.of_tensors(it.dep, idxs, idxs))
            else:
                lists = [e[1].tolist() for e in entries]
                union = lists[0] if len(lists) == 1 else sorted(set(chain.from_iterable(lists)))
                merged_items.append(GroupItem(it.dep, union, union))
        maps = self.merged_edge_maps(plan, position_tensors)
        attribute_maps = {e: maps[e] for e in self.graph.attribute_edges(maps)}
        return Group(merged_items, self.graph, self.graph.attribute_updates_for(attribute_maps), maps)

    def _selection(self, group: Group, positions: list[int]) -> tuple[Tensor, Selected]:
        """``positions`` as a tensor and the items selected for them (remembered by
        :meth:`subset`, else computed)."""
        cached = self._selected.get(id(group))
        if cached is not None and cached[0] is group and (cached[1] is positions or cached[1] == positions):
            return cached[2], cached[3]
        pos_t = position_tensor(positions)
        return pos_t, selected_items(group, pos_t)

    @staticmethod
    def merged_edge_maps(plan: Plan, position_tensors: dict[int, Tensor] | None = None) -> dict[Any, RootMap]:
        """Per tensor (edge), the positions pruned by any group of ``plan``, as maps with -1 for
        kept and 0 for pruned entries (only the sign of a map matters once it is merged).
        ``position_tensors``: the plan's positions as tensors, by id of the group, where known.

        Full-group map entries are -1 (kept) or root ids of that group, so ``t + 1`` indexes a
        table of the group's chosen root ids."""
        pruned: dict[Any, Tensor] = {}
        known = position_tensors or {}
        for group, positions in plan:
            edge_maps = group.edge_maps
            if not edge_maps:
                continue
            lut = value_lut(group, known.get(id(group), positions))
            masks: dict[int, Tensor] = {}
            for edge, m in edge_maps.items():
                mask = masks.get(id(m.t))
                if mask is None:
                    mask = masks[id(m.t)] = lut[m.t + 1]
                old = pruned.get(edge)
                pruned[edge] = mask if old is None else (old | mask)
        # Edges of one group often share a mask tensor: convert each tensor once, so that the
        # maps share it too (and per-map work such as new shapes can be done once).
        converted: dict[int, RootMap | None] = {}
        result = {}
        for edge, mask in pruned.items():
            key = id(mask)
            if key not in converted:
                converted[key] = (
                    RootMap(mask.long() - 1, tuple(s > 1 for s in mask.shape)) if bool(mask.any()) else None
                )
            merged_map = converted[key]
            if merged_map is not None:
                result[edge] = merged_map
        return result

    def prune(self, plan: Plan) -> list[tuple[Group, str]]:
        """Remove the channels of ``plan``: in one merged prune when fast, else group by group.

        Every prune is verified by the graph (the model must still run on its example inputs).
        When the merged prune fails verification, the culprit groups are isolated by bisection
        (:meth:`isolate`) and the rest is pruned; when it is refused or a pruning function fails,
        the groups are pruned one at a time (nothing was changed). A group that cannot be pruned
        is skipped with a warning. Returns the skipped full groups with the reason."""
        refused: list[tuple[Group, str]] = []
        if self.fast:
            try:
                merged = self.merged(plan)
                broken = self.graph.size_problem(merged) is not None  # found before cutting
                if not broken:
                    merged.prune()
                    return refused
            except VerificationError:
                broken = True
            except (ValueError, PruningError):
                broken = False  # refused or failed, nothing changed: one group at a time
            if broken:
                refused = self.isolate(plan)
                bad = {id(g) for g, _ in refused}
                plan = [(g, p) for g, p in plan if id(g) not in bad]
                for g, reason in refused:
                    _warn_refused(g, reason)
                try:
                    if plan:
                        self.merged(plan).prune()
                    return refused
                except (ValueError, PruningError):
                    pass  # nothing was changed: one group at a time
        for group, positions in plan:
            root = group.root.dep
            try:
                sub = self.graph.get_pruning_group(
                    root.target.module, root.handler, root_channels(group, positions)
                )
                sub.prune()
            except VerificationError as e:
                _warn_refused(group, e.problem)
                refused.append((group, e.problem))
            except (ValueError, PruningError) as e:
                warnings.warn(f"prune_callbacks: skipping the group of {root.target.name}: {e}", stacklevel=4)
        return refused

    def isolate(self, plan: Plan) -> list[tuple[Group, str]]:
        """The entries of ``plan`` whose prune breaks the model, with what the verifying forward
        said: bisection over the plan (a half whose merged prune runs holds no culprit), then, for
        failures that only show in combination, one entry at a time. The model is unchanged."""
        found: list[tuple[Group, str]] = []

        def search(entries: Plan) -> None:
            problem = self.graph.probe(self.merged(entries))
            if problem is None:
                return
            if len(entries) == 1:
                found.append((entries[0][0], problem))
                return
            mid = len(entries) // 2
            search(entries[:mid])
            search(entries[mid:])

        search(plan)
        bad = {id(g) for g, _ in found}
        rest = [e for e in plan if id(e[0]) not in bad]
        if rest and self.graph.probe(self.merged(rest)) is not None:
            accepted: Plan = []
            for entry in rest:  # only together do they fail: keep what runs, in plan order
                problem = self.graph.probe(self.merged([*accepted, entry]))
                if problem is None:
                    accepted.append(entry)
                else:
                    found.append((entry[0], problem))
        return found

    def graph_groups(self, plan: Plan) -> Iterator[Group]:
        """The pruning group of every entry of ``plan``, searched in the graph as it is when the
        entry is reached (for interactive steps); a group the graph refuses is skipped with a
        warning."""
        for group, positions in plan:
            root = group.root.dep
            try:
                sub = self.graph.get_pruning_group(
                    root.target.module, root.handler, root_channels(group, positions)
                )
            except ValueError as e:
                warnings.warn(f"prune_callbacks: skipping the group of {root.target.name}: {e}", stacklevel=3)
                continue
            yield sub
