"""Pruning history: replay a pruned structure on a fresh model, and save/load pruned models.

Every group prune is recorded by the dependency graph as plain data (see
:meth:`DependencyGraph.history_record`)::

    {"root": "layer1.0.conv1", "function": "prune_conv_out_channels", "idxs": [...],
     "items": [{"target": "layer1.0.conv1", "function": "prune_conv_out_channels",
                "dim": None, "idxs": [...]}, ...],
     "attributes": [{"module": "block", "attr": "split_sizes", "new": [12, 20]}]}

Indices are in the layer's numbering at the time of the prune, so records are replayed in order.
:func:`apply_pruning_history` rebuilds the pruned structure on a freshly constructed model (same
class, same constructor arguments), after which a pruned ``state_dict`` loads into it.
:func:`save_pruned` / :func:`load_pruned` store plain tensors plus the history, so the file
loads with ``torch.load(path, weights_only=True)``: no pickled modules, no code run on load.

The pruner keeps the history of a model on the model itself (:func:`get_pruning_history`), so
``save_pruned(model, path)`` needs nothing else.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn as nn

from ..graph.dependency import snapshot
from ..graph.verify import ForwardCheck
from ..layers import (
    LayerPruner,
    ParameterPruningFunction,
    PruningFunction,
    function_by_name,
    get_pruning_functions,
    once_per_parameter,
    recorded_updates,
)

__all__ = [
    "CHECKPOINT_HISTORY_KEY",
    "HISTORY_ATTRIBUTE",
    "PRUNED_FORMAT",
    "apply_pruning_history",
    "get_pruning_history",
    "load_pruned",
    "save_pruned",
]

HISTORY_ATTRIBUTE = "_prune_callbacks_history"
PRUNED_FORMAT = "prune_callbacks.pruned/1"
#: Key of the history in a Lightning checkpoint written with the pruning callback.
CHECKPOINT_HISTORY_KEY = "prune_callbacks_history"


def get_pruning_history(model: nn.Module, create: bool = False) -> list[dict[str, Any]]:
    """The pruning history kept on ``model`` (an empty list if it was never pruned).

    With ``create=True`` the list is attached to the model when missing and the attached list
    itself is returned, so records appended to it stay with the model (deep copies included).
    """
    hist = model.__dict__.get(HISTORY_ATTRIBUTE)
    if hist is None:
        hist = []
        if create:
            model.__dict__[HISTORY_ATTRIBUTE] = hist
    return hist


def _plain(obj: Any, where: str = "history") -> Any:
    """Deep copy of ``obj`` made only of dict/list/str/int/float/bool/None (tuples -> lists)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1 and not obj.is_floating_point():
        return int(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "__index__"):
        return int(obj.__index__())
    raise TypeError(f"{where}: {type(obj).__name__} is not plain data")


def _function_table(customized_pruners: Mapping[type, LayerPruner] | None) -> dict[str, PruningFunction]:
    table: dict[str, PruningFunction] = {}
    for pruner in (customized_pruners or {}).values():
        for fn in get_pruning_functions(pruner):
            table[fn.__name__] = fn
    return table


def _resolve_function(name: str, table: Mapping[str, PruningFunction]) -> PruningFunction:
    if name in table:
        return table[name]
    try:
        return function_by_name(name)
    except KeyError:
        raise KeyError(
            f"pruning function {name!r} is not a built-in one: pass the customized pruners the model "
            "was pruned with (customized_pruners={ModuleClass: pruner})"
        ) from None


def _lookup(model: nn.Module, name: str, modules: dict, params: dict) -> Any:
    """A module or parameter by name; ``<module>.config`` (an attribute path after a module
    name) names a plain object the module holds, such as a config shared by its layers."""
    if name in modules:
        return modules[name]
    if name in params:
        return params[name]
    prefix, path = name, list[str]()
    while prefix and prefix not in modules:
        prefix, _, last = prefix.rpartition(".")
        path.insert(0, last)
    obj: Any = modules.get(prefix, model)
    for attr in path:
        obj = getattr(obj, attr, None)
        if obj is None or isinstance(obj, (nn.Module, torch.Tensor)):
            break
    else:
        return obj
    raise KeyError(f"the model has no module or parameter named {name!r}")


