"""The app refuses a model, task or data setting that cannot train, before training (issue "All or
nothing", item 6): model/data/task mismatches (prune_callbacks.app.inputs) and bad data settings
(prune_callbacks.app.config.DATA_SETTINGS), each as one line naming the option.

The app runs in-process through its real entry point, with ``Trainer.fit`` replaced by a function that
fails the test, so "stopped before training" is checked directly; positive cases call the checks.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prune_callbacks.app import train
from prune_callbacks.app.config import DATA_SETTINGS, ConfigError, check_data_settings
from prune_callbacks.app.inputs import (
    DATA_GIVES,
    IMAGES,
    MODEL_TAKES,
    TASK_TAKES,
    Inputs,
    check_inputs,
    fits,
    spec_of,
)
from prune_callbacks.reference.data import DigitsDataModule, TextDataModule

CONF = train.conf_dir()
OPTIONS = {
    group: {p.stem: OmegaConf.load(p) for p in sorted((CONF / group).glob("*.yaml"))}
    for group in ("model", "data", "task")
}


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a temporary directory (Hydra's outputs/ land there) with Trainer.fit forbidden."""
    monkeypatch.chdir(tmp_path)

    def no_fit(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Trainer.fit was called: the check should have stopped the run before training")

    monkeypatch.setattr(pl.Trainer, "fit", no_fit)


def app_error(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the app as the command line would, expecting a configuration error before anything is
    written to ``out``; return the error line (the only line on stderr)."""
    err = run_app_error(args, out, capsys)
    assert not out.exists()  # nothing was built: no output directory, no resolved config, no logs
    return err


def run_app_error(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the app with ``args`` and output directory ``out``, expecting it to exit with the
    app's one-line error (exit code 2, no traceback); return that line."""
    capsys.readouterr()
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["prune-train", "logger=none", f"output_dir={out}", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            train.main()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("error: ")
    return err


def composed(overrides: list[str]) -> DictConfig:
    """The app's config composed with ``overrides`` (Hydra's compose API, no run)."""
    train.register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


# ---------------------------------------------------------------------------------------------- the tables


def test_every_option_declares_its_inputs() -> None:
    """A new option in conf/model, conf/data or conf/task must say what it takes or gives."""
    for group, table in (("model", MODEL_TAKES), ("data", DATA_GIVES), ("task", TASK_TAKES)):
        undeclared = [name for name, node in OPTIONS[group].items() if spec_of(table, node) is None]
        assert not undeclared, f"{group} options missing from the {group} table: {undeclared}"


def _example(gives: Inputs) -> torch.Tensor:
    """A batch of two inputs of the kind and shape the data declares."""
    if gives.kind == IMAGES:
        assert gives.channels is not None and gives.size is not None
        return torch.randn(2, gives.channels, gives.size, gives.size)
    assert gives.seq_len is not None and gives.vocab_size is not None
    return torch.randint(0, gives.vocab_size, (2, gives.seq_len))


def test_the_tables_tell_the_truth(one_thread: None) -> None:
    """Every model option runs a forward on a batch of every data option exactly when the tables say
    they fit (the models at their configured sizes, the data as declared)."""
    torch.manual_seed(0)
    gives = {name: spec_of(DATA_GIVES, node).resolved(node) for name, node in OPTIONS["data"].items()}
    for model_name, node in OPTIONS["model"].items():
        takes = spec_of(MODEL_TAKES, node).resolved(node)
        model = instantiate(node).eval()
        for data_name, given in gives.items():
            expected = fits(takes, given)
            with torch.no_grad():
                try:
                    model(_example(given))
                    ran = True
                except (RuntimeError, ValueError, IndexError):
                    ran = False
            assert ran == expected, (
                f"model={model_name} data={data_name}: tables say {expected}, forward {ran}"
            )


def test_data_declarations_match_real_batches() -> None:
    """The declared shapes are those of the data modules' own batches (and defaults)."""
    digits = DigitsDataModule(batch_size=4)
    digits.setup()
    x, _ = next(iter(digits.train_dataloader()))
    declared = DATA_GIVES[DigitsDataModule]
    assert tuple(x.shape[1:]) == (declared.channels, declared.size, declared.size)
    text = TextDataModule(seq_len=16, batch_size=2, max_chars=4000)
    text.setup()
    ids, _ = next(iter(text.train_dataloader()))
    spec = DATA_GIVES[TextDataModule]
    assert ids.dtype == torch.long and ids.shape[1] == spec.resolved({"seq_len": 16}).seq_len == 16
    assert int(ids.max()) < spec.vocab_size
    assert spec.seq_len == inspect.signature(TextDataModule).parameters["seq_len"].default


def test_every_data_key_has_a_rule() -> None:
    """Every key of every shipped data config is validated before the data module is built."""
    for name, node in OPTIONS["data"].items():
        keys = {str(k) for k in node if not str(k).startswith("_")}
        assert keys <= set(DATA_SETTINGS), f"data={name}: no rule for {keys - set(DATA_SETTINGS)}"


# ---------------------------------------------------------------------------------------------- fits


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["recipe=llama_stdlib"],
        ["recipe=own_model"],
        ["recipe=vit_cifar10"],
        ["recipe=vgg16_cifar10"],
        ["recipe=resnet56_cifar10"],
        ["model=tiny_vit", "data=digits", "model.in_chans=1", "model.image_size=8"],
        ["recipe=llama_stdlib", "data.seq_len=256"],
    ],
    ids=lambda o: " ".join(o) or "default",
)
def test_compatible_configs_pass(overrides: list[str]) -> None:
    cfg = composed(overrides)
    check_data_settings(cfg.data)
    check_inputs(cfg)


def test_overrides_count_and_say_how_to_fix() -> None:
    cfg = composed(["recipe=llama_stdlib", "data.seq_len=512"])
    with pytest.raises(ConfigError) as info:
        check_inputs(cfg)
    assert str(info.value) == (
        "model=tiny_llama: takes token ids (vocabulary 256, up to 256 per sequence), but data=stdlib_text "
        "gives token ids (vocabulary 256, windows of 512); set model.max_seq_len=512, or set data.seq_len=256"
    )
    cfg = composed(["model=tiny_vit"])
    with pytest.raises(ConfigError, match="set model.in_chans=1 model.image_size=8, or use data=cifar10"):
        check_inputs(cfg)


def test_options_are_named_by_hydra_choices_when_given() -> None:
    cfg = composed(["model=tiny_llama"])
    with pytest.raises(ConfigError) as info:
        check_inputs(cfg, {"model": "my_llama", "data": "my_digits", "task": "classification"})
    assert str(info.value).startswith("model=my_llama: takes token ids")
    assert "but data=my_digits gives 1x8x8 images" in str(info.value)


def test_unknown_targets_are_not_checked() -> None:
    """Your own model or data module is in no table: the check cannot speak for it and stays quiet."""
    cfg = composed(["data=stdlib_text", "model._target_=torch.nn.Identity", "task=language_model"])
    check_inputs(cfg)
    cfg = composed(["model=tiny_llama", "data._target_=builtins.dict"])
    check_inputs(cfg)


# ---------------------------------------------------------------------------------------------- the app


MISMATCH = (
    "error: model=tiny_llama: takes token ids (vocabulary 256, up to 256 per sequence), but data=digits "
    "gives 1x8x8 images; use data=stdlib_text task=language_model with this model, or use "
    "model=digits_resnet with this data"
)


def test_llama_on_digits_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert app_error(["model=tiny_llama", "data=digits"], tmp_path / "out", capsys) == MISMATCH


@pytest.mark.parametrize(
    ("args", "start", "names"),
    [
        (["data=stdlib_text"], "error: model=digits_resnet: takes 1-channel images", "model=tiny_llama"),
        (
            ["model=vgg_cifar"],
            "error: model=vgg_cifar: takes 3-channel images of at least 32x32",
            "data=cifar10",
        ),
        (
            ["model=tiny_llama", "data=stdlib_text"],
            "error: task=classification: trains an image classifier",
            "use task=language_model with this data",
        ),
        (
            ["task=language_model"],
            "error: task=language_model: ",
            "task=classification (or classification_adamw)",
        ),
        (
            ["recipe=llama_stdlib", "data=cifar10"],
            "error: model=tiny_llama: takes token ids",
            "data=cifar10 gives 3x32x32 images",
        ),
    ],
    ids=[
        "text-for-digits-resnet",
        "vgg-on-digits",
        "classifier-on-text",
        "lm-on-digits",
        "llama-recipe-on-cifar",
    ],
)
def test_mismatches_are_one_line(
    args: list[str], start: str, names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = app_error(args, tmp_path / "out", capsys)
    assert line.startswith(start) and names in line


BAD_DATA = [
    (["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    (["data.batch_size=abc"], "data.batch_size=abc: must be an integer >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1: must be an integer >= 0"),
    (["data.val_fraction=0"], "data.val_fraction=0: must be a number in (0, 1)"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5: must be a number in (0, 1)"),
    (["recipe=llama_stdlib", "data.seq_len=0"], "data.seq_len=0: must be an integer >= 1"),
    (["recipe=llama_stdlib", "data.max_chars=0"], "data.max_chars=0: must be an integer >= 1"),
    (
        ["recipe=llama_stdlib", "data.max_chars=200"],
        "data.max_chars=200: too little text for data.seq_len=128",
    ),
    (["recipe=llama_stdlib", "data.val_fraction=1"], "data.val_fraction=1: must be a number in (0, 1)"),
    (["recipe=resnet56_cifar10", "data.augment=maybe"], "data.augment=maybe: must be true or false"),
    (["recipe=resnet56_cifar10", "data.num_workers=-2"], "data.num_workers=-2: must be an integer >= 0"),
    (["recipe=resnet56_cifar10", "data.data_dir=''"], "data.data_dir=: must be a non-empty path"),
    (["seed=-1"], "seed=-1: must be an integer in [0, 4294967295]"),
]


@pytest.mark.parametrize(("args", "start"), BAD_DATA, ids=[" ".join(a) for a, _ in BAD_DATA])
def test_bad_data_setting_is_one_line(
    args: list[str], start: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = app_error(args, tmp_path / "out", capsys)
    key = start.split("=", 1)[0]
    assert line.startswith(f"error: {start}")
    assert f"; e.g. {key}=" in line or f"; set {key}>=" in line  # the fix names the key again


def test_a_split_the_data_module_refuses_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value inside the rule's range that the data module still refuses when it loads (2 validation
    images for 10 classes) stops the run in one line too, before training."""
    err = run_app_error(["data.val_fraction=0.001"], tmp_path / "out", capsys)
    assert err.startswith("error: data: DigitsDataModule could not load its data: The test_size = 2 should")
    assert not (tmp_path / "out" / "config_resolved.yaml").exists()
