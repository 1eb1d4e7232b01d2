"""A benchmark that separates pruning methods: digits at 4x/8x/16x fewer MACs, a tiny Llama at 2x/4x.

Two tasks, each at MAC targets where methods drift apart (issue 16, item 3):

* ``digits``: :class:`~prune_callbacks.reference.models.DigitsResNet` (width 32) on scikit-learn digits
  (:class:`~prune_callbacks.reference.data.DigitsDataModule`, seeded half/half split: 898 training
  and 899 validation images), 10 epochs, pruning after epochs 2-5, SGD (lr 0.05, Nesterov momentum
  0.9, weight decay 5e-4), per-epoch cosine learning rate, at 4x, 8x and 16x fewer MACs; metric:
  top-1 accuracy (%). The earlier protocol (80/20 split, 16 epochs) left every method within two
  validation images of the others: with half the training data and 4 epochs of fine-tuning after
  the last prune, the methods drift apart (and one image is 0.11 points).
* ``lm``: :class:`~prune_callbacks.reference.models.TinyLlama` (RMSNorm, rotary, grouped-query
  attention: 8 query / 4 key-value heads, SwiGLU; width 128, 2 layers, MLP 384) on next-byte
  prediction over 80 kB of the standard library's own source text (the app's ``stdlib_text`` data,
  :class:`~prune_callbacks.reference.data.TextDataModule`, windows of 64 bytes), 6 epochs, pruning
  after epochs 1-3, AdamW (lr 2e-3,
  weight decay 0.05, betas 0.9/0.95), per-epoch cosine learning rate, at 2x and 4x fewer MACs with
  attention heads (key/value head groups) and MLP channels pruned; the residual width, embeddings
  and LM head are kept. Metric: validation perplexity (lower is better).

Methods, every one with the same total number of epochs ``E`` of its task and, per seed, the same
initialisation, data split and batch order (seeds 0, 1, 2; mean ± sample std over seeds):

* ``dense``: ``E`` epochs, no pruning.
* ``ours_taylor``: ``StructuredPruning("taylor", target_speedup=S)``, pruning after each epoch
  ``prune_start..prune_end`` on a linear MAC schedule, channels ranked globally.
* ``ours_sparse``: ``SparseTraining("group_lasso")`` from epoch 0 to the last pruning epoch (every
  full-index group pushed towards zero), with ``StructuredPruning("l2", ...)`` on the same schedule.
* ``ours_criterion``: ``StructuredPruning(<lamp or obd>, ...)``, the new criterion picked per task by
  a quick check (``--criterion auto``: one run of each on seed 0 at the pick target; the better one
  is used for all seeds; the check's figures are in the JSON under ``criterion_check``).
* ``tp_magnitude``: Torch-Pruning ``MagnitudePruner`` (L2), one shot on the dense run's weights
  after epoch ``prune_start``, ratio found by bisection to the MAC target (local, uniform: its
  default), fine-tuned for the remaining epochs (fresh optimizer, cosine schedule continued).
* ``tp_group_norm``: Torch-Pruning's sparse training: ``GroupNormPruner(reg=...)`` with its
  ``regularize(model)`` after every backward for epochs ``0..prune_end``, then one-shot
  ``GroupNormPruner`` prune (group L2 magnitude, bisection to the target) and fine-tuning for the
  remaining epochs.
* ``lightning`` (digits only): Lightning's ``ModelPruning("ln_structured")`` masks on every
  convolution (as in ``accuracy_digits.py``): it runs at the dense MACs; its nonzero-weight MACs
  are reported too.

Sparse-training strengths were tuned at 16x on seeds 0-2 (mean accuracy, separate runs of this
protocol, 2026-12-01): ours ``group_lasso`` 2e-3: 95.92, 1e-2: 96.22, 2e-2: 96.11, **3e-2: 96.89**,
5e-2: 89.95 (one seed collapsed to 77%), 1e-1: 34.8; ``bn_scale`` 1e-3 with the BN-scale criterion:
96.22; no sparse training (L2 alone): 95.48. Torch-Pruning ``GroupNormPruner`` ``reg`` 1e-4: 94.40,
5e-4: 92.96, **2e-3: 94.81** (its one-shot magnitude on the same seeds: 96.26). The bold values are
the defaults (``DigitsSetup``); the LM's strengths are not tuned.

Torch-Pruning on the tiny Llama is first tried in a subprocess with a time limit (building its
groups); where it does not finish, its methods are reported as not run, with the reason.

Reported per method and target: the metric, MACs as run (one sample: one image, one 64-byte window),
the MAC reduction reached, parameters, and CPU latency (one thread, batch 1, median of alternating
rounds). Targets (met/missed, never hidden): digits at 8x within 1.0 pt of dense with ours (best of
the three); the LM at 2x within 10% of dense perplexity; at every setting ours (best) at least as
good as Torch-Pruning's best (and whether beyond the seed spread). ``ours (best)`` is chosen per
setting on the same validation figures it is compared on.

Run: ``python benchmarks/methods.py`` (3 seeds; the jobs, one per task and seed, run on ``--jobs 2``
worker processes of one thread each, longest first; the figures do not depend on the number of
workers) or ``--quick`` (one seed, few epochs, digits 8x and LM 2x only: about 2 minutes, a
pipeline check, no meaningful figures). Results: ``benchmarks/results/methods.json``;
``markdown(results)`` renders the README tables.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelPruning

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import accuracy_digits as ad  # noqa: E402  (the shared helpers of the accuracy benchmark)

from prune_callbacks import (  # noqa: E402
    SparseTraining,
    StructuredPruning,
    count_macs_and_params,
)
from prune_callbacks.reference.data import DigitsDataModule, TextDataModule  # noqa: E402
from prune_callbacks.reference.models import DigitsResNet, TinyLlama  # noqa: E402
from prune_callbacks.reference.tasks import CausalLM  # noqa: E402

RESULTS = HERE / "results" / "methods.json"
TASKS = ("digits", "lm")
METHODS = (
    "dense",
    "ours_taylor",
    "ours_sparse",
    "ours_criterion",
    "tp_magnitude",
    "tp_group_norm",
    "lightning",
)
OURS = ("ours_taylor", "ours_sparse", "ours_criterion")
TP = ("tp_magnitude", "tp_group_norm")
LABELS = {
    "dense": "dense",
    "ours_taylor": "ours: StructuredPruning, Taylor, iterative",
    "ours_sparse": "ours: SparseTraining (group lasso) + StructuredPruning (L2)",
    "ours_criterion": "ours: StructuredPruning, {criterion}, iterative",
    "tp_magnitude": "Torch-Pruning: one-shot L2 magnitude + fine-tune",
    "tp_group_norm": "Torch-Pruning: GroupNormPruner sparse training + prune + fine-tune",
    "lightning": "Lightning ModelPruning (ln_structured masks)",
}
CRITERIA = ("lamp", "obd")
LM_IGNORED = ["*embed_tokens", "*.o_proj", "*.down_proj"]


# ------------------------------------------------------------------------------------------ settings


@dataclass
class DigitsSetup:
    """Digits protocol: epochs, pruning epochs, targets, and the sparse-training strengths."""

    epochs: int = 10
    prune_start: int = 2
    prune_end: int = 5
    speedups: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0])
    pick_speedup: float = 8.0
    width: int = 32
    val_fraction: float = 0.5
    sparse_strength: float = 3e-2
    tp_reg: float = 2e-3

    def proto(self) -> ad.Protocol:
        """The accuracy benchmark's training protocol with these epochs."""
        return ad.Protocol(self.epochs, self.prune_start, self.prune_end, self.width)


