"""Calibration criteria for LLMs: activation-aware channel scores from a few batches, no gradients.

Large language models are usually pruned after training, with a handful of calibration batches:
the input activations of every linear layer are recorded by forward hooks, and a channel is judged
by the weights that read it *and* by how large (Wanda) or how variable (FLAP) the activations
flowing through it are.

Statistics (:class:`InputStatistics`): for every ``nn.Linear`` and every ungrouped,
non-transposed convolution, per input channel ``c``, over all calibration tokens (positions) ``t``:
the count ``n``, the mean ``mean_c`` and the sum of squared deviations ``m2_c`` (merged batch by
batch in float64 with Chan's formula, so the variance does not lose precision); from them
``||X_c||^2 = m2_c + n * mean_c^2`` and the sample variance ``m2_c / (n - 1)``.

Structured scores. Removing channel ``c`` of a group zeroes input ``c`` of every layer that reads
it (the group's *consumers*: input-side items, e.g. ``down_proj`` for an MLP channel, ``o_proj`` for
an attention head, every projection reading the residual stream); the weight rows that *produce*
``c`` (``gate_proj``/``up_proj``, ``q/k/v_proj``) only matter through that input, whose whole effect
on the consumer's output is ``W[:, c] * X_c``. So both criteria score the consumer side:

* **Wanda** (Sun et al., 2023, structured as "Wanda-SP" in An et al., 2024): a consumer's value for
  its input channel ``c`` is the sum of the per-weight Wanda scores of the column it loses,
  ``sum_o |W[o, c]| * ||X_c||`` (convolutions: summed over the kernel too). With
  ``producers=True`` the producers' removed rows are added as well,
  ``sum_i |W[c, i]| * ||X_i||`` (the Wanda scores of every weight entry the prune removes).
* **FLAP** (An et al., 2024, "Fluctuation-based adaptive structured pruning"): the fluctuation of
  the input channel times the squared norm of the column,
  ``var(X_c) * sum_o W[o, c]^2``: a channel whose input is nearly constant can be removed and its
  mean contribution ``W[:, c] * mean(X_c)`` folded into the consumer's bias (*bias
  compensation*, below).

Each consumer's per-channel values go into the group's root channels like every parameter
criterion's (:class:`~.importance.ParamImportance`: scatter-add by ``item.root_idxs``, so a head
block of an ``o_proj`` sums over its query heads and head dims), then ``group_reduction``
(default ``"sum"``) and ``normalizer`` (default ``"mean"``). Producers, norms and embeddings carry
no activation statistics and add nothing; a group without a calibrated consumer (e.g. the
query/key features of attention, read by the attention product and not by a linear layer)
cannot be scored (``None``: the pruner leaves it alone).

**Gathering.** ``importance.calibrate(model, batches)`` runs the model on each batch (eval mode and
``no_grad`` for the call, the modes are put back) with the hooks on; ``with
importance.collecting(model):`` records any forward passes of the block (a training loop);
``importance.accumulate(model)``, what the training callbacks call after every backward pass
(these criteria declare ``requires_gradients`` so that the callbacks feed and reset them like the
gradient criteria), puts the hooks on if they are not on yet: forward passes from then on are
recorded, until :meth:`~CalibrationImportance.reset`, which the pruner calls after each step
(statistics of a pruned model are stale). Forward passes on ``meta`` tensors (the library's trace
and verification) and inputs whose width no longer matches the statistics are ignored.

**Bias compensation** (:class:`FLAPImportance`, ``compensate=True``): when a consumer
``nn.Linear`` loses input columns ``R`` in a pruning step, ``W_old[:, R] @ mean(X_R)`` is added to its
bias, so that the mean of its output over the calibration data is unchanged (exactly, up to
rounding: the layer is linear). It runs inside the pruner's step transaction (from
:meth:`~CalibrationImportance.reset`, which the step calls after its prunes), so a step that fails
or is rolled back (a dry run, :meth:`Pruner.preview`) leaves the biases as they were. The removed
columns are read from the pruning history records the step appended, in order (several prunes of
one step compose). Bias *values* are ordinary weights, so ``save_pruned`` / ``load_pruned`` and
checkpoints restore them. A layer without a bias gets one only with ``add_bias=True``: the new
parameter is part of the transaction too, and the step appends an ``add_bias`` record to the
pruning history (:func:`~.history.bias_record`), so ``load_pruned``, ``apply_pruning_history`` and
a resumed Lightning run give a fresh model the same biases before the weights load (strictly).
Files written before that record existed need :func:`add_biases` by hand before ``load_pruned``.
An optimizer built before the prune does not train a new bias. Without ``add_bias`` such layers
are skipped with a warning. Interactive steps (``step(interactive=True)``)
are not compensated: the criterion is reset before the caller prunes.

Several processes (DDP): the statistics of every rank are merged before scoring
(:meth:`~CalibrationImportance.synchronize`), so that all ranks score and compensate alike.

**From the pruner.** ``Pruner(model, example, importance="wanda", calibration_data=batches)``
calibrates on ``batches`` before every step (the statistics gathered before are replaced), so a
plain script needs no hooks of its own.

**Block by block** (sequential calibration, as SparseGPT and Wanda prune LLMs): with
``Pruner(..., calibration_data=batches, calibration_blocks="model.layers")`` (or ``"auto"``:
:func:`repeated_blocks`) one step goes through the blocks in order; the statistics of block ``k``
are recorded on the model whose blocks ``0..k-1`` are pruned already (each batch runs only up to
block ``k``: ``calibrate(..., stop_after=block)``), block ``k``'s groups are pruned (and FLAP
compensates them with those statistics), then block ``k + 1`` is calibrated. Groups not inside one
block (the residual stream when it is pruned, embeddings, the head) are pruned with the last
block, calibrated by full passes. With one block this is the one-shot step. The whole step is one
transaction, like every step.
"""

