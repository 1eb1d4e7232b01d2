"""Time dependency-graph construction and group enumeration against Torch-Pruning.

For each model: one forward pass (reference), our ``DependencyGraph().build_dependency`` and
``get_all_groups``, and Torch-Pruning's ``DependencyGraph().build_dependency`` and
``list(get_all_groups())`` on the same model in the same process, one thread, best of several
rounds. A second part builds DenseNets of growing depth to check that our build plus
``get_all_groups`` grows linearly with the number of layers.

Run ``python benchmarks/graph_build.py`` (a few minutes on 2 cores) or ``--quick`` for a
subset; results go to ``benchmarks/results/graph_build.json``. ``--profile MODEL`` prints the
cProfile hot spots of our build and get_all_groups on one model instead.

Torch-Pruning is only a baseline here: the library never imports it.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.metadata
import json
import math
import platform
import pstats
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import prune_callbacks as pc
from prune_callbacks.reference.models import densenet, densenet121_like, densenet201_like, resnet50_like

RESULTS = Path(__file__).resolve().parent / "results" / "graph_build.json"
DENSENET121_BLOCKS = (6, 12, 24, 16)
# A Torch-Pruning step slower than this is not repeated (its DenseNet-201 get_all_groups takes
# about 14 s; one round is enough to see the ratio).
TP_REPEAT_LIMIT_S = 4.0


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A model to time, how to make it, and what Torch-Pruning needs to run on it."""

    name: str
    make: Callable[[], nn.Module]
    tp_unwrapped: Callable[[nn.Module], list[tuple[nn.Parameter, int]]] | None = None
    note: str = ""


def _hf_resnet50() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig())


def _hf_convnext_tiny() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig())


