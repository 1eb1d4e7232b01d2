"""``StructuredPruning``: gradient-importance iterative structural pruning inside ``Trainer.fit``.

Add the callback to a Trainer and the model shrinks while it trains::

    trainer = Trainer(max_epochs=20, callbacks=[StructuredPruning("taylor", target_speedup=2.0,
                                                                  start_epoch=5, end_epoch=9)])

The options are those of :class:`~prune_callbacks.pruning.settings.PruningSettings` (the one rulebook
shared with the :class:`~prune_callbacks.pruning.pruner.Pruner` and the app): a mistake raises the
same :class:`~prune_callbacks.pruning.settings.SettingsError` everywhere, when the callback is built.

What happens during ``fit``:

* **Fit start** (after the strategy has moved and wrapped the model): the dependency graph of the
  LightningModule is built from ``pl_module.example_input_array`` (or, when it is not set, from the
  first training batch through :meth:`StructuredPruning.example_inputs_from_batch`), every
  full-index group is enumerated and the dense MACs and parameter count are logged.
* **Training**: in the epochs that end with a prune, gradient importances (Taylor, Fisher)
  accumulate in ``on_before_optimizer_step``. Lightning calls that hook once per optimizer step,
  after every accumulated backward pass and after AMP has unscaled the gradients, and *before*
  gradient clipping (``configure_gradient_clipping`` runs right after the hook), so the statistics
  use the true, complete, unclipped gradient of the step.
* **Scheduled epoch ends** (after the epoch's last training batch, ``on_train_batch_end``, so
  before the epoch's validation; at ``on_train_epoch_end`` when the epoch ended otherwise): the
  groups are scored, the channels of this step of the schedule are chosen and removed. The
  validation that follows sees the pruned model, so a ``ModelCheckpoint`` or ``EarlyStopping``
  scores exactly the weights it saves or watches. The optimizer is kept: its per-parameter state
  (momentum, Adam moments...) is sliced with the same indices (:mod:`prune_callbacks.pruning.optim_state`),
  so training goes on where it was and LR schedulers keep working. Under DDP every rank uses rank 0's
  scores (so all ranks remove the same channels) and the ``DistributedDataParallel`` wrapper is
  rebuilt for the new parameter shapes (:mod:`.ddp`).
* **Logging** at every prune (:mod:`.loggers`): ``prune/macs``, ``prune/params``,
  ``prune/speedup``, ``prune/channel_ratio`` and ``prune/width/<group>`` through every logger of
  the Trainer; with a ``WandbLogger`` also a ``wandb.Table`` of the groups and a per-group width
  chart. A console table (:mod:`.summary`) sums the run up at the end of ``fit``.
* **Checkpoints** (:mod:`.checkpoint`): the callback state (schedule position, records, dense sizes,
  gradient statistics) is saved with the checkpoint; the pruning history is stored once, under the
  top-level key ``"prune_callbacks_history"``, which the state refers to.
  ``Trainer.fit(fresh_module, ckpt_path=...)`` replays the pruned structure on the fresh module right
  before its weights are loaded and continues the schedule. A checkpoint written after an epoch's
  last batch but before its prune (by a callback that runs before this one) resumes by making up
  the prune before the next step, with the saved gradient statistics.

**Several callbacks.** Two ``StructuredPruning`` callbacks may prune the same LightningModule when
they prune disjoint parts of it (different ``ignored_layers``, e.g. one ignores ``"model.head*"``
and the other everything else): each keeps its own state in the checkpoint (its :attr:`state_key`
names its ``ignored_layers``), and a callback whose graph was made stale by the other's prune
traces the model again before its next step. Callbacks that would prune the same channel groups
are refused at fit start (their ratios and schedules would fight over the same channels: use one
callback, with ``pruning_ratio_dict`` for per-layer ratios), and so are callbacks that prune after
the same epoch when one of them uses a gradient criterion (the first prune would invalidate the
statistics the second one gathered).

For inference, ``prune_callbacks.load_pruned(FreshLightningModule(...), "run.ckpt")`` rebuilds the
pruned module from any checkpoint of the run (read with ``weights_only=True``; weights-only
checkpoints included). The history names modules relative to the LightningModule
(``"model.layer1.0.conv1"``), like the keys of the checkpoint's ``"state_dict"``; to load the pruned
network into the bare ``nn.Module`` instead, strip that prefix with :func:`pruned_from_checkpoint`:
``load_pruned(MyNet(), pruned_from_checkpoint("run.ckpt", prefix="model."))``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ...layers import track_parameter_updates
from ...measure.flops import count_macs_and_params
from ...pruning.calibration import add_new_biases_to_optimizers
from ...pruning.history import get_pruning_history
from ...pruning.importance import get_importance
from ...pruning.naming import resolve_one
from ...pruning.optim_state import check_optimizer_state, prune_optimizer_state
from ...pruning.pruner import Pruner
from ...pruning.settings import PruningSettings
from ..records import dense_widths, group_widths, layer_sides, object_names, prune_record
from ..state import check_pruner_kwargs, importance_state, load_importance_state, plain, replay_history
from .checkpoint import (
    HISTORY_KEY,
    attach_checkpoint_hooks,
    detach_checkpoint_hooks,
    history_from_checkpoint,
    pruned_from_checkpoint,
    store_history,
)
from .ddp import (
    RankZeroScores,
    check_ranks_agree,
    check_strategy,
    rebuild_ddp_wrapper,
    release_ddp_wrapper,
    requires_gradients,
    world_size,
)
from .loggers import log_record, log_settings
from .optimizers import pending_grad_scale, unwrapped
from .progress import PruneProgress, wants_progress
from .summary import format_step_line, format_summary

__all__ = ["HISTORY_KEY", "StructuredPruning", "pruned_from_checkpoint"]

#: Version of :meth:`StructuredPruning.state_dict` (2: the history is referred to, not copied).
STATE_VERSION = 2


class StructuredPruning(Callback):
    """Iterative structural (channel) pruning during ``Trainer.fit``; see the module docstring.

    The pruning options are the fields of
    :class:`~prune_callbacks.pruning.settings.PruningSettings` (validated there, once): pass them as
    keyword arguments, or a whole ``settings=PruningSettings(...)``; options passed as well (other
    than their defaults) replace the settings' values, as in the Pruner.

    Args:
        importance: criterion name (``"taylor"``, ``"fisher"``, ``"obd"``, ``"hessian"``,
            ``"magnitude"``, ``"l1"``, ``"l2"``, ``"lamp"``, ``"bn_scale"``, ``"random"``) or an
            importance object.
        pruning_ratio: fraction of every group's channels removed by the last step, in [0, 1).
        target_speedup: instead of a ratio, prune until ``dense MACs / MACs`` reaches this (> 1)
            at the last step. Intermediate steps follow ``schedule`` on the MAC reduction
            ``1 - 1/target_speedup`` (e.g. linear: equal MAC cuts per step). Channels are then
            ranked globally, since a MAC budget cannot be split per layer in advance. Setting both
            is an error; default when neither is set: ``pruning_ratio=0.5``.
        epochs: explicit 0-based epochs after which to prune; otherwise ``start_epoch`` to
            ``end_epoch`` (inclusive; default: as many epochs as steps, one step by default)
            every ``every_n_epochs``. One pruning step per listed epoch.
        schedule: how the target is spread over the steps: ``"linear"``, ``"cubic"`` (alias
            ``"agp"``), ``"exp"`` (alias ``"exponential"``) or one cumulative ratio per step.
        global_pruning: rank channels across all groups instead of pruning each group evenly (default
            ``None``: only with ``target_speedup``, where ``False`` is an error).
        max_pruning_ratio: no group loses more than this fraction of its channels.
        round_to: keep channel counts multiples of this (e.g. 8 for tensor cores).
        ignored_layers: names or glob patterns of layers whose output channels are kept. A name
            is looked up in the LightningModule; one that matches nothing there is also tried as
            a suffix (``"fc"`` finds ``"model.fc"``).
        pruning_ratio_dict: ``{name or pattern: ratio}`` for layers with their own ratio.
        prune_num_heads, head_pruning_ratio: attention-head pruning options of the pruner.
        importance_batches: optimizer steps of gradient statistics gathered before each prune:
            the last ``importance_batches`` steps of the pruning epoch (default: all its steps).
            Only gradient criteria use them; no statistics are gathered in other epochs.
        log_group_widths: also log ``prune/width/<group>`` (channels kept) for every group.
        verbose: print the dense cost at fit start and the summary table at fit end.
        hold_early_stopping: keep ``Trainer.fit`` going at least until the epoch of the last
            prune (through the fit loop's ``min_epochs``, restored at fit end), so that
            ``EarlyStopping`` cannot end it before the schedule is done. Without it, a run that
            stops early warns at fit end which prunes did not run and what the model reached.
        isomorphic: with global ranking, rank channels only among groups of the same structure,
            each structure class losing the same fraction (isomorphic pruning).
        pruner_kwargs: the Pruner's arguments that are not pruning settings
            (``unwrapped_parameters``, ``customized_pruners``, ``forward_fn``, ``output_transform``,
            ``root_module_types``, ``fast_subsets``).
        iterative_steps: number of pruning steps (default: the length of an explicit schedule,
            else the number of pruning epochs, else 1); with only ``start_epoch`` set, the callback
            prunes after that many consecutive epochs (``every_n_epochs`` apart).
        settings: all of the above (except ``pruner_kwargs``) as one validated object.

    Raises:
        SettingsError: (a ``ValueError``) for an invalid option, naming it and the fix.
    """

    def __init__(
        self,
        importance: str | Any = "taylor",
        pruning_ratio: float | None = None,
        target_speedup: float | None = None,
        epochs: Sequence[int] | int | None = None,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int = 1,
        schedule: str | Sequence[float] = "linear",
        global_pruning: bool | None = None,
        max_pruning_ratio: float = 1.0,
        round_to: int | None = None,
        ignored_layers: Sequence[str] | None = None,
        pruning_ratio_dict: Mapping[str, float] | None = None,
        prune_num_heads: bool = False,
        head_pruning_ratio: float = 0.0,
        importance_batches: int | None = None,
        log_group_widths: bool = True,
        verbose: bool = True,
        pruner_kwargs: Mapping[str, Any] | None = None,
        iterative_steps: int | None = None,
        hold_early_stopping: bool = False,
        isomorphic: bool = False,
        *,
        settings: PruningSettings | None = None,
    ) -> None:
        """Validate every option into :attr:`settings` (see the class docstring); long only
        because it lists each keyword argument once, by name, for :class:`PruningSettings`."""
        super().__init__()
        given: dict[str, Any] = {
            "importance": importance,
            "pruning_ratio": pruning_ratio,
            "target_speedup": target_speedup,
            "iterative_steps": iterative_steps,
            "schedule": schedule,
            "global_pruning": global_pruning,
            "max_pruning_ratio": max_pruning_ratio,
            "round_to": round_to,
            "ignored_layers": [] if ignored_layers is None else ignored_layers,
            "pruning_ratio_dict": {} if pruning_ratio_dict is None else pruning_ratio_dict,
            "prune_num_heads": prune_num_heads,
            "head_pruning_ratio": head_pruning_ratio,
            "epochs": epochs,
            "start_epoch": start_epoch,
            "end_epoch": end_epoch,
            "every_n_epochs": every_n_epochs,
            "importance_batches": importance_batches,
            "log_group_widths": log_group_widths,
            "verbose": verbose,
            "hold_early_stopping": hold_early_stopping,
            "isomorphic": isomorphic,
        }
        self.settings: PruningSettings = PruningSettings.merged(settings, given)
        self.pruner_kwargs: dict[str, Any] = check_pruner_kwargs(pruner_kwargs, "StructuredPruning")
        self.importance: Any = get_importance(self.settings.importance)

        self.pruner: Pruner | None = None
        self.example_inputs: Any = None
        self.records: list[dict[str, Any]] = []
        self.steps_done = 0
        self._min_epochs: tuple[Any, int | None] | None = None  # (fit loop, its min_epochs) held
        self.dense_macs: int | None = None
        self.dense_params: int | None = None
        self._dense_widths: dict[str, dict[str, Any]] = {}
        self._layers: frozenset[tuple[str, str]] = frozenset()
        self._seen_history = 0
        self._window_epoch: int | None = None
        self._batch_idx = 0
        self._module_ref: Callable[[], Any] | None = None
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public helpers
    @property
    def prune_epochs(self) -> list[int]:
        """The 0-based epochs after which the callback prunes, one per step."""
        return self.settings.prune_epochs()

    @property
    @override
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint: the class and its ``ignored_layers``.

        Callbacks that may coexist on one module prune disjoint parts of it, so they differ in
        ``ignored_layers``; the other settings (schedule, ratios) stay out of the key so that a
        run can be resumed with them changed. Objects (modules) count by their type name.
        Lightning refuses two callbacks with the same key in one Trainer: they would prune the
        same groups.
        """
        ignored = [
            s if isinstance(s, str) else getattr(s, "__name__", type(s).__name__)
            for s in self.settings.ignored_layers
        ]
        return self._generate_state_key(ignored_layers=ignored)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Plain-data records of every group prune so far (see :mod:`prune_callbacks.pruning.history`)."""
        module = self._module_ref() if self._module_ref is not None else None
        return list(get_pruning_history(module)) if module is not None else []

    @property
    def traced_module(self) -> pl.LightningModule | None:
        """The LightningModule whose graph this callback built (``None`` before it did)."""
        module = self._module_ref() if self._module_ref is not None else None
        return module if self.pruner is not None else None

    @property
    def pruned_layers(self) -> frozenset[tuple[str, str]]:
        """``(layer name, pruning function)`` of every layer side this callback's groups change
        (known once the graph is built); two callbacks on one module must not share any."""
        return self._layers

    def example_inputs_from_batch(self, batch: Any, pl_module: pl.LightningModule) -> Any:
        """Example inputs taken from the first training batch when ``example_input_array`` is not set.

        The default takes one sample of a tensor batch, or of the first element of an ``(x, y, ...)``
        tuple or list; it returns ``None`` for other layouts. Override it for dict batches or models
        with several inputs (return a tensor, a tuple of positional arguments or a dict of keyword
        arguments of ``pl_module.forward``).
        """
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x[:1]
        return None

    def restore_structure(self, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> None:
        """Give ``pl_module`` the pruned structure recorded in ``checkpoint``.

        Called from the module's ``on_load_checkpoint`` (installed in :meth:`setup`, see
        :mod:`.checkpoint`), right before the checkpoint's weights load; the graph is traced
        again at fit start when the structure changed.
        """
        history = history_from_checkpoint(checkpoint, self.state_key)
        replay_history(
            pl_module, history, self.pruner_kwargs.get("customized_pruners"), self.example_inputs
        )
        if len(get_pruning_history(pl_module)) != self._seen_history:
            self.pruner = None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse unsupported strategies and conflicting pruning callbacks, then hook into checkpoint
        loading and saving of the module (see :mod:`.checkpoint` for why the module's hooks)."""
        check_strategy(trainer.strategy)
        for other in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's CallbackConnector
            if isinstance(other, StructuredPruning) and other is not self:
                self._check_compatible(other)
        attach_checkpoint_hooks(pl_module, self)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the checkpoint hooks installed in :meth:`setup`; give the fit loop back its
        ``min_epochs`` if a fit ended without reaching :meth:`on_fit_end` (an exception)."""
        detach_checkpoint_hooks(pl_module, self)
        self._release_min_epochs()

    def _release_min_epochs(self) -> None:
        """Undo :attr:`~PruningSettings.hold_early_stopping`'s ``min_epochs`` (once)."""
        if self._min_epochs is not None:
            loop, min_epochs = self._min_epochs
            loop.min_epochs = min_epochs
            self._min_epochs = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the graph from ``example_input_array`` (else wait for the first batch)."""
        max_epochs = trainer.max_epochs
        epochs = self.prune_epochs
        if max_epochs is not None and max_epochs >= 0 and epochs[-1] >= max_epochs:
            rank_zero_warn(
                f"StructuredPruning: training stops after epoch {max_epochs - 1} but pruning is scheduled "
                f"after epochs {epochs}; the last steps will not run (raise max_epochs)"
            )
        if self.settings.hold_early_stopping:
            loop = trainer.fit_loop
            self._min_epochs = (loop, loop.min_epochs)
            loop.min_epochs = max(loop.min_epochs or 0, epochs[-1] + 1)
        if self.pruner is not None and self._module_ref is not None and self._module_ref() is pl_module:
            return
        self.pruner = None
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            self._build(trainer, pl_module, example)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Build the graph from the first batch if needed; run prunes missed by a resume."""
        self._batch_idx = batch_idx
        if self.pruner is None:
            example = self.example_inputs_from_batch(batch, pl_module)
            if example is None:
                raise ValueError(
                    "StructuredPruning needs example inputs to trace the model: set "
                    f"`self.example_input_array` in {type(pl_module).__name__}.__init__ (a tensor, a tuple "
                    "of positional arguments or a dict of keyword arguments of forward), or subclass "
                    "StructuredPruning and override example_inputs_from_batch(batch, pl_module) to "
                    f"pick them from a batch (got a batch of type {type(batch).__name__})"
                )
            self._build(trainer, pl_module, example)
        epochs, epoch = self.prune_epochs, trainer.current_epoch
        while self.steps_done < len(epochs) and epochs[self.steps_done] < epoch:
            self._prune(trainer, pl_module, epochs[self.steps_done])
        if getattr(self.importance, "requires_calibration", False) and self._accumulating(trainer):
            self._start_window(trainer)
            self.importance.attach(pl_module)  # record this batch's forward (Wanda, FLAP)

    def _start_window(self, trainer: pl.Trainer) -> None:
        """Forget the statistics of an earlier epoch when the first batch of a window arrives."""
        epoch = trainer.current_epoch
        if self._window_epoch != epoch:
            reset = getattr(self.importance, "reset", None)
            if callable(reset):
                reset()
            self._window_epoch = epoch

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Accumulate gradient importance: gradients are final here (all micro-batches summed,
        AMP-unscaled) and not yet clipped, which happens right after this hook."""
        if not self._accumulating(trainer):
            return
        self._start_window(trainer)
        self.importance.accumulate(pl_module, grad_scale=pending_grad_scale(trainer, optimizer))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Prune after the last training batch of a scheduled epoch, before that epoch's
        validation: the metrics a ``ModelCheckpoint`` or ``EarlyStopping`` reads at the end of the
        epoch are then those of the pruned model, the model that the checkpoint saves."""
        if _last_batch(trainer, batch_idx):
            self._prune_due(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune when this epoch is (or passed) the next scheduled one and the last batch did not
        (an epoch cut short by ``max_steps``, or of unknown length)."""
        self._prune_due(trainer, pl_module)

    def _prune_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs, epoch = self.prune_epochs, trainer.current_epoch
        while self.steps_done < len(epochs) and epochs[self.steps_done] <= epoch:
            self._prune(trainer, pl_module, epochs[self.steps_done])

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn when fit ended before the schedule did; print the summary table; give the fit
        loop back its own ``min_epochs``."""
        self._release_min_epochs()
        epochs = self.prune_epochs
        if self.steps_done < len(epochs):
            reached = self.records[-1]["speedup"] if self.records else 1.0
            goal = self.settings.target_speedup
            target = f"target_speedup={goal}" if goal is not None else f"pruning_ratio={self.settings.ratio}"
            rank_zero_warn(
                f"StructuredPruning: training ended after epoch {trainer.current_epoch} with "
                f"{self.steps_done} of {len(epochs)} scheduled prunes done (after epochs {epochs}); "
                f"the model has {reached:.2f}x fewer MACs than dense, short of {target}. An early "
                "stop (EarlyStopping, max_steps, max_time) ended fit first: pass "
                "hold_early_stopping=True to train at least until the last prune"
            )
        if self.settings.verbose and self.records:
            rank_zero_info(format_summary(self.records))

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store the pruning history under the top-level ``"prune_callbacks_history"`` key.

        The module hook installed in :meth:`setup` does the same (it also covers weights-only
        checkpoints); this hook covers ``trainer.save_checkpoint`` after ``fit`` has ended and the
        module hook is gone. Either way the key holds the one copy of the history.
        """
        store_history(checkpoint, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Schedule position, records, dense sizes, pruner counters and gradient statistics; the
        history is not copied here (``"history_key"`` names the top-level key that holds it)."""
        module = self._module_ref() if self._module_ref is not None else None
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "prune_epochs": self.prune_epochs,
            "steps_done": self.steps_done,
            "records": plain(self.records),
            "dense_macs": self.dense_macs,
            "dense_params": self.dense_params,
            "dense_widths": plain(self._dense_widths),
            "window_epoch": self._window_epoch,
            "history_key": HISTORY_KEY,
        }
        if self.pruner is not None and module is not None:
            state["pruner"] = self.pruner.state_dict()
            state["importance"] = importance_state(self.importance, module)
        elif self._pending_state is not None:
            state["pruner"] = self._pending_state.get("pruner")
            state["importance"] = self._pending_state.get("importance")
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule position; pruner and importance state are applied once the graph
        is built (at fit start)."""
        if state_dict.get("prune_epochs") != self.prune_epochs:
            rank_zero_warn(
                "StructuredPruning: the checkpoint was written with pruning epochs "
                f"{state_dict.get('prune_epochs')}, this callback has {self.prune_epochs}; the "
                f"schedule continues from step {state_dict.get('steps_done', 0)} with the new epochs"
            )
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.records = [dict(r) for r in state_dict.get("records", [])]
        self.dense_macs = state_dict.get("dense_macs")
        self.dense_params = state_dict.get("dense_params")
        self._dense_widths = {k: dict(v) for k, v in state_dict.get("dense_widths", {}).items()}
        self._window_epoch = state_dict.get("window_epoch")
        self._pending_state = {"pruner": state_dict.get("pruner"), "importance": state_dict.get("importance")}
        self.pruner = None

    # ------------------------------------------------------------------ several callbacks
    def _check_compatible(self, other: StructuredPruning) -> None:
        """Refuse a second pruning callback that prunes after the same epoch when either uses a
        gradient criterion (see the module docstring). Two callbacks with the same state key are
        refused by Lightning itself when the Trainer is built."""
        shared = sorted(set(self.prune_epochs) & set(other.prune_epochs))
        if shared and (requires_gradients(self.importance) or requires_gradients(other.importance)):
            raise ValueError(
                f"two StructuredPruning callbacks prune after epoch(s) {shared} and one of them uses a "
                "gradient criterion: the first prune would change layers whose gradient statistics the "
                "second one gathered. Schedule them at different epochs, or use one callback"
            )

    def _check_disjoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to share a layer side with another pruning callback already built on the module."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's CallbackConnector
            if not isinstance(other, StructuredPruning) or other is self:
                continue
            if other.traced_module is not pl_module:
                continue
            common = sorted(self.pruned_layers & other.pruned_layers)
            if common:
                name, function = common[0]
                raise ValueError(
                    f"two StructuredPruning callbacks would prune the same layers ({len(common)} in "
                    f"common, e.g. {name} via {function}), so their ratios and schedules would fight over "
                    "the same channels; use one callback (pruning_ratio_dict sets per-layer ratios), or "
                    "split the model between them with ignored_layers"
                )

    # ------------------------------------------------------------------ internals
    def _new_pruner(self, pl_module: pl.LightningModule) -> Pruner:
        """A pruner on ``pl_module`` from this callback's settings, with layer names looked up in
        the LightningModule and, under DDP, rank 0's scores."""
        importance: Any = self.importance
        if world_size() > 1:
            importance = RankZeroScores(importance)
        ratio_dict = {
            tuple(_resolve_names(pl_module, [k], "pruning_ratio_dict")): v
            for k, v in self.settings.pruning_ratio_dict.items()
        }
        settings = self.settings.replace(
            importance=importance,
            ignored_layers=_resolve_names(pl_module, self.settings.ignored_layers, "ignored_layers"),
            pruning_ratio_dict=ratio_dict,
        )
        return Pruner(pl_module, self.example_inputs, settings=settings, **self.pruner_kwargs)

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any) -> None:
        """Trace the model, enumerate the groups and log the dense cost (or restore a resumed run)."""
        example = move_data_to_device(example, pl_module.device)
        self.example_inputs = trainer.precision_plugin.convert_input(example)
        self.pruner = self._new_pruner(pl_module)
        self._module_ref = weakref.ref(pl_module)
        self._seen_history = len(get_pruning_history(pl_module))
        names = object_names(pl_module)
        self._layers = layer_sides(self.pruner.groups, names)
        self._check_disjoint(trainer, pl_module)
        pending, self._pending_state = self._pending_state, None
        if pending is not None and pending.get("pruner") is not None:
            self.pruner.load_state_dict(pending["pruner"])
            load_importance_state(self.importance, pl_module, pending.get("importance"))
            return
        self.steps_done = 0
        self._dense_widths = dense_widths(self.pruner.groups, names)
        forward_fn = self.pruner_kwargs.get("forward_fn")
        macs, params = count_macs_and_params(pl_module, self.example_inputs, forward_fn)
        self.dense_macs, self.dense_params = int(macs), int(params)
        record = self._record(pl_module, step=0, epoch=None, global_step=trainer.global_step, before=None)
        self.records = [record]
        log_record(trainer, record, dense=True, group_widths=self.settings.log_group_widths)
        log_settings(trainer, self.settings, self.prune_epochs)
        if self.settings.verbose:
            rank_zero_info(
                f"StructuredPruning: {len(self._dense_widths)} prunable groups; dense model "
                f"{macs / 1e6:.2f} M MACs, {params / 1e6:.3f} M parameters; pruning after epochs "
                f"{self.prune_epochs}"
            )

    def _current_pruner(self, pl_module: pl.LightningModule) -> Pruner:
        """The pruner, traced again (schedule state kept) when another callback pruned the module
        since this one last looked: its graph would describe the old shapes."""
        pruner = self.pruner
        if pruner is None:
            raise RuntimeError(
                "StructuredPruning: the model was never traced (no training batch was seen); "
                "set example_input_array on the LightningModule"
            )
        if len(get_pruning_history(pl_module)) != self._seen_history:
            state = pruner.state_dict()
            pruner = self.pruner = self._new_pruner(pl_module)
            pruner.load_state_dict(state)
            self._seen_history = len(get_pruning_history(pl_module))
        return pruner

    def _accumulating(self, trainer: pl.Trainer) -> bool:
        """Whether this optimizer step's gradients feed the importance of the next prune."""
        if self.pruner is None or not requires_gradients(self.importance):
            return False
        epochs = self.prune_epochs
        if self.steps_done >= len(epochs) or trainer.current_epoch != epochs[self.steps_done]:
            return False
        window = self.settings.importance_batches
        if window is None:
            return True
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return True
        per_step = max(1, int(trainer.accumulate_grad_batches))
        steps = math.ceil(batches / per_step)
        return steps - self._batch_idx // per_step <= window

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """One pruning step: score, prune, follow with optimizer state and DDP, log."""
        pruner = self._current_pruner(pl_module)
        if requires_gradients(self.importance) and getattr(self.importance, "num_batches", 1) == 0:
            raise RuntimeError(
                f"StructuredPruning: no gradient statistics were gathered in epoch {epoch} for the "
                f"{type(self.importance).__name__} criterion (did any optimizer step run? "
                "training_step must return a loss); use importance='magnitude' for a criterion "
                "without gradients"
            )
        optimizers = [unwrapped(opt) for opt in trainer.optimizers]
        check_optimizer_state(optimizers)
        before = self._widths(pl_module)
        wrapped = release_ddp_wrapper(trainer, pl_module)
        try:
            with self._progress(trainer, pruner), track_parameter_updates() as updates:
                pruner.step()
            prune_optimizer_state(optimizers, updates)
            add_new_biases_to_optimizers(optimizers, pl_module)
        finally:
            if wrapped:
                rebuild_ddp_wrapper(trainer)
        if world_size() > 1:
            check_ranks_agree(pl_module)
        self._seen_history = len(get_pruning_history(pl_module))
        self.steps_done += 1
        record = self._record(pl_module, self.steps_done, epoch, trainer.global_step, before)
        self.records.append(record)
        log_record(trainer, record, dense=False, group_widths=self.settings.log_group_widths)
        if self.settings.verbose:
            rank_zero_info(format_step_line(record, len(self.prune_epochs)))

    def _progress(self, trainer: pl.Trainer, pruner: Pruner) -> AbstractContextManager[Any]:
        """A bar for a long step (rank zero, trainer with a progress bar, ``verbose``), else nothing."""
        if not (self.settings.verbose and wants_progress(trainer)):
            return nullcontext()
        stack = ExitStack()
        progress = stack.enter_context(PruneProgress(self.steps_done + 1, len(self.prune_epochs)))
        stack.enter_context(pruner.phase_listener(progress))
        return stack

    def _widths(self, pl_module: pl.LightningModule) -> dict[str, int]:
        """Current channels of every group root recorded at fit start."""
        assert self.pruner is not None
        return group_widths(self.pruner.DG, pl_module, self._dense_widths)

    def _record(
        self,
        pl_module: pl.LightningModule,
        step: int,
        epoch: int | None,
        global_step: int,
        before: Mapping[str, int] | None,
    ) -> dict[str, Any]:
        """The record of one pruning step (step 0: the dense model), see :mod:`.records`."""
        assert self.dense_macs is not None
        cost = count_macs_and_params(pl_module, self.example_inputs, self.pruner_kwargs.get("forward_fn"))
        widths = self._widths(pl_module)
        return prune_record(
            step, epoch, global_step, cost, self.dense_macs, self._dense_widths, widths, before
        )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _last_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` ends the training epoch (the epoch length, cut by
    ``limit_train_batches``, or the data fetcher's look-ahead for loaders without a length)."""
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    progress = getattr(trainer.fit_loop.epoch_loop, "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))


def _resolve_names(model: nn.Module, specs: Sequence[Any], what: str) -> list[Any]:
    """Modules/parameters for names or patterns; unmatched names are retried as suffixes so that
    ``"fc"`` finds ``"model.fc"`` inside a LightningModule (objects pass through)."""
    out: list[Any] = []
    for spec in specs:
        if not isinstance(spec, str):
            out.append(spec)
            continue
        try:
            out.extend(resolve_one(model, spec, what))
        except ValueError as first:
            try:
                out.extend(resolve_one(model, "*." + spec, what))
            except ValueError:
                raise first from None
    return out
