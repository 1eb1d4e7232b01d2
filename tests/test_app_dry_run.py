"""``pruning.dry_run=true``: the app previews the pruning steps and stops, training and pruning nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_app
from prune_callbacks.app.config import APP_PRUNING_KEYS, callback_node
from prune_callbacks.pruning.pruner import Pruner
from prune_callbacks.reference.models import DigitsResNet

TINY = ["logger=none", "threads=1", "model.width=8", "data.batch_size=16"]


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)




def _preview(tmp_path: Path) -> dict:
    (path,) = tmp_path.glob("outputs/*/*/preview.json")
    assert not list(tmp_path.glob("outputs/*/*/results.json")), "a dry run must not train"
    return json.loads(path.read_text())


def test_dry_run_previews_every_step_of_a_magnitude_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_app([*TINY, "pruning.dry_run=true", "pruning.importance=magnitude"])
    data = _preview(tmp_path)
    preview = data["preview"]
    steps = preview["steps"]
    assert len(steps) == 5  # the default schedule: a prune after epochs 6..10
    macs = [preview["macs"], *(s["macs"] for s in steps)]
    assert all(a > b for a, b in zip(macs, macs[1:])), macs
    assert preview["macs"] / steps[-1]["macs"] == pytest.approx(2.0, rel=0.03)  # target_speedup: 2.0
    assert all(change["removed"] for s in steps for change in s["changes"])
    text = capsys.readouterr().out  # the app's messages go through logging to Hydra's console handler
    assert "dry run on the initial weights" in text and "preview.json" in text


def test_dry_run_is_deterministic_and_names_the_network_layers(tmp_path: Path) -> None:
    """The same seed previews the same channels; every root is a layer of the task's network."""
    run_app([*TINY, "pruning.dry_run=true", "pruning.importance=magnitude", "seed=3"])
    run_app([*TINY, "pruning.dry_run=true", "pruning.importance=magnitude", "seed=3"])
    paths = sorted(tmp_path.glob("outputs/*/*/preview.json"))
    assert len(paths) == 2
    first, again = (json.loads(p.read_text())["preview"] for p in paths)
    assert first["steps"] == again["steps"]
    layers = {name for name, _ in DigitsResNet(width=8).named_modules()}
    roots = {c["root"] for s in first["steps"] for c in s["changes"]}
    assert roots and all(r.startswith("model.") and r[len("model.") :] in layers for r in roots), roots


def test_dry_run_with_taylor_feeds_batches_and_previews_one_step(tmp_path: Path) -> None:
    run_app([*TINY, "pruning.dry_run=true"])
    preview = _preview(tmp_path)["preview"]
    assert len(preview["steps"]) == 1
    assert "gradients" in preview["stopped"]


def test_dry_run_is_an_app_key_not_a_pruning_setting() -> None:
    node = {"_target_": "x", "importance": "l2", "dry_run": True}
    assert "dry_run" in APP_PRUNING_KEYS
    assert callback_node(node) == {"_target_": "x", "importance": "l2"}
    with pytest.raises(TypeError):
        Pruner(DigitsResNet(width=8), torch.randn(1, 1, 8, 8), dry_run=True)  # type: ignore[call-arg]


def test_help_describes_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_app(["--help"])
    out = capsys.readouterr().out
    assert "dry_run" in out and "preview" in out
    # the sweeper and launcher options of conf/hydra are listed with their first sentence
    assert "hydra/sweeper:" in out and "pareto" in out and "Pareto search" in out
    assert "hydra/launcher:" in out and all(name in out for name in ("parallel", "cluster_local", "slurm"))


def test_readme_dry_run_command(tmp_path: Path) -> None:
    """README "Search the trade-off" > "Dry run": the command as written (default model and data)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = "python -m prune_callbacks.train pruning.dry_run=true pruning.importance=magnitude"
    assert command in readme
    run_app(command.split()[3:])
    steps = _preview(tmp_path)["preview"]["steps"]
    assert len(steps) == 5 and steps[-1]["macs"] < steps[0]["macs"]
