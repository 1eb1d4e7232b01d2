"""``StructuredPruning``: gradient-importance iterative structural pruning inside ``Trainer.fit``.

Add the callback to a Trainer and the model shrinks while it trains::

    trainer = Trainer(max_epochs=20, callbacks=[StructuredPruning("taylor", target_speedup=2.0,
                                                                  start_epoch=5, end_epoch=9)])

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
* **Scheduled epoch ends** (``on_train_epoch_end``): the groups are scored, the channels of this
  step of the schedule are chosen and removed. The optimizer is kept: its per-parameter state
  (momentum, Adam moments...) is sliced with the same indices (:mod:`.optim_state`), so training
  goes on where it was and LR schedulers keep working. Under DDP every rank uses rank 0's scores
  (so all ranks remove the same channels) and the ``DistributedDataParallel`` wrapper is rebuilt
  for the new parameter shapes.
* **Logging** at every prune: ``prune/macs``, ``prune/params``, ``prune/speedup``,
  ``prune/channel_ratio`` and ``prune/width/<group>`` through every logger of the Trainer; with a
  ``WandbLogger`` also a ``wandb.Table`` of the groups and a per-group width chart. A console
  table sums the run up at the end of ``fit``.
* **Checkpoints**: the callback state (history, schedule position, dense sizes, gradient
  statistics) is saved with the checkpoint, and the pruning history also goes to the top-level key
  ``"prune_callbacks_history"``. ``Trainer.fit(fresh_module, ckpt_path=...)`` replays the pruned
  structure on the fresh module right before its weights are loaded (from a hook on the module's
  ``on_load_checkpoint``: ``trainer.ckpt_path`` is not yet known in ``setup``) and continues the
  schedule. A checkpoint written at validation end, before that epoch's prune, resumes by making up
  the prune before the next step, with the saved gradient statistics.

For inference, ``prune_callbacks.load_pruned(FreshLightningModule(...), "run.ckpt")`` rebuilds the
pruned module from any checkpoint of the run (read with ``weights_only=True``; weights-only
checkpoints included). The history names modules relative to the LightningModule
(``"model.layer1.0.conv1"``), like the keys of the checkpoint's ``"state_dict"``; to load the pruned
network into the bare ``nn.Module`` instead, strip that prefix with :func:`pruned_from_checkpoint`:
``load_pruned(MyNet(), pruned_from_checkpoint("run.ckpt", prefix="model."))``.
"""

from __future__ import annotations

import gc
import math
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from ...measure.flops import count_macs_and_params
from ...pruning.history import CHECKPOINT_HISTORY_KEY, PRUNED_FORMAT, apply_pruning_history, get_pruning_history
from ...pruning.importance import get_importance
from ...pruning.naming import lookup, resolve_one
from ...pruning.optim_state import check_optimizer_state, prune_optimizer_state
from ...pruning.pruner import Pruner
from ...layers import track_parameter_updates
from ...pruning.schedule import SCHEDULE_KINDS
from .summary import format_summary

__all__ = ["HISTORY_KEY", "StructuredPruning", "pruned_from_checkpoint"]

#: Top-level checkpoint key of the pruning history (shared with :func:`prune_callbacks.load_pruned`).
HISTORY_KEY = CHECKPOINT_HISTORY_KEY
_STATE_VERSION = 1
_OWNER_ATTR = "_prune_callbacks_owner"
_SCHEDULES = (*SCHEDULE_KINDS, "exponential")


# ---------------------------------------------------------------------------------------------
# Argument checks (all at construction, so a bad config fails before anything trains)
# ---------------------------------------------------------------------------------------------


def _epoch_index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an epoch index (an integer >= 0), got {value!r}")
    return value


