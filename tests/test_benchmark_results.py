"""The README's results section matches the committed benchmark JSON; the benchmark scripts run.

The first tests are fast (they read JSON and render markdown). The two smoke runs of the scripts
train and prune small models in a subprocess and are marked slow.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn as nn

from prune_callbacks import count_macs_and_params

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results_md() -> ModuleType:
    """``benchmarks/results_md.py`` as a module."""
    return _load("results_md")


@pytest.fixture(scope="module")
def accuracy_digits() -> ModuleType:
    """``benchmarks/accuracy_digits.py`` as a module."""
    return _load("accuracy_digits")


@pytest.fixture(scope="module")
def committed(results_md: ModuleType) -> tuple[dict, dict]:
    """The committed accuracy and latency JSON."""
    return results_md.load_results()


def test_readme_section_is_generated_from_the_committed_json(results_md: ModuleType, committed) -> None:
    text = (ROOT / "README.md").read_text()
    assert results_md.current_section(text) == results_md.render_all(), (
        "README results section is out of date: run python benchmarks/results_md.py"
    )


def test_committed_results_are_full_default_runs(committed) -> None:
    acc, lat = committed
    assert not acc["meta"]["smoke"] and not lat["meta"]["smoke"]
    assert len(acc["meta"]["seeds"]) >= 3
    assert set(acc["meta"]["methods"]) == {"dense", "lightning", "torch_pruning", "ours"}
    assert 2.0 in acc["meta"]["speedups"]
    # the accuracy run fits in 15 minutes; the latency run times every model twice (PyTorch and
    # ONNX Runtime, batch 32 included) and took 24 minutes on the 2-core machine
    assert acc["meta"]["wall_s"] < 15 * 60 and lat["meta"]["wall_s"] < 30 * 60
    assert (BENCH / "results" / acc["plot"]).is_file()
    assert {f["family"].split(" ")[0] for f in lat["families"]} == {"ResNet-50", "ViT-S/16"}
    for fam in lat["families"]:
        assert [r["target_speedup"] for r in fam["rows"]] == [None, 1.5, 2.0, 3.0]
        assert set(fam["rows"][0]["latency_ms"]) == {"1", "32"}


def test_accuracy_summary_agrees_with_the_runs(committed) -> None:
    acc, _ = committed
    for row in acc["summary"]:
        runs = [
            r
            for r in acc["runs"]
            if r["method"] == row["method"] and r["target_speedup"] == row["target_speedup"]
        ]
        assert len(runs) == len(acc["meta"]["seeds"])
        accs = [100 * r["accuracy"] for r in runs]
        assert row["accuracy_mean"] == pytest.approx(statistics.mean(accs))
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert row["macs"] == pytest.approx(statistics.mean(r["macs"] for r in runs))
        if row["method"] == "lightning":  # masks: every channel is still computed
            assert row["macs"] == acc["dense_macs"] and row["nonzero_macs"] < row["macs"]


def test_targets_agree_with_the_summary(committed) -> None:
    acc, lat = committed
    by = {(r["method"], r["target_speedup"]): r for r in acc["summary"]}
    gap = by[("ours", 2.0)]["accuracy_mean"] - by[("dense", None)]["accuracy_mean"]
    within = next(
        t for t in acc["targets"] if t["target"].startswith("ours within 1.0 point") and "2x" in t["target"]
    )
    assert within["met"] == (gap >= -1.0)
    assert len(lat["targets"]) == 2 * len(lat["families"])  # at 2x, batch 1 and 32
    for t in lat["targets"]:
        fam = next(f for f in lat["families"] if f["family"] == t["family"])
        row = next(r for r in fam["rows"] if r["target_speedup"] == 2.0)
        assert t["efficiency"] == row["efficiency"][t["batch_size"]]
        assert row["efficiency"][t["batch_size"]] == pytest.approx(
            row["speedup"][t["batch_size"]] / row["macs_reduction"]
        )
        assert t["met"] == (t["efficiency"] >= 0.8)


def test_tables_follow_the_json(results_md: ModuleType, committed) -> None:
    acc, lat = committed
    acc2, lat2 = copy.deepcopy(acc), copy.deepcopy(lat)
    acc2["summary"][-1]["accuracy_mean"] = 12.3456
    lat2["families"][0]["rows"][2]["latency_ms"]["32"] = 98765.4
    before, after = results_md.render(acc, lat), results_md.render(acc2, lat2)
    assert "12.35 ±" in after and "12.35 ±" not in before
    assert "| 98765.4 |" in after and "| 98765.4 |" not in before


def test_replace_section_and_check_mode(results_md: ModuleType, tmp_path: Path) -> None:
    text = "intro\n<!-- results:begin -->\nold\n<!-- results:end -->\noutro\n"
    new = results_md.replace_section(text, "new body")
    assert new == "intro\n<!-- results:begin -->\nnew body\n<!-- results:end -->\noutro\n"
    assert results_md.current_section(new) == "new body"
    with pytest.raises(ValueError, match="results:begin"):
        results_md.replace_section("no markers here", "x")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert results_md.main(["--readme", str(readme), "--check"]) == 1
    assert results_md.main(["--readme", str(readme)]) == 0
    assert results_md.main(["--readme", str(readme), "--check"]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("outro\n")


def test_match_ratio_finds_the_closest_ratio(accuracy_digits: ModuleType) -> None:
    acc = accuracy_digits
    ratio, macs = acc.match_ratio(lambda r: int(10_000 * (1 - r) ** 2), 5_000)
    assert abs(macs - 5_000) <= 20
    assert ratio == pytest.approx(1 - 0.5**0.5, abs=2e-3)
    assert acc.match_ratio(lambda r: 10_000, 5_000) == (0.95, 10_000)  # unreachable: the largest ratio


def test_nonzero_macs_skips_masked_filters_and_weights(accuracy_digits: ModuleType) -> None:
    acc = accuracy_digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    x = torch.randn(4, 3, 4, 4)
    total = count_macs_and_params(model, x[:1])[0]
    assert total == 8 * 3 * 9 * 16 + 8 * 16 * 5
    assert acc.nonzero_macs(model, x) == total
    with torch.no_grad():
        model[0].weight[:2] = 0  # two masked filters: 2 x 27 weights, each used at 16 positions
        model[3].weight[0, :10] = 0  # ten linear weights, each used once
    assert acc.nonzero_macs(model, x) == total - 2 * 27 * 16 - 10
    assert acc.zero_filter_fraction(model) == pytest.approx(2 / 8)
    assert model.training


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--output", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # trains DigitsResNet four ways for 3 epochs: about 20 s
def test_accuracy_digits_smoke_run(tmp_path: Path) -> None:
    methods = ["lightning", "ours"]
    if importlib.util.find_spec("torch_pruning") is not None:
        methods.append("torch_pruning")
    data = _run("accuracy_digits", tmp_path, "--methods", *methods)
    assert (tmp_path / "accuracy_digits.png").is_file()
    by = {(r["method"], r["target_speedup"]): r for r in data["summary"]}
    assert set(by) == {("dense", None)} | {(m, 2.0) for m in methods}
    dense, ours, light = by[("dense", None)], by[("ours", 2.0)], by[("lightning", 2.0)]
    assert dense["macs_reduction"] == pytest.approx(1.0)
    assert 2.0 / 1.03 <= ours["macs_reduction"] <= 2.3
    assert light["macs"] == dense["macs"] and light["params"] == dense["params"]
    assert 1.2 < light["nonzero_macs_reduction"] < 2.0  # masks rows only: inputs are still computed
    run = next(r for r in data["runs"] if r["method"] == "lightning")
    assert run["zero_filters"] == pytest.approx(data["lightning_schedules"]["2"]["channel_ratio"], abs=0.03)
    if "torch_pruning" in methods:
        assert by[("torch_pruning", 2.0)]["macs_reduction"] == pytest.approx(2.0, rel=0.05)
    for row in data["summary"]:
        assert 0.0 <= row["accuracy_mean"] <= 100.0
        assert set(row["latency_ms"]) == {"1", "64"} and all(v > 0 for v in row["latency_ms"].values())


@pytest.mark.slow  # prunes ResNet-50 and a 2-layer ViT three times each at 64x64 and exports them: ~1 min
def test_latency_smoke_run(tmp_path: Path) -> None:
    data = _run("latency", tmp_path, "--onnx-exporter", "torchscript")  # the quicker exporter
    assert len(data["families"]) == 2
    for fam in data["families"]:
        rows = fam["rows"]
        assert [r["model"] for r in rows] == ["dense", "1.5x", "2x", "3x"]
        for r in rows[1:]:
            assert r["target_speedup"] / 1.03 <= r["macs_reduction"] <= r["target_speedup"] * 1.25
            assert r["params"] < rows[0]["params"]
        for r in rows:
            assert set(r["latency_ms"]) == {"1", "2"}
            assert r["efficiency"]["1"] == pytest.approx(r["speedup"]["1"] / r["macs_reduction"])
    assert len(data["targets"]) == 4
    if importlib.util.find_spec("onnxruntime"):
        assert len(data["ort_targets"]) == 4
        for fam in data["families"]:
            for r in fam["rows"]:
                assert set(r["ort_latency_ms"]) == {"1", "2"} and r["ort_max_abs_diff"] < 1e-3
