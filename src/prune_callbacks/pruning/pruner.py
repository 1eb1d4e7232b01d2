"""The pruner: scores every coupled channel group, picks the channels to remove and removes them.

This is the engine behind the Lightning callback, and a plain-PyTorch API on its own::

    pruner = Pruner(model, example_inputs, MagnitudeImportance(p=2), pruning_ratio=0.5)
    pruner.step()                      # one pruning step (importance, ranking, pruning)

One step:

1. **Groups.** The full-index groups of the dependency graph (every coupled set of channels
   once; groups that would change a model output, and ``ignored_layers``, are left out).
2. **Scores.** The importance criterion gives one score per root channel of each group.
3. **How many.** Local pruning: each group loses its share, ``ratio * original channels``
   (the ratio of the current step of the ``schedule``). Global pruning: the normalised scores of
   every group are ranked together and the lowest channels of the whole model go, as many as
   ``ratio`` of all original channels. Either way ``max_pruning_ratio`` caps every group (of its
   original channels), at least one channel is kept, ``pruning_ratio_dict`` gives groups their
   own ratio (pruned locally), and with ``round_to`` the channels kept are a multiple of it.
   ``target_speedup`` replaces the ratio by a MAC budget met by global ranking.
4. **Which.** The lowest-scoring channels. When the result is not a valid prune (grouped
   convolutions, equal chunks, ``GroupNorm``/attention divisibility) the choice is balanced
   (the same number per convolution group or chunk) or reduced; a group that still cannot be
   pruned is skipped with a warning. A step never stops half way.
5. **Prune.** The chosen channels of all groups are removed in one atomic operation, recorded
   in the pruning history (plain data, see :mod:`.history`).
"""

from __future__ import annotations

import bisect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..graph import index_mapping as im
from ..graph.dependency import Group, GroupItem, PruningError
from ..measure.flops import _eval_no_grad, call_model, count_macs_and_params
from ..graph.dependency_graph import DEFAULT_ROOT_TYPES, DependencyGraph, gc_paused
from .history import get_pruning_history
from .importance import GradientImportance, Importance, get_importance, group_index
from ..graph.index_mapping import RootMap
from .naming import lookup, resolve_modules, resolve_one
from .schedule import ratio_schedule

__all__ = ["Pruner", "SCHEDULES", "count_macs_and_params"]

SCHEDULES: tuple[str, ...] = ("linear", "cubic", "exponential")
_SCHEDULE_ALIASES = {"linear": "linear", "cubic": "cubic", "exp": "exp", "exponential": "exp", "agp": "cubic"}
_SPEEDUP_TOLERANCE = 0.03

GroupKey = tuple[int, str]