def _prune_epochs(
    epochs: Sequence[int] | int | None, start_epoch: int, end_epoch: int | None, every_n_epochs: int
) -> list[int]:
    """The 0-based epochs after which to prune, from an explicit list or a start/end/every range."""
    if epochs is not None:
        values = [epochs] if isinstance(epochs, int) and not isinstance(epochs, bool) else list(epochs)
        if not values:
            raise ValueError("epochs must list at least one epoch, e.g. epochs=[2, 4, 6]")
        values = [_epoch_index(e, "every entry of epochs") for e in values]
        if sorted(set(values)) != values:
            raise ValueError(f"epochs must be strictly increasing, got {values}; e.g. epochs=[2, 4, 6]")
        return values
    start = _epoch_index(start_epoch, "start_epoch")
    end = start if end_epoch is None else _epoch_index(end_epoch, "end_epoch")
    if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
        raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
    if end < start:
        raise ValueError(f"end_epoch={end} is before start_epoch={start}; set end_epoch >= start_epoch")
    return list(range(start, end + 1, every_n_epochs))


def _check_targets(pruning_ratio: float | None, target_speedup: float | None) -> None:
    if pruning_ratio is not None and target_speedup is not None:
        raise ValueError(
            f"set either pruning_ratio ({pruning_ratio}) or target_speedup ({target_speedup}), not both"
        )
    if pruning_ratio is not None:
        ok = not isinstance(pruning_ratio, bool) and isinstance(pruning_ratio, (int, float))
        if not (ok and math.isfinite(pruning_ratio) and 0.0 < pruning_ratio < 1.0):
            raise ValueError(
                "pruning_ratio must be in (0, 1) (the fraction of channels to remove), "
                f"got {pruning_ratio!r}; e.g. pruning_ratio=0.5"
            )
    if target_speedup is not None:
        ok = not isinstance(target_speedup, bool) and isinstance(target_speedup, (int, float))
        if not (ok and math.isfinite(target_speedup) and target_speedup > 1.0):
            raise ValueError(
                f"target_speedup must be a number > 1 (dense MACs / pruned MACs), got {target_speedup!r}; "
                "e.g. target_speedup=2.0"
            )


def _check_schedule(schedule: str | Sequence[float], steps: int) -> None:
    if isinstance(schedule, str):
        if schedule not in _SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
        return
    values = list(schedule)
    if len(values) != steps:
        raise ValueError(
            f"an explicit schedule needs one cumulative ratio per pruning epoch: {len(values)} ratios "
            f"for {steps} pruning epochs"
        )


# ---------------------------------------------------------------------------------------------
# Multi-process helpers
# ---------------------------------------------------------------------------------------------


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _RankZeroScores:
    """Importance wrapper for multi-process training: every rank uses rank 0's scores.

    Ranks see the same averaged gradients, but float reductions, unseeded random criteria or a
    user criterion could still differ by a hair and make ranks remove different channels, which
    would break DDP. Broadcasting the scores (one small collective per pruning step) rules it out.
    Everything else (accumulation, reset) is delegated to the wrapped criterion.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def requires_gradients(self) -> bool:
        return _requires_gradients(self.inner)

    def reset(self) -> None:
        reset = getattr(self.inner, "reset", None)
        if callable(reset):
            reset()

    def score_groups(self, groups: Sequence[Any]) -> list[torch.Tensor | None]:
        score = getattr(self.inner, "score_groups", None)
        scores = score(groups) if callable(score) else [self.inner(g) for g in groups]
        return _broadcast_scores(scores)

    def __call__(self, group: Any) -> torch.Tensor | None:
        return _broadcast_scores([self.inner(group)])[0]


def _broadcast_scores(scores: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    payload = [[None if s is None else s.detach().float().cpu() for s in scores]]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _requires_gradients(importance: Any) -> bool:
    return bool(getattr(importance, "requires_gradients", getattr(importance, "requires_grad", False)))


# ---------------------------------------------------------------------------------------------
# LightningModule checkpoint hooks: replay the structure before the weights load
# ---------------------------------------------------------------------------------------------


def _on_load_checkpoint_with_replay(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Installed on the LightningModule while the callback is attached (see ``setup``).

    Lightning calls ``LightningModule.on_load_checkpoint`` right before it loads the checkpoint's
    ``state_dict`` into the module (``_CheckpointConnector.restore_model``), and before callback
    states are restored, so this is the one place where a fresh, unpruned module can be given the
    pruned structure in time for the weights to fit.
    """
    ref = module.__dict__.get(_OWNER_ATTR)
    owner = ref() if ref is not None else None
    if owner is not None:
        owner._replay(module, checkpoint)
    type(module).on_load_checkpoint(module, checkpoint)


