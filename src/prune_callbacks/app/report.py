"""Summarise a sweep of the app: a markdown table and an accuracy-vs-MACs plot.

``python -m prune_callbacks.report <multirun dir>`` reads every job's ``results.json`` below the
directory (as written by :mod:`prune_callbacks.app.train`), labels each job by the overrides that differ
between jobs (the swept keys), and writes ``report.md`` and ``accuracy_vs_macs.png`` into the
directory (or ``--out``). The command prints the table (its output, like ``cat``) and where it wrote
the files; the table is rendered by :func:`.tables.render_table`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tables import render_table

__all__ = ["collect", "label_jobs", "main", "markdown_table", "plot", "write_report"]

RESULTS_FILE = "results.json"
TABLE_FILE = "report.md"
PLOT_FILE = "accuracy_vs_macs.png"
log = logging.getLogger(__name__)


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``sweep_dir``, each with a ``job`` key (its folder, relative), sorted."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the multirun directory of a sweep")
    rows = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        row = json.loads(path.read_text())
        row["job"] = str(path.parent.relative_to(root)) or "."
        rows.append(row)
    if not rows:
        raise FileNotFoundError(
            f"no {RESULTS_FILE} below {root}; pass the directory of a finished "
            "`python -m prune_callbacks.train -m ...` sweep"
        )
    rows.sort(key=lambda r: (_job_order(r["job"]), r["job"]))
    return rows


def _job_order(job: str) -> tuple[int, ...]:
    """Numeric order of Hydra's job folders (0, 1, ..., 10) rather than string order."""
    return tuple(int(p) if p.isdigit() else -1 for p in Path(job).parts)


def label_jobs(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A label per job: its overrides of the keys whose values differ between jobs (the swept keys)."""
    parsed = []
    for row in rows:
        pairs = {}
        for item in row.get("overrides") or []:
            key, _, value = str(item).partition("=")
            pairs[key] = value
        parsed.append(pairs)
    keys = sorted({k for p in parsed for k in p})
    swept = [k for k in keys if len({p.get(k) for p in parsed}) > 1] if len(rows) > 1 else keys
    labels = []
    for row, pairs in zip(rows, parsed):
        parts = [f"{k}={pairs[k]}" for k in swept if k in pairs]
        labels.append(" ".join(parts) if parts else row["job"])
    return labels


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _short(override: str) -> str:
    """``group.sub.key=value`` as ``key=value``, for compact plot labels."""
    key, sep, value = override.partition("=")
    return f"{key.rsplit('.', 1)[-1]}{sep}{value}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One markdown row per job: accuracy dense/pruned, MACs, parameters and speedups."""
    labels = label_jobs(rows)
    metric = rows[0].get("metric", "accuracy")
    lat_keys = list(rows[0].get("speedup", {}).get("latency", {}))
    header = [
        "job",
        "setting",
        f"dense {metric} (%)",
        f"pruned {metric} (%)",
        "change (pt)",
        "MACs (M) dense -> pruned",
        "MACs speedup",
        "params (k) dense -> pruned",
        *[f"CPU latency speedup, batch {k}" for k in lat_keys],
    ]
    cells_per_row = []
    for row, label in zip(rows, labels):
        dense, pruned, speedup = row["dense"], row["pruned"], row["speedup"]
        da, pa = dense.get("accuracy"), pruned.get("accuracy")
        change = "n/a" if da is None or pa is None else f"{100 * (pa - da):+.2f}"
        cells = [
            row["job"],
            f"`{label}`",
            _pct(da),
            _pct(pa),
            change,
            f"{dense['macs'] / 1e6:.3f} -> {pruned['macs'] / 1e6:.3f}",
            _x(speedup.get("macs")),
            f"{dense['params'] / 1e3:.1f} -> {pruned['params'] / 1e3:.1f}",
            *[_x(speedup.get("latency", {}).get(k)) for k in lat_keys],
        ]
        cells_per_row.append(cells)
    numbers = range(2, len(header))
    return render_table(header, cells_per_row, right=numbers, markdown=True) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Scatter accuracy against MACs: each job's pruned model (labelled) and its dense starting point."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the sweep plot needs matplotlib: pip install 'prune_callbacks[plot]'") from None

    labels = label_jobs(rows)
    metric = rows[0].get("metric", "accuracy")
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    dense = [
        (r["dense"]["macs"] / 1e6, 100 * r["dense"]["accuracy"]) for r in rows if r["dense"].get("accuracy")
    ]
    if dense:
        xs, ys = [p[0] for p in dense], [p[1] for p in dense]
        ax.scatter(xs, ys, marker="*", s=160, color="0.45", label="dense (before pruning)", zorder=3)
    points = [
        (r["pruned"]["macs"] / 1e6, 100 * r["pruned"]["accuracy"], label)
        for r, label in zip(rows, labels)
        if r["pruned"].get("accuracy") is not None
    ]
    points.sort()
    if points:
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "-o",
            color="tab:blue",
            label="pruned + fine-tuned",
        )
        for x, y, name in points:
            short = " ".join(_short(part) for part in name.split(" "))
            ax.annotate(short, (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("MACs per sample (millions)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(
        title or f"{rows[0].get('model', 'model')} on {rows[0].get('data', 'data')}: accuracy vs MACs"
    )
    ax.margins(x=0.1, y=0.15)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path | None]:
    """Write ``report.md`` and ``accuracy_vs_macs.png`` for the sweep; return both paths.

    The plot needs matplotlib (the ``plot`` extra); without it the table is still written, the
    plot is skipped with a warning naming the fix, and ``None`` is returned for its path.
    """
    rows = collect(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    png: Path | None
    try:
        png = plot(rows, out / PLOT_FILE)
    except ImportError as exc:
        log.warning("%s; writing the table without the plot", exc)
        png = None
    table = markdown_table(rows)
    md = out / TABLE_FILE
    image = f"![accuracy vs MACs]({PLOT_FILE})\n" if png is not None else ""
    md.write_text(
        f"# Sweep report: {rows[0].get('model', 'model')} on {rows[0].get('data', 'data')}\n\n"
        f"Source: `{Path(sweep_dir)}` ({len(rows)} jobs)\n\n{table}\n{image}"
    )
    return md, png


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m prune_callbacks.report SWEEP_DIR [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m prune_callbacks.report",
        description="Markdown table and accuracy-vs-MACs plot of a prune_callbacks.train sweep.",
    )
    parser.add_argument("sweep_dir", help="multirun directory of the sweep (holds one folder per job)")
    parser.add_argument(
        "--out", default=None, help="where to write report.md and the PNG (default: sweep_dir)"
    )
    args = parser.parse_args(argv)
    try:
        md, png = write_report(args.sweep_dir, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(collect(args.sweep_dir)))
    print(
        f"wrote {md} and {png}" if png is not None else f"wrote {md} (no plot: matplotlib is not installed)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