from __future__ import annotations

import difflib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import function_by_name
from .history import ADD_BIAS, bias_record, get_pruning_history
from .importance import IMPORTANCES, ParamImportance

__all__ = [
    "CalibrationImportance",
    "FLAPImportance",
    "InputStatistics",
    "WandaImportance",
    "add_biases",
    "add_new_biases_to_optimizers",
    "calibrated_layers",
    "repeated_blocks",
    "resolve_blocks",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def calibrated_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer of ``model`` whose inputs the calibration criteria record:
    ``nn.Linear`` (and subclasses) and ungrouped, non-transposed convolutions."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, _CONVS) and module.groups == 1 and not module.transposed
        ):
            yield name, module


def repeated_blocks(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """The repeated blocks of ``model`` for sequential calibration: ``(name, blocks)`` of the
    ``nn.ModuleList`` / ``nn.Sequential`` whose children (two or more) are all of one class and
    hold the most calibrated layers together (the decoder layers of an LLM); the outermost one
    on a tie; None when there is none."""
    best: tuple[int, str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        size = sum(1 for c in children for _ in calibrated_layers(c))
        if size and (best is None or size > best[0]):
            best = (size, name, children)
    return None if best is None else (best[1], best[2])


def resolve_blocks(model: nn.Module, spec: Any) -> list[nn.Module]:
    """The blocks of ``model`` named by ``spec``, in order: ``"auto"`` (:func:`repeated_blocks`),
    the name of an ``nn.ModuleList`` / ``nn.Sequential`` of the model (``"model.layers"``), such a
    container itself, or a list of modules or module names. Blocks must be modules of the model,
    none inside another. Raises ``ValueError`` naming the fix."""
    key = "calibration_blocks"
    modules = dict(model.named_modules())
    ids = {id(m) for m in modules.values()}

    def by_name(name: str) -> nn.Module:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"{key}={name!r}: the model has no module of that name{hint}")
        return modules[name]

    if isinstance(spec, str) and spec == "auto":
        found = repeated_blocks(model)
        if found is None:
            raise ValueError(
                f"{key}='auto': no repeated blocks found (an nn.ModuleList of layers of one class); name "
                f"them, e.g. {key}='model.layers', or pass a list of modules"
            )
        blocks = found[1]
    elif isinstance(spec, (str, nn.ModuleList, nn.Sequential)):
        container = by_name(spec) if isinstance(spec, str) else spec
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"{key}={spec!r} is a {type(container).__name__}, not an nn.ModuleList or nn.Sequential of "
                f"blocks; name the list of blocks (e.g. {key}='model.layers') or pass a list of modules"
            )
        blocks = list(container.children())
    elif isinstance(spec, Iterable) and not isinstance(spec, (nn.Module, Mapping)):
        blocks = [by_name(b) if isinstance(b, str) else b for b in spec]
    else:
        raise ValueError(
            f"{key}: expected 'auto', a module name, an nn.ModuleList or a list of modules, got "
            f"{type(spec).__name__}"
        )
    if not blocks:
        raise ValueError(f"{key}={spec!r}: no blocks; name a non-empty list of blocks")
    for b in blocks:
        if not isinstance(b, nn.Module) or id(b) not in ids:
            raise ValueError(f"{key}: {b!r} is not a module of the model")
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    if len({id(b) for b in blocks}) != len(blocks) or any(id(b) in inner for b in blocks):
        raise ValueError(f"{key}: a block is listed twice or lies inside another one; pass disjoint blocks")
    return blocks


