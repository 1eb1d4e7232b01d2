"""The main job: a Hydra app that trains a model dense, prunes it inside ``Trainer.fit`` and fine-tunes it.

``python -m prune_callbacks.train`` (or ``prune-train``) with no arguments trains the small digits ResNet,
prunes it iteratively with gradient Taylor importance to half its MACs, fine-tunes it, and prints a table
of dense vs pruned accuracy, MACs, parameters and CPU latency (with ``export.onnx=true`` also the pruned
model as ``pruned_model.onnx`` and ONNX Runtime latency). Everything comes from ``conf/`` (groups
``model``, ``data``, ``task``, ``pruning``, ``trainer``, ``logger``) and can be overridden on the command
line; ``recipe=NAME`` applies one of the ready schedules in ``recipes/``; ``--help`` lists the groups,
their options and what the keys mean (:mod:`.help`). Each job writes ``results.json`` to its output
directory; ``python -m prune_callbacks.report <multirun dir>`` summarises a sweep.

The ``pruning`` group is checked by the one settings rulebook,
:class:`~prune_callbacks.pruning.settings.PruningSettings` (its schema in Hydra's ConfigStore and
:func:`.config.pruning_settings`), the ``data`` settings by :func:`.config.check_data_settings` and the
model, task and data against each other by :func:`.inputs.check_inputs`, all before anything is built.
Progress and the final summary go through the module logger: Hydra's job logging prints them on the
console and writes them to ``train.log``.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..measure.flops import count_macs_and_params, count_params, measure_latency
from ..pruning.pruner import Pruner
from ..pruning.settings import PruningSettings
from .config import (
    SEED,
    ConfigError,
    callback_node,
    check_data_settings,
    check_export_settings,
    check_layer_names,
    check_logger,
    check_schedule_fits,
    check_setting,
    error,
    missing_data_error,
    pruning_settings,
    register_pruning_schema,
)
from .help import register_help
from .inputs import check_inputs
from .tables import render_table

__all__ = [
    "APP_ROOT",
    "build_config_node",
    "hydra_choices",
    "check_schedule_fits",
    "check_sweep_plugins",
    "conf_dir",
    "main",
    "pruning_settings",
    "quiet_lightning",
    "recipes_dir",
    "register_configs",
    "register_recipes",
    "run",
]

log = logging.getLogger(__name__)

#: Hydra job logging of the app (the ``hydra/job_logging`` option ``prune_train``): Hydra's default, with
#: plain message lines on the console (the summary table stays readable) and time, logger and level in
#: the job's ``train.log``.
JOB_LOGGING: dict[str, Any] = {
    "version": 1,
    "formatters": {
        "console": {"format": "%(message)s"},
        "file": {"format": "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "console", "stream": "ext://sys.stdout"},
        "file": {
            "class": "logging.FileHandler",
            "formatter": "file",
            "filename": "${hydra.runtime.output_dir}/${hydra.job.name}.log",
        },
    },
    "root": {"level": "INFO", "handlers": ["console", "file"]},
    "disable_existing_loggers": False,
}

# conf/ and recipes/ ship inside the package (package data), so a wheel install runs the app too.
APP_ROOT = Path(__file__).resolve().parent
RESULTS_FILE = "results.json"
PRUNED_MODEL_FILE = "pruned_model.pt"
PRUNED_ONNX_FILE = "pruned_model.onnx"
RESOLVED_CONFIG_FILE = "config_resolved.yaml"


def conf_dir() -> Path:
    """The app's ``conf/`` directory, or a FileNotFoundError saying where it was expected."""
    path = APP_ROOT / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"the app's configuration was not found at {path}/config.yaml; the installed package is "
            "incomplete: reinstall it (`pip install --force-reinstall prune_callbacks`)"
        )
    return path


def recipes_dir() -> Path:
    """The ``recipes/`` directory shipped with the app (it may be absent: then there are no recipes)."""
    return APP_ROOT / "recipes"


