"""Peak memory of pruning a model that fits in memory once: plain ``Pruner`` vs meta plan + apply.

A Hugging Face ``LlamaForCausalLM`` of the TinyLlama-1.1B shape (hidden 2048, MLP 5632, 22 layers,
32 heads, 4 key/value heads, vocabulary 32000) is built in bfloat16 with random weights, then
pruned in one of two ways, each in a subprocess of its own so that peaks do not mix:

* ``pruner``: ``Pruner(model, x, importance="l2", ...).step()`` on the real model;
* ``plan``: ``plan = make_plan(model, x, importance="l2", ...)`` (the Pruner runs on a meta copy,
  the L2 scores read the real weights by name, nothing is copied), then ``apply_plan(model, plan,
  x)`` (the real model pruned in place, layer by layer, as one transaction).

Both remove 50% of every group's channels and 50% of the attention heads. Each run reports the
resident memory of the built model, the peak resident memory of each phase over it (Linux
``VmHWM``, reset with ``/proc/self/clear_refs`` after the model is built), that peak as a multiple
of the model's bytes, wall time per phase, and a SHA-256 digest of the pruned weights and history
(the two ways must agree). ``--quick``: a small config of the same shape family (hidden 512, MLP
1408, 4 layers, vocabulary 8000; under a minute).

Writes ``benchmarks/results/meta_memory.json`` (``--out``; ``--quick`` writes nothing unless
``--out`` is given). One CPU thread by default.

    python benchmarks/meta_memory.py [--quick] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

FULL = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
QUICK = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 8000,
}
PRUNING = {"pruning_ratio": 0.5, "prune_num_heads": True, "head_pruning_ratio": 0.5}
VARIANTS = ("pruner", "plan")
MB = 1024 * 1024


def _status(key: str) -> int:
    """A ``/proc/self/status`` entry in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    """Make ``VmHWM`` restart from the current resident size (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Phase:
    """Wall time and peak resident memory of a block, above the resident size at its start."""

    def __init__(self, name: str, out: dict[str, Any]) -> None:
        self.name, self.out = name, out

    def __enter__(self) -> Phase:
        gc.collect()
        self.start_rss = _status("VmRSS")
        _reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        seconds = time.perf_counter() - self.t0
        peak = _status("VmHWM")
        self.out[self.name] = {
            "seconds": round(seconds, 3),
            "start_rss_mb": round(self.start_rss / MB, 1),
            "peak_rss_mb": round(peak / MB, 1),
            "peak_over_start_mb": round((peak - self.start_rss) / MB, 1),
        }


def build(config: dict[str, int]) -> torch.nn.Module:
    """The Llama model in bfloat16 with random weights, built directly in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**config, max_position_embeddings=64, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # norm scales that differ per channel, so that they count in the scores
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def digest(model: torch.nn.Module) -> str:
    from prune_callbacks import get_pruning_history

    h = hashlib.sha256(json.dumps(get_pruning_history(model)).encode())
    for key, t in model.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def child(variant: str, config: dict[str, int], threads: int) -> dict[str, Any]:
    """One variant in this process; returns its measurements."""
    import warnings

    from prune_callbacks import Pruner
    from prune_callbacks.pruning.plan import apply_plan, make_plan

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"variant": variant}
    gc.collect()
    out["rss_before_build_mb"] = round(_status("VmRSS") / MB, 1)
    phases: dict[str, Any] = {}
    with Phase("build", phases):
        model = build(config)
    out["model_mb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / MB, 1)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, config["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": tokens}
    if variant == "pruner":
        with Phase("prune", phases):
            Pruner(model, x, importance="l2", **PRUNING).step()
    else:
        with Phase("plan", phases):
            plan = make_plan(model, x, importance="l2", **PRUNING)
        with Phase("apply", phases):
            apply_plan(model, plan, example_inputs=x)
        del plan
    out["phases"] = phases
    out["pruned_model_mb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / MB, 1)
    work = [k for k in phases if k != "build"]
    out["peak_rss_mb"] = max(phases[k]["peak_rss_mb"] for k in work)
    out["seconds"] = round(sum(phases[k]["seconds"] for k in work), 2)
    # peak of the pruning work over the built model, as a multiple of the model's size
    start = phases[work[0]]["start_rss_mb"]
    out["peak_extra_mb"] = round(out["peak_rss_mb"] - start, 1)
    out["peak_extra_over_model"] = round(out["peak_extra_mb"] / out["model_mb"], 3)
    out["peak_over_model"] = round((out["peak_rss_mb"] - out["rss_before_build_mb"]) / out["model_mb"], 3)
    out["digest"] = digest(model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small config (under a minute)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default: benchmarks/results/meta_memory.json; --quick writes none unless given)",
    )
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    config = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(child(args.child, config, args.threads)))
        return
    runs: dict[str, Any] = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--threads", str(args.threads)]
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
        runs[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "meta_memory",
        "quick": bool(args.quick),
        "config": config,
        "dtype": "bfloat16",
        "pruning": PRUNING,
        "importance": "l2",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "same_result": runs["pruner"]["digest"] == runs["plan"]["digest"],
        "variants": runs,
    }
    first = runs["pruner"]
    print(f"model: {first['parameters'] / 1e6:.0f}M parameters, {first['model_mb']:.0f} MB bf16")
    print(f"{'variant':<8} {'peak RSS MB':>12} {'over model MB':>14} {'x model':>8} {'seconds':>8}  phases")
    for name, r in runs.items():
        phases = ", ".join(
            f"{k} {v['seconds']:.1f}s +{v['peak_over_start_mb']:.0f}MB"
            for k, v in r["phases"].items()
            if k != "build"
        )
        print(
            f"{name:<8} {r['peak_rss_mb']:>12.0f} {r['peak_extra_mb']:>14.0f} "
            f"{r['peak_extra_over_model']:>8.2f} {r['seconds']:>8.1f}  {phases}"
        )
    print(f"same pruned weights and history: {result['same_result']}")
    out = args.out
    if out is None and not args.quick:
        out = Path(__file__).parent / "results" / "meta_memory.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
