"""Write the results section of the top-level README from the benchmark JSON files.

The section sits between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in ``README.md``
and is generated entirely from ``benchmarks/results/accuracy_digits.json`` and
``benchmarks/results/latency.json``, followed by the subsections of :data:`EXTRA_SECTIONS`
(``methods.json``, ``llm_perplexity.json``), each rendered by its own script, so the README's
tables always match the last committed run (``tests/test_benchmark_results.py`` checks it).

Run: ``python benchmarks/results_md.py`` (rewrite the section) or ``--check`` (exit 1 when the
README is out of date).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
ACCURACY_FILE = "accuracy_digits.json"
LATENCY_FILE = "latency.json"
#: Further subsections, each rendered by a function of its own benchmark script from its JSON:
#: (results file, script next to this one, function name). A missing results file is skipped.
EXTRA_SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("methods.json", "methods", "markdown"),
    ("llm_perplexity.json", "llm_perplexity", "readme_section"),
)


def load_results(results_dir: Path = RESULTS_DIR) -> tuple[dict[str, Any], dict[str, Any]]:
    """The accuracy and latency JSON files of ``results_dir``."""
    acc = json.loads((results_dir / ACCURACY_FILE).read_text())
    lat = json.loads((results_dir / LATENCY_FILE).read_text())
    return acc, lat


def _script(name: str) -> Any:
    """``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)  # the scripts import each other's helpers by plain name
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(here) / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def extra_sections(results_dir: Path = RESULTS_DIR) -> list[str]:
    """The :data:`EXTRA_SECTIONS` whose results files exist, rendered by their own scripts."""
    out = []
    for filename, script, function in EXTRA_SECTIONS:
        path = results_dir / filename
        if path.is_file():
            out.append(getattr(_script(script), function)(json.loads(path.read_text())).strip())
    return out


def render_all(results_dir: Path = RESULTS_DIR) -> str:
    """The whole README section: :func:`render` of the accuracy and latency runs, then the
    :func:`extra_sections`."""
    body = render(*load_results(results_dir))
    return "\n\n".join([body, *extra_sections(results_dir)])


def _target(s: float | None) -> str:
    return "-" if s is None else f"{s:g}x"


def _targets(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"- {t['target']}: {t['value']} — **{'met' if t['met'] else 'missed'}**" for t in targets]


def _macs(macs: float, reduction: float) -> str:
    m = f"{macs / 1e6:.3f}"
    return m if abs(reduction - 1.0) < 0.005 else f"{m} ({reduction:.2f}x fewer)"


def accuracy_table(acc: Mapping[str, Any]) -> list[str]:
    """One row per method and MAC target of ``accuracy_digits.json``'s summary."""
    bss = acc["meta"]["latency"]["batch_sizes"]
    header = [
        "method",
        "MACs target",
        f"accuracy (%), mean ± std over {len(acc['meta']['seeds'])} seeds",
        "min – max",
        "MACs as run (M)",
        "nonzero-weight MACs (M)",
        "params (k)",
    ]
    header += [f"CPU latency, batch {bs} (ms)" for bs in bss]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in acc["summary"]:
        cells = [
            r["label"],
            _target(r["target_speedup"]),
            f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
            f"{r['accuracy_min']:.2f} – {r['accuracy_max']:.2f}",
            _macs(r["macs"], r["macs_reduction"]),
            _macs(r["nonzero_macs"], r["nonzero_macs_reduction"]),
            f"{r['params'] / 1e3:.1f}",
        ]
        cells += [f"{r['latency_ms'][str(bs)]:.2f} ({r['latency_speedup'][str(bs)]:.2f}x)" for bs in bss]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def has_ort(lat: Mapping[str, Any]) -> bool:
    """Whether ``latency.json`` holds ONNX Runtime columns (runs before they existed do not)."""
    rows = [r for fam in lat["families"] for r in fam["rows"]]
    return bool(rows) and all("ort_latency_ms" in r for r in rows)


