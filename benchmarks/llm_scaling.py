"""How pruning time grows with depth on a Hugging Face Llama (grouped-query attention).

For 2, 8 and 32 layers (hidden 256): time to build the dependency graph and prune 30% of the MLP
channels and 25% of the attention heads, next to one forward pass of the same model, and the same
task with Torch-Pruning (capped at 300 s, in a subprocess). Prints a table and writes
``benchmarks/results/llm_scaling.json``.

One CPU thread; the forward pass is the median of 5, build+prune the best of ``--rounds`` runs
(each on a freshly built model) after a warm-up on a one-layer model.

    python benchmarks/llm_scaling.py [--layers 2 8 32] [--rounds 3] [--seq 64] [--tp-timeout 300] [--no-tp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, SEQ = 256, 8, 2, 688, 1024, 64


def build(layers: int, seq: int = SEQ) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=max(seq, SEQ),
    )
    return LlamaForCausalLM(cfg).eval()


def inputs(seq: int = SEQ) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))}


def _prune(model: torch.nn.Module, x: dict) -> float:
    """Build the graph and prune (30% of MLP channels, 25% of heads); returns the seconds taken."""
    from prune_callbacks.pruning.pruner import Pruner

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(
            model,
            x,
            "random",
            pruning_ratio=0.3,
            prune_num_heads=True,
            head_pruning_ratio=0.25,
            ignored_layers=[
                "model.embed_tokens",
                "lm_head",
                "model.norm",
                "*.o_proj",
                "*.down_proj",
                "*layernorm*",
            ],
        )
        pruner.step()
    return time.perf_counter() - t


def ours(layers: int, rounds: int, seq: int = SEQ) -> dict:
    """Median forward pass and best of ``rounds`` build+prune runs, each on a fresh model."""
    model, x = build(layers, seq), inputs(seq)
    with torch.no_grad():
        model(**x)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            model(**x)
            times.append(time.perf_counter() - t)
    forward = statistics.median(times)
    p0 = sum(p.numel() for p in model.parameters())
    prune_times = [_prune(model, x)]
    for _ in range(rounds - 1):
        fresh = build(layers, seq)
        prune_times.append(_prune(fresh, x))
    elapsed = min(prune_times)
    mlp = [m for n, m in model.named_modules() if n.endswith("mlp.gate_proj")]
    with torch.no_grad():
        out = model(**x).logits
    attn = model.model.layers[0].self_attn
    return {
        "layers": layers,
        "seq": seq,
        "forward_s": forward,
        "build_and_prune_s": elapsed,
        "build_and_prune_rounds_s": prune_times,
        "forward_passes": elapsed / forward,
        "params_before": p0,
        "params_after": sum(p.numel() for p in model.parameters()),
        "mlp_width": [mlp[0].out_features, FFN],
        "q_heads": [attn.q_proj.out_features // attn.head_dim, HEADS],
        "runs": tuple(out.shape) == (1, seq, VOCAB),
    }


TP_SCRIPT = """
import sys, time, torch, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {here!r})
from llm_scaling import build, inputs
import torch_pruning as tp
model, x = build({layers}, {seq}), inputs({seq})
t = time.perf_counter()
pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.3,
    num_heads={{m.q_proj: m.config.num_attention_heads for m in model.modules() if hasattr(m, "q_proj")}},
    prune_num_heads=True, head_pruning_ratio=0.25, ignored_layers=[model.lm_head])
pruner.step()
print("TP_SECONDS", time.perf_counter() - t)
"""


def torch_pruning(layers: int, timeout: float, seq: int = SEQ) -> dict:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "torch-pruning"], check=False)
    code = TP_SCRIPT.format(here=str(Path(__file__).parent), layers=layers, seq=seq)
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "status": f"did not finish in {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("TP_SECONDS"):
            return {"seconds": float(line.split()[1]), "status": "ok"}
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"seconds": None, "status": f"failed after {time.perf_counter() - t:.0f} s: {tail[:120]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--tp-timeout", type=float, default=300.0)
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="build+prune rounds per depth (best is kept)")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens of the example input (and the forward pass)")
    ap.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "llm_scaling.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _prune(build(1), inputs())  # warm-up: first-call costs (imports, kernel registration) are not pruning
    rows = []
    for n in args.layers:
        row = ours(n, args.rounds, args.seq)
        row["torch_pruning"] = None if args.no_tp else torch_pruning(n, args.tp_timeout, args.seq)
        rows.append(row)
        tp_txt = (
            "skipped"
            if row["torch_pruning"] is None
            else (
                f"{row['torch_pruning']['seconds']:.2f} s"
                if row["torch_pruning"]["seconds"] is not None
                else row["torch_pruning"]["status"]
            )
        )
        print(
            f"layers={n:3d} forward={row['forward_s']:.3f}s build+prune={row['build_and_prune_s']:.3f}s "
            f"({row['forward_passes']:.1f} forward passes) per layer={row['build_and_prune_s'] / n:.3f}s "
            f"mlp {row['mlp_width'][1]}->{row['mlp_width'][0]} "
            f"heads {row['q_heads'][1]}->{row['q_heads'][0]} "
            f"runs={row['runs']} | Torch-Pruning: {tp_txt}",
            flush=True,
        )
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
