"""Checks of the app's Hydra configuration, run before anything is built or trained.

The ``pruning`` group has one rulebook, :class:`~prune_callbacks.pruning.settings.PruningSettings`,
shared with the Pruner and the Lightning callback: :class:`PruningConfig` (the settings plus Hydra's
``_target_``) is the structured-config schema of every file in ``conf/pruning`` (so a key that is no
pruning setting, or a value of the wrong type, is refused when the config is composed), and
:func:`pruning_settings` validates the composed group with :meth:`PruningSettings.from_mapping`.
What is checked here besides is what only the app knows: the last pruning epoch against
``trainer.max_epochs``, layer names against the built model, logger packages and data directories.

Every problem a user can make on the command line is reported as a :class:`ConfigError` whose message
is one line: the key with its value, what is wrong, and the fix (for example
``pruning.pruning_ratio=1.5: must be in [0, 1) (...); e.g. pruning.pruning_ratio=0.5``). The app prints
that line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from ..pruning.naming import resolve_one
from ..pruning.settings import PruningSettings, SettingsError, format_value

__all__ = [
    "CALLBACK_TARGET",
    "PRUNING_SCHEMA",
    "ConfigError",
    "PruningConfig",
    "check_layer_names",
    "check_logger",
    "check_schedule_fits",
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
    """

    _target_: str = CALLBACK_TARGET
    _convert_: str = "all"


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
        return PruningSettings.from_mapping(pruning, prefix="pruning.")
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
