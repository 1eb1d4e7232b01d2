"""What the pruning callback sends to the Trainer's loggers at every prune.

Scalars go to every logger: ``prune/step``, ``prune/macs``, ``prune/params``, ``prune/speedup``,
``prune/channel_ratio`` (plus ``prune/dense_macs`` / ``prune/dense_params`` for the dense record), and
``prune/width/<group>`` (channels kept per group) when asked. A ``WandbLogger`` also gets a
``wandb.Table`` of the groups and a per-group width chart (:mod:`.wandb_logging`, imported only then,
so the library never needs ``wandb`` otherwise). The record is the callback's plain-data record of one
pruning step (see :class:`~.callback.StructuredPruning`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from ..records import prune_metrics

__all__ = ["log_record"]


def log_record(trainer: pl.Trainer, record: Mapping[str, Any], dense: bool, group_widths: bool) -> None:
    """Scalars to every logger at the record's global step; the groups table and width chart to W&B
    (rank 0 only, after a prune)."""
    metrics = prune_metrics(record, dense, group_widths)
    step = int(record["global_step"])
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        if not dense and isinstance(logger, WandbLogger) and trainer.is_global_zero:
            from .wandb_logging import log_prune_step

            log_prune_step(logger, record, step=step)
