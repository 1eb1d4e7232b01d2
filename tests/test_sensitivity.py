"""Issue 18, sensitivity scan: ``sensitivity_scan`` prunes every group alone at a few ratios and puts the
model back bitwise; ``allocate`` meets a MACs target within 3% (checked by a dry run) and its ratios are
taken as they are by the Pruner, the Lightning callback and the app; ``python -m
prune_callbacks.sensitivity`` writes the heatmap, the JSON files and a ``pruning`` option for the app."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra

from helpers import LitNet, cpu_trainer, random_loader
from prune_callbacks import Pruner, StructuredPruning, count_macs_and_params, get_pruning_history
from prune_callbacks.app import sensitivity as app
from prune_callbacks.app import train
from prune_callbacks.pruning.sensitivity import Allocation, SensitivityResult, allocate, sensitivity_scan
from prune_callbacks.reference.models import DigitsResNet

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallCNN(nn.Module):
    """Three convolutions (one residual pair) and a linear head: four groups of 24-48 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 48, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(48)
        self.conv3 = nn.Conv2d(48, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = x + F.relu(self.conv4(x))
        return self.fc(x.mean(dim=(2, 3)))


GEN = torch.Generator().manual_seed(0)
X = torch.randn(32, 3, 8, 8, generator=GEN)
Y = torch.randint(0, 4, (32,), generator=GEN)


def _loss(model: nn.Module) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(X), Y))


def _trained(steps: int = 60) -> SmallCNN:
    """A SmallCNN fitted to the fixed batch, so that pruning it costs loss."""
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    return model


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "ids": [id(p) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "history": json.dumps(get_pruning_history(model)),
    }


def _assert_same(model: nn.Module, before: dict[str, object]) -> None:
    now = _state(model)
    assert now["ids"] == before["ids"] and now["modes"] == before["modes"]
    assert now["history"] == before["history"]
    values = before["values"]
    assert isinstance(values, dict) and list(now["values"]) == list(values)  # type: ignore[arg-type]
    for k, v in values.items():
        assert torch.equal(now["values"][k], v), k  # type: ignore[index]
    for a, b in zip(now["grads"], before["grads"]):  # type: ignore[arg-type]
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.fixture(scope="module")
def scanned() -> tuple[SmallCNN, SensitivityResult]:
    model = _trained()
    model.train()  # batch norm in train mode: the scan must not update its statistics
    return model, sensitivity_scan(model, X[:2], _loss, (0.25, 0.5, 0.75))


# ---------------------------------------------------------------------------------------------- the scan


def test_scan_leaves_the_model_bitwise_equal() -> None:
    model = _trained()
    model.train()
    F.cross_entropy(model(X), Y).backward()  # gradients present: they must survive too
    before = _state(model)
    result = sensitivity_scan(model, X[:2], _loss, (0.3, 0.6))
    _assert_same(model, before)
    assert result.groups == ("conv1", "conv2", "conv3") and result.ratios == (0.3, 0.6)


def test_scan_matrix(scanned: tuple[SmallCNN, SensitivityResult]) -> None:
    model, result = scanned
    dense_macs = count_macs_and_params(model, X[:2])[0]
    assert result.baseline_macs == dense_macs
    model.eval()
    assert result.baseline_metric == pytest.approx(_loss(model), rel=1e-6)
    assert result.channels == (24, 48, 32)
    assert result.removed == ((6, 12, 18), (12, 24, 36), (8, 16, 24))
    for saved in result.macs_saved:
        assert 0 < saved[0] < saved[1] < saved[2] < dense_macs
    # a trained model: removing more of a group never makes the loss much better than dense
    for row in result.metric:
        assert all(v == v for v in row)  # no refusal on this model
        assert row[-1] >= result.baseline_metric - 0.05 * abs(result.baseline_metric)
    damage = result.damage()
    assert damage[0][0] == pytest.approx(result.metric[0][0] - result.baseline_metric)
    assert "conv2" in str(result)


def test_scan_removes_what_the_pruner_removes_with_that_ratio(
    scanned: tuple[SmallCNN, SensitivityResult],
) -> None:
    model, result = scanned
    for i, name in enumerate(result.groups):
        for j, ratio in enumerate(result.ratios):
            twin = copy.deepcopy(model)
            Pruner(twin, X[:2], "magnitude", pruning_ratio=0.0, pruning_ratio_dict={name: ratio}).step()
            assert result.baseline_macs - count_macs_and_params(twin, X[:2])[0] == result.macs_saved[i][j]
            twin.eval()
            assert _loss(twin) == pytest.approx(result.metric[i][j], rel=1e-5, abs=1e-6), (name, ratio)


