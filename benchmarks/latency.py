"""CPU latency of dense and pruned models at 1.5x, 2x and 3x fewer MACs: does latency follow MACs?

Models (random weights, nothing downloaded):

* ``resnet50``: :func:`prune_callbacks.reference.models.resnet50_like` (torchvision's ResNet-50 layout);
* ``vit``: a Hugging Face ``ViTForImageClassification`` of ViT-S/16 shape (384 wide, 12 layers,
  6 heads, MLP 1536, patch 16).

Each pruned model is a copy of the dense one pruned by :class:`prune_callbacks.Pruner` with
``MagnitudeImportance(p=2)`` and ``target_speedup`` (channels ranked globally until the MACs are
at most dense / target, within 3%) and ``round_to=8`` (channel counts kept multiples of 8, which
CPU kernels with 8- or 16-wide blocked layouts like). The classifier keeps its outputs; the ViT
keeps its 6 heads (hidden and MLP channels are pruned). Random weights make the channel choice
arbitrary, but latency depends only on the shapes.

Latency: one CPU thread, ``torch.no_grad()``, eval mode, batch 1 and 32 at ``--resolution``
(default 224). After one warm-up call per model, ``--rounds`` rounds each time every model of a
family (dense and pruned) in turn, the order rotating each round; a round times ``--repeats``
calls at batch 1 and one call at batch 32. Reported: the median of each model's round medians, and
the speedup as the median over rounds of dense / pruned in the same round (paired, so a change of
machine load during the run cancels). ``efficiency`` = measured speedup / MACs reduction; the
issue's target is at least 0.8 at 2x.

ONNX Runtime (when ``onnx``, ``onnxruntime`` and ``onnxscript`` are installed; ``--no-onnx`` skips
it): every model of a family is exported with :func:`prune_callbacks.measure.export.export_onnx`
(torch's ``torch.export``-based exporter, ``--onnx-exporter torchscript`` for the other; dynamic
batch), checked against PyTorch at batch 1 (``ort_max_abs_diff``) and timed in a CPU
``InferenceSession`` on the same number of threads, in alternating rounds exactly like eager
PyTorch (``ort_latency_ms``, ``ort_speedup``, ``ort_efficiency``; targets under ``ort_targets``).

Run: ``python benchmarks/latency.py`` (about 24 minutes on 2 cores with ONNX Runtime, half without);
``--smoke`` for a quick check at 64x64 with a 2-layer ViT. Results: ``benchmarks/results/latency.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prune_callbacks import MagnitudeImportance, Pruner, count_macs_and_params, measure_latency
from prune_callbacks.reference.models import resnet50_like

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
TARGET_SPEEDUP, TARGET_EFFICIENCY = 2.0, 0.8


def make_vit(resolution: int, layers: int = 12) -> nn.Module:
    """A randomly initialised ViT-S/16-shaped ``ViTForImageClassification`` at ``resolution``."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=resolution,
        patch_size=16,
        num_labels=1000,
    )
    return ViTForImageClassification(cfg)


def _classifier(model: nn.Module) -> nn.Module:
    return model.fc if hasattr(model, "fc") else model.classifier


def prune_copy(
    dense: nn.Module, x: torch.Tensor, speedup: float, round_to: int | None
) -> tuple[nn.Module, float]:
    """A copy of ``dense`` pruned to ``speedup`` fewer MACs; returns it and the seconds the prune took."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(
            model,
            x,
            MagnitudeImportance(p=2),
            target_speedup=speedup,
            round_to=round_to,
            ignored_layers=[_classifier(model)],
        )
        pruner.step()
    return model.eval(), time.perf_counter() - start


def time_family(
    models: dict[str, nn.Module], x: torch.Tensor, rounds: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per forward of every model, one median per round, rounds alternating between models."""
    names = list(models)
    for name in names:
        measure_latency(models[name], x, warmup=0, repeats=1)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(measure_latency(models[name], x, warmup=0, repeats=repeats))
    return samples


def onnx_available(exporter: str) -> bool:
    """Whether the packages the ONNX Runtime columns need are installed."""
    needed = ["onnx", "onnxruntime"] + (["onnxscript"] if exporter == "dynamo" else [])
    return all(importlib.util.find_spec(m) is not None for m in needed)


