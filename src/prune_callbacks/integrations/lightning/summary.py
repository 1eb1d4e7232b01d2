"""Console table of a pruning run: one row per pruning step, the dense model first.

Kept apart from the callback so that the app, scripts and tests can format the same rows (plain dicts
with ``step``, ``epoch``, ``macs``, ``params``, ``speedup`` and ``channel_ratio``) without Lightning.
The table is laid out by :class:`rich.table.Table` (``rich`` comes with Lightning) and rendered as
plain text (no colours, no markup), so it reads the same in a terminal, a log file and a test::

    Structured pruning summary
     step  | epoch |   MACs |  params | speedup | channels pruned
    -------+-------+--------+---------+---------+-----------------
     dense |     - | 1.23 M | 12.00 k |   1.00x |            0.0%
     1     |     0 | 0.60 M |  6.00 k |   2.05x |           50.0%
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

__all__ = ["COLUMNS", "format_count", "format_step_line", "format_summary", "render_plain", "summary_table"]

#: Column headers of the summary table.
COLUMNS = ("step", "epoch", "MACs", "params", "speedup", "channels pruned")
_WIDTH = 10_000  # wide enough that no column is ever wrapped or cut (a wrapped markdown row breaks)


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


def format_step_line(record: Mapping[str, Any], steps: int) -> str:
    """One line for a prune as it happens: step of ``steps``, epoch, MACs, speedup, parameters and
    how many groups lost channels."""
    changed = sum(1 for g in record.get("groups", []) if g.get("channels_after") != g.get("channels_before"))
    return (
        f"StructuredPruning: step {int(record['step'])}/{steps} after epoch {record.get('epoch')}: "
        f"{format_count(float(record['macs']))} MACs ({float(record['speedup']):.2f}x fewer than dense), "
        f"{format_count(float(record['params']))} parameters, {changed} group(s) changed"
    )


def summary_table(records: Sequence[Mapping[str, Any]], title: str = "Structured pruning summary") -> Table:
    """The records as a :class:`rich.table.Table` (print it with a rich console for a styled table)."""
    table = Table(
        title=title,
        box=box.ASCII,
        show_edge=False,
        title_justify="left",
        title_style=None,
        header_style=None,
    )
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right")
    for record in records:
        table.add_row(*_row(record))
    return table


def format_summary(records: Sequence[Mapping[str, Any]], title: str = "Structured pruning summary") -> str:
    """The records as an aligned plain-text table under ``title`` (an empty string for no records)."""
    if not records:
        return ""
    return render_plain(summary_table(records, title))


def render_plain(table: Table) -> str:
    """A rich table as plain text: no colours, control codes or markup, trailing blanks removed, so
    the same text reads right in a terminal, a log file, a markdown file and a test."""
    out = io.StringIO()
    console = Console(
        file=out,
        width=_WIDTH,
        color_system=None,
        force_terminal=False,
        markup=False,
        emoji=False,
        highlight=False,
    )
    console.print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