def test_result_plain_data_and_heatmap(scanned: tuple[SmallCNN, SensitivityResult], tmp_path: Path) -> None:
    _, result = scanned
    text = result.to_json(tmp_path / "scan.json")
    assert SensitivityResult.from_json(tmp_path / "scan.json") == result
    assert SensitivityResult.from_json(text) == result
    data = json.loads(text)
    assert data["groups"] == list(result.groups) and len(data["metric"][0]) == 3
    path = result.heatmap(tmp_path / "scan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_without_matplotlib_names_the_extra(
    scanned: tuple[SmallCNN, SensitivityResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"prune_callbacks\[plot\]"):
        scanned[1].heatmap(tmp_path / "x.png")


def test_scan_checks_ratios_and_skips_ignored_layers() -> None:
    model = _trained(steps=1)
    with pytest.raises(ValueError, match="ratios"):
        sensitivity_scan(model, X[:2], _loss, (0.5, 1.0))
    result = sensitivity_scan(model, X[:2], _loss, (0.5,), ignored_layers=["conv2"])
    assert result.groups == ("conv1", "conv3")
    assert result.settings["ignored_layers"] == ["conv2"]


# ---------------------------------------------------------------------------------------------- allocation


def _check_allocation(model: nn.Module, x: torch.Tensor, alloc: Allocation, target: float) -> None:
    """The allocation meets the target within 3%, and a real Pruner step with it lands where the dry
    run said."""
    goal = alloc.dense_macs / target
    assert alloc.verified and abs(alloc.macs - goal) <= 0.03 * goal
    assert alloc.speedup == pytest.approx(alloc.dense_macs / alloc.macs)
    twin = copy.deepcopy(model)
    Pruner(twin, x, "magnitude", pruning_ratio=0.0, pruning_ratio_dict=alloc).step()
    assert count_macs_and_params(twin, x)[0] == alloc.macs


def test_allocation_meets_2x_on_a_small_cnn(scanned: tuple[SmallCNN, SensitivityResult]) -> None:
    model, result = scanned
    before = _state(model)
    alloc = allocate(result, 2.0, model, X[:2])
    _assert_same(model, before)
    assert set(alloc) == set(result.groups) and all(0.0 <= r <= 0.75 for r in alloc.values())
    _check_allocation(model, X[:2], alloc, 2.0)
    plain = json.loads(alloc.to_json())
    assert plain["pruning_ratio_dict"] == dict(alloc) and plain["speedup"] == pytest.approx(alloc.speedup)


def test_allocation_meets_2x_on_the_digits_model() -> None:
    torch.manual_seed(0)
    model = DigitsResNet(width=16).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    result = sensitivity_scan(model, x[:1], lambda m: F.cross_entropy(m(x), y), (0.25, 0.5, 0.75))
    assert len(result.groups) == 5
    _check_allocation(model, x[:1], allocate(result, 2.0, model, x[:1]), 2.0)


def test_allocation_prefers_the_groups_that_hurt_least() -> None:
    """With equal MAC savings, the group whose pruning costs nothing takes the whole cut."""
    result = SensitivityResult(
        groups=("a", "b"),
        channels=(8, 8),
        ratios=(0.25, 0.5, 0.75),
        metric=((1.0, 1.0, 1.0), (1.5, 2.0, 3.0)),
        macs_saved=((25, 50, 75), (25, 50, 75)),
        removed=((2, 4, 6), (2, 4, 6)),
        baseline_metric=1.0,
        baseline_macs=200,
    )
    alloc = allocate(result, 1.5)  # predicted only: no model to check it on
    assert not alloc.verified and alloc["a"] >= 0.3 and alloc["b"] == 0.0
    assert alloc.macs <= 200 / 1.5 * 1.03
    with pytest.raises(ValueError, match="scan larger ratios"):
        allocate(result, 10.0)


def test_allocation_in_a_structured_pruning_run(tmp_path: Path) -> None:
    """Names relative to the network work on the LightningModule (looked up as suffixes)."""
    lit = LitNet()
    net = lit.model
    x = lit.example_input_array
    result = sensitivity_scan(net, x, lambda m: F.cross_entropy(m(X), Y), (0.25, 0.5, 0.75))
    alloc = allocate(result, 2.0, net, x)
    dense = count_macs_and_params(net, x)[0]
    callback = StructuredPruning(
        "magnitude", pruning_ratio=0.0, pruning_ratio_dict=alloc, start_epoch=0, end_epoch=0, verbose=False
    )
    cpu_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2).fit(lit, random_loader())
    macs = count_macs_and_params(lit.model, x)[0]
    assert abs(macs - dense / 2.0) <= 0.03 * dense / 2.0


