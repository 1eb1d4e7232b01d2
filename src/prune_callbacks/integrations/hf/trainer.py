"""``StructuredPruningCallback``: gradient-importance structural pruning inside the Hugging Face ``Trainer``.

The same pruning as the Lightning :class:`~prune_callbacks.integrations.lightning.callback.StructuredPruning`
callback, for :class:`transformers.Trainer`::

    pruning = StructuredPruningCallback("taylor", pruning_ratio=0.5, epochs=[0, 1])
    trainer = Trainer(model=model, args=args, train_dataset=train_ds)
    pruning.attach(trainer)          # adds the callback; prune metrics go through ``trainer.log``
    trainer.train()

The options are those of :class:`~prune_callbacks.pruning.settings.PruningSettings` (the one rulebook
shared with the :class:`~prune_callbacks.pruning.pruner.Pruner`, the Lightning callback and the app):
keyword arguments or a whole ``settings=``, validated once, with the same one-line
:class:`~prune_callbacks.pruning.settings.SettingsError`. The schedule is the settings' epochs
(``epochs`` / ``start_epoch`` / ``end_epoch`` / ``every_n_epochs``) or, for runs counted in optimizer
steps, this callback's own ``prune_steps`` / ``every_n_steps`` / ``start_step`` (one or the other).

What happens during ``Trainer.train``:

* **Train begin**: the dependency graph is built from one sample of the training set (the first item
  of ``train_dataloader.dataset`` through its collator, or the first batch), reduced to the model's
  forward keyword arguments with the labels dropped (so that the logits, not the loss, are the output
  whose sizes must not change); the dense MACs, parameters and group widths are logged. Random
  states (torch, Python, NumPy) are left as they were, so the data order and dropout of the run do
  not depend on the callback.
* **Gradient statistics** (Taylor, Fisher) accumulate in ``on_pre_optimizer_step`` of the steps that
  feed the next prune (the pruning epoch, the steps since the previous prune, or the last
  ``importance_batches`` of them). See *Hook order* below for why the callback takes over gradient
  clipping in those steps.
* **Prunes** run in ``on_epoch_end`` of a scheduled epoch, or in ``on_step_end`` once
  ``state.global_step`` reaches a scheduled step: before the Trainer logs, evaluates and saves for
  that step, so a checkpoint written then holds the pruned model. The optimizer is kept: its
  per-parameter state (AdamW moments...) is sliced with the indices that sliced each parameter
  (:func:`~prune_callbacks.pruning.optim_state.prune_optimizer_state`); the optimizer object and its
  param groups stay, so the LR scheduler goes on unchanged.
* **Logging**: ``prune/macs``, ``prune/params``, ``prune/speedup``, ``prune/channel_ratio``,
  ``prune/step`` (and ``prune/dense_macs`` / ``prune/dense_params`` at train begin) and
  ``prune/width/<group>`` go through ``trainer.log``, so every ``report_to`` logger (W&B,
  TensorBoard...) and ``state.log_history`` get them. A ``TrainerCallback`` is never handed the
  Trainer and the integration callbacks run before user callbacks, so ``on_log`` cannot add metrics
  for them: :meth:`StructuredPruningCallback.attach` gives the callback the Trainer. Without it the
  metrics only reach ``state.log_history`` (a warning says so when ``report_to`` names loggers).
* **Checkpoints**: ``on_save`` writes ``prune_callbacks_history.json`` (the plain-data pruning
  history, see :mod:`prune_callbacks.pruning.history`, in the format of
  :func:`~prune_callbacks.integrations.hf.pretrained.save_pretrained`) and
  ``prune_callbacks_state.pt`` (schedule position, records, dense sizes, pruner and gradient
  statistics; plain tensors, loads with ``weights_only=True``) into the checkpoint folder, each
  written to a temporary file and renamed.

**Resuming.** ``Trainer.train(resume_from_checkpoint=...)`` loads the checkpoint's weights into the
model first thing, before any callback event of that call (see below), so a callback cannot give a
fresh model its pruned shapes in time. Call :meth:`StructuredPruningCallback.restore` once before
``train``: it replays the history stored in the checkpoint on the model and remembers the folder, whose
callback state is then loaded at train begin::

    pruning = StructuredPruningCallback("taylor", pruning_ratio=0.5, epochs=[0, 1]).attach(trainer)
    trainer.train(resume_from_checkpoint=pruning.restore("out/checkpoint-3"))

Forgetting it fails in ``load_state_dict`` with a message that says to call it.

**Hook order** (read from ``transformers/trainer.py``, 5.24). ``Trainer.train``:
``_load_from_checkpoint`` (weights) -> ``_inner_training_loop``: ``_init_training_state`` (trainer
state, ``ExportableState`` callbacks) -> ``_prepare_for_training`` (optimizer, scheduler; their
states loaded from the checkpoint) -> ``on_train_begin`` -> per epoch ``on_epoch_begin`` -> per
optimizer step ``on_step_begin`` (first micro-batch) -> forward/backward of every micro-batch
(``on_substep_end`` after all but the last) -> ``clip_grad_norm_`` through accelerate, which first
unscales AMP (fp16 ``GradScaler``) gradients, when ``max_grad_norm > 0``; otherwise the norm is
measured with the same call and an infinite bound, which also unscales -> ``on_pre_optimizer_step`` ->
``optimizer.step`` -> ``on_optimizer_step`` -> ``lr_scheduler.step`` -> ``zero_grad`` ->
``global_step += 1`` -> ``on_step_end`` -> log / evaluate / save (``on_save``) -> ... ->
``on_epoch_end`` -> log / evaluate / save -> ``on_train_end``. So ``on_pre_optimizer_step`` sees the
complete (all micro-batches summed) and unscaled gradient, but *already clipped* -- unlike Lightning's
``on_before_optimizer_step``, which runs before clipping. In the steps whose gradients feed a prune the
callback therefore sets ``args.max_grad_norm`` to infinity in ``on_step_begin`` (the Trainer still
unscales and measures the norm it logs, clipping nothing), accumulates the statistics from the true
gradient in ``on_pre_optimizer_step``, then clips with ``torch.nn.utils.clip_grad_norm_`` and the
user's ``max_grad_norm`` (what the Trainer would have done) and puts ``args.max_grad_norm`` back.

Supported: one process (CPU or one accelerator), with or without mixed precision and gradient
accumulation. DeepSpeed, FSDP and several processes are refused at train begin.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import logging
import math
import os
import random
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.nn as nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ...layers import track_parameter_updates
from ...measure.flops import count_macs_and_params
from ...pruning.calibration import add_new_biases_to_optimizers
from ...pruning.history import get_pruning_history
from ...pruning.importance import get_importance
from ...pruning.optim_state import check_optimizer_state, prune_optimizer_state
from ...pruning.pruner import Pruner
from ...pruning.settings import PruningSettings, SettingsError
from ..records import dense_widths, group_widths, object_names, prune_metrics, prune_record
from ..state import (
    SETTING_NAMES,
    check_pruner_kwargs,
    importance_state,
    load_importance_state,
    replay_history,
)
from .pretrained import HISTORY_FILE, HISTORY_FORMAT

if TYPE_CHECKING:
    from transformers import Trainer

__all__ = ["HISTORY_FILE", "STATE_FILE", "StructuredPruningCallback", "read_checkpoint_history"]

log = logging.getLogger(__name__)

#: File of the callback state in every checkpoint folder (``torch.save``, ``weights_only`` loadable).
STATE_FILE = "prune_callbacks_state.pt"
#: Version of :meth:`StructuredPruningCallback.state_dict`.
STATE_VERSION = 1
#: Batch keys that are targets, never model inputs (besides ``args.label_names``).
LABEL_KEYS = ("labels", "label", "label_ids")


class StructuredPruningCallback(TrainerCallback):
    """Iterative structural (channel) pruning during ``Trainer.train``; see the module docstring.

    Args:
        importance: criterion name (``"taylor"``, ``"fisher"``, ``"magnitude"``, ``"l1"``, ``"l2"``,
            ``"bn_scale"``, ``"random"``) or an importance object.
        prune_steps: optimizer steps (values of ``state.global_step``, from 1) after which to prune,
            one pruning step each; an alternative to the epoch schedule of the settings.
        every_n_steps, start_step: prune after step ``start_step`` (default ``every_n_steps``) and
            every ``every_n_steps`` after it, ``iterative_steps`` times (default once).
        example_inputs: keyword arguments of ``model.forward`` to trace the model with (default: one
            sample of the training set, see :meth:`example_inputs_from_batch`).
        pruner_kwargs: the Pruner's arguments that are not pruning settings
            (``unwrapped_parameters``, ``customized_pruners``, ``forward_fn``, ``output_transform``,
            ``root_module_types``, ``fast_subsets``).
        settings: the pruning settings as one :class:`PruningSettings`.
        **options: any field of :class:`PruningSettings` (``pruning_ratio``, ``target_speedup``,
            ``iterative_steps``, ``schedule``, ``epochs``, ``start_epoch``, ``end_epoch``,
            ``every_n_epochs``, ``importance_batches``, ``ignored_layers``, ...); one given here
            replaces the value in ``settings``. ``importance_batches`` counts optimizer steps; with
            a step schedule its default is every step since the previous prune.
            ``hold_early_stopping`` clears ``control.should_training_stop`` set by another callback
            (e.g. ``EarlyStoppingCallback``, which must then come before this one) until the last prune.

    Raises:
        SettingsError: (a ``ValueError``) for an invalid option, naming it and the fix.
    """

    def __init__(
        self,
        importance: str | Any = "taylor",
        *,
        prune_steps: Sequence[int] | int | None = None,
        every_n_steps: int | None = None,
        start_step: int | None = None,
        example_inputs: Mapping[str, Any] | None = None,
        pruner_kwargs: Mapping[str, Any] | None = None,
        settings: PruningSettings | None = None,
        **options: Any,
    ) -> None:
        for key, value in options.items():
            if key not in SETTING_NAMES:
                close = difflib.get_close_matches(key, SETTING_NAMES + _STEP_ARGS, n=1)
                fix = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(SETTING_NAMES)}"
                raise SettingsError(key, value, "is not a pruning setting", fix)
        merged = PruningSettings.merged(settings, {"importance": importance, **options})
        self.prune_points, self.settings = _schedule(merged, prune_steps, every_n_steps, start_step)
        #: Whether :attr:`prune_points` are optimizer steps (else 0-based epochs).
        self.by_steps: bool = not (prune_steps is None and every_n_steps is None and start_step is None)
        self.pruner_kwargs: dict[str, Any] = check_pruner_kwargs(pruner_kwargs, "StructuredPruningCallback")
        self.importance: Any = get_importance(self.settings.importance)
        self.example_inputs: Any = dict(example_inputs) if example_inputs is not None else None
        self._given_inputs = example_inputs is not None

        self.pruner: Pruner | None = None
        self.records: list[dict[str, Any]] = []
        self.steps_done = 0
        self.dense_macs: int | None = None
        self.dense_params: int | None = None
        self._dense_widths: dict[str, dict[str, Any]] = {}
        self._window: int | None = None  # the prune (index) the gathered statistics feed
        self._epoch = 0
        self._held_max_grad_norm: float | None = None
        self._resume_dir: str | None = None
        self._trainer: Callable[[], Any] | None = None
        self._model: Callable[[], Any] | None = None
        self._watched: set[int] = set()
        self._label_names: tuple[str, ...] = LABEL_KEYS
        self._warned_unbound = False

    # ------------------------------------------------------------------ public helpers
    def attach(self, trainer: Trainer) -> StructuredPruningCallback:
        """Add this callback to ``trainer`` (unless it is there already) and keep a reference to it,
        so that the prune metrics go through ``trainer.log`` to every ``report_to`` logger and
        :meth:`restore` knows the model and output folder. Returns the callback."""
        bound = self._trainer() if self._trainer is not None else None
        if bound is not None and bound is not trainer:
            raise ValueError(
                "StructuredPruningCallback is attached to another Trainer already; build one per Trainer"
            )
        self._trainer = weakref.ref(trainer)
        if all(cb is not self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        if isinstance(trainer.model, nn.Module):
            self._watch_weight_loads(trainer.model)
        return self

    def restore(
        self, checkpoint: str | os.PathLike[str] | bool = True, model: nn.Module | None = None
    ) -> str:
        """Give the model the pruned structure of ``checkpoint`` before ``Trainer.train`` loads its
        weights, and resume the callback's schedule from it at train begin.

        Call it once, right before ``trainer.train(resume_from_checkpoint=...)``, with the same
        checkpoint (``True``: the last checkpoint in ``args.output_dir``); it returns the folder, so
        ``trainer.train(resume_from_checkpoint=pruning.restore(path))`` works. ``model`` defaults to
        the attached Trainer's model. A model already pruned along the checkpoint's history (a resume
        in the same process) gets only the records it lacks; one pruned differently is refused.
        """
        trainer = self._trainer() if self._trainer is not None else None
        if model is None:
            if trainer is None:
                raise ValueError("restore() needs the model: call attach(trainer) first, or pass model=")
            model = trainer.model
        if not isinstance(model, nn.Module):
            raise TypeError(f"restore() needs an nn.Module, got {type(model).__name__}")
        if isinstance(checkpoint, bool):
            if not checkpoint or trainer is None:
                raise ValueError(
                    "restore(True) looks for the last checkpoint of an attached Trainer: attach(trainer) "
                    "first, or pass the checkpoint folder"
                )
            found = get_last_checkpoint(trainer.args.output_dir)
            if found is None:
                raise FileNotFoundError(f"no checkpoint folder in {trainer.args.output_dir}")
            path = found
        else:
            path = os.fspath(checkpoint)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
        history = read_checkpoint_history(path)
        if history is None:
            log.warning(
                "StructuredPruningCallback: %s holds no %s; the model stays as it is", path, HISTORY_FILE
            )
        else:
            self._replay(model, history)
        self._resume_dir = path
        self._watch_weight_loads(model)
        return path

    def example_inputs_from_batch(self, batch: Any, model: nn.Module) -> dict[str, Any] | None:
        """The keyword arguments of ``model.forward`` to trace it with, from a (collated) batch.

        The default keeps the batch's entries that ``forward`` accepts, drops the labels (keys in
        ``args.label_names``, ``labels``, ``label``, ``label_ids``) and ``None`` values, and keeps one
        sample of every tensor. It returns ``None`` for a batch that is not a mapping; override it for
        other layouts (return a dict of keyword arguments), or pass ``example_inputs=``.
        """
        if not isinstance(batch, Mapping):
            return None
        parameters = inspect.signature(model.forward).parameters
        any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if value is None or key in self._label_names or not (key in parameters or any_keyword):
                continue
            out[key] = value[:1] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
        return out or None

    @property
    def history(self) -> list[dict[str, Any]]:
        """Plain-data records of every group prune of the traced model so far."""
        model = self._model() if self._model is not None else None
        return list(get_pruning_history(model)) if model is not None else []

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, records, dense sizes, pruner progress and gradient statistics (what
        :data:`STATE_FILE` holds; the history is in :data:`HISTORY_FILE`, not copied here)."""
        model = self._model() if self._model is not None else None
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "by_steps": self.by_steps,
            "prune_points": list(self.prune_points),
            "steps_done": self.steps_done,
            "records": _plain(self.records),
            "dense_macs": self.dense_macs,
            "dense_params": self.dense_params,
            "dense_widths": _plain(self._dense_widths),
            "window": self._window,
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "importance": importance_state(self.importance, model) if model is not None else None,
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module) -> None:
        """Continue from :meth:`state_dict` (the pruner must be built on ``model`` already)."""
        if (state.get("by_steps"), list(state.get("prune_points", []))) != (self.by_steps, self.prune_points):
            unit = "steps" if state.get("by_steps") else "epochs"
            log.warning(
                "StructuredPruningCallback: the checkpoint was written with pruning %s %s, this callback "
                "has %s; the schedule continues from step %s with the new ones",
                unit,
                state.get("prune_points"),
                self.prune_points,
                state.get("steps_done", 0),
            )
        self.steps_done = int(state.get("steps_done", 0))
        self.records = [dict(r) for r in state.get("records", [])]
        self.dense_macs = state.get("dense_macs")
        self.dense_params = state.get("dense_params")
        self._dense_widths = {k: dict(v) for k, v in (state.get("dense_widths") or {}).items()}
        self._window = state.get("window")
        if self.pruner is not None and state.get("pruner") is not None:
            self.pruner.load_state_dict(state["pruner"])
        load_importance_state(self.importance, model, state.get("importance"))

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Watch the model's weight loads (a pruned checkpoint loaded without :meth:`restore`)."""
        model = kwargs.get("model")
        if isinstance(model, nn.Module):
            self._watch_weight_loads(model)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse unsupported setups, build the graph, log the dense cost or load the resumed state."""
        _check_setup(args, self.importance)
        model = kwargs["model"]
        self._label_names = tuple(args.label_names or ()) + LABEL_KEYS
        self._epoch = _epoch_index(state)
        self._warn_schedule_length(state)
        resume, self._resume_dir = self._resume_dir, None
        if state.global_step > 0 and resume is None:
            log.warning(
                "StructuredPruningCallback: training resumes at step %d but restore(checkpoint) was not "
                "called; the schedule starts over from this step without the saved gradient statistics",
                state.global_step,
            )
        with _random_state_kept():
            if not self._given_inputs:
                self.example_inputs = self._inputs_from_loader(kwargs.get("train_dataloader"), model)
            self.example_inputs = _to_device(self.example_inputs, _device(model))
            self.pruner = self._new_pruner(model)
            self._model = weakref.ref(model)
            if resume is not None and self._load_checkpoint_state(resume, model):
                return
            self._start_schedule(model, state, control)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Track the epoch; make up an epoch prune that a resumed checkpoint was saved before."""
        self._epoch = _epoch_index(state)
        self._catch_up(state, control, kwargs)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Make up missed prunes; when this step's gradients feed the next prune, take over clipping
        for the step (``args.max_grad_norm`` set to infinity until ``on_pre_optimizer_step``)."""
        self._catch_up(state, control, kwargs)
        if not self._accumulating(args, state, kwargs.get("train_dataloader")):
            return
        if self._window != self.steps_done:
            reset = getattr(self.importance, "reset", None)
            if callable(reset):
                reset()
            self._window = self.steps_done
        model = kwargs.get("model")
        if getattr(self.importance, "requires_calibration", False) and isinstance(model, torch.nn.Module):
            self.importance.attach(model)  # record this step's forwards too (Wanda, FLAP)
        if self._held_max_grad_norm is None:
            self._held_max_grad_norm = float(args.max_grad_norm or 0.0)
            args.max_grad_norm = math.inf

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Accumulate gradient importance from the complete, unscaled, unclipped gradient of the
        step, then clip as the Trainer would have and give ``args.max_grad_norm`` back."""
        max_norm = self._held_max_grad_norm
        if max_norm is None:
            return
        args.max_grad_norm, self._held_max_grad_norm = max_norm, None
        model = kwargs["model"]
        self.importance.accumulate(model)
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Prune when ``state.global_step`` reaches a scheduled step (before the step's save)."""
        if self.by_steps:
            while (
                self.steps_done < len(self.prune_points)
                and self.prune_points[self.steps_done] <= state.global_step
            ):
                self._prune(state, control, kwargs)
        self._hold(state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Prune when this epoch is (or passed) the next scheduled one (before the epoch's save)."""
        if not self.by_steps:
            while (
                self.steps_done < len(self.prune_points) and self.prune_points[self.steps_done] <= self._epoch
            ):
                self._prune(state, control, kwargs)
        self._hold(state, control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """With ``hold_early_stopping``: keep training until the last prune."""
        self._hold(state, control)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write :data:`HISTORY_FILE` and :data:`STATE_FILE` into the checkpoint folder just saved."""
        if not state.is_world_process_zero or self.pruner is None:
            return
        folder = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            log.warning(
                "StructuredPruningCallback: checkpoint folder %s not found; pruning state not saved", folder
            )
            return
        history = json.dumps({"format": HISTORY_FORMAT, "history": _plain(self.history)}).encode()
        _atomic_write(os.path.join(folder, HISTORY_FILE), lambda f: f.write(history))
        state_dict = self.state_dict()
        _atomic_write(os.path.join(folder, STATE_FILE), lambda f: torch.save(state_dict, f))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Give ``max_grad_norm`` back if a step never reached the optimizer; warn when training ended
        before the schedule did; sum the run up."""
        if self._held_max_grad_norm is not None:
            args.max_grad_norm, self._held_max_grad_norm = self._held_max_grad_norm, None
        points = self.prune_points
        if self.steps_done < len(points):
            reached = self.records[-1]["speedup"] if self.records else 1.0
            unit = "steps" if self.by_steps else "epochs"
            log.warning(
                "StructuredPruningCallback: training ended at step %d with %d of %d scheduled prunes done "
                "(after %s %s); the model has %.2fx fewer MACs than dense. Train longer (num_train_epochs, "
                "max_steps) or pass hold_early_stopping=True",
                state.global_step,
                self.steps_done,
                len(points),
                unit,
                points,
                reached,
            )
        if self.settings.verbose and len(self.records) > 1:
            last = self.records[-1]
            log.info(
                "StructuredPruningCallback: %d prunes; %.2f M MACs (%.2fx fewer), %.3f M parameters",
                self.steps_done,
                last["macs"] / 1e6,
                last["speedup"],
                last["params"] / 1e6,
            )

    # ------------------------------------------------------------------ internals
    def _new_pruner(self, model: nn.Module) -> Pruner:
        """A pruner on ``model`` with this callback's settings and importance object."""
        if self.example_inputs is None:
            raise ValueError(
                "StructuredPruningCallback needs example inputs to trace the model: pass "
                "example_inputs={...} (keyword arguments of forward), or subclass it and override "
                "example_inputs_from_batch(batch, model)"
            )
        settings = self.settings.replace(importance=self.importance)
        return Pruner(model, self.example_inputs, settings=settings, **self.pruner_kwargs)

    def _inputs_from_loader(self, loader: Any, model: nn.Module) -> dict[str, Any] | None:
        """Example inputs from the first sample of the training set (through the loader's collator),
        else from the loader's first batch."""
        if loader is None:
            return None
        dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
        batch: Any = None
        if collate is not None and not isinstance(dataset, torch.utils.data.IterableDataset):
            with contextlib.suppress(TypeError, IndexError, KeyError, NotImplementedError):
                batch = collate([dataset[0]])  # type: ignore[index]
        if batch is None:
            batch = next(iter(loader), None)
        return self.example_inputs_from_batch(batch, model)

    def _start_schedule(self, model: nn.Module, state: TrainerState, control: TrainerControl) -> None:
        """A new schedule on the model as it is: dense widths and cost, the step-0 record."""
        assert self.pruner is not None
        self.steps_done, self._window = 0, None
        self._dense_widths = dense_widths(self.pruner.groups, object_names(model))
        macs, params = count_macs_and_params(model, self.example_inputs, self.pruner_kwargs.get("forward_fn"))
        self.dense_macs, self.dense_params = int(macs), int(params)
        record = self._record(model, 0, None, state.global_step, None)
        self.records = [record]
        self._log(state, control, record, dense=True)
        if self.settings.verbose:
            unit = "steps" if self.by_steps else "epochs"
            log.info(
                "StructuredPruningCallback: %d prunable groups; dense model %.2f M MACs, %.3f M parameters; "
                "pruning after %s %s",
                len(self._dense_widths),
                macs / 1e6,
                params / 1e6,
                unit,
                self.prune_points,
            )

    def _load_checkpoint_state(self, folder: str, model: nn.Module) -> bool:
        """Load :data:`STATE_FILE` of a restored checkpoint; False when the folder has none."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            log.warning(
                "StructuredPruningCallback: %s has no %s; the schedule starts over", folder, STATE_FILE
            )
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), model)
        return True

    def _replay(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        """Apply the records of ``history`` that ``model`` lacks (it must have a prefix of them)."""
        inputs = self.example_inputs if self._given_inputs else None
        replay_history(model, history, self.pruner_kwargs.get("customized_pruners"), inputs)

    def _watch_weight_loads(self, model: nn.Module) -> None:
        """Explain a failed ``load_state_dict`` of a pruned checkpoint (``restore`` not called)."""
        if id(model) in self._watched:
            return
        self._watched.add(id(model))
        model.register_load_state_dict_pre_hook(_ShapeExplainer())

    def _catch_up(self, state: TrainerState, control: TrainerControl, kwargs: Mapping[str, Any]) -> None:
        """Prune now for scheduled points already passed (a checkpoint saved before the prune)."""
        if self.pruner is None:
            return
        now = state.global_step if self.by_steps else self._epoch
        while self.steps_done < len(self.prune_points) and (
            self.prune_points[self.steps_done] <= now
            if self.by_steps
            else self.prune_points[self.steps_done] < now
        ):
            self._prune(state, control, kwargs)

    def _accumulating(self, args: TrainingArguments, state: TrainerState, loader: Any) -> bool:
        """Whether the coming optimizer step's gradients feed the next prune."""
        if self.pruner is None or not getattr(self.importance, "requires_gradients", False):
            return False
        if self.steps_done >= len(self.prune_points):
            return False
        target, window = self.prune_points[self.steps_done], self.settings.importance_batches
        if self.by_steps:
            return window is None or target - (state.global_step + 1) < window
        if self._epoch != target:
            return False
        batches = len(loader) if loader is not None and hasattr(loader, "__len__") else None
        if window is None or not batches:
            return True
        per_epoch = math.ceil(batches / max(1, int(args.gradient_accumulation_steps)))
        return per_epoch - (state.global_step - self._epoch * per_epoch) <= window

    def _prune(self, state: TrainerState, control: TrainerControl, kwargs: Mapping[str, Any]) -> None:
        """One pruning step: score, prune, slice the optimizer state, log."""
        model, pruner = kwargs["model"], self.pruner
        assert pruner is not None
        if (
            getattr(self.importance, "requires_gradients", False)
            and getattr(self.importance, "num_batches", 1) == 0
        ):
            raise RuntimeError(
                f"StructuredPruningCallback: no gradient statistics were gathered for prune "
                f"{self.steps_done + 1} (after {'step' if self.by_steps else 'epoch'} "
                f"{self.prune_points[self.steps_done]}) with the {type(self.importance).__name__} criterion; "
                "did an optimizer step run since the last prune? Use importance='magnitude' for a "
                "criterion without gradients"
            )
        optimizer = _torch_optimizer(kwargs.get("optimizer"))
        if optimizer is not None:
            check_optimizer_state(optimizer)
        before = group_widths(pruner.DG, model, self._dense_widths)
        with _random_state_kept():
            with track_parameter_updates() as updates:
                pruner.step()
            if optimizer is not None:
                prune_optimizer_state(optimizer, updates)
                add_new_biases_to_optimizers(optimizer, model)
            self.steps_done += 1
            record = self._record(model, self.steps_done, self._epoch, state.global_step, before)
        self.records.append(record)
        self._log(state, control, record, dense=False)

    def _record(
        self,
        model: nn.Module,
        step: int,
        epoch: int | None,
        global_step: int,
        before: Mapping[str, int] | None,
    ) -> dict[str, Any]:
        """The record of one pruning step (step 0: the dense model), see :mod:`..records`."""
        assert self.pruner is not None and self.dense_macs is not None
        cost = count_macs_and_params(model, self.example_inputs, self.pruner_kwargs.get("forward_fn"))
        widths = group_widths(self.pruner.DG, model, self._dense_widths)
        return prune_record(
            step, epoch, global_step, cost, self.dense_macs, self._dense_widths, widths, before
        )

    def _log(
        self, state: TrainerState, control: TrainerControl, record: Mapping[str, Any], dense: bool
    ) -> None:
        """The record's metrics through ``trainer.log`` (every ``report_to`` logger and
        ``state.log_history``); without an attached Trainer into ``state.log_history`` only. The
        Trainer's own pending log of this step (``control.should_log``, which ``trainer.log`` clears)
        is kept."""
        metrics = prune_metrics(record, dense, self.settings.log_group_widths)
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            pending = control.should_log
            trainer.log(metrics)
            control.should_log = pending
            return
        state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        if not self._warned_unbound:
            self._warned_unbound = True
            log.warning(
                "StructuredPruningCallback: not attached to the Trainer, so the prune metrics go to "
                "state.log_history only, not to the report_to loggers; call pruning.attach(trainer)"
            )

    def _hold(self, state: TrainerState, control: TrainerControl) -> None:
        """``hold_early_stopping``: undo an early stop requested before the last prune."""
        if (
            self.settings.hold_early_stopping
            and control.should_training_stop
            and self.steps_done < len(self.prune_points)
            and state.global_step < state.max_steps
        ):
            control.should_training_stop = False

    def _warn_schedule_length(self, state: TrainerState) -> None:
        """Warn when the schedule reaches beyond the training run."""
        last = self.prune_points[-1]
        if self.by_steps and state.max_steps > 0 and last > state.max_steps:
            log.warning(
                "StructuredPruningCallback: training stops after step %d but pruning is scheduled after "
                "steps %s; the last prunes will not run (raise max_steps)",
                state.max_steps,
                self.prune_points,
            )
        elif not self.by_steps and state.num_train_epochs > 0 and last >= state.num_train_epochs:
            log.warning(
                "StructuredPruningCallback: training stops after epoch %d but pruning is scheduled after "
                "epochs %s; the last prunes will not run (raise num_train_epochs)",
                state.num_train_epochs - 1,
                self.prune_points,
            )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

_STEP_ARGS = ("prune_steps", "every_n_steps", "start_step")


def read_checkpoint_history(folder: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The pruning history stored in a checkpoint folder (``None`` when it holds none); with
    :func:`~prune_callbacks.apply_pruning_history` it rebuilds the pruned structure on a fresh model.
    The file is the one :func:`~prune_callbacks.integrations.hf.pretrained.save_pretrained` writes."""
    path = os.path.join(os.fspath(folder), HISTORY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    history = data.get("history") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT or not isinstance(history, list):
        raise ValueError(f"{path} does not hold a pruning history ({HISTORY_FORMAT!r})")
    return history


class _ShapeExplainer:
    """``load_state_dict`` pre-hook: when the incoming tensors do not fit the model's shapes, say that
    a pruned checkpoint needs :meth:`StructuredPruningCallback.restore` first (torch's own size
    mismatch messages follow)."""

    def __call__(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        error_msgs = args[-1]
        own = {prefix + k: v for k, v in module.state_dict().items()}
        wrong = [k for k, v in state_dict.items() if k in own and getattr(v, "shape", None) != own[k].shape]
        if wrong and isinstance(error_msgs, list):
            error_msgs.insert(
                0,
                f"{len(wrong)} tensors of the checkpoint have other shapes than the model (e.g. {wrong[0]}: "
                f"{tuple(state_dict[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}). A checkpoint of a "
                "pruning run: call StructuredPruningCallback.restore(checkpoint) before "
                "trainer.train(resume_from_checkpoint=checkpoint), or rebuild the pruned structure with "
                "apply_pruning_history(model, read_checkpoint_history(checkpoint)). A checkpoint written "
                "before a prune (load_best_model_at_end) cannot be loaded into the pruned model",
            )


def _schedule(
    settings: PruningSettings,
    prune_steps: Sequence[int] | int | None,
    every_n_steps: int | None,
    start_step: int | None,
) -> tuple[list[int], PruningSettings]:
    """The prune points (steps or epochs) and the settings with ``iterative_steps`` set to their number."""
    if prune_steps is None and every_n_steps is None and start_step is None:
        return settings.prune_epochs(), settings
    defaults = {"epochs": None, "end_epoch": None, "start_epoch": 0, "every_n_epochs": 1}
    for key, default in defaults.items():
        if getattr(settings, key) != default:
            raise SettingsError(
                key,
                getattr(settings, key),
                "is part of an epoch schedule, set together with a step schedule (prune_steps...)",
                "prune by epochs or by optimizer steps, not both",
            )
    if prune_steps is not None:
        if every_n_steps is not None or start_step is not None:
            key, value = (
                ("every_n_steps", every_n_steps) if every_n_steps is not None else ("start_step", start_step)
            )
            raise SettingsError(key, value, "is set together with prune_steps", "set one of them")
        points: Any = [prune_steps] if _is_int(prune_steps) else prune_steps
        if (
            not isinstance(points, (list, tuple))
            or not points
            or not all(_is_int(s) and s >= 1 for s in points)
        ):
            raise SettingsError(
                "prune_steps",
                prune_steps,
                "must list optimizer steps (integers >= 1)",
                "e.g. prune_steps=[100,200]",
            )
        if sorted(set(points)) != list(points):
            raise SettingsError(
                "prune_steps", prune_steps, "must be strictly increasing", "e.g. prune_steps=[100,200]"
            )
        points = [int(s) for s in points]
        if (
            settings.iterative_steps is not None or isinstance(settings.schedule, list)
        ) and settings.steps != len(points):
            raise SettingsError(
                "prune_steps",
                points,
                f"gives {len(points)} pruning steps but the settings give {settings.steps}",
                "make them agree (one optimizer step per pruning step) or leave iterative_steps unset",
            )
        return points, settings.replace(iterative_steps=len(points))
    every = 1 if every_n_steps is None else every_n_steps
    if not _is_int(every) or every < 1:
        raise SettingsError(
            "every_n_steps", every_n_steps, "must be an integer >= 1", "e.g. every_n_steps=100"
        )
    start = every if start_step is None else start_step
    if not _is_int(start) or start < 1:
        raise SettingsError(
            "start_step", start_step, "must be an optimizer step (an integer >= 1)", "e.g. start_step=100"
        )
    return [start + k * every for k in range(settings.steps)], settings


def _check_setup(args: TrainingArguments, importance: Any) -> None:
    """Refuse what the callback does not support, before anything is traced."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ValueError(
            "StructuredPruningCallback does not support DeepSpeed or FSDP (sharded parameters cannot be "
            "pruned in place); train on one process"
        )
    if int(getattr(args, "world_size", 1)) > 1 or int(getattr(args, "n_gpu", 1) or 1) > 1:
        raise ValueError(
            "StructuredPruningCallback supports one process on one device for now (every rank would have "
            "to prune the same channels and the DDP / DataParallel wrapper be rebuilt); use the Lightning "
            "StructuredPruning callback for DDP, or train on one device"
        )
    if getattr(importance, "requires_gradients", False) and not hasattr(
        TrainerCallback, "on_pre_optimizer_step"
    ):
        raise RuntimeError(
            "this transformers version has no TrainerCallback.on_pre_optimizer_step, where gradient "
            "importance is gathered; upgrade transformers (>= 4.45) or use importance='magnitude'"
        )


def _epoch_index(state: TrainerState) -> int:
    """The 0-based epoch in progress (``state.epoch`` counts fractions of epochs done)."""
    return int(math.floor(float(state.epoch or 0.0) + 1e-9))


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and other wrappers)."""
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _plain(obj: Any) -> Any:
    """``obj`` as JSON reads it back (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(obj))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through a temporary file in the same folder, renamed over it when complete."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Leave the torch (CPU and current CUDA device), Python and NumPy random states as they were,
    so that tracing, a collator drawing random masks or a prune do not change the training run."""
    import numpy.random as np_random  # a dependency of transformers

    py_state, np_state = random.getstate(), np_random.get_state()
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np_random.set_state(np_state)
