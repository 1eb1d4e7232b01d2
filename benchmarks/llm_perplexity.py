"""Perplexity of a small Llama after structured pruning: magnitude, Taylor, Wanda-style, FLAP-style.

Data: next-byte prediction on the Python standard library's own source files (the app's
``stdlib_text`` data, :mod:`prune_callbacks.reference.data.text`; no download): training windows are
drawn at random offsets of the first 95% of the byte stream, perplexity is measured on the first
``eval_windows`` windows of the last 5% (the same windows for every run).

Models: the app's Llama-style model (:class:`~prune_callbacks.reference.models.TinyLlama`: RMSNorm,
rotary embedding, grouped-query attention with 8 query and 4 key/value heads, SwiGLU MLP; ``--size
small`` halves its width and depth so that the whole run fits in 15 minutes on two cores,
``--size app`` is the app's ``model=tiny_llama`` config) and a Hugging Face ``LlamaForCausalLM``
built from a config of the same sizes (random init, no download).

For every seed each model is trained once (AdamW, cosine schedule; cached within the run), then
for every method and ratio a copy of it is pruned: ``ratio`` of the MLP channels of every layer
and ``ratio`` of the attention heads (by key/value head blocks: with 4 blocks, 20% rounds to one
block, 25% of the heads; the JSON records the fractions removed), the residual stream kept. Methods:

* ``magnitude``: L2 norm of the weights of each channel (``importance="magnitude"``);
* ``taylor``: first-order Taylor, gradients of ``calib_batches`` training batches;
* ``wanda``: Wanda-style ``|W| * ||x||`` on the consumer side (down_proj / o_proj columns),
  activations of ``calib_batches`` training batches
  (:class:`~prune_callbacks.pruning.calibration.WandaImportance`);
* ``flap``: FLAP-style fluctuation with bias compensation, the Llama's ``down_proj`` and
  ``o_proj`` given a bias (:class:`~prune_callbacks.pruning.calibration.FLAPImportance`,
  ``add_bias=True``).

Perplexity is measured right after the prune and after a short fine-tune (``finetune_steps``,
AdamW). Results: mean and standard deviation over the seeds, a markdown table on stdout and
``benchmarks/results/llm_perplexity.json``.

    python benchmarks/llm_perplexity.py [--quick] [--size small|app] [--seeds 0 1 2]
        [--models tiny_llama hf_llama] [--threads N] [--out PATH]

``--quick``: one seed, a smaller model and fewer steps (well under 2 minutes); its figures only
check that everything runs, and it writes no file unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from prune_callbacks import Pruner, count_macs_and_params
from prune_callbacks.pruning.calibration import FLAPImportance, WandaImportance
from prune_callbacks.pruning.importance import get_importance
from prune_callbacks.reference.data.text import TextDataModule
from prune_callbacks.reference.models import TinyLlama

RESULTS = Path(__file__).parent / "results" / "llm_perplexity.json"
METHODS = ("magnitude", "taylor", "wanda", "flap")
MODELS = ("tiny_llama", "hf_llama")
RATIOS = (0.2, 0.5)
VOCAB = 256


@dataclass(frozen=True)
class Setup:
    """Model sizes and the training / evaluation budget of one run."""

    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    seq: int
    batch: int
    train_steps: int
    finetune_steps: int
    lr: float
    finetune_lr: float
    eval_windows: int
    calib_batches: int
    max_chars: int


SETUPS = {
    # the app's model=tiny_llama (dim 256, 4 layers, 8/4 heads, MLP 768)
    "app": Setup(256, 4, 8, 4, 768, 128, 16, 600, 60, 1e-3, 3e-4, 64, 8, 2_000_000),
    # the same architecture at half width and depth: the default, sized for 15 min on 2 cores
    "small": Setup(128, 2, 8, 4, 384, 128, 16, 300, 30, 2e-3, 5e-4, 64, 4, 1_000_000),
    "quick": Setup(64, 2, 8, 4, 192, 64, 8, 80, 10, 3e-3, 1e-3, 16, 2, 300_000),
}


# ---------------------------------------------------------------------------------------------- models


def build(family: str, s: Setup, seed: int) -> nn.Module:
    """A fresh model of ``family`` with the sizes of ``s`` (weights drawn from ``seed``)."""
    torch.manual_seed(seed)
    if family == "tiny_llama":
        return TinyLlama(
            vocab_size=VOCAB,
            dim=s.dim,
            n_layers=s.layers,
            n_heads=s.heads,
            n_kv_heads=s.kv_heads,
            ffn_dim=s.ffn,
            max_seq_len=s.seq,
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=s.dim,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def call(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of either family."""
    out = model(ids) if isinstance(model, TinyLlama) else model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def example(model: nn.Module, ids: torch.Tensor) -> Any:
    return ids if isinstance(model, TinyLlama) else {"input_ids": ids}


