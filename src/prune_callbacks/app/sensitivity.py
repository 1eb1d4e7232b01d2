"""``python -m prune_callbacks.sensitivity``: a sensitivity scan of one of the app's models, and the
per-group ratios that meet a MACs target with the least predicted damage.

A Hydra app over the training app's ``conf/`` (primary config ``conf/sensitivity.yaml``: the
``model``, ``data``, ``task`` and ``trainer`` groups of ``config.yaml`` plus the scan's keys). It

1. builds the data module and the task module as the training app does, loads the dense weights
   from ``ckpt`` or, without one, trains the dense model for ``dense_epochs`` (a sensitivity scan
   of an untrained model says nothing) and saves ``dense.ckpt`` for the next scan;
2. runs :func:`~prune_callbacks.pruning.sensitivity.sensitivity_scan` on the network (names
   relative to it, e.g. ``layers.1.0.conv1``), measuring the validation ``scan_metric`` with
   ``Trainer.validate`` on the CPU;
3. runs :func:`~prune_callbacks.pruning.sensitivity.allocate` for ``target_speedup`` (checked by a
   dry run of the Pruner);
4. writes ``sensitivity.json``, ``sensitivity.png``, ``allocation.json`` and
   ``pruning/sensitivity.yaml`` (a ``pruning`` option with the allocation as
   ``pruning_ratio_dict``, ``pruning_ratio: 0`` and no ``target_speedup``) into ``out``, and logs
   the training command that uses it (``hydra.searchpath=[file://<out>] pruning=sensitivity``).

A configuration mistake is one line on stderr and exit status 2, as in the training app.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ..pruning.sensitivity import Allocation, SensitivityResult, allocate, sensitivity_scan
from .config import SEED, ConfigError, check_data_settings, check_layer_names, check_setting, error
from .inputs import check_inputs
from .train import build_config_node, conf_dir, hydra_choices, quiet_lightning, register_configs

__all__ = ["ALLOCATION_FILE", "HEATMAP_FILE", "PRUNING_OPTION", "SCAN_FILE", "main", "run"]

log = logging.getLogger(__name__)

SCAN_FILE = "sensitivity.json"
HEATMAP_FILE = "sensitivity.png"
ALLOCATION_FILE = "allocation.json"
#: The ``pruning`` option written next to the results (``pruning=sensitivity`` with the search path).
PRUNING_OPTION = Path("pruning") / "sensitivity.yaml"
DENSE_FILE = "dense.ckpt"
#: Criteria that need no gradients (the scan has none to give).
_NO_GRADIENTS = ("magnitude", "l1", "l2", "lamp", "bn_scale", "random")


# ---------------------------------------------------------------------------------------------- checks


def _check(cfg: DictConfig) -> None:
    """The scan's own keys, before anything is built (one-line ConfigErrors)."""
    ratios = cfg.get("ratios")
    if (
        (not isinstance(ratios, (list, tuple)) and not OmegaConf.is_list(ratios))
        or not ratios
        or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1 for r in ratios)
    ):
        raise error(
            "ratios", _plain(ratios), "must be a list of fractions in (0, 1)", "e.g. ratios=[0.25,0.5,0.75]"
        )
    speedup = cfg.get("target_speedup")
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or speedup <= 1:
        raise error(
            "target_speedup",
            speedup,
            "must be a number > 1 (dense MACs / pruned MACs)",
            "e.g. target_speedup=2",
        )
    tolerance = cfg.get("tolerance")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise error("tolerance", tolerance, "must be a fraction in (0, 1)", "e.g. tolerance=0.03")
    if cfg.get("importance") not in _NO_GRADIENTS:
        raise error(
            "importance",
            cfg.get("importance"),
            "the scan needs a criterion without gradients",
            f"use one of {', '.join(_NO_GRADIENTS)}",
        )
    epochs = cfg.get("dense_epochs")
    if cfg.get("ckpt") is None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise error("dense_epochs", epochs, "must be a positive integer without ckpt", "e.g. dense_epochs=5")
    ckpt = cfg.get("ckpt")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise error(
            "ckpt", ckpt, "no such file", "pass the dense model's checkpoint, or ckpt=null to train one"
        )
    check_setting("seed", cfg.get("seed"), SEED)
    check_data_settings(cfg.get("data"))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


# ---------------------------------------------------------------------------------------------- building


