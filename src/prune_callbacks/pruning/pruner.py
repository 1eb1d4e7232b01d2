"""The pruner: scores every coupled channel group, picks the channels to remove and removes them.

This is the engine behind the Lightning callback, and a plain-PyTorch API on its own::

    pruner = Pruner(model, example_inputs, MagnitudeImportance(p=2), pruning_ratio=0.5)
    pruner.step()                      # one pruning step (importance, ranking, pruning)

Its options are a :class:`~.settings.PruningSettings` (validated there, with the same rules and
messages as the callback and the app). One step:

1. **Groups.** The full-index groups of the dependency graph (every coupled set of channels
   once; groups that would change a model output, and ``ignored_layers``, are left out).
2. **Scores.** The importance criterion gives one score per root channel of each group.
3. **How many** (:mod:`.selection`). Local pruning: each group loses its share of its original
   channels; global pruning: the lowest channels of the whole model go. ``max_pruning_ratio``,
   ``pruning_ratio_dict``, head pruning and ``round_to`` apply. ``target_speedup`` replaces the
   ratio by a MAC budget met by global ranking (:mod:`.budget`).
4. **Which** (:mod:`.selection`). The lowest-scoring channels, balanced or reduced until the
   prune is valid; a group that still cannot be pruned is skipped with a warning. A step never
   stops half way.
5. **Prune** (:mod:`.subsets`). The chosen channels of all groups are removed in one atomic
   operation, recorded in the pruning history (plain data, see :mod:`.history`).

Calibration criteria (``"wanda"``, ``"flap"``, :mod:`.calibration`) score from activation
statistics: with ``calibration_data=batches`` the pruner records them itself before every step
(eval mode, ``no_grad``), and with ``calibration_blocks`` it does so block by block (sequential
calibration: each block is calibrated on the outputs of the blocks already pruned, then pruned).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..graph.apply import recorded_shapes
from ..graph.dependency import Group
from ..graph.dependency_graph import DEFAULT_ROOT_TYPES, DependencyGraph, gc_paused
from ..measure.flops import count_macs_and_params
from .budget import MacBudget
from .calibration import resolve_blocks
from .history import ModelTransaction, get_pruning_history
from .importance import (
    GradientImportance,
    GroupIndexCache,
    Importance,
    get_importance,
    group_index,
    group_indexes,
)
from .naming import lookup, resolve_modules, resolve_one
from .preview import PruningPreview, StepPreview, changes_of_records
from .selection import ChannelCounts, ChannelSelector, group_key
from .settings import PruningSettings
from .subsets import Plan, SubsetGroups
from .timing import PhaseListener, PhaseTimer

__all__ = ["SCHEDULES", "Pruner", "count_macs_and_params"]

SCHEDULES: tuple[str, ...] = ("linear", "cubic", "exponential")

#: Above the goal by this fraction after a speedup step: warn that the target was not reached.
_SPEEDUP_TOLERANCE = 0.03
#: Within this fraction of the goal a speedup step stops correcting.
_SPEEDUP_CLOSE = 0.005
#: Prune-and-measure rounds of one speedup step.
_SPEEDUP_ROUNDS = 4

#: The Pruner arguments that are fields of :class:`PruningSettings`.
_SETTING_ARGS = (
    "importance",
    "pruning_ratio",
    "pruning_ratio_dict",
    "global_pruning",
    "max_pruning_ratio",
    "iterative_steps",
    "schedule",
    "round_to",
    "ignored_layers",
    "prune_num_heads",
    "head_pruning_ratio",
    "target_speedup",
    "isomorphic",
)


class Pruner:
    """Structured channel pruner driven by a dependency graph (see the module docstring).

    The options from ``importance`` to ``target_speedup`` are those of
    :class:`~.settings.PruningSettings` and are validated by it (a
    :class:`~.settings.SettingsError` names the option and the fix before the model is touched).
    ``settings=`` gives them all at once; options passed as well (other than their defaults)
    replace the settings' values.

    Args:
        model: the model to prune in place.
        example_inputs: inputs for one forward pass (tensor, tuple of positional arguments or
            dict of keyword arguments), used to trace the model.
        importance: an :class:`~.importance.Importance` (or any ``fn(group) -> scores``) or a
            name: ``"magnitude"``, ``"l1"``, ``"l2"``, ``"lamp"``, ``"taylor"``, ``"fisher"``,
            ``"obd"``, ``"hessian"``, ``"bn_scale"``, ``"random"``, or the calibration criteria
            ``"wanda"`` and ``"flap"`` (see ``calibration_data``) (default: the settings' criterion,
            ``"taylor"``).
        pruning_ratio: fraction of the original channels of every group to remove after the
            last step, in [0, 1) (default 0.5, or the last ratio of an explicit schedule).
        pruning_ratio_dict: ``{module or name pattern or tuple of them: ratio}``; a group whose
            output layers include one of them uses that ratio (pruned locally).
        global_pruning: rank channels across groups instead of pruning each group by its share (default
            ``None``: only with ``target_speedup``, where ``False`` is an error).
        max_pruning_ratio: no group loses more than this fraction of its original channels.
        iterative_steps: number of :meth:`step` calls to reach ``pruning_ratio`` (default: the
            length of an explicit schedule, else 1).
        schedule: ``"linear"``, ``"cubic"`` (alias ``"agp"``, Zhu & Gupta), ``"exp"`` (alias
            ``"exponential"``) or an explicit list of cumulative ratios (one per step).
        round_to: channels kept per group are a multiple of this (when the group allows it);
            attention-head groups count heads and are not rounded.
        ignored_layers: modules, parameters, module classes or name patterns whose output
            channels must not change (their submodules too).
        prune_num_heads, head_pruning_ratio: attention projections are pruned by whole heads
            (their groups have one root id per head). With ``prune_num_heads=True`` every
            attention group loses ``head_pruning_ratio`` of its heads (locally, following the
            schedule); otherwise attention groups keep all their heads.
        target_speedup: prune (by global ranking) until the model's MACs are at most
            ``dense MACs / target_speedup`` (within 3%), > 1; an alternative to
            ``pruning_ratio`` (setting both is an error). With several steps, the MAC reduction
            follows the schedule.
        isomorphic: with global ranking, rank channels only among groups of the same structure
            (isomorphic pruning), each structure class losing the same fraction (see
            :class:`PruningSettings`).
        unwrapped_parameters: bare parameters to prune, ``{param or name: dim}``.
        customized_pruners: ``{module class: LayerPruner}`` for module types the library does
            not know.
        settings: all the options above at once.
        forward_fn, output_transform: passed to the graph (how to call the model, which outputs).
        root_module_types: layer types that root groups (default: convolutions, linear, LSTM,
            GRU, embeddings, multi-head attention).
        fast_subsets: build the subset group of each chosen channel set by filtering the
            full-index group (default), and remove the channels of all groups in one atomic
            prune. ``False`` searches the graph again for every group and prunes the groups one
            by one (slower; exact even for a full group whose root channels are coupled to each
            other, which filtering cannot see).
        calibration_data: for a calibration criterion (``"wanda"``, ``"flap"``): an iterable of
            batches (each a tensor, a tuple of positional arguments or a dict of keyword arguments,
            like ``example_inputs``; called through ``forward_fn`` when given) that the pruner runs
            before every step, in eval mode under ``no_grad`` (modes put back), recording the
            statistics the step scores with (those gathered before are replaced). A list or a
            ``DataLoader`` is read again at every step; a one-shot iterator is read into a list
            first. Passing it with any other criterion is an error.
        calibration_blocks: prune block by block (sequential calibration, see
            :mod:`.calibration`): ``"auto"`` (the repeated blocks of the model:
            :func:`~.calibration.repeated_blocks`), the name of an ``nn.ModuleList`` of blocks
            (``"model.layers"``), such a list, or a list of modules or names, in the order the
            forward runs them. Every step then calibrates block ``k`` on the model whose blocks
            before it are pruned already, prunes block ``k``'s groups, and goes on; groups not
            inside one block go with the last block. Needs ``calibration_data``; not with
            ``target_speedup`` or global ranking (scores of later blocks do not exist yet when an
            earlier block is pruned), nor with ``step(interactive=True)``. Each batch runs only up
            to the block being calibrated, so a step costs about ``n (n + 1) / 2`` block passes per
            batch for ``n`` blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        importance: Importance | Callable | str | None = None,
        pruning_ratio: float | None = None,
        pruning_ratio_dict: Mapping[Any, float] | None = None,
        global_pruning: bool | None = None,
        max_pruning_ratio: float = 1.0,
        iterative_steps: int | None = None,
        schedule: str | Sequence[float] = "linear",
        round_to: int | None = None,
        ignored_layers: Iterable[Any] | None = None,
        prune_num_heads: bool = False,
        head_pruning_ratio: float = 0.0,
        target_speedup: float | None = None,
        isomorphic: bool = False,
        unwrapped_parameters: Any = None,
        customized_pruners: Mapping[type, Any] | None = None,
        *,
        settings: PruningSettings | None = None,
        forward_fn: Callable | None = None,
        output_transform: Callable | None = None,
        root_module_types: Sequence[type] | None = None,
        fast_subsets: bool = True,
        calibration_data: Iterable[Any] | None = None,
        calibration_blocks: Any = None,
    ) -> None:
        """Check every argument (the model is not touched before), then trace the model."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        options = {name: value for name, value in locals().items() if name in _SETTING_ARGS}
        self.settings = s = PruningSettings.merged(settings, options)
        self.importance = get_importance(s.importance)
        #: The batches the pruner calibrates on before every step (None: the criterion is fed by hand).
        self.calibration_data: Iterable[Any] | None = _calibration_data(self.importance, calibration_data)
        #: The blocks of sequential calibration, in order (None: one-shot calibration).
        self.calibration_blocks: list[nn.Module] | None = None
        if calibration_blocks is not None:
            _check_sequential(s, self.calibration_data)
            self.calibration_blocks = resolve_blocks(model, calibration_blocks)
        self.ignored_layers: list[Any] = _ignored_modules(model, s.ignored_layers)
        self._counts = ChannelCounts.from_settings(s, _ratio_table(model, s.pruning_ratio_dict))
        unwrapped = _resolve_unwrapped(model, unwrapped_parameters)
        #: Cumulative ratio after each step (of ``pruning_ratio``).
        self.per_step_ratio: list[float] = list(self._counts.per_step_ratio)

        self.model = model
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self.root_module_types = tuple(root_module_types) if root_module_types else DEFAULT_ROOT_TYPES
        self.fast_subsets = bool(fast_subsets)
        self.current_step = 0
        #: MACs before the first step (measured with ``target_speedup`` only) and after the last.
        self.dense_macs: int | None = None
        self.last_macs: int | None = None
        self._timer = PhaseTimer()
        self._groups: list[Group] | None = None
        #: Groups whose prune failed verification, by root: never planned again (see :meth:`groups`).
        self.refused: dict[Any, str] = {}
        self._indexes = GroupIndexCache()  # flat indexes of the current groups
        with gc_paused():
            self._build(model, example_inputs, forward_fn, output_transform, unwrapped, customized_pruners)
        self.subsets = SubsetGroups(self.DG, fast=self.fast_subsets)
        self._selector = ChannelSelector(self.DG, self.subsets)
        self._budget: MacBudget | None = None
        if s.target_speedup is not None:
            self._budget = MacBudget(
                model,
                example_inputs,
                forward_fn,
                self.DG,
                self._counts,
                self._selector,
                s.target_speedup,
                self._timer,
            )
            self.dense_macs = self._budget.count_macs()

    def _build(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable | None,
        output_transform: Callable | None,
        unwrapped: Any,
        customized_pruners: Mapping[type, Any] | None,
    ) -> None:
        """Trace the model and note the original width of every group."""
        with self._timer("graph"):
            self.DG = DependencyGraph(history=get_pruning_history(model, create=True)).build_dependency(
                model,
                example_inputs,
                forward_fn=forward_fn,
                output_transform=output_transform,
                unwrapped_parameters=unwrapped,
                customized_pruners=customized_pruners,
                ignored_layers=self.ignored_layers,
            )
        with group_indexes(self._indexes):
            for g in self.groups:
                self._counts.remember(g)

    # ------------------------------------------------------------------ settings, read-only
    @property
    def pruning_ratio(self) -> float:
        """Fraction of every group's original channels removed after the last step."""
        return self.settings.ratio

    @property
    def target_speedup(self) -> float | None:
        return self.settings.target_speedup

    @property
    def iterative_steps(self) -> int:
        return self.settings.steps

    @property
    def schedule(self) -> str | list[float]:
        """``"linear"``, ``"cubic"``, ``"exp"`` or the explicit list of ratios."""
        return self.settings.schedule

    @property
    def global_pruning(self) -> bool:
        """Whether channels are ranked across groups (always so with ``target_speedup``)."""
        return self.settings.ranks_globally

    @property
    def max_pruning_ratio(self) -> float:
        return self.settings.max_pruning_ratio

    @property
    def round_to(self) -> int | None:
        return self.settings.round_to

    @property
    def prune_num_heads(self) -> bool:
        return self.settings.prune_num_heads

    @property
    def head_pruning_ratio(self) -> float:
        return self.settings.head_pruning_ratio

    # ------------------------------------------------------------------ public helpers
    @property
    def dg(self) -> DependencyGraph:
        return self.DG

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent per phase ("graph", "groups", "calibration", "importance", "selection",
        "pruning", "macs"), summed over the pruner's life; clear or replace it freely."""
        return self._timer.timings

    @timings.setter
    def timings(self, value: dict[str, float]) -> None:
        self._timer.timings = value

    @contextmanager
    def phase_listener(self, listener: PhaseListener) -> Iterator[None]:
        """Within the block, ``listener(phase, started)`` is called as each phase of the work
        ("importance", "selection", "pruning", "macs", ...) starts and ends: what a progress
        display needs during a long step on a big model. The previous listener is put back after."""
        previous, self._timer.listener = self._timer.listener, listener
        try:
            yield
        finally:
            self._timer.listener = previous

    @property
    def groups(self) -> list[Group]:
        """The current full-index groups (rebuilt lazily after each prune), without the groups
        whose prune failed verification (:attr:`refused`)."""
        if self._groups is None:
            with self._timer("groups"):
                groups = self.DG.get_all_groups(
                    ignored_layers=self.ignored_layers, root_module_types=self.root_module_types
                )
                self._groups = [g for g in groups if group_key(g) not in self.refused]
        return self._groups

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
        return self._counts.target_ratio(module, step)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data progress of the schedule (current step, channels each group root had before
        the first step, dense MACs), keyed by module/parameter names so it can be saved in a
        checkpoint and loaded into a pruner built on a fresh copy of the model."""
        names = {id(m): n for n, m in self.model.named_modules()}
        names.update({id(p): n for n, p in self.model.named_parameters()})
        init = {
            f"{names[mid]}|{side}": int(n) for (mid, side), n in self._counts.original.items() if mid in names
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
            self._counts.original[(id(target), side)] = int(n)
        if state.get("dense_macs") is not None:
            self.dense_macs = int(state["dense_macs"])

    def importance_reset(self) -> None:
        """Reset gradient statistics of the importance (done after every step)."""
        if isinstance(self.importance, GradientImportance) or getattr(
            self.importance, "requires_gradients", False
        ):
            reset = getattr(self.importance, "reset", None)
            if callable(reset):
                reset()

    # ------------------------------------------------------------------ the step
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
        self._check_calibration(interactive)
        with gc_paused(), group_indexes(self._indexes), self._transaction():
            return self._step(interactive)

    @property
    def calibrates(self) -> bool:
        """Whether the pruner calibrates its criterion itself before every step (``calibration_data``)."""
        return self.calibration_data is not None

    def _check_calibration(self, interactive: bool) -> None:
        """Refuse, before anything changes, a step that a calibration criterion cannot score."""
        if interactive and self.calibration_blocks is not None:
            raise ValueError(
                "step(interactive=True) with calibration_blocks: sequential calibration prunes each block "
                "before it calibrates the next, so the groups cannot be handed out first; call step() "
                "without interactive, or build the Pruner without calibration_blocks"
            )
        imp = self.importance
        if not getattr(imp, "requires_calibration", False) or self.calibrates:
            return
        if int(getattr(imp, "num_batches", 1)) == 0:
            raise RuntimeError(
                f"{type(imp).__name__} has no activation statistics to score with: pass "
                "calibration_data=batches to the Pruner (it then calibrates before every step), or run "
                "pruner.importance.calibrate(model, batches) before each step()"
            )

    @contextmanager
    def _transaction(self, dry_run: bool = False) -> Iterator[None]:
        """Make a step all or nothing: on any exception leaving it (``KeyboardInterrupt``
        included) the model and its history (a :class:`~.history.ModelTransaction`), the graph's
        recorded shapes and the schedule's position are put back as they were before the step.
        Each prune inside is a transaction of its own; this covers a step that prunes several
        times (groups one by one, speedup rounds). With ``dry_run`` everything is put back also
        when the block succeeds (:meth:`preview`)."""
        undo_shapes = recorded_shapes(e for node in self.DG.nodes for e in node.out_edges)
        state = (self.current_step, dict(self.refused), self.dense_macs, self.last_macs)

        def undo() -> None:
            undo_shapes()
            self.current_step, refused, self.dense_macs, self.last_macs = state
            self.refused.clear()
            self.refused.update(refused)
            self._invalidate_groups()

        try:
            with ModelTransaction(self.model):
                yield
                if dry_run:
                    raise _DryRunDone
        except _DryRunDone:
            undo()
        except BaseException:
            undo()
            raise

    def preview(self, steps: int | None = None) -> PruningPreview:
        """Dry run: what the next ``steps`` steps (default: all remaining) would remove, and the
        MACs and parameters after each, without changing anything.

        The steps run for real inside one transaction that is then rolled back (model, history,
        graph, schedule position, refused groups) and the criterion's state (gradient statistics,
        random generator) is put back, so parameters stay bitwise equal and the next
        :meth:`step` removes what the first previewed step showed. A gradient criterion's later
        steps depend on gradients not gathered yet: its preview stops after one step (the
        ``stopped`` field says so). Print the result for a table; ``to_dict()`` for plain data.
        """
        remaining = self.iterative_steps - self.current_step
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"preview(steps={steps!r}): pass a positive int, or None for every step left")
        wanted = remaining if steps is None else min(steps, remaining)
        if wanted > 0:
            self._check_calibration(False)
        macs, params = count_macs_and_params(self.model, self.example_inputs, self.forward_fn)
        # a criterion the pruner calibrates itself can score later steps too
        gradients = bool(getattr(self.importance, "requires_gradients", False)) and not self.calibrates
        saved = _criterion_state(self.importance, self.model)
        history = get_pruning_history(self.model)
        previews: list[StepPreview] = []
        stopped = "" if wanted == remaining else f"{remaining - wanted} later step(s) not asked for"
        try:
            with gc_paused(), group_indexes(self._indexes), self._transaction(dry_run=True):
                for n in range(wanted):
                    start = len(history)
                    self._step(False)
                    cost = count_macs_and_params(self.model, self.example_inputs, self.forward_fn)
                    changes = changes_of_records(history[start:])
                    previews.append(StepPreview(self.current_step, changes, *cost))
                    if gradients and n + 1 < wanted:
                        stopped = (
                            f"{type(self.importance).__name__} scores later steps with gradients "
                            "that are not gathered yet"
                        )
                        break
        finally:
            _restore_criterion_state(self.importance, self.model, saved)
        return PruningPreview(macs, params, tuple(previews), stopped)

    def _step(self, interactive: bool) -> Iterator[Group] | None:
        k = self.current_step
        if self.calibration_blocks is not None:
            self._sequential_step(self.calibration_blocks, k)
            self._finish_step()
            return None
        if self.calibrates:
            self._calibrate()
        budget = self._budget
        if budget is not None:
            if interactive:
                groups = self.groups
                with self._timer("importance"):
                    scores = self._score(groups)
                plan = budget.plan(groups, scores, self._speedup_goal(budget, k), k)
                self._finish_step()
                return self._interactive(plan)
            self._speedup_step(budget, k)
            self._finish_step()
            return None
        plan = self._plan(k)
        if interactive:
            self._finish_step()
            return self._interactive(plan)
        self._execute(plan)
        self._finish_step()
        return None

    def _plan(self, k: int) -> Plan:
        """What step ``k`` removes with a ratio target."""
        groups = self.groups
        with self._timer("importance"):
            scores = self._score(groups)
        with self._timer("selection"):
            counts = self._counts.counts(groups, scores, k)
            return self._selector.select_all(groups, scores, counts)

    def _calibrate(self, stop_after: nn.Module | None = None) -> None:
        """Replace the criterion's statistics by those of :attr:`calibration_data` on the model
        as it is now (each pass ends after ``stop_after`` when given)."""
        imp: Any = self.importance
        assert self.calibration_data is not None
        with self._timer("calibration"):
            imp.reset()
            imp.calibrate(self.model, self.calibration_data, self.forward_fn, stop_after=stop_after)

    def _sequential_step(self, blocks: list[nn.Module], k: int) -> None:
        """Step ``k`` block by block (see ``calibration_blocks``): calibrate block ``b`` on the
        model whose earlier blocks are pruned, prune the groups inside it (the groups inside no
        single block with the last one, calibrated by full passes), let the criterion finish
        (FLAP compensates with block ``b``'s statistics) and forget the statistics."""
        owner: dict[int, int] = {}
        for b, block in enumerate(blocks):
            owner.update((id(m), b) for m in block.modules())
            owner.update((id(p), b) for p in block.parameters())
        last = len(blocks) - 1
        for b, block in enumerate(blocks):
            groups = [g for g in self.groups if _block_of(g, owner) in ((b, None) if b == last else (b,))]
            if not groups:
                continue
            with _block_order(blocks) as order:
                self._calibrate(None if b == last else block)
            if order[: b + 1] != list(range(b + 1)):  # the blocks before b ran first, in order
                raise ValueError(
                    f"calibration_blocks: the blocks ran in the order {order[: b + 1]} while block {b} was "
                    "calibrated; list the blocks in the order the model's forward runs them"
                )
            with self._timer("importance"):
                scores = self._score(groups)
            with self._timer("selection"):
                counts = self._counts.counts(groups, scores, k)
                plan = self._selector.select_all(groups, scores, counts)
            self._execute(plan)
            self._invalidate_groups()
            self.importance_reset()

    def _speedup_step(self, budget: MacBudget, k: int) -> None:
        """Step ``k`` with a MAC target: plan, prune, measure; when the measured MACs miss the
        goal, plan again on the pruned model (scores of the channels that stayed are reused)."""
        goal = self._speedup_goal(budget, k)
        carried: dict[Any, Tensor] = {}
        for attempt in range(_SPEEDUP_ROUNDS):
            groups = self.groups
            if attempt == 0:
                with self._timer("importance"):
                    scores = self._score(groups)
            else:
                scores = [carried.get(group_key(g)) for g in groups]
                scores = [
                    s if s is not None and len(s) == group_index(g).n else None
                    for g, s in zip(groups, scores)
                ]
            plan = budget.plan(groups, scores, goal, k)
            # remember the scores of the channels that stay, for a correction pass
            chosen = {group_key(g): set(positions) for g, positions in plan}
            carried = {}
            for g, s in zip(groups, scores):
                if s is None:
                    continue
                drop = chosen.get(group_key(g), set())
                carried[group_key(g)] = s[[i for i in range(len(s)) if i not in drop]]
            self._execute(plan)
            self._invalidate_groups()
            self.last_macs = macs = budget.count_macs()
            if not plan or macs <= goal * (1.0 + _SPEEDUP_CLOSE):
                break
        if macs > goal * (1.0 + _SPEEDUP_TOLERANCE):
            warnings.warn(
                f"prune_callbacks: target_speedup={self.target_speedup} not reached at step {k + 1}: "
                f"{macs} MACs, wanted at most {int(goal)} (max_pruning_ratio, ignored layers or "
                "unprunable groups limit it)",
                stacklevel=3,
            )

    def _speedup_goal(self, budget: MacBudget, k: int) -> float:
        if self.dense_macs is None:
            self.dense_macs = budget.count_macs()
        return budget.goal(k, self.dense_macs)

    def _score(self, groups: list[Group]) -> list[Tensor | None]:
        """Scores of every group (CPU float, non-finite values made finite), None where the
        criterion cannot score a group."""
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

    def _execute(self, plan: Plan) -> None:
        if not plan:
            return
        with self._timer("pruning"):
            for group, reason in self.subsets.prune(plan):
                self.refused[group_key(group)] = reason

    def _interactive(self, plan: Plan) -> Iterator[Group]:
        for sub in self.subsets.graph_groups(plan):
            yield sub
            self._invalidate_groups()

    def _invalidate_groups(self) -> None:
        """The model changed: groups (and what was remembered about them) are rebuilt on demand."""
        self._groups = None
        self._indexes.clear()
        self.subsets.forget()

    def _finish_step(self) -> None:
        self.current_step += 1
        self._invalidate_groups()
        self.importance_reset()


def _block_of(group: Group, owner: Mapping[int, int]) -> int | None:
    """The block (position in ``owner``'s numbering) that holds every layer of ``group``; None
    when its layers are in several blocks or outside them all."""
    found = {owner.get(id(item.dep.target.module)) for item in group}
    return found.pop() if len(found) == 1 else None


@contextmanager
def _block_order(blocks: Sequence[nn.Module]) -> Iterator[list[int]]:
    """Within the block, the positions in ``blocks`` of the blocks that start running, in the
    order of their first call."""
    order: list[int] = []

    def hook(b: int) -> Callable[..., None]:
        def record(module: nn.Module, args: Any) -> None:
            if b not in order:
                order.append(b)

        return record

    handles = [block.register_forward_pre_hook(hook(b)) for b, block in enumerate(blocks)]
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


def _calibration_data(importance: Any, data: Iterable[Any] | None) -> Iterable[Any] | None:
    """``calibration_data`` checked against the criterion (a one-shot iterator read into a list)."""
    if data is None:
        return None
    if not getattr(importance, "requires_calibration", False):
        raise ValueError(
            f"calibration_data is read only by a calibration criterion (importance='wanda' or 'flap'), "
            f"not by {type(importance).__name__}: drop calibration_data, or use importance='wanda' / 'flap'"
        )
    if isinstance(data, (Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(
            f"calibration_data must be an iterable of batches (a list or a DataLoader), got a "
            f"{type(data).__name__}; wrap a single batch in a list: calibration_data=[batch]"
        )
    if iter(data) is data:  # a generator would be used up by the first step
        data = list(data)
    if isinstance(data, Sequence) and len(data) == 0:
        raise ValueError("calibration_data is empty: pass at least one batch")
    return data


def _check_sequential(settings: PruningSettings, data: Iterable[Any] | None) -> None:
    """Refuse ``calibration_blocks`` where sequential calibration cannot run."""
    if data is None:
        raise ValueError(
            "calibration_blocks needs calibration_data: every block is calibrated on the batches, with the "
            "earlier blocks pruned; pass calibration_data=batches"
        )
    if settings.target_speedup is not None or settings.ranks_globally:
        raise ValueError(
            "calibration_blocks with global ranking (global_pruning=True or target_speedup): a block is "
            "pruned before the later blocks are scored, so channels cannot be ranked across the model; "
            "use local pruning (pruning_ratio, global_pruning=False) or drop calibration_blocks"
        )


class _DryRunDone(BaseException):
    """Raised at the end of a dry run's transaction so that it rolls back (never escapes it)."""


def _criterion_state(importance: Any, model: nn.Module) -> Any:
    """A deep copy of the criterion's own state (None for criteria without ``state_dict``)."""
    save = getattr(importance, "state_dict", None)
    return copy.deepcopy(save(model)) if callable(save) else None


def _restore_criterion_state(importance: Any, model: nn.Module, state: Any) -> None:
    load = getattr(importance, "load_state_dict", None)
    if state is not None and callable(load):
        load(state, model)


# ---------------------------------------------------------------------------------------------
# Argument helpers (run before the model is touched)
# ---------------------------------------------------------------------------------------------

def _ignored_modules(model: nn.Module, specs: Iterable[Any]) -> list[Any]:
    """``ignored_layers`` resolved: the modules/parameters they select, submodules included."""
    out: list[Any] = []
    for obj in resolve_modules(model, specs, "ignored_layers"):
        out.extend(obj.modules() if isinstance(obj, nn.Module) else [obj])
    return out


def _ratio_table(model: nn.Module, ratio_dict: Mapping[Any, float]) -> dict[int, float]:
    """``pruning_ratio_dict`` resolved: the ratio of every module/parameter (by id) it selects,
    submodules included."""
    table: dict[int, float] = {}
    for key, value in ratio_dict.items():
        specs = key if isinstance(key, (tuple, list)) else [key]
        for spec in specs:
            for obj in resolve_one(model, spec, "pruning_ratio_dict"):
                for sub in obj.modules() if isinstance(obj, nn.Module) else [obj]:
                    table[id(sub)] = float(value)
    return table


def _resolve_unwrapped(model: nn.Module, unwrapped: Any) -> Any:
    """``unwrapped_parameters`` with parameter names replaced by the parameters."""
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
