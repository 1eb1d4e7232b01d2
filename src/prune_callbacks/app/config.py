"""Checks of the app's Hydra configuration, run before anything is built or trained.

Every problem a user can make on the command line is reported as a :class:`ConfigError` whose message
is one line: the key with its value, what is wrong, and the fix (for example
``pruning.pruning_ratio=1.5: must be in (0, 1); e.g. pruning.pruning_ratio=0.5``). The app prints that
line and exits with a non-zero status instead of showing a traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..pruning.importance import IMPORTANCES
from ..pruning.naming import resolve_one
from ..pruning.schedule import SCHEDULE_KINDS

__all__ = [
    "ConfigError",
    "check_layer_names",
    "check_logger",
    "check_pruning",
    "check_schedule_fits",
    "importance_names",
    "pruning_kwargs",
]


def importance_names() -> tuple[str, ...]:
    """Names of the built-in importance criteria (the registry of :mod:`prune_callbacks.pruning.importance`)."""
    return tuple(IMPORTANCES)


def _importance_key(name: str) -> str:
    """A criterion name normalised the way the importance registry reads it (case and ``-`` ignored)."""
    key = name.strip().lower().replace("-", "_")
    return "bn_scale" if key in ("bnscale", "bn") else key


class ConfigError(ValueError):
    """A configuration mistake the user can fix; the message is a single line naming the key and the fix."""


def _fmt(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def error(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    """Build the one-line ``key=value: problem; fix`` error."""
    return ConfigError(f"{key}={_fmt(value)}: {problem}; {fix}")


def _number(key: str, value: Any, example: str) -> float:
    """``value`` as a finite float, or a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(key, value, "must be a number", f"e.g. {example}")
    return float(value)


def _epoch(key: str, value: Any) -> int:
    """``value`` as a non-negative integer epoch index, or a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(key, value, "must be an epoch index (an integer >= 0)", f"e.g. {key}=2")
    return value


def check_pruning(pruning: Mapping[str, Any]) -> None:
    """Check the ``pruning`` group: ratio or speedup, importance, schedule and head options.

    ``pruning_ratio`` (a fraction of channels in (0, 1)) takes precedence over ``target_speedup``
    (a MACs reduction factor > 1), so that ``pruning.pruning_ratio=0.5`` alone switches the default
    speedup-targeted run to a ratio-targeted one; at least one of them must be set.
    """
    ratio = pruning.get("pruning_ratio")
    speedup = pruning.get("target_speedup")
    if ratio is not None:
        value = _number("pruning.pruning_ratio", ratio, "pruning.pruning_ratio=0.5")
        if not 0.0 < value < 1.0:
            raise error("pruning.pruning_ratio", ratio, "must be in (0, 1)", "e.g. pruning.pruning_ratio=0.5")
    elif speedup is not None:
        value = _number("pruning.target_speedup", speedup, "pruning.target_speedup=2.0")
        if value <= 1.0:
            raise error(
                "pruning.target_speedup",
                speedup,
                "must be > 1 (the factor by which MACs shrink)",
                "e.g. pruning.target_speedup=2.0",
            )
    else:
        raise error(
            "pruning.pruning_ratio",
            None,
            "neither pruning.pruning_ratio nor pruning.target_speedup is set",
            "set one, e.g. pruning.pruning_ratio=0.5 or pruning.target_speedup=2.0",
        )

    importance = pruning.get("importance", "taylor")
    if isinstance(importance, str):
        names = importance_names()
        if _importance_key(importance) not in names:
            close = difflib.get_close_matches(_importance_key(importance), names, n=1)
            hint = f"did you mean pruning.importance={close[0]}? " if close else ""
            raise error(
                "pruning.importance",
                importance,
                "unknown importance",
                f"{hint}choose one of {', '.join(names)} (or a _target_ of your own Importance class)",
            )
    elif not (isinstance(importance, Mapping) and "_target_" in importance):
        raise error(
            "pruning.importance",
            importance,
            "must be a name or a config with _target_",
            "e.g. pruning.importance=taylor",
        )

    schedule = pruning.get("schedule", "linear")
    if isinstance(schedule, str) and schedule not in (*SCHEDULE_KINDS, "exponential"):
        raise error(
            "pruning.schedule", schedule, "unknown schedule", f"choose one of {', '.join(SCHEDULE_KINDS)}"
        )

    head_ratio = pruning.get("head_pruning_ratio")
    if head_ratio is not None:
        value = _number("pruning.head_pruning_ratio", head_ratio, "pruning.head_pruning_ratio=0.5")
        if not 0.0 <= value < 1.0:
            raise error(
                "pruning.head_pruning_ratio",
                head_ratio,
                "must be in [0, 1)",
                "e.g. pruning.head_pruning_ratio=0.25",
            )

    round_to = pruning.get("round_to")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise error(
            "pruning.round_to", round_to, "must be a positive integer or null", "e.g. pruning.round_to=8"
        )


def pruning_epochs(pruning: Mapping[str, Any]) -> list[int]:
    """The epochs after which the callback prunes: ``epochs``, or ``start_epoch..end_epoch`` every n."""
    epochs = pruning.get("epochs")
    if epochs is not None:
        if isinstance(epochs, int) and not isinstance(epochs, bool):
            epochs = [epochs]
        if not isinstance(epochs, Sequence) or isinstance(epochs, str) or not epochs:
            raise error(
                "pruning.epochs", epochs, "must be a non-empty list of epochs", "e.g. pruning.epochs=[2,4,6]"
            )
        values = [_epoch("pruning.epochs", e) for e in epochs]
        if sorted(set(values)) != values:
            raise error(
                "pruning.epochs", epochs, "must be strictly increasing", "e.g. pruning.epochs=[2,4,6]"
            )
        return values
    start = _epoch("pruning.start_epoch", pruning.get("start_epoch", 0))
    end = pruning.get("end_epoch")
    end = start if end is None else _epoch("pruning.end_epoch", end)
    every = pruning.get("every_n_epochs", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise error(
            "pruning.every_n_epochs", every, "must be an integer >= 1", "e.g. pruning.every_n_epochs=1"
        )
    if end < start:
        raise error(
            "pruning.end_epoch",
            end,
            f"is before pruning.start_epoch={start}",
            f"set pruning.end_epoch>={start}",
        )
    return list(range(start, end + 1, every))


def check_schedule_fits(pruning: Mapping[str, Any], max_epochs: Any) -> list[int]:
    """Check that every pruning epoch happens before ``trainer.max_epochs``; return the pruning epochs."""
    epochs = pruning_epochs(pruning)
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


def pruning_kwargs(pruning: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pruning`` group as callback arguments, with ``pruning_ratio`` taking precedence over speedup."""
    kwargs = dict(pruning)
    if kwargs.get("pruning_ratio") is not None and "target_speedup" in kwargs:
        kwargs["target_speedup"] = None
    return kwargs


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
