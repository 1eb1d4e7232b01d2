"""Sensitivity scan: how much each coupled channel group hurts when it alone is pruned, and a
per-group ratio allocation that meets a MACs target with the least predicted damage.

:func:`sensitivity_scan` takes every full-index group the :class:`~.pruner.Pruner` would prune (same
``ignored_layers`` and criterion, default L2 magnitude), removes the channels the criterion ranks
lowest at each of a few ratios, measures ``evaluate(model)`` (a validation loss or metric, no
fine-tuning) and the MACs, and puts the model back exactly (each trial is a
:class:`~.history.ModelTransaction` that is always rolled back, with the graph's recorded shapes).
The result, :class:`SensitivityResult`, is plain data: group root names, ratios, the metric and
MACs-saved matrices and the dense baseline, with ``to_json()`` and ``heatmap(path)`` (a PNG; needs
matplotlib, the ``plot`` extra).

:func:`allocate` turns a scan into ratios per group that reach ``target_speedup``: a dynamic
programme over the scanned ratios (interpolated on a grid) minimises the summed damage subject to
the summed MACs savings. Savings of adjacent groups overlap (pruning a layer's outputs and the next
layer's outputs both shrink the next layer), so the plan is checked by a dry run of the real
Pruner (:meth:`~.pruner.Pruner.preview`, rolled back) and the savings asked of the programme are
corrected until the measured MACs are within ``tolerance`` (3%) of ``dense / target_speedup``. The
:class:`Allocation` is a mapping ``{root name: ratio}`` with the measured speedup; pass it as
``pruning_ratio_dict`` to the Pruner, the Lightning callback (names are resolved there as suffixes
too, so names relative to the network work on its LightningModule) or the app, with
``pruning_ratio=0`` and no ``target_speedup``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..graph.apply import recorded_shapes
from ..graph.dependency import Group
from ..measure.flops import count_macs_and_params
from .history import ModelTransaction
from .importance import group_index, group_indexes
from .pruner import Pruner
from .selection import ChannelCounts, ChannelSelector

__all__ = ["Allocation", "SensitivityResult", "allocate", "sensitivity_scan"]

log = logging.getLogger(__name__)

#: Ratios a scan uses by default.
DEFAULT_RATIOS: tuple[float, ...] = (0.25, 0.5, 0.75)
#: Bins of the MACs savings in the allocation's dynamic programme.
_BINS = 400
#: Pruner options that are not about which channels go (the graph and the model call).
_GRAPH_ARGS = (
    "forward_fn",
    "output_transform",
    "root_module_types",
    "unwrapped_parameters",
    "customized_pruners",
)


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityResult:
    """What a :func:`sensitivity_scan` measured, as plain data.

    ``metric[i][j]`` and ``macs_saved[i][j]`` are the metric and the MACs saved (dense MACs minus
    MACs) with group ``groups[i]`` pruned alone at ``ratios[j]`` (``removed[i][j]`` root channels of
    its ``channels[i]``); NaN where the prune was refused (the model would break). ``groups`` are
    the names of the root layers in the scanned model, the keys ``pruning_ratio_dict`` takes.
    ``settings`` holds the Pruner options the scan used (the criterion's name, ignored layers...),
    so :func:`allocate` checks its plan with the same choices.
    """

    groups: tuple[str, ...]
    channels: tuple[int, ...]
    ratios: tuple[float, ...]
    metric: tuple[tuple[float, ...], ...]
    macs_saved: tuple[tuple[int, ...], ...]
    removed: tuple[tuple[int, ...], ...]
    baseline_metric: float
    baseline_macs: int
    higher_is_better: bool = False
    metric_name: str = "metric"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def damage(self) -> list[list[float]]:
        """Per group and ratio, how much worse than dense the metric is (positive: worse; NaN
        where the prune was refused)."""
        sign = -1.0 if self.higher_is_better else 1.0
        return [[sign * (m - self.baseline_metric) for m in row] for row in self.metric]

    # ------------------------------------------------------------------ plain data
    def to_dict(self) -> dict[str, Any]:
        """Plain data (NaN written as None), readable by :meth:`from_dict`."""
        return {
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "baseline_metric": _plain(self.baseline_metric),
            "baseline_macs": int(self.baseline_macs),
            "ratios": list(self.ratios),
            "groups": list(self.groups),
            "channels": list(self.channels),
            "metric": [[_plain(v) for v in row] for row in self.metric],
            "macs_saved": [list(row) for row in self.macs_saved],
            "removed": [list(row) for row in self.removed],
            "settings": dict(self.settings),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityResult:
        """The result :meth:`to_dict` wrote."""

        def number(v: Any) -> float:
            return math.nan if v is None else float(v)

        return cls(
            groups=tuple(str(g) for g in data["groups"]),
            channels=tuple(int(c) for c in data["channels"]),
            ratios=tuple(float(r) for r in data["ratios"]),
            metric=tuple(tuple(number(v) for v in row) for row in data["metric"]),
            macs_saved=tuple(tuple(int(v) for v in row) for row in data["macs_saved"]),
            removed=tuple(tuple(int(v) for v in row) for row in data["removed"]),
            baseline_metric=number(data["baseline_metric"]),
            baseline_macs=int(data["baseline_macs"]),
            higher_is_better=bool(data.get("higher_is_better", False)),
            metric_name=str(data.get("metric_name", "metric")),
            settings=dict(data.get("settings") or {}),
        )

    @classmethod
    def from_json(cls, source: str | Path) -> SensitivityResult:
        """The result from JSON text or from a file holding it."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        """A table: one row per group, the metric at every ratio and the MACs saved at the largest."""
        head = f"{'group':<32} {'ch':>5} " + " ".join(f"{r:>8.2f}" for r in self.ratios) + "  MACs saved"
        lines = [
            f"sensitivity of {self.metric_name} (dense {self.baseline_metric:.4g}, "
            f"{self.baseline_macs / 1e6:.2f} M MACs) per group and pruned fraction",
            head,
        ]
        for name, n, row, saved in zip(self.groups, self.channels, self.metric, self.macs_saved):
            cells = " ".join(f"{v:>8.4g}" for v in row)
            share = saved[-1] / self.baseline_macs if self.baseline_macs else 0.0
            lines.append(f"{name[-32:]:<32} {n:>5} {cells}  {share:>9.1%}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ picture
    def heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """Write a PNG heatmap (groups x ratios): colour is the damage (metric change vs dense,
        worse is darker), each cell shows the metric and the share of MACs saved.

        Needs matplotlib (``pip install 'prune_callbacks[plot]'``); imported here only."""
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SensitivityResult.heatmap needs matplotlib: pip install 'prune_callbacks[plot]'"
            ) from exc
        damage = torch.tensor(self.damage(), dtype=torch.float64).reshape(len(self.groups), len(self.ratios))
        shown = torch.nan_to_num(damage, nan=0.0).clamp(min=0.0)
        fig = Figure(
            figsize=(2.0 + 1.3 * len(self.ratios), 1.2 + 0.45 * len(self.groups)), layout="constrained"
        )
        ax = fig.add_subplot()
        image = ax.imshow(shown.numpy(), cmap="Reds", aspect="auto", vmin=0.0)
        for i in range(len(self.groups)):
            for j in range(len(self.ratios)):
                value = self.metric[i][j]
                saved = self.macs_saved[i][j] / self.baseline_macs if self.baseline_macs else 0.0
                text = "refused" if math.isnan(value) else f"{value:.3g}\n-{saved:.0%} MACs"
                dark = float(shown[i, j]) > 0.6 * float(shown.max()) if float(shown.max()) > 0 else False
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_xticks(range(len(self.ratios)), [f"{r:g}" for r in self.ratios])
        ax.set_yticks(range(len(self.groups)), [f"{g} ({n})" for g, n in zip(self.groups, self.channels)])
        ax.set_xlabel("fraction of the group's channels removed")
        ax.set_title(
            title or f"{self.metric_name} with one group pruned (dense {self.baseline_metric:.3g})",
            fontsize=9,
        )
        change = "drop below" if self.higher_is_better else "rise above"
        fig.colorbar(image, ax=ax, label=f"{self.metric_name}: {change} dense")
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path


def _plain(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


# ---------------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------------


class _Undo(BaseException):
    """Raised at the end of a trial so that its transaction rolls back (never escapes it)."""


@contextmanager
def _trial(pruner: Pruner) -> Iterator[None]:
    """Run the block on the model, then put everything back: the model (values, tensors,
    attributes, history) through a :class:`ModelTransaction`, and the graph's recorded shapes."""
    undo_shapes = recorded_shapes(e for node in pruner.DG.nodes for e in node.out_edges)
    try:
        with ModelTransaction(pruner.model):
            yield
            raise _Undo
    except _Undo:
        pass
    finally:
        undo_shapes()
        pruner.subsets.forget()


def _metric(evaluate: Callable[[nn.Module], float], model: nn.Module) -> float:
    """``evaluate(model)`` as a float, with the model in eval mode under ``torch.no_grad()``
    (train/eval modes restored), so that batch norm statistics and gradients stay untouched."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            value = evaluate(model)
    finally:
        for m, mode in modes:
            m.training = mode
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(value):
        warnings.warn(f"prune_callbacks: evaluate(model) returned {value}", stacklevel=3)
    return value


def _check_ratios(ratios: Iterable[float]) -> tuple[float, ...]:
    out = sorted({float(r) for r in ratios})
    bad = [r for r in out if not 0.0 < r < 1.0]
    if not out or bad:
        raise ValueError(f"ratios={list(ratios)}: give fractions in (0, 1), e.g. ratios=(0.25, 0.5, 0.75)")
    return tuple(out)


def _names(model: nn.Module) -> dict[int, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(m): n for n, m in model.named_modules()})
    return names


def _scanned(groups: list[Group], names: Mapping[int, str]) -> list[tuple[Group, str]]:
    """The groups a scan covers, with their root names: those whose root loses output channels
    (what ``pruning_ratio_dict`` keys select) and that are not scored by attention heads (their
    ratio is ``head_pruning_ratio``)."""
    out = []
    for g in groups:
        root = g.root.dep
        if g.head_blocks or getattr(root.handler, "side", "out") != "out":
            log.info("sensitivity: %s is not scanned (heads or an input side)", root.target.name)
            continue
        name = names.get(id(root.target.module))
        if not name:  # not named inside the model (or the model itself): no key can select it
            continue
        out.append((g, name))
    return out


def sensitivity_scan(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Callable[[nn.Module], float],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    importance: Any = "magnitude",
    ignored_layers: Iterable[Any] | None = None,
    higher_is_better: bool = False,
    metric_name: str = "metric",
    **pruner_kwargs: Any,
) -> SensitivityResult:
    """Prune each full-index group alone at each ratio, measure ``evaluate(model)`` and the MACs,
    and put the model back bitwise (see the module docstring).

    Args:
        model: the (trained) model; it is changed during the scan and restored after every trial.
        example_inputs: inputs for one forward pass (as for the Pruner).
        evaluate: ``evaluate(model) -> float``, e.g. the validation loss. It is called with the
            model in eval mode under ``torch.no_grad()`` (modes restored afterwards), once dense
            and once per group and ratio.
        ratios: fractions of each group's channels to remove, in (0, 1).
        importance: which channels go (the lowest-scoring ones): a criterion name or object as
            for the Pruner (default L2 magnitude). A gradient criterion needs its statistics
            gathered before the scan.
        ignored_layers: as for the Pruner: their groups are not scanned.
        higher_is_better: the metric is an accuracy (higher is better) rather than a loss.
        metric_name: the metric's name, for the table, the heatmap and the JSON.
        pruner_kwargs: other Pruner options (``round_to``, ``max_pruning_ratio``,
            ``forward_fn``, ``root_module_types``, ``unwrapped_parameters``...): a group loses
            the channels the Pruner would remove with that ratio of its own.
    """
    ratios = _check_ratios(ratios)
    ignored = list(ignored_layers or [])
    pruner = Pruner(
        model,
        example_inputs,
        importance=importance,
        pruning_ratio=0.0,
        ignored_layers=ignored,
        **pruner_kwargs,
    )
    forward_fn = pruner_kwargs.get("forward_fn")
    counts = ChannelCounts.from_settings(pruner.settings, {})
    selector = ChannelSelector(pruner.DG, pruner.subsets)
    base_macs = int(count_macs_and_params(model, example_inputs, forward_fn)[0])
    base_metric = _metric(evaluate, model)
    names, channels, metric, saved, removed = [], [], [], [], []
    with group_indexes():
        for group, name in _scanned(pruner.groups, _names(model)):
            scores = pruner.estimate_importance(group)
            if scores is None:
                log.info("sensitivity: the criterion cannot score %s; not scanned", name)
                continue
            n = group_index(group).n
            rows: tuple[list[float], list[int], list[int]] = ([], [], [])
            for ratio in ratios:
                value, macs, count = _one_trial(pruner, counts, selector, group, scores, ratio, evaluate)
                rows[0].append(value)
                rows[1].append(base_macs - macs if macs is not None else 0)
                rows[2].append(count)
            log.info(
                "sensitivity: %s (%d channels): %s",
                name,
                n,
                ", ".join(f"{r:g} -> {v:.4g}" for r, v in zip(ratios, rows[0])),
            )
            names.append(name)
            channels.append(n)
            metric.append(tuple(rows[0]))
            saved.append(tuple(rows[1]))
            removed.append(tuple(rows[2]))
    settings = {
        "importance": importance if isinstance(importance, str) else None,
        "ignored_layers": [s for s in ignored if isinstance(s, str)],
        **{k: v for k, v in pruner_kwargs.items() if k not in _GRAPH_ARGS and _plain_value(v)},
    }
    return SensitivityResult(
        groups=tuple(names),
        channels=tuple(channels),
        ratios=ratios,
        metric=tuple(metric),
        macs_saved=tuple(saved),
        removed=tuple(removed),
        baseline_metric=base_metric,
        baseline_macs=base_macs,
        higher_is_better=bool(higher_is_better),
        metric_name=str(metric_name),
        settings=settings,
    )


def _plain_value(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _one_trial(
    pruner: Pruner,
    counts: ChannelCounts,
    selector: ChannelSelector,
    group: Group,
    scores: torch.Tensor,
    ratio: float,
    evaluate: Callable[[nn.Module], float],
) -> tuple[float, int | None, int]:
    """(metric, MACs, channels removed) with ``group`` alone pruned at ``ratio``; the model is put
    back afterwards. (NaN, None, 0) when nothing valid can be removed or the prune is refused."""
    count = counts.local_count(group, counts.remember(group), ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refusal is recorded as NaN in the result instead
        positions = selector.select(group, scores, count) if count > 0 else None
    if not positions:
        return math.nan, None, 0
    model = pruner.model
    value, macs = math.nan, None
    with _trial(pruner), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused = pruner.subsets.prune([(group, positions)])
        if not refused:
            macs = int(count_macs_and_params(model, pruner.example_inputs, pruner.forward_fn)[0])
            value = _metric(evaluate, model)
    return value, macs, len(positions) if macs is not None else 0


# ---------------------------------------------------------------------------------------------
# The allocation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Allocation(Mapping[str, float]):
    """Ratios per group root (a read-only mapping: pass it as ``pruning_ratio_dict``) and what
    they give: the MACs measured by a dry run of the Pruner (``verified``), the speedup, the
    target and the damage the scan predicts (the sum of the groups' own damages)."""

    ratios: Mapping[str, float]
    target_speedup: float
    dense_macs: int
    macs: int
    predicted_damage: float
    verified: bool
    rounds: int = 0

    @property
    def speedup(self) -> float:
        """Dense MACs / MACs of the model pruned with these ratios."""
        return self.dense_macs / self.macs if self.macs else math.inf

    def __getitem__(self, key: str) -> float:
        return self.ratios[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ratios)

    def __len__(self) -> int:
        return len(self.ratios)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the ratios (``pruning_ratio_dict``) and the figures."""
        return {
            "pruning_ratio_dict": dict(self.ratios),
            "target_speedup": self.target_speedup,
            "speedup": self.speedup,
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "predicted_damage": self.predicted_damage,
            "verified": self.verified,
            "rounds": self.rounds,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """:meth:`to_dict` as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text


@dataclass(frozen=True)
class _Curves:
    """Per group, the candidate ratios (a grid, 0 first) with their interpolated damage and MACs
    saved; the damage is made non-decreasing in the ratio (noise in a scan should not make the
    programme prefer removing more)."""

    ratios: list[list[float]]
    damage: list[list[float]]
    saved: list[list[float]]

    @classmethod
    def from_result(cls, result: SensitivityResult, step: float) -> _Curves:
        all_r, all_d, all_s = [], [], []
        for drow, srow in zip(result.damage(), result.macs_saved):
            points = [(0.0, 0.0, 0.0)]
            for r, d, s in zip(result.ratios, drow, srow):
                if not math.isnan(d):
                    points.append((r, max(d, points[-1][1]), float(s)))
            top = points[-1][0]
            grid = [0.0] + [round(k * step, 6) for k in range(1, int(top / step + 1e-9) + 1)]
            if grid[-1] < top:
                grid.append(top)
            all_r.append(grid)
            all_d.append([_interp(points, r, 1) for r in grid])
            all_s.append([_interp(points, r, 2) for r in grid])
        return cls(all_r, all_d, all_s)

    def plan(self, wanted: float) -> tuple[list[float], float]:
        """Ratios (one per group) whose summed savings reach ``wanted`` MACs with the least summed
        damage, and that damage (the largest ratios when no plan reaches it).

        Dynamic programme over ``_BINS`` bins of ``wanted``: ``best[b]`` is the least damage that
        saves at least ``b`` bins; a candidate's savings are rounded down to whole bins."""
        if wanted <= 0:
            return [0.0] * len(self.ratios), 0.0
        unit = wanted / _BINS
        inf = math.inf
        best = torch.full((_BINS + 1,), inf, dtype=torch.float64)
        best[0] = 0.0
        positions = torch.arange(_BINS + 1)
        choices = []
        for damage, saved in zip(self.damage, self.saved):
            bins = [min(_BINS, int(s / unit)) for s in saved]
            cand = torch.stack([best[(positions - b).clamp(min=0)] + d for b, d in zip(bins, damage)])
            best, arg = cand.min(dim=0)
            choices.append((arg, bins))
        if not math.isfinite(float(best[_BINS])):  # bins rounded down: ask for the most
            return [r[-1] for r in self.ratios], sum(d[-1] for d in self.damage)
        out = [0.0] * len(self.ratios)
        b = _BINS
        for i in range(len(self.ratios) - 1, -1, -1):
            arg, bins = choices[i]
            level = int(arg[b])
            out[i] = self.ratios[i][level]
            b = max(0, b - bins[level])
        return out, float(best[_BINS])

    def at(self, group: int, ratio: float, field: int) -> float:
        """Damage (``field`` 1) or MACs saved (``field`` 2) of ``group`` at ``ratio``, linear
        between the grid points."""
        points = list(zip(self.ratios[group], self.damage[group], self.saved[group]))
        return _interp(points, ratio, field)

    def most_saved(self) -> float:
        return sum(s[-1] for s in self.saved)


def _interp(points: list[tuple[float, float, float]], r: float, k: int) -> float:
    """Linear interpolation of field ``k`` of ``points`` (sorted by ratio) at ratio ``r``."""
    for a, b in zip(points, points[1:]):
        if a[0] <= r <= b[0]:
            t = 0.0 if b[0] == a[0] else (r - a[0]) / (b[0] - a[0])
            return a[k] + t * (b[k] - a[k])
    return points[-1][k]


def allocate(
    result: SensitivityResult,
    target_speedup: float,
    model: nn.Module | None = None,
    example_inputs: Any = None,
    *,
    tolerance: float = 0.03,
    step: float = 0.01,
    max_rounds: int = 12,
    **pruner_kwargs: Any,
) -> Allocation:
    """Ratios per group that make the model ``target_speedup`` times cheaper in MACs with the
    least damage the scan predicts (see the module docstring).

    Args:
        result: a :func:`sensitivity_scan` of the model.
        target_speedup: dense MACs / pruned MACs wanted, > 1.
        model, example_inputs: the scanned model, unchanged since the scan, and its inputs: the
            plan is checked by a dry run of the Pruner (rolled back: the model stays bitwise
            equal) and corrected until the measured MACs are within ``tolerance`` of
            ``dense / target_speedup``. Without them the allocation is the programme's prediction
            only (``verified=False``).
        tolerance: accepted relative distance of the measured MACs from the goal.
        step: grid of candidate ratios (interpolated between the scanned ratios, never beyond
            the largest).
        max_rounds: dry runs at most.
        pruner_kwargs: Pruner options for the dry runs; by default the scan's (criterion, ignored
            layers...). Pass the criterion object again when the scan was given one.

    Raises ``ValueError`` when the scanned ratios cannot reach the target (scan larger ratios).
    """
    if (
        isinstance(target_speedup, bool)
        or not isinstance(target_speedup, (int, float))
        or target_speedup <= 1
    ):
        raise ValueError(f"target_speedup={target_speedup!r}: must be a number > 1, e.g. target_speedup=2")
    if not result.groups:
        raise ValueError("allocate: the scan has no groups (nothing prunable was found)")
    dense = result.baseline_macs
    goal = dense / float(target_speedup)
    need = dense - goal
    curves = _Curves.from_result(result, step)
    most = curves.most_saved()
    if most < need:
        reach = dense / max(1.0, dense - most)
        raise ValueError(
            f"target_speedup={target_speedup}: the scanned ratios (up to {max(result.ratios):g}) save "
            f"at most about {most / dense:.0%} of the MACs (~{reach:.2f}x); scan larger ratios"
        )
    check = _checker(result, model, example_inputs, pruner_kwargs)
    search = _Search(result, curves, check, float(target_speedup), tolerance)
    best = search.programme(need, most, max_rounds if check is None else max(1, max_rounds // 2))
    if check is not None and not search.close(best):
        best = search.scaled(best, max_rounds - search.rounds)
    if abs(best.macs - goal) > tolerance * goal:
        warnings.warn(
            f"prune_callbacks: allocate reached {best.speedup:.3f}x for target_speedup={target_speedup} "
            f"(MACs {best.macs}, goal {goal:.0f}, beyond {tolerance:.0%}); the groups are too coarse or "
            "the scanned ratios too few",
            stacklevel=2,
        )
    return best


class _Search:
    """The rounds of :func:`allocate`: plans of the dynamic programme for a savings figure that
    is corrected after each dry run (:meth:`programme`), then, if still off, every ratio of the
    best plan scaled by one factor found by bisection (:meth:`scaled`; the MACs fall as the factor
    grows, so this converges where the programme's plans jump)."""

    __slots__ = ("best", "check", "curves", "dense", "goal", "result", "rounds", "target", "tolerance")

    def __init__(
        self,
        result: SensitivityResult,
        curves: _Curves,
        check: Callable[[Mapping[str, float]], int] | None,
        target: float,
        tolerance: float,
    ) -> None:
        self.result, self.curves, self.check = result, curves, check
        self.target, self.tolerance = target, tolerance
        self.dense = result.baseline_macs
        self.goal = self.dense / target
        self.rounds = 0
        self.best: Allocation | None = None

    def close(self, allocation: Allocation) -> bool:
        """Within a third of the tolerance: good enough to stop searching."""
        return abs(allocation.macs - self.goal) <= self.tolerance / 3 * self.goal

    def measure(self, ratios: list[float]) -> Allocation:
        """The allocation of ``ratios`` with its MACs (a dry run, or the prediction without a
        model); the closest to the goal so far is kept in :attr:`best`."""
        table = {g: round(r, 4) for g, r in zip(self.result.groups, ratios)}
        ratios = list(table.values())
        if self.check is not None:
            macs = self.check(table)
        else:
            macs = int(round(self.dense - sum(self.curves.at(i, r, 2) for i, r in enumerate(ratios))))
        damage = sum(self.curves.at(i, r, 1) for i, r in enumerate(ratios))
        self.rounds += 1
        found = Allocation(table, self.target, self.dense, macs, damage, self.check is not None, self.rounds)
        if self.best is None or abs(macs - self.goal) < abs(self.best.macs - self.goal):
            self.best = found
        log.info("allocate: round %d gets %.3fx", self.rounds, found.speedup)
        return found

    def programme(self, need: float, most: float, rounds: int) -> Allocation:
        """Plans for the savings ``wanted``, corrected from the real savings of each dry run."""
        wanted = need
        low: tuple[float, float] | None = None  # (wanted, real saving) below the goal's saving
        high: tuple[float, float] | None = None
        previous: tuple[float, float] | None = None  # the last round's (wanted, real saving)
        for _ in range(rounds):
            found = self.measure(self.curves.plan(min(wanted, most))[0])
            if self.check is None or self.close(found):
                break
            real = self.dense - found.macs
            if real < need:
                low = (wanted, real) if low is None or wanted > low[0] else low
            else:
                high = (wanted, real) if high is None or wanted < high[0] else high
            following = _next_wanted(wanted, real, need, low, high, most, previous)
            if following is None:
                break
            previous = (wanted, real)
            wanted = following
        assert self.best is not None
        return self.best

    def scaled(self, start: Allocation, rounds: int) -> Allocation:
        """``start``'s ratios times one factor (each capped at its group's largest scanned ratio),
        the factor found by bisection on the measured MACs."""
        base = list(start.values())
        tops = [r[-1] for r in self.curves.ratios]
        if start.macs > self.goal:  # more to prune: factors above 1
            low = 1.0
            high = max((t / r for r, t in zip(base, tops) if r > 0), default=1.0)
        else:
            low, high = 0.0, 1.0
        for _ in range(rounds):
            if high - low < 1e-4:
                break
            factor = (low + high) / 2
            found = self.measure([min(t, r * factor) for r, t in zip(base, tops)])
            if self.close(found):
                break
            if found.macs > self.goal:
                low = factor
            else:
                high = factor
        assert self.best is not None
        return self.best


def _next_wanted(
    wanted: float,
    real: float,
    need: float,
    low: tuple[float, float] | None,
    high: tuple[float, float] | None,
    most: float,
    previous: tuple[float, float] | None = None,
) -> float | None:
    """The savings to ask of the programme next: on the line through this round and the previous
    one (``previous``: its asked and real savings) when that moves the right way, else scaled by
    how far the real savings fell short or overshot; kept inside the bracket found so far
    (bisection when the guess leaves it)."""
    guess = wanted * need / real if real > 0 else wanted * 2
    if previous is not None and previous[1] != real:
        secant = wanted + (need - real) * (wanted - previous[0]) / (real - previous[1])
        if (secant - wanted) * (need - real) > 0:  # asks more when short, less when beyond
            guess = secant
    if low is not None and high is not None:
        (w0, r0), (w1, r1) = low, high
        guess = w0 + (need - r0) * (w1 - w0) / (r1 - r0) if r1 > r0 else (w0 + w1) / 2
        if not min(w0, w1) < guess < max(w0, w1) or abs(w1 - w0) < 1e-9 * need:
            guess = (w0 + w1) / 2
        if abs(w1 - w0) <= need / _BINS:
            return None  # the bracket is one bin wide: nothing finer to ask for
    if low is not None and guess >= most and low[0] >= most:
        return None  # already asked for everything
    return min(guess, most)


def _checker(
    result: SensitivityResult, model: nn.Module | None, example_inputs: Any, pruner_kwargs: Mapping[str, Any]
) -> Callable[[Mapping[str, float]], int] | None:
    """A function measuring the MACs after a dry run of the Pruner with a ratio table (None
    without a model)."""
    if model is None:
        return None
    if example_inputs is None:
        raise ValueError("allocate: pass example_inputs with the model (the plan is checked by a dry run)")
    options = {k: v for k, v in result.settings.items() if v is not None}
    options.update(pruner_kwargs)
    if options.get("importance") is None:
        raise ValueError(
            "allocate: the scan used a criterion object; pass it again as importance= so the dry run "
            "removes the same channels"
        )

    def measure(table: Mapping[str, float]) -> int:
        pruner = Pruner(model, example_inputs, pruning_ratio=0.0, pruning_ratio_dict=dict(table), **options)
        preview = pruner.preview()
        return int(preview.steps[-1].macs) if preview.steps else int(preview.macs)

    return measure
