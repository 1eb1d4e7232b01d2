"""MAC budgets: the channel choice that meets a ``target_speedup``.

With ``target_speedup`` the pruner ranks channels globally and removes the smallest number of the
globally lowest channels whose estimated MACs meet the step's goal (the MAC reduction
``1 - 1/target_speedup`` follows the schedule). MACs are estimated per layer from one measured
forward pass: a layer's MACs scale with the fraction of its input and of its output channels that
stay (exact for convolutions and linear layers); MACs outside graph layers are taken as constant.
With isomorphic ranking (``isomorphic=True``) the "globally lowest" order is the isomorphic one of
:meth:`~.selection.ChannelCounts.global_order`, so the budget that meets the goal prunes every
structure class to the same fraction of its channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..graph.dependency import Group
from ..graph.dependency_graph import DependencyGraph
from ..measure.flops import count_macs_and_params, count_module_macs
from .importance import group_index
from .selection import ChannelCounts, ChannelSelector, group_key
from .subsets import Plan
from .timing import PhaseTimer

__all__ = ["MacBudget", "MacEstimate"]

#: Budget raises tried when balancing made the chosen plan miss the goal.
_RAISES = 6


class MacEstimate:
    """Estimated MACs of the model after removing, from every group, its first ``count`` channels
    in ascending score order.

    Per (graph layer, side) it keeps the layer's channel count and, per group touching it, a
    cumulative table: channels of that layer removed with the group's lowest ``j`` root channels.
    """

    __slots__ = ("contrib", "other", "per_module", "sizes")

    def __init__(
        self,
        graph: DependencyGraph,
        groups: list[Group],
        orders: dict[int, list[int]],
        total: int,
        per_module: dict[int, int],
    ) -> None:
        self.per_module = per_module
        self.other = total - sum(per_module.values())
        self.contrib: dict[tuple[int, str], list[tuple[int, list[int]]]] = {}
        self.sizes: dict[tuple[int, str], int] = {}
        for i, order in orders.items():
            self._add_group(graph, i, groups[i], order)

    def _add_group(self, graph: DependencyGraph, i: int, group: Group, order: list[int]) -> None:
        n = len(order)
        gi = group_index(group)
        order_t = torch.as_tensor(order, dtype=torch.long)
        # the root position of every (item, channel) entry, item by item (tensor ops: a wide
        # layer's channels cost no Python work each)
        per_item = torch.split(gi.pos, gi.lengths)
        for item, positions in zip(group, per_item):
            node = item.dep.target
            if id(node.module) not in self.per_module:
                continue
            side = getattr(item.dep.handler, "side", "out")
            size = graph.channel_count(node, side)
            if not size:
                continue
            positions = positions[(positions >= 0) & (positions < n)]
            mult = torch.bincount(positions, minlength=n)
            cum = [0, *torch.cumsum(mult[order_t], 0).tolist()]
            key = (id(node.module), side)
            self.contrib.setdefault(key, []).append((i, cum))
            self.sizes[key] = size

    def __call__(self, counts: list[int]) -> float:
        """Estimated MACs when group ``i`` loses its lowest ``counts[i]`` channels."""
        frac: dict[int, float] = {}
        for key, lst in self.contrib.items():
            removed = sum(cum[min(counts[i], len(cum) - 1)] for i, cum in lst)
            f = max(0.0, 1.0 - removed / self.sizes[key])
            frac[key[0]] = frac.get(key[0], 1.0) * f
        return self.other + sum(m * frac.get(mid, 1.0) for mid, m in self.per_module.items())


class MacBudget:
    """MAC measurements and the budget search of a ``target_speedup`` run."""

    __slots__ = (
        "counts",
        "example_inputs",
        "forward_fn",
        "graph",
        "model",
        "selector",
        "target_speedup",
        "timer",
    )

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable | None,
        graph: DependencyGraph,
        counts: ChannelCounts,
        selector: ChannelSelector,
        target_speedup: float,
        timer: PhaseTimer,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self.graph = graph
        self.counts = counts
        self.selector = selector
        self.target_speedup = target_speedup
        self.timer = timer

    # ------------------------------------------------------------------ measurements
    def count_macs(self) -> int:
        """MACs of one forward pass of the model as it is now."""
        with self.timer("macs"):
            return count_macs_and_params(self.model, self.example_inputs, self.forward_fn)[0]

    def module_macs(self) -> tuple[int, dict[int, int]]:
        """Total MACs and MACs of every graph layer (by id) of one forward pass."""
        with self.timer("macs"):
            total, by_name = count_module_macs(self.model, self.example_inputs, self.forward_fn)
        module2node = self.graph.module2node
        per: dict[int, int] = {}
        for name, module in self.model.named_modules():
            if name in by_name and module in module2node:
                per[id(module)] = by_name[name]
        return total, per

    def goal(self, k: int, dense_macs: int) -> float:
        """MACs allowed after step ``k`` (0-based) of a model that had ``dense_macs`` before the
        first step: the MAC reduction ``1 - 1/target_speedup`` follows the schedule."""
        fractions = self.counts.schedule.fractions_for(1.0 - 1.0 / self.target_speedup)
        return dense_macs * (1.0 - fractions[k])

    # ------------------------------------------------------------------ the search
    def plan(self, groups: list[Group], scores: list[Tensor | None], goal: float, k: int) -> Plan:
        """Global ranking with the smallest channel budget whose estimated MACs meet ``goal``.

        The estimate of the final choice is checked and the budget raised if balancing made it
        miss.
        """
        total, per_module = self.module_macs()
        with self.timer("selection"):
            return self.plan_from(groups, scores, goal, k, total, per_module)

    def plan_from(
        self,
        groups: list[Group],
        scores: list[Tensor | None],
        goal: float,
        k: int,
        total: int,
        per_module: dict[int, int],
    ) -> Plan:
        """:meth:`plan` with the measured ``total`` and per-layer MACs given."""
        local: list[tuple[int, Tensor]] = []
        glob: list[tuple[int, Tensor]] = []
        fixed_counts = [0] * len(groups)
        for i, (g, s) in enumerate(zip(groups, scores)):
            if s is None:
                continue
            fixed = self.counts.fixed_count(g, k)
            if fixed is None:
                glob.append((i, s))
            else:
                local.append((i, s))
                fixed_counts[i] = fixed
        orders = {i: torch.sort(s, stable=True).indices.tolist() for i, s in local + glob}
        estimate = MacEstimate(self.graph, groups, orders, total, per_module)

        gl_groups = [groups[i] for i, _ in glob]
        positions, n_cand = self.counts.global_order(gl_groups, [s for _, s in glob])

        def counts_for(budget: int) -> list[int]:
            cnt = list(fixed_counts)
            for (i, _), c in zip(glob, self.counts.budget_counts(gl_groups, positions, budget)):
                cnt[i] = c
            return cnt

        budget = self._smallest_budget(estimate, counts_for, goal, n_cand)
        plan: Plan = []
        index = {group_key(g): i for i, g in enumerate(groups)}
        for _ in range(_RAISES):
            plan = self.selector.select_all(groups, scores, counts_for(budget))
            actual = list(fixed_counts)
            for g, chosen in plan:
                # a balanced selection may differ from the lowest-first order: its size is
                # used (exact when no balancing was needed)
                actual[index[group_key(g)]] = len(chosen)
            if estimate(actual) <= goal or budget >= n_cand:
                break
            budget = min(n_cand, budget + max(1, n_cand // 200))
        return plan

    @staticmethod
    def _smallest_budget(
        estimate: MacEstimate, counts_for: Callable[[int], list[int]], goal: float, n_cand: int
    ) -> int:
        """The smallest number of global candidates whose removal meets ``goal`` (binary search;
        ``n_cand`` when none does)."""
        if estimate(counts_for(0)) <= goal:
            return 0
        lo, hi = 0, n_cand
        while lo < hi:
            mid = (lo + hi) // 2
            if estimate(counts_for(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return lo
