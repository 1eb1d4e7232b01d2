"""Uniform vs sensitivity-allocated per-group ratios on ``DigitsResNet`` at 4x fewer MACs, after fine-tuning.

One model (:class:`prune_callbacks.reference.models.DigitsResNet`, width 32), scikit-learn digits through
:class:`prune_callbacks.reference.data.DigitsDataModule` (seeded split), the task module
:class:`prune_callbacks.reference.tasks.ImageClassifier`, SGD (lr 0.05, Nesterov momentum 0.9, weight
decay 5e-4), a per-epoch cosine learning rate over ``E`` epochs (default 24), and for every arm the
same :class:`~prune_callbacks.StructuredPruning` schedule: L2-magnitude importance, a prune after
each of epochs 6..10 (0-based; five steps on a linear schedule), fine-tuning until epoch ``E``.
Per seed (default 0, 1, 2: the seed fixes the initialisation, the split and the batch order):

1. **Dense phase.** Train 6 epochs (the epochs before the first prune, same schedule).
2. **Scan.** :func:`~prune_callbacks.pruning.sensitivity.sensitivity_scan` of that model at ratios
   0.25, 0.5, 0.75, measuring the cross-entropy on 512 *training* images (so the validation images
   the arms are compared on never choose the allocation), then
   :func:`~prune_callbacks.pruning.sensitivity.allocate` for 4x (checked by a dry run of the Pruner).
3. **Arms**, each a full run from the same initialisation (its dense phase repeats step 1 exactly;
   the script checks the weights at the end of epoch 5 are bitwise those of step 1):

   * ``uniform``: ``pruning_ratio=r`` for every group, ``r`` found by bisection so that the pruned
     model has dense/4 MACs (local pruning: every group loses the same share);
   * ``sensitivity``: ``pruning_ratio_dict=`` the allocation, ``pruning_ratio=0``;
   * ``global`` (``--arms`` to add it): ``target_speedup=4`` with channels ranked globally by
     magnitude, the library's default way to meet a MAC target, for reference.

Reported per arm: top-1 accuracy and cross-entropy on the 360 validation images after the last
epoch, the MACs speedup actually reached, and the paired difference sensitivity - uniform per seed;
and, as what the allocation optimises, the same figures right after pruning the dense phase's
model in one shot with each arm's settings (``<arm>, one-shot``: no fine-tuning).
Results: ``benchmarks/results/sensitivity_digits.json``.

Run: ``python benchmarks/sensitivity_digits.py`` (about 6 minutes on 2 shared cores); ``--smoke`` for
a one-seed, short check of the pipeline.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from prune_callbacks import Pruner, StructuredPruning, count_macs_and_params
from prune_callbacks.pruning.sensitivity import allocate, sensitivity_scan
from prune_callbacks.reference.data import DigitsDataModule
from prune_callbacks.reference.models import DigitsResNet

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import accuracy_digits as ad  # noqa: E402  (its task module, training loop and snapshot callback)

RESULTS = HERE / "results" / "sensitivity_digits.json"
ARMS = ("uniform", "sensitivity", "global")
SCAN_RATIOS = (0.25, 0.5, 0.75)
SCAN_IMAGES = 512


class Protocol:
    """Training settings shared by every arm."""

    def __init__(
        self, epochs: int, prune_start: int, prune_end: int, speedup: float, width: int = 32
    ) -> None:
        if not 0 < prune_start <= prune_end < epochs - 1:
            raise ValueError(
                f"need 0 < prune_start <= prune_end < epochs - 1, got {prune_start}, {prune_end}"
            )
        self.epochs, self.prune_start, self.prune_end = epochs, prune_start, prune_end
        self.speedup, self.width = speedup, width
        self.lr, self.momentum, self.weight_decay, self.batch_size = 0.05, 0.9, 5e-4, 64

    def as_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "prune_epochs": list(range(self.prune_start, self.prune_end + 1)),
            "target_speedup": self.speedup,
            "model": f"DigitsResNet(width={self.width})",
            "importance": "magnitude (L2)",
            "optimizer": f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov=True, "
            f"weight_decay={self.weight_decay})",
            "lr_schedule": "cosine over all epochs, per epoch",
            "batch_size": self.batch_size,
            "scan": {
                "ratios": list(SCAN_RATIOS),
                "metric": f"cross-entropy on {SCAN_IMAGES} training images",
            },
        }


# The task module, training loop and snapshot are the accuracy benchmark's (same protocol fields).
make_task = ad.make_task
fit = ad.fit
EpochSnapshot = ad.EpochSnapshot


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    training = model.training
    model.eval()
    try:
        logits = model(x)
        return {
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(F.cross_entropy(logits, y)),
        }
    finally:
        model.train(training)


def uniform_ratio(net: nn.Module, x: torch.Tensor, goal: float) -> tuple[float, int]:
    """The per-group ratio whose local prune leaves the MACs closest to ``goal`` (bisection to 1e-3), and
    those MACs (dry runs of the Pruner: the network is not changed)."""

    def macs(r: float) -> int:
        return Pruner(net, x, "magnitude", pruning_ratio=r).preview().steps[-1].macs

    lo, hi = 0.0, 0.95
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if macs(mid) <= goal:
            hi = mid
        else:
            lo = mid
    below, above = macs(hi), macs(lo)
    return (round(hi, 4), below) if goal - below <= above - goal else (round(lo, 4), above)


def run_seed(seed: int, proto: Protocol, arms: Sequence[str]) -> dict[str, Any]:
    """Dense phase, scan, allocation and the arms of one seed."""
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = DigitsDataModule(batch_size=proto.batch_size, seed=seed)
    dm.setup("fit")
    assert dm.val_set is not None and dm.train_set is not None
    val_x, val_y = dm.val_set.tensors
    scan_x, scan_y = (t[:SCAN_IMAGES] for t in dm.train_set.tensors)
    torch.manual_seed(seed)
    init = DigitsResNet(width=proto.width)
    example = dm.example_batch(1)
    record: dict[str, Any] = {"seed": seed}

    # 1. dense phase
    dense = copy.deepcopy(init)
    lit = make_task(dense, proto, dm)
    record["dense_fit_s"] = fit(lit, dm, proto.prune_start, [])
    dense_state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    record["dense_before_pruning"] = evaluate(dense, val_x, val_y)
    dense_macs = int(count_macs_and_params(dense, example)[0])
    goal = dense_macs / proto.speedup

    # 2. scan and allocation
    start = time.perf_counter()
    result = sensitivity_scan(
        dense, example, lambda m: F.cross_entropy(m(scan_x), scan_y), SCAN_RATIOS, metric_name="train loss"
    )
    record["scan_s"] = time.perf_counter() - start
    start = time.perf_counter()
    allocation = allocate(result, proto.speedup, dense, example)
    record["allocate_s"] = time.perf_counter() - start
    record["scan"] = result.to_dict()
    record["allocation"] = allocation.to_dict()
    ratio, uniform_macs = uniform_ratio(dense, example, goal)
    record["uniform_ratio"] = ratio
    record["uniform_dry_run_speedup"] = dense_macs / uniform_macs
    print(
        f"seed {seed}: dense (epoch {proto.prune_start - 1}) val acc "
        f"{record['dense_before_pruning']['accuracy']:.4f}; allocation "
        + ", ".join(f"{k}={v:g}" for k, v in allocation.items())
        + f" ({allocation.speedup:.2f}x); uniform ratio {ratio} ({dense_macs / uniform_macs:.2f}x)",
        flush=True,
    )

    settings: dict[str, dict[str, Any]] = {
        "uniform": dict(pruning_ratio=ratio),
        "sensitivity": dict(pruning_ratio=0.0, pruning_ratio_dict=allocation),
        "global": dict(target_speedup=proto.speedup),
    }
    # what the scan optimises: the damage right after a one-shot prune of the dense model, before fine-tuning
    record["one_shot"] = {}
    for arm in arms:
        twin = copy.deepcopy(dense)
        Pruner(twin, example, "magnitude", **settings[arm]).step()
        record["one_shot"][arm] = {
            **evaluate(twin, val_x, val_y),
            "scan_loss": evaluate(twin, scan_x, scan_y)["loss"],
            "speedup": dense_macs / count_macs_and_params(twin, example)[0],
        }
    print(
        f"seed {seed} one-shot, before fine-tuning: "
        + "; ".join(
            f"{arm} val acc {v['accuracy']:.4f} train loss {v['scan_loss']:.3f}"
            for arm, v in record["one_shot"].items()
        ),
        flush=True,
    )

    # 3. arms
    common = dict(start_epoch=proto.prune_start, end_epoch=proto.prune_end, verbose=False)
    record["arms"] = {}
    for arm in arms:
        pl.seed_everything(seed, workers=True, verbose=False)
        net = copy.deepcopy(init)
        lit = make_task(net, proto, dm)
        snapshot = EpochSnapshot(proto.prune_start - 1)
        callback = StructuredPruning("magnitude", **common, **settings[arm])
        seconds = fit(lit, dm, proto.epochs, [snapshot, callback])
        same = snapshot.state is not None and all(
            torch.equal(snapshot.state[k], v) for k, v in dense_state.items()
        )
        macs, params = count_macs_and_params(net, example)
        row = {
            **evaluate(net, val_x, val_y),
            "macs": int(macs),
            "params": int(params),
            "speedup": dense_macs / macs,
            "fit_s": seconds,
            "dense_phase_identical": bool(same),
        }
        record["arms"][arm] = row
        print(
            f"seed {seed} {arm:<12} val acc {row['accuracy']:.4f}  loss {row['loss']:.4f}  "
            f"{row['speedup']:.2f}x MACs  ({seconds:.0f} s, dense phase identical: {same})",
            flush=True,
        )
    return record


def summarise(records: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Mean and sample std per arm, and the paired differences against uniform."""

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
        }

    out: dict[str, Any] = {}
    for arm in arms:
        out[arm] = {
            key: stats([r["arms"][arm][key] for r in records]) for key in ("accuracy", "loss", "speedup")
        }
    for arm in arms:
        out[f"{arm}, one-shot"] = {
            key: stats([r["one_shot"][arm][key] for r in records]) for key in ("accuracy", "loss", "speedup")
        }
    for arm in arms:
        if arm != "uniform" and "uniform" in arms:
            out[f"{arm} - uniform"] = {
                key: stats([r["arms"][arm][key] - r["arms"]["uniform"][key] for r in records])
                for key in ("accuracy", "loss")
            }
    return out