@dataclass
class LMSetup:
    """Language-model protocol: model size, data size, epochs, pruning epochs, targets."""

    epochs: int = 6
    prune_start: int = 1
    prune_end: int = 3
    speedups: list[float] = field(default_factory=lambda: [2.0, 4.0])
    pick_speedup: float = 2.0
    head_ratios: dict[str, float] = field(default_factory=lambda: {"2": 0.25, "4": 0.5})
    dim: int = 128
    layers: int = 2
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 384
    seq_len: int = 64
    batch_size: int = 32
    max_chars: int = 80_000
    val_fraction: float = 0.1
    lr: float = 2e-3
    weight_decay: float = 0.05
    sparse_strength: float = 1e-3
    tp_reg: float = 5e-4
    tp_probe_timeout_s: float = 60.0

    @property
    def prune_epochs(self) -> list[int]:
        """0-based epochs after which ours prune."""
        return list(range(self.prune_start, self.prune_end + 1))

    def head_ratio(self, speedup: float) -> float:
        """Share of every attention layer's key/value head groups to remove at ``speedup``."""
        return self.head_ratios.get(f"{speedup:g}", 0.5)

    def model(self) -> TinyLlama:
        """A fresh TinyLlama of this size (random weights from the current seed)."""
        return TinyLlama(
            vocab_size=256,
            dim=self.dim,
            n_layers=self.layers,
            n_heads=self.heads,
            n_kv_heads=self.kv_heads,
            ffn_dim=self.ffn,
            max_seq_len=self.seq_len,
        )

    def data(self, seed: int) -> TextDataModule:
        """The stdlib text data module (split fixed, batch order by ``seed``), set up."""
        dm = TextDataModule(
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            max_chars=self.max_chars,
            val_fraction=self.val_fraction,
            seed=seed,
        )
        dm.setup()
        return dm


# ------------------------------------------------------------------------------------------ helpers


class TPRegularize(Callback):
    """Calls Torch-Pruning's ``pruner.regularize(model)`` after every backward (Lightning's
    ``on_before_optimizer_step``: gradients are final), as its sparse-training recipe does."""

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the group-norm penalty's gradient."""
        self.pruner.regularize(pl_module.model)


def tp_prune_to(
    model: nn.Module, x: torch.Tensor, goal: float, make_pruner: Callable[[nn.Module, float], Any]
) -> dict[str, Any]:
    """Prune ``model`` in place with the Torch-Pruning pruner ``make_pruner(model, ratio)`` (one
    ``step``) at the ratio whose MACs are closest to ``goal`` (bisection on copies)."""

    def pruned(ratio: float, target: nn.Module | None = None) -> nn.Module:
        m = copy.deepcopy(model) if target is None else target
        if ratio > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make_pruner(m, ratio).step()
                fix_lm_heads(m)
        return m

    ratio, _ = ad.match_ratio(lambda r: count_macs_and_params(pruned(r), x)[0], goal)
    pruned(ratio, target=model)
    return {"pruning_ratio": round(ratio, 4)}


def fix_lm_heads(model: nn.Module) -> None:
    """After a Torch-Pruning prune of a TinyLlama: set each attention's head counts from its
    projections (Torch-Pruning slices the weights but does not know these attributes)."""
    for m in model.modules():
        if hasattr(m, "q_proj") and hasattr(m, "num_kv_heads"):
            m.num_heads = m.q_proj.out_features // m.head_dim
            m.num_kv_heads = m.k_proj.out_features // m.head_dim


def stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ------------------------------------------------------------------------------------------ runs


