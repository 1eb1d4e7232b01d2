"""``benchmarks/methods.py --quick`` runs end to end and writes the JSON the README tables are made from.

Only the structure is checked (fields, methods, tasks, targets, the markdown rendering), not the
figures: a quick run trains for a few epochs and its numbers mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "methods.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_methods", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_methods_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "methods.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    meta = result["meta"]
    assert meta["quick"] is True and meta["seeds"] == [0]
    assert set(meta["tasks"]) == {"digits", "lm"}
    assert set(result["criterion"]) == {"digits", "lm"}
    assert all(c in ("lamp", "obd") for c in result["criterion"].values())
    for task in ("digits", "lm"):
        check = result["criterion_check"][task]
        assert set(check["figures"]) == {"lamp", "obd"} and check["picked"] in check["figures"]
    assert "lm" in result["torch_pruning_status"]

    summary = result["summary"]
    by = {(r["task"], r["method"], r["target_speedup"]): r for r in summary}
    expected = [("digits", "dense", None), ("lm", "dense", None)]
    expected += [("digits", m, 8.0) for m in ("ours_taylor", "ours_sparse", "ours_criterion")]
    # Torch-Pruning is a baseline, never a dependency: without it the script skips its methods
    has_tp = not result["torch_pruning_status"]["digits"].startswith("not installed")
    if importlib.util.find_spec("torch_pruning") is None:
        assert not has_tp
    tp_rows = ("tp_magnitude", "tp_group_norm") if has_tp else ()
    expected += [("digits", m, 8.0) for m in (*tp_rows, "lightning")]
    if not has_tp:
        assert not any(r["method"].startswith("tp_") for r in summary)
    expected += [("lm", m, 2.0) for m in ("ours_taylor", "ours_sparse", "ours_criterion")]
    for key in expected:
        assert key in by, f"missing summary row {key}"
    for row in summary:
        for name in ("label", "metric", "values", "mean", "std", "macs", "macs_reduction", "params"):
            assert name in row, f"{name} missing from {row['task']}/{row['method']}"
        assert row["latency_ms"] is not None and row["latency_ms"] > 0
        assert row["metric"] == ("accuracy" if row["task"] == "digits" else "perplexity")
        assert len(row["values"]) == 1
    # pruned structurally: fewer MACs than dense (masks keep the dense MACs)
    for (task, method, s), row in by.items():
        if s is not None and method != "lightning":
            assert row["macs_reduction"] > 1.2, (task, method, row["macs_reduction"])
    # a TP row on the LM exists exactly when its probe succeeded
    tp_lm_ran = any(r["task"] == "lm" and r["method"].startswith("tp_") for r in result["runs"])
    assert tp_lm_ran == result["torch_pruning_status"]["lm"].startswith("ok")

    targets = result["targets"]
    assert any(t["task"] == "digits" and t["speedup"] == 8.0 and "1.0 pt" in t["target"] for t in targets)
    assert any(t["task"] == "lm" and t["speedup"] == 2.0 and "10%" in t["target"] for t in targets)
    for t in targets:
        assert t["met"] in (True, False, None) and t["value"]

    text = _load().markdown(result)
    assert "| method |" in text and "**Targets**" in text
    assert text.count("\n| ") >= len(summary)