def residual(model: nn.Module) -> list[str]:
    """Layers whose output channels are the residual stream (kept: only heads and MLP go)."""
    if isinstance(model, TinyLlama):
        return ["embed_tokens", "lm_head", "norm", "*.o_proj", "*.down_proj", "*layernorm*"]
    return ["model.embed_tokens", "lm_head", "model.norm", "*.o_proj", "*.down_proj", "*layernorm*"]


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = call(model, batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


# ---------------------------------------------------------------------------------------------- data


class Corpus:
    """Training windows at random offsets, fixed validation windows (see the module docstring)."""

    def __init__(self, s: Setup) -> None:
        dm = TextDataModule(seq_len=s.seq, batch_size=s.batch, max_chars=s.max_chars, val_fraction=0.05)
        dm.setup()
        assert dm.train_set is not None and dm.val_set is not None
        self.train = dm.train_set.data
        val = dm.val_set.data
        n = min(s.eval_windows, (len(val) - 1) // s.seq)
        self.val = torch.stack([val[i * s.seq : i * s.seq + s.seq + 1] for i in range(n)])
        self.s = s

    def batches(self, count: int, seed: int) -> list[torch.Tensor]:
        """``count`` batches of ``(batch, seq + 1)`` windows drawn with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        top = len(self.train) - self.s.seq - 1
        out = []
        for _ in range(count):
            starts = torch.randint(0, top, (self.s.batch,), generator=gen)
            out.append(torch.stack([self.train[i : i + self.s.seq + 1] for i in starts.tolist()]))
        return out


# ---------------------------------------------------------------------------------------------- steps


def train(model: nn.Module, batches: list[torch.Tensor], lr: float) -> float:
    """AdamW (the app's betas and weight decay) with a short warm-up and a cosine decay; returns
    the mean loss of the last tenth of the steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    steps = len(batches)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    model.train()
    tail: list[float] = []
    for i, batch in enumerate(batches):
        loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if i >= steps - max(1, steps // 10):
            tail.append(loss.item())
    model.eval()
    return statistics.mean(tail)


@torch.no_grad()
def perplexity(model: nn.Module, val: torch.Tensor, chunk: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val), chunk):
        batch = val[start : start + chunk]
        logits = call(model, batch[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def widths(model: nn.Module) -> tuple[int, int]:
    """(query heads, MLP channels) summed over the layers."""
    heads = mlp = 0
    for name, m in model.named_modules():
        if name.endswith("q_proj"):
            attn = _parent(model, name)
            head_dim = getattr(attn, "head_dim", None)
            heads += m.out_features // int(head_dim)  # type: ignore[arg-type]
        elif name.endswith("gate_proj"):
            mlp += m.out_features
    return heads, mlp


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def prune(model: nn.Module, method: str, ratio: float, calib: list[torch.Tensor]) -> float:
    """Prune ``ratio`` of the MLP channels and heads of ``model`` by ``method``; returns seconds."""
    t0 = time.perf_counter()
    if method == "flap":
        importance: Any = FLAPImportance(add_bias=True)
    elif method == "wanda":
        importance = WandaImportance()
    else:
        importance = get_importance(method)
    pruner = Pruner(
        model,
        example(model, calib[0][:1, :-1]),
        importance=importance,
        pruning_ratio=ratio,
        prune_num_heads=True,
        head_pruning_ratio=ratio,
        ignored_layers=residual(model),
    )
    if method in ("wanda", "flap"):
        importance.calibrate(model, [b[:, :-1] for b in calib], forward_fn=lambda m, ids: call(m, ids))
    elif method == "taylor":
        model.eval()
        for batch in calib:
            model.zero_grad(set_to_none=True)
            loss_of(model, batch).backward()
            importance.accumulate(model)
        model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- run


def run_seed(family: str, s: Setup, corpus: Corpus, seed: int, log: Any) -> dict[str, Any]:
    """Dense training once, then every method and ratio on a copy, with and without fine-tune."""
    t0 = time.perf_counter()
    dense = build(family, s, seed)
    train_loss = train(dense, corpus.batches(s.train_steps, 1000 + seed), s.lr)
    x = example(dense, corpus.val[:1, :-1])
    macs0, params0 = count_macs_and_params(dense, x)
    heads0, mlp0 = widths(dense)
    out: dict[str, Any] = {
        "dense": {
            "ppl": perplexity(dense, corpus.val),
            "train_loss": train_loss,
            "macs": macs0,
            "params": params0,
        },
        "train_s": time.perf_counter() - t0,
    }
    log(f"{family} seed {seed}: dense ppl {out['dense']['ppl']:.3f} ({out['train_s']:.0f} s)")
    calib = corpus.batches(s.calib_batches, 2000 + seed)
    finetune = corpus.batches(s.finetune_steps, 3000 + seed)
    for method in METHODS:
        for ratio in RATIOS:
            model = copy.deepcopy(dense)
            seconds = prune(model, method, ratio, calib)
            macs, params = count_macs_and_params(model, x)
            heads, mlp = widths(model)
            row = {
                "ppl": perplexity(model, corpus.val),
                "macs": macs,
                "params": params,
                "heads_removed": 1 - heads / heads0,
                "mlp_removed": 1 - mlp / mlp0,
                "prune_s": seconds,
            }
            train(model, finetune, s.finetune_lr)
            row["ppl_finetuned"] = perplexity(model, corpus.val)
            out[f"{method}@{ratio}"] = row
            log(f"  {method} {ratio:.0%}: ppl {row['ppl']:.3f} -> {row['ppl_finetuned']:.3f} after fine-tune")
    return out


def summarize(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and standard deviation over the seeds of every figure."""

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }

    summary: dict[str, Any] = {}
    for family, runs in per_seed.items():
        rows: dict[str, Any] = {}
        for key in ["dense"] + [f"{m}@{r}" for m in METHODS for r in RATIOS]:
            entry: dict[str, Any] = {}
            for field in ("ppl", "ppl_finetuned", "macs", "params", "heads_removed", "mlp_removed"):
                values = [run[key][field] for run in runs if field in run[key]]
                if values:
                    entry[field] = stats([float(v) for v in values])
            rows[key] = entry
        summary[family] = rows
    return summary


def markdown(summary: dict[str, Any]) -> str:
    def pm(entry: dict[str, Any], field: str) -> str:
        if field not in entry:
            return "-"
        return f"{entry[field]['mean']:.2f} ± {entry[field]['std']:.2f}"

    lines = [
        "| model | method | removed (MLP / heads) | MACs | perplexity | perplexity, fine-tuned |",
        "|---|---|---|---|---|---|",
    ]
    for family, rows in summary.items():
        dense_macs = rows["dense"]["macs"]["mean"]
        dense_ppl = pm(rows["dense"], "ppl")
        lines.append(f"| {family} | dense | 0 / 0 | {dense_macs / 1e6:.1f} M | {dense_ppl} | - |")
        for key, entry in rows.items():
            if key == "dense":
                continue
            method, ratio = key.split("@")
            removed = f"{entry['mlp_removed']['mean']:.0%} / {entry['heads_removed']['mean']:.0%}"
            macs = f"{entry['macs']['mean'] / 1e6:.1f} M"
            lines.append(
                f"| {family} | {method} {float(ratio):.0%} | {removed} | {macs} | {pm(entry, 'ppl')} | "
                f"{pm(entry, 'ppl_finetuned')} |"
            )
    return "\n".join(lines)


def readme_section(results: dict[str, Any]) -> str:
    """The README's perplexity subsection from a results JSON (for ``results_md.py``)."""
    s = results["setup"]
    seeds = ", ".join(str(x) for x in results["seeds"])
    minutes = results["total_s"] / 60
    intro = (
        f"Byte-level next-token perplexity on held-out standard-library source (the app's `stdlib_text` "
        f"data), {len(results['seeds'])} seeds ({seeds}), mean ± std. Each model (hidden {s['dim']}, "
        f"{s['layers']} layers, {s['heads']} query / {s['kv_heads']} key-value heads, MLP {s['ffn']}) is "
        f"trained for {s['train_steps']} steps, then copies of it lose the given share of every layer's "
        f"MLP channels and attention heads (whole key/value head blocks, so 20% of 4 blocks rounds to "
        f"one block: 25% of the heads), the residual stream kept; perplexity right after the prune and "
        f"after a {s['finetune_steps']}-step fine-tune. Wanda and FLAP read {s['calib_batches']} "
        f"calibration batches of {s['batch']} x {s['seq']} bytes, Taylor the gradients of the same "
        f"batches; FLAP gives `o_proj` and `down_proj` a bias for its compensation. "
        f"`python benchmarks/llm_perplexity.py` ({minutes:.1f} minutes, {results['threads']} threads)."
    )
    return f"### Perplexity of a pruned Llama\n\n{intro}\n\n{markdown(results['summary'])}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a smaller model, fewer steps")
    parser.add_argument("--size", choices=["small", "app"], default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 2; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(threads)
    s = SETUPS["quick" if args.quick else args.size]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = args.out or (None if args.quick else RESULTS)  # a quick run never replaces the results
    start = time.perf_counter()
    corpus = Corpus(s)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    per_seed: dict[str, list[dict[str, Any]]] = {}
    for family in args.models:
        per_seed[family] = [run_seed(family, s, corpus, seed, log) for seed in seeds]
    summary = summarize(per_seed)
    results = {
        "setup": {"size": "quick" if args.quick else args.size, **dataclasses.asdict(s)},
        "seeds": seeds,
        "methods": list(METHODS),
        "ratios": list(RATIOS),
        "threads": threads,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "total_s": time.perf_counter() - start,
        "summary": summary,
        "runs": per_seed,
    }
    print(markdown(summary))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\n{out} ({results['total_s']:.0f} s)")
    else:
        print(f"\n({results['total_s']:.0f} s; --quick writes no file unless --out is given)")


if __name__ == "__main__":
    main()
