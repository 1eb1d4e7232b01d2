"""Checkpoints of a pruned run: the history stored once, the module hooks that replay it, conversion.

**Where the history lives.** The pruning history (the plain-data record of every prune, see
:mod:`prune_callbacks.pruning.history`) is stored once per checkpoint, under the top-level key
``"prune_callbacks_history"`` (:data:`HISTORY_KEY`), which :func:`~prune_callbacks.load_pruned`
reads. The callback state refers to it by that key (``"history_key"``) instead of holding a second
copy. Checkpoints written before (history inside the callback state only) still load:
:func:`history_from_checkpoint` falls back to it.

**Why the module's hooks.** A fresh, unpruned module must get the pruned structure *before* the
checkpoint's weights load into it, or the pruned tensors do not fit. Lightning calls
``LightningModule.on_load_checkpoint`` right before it loads the ``state_dict``
(``_CheckpointConnector.restore_model``), and callback hooks only after, so the module's own hook
is the one place where that can happen (``trainer.ckpt_path`` is not known yet in ``setup``, and
reading the file a second time there would double the load). Likewise
``LightningModule.on_save_checkpoint`` is the only hook that also runs for ``save_weights_only``
checkpoints. While pruning callbacks are attached (from their ``setup`` to their ``teardown``),
:func:`attach_checkpoint_hooks` therefore sets the two hooks on the module *instance* (the class's
own hooks still run, after ours) together with a :class:`ModuleCheckpointHooks` registry of the
attached callbacks; :func:`detach_checkpoint_hooks` removes them when the last callback leaves.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Mapping
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
import torch.nn as nn

from ...pruning.history import (
    CHECKPOINT_HISTORY_KEY,
    PRUNED_CHECKPOINT_MARKER,
    PRUNED_FORMAT,
    get_pruning_history,
    without_marker,
)
from ..state import plain

__all__ = [
    "HISTORY_KEY",
    "ModuleCheckpointHooks",
    "StructureOwner",
    "adopt_callback_state",
    "attach_checkpoint_hooks",
    "detach_checkpoint_hooks",
    "drop_marker",
    "history_from_checkpoint",
    "pruned_from_checkpoint",
    "store_history",
]

#: Top-level checkpoint key of the pruning history (shared with :func:`prune_callbacks.load_pruned`).
HISTORY_KEY = CHECKPOINT_HISTORY_KEY
_HOOKS_ATTR = "_prune_callbacks_checkpoint_hooks"


# ---------------------------------------------------------------------------------------------
# The history in a checkpoint
# ---------------------------------------------------------------------------------------------


def store_history(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Put ``module``'s pruning history under :data:`HISTORY_KEY` (the one copy in the checkpoint);
    a pruned module's ``state_dict`` also gets the marker entry that makes loading it without this
    library's help fail with an error naming ``prune_callbacks.load_pruned``
    (:data:`~prune_callbacks.pruning.history.PRUNED_CHECKPOINT_MARKER`)."""
    history = plain(get_pruning_history(module))
    checkpoint[HISTORY_KEY] = history
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        state.pop(PRUNED_CHECKPOINT_MARKER, None)
        if history:
            state[PRUNED_CHECKPOINT_MARKER] = torch.zeros(0)


def drop_marker(checkpoint: dict[str, Any]) -> None:
    """Remove the marker entry from ``checkpoint["state_dict"]`` before its weights load."""
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        state.pop(PRUNED_CHECKPOINT_MARKER, None)


def _is_pruning_state(state: Any) -> bool:
    """Whether a callback state looks like a :class:`~.callback.StructuredPruning` state."""
    return isinstance(state, Mapping) and "steps_done" in state and "prune_epochs" in state


def history_from_checkpoint(checkpoint: Mapping[str, Any], state_key: str | None = None) -> list[Any] | None:
    """The pruning history of a checkpoint (``None`` when it holds none).

    Read from :data:`HISTORY_KEY`; checkpoints written before the history was stored once kept it
    in the callback state: then the state under ``state_key``, else the only pruning-callback state
    that has one.
    """
    history = checkpoint.get(HISTORY_KEY)
    if history is not None:
        return list(history)
    states = checkpoint.get("callbacks") or {}
    state = states.get(state_key) if state_key is not None else None
    if not (isinstance(state, Mapping) and "history" in state):
        legacy = [s for s in states.values() if _is_pruning_state(s) and "history" in s]
        state = legacy[0] if len(legacy) == 1 else None
    return None if state is None else list(state["history"])


def adopt_callback_state(checkpoint: dict[str, Any], callback_class: type, state_key: str) -> None:
    """Store the checkpoint's only pruning-callback state under ``state_key`` when it has no entry
    for it, so that one attached callback resumes from it.

    The state key names the callback's settings (and was the bare class name before), so a
    checkpoint from an older version, or one resumed with changed settings, would otherwise be
    ignored and the schedule would start over. Called (only when a single pruning callback is
    attached) before Lightning restores callback states.
    """
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict) or state_key in states:
        return
    name = callback_class.__qualname__
    mine = [
        key
        for key, state in states.items()
        if isinstance(key, str) and (key == name or key.startswith(name + "{")) and _is_pruning_state(state)
    ]
    if len(mine) == 1:
        states[state_key] = states.pop(mine[0])