def print_summary(summary: dict[str, Any]) -> None:
    print("\narm                         val accuracy        val loss            MACs speedup")
    for arm, row in summary.items():
        cells = []
        for key in ("accuracy", "loss", "speedup"):
            if key in row:
                s = row[key]
                cells.append(
                    f"{s['mean']:+.4f} ± {s['std']:.4f}"
                    if " - " in arm
                    else f"{s['mean']:.4f} ± {s['std']:.4f}"
                )
            else:
                cells.append("")
        print(f"{arm:<27} " + "  ".join(f"{c:<18}" for c in cells))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--speedup", type=float, default=4.0)
    parser.add_argument("--arms", nargs="+", default=["uniform", "sensitivity"], choices=ARMS)
    parser.add_argument("--smoke", action="store_true", help="one seed, 8 epochs (pruning after epochs 2..4)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.smoke:
        proto, seeds = Protocol(8, 2, 4, args.speedup), args.seeds[:1]
    else:
        proto, seeds = Protocol(args.epochs, 6, 10, args.speedup), args.seeds
    start = time.perf_counter()
    records = [run_seed(seed, proto, args.arms) for seed in seeds]
    summary = summarise(records, args.arms)
    print_summary(summary)
    results = {
        "protocol": proto.as_dict(),
        "seeds": seeds,
        "arms": list(args.arms),
        "summary": summary,
        "runs": records,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "wall_s": time.perf_counter() - start,
    }
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults: {args.out} ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
