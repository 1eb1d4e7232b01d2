"""Console table of a pruning run: one row per pruning step, the dense model first.

Kept apart from the callback so that the app, scripts and tests can format the same rows (plain dicts
with ``step``, ``epoch``, ``macs``, ``params``, ``speedup`` and ``channel_ratio``) without Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_count", "format_summary"]

_COLUMNS = ("step", "epoch", "MACs", "params", "speedup", "channels pruned")


def format_count(value: float) -> str:
    """A count with a k/M/G suffix (``12.35 M``), readable at a glance in a table."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:.0f}"


def _row(record: Mapping[str, Any]) -> tuple[str, ...]:
    step = int(record.get("step", 0))
    epoch = record.get("epoch")
    return (
        "dense" if step == 0 else str(step),
        "-" if epoch is None else str(epoch),
        format_count(float(record["macs"])),
        format_count(float(record["params"])),
        f"{float(record.get('speedup', 1.0)):.2f}x",
        f"{100.0 * float(record.get('channel_ratio', 0.0)):.1f}%",
    )


def format_summary(records: Sequence[Mapping[str, Any]], title: str = "Structured pruning summary") -> str:
    """The records as an aligned text table under ``title`` (an empty string for no records)."""
    if not records:
        return ""
    rows = [_COLUMNS, *(_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def line(row: Sequence[str]) -> str:
        return " | ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        )

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([title, line(rows[0]), rule, *(line(r) for r in rows[1:])])