def latency_table(lat: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One row per model of ``latency.json``: MACs, parameters, latency, speedup and efficiency
    (``prefix="ort_"``: the ONNX Runtime latency, speedup and efficiency)."""
    bss = [str(b) for b in lat["meta"]["batch_sizes"]]
    header = ["model", "pruned to", "GMACs", "MACs reduction", "params (M)"]
    for bs in bss:
        header += [f"batch {bs}: ms", f"batch {bs}: speedup", f"batch {bs}: speedup / MACs reduction"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fam in lat["families"]:
        for r in fam["rows"]:
            cells = [
                f"{fam['family']} @ {fam['resolution']}",
                "dense" if r["target_speedup"] is None else f"{r['target_speedup']:g}x fewer MACs",
                f"{r['macs'] / 1e9:.3f}",
                f"{r['macs_reduction']:.2f}x",
                f"{r['params'] / 1e6:.2f}",
            ]
            for bs in bss:
                cells += [
                    f"{r[prefix + 'latency_ms'][bs]:.1f}",
                    f"{r[prefix + 'speedup'][bs]:.2f}x",
                    f"{r[prefix + 'efficiency'][bs]:.2f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(acc: Mapping[str, Any], lat: Mapping[str, Any]) -> str:
    """The README section (without the marker lines) for the given results."""
    am, lm = acc["meta"], lat["meta"]
    proto = am["protocol"]
    epochs = proto["prune_epochs"]
    out = [
        "<!-- generated by benchmarks/results_md.py from benchmarks/results/*.json: edit those, not this -->",
        "Measured on a 2-core CPU with the scripts of [benchmarks/](benchmarks/README.md), which says",
        "what every figure means. Regenerate everything (the two runs took "
        f"{am['wall_s'] / 60:.1f} and {lm['wall_s'] / 60:.1f} minutes):",
        "",
        "```bash",
        "python benchmarks/accuracy_digits.py   # accuracy vs other tools: accuracy_digits.{json,png}",
        "python benchmarks/latency.py           # latency vs MACs: latency.json",
        "python benchmarks/results_md.py        # rewrites this section from the JSON files",
        "```",
        "",
        "### Accuracy against other pruning tools",
        "",
        f"{proto['model']} on scikit-learn digits, {proto['epochs']} epochs for every method with "
        f"{proto['optimizer']} and a cosine learning rate; pruning after epochs {epochs[0]} to {epochs[-1]} "
        f"(0-based), Torch-Pruning once after epoch {epochs[0]} (then a fresh optimizer); seeds "
        f"{', '.join(str(s) for s in am['seeds'])}. Latency: one thread, median over seeds of the "
        "median of alternating rounds; in brackets the speedup over dense. Lightning's `ModelPruning` "
        "masks channels, so its model runs at the dense MACs; its nonzero-weight MACs are what a kernel "
        "that skips zeros could reach.",
        "",
        *accuracy_table(acc),
        "",
        f"![accuracy vs MACs on digits](benchmarks/results/{acc['plot']})",
        "",
        "One validation image is 0.28 points: differences of a few tenths of a point between methods",
        "are within the seed-to-seed spread. On this 3.3 M-MAC model CPU time goes mostly to per-layer",
        "overheads, so latency falls much less than MACs; the latency table below uses full-size models.",
        "",
        "Targets of the issue (at 2x fewer MACs):",
        "",
        *_targets([t for t in acc["targets"] if t["issue_target"]]),
        "",
        "The same checks at the other MAC targets (informative, not targets):",
        "",
        *_targets([t for t in acc["targets"] if not t["issue_target"]]),
        "",
        "### Latency against MACs",
        "",
        f"Random-weight models pruned with `Pruner(MagnitudeImportance(p=2), target_speedup=...)` "
        f"(global ranking, round_to={lm['round_to']}); one CPU thread, {lm['rounds']} alternating "
        "rounds, speedup = median over rounds of dense / pruned time in the same round.",
        "",
        *latency_table(lat),
        "",
        "Target of the issue: speedup at least 0.8 x the MACs reduction at 2x:",
        "",
        *_targets(lat["targets"]),
    ]
    if has_ort(lat):
        out += ["", *ort_section(lat)]
    return "\n".join(out)


def ort_section(lat: Mapping[str, Any]) -> list[str]:
    """The ONNX Runtime subsection: how the models were exported and run, the table, the targets."""
    lm = lat["meta"]
    worst = max(r["ort_max_abs_diff"] for fam in lat["families"] for r in fam["rows"])
    exporter = "torch.export-based" if lm["onnx_exporter"] == "dynamo" else "TorchScript"
    return [
        "### ONNX Runtime latency against MACs",
        "",
        f"The same models exported with `prune_callbacks.measure.export.export_onnx` (torch's {exporter} "
        f"exporter, dynamic batch) and run in ONNX Runtime {lm['onnxruntime']} (CPU, all graph "
        f"optimisations, {lm['threads']} intra-op thread{'s' if lm['threads'] != 1 else ''}), timed in "
        "the same alternating rounds; every exported model matches PyTorch at batch 1 within "
        f"{worst:.1e} (largest absolute difference).",
        "",
        *latency_table(lat, "ort_"),
        "",
        "Target of the issue: ONNX Runtime speedup at least 0.8 x the MACs reduction at 2x:",
        "",
        *_targets(lat.get("ort_targets", [])),
    ]


def replace_section(text: str, body: str) -> str:
    """``text`` with everything between the markers replaced by ``body``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README needs a line {BEGIN} followed later by a line {END}")
    return text[: start + len(BEGIN)] + "\n" + body + "\n" + text[end:]


def current_section(text: str) -> str:
    """What is between the markers now (without the newlines next to them)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README needs a line {BEGIN} followed later by a line {END}")
    return text[start + len(BEGIN) : end].strip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check`` verify) the README section; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true", help="exit 1 if the README section is out of date")
    args = ap.parse_args(argv)
    body = render_all(args.results)
    text = args.readme.read_text()
    if args.check:
        if current_section(text) != body:
            print(f"{args.readme}: results section is out of date; run python benchmarks/results_md.py")
            return 1
        print(f"{args.readme}: results section is up to date")
        return 0
    args.readme.write_text(replace_section(text, body))
    print(f"wrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
