"""Channel selection: how many channels every group loses at a step, and which ones.

**How many** (:class:`ChannelCounts`). Local pruning: each group loses its share, ``ratio *
original channels`` (the ratio of the current step of the schedule). Global pruning: the scores of
every group are ranked together and the lowest channels of the whole model go, as many as
``ratio`` of all original channels. Either way ``max_pruning_ratio`` caps every group (of its
original channels), at least one channel is kept, ``pruning_ratio_dict`` gives groups their own
ratio (pruned locally), attention-head groups lose ``head_pruning_ratio`` of their heads, and with
``round_to`` the channels kept are a multiple of it.

**Isomorphic ranking** (``isomorphic=True``, with global ranking; Fang et al., 2024). Scores of
groups of different structure (an MLP's hidden channels and a residual stream, a ResNet's stage 1
and stage 4) are often on different scales, so one global ranking can empty one kind of block and
leave another whole. Groups are therefore put in *structure classes* (:meth:`ChannelCounts.structure`:
the sequence of layer types, pruned sides and kernel shapes of the group's items, and the group's
original width), channels are ranked only within their class, and every class loses the same
fraction of its original channels: with a ratio target each class reaches the step's ratio; with
a MACs budget (:mod:`.budget`) the classes' candidates are interleaved by the fraction their class
would reach (:meth:`ChannelCounts.global_order`), so every prefix of the order, and so the budget
that meets the MACs target, prunes every class to the same fraction (within one channel).

**Which** (:class:`ChannelSelector`). The lowest-scoring channels. When the result is not a valid
prune (grouped convolutions, equal chunks, ``GroupNorm``/attention divisibility) the choice is
balanced (the same number per convolution group or chunk) or reduced; a group that still cannot be
pruned is skipped with a warning.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..graph.dependency import Group
from ..graph.dependency_graph import DependencyGraph
from .importance import group_index
from .schedule import RatioSchedule, ratio_schedule
from .settings import PruningSettings
from .subsets import Plan, SubsetGroups, Unprunable

__all__ = ["ChannelCounts", "ChannelSelector", "GroupKey", "group_key"]

#: A group by its root: ``(id of the root layer, pruned side)``; stable while the layer lives.
GroupKey = tuple[int, str]

#: Candidates tried per kind (balanced, reduced) before a group is given up.
_TRIES = 6


def group_key(group: Group) -> GroupKey:
    """The :data:`GroupKey` of ``group``."""
    root = group.root.dep
    return (id(root.target.module), getattr(root.handler, "side", "out"))


class ChannelCounts:
    """How many channels every group loses at each step (see the module docstring).

    ``original`` holds the root-channel count every group had before the first step (filled on
    first sight of a group; saved in the pruner's state dict), so that every step's ratio is a
    ratio of the original widths.
    """

    __slots__ = (
        "_ratio_tables",
        "_structures",
        "head_pruning_ratio",
        "isomorphic",
        "max_pruning_ratio",
        "original",
        "per_step_ratio",
        "prune_num_heads",
        "ranks_globally",
        "ratio_by_module",
        "round_to",
        "schedule",
    )

    def __init__(
        self,
        schedule: RatioSchedule,
        *,
        max_pruning_ratio: float,
        round_to: int | None,
        ranks_globally: bool,
        prune_num_heads: bool,
        head_pruning_ratio: float,
        ratio_by_module: Mapping[int, float],
        isomorphic: bool = False,
    ) -> None:
        self.schedule = schedule
        self.isomorphic = isomorphic
        self._structures: dict[GroupKey, tuple] = {}
        self.max_pruning_ratio = max_pruning_ratio
        self.round_to = round_to
        self.ranks_globally = ranks_globally
        self.prune_num_heads = prune_num_heads
        self.head_pruning_ratio = head_pruning_ratio
        self.ratio_by_module = dict(ratio_by_module)
        self.original: dict[GroupKey, int] = {}
        self._ratio_tables: dict[float, list[float]] = {}
        self.per_step_ratio = self.ratios_for(schedule.ratio)

    @classmethod
    def from_settings(cls, settings: PruningSettings, ratio_by_module: Mapping[int, float]) -> ChannelCounts:
        """The counts of a run with ``settings``; ``ratio_by_module`` is ``pruning_ratio_dict``
        resolved to module/parameter ids. Warns when an explicit schedule does not end at an
        explicit ``pruning_ratio`` (the schedule wins)."""
        s = settings
        if isinstance(s.schedule, list):
            if s.pruning_ratio is not None:
                ratio_schedule(s.pruning_ratio, 1, s.schedule)  # warns when it ends elsewhere
            kind: str | tuple[float, ...] = tuple(s.schedule)
        else:
            kind = s.schedule
        return cls(
            RatioSchedule(kind, s.steps, s.ratio),
            max_pruning_ratio=s.max_pruning_ratio,
            round_to=s.round_to,
            ranks_globally=s.ranks_globally,
            prune_num_heads=s.prune_num_heads,
            head_pruning_ratio=s.head_pruning_ratio,
            ratio_by_module=ratio_by_module,
            isomorphic=s.isomorphic,
        )

    # ------------------------------------------------------------------ ratios
    def ratios_for(self, target: float) -> list[float]:
        """Cumulative ratio after each step for a group whose final ratio is ``target``."""
        table = self._ratio_tables.get(target)
        if table is None:
            table = self._ratio_tables[target] = self.schedule.ratios_for(target)
        return table

    def target_ratio(self, module: Any, step: int) -> float:
        """Cumulative ratio that ``module``'s group (None: any group) reaches after ``step``
        (1-based, > 0)."""
        ratio = self.schedule.ratio
        if module is not None and id(module) in self.ratio_by_module:
            ratio = self.ratio_by_module[id(module)]
        return self.ratios_for(ratio)[min(step, self.schedule.steps) - 1]

    # ------------------------------------------------------------------ one group
    def remember(self, group: Group) -> int:
        """The original root-channel count of ``group`` (its current one on first sight)."""
        key = group_key(group)
        n0 = self.original.get(key)
        if n0 is None:
            n0 = self.original[key] = group_index(group).n
        return n0

    def structure(self, group: Group) -> tuple:
        """The structure class of ``group`` for isomorphic ranking: its original root-channel
        count, whether it is scored by heads, and for every item (root first, in the group's
        order) the layer type, the pruned side and the layer's static shape (kernel size, stride,
        padding, dilation and grouping of a convolution; the number of dimensions of a bare
        parameter). Everything in it survives pruning and a resume (the original width is part of
        the pruner's state), so a group keeps its class for the whole run."""
        key = group_key(group)
        sig = self._structures.get(key)
        if sig is None:
            items = tuple(_item_structure(item) for item in group)
            sig = self._structures[key] = (self.remember(group), bool(group.head_blocks), items)
        return sig

    def min_keep(self, n0: int) -> int:
        """Channels a group of ``n0`` original channels keeps at least (``max_pruning_ratio``)."""
        return max(1, math.ceil(n0 * (1.0 - self.max_pruning_ratio) - 1e-9))

    def round_keep(self, keep: int, n_cur: int) -> int:
        """Channels kept after rounding up to a multiple of ``round_to`` (never above ``n_cur``)."""
        r = self.round_to
        if r and r > 1 and keep % r:
            keep = (keep // r + 1) * r
        return min(keep, n_cur)

    def local_count(self, group: Group, n0: int, ratio: float, rounded: bool = True) -> int:
        """Channels ``group`` loses to reach ``ratio`` of its ``n0`` original channels."""
        n_cur = group_index(group).n
        keep = n0 - int(math.floor(n0 * ratio + 0.5))
        keep = max(keep, self.min_keep(n0))
        if rounded:
            keep = self.round_keep(keep, n_cur)
        return max(0, n_cur - keep)

    def override(self, group: Group) -> float | None:
        """The ``pruning_ratio_dict`` ratio of a group whose output layers have one."""
        table = self.ratio_by_module
        if not table:
            return None
        for item in group:
            if getattr(item.dep.handler, "side", "out") == "out" and id(item.dep.target.module) in table:
                return table[id(item.dep.target.module)]
        return None

    def fixed_count(self, group: Group, k: int) -> int | None:
        """Channels to remove at step ``k`` from a group whose count does not come from the
        ranking: attention head groups and groups with a ``pruning_ratio_dict`` entry (None for
        the others)."""
        if group.head_blocks:
            if not self.prune_num_heads or self.head_pruning_ratio <= 0:
                return 0
            # round_to is about channel counts; a head group counts heads, which it leaves alone
            ratio = self.ratios_for(self.head_pruning_ratio)[k]
            return self.local_count(group, self.remember(group), ratio, rounded=False)
        override = self.override(group)
        if override is not None:
            return self.local_count(group, self.remember(group), self.ratios_for(override)[k])
        return None

    # ------------------------------------------------------------------ all groups
    def counts(self, groups: list[Group], scores: list[Tensor | None], k: int) -> list[int]:
        """Channels to remove from each group at step ``k`` (0-based)."""
        counts = [0] * len(groups)
        global_idx: list[int] = []
        ratio = self.per_step_ratio[k]
        for i, (g, s) in enumerate(zip(groups, scores)):
            if s is None:
                continue
            fixed = self.fixed_count(g, k)
            if fixed is not None:
                counts[i] = fixed
            elif self.ranks_globally:
                global_idx.append(i)
            else:
                counts[i] = self.local_count(g, self.remember(g), ratio)
        for part in self.ranking_scopes(groups, global_idx):
            total0 = sum(self.remember(groups[i]) for i in part)
            current = sum(group_index(groups[i]).n for i in part)
            want = current - (total0 - int(math.floor(total0 * ratio + 0.5)))
            ranked = [s for i in part if (s := scores[i]) is not None]
            chosen = self.global_counts([groups[i] for i in part], ranked, want)
            for i, c in zip(part, chosen):
                counts[i] = c
        return counts

    def ranking_scopes(self, groups: list[Group], indices: list[int]) -> list[list[int]]:
        """The sets of groups (positions in ``groups``, from ``indices``) ranked together: all of
        them, or with isomorphic ranking one set per structure class (in order of first
        appearance)."""
        if not indices:
            return []
        if not self.isomorphic:
            return [list(indices)]
        scopes: dict[tuple, list[int]] = {}
        for i in indices:
            scopes.setdefault(self.structure(groups[i]), []).append(i)
        return list(scopes.values())

    def caps(self, groups: list[Group]) -> list[int]:
        """Channels each group may still lose (``max_pruning_ratio``, at least one kept)."""
        return [max(0, group_index(g).n - self.min_keep(self.remember(g))) for g in groups]

    def global_order(self, groups: list[Group], scores: list[Tensor]) -> tuple[list[list[int]], int]:
        """For each group, the positions (in the global ascending order of scores) of its channels
        that may be pruned (its lowest ``cap`` channels); and the number of candidates.

        With isomorphic ranking the order is by structure class instead: within a class by
        score, across classes by the fraction of its original channels the class has lost once
        that candidate goes, so that any number of the first candidates prunes every class to the
        same fraction (within one channel; a class whose candidates run out stops)."""
        caps = self.caps(groups)
        vals, gids = [], []
        for i, (s, cap) in enumerate(zip(scores, caps)):
            if cap <= 0:
                continue
            low = torch.sort(s, stable=True).values[:cap]
            vals.append(low)
            gids.append(torch.full((len(low),), i, dtype=torch.long))
        positions: list[list[int]] = [[] for _ in groups]
        if not vals:
            return positions, 0
        allv, allg = torch.cat(vals), torch.cat(gids)
        keys = self._isomorphic_keys(groups, allv, allg) if self.isomorphic else allv
        order = torch.sort(keys, stable=True).indices
        for pos, gi in enumerate(allg[order].tolist()):
            positions[gi].append(pos)
        return positions, len(order)

    def _isomorphic_keys(self, groups: list[Group], values: Tensor, owners: Tensor) -> Tensor:
        """Sort keys of the candidates (``values``: scores, ``owners``: group positions) for the
        isomorphic order: the ``j``-th lowest candidate of a class (0-based) gets
        ``(channels the class lost so far + j + 1) / channels the class had``."""
        index: dict[tuple, int] = {}
        labels = [index.setdefault(self.structure(g), len(index)) for g in groups]
        cls = torch.tensor(labels, dtype=torch.long)
        total0 = torch.zeros(len(index), dtype=torch.float64)
        current = torch.zeros(len(index), dtype=torch.float64)
        for i, g in enumerate(groups):
            total0[cls[i]] += self.remember(g)
            current[cls[i]] += group_index(g).n
        lost = total0 - current
        cand_cls = cls[owners]
        keys = torch.empty(len(values), dtype=torch.float64)
        for c in range(len(index)):
            members = (cand_cls == c).nonzero().squeeze(1)
            if not len(members):
                continue
            ranked = members[torch.sort(values[members], stable=True).indices]
            steps = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
            keys[ranked] = (lost[c] + steps) / max(float(total0[c]), 1.0)
        return keys

    def budget_counts(self, groups: list[Group], positions: list[list[int]], budget: int) -> list[int]:
        """Channels each group loses when the lowest ``budget`` candidates of the global order
        (``positions`` from :meth:`global_order`) go, rounded per group."""
        counts = []
        for g, pos in zip(groups, positions):
            c = bisect.bisect_left(pos, budget)
            n_cur = group_index(g).n
            counts.append(n_cur - self.round_keep(n_cur - c, n_cur) if c else 0)
        return counts

    def global_counts(self, groups: list[Group], scores: list[Tensor], want: int) -> list[int]:
        """Channels each group loses when the ``want`` globally lowest channels go."""
        if want <= 0:
            return [0] * len(groups)
        positions, n = self.global_order(groups, scores)
        return self.budget_counts(groups, positions, min(want, n))


def lowest_positions(scores: Tensor, count: int) -> Tensor | None:
    """The positions of the ``count`` lowest scores, ascending (a long tensor): the same set as
    the first ``count`` of a stable ascending sort (ties go to the lower position), found
    without sorting every score. None when ``count`` is not positive or the scores hold NaN."""
    n = len(scores)
    if count <= 0 or n == 0:
        return None
    if count >= n:
        return torch.arange(n)
    if bool(torch.isnan(scores).any()):
        return None
    kth = torch.kthvalue(scores, count).values
    below = scores < kth
    ties = (scores == kth).nonzero().flatten()[: count - int(below.sum())]
    chosen = below
    chosen[ties] = True
    return chosen.nonzero().flatten()


def _item_structure(item: Any) -> tuple:
    """What a group item contributes to its group's structure class: layer type, pruned side and
    the static shape of the layer (see :meth:`ChannelCounts.structure`)."""
    module = item.dep.target.module
    side = getattr(item.dep.handler, "side", "out")
    if isinstance(module, Tensor):
        return ("parameter", side, module.dim())
    shape: tuple = ()
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        grouping = "depthwise" if depthwise else module.groups
        shape = (module.kernel_size, module.stride, module.padding, module.dilation, grouping)
    return (f"{type(module).__module__}.{type(module).__qualname__}", side, shape)


def _equal_parts(module: Any, side: str) -> tuple[int, int] | None:
    """``(channels, parts)`` when every part of ``module``'s channels on ``side`` must lose as
    many channels: the groups of a grouped (not depthwise) convolution, the heads of an
    ``nn.MultiheadAttention`` (heads are consecutive chunks of its embed channels)."""
    if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.in_channels:
        return (module.out_channels if side == "out" else module.in_channels), module.groups
    if isinstance(module, nn.MultiheadAttention) and module.num_heads > 1:
        return module.embed_dim, module.num_heads
    return None


class ChannelSelector:
    """Which channels of each group go: the lowest-scoring ones, balanced or reduced until the
    subset group is a valid prune (see the module docstring)."""

    __slots__ = ("graph", "subsets")

    def __init__(self, graph: DependencyGraph, subsets: SubsetGroups) -> None:
        self.graph = graph
        self.subsets = subsets

    def select_all(self, groups: list[Group], scores: list[Tensor | None], counts: list[int]) -> Plan:
        """``(full group, positions of the root channels to remove)`` for every group that loses
        channels."""
        plan = []
        for g, s, c in zip(groups, scores, counts):
            if s is None or c <= 0:
                continue
            positions = self.select(g, s, c)
            if positions:
                plan.append((g, positions))
        return plan

    def select(self, group: Group, scores: Tensor, count: int) -> list[int] | None:
        """The lowest ``count`` channels, balanced or reduced until the prune is valid (None: the
        group cannot be pruned; a warning says why)."""
        first_reason = None
        lowest_t = lowest_positions(scores, count)
        lowest = None if lowest_t is None else lowest_t.tolist()
        if lowest is not None:
            # the first candidate without sorting every score (most groups take it)
            first_reason = self._problem(group, lowest, lowest_t)
            if first_reason is None:
                return lowest
        order = torch.sort(scores, stable=True).indices.tolist()
        for k, positions in enumerate(self.candidates(group, order, count)):
            if not positions or (k == 0 and lowest is not None):
                continue
            positions = sorted(positions)
            reason = self._problem(group, positions)
            if reason is None:
                return positions
            first_reason = first_reason or reason
        warnings.warn(
            f"prune_callbacks: skipping the group of {group.root.dep.target.name}: {first_reason}",
            stacklevel=5,
        )
        return None

    def _problem(self, group: Group, positions: list[int], as_tensor: Tensor | None = None) -> str | None:
        """Why removing root positions ``positions`` (ascending; ``as_tensor``: the same as a
        tensor, when the caller has it) of ``group`` is not a valid prune, or None."""
        sub = self.subsets.subset(group, positions, as_tensor)
        if isinstance(sub, Unprunable):
            return sub.reason
        # A shared config changed for every layer is checked on the merged prune of the step.
        return self.graph.explain_pruning_group(sub, check_shared=False)

    def candidates(self, group: Group, order: list[int], count: int) -> Iterator[list[int]]:
        """Position sets to try, best first: the lowest ``count``; then as many per part of a
        partition (grouped convolutions, chunks) with a valid kept count; then fewer channels."""
        n = len(order)
        yield order[:count]
        labels, divisors = self.constraints(group, n)
        if labels is not None:
            parts: dict[Any, list[int]] = {}
            for i in order:
                parts.setdefault(labels[i], []).append(i)
            p = len(parts)
            smallest = min(len(v) for v in parts.values())
            per = min(count // p, smallest - 1)
            tried = 0
            while per > 0 and tried < _TRIES:
                if all((n - per * p) % d == 0 for d in divisors):
                    tried += 1
                    yield [i for v in parts.values() for i in v[:per]]
                per -= 1
        tried = 0
        c = count - 1
        while c > 0 and tried < _TRIES:
            if all((n - c) % d == 0 for d in divisors):
                tried += 1
                yield order[:c]
            c -= 1 if divisors else max(1, c // 4)

    @staticmethod
    def constraints(group: Group, n: int) -> tuple[list[Any] | None, list[int]]:
        """Partition labels of the root channels (grouped convolutions, attention heads, equal
        chunks: every part must lose as many channels) and divisors of the kept count
        (GroupNorm)."""
        labels: list[tuple] | None = None
        divisors: set[int] = set()
        gi = group_index(group)

        def add(label_of: dict[int, Any]) -> None:
            nonlocal labels
            if labels is None:
                labels = [() for _ in range(n)]
            for r, lab in label_of.items():
                labels[r] = (*labels[r], lab)

        start = 0
        for k, item in enumerate(group):
            length = item.count
            module = item.dep.target.module
            side = getattr(item.dep.handler, "side", "out")
            parts = _equal_parts(module, side)
            if parts is not None:
                per = max(1, parts[0] // parts[1])
                label_of: dict[int, Any] = {}
                for c, rp in zip(item.idxs, gi.pos[start : start + length].tolist()):
                    if rp >= 0:
                        label_of.setdefault(rp, (k, c // per))
                add(label_of)
            elif isinstance(module, nn.GroupNorm):
                divisors.add(module.num_groups)
            start += length
        for module, attr, old, _new in group.attribute_updates:
            if attr == "<chunks>" and len(old) > 1 and n % len(old) == 0:
                size = n // len(old)
                add({r: ("chunk", id(module), r // size) for r in range(n)})
        divisors.discard(1)
        return labels, sorted(divisors)
