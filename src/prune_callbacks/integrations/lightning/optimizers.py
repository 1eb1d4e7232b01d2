"""What the Lightning callbacks need to know about the optimizers at ``on_before_optimizer_step``.

Both :class:`~.callback.StructuredPruning` (gradient statistics) and :class:`~.sparse.SparseTraining`
(the regulariser's gradient) read or change gradients in that hook, and both must know whether
they are still AMP-scaled there.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

__all__ = ["pending_grad_scale", "unwrapped"]


def unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a ``LightningOptimizer`` (others as they are)."""
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def pending_grad_scale(trainer: pl.Trainer, optimizer: Any) -> float | None:
    """The AMP loss scale when gradients are still scaled at ``on_before_optimizer_step``.

    Lightning unscales before the hook, except for optimizers that unscale inside their own
    ``step`` (fused ones); those gradients are still multiplied by the scale, which is returned.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(unwrapped(optimizer), "_step_supports_amp_scaling", False):
        return None
    return float(scaler.get_scale())