class Runner:
    """Trains every method of one task for one seed; collects the run records and the models."""

    def __init__(self, task: str, seed: int, tp: Any, tp_lm_ok: bool) -> None:
        self.task, self.seed, self.tp, self.tp_lm_ok = task, seed, tp, tp_lm_ok
        self.runs: list[dict[str, Any]] = []
        self.models: dict[str, nn.Module] = {}

    def record(self, method: str, speedup: float | None, model: nn.Module, wall: float, **extra: Any) -> None:
        """Measure the trained model and keep the record."""
        raise NotImplementedError

    def _store(
        self,
        method: str,
        speedup: float | None,
        model: nn.Module,
        x1: Any,
        metric: dict[str, float],
        **kw: Any,
    ) -> None:
        macs, params = count_macs_and_params(model, x1)
        rec = {
            "task": self.task,
            "seed": self.seed,
            "method": method,
            "target_speedup": speedup,
            **metric,
            "macs": macs,
            "params": params,
            **kw,
        }
        self.runs.append(rec)
        self.models[method if speedup is None else f"{method}@{speedup:g}"] = model
        figure = ", ".join(f"{k} {v:.3f}" for k, v in metric.items())
        print(
            f"  [{self.task}] seed {self.seed} {method:>14} {'' if speedup is None else f'{speedup:g}x':>4}: "
            f"{figure}  MACs {macs / 1e6:.3f} M  ({kw.get('train_s', 0):.0f} s)",
            flush=True,
        )