def _layer_scales(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """ConvNeXt layer-scale vectors (shape ``(C,)``): Torch-Pruning needs them listed with a dim."""
    return [(p, 0) for n, p in model.named_parameters() if n.endswith("layer_scale_parameter")]


CASES = {
    "resnet50": Case("resnet50", resnet50_like),
    "densenet121": Case("densenet121", densenet121_like),
    "densenet201": Case("densenet201", densenet201_like),
    "hf-resnet50": Case("hf-resnet50", _hf_resnet50),
    "hf-convnext-tiny": Case(
        "hf-convnext-tiny",
        _hf_convnext_tiny,
        tp_unwrapped=_layer_scales,
        note="Torch-Pruning gets unwrapped_parameters=[(layer_scale_parameter, 0), ...]",
    ),
}
QUICK = ("resnet50", "densenet121")


def count_layers(model: nn.Module) -> int:
    """Convolutions and linear layers: the layers a group is rooted at."""
    return sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = _clock()
    out = fn()
    return _clock() - start, out


def best_of(rounds: int, fn: Callable[[], Any]) -> float:
    """Best time of ``rounds`` calls."""
    return min(_timed(fn)[0] for _ in range(rounds))


def time_forward(model: nn.Module, x: torch.Tensor, rounds: int) -> float:
    with torch.no_grad():
        model(x)
        return best_of(rounds, lambda: model(x))


def time_ours(model: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Best build time and best get_all_groups time (each round: a fresh graph, then its groups)."""
    builds, groups_t, n_groups = [], [], 0
    for _ in range(rounds):
        t_build, dg = _timed(lambda: pc.DependencyGraph().build_dependency(model, x))
        t_groups, groups = _timed(dg.get_all_groups)
        builds.append(t_build)
        groups_t.append(t_groups)
        n_groups = len(groups)
    return {
        "build_s": min(builds),
        "groups_s": min(groups_t),
        "groups": n_groups,
        "items": sum(len(g) for g in groups),
        "rounds": rounds,
    }


def time_tp(case: Case, model: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Same as :func:`time_ours` for Torch-Pruning; slow steps run once."""
    import torch_pruning as tp

    def build() -> Any:
        kwargs = {}
        if case.tp_unwrapped is not None:
            kwargs["unwrapped_parameters"] = case.tp_unwrapped(model)  # TP appends to the list
        return tp.DependencyGraph().build_dependency(model, example_inputs=x, **kwargs)

    builds, groups_t, n_groups, done = [], [], 0, 0
    for _ in range(rounds):
        t_build, dg = _timed(build)
        t_groups, groups = _timed(lambda dg=dg: list(dg.get_all_groups()))
        builds.append(t_build)
        groups_t.append(t_groups)
        n_groups, done = len(groups), done + 1
        if t_build + t_groups > TP_REPEAT_LIMIT_S:
            break
    return {"build_s": min(builds), "groups_s": min(groups_t), "groups": n_groups, "rounds": done}


def warm_up(with_tp: bool) -> None:
    """First calls pay one-off costs (meta kernels, lazy imports); keep them out of the timings."""
    model = densenet(8, (2, 2), 8, 10).eval()
    x = torch.randn(1, 3, 32, 32)
    pc.DependencyGraph().build_dependency(model, x).get_all_groups()
    if with_tp:
        import torch_pruning as tp

        list(tp.DependencyGraph().build_dependency(model, example_inputs=x).get_all_groups())


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    layers: int
    forward_s: float
    ours: dict[str, Any]
    tp: dict[str, Any] | None = None
    note: str = ""
    ratios: dict[str, float] = field(default_factory=dict)


def run_model(case: Case, rounds: int, with_tp: bool) -> Row:
    torch.manual_seed(0)
    model = case.make().eval()
    x = torch.randn(1, 3, 224, 224)
    row = Row(case.name, count_layers(model), time_forward(model, x, rounds), time_ours(model, x, rounds))
    row.note = case.note
    if with_tp:
        row.tp = time_tp(case, model, x, rounds)
        o, t = row.ours, row.tp
        row.ratios = {
            "build": o["build_s"] / t["build_s"],
            "groups": o["groups_s"] / t["groups_s"],
            "build+groups": (o["build_s"] + o["groups_s"]) / (t["build_s"] + t["groups_s"]),
        }
    return row


def run_growth(scales: list[float], rounds: int, tp_scales: list[float]) -> list[dict[str, Any]]:
    """DenseNet-121 block config scaled by each factor: time per layer, ours and Torch-Pruning."""
    out = []
    for s in scales:
        blocks = tuple(max(1, round(b * s)) for b in DENSENET121_BLOCKS)
        model = densenet(32, blocks, 64, 1000).eval()
        x = torch.randn(1, 3, 224, 224)
        ours = time_ours(model, x, rounds)
        entry: dict[str, Any] = {
            "scale": s,
            "block_config": list(blocks),
            "layers": count_layers(model),
            "ours_s": ours["build_s"] + ours["groups_s"],
            "ours_build_s": ours["build_s"],
            "ours_groups_s": ours["groups_s"],
            "group_items": ours["items"],
        }
        if s in tp_scales:
            tp_times = time_tp(Case("growth", lambda m=model: m), model, x, rounds=1)
            entry["tp_s"] = tp_times["build_s"] + tp_times["groups_s"]
        out.append(entry)
        print(
            f"  blocks {str(blocks):<18} layers {entry['layers']:>4}  ours {entry['ours_s']:7.3f} s "
            f"({1000 * entry['ours_s'] / entry['layers']:.2f} ms/layer, "
            f"{1e6 * entry['ours_s'] / entry['group_items']:.0f} us/group item)"
            + (
                f"  TP {entry['tp_s']:7.2f} s ({1000 * entry['tp_s'] / entry['layers']:.1f} ms/layer)"
                if "tp_s" in entry
                else ""
            ),
            flush=True,
        )
    return out


def growth_exponent(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(time) against log(layers): 1 means linear growth."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'model':<17}{'layers':>7}{'fwd s':>8} | {'build':>7}{'TP':>8}{'ratio':>7} | "
        f"{'groups':>7}{'TP':>8}{'ratio':>7} | {'b+g':>7}{'TP':>8}{'ratio':>7} | {'#groups':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        o, t = r.ours, r.tp
        ours_total = o["build_s"] + o["groups_s"]
        if t is None:
            tp_cols = [" " * 15] * 3
            counts = f"{o['groups']:>9}"
        else:
            tp_total = t["build_s"] + t["groups_s"]
            tp_cols = [
                f"{t['build_s']:8.3f}{r.ratios['build']:7.2f}",
                f"{t['groups_s']:8.3f}{r.ratios['groups']:7.2f}",
                f"{tp_total:8.3f}{r.ratios['build+groups']:7.2f}",
            ]
            counts = f"{o['groups']:>4}/{t['groups']:<4}"
        print(
            f"{r.model:<17}{r.layers:>7}{r.forward_s:8.3f} | {o['build_s']:7.3f}{tp_cols[0]} | "
            f"{o['groups_s']:7.3f}{tp_cols[1]} | {ours_total:7.3f}{tp_cols[2]} | {counts}"
        )
    print("times in seconds, best of the rounds; ratio = ours / Torch-Pruning; #groups = ours/TP")
    for r in rows:
        if r.note:
            print(f"  {r.model}: {r.note}")
        if r.tp is not None and r.tp["rounds"] < r.ours["rounds"]:
            print(f"  {r.model}: Torch-Pruning timed over {r.tp['rounds']} round(s) (slow)")


def check_targets(rows: list[Row]) -> list[str]:
    """The issue's targets: build <= 0.5x Torch-Pruning everywhere, build + groups <= 0.1x on DenseNets."""
    lines = []
    for r in rows:
        if r.tp is None:
            continue
        ok = r.ratios["build"] <= 0.5
        lines.append(f"{r.model}: build {r.ratios['build']:.2f}x (target <= 0.5x) {'ok' if ok else 'MISSED'}")
        if r.model.startswith("densenet"):
            ok = r.ratios["build+groups"] <= 0.1
            lines.append(
                f"{r.model}: build+groups {r.ratios['build+groups']:.3f}x (target <= 0.1x) "
                f"{'ok' if ok else 'MISSED'}"
            )
    return lines


def profile(name: str, top: int) -> None:
    """cProfile of our build and get_all_groups on one model (cumulative and own time)."""
    model = CASES[name].make().eval()
    x = torch.randn(1, 3, 224, 224)
    warm_up(with_tp=False)
    for what, fn in (
        ("build_dependency", lambda: pc.DependencyGraph().build_dependency(model, x)),
        ("get_all_groups", None),
    ):
        if fn is None:
            dg = pc.DependencyGraph().build_dependency(model, x)
            fn = dg.get_all_groups
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        for key in ("cumulative", "tottime"):
            print(f"\n===== {name}: {what}, sorted by {key} =====")
            pstats.Stats(prof).sort_stats(key).print_stats(top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="ResNet-50 and DenseNet-121 only, small growth check"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement (best is kept)")
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), help="models to time (default: all)")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--no-growth", action="store_true", help="skip the linear-growth check")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a machine shared with other jobs)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--profile", choices=sorted(CASES), help="print our hot spots on this model and exit")
    parser.add_argument("--top", type=int, default=25, help="rows per profile listing")
    args = parser.parse_args(argv)

    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # both libraries warn about skipped/unwrapped layers
    if args.profile:
        profile(args.profile, args.top)
        return
    with_tp = not args.no_tp
    if with_tp:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("torch-pruning is not installed: timing ours only (pip install torch-pruning)")
            with_tp = False
    names = args.models or (list(QUICK) if args.quick else list(CASES))
    warm_up(with_tp)

    rows = []
    for name in names:
        if name.startswith("hf-"):
            try:
                import transformers  # noqa: F401
            except ImportError:
                print(f"skipping {name}: transformers is not installed")
                continue
        print(f"timing {name} ...", flush=True)
        rows.append(run_model(CASES[name], args.rounds, with_tp))
    print()
    print_table(rows)
    print(f"clock: {args.clock}")

    growth: list[dict[str, Any]] = []
    exponent = tp_exponent = items_exponent = None
    if not args.no_growth:
        scales = [0.5, 1.0, 2.0] if args.quick else [0.5, 1.0, 1.5, 2.0, 3.0]
        tp_scales = [s for s in scales if s <= 1.5] if with_tp else []
        print("\nlinear growth: DenseNet-121 blocks scaled (build + get_all_groups, best of rounds)")
        growth = run_growth(scales, args.rounds, tp_scales)
        exponent = growth_exponent([(g["layers"], g["ours_s"]) for g in growth])
        items_exponent = growth_exponent([(g["layers"], g["group_items"]) for g in growth])
        print(
            f"  ours: time ~ layers^{exponent:.2f}; output size (group items) ~ layers^{items_exponent:.2f}"
        )
        tp_points = [(g["layers"], g["tp_s"]) for g in growth if "tp_s" in g]
        if len(tp_points) >= 2:
            tp_exponent = growth_exponent(tp_points)
            print(f"  Torch-Pruning: time ~ layers^{tp_exponent:.2f}")

    targets = check_targets(rows)
    if targets:
        print("\ntargets")
        for line in targets:
            print("  " + line)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            # The package's own __version__ string lags its release number.
            "torch_pruning": importlib.metadata.version("torch-pruning") if with_tp else None,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "machine": platform.machine(),
            "argv": sys.argv[1:],
        },
        "models": [asdict(r) for r in rows],
        "growth": {
            "points": growth,
            "exponent": exponent,
            "tp_exponent": tp_exponent,
            "items_exponent": items_exponent,
        },
        "targets": targets,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
