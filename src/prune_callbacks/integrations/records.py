"""The callbacks' plain-data view of a pruning run: group widths, one record per pruning step and
the scalar metrics of a record. Framework-neutral: the Lightning and the Hugging Face callbacks share it.

A record is what is logged (:func:`prune_metrics`; Lightning's :mod:`.lightning.loggers`), summed up
(:mod:`.lightning.summary`), checkpointed and read by the app::

    {"step": 1, "epoch": 0, "global_step": 4, "macs": ..., "params": ..., "speedup": 2.05,
     "channel_ratio": 0.5,
     "groups": [{"root": "model.conv1", "channels_dense": 16, "channels_before": 16,
                 "channels_after": 8}, ...]}

Step 0 is the dense model (``epoch`` ``None``). Groups are named by their root layer, relative to the
LightningModule, and keep the order of the dense model's groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch.nn as nn

from ..graph.node import fn_name
from ..pruning.naming import lookup

__all__ = ["dense_widths", "group_widths", "layer_sides", "object_names", "prune_metrics", "prune_record"]

#: ``{root name: {"side": "out" | "in", "channels": dense channels}}`` of every group.
DenseWidths = dict[str, dict[str, Any]]


def object_names(model: nn.Module) -> dict[Any, str]:
    """``{module or parameter: its name in model}`` (objects as keys, compared by identity)."""
    names: dict[Any, str] = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    return names


def dense_widths(groups: Iterable[Any], names: Mapping[Any, str]) -> DenseWidths:
    """Root name, side and channel count of every group (taken before the first prune)."""
    out: DenseWidths = {}
    for group in groups:
        root = group.root.dep
        name = names.get(root.target.module, root.target.plain_name)
        out[name] = {"side": getattr(root.handler, "side", "out"), "channels": len(group.root.idxs)}
    return out


def layer_sides(groups: Iterable[Any], names: Mapping[Any, str]) -> frozenset[tuple[str, str]]:
    """``(layer name, pruning function)`` of every layer side the groups change."""
    return frozenset(
        (names[item.dep.target.module], fn_name(item.dep.handler))
        for group in groups
        for item in group
        if item.dep.target.is_module and item.dep.target.module in names
    )


def group_widths(graph: Any, model: nn.Module, dense: DenseWidths) -> dict[str, int]:
    """Current channels of every group root of ``dense`` (its dense count when the graph has none)."""
    out: dict[str, int] = {}
    for name, info in dense.items():
        target = lookup(model, name)
        n = graph.get_out_channels(target) if info["side"] == "out" else graph.get_in_channels(target)
        out[name] = int(n) if n is not None else int(info["channels"])
    return out


def prune_record(
    step: int,
    epoch: int | None,
    global_step: int,
    cost: tuple[int, int],
    dense_macs: int,
    dense: DenseWidths,
    widths: Mapping[str, int],
    before: Mapping[str, int] | None,
) -> dict[str, Any]:
    """The record of one pruning step: ``cost`` is the model's (MACs, parameters) after it,
    ``widths`` the channels after it and ``before`` those before (``None``: the same)."""
    macs, params = cost
    dense_total = sum(int(v["channels"]) for v in dense.values())
    kept_total = sum(widths.values())
    groups = [
        {
            "root": name,
            "channels_dense": int(info["channels"]),
            "channels_before": int((before or widths)[name]),
            "channels_after": widths[name],
        }
        for name, info in dense.items()
    ]
    return {
        "step": step,
        "epoch": epoch,
        "global_step": int(global_step),
        "macs": int(macs),
        "params": int(params),
        "speedup": dense_macs / macs if macs else float("inf"),
        "channel_ratio": 1.0 - kept_total / dense_total if dense_total else 0.0,
        "groups": groups,
    }


def prune_metrics(record: Mapping[str, Any], dense: bool, widths: bool) -> dict[str, float]:
    """The scalar metrics of one record (``dense``: the record of the unpruned model):
    ``prune/step``, ``prune/macs``, ``prune/params``, ``prune/speedup``, ``prune/channel_ratio``
    (``prune/dense_macs`` / ``prune/dense_params`` for the dense record) and, with ``widths``,
    ``prune/width/<group>`` (channels kept per group)."""
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
    if widths:
        for g in record["groups"]:
            metrics[f"prune/width/{g['root']}"] = float(g["channels_after"])
    return metrics
