"""Checks of the app's Hydra configuration, run before anything is built or trained.

The ``pruning`` group has one rulebook, :class:`~prune_callbacks.pruning.settings.PruningSettings`,
shared with the Pruner and the Lightning callback: :class:`PruningConfig` (the settings plus Hydra's
``_target_``) is the structured-config schema of every file in ``conf/pruning`` (so a key that is no
pruning setting, or a value of the wrong type, is refused when the config is composed), and
:func:`pruning_settings` validates the composed group with :meth:`PruningSettings.from_mapping`.
What is checked here besides is what only the app knows: the last pruning epoch against
``trainer.max_epochs``, layer names against the built model, logger packages and data directories.

The top-level ``export`` section is closed: its keys are those of :data:`EXPORT_SETTINGS`, and
:func:`check_export_settings` refuses any other key, a value of the wrong type, and ``onnx=true``
when the ONNX packages are not installed, before anything is built.

The ``data`` group has no closed schema (``data._target_`` may name any LightningDataModule, with its
own keys); instead every key the shipped data modules take has a rule in :data:`DATA_SETTINGS` (type,
range, meaning), applied by :func:`check_data_settings` to whichever of those keys the selected data
config has, before anything is built, so ``data.batch_size=0`` stops the run instead of a DataLoader
traceback after fit started. Which model and task fit which data is declared in :mod:`.inputs`.

Every problem a user can make on the command line is reported as a :class:`ConfigError` whose message
is one line: the key with its value, what is wrong, and the fix (for example
``pruning.pruning_ratio=1.5: must be in [0, 1) (...); e.g. pruning.pruning_ratio=0.5``). The app prints
that line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..pruning.naming import resolve_one
from ..pruning.settings import PruningSettings, SettingsError, format_value

__all__ = [
    "APP_PRUNING_KEYS",
    "CALLBACK_TARGET",
    "DATA_SETTINGS",
    "EXPORT_SETTINGS",
    "PRUNING_SCHEMA",
    "SEED",
    "ConfigError",
    "PruningConfig",
    "SettingRule",
    "callback_node",
    "check_data_settings",
    "check_export_settings",
    "check_layer_names",
    "check_logger",
    "check_schedule_fits",
    "check_setting",
    "error",
    "missing_data_error",
    "pruning_settings",
    "register_pruning_schema",
]

#: The class the ``pruning`` group builds by default: the Lightning callback.
CALLBACK_TARGET = "prune_callbacks.integrations.lightning.callback.StructuredPruning"
#: Name of the schema in the ``pruning`` config group (each ``conf/pruning/*.yaml`` lists it first in
#: its ``defaults``).
PRUNING_SCHEMA = "schema"


@dataclass
class PruningConfig(PruningSettings):
    """Structured-config schema of the ``pruning`` group: every :class:`PruningSettings` field, typed,
    with its default, plus how Hydra builds the callback from it.

    Hydra only reads the fields (names, types, defaults) of this class; it never instantiates it, so
    the settings' own validation runs once, in :func:`pruning_settings`, on the composed values.
    ``dry_run`` is the app's own key (:data:`APP_PRUNING_KEYS`): build the callback from
    :func:`callback_node` of the group, which leaves it out.
    """

    _target_: str = CALLBACK_TARGET
    _convert_: str = "all"
    dry_run: bool = False


#: Keys of the ``pruning`` group that the app reads itself (they are no pruning settings and never reach
#: the callback), with the sentence ``prune-train --help`` shows for each.
APP_PRUNING_KEYS: dict[str, str] = {
    "dry_run": (
        "Show what pruning would do instead of training: build the model, preview every step (the groups, "
        "which channels or heads each step removes, MACs and parameters after it) on its initial weights, "
        "write preview.json and stop (a gradient criterion is fed a few training batches first and "
        "previews its first step only)"
    ),
}


def callback_node(pruning: Any) -> Any:
    """The ``pruning`` group without the app's own keys (:data:`APP_PRUNING_KEYS`): what builds the
    callback. ``pruning`` is an OmegaConf node or a mapping; the result is a new plain mapping."""
    plain = OmegaConf.to_container(pruning) if OmegaConf.is_config(pruning) else dict(pruning)
    assert isinstance(plain, dict)
    return {k: v for k, v in plain.items() if k not in APP_PRUNING_KEYS}


def register_pruning_schema() -> None:
    """Store :class:`PruningConfig` in Hydra's ConfigStore as ``pruning/schema`` (idempotent)."""
    ConfigStore.instance().store(group="pruning", name=PRUNING_SCHEMA, node=PruningConfig)


class ConfigError(ValueError):
    """A configuration mistake the user can fix; the message is a single line naming the key and the fix."""


