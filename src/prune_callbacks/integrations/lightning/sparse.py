"""``SparseTraining``: push whole channel groups towards zero during ``Trainer.fit``, before the cut.

A sibling of :class:`~.callback.StructuredPruning`: it regularises the groups that the pruning
callback will prune, in the epochs before it prunes them, so that the prune removes channels that
carry (almost) nothing::

    trainer = Trainer(max_epochs=20, callbacks=[
        StructuredPruning("l2", pruning_ratio=0.5, epochs=[5]),
        SparseTraining("group_lasso", strength=1e-3, start_epoch=0, end_epoch=5),
    ])

The regularisers are those of :mod:`prune_callbacks.pruning.sparsity` (``"group_lasso"``,
``"bn_scale"``, ``"growing"``): each acts on every parameter slice of a full-index group together
(conv/linear rows and the consumers' columns, norms, attention heads).

What happens during ``fit``:

* **Groups.** With a ``StructuredPruning`` callback on the Trainer, the groups are that callback's
  (``callback.pruner.groups``: the groups it will prune, without its ``ignored_layers``), read at
  every optimizer step, so after each of its prunes the regulariser works on the new groups. That
  callback builds its graph at fit start (or at the first batch), before the first optimizer
  step, so the order of the two callbacks does not matter for the groups. Without one,
  ``SparseTraining`` traces the LightningModule itself at fit start from
  ``example_input_array`` (else from the first batch, :meth:`SparseTraining.example_inputs_from_batch`)
  and regularises all its groups (less ``ignored_layers``).
* **Steps.** In epochs ``start_epoch`` to ``end_epoch`` (inclusive; default: until the last
  pruning epoch of the ``StructuredPruning`` callbacks, else to the end of training) the penalty's
  gradient is added in ``on_before_optimizer_step``: Lightning calls it once per optimizer step,
  after every accumulated micro-batch and after AMP has unscaled the gradients (optimizers that
  unscale inside their own ``step``, fused ones, get the gradient multiplied by the pending loss
  scale), and *before* gradient clipping, which therefore sees the whole gradient. Under DDP the
  gradients are averaged before the hook and every rank holds the same weights, so every rank
  adds the same penalty gradient: the ranks stay equal.
* **Order with a gradient criterion.** Both callbacks use ``on_before_optimizer_step``, in the
  order of the Trainer's ``callbacks`` list. List ``SparseTraining`` *after* a ``StructuredPruning``
  with a gradient criterion (``"taylor"``, ``"fisher"``): the criterion then reads the gradient of
  the loss alone. (Near a minimum of loss + penalty, the total gradient is about zero and a Taylor
  score of it would be noise.) The other order is warned about in ``setup``. With ``"growing"``
  prune with a magnitude criterion (``"l1"``, ``"l2"``), see :mod:`prune_callbacks.pruning.sparsity`.
* **Logging**, every epoch after its last optimizer step (so before a prune of that epoch), to
  every logger of the Trainer: ``prune/sparsity/below_threshold`` (share of root channels whose
  group norm is below ``threshold``), ``prune/sparsity/groups_below_threshold``,
  ``prune/sparsity/mean_group_norm``, ``min_group_norm``, ``max_group_norm`` and
  ``prune/sparsity/penalty`` (the mean penalty over the epoch's regularised steps). A
  ``TensorBoardLogger`` also gets a histogram of the group norms, a ``WandbLogger`` a
  ``wandb.Histogram`` and a ``wandb.Table`` of per-group figures (``wandb`` is imported only then).
  With ``"bn_scale"`` the norms are the ``|gamma|`` of the groups' batch-norm layers.
* **Checkpoints**: the regulariser's state (its step counter, growing penalties) is this
  callback's ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ...graph.dependency import Group
from ...graph.dependency_graph import DependencyGraph
from ...pruning.history import get_pruning_history
from ...pruning.naming import resolve_modules
from ...pruning.sparsity import GroupRegularizer, GrowingRegularizer, get_regularizer
from .callback import StructuredPruning
from .ddp import requires_gradients
from .optimizers import pending_grad_scale

__all__ = ["SPARSITY_PREFIX", "SparseTraining"]

#: Prefix of every metric this callback logs.
SPARSITY_PREFIX = "prune/sparsity/"
#: Version of :meth:`SparseTraining.state_dict`.
STATE_VERSION = 1


class SparseTraining(Callback):
    """Sparse training (group lasso, BN-scale L1, growing regularisation) inside ``Trainer.fit``;
    see the module docstring.

    Args:
        method: ``"group_lasso"``, ``"bn_scale"`` or ``"growing"``.
        strength: the regularisation coefficient: for ``"group_lasso"`` and ``"bn_scale"`` the
            penalty's factor (e.g. 1e-4 to 1e-2); for ``"growing"`` how much a chosen channel's
            penalty grows every ``interval`` optimizer steps (e.g. 1e-4).
        start_epoch, end_epoch: the 0-based epochs (inclusive) whose optimizer steps are
            regularised; ``end_epoch=None``: until the last pruning epoch of the Trainer's
            ``StructuredPruning`` callbacks, or to the end of training without one.
        threshold: a root channel whose group norm is below this counts as sparse in the logs.
        interval, max_strength: ``"growing"`` only: steps between growths, and the cap.
        pruning_ratio: ``"growing"`` only: the share of each group's channels whose penalty
            grows (default: the ``pruning_ratio`` of the one ``StructuredPruning`` callback).
        ignored_layers: without a ``StructuredPruning`` callback only: names (relative to the
            LightningModule, patterns allowed), modules or classes whose output channels are not
            regularised.
        graph_kwargs: without a ``StructuredPruning`` callback only: extra arguments of
            ``DependencyGraph.build_dependency`` (``forward_fn``, ``output_transform``,
            ``unwrapped_parameters``, ``customized_pruners``).
        log_histogram: also log the histogram / table of group norms where the logger supports it.
    """

    def __init__(
        self,
        method: str = "group_lasso",
        strength: float = 1e-4,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        threshold: float = 1e-3,
        interval: int = 10,
        max_strength: float = 1.0,
        pruning_ratio: float | None = None,
        ignored_layers: Sequence[Any] | None = None,
        graph_kwargs: Mapping[str, Any] | None = None,
        log_histogram: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(start_epoch, int) and start_epoch >= 0):
            raise ValueError(f"SparseTraining: start_epoch must be an int >= 0, got {start_epoch!r}")
        if end_epoch is not None and not (isinstance(end_epoch, int) and end_epoch >= start_epoch):
            raise ValueError(
                f"SparseTraining: end_epoch must be None or an int >= start_epoch={start_epoch}, "
                f"got {end_epoch!r}"
            )
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"SparseTraining: threshold must be a positive number, got {threshold!r}")
        if pruning_ratio is not None and not _is_growing(method):
            raise ValueError(
                f"SparseTraining: pruning_ratio={pruning_ratio!r} applies only to method='growing' (the "
                "share of channels whose penalty grows); remove it"
            )
        growing = {"interval": interval, "max_strength": max_strength, "pruning_ratio": pruning_ratio or 0.5}
        self.regularizer: GroupRegularizer = get_regularizer(
            method, self.current_groups, strength, **(growing if _is_growing(method) else {})
        )
        self.method = self.regularizer.method
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.threshold = float(threshold)
        self.pruning_ratio = pruning_ratio
        self.ignored_layers = list(ignored_layers or [])
        self.graph_kwargs = dict(graph_kwargs or {})
        self.log_histogram = bool(log_histogram)
        self._pruning: list[StructuredPruning] = []
        self._last_epoch: int | None = end_epoch  # the resolved end of the window (setup)
        self._graph: DependencyGraph | None = None
        self._graph_groups: list[Group] | None = None
        self._graph_history = 0
        self._module: pl.LightningModule | None = None
        self._ignored: list[Any] = []
        self._batch_idx = 0
        self._logged_epoch: int | None = None
        self._penalty_sum: torch.Tensor | None = None
        self._penalty_steps = 0

    # ------------------------------------------------------------------ public helpers
    def active(self, epoch: int) -> bool:
        """Whether the optimizer steps of ``epoch`` are regularised."""
        return epoch >= self.start_epoch and (self._last_epoch is None or epoch <= self._last_epoch)

    def current_groups(self) -> list[Group]:
        """The groups regularised now: the ``StructuredPruning`` callbacks' current groups, else
        those of this callback's own graph (traced again after a prune)."""
        if self._pruning:
            groups: list[Group] = []
            for cb in self._pruning:
                if cb.pruner is None:
                    raise RuntimeError(
                        "SparseTraining: the StructuredPruning callback has not traced the model yet; "
                        "set example_input_array on the LightningModule"
                    )
                groups.extend(cb.pruner.groups)
            return groups
        module = self._module
        if self._graph is None or module is None:
            raise RuntimeError(
                "SparseTraining: the model was never traced (no training batch was seen); set "
                "example_input_array on the LightningModule"
            )
        if self._graph_groups is None or len(get_pruning_history(module)) != self._graph_history:
            self._graph_history = len(get_pruning_history(module))
            self._graph_groups = self._graph.get_all_groups(ignored_layers=self._ignored)
        return self._graph_groups

    def example_inputs_from_batch(self, batch: Any, pl_module: pl.LightningModule) -> Any:
        """Example inputs from the first training batch when ``example_input_array`` is not set
        (as :meth:`StructuredPruning.example_inputs_from_batch`: one sample of a tensor batch or
        of the first element of a tuple/list batch; override it for other layouts)."""
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x[:1]
        return None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the pruning callbacks, resolve the epoch window and the growing ratio, and warn
        when a gradient criterion would read the penalty's gradient (``fit`` only)."""
        if stage != "fit":
            return
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning's CallbackConnector
        self._pruning = [cb for cb in callbacks if isinstance(cb, StructuredPruning)]
        if self.end_epoch is None and self._pruning:
            self._last_epoch = max(max(cb.prune_epochs) for cb in self._pruning)
        mine = callbacks.index(self)
        late = [cb for cb in callbacks[mine + 1 :] if isinstance(cb, StructuredPruning)]
        if any(requires_gradients(cb.importance) for cb in late):
            rank_zero_warn(
                "SparseTraining comes before a StructuredPruning callback with a gradient criterion in "
                "the Trainer's callbacks, so that criterion's statistics include the penalty's "
                "gradient (near a minimum of loss + penalty they are noise); list SparseTraining after "
                "StructuredPruning"
            )
        if isinstance(self.regularizer, GrowingRegularizer) and self.pruning_ratio is None:
            self.regularizer.pruning_ratio = self._growing_ratio()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Without a pruning callback, trace the module from ``example_input_array`` (if set)."""
        if self._module is not pl_module:  # another module than a previous fit's: trace it anew
            self._graph = None
            self._graph_groups = None
        self._module = pl_module
        if self._pruning or self._graph is not None:
            return
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            self._build(trainer, pl_module, example)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Remember the batch index; without a pruning callback, trace from the first batch."""
        self._batch_idx = batch_idx
        if self._pruning or self._graph is not None:
            return
        example = self.example_inputs_from_batch(batch, pl_module)
        if example is None:
            raise ValueError(
                "SparseTraining needs example inputs to trace the model: set `self.example_input_array` "
                f"in {type(pl_module).__name__}.__init__, or override example_inputs_from_batch (got a "
                f"batch of type {type(batch).__name__})"
            )
        self._build(trainer, pl_module, example)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the penalty's gradient (gradients are final here: accumulated, unscaled, not yet
        clipped); after the epoch's last optimizer step, log the group norms."""
        epoch = trainer.current_epoch
        if self.active(epoch):
            value = self.regularizer.apply(grad_scale=pending_grad_scale(trainer, optimizer))
            self._penalty_sum = value if self._penalty_sum is None else self._penalty_sum + value
            self._penalty_steps += 1
        if self._batch_idx + 1 >= trainer.num_training_batches:
            self._log(trainer, epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the group norms if the epoch ended without its last optimizer step (``max_steps``)."""
        if self._logged_epoch != trainer.current_epoch and (self._pruning or self._graph is not None):
            self._log(trainer, trainer.current_epoch)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The regulariser's state (step counter; growing penalties) and the last logged epoch."""
        return {
            "version": STATE_VERSION,
            "method": self.method,
            "regularizer": self.regularizer.state_dict(),
            "logged_epoch": self._logged_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint written with the same method (another method is refused)."""
        method = state_dict.get("method")
        if method is not None and method != self.method:
            raise ValueError(
                f"SparseTraining: the checkpoint was written with method={method!r}, this callback uses "
                f"{self.method!r}; resume with the same method or without the callback's state"
            )
        self.regularizer.load_state_dict(state_dict.get("regularizer", {}))
        self._logged_epoch = state_dict.get("logged_epoch")

    # ------------------------------------------------------------------ internals
    def _growing_ratio(self) -> float:
        """The ratio of the one ratio-driven pruning callback, for ``"growing"``."""
        ratios = {cb.settings.ratio for cb in self._pruning if cb.settings.target_speedup is None}
        if len(self._pruning) != 1 or len(ratios) != 1:
            raise ValueError(
                "SparseTraining('growing') needs the share of channels to push towards zero: pass "
                "pruning_ratio= (it is taken from the StructuredPruning callback only when there is "
                "exactly one, with a pruning_ratio rather than a target_speedup)"
            )
        return ratios.pop()

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any) -> None:
        """Trace the module for its groups (when no pruning callback gives them)."""
        example = trainer.precision_plugin.convert_input(move_data_to_device(example, pl_module.device))
        self._ignored = []
        for obj in resolve_modules(pl_module, self.ignored_layers, "ignored_layers"):
            self._ignored.extend(obj.modules() if isinstance(obj, torch.nn.Module) else [obj])
        self._graph = DependencyGraph().build_dependency(
            pl_module, example, ignored_layers=self._ignored, **self.graph_kwargs
        )
        self._graph_groups = None
        self._module = pl_module

    def _log(self, trainer: pl.Trainer, epoch: int) -> None:
        """The epoch's sparsity figures to every logger (see the module docstring)."""
        self._logged_epoch = epoch
        if not trainer.loggers:
            self._reset_penalty()
            return
        norms = self.regularizer.group_norms()
        names = self.regularizer.group_names
        report = self.regularizer.sparsity_report(self.threshold, norms)
        metrics = report.metrics(SPARSITY_PREFIX)
        metrics.pop(f"{SPARSITY_PREFIX}penalty", None)
        if self._penalty_sum is not None and self._penalty_steps:
            metrics[f"{SPARSITY_PREFIX}penalty"] = float(self._penalty_sum) / self._penalty_steps
        metrics[f"{SPARSITY_PREFIX}active"] = float(self.active(epoch))
        self._reset_penalty()
        step = int(trainer.global_step)
        present = [(name, n) for name, n in zip(names, norms) if n is not None and n.numel()]
        flat = torch.cat([n for _, n in present]) if present else torch.zeros(0)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if not self.log_histogram or not trainer.is_global_zero or flat.numel() == 0:
                continue
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(f"{SPARSITY_PREFIX}group_norms", flat, global_step=step)
            elif isinstance(logger, WandbLogger):
                _log_wandb(logger, present, flat, self.threshold, step)

    def _reset_penalty(self) -> None:
        self._penalty_sum = None
        self._penalty_steps = 0

    def __repr__(self) -> str:
        return (
            f"SparseTraining({self.regularizer!r}, start_epoch={self.start_epoch}, "
            f"end_epoch={self.end_epoch}, threshold={self.threshold})"
        )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _is_growing(method: Any) -> bool:
    return isinstance(method, str) and method.strip().lower().replace("-", "_") in ("growing", "greg")


def _log_wandb(
    logger: Any, present: list[tuple[str, torch.Tensor]], flat: torch.Tensor, threshold: float, step: int
) -> None:
    """A ``wandb.Histogram`` of all group norms and a ``wandb.Table`` with one row per group."""
    import wandb

    rows = [
        [name, int(n.numel()), int((n < threshold).sum()), float(n.min()), float(n.mean()), float(n.max())]
        for name, n in present
    ]
    table = wandb.Table(columns=["group", "channels", "below_threshold", "min", "mean", "max"], data=rows)
    logger.experiment.log(
        {
            f"{SPARSITY_PREFIX}group_norms": wandb.Histogram(flat.tolist()),
            f"{SPARSITY_PREFIX}groups": table,
            "trainer/global_step": step,
        }
    )