def time_family_ort(
    sessions: dict[str, Any], x: torch.Tensor, rounds: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per ONNX Runtime run of every model, one median per round, rounds alternating (as
    :func:`time_family` does for eager PyTorch)."""
    from prune_callbacks.measure.export import onnxruntime_latency

    names = list(sessions)
    for name in names:
        onnxruntime_latency(sessions[name], x, warmup=1, repeats=1)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(onnxruntime_latency(sessions[name], x, warmup=0, repeats=repeats))
    return samples


def ort_family(
    models: dict[str, nn.Module],
    x1: torch.Tensor,
    batch_inputs: dict[str, torch.Tensor],
    rounds: int,
    repeats_bs1: int,
    threads: int,
    exporter: str,
) -> dict[str, dict[str, Any]]:
    """Export every model to ONNX (dynamic batch), check it at batch 1 and time it in ONNX Runtime:
    ``{model: {"latency": {bs: [round seconds]}, "max_abs_diff": ..., "export_s": ...}}``."""
    from prune_callbacks.measure.export import check_onnx, export_onnx, onnxruntime_session

    out: dict[str, dict[str, Any]] = {k: {"latency": {}} for k in models}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sessions = {}
        for k, m in models.items():
            start = time.perf_counter()
            path = export_onnx(m, x1, Path(tmp) / f"{k}.onnx", dynamo=exporter == "dynamo")
            out[k]["export_s"] = round(time.perf_counter() - start, 2)
            sessions[k] = onnxruntime_session(path, threads=threads)
            out[k]["max_abs_diff"] = check_onnx(m, sessions[k], x1, atol=1e-3, rtol=1e-3)
        for bs, x in batch_inputs.items():
            samples = time_family_ort(sessions, x, rounds, repeats_bs1 if bs == "1" else 1)
            for k in models:
                out[k]["latency"][bs] = samples[k]
    return out


def run_family(
    name: str,
    make: Callable[[], nn.Module],
    resolution: int,
    speedups: Sequence[float],
    batch_sizes: Sequence[int],
    rounds: int,
    repeats_bs1: int,
    round_to: int | None,
    onnx: str | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Prune one model family to every target and time all of them in the same process (eager
    PyTorch, then ONNX Runtime when ``onnx`` names an exporter)."""
    torch.manual_seed(0)
    dense = make().eval()
    x1 = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    models: dict[str, nn.Module] = {"dense": dense}
    prune_s: dict[str, float] = {}
    for s in speedups:
        key = f"{s:g}x"
        models[key], prune_s[key] = prune_copy(dense, x1, s, round_to)
    costs = {k: count_macs_and_params(m, x1) for k, m in models.items()}
    dense_macs = costs["dense"][0]
    latency: dict[str, dict[str, list[float]]] = {k: {} for k in models}
    batch_inputs: dict[str, torch.Tensor] = {}
    for bs in batch_sizes:
        x = torch.randn(bs, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
        batch_inputs[str(bs)] = x
        samples = time_family(models, x, rounds, repeats_bs1 if bs == 1 else 1)
        for k in models:
            latency[k][str(bs)] = samples[k]
    ort = ort_family(models, x1, batch_inputs, rounds, repeats_bs1, threads, onnx) if onnx else None
    rows = []
    for k in models:
        macs, params = costs[k]
        row: dict[str, Any] = {
            "model": k,
            "target_speedup": None if k == "dense" else float(k[:-1]),
            "macs": macs,
            "params": params,
            "macs_reduction": dense_macs / macs,
            "prune_s": round(prune_s[k], 2) if k in prune_s else None,
            "latency_ms": {},
            "latency_rounds_ms": {},
            "speedup": {},
            "efficiency": {},
        }
        for bs in map(str, batch_sizes):
            mine, base = latency[k][bs], latency["dense"][bs]
            row["latency_ms"][bs] = 1e3 * statistics.median(mine)
            row["latency_rounds_ms"][bs] = [round(1e3 * v, 3) for v in mine]
            row["speedup"][bs] = statistics.median(b / m for b, m in zip(base, mine))
            row["efficiency"][bs] = row["speedup"][bs] / row["macs_reduction"]
        if ort is not None:
            _add_ort(row, ort[k], ort["dense"], batch_sizes)
        rows.append(row)
    return {"family": name, "resolution": resolution, "rows": rows}


def _add_ort(
    row: dict[str, Any], mine: dict[str, Any], dense: dict[str, Any], batch_sizes: Sequence[int]
) -> None:
    """The ONNX Runtime columns of one row: latency, paired speedup over dense, efficiency."""
    row["onnx_export_s"] = mine["export_s"]
    row["ort_max_abs_diff"] = mine["max_abs_diff"]
    row["ort_latency_ms"], row["ort_latency_rounds_ms"] = {}, {}
    row["ort_speedup"], row["ort_efficiency"] = {}, {}
    for bs in map(str, batch_sizes):
        times, base = mine["latency"][bs], dense["latency"][bs]
        row["ort_latency_ms"][bs] = 1e3 * statistics.median(times)
        row["ort_latency_rounds_ms"][bs] = [round(1e3 * v, 3) for v in times]
        row["ort_speedup"][bs] = statistics.median(b / m for b, m in zip(base, times))
        row["ort_efficiency"][bs] = row["ort_speedup"][bs] / row["macs_reduction"]


def check_targets(families: list[dict[str, Any]], prefix: str = "") -> list[dict[str, Any]]:
    """Speedup / MACs reduction >= 0.8 at 2x, per model family and batch size; ``prefix="ort_"``
    checks the ONNX Runtime columns (families without them give none)."""
    out = []
    runtime = "ONNX Runtime " if prefix else ""
    for fam in families:
        for row in fam["rows"]:
            if row["target_speedup"] != TARGET_SPEEDUP or f"{prefix}efficiency" not in row:
                continue
            for bs, eff in row[f"{prefix}efficiency"].items():
                speedup = row[f"{prefix}speedup"][bs]
                out.append(
                    {
                        "target": f"{fam['family']} at {TARGET_SPEEDUP:g}x, batch {bs}: {runtime}speedup >= "
                        f"{TARGET_EFFICIENCY} x MACs reduction",
                        "value": f"{speedup:.2f}x / {row['macs_reduction']:.2f}x = {eff:.2f}",
                        "met": eff >= TARGET_EFFICIENCY,
                        "family": fam["family"],
                        "batch_size": bs,
                        "efficiency": eff,
                    }
                )
    return out


def format_table(families: list[dict[str, Any]], prefix: str = "") -> str:
    """The console table: one line per model, latency and speedup per batch size (``prefix="ort_"``:
    the ONNX Runtime columns)."""
    bss = list(families[0]["rows"][0][f"{prefix}latency_ms"]) if families else []
    header = ["model", "res", "pruned", "GMACs", "params (M)", "MACs red."]
    for bs in bss:
        header += [f"bs{bs} ms", f"bs{bs} speedup", f"bs{bs} eff."]
    rows = []
    for fam in families:
        for r in fam["rows"]:
            row = [
                fam["family"],
                str(fam["resolution"]),
                r["model"],
                f"{r['macs'] / 1e9:.3f}",
                f"{r['params'] / 1e6:.2f}",
                f"{r['macs_reduction']:.2f}x",
            ]
            for bs in bss:
                row += [
                    f"{r[prefix + 'latency_ms'][bs]:.1f}",
                    f"{r[prefix + 'speedup'][bs]:.2f}x",
                    f"{r[prefix + 'efficiency'][bs]:.2f}",
                ]
            rows.append(row)
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _onnx_meta(exporter: str | None) -> dict[str, Any]:
    """Versions and settings of the ONNX Runtime measurement (empty without it)."""
    if not exporter:
        return {}
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx_exporter": exporter}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Prune and time every model family, print the table and the targets, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit"], choices=["resnet50", "vit"])
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--resolution", type=int, default=224, help="input height and width")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds per batch size")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per model per round at batch 1")
    ap.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of this (0: off)")
    ap.add_argument("--vit-layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime columns")
    ap.add_argument("--onnx-exporter", choices=["dynamo", "torchscript"], default="dynamo")
    ap.add_argument("--smoke", action="store_true", help="64x64, 2-layer ViT, batch 1 and 2, 2 rounds")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.resolution, args.vit_layers, args.batch_sizes = 64, 2, [1, 2]
        args.rounds, args.repeats = 2, 1

    onnx = None if args.no_onnx else args.onnx_exporter
    if onnx and not onnx_available(onnx):
        print("no ONNX Runtime columns: an ONNX package is missing (pip install prune_callbacks[onnx])")
        onnx = None
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    makers: dict[str, Callable[[], nn.Module]] = {
        "resnet50": resnet50_like,
        "vit": lambda: make_vit(args.resolution, args.vit_layers),
    }
    names = {"resnet50": "ResNet-50", "vit": f"ViT-S/16 ({args.vit_layers} layers)"}
    families = []
    for key in args.models:
        fam = run_family(
            names[key],
            makers[key],
            args.resolution,
            args.speedups,
            args.batch_sizes,
            args.rounds,
            args.repeats,
            args.round_to or None,
            onnx,
            args.threads,
        )
        families.append(fam)
        print(f"{names[key]} done ({time.perf_counter() - start:.0f} s)", flush=True)
    targets = check_targets(families)
    ort_targets = check_targets(families, "ort_") if onnx else []
    wall = time.perf_counter() - start

    print()
    print(format_table(families))
    if onnx:
        print("\nONNX Runtime:")
        print(format_table(families, "ort_"))
    print()
    for t in [*targets, *ort_targets]:
        print(f"{t['target']}: {t['value']}  {'ok' if t['met'] else 'MISSED'}")
    result = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "resolution": args.resolution,
            "batch_sizes": args.batch_sizes,
            "rounds": args.rounds,
            "repeats_bs1": args.repeats,
            "round_to": args.round_to or None,
            "importance": "MagnitudeImportance(p=2), global ranking (target_speedup)",
            "smoke": args.smoke,
            "wall_s": round(wall, 1),
            **_onnx_meta(onnx),
        },
        "families": families,
        "targets": targets,
    }
    if onnx:
        result["ort_targets"] = ort_targets
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output} ({wall:.0f} s)")
    return result


if __name__ == "__main__":
    main()