class DigitsRunner(Runner):
    """The digits task (helpers of ``accuracy_digits.py``)."""

    def __init__(self, setup: DigitsSetup, seed: int, tp: Any, criterion: str) -> None:
        super().__init__("digits", seed, tp, False)
        self.setup, self.criterion = setup, criterion
        self.proto = setup.proto()
        self.dm = DigitsDataModule(
            batch_size=self.proto.batch_size, val_fraction=setup.val_fraction, seed=seed
        )
        self.dm.setup()
        self.x1 = self.dm.example_batch(1)
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.dense_macs = count_macs_and_params(DigitsResNet(width=setup.width), self.x1)[0]

    def record(self, method: str, speedup: float | None, model: nn.Module, wall: float, **extra: Any) -> None:
        """Accuracy (%) and nonzero-weight MACs besides the common figures."""
        self._store(
            method,
            speedup,
            model,
            self.x1,
            {"accuracy": 100 * ad.accuracy(model, self.dm)},
            nonzero_macs=ad.nonzero_macs(model, self.x1),
            train_s=round(wall, 2),
            **extra,
        )

    def fresh(self, epoch_offset: int = 0, net: nn.Module | None = None) -> pl.LightningModule:
        """A seeded task module (a new network unless ``net`` is given)."""
        pl.seed_everything(self.seed, verbose=False)
        net = DigitsResNet(width=self.setup.width) if net is None else net
        return ad.make_task(net, self.proto, self.dm, epoch_offset=epoch_offset)

    def ours(self, method: str, s: float, importance: str, extra: Sequence[Callback] = ()) -> None:
        """One of our callback runs."""
        lit = self.fresh()
        cb = StructuredPruning(
            importance,
            target_speedup=s,
            start_epoch=self.proto.prune_start,
            end_epoch=self.proto.prune_end,
            verbose=False,
            log_group_widths=False,
        )
        wall = ad.fit(lit, self.dm, self.proto.epochs, [cb, *extra])
        self.record(method, s, lit.model, wall, importance=importance)

    def run(self, speedups: Sequence[float], methods: Sequence[str]) -> None:
        """Dense first (its snapshot feeds the one-shot Torch-Pruning runs), then every target."""
        lit = self.fresh()
        snap = ad.EpochSnapshot(self.proto.prune_start)
        wall = ad.fit(lit, self.dm, self.proto.epochs, [snap])
        self.snapshot = snap.state
        self.record("dense", None, lit.model, wall)
        for s in speedups:
            for method in methods:
                self.run_method(method, s)

    def run_method(self, method: str, s: float) -> None:
        """One method at one target."""
        p = self.proto
        if method == "ours_taylor":
            self.ours(method, s, "taylor")
        elif method == "ours_sparse":
            sparse = SparseTraining("group_lasso", strength=self.setup.sparse_strength, start_epoch=0)
            self.ours(method, s, "l2", [sparse])
        elif method == "ours_criterion":
            self.ours(method, s, self.criterion)
        elif method == "tp_magnitude" and self.tp is not None:
            assert self.snapshot is not None
            net = DigitsResNet(width=self.setup.width)
            net.load_state_dict(self.snapshot)
            info = ad.tp_prune(self.tp, net, self.x1, self.dense_macs / s, False)
            self.finetune(method, s, net, p.prune_start + 1, 0.0, **info)
        elif method == "tp_group_norm" and self.tp is not None:
            self.tp_group_norm(s)
        elif method == "lightning":
            self.lightning(s)

    def finetune(self, method: str, s: float, net: nn.Module, done: int, wall0: float, **info: Any) -> None:
        """Fine-tune a (Torch-Pruning) pruned network for the epochs left after ``done``."""
        net.train()  # Torch-Pruning leaves the model in eval mode; BatchNorm must train
        lit = self.fresh(epoch_offset=done, net=net)
        wall = ad.fit(lit, self.dm, self.proto.epochs - done, [])
        self.record(method, s, lit.model, wall0 + wall, **info)

    def tp_group_norm(self, s: float) -> None:
        """Torch-Pruning's group-norm sparse training to ``prune_end``, one-shot prune, fine-tune."""
        tp, p = self.tp, self.proto
        lit = self.fresh()
        net = lit.model
        imp = tp.importance.GroupMagnitudeImportance(p=2)

        def make(m: nn.Module, ratio: float, reg: float = self.setup.tp_reg) -> Any:
            return tp.pruner.GroupNormPruner(
                m, self.x1, importance=imp, reg=reg, pruning_ratio=ratio, ignored_layers=[m.fc]
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reg_cb = TPRegularize(make(net, 0.5))
        net.train()
        wall = ad.fit(lit, self.dm, p.prune_end + 1, [reg_cb])
        info = tp_prune_to(net, self.x1, self.dense_macs / s, make)
        self.finetune("tp_group_norm", s, net, p.prune_end + 1, wall, reg=self.setup.tp_reg, **info)

    def lightning(self, s: float) -> None:
        """Lightning ``ModelPruning`` masks (``accuracy_digits.py``'s schedule)."""
        sched = ad.lightning_schedule(self.proto, self.x1, s, self.dense_macs)
        lit = self.fresh()
        convs = [(m, "weight") for m in lit.model.modules() if isinstance(m, nn.Conv2d)]
        cb = ModelPruning(
            "ln_structured",
            parameters_to_prune=convs,
            use_global_unstructured=False,
            amount=functools.partial(ad._amount_at, sched["amounts"]),
            use_lottery_ticket_hypothesis=False,
            make_pruning_permanent=True,
            pruning_dim=0,
            pruning_norm=2,
        )
        wall = ad.fit(lit, self.dm, self.proto.epochs, [cb])
        self.record("lightning", s, lit.model, wall, channel_ratio=sched["channel_ratio"])


class LMRunner(Runner):
    """The tiny-Llama task."""

    def __init__(self, setup: LMSetup, seed: int, tp: Any, tp_lm_ok: bool, criterion: str) -> None:
        super().__init__("lm", seed, tp, tp_lm_ok)
        self.setup, self.criterion = setup, criterion
        self.dm = setup.data(seed)
        self.x1 = self.dm.example_batch(1)
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.dense_macs = count_macs_and_params(setup.model(), self.x1)[0]

    def record(self, method: str, speedup: float | None, model: nn.Module, wall: float, **extra: Any) -> None:
        """Validation perplexity and next-byte accuracy besides the common figures."""
        self._store(method, speedup, model, self.x1, lm_eval(model, self.dm), train_s=round(wall, 2), **extra)

    def fresh(self, epoch_offset: int = 0, net: nn.Module | None = None) -> CausalLM:
        """A seeded task module: AdamW, cosine over all epochs (continued from ``epoch_offset``)."""
        st = self.setup
        pl.seed_everything(self.seed, verbose=False)
        net = st.model() if net is None else net
        optimizer = functools.partial(
            torch.optim.AdamW, lr=st.lr, weight_decay=st.weight_decay, betas=(0.9, 0.95)
        )
        lr_lambda = functools.partial(ad._cosine, offset=epoch_offset, total=st.epochs)
        scheduler = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lr_lambda)
        return CausalLM(net, 256, optimizer=optimizer, lr_scheduler=scheduler, seq_len=st.seq_len)

    def fit(self, lit: pl.LightningModule, epochs: int, callbacks: Sequence[Callback]) -> float:
        """``accuracy_digits.fit`` on this task's data."""
        return ad.fit(lit, self.dm, epochs, callbacks)  # type: ignore[arg-type]

    def ours(self, method: str, s: float, importance: str, extra: Sequence[Callback] = ()) -> None:
        """One of our callback runs: heads and MLP channels, residual width kept."""
        st = self.setup
        lit = self.fresh()
        cb = StructuredPruning(
            importance,
            target_speedup=s,
            start_epoch=st.prune_start,
            end_epoch=st.prune_end,
            prune_num_heads=True,
            head_pruning_ratio=st.head_ratio(s),
            ignored_layers=LM_IGNORED,
            verbose=False,
            log_group_widths=False,
        )
        wall = self.fit(lit, st.epochs, [cb, *extra])
        self.record(method, s, lit.model, wall, importance=importance, **lm_widths(lit.model))

    def run(self, speedups: Sequence[float], methods: Sequence[str]) -> None:
        """Dense first (its snapshot feeds the one-shot Torch-Pruning runs), then every target."""
        lit = self.fresh()
        snap = ad.EpochSnapshot(self.setup.prune_start)
        wall = self.fit(lit, self.setup.epochs, [snap])
        self.snapshot = snap.state
        self.record("dense", None, lit.model, wall, **lm_widths(lit.model))
        for s in speedups:
            for method in methods:
                self.run_method(method, s)

    def run_method(self, method: str, s: float) -> None:
        """One method at one target (Torch-Pruning only where its probe succeeded)."""
        st = self.setup
        if method == "ours_taylor":
            self.ours(method, s, "taylor")
        elif method == "ours_sparse":
            self.ours(method, s, "l2", [SparseTraining("group_lasso", strength=st.sparse_strength)])
        elif method == "ours_criterion":
            self.ours(method, s, self.criterion)
        elif method in TP and self.tp is not None and self.tp_lm_ok:
            try:
                self.tp_run(method, s)
            except Exception as exc:  # reported, not hidden: the JSON says what failed
                print(f"  [lm] {method} {s:g}x failed: {type(exc).__name__}: {exc}", flush=True)
                failed = {"task": "lm", "seed": self.seed, "method": method, "target_speedup": s}
                self.runs.append({**failed, "error": repr(exc)})

    def tp_make(self, reg: float | None, s: float) -> Callable[[nn.Module, float], Any]:
        """A Torch-Pruning pruner factory for the LM: heads (key/value groups) and MLP channels."""
        tp = self.tp

        def make(m: nn.Module, ratio: float) -> Any:
            heads: dict[nn.Module, int] = {}
            ignored: list[nn.Module] = [m.lm_head, m.embed_tokens]
            for layer in m.layers:
                a = layer.self_attn
                heads.update({a.q_proj: a.num_heads, a.k_proj: a.num_kv_heads, a.v_proj: a.num_kv_heads})
                ignored += [a.o_proj, layer.mlp.down_proj]
            kw: dict[str, Any] = {
                "pruning_ratio": ratio,
                "num_heads": heads,
                "prune_num_heads": True,
                "prune_head_dims": False,
                "head_pruning_ratio": self.setup.head_ratio(s),
                "ignored_layers": ignored,
            }
            if reg is None:
                return tp.pruner.MagnitudePruner(
                    m, self.x1, importance=tp.importance.MagnitudeImportance(p=2), **kw
                )
            return tp.pruner.GroupNormPruner(
                m, self.x1, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=reg, **kw
            )

        return make

    def tp_run(self, method: str, s: float) -> None:
        """Torch-Pruning one-shot magnitude (from the dense snapshot) or group-norm sparse training."""
        st = self.setup
        if method == "tp_magnitude":
            assert self.snapshot is not None
            net, done, wall0 = st.model(), st.prune_start + 1, 0.0
            net.load_state_dict(self.snapshot)
            info = tp_prune_to(net, self.x1, self.dense_macs / s, self.tp_make(None, s))
        else:
            lit = self.fresh()
            net, done = lit.model, st.prune_end + 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reg_cb = TPRegularize(self.tp_make(st.tp_reg, s)(net, 0.5))
            wall0 = self.fit(lit, done, [reg_cb])
            info = tp_prune_to(net, self.x1, self.dense_macs / s, self.tp_make(st.tp_reg, s))
        net.train()
        lit = self.fresh(epoch_offset=done, net=net)
        wall = self.fit(lit, st.epochs - done, [])
        self.record(method, s, lit.model, wall0 + wall, **info, **lm_widths(lit.model))


