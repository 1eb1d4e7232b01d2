"""Weights & Biases extras of the pruning callback: a table of the groups and a per-layer width chart.

Imported only when a ``WandbLogger`` is attached to the Trainer, so the library never needs ``wandb``
otherwise. Everything goes through ``logger.experiment`` (the run), so it works the same in online and
offline mode (``WANDB_MODE=offline`` needs no account; the files land in the run directory).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import wandb

__all__ = ["GROUP_COLUMNS", "log_prune_step"]

#: Columns of the ``prune/groups`` table (typed as ``wandb.Table`` declares its columns).
GROUP_COLUMNS: list[str | int] = [
    "step",
    "epoch",
    "group",
    "channels_dense",
    "channels_before",
    "channels_after",
    "kept",
]


def _group_rows(record: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for g in record["groups"]:
        dense = int(g["channels_dense"])
        after = int(g["channels_after"])
        rows.append(
            [
                int(record["step"]),
                record.get("epoch"),
                g["root"],
                dense,
                int(g["channels_before"]),
                after,
                after / dense if dense else 1.0,
            ]
        )
    return rows


def log_prune_step(logger: Any, record: Mapping[str, Any], step: int | None = None) -> None:
    """Log one pruning step's groups as a ``wandb.Table`` (``prune/groups``) and a bar chart of the
    channels each group keeps (``prune/widths``), at the Trainer's ``step`` like the scalars."""
    run = logger.experiment
    table = wandb.Table(columns=GROUP_COLUMNS, data=_group_rows(record))
    widths = wandb.Table(
        columns=["group", "channels"], data=[[g["root"], int(g["channels_after"])] for g in record["groups"]]
    )
    payload: dict[str, Any] = {
        "prune/groups": table,
        "prune/widths": wandb.plot.bar(
            widths, "group", "channels", title=f"channels per group after pruning step {record['step']}"
        ),
    }
    if step is not None:
        payload["trainer/global_step"] = step
    run.log(payload)