def _ratio(value: Any, what: str, low_open: bool = False, high_closed: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v <= 1 if high_closed else v < 1
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{']' if high_closed else ')'}"
        raise ValueError(f"{what} must be in {interval}, got {v}")
    return v


class _Unprunable:
    """Stands for a subset group the graph refused: it explains itself as unprunable."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.items: list = []
        self.attribute_updates: list = []

    def __iter__(self) -> Iterator:
        return iter(())


def _group_key(group: Group) -> GroupKey:
    root = group.root.dep
    return (id(root.target.module), getattr(root.handler, "side", "out"))


class Pruner:
    """Structured channel pruner driven by a dependency graph (see the module docstring).

    Args:
        model: the model to prune in place.
        example_inputs: inputs for one forward pass (tensor, tuple of positional arguments or
            dict of keyword arguments), used to trace the model.
        importance: an :class:`~.importance.Importance` (or any ``fn(group) -> scores``) or a
            name: ``"magnitude"``, ``"l1"``, ``"l2"``, ``"taylor"``, ``"fisher"``, ``"bn_scale"``,
            ``"random"``.
        pruning_ratio: fraction of the original channels of every group to remove after the
            last step, in [0, 1).
        pruning_ratio_dict: ``{module or name pattern or tuple of them: ratio}``; a group whose
            output layers include one of them uses that ratio (pruned locally).
        global_pruning: rank channels across groups instead of pruning each group by its share.
        max_pruning_ratio: no group loses more than this fraction of its original channels.
        iterative_steps: number of :meth:`step` calls to reach ``pruning_ratio``.
        schedule: ``"linear"``, ``"cubic"`` (Zhu & Gupta's AGP), ``"exponential"`` or an explicit
            list of cumulative ratios (one per step).
        round_to: channels kept per group are a multiple of this (when the group allows it);
            attention-head groups count heads and are not rounded.
        ignored_layers: modules, parameters, module classes or name patterns whose output
            channels must not change (their submodules too).
        prune_num_heads, head_pruning_ratio: attention projections are pruned by whole heads
            (their groups have one root id per head). With ``prune_num_heads=True`` every
            attention group loses ``head_pruning_ratio`` of its heads (locally, following the
            schedule); otherwise attention groups keep all their heads.
        target_speedup: prune (by global ranking) until the model's MACs are at most
            ``dense MACs / target_speedup`` (within 3%); replaces ``pruning_ratio``. With several
            steps, the MAC reduction follows the schedule.
        unwrapped_parameters: bare parameters to prune, ``{param or name: dim}``.
        customized_pruners: ``{module class: LayerPruner}`` for module types the library does
            not know.
        forward_fn, output_transform: passed to the graph (how to call the model, which outputs).
        root_module_types: layer types that root groups (default: convolutions, linear, LSTM,
            GRU, embeddings, multi-head attention).
        fast_subsets: build the subset group of each chosen channel set by filtering the
            full-index group (default), and remove the channels of all groups in one atomic
            prune. ``False`` searches the graph again for every group and prunes the groups one
            by one (slower; exact even for a full group whose root channels are coupled to each
            other, which filtering cannot see).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        importance: Importance | Callable | str,
        pruning_ratio: float = 0.5,
        pruning_ratio_dict: Mapping[Any, float] | None = None,
        global_pruning: bool = False,
        max_pruning_ratio: float = 1.0,
        iterative_steps: int = 1,
        schedule: str | Sequence[float] = "linear",
        round_to: int | None = None,
        ignored_layers: Iterable[Any] | None = None,
        prune_num_heads: bool = False,
        head_pruning_ratio: float = 0.0,
        target_speedup: float | None = None,
        unwrapped_parameters: Any = None,
        customized_pruners: Mapping[type, Any] | None = None,
        *,
        forward_fn: Callable | None = None,
        output_transform: Callable | None = None,
        root_module_types: Sequence[type] | None = None,
        fast_subsets: bool = True,
    ) -> None:
        # ---- validate everything before touching the model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.pruning_ratio = _ratio(pruning_ratio, "pruning_ratio")
        self.max_pruning_ratio = _ratio(
            max_pruning_ratio, "max_pruning_ratio", low_open=True, high_closed=True
        )
        if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
            raise ValueError(f"iterative_steps must be an integer >= 1, got {iterative_steps!r}")
        if isinstance(schedule, str):
            kind = _SCHEDULE_ALIASES.get(schedule.lower())
            if kind is None:
                raise ValueError(
                    f"unknown schedule {schedule!r}; valid values: {', '.join(SCHEDULES)} "
                    "or an explicit list of ratios"
                )
            self._schedule_kind: str | list[float] = kind
        else:
            # validated (each in [0, 1), non-decreasing); warns when it does not end at pruning_ratio
            values = ratio_schedule(self.pruning_ratio, 1, list(schedule))
            if iterative_steps not in (1, len(values)):
                raise ValueError(
                    f"an explicit schedule of {len(values)} ratios needs iterative_steps={len(values)}, "
                    f"got {iterative_steps}"
                )
            iterative_steps = len(values)
            self._schedule_kind = values
        self.iterative_steps = iterative_steps
        self.schedule = schedule
        self.per_step_ratio = self._ratios_for(self.pruning_ratio)
        if round_to is not None and (
            isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
        ):
            raise ValueError(f"round_to must be None or an integer >= 1, got {round_to!r}")
        self.round_to = round_to
        self.head_pruning_ratio = _ratio(head_pruning_ratio, "head_pruning_ratio")
        self.prune_num_heads = bool(prune_num_heads)
        if target_speedup is not None:
            ts = float(target_speedup)
            if isinstance(target_speedup, bool) or not math.isfinite(ts) or ts < 1.0:
                raise ValueError(f"target_speedup must be a finite number >= 1, got {target_speedup!r}")
            target_speedup = ts
        self.target_speedup = target_speedup
        self.global_pruning = bool(global_pruning) or target_speedup is not None
        self.importance = get_importance(importance)
        ratio_specs = dict(pruning_ratio_dict or {})
        for key, value in ratio_specs.items():
            _ratio(value, f"pruning_ratio_dict[{key!r}]")
        ignored = resolve_modules(model, ignored_layers, "ignored_layers")
        self._ratio_by_module: dict[int, float] = {}
        for key, value in ratio_specs.items():
            specs = key if isinstance(key, (tuple, list)) else [key]
            for spec in specs:
                for obj in resolve_one(model, spec, "pruning_ratio_dict"):
                    for sub in obj.modules() if isinstance(obj, nn.Module) else [obj]:
                        self._ratio_by_module[id(sub)] = float(value)
        unwrapped = self._resolve_unwrapped(model, unwrapped_parameters)

        # ---- build the graph
        self.model = model
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self.ignored_layers: list[Any] = []
        for obj in ignored:
            self.ignored_layers.extend(obj.modules() if isinstance(obj, nn.Module) else [obj])
        self.root_module_types = tuple(root_module_types) if root_module_types else DEFAULT_ROOT_TYPES
        self.fast_subsets = bool(fast_subsets)
        #: Seconds spent per phase ("graph", "groups", "importance", "selection", "pruning",
        #: "macs"), summed over the pruner's life; reset it freely.
        self.timings: dict[str, float] = {}
        with gc_paused():
            self._build(model, example_inputs, forward_fn, output_transform, unwrapped, customized_pruners)
        self.dense_macs: int | None = None
        self.last_macs: int | None = None
        if target_speedup is not None:
            self.dense_macs = self._count_macs()

    def _build(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable | None,
        output_transform: Callable | None,
        unwrapped: Any,
        customized_pruners: Mapping[type, Any] | None,
    ) -> None:
        with self._timed("graph"):
            self.DG = DependencyGraph().build_dependency(
                model,
                example_inputs,
                forward_fn=forward_fn,
                output_transform=output_transform,
                unwrapped_parameters=unwrapped,
                customized_pruners=customized_pruners,
                ignored_layers=self.ignored_layers,
            )
        self.DG.pruning_history = get_pruning_history(model, create=True)
        self.current_step = 0
        self._groups: list[Group] | None = None
        self._init_channels: dict[GroupKey, int] = {}
        for g in self.groups:
            self._init_channels[_group_key(g)] = group_index(g).n

    # ------------------------------------------------------------------ public helpers
    @property
    def dg(self) -> DependencyGraph:
        return self.DG

    @property
    def groups(self) -> list[Group]:
        """The current full-index groups (rebuilt lazily after each prune)."""
        if self._groups is None:
            with self._timed("groups"):
                self._groups = self.DG.get_all_groups(
                    ignored_layers=self.ignored_layers, root_module_types=self.root_module_types
                )
        return self._groups

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    def estimate_importance(self, group: Group) -> Tensor | None:
        """Scores of one group's root channels (CPU float tensor), or None."""
        scores = self.importance(group)
        return None if scores is None else scores.detach().float().cpu().reshape(-1)

    def pruning_history(self) -> list[dict[str, Any]]:
        """Plain-data records of every prune done to the model (see :mod:`.history`)."""
        return self.DG.pruning_history

    def get_target_pruning_ratio(self, module: nn.Module | None = None, step: int | None = None) -> float:
        """Cumulative ratio that ``module``'s group (default: any group) reaches after ``step``
        (1-based; default: the last completed step)."""
        step = self.current_step if step is None else step
        if step <= 0:
            return 0.0
        ratio = self.pruning_ratio
        if module is not None and id(module) in self._ratio_by_module:
            ratio = self._ratio_by_module[id(module)]
        return self._ratios_for(ratio)[min(step, self.iterative_steps) - 1]

    def state_dict(self) -> dict[str, Any]:
        """Plain-data progress of the schedule (current step, channels each group root had before
        the first step, dense MACs), keyed by module/parameter names so it can be saved in a
        checkpoint and loaded into a pruner built on a fresh copy of the model."""
        names = {id(m): n for n, m in self.model.named_modules()}
        names.update({id(p): n for n, p in self.model.named_parameters()})
        init = {
            f"{names[mid]}|{side}": int(n) for (mid, side), n in self._init_channels.items() if mid in names
        }
        return {"current_step": int(self.current_step), "init_channels": init, "dense_macs": self.dense_macs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the schedule from :meth:`state_dict` (names that no longer exist are skipped)."""
        self.current_step = int(state.get("current_step", 0))
        for key, n in (state.get("init_channels") or {}).items():
            name, side = key.rsplit("|", 1)
            try:
                target = lookup(self.model, name)
            except AttributeError:
                continue
            self._init_channels[(id(target), side)] = int(n)
        if state.get("dense_macs") is not None:
            self.dense_macs = int(state["dense_macs"])

    def step(self, interactive: bool = False) -> Iterator[Group] | None:
        """Run one pruning step.

        With ``interactive=True`` the step returns a generator of pruning groups (one per group
        that loses channels, built just before it is yielded): inspect or change them and call
        ``group.prune()`` yourself; a group that is not pruned is simply kept. Gradient
        importances are reset after the scores are taken.
        """
        if self.current_step >= self.iterative_steps:
            warnings.warn(
                f"prune_callbacks: all {self.iterative_steps} pruning steps are done; step() does nothing",
                stacklevel=2,
            )
            return iter(()) if interactive else None
        with gc_paused():
            return self._step(interactive)

    def _step(self, interactive: bool) -> Iterator[Group] | None:
        k = self.current_step
        if self.target_speedup is not None:
            if interactive:
                groups = self.groups
                with self._timed("importance"):
                    scores = self._score(groups)
                plan = self._speedup_plan(groups, scores, self._speedup_goal(k))
                self._finish_step()
                return self._interactive(plan)
            self._speedup_step(k)
            self._finish_step()
            return None
        plan = self._plan(k)
        if interactive:
            self._finish_step()
            return self._interactive(plan)
        self._execute(plan)
        self._finish_step()
        return None

    # ------------------------------------------------------------------ configuration helpers
    def _ratios_for(self, target: float) -> list[float]:
        """Cumulative ratio after each step for a group whose final ratio is ``target``. An
        explicit schedule is used as given for ``pruning_ratio`` and scaled for other targets."""
        kind = self._schedule_kind
        if isinstance(kind, list):
            last = kind[-1]
            if last == 0 or math.isclose(target, self.pruning_ratio):
                return list(kind)
            return [min(v * target / last, 0.999999) for v in kind]
        return ratio_schedule(target, self.iterative_steps, kind)

    @staticmethod
    def _resolve_unwrapped(model: nn.Module, unwrapped: Any) -> Any:
        if unwrapped is None:
            return None
        params = dict(model.named_parameters())

        def param(p: Any) -> Any:
            if isinstance(p, str):
                if p not in params:
                    resolve_one(model, p, "unwrapped_parameters")  # raises with close matches
                    raise ValueError(f"unwrapped_parameters: {p!r} is not a parameter")
                return params[p]
            return p

        if isinstance(unwrapped, Mapping):
            return {param(p): d for p, d in unwrapped.items()}
        out = []
        for entry in unwrapped:
            if isinstance(entry, (tuple, list)):
                out.append((param(entry[0]), entry[1]))
            else:
                out.append(param(entry))
        return out

    def _finish_step(self) -> None:
        self.current_step += 1
        self._groups = None
        self.importance_reset()

    def importance_reset(self) -> None:
        """Reset gradient statistics of the importance (done after every step)."""
        if isinstance(self.importance, GradientImportance) or getattr(
            self.importance, "requires_gradients", False
        ):
            reset = getattr(self.importance, "reset", None)
            if callable(reset):
                reset()

    # ------------------------------------------------------------------ scoring and sizes
    def _score(self, groups: list[Group]) -> list[Tensor | None]:
        score_groups = getattr(self.importance, "score_groups", None)
        raw = score_groups(groups) if callable(score_groups) else [self.importance(g) for g in groups]
        out: list[Tensor | None] = []
        for g, s in zip(groups, raw):
            if s is None:
                out.append(None)
                continue
            s = s.detach().float().cpu().reshape(-1)
            n = group_index(g).n
            if len(s) != n:
                raise ValueError(f"importance returned {len(s)} scores for a group with {n} root channels")
            out.append(torch.nan_to_num(s, nan=0.0, posinf=3.0e38, neginf=-3.0e38))
        return out

    @staticmethod
    def _is_head_group(group: Group) -> bool:
        return bool(getattr(group, "head_blocks", None))

    def _fixed_count(self, group: Group, k: int) -> int | None:
        """Channels to remove from a group whose count does not come from the ranking: attention
        head groups and groups with a ``pruning_ratio_dict`` entry (None for the others)."""
        if self._is_head_group(group):
            if not self.prune_num_heads or self.head_pruning_ratio <= 0:
                return 0
            # round_to is about channel counts; a head group counts heads, which it leaves alone
            return self._local_count(
                group, self._original(group), self._ratios_for(self.head_pruning_ratio)[k], rounded=False
            )
        override = self._override(group)
        if override is not None:
            return self._local_count(group, self._original(group), self._ratios_for(override)[k])
        return None

    def _override(self, group: Group) -> float | None:
        table = self._ratio_by_module
        if not table:
            return None
        for item in group:
            if getattr(item.dep.handler, "side", "out") == "out" and id(item.dep.target.module) in table:
                return table[id(item.dep.target.module)]
        return None

    def _original(self, group: Group) -> int:
        key = _group_key(group)
        if key not in self._init_channels:
            self._init_channels[key] = group_index(group).n
        return self._init_channels[key]

    def _min_keep(self, n0: int) -> int:
        return max(1, math.ceil(n0 * (1.0 - self.max_pruning_ratio) - 1e-9))

    def _round_keep(self, keep: int, n_cur: int) -> int:
        """Channels kept after rounding up to a multiple of ``round_to`` (never above ``n_cur``)."""
        r = self.round_to
        if r and r > 1 and keep % r:
            keep = (keep // r + 1) * r
        return min(keep, n_cur)

    def _local_count(self, group: Group, n0: int, ratio: float, rounded: bool = True) -> int:
        n_cur = group_index(group).n
        keep = n0 - int(math.floor(n0 * ratio + 0.5))
        keep = max(keep, self._min_keep(n0))
        if rounded:
            keep = self._round_keep(keep, n_cur)
        return max(0, n_cur - keep)

    def _counts(self, groups: list[Group], scores: list[Tensor | None], k: int) -> list[int]:
        """Channels to remove from each group at step ``k`` (0-based)."""
        counts = [0] * len(groups)
        global_idx: list[int] = []
        for i, (g, s) in enumerate(zip(groups, scores)):
            if s is None:
                continue
            fixed = self._fixed_count(g, k)
            if fixed is not None:
                counts[i] = fixed
            elif self.global_pruning:
                global_idx.append(i)
            else:
                counts[i] = self._local_count(g, self._original(g), self.per_step_ratio[k])
        if global_idx:
            ratio = self.per_step_ratio[k]
            total0 = sum(self._original(groups[i]) for i in global_idx)
            current = sum(group_index(groups[i]).n for i in global_idx)
            want = current - (total0 - int(math.floor(total0 * ratio + 0.5)))
            chosen = self._global_counts(
                [groups[i] for i in global_idx], [scores[i] for i in global_idx], want
            )
            for i, c in zip(global_idx, chosen):
                counts[i] = c
        return counts

    def _caps(self, groups: list[Group]) -> list[int]:
        return [max(0, group_index(g).n - self._min_keep(self._original(g))) for g in groups]

    def _global_order(self, groups: list[Group], scores: list[Tensor]) -> tuple[list[list[int]], int]:
        """For each group, the positions (in the global ascending order of scores) of its channels
        that may be pruned (its lowest ``cap`` channels); and the number of candidates."""
        caps = self._caps(groups)
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
        order = torch.sort(allv, stable=True).indices
        for pos, gi in enumerate(allg[order].tolist()):
            positions[gi].append(pos)
        return positions, len(order)

    def _global_counts(self, groups: list[Group], scores: list[Tensor], want: int) -> list[int]:
        if want <= 0:
            return [0] * len(groups)
        positions, n = self._global_order(groups, scores)
        want = min(want, n)
        counts = []
        for g, pos in zip(groups, positions):
            c = bisect.bisect_left(pos, want)
            n_cur = group_index(g).n
            counts.append(n_cur - self._round_keep(n_cur - c, n_cur) if c else 0)
        return counts

    # ------------------------------------------------------------------ selection
    def _plan(self, k: int) -> list[tuple[Group, list[int]]]:
        groups = self.groups
        with self._timed("importance"):
            scores = self._score(groups)
        with self._timed("selection"):
            counts = self._counts(groups, scores, k)
            return self._select_all(groups, scores, counts)

    def _select_all(
        self, groups: list[Group], scores: list[Tensor | None], counts: list[int]
    ) -> list[tuple[Group, list[int]]]:
        """``(full group, positions of the root channels to remove)`` for every group that loses
        channels."""
        plan = []
        for g, s, c in zip(groups, scores, counts):
            if s is None or c <= 0:
                continue
            positions = self._select(g, s, c)
            if positions:
                plan.append((g, positions))
        return plan

    def _select(self, group: Group, scores: Tensor, count: int) -> list[int] | None:
        """The lowest ``count`` channels, balanced or reduced until the prune is valid."""
        order = torch.sort(scores, stable=True).indices.tolist()
        first_reason = None
        for positions in self._candidates(group, order, count):
            if not positions:
                continue
            positions = sorted(positions)
            sub = self._subset(group, positions)
            # A shared config changed for every layer is checked on the merged prune of the step.
            reason = (
                sub.reason
                if isinstance(sub, _Unprunable)
                else self.DG.explain_pruning_group(sub, check_shared=False)
            )
            if reason is None:
                return positions
            first_reason = first_reason or reason
        warnings.warn(
            f"prune_callbacks: skipping the group of {group.root.dep.target.name}: {first_reason}",
            stacklevel=4,
        )
        return None

    def _candidates(self, group: Group, order: list[int], count: int) -> Iterator[list[int]]:
        n = len(order)
        yield order[:count]
        labels, divisors = self._constraints(group, n)
        if labels is not None:
            parts: dict[Any, list[int]] = {}
            for i in order:
                parts.setdefault(labels[i], []).append(i)
            p = len(parts)
            smallest = min(len(v) for v in parts.values())
            per = min(count // p, smallest - 1)
            tried = 0
            while per > 0 and tried < 6:
                if all((n - per * p) % d == 0 for d in divisors):
                    tried += 1
                    yield [i for v in parts.values() for i in v[:per]]
                per -= 1
        tried = 0
        c = count - 1
        while c > 0 and tried < 6:
            if all((n - c) % d == 0 for d in divisors):
                tried += 1
                yield order[:c]
            c -= 1 if divisors else max(1, c // 4)

    def _constraints(self, group: Group, n: int) -> tuple[list[Any] | None, list[int]]:
        """Partition labels of the root channels (grouped convolutions, equal chunks: every part
        must lose as many channels) and divisors of the kept count (GroupNorm, attention)."""
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
            length = len(item.idxs)
            module = item.dep.target.module
            side = getattr(item.dep.handler, "side", "out")
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
                if module.groups != module.in_channels:  # depthwise ones need no balance
                    total = module.out_channels if side == "out" else module.in_channels
                    per = max(1, total // module.groups)
                    label_of: dict[int, Any] = {}
                    for c, rp in zip(item.idxs, gi.pos[start : start + length].tolist()):
                        if rp >= 0:
                            label_of.setdefault(rp, (k, c // per))
                    add(label_of)
            elif isinstance(module, nn.GroupNorm):
                divisors.add(module.num_groups)
            elif isinstance(module, nn.MultiheadAttention):
                divisors.add(module.num_heads)
            start += length
        for module, attr, old, _new in group.attribute_updates:
            if attr == "<chunks>" and len(old) > 1 and n % len(old) == 0:
                size = n // len(old)
                add({r: ("chunk", id(module), r // size) for r in range(n)})
        divisors.discard(1)
        return labels, sorted(divisors)

    # ------------------------------------------------------------------ subset groups
    @staticmethod
    def _value_lut(group: Group, positions: list[int]) -> Tensor:
        """Boolean table over root channel ids + 1 (index 0: kept entries of a map)."""
        ids = group_index(group).ids
        values = [ids[p] for p in positions]
        top = max(ids, default=0) + 2
        lut = torch.zeros(top, dtype=torch.bool)
        lut[torch.as_tensor(values, dtype=torch.long) + 1] = True
        return lut

    @staticmethod
    def _selected_items(group: Group, positions: list[int]) -> list[tuple[GroupItem, list[int], list[int]]]:
        """Items of the subset group for root positions ``positions``: (full item, idxs, root ids)."""
        gi = group_index(group)
        lut = torch.zeros(gi.n + 1, dtype=torch.bool)
        lut[torch.as_tensor(positions, dtype=torch.long) + 1] = True
        mask = lut[gi.pos + 1]
        idx = gi.idx[mask].tolist()
        pos = gi.pos[mask].tolist()
        counts = torch.bincount(gi.item[mask], minlength=len(gi.lengths)).tolist()
        roots = gi.ids
        identity = gi.identity
        out = []
        start = 0
        for item, c in zip(group.items, counts):
            if c:
                sel = pos[start : start + c]
                out.append((item, idx[start : start + c], sel if identity else [roots[p] for p in sel]))
            start += c
        return out

    def _subset(self, group: Group, positions: list[int]) -> Group:
        """The subset group of ``group`` that removes root positions ``positions``, made by
        filtering the full group (no new graph search). Edge maps are only built when the group
        changes attributes (split sizes, head counts: needed to check them), and only for the
        tensors those are read from."""
        if not self.fast_subsets:
            root = group.root.dep
            try:
                return self.DG.get_pruning_group(
                    root.target.module, root.handler, self._root_channels(group, positions)
                )
            except ValueError as e:
                return _Unprunable(str(e))
        selected = self._selected_items(group, positions)
        group._pc_selected = (positions, selected)  # reused by the merged prune
        items = [GroupItem(it.dep, idxs, roots) for it, idxs, roots in selected]
        maps: dict[Any, RootMap] = {}
        attrs: list = []
        if group.attribute_updates:
            lut = self._value_lut(group, positions)
            edge_maps = group.edge_maps
            edges = getattr(group, "_pc_attribute_edges", None)
            if edges is None:
                edges = group._pc_attribute_edges = self.DG.attribute_edges(edge_maps)
            for edge in edges:
                m = edge_maps[edge]
                keep = lut[(m.t + 1).clamp(min=0, max=len(lut) - 1)]
                if bool(keep.any()):
                    maps[edge] = RootMap(torch.where(keep, m.t, torch.full_like(m.t, im.KEPT)), m.explicit)
            attrs = self.DG.attribute_updates_for(maps)
        sub = Group(items, self.DG, attrs, maps)
        return sub

    # ------------------------------------------------------------------ pruning
    def _merged(self, plan: list[tuple[Group, list[int]]]) -> Group:
        """One group removing everything of ``plan``. All full groups index the model as it is
        before the step, so their subsets can be combined: per layer and side the union of the
        channel indices, per tensor the union of the pruned positions."""
        items: dict[tuple[int, str], tuple[GroupItem, list[list[int]]]] = {}
        for group, positions in plan:
            cached = getattr(group, "_pc_selected", None)
            if cached is not None and cached[0] == positions:
                selected = cached[1]
            else:
                selected = self._selected_items(group, positions)
            for it, idxs, _roots in selected:
                key = (id(it.dep.target), getattr(it.dep.handler, "__name__", repr(it.dep.handler)))
                entry = items.get(key)
                if entry is None:
                    items[key] = (it, [idxs])
                else:
                    entry[1].append(idxs)
        merged_items = []
        for it, lists in items.values():
            idxs = lists[0] if len(lists) == 1 else sorted(set(chain.from_iterable(lists)))
            merged_items.append(GroupItem(it.dep, idxs, idxs))
        maps = self._merged_edge_maps(plan)
        attribute_maps = {e: maps[e] for e in self.DG.attribute_edges(maps)}
        merged = Group(merged_items, self.DG, self.DG.attribute_updates_for(attribute_maps), maps)
        return merged

    def _merged_edge_maps(self, plan: list[tuple[Group, list[int]]]) -> dict[Any, RootMap]:
        """Per tensor (edge), the positions pruned by any group of ``plan``, as maps with -1 for
        kept and 0 for pruned entries (only the sign of a map matters once it is merged).

        Full-group map entries are -1 (kept) or root ids of that group, so ``t + 1`` indexes a
        table of the group's chosen root ids."""
        pruned: dict[Any, Tensor] = {}
        for group, positions in plan:
            edge_maps = group.edge_maps
            if not edge_maps:
                continue
            lut = self._value_lut(group, positions)
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
            m = converted[key]
            if m is not None:
                result[edge] = m
        return result

    def _execute(self, plan: list[tuple[Group, list[int]]]) -> None:
        if not plan:
            return
        with self._timed("pruning"):
            self._execute_plan(plan)

    def _execute_plan(self, plan: list[tuple[Group, list[int]]]) -> None:
        if self.fast_subsets:
            merged = self._merged(plan)
            try:
                merged.prune()
                return
            except (ValueError, PruningError):
                pass  # nothing was changed: fall back to one group at a time
        for group, positions in plan:
            root = group.root.dep
            values = self._root_channels(group, positions)
            try:
                sub = self.DG.get_pruning_group(root.target.module, root.handler, values)
                sub.prune()
            except (ValueError, PruningError) as e:
                warnings.warn(f"prune_callbacks: skipping the group of {root.target.name}: {e}", stacklevel=3)

    @staticmethod
    def _root_channels(group: Group, positions: list[int]) -> list[int]:
        """Channels of the root layer that belong to the root ids at ``positions``."""
        ids = group_index(group).ids
        chosen = {ids[p] for p in positions}
        root = group.root
        return [c for c, r in zip(root.idxs, root.root_idxs) if r in chosen]

    def _interactive(self, plan: list[tuple[Group, list[int]]]) -> Iterator[Group]:
        for group, positions in plan:
            root = group.root.dep
            values = self._root_channels(group, positions)
            try:
                sub = self.DG.get_pruning_group(root.target.module, root.handler, values)
            except ValueError as e:
                warnings.warn(f"prune_callbacks: skipping the group of {root.target.name}: {e}", stacklevel=2)
                continue
            yield sub
            self._groups = None

    # ------------------------------------------------------------------ MAC-driven pruning
    def _count_macs(self) -> int:
        with self._timed("macs"):
            return count_macs_and_params(self.model, self.example_inputs, self.forward_fn)[0]

    def _module_macs(self) -> tuple[int, dict[int, int]]:
        """Total MACs and MACs of every graph layer (by id) of one forward pass."""
        counter = FlopCounterMode(display=False)
        run = self.forward_fn or call_model
        with self._timed("macs"), _eval_no_grad(self.model), sdpa_kernel(SDPBackend.MATH), counter:
            run(self.model, self.example_inputs)
        counts = counter.get_flop_counts()
        total = int(counter.get_total_flops()) // 2
        prefix = type(self.model).__name__
        per: dict[int, int] = {}
        for name, module in self.model.named_modules():
            key = f"{prefix}.{name}" if name else prefix
            if key in counts and module in self.DG.module2node:
                per[id(module)] = int(sum(counts[key].values())) // 2
        return total, per

    def _speedup_goal(self, k: int) -> float:
        """MACs allowed after step ``k``: the MAC reduction ``1 - 1/target_speedup`` follows the
        schedule."""
        assert self.target_speedup is not None and self.dense_macs is not None
        fractions = self._ratios_for_macs(1.0 - 1.0 / self.target_speedup)
        return self.dense_macs * (1.0 - fractions[k])

    def _speedup_step(self, k: int) -> None:
        goal = self._speedup_goal(k)
        carried: dict[GroupKey, Tensor] = {}
        for attempt in range(4):
            groups = self.groups
            if attempt == 0:
                with self._timed("importance"):
                    scores = self._score(groups)
            else:
                scores = [carried.get(_group_key(g)) for g in groups]
                scores = [
                    s if s is not None and len(s) == group_index(g).n else None
                    for g, s in zip(groups, scores)
                ]
            plan = self._speedup_plan(groups, scores, goal)
            # remember the scores of the channels that stay, for a correction pass
            chosen = {_group_key(g): set(positions) for g, positions in plan}
            carried = {}
            for g, s in zip(groups, scores):
                if s is None:
                    continue
                drop = chosen.get(_group_key(g), set())
                carried[_group_key(g)] = s[[i for i in range(len(s)) if i not in drop]]
            self._execute(plan)
            self._groups = None
            self.last_macs = self._count_macs()
            if not plan or self.last_macs <= goal * (1.0 + 0.005):
                break
        if self.last_macs > goal * (1.0 + _SPEEDUP_TOLERANCE):
            warnings.warn(
                f"prune_callbacks: target_speedup={self.target_speedup} not reached at step {k + 1}: "
                f"{self.last_macs} MACs, wanted at most {int(goal)} (max_pruning_ratio, ignored layers or "
                "unprunable groups limit it)",
                stacklevel=3,
            )

    def _ratios_for_macs(self, mac_ratio: float) -> list[float]:
        kind = self._schedule_kind
        if isinstance(kind, list):
            last = kind[-1] or 1.0
            return [v / last * mac_ratio for v in kind]
        return ratio_schedule(min(mac_ratio, 0.999999), self.iterative_steps, kind)

    def _speedup_plan(
        self, groups: list[Group], scores: list[Tensor | None], goal: float
    ) -> list[tuple[Group, list[int]]]:
        """Global ranking with the smallest channel budget whose estimated MACs meet ``goal``.

        MACs are estimated per layer: a layer's measured MACs scale with the fraction of its
        input and of its output channels that stay (exact for convolutions and linear layers);
        MACs outside graph layers are taken as constant. The estimate of the final choice is
        checked and the budget raised if balancing made it miss.
        """
        total, per_module = self._module_macs()
        with self._timed("selection"):
            return self._speedup_plan_from(groups, scores, goal, total, per_module)

    def _speedup_plan_from(
        self,
        groups: list[Group],
        scores: list[Tensor | None],
        goal: float,
        total: int,
        per_module: dict[int, int],
    ) -> list[tuple[Group, list[int]]]:
        other = total - sum(per_module.values())
        local: list[int] = []
        glob: list[int] = []
        counts = [0] * len(groups)
        for i, (g, s) in enumerate(zip(groups, scores)):
            if s is None:
                continue
            fixed = self._fixed_count(g, self.current_step)
            if fixed is None:
                glob.append(i)
            else:
                local.append(i)
                counts[i] = fixed

        # per (node, side): channels and the groups' cumulative removal tables
        orders: dict[int, list[int]] = {}
        for i in local + glob:
            orders[i] = torch.sort(scores[i], stable=True).indices.tolist()
        contrib: dict[tuple[int, str], list[tuple[int, list[int]]]] = {}
        sizes: dict[tuple[int, str], int] = {}
        nodes: dict[int, Any] = {}
        for i, order in orders.items():
            g = groups[i]
            n = len(order)
            gi = group_index(g)
            identity = gi.identity
            pos = None if identity else {r: j for j, r in enumerate(gi.ids)}
            for item in g:
                node = item.dep.target
                if id(node.module) not in per_module:
                    continue
                side = getattr(item.dep.handler, "side", "out")
                size = self.DG.channel_count(node, side)
                if not size:
                    continue
                mult = [0] * n
                for r in item.root_idxs:
                    rp = r if identity else pos.get(r)
                    if rp is not None:
                        mult[rp] += 1
                cum = [0]
                for j in order:
                    cum.append(cum[-1] + mult[j])
                key = (id(node.module), side)
                contrib.setdefault(key, []).append((i, cum))
                sizes[key] = size
                nodes[id(node.module)] = node

        def estimate(cnt: list[int]) -> float:
            frac: dict[int, float] = {}
            for key, lst in contrib.items():
                removed = sum(cum[min(cnt[i], len(cum) - 1)] for i, cum in lst)
                f = max(0.0, 1.0 - removed / sizes[key])
                frac[key[0]] = frac.get(key[0], 1.0) * f
            return other + sum(m * frac.get(mid, 1.0) for mid, m in per_module.items())

        gl_groups = [groups[i] for i in glob]
        gl_scores = [scores[i] for i in glob]
        positions, n_cand = self._global_order(gl_groups, gl_scores)

        def counts_for(budget: int) -> list[int]:
            cnt = list(counts)
            for i, g, pos in zip(glob, gl_groups, positions):
                c = bisect.bisect_left(pos, budget)
                n_cur = group_index(g).n
                cnt[i] = n_cur - self._round_keep(n_cur - c, n_cur) if c else 0
            return cnt

        if estimate(counts_for(0)) <= goal:
            budget = 0
        else:
            lo, hi = 0, n_cand
            while lo < hi:
                mid = (lo + hi) // 2
                if estimate(counts_for(mid)) <= goal:
                    hi = mid
                else:
                    lo = mid + 1
            budget = lo
        plan: list[tuple[Group, list[int]]] = []
        for _ in range(6):
            cnt = counts_for(budget)
            plan = self._select_all(groups, scores, cnt)
            actual = list(counts)
            index = {_group_key(g): i for i, g in enumerate(groups)}
            for g, positions in plan:
                # a balanced selection may differ from the lowest-first order: its size is
                # used (exact when no balancing was needed)
                actual[index[_group_key(g)]] = len(positions)
            if estimate(actual) <= goal or budget >= n_cand:
                break
            budget = min(n_cand, budget + max(1, n_cand // 200))
        return plan
