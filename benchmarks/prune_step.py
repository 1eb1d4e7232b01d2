"""Time to build a pruner and run one full pruning step (importance, ranking, pruning) at 50%,
against Torch-Pruning's ``BasePruner`` (construction plus ``step()``) on the same models, in the
same run, on one CPU thread.

Models (random weights, nothing downloaded):

* ``resnet50``: :func:`prune_callbacks.reference.models.resnet50_like` at 224x224;
* ``densenet201``: :func:`prune_callbacks.reference.models.densenet201_like` at 224x224;
* ``vit``: a Hugging Face ``ViTForImageClassification`` of ViT-Base shape (768 wide, 12 heads,
  MLP 3072) with ``--vit-layers`` layers (default 12) at 224x224.

Both libraries use L2-magnitude group importance and local pruning: 50% of the channels of every
group; for the ViT, 50% of the hidden and MLP channels and 50% of the attention heads (whole heads,
head size kept). The classifier keeps its outputs. Times are CPU seconds of the process (one
thread; a busy machine inflates wall time, not CPU time); wall times are recorded as well, and
our phase breakdown (wall) and the cost of verification: every prune ends with a forward pass of
the pruned model on the example input (on the meta device), reported as the number of such
forwards in the step, their wall seconds and their share of the step's wall time. Ours: best of
``--rounds`` rounds after one warm-up; Torch-Pruning: best of ``--tp-rounds`` rounds after a
warm-up (default 3; DenseNet-201: one round, no warm-up, as it takes about a minute). Rounds of
the two libraries alternate. Results go to ``benchmarks/results/prune_step.json``.

Run: ``python benchmarks/prune_step.py`` (``--models resnet50 vit`` for a subset, ``--profile``
to print where our time goes).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib
import io
import json
import platform
import pstats
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prune_callbacks.measure.flops import count_macs_and_params
from prune_callbacks.pruning.importance import MagnitudeImportance
from prune_callbacks.pruning.pruner import Pruner
from prune_callbacks.reference.models import densenet201_like, resnet50_like

RESULTS = Path(__file__).resolve().parent / "results" / "prune_step.json"


def _torch_pruning():
    try:
        return importlib.import_module("torch_pruning")
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "torch-pruning"])
        return importlib.import_module("torch_pruning")


def _vit_factory(layers: int) -> Callable[[], nn.Module]:
    from transformers import ViTConfig, ViTForImageClassification

    def make() -> nn.Module:
        cfg = ViTConfig(
            hidden_size=768,
            num_hidden_layers=layers,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=224,
            patch_size=16,
        )
        return ViTForImageClassification(cfg).eval()

    return make


class Case:
    def __init__(self, name: str, make: Callable[[], nn.Module], example: torch.Tensor, vit: bool) -> None:
        self.name, self.make, self.example, self.vit = name, make, example, vit

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make().eval()


def _heads_of(model: nn.Module) -> dict[nn.Module, int]:
    heads = {}
    for name, m in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", ".query", ".key", ".value")):
            heads[m] = 12
    return heads


def run_ours(case: Case, profile: bool = False) -> dict[str, Any]:
    model = case.model()
    gc.collect()
    kwargs: dict[str, Any] = {"prune_num_heads": True, "head_pruning_ratio": 0.5} if case.vit else {}
    prof = cProfile.Profile() if profile else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if prof:
            prof.enable()
        c0, t0 = time.process_time(), time.perf_counter()
        pruner = Pruner(model, case.example, MagnitudeImportance(p=2), pruning_ratio=0.5, **kwargs)
        c1, t1 = time.process_time(), time.perf_counter()
        pruner.step()
        c2, t2 = time.process_time(), time.perf_counter()
        if prof:
            prof.disable()
    verifier = pruner.DG.verifier
    out = {
        "construct": c1 - c0,
        "step": c2 - c1,
        "wall": t2 - t0,
        "step_wall": t2 - t1,
        "verify_runs": verifier.runs if verifier is not None else 0,
        "verify_s": verifier.seconds if verifier is not None else 0.0,
        "phases": {k: round(v, 3) for k, v in pruner.timings.items()},
        "model": model,
    }
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
        out["profile"] = s.getvalue()
    return out


def run_tp(case: Case, tp) -> dict[str, Any]:
    model = case.model()
    gc.collect()
    ignored = [m for n, m in model.named_modules() if n in ("fc", "classifier")]
    kwargs: dict[str, Any] = {}
    if case.vit:
        kwargs = {
            "num_heads": _heads_of(model),
            "prune_num_heads": True,
            "prune_head_dims": False,
            "head_pruning_ratio": 0.5,
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c0, t0 = time.process_time(), time.perf_counter()
        pruner = tp.pruner.BasePruner(
            model,
            case.example,
            tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=ignored,
            **kwargs,
        )
        c1 = time.process_time()
        pruner.step()
        c2, t2 = time.process_time(), time.perf_counter()
    return {"construct": c1 - c0, "step": c2 - c1, "wall": t2 - t0, "model": model}


def _check(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    try:
        macs, params = count_macs_and_params(model, example)
        return {"macs": macs, "params": params, "runs": True}
    except Exception as e:  # noqa: BLE001 - reported, not fatal (e.g. attributes TP leaves stale)
        return {"runs": False, "error": f"{type(e).__name__}: {e}"[:200]}


def _summary(best: dict, runs: list[dict]) -> dict:
    """Timings of one library on one model: the best round and every round."""
    return {
        "construct_s": round(best["construct"], 3),
        "step_s": round(best["step"], 3),
        "total_s": round(best["construct"] + best["step"], 3),
        "all_totals_s": [round(r["construct"] + r["step"], 3) for r in runs],
        "wall_s": round(best["wall"], 3),
        "all_walls_s": [round(r["wall"], 3) for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "densenet201", "vit"])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of ours (best is reported)")
    ap.add_argument("--tp-rounds", type=int, default=3, help="rounds of Torch-Pruning (1 for DenseNet-201)")
    ap.add_argument("--vit-layers", type=int, default=12)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of our best round")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(1)
    tp = _torch_pruning()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cases = {
        "resnet50": Case("resnet50", resnet50_like, x, vit=False),
        "densenet201": Case("densenet201", densenet201_like, x, vit=False),
        "vit": Case(f"vit-base-{args.vit_layers}L", _vit_factory(args.vit_layers), x, vit=True),
    }
    targets = {"resnet50": 0.5, "densenet201": 0.1, "vit": 0.5}
    results = []
    for key in args.models:
        case = cases[key]
        dense = _check(case.model(), x)
        slow_tp = key == "densenet201"  # about a minute per Torch-Pruning round
        tp_rounds = 1 if slow_tp else args.tp_rounds
        run_ours(case)  # warm-up (first-call costs of the library and of torch)
        if not slow_tp:
            run_tp(case, tp)
        # interleaved, so that a change of machine load hits both libraries alike
        ours, tps = [], []
        for r in range(max(args.rounds, tp_rounds)):
            if r < args.rounds:
                ours.append(run_ours(case, profile=args.profile))
            if r < tp_rounds:
                tps.append(run_tp(case, tp))
        best = min(ours, key=lambda r: r["construct"] + r["step"])
        ours_check = _check(best["model"], x)
        if not tps:  # --tp-rounds 0: no baseline this run
            raise SystemExit("--tp-rounds must be at least 1: the ratio needs Torch-Pruning's time")
        tbest = min(tps, key=lambda r: r["construct"] + r["step"])
        tp_check = _check(tbest["model"], x)
        ours_total = best["construct"] + best["step"]
        tp_total = tbest["construct"] + tbest["step"]
        verify_share = best["verify_s"] / best["step_wall"] if best["step_wall"] > 0 else 0.0
        row = {
            "model": case.name,
            "ours": {
                **_summary(best, ours),
                "phases_wall_s": best["phases"],
                "verify_runs": best["verify_runs"],
                "verify_s": round(best["verify_s"], 4),
                "verify_share_of_step": round(verify_share, 4),
                "all_phases_wall_s": [r["phases"] for r in ours],
                **ours_check,
            },
            "torch_pruning": {**_summary(tbest, tps), **tp_check},
            "dense": dense,
            "ratio": round(ours_total / tp_total, 4),
            "wall_ratio": round(best["wall"] / tbest["wall"], 4),
            "target_ratio": targets[key],
            "meets_target": ours_total / tp_total <= targets[key],
        }
        results.append(row)
        print(
            f"{case.name:>14}: ours {best['construct']:.2f}+{best['step']:.2f}={ours_total:.2f}s  "
            f"TP {tbest['construct']:.2f}+{tbest['step']:.2f}={tp_total:.2f}s  ratio {row['ratio']:.3f} "
            f"(target <= {targets[key]}; wall ratio {row['wall_ratio']:.3f})  phases {best['phases']}  "
            f"verification {best['verify_runs']} forward(s), {best['verify_s']:.3f}s = "
            f"{100 * verify_share:.1f}% of the step",
            flush=True,
        )
        if args.profile:
            print(best["profile"])
    print()
    print("CPU seconds (one thread); 'wall' columns: wall-clock seconds of the same rounds;")
    print("'verify': the verifying forward(s) of our step (count, wall seconds, share of the step's wall")
    print("time)")
    header = (
        f"{'model':>14} | {'ours build':>10} {'ours step':>9} {'ours':>7} {'wall':>6} | "
        f"{'TP build':>8} {'TP step':>8} {'TP':>7} {'wall':>6} | {'ratio':>6} {'wall':>6} {'target':>6} | "
        f"{'verify':>16}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        o, t = r["ours"], r["torch_pruning"]
        print(
            f"{r['model']:>14} | {o['construct_s']:>10.2f} {o['step_s']:>9.2f} {o['total_s']:>7.2f} "
            f"{o['wall_s']:>6.2f} | {t['construct_s']:>8.2f} {t['step_s']:>8.2f} {t['total_s']:>7.2f} "
            f"{t['wall_s']:>6.2f} | {r['ratio']:>6.3f} {r['wall_ratio']:>6.3f} "
            f"{'<=' + str(r['target_ratio']):>6}{'' if r['meets_target'] else '  MISSED'} | "
            f"{o['verify_runs']}x {o['verify_s']:.3f}s {100 * o['verify_share_of_step']:.1f}%"
        )
    meta = {
        "torch": torch.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "rounds_ours": args.rounds,
        "note": (
            "times are CPU seconds of this process (time.process_time, one thread), which a busy shared "
            "machine does not inflate the way it inflates wall time (wall times are kept too); best of "
            "the rounds after a warm-up, rounds alternating; TP DenseNet-201: one round"
        ),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
