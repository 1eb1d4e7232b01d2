"""What every training-framework callback keeps of a pruning run, framework-neutral: plain data
for checkpoints, the history replayed on a fresh model, the criterion's state, and the check of
``pruner_kwargs``. Shared by the Lightning (:mod:`.lightning`) and Hugging Face (:mod:`.hf`)
callbacks; imports neither framework.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn

from ..pruning.history import apply_pruning_history, get_pruning_history
from ..pruning.pruner import Pruner
from ..pruning.settings import PruningSettings, SettingsError

__all__ = [
    "PRUNER_ARGS",
    "SETTING_NAMES",
    "check_pruner_kwargs",
    "importance_state",
    "load_importance_state",
    "plain",
    "replay_history",
]

#: The fields of :class:`~prune_callbacks.pruning.settings.PruningSettings`.
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(PruningSettings))
#: The Pruner arguments that ``pruner_kwargs`` may hold (the others are settings, model or inputs).
PRUNER_ARGS = tuple(
    name
    for name in inspect.signature(Pruner).parameters
    if name not in ("model", "example_inputs", "settings") and name not in SETTING_NAMES
)


def plain(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with tuples as lists (safe for ``weights_only`` loading)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def replay_history(
    module: nn.Module,
    history: Sequence[Mapping[str, Any]] | None,
    customized_pruners: Any = None,
    example_inputs: Any = None,
) -> bool:
    """Give ``module`` the structure recorded in ``history``; True when records were applied.
    With ``example_inputs`` the replay is verified on them (see ``apply_pruning_history``).

    ``module`` may already be pruned along a prefix of the history (a resume in the same process,
    or another callback replayed it first): only the records after that prefix are applied. A
    module pruned differently is refused before anything changes.
    """
    if not history:
        return False
    current = plain(get_pruning_history(module))
    n = len(current)
    if current != plain(list(history[:n])):
        raise ValueError(
            f"{type(module).__name__} was already pruned differently from the checkpoint "
            f"({n} pruning records that the checkpoint does not start with); pass a freshly "
            "constructed, unpruned module to resume from this checkpoint"
        )
    if n >= len(history):
        return False
    apply_pruning_history(module, list(history[n:]), customized_pruners, example_inputs)
    return True


def importance_state(importance: Any, model: nn.Module) -> dict[str, Any] | None:
    """The criterion's state for a checkpoint (gradient statistics by parameter name in ``model``,
    a random generator), through :meth:`~prune_callbacks.pruning.importance.Importance.state_dict`;
    ``None`` for criteria without one (plain callables) or with nothing to save."""
    save = getattr(importance, "state_dict", None)
    if not callable(save):
        return None
    return save(model) or None


def load_importance_state(importance: Any, model: nn.Module, state: Mapping[str, Any] | None) -> None:
    """Restore :func:`importance_state` onto the parameters of ``model`` (names that no longer fit
    are skipped by the criterion)."""
    load = getattr(importance, "load_state_dict", None)
    if state and callable(load):
        load(state, model)


def check_pruner_kwargs(kwargs: Mapping[str, Any] | None, callback: str) -> dict[str, Any]:
    """``pruner_kwargs`` as a dict of Pruner arguments that are not settings (those have one
    place: the callback's own arguments); anything else is refused, before training."""
    out = dict(kwargs or {})
    for key, value in out.items():
        if key in SETTING_NAMES:
            raise SettingsError(
                f"pruner_kwargs[{key}]",
                value,
                "is a pruning setting",
                f"pass {key}= to {callback} itself (or in settings=)",
            )
        if key not in PRUNER_ARGS:
            close = difflib.get_close_matches(key, PRUNER_ARGS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SettingsError(
                f"pruner_kwargs[{key}]",
                value,
                "is not a Pruner argument",
                f"{hint}choose one of {', '.join(PRUNER_ARGS)}",
            )
    return out