def _in_channels(module: nn.Module) -> int:
    return int(module.in_features if isinstance(module, nn.Linear) else module.in_channels)  # type: ignore[arg-type]


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def _weight_3d(module: nn.Module) -> Tensor:
    """The weight as ``(out, in, k)`` (``k = 1`` for a linear layer), detached, float32."""
    w = _weight(module).detach().float()
    return w.reshape(w.shape[0], w.shape[1], -1)


class InputStatistics:
    """Per-input-channel statistics of one layer over the calibration tokens (see the module
    docstring): ``count`` tokens, ``mean`` and ``m2`` (sum of squared deviations), float64 on the
    layer's device, and ``calls`` (forward passes recorded)."""

    __slots__ = ("count", "mean", "m2", "calls")

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)
        self.calls = 0

    @property
    def channels(self) -> int:
        return int(self.mean.numel())

    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        """Add ``(tokens, channels)`` samples (merged with the running values by Chan's formula)."""
        n_b = int(rows.shape[0])
        if n_b == 0:
            return
        x = rows.detach().float()
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum(0).double()
        mean_b = mean_b.double().to(self.mean.device)
        m2_b = m2_b.to(self.mean.device)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (n_a * n_b / n)
        self.count = n
        self.calls += 1

    def squared_norm(self) -> Tensor:
        """``||X_c||^2``: the sum of squares of every channel's samples (float64)."""
        return self.m2 + self.count * self.mean.pow(2)

    def variance(self) -> Tensor:
        """The sample variance of every channel (``m2 / (n - 1)``; 0 with fewer than 2 samples)."""
        return self.m2 / max(self.count - 1, 1)

    def state(self) -> dict[str, Any]:
        return {
            "count": int(self.count),
            "calls": int(self.calls),
            "mean": self.mean.detach().cpu(),
            "m2": self.m2.detach().cpu(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: torch.device | str = "cpu") -> InputStatistics:
        stats = cls(int(state["mean"].numel()), device)
        stats.count = int(state["count"])
        stats.calls = int(state.get("calls", 0))
        stats.mean = state["mean"].to(device=device, dtype=torch.float64)
        stats.m2 = state["m2"].to(device=device, dtype=torch.float64)
        return stats


def _channel_rows(module: nn.Module, x: Any) -> Tensor | None:
    """The input of ``module`` as ``(tokens, channels)``, or None when it is not a recordable
    real tensor of the layer's width (meta tensors of a trace, a pruned layer's old width)."""
    if not isinstance(x, Tensor) or x.device.type == "meta" or not x.is_floating_point():
        return None
    c = _in_channels(module)
    if isinstance(module, nn.Linear):
        return x.reshape(-1, c) if x.dim() >= 1 and x.shape[-1] == c else None
    if x.dim() >= 3 and x.shape[1] == c:  # batched convolution input (B, C, *spatial)
        return x.movedim(1, -1).reshape(-1, c)
    return None


class _StopForward(Exception):
    """Raised by the hook of ``calibrate(stop_after=...)`` to end a pass once the module ran."""


def _stop_forward(module: nn.Module, args: Any, output: Any) -> None:
    raise _StopForward


class CalibrationImportance(ParamImportance):
    """Shared machinery of the activation-aware criteria: the hooks, the statistics, their state.

    Subclasses define :meth:`consumer_values` (one value per input channel of a calibrated layer)
    and may define :meth:`producer_values` (one per output channel). See the module docstring.
    ``requires_gradients`` is True so that the pruner resets the criterion after every step and
    the training callbacks feed it through :meth:`accumulate` like a gradient criterion
    (``requires_calibration`` tells them the statistics come from forward passes).
    """

    requires_gradients = True
    requires_calibration = True

    def __init__(self, group_reduction: str = "sum", normalizer: str | None = "mean") -> None:
        super().__init__(group_reduction, normalizer)
        self._stats: dict[int, tuple[weakref.ref, InputStatistics]] = {}
        self._hooks: list[Any] = []
        self._model: weakref.ref | None = None

    # -- gathering -------------------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        """Forward passes recorded (the most any calibrated layer saw; 0: no statistics)."""
        return max((stats.calls for _, stats in self._stats.values()), default=0)

    @property
    def attached(self) -> bool:
        """Whether the hooks are on a model now."""
        return bool(self._hooks)

    def attach(self, model: nn.Module) -> None:
        """Put the recording hooks on every calibrated layer of ``model`` (see
        :func:`calibrated_layers`); nothing changes when they are on this model already."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.attach(): model must be an nn.Module, got {type(model).__name__}"
            )
        if self._hooks and self._model is not None and self._model() is model:
            return
        self.detach()
        self._model = weakref.ref(model)
        for _, module in calibrated_layers(model):
            self._hooks.append(module.register_forward_pre_hook(self._record))

    def detach(self) -> None:
        """Take the hooks off (the statistics are kept)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @contextmanager
    def collecting(self, model: nn.Module) -> Iterator[CalibrationImportance]:
        """Record the forward passes of ``model`` run inside the block (hooks taken off after it,
        unless they were on before)."""
        was_on = self.attached and self._model is not None and self._model() is model
        self.attach(model)
        try:
            yield self
        finally:
            if not was_on:
                self.detach()

    def calibrate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        stop_after: nn.Module | None = None,
    ) -> int:
        """Run ``model`` on every batch of ``batches`` and record the inputs of its calibrated
        layers; returns the number of batches. A batch is called as ``model(*batch)`` for a tuple
        or list, ``model(**batch)`` for a dict, else ``model(batch)`` (``forward_fn(model, batch)``
        replaces this). The model runs in eval mode under ``no_grad``; its modes are put back.

        With ``stop_after`` (a submodule, e.g. one decoder block) each pass ends as soon as that
        module has run: the layers after it are neither run nor recorded (sequential calibration,
        see the module docstring). A batch on which it does not run is an error."""
        modes = [(m, m.training) for m in model.modules()]
        count = 0
        stop = stop_after.register_forward_hook(_stop_forward) if stop_after is not None else None
        try:
            model.eval()
            with torch.no_grad(), self.collecting(model):
                for batch in batches:
                    try:
                        if forward_fn is not None:
                            forward_fn(model, batch)
                        elif isinstance(batch, Mapping):
                            model(**batch)
                        elif isinstance(batch, (tuple, list)):
                            model(*batch)
                        else:
                            model(batch)
                    except _StopForward:
                        pass
                    else:
                        if stop_after is not None:
                            raise ValueError(
                                f"{type(self).__name__}.calibrate(): stop_after={type(stop_after).__name__} "
                                f"did not run on batch {count}: pass a module the model's forward calls"
                            )
                    count += 1
        finally:
            if stop is not None:
                stop.remove()
            for m, mode in modes:
                m.training = mode
        if count == 0:
            raise ValueError(f"{type(self).__name__}.calibrate(): no batches given")
        return count

    def accumulate(self, model: nn.Module | Iterable[Tensor], grad_scale: float | None = None) -> bool:
        """The training-loop entry point (what the callbacks call after each backward pass): put
        the hooks on ``model`` if they are not on yet, so that its forward passes are recorded from
        the next one on (the pass whose backward just ran was not, unless the hooks were already
        on). ``grad_scale`` is ignored (no gradients are read). Returns True."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.accumulate(): pass the model (an nn.Module): its forward "
                "passes are recorded by hooks"
            )
        self.attach(model)
        return True

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not args:
            return
        rows = _channel_rows(module, args[0])
        if rows is None:
            return
        entry = self._stats.get(id(module))
        if entry is None or entry[0]() is not module:
            stats = InputStatistics(rows.shape[1], rows.device)
            self._stats[id(module)] = (weakref.ref(module), stats)
        else:
            stats = entry[1]
            if stats.channels != rows.shape[1]:
                return  # the layer was pruned since: its statistics are stale until reset()
        stats.add(rows)

    def statistics(self, module: nn.Module) -> InputStatistics | None:
        """The statistics of ``module``'s inputs, or None (none recorded, or the layer's width
        changed since)."""
        entry = self._stats.get(id(module))
        if entry is None or entry[0]() is not module or entry[1].count == 0:
            return None
        if entry[1].channels != _in_channels(module):
            return None
        return entry[1]

    def reset(self) -> None:
        """Finish the step (:meth:`after_prune`), forget the statistics and take the hooks off."""
        try:
            self.after_prune()
        finally:
            self._stats.clear()
            self.detach()

    def after_prune(self) -> None:
        """Called by :meth:`reset` (by the pruner after its prunes, inside the step's transaction):
        nothing by default; bias compensation in :class:`FLAPImportance`."""

    # -- scoring ---------------------------------------------------------------------------------
    def consumer_values(self, module: nn.Module, stats: InputStatistics) -> Tensor:
        """One value per input channel of ``module`` (a consumer of the group's channels)."""
        raise NotImplementedError

    def producer_values(self, module: nn.Module, stats: InputStatistics) -> Tensor | None:
        """One value per output channel of ``module`` (a producer), or None: producers add nothing."""
        return None

    def channel_values(self, module: Any, handler: Any) -> Tensor | None:
        side = getattr(handler, "side", None)
        if not isinstance(module, nn.Module) or side not in ("in", "out"):
            return None
        stats = self.statistics(module)
        if stats is None:
            return None
        key = (id(module), side)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        vals = self.consumer_values(module, stats) if side == "in" else self.producer_values(module, stats)
        if self._cache is not None:
            self._cache[key] = vals
        return vals

    def score_groups(self, groups: Iterable[Any]) -> list[Tensor | None]:
        """Scores of several groups (the statistics of every process are merged first under
        ``torch.distributed``, so that every rank scores and compensates alike)."""
        self.synchronize()
        return super().score_groups(groups)

    def synchronize(self) -> None:
        """Merge the statistics of every process of an initialised ``torch.distributed`` group
        (a sum of counts, sums and sums of squares per layer, in the model's layer order; every
        rank must have recorded the same layers, as ranks running the same model do). Nothing
        happens in a single process."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        model = self._model() if self._model is not None else None
        if model is None:
            return
        for _, module in calibrated_layers(model):
            stats = self.statistics(module)
            if stats is None:
                continue
            n = float(stats.count)
            packed = torch.cat([stats.mean.new_tensor([n]), stats.mean * n, stats.squared_norm()])
            dist.all_reduce(packed)
            total = float(packed[0])
            c = stats.channels
            mean = packed[1 : 1 + c] / total
            stats.count = int(round(total))
            stats.mean = mean
            stats.m2 = (packed[1 + c :] - total * mean.pow(2)).clamp(min=0)

    def __call__(self, group: Any) -> Tensor | None:
        if self.num_batches == 0:
            raise RuntimeError(
                f"{type(self).__name__} has no activation statistics yet: run "
                "importance.calibrate(model, batches) (with a Pruner: pruner.importance.calibrate(model, "
                "batches)) before scoring or pruning, or run forward passes inside "
                "`with importance.collecting(model):` (the pruner resets the statistics after every step)"
            )
        return super().__call__(group)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """``{"stats": {layer name: {"count", "calls", "mean", "m2"}}}`` (CPU tensors), keyed by
        the layer's name in ``model`` (default: the model the hooks were put on)."""
        model = model if model is not None else (self._model() if self._model is not None else None)
        live = [(ref(), stats) for ref, stats in self._stats.values()]
        live = [(m, s) for m, s in live if m is not None]
        if model is None:
            if live:
                raise ValueError(
                    f"{type(self).__name__}.state_dict(): the statistics are saved by layer name; pass the "
                    "model: state_dict(model)"
                )
            return {"stats": {}}
        names = {id(m): n for n, m in model.named_modules()}
        return {"stats": {names[id(m)]: s.state() for m, s in live if id(m) in names}}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Replace the statistics by those of :meth:`state_dict`, put on the layers of the same
        names in ``model`` (entries of missing layers or another width are skipped)."""
        saved = state.get("stats") or {}
        if saved and model is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict(): the statistics are saved by layer name; pass the "
                "model: load_state_dict(state, model)"
            )
        self._stats.clear()
        if model is None:
            return
        self._model = weakref.ref(model)
        modules = dict(model.named_modules())
        for name, entry in saved.items():
            module = modules.get(name)
            if module is None or int(entry["mean"].numel()) != _in_channels(module):
                continue
            weight = getattr(module, "weight", None)
            device = weight.device if isinstance(weight, Tensor) else "cpu"
            self._stats[id(module)] = (weakref.ref(module), InputStatistics.from_state(entry, device))


class WandaImportance(CalibrationImportance):
    """Structured Wanda: per removed input channel ``c`` of a consumer, ``sum_o |W[o, c]| * ||X_c||``
    (see the module docstring); ``producers=True`` adds the producers' removed rows,
    ``sum_i |W[c, i]| * ||X_i||``."""

    def __init__(
        self, producers: bool = False, group_reduction: str = "sum", normalizer: str | None = "mean"
    ) -> None:
        super().__init__(group_reduction, normalizer)
        if not isinstance(producers, bool):
            raise ValueError(f"WandaImportance: producers must be true or false, got {producers!r}")
        self.producers = producers

    def consumer_values(self, module: nn.Module, stats: InputStatistics) -> Tensor:
        norm = stats.squared_norm().sqrt().float().to(_weight(module).device)
        return _weight_3d(module).abs().sum((0, 2)) * norm

    def producer_values(self, module: nn.Module, stats: InputStatistics) -> Tensor | None:
        if not self.producers:
            return None
        norm = stats.squared_norm().sqrt().float().to(_weight(module).device)
        return (_weight_3d(module).abs().sum(2) * norm).sum(1)

    def __repr__(self) -> str:
        return (
            f"WandaImportance(producers={self.producers}, group_reduction={self.group_reduction!r}, "
            f"normalizer={self.normalizer!r})"
        )


class _Pending:
    """A consumer scored in this step: its weight and input mean as they were, for compensation."""

    __slots__ = ("module", "weight", "mean")

    def __init__(self, module: nn.Module, weight: Tensor, mean: Tensor) -> None:
        self.module = weakref.ref(module)
        self.weight = weight
        self.mean = mean


class FLAPImportance(CalibrationImportance):
    """FLAP fluctuation: per removed input channel ``c`` of a consumer,
    ``var(X_c) * sum_o W[o, c]^2``, with bias compensation of the removed channels' mean
    contribution (see the module docstring).

    Args:
        compensate: add ``W[:, removed] @ mean(X_removed)`` to the bias of every ``nn.Linear``
            consumer that loses input columns in a step.
        add_bias: give a consumer ``nn.Linear`` without a bias one (zeros plus the compensation;
            its name is appended to :attr:`added_biases`, and an ``add_bias`` record to the
            pruning history, so that ``load_pruned`` rebuilds it); otherwise such layers are
            skipped with a warning.
    """

    def __init__(
        self,
        compensate: bool = True,
        add_bias: bool = False,
        group_reduction: str = "sum",
        normalizer: str | None = "mean",
    ) -> None:
        super().__init__(group_reduction, normalizer)
        for name, value in (("compensate", compensate), ("add_bias", add_bias)):
            if not isinstance(value, bool):
                raise ValueError(f"FLAPImportance: {name} must be true or false, got {value!r}")
        self.compensate = compensate
        self.add_bias = add_bias
        #: Names (in the model) of the layers that were given a bias by compensation.
        self.added_biases: list[str] = []
        self._pending: dict[int, _Pending] = {}
        self._mark: int | None = None
        self._warned: set[str] = set()

    def consumer_values(self, module: nn.Module, stats: InputStatistics) -> Tensor:
        if self.compensate and isinstance(module, nn.Linear):
            self._remember(module, stats)
        var = stats.variance().float().to(_weight(module).device)
        return _weight_3d(module).pow(2).sum((0, 2)) * var

    def _remember(self, module: nn.Linear, stats: InputStatistics) -> None:
        model = self._model() if self._model is not None else None
        if model is None:
            return
        if self._mark is None:
            self._mark = len(get_pruning_history(model))
        if id(module) not in self._pending:
            # a prune swaps the parameter's tensor and never writes into it: this keeps the old values
            self._pending[id(module)] = _Pending(module, module.weight.detach(), stats.mean.clone())

    def after_prune(self) -> None:
        """Compensate the consumers that lost input columns since they were scored."""
        pending, mark = self._pending, self._mark
        self._pending, self._mark = {}, None
        model = self._model() if self._model is not None else None
        if not pending or mark is None or model is None:
            return
        records = get_pruning_history(model)[mark:]
        if not records:
            return
        names = {id(m): n for n, m in model.named_modules()}
        skipped: list[str] = []
        added: list[str] = []
        for entry in pending.values():
            module = entry.module()
            if module is None or id(module) not in names:
                continue
            name = names[id(module)]
            removed, kept_rows = _removed_columns(records, name, entry.weight.shape)
            if not removed:
                continue
            had_bias = getattr(module, "bias", None) is not None
            if not self._compensate(module, name, entry, removed, kept_rows):
                skipped.append(name)
            elif not had_bias:
                added.append(name)
        if added:  # replayed by load_pruned / apply_pruning_history before the weights load
            get_pruning_history(model, create=True).append(bias_record(added))
        fresh = [n for n in skipped if n not in self._warned]
        if fresh:
            self._warned.update(fresh)
            shown = ", ".join(fresh[:4]) + (f" and {len(fresh) - 4} more" if len(fresh) > 4 else "")
            warnings.warn(
                f"FLAP bias compensation skipped for {shown}: no bias. Pass FLAPImportance(add_bias=True) "
                "to give such layers one (recorded in the pruning history, so load_pruned rebuilds it), "
                "or build the model with biases",
                stacklevel=2,
            )

    def _compensate(
        self, module: nn.Module, name: str, entry: _Pending, removed: list[int], kept_rows: list[int]
    ) -> bool:
        """Add the removed columns' mean contribution to the bias of ``module``; False when it has
        none and none may be added."""
        cols = torch.as_tensor(removed, dtype=torch.long, device=entry.weight.device)
        w = entry.weight.index_select(1, cols).double()
        delta = w @ entry.mean.to(device=w.device).index_select(0, cols)
        if len(kept_rows) != delta.numel():
            delta = delta.index_select(0, torch.as_tensor(kept_rows, dtype=torch.long, device=delta.device))
        bias: Tensor | None = getattr(module, "bias", None)
        if bias is None:
            if not self.add_bias:
                return False
            weight = _weight(module)
            module.bias = nn.Parameter(
                delta.to(device=weight.device, dtype=weight.dtype), requires_grad=weight.requires_grad
            )
            if name not in self.added_biases:
                self.added_biases.append(name)
            return True
        # a new tensor, never an in-place write: the step's snapshot keeps the old one for rollback
        bias.data = bias.data + delta.to(device=bias.device, dtype=bias.dtype)
        return True

    def reset(self) -> None:
        try:
            super().reset()
        finally:
            self._pending, self._mark = {}, None

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        self._pending, self._mark = {}, None
        super().load_state_dict(state, model)

    def __repr__(self) -> str:
        return (
            f"FLAPImportance(compensate={self.compensate}, add_bias={self.add_bias}, "
            f"group_reduction={self.group_reduction!r}, normalizer={self.normalizer!r})"
        )


def _side_of_function(name: str) -> str | None:
    try:
        return function_by_name(name).side
    except KeyError:
        if name.endswith("_in_channels"):
            return "in"
        if name.endswith("_out_channels"):
            return "out"
        return None


def _removed_columns(
    records: list[dict[str, Any]], name: str, shape: tuple[int, ...] | torch.Size
) -> tuple[list[int], list[int]]:
    """Input columns (in the numbering of a weight shaped ``shape``) that the ``records`` removed
    from layer ``name``, and the output rows they kept, composing the records in order."""
    cols = list(range(shape[1]))
    rows = list(range(shape[0]))
    removed: list[int] = []
    for record in records:
        for item in record.get("items", []):
            if item.get("target") != name:
                continue
            side = _side_of_function(str(item.get("function", "")))
            drop = set(int(i) for i in item.get("idxs", []))
            if side == "in":
                removed.extend(cols[i] for i in sorted(drop) if i < len(cols))
                cols = [c for i, c in enumerate(cols) if i not in drop]
            elif side == "out":
                rows = [r for i, r in enumerate(rows) if i not in drop]
    return removed, rows


def add_biases(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Give every layer named in ``names`` a zero bias if it has none; returns the names of the
    layers that got one. Only ``nn.Linear`` and convolutions. The pruning history records the
    biases FLAP adds (``add_bias`` records) and ``load_pruned`` replays them; this is for files
    written before it did: ``add_biases(fresh, names)`` before ``load_pruned(fresh, path)``. Not
    recorded in the history (a model given biases this way saves with them in its state dict)."""
    modules = dict(model.named_modules())
    added: list[str] = []
    for name in names:
        module = modules.get(name)
        if module is None:
            raise KeyError(f"add_biases(): {name!r} is not a layer of the model")
        if not isinstance(module, (nn.Linear, *_CONVS)):
            raise TypeError(
                f"add_biases(): {name!r} is a {type(module).__name__}, not a linear or convolution layer"
            )
        if module.bias is None:
            weight = _weight(module)
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
            added.append(name)
    return added


def add_new_biases_to_optimizers(optimizers: Any, model: nn.Module) -> list[str]:
    """Let the optimizers train the biases that prunes gave layers of ``model`` (FLAP's bias
    compensation with ``add_bias=True``; the layers named by the ``add_bias`` records of the
    model's pruning history): such a bias, when an optimizer trains the layer's weight but not
    the bias, is put in the weight's param group right after the weight. That is where
    ``configure_optimizers`` / ``torch.optim.X(model.parameters())`` puts it on a model rebuilt by
    ``load_pruned`` (a new bias takes the place of the layer's ``bias = None`` entry, after its
    weight), so the optimizer's state dict saved after the prune loads into the optimizer of a
    resumed run. Call it after the step (and after ``prune_optimizer_state``); calling it again
    changes nothing. ``optimizers``: one optimizer or several (Lightning's wrappers too).
    Returns the names of the layers whose bias was added to an optimizer."""
    opts = [optimizers] if hasattr(optimizers, "param_groups") else list(optimizers)
    opts = [getattr(o, "_optimizer", o) for o in opts]
    names = [
        str(item.get("target"))
        for record in get_pruning_history(model)
        if record.get("kind") == ADD_BIAS
        for item in record.get("items", [])
    ]
    modules = dict(model.named_modules())
    added: list[str] = []
    for name in dict.fromkeys(names):
        module = modules.get(name)
        bias, weight = getattr(module, "bias", None), getattr(module, "weight", None)
        if not isinstance(bias, nn.Parameter) or not isinstance(weight, nn.Parameter):
            continue
        for opt in opts:
            groups = opt.param_groups
            if any(p is bias for g in groups for p in g["params"]):
                continue
            for group in groups:
                at = next((i for i, p in enumerate(group["params"]) if p is weight), None)
                if at is not None:
                    group["params"].insert(at + 1, bias)
                    if name not in added:
                        added.append(name)
                    break
    return added


IMPORTANCES["wanda"] = WandaImportance
IMPORTANCES["flap"] = FLAPImportance
