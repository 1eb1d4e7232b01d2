"""What the pruning callback sends to the Trainer's loggers: its settings as hyperparameters at fit
start, and metrics at every prune.

Scalars go to every logger: ``prune/step``, ``prune/macs``, ``prune/params``, ``prune/speedup``,
``prune/channel_ratio`` (plus ``prune/dense_macs`` / ``prune/dense_params`` for the dense record), and
``prune/width/<group>`` (channels kept per group) when asked. A ``WandbLogger`` also gets a
``wandb.Table`` of the groups and a per-group width chart (:mod:`.wandb_logging`, imported only then,
so the library never needs ``wandb`` otherwise). The record is the callback's plain-data record of one
pruning step (see :class:`~.callback.StructuredPruning`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from ..records import prune_metrics

__all__ = ["log_record", "log_settings"]


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


def log_settings(trainer: pl.Trainer, settings: Any, prune_epochs: Sequence[int]) -> None:
    """The callback's settings as hyperparameters of every logger (``prune_callbacks/<field>``,
    with ``prune_epochs``), so a run's pruning configuration is stored next to its metrics.
    Values that are not plain data (an importance object, modules in ``ignored_layers``) are
    logged as their ``repr``."""
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    fields["prune_epochs"] = list(prune_epochs)
    params = {f"prune_callbacks/{name}": _plain_value(value) for name, value in fields.items()}
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def _plain_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in value
    ):
        return list(value)
    return repr(value)