def apply_pruning_history(
    model: nn.Module,
    history: Sequence[Mapping[str, Any]],
    customized_pruners: Mapping[type, LayerPruner] | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Replay ``history`` on ``model`` (freshly constructed, unpruned) and return it.

    Each record's items are applied with the pruning function they name, output sides first as
    the graph does, inside :func:`once_per_parameter` (tied weights are sliced once); bare
    parameters are pruned along their recorded ``dim``; recorded attribute changes (split sizes)
    are set. Parameter values are whatever the model has; load the pruned ``state_dict`` after.
    The records are appended to the model's own history. On failure the model is restored and a
    ``ValueError`` names the record and layer. With ``example_inputs`` the replay is verified:
    the model must still run on them with outputs of the same shapes as before (on meta tensors
    where it can), else it is restored and a ``ValueError`` says what failed.
    """
    check = ForwardCheck.of_dense(model, example_inputs) if example_inputs is not None else None
    table = _function_table(customized_pruners)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    restores = [snapshot([model])]
    log = recorded_updates()
    mark = len(log) if log is not None else 0
    held: set[int] = set()
    try:
        for r, record in enumerate(history):
            steps = []
            for item in record.get("items", []):
                fn = _resolve_function(item["function"], table)
                steps.append((fn, item))
            steps.sort(key=lambda s: getattr(s[0], "side", "out") != "out")
            with once_per_parameter():
                for fn, item in steps:
                    target = _lookup(model, item["target"], modules, params)
                    try:
                        if isinstance(target, nn.Parameter) and isinstance(fn, ParameterPruningFunction):
                            # the layer pruners take a bare Parameter as their "module"
                            fn(cast(Any, target), item["idxs"], dim=item.get("dim"))
                        else:
                            fn(target, item["idxs"])
                    except Exception as e:  # noqa: BLE001 - re-raised with context below
                        where = f"{item['function']} on {item['target']!r}"
                        raise ValueError(f"pruning history record {r}: {where} failed: {e}") from e
            for attr in record.get("attributes", []):
                module = _lookup(model, attr["module"], modules, params)
                if not isinstance(module, nn.Module) and id(module) not in held:
                    held.add(id(module))  # a shared config: restored on failure too
                    restores.append(snapshot([module]))
                new = attr["new"]
                if isinstance(getattr(module, attr["attr"], None), tuple) and isinstance(new, list):
                    new = tuple(new)
                setattr(module, attr["attr"], new)
        problem = check.problem() if check is not None else None
        if problem is not None:
            raise ValueError(f"the replayed pruning history breaks the model: {problem}")
    except BaseException:
        for restore in restores:
            restore()
        if log is not None:
            del log[mark:]  # undone: the optimizer state must not follow
        raise
    get_pruning_history(model, create=True).extend(copy.deepcopy([dict(h) for h in history]))
    return model


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike | Any,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Save ``model``'s tensors and pruning history to ``path`` (a path or a file object).

    ``history`` defaults to the history the pruner kept on the model. The file holds only a dict
    of plain containers and tensors, so ``torch.load(path, weights_only=True)`` can read it.
    Returns the saved dict.
    """
    hist = get_pruning_history(model) if history is None else history
    payload = {
        "format": PRUNED_FORMAT,
        "history": _plain(list(hist)),
        "state_dict": {k: v.detach() for k, v in model.state_dict().items()},
    }
    torch.save(payload, path)
    return payload


def load_pruned(
    model: nn.Module,
    path_or_dict: str | os.PathLike | Any | Mapping[str, Any],
    strict: bool = True,
    customized_pruners: Mapping[type, LayerPruner] | None = None,
    map_location: Any = "cpu",
    example_inputs: Any = None,
) -> nn.Module:
    """Load a file written by :func:`save_pruned` into a freshly constructed ``model``.

    The file is read with ``torch.load(..., weights_only=True)`` (a dict already loaded can be
    passed instead); the pruning history is replayed on ``model``, then the state dict is loaded
    (``strict`` by default). A Lightning checkpoint of a pruned ``LightningModule`` (history under
    ``"prune_callbacks_history"``) loads into a fresh instance of that module the same way.
    With ``example_inputs`` the replayed model is verified on them before the weights are loaded
    (see :func:`apply_pruning_history`). Returns ``model``.
    """
    if isinstance(path_or_dict, Mapping):
        data = path_or_dict
    else:
        data = torch.load(path_or_dict, map_location=map_location, weights_only=True)
    history = None
    if isinstance(data, Mapping):
        history = data.get("history", data.get(CHECKPOINT_HISTORY_KEY))
    if history is None or "state_dict" not in data:
        raise ValueError(
            "not a pruned-model file written by save_pruned, nor a Lightning checkpoint of a pruned "
            f"model (no 'state_dict' with 'history' / {CHECKPOINT_HISTORY_KEY!r} entries)"
        )
    fmt = data.get("format", PRUNED_FORMAT)
    if fmt != PRUNED_FORMAT:
        raise ValueError(f"unsupported pruned-model format {fmt!r} (expected {PRUNED_FORMAT!r})")
    apply_pruning_history(model, history, customized_pruners, example_inputs)
    model.load_state_dict(data["state_dict"], strict=strict)
    return model
