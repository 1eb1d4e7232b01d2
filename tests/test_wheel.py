"""The app ships in the wheel: build a wheel of the working tree, install it apart, run the app from it.

The wheel is built from a copy of the working tree (tracked files and untracked, non-ignored ones, as
``git ls-files`` lists them), so what is tested is what would be committed. It is installed with
``pip install --no-deps --target <tmp>/site`` and every command runs from another directory with
``PYTHONPATH=<tmp>/site``, so the installed copy, not the editable source, is imported (checked).
Dependencies (torch, Lightning, Hydra...) come from the test environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = Path("prune_callbacks") / "app"
SKIPPED_PARTS = {".git", ".mypy_cache", ".pytest_cache", ".ruff_cache", "__pycache__"}

# Two tiny epochs with a prune after each (as test_app's DIGITS_TINY).
DIGITS_TINY = [
    "logger=none",
    "threads=1",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "pruning.start_epoch=0",
    "pruning.end_epoch=1",
    "pruning.verbose=false",
    "latency.batch_sizes=[1]",
    "latency.warmup=0",
    "latency.repeats=2",
    "model.width=8",
    "data.batch_size=16",
]

# Composes every recipe shipped in the installed copy with --cfg job, each as
# `python -m prune_callbacks.train recipe=NAME --cfg job` would (runpy, sys.argv set), in one
# interpreter so that torch and Lightning are imported once; prints {recipe: printed config}.
CFG_JOB_OF_EVERY_RECIPE = """
import contextlib, io, json, runpy, sys
from hydra.core.global_hydra import GlobalHydra
from prune_callbacks.app.train import recipes_dir
printed = {}
for path in sorted(recipes_dir().glob("*.yaml")):
    sys.argv = ["prune_callbacks.train", f"recipe={path.stem}", "--cfg", "job"]
    GlobalHydra.instance().clear()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_module("prune_callbacks.train", run_name="__main__", alter_sys=True)
    printed[path.stem] = out.getvalue()
print(json.dumps(printed))
"""


def _working_tree_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the repository that exist (caches left out)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [
        name
        for name in listed.split("\0")
        if name and (ROOT / name).is_file() and not SKIPPED_PARTS.intersection(Path(name).parts)
    ]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the wheel of the working tree and install it into ``<tmp>/site``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout of the repository")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in _working_tree_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    dist, site = tmp / "dist", tmp / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)], tmp, env)
    (wheel,) = dist.glob("prune_callbacks-*.whl")
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], tmp, env)
    run_dir = tmp / "elsewhere"
    run_dir.mkdir()
    return {"source": source / "src", "site": site, "run_dir": run_dir}


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}


def _app_files(root: Path) -> set[str]:
    """The app's config and recipe files below ``root`` (a source tree or an installed copy)."""
    app = root / APP
    return {str(p.relative_to(root)) for p in app.rglob("*") if p.suffix in (".yaml", ".md")}


@pytest.mark.slow  # builds a wheel and starts four Python processes that import torch and Lightning
def test_wheel_ships_and_runs_the_app(installed: dict[str, Path]) -> None:
    site, run_dir = installed["site"], installed["run_dir"]
    env = _env(site)

    # Every config group option, recipe and the recipes README is package data of the wheel.
    shipped = _app_files(site)
    assert shipped == _app_files(installed["source"])
    assert str(APP / "conf" / "config.yaml") in shipped and str(APP / "recipes" / "README.md") in shipped

    # The installed copy is the one imported.
    python = [sys.executable]
    where = _run([*python, "-c", "import prune_callbacks; print(prune_callbacks.__file__)"], run_dir, env)
    assert Path(where.stdout.strip()).resolve().is_relative_to(site.resolve())

    # A short run of the main job, from a directory outside the repository.
    out = run_dir / "job"
    proc = _run([*python, "-m", "prune_callbacks.train", *DIGITS_TINY, f"output_dir={out}"], run_dir, env)
    results = json.loads((out / "results.json").read_text())
    assert results["pruned"]["macs"] < results["dense"]["macs"]
    assert "DigitsResNet on DigitsDataModule: dense vs pruned" in proc.stdout
    assert "CPU latency, batch 1" in proc.stdout
    (job_log,) = run_dir.glob("outputs/*/*/train.log")
    assert "dense vs pruned" in job_log.read_text()

    # --cfg job of every recipe the installed copy ships.
    proc = _run([*python, "-c", CFG_JOB_OF_EVERY_RECIPE], run_dir, env)
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    recipes = {p.stem for p in (installed["source"] / APP / "recipes").glob("*.yaml")}
    assert set(printed) == recipes and "resnet56_cifar10" in recipes
    for name, text in printed.items():
        assert "_target_: prune_callbacks.integrations.lightning.callback.StructuredPruning" in text, name

    # The sweep report on the short run's output.
    proc = _run([*python, "-m", "prune_callbacks.report", str(out)], run_dir, env)
    assert (out / "report.md").is_file() and (out / "accuracy_vs_macs.png").is_file()
    assert "| job" in proc.stdout

    # The console script's help: groups with their options and what the pruning keys mean.
    (script,) = (site / "bin").glob("prune-train*")
    proc = _run([str(script), "--help"], run_dir, env)
    for line in ("pruning: ", "  taylor_ratio", "recipe: ", "  resnet56_cifar10", "  pruning_ratio"):
        assert line in proc.stdout, line
    assert "fraction of every group's channels removed" in proc.stdout
