"""Training-step overhead of the StructuredPruning callback while it accumulates Taylor importance.

The same Lightning fit (one epoch, synthetic CIFAR-shaped data, SGD with momentum) runs with and
without the callback in one process, alternating which goes first in each round so that both see
the same machine load. With the callback every optimizer step accumulates gradient statistics
(``epochs=[0]``: the only epoch ends with a prune, so the whole epoch is the importance window). A
timer callback placed first measures each training step from ``on_train_batch_start`` to
``on_train_batch_end``: forward, backward, the accumulation in ``on_before_optimizer_step`` and the
optimizer step. The prune at the end of the epoch is not a training step and is not timed.

Two figures:

* **A/B**: median step time of the fits with the callback over the median of the fits without it.
  This is the end-to-end number, but on a shared machine the load drifts between fits by more than
  the effect (the spread of the per-fit medians is printed next to it).
* **paired** (the verdict): inside the fits with the callback, the time spent in the callback's own
  per-step hooks is measured on the same steps, so the step time without the callback is the step
  minus that time. Both parts of every pair see the same load, so drift cancels out.

Times are CPU time of the process with one torch thread (all of a step's work runs on the main
thread, and CPU time does not count time taken by other programs); wall times are recorded too.

Run ``python benchmarks/callback_overhead.py`` (about 5 minutes on 2 cores for ResNet-20;
``--quick`` for a short check, ``--model digits_resnet`` for a tiny network on 8x8 images, where
per-parameter work weighs most). Results: ``benchmarks/results/callback_overhead.json``.
Target: overhead at most 3%.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from prune_callbacks.integrations.lightning.callback import StructuredPruning
from prune_callbacks.reference.models import DigitsResNet, cifar_resnet

RESULTS = Path(__file__).resolve().parent / "results" / "callback_overhead.json"
TARGET_OVERHEAD = 0.03

MODELS = {
    # name: (constructor, input shape without batch, classes)
    "resnet20": (lambda: cifar_resnet(20), (3, 32, 32), 10),
    "resnet56": (lambda: cifar_resnet(56), (3, 32, 32), 10),
    "digits_resnet": (DigitsResNet, (1, 8, 8), 10),
}


class Classifier(pl.LightningModule):
    """Plain cross-entropy training of ``net`` with SGD + momentum."""

    def __init__(self, net: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = torch.zeros(1, *input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(pl.Callback):
    """CPU and wall time of every training step (first in the callback list, so it wraps the others)."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self._c0 = self._t0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._c0, self._t0 = time.process_time(), time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.cpu.append(time.process_time() - self._c0)
        self.wall.append(time.perf_counter() - self._t0)


class TimedPruning(StructuredPruning):
    """The callback, with the CPU time of its per-step hooks added up per training step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook_cpu: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        c0 = time.process_time()
        super().on_train_batch_start(trainer, pl_module, *args)
        self.hook_cpu.append(time.process_time() - c0)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        c0 = time.process_time()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook_cpu[-1] += time.process_time() - c0


def _loader(input_shape: tuple[int, ...], classes: int, steps: int, batch_size: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    n = steps * batch_size
    x = torch.randn(n, *input_shape, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _fit(model_name: str, with_callback: bool, loader: DataLoader, warmup: int) -> dict[str, Any]:
    """One epoch; step times (first ``warmup`` steps dropped), hook times and importance batches."""
    make, shape, _ = MODELS[model_name]
    torch.manual_seed(0)
    module = Classifier(make(), shape)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    pruning: TimedPruning | None = None
    seen = {"batches": 0}

    class Count(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if pruning is not None:
                seen["batches"] = pruning.importance.num_batches

    if with_callback:
        pruning = TimedPruning("taylor", pruning_ratio=0.3, epochs=[0], verbose=False)
        callbacks += [Count(), pruning]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)
    hooks = pruning.hook_cpu[warmup:] if pruning is not None else []
    return {
        "cpu": timer.cpu[warmup:],
        "wall": timer.wall[warmup:],
        "hooks": hooks,
        "batches": seen["batches"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per configuration")
    parser.add_argument("--steps", type=int, default=25, help="training steps per fit")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each fit not timed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave the default)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 15 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 15
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    _, shape, classes = MODELS[args.model]
    loader = _loader(shape, classes, args.steps, args.batch_size)
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    _fit(args.model, True, loader, args.warmup)  # warm up kernels and caches, not counted
    for r in range(args.rounds):
        for config in ("without", "with") if r % 2 == 0 else ("with", "without"):
            runs[config].append(_fit(args.model, config == "with", loader, args.warmup))

    def pooled(config: str, key: str) -> list[float]:
        return [t for run in runs[config] for t in run[key]]

    med_cpu = {k: statistics.median(pooled(k, "cpu")) for k in runs}
    med_wall = {k: statistics.median(pooled(k, "wall")) for k in runs}
    ab = med_cpu["with"] / med_cpu["without"] - 1.0
    per_fit = {k: [statistics.median(run["cpu"]) for run in runs[k]] for k in runs}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in per_fit.items()}
    steps_with, hooks = pooled("with", "cpu"), pooled("with", "hooks")
    ratios = [h / (s - h) for s, h in zip(steps_with, hooks)]
    paired = statistics.median(ratios)
    hook_ms = statistics.median(hooks) * 1e3
    batches = runs["with"][-1]["batches"]

    threads = torch.get_num_threads()
    print(f"model {args.model}, batch {args.batch_size}, {threads} thread(s), {args.rounds} rounds")
    print(f"  {'median step':<30}{'CPU time':>12}{'wall time':>12}   per-fit spread")
    for config in ("without", "with"):
        label = f"{config} callback ({len(pooled(config, 'cpu'))} steps)"
        print(
            f"  {label:<30}{med_cpu[config] * 1e3:>9.2f} ms{med_wall[config] * 1e3:>9.2f} ms"
            f"   {100 * spread[config]:.0f}%"
        )
    print(f"  importance batches per fit: {batches} of {args.steps} steps")
    print(f"  A/B overhead: {100 * ab:+.2f}% (CPU time; per-fit medians spread as shown)")
    verdict = "ok" if paired <= TARGET_OVERHEAD else "MISSED"
    print(
        f"  paired overhead: {100 * paired:+.2f}% (callback hooks {hook_ms:.2f} ms of each step)  "
        f"target <= {100 * TARGET_OVERHEAD:.0f}%: {verdict}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": args.model,
                "batch_size": args.batch_size,
                "threads": threads,
                "rounds": args.rounds,
                "steps_per_fit": args.steps,
                "warmup": args.warmup,
                "median_step_cpu_s": med_cpu,
                "median_step_wall_s": med_wall,
                "per_fit_median_cpu_s": per_fit,
                "overhead_ab": ab,
                "overhead_paired": paired,
                "median_hook_cpu_s": hook_ms / 1e3,
                "target": TARGET_OVERHEAD,
                "importance_batches": batches,
                "torch": torch.__version__,
                "lightning": pl.__version__,
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "runs": runs,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
