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

A second kind of record gives layers a bias they did not have (FLAP's bias compensation with
``add_bias=True`` adds one to a consumer without a bias; :func:`bias_record`)::

    {"kind": "add_bias", "root": "layers.0.mlp.down_proj", "function": "add_bias", "idxs": [],
     "items": [{"target": "layers.0.mlp.down_proj", "function": "add_bias", "dim": None, "idxs": []}],
     "attributes": []}

Replayed, each item gives its target, an ``nn.Linear`` without a bias, a zero bias of its current
output width (the values come with the state dict), so ``load_pruned``, ``apply_pruning_history``
and a resumed Lightning run rebuild the bias and the weights load strictly. Histories written
before this record existed have none and replay as before.

A file is untrusted data, and a load either succeeds or changes nothing: :func:`save_pruned` stores
a SHA-256 digest of every tensor, which :func:`load_pruned` checks before it touches the model (a
damaged file is refused, naming the tensors); every history record is checked first too (items
name modules or parameters of the model, attribute changes only set int sizes of its modules or
their config, never classes, methods or private state); a model pruned differently from the file
is refused; and replay plus weight loading run as one transaction that puts the model back
exactly as it was on any failure, ``KeyboardInterrupt`` included.

The pruner keeps the history of a model on the model itself (:func:`get_pruning_history`), so
``save_pruned(model, path)`` needs nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import keyword
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn as nn

from ..graph.attributes import SHARED_HOLDER_ATTR
from ..graph.dependency import Snapshot
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
    "ADD_BIAS",
    "CHECKPOINT_HISTORY_KEY",
    "HISTORY_ATTRIBUTE",
    "ModelTransaction",
    "PRUNED_CHECKPOINT_MARKER",
    "PRUNED_FORMAT",
    "apply_pruning_history",
    "bias_record",
    "get_pruning_history",
    "load_pruned",
    "save_pruned",
    "state_dict_digests",
    "tensor_digest",
    "without_marker",
]

HISTORY_ATTRIBUTE = "_prune_callbacks_history"
#: The ``kind`` of a record, and the ``function`` of its items, that give layers a zero bias.
ADD_BIAS = "add_bias"
PRUNED_FORMAT = "prune_callbacks.pruned/1"
#: Key of the history in a Lightning checkpoint written with the pruning callback.
CHECKPOINT_HISTORY_KEY = "prune_callbacks_history"
#: An (empty) entry of a pruned Lightning checkpoint's ``state_dict``. Loading the checkpoint
#: into an unpruned module without this library's help (``load_from_checkpoint`` or
#: ``Trainer.validate(ckpt_path=...)`` on a module without the ``PrunedCheckpoints`` mixin, with
#: no pruning callback attached) fails on the smaller tensors anyway; the entry makes torch's
#: error list this key among the unexpected ones, so that the error says how to load the file.
#: Everything here that reads a checkpoint drops it (:func:`without_marker`).
PRUNED_CHECKPOINT_MARKER = (
    "prune_callbacks: a pruned checkpoint; load it with prune_callbacks.load_pruned(module, path), "
    "or add the PrunedCheckpoints mixin to the LightningModule"
)