def error(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    """Build the one-line ``key=value: problem; fix`` error."""
    return ConfigError(f"{key}={format_value(value)}: {problem}; {fix}")


def pruning_settings(pruning: Mapping[str, Any]) -> PruningSettings:
    """The composed ``pruning`` group validated by :meth:`PruningSettings.from_mapping`, keys prefixed
    with ``pruning.``; a :class:`~prune_callbacks.pruning.settings.SettingsError` becomes a ConfigError.

    Ratio and speedup are alternatives: setting both is an error. The default config targets a
    speedup (``target_speedup: 2.0``), so the message for that case says how to switch to a ratio run.
    """
    try:
        settings = PruningSettings.from_mapping(callback_node(pruning), prefix="pruning.")
    except SettingsError as exc:
        ratio, speedup = pruning.get("pruning_ratio"), pruning.get("target_speedup")
        if exc.key == "pruning.target_speedup" and ratio is not None and speedup is not None:
            raise error(
                "pruning.target_speedup",
                speedup,
                f"is set together with pruning.pruning_ratio={format_value(ratio)}; they are alternatives",
                "for a ratio run add pruning.target_speedup=null (or use pruning=taylor_ratio), "
                "for a speedup run pruning.pruning_ratio=null",
            ) from None
        raise ConfigError(str(exc)) from None
    if settings.importance == "hessian":
        raise error(
            "pruning.importance",
            "hessian",
            "needs gradients that keep their graph (loss.backward(create_graph=True)), which the app's "
            "tasks do not compute",
            "use pruning.importance=obd (the same Optimal Brain Damage criterion, with the "
            "empirical-Fisher Hessian diagonal)",
        )
    return settings


def check_schedule_fits(settings: PruningSettings, max_epochs: Any) -> list[int]:
    """Check that every pruning epoch happens before ``trainer.max_epochs``; return the pruning epochs."""
    epochs = settings.prune_epochs()
    if max_epochs is None or max_epochs == -1:
        return epochs
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise error(
            "trainer.max_epochs", max_epochs, "must be a positive integer", "e.g. trainer.max_epochs=20"
        )
    if epochs[-1] >= max_epochs:
        raise error(
            "trainer.max_epochs",
            max_epochs,
            f"training ends before the last pruning step (after epoch {epochs[-1]}, 0-based)",
            f"set trainer.max_epochs>={epochs[-1] + 1} (more to fine-tune after it) or prune earlier",
        )
    return epochs


def check_layer_names(
    module: Any, patterns: Iterable[Any] | None, key: str = "pruning.ignored_layers"
) -> None:
    """Check that every layer name or glob pattern in ``patterns`` matches something in ``module``.

    Names are looked up as the pruning callback does: in the LightningModule, and when that finds
    nothing, as a suffix (``fc`` finds ``model.fc``), so a typo stops the run before training.
    """
    for pattern in patterns or ():
        if not isinstance(pattern, str):
            continue
        try:
            resolve_one(module, pattern, key)
        except ValueError as first:
            try:
                resolve_one(module, "*." + pattern, key)
            except ValueError:
                detail = str(first).split(": ", 1)[-1]
                raise error(
                    key,
                    pattern,
                    detail,
                    "use a name from model.named_modules() (relative to the network or to the "
                    "LightningModule) or a glob such as layers.1.*",
                ) from None


def check_logger(logger: Mapping[str, Any] | None) -> None:
    """Check that the package a selected logger needs is installed."""
    if not logger:
        return
    target = str(logger.get("_target_", ""))
    if target.endswith("TensorBoardLogger") and not (
        importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    ):
        raise error(
            "logger",
            "tensorboard",
            "the tensorboard package is not installed",
            "pip install tensorboard, or use logger=csv",
        )


def missing_data_error(key: str, data_dir: Any, exc: BaseException) -> ConfigError:
    """A ConfigError for a data module that could not find its files (``exc`` says what was expected)."""
    message = " ".join(str(exc).split())
    fix = "check the data config"
    if data_dir is not None:
        fix = f"put the dataset there or set {key}=/path/to/it"
    return error(key, data_dir, message, fix)


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SettingRule:
    """What one setting accepts: a type (integer, number, flag or text), for numbers a range, what the
    setting means and an example value; :meth:`problem` says what is wrong with a value, if anything.

    Bounds are inclusive unless ``low_open`` / ``high_open`` (``(0, 1)`` for a fraction that may be
    neither 0 nor 1). Booleans are no numbers and strings no numbers, as in the pruning settings.
    """

    meaning: str
    example: Any
    kind: str = "integer"  # "integer", "number", "flag" or "text"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allowed(self) -> str:
        """The accepted values in words, e.g. ``an integer >= 1`` or ``a number in (0, 1)``."""
        if self.kind == "flag":
            return "true or false"
        if self.kind == "text":
            return "a non-empty path or string"
        what = "an integer" if self.kind == "integer" else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{format_value(self.low)}, {format_value(self.high)}{right}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {format_value(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {format_value(self.high)}"
        return what

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is accepted, else ``must be <allowed> (<meaning>)``."""
        if self._accepts(value):
            return None
        return f"must be {self.allowed()} ({self.meaning})"

    def _accepts(self, value: Any) -> bool:
        if self.kind == "flag":
            return isinstance(value, bool)
        if self.kind == "text":
            return isinstance(value, str) and value.strip() != ""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "integer" and not isinstance(value, int):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


#: The top-level ``seed`` (and ``data.seed``, which follows it): numpy and Lightning accept [0, 2**32 - 1].
SEED = SettingRule("the seed of every random number generator", 0, low=0, high=2**32 - 1)

#: Rules for the keys of the ``data`` configs in ``conf/data`` (every key of every shipped data module).
#: A key not listed here (a key of your own data module) is left to that module.
DATA_SETTINGS: dict[str, SettingRule] = {
    "batch_size": SettingRule("samples per training and validation batch", 64, low=1),
    "num_workers": SettingRule("DataLoader worker processes; 0 loads in the main process", 0, low=0),
    "val_fraction": SettingRule(
        "the share of the data held out for validation",
        0.2,
        kind="number",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    ),
    "seq_len": SettingRule("tokens per training window", 128, low=1),
    "max_chars": SettingRule("bytes of text read", 2_000_000, low=1),
    "seed": SEED,
    "augment": SettingRule("random crop and flip of the training images", True, kind="flag"),
    "data_dir": SettingRule("the folder holding the dataset", "data/cifar10", kind="text"),
}


def check_setting(key: str, value: Any, rule: SettingRule) -> None:
    """Raise the one-line ConfigError ``key=value: must be ... (meaning); e.g. key=example`` if ``rule``
    refuses ``value``."""
    problem = rule.problem(value)
    if problem is not None:
        raise error(key, value, problem, f"e.g. {key}={format_value(rule.example)}")


def check_data_settings(data: Mapping[str, Any] | None, prefix: str = "data.") -> None:
    """Check every key of the ``data`` config that has a rule in :data:`DATA_SETTINGS`, then the
    settings that only make sense together (text windows against the text read).

    Runs before the data module is built: a bad value stops the run with one line naming the key
    instead of a traceback from the DataLoader (or from the split) once training has started.
    """
    if not data:
        return
    for key, rule in DATA_SETTINGS.items():
        if key in data:
            check_setting(prefix + key, data.get(key), rule)
    if all(key in data for key in ("max_chars", "seq_len", "val_fraction")):
        _check_text_split(data, prefix)


def _check_text_split(data: Mapping[str, Any], prefix: str) -> None:
    """``max_chars`` must leave a window of ``seq_len + 1`` bytes for training after the validation
    split, which takes ``max(seq_len + 1, max_chars * val_fraction)`` bytes (as the text module cuts it)."""
    max_chars, seq_len, fraction = int(data["max_chars"]), int(data["seq_len"]), float(data["val_fraction"])
    n_val = max(seq_len + 1, int(max_chars * fraction))
    if max_chars - n_val < seq_len + 1:
        need = max(2 * (seq_len + 1), math.ceil((seq_len + 1) / (1 - fraction)))
        while need - max(seq_len + 1, int(need * fraction)) < seq_len + 1:  # float rounding: a step or two
            need += 1
        raise error(
            prefix + "max_chars",
            max_chars,
            f"too little text for {prefix}seq_len={seq_len}: the validation split takes {n_val} bytes and "
            f"training needs at least {seq_len + 1} more",
            f"set {prefix}max_chars>={need} or a smaller {prefix}seq_len",
        )


# ---------------------------------------------------------------------------------------------- export

#: Rules for the keys of the top-level ``export`` section (all of them: the section is closed).
EXPORT_SETTINGS: dict[str, SettingRule] = {
    "onnx": SettingRule(
        "write pruned_model.onnx and time the dense and the pruned model in ONNX Runtime", True, kind="flag"
    ),
    "dynamo": SettingRule(
        "export with torch's torch.export-based ONNX exporter; false: the TorchScript one", True, kind="flag"
    ),
}

#: Packages ``export.onnx=true`` needs: (module, needed only with ``export.dynamo=true``).
_ONNX_PACKAGES = (("onnx", False), ("onnxruntime", False), ("onnxscript", True))


def check_export_settings(export: Mapping[str, Any] | None, prefix: str = "export.") -> None:
    """Check the ``export`` section: known keys, flags, and with ``onnx=true`` the packages it needs
    (``onnx``, ``onnxruntime``, and ``onnxscript`` for the dynamo exporter), so a missing one stops
    the run before training instead of after it."""
    if not export:
        return
    for key in export:
        if str(key) not in EXPORT_SETTINGS:
            known = ", ".join(prefix + k for k in EXPORT_SETTINGS)
            raise error(prefix + str(key), export.get(key), "is no export setting", f"use one of {known}")
    for key, rule in EXPORT_SETTINGS.items():
        if key in export:
            check_setting(prefix + key, export.get(key), rule)
    if not export.get("onnx"):
        return
    dynamo = bool(export.get("dynamo", True))
    missing = [m for m, dynamo_only in _ONNX_PACKAGES if (dynamo or not dynamo_only) and not _installed(m)]
    if missing:
        raise error(
            prefix + "onnx",
            True,
            f"ONNX export needs {', '.join(missing)}, not installed here",
            "pip install prune_callbacks[onnx], or set export.onnx=false",
        )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