@torch.no_grad()
def lm_eval(model: nn.Module, dm: TextDataModule) -> dict[str, float]:
    """Validation perplexity (exp of the mean next-byte cross-entropy) and next-byte accuracy (%)."""
    training = model.training
    model.eval()
    loss = correct = count = 0.0
    try:
        for ids, targets in dm.val_dataloader():
            logits = model(ids)
            loss += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            correct += float((logits.argmax(-1) == targets).sum())
            count += targets.numel()
    finally:
        model.train(training)
    return {"perplexity": math.exp(loss / count), "accuracy": 100 * correct / count}


def lm_widths(model: nn.Module) -> dict[str, Any]:
    """Query heads, key/value heads and MLP width per layer of a TinyLlama."""
    layers = getattr(model, "layers", [])
    return {
        "heads": [int(layer.self_attn.num_heads) for layer in layers],
        "kv_heads": [int(layer.self_attn.num_kv_heads) for layer in layers],
        "mlp": [int(layer.mlp.gate_proj.out_features) for layer in layers],
    }


TP_PROBE = """
import sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {here!r})
import torch
import torch_pruning as tp
import methods
st = methods.LMSetup(**{setup!r})
runner = methods.LMRunner.__new__(methods.LMRunner)
runner.setup, runner.tp = st, tp
runner.x1 = torch.randint(0, 256, (1, st.seq_len))
model = st.model()
t = time.perf_counter()
runner.tp_make(None, st.speedups[0])(model, 0.3).step()
methods.fix_lm_heads(model)
model(runner.x1)
print("TP_OK", time.perf_counter() - t)
"""


def probe_tp_lm(setup: LMSetup) -> dict[str, Any]:
    """Can Torch-Pruning prune the tiny Llama (heads and MLP)? Tried in a subprocess under a time
    limit, since its group search may not finish on this model."""
    fields = {k: v for k, v in asdict(setup).items()}
    code = TP_PROBE.format(here=str(HERE), setup=fields)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=setup.tp_probe_timeout_s
        )
    except subprocess.TimeoutExpired:
        return {
            "ok": False,
            "status": f"Torch-Pruning's pruner did not finish building its groups on the tiny Llama in "
            f"{setup.tp_probe_timeout_s:.0f} s (its get_all_groups keeps looping in "
            "_fix_dependency_graph_non_recursive); its methods are not run on the LM",
        }
    for line in proc.stdout.splitlines():
        if line.startswith("TP_OK"):
            return {"ok": True, "status": f"ok ({float(line.split()[1]):.1f} s to build and prune)"}
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"ok": False, "status": f"failed after {time.perf_counter() - start:.0f} s: {tail[:200]}"}


# ------------------------------------------------------------------------------------------ summary