def without_marker(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without :data:`PRUNED_CHECKPOINT_MARKER`."""
    return {k: v for k, v in state.items() if k != PRUNED_CHECKPOINT_MARKER}


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


def bias_record(names: Sequence[str]) -> dict[str, Any]:
    """A history record that gives each layer of ``names`` (an ``nn.Linear`` without a bias) a
    zero bias when replayed (see the module docstring); appended by FLAP's bias compensation
    after the prune records of the step that added the biases."""
    layers = [str(n) for n in names]
    if not layers:
        raise ValueError("bias_record(): name at least one layer")
    return {
        "kind": ADD_BIAS,
        "root": layers[0],
        "function": ADD_BIAS,
        "idxs": [],
        "items": [{"target": n, "function": ADD_BIAS, "dim": None, "idxs": []} for n in layers],
        "attributes": [],
    }


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
    name) names a plain object the module holds, such as a config shared by its layers.
    Records are checked by :func:`_check_records` first, so only those names reach here."""
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


# ---------------------------------------------------------------------------------------------
# Checking a history before it touches anything
# ---------------------------------------------------------------------------------------------

_SIZE_ONLY = "only int or tuple-of-int size attributes of the model's modules may be set"


def _is_size(value: Any) -> bool:
    """An int (not a bool) or a list/tuple of them: the only values a history may set."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _is_plain_object(obj: Any) -> bool:
    """Whether ``obj`` is plain data holding sizes (a config), not code, a class, a Python module,
    an ``nn.Module`` or a tensor, whose attributes a history must never reach."""
    kinds = (type, types.ModuleType, nn.Module, torch.Tensor)
    return obj is not None and not isinstance(obj, kinds) and not callable(obj)


def _attribute_holder(name: Any, modules: Mapping[str, nn.Module]) -> Any:
    """The object an attribute record may change: a module of the model (``""`` is the model) or
    the plain object a module holds as ``config`` (``"<module>.config"``, or ``"config"`` for the
    model's own); None for any other path."""
    if not isinstance(name, str):
        return None
    if name in modules:
        return modules[name]
    owner, dot, last = name.rpartition(".")
    if last != SHARED_HOLDER_ATTR or owner not in modules or (dot and not owner):
        return None
    holder = getattr(modules[owner], SHARED_HOLDER_ATTR, None)
    return holder if _is_plain_object(holder) else None


def _check_attribute(r: int, change: Any, modules: Mapping[str, nn.Module]) -> None:
    """Refuse an attribute record that could do more than resize a layer (see :func:`_check_records`)."""
    if not isinstance(change, Mapping):
        raise ValueError(f"history record {r}: attribute change {change!r} is not a mapping")
    name, attr, new = change.get("module"), change.get("attr"), change.get("new")
    path = f"{name}.{attr}" if name else str(attr)

    def refuse(why: str) -> ValueError:
        return ValueError(f"history record {r} sets {path!r}: {_SIZE_ONLY} ({why})")

    holder = _attribute_holder(name, modules)
    if holder is None:
        raise refuse(f"{name!r} is neither a module of the model nor the plain config a module holds")
    if not isinstance(attr, str) or not attr.isidentifier() or keyword.iskeyword(attr) or attr[0] == "_":
        raise refuse(f"{attr!r} is not a public attribute name")
    if not _is_size(new):
        raise refuse(f"the new value {new!r} is not one")
    try:
        current = getattr(holder, attr, None)
    except Exception as e:  # noqa: BLE001 - a property that fails: not a plain size attribute
        raise refuse(f"reading it fails: {e}") from e
    if current is not None and not _is_size(current):
        raise refuse(f"its current value is a {type(current).__name__}")


def _check_bias_item(
    r: int, item: Mapping[str, Any], modules: Mapping[str, nn.Module], replayed: bool, biased: set[str]
) -> None:
    """Refuse an ``add_bias`` item that names no ``nn.Linear`` of the model, carries indices, or
    (when ``replayed``: the record is still to be replayed) names a layer that has a bias already
    or is given one by an earlier record. ``biased`` collects the layers given one."""
    target = str(item.get("target"))
    module = modules.get(target)
    if not isinstance(module, nn.Linear):
        what = "no layer of the model" if module is None else f"a {type(module).__name__}"
        raise ValueError(f"history record {r}: add_bias on {target!r}: it is {what}, not an nn.Linear")
    if item.get("idxs"):
        raise ValueError(f"history record {r}: add_bias on {target!r} carries indices; it takes none")
    if not replayed:
        return
    if module.bias is not None or target in biased:
        raise ValueError(
            f"history record {r}: add_bias on {target!r}, which has a bias already; the history gives it "
            "one (a file written since FLAP's biases are recorded needs no add_biases() call): pass a "
            "freshly constructed model"
        )
    biased.add(target)


def _check_records(
    history: Sequence[Any],
    modules: Mapping[str, nn.Module],
    params: Mapping[str, nn.Parameter],
    start: int = 0,
) -> None:
    """Check every record of ``history`` against the model before anything is touched.

    A history comes from a file, so it is untrusted data: each pruned item must name a module or a
    parameter of the model, and each attribute change must set a public, non-callable size
    attribute (an int or a list/tuple of ints, currently one too or missing) of a module of the
    model or of the plain ``config`` object a module holds, to an int or a list/tuple of ints.
    That keeps a damaged or crafted file from reaching classes (``0.__class__``), instance
    dictionaries, methods or anything outside the model. An ``add_bias`` item must name an
    ``nn.Linear`` and, in the records from ``start`` on (those still to be replayed; a model
    already pruned along the first ``start`` records has their biases), one without a bias that
    no earlier record gives one. Raises ``KeyError`` for an unknown item target and
    ``ValueError`` for anything else.
    """
    biased: set[str] = set()
    for r, record in enumerate(history):
        if not isinstance(record, Mapping):
            raise ValueError(f"history record {r} is a {type(record).__name__}, not a mapping")
        for item in record.get("items", []):
            target = item.get("target") if isinstance(item, Mapping) else None
            if not isinstance(target, str) or (target not in modules and target not in params):
                raise KeyError(f"history record {r}: the model has no module or parameter named {target!r}")
            if item.get("function") == ADD_BIAS:
                _check_bias_item(r, item, modules, r >= start, biased)
        for change in record.get("attributes", []):
            _check_attribute(r, change, modules)


# ---------------------------------------------------------------------------------------------
# Changing a model as one transaction
# ---------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[torch.device, int] | None:
    """Where ``t``'s values live (device, storage address); None for tensors without values."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None
    return (t.device, ptr) if ptr else None


class ModelTransaction:
    """Puts a model back exactly as it was when a change to it fails, whatever the failure
    (``KeyboardInterrupt`` included: it is a context manager that rolls back on any exception).

    It keeps a :class:`~prune_callbacks.graph.dependency.Snapshot` of the model (its tensors,
    parameters, attributes and the configs its modules hold, by reference), the length of the
    model's history and of the parameter-update log of ``track_parameter_updates``, and, after
    :meth:`protect_values`, copies of the values that an in-place ``load_state_dict`` would
    overwrite in tensors the snapshot holds. History replay, ``load_pruned`` and
    ``Pruner.step`` are such transactions.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved = Snapshot()
        self.saved.keep(model)
        self.history_length = len(get_pruning_history(model))
        self.log = recorded_updates()
        self.mark = len(self.log) if self.log is not None else 0
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> ModelTransaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if kind is not None:
            self.rollback()

    def protect_values(self) -> None:
        """Copy the current values of the model's state tensors that the snapshot also holds.

        ``load_state_dict`` copies into the existing parameters and buffers in place, and the
        snapshot only keeps references, so these values would otherwise be lost on a failure.
        Tensors the replay already replaced (every pruned one) are new: the snapshot holds the old
        ones, untouched, so they need no copy. The copies take at most the memory of the unpruned
        tensors and live only until the transaction ends.
        """
        # the storages the snapshot keeps: a replay swaps tensors, so any tensor found on one of
        # them now is one whose values an in-place write would change for the snapshot too
        storages = {key for key in map(_storage_key, self.saved.tensors()) if key is not None}
        seen: set[int] = set()
        for t in self.model.state_dict(keep_vars=True).values():
            if not isinstance(t, torch.Tensor) or id(t) in seen or t.numel() == 0:
                continue
            seen.add(id(t))
            key = _storage_key(t)
            if key is None or key in storages:
                self.values.append((t, t.detach().clone()))

    def rollback(self) -> None:
        """Put the model (values, tensors, attributes, configs, history) and the update log back."""
        self.saved.restore()
        with torch.no_grad():
            for t, value in self.values:
                t.copy_(value)
        del get_pruning_history(self.model)[self.history_length :]
        if self.log is not None:
            del self.log[self.mark :]  # undone: the optimizer state must not follow


def _replay(
    model: nn.Module,
    history: Sequence[Mapping[str, Any]],
    table: Mapping[str, PruningFunction],
    check: ForwardCheck | None,
) -> None:
    """Apply ``history`` (already checked) to ``model``, inside a :class:`ModelTransaction` (a
    config the records change is one the model's snapshot holds); see
    :func:`apply_pruning_history`."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for r, record in enumerate(history):
        steps: list[tuple[PruningFunction | None, Mapping[str, Any]]] = []
        for item in record.get("items", []):
            fn = None if item["function"] == ADD_BIAS else _resolve_function(item["function"], table)
            steps.append((fn, item))
        # output sides first (as the graph prunes), new biases last (they take the final width)
        steps.sort(key=lambda s: 2 if s[0] is None else int(getattr(s[0], "side", "out") != "out"))
        with once_per_parameter():
            for fn, item in steps:
                target = _lookup(model, item["target"], modules, params)
                if fn is None:
                    _add_zero_bias(r, item["target"], target)
                    continue
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
            holder = _lookup(model, attr["module"], modules, params)
            new = attr["new"]
            if isinstance(getattr(holder, attr["attr"], None), tuple) and isinstance(new, list):
                new = tuple(new)
            setattr(holder, attr["attr"], new)
    problem = check.problem() if check is not None else None
    if problem is not None:
        raise ValueError(f"the replayed pruning history breaks the model: {problem}")


def _add_zero_bias(r: int, name: str, module: Any) -> None:
    """Replay an ``add_bias`` item: a zero bias for ``module`` (checked: an ``nn.Linear``; the
    replay fails, and is undone, if it has one by now)."""
    if not isinstance(module, nn.Linear) or module.bias is not None:
        raise ValueError(f"pruning history record {r}: add_bias on {name!r} failed: it has a bias already")
    weight = module.weight
    module.bias = nn.Parameter(
        torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype),
        requires_grad=weight.requires_grad,
    )


def apply_pruning_history(
    model: nn.Module,
    history: Sequence[Mapping[str, Any]],
    customized_pruners: Mapping[type, LayerPruner] | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Replay ``history`` on ``model`` (freshly constructed, unpruned) and return it.

    Every record is checked first, before anything changes (:func:`_check_records`: items name
    modules or parameters of the model, attribute changes only set int sizes of its modules or
    their config). Each record's items are applied with the pruning function they name, output
    sides first as the graph does, inside :func:`once_per_parameter` (tied weights are sliced
    once); bare parameters are pruned along their recorded ``dim``; recorded attribute changes
    (split sizes) are set. Parameter values are whatever the model has; load the pruned
    ``state_dict`` after; ``add_bias`` records give layers a zero bias (see the module
    docstring). The records are appended to the model's own history. On any failure
    (``KeyboardInterrupt`` included) the model is restored; a failing layer gives a
    ``ValueError`` naming the record and layer. With ``example_inputs`` the replay is verified:
    the model must still run on them with outputs of the same shapes as before (on meta tensors
    where it can), else it is restored and a ``ValueError`` says what failed.
    """
    _check_records(history, dict(model.named_modules()), dict(model.named_parameters()))
    records = copy.deepcopy([dict(h) for h in history])
    check = ForwardCheck.of_dense(model, example_inputs) if example_inputs is not None else None
    table = _function_table(customized_pruners)
    with ModelTransaction(model):
        _replay(model, history, table, check)
        get_pruning_history(model, create=True).extend(records)
    return model


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and raw bytes, for any dtype (bfloat16 included).

    The bytes are those of the tensor on the CPU, contiguous, viewed as ``uint8``, so the digest
    does not depend on the device or the strides it was saved from.
    """
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.dequantize()
    raw = t.cpu().contiguous().reshape(-1).view(torch.uint8)
    h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(raw.numpy().data)  # the array's buffer, no copy
    return h.hexdigest()


def state_dict_digests(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """:func:`tensor_digest` of every tensor of ``state_dict``, by key (plain strings)."""
    return {str(k): tensor_digest(v) for k, v in state_dict.items()}


def _matches(tensor: Any, digest: Any) -> bool:
    """Whether ``tensor`` is a tensor whose :func:`tensor_digest` is ``digest``."""
    return isinstance(tensor, torch.Tensor) and isinstance(digest, str) and tensor_digest(tensor) == digest


def _first(items: Sequence[str], n: int = 3, sep: str = ", ") -> str:
    """The first ``n`` of ``items``, joined by ``sep``, and how many more there are."""
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _verify_digests(data: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Refuse a file whose tensors differ from the digests saved with them (files written
    before digests existed, and Lightning checkpoints, have none and are not checked)."""
    digests = data.get("digests")
    if digests is None:
        return
    if not isinstance(digests, Mapping):
        raise ValueError("the digests saved in the file are not a mapping: the file is damaged")
    damaged = [k for k, t in state.items() if not _matches(t, digests.get(k))]
    if len(damaged) == 1:
        raise ValueError(
            f"tensor {damaged[0]!r} does not match the digest saved with it: the file is damaged"
        )
    if damaged:
        names = _first([repr(k) for k in damaged], 5)
        raise ValueError(f"tensors {names} do not match the digests saved with them: the file is damaged")
    lost = [k for k in digests if k not in state]
    if lost:
        raise ValueError(f"tensor {lost[0]!r} has a digest but is missing from the file: the file is damaged")


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike | Any,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Save ``model``'s tensors and pruning history to ``path`` (a path or a file object).

    ``history`` defaults to the history the pruner kept on the model. The file holds only a dict
    of plain containers and tensors, so ``torch.load(path, weights_only=True)`` can read it; with
    them, ``"digests"`` maps every state-dict key to its :func:`tensor_digest`, which
    :func:`load_pruned` checks so that a damaged file is refused instead of loaded.
    Returns the saved dict.
    """
    hist = get_pruning_history(model) if history is None else history
    state = {k: v.detach() for k, v in model.state_dict().items()}
    payload = {
        "format": PRUNED_FORMAT,
        "history": _plain(list(hist)),
        "state_dict": state,
        "digests": state_dict_digests(state),
    }
    torch.save(payload, path)
    return payload


def _read_pruned(data: Any) -> tuple[list[Any], Mapping[str, Any]]:
    """The history and state dict of a loaded file; ``ValueError`` when it is not one."""
    history = None
    if isinstance(data, Mapping):
        history = data.get("history", data.get(CHECKPOINT_HISTORY_KEY))
    if history is None or not isinstance(data.get("state_dict"), Mapping):
        raise ValueError(
            "not a pruned-model file written by save_pruned, nor a Lightning checkpoint of a pruned "
            f"model (no 'state_dict' with 'history' / {CHECKPOINT_HISTORY_KEY!r} entries)"
        )
    fmt = data.get("format", PRUNED_FORMAT)
    if fmt != PRUNED_FORMAT:
        raise ValueError(f"unsupported pruned-model format {fmt!r} (expected {PRUNED_FORMAT!r})")
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"the file's pruning history is a {type(history).__name__}, not a list")
    return list(history), without_marker(data["state_dict"])


def _misfit(model: nn.Module, state: Mapping[str, Any], strict: bool, error: Exception) -> str:
    """Why ``state`` does not load into ``model``: the first few keys that differ, with shapes."""

    def shape(t: Any) -> str:
        return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__

    own = model.state_dict(keep_vars=True)
    sizes = [
        f"{k!r} {shape(v)} in the file, {shape(own[k])} in the model"
        for k, v in state.items()
        if k in own and shape(v) != shape(own[k])
    ]
    parts = [f"size mismatch for {_first(sizes, sep='; ')}"] if sizes else []
    if strict:
        missing = [f"{k!r} {shape(v)}" for k, v in own.items() if k not in state]
        unexpected = [f"{k!r} {shape(v)}" for k, v in state.items() if k not in own]
        parts += [f"missing from the file: {_first(missing)}"] if missing else []
        parts += [f"not in the model: {_first(unexpected)}"] if unexpected else []
    details = "; ".join(parts) or str(error).strip().splitlines()[-1].strip()
    return (
        f"load_pruned: the file's state dict does not fit this {type(model).__name__} once its pruning "
        f"history is replayed (was it constructed with other arguments?): {details}. "
        "The model was left unchanged"
    )


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

    Before ``model`` is touched: every tensor is checked against the digest saved with it (files
    without digests, older ones and Lightning checkpoints, skip this), every history record is
    checked (:func:`apply_pruning_history`), and a model that already has a pruning history must
    have one the file's history starts with (only the rest is replayed); one pruned differently
    is refused. Replay and weight loading are then one transaction: on any failure, a state dict
    that does not fit the replayed model (a model constructed with other arguments) as much as a
    ``KeyboardInterrupt``, ``model`` is put back exactly as it was (parameter objects, values,
    buffers, attributes, history) and the error is raised (a ``ValueError`` for a misfit, saying
    which keys and shapes differ).

    How values are restored: the replay only swaps tensors, and a snapshot keeps the old ones by
    reference. ``load_state_dict`` however writes into the model's tensors in place, so right
    before it the values of the tensors the replay left in place (the unpruned ones, which the
    snapshot shares) are copied; the new, pruned tensors need no copy since the snapshot does not
    hold them. This keeps ``load_state_dict``'s own semantics (in-place copies, dtype and device of
    the model, its hooks) at the cost of one temporary copy of the unpruned tensors at most.
    """
    if isinstance(path_or_dict, Mapping):
        data = path_or_dict
    else:
        data = torch.load(path_or_dict, map_location=map_location, weights_only=True)
    history, state = _read_pruned(data)
    _verify_digests(data, state)
    current = _plain(get_pruning_history(model))
    done = len(current)
    if current != _plain(history[:done]):
        raise ValueError(
            f"load_pruned: the target {type(model).__name__} is pruned differently from the file (it "
            f"has {done} pruning record(s) that the file's history does not start with); pass a "
            "freshly constructed model"
        )
    rest = history[done:]
    _check_records(history, dict(model.named_modules()), dict(model.named_parameters()), start=done)
    records = copy.deepcopy(rest)
    check = ForwardCheck.of_dense(model, example_inputs) if example_inputs is not None and rest else None
    table = _function_table(customized_pruners)
    with ModelTransaction(model) as transaction:
        _replay(model, rest, table, check)
        transaction.protect_values()
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as e:
            raise ValueError(_misfit(model, state, strict, e)) from e
        get_pruning_history(model, create=True).extend(records)
    return model
