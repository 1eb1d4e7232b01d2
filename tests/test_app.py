"""End-to-end tests of the Hydra app (prune_callbacks.app.train) on tiny settings.

The app runs in-process through its real entry point (``main()`` with ``sys.argv`` set), which is what
``python -m prune_callbacks.train`` and the ``prune-train`` script call; one test also checks the module
entry point in a subprocess.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import run_app
from prune_callbacks.app import train
from prune_callbacks.app.config import APP_PRUNING_KEYS, PruningConfig, callback_node
from prune_callbacks.app.help import pruning_key_help, yaml_summary
from prune_callbacks.app.report import collect, write_report
from prune_callbacks.measure.flops import count_macs_and_params
from prune_callbacks.pruning.history import load_pruned
from prune_callbacks.pruning.settings import PruningSettings
from prune_callbacks.reference.data import DigitsDataModule, TextDataModule
from prune_callbacks.reference.models import DigitsResNet, TinyLlama
from prune_callbacks.reference.tasks import CausalLM, ImageClassifier

# Two tiny epochs, a prune after each, two batches per epoch, a short latency measurement.
TINY = [
    "logger=none",
    "threads=1",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "pruning.start_epoch=0",
    "pruning.end_epoch=1",
    "pruning.verbose=false",
    "latency.batch_sizes=[1,4]",
    "latency.warmup=0",
    "latency.repeats=2",
]
DIGITS_TINY = [*TINY, "model.width=8", "data.batch_size=16"]


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
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def compose_recipe(name: str | None, overrides: list[str] = ()) -> object:
    train.register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(train.conf_dir()), version_base="1.3"):
        extra = [f"recipe={name}"] if name else []
        return compose("config", overrides=[*extra, *overrides])


# ---------------------------------------------------------------------------------------------- config


def test_recipes_are_registered() -> None:
    names = train.register_recipes()
    expected = {p.stem for p in train.recipes_dir().glob("*.yaml")}
    assert set(names) == expected
    assert {"digits", "resnet56_cifar10", "vgg16_cifar10", "vit_cifar10", "llama_stdlib"} <= expected


@pytest.mark.parametrize("recipe", sorted(p.stem for p in train.recipes_dir().glob("*.yaml")))
def test_every_recipe_composes_and_builds(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_app(["--cfg", "job", f"recipe={recipe}"])
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.pruning._target_ == "prune_callbacks.integrations.lightning.callback.StructuredPruning"
    cfg = compose_recipe(recipe)
    assert OmegaConf.to_container(printed) == OmegaConf.to_container(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)
    settings = train.pruning_settings(cfg.pruning)  # the one rulebook accepts every recipe
    epochs = train.check_schedule_fits(settings, cfg.trainer.max_epochs)
    assert epochs[-1] < cfg.trainer.max_epochs
    # --cfg job shows every setting passed to the callback and the app's own keys (dry_run), nothing else.
    assert set(printed.pruning) == {*PruningSettings().as_dict(), "_target_", "_convert_", *APP_PRUNING_KEYS}
    # The recipe's comment says what it reproduces and what to expect.
    text = (train.recipes_dir() / f"{recipe}.yaml").read_text()
    assert "Reproduces" in text and "Expect" in text


GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in train.conf_dir().iterdir()
    if group.is_dir()
    for option in group.glob("*.yaml")
)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if option in ("tiny_llama", "language_model"):
        overrides += ["data=stdlib_text"]
    cfg = compose_recipe(None, overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if group == "pruning":
        callback = instantiate(callback_node(cfg.pruning))  # without the app's own keys (dry_run)
        settings = train.pruning_settings(cfg.pruning)
        assert callback.importance is not None and callback.prune_epochs == train.check_schedule_fits(
            settings, cfg.trainer.max_epochs
        )
        assert OmegaConf.get_type(cfg.pruning) is PruningConfig  # the schema types every option
    elif group == "logger":
        logger = resolved.get("logger")
        assert not logger if option == "none" else logger["_target_"].startswith("lightning.pytorch.loggers.")
    else:
        assert resolved[group]["_target_"]


def test_digits_recipe_is_the_default() -> None:
    default = OmegaConf.to_container(compose_recipe(None))
    digits = OmegaConf.to_container(compose_recipe("digits"))
    assert default == digits


def test_default_pruning_targets_2x_macs_with_taylor() -> None:
    cfg = compose_recipe(None)
    assert cfg.pruning.importance == "taylor" and cfg.pruning.target_speedup == 2.0
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.offline is True
    settings = train.pruning_settings(cfg.pruning)
    assert len(train.check_schedule_fits(settings, cfg.trainer.max_epochs)) > 1  # iterative


def test_ratio_option_replaces_the_speedup() -> None:
    cfg = compose_recipe(None, ["pruning=taylor_ratio", "pruning.pruning_ratio=0.3"])
    assert cfg.pruning.pruning_ratio == 0.3 and cfg.pruning.target_speedup is None
    assert cfg.pruning.importance == "taylor"
    default = compose_recipe(None).pruning
    assert (cfg.pruning.start_epoch, cfg.pruning.end_epoch) == (default.start_epoch, default.end_epoch)
    # 0 is a valid ratio: the dense point of a sweep.
    zero_cfg = compose_recipe(None, ["pruning=taylor_ratio", "pruning.pruning_ratio=0"])
    zero = train.pruning_settings(zero_cfg.pruning)
    assert zero.pruning_ratio == 0.0 and zero.target_speedup is None


def test_schema_types_the_pruning_group() -> None:
    with pytest.raises(ConfigCompositionException, match="pruning_ratio"):
        compose_recipe(None, ["pruning.pruning_ratio=half"])
    with pytest.raises(ConfigCompositionException, match="pruning_rato"):
        compose_recipe(None, ["pruning.pruning_rato=0.5"])
    cfg = compose_recipe(None, ["pruning.global_pruning=true", "pruning.round_to=8"])
    assert cfg.pruning.global_pruning is True and cfg.pruning.round_to == 8


def test_help_lists_groups_options_and_keys(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_app(["--help"])
    assert not exc.value.code
    out = capsys.readouterr().out
    for group, option in GROUP_OPTIONS:
        assert f"{group}: " in out
        path = train.conf_dir() / group / f"{option}.yaml"
        assert f"  {option}" in out and yaml_summary(path).split()[0] in out
    for recipe in train.recipes_dir().glob("*.yaml"):
        assert f"  {recipe.stem}" in out
    assert "digits_resnet *" in out and "taylor *" in out  # the defaults are marked
    described = " ".join(keys for keys, _ in pruning_key_help())
    keys_section = out.split("== Pruning keys")[1].split("== Other keys")[0]
    for name in PruningSettings().as_dict():  # every setting is explained (epochs' entry names the range)
        assert name in described or name in keys_section
    assert "fraction of every group's channels removed" in out
    assert "pruning=taylor_ratio" in out and "latency.{batch_sizes,warmup,repeats,threads}" in out


# ---------------------------------------------------------------------------------------------- lit modules


def _validate(module: pl.LightningModule, dm: pl.LightningDataModule) -> dict[str, float]:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )
    return trainer.validate(module, datamodule=dm, verbose=False)[0]


def test_image_classifier_metrics_match_a_hand_computation() -> None:
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32)
    module = ImageClassifier(DigitsResNet(width=4), num_classes=10, input_shape=(1, 8, 8))
    assert module.example_input_array.shape == (1, 1, 8, 8)
    metrics = _validate(module, dm)
    x, y = dm.val_set.tensors[0][:64], dm.val_set.tensors[1][:64]
    with torch.no_grad():
        logits = module.eval()(x)
    assert metrics["val/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_causal_lm_perplexity_is_exp_loss() -> None:
    torch.manual_seed(0)
    dm = TextDataModule(seq_len=16, batch_size=4, max_chars=4000)
    model = TinyLlama(vocab_size=256, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    module = CausalLM(model, vocab_size=256, seq_len=16)
    assert module.example_input_array.shape == (1, 16) and module.example_input_array.dtype == torch.long
    metrics = _validate(module, dm)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    assert 0.0 <= metrics["val/acc"] <= 1.0


# ---------------------------------------------------------------------------------------------- bad config


RATIO_BOUNDS_ERROR = (
    "error: pruning.pruning_ratio=1.5: must be in [0, 1) (the fraction of every group's channels to remove); "
    "e.g. pruning.pruning_ratio=0.5"
)


def test_bad_ratio_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*DIGITS_TINY, "pruning=taylor_ratio", "pruning.pruning_ratio=1.5", f"output_dir={tmp_path}"]
    assert app_error(args, capsys) == RATIO_BOUNDS_ERROR
    assert not (tmp_path / "results.json").exists()


def test_ratio_with_the_default_speedup_says_how_to_switch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = app_error([*DIGITS_TINY, "pruning.pruning_ratio=0.5", f"output_dir={tmp_path}"], capsys)
    assert line.startswith(
        "error: pruning.target_speedup=2.0: is set together with pruning.pruning_ratio=0.5; "
        "they are alternatives; "
    )
    assert "pruning.target_speedup=null" in line and "pruning=taylor_ratio" in line
    assert "pruning.pruning_ratio=null" in line
    assert not (tmp_path / "results.json").exists()


def test_settings_errors_come_from_the_one_rulebook(capsys: pytest.CaptureFixture[str]) -> None:
    line = app_error([*DIGITS_TINY, "pruning.schedule=fast"], capsys)
    with pytest.raises(ValueError) as info:
        PruningSettings.from_mapping({"schedule": "fast"}, prefix="pruning.")
    assert line == f"error: {info.value}"


def test_unknown_importance_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = app_error([*DIGITS_TINY, "pruning.importance=taylr"], capsys)
    assert line.startswith("error: pruning.importance=taylr: unknown importance")
    assert "pruning.importance=taylor" in line


def test_unknown_layer_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = app_error([*DIGITS_TINY, "pruning.ignored_layers=[fcc]", f"output_dir={tmp_path}"], capsys)
    assert line.startswith("error: pruning.ignored_layers=fcc:")
    assert "model.fc" in line  # the close match
    assert not (tmp_path / "results.json").exists()


def test_missing_dataset_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    line = app_error(["recipe=resnet56_cifar10", *TINY, f"data.data_dir={missing}"], capsys)
    assert line.startswith(f"error: data.data_dir={missing}: CIFAR-10 not found")
    assert str(missing / "cifar-10-batches-py") in line


def test_schedule_past_max_epochs_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = app_error([*DIGITS_TINY, "pruning.end_epoch=5"], capsys)
    assert line.startswith("error: trainer.max_epochs=2:") and "trainer.max_epochs>=6 " in line


# ---------------------------------------------------------------------------------------------- runs


def test_single_run_writes_consistent_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The default logger (W&B, offline) on tiny settings.
    run_app([a for a in DIGITS_TINY if not a.startswith("logger=")] + [f"output_dir={tmp_path}"])
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    for row in ("accuracy (val/acc)", "MACs", "parameters", "CPU latency, batch 1", "CPU latency, batch 4"):
        assert row in out
    assert "DigitsResNet on DigitsDataModule: dense vs pruned" in out and "results: " in out
    # Progress and results go through logging: Hydra's job log holds them too.
    (job_log,) = tmp_path.glob("outputs/*/*/train.log")
    log_text = job_log.read_text()
    assert "pruning: taylor importance, 2.00x fewer MACs" in log_text
    assert "dense vs pruned" in log_text and "CPU latency, batch 4" in log_text

    example = torch.zeros(1, 1, 8, 8)
    dense_macs, dense_params = count_macs_and_params(DigitsResNet(width=8), example)
    assert (results["dense"]["macs"], results["dense"]["params"]) == (dense_macs, dense_params)

    # The saved pruned network rebuilds on a fresh model and has exactly the reported cost.
    pruned = load_pruned(DigitsResNet(width=8), tmp_path / results["pruned_model"])
    macs, params = count_macs_and_params(pruned, example)
    assert (results["pruned"]["macs"], results["pruned"]["params"]) == (macs, params)
    assert results["speedup"]["macs"] == pytest.approx(dense_macs / macs)
    assert results["speedup"]["macs"] >= 2.0 * 0.97  # the default target, within the pruner's tolerance

    # Per-group widths match the rebuilt model's layers.
    assert results["widths"]
    for w in results["widths"]:
        layer = pruned.get_submodule(w["group"].removeprefix("model."))
        assert w["pruned"] == layer.out_channels and w["dense"] >= w["pruned"]
    assert any(w["pruned"] < w["dense"] for w in results["widths"])

    assert 0.0 <= results["dense"]["accuracy"] <= 1.0 and 0.0 <= results["pruned"]["accuracy"] <= 1.0
    assert results["dense"]["accuracy"] == results["dense"]["metrics"]["val/acc"]
    assert set(results["speedup"]["latency"]) == {"1", "4"}
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    assert results["steps"][-1]["macs"] == macs

    # W&B offline run: the resolved Hydra config is the run config and a file of the run.
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    resolved = (tmp_path / "config_resolved.yaml").read_text()
    assert OmegaConf.create(resolved).pruning.target_speedup == 2.0
    assert (run_dir / "files" / "config_resolved.yaml").read_text() == resolved
    (log_file,) = run_dir.glob("*.wandb")
    data = log_file.read_bytes()
    assert b"prune_callbacks.integrations.lightning.callback.StructuredPruning" in data
    assert b"final/macs_speedup" in data


def test_multirun_two_points_and_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    ratios = ["pruning=taylor_ratio", "pruning.pruning_ratio=0.25,0.6"]
    run_app(["-m", *ratios, f"hydra.sweep.dir={sweep}", *DIGITS_TINY])
    rows = collect(sweep)
    assert len(rows) == 2
    by_ratio = {r["pruning"]["pruning_ratio"]: r for r in rows}
    assert set(by_ratio) == {0.25, 0.6}
    assert all(r["pruning"]["target_speedup"] is None for r in rows)  # taylor_ratio: no speedup target
    low, high = by_ratio[0.25], by_ratio[0.6]
    macs = [high["pruned"]["macs"], low["pruned"]["macs"], low["dense"]["macs"]]
    assert macs == sorted(set(macs))  # more pruning, fewer MACs

    md, png = write_report(sweep)
    text = md.read_text()
    assert "pruning.pruning_ratio=0.25" in text and "pruning.pruning_ratio=0.6" in text
    for r in rows:
        assert f"{r['pruned']['macs'] / 1e6:.3f}" in text
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def _write_fake_cifar(folder: Path, per_batch: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": rng.integers(0, 10, size=per_batch).tolist()}, f)


ONE_STEP = [
    "logger=none",
    "threads=1",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "pruning.epochs=[0]",
    "pruning.verbose=false",
    "latency.batch_sizes=[1]",
    "latency.warmup=0",
    "latency.repeats=1",
    "save_pruned_model=false",
]
RECIPE_STEP = {
    "digits": ["data.batch_size=8"],
    "own_model": ["data.batch_size=8"],
    "llama_stdlib": [
        "model.dim=32",
        "model.n_layers=1",
        "model.ffn_dim=64",
        "data.seq_len=16",
        "data.max_chars=4000",
        "data.batch_size=4",
    ],
    "resnet56_cifar10": ["data.batch_size=4", "data.num_workers=0"],
    "vgg16_cifar10": ["data.batch_size=4", "data.num_workers=0", "model.width_mult=0.25"],
    "vit_cifar10": ["data.batch_size=4", "data.num_workers=0", "model.dim=48", "model.depth=2"],
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_STEP))
def test_recipe_runs_one_step(recipe: str, tmp_path: Path) -> None:
    extra = list(RECIPE_STEP[recipe])
    if "cifar10" in recipe:
        _write_fake_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
        extra.append(f"data.data_dir={tmp_path / 'cifar'}")
    run_app([f"recipe={recipe}", *ONE_STEP, *extra, f"output_dir={tmp_path / 'out'}"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["pruned"]["macs"] < results["dense"]["macs"]
    assert results["pruned"]["params"] < results["dense"]["params"]
    assert [s["step"] for s in results["steps"]] == [0, 1]
    if recipe == "vit_cifar10":  # head pruning: half of the heads of every block are gone
        heads = [w for w in results["widths"] if w["group"].endswith("attn.q")]
        assert len(heads) == 2 and all(w["pruned"] == w["dense"] // 2 for w in heads)


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning: about 10 s
def test_module_entry_point_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prune_callbacks.train", *DIGITS_TINY, "pruning=taylor_ratio"]
        + ["pruning.pruning_ratio=1.5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == RATIO_BOUNDS_ERROR
