"""How pruning time grows with depth and width on Hugging Face Llama models (grouped-query attention).

Depth: for 2, 8 and 32 layers (hidden 256): time to build the dependency graph and prune 30% of
the MLP channels and 25% of the attention heads, next to one forward pass of the same model, and
the same task with Torch-Pruning (capped at 300 s, in a subprocess).

Width and real sizes, on the meta device (no weights, no memory, no arithmetic): the Llama-2-7B
config (hidden 4096, MLP 11008, 32 layers, 32 heads), the Llama-2-70B config (hidden 8192, MLP
28672, 80 layers, 64 heads, 8 key/value heads) and a Mistral-7B config (grouped-query attention:
32 heads, 8 key/value heads, MLP 14336), ``--configs 7b 70b mistral``; and a width sweep
(``--width 256 1024 4096 8192``: hidden W, MLP 2.6875 W, W/128 heads, ``--sweep-layers`` layers)
reporting the time per layer. A meta tensor has no values, so these runs score channels with
the ``"random"`` criterion (it needs none). Each run reports the phases of the Pruner
(``Pruner.timings``: graph, groups, importance, selection, pruning) and the total of
construction + one step; ``--profile`` prints the cProfile of one run of the first of
``--configs`` (7B by default).

Prints a table and writes ``benchmarks/results/llm_scaling.json``. One CPU thread; the forward
pass is the median of 5, build+prune the best of ``--rounds`` runs (each on a freshly built
model) after a warm-up on a one-layer model; the width sweep interleaves its rounds (each round
runs every width once), so a slow spell of the machine does not fall on one width. ``--quick``:
2 and 8 layers, the 7B config and widths 256 and 4096 at 2 layers, one round, no Torch-Pruning
(about a minute).

    python benchmarks/llm_scaling.py [--layers 2 8 32] [--rounds 3] [--seq 64] [--tp-timeout 300] [--no-tp]
        [--configs 7b 70b mistral] [--width 256 512 1024 2048 4096 8192] [--sweep-layers 8] [--quick]
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


#: Meta-device configs of real models: name -> (family, config sizes).
META_CONFIGS: dict[str, tuple[str, dict[str, int]]] = {
    "7b": (
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32000,
        },
    ),
    "70b": (
        "llama",
        {
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
        },
    ),
    "mistral": (
        "mistral",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
        },
    ),
}

#: What the meta runs prune: MLP channels and heads (the hidden size stays, as in the depth
#: runs), or everything but the output layer ("all": the residual stream too).
SCOPES = ("mlp_heads", "all")


def build_meta(family: str, sizes: dict[str, int], seq: int = SEQ) -> torch.nn.Module:
    """A Llama or Mistral causal LM of ``sizes`` on the meta device (built in milliseconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    llama = family == "llama"
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if llama else (MistralConfig, MistralForCausalLM)
    cfg = config_cls(max_position_embeddings=max(seq, SEQ), **sizes)
    with torch.device("meta"):
        model = model_cls(cfg)
    return model.eval()


def width_sizes(width: int, layers: int) -> dict[str, int]:
    """A Llama of hidden size ``width`` shaped like Llama-2-7B: MLP 2.6875 x width (rounded to
    16), heads of 128 features (at least 2), as many key/value heads."""
    heads = max(2, width // 128)
    return {
        "hidden_size": width,
        "intermediate_size": 16 * round(width * 11008 / 4096 / 16),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": VOCAB,
    }


def _ignored(scope: str) -> list[str]:
    if scope == "all":
        return ["lm_head"]
    return ["model.embed_tokens", "lm_head", "model.norm", "*.o_proj", "*.down_proj", "*layernorm*"]


def meta_run(
    family: str, sizes: dict[str, int], rounds: int, scope: str = "mlp_heads", seq: int = SEQ
) -> dict:
    """Best of ``rounds`` (by total) of Pruner construction + one step on a fresh meta model:
    seconds of construction, of the step and of each phase (``Pruner.timings``)."""
    from prune_callbacks.pruning.pruner import Pruner

    x = inputs(seq)
    best: dict | None = None
    totals = []
    for _ in range(rounds):
        model = build_meta(family, sizes, seq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            pruner = Pruner(
                model,
                x,
                "random",
                pruning_ratio=0.3,
                prune_num_heads=True,
                head_pruning_ratio=0.25,
                ignored_layers=_ignored(scope),
            )
            t1 = time.perf_counter()
            n_groups = len(pruner.groups)  # built by the construction
            pruner.step()
            t2 = time.perf_counter()
        totals.append(t2 - t0)
        if best is None or t2 - t0 < best["total_s"]:
            mlp = next(m for n, m in model.named_modules() if n.endswith("mlp.gate_proj"))
            attn = model.model.layers[0].self_attn
            best = {
                "construction_s": t1 - t0,
                "step_s": t2 - t1,
                "total_s": t2 - t0,
                "phases_s": dict(pruner.timings),
                "groups": n_groups,
                "hidden": [model.model.embed_tokens.weight.shape[1], sizes["hidden_size"]],
                "mlp_width": [mlp.out_features, sizes["intermediate_size"]],
                "q_heads": [attn.q_proj.out_features // attn.head_dim, sizes["num_attention_heads"]],
            }
    assert best is not None
    layers = sizes["num_hidden_layers"]
    return {**best, "rounds_s": totals, "per_layer_s": best["total_s"] / layers, "scope": scope, **sizes}


def width_sweep(widths: list[int], layers: int, rounds: int, scope: str, seq: int) -> list[dict]:
    """:func:`meta_run` at every width, best of ``rounds``, the rounds interleaved (every round
    runs each width once, in turn), so that a slow spell of the machine hits all widths alike
    instead of one; each row's ``rounds_s`` lists its rounds."""
    best: dict[int, dict] = {}
    totals: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(rounds):
        for width in widths:
            row = meta_run("llama", width_sizes(width, layers), 1, scope, seq)
            totals[width].append(row["total_s"])
            if width not in best or row["total_s"] < best[width]["total_s"]:
                best[width] = row
    return [{**best[w], "rounds_s": totals[w]} for w in widths]


def _meta_line(label: str, row: dict) -> str:
    phases = " ".join(f"{k}={v:.2f}" for k, v in row["phases_s"].items())
    return (
        f"{label:>12s} hidden={row['hidden_size']:5d} layers={row['num_hidden_layers']:3d} "
        f"construction+step={row['total_s']:.2f}s (construction {row['construction_s']:.2f}s, "
        f"step {row['step_s']:.2f}s) per layer={row['per_layer_s'] * 1000:.1f}ms [{phases}] "
        f"mlp {row['mlp_width'][1]}->{row['mlp_width'][0]} heads {row['q_heads'][1]}->{row['q_heads'][0]}"
    )


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
    ap.add_argument("--layers", type=int, nargs="*", default=[2, 8, 32])
    ap.add_argument("--tp-timeout", type=float, default=300.0)
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="build+prune rounds per model (best is kept)")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens of the example input (and the forward pass)")
    ap.add_argument("--configs", nargs="*", default=list(META_CONFIGS), choices=list(META_CONFIGS))
    ap.add_argument("--width", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--sweep-layers", type=int, default=8, help="layers of the width-sweep models")
    ap.add_argument("--scope", choices=SCOPES, default="mlp_heads", help="what the meta runs prune")
    ap.add_argument(
        "--profile", action="store_true", help="print the cProfile of one meta run of the first --configs"
    )
    ap.add_argument("--quick", action="store_true", help="a small run for development (about a minute)")
    ap.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "llm_scaling.json")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.no_tp, args.rounds = [2, 8], True, 1
        args.configs, args.width, args.sweep_layers = ["7b"], [256, 4096], 2
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
    meta_run("llama", width_sizes(256, 1), 1, args.scope, args.seq)  # warm-up of the meta path
    configs = {}
    for name in args.configs:
        family, sizes = META_CONFIGS[name]
        configs[name] = row = meta_run(family, sizes, args.rounds, args.scope, args.seq)
        print(_meta_line(name, row), flush=True)
    sweep = width_sweep(args.width, args.sweep_layers, args.rounds, args.scope, args.seq)
    for width, row in zip(args.width, sweep):
        print(_meta_line(f"width {width}", row), flush=True)
    if sweep:
        per_layer = [r["per_layer_s"] for r in sweep]
        print(f"per-layer time, slowest / fastest width: {max(per_layer) / min(per_layer):.2f}x")
    if args.profile:
        _profile(args.scope, args.seq, args.configs[0] if args.configs else "7b")
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"depth": rows, "meta_configs": configs, "width_sweep": sweep}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _profile(scope: str, seq: int, config: str = "7b") -> None:
    """cProfile of Pruner construction + one step on the meta config ``config`` (top 30 by own
    time)."""
    import cProfile
    import pstats

    family, sizes = META_CONFIGS[config]
    prof = cProfile.Profile()
    prof.enable()
    meta_run(family, sizes, 1, scope, seq)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