def summarize(
    runs: list[dict[str, Any]], latency: dict[str, dict[int, dict[str, float]]]
) -> list[dict[str, Any]]:
    """Per task, method and target: the metric over seeds (mean, std, per seed), mean MACs and
    parameters, the MAC reduction against dense, and the median latency over seeds (batch 1)."""
    rows = []
    keys: list[tuple[str, str, float | None]] = []
    for r in runs:
        key = (r["task"], r["method"], r["target_speedup"])
        if key not in keys and "error" not in r:
            keys.append(key)
    for task, method, s in keys:
        sel = [r for r in runs if (r["task"], r["method"], r["target_speedup"]) == (task, method, s)]
        sel = [r for r in sel if "error" not in r]
        dense = [r for r in runs if r["task"] == task and r["method"] == "dense"]
        dense_macs = statistics.mean(r["macs"] for r in dense)
        metric = "accuracy" if task == "digits" else "perplexity"
        mean, std = stats([r[metric] for r in sel])
        name = method if s is None else f"{method}@{s:g}"
        measured = latency.get(task, {})
        lats = [measured[r["seed"]][name] for r in sel if name in measured.get(r["seed"], {})]
        row = {
            "task": task,
            "method": method,
            "label": LABELS[method].format(criterion=sel[0].get("importance", "")),
            "target_speedup": s,
            "metric": metric,
            "seeds": [r["seed"] for r in sel],
            "values": [r[metric] for r in sel],
            "mean": mean,
            "std": std,
            "macs": statistics.mean(r["macs"] for r in sel),
            "macs_reduction": dense_macs / statistics.mean(r["macs"] for r in sel),
            "params": statistics.mean(r["params"] for r in sel),
            "latency_ms": 1e3 * statistics.median(lats) if lats else None,
        }
        if task == "digits":
            row["nonzero_macs_reduction"] = dense_macs / statistics.mean(r["nonzero_macs"] for r in sel)
        else:
            row["accuracy_mean"] = statistics.mean(r["accuracy"] for r in sel)
        rows.append(row)
    return rows


def _better(task: str, a: float, b: float) -> bool:
    """Whether metric ``a`` is at least as good as ``b`` (accuracy up, perplexity down)."""
    return a >= b if task == "digits" else a <= b


def best_of(rows: list[dict[str, Any]], task: str, s: float, methods: Sequence[str]) -> dict[str, Any] | None:
    """The row with the best mean among ``methods`` at ``task``/``s`` (None if none ran)."""
    sel = [r for r in rows if r["task"] == task and r["target_speedup"] == s and r["method"] in methods]
    if not sel:
        return None
    key = (lambda r: r["mean"]) if task == "digits" else (lambda r: -r["mean"])
    return max(sel, key=key)


def paired_diffs(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """``a``'s metric minus ``b``'s, seed by seed (the seeds both ran): the methods share each
    seed's initialisation, split and batch order, so these differences carry less noise than the
    two means' spreads suggest."""
    vb = dict(zip(b["seeds"], b["values"]))
    return [va - vb[seed] for seed, va in zip(a["seeds"], a["values"]) if seed in vb]


def check_targets(
    rows: list[dict[str, Any]], speedups: dict[str, list[float]], tp_status: dict[str, str]
) -> list[dict[str, Any]]:
    """The issue's targets, each met / missed / not measurable, with its figures."""
    out = []
    for task, targets in speedups.items():
        dense = next((r for r in rows if r["task"] == task and r["method"] == "dense"), None)
        for s in targets:
            ours = best_of(rows, task, s, OURS)
            if dense and ours and ((task == "digits" and s == 8.0) or (task == "lm" and s == 2.0)):
                if task == "digits":
                    gap = ours["mean"] - dense["mean"]
                    value, met = f"{ours['method']}: {gap:+.2f} pt vs dense", gap >= -1.0
                    what = "digits at 8x fewer MACs within 1.0 pt of dense (ours, best)"
                else:
                    rel = ours["mean"] / dense["mean"] - 1
                    value, met = f"{ours['method']}: perplexity {100 * rel:+.1f}% vs dense", rel <= 0.10
                    what = "LM at 2x fewer MACs within 10% of dense perplexity (ours, best)"
                reached = ours["macs_reduction"]
                value += f" (at {reached:.2f}x fewer MACs)"
                out.append({"task": task, "speedup": s, "target": what, "value": value, "met": met})
            tpb = best_of(rows, task, s, TP)
            what = f"{task} at {s:g}x: ours (best) at least as good as Torch-Pruning (best)"
            if ours and tpb:
                diff = ours["mean"] - tpb["mean"]
                spread = math.sqrt(ours["std"] ** 2 + tpb["std"] ** 2)
                met = _better(task, ours["mean"], tpb["mean"])
                # with one seed there is no spread to be beyond: None (not known)
                seeds = min(len(ours["values"]), len(tpb["values"]))
                beyond = (abs(diff) > spread and met) if seeds > 1 else None
                paired = paired_diffs(ours, tpb)
                pm, ps = stats(paired) if paired else (0.0, 0.0)
                pair = f", per seed {pm:+.2f} ± {ps:.2f}" if len(paired) > 1 else ""
                value = (
                    f"{ours['method']} {ours['mean']:.2f} ± {ours['std']:.2f} vs {tpb['method']} "
                    f"{tpb['mean']:.2f} ± {tpb['std']:.2f} (diff {diff:+.2f}, spread {spread:.2f}{pair}; "
                    f"MACs {ours['macs_reduction']:.2f}x vs {tpb['macs_reduction']:.2f}x)"
                )
                out.append(
                    {
                        "task": task,
                        "speedup": s,
                        "target": what,
                        "value": value,
                        "met": met,
                        "beyond_seed_spread": beyond,
                    }
                )
            elif ours:
                out.append(
                    {
                        "task": task,
                        "speedup": s,
                        "target": what,
                        "met": None,
                        "value": f"not measurable: {tp_status.get(task, 'Torch-Pruning did not run')}",
                    }
                )
    return out


def _fmt_metric(r: dict[str, Any]) -> str:
    return f"{r['mean']:.2f} ± {r['std']:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The README section: one table per task (metric mean ± std over seeds, MACs as run and the
    reduction reached, parameters, latency) and the targets, from the JSON of this script."""
    meta = results["meta"]
    lines: list[str] = [
        "### Methods at high compression",
        "",
        "`benchmarks/methods.py`: every method at the same total epochs and seed-fixed initialisation, "
        "split and batch order; see [benchmarks/README.md](benchmarks/README.md#methodspy-methods-at-high-"
        "compression) for the protocol. Latency: one thread, batch 1, on a shared CPU (noisy).",
        "",
    ]
    if meta.get("note"):
        lines += [f"How this run was made: {meta['note']}.", ""]
    titles = {
        "digits": f"DigitsResNet on digits: top-1 accuracy (%) on {meta.get('digits_val_images', 360)} "
        "validation images",
        "lm": "TinyLlama on stdlib text: validation perplexity (lower is better)",
    }
    for task in meta["tasks"]:
        rows = [r for r in results["summary"] if r["task"] == task]
        if not rows:
            continue
        seeds = max(len(r["values"]) for r in rows)
        lines += [f"**{titles[task]}** ({seeds} seed(s), mean ± std)", ""]
        metric = "accuracy %" if task == "digits" else "perplexity"
        lines += [
            f"| method | target | {metric} | MACs (M) as run | reduction | params (k) | latency bs1 (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            target = "-" if r["target_speedup"] is None else f"{r['target_speedup']:g}x"
            red = f"{r['macs_reduction']:.2f}x"
            if task == "digits" and r["nonzero_macs_reduction"] > 1.01 * r["macs_reduction"]:
                red += f" (nonzero {r['nonzero_macs_reduction']:.2f}x)"
            lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}"
            lines.append(
                f"| {r['label']} | {target} | {_fmt_metric(r)} | {r['macs'] / 1e6:.2f} | {red} | "
                f"{r['params'] / 1e3:.1f} | {lat} |"
            )
        status = results.get("torch_pruning_status", {}).get(task)
        if status and not status.startswith("ok"):
            lines += ["", f"Torch-Pruning on this task: {status}."]
        lines.append("")
    lines += ["**Targets**", ""]
    for t in results["targets"]:
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
        extra = ""
        if "beyond_seed_spread" in t and t["met"]:
            beyond = t["beyond_seed_spread"]
            extra = {True: " (beyond the seed spread)", False: " (within the seed spread)"}.get(
                beyond, " (one seed: spread unknown)"
            )
        lines.append(f"- {t['target']}: {verdict}{extra} — {t['value']}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


@dataclass
class Job:
    """One unit of work for a worker process: every method of one task and seed (``kind="seed"``),
    or one criterion's run on seed 0 at the pick target (``kind="check"``)."""

    kind: str
    task: str
    seed: int
    methods: list[str]
    speedups: list[float]
    criterion: str


