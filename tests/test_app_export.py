"""The app's ONNX step (``export.onnx=true``): ``pruned_model.onnx`` next to ``pruned_model.pt``,
ONNX Runtime latency dense vs pruned in the summary and ``results.json``, and one-line errors for
bad ``export`` settings, all on the tiniest digits run.

The app runs in-process through its real entry point, as in ``tests/test_app.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_app
from prune_callbacks.app.config import check_export_settings
from prune_callbacks.pruning.history import load_pruned
from prune_callbacks.reference.models import DigitsResNet

# One tiny epoch with one prune, one batch, a short latency measurement.
TINY = [
    "logger=none",
    "threads=1",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "pruning.start_epoch=0",
    "pruning.end_epoch=0",
    "pruning.verbose=false",
    "model.width=8",
    "data.batch_size=16",
    "latency.batch_sizes=[1,4]",
    "latency.warmup=0",
    "latency.repeats=2",
]


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test from a temporary directory, so Hydra's outputs/ folders land there."""
    monkeypatch.chdir(tmp_path)




def app_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the app expecting a configuration error; return the single stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_app(args)
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_export_onnx_writes_the_file_and_reports_ort_latency(
    dynamo: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    from prune_callbacks.measure.export import check_onnx

    run_app([*TINY, f"output_dir={tmp_path}", "export.onnx=true", f"export.dynamo={str(dynamo).lower()}"])
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())

    assert results["onnx"]["file"] == "pruned_model.onnx"
    assert results["onnx"]["exporter"] == ("dynamo" if dynamo else "torchscript")
    assert "error" not in results["onnx"] and "mismatch" not in results["onnx"]
    assert (tmp_path / "pruned_model.onnx").is_file() and (tmp_path / "pruned_model.pt").is_file()
    assert not (tmp_path / "dense_model.onnx").exists()  # the dense export is temporary
    assert results["onnx"]["max_abs_diff"] <= 1e-4

    # Latency for every configured batch size, dense and pruned, and the speedup is their ratio.
    for side in ("dense", "pruned"):
        assert set(results[side]["ort_latency_s"]) == {"1", "4"}
        assert all(t > 0 for t in results[side]["ort_latency_s"].values())
    for bs, s in results["speedup"]["ort_latency"].items():
        dense, pruned = results["dense"]["ort_latency_s"][bs], results["pruned"]["ort_latency_s"][bs]
        assert s == pytest.approx(dense / pruned)
    assert results["time_s"]["onnx"] > 0
    for row in ("ONNX Runtime latency, batch 1", "ONNX Runtime latency, batch 4", "CPU latency, batch 1"):
        assert row in out
    assert "ONNX: pruned_model.onnx" in out and "ONNX Runtime matches PyTorch" in out

    # The file holds the pruned network: it matches the saved pruned model, at another batch size too.
    pruned = load_pruned(DigitsResNet(width=8), tmp_path / results["pruned_model"])
    assert results["pruned"]["params"] < results["dense"]["params"]
    assert check_onnx(pruned, tmp_path / "pruned_model.onnx", torch.randn(3, 1, 8, 8)) <= 1e-4


def test_export_is_off_by_default(tmp_path: Path) -> None:
    run_app([*TINY, f"output_dir={tmp_path}", "latency.batch_sizes=[1]"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert "onnx" not in results and "ort_latency" not in results["speedup"]
    assert not (tmp_path / "pruned_model.onnx").exists()


def test_bad_export_settings_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = app_error([*TINY, "export.onnx=maybe"], capsys)
    assert line.startswith("error: export.onnx=maybe: must be true or false (write pruned_model.onnx")
    assert line.endswith("; e.g. export.onnx=true")
    line = app_error([*TINY, "+export.opset=17"], capsys)
    assert line == "error: export.opset=17: is no export setting; use one of export.onnx, export.dynamo"


def test_missing_onnx_packages_stop_the_run_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "onnxscript" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    message = (
        r"export.onnx=true: ONNX export needs onnxscript, not installed here; "
        r"pip install prune_callbacks\[onnx\]"
    )
    with pytest.raises(ValueError, match=message):
        check_export_settings({"onnx": True, "dynamo": True})
    check_export_settings({"onnx": True, "dynamo": False})  # the TorchScript exporter needs no onnxscript
    check_export_settings({"onnx": False, "dynamo": True})


def test_help_explains_the_export_keys(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_app(["--help"])
    out = capsys.readouterr().out
    assert "export.{onnx,dynamo}" in out and "pruned_model.onnx" in out