def _data(cfg: DictConfig) -> Any:
    dm = build_config_node(cfg.data, "data")
    try:
        if hasattr(dm, "prepare_data"):
            dm.prepare_data()
        if hasattr(dm, "setup"):
            dm.setup("fit")
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"data: {type(dm).__name__} could not load its data: {' '.join(str(exc).split())}"
        ) from None
    return dm


def _module(cfg: DictConfig, dm: Any) -> pl.LightningModule:
    """The task module wrapping the network (task keys left null taken from the data module), with
    a real batch of one as ``example_input_array`` when the data module offers one."""
    net = build_config_node(cfg.model, "model")
    if isinstance(net, pl.LightningModule):
        return net
    filled = {
        str(k): getattr(dm, str(k))
        for k, v in cfg.task.items()
        if v is None and not str(k).startswith("_") and hasattr(dm, str(k))
    }
    lit = build_config_node(cfg.task, "task", model=net, **filled)
    if hasattr(dm, "example_batch"):
        lit.example_input_array = dm.example_batch(1)
    return lit


def _network(lit: pl.LightningModule) -> torch.nn.Module:
    """The network a task module wraps (its ``model`` attribute), or the module itself."""
    net = getattr(lit, "model", None)
    return net if isinstance(net, torch.nn.Module) else lit