def register_recipes(directory: Path | None = None) -> list[str]:
    """Register every ``recipes/*.yaml`` as an option of the ``recipe`` config group; return the names.

    Recipes are global-package configs (they set keys of several groups), so they are stored in Hydra's
    ConfigStore with ``package="_global_"``; a recipe's own ``defaults`` list (``override /model: ...``)
    is honoured as for any config file. ``recipe=NAME`` on the command line then selects one.
    """
    directory = recipes_dir() if directory is None else directory
    names: list[str] = []
    if not directory.is_dir():
        return names
    store = ConfigStore.instance()
    for path in sorted(directory.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def register_configs() -> list[str]:
    """Put the app's stored configs into Hydra's ConfigStore: the ``pruning`` schema, the ``--help``
    text, the job logging (:data:`JOB_LOGGING`) and the recipes (see :func:`register_recipes`); return
    the recipe names.

    Runs when this module is imported, so that composing ``conf/`` (the app, or Hydra's compose API
    in tests and notebooks) always finds them.
    """
    register_pruning_schema()
    register_help(APP_ROOT / "conf", recipes_dir())
    ConfigStore.instance().store(group="hydra/job_logging", name="prune_train", node=JOB_LOGGING)
    return register_recipes()


# ---------------------------------------------------------------------------------------------- helpers


def _output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir`` when set, else this job's Hydra output directory, else the working directory."""
    if cfg.get("output_dir"):
        path = Path(str(cfg.output_dir))
    elif HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
    else:
        path = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    return path


def hydra_choices() -> dict[str, Any]:
    """The option selected in each config group (``{"model": "tiny_llama", ...}``; empty outside Hydra)."""
    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def _overrides() -> list[str]:
    """The command-line overrides of this job (empty outside a Hydra run)."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def build_config_node(cfg: Any, key: str, **kwargs: Any) -> Any:
    """``instantiate(cfg, **kwargs)``, turning a failure into a one-line ConfigError naming ``key``."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        if isinstance(cause, ConfigError):
            raise cause from None
        message = " ".join(str(cause).split())
        target = cfg.get("_target_") if isinstance(cfg, Mapping) else None
        raise ConfigError(
            f"{key}: could not build {target}: {type(cause).__name__}: {message}; check the {key} config "
            f"(python -m prune_callbacks.train --cfg job shows it)"
        ) from None


def _check_data(data_cfg: DictConfig, dm: Any) -> None:
    """Run the data module's ``prepare_data`` and ``setup`` now, so a missing dataset (or settings the
    module refuses when it loads, such as a split it cannot make) stop the run here, in one line."""
    try:
        if hasattr(dm, "prepare_data"):
            dm.prepare_data()
        if hasattr(dm, "setup"):
            dm.setup("fit")
    except FileNotFoundError as exc:
        key = "data.data_dir" if "data_dir" in data_cfg else "data"
        raise missing_data_error(key, data_cfg.get("data_dir"), exc) from None
    except ValueError as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(
            f"data: {type(dm).__name__} could not load its data: {message}; check the data settings "
            f"(python -m prune_callbacks.train --cfg job shows them)"
        ) from None


def _fill_from_data(task_cfg: DictConfig, dm: Any) -> dict[str, Any]:
    """Values for the ``task`` keys left null, taken from the data module's attribute of the same name."""
    filled: dict[str, Any] = {}
    for raw_key, value in task_cfg.items():
        key = str(raw_key)
        if value is not None or key.startswith("_"):
            continue
        if not hasattr(dm, key):
            raise error(
                f"task.{key}",
                None,
                f"{type(dm).__name__} has no attribute {key} to take it from",
                f"set task.{key} explicitly",
            )
        filled[key] = getattr(dm, key)
    return filled


def _detached_copy(module: Any) -> Any:
    """Deep copy of a (Lightning) module without the Trainer it may be attached to."""
    memo: dict[int, Any] = {}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = None
    return copy.deepcopy(module, memo)


@contextmanager
def quiet_lightning() -> Any:
    """Silence Lightning's informational lines (device summary, tips) for the short evaluation runs."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _example_batch(lit: Any, dm: Any, n: int) -> Any:
    """``n`` real inputs from the data module, else ``example_input_array`` repeated ``n`` times."""
    if hasattr(dm, "example_batch"):
        try:
            return dm.example_batch(n)
        except (IndexError, RuntimeError, ValueError):
            pass
    x = lit.example_input_array
    if isinstance(x, torch.Tensor):
        return x[:1].expand(n, *x.shape[1:]).clone()
    return x


def _widths(callback: Any) -> list[dict[str, Any]]:
    """Channels of every group's root layer, dense and pruned, from the callback's last record."""
    records = getattr(callback, "records", None) or []
    if not records:
        return []
    return [
        {"group": g["root"], "dense": int(g["channels_dense"]), "pruned": int(g["channels_after"])}
        for g in records[-1]["groups"]
    ]


def _steps(callback: Any) -> list[dict[str, Any]]:
    """The pruning steps of the callback's records: step, epoch, MACs, parameters, speedup, channel ratio."""
    keys = ("step", "epoch", "macs", "params", "speedup", "channel_ratio")
    return [{k: r[k] for k in keys if k in r} for r in getattr(callback, "records", [])]


def _pruning_record(settings: PruningSettings, epochs: list[int]) -> dict[str, Any]:
    """What ``results.json`` says about the pruning settings (a custom importance is ``"custom"``)."""
    return {
        "importance": settings.importance if isinstance(settings.importance, str) else "custom",
        "pruning_ratio": settings.pruning_ratio,
        "target_speedup": settings.target_speedup,
        "epochs": epochs,
    }


def _save_pruned(lit: Any, callback: Any, path: Path) -> bool:
    """Save the pruned network for :func:`prune_callbacks.load_pruned`; False when there is no history.

    For a task wrapper the file holds the bare network (history and weights under ``model.``, with
    the prefix stripped), so ``load_pruned(MyNet(...), path)`` rebuilds it without Lightning.
    """
    from ..integrations.lightning.callback import HISTORY_KEY, pruned_from_checkpoint
    from ..pruning.history import save_pruned, state_dict_digests

    history = getattr(callback, "history", None)
    if history is None:
        return False
    if isinstance(getattr(lit, "model", None), torch.nn.Module):
        payload = pruned_from_checkpoint(
            {"state_dict": lit.state_dict(), HISTORY_KEY: history}, prefix="model."
        )
        payload["digests"] = state_dict_digests(payload["state_dict"])  # load_pruned checks them
        torch.save(payload, path)
    else:
        save_pruned(lit, path, history)
    return True


class DenseSnapshot(pl.Callback):
    """Keeps the model as it was right before the first prune: the dense baseline of the run.

    It copies the module once at fit start and then, at the end of every epoch in which the parameter
    count is still the dense one, stores a CPU copy of the weights. It must come before the pruning
    callback in the Trainer's list so that it sees each epoch's weights before that epoch's prune.
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.state: dict[str, torch.Tensor] | None = None
        self.dense_params = -1
        self.epoch = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copy the module (structure and starting weights) before anything is pruned."""
        self.model = _detached_copy(pl_module).cpu()
        self.dense_params = count_params(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Store this epoch's weights while the model is still dense."""
        if count_params(pl_module) == self.dense_params:
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
            self.epoch = trainer.current_epoch

    def dense_model(self) -> Any:
        """The dense model with the last dense weights (None before fit)."""
        if self.model is not None and self.state is not None:
            self.model.load_state_dict(self.state)
        return self.model


def _evaluate(cfg: DictConfig, module: Any, dm: Any, out_dir: Path) -> dict[str, float]:
    """Validation metrics of ``module`` from a plain Trainer (no logger, no callbacks)."""
    tcfg = cfg.trainer
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator=tcfg.get("accelerator", "auto"),
            devices=1,
            precision=tcfg.get("precision", "32-true"),
            limit_val_batches=tcfg.get("limit_val_batches"),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(out_dir),
        )
        metrics = trainer.validate(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}


def _measure(cfg: DictConfig, models: dict[str, Any], dm: Any, example: Any) -> dict[str, dict[str, Any]]:
    """MACs, parameters and CPU latency per configured batch size of each model (moved to the CPU).

    Latency is measured in alternating rounds (dense, pruned, dense, ...) and the median of the
    round medians is kept, so a change in machine load during the measurement hits both models alike.
    """
    lat_cfg = cfg.get("latency") or {}
    repeats = max(1, int(lat_cfg.get("repeats", 20)))
    rounds = min(5, repeats)
    out: dict[str, dict[str, Any]] = {}
    for name, module in models.items():
        macs, params = count_macs_and_params(module.cpu(), example)
        out[name] = {"macs": int(macs), "params": int(params), "latency_s": {}}
    threads = torch.get_num_threads()
    latency_threads = lat_cfg.get("threads")
    if latency_threads:
        torch.set_num_threads(int(latency_threads))
    try:
        for bs in lat_cfg.get("batch_sizes", [1]):
            x = _example_batch(next(iter(models.values())), dm, int(bs))
            x = x.cpu() if isinstance(x, torch.Tensor) else x
            samples: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(rounds):
                for name, module in models.items():
                    warmup = int(lat_cfg.get("warmup", 3))
                    samples[name].append(measure_latency(module, x, warmup=warmup, repeats=repeats // rounds))
            for name in models:
                out[name]["latency_s"][str(bs)] = statistics.median(samples[name])
    finally:
        torch.set_num_threads(threads)
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _format_table(results: dict[str, Any]) -> str:
    """The console summary: dense vs pruned accuracy, MACs, parameters and latency."""
    dense, pruned, metric = results["dense"], results["pruned"], results["metric"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    def times(v: float | None, what: str) -> str:
        return "n/a" if v is None else f"{v:.2f}x {what}"

    da, pa = dense.get("accuracy"), pruned.get("accuracy")
    change = "n/a" if da is None or pa is None else f"{100 * (pa - da):+.2f} pt"
    rows = [
        (f"accuracy ({metric})", pct(da), pct(pa), change),
        (
            "MACs",
            f"{dense['macs'] / 1e6:.3f} M",
            f"{pruned['macs'] / 1e6:.3f} M",
            times(results["speedup"]["macs"], "fewer"),
        ),
        (
            "parameters",
            f"{dense['params'] / 1e3:.1f} k",
            f"{pruned['params'] / 1e3:.1f} k",
            times(results["speedup"]["params"], "fewer"),
        ),
    ]
    for bs, t in dense["latency_s"].items():
        tp = pruned["latency_s"][bs]
        latency = (f"{t * 1e3:.2f} ms", f"{tp * 1e3:.2f} ms", times(_ratio(t, tp), "faster"))
        rows.append((f"CPU latency, batch {bs}", *latency))
    for bs, t in dense.get("ort_latency_s", {}).items():
        tp = pruned["ort_latency_s"][bs]
        latency = (f"{t * 1e3:.2f} ms", f"{tp * 1e3:.2f} ms", times(_ratio(t, tp), "faster"))
        rows.append((f"ONNX Runtime latency, batch {bs}", *latency))
    return render_table(("", "dense", "pruned", "change"), rows, right=(1, 2, 3))


def describe_pruning(settings: PruningSettings, epochs: list[int], max_epochs: Any) -> str:
    """One line saying what the run will do, e.g. ``taylor importance, 2.00x fewer MACs in 5 steps ...``."""
    importance = settings.importance if isinstance(settings.importance, str) else "custom"
    if settings.target_speedup is not None:
        target = f"{settings.target_speedup:.2f}x fewer MACs (channels ranked globally)"
    else:
        scope = "ranked globally" if settings.ranks_globally else "per group"
        target = f"{100 * settings.ratio:.0f}% of the channels ({scope})"
    schedule = settings.schedule if isinstance(settings.schedule, str) else "explicit"
    where = ", ".join(str(e) for e in epochs)
    steps = f"{len(epochs)} step{'s' if len(epochs) != 1 else ''}"
    end = f", fine-tuning to epoch {max_epochs}" if isinstance(max_epochs, int) and max_epochs > 0 else ""
    return f"pruning: {importance} importance, {target} in {steps} ({schedule}) after epochs {where}{end}"


# ---------------------------------------------------------------------------------------------- the job


def _build_module(cfg: DictConfig, dm: Any) -> pl.LightningModule:
    """The LightningModule to train: ``model`` itself when it is one, else ``task`` wrapping it.

    ``task`` keys left null are filled from the data module, and a data module with
    ``example_batch`` gives the module its ``example_input_array`` (the callback traces with it).
    """
    net = build_config_node(cfg.model, "model")
    if isinstance(net, pl.LightningModule):
        return net
    if not isinstance(net, torch.nn.Module):
        target = cfg.model.get("_target_")
        raise error("model._target_", target, "did not build an nn.Module", "point it at one")
    lit = build_config_node(cfg.task, "task", model=net, **_fill_from_data(cfg.task, dm))
    if hasattr(dm, "example_batch"):
        lit.example_input_array = dm.example_batch(1)
    return lit


def _make_logger(cfg: DictConfig, out_dir: Path) -> Any:
    """The configured Lightning logger (False for none), given the resolved config as hyperparameters.

    The resolved config is written to ``config_resolved.yaml`` first; a W&B run also saves that file.
    """
    resolved_path = out_dir / RESOLVED_CONFIG_FILE
    resolved_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if not cfg.get("logger"):
        return False
    logger_cfg = cfg.logger
    extra = {"save_dir": str(out_dir)} if logger_cfg.get("save_dir", "") is None else {}
    logger = build_config_node(logger_cfg, "logger", **extra)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if type(logger).__name__ == "WandbLogger":
        logger.experiment.save(str(resolved_path), base_path=str(out_dir), policy="now")
    return logger


def _log_final(logger: Any, results: dict[str, Any]) -> None:
    """Send the headline figures to the Lightning logger (``final/...``) and close it."""
    if not logger:
        return
    ort = results["speedup"].get("ort_latency", {})
    flat = {
        "final/dense_acc": results["dense"]["accuracy"],
        "final/pruned_acc": results["pruned"]["accuracy"],
        "final/macs_speedup": results["speedup"]["macs"],
        "final/params_speedup": results["speedup"]["params"],
        **{f"final/latency_speedup_bs{bs}": v for bs, v in results["speedup"]["latency"].items()},
        **{f"final/ort_latency_speedup_bs{bs}": v for bs, v in ort.items()},
    }
    logger.log_metrics({k: v for k, v in flat.items() if v is not None})
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        logger.experiment.finish()


def _compare(
    cfg: DictConfig, dense: Any, lit: Any, dm: Any, out_dir: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Validation metrics and costs of the dense and the pruned model: ``(dense, pruned, speedup)``."""
    metric = str(cfg.get("metric", "val/acc"))
    example = lit.example_input_array
    example = example.cpu() if isinstance(example, torch.Tensor) else example
    sides: dict[str, dict[str, Any]] = {}
    for name, module in (("dense", dense), ("pruned", lit)):
        metrics = _evaluate(cfg, module, dm, out_dir)
        sides[name] = {"accuracy": metrics.get(metric), "metrics": metrics}
    costs = _measure(cfg, {"dense": dense, "pruned": lit}, dm, example)
    for name in sides:
        sides[name].update(costs[name])
    d, p = costs["dense"], costs["pruned"]
    speedup = {
        "macs": _ratio(d["macs"], p["macs"]),
        "params": _ratio(d["params"], p["params"]),
        "latency": {bs: _ratio(t, p["latency_s"][bs]) for bs, t in d["latency_s"].items()},
    }
    return sides["dense"], sides["pruned"], speedup


def _network(module: Any) -> Any:
    """The bare network of a task wrapper (its ``model``), else the module itself."""
    net = getattr(module, "model", None)
    return net if isinstance(net, torch.nn.Module) else module


def _onnx_latency(cfg: DictConfig, paths: dict[str, Path], lit: Any, dm: Any) -> dict[str, dict[str, float]]:
    """ONNX Runtime seconds per call of each exported model per configured batch size, measured like
    the eager latency (:func:`_measure`): alternating rounds, the median of the round medians, on
    ``latency.threads`` intra-op threads (null: ONNX Runtime's default)."""
    from ..measure.export import onnxruntime_latency, onnxruntime_session

    lat_cfg = cfg.get("latency") or {}
    repeats = max(1, int(lat_cfg.get("repeats", 20)))
    rounds = min(5, repeats)
    warmup = int(lat_cfg.get("warmup", 3))
    threads = int(lat_cfg["threads"]) if lat_cfg.get("threads") else None
    sessions = {name: onnxruntime_session(path, threads) for name, path in paths.items()}
    out: dict[str, dict[str, float]] = {name: {} for name in paths}
    for bs in lat_cfg.get("batch_sizes", [1]):
        x = _example_batch(lit, dm, int(bs))
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, session in sessions.items():
                t = onnxruntime_latency(session, x, warmup=warmup, repeats=repeats // rounds)
                samples[name].append(t)
        for name in paths:
            out[name][str(bs)] = statistics.median(samples[name])
    return out


def _export_onnx(cfg: DictConfig, dense: Any, lit: Any, dm: Any, out_dir: Path) -> dict[str, Any]:
    """``export.onnx``: write the pruned network to ``pruned_model.onnx`` (the dense one to a
    temporary file), check ONNX Runtime against PyTorch and time both in ONNX Runtime.

    Returns the ``onnx`` entry of ``results.json`` plus ``latency_s`` per model. The training is
    done by now, so a model that does not export is reported (``error``, logged) instead of
    raising: results.json and the saved model are still written.
    """
    from ..measure.export import check_onnx, export_onnx

    dynamo = bool(cfg.export.get("dynamo", True))
    record: dict[str, Any] = {"file": None, "exporter": "dynamo" if dynamo else "torchscript"}
    example = _example_batch(lit, dm, 1)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"dense": Path(tmp) / "dense_model.onnx", "pruned": out_dir / PRUNED_ONNX_FILE}
            for name, module in (("dense", dense), ("pruned", lit)):
                export_onnx(_network(module).cpu(), example, paths[name], dynamo=dynamo)
            record["file"] = PRUNED_ONNX_FILE
            try:
                record["max_abs_diff"] = check_onnx(_network(lit), paths["pruned"], example)
            except ValueError as exc:
                record["mismatch"] = str(exc)
                log.warning("ONNX Runtime does not match PyTorch on %s: %s", PRUNED_ONNX_FILE, exc)
            record["latency_s"] = _onnx_latency(cfg, paths, lit, dm)
    except Exception as exc:  # reported in results.json and the log; the run's results are kept
        record["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        log.error("ONNX export or ONNX Runtime failed: %s", record["error"])
    record["time_s"] = time.perf_counter() - start
    return record


def _add_onnx(results: dict[str, Any], record: dict[str, Any]) -> None:
    """Put the ONNX step's figures into ``results``: ``onnx`` (file, exporter, max_abs_diff or
    error), ``ort_latency_s`` of the dense and the pruned model and ``speedup.ort_latency``."""
    latency = record.pop("latency_s", None)
    results["time_s"]["onnx"] = record.pop("time_s")
    results["onnx"] = record
    if latency is None:
        return
    results["dense"]["ort_latency_s"] = latency["dense"]
    results["pruned"]["ort_latency_s"] = latency["pruned"]
    pruned = latency["pruned"]
    results["speedup"]["ort_latency"] = {bs: _ratio(t, pruned[bs]) for bs, t in latency["dense"].items()}


def _onnx_line(record: dict[str, Any]) -> str:
    """One summary line about the ONNX file: written and checked, or what went wrong."""
    if "error" in record:
        return f"ONNX export failed ({record['exporter']} exporter): {record['error']}"
    if "mismatch" in record:
        return f"ONNX: {record['file']} written, but ONNX Runtime differs from PyTorch: {record['mismatch']}"
    return (
        f"ONNX: {record['file']} ({record['exporter']} exporter); ONNX Runtime matches PyTorch "
        f"(max |difference| {record['max_abs_diff']:.1e})"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job: check the config, train dense, prune during fit, fine-tune, measure, write results.json.

    Every user-fixable problem (bad ratio, unknown importance or layer name, bad data setting, a model
    that does not take what the data gives, missing dataset...) raises a :class:`ConfigError` before
    any training. Returns the results that were written.
    """
    start = time.perf_counter()
    settings = pruning_settings(cfg.pruning)
    epochs = check_schedule_fits(settings, cfg.trainer.get("max_epochs"))
    check_logger(cfg.get("logger"))
    check_setting("seed", cfg.get("seed"), SEED)
    check_data_settings(cfg.get("data"))
    check_export_settings(cfg.get("export"))
    check_inputs(cfg, hydra_choices(), conf_dir())

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out_dir = _output_dir(cfg)
    dm = build_config_node(cfg.data, "data")
    _check_data(cfg.data, dm)
    lit = _build_module(cfg, dm)
    check_layer_names(lit, settings.ignored_layers)
    check_layer_names(lit, list(settings.pruning_ratio_dict), "pruning.pruning_ratio_dict")
    if cfg.pruning.get("dry_run"):
        return _dry_run(settings, lit, dm, out_dir, start)
    pruning = build_config_node(callback_node(cfg.pruning), "pruning")
    snapshot = DenseSnapshot()
    model_name = type(lit.model if hasattr(lit, "model") else lit).__name__
    log.info("%s on %s, output in %s", model_name, type(dm).__name__, out_dir)
    log.info("%s", describe_pruning(settings, epochs, cfg.trainer.get("max_epochs")))

    logger = _make_logger(cfg, out_dir)
    trainer = build_config_node(
        cfg.trainer, "trainer", callbacks=[snapshot, pruning], logger=logger, default_root_dir=str(out_dir)
    )
    fit_start = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    fit_time = time.perf_counter() - fit_start
    log.info("training done in %.0f s; evaluating and measuring the dense and the pruned model", fit_time)

    dense, pruned, speedup = _compare(cfg, snapshot.dense_model(), lit, dm, out_dir)
    results: dict[str, Any] = {
        "model": model_name,
        "data": type(dm).__name__,
        "metric": str(cfg.get("metric", "val/acc")),
        "pruning": _pruning_record(settings, epochs),
        "dense": dense,
        "pruned": pruned,
        "speedup": speedup,
        "widths": _widths(pruning),
        "steps": _steps(pruning),
        "dense_epoch": snapshot.epoch,
        "overrides": _overrides(),
        "time_s": {"fit": fit_time},
    }
    if cfg.get("save_pruned_model", True) and _save_pruned(lit, pruning, out_dir / PRUNED_MODEL_FILE):
        results["pruned_model"] = PRUNED_MODEL_FILE
    if (cfg.get("export") or {}).get("onnx"):
        _add_onnx(results, _export_onnx(cfg, snapshot.dense_model(), lit, dm, out_dir))
    results["time_s"]["total"] = time.perf_counter() - start
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    _log_final(logger, results)

    log.info("%s on %s: dense vs pruned\n%s", results["model"], results["data"], _format_table(results))
    if "onnx" in results:
        log.info("%s", _onnx_line(results["onnx"]))
    log.info("results: %s (%.0f s)", out_dir / RESULTS_FILE, results["time_s"]["total"])
    return results


#: Training batches a gradient criterion is fed before a dry run previews its first step.
DRY_RUN_BATCHES = 4
PREVIEW_FILE = "preview.json"


def _gather_gradients(pruner: Pruner, lit: pl.LightningModule, dm: Any) -> int:
    """Feed a gradient criterion :data:`DRY_RUN_BATCHES` training batches (the task's own loss,
    outside any Trainer); return how many were used. Gradients are cleared afterwards."""
    importance: Any = pruner.importance
    if not getattr(importance, "requires_gradients", False):
        return 0
    loader = dm.train_dataloader()
    used = 0
    collecting = getattr(importance, "collecting", None)  # Wanda, FLAP: forward statistics
    recording = collecting(lit) if callable(collecting) else nullcontext()
    with recording, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer to log to: expected
        for index, batch in zip(range(DRY_RUN_BATCHES), loader):
            out = lit.training_step(batch, index)
            loss = out["loss"] if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor):
                raise error(
                    "pruning.dry_run",
                    True,
                    f"{type(importance).__name__} needs a loss and {type(lit).__name__}.training_step "
                    f"returned {type(out).__name__}",
                    "return the loss (or a dict with 'loss') from training_step, or preview with "
                    "pruning.importance=magnitude",
                )
            lit.zero_grad(set_to_none=True)
            loss.backward()
            importance.accumulate(lit)
            used += 1
    lit.zero_grad(set_to_none=True)
    return used


def _dry_run(
    settings: PruningSettings, lit: pl.LightningModule, dm: Any, out_dir: Path, start: float
) -> dict[str, Any]:
    """``pruning.dry_run=true``: preview every pruning step on the freshly built model (initial
    weights, nothing trained, nothing pruned), log the table, write ``preview.json``, return it."""
    example = lit.example_input_array
    if example is None:
        raise error(
            "pruning.dry_run",
            True,
            f"needs example inputs and {type(lit).__name__} has no example_input_array",
            "set self.example_input_array in the module, or use a data module with example_batch(n)",
        )
    pruner = Pruner(lit, example, settings=settings)
    batches = _gather_gradients(pruner, lit, dm)
    preview = pruner.preview()
    fed = f", {settings.importance} fed {batches} training batches" if batches else ""
    log.info("dry run on the initial weights%s; nothing trained or pruned\n%s", fed, preview)
    results = {"dry_run": True, "preview": preview.to_dict(), "overrides": _overrides()}
    results["time_s"] = {"total": time.perf_counter() - start}
    (out_dir / PREVIEW_FILE).write_text(json.dumps(results, indent=2) + "\n")
    log.info("preview: %s", out_dir / PREVIEW_FILE)
    return results


#: What a job can return to a sweeper, read from the pruned model's results (see :func:`_objectives`).
OBJECTIVES: dict[str, tuple[str, str]] = {
    "accuracy": ("pruned", "accuracy"),
    "macs": ("pruned", "macs"),
    "params": ("pruned", "params"),
}


def _objectives(cfg: DictConfig) -> list[str]:
    """The values the job returns to the sweeper, checked before training.

    A top-level ``objectives`` list (names of :data:`OBJECTIVES`) when the config has one; otherwise
    the sweeper's ``direction`` decides: one direction (or a sweeper without one: the basic grid
    sweeper) returns the metric, as always; two (the ``hydra/sweeper=pareto`` option: maximize,
    minimize) return ``(metric, pruned MACs)``. Their number must match the sweeper's directions.
    """
    direction: Any = HydraConfig.get().sweeper.get("direction") if HydraConfig.initialized() else None
    directions = list(direction) if OmegaConf.is_list(direction) else [direction]
    names = cfg.get("objectives")
    if names is None:
        return ["accuracy", "macs"] if len(directions) == 2 else ["accuracy"]
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    fix = f"use {len(directions)} of: {', '.join(OBJECTIVES)} (one per hydra.sweeper.direction)"
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise error("objectives", names, f"{', '.join(unknown)} is not an objective", fix)
    if len(names) != len(directions):
        problem = f"{len(names)} value(s) for a sweeper that optimizes {len(directions)}"
        raise error("objectives", names, problem, fix)
    return names


#: The Hydra plugin (module under ``hydra_plugins``) each sweep option of ``conf/hydra`` needs, by
#: ``group=option``: all are in the ``sweep`` extra.
SWEEP_PLUGINS: dict[str, str] = {
    "hydra/sweeper=pareto": "hydra_optuna_sweeper",
    "hydra/sweeper=optuna": "hydra_optuna_sweeper",
    "hydra/launcher=parallel": "hydra_joblib_launcher",
    "hydra/launcher=joblib": "hydra_joblib_launcher",
    "hydra/launcher=cluster_local": "hydra_submitit_launcher",
    "hydra/launcher=slurm": "hydra_submitit_launcher",
    "hydra/launcher=submitit_local": "hydra_submitit_launcher",
    "hydra/launcher=submitit_slurm": "hydra_submitit_launcher",
}


def _has_plugin(plugin: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(f"hydra_plugins.{plugin}") is not None
    except ModuleNotFoundError:  # no Hydra plugin at all: no hydra_plugins package
        return False


def check_sweep_plugins(args: list[str]) -> None:
    """Refuse, in one line naming the extra, a command line that selects a sweeper or launcher whose
    Hydra plugin is not installed (Hydra itself would only say it could not load the option)."""
    for arg in args:
        choice = str(arg).lstrip("+~")
        plugin = SWEEP_PLUGINS.get(choice)
        if plugin is not None and not _has_plugin(plugin):
            group, _, option = choice.partition("=")
            raise error(
                group,
                option,
                f"needs the Hydra plugin {plugin.replace('_', '-')}, which is not installed",
                "pip install prune_callbacks[sweep]",
            )


def _task(cfg: DictConfig) -> float | tuple[float, ...] | None:
    """Hydra task: run the job and return its objectives to the sweeper (:func:`_objectives`: the pruned
    metric, or ``(metric, MACs)`` for a two-direction sweeper such as ``hydra/sweeper=pareto``).

    A configuration mistake prints one line to stderr and exits with status 2.
    """
    try:
        names = _objectives(cfg)
        results = run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if results.get("dry_run"):
        return None
    values = [results[OBJECTIVES[n][0]].get(OBJECTIVES[n][1]) for n in names]
    if len(values) == 1:
        return float(values[0]) if values[0] is not None else None
    return None if None in values else tuple(float(v) for v in values)


def main() -> None:
    """Console entry point (``prune-train``): the Hydra app over ``conf/`` with the recipes registered."""
    try:
        config_path = conf_dir()
        check_sweep_plugins(sys.argv[1:])
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    register_configs()
    app = hydra.main(version_base="1.3", config_path=str(config_path), config_name="config")(_task)
    app()


register_configs()

if __name__ == "__main__":
    main()