def _on_save_checkpoint_with_history(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Installed on the LightningModule: put the pruning history into every checkpoint.

    The module hook (unlike callback hooks) also runs for ``save_weights_only`` checkpoints, so
    every checkpoint of a pruned model can be loaded back.
    """
    type(module).on_save_checkpoint(module, checkpoint)
    checkpoint[HISTORY_KEY] = _plain(get_pruning_history(module))


def _plain(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with tuples as lists (safe for ``weights_only`` loading)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------


class StructuredPruning(Callback):
    """Iterative structural (channel) pruning during ``Trainer.fit``; see the module docstring.

    Args:
        importance: criterion name (``"taylor"``, ``"fisher"``, ``"magnitude"``, ``"l1"``, ``"l2"``,
            ``"bn_scale"``, ``"random"``) or an importance object.
        pruning_ratio: fraction of every group's channels removed by the last step, in (0, 1).
        target_speedup: instead of a ratio, prune until ``dense MACs / MACs`` reaches this (> 1)
            at the last step. Intermediate steps follow ``schedule`` on the MAC reduction
            ``1 - 1/target_speedup`` (e.g. linear: equal MAC cuts per step). Channels are then
            ranked globally, since a MAC budget cannot be split per layer in advance.
            Default when neither is set: ``pruning_ratio=0.5``.
        epochs: explicit 0-based epochs after which to prune; otherwise ``start_epoch`` to
            ``end_epoch`` (inclusive, default ``start_epoch``: a single prune) every
            ``every_n_epochs``. One pruning step per listed epoch.
        schedule: how the target is spread over the steps: ``"linear"``, ``"cubic"``, ``"exp"``
            or one cumulative ratio per step.
        global_pruning: rank channels across all groups instead of pruning each group evenly.
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
        pruner_kwargs: further :class:`~prune_callbacks.pruning.pruner.Pruner` arguments
            (``unwrapped_parameters``, ``customized_pruners``, ``forward_fn``...).
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
        global_pruning: bool = False,
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
    ) -> None:
        super().__init__()
        _check_targets(pruning_ratio, target_speedup)
        self.prune_epochs = _prune_epochs(epochs, start_epoch, end_epoch, every_n_epochs)
        _check_schedule(schedule, len(self.prune_epochs))
        if importance_batches is not None and (
            isinstance(importance_batches, bool)
            or not isinstance(importance_batches, int)
            or importance_batches < 1
        ):
            raise ValueError(
                f"importance_batches must be None or an integer >= 1, got {importance_batches!r}"
            )
        if not (isinstance(max_pruning_ratio, (int, float)) and 0.0 < max_pruning_ratio <= 1.0):
            raise ValueError(f"max_pruning_ratio must be in (0, 1], got {max_pruning_ratio!r}")
        if round_to is not None and (
            isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
        ):
            raise ValueError(f"round_to must be None or an integer >= 1, got {round_to!r}")
        for key, value in dict(pruning_ratio_dict or {}).items():
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not (ok and 0.0 <= value < 1.0):
                raise ValueError(f"pruning_ratio_dict[{key!r}] must be in [0, 1), got {value!r}")
        self.importance = get_importance(importance)
        self.pruning_ratio = None if pruning_ratio is None else float(pruning_ratio)
        self.target_speedup = None if target_speedup is None else float(target_speedup)
        if self.pruning_ratio is None and self.target_speedup is None:
            self.pruning_ratio = 0.5
        self.schedule = schedule if isinstance(schedule, str) else [float(v) for v in schedule]
        self.global_pruning = bool(global_pruning)
        self.max_pruning_ratio = float(max_pruning_ratio)
        self.round_to = round_to
        self.ignored_layers = list(ignored_layers or [])
        self.pruning_ratio_dict = dict(pruning_ratio_dict or {})
        self.prune_num_heads = bool(prune_num_heads)
        self.head_pruning_ratio = float(head_pruning_ratio)
        self.importance_batches = importance_batches
        self.log_group_widths = bool(log_group_widths)
        self.verbose = bool(verbose)
        self.pruner_kwargs = dict(pruner_kwargs or {})

        self.pruner: Pruner | None = None
        self.example_inputs: Any = None
        self.records: list[dict[str, Any]] = []
        self.steps_done = 0
        self.dense_macs: int | None = None
        self.dense_params: int | None = None
        self._dense_widths: dict[str, dict[str, Any]] = {}
        self._window_epoch: int | None = None
        self._batch_idx = 0
        self._module_ref: Callable[[], Any] | None = None
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public helpers
    @property
    def history(self) -> list[dict[str, Any]]:
        """Plain-data records of every group prune so far (see :mod:`prune_callbacks.pruning.history`)."""
        module = self._module_ref() if self._module_ref is not None else None
        return list(get_pruning_history(module)) if module is not None else []

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

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse unsupported strategies and hook into checkpoint loading/saving of the module."""
        _check_strategy(trainer.strategy)
        others = [cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning) and cb is not self]
        if others:
            raise ValueError("only one StructuredPruning callback can be attached to a Trainer")
        pl_module.__dict__[_OWNER_ATTR] = weakref.ref(self)
        pl_module.on_load_checkpoint = types.MethodType(_on_load_checkpoint_with_replay, pl_module)
        pl_module.on_save_checkpoint = types.MethodType(_on_save_checkpoint_with_history, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the checkpoint hooks installed in :meth:`setup`."""
        for name in (_OWNER_ATTR, "on_load_checkpoint", "on_save_checkpoint"):
            pl_module.__dict__.pop(name, None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the graph from ``example_input_array`` (else wait for the first batch)."""
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.prune_epochs[-1] >= max_epochs:
            warnings.warn(
                f"StructuredPruning: training stops after epoch {max_epochs - 1} but pruning is scheduled "
                f"after epochs {self.prune_epochs}; the last steps will not run (raise max_epochs)",
                stacklevel=2,
            )
        if self.pruner is not None and self._module_ref is not None and self._module_ref() is pl_module:
            return
        self.pruner = None
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            self._build(trainer, pl_module, example)

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
        epoch = trainer.current_epoch
        while self.steps_done < len(self.prune_epochs) and self.prune_epochs[self.steps_done] < epoch:
            self._prune(trainer, pl_module, self.prune_epochs[self.steps_done])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Accumulate gradient importance: gradients are final here (all micro-batches summed,
        AMP-unscaled) and not yet clipped, which happens right after this hook."""
        if not self._accumulating(trainer):
            return
        epoch = trainer.current_epoch
        if self._window_epoch != epoch:
            reset = getattr(self.importance, "reset", None)
            if callable(reset):
                reset()
            self._window_epoch = epoch
        self.importance.accumulate(pl_module, grad_scale=_pending_grad_scale(trainer, optimizer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune when this epoch is (or passed) the next scheduled one."""
        epoch = trainer.current_epoch
        while self.steps_done < len(self.prune_epochs) and self.prune_epochs[self.steps_done] <= epoch:
            self._prune(trainer, pl_module, self.prune_epochs[self.steps_done])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the summary table."""
        if self.verbose and self.records:
            rank_zero_info(format_summary(self.records))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Put the pruning history under the top-level ``"prune_callbacks_history"`` key (also
        done by the module hook installed in :meth:`setup`, which covers weights-only checkpoints)."""
        checkpoint[HISTORY_KEY] = _plain(get_pruning_history(pl_module))

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, records, dense sizes, pruner counters and gradient statistics."""
        module = self._module_ref() if self._module_ref is not None else None
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "prune_epochs": list(self.prune_epochs),
            "steps_done": self.steps_done,
            "records": _plain(self.records),
            "dense_macs": self.dense_macs,
            "dense_params": self.dense_params,
            "dense_widths": _plain(self._dense_widths),
            "window_epoch": self._window_epoch,
            "history": _plain(get_pruning_history(module)) if module is not None else [],
        }
        if self.pruner is not None and module is not None:
            state["pruner"] = self.pruner.state_dict()
            state["importance"] = _importance_state(self.importance, module)
        elif self._pending_state is not None:
            state["pruner"] = self._pending_state.get("pruner")
            state["importance"] = self._pending_state.get("importance")
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule position; pruner and importance state are applied once the graph
        is built (at fit start)."""
        if state_dict.get("prune_epochs") != list(self.prune_epochs):
            warnings.warn(
                "StructuredPruning: the checkpoint was written with pruning epochs "
                f"{state_dict.get('prune_epochs')}, this callback has {self.prune_epochs}; the "
                f"schedule continues from step {state_dict.get('steps_done', 0)} with the new epochs",
                stacklevel=2,
            )
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.records = [dict(r) for r in state_dict.get("records", [])]
        self.dense_macs = state_dict.get("dense_macs")
        self.dense_params = state_dict.get("dense_params")
        self._dense_widths = {k: dict(v) for k, v in state_dict.get("dense_widths", {}).items()}
        self._window_epoch = state_dict.get("window_epoch")
        self._pending_state = {"pruner": state_dict.get("pruner"), "importance": state_dict.get("importance")}
        self.pruner = None

    # ------------------------------------------------------------------ internals
    def _replay(self, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> None:
        """Give ``pl_module`` the structure recorded in ``checkpoint`` (before its weights load)."""
        history = checkpoint.get(HISTORY_KEY)
        if history is None:
            history = (checkpoint.get("callbacks") or {}).get(self.state_key, {}).get("history")
        if not history:
            return
        current = _plain(get_pruning_history(pl_module))
        n = len(current)
        if current != _plain(history[:n]):
            raise ValueError(
                f"{type(pl_module).__name__} was already pruned differently from the checkpoint "
                f"({n} pruning records that the checkpoint does not start with); pass a freshly "
                "constructed, unpruned module to resume from this checkpoint"
            )
        if n < len(history):
            apply_pruning_history(pl_module, history[n:], self.pruner_kwargs.get("customized_pruners"))
            self.pruner = None

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any) -> None:
        """Trace the model, enumerate the groups and log the dense cost (or restore a resumed run)."""
        example = move_data_to_device(example, pl_module.device)
        example = trainer.precision_plugin.convert_input(example)
        self.example_inputs = example
        importance: Any = self.importance
        if _world_size() > 1:
            importance = _RankZeroScores(importance)
        kwargs = dict(self.pruner_kwargs)
        ignored = _resolve_names(pl_module, self.ignored_layers, "ignored_layers")
        ratio_dict = {
            tuple(_resolve_names(pl_module, [k], "pruning_ratio_dict")): v
            for k, v in self.pruning_ratio_dict.items()
        }
        self.pruner = Pruner(
            pl_module,
            example,
            importance,
            pruning_ratio=self.pruning_ratio if self.pruning_ratio is not None else 0.5,
            pruning_ratio_dict=ratio_dict or None,
            global_pruning=self.global_pruning,
            max_pruning_ratio=self.max_pruning_ratio,
            iterative_steps=len(self.prune_epochs),
            schedule=self.schedule,
            round_to=self.round_to,
            ignored_layers=ignored,
            prune_num_heads=self.prune_num_heads,
            head_pruning_ratio=self.head_pruning_ratio,
            target_speedup=self.target_speedup,
            **kwargs,
        )
        self._module_ref = weakref.ref(pl_module)
        names = {m: n for n, m in pl_module.named_modules()}
        names.update({p: n for n, p in pl_module.named_parameters()})
        pending, self._pending_state = self._pending_state, None
        if pending is not None and pending.get("pruner") is not None:
            self.pruner.load_state_dict(pending["pruner"])
            _load_importance_state(self.importance, pl_module, pending.get("importance"))
            if self.target_speedup is not None and self.dense_macs is not None:
                self.pruner.dense_macs = self.dense_macs
            return
        self.steps_done = 0
        self._dense_widths = {}
        for group in self.pruner.groups:
            root = group.root
            side = getattr(root.dep.handler, "side", "out")
            name = names.get(root.dep.target.module, root.dep.target._name)
            self._dense_widths[name] = {"side": side, "channels": len(root.idxs)}
        macs, params = count_macs_and_params(pl_module, example, self.pruner_kwargs.get("forward_fn"))
        self.dense_macs, self.dense_params = int(macs), int(params)
        record = self._record(pl_module, step=0, epoch=None, global_step=trainer.global_step, before=None)
        self.records = [record]
        self._log(trainer, record, dense=True)
        if self.verbose:
            rank_zero_info(
                f"StructuredPruning: {len(self._dense_widths)} prunable groups; dense model "
                f"{macs / 1e6:.2f} M MACs, {params / 1e6:.3f} M parameters; pruning after epochs "
                f"{self.prune_epochs}"
            )

    def _accumulating(self, trainer: pl.Trainer) -> bool:
        """Whether this optimizer step's gradients feed the importance of the next prune."""
        if self.pruner is None or not _requires_gradients(self.importance):
            return False
        if self.steps_done >= len(self.prune_epochs):
            return False
        if trainer.current_epoch != self.prune_epochs[self.steps_done]:
            return False
        if self.importance_batches is None:
            return True
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return True
        per_step = max(1, int(trainer.accumulate_grad_batches))
        steps = math.ceil(batches / per_step)
        return steps - self._batch_idx // per_step <= self.importance_batches

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """One pruning step: score, prune, follow with optimizer state and DDP, log."""
        pruner = self.pruner
        if pruner is None:
            raise RuntimeError(
                "StructuredPruning: the model was never traced (no training batch was seen); "
                "set example_input_array on the LightningModule"
            )
        if _requires_gradients(self.importance) and getattr(self.importance, "num_batches", 1) == 0:
            raise RuntimeError(
                f"StructuredPruning: no gradient statistics were gathered in epoch {epoch} for the "
                f"{type(self.importance).__name__} criterion (did any optimizer step run? "
                "training_step must return a loss); use importance='magnitude' for a criterion "
                "without gradients"
            )
        optimizers = [getattr(opt, "_optimizer", opt) for opt in trainer.optimizers]
        check_optimizer_state(optimizers)
        before = self._widths(pl_module)
        wrapped = _unwrap_ddp(trainer, pl_module)
        try:
            with track_parameter_updates() as updates:
                pruner.step()
            prune_optimizer_state(optimizers, updates)
        finally:
            if wrapped:
                trainer.strategy.configure_ddp()
        if _world_size() > 1:
            _check_ranks_agree(pl_module)
        self.steps_done += 1
        record = self._record(pl_module, self.steps_done, epoch, trainer.global_step, before)
        self.records.append(record)
        self._log(trainer, record, dense=False)

    def _widths(self, pl_module: pl.LightningModule) -> dict[str, int]:
        """Current channels of every group root recorded at fit start."""
        assert self.pruner is not None
        dg = self.pruner.DG
        out: dict[str, int] = {}
        for name, info in self._dense_widths.items():
            target = lookup(pl_module, name)
            n = dg.get_out_channels(target) if info["side"] == "out" else dg.get_in_channels(target)
            out[name] = int(n) if n is not None else int(info["channels"])
        return out

    def _record(
        self,
        pl_module: pl.LightningModule,
        step: int,
        epoch: int | None,
        global_step: int,
        before: Mapping[str, int] | None,
    ) -> dict[str, Any]:
        macs, params = count_macs_and_params(
            pl_module, self.example_inputs, self.pruner_kwargs.get("forward_fn")
        )
        widths = self._widths(pl_module)
        dense_total = sum(int(v["channels"]) for v in self._dense_widths.values())
        kept_total = sum(widths.values())
        groups = [
            {
                "root": name,
                "channels_dense": int(info["channels"]),
                "channels_before": int((before or widths)[name]),
                "channels_after": widths[name],
            }
            for name, info in self._dense_widths.items()
        ]
        assert self.dense_macs is not None
        return {
            "step": step,
            "epoch": epoch,
            "global_step": int(global_step),
            "macs": int(macs),
            "params": int(params),
            "speedup": self.dense_macs / macs if macs else float("inf"),
            "channel_ratio": 1.0 - kept_total / dense_total if dense_total else 0.0,
            "groups": groups,
        }

    def _log(self, trainer: pl.Trainer, record: Mapping[str, Any], dense: bool) -> None:
        """Scalars to every logger; the groups table and width chart to W&B."""
        metrics: dict[str, float] = {
            "prune/step": float(record["step"]),
            "prune/macs": float(record["macs"]),
            "prune/params": float(record["params"]),
            "prune/speedup": float(record["speedup"]),
            "prune/channel_ratio": float(record["channel_ratio"]),
        }
        if dense:
            metrics["prune/dense_macs"] = float(record["macs"])
            metrics["prune/dense_params"] = float(record["params"])
        if self.log_group_widths:
            for g in record["groups"]:
                metrics[f"prune/width/{g['root']}"] = float(g["channels_after"])
        step = int(record["global_step"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if not dense and isinstance(logger, WandbLogger) and trainer.is_global_zero:
                from .wandb_logging import log_prune_step

                log_prune_step(logger, record, step=step)


# ---------------------------------------------------------------------------------------------
# Strategy, DDP and state helpers
# ---------------------------------------------------------------------------------------------

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy", "XLAFSDPStrategy")


def _check_strategy(strategy: Any) -> None:
    """Only strategies that keep a full copy of every parameter on each process are supported."""
    name = type(strategy).__name__
    sharded = any(cls.__name__ in _SHARDED for cls in type(strategy).__mro__)
    if sharded or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"StructuredPruning does not support the {name} strategy: structural pruning needs every "
            "parameter whole on each process. Supported: single device (strategy='auto') and DDP "
            "(strategy='ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true'); prune with one of "
            "them and fine-tune with the sharded strategy afterwards"
        )


def _pending_grad_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> float | None:
    """The AMP loss scale when gradients are still scaled at ``on_before_optimizer_step``.

    Lightning unscales before the hook, except for optimizers that unscale inside their own
    ``step`` (fused ones); those gradients are divided by the scale here.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    inner = getattr(optimizer, "_optimizer", optimizer)
    if scaler is None or not getattr(inner, "_step_supports_amp_scaling", False):
        return None
    return float(scaler.get_scale())


def _unwrap_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Drop the DDP wrapper before pruning; True when there was one.

    Its reducer holds each parameter's gradient accumulator, built for the old shape; a new
    wrapper would reuse those while the old one lives, so the old one must be gone first.
    """
    strategy = trainer.strategy
    wrapper = strategy.model
    if not isinstance(wrapper, DistributedDataParallel):
        return False
    ref = weakref.ref(wrapper)
    strategy.model = pl_module
    del wrapper
    gc.collect()
    if ref() is not None:
        raise RuntimeError(
            "StructuredPruning: the DistributedDataParallel wrapper is still referenced somewhere "
            "after the strategy released it, so it cannot be rebuilt for the pruned shapes; do not "
            "keep references to trainer.model / trainer.strategy.model"
        )
    return True


def _check_ranks_agree(pl_module: nn.Module) -> None:
    shapes = [tuple(p.shape) for p in pl_module.parameters()]
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, shapes)
    if any(g != shapes for g in gathered):
        raise RuntimeError("StructuredPruning: ranks ended a pruning step with different parameter shapes")


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


def _importance_state(importance: Any, model: nn.Module) -> dict[str, Any] | None:
    """Gradient statistics (per parameter name) and the random generator, for exact resumes."""
    state: dict[str, Any] = {}
    generator = getattr(importance, "generator", None)
    if isinstance(generator, torch.Generator):
        state["generator"] = generator.get_state()
    acc = getattr(importance, "_acc", None)
    if isinstance(acc, dict):
        params = {id(p): n for n, p in model.named_parameters()}
        state["num_batches"] = int(getattr(importance, "num_batches", 0))
        state["skipped_batches"] = int(getattr(importance, "skipped_batches", 0))
        state["acc"] = {
            params[pid]: {"total": entry.total.detach().cpu(), "count": int(entry.count)}
            for pid, entry in acc.items()
            if pid in params and entry.param() is not None
        }
    return state or None


def _load_importance_state(importance: Any, model: nn.Module, state: Mapping[str, Any] | None) -> None:
    if not state:
        return
    generator = getattr(importance, "generator", None)
    if "generator" in state and isinstance(generator, torch.Generator):
        generator.set_state(state["generator"])
    acc = getattr(importance, "_acc", None)
    if "acc" in state and isinstance(acc, dict):
        from ...pruning.importance import _Accumulator

        acc.clear()
        params = dict(model.named_parameters())
        for name, entry in state["acc"].items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(entry["total"].shape):
                continue
            a = _Accumulator(p, entry["total"].to(p.device))
            a.count = int(entry["count"])
            acc[id(p)] = a
        importance.num_batches = int(state.get("num_batches", 0))
        importance.skipped_batches = int(state.get("skipped_batches", 0))


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion
# ---------------------------------------------------------------------------------------------


def pruned_from_checkpoint(checkpoint: str | Any | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A Lightning checkpoint of a pruned run as a :func:`~prune_callbacks.load_pruned` payload.

    ``prefix`` (e.g. ``"model."``) selects the submodule of the LightningModule to extract: history
    names and state-dict keys are kept only under it and stripped of it, so
    ``load_pruned(MyNet(), pruned_from_checkpoint(path, prefix="model."))`` rebuilds the bare
    network. The file is read with ``torch.load(weights_only=True)``.
    """
    if isinstance(checkpoint, Mapping):
        data = checkpoint
    else:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "state_dict" not in data:
        raise ValueError("not a Lightning checkpoint: it has no 'state_dict' entry")
    history = data.get(HISTORY_KEY)
    if history is None:
        history = (data.get("callbacks") or {}).get(StructuredPruning.__qualname__, {}).get("history", [])

    def strip(name: str) -> str:
        if not name.startswith(prefix):
            raise ValueError(
                f"pruning record names {name!r}, outside prefix {prefix!r}: the pruned channels reach beyond "
                "that submodule, so it cannot be rebuilt on its own; load the whole LightningModule instead"
            )
        return name[len(prefix) :]

    records = []
    for rec in history:
        rec = _plain(rec)
        rec["root"] = strip(rec["root"])
        for item in rec.get("items", []):
            item["target"] = strip(item["target"])
        for attr in rec.get("attributes", []):
            attr["module"] = strip(attr["module"])
        records.append(rec)
    state = {k[len(prefix) :]: v for k, v in data["state_dict"].items() if k.startswith(prefix)}
    return {"format": PRUNED_FORMAT, "history": records, "state_dict": state}