def _dense_weights(cfg: DictConfig, lit: pl.LightningModule, dm: Any, out: Path) -> str:
    """Load ``ckpt`` into ``lit``, or train it for ``dense_epochs`` and save ``dense.ckpt``; say which."""
    net = _network(lit)
    if cfg.get("ckpt") is not None:
        path = Path(str(cfg.ckpt))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user mistake
            raise error(
                "ckpt",
                str(path),
                f"cannot be read as a checkpoint ({type(exc).__name__})",
                "pass a .ckpt or state_dict file",
            ) from None
        state = state.get("state_dict", state) if isinstance(state, Mapping) else state
        for target in (lit, net):
            try:
                target.load_state_dict(state)
                return f"weights from {path}"
            except (RuntimeError, TypeError, AttributeError):
                continue
        raise error(
            "ckpt",
            str(path),
            "its weights do not fit the dense model (another model, or a pruned one?)",
            "pass a checkpoint of the dense model selected by model=",
        )
    trainer = build_config_node(
        cfg.trainer,
        "trainer",
        max_epochs=int(cfg.dense_epochs),
        callbacks=[],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    start = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    trainer.save_checkpoint(str(out / DENSE_FILE))
    seconds = time.perf_counter() - start
    return f"trained dense for {cfg.dense_epochs} epochs ({seconds:.0f} s), saved {out / DENSE_FILE}"


def _evaluator(cfg: DictConfig, lit: pl.LightningModule, dm: Any, out: Path) -> Any:
    """``evaluate(network) -> float``: ``scan_metric`` from ``Trainer.validate`` of the task module."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=cfg.trainer.get("limit_val_batches"),
        default_root_dir=str(out),
    )
    key = str(cfg.scan_metric)

    def evaluate(_network: torch.nn.Module) -> float:
        metrics = trainer.validate(lit, datamodule=dm, verbose=False)
        values = metrics[0] if metrics else {}
        if key not in values:
            raise error(
                "scan_metric",
                key,
                f"is not logged by the task (it logs {sorted(values)})",
                "e.g. scan_metric=val/loss",
            )
        return float(values[key])

    return evaluate


# ---------------------------------------------------------------------------------------------- output


def _out_dir(cfg: DictConfig) -> Path:
    if cfg.get("out"):
        path = Path(str(cfg.out))
    elif HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
    else:
        path = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def pruning_option(allocation: Allocation, importance: str, ignored: list[str]) -> str:
    """The text of ``pruning/sensitivity.yaml``: the magnitude option with the allocation as
    ``pruning_ratio_dict``, ratio 0 for any other group and no speedup target."""
    data = {
        "defaults": ["magnitude", "_self_"],
        "importance": importance,
        "target_speedup": None,
        "pruning_ratio": 0.0,
        "ignored_layers": list(ignored),
        "pruning_ratio_dict": {k: float(v) for k, v in allocation.items()},
    }
    head = (
        f"# Written by python -m prune_callbacks.sensitivity: per-group ratios for target_speedup="
        f"{allocation.target_speedup:g} (a dry run measured {allocation.speedup:.2f}x).\n"
        "# Use: python -m prune_callbacks.train hydra.searchpath=[file://<this folder's parent>] "
        "pruning=sensitivity\n"
    )
    return head + OmegaConf.to_yaml(OmegaConf.create(data))


def _write(out: Path, result: SensitivityResult, allocation: Allocation, cfg: DictConfig) -> dict[str, str]:
    files = {
        "scan": SCAN_FILE,
        "heatmap": HEATMAP_FILE,
        "allocation": ALLOCATION_FILE,
        "pruning": str(PRUNING_OPTION),
    }
    result.to_json(out / SCAN_FILE)
    result.heatmap(out / HEATMAP_FILE)
    (out / ALLOCATION_FILE).write_text(json.dumps(allocation.to_dict(), indent=2) + "\n")
    (out / PRUNING_OPTION).parent.mkdir(exist_ok=True)
    ignored = [str(s) for s in cfg.get("ignored_layers") or []]
    (out / PRUNING_OPTION).write_text(pruning_option(allocation, str(cfg.importance), ignored))
    return files


def train_command(out: Path, choices: Mapping[str, Any]) -> str:
    """The training command that prunes with the written allocation."""
    words = ["python -m prune_callbacks.train"]
    words += [f"{g}={choices[g]}" for g in ("model", "data") if choices.get(g)]
    words += [f"hydra.searchpath=[file://{out}]", "pruning=sensitivity"]
    return " ".join(words)


# ---------------------------------------------------------------------------------------------- the job


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check the config, get a dense model, scan it, allocate, write the files; return a summary
    (also written into ``allocation.json``'s folder as the files named in it)."""
    start = time.perf_counter()
    _check(cfg)
    check_inputs(cfg, hydra_choices(), conf_dir())
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    with quiet_lightning():
        return _scan(cfg, start)


def _scan(cfg: DictConfig, start: float) -> dict[str, Any]:
    """The body of :func:`run` once the config is checked (Lightning's info lines silenced)."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = _out_dir(cfg)
    with open_dict(cfg):
        cfg.trainer.max_epochs = int(cfg.get("dense_epochs") or 1)  # the task's cosine schedule follows
    dm = _data(cfg)
    lit = _module(cfg, dm)
    net = _network(lit)
    ignored = [str(s) for s in cfg.get("ignored_layers") or []]
    check_layer_names(net, ignored, "ignored_layers")
    log.info("%s on %s: %s", type(net).__name__, type(dm).__name__, _dense_weights(cfg, lit, dm, out))
    lit.cpu()
    example = lit.example_input_array
    metric = str(cfg.scan_metric)
    better = cfg.get("higher_is_better")
    higher = ("acc" in metric.lower()) if better is None else bool(better)
    result = sensitivity_scan(
        net,
        example,
        _evaluator(cfg, lit, dm, out),
        [float(r) for r in cfg.ratios],
        importance=str(cfg.importance),
        ignored_layers=ignored,
        higher_is_better=higher,
        metric_name=metric,
    )
    log.info("%s", result)
    try:
        allocation = allocate(result, float(cfg.target_speedup), net, example, tolerance=float(cfg.tolerance))
    except ValueError as exc:
        raise error(
            "target_speedup",
            cfg.target_speedup,
            str(exc).split(": ", 1)[-1],
            "lower it or scan larger ratios",
        ) from None
    files = _write(out, result, allocation, cfg)
    command = train_command(out, hydra_choices())
    log.info(
        "allocation for %gx fewer MACs (dry run: %.2fx): %s",
        allocation.target_speedup,
        allocation.speedup,
        ", ".join(f"{k}={v:g}" for k, v in allocation.items()),
    )
    log.info("files in %s: %s", out, ", ".join(files.values()))
    log.info("prune with it: %s", command)
    return {
        "out": str(out),
        "files": files,
        "allocation": allocation.to_dict(),
        "command": command,
        "time_s": time.perf_counter() - start,
    }


def _task(cfg: DictConfig) -> None:
    """Hydra task: run; a configuration mistake prints one line to stderr and exits with status 2."""
    try:
        run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    """Entry point: the Hydra app over the training app's ``conf/`` with ``sensitivity.yaml`` as the
    primary config."""
    try:
        config_path = conf_dir()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    register_configs()
    app = hydra.main(version_base="1.3", config_path=str(config_path), config_name="sensitivity")(_task)
    app()
