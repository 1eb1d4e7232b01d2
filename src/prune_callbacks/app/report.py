"""Summarise a sweep of the app: a markdown table and an accuracy-vs-MACs plot.

``python -m prune_callbacks.report <multirun dir>`` reads every job's ``results.json`` below the
directory (as written by :mod:`prune_callbacks.app.train`), labels each job by the overrides that differ
between jobs (the swept keys), and writes ``report.md`` and ``accuracy_vs_macs.png`` into the
directory (or ``--out``). The command prints the table (its output, like ``cat``) and where it wrote
the files; the table is rendered by :func:`.tables.render_table`.

Any sweep (a grid, or the Optuna search ``hydra/sweeper=pareto``) also gets its Pareto front: jobs
whose overrides differ only in ``seed`` are one setting (mean ± standard deviation over the seeds),
a setting is dominated when another one has at least its metric at no more MACs and is better in
one of the two, and ``pareto_front.png`` draws all settings (dominated ones faded, the front
connected) while ``report.md`` lists the front with the command that reproduces each setting (the
job's own overrides, from its ``.hydra/overrides.yaml``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .tables import render_table

__all__ = [
    "Setting",
    "collect",
    "group_repeats",
    "label_jobs",
    "main",
    "markdown_table",
    "pareto_front",
    "pareto_markdown",
    "pareto_plot",
    "plot",
    "repeats_markdown",
    "reproduce_command",
    "write_report",
]

RESULTS_FILE = "results.json"
TABLE_FILE = "report.md"
PLOT_FILE = "accuracy_vs_macs.png"
PARETO_FILE = "pareto_front.png"
#: Hydra writes each job's command-line overrides here (relative to the job folder).
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
#: Jobs whose overrides differ only in this key are repeats of one setting.
SEED_KEY = "seed"
#: How a reproducing command starts (the app's module entry point; ``prune-train`` is the same).
COMMAND = "python -m prune_callbacks.train"
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
        row["command_overrides"] = _job_overrides(path.parent, row)
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


def _job_overrides(job_dir: Path, row: dict[str, Any]) -> list[str]:
    """The job's command-line overrides: Hydra's ``.hydra/overrides.yaml`` (what reproduces the job),
    else the ``overrides`` recorded in results.json."""
    path = job_dir / OVERRIDES_FILE
    if path.is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(loaded, list):
            return [str(item) for item in loaded]
    return [str(item) for item in row.get("overrides") or []]


def _pairs(overrides: Sequence[str]) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` as ``{"a.b": "1", "c": "x"}`` (the last value of a repeated key wins)."""
    pairs = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        pairs[key] = value
    return pairs


def _swept_labels(parsed: Sequence[dict[str, str]], fallback: Sequence[str]) -> list[str]:
    """A label per entry: its values of the keys that differ between entries (all keys for one entry)."""
    keys = sorted({k for p in parsed for k in p})
    swept = [k for k in keys if len({p.get(k) for p in parsed}) > 1] if len(parsed) > 1 else keys
    labels = []
    for pairs, other in zip(parsed, fallback):
        parts = [f"{k}={pairs[k]}" for k in swept if k in pairs]
        labels.append(" ".join(parts) if parts else other)
    return labels