# ---------------------------------------------------------------------------------------------
# The module's checkpoint hooks
# ---------------------------------------------------------------------------------------------


class StructureOwner(Protocol):
    """What the module hooks need from an attached pruning callback."""

    @property
    def state_key(self) -> str: ...

    def restore_structure(self, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> None: ...


class ModuleCheckpointHooks:
    """The pruning callbacks attached to one LightningModule (weakly referenced), and what the
    module's checkpoint hooks do for them (see the module docstring for why these hooks)."""

    def __init__(self) -> None:
        self._owners: list[weakref.ReferenceType] = []

    @property
    def owners(self) -> list[StructureOwner]:
        """The attached callbacks that are still alive, in attachment order."""
        return [owner for owner in (ref() for ref in self._owners) if owner is not None]

    def add(self, owner: StructureOwner) -> None:
        """Attach ``owner`` (once)."""
        if all(owner is not other for other in self.owners):
            self._owners.append(weakref.ref(owner))

    def remove(self, owner: StructureOwner) -> None:
        """Detach ``owner`` (and forget callbacks that are gone)."""
        self._owners = [weakref.ref(o) for o in self.owners if o is not owner]

    def before_weights_load(self, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Hand an old or renamed callback state to a lone callback, then let every callback
        restore the pruned structure (the first one replays the history, the others see it done)."""
        drop_marker(checkpoint)
        owners = self.owners
        if len(owners) == 1:
            adopt_callback_state(checkpoint, type(owners[0]), owners[0].state_key)
        for owner in owners:
            owner.restore_structure(module, checkpoint)


def _on_load_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Instance hook: replay the structure before the weights load, then the class's own hook."""
    hooks = module.__dict__.get(_HOOKS_ATTR)
    if isinstance(hooks, ModuleCheckpointHooks):
        hooks.before_weights_load(module, checkpoint)
    type(module).on_load_checkpoint(module, checkpoint)


def _on_save_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Instance hook: the class's own hook, then the history (weights-only checkpoints included)."""
    type(module).on_save_checkpoint(module, checkpoint)
    store_history(checkpoint, module)


def attach_checkpoint_hooks(module: pl.LightningModule, owner: StructureOwner) -> None:
    """Install the checkpoint hooks on ``module`` (once) and register ``owner`` with them."""
    hooks = module.__dict__.get(_HOOKS_ATTR)
    if not isinstance(hooks, ModuleCheckpointHooks):
        hooks = module.__dict__[_HOOKS_ATTR] = ModuleCheckpointHooks()
        # instance attributes shadow the class's hooks (which ours call); removed on detach
        module.__dict__["on_load_checkpoint"] = types.MethodType(_on_load_checkpoint, module)
        module.__dict__["on_save_checkpoint"] = types.MethodType(_on_save_checkpoint, module)
    hooks.add(owner)


def detach_checkpoint_hooks(module: pl.LightningModule, owner: StructureOwner) -> None:
    """Unregister ``owner``; remove the hooks from ``module`` when no callback is left."""
    hooks = module.__dict__.get(_HOOKS_ATTR)
    if not isinstance(hooks, ModuleCheckpointHooks):
        return
    hooks.remove(owner)
    if not hooks.owners:
        for name in (_HOOKS_ATTR, "on_load_checkpoint", "on_save_checkpoint"):
            module.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion
# ---------------------------------------------------------------------------------------------


def pruned_from_checkpoint(checkpoint: str | Any | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A Lightning checkpoint of a pruned run as a :func:`~prune_callbacks.load_pruned` payload.

    ``prefix`` (e.g. ``"model."``) selects the submodule of the LightningModule to extract: history
    names and state-dict keys are kept only under it and stripped of it, so
    ``load_pruned(MyNet(), pruned_from_checkpoint(path, prefix="model."))`` rebuilds the bare
    network. The file is read with ``torch.load(weights_only=True)``.
    """
    if isinstance(checkpoint, Mapping):
        data = checkpoint
    else:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "state_dict" not in data:
        raise ValueError("not a Lightning checkpoint: it has no 'state_dict' entry")
    history = history_from_checkpoint(data) or []

    def strip(name: str) -> str:
        if not name.startswith(prefix):
            raise ValueError(
                f"pruning record names {name!r}, outside prefix {prefix!r}: the pruned channels reach beyond "
                "that submodule, so it cannot be rebuilt on its own; load the whole LightningModule instead"
            )
        return name[len(prefix) :]

    records = []
    for rec in history:
        rec = plain(rec)
        rec["root"] = strip(rec["root"])
        for item in rec.get("items", []):
            item["target"] = strip(item["target"])
        for attr in rec.get("attributes", []):
            attr["module"] = strip(attr["module"])
        records.append(rec)
    weights = without_marker(data["state_dict"])
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    return {"format": PRUNED_FORMAT, "history": records, "state_dict": state}