# ---------------------------------------------------------------------------------------------- the command

TINY = ["dense_epochs=1", "model.width=8", "data.batch_size=64", "logger=none", "ratios=[0.25,0.5,0.75]"]


def run_command(args: list[str]) -> None:
    """Call the command's entry point as the command line would."""
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["prune_callbacks.sensitivity", *args]
    try:
        app.main()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


def _read(out: Path) -> tuple[SensitivityResult, dict]:
    for name in (app.SCAN_FILE, app.HEATMAP_FILE, app.ALLOCATION_FILE, str(app.PRUNING_OPTION), "dense.ckpt"):
        assert (out / name).is_file(), name
    return SensitivityResult.from_json(out / app.SCAN_FILE), json.loads(
        (out / app.ALLOCATION_FILE).read_text()
    )


def test_command_on_digits_writes_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scan"
    run_command([*TINY, "target_speedup=2", f"out={out}"])
    result, alloc = _read(out)
    assert result.metric_name == "val/loss" and len(result.groups) == 5 and result.ratios == (0.25, 0.5, 0.75)
    assert abs(alloc["speedup"] - 2.0) <= 0.03 * 2.0 and alloc["verified"]
    option = (out / app.PRUNING_OPTION).read_text()
    assert "pruning_ratio_dict:" in option and "target_speedup: null" in option
    # the dense checkpoint it wrote starts the next scan
    again = tmp_path / "again"
    run_command([*TINY, "target_speedup=2", f"ckpt={out / 'dense.ckpt'}", f"out={again}"])
    assert SensitivityResult.from_json(again / app.SCAN_FILE).baseline_metric == pytest.approx(
        result.baseline_metric, rel=1e-5
    )


def test_command_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for args, start in [
        (["ratios=[0.5,1.5]"], "error: ratios=[0.5,1.5]: must be a list of fractions in (0, 1)"),
        (["target_speedup=1"], "error: target_speedup=1: must be a number > 1"),
        (["importance=taylor"], "error: importance=taylor: the scan needs a criterion without gradients"),
        ([f"ckpt={tmp_path / 'nothing.ckpt'}"], "error: ckpt="),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_command([*TINY, *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(start), err[-1]


#: The README's commands ("Search the trade-off" > "Sensitivity scan"), as the shell passes them.
README_SCAN = "model=digits_resnet data=digits ratios=[0.25,0.5,0.75] target_speedup=4 out=scan"
README_TRAIN = "model=digits_resnet data=digits hydra.searchpath=[file://scan] pruning=sensitivity logger=csv"


@pytest.mark.slow  # the README's commands as written: 5 dense epochs and the scan, then the app (24 epochs)
def test_readme_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"python -m prune_callbacks.sensitivity {README_SCAN}\n" in readme
    assert f"python -m prune_callbacks.train {README_TRAIN}\n" in readme
    monkeypatch.chdir(tmp_path)
    run_command(README_SCAN.split())
    _, alloc = _read(tmp_path / "scan")
    assert abs(alloc["speedup"] - 4.0) <= 0.03 * 4.0
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["prune-train", *README_TRAIN.split()]
    try:
        train.main()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    (path,) = tmp_path.glob("outputs/*/*/results.json")
    results = json.loads(path.read_text())
    assert results["pruning"]["pruning_ratio"] == 0.0 and results["pruning"]["target_speedup"] is None
    assert results["speedup"]["macs"] == pytest.approx(alloc["speedup"], rel=1e-6)


def test_readme_python_snippet() -> None:
    """The python block of README.md's "### Sensitivity scan" section, as written."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"^### Sensitivity scan\b.*?```python\n(.*?)```", readme, flags=re.S | re.M)
    assert match, "README.md has no Sensitivity scan section with a python snippet"
    namespace: dict = {"__name__": "readme"}
    exec(compile(match.group(1), "README.md#sensitivity-scan", "exec"), namespace)
    allocation = namespace["allocation"]
    assert abs(allocation.speedup - 2.0) <= 0.03 * 2.0
    assert namespace["callback"].settings.pruning_ratio_dict