def label_jobs(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A label per job: its overrides of the keys whose values differ between jobs (the swept keys)."""
    parsed = [_pairs(row.get("overrides") or []) for row in rows]
    return _swept_labels(parsed, [row["job"] for row in rows])


@dataclass
class Setting:
    """One setting of a sweep: the jobs that differ only in ``seed`` (or not at all: a search may ask
    for one setting twice), with the mean and standard deviation (0 for a single job) of their pruned
    metric and pruned MACs."""

    label: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    accuracy: float = 0.0
    accuracy_std: float = 0.0
    macs: float = 0.0
    macs_std: float = 0.0
    seeds: list[str] = field(default_factory=list)

    @property
    def jobs(self) -> list[str]:
        """The job folders of this setting."""
        return [row["job"] for row in self.rows]

    @property
    def repeats(self) -> int:
        """How many different seeds ran this setting (jobs with the same seed are duplicates)."""
        return len(set(self.seeds))

    @property
    def overrides(self) -> list[str]:
        """The first job's overrides without ``seed``: what every repeat shares."""
        return [o for o in self.rows[0].get("command_overrides") or [] if not _is_seed(o)]

    def dominates(self, other: Setting) -> bool:
        """At least ``other``'s metric at no more MACs, and strictly better in one of the two."""
        no_worse = self.accuracy >= other.accuracy and self.macs <= other.macs
        return no_worse and (self.accuracy > other.accuracy or self.macs < other.macs)


def _is_seed(override: str) -> bool:
    return str(override).partition("=")[0].lstrip("+~") == SEED_KEY


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_repeats(rows: Sequence[dict[str, Any]]) -> list[Setting]:
    """The settings of a sweep in job order: jobs whose overrides are equal except ``seed`` form one
    :class:`Setting`. Jobs without a pruned metric (dry runs, failed evaluations) are left out."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("pruned", {}).get("accuracy") is None:
            continue
        overrides = row.get("command_overrides", row.get("overrides")) or []
        key = tuple(sorted(o for o in overrides if not _is_seed(o)))
        groups.setdefault(key, []).append(row)
    parsed = [_pairs(key) for key in groups]
    labels = _swept_labels(parsed, [members[0]["job"] for members in groups.values()])
    if len(groups) == 1:
        labels = ["every job (one setting)"]
    settings = []
    for label, members in zip(labels, groups.values()):
        accuracy, accuracy_std = _mean_std([float(r["pruned"]["accuracy"]) for r in members])
        macs, macs_std = _mean_std([float(r["pruned"]["macs"]) for r in members])
        seeds = [
            _pairs(r.get("command_overrides") or r.get("overrides") or []).get(SEED_KEY, "default")
            for r in members
        ]
        settings.append(Setting(label, list(members), accuracy, accuracy_std, macs, macs_std, seeds))
    return settings


def pareto_front(settings: Sequence[Setting]) -> list[Setting]:
    """The settings no other setting dominates (metric up, MACs down), from the fewest MACs up."""
    front = [s for s in settings if not any(o.dominates(s) for o in settings if o is not s)]
    return sorted(front, key=lambda s: (s.macs, -s.accuracy))


def reproduce_command(setting: Setting) -> str:
    """The shell command that reruns ``setting``: one run, or a ``-m`` sweep over its seeds."""
    overrides = [shlex.quote(o) for o in setting.overrides]
    if setting.repeats == 1:
        seed = [shlex.quote(o) for o in setting.rows[0].get("command_overrides") or [] if _is_seed(o)]
        return " ".join([COMMAND, *overrides, *seed])
    seeds = ",".join(sorted(set(setting.seeds), key=lambda v: (len(v), v)))
    return " ".join([COMMAND, "-m", *overrides, f"{SEED_KEY}={seeds}"])


def _describe(setting: Setting, metric: str, dense_macs: float | None) -> str:
    """``val/acc 98.33% ± 0.12 (3 seeds), 0.912 M MACs (3.61x fewer)``."""
    n = setting.repeats
    spread = f" ± {100 * setting.accuracy_std:.2f} ({n} seeds)" if n > 1 else ""
    fewer = f" ({dense_macs / setting.macs:.2f}x fewer)" if dense_macs and setting.macs else ""
    return f"{metric} {100 * setting.accuracy:.2f}%{spread}, {setting.macs / 1e6:.3f} M MACs{fewer}"


def _dense_macs(rows: Sequence[dict[str, Any]]) -> float | None:
    values = [float(r["dense"]["macs"]) for r in rows if r.get("dense", {}).get("macs")]
    return statistics.fmean(values) if values else None


def pareto_markdown(rows: Sequence[dict[str, Any]], image: str | None = PARETO_FILE) -> str:
    """The ``Pareto front`` section of report.md: the plot and one numbered entry per non-dominated
    setting (the numbers of the plot) with its figures, jobs and reproducing command."""
    settings = group_repeats(rows)
    if len(settings) < 2:
        return ""
    metric = rows[0].get("metric", "accuracy")
    front = pareto_front(settings)
    dense_macs = _dense_macs(rows)
    lines = [
        f"## Pareto front ({metric} up, MACs down)",
        "",
        *([f"![Pareto front]({image})", ""] if image else []),
        f"{len(front)} of {len(settings)} settings are not dominated (no other setting has at least their "
        f"{metric} with no more MACs, and more of the one or fewer of the other):",
        "",
    ]
    for number, setting in enumerate(front, 1):
        jobs = ", ".join(setting.jobs)
        lines.append(f"{number}. `{setting.label}`: {_describe(setting, metric, dense_macs)}; job {jobs}")
        lines.append(f"   `{reproduce_command(setting)}`")
    return "\n".join(lines) + "\n"


def repeats_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A ``Repeats`` table (mean ± std over seeds per setting) when some settings ran with several seeds."""
    settings = group_repeats(rows)
    if all(s.repeats == 1 for s in settings):
        return ""
    metric = rows[0].get("metric", "accuracy")
    header = ["setting", "seeds", f"pruned {metric} (%)", "MACs (M)", "jobs"]
    cells = [
        [
            f"`{s.label}`",
            ",".join(s.seeds),
            f"{100 * s.accuracy:.2f} ± {100 * s.accuracy_std:.2f}",
            f"{s.macs / 1e6:.3f} ± {s.macs_std / 1e6:.3f}",
            ", ".join(s.jobs),
        ]
        for s in settings
    ]
    table = render_table(header, cells, right=(2, 3), markdown=True)
    return f"## Repeats (mean ± standard deviation over seeds)\n\n{table}\n"


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


def _figure() -> Any:
    """A matplotlib ``Figure`` (no pyplot: nothing global), or an ImportError naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the sweep plot needs matplotlib: pip install 'prune_callbacks[plot]'") from None
    return Figure(figsize=(7, 4.5), dpi=120)


def _dense_points(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """The dense models of the jobs, as grey stars."""
    dense = [
        (r["dense"]["macs"] / 1e6, 100 * r["dense"]["accuracy"]) for r in rows if r["dense"].get("accuracy")
    ]
    if dense:
        xs, ys = [p[0] for p in dense], [p[1] for p in dense]
        ax.scatter(xs, ys, marker="*", s=160, color="0.45", label="dense (before pruning)", zorder=3)


def _title(rows: Sequence[dict[str, Any]], what: str) -> str:
    return f"{rows[0].get('model', 'model')} on {rows[0].get('data', 'data')}: {what}"


def _finish(
    fig: Any,
    ax: Any,
    rows: Sequence[dict[str, Any]],
    title: str,
    path: str | Path,
    legend: str = "lower right",
) -> Path:
    """Axes labels, title, grid and legend; save the figure to ``path``."""
    ax.set_xlabel("MACs per sample (millions)")
    ax.set_ylabel(f"{rows[0].get('metric', 'accuracy')} (%)")
    ax.set_title(title)
    ax.margins(x=0.1, y=0.15)
    ax.grid(True, alpha=0.3)
    ax.legend(loc=legend)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _error_bars(ax: Any, settings: Sequence[Setting], color: str, alpha: float = 1.0) -> None:
    """Mean ± std bars of the settings with repeats (metric vertically, MACs horizontally)."""
    repeated = [s for s in settings if s.repeats > 1]
    if repeated:
        ax.errorbar(
            [s.macs / 1e6 for s in repeated],
            [100 * s.accuracy for s in repeated],
            xerr=[s.macs_std / 1e6 for s in repeated],
            yerr=[100 * s.accuracy_std for s in repeated],
            fmt="none",
            ecolor=color,
            elinewidth=1,
            capsize=3,
            alpha=alpha,
            zorder=2,
        )


def plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Scatter accuracy against MACs: each job's pruned model (labelled) and its dense starting point.

    Jobs that differ only in ``seed`` are drawn as one point, their mean, with ± std error bars.
    """
    fig = _figure()
    ax = fig.subplots()
    _dense_points(ax, rows)
    settings = group_repeats(rows)
    points = sorted(
        (s.macs / 1e6, 100 * s.accuracy, s.label + (f" ({s.repeats} seeds)" if s.repeats > 1 else ""))
        for s in settings
    )
    if any(s.repeats > 1 for s in settings):
        _error_bars(ax, settings, "tab:blue")
    elif points:  # one job per setting: the job labels, as always
        labels = label_jobs(rows)
        points = sorted(
            (r["pruned"]["macs"] / 1e6, 100 * r["pruned"]["accuracy"], label)
            for r, label in zip(rows, labels)
            if r["pruned"].get("accuracy") is not None
        )
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, "-o", color="tab:blue", label="pruned + fine-tuned")
        for x, y, name in points:
            short = " ".join(_short(part) for part in name.split(" "))
            ax.annotate(short, (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    return _finish(fig, ax, rows, title or _title(rows, "accuracy vs MACs"), path)


def pareto_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """The Pareto front: every setting (mean ± std over its seeds), the dominated ones faded, the
    front connected from the fewest MACs up and numbered as in :func:`pareto_markdown`."""
    fig = _figure()
    ax = fig.subplots()
    _dense_points(ax, rows)
    settings = group_repeats(rows)
    front = pareto_front(settings)
    dominated = [s for s in settings if all(s is not f for f in front)]
    if dominated:
        ax.scatter(
            [s.macs / 1e6 for s in dominated],
            [100 * s.accuracy for s in dominated],
            color="tab:blue",
            alpha=0.3,
            label="dominated",
            zorder=2,
        )
        _error_bars(ax, dominated, "tab:blue", alpha=0.3)
    if front:
        xs, ys = [s.macs / 1e6 for s in front], [100 * s.accuracy for s in front]
        ax.plot(xs, ys, "-o", color="tab:red", label="Pareto front", zorder=4)
        _error_bars(ax, front, "tab:red")
        for number, (x, y) in enumerate(zip(xs, ys), 1):
            ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    title = title or _title(rows, f"Pareto front of {len(settings)} settings")
    return _finish(fig, ax, rows, title, path, legend="best")


def _try_plot(draw: Any, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """``draw(rows, path)``, or None with a warning naming the fix when matplotlib is missing."""
    try:
        return Path(draw(rows, path))
    except ImportError as exc:
        log.warning("%s; writing the table without the plot", exc)
        return None


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path | None]:
    """Write ``report.md`` and ``accuracy_vs_macs.png`` for the sweep; return both paths.

    With two settings or more, ``pareto_front.png`` (:func:`pareto_plot`) is written as well and
    report.md gets the Pareto front (:func:`pareto_markdown`), and with seed repeats a table of
    their mean ± std (:func:`repeats_markdown`). The plots need matplotlib (the ``plot`` extra);
    without it the tables are still written, the plots are skipped with a warning naming the fix,
    and ``None`` is returned for the plot's path.
    """
    rows = collect(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = _try_plot(plot, rows, out / PLOT_FILE)
    several = len(group_repeats(rows)) > 1
    front_png = _try_plot(pareto_plot, rows, out / PARETO_FILE) if several and png is not None else None
    table = markdown_table(rows)
    md = out / TABLE_FILE
    image = f"![accuracy vs MACs]({PLOT_FILE})\n" if png is not None else ""
    extra = "".join(
        f"\n{part}"
        for part in (repeats_markdown(rows), pareto_markdown(rows, PARETO_FILE if front_png else None))
        if part
    )
    md.write_text(
        f"# Sweep report: {rows[0].get('model', 'model')} on {rows[0].get('data', 'data')}\n\n"
        f"Source: `{Path(sweep_dir)}` ({len(rows)} jobs)\n\n{table}\n{image}{extra}"
    )
    return md, png


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m prune_callbacks.report SWEEP_DIR [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m prune_callbacks.report",
        description="Markdown table, accuracy-vs-MACs plot and Pareto front of a prune-train sweep.",
    )
    parser.add_argument("sweep_dir", help="multirun directory of the sweep (holds one folder per job)")
    parser.add_argument(
        "--out", default=None, help="where to write report.md and the PNGs (default: sweep_dir)"
    )
    args = parser.parse_args(argv)
    try:
        md, png = write_report(args.sweep_dir, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = collect(args.sweep_dir)
    print(markdown_table(rows))
    for part in (repeats_markdown(rows), pareto_markdown(rows, image=None)):
        if part:
            print(part)
    if png is None:
        print(f"wrote {md} (no plot: matplotlib is not installed)")
        return 0
    front = png.parent / PARETO_FILE
    print(f"wrote {md}, {png}" + (f" and {front}" if front.is_file() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