@dataclass
class Context:
    """What every job needs besides its own fields (plain data: it is sent to the workers)."""

    digits: DigitsSetup
    lm: LMSetup
    tp_lm_ok: bool
    threads: int
    latency_rounds: int
    latency_repeats: int


def run_job(job: Job, ctx: Context) -> dict[str, Any]:
    """Run ``job`` (in a worker process or inline): its run records and batch-1 latencies."""
    torch.set_num_threads(ctx.threads)
    ad._quiet()
    warnings.filterwarnings("ignore", message=".*SparseTraining.*")
    tp = importlib.import_module("torch_pruning") if any(m in TP for m in job.methods) else None
    runner: Runner
    if job.task == "digits":
        runner = DigitsRunner(ctx.digits, job.seed, tp, job.criterion)
    else:
        runner = LMRunner(ctx.lm, job.seed, tp, ctx.tp_lm_ok, job.criterion)
    start = time.perf_counter()
    if job.kind == "check":
        runner.run_method("ours_criterion", job.speedups[0])
    else:
        runner.run(job.speedups, job.methods)
    latency: dict[str, float] = {}
    if job.kind == "seed":
        lat = ad.measure_latencies(runner.models, runner.dm, [1], ctx.latency_rounds, ctx.latency_repeats)
        latency = {name: v["1"] for name, v in lat.items()}
    return {"runs": runner.runs, "latency": latency, "wall_s": round(time.perf_counter() - start, 1)}


def run_jobs(jobs: Sequence[Job], ctx: Context, workers: int) -> list[dict[str, Any]]:
    """Run ``jobs`` on ``workers`` processes (inline for one), longest first; results in job order.
    Every job seeds its own runs, so the figures do not depend on the number of workers."""
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(job, ctx) for job in jobs]
    import concurrent.futures
    import multiprocessing

    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")
    )
    with pool:
        futures = [pool.submit(run_job, job, ctx) for job in jobs]
        return [f.result() for f in futures]


def val_images(setup: DigitsSetup) -> int:
    """How many digits images the validation split of ``setup`` holds."""
    dm = DigitsDataModule(val_fraction=setup.val_fraction)
    dm.setup()
    assert dm.val_set is not None
    return len(dm.val_set)


