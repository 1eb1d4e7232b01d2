"""Tests for the sweep report (markdown table and accuracy-vs-MACs plot) on synthetic job folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prune_callbacks.app.report import collect, label_jobs, main, markdown_table, write_report


def _results(ratio: float, dense_acc: float, pruned_acc: float, dense_macs: int, pruned_macs: int) -> dict:
    return {
        "model": "DigitsResNet",
        "data": "DigitsDataModule",
        "metric": "val/acc",
        "overrides": [f"pruning.pruning_ratio={ratio}", "trainer.max_epochs=3"],
        "dense": {"accuracy": dense_acc, "macs": dense_macs, "params": 150_000, "latency_s": {"1": 2e-3}},
        "pruned": {"accuracy": pruned_acc, "macs": pruned_macs, "params": 60_000, "latency_s": {"1": 1e-3}},
        "speedup": {"macs": dense_macs / pruned_macs, "params": 2.5, "latency": {"1": 2.0}},
    }


def _sweep(tmp_path: Path, points: list[tuple[float, float, float, int, int]]) -> Path:
    sweep = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    for i, p in enumerate(points):
        job = sweep / str(i)
        job.mkdir(parents=True)
        (job / "results.json").write_text(json.dumps(_results(*p)))
    return sweep


POINTS = [
    (0.3, 0.98, 0.975, 3_300_000, 1_700_000),
    (0.5, 0.98, 0.962, 3_300_000, 900_000),
    (0.7, 0.98, 0.911, 3_300_000, 400_000),
]


def test_collect_orders_jobs_numerically(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, POINTS * 4)  # 12 jobs: "10" must come after "9"
    rows = collect(sweep)
    assert [r["job"] for r in rows] == [str(i) for i in range(12)]


def test_labels_are_the_swept_overrides_only(tmp_path: Path) -> None:
    rows = collect(_sweep(tmp_path, POINTS))
    assert label_jobs(rows) == [f"pruning.pruning_ratio={p[0]}" for p in POINTS]


def test_table_and_plot_hold_every_point(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, POINTS)
    md, png = write_report(sweep)
    text = md.read_text()
    for ratio, _dense, pruned, dmacs, pmacs in POINTS:
        assert f"pruning.pruning_ratio={ratio}" in text
        assert f"{100 * pruned:.2f}" in text
        assert f"{pmacs / 1e6:.3f}" in text
        assert f"{dmacs / pmacs:.2f}x" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert len(table_rows) == len(POINTS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[0] > 100


def test_change_column_is_pruned_minus_dense(tmp_path: Path) -> None:
    rows = collect(_sweep(tmp_path, POINTS[:1]))
    table = markdown_table(rows)
    assert f"{100 * (POINTS[0][2] - POINTS[0][1]):+.2f}" in table


def test_cli_writes_into_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep(tmp_path, POINTS[:2])
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "accuracy_vs_macs.png").is_file()
    assert "pruning.pruning_ratio=0.5" in capsys.readouterr().out


def test_cli_empty_directory_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no results.json below") and "\n" not in err


def test_without_matplotlib_the_table_is_written_and_the_plot_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An installed wheel without the ``plot`` extra still reports a sweep (table only)."""
    sweep = _sweep(tmp_path, POINTS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    md, png = write_report(sweep)
    assert png is None and not (sweep / "accuracy_vs_macs.png").exists()
    assert "| " in md.read_text() and "accuracy_vs_macs.png" not in md.read_text()
    assert main([str(sweep)]) == 0
    assert "no plot: matplotlib is not installed" in capsys.readouterr().out
