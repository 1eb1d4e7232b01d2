"""Plain-text and markdown tables of the app (console summary, sweep report), rendered by ``rich``.

Tables are rendered to a string, without colour or terminal control codes and with trailing blanks
removed, so the same text goes to the console, to Hydra's ``train.log`` and into ``report.md``.
Cells are taken literally (no rich markup), so ``pruning.epochs=[2,4]`` stays as typed.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from ..integrations.lightning.summary import render_plain

__all__ = ["render_table"]

def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[int] = (),
    markdown: bool = False,
) -> str:
    """``rows`` under ``header`` as text: an ASCII grid, or a GitHub markdown table with ``markdown``.

    ``right`` lists the columns (0-based) aligned to the right (numbers); the others are aligned left.
    """
    table = Table(box=box.MARKDOWN if markdown else box.ASCII2, show_edge=True, pad_edge=True)
    for i, name in enumerate(header):
        table.add_column(Text(name), justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    return "\n".join(line for line in render_plain(table).splitlines() if line)