def pick_criterion(task: str, results: dict[str, dict[str, Any]], s: float) -> dict[str, Any]:
    """The better of lamp and obd from their check runs (seed 0, target ``s``)."""
    figures: dict[str, float] = {}
    for crit, res in results.items():
        rec = res["runs"][-1]
        figures[crit] = rec["accuracy"] if task == "digits" else rec["perplexity"]
    best = max(figures, key=lambda c: figures[c] if task == "digits" else -figures[c])
    print(f"  [{task}] criterion check at {s:g}x (seed 0): {figures} -> {best}", flush=True)
    return {"speedup": s, "seed": 0, "figures": figures, "picked": best}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=METHODS[1:])
    ap.add_argument("--criterion", default="auto", choices=["auto", *CRITERIA])
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one task and seed each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (training and latency)")
    ap.add_argument("--latency-rounds", type=int, default=3)
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 seed, few epochs, digits 8x and LM 2x (< 2 min)")
    ap.add_argument("--digits-speedups", type=float, nargs="+", help="override the digits MAC targets")
    ap.add_argument("--lm-speedups", type=float, nargs="+", help="override the LM MAC targets")
    ap.add_argument("--lm-max-chars", type=int, help="override the LM's training+validation bytes")
    ap.add_argument("--output", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def setups(args: argparse.Namespace) -> tuple[DigitsSetup, LMSetup]:
    """The task protocols (shrunk for ``--quick``)."""
    digits, lm = DigitsSetup(), LMSetup()
    if args.quick:
        args.seeds = args.seeds[:1]
        args.latency_rounds, args.latency_repeats = 1, 2
        digits = DigitsSetup(epochs=3, prune_start=0, prune_end=1, speedups=[8.0])
        lm = LMSetup(
            epochs=2, prune_start=0, prune_end=0, speedups=[2.0], max_chars=8_000, tp_probe_timeout_s=8.0
        )
    if args.digits_speedups:
        digits.speedups = args.digits_speedups
    if args.lm_speedups:
        lm.speedups = args.lm_speedups
    if args.lm_max_chars:
        lm.max_chars = args.lm_max_chars
    return digits, lm


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print the table and the targets, write the JSON."""
    args = parse(argv)
    start = time.perf_counter()
    ad._quiet()
    torch.set_num_threads(args.threads)
    digits_setup, lm_setup = setups(args)
    tp_status: dict[str, str] = {}
    tp_version = None
    if any(m in TP for m in args.methods):
        try:
            tp_version = getattr(importlib.import_module("torch_pruning"), "__version__", "?")
        except ModuleNotFoundError:
            args.methods = [m for m in args.methods if m not in TP]
            missing = "not installed (pip install torch-pruning): its methods skipped"
            tp_status = {task: missing for task in args.tasks}
            print(f"Torch-Pruning: {tp_status[args.tasks[0]]}", flush=True)
    has_tp = tp_version is not None
    setup_of = {"digits": digits_setup, "lm": lm_setup}
    methods_of = {t: [m for m in args.methods if t == "digits" or m != "lightning"] for t in args.tasks}

    # phase 1: the criterion checks (in the pool) while Torch-Pruning's probe on the LM runs
    checks = [
        (task, crit)
        for task in args.tasks
        for crit in CRITERIA
        if args.criterion == "auto" and "ours_criterion" in args.methods
    ]
    probe: dict[str, Any] = {"ok": False}
    probe_thread = None
    if "lm" in args.tasks and has_tp:
        import threading

        probe_thread = threading.Thread(target=lambda: probe.update(probe_tp_lm(lm_setup)))
        probe_thread.start()
    ctx = Context(digits_setup, lm_setup, False, args.threads, args.latency_rounds, args.latency_repeats)
    check_jobs = [
        Job("check", task, 0, ["ours_criterion"], [setup_of[task].pick_speedup], crit)
        for task, crit in checks
    ]
    check_results = run_jobs(check_jobs, ctx, args.jobs)
    if probe_thread is not None:
        probe_thread.join()
        tp_status["lm"] = probe["status"]
        print(f"Torch-Pruning on the tiny Llama: {probe['status']}", flush=True)
    if "digits" in args.tasks and has_tp:
        tp_status["digits"] = "ok"
    ctx.tp_lm_ok = bool(probe["ok"])
    crit_check: dict[str, Any] = {}
    criterion: dict[str, str] = {}
    for task in args.tasks:
        mine = {job.criterion: res for job, res in zip(check_jobs, check_results) if job.task == task}
        if mine:
            crit_check[task] = pick_criterion(task, mine, setup_of[task].pick_speedup)
            criterion[task] = crit_check[task]["picked"]
        else:
            criterion[task] = args.criterion if args.criterion != "auto" else "lamp"

    # phase 2: one job per task and seed, the longer LM jobs first
    order = sorted(args.tasks, key=lambda t: t != "lm")
    jobs = [
        Job("seed", task, seed, methods_of[task], setup_of[task].speedups, criterion[task])
        for task in order
        for seed in args.seeds
    ]
    results = run_jobs(jobs, ctx, args.jobs)
    runs: list[dict[str, Any]] = []
    latency: dict[str, dict[int, dict[str, float]]] = {task: {} for task in args.tasks}
    for job, res in sorted(zip(jobs, results), key=lambda jr: (jr[0].seed, args.tasks.index(jr[0].task))):
        runs += res["runs"]
        latency[job.task][job.seed] = res["latency"]
    result: dict[str, Any] = {
        "meta": {
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "torch_pruning": tp_version,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads_per_worker": args.threads,
            "workers": args.jobs,
            "seeds": args.seeds,
            "tasks": args.tasks,
            "methods": ["dense", *args.methods],
            "digits": {**asdict(digits_setup), "protocol": digits_setup.proto().as_dict()},
            "digits_val_images": val_images(digits_setup),
            "lm": asdict(lm_setup),
            "latency": {"batch_size": 1, "rounds": args.latency_rounds, "repeats": args.latency_repeats},
            "quick": args.quick,
            "job_wall_s": {f"{j.task}/{j.seed}": r["wall_s"] for j, r in zip(jobs, results)},
            "wall_s": round(time.perf_counter() - start, 1),
        },
        "criterion": criterion,
        "criterion_check": crit_check,
        "torch_pruning_status": tp_status,
        "runs": runs,
        "latency_s": {t: {str(k): v for k, v in d.items()} for t, d in latency.items()},
    }
    result["summary"] = summary = summarize(runs, latency)
    result["targets"] = check_targets(summary, {t: setup_of[t].speedups for t in args.tasks}, tp_status)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} ({result['meta']['wall_s']:.0f} s)", flush=True)
    print()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
