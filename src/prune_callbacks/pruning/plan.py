"""Meta-first pruning for big models: plan on a weightless copy, apply to the real weights in place.

A model that fits in memory once cannot afford a second copy, so the work is split in two::

    plan = make_plan(model, example_inputs, importance="l2", pruning_ratio=0.5)   # no weights copied
    apply_plan(model, plan, example_inputs)                                      # in place, layer by layer

:func:`make_plan` runs the :class:`~.pruner.Pruner` on a *meta-device* copy of the model (its
structure, no values: :func:`meta_skeleton`) or on a model the user built on the meta device from
its config. The trace, the groups, the selection and the verified prune all happen there and cost
no memory for weights. Only the importance needs values: a value criterion (magnitude, L1, L2,
LAMP, BN scale, or any :class:`~.importance.ParamImportance` subclass) reads each parameter of the
meta copy from the real model or a state dict by name, one tensor at a time, with no copy
(``scores_from=``); the scores are therefore computed from the same tensors by the same code as on
the real model, bit for bit. Gradient criteria (Taylor, Fisher, OBD, Hessian) need a backward pass
through the real model and are refused with an error that says so; the random criterion needs no
values at all.

The plan (:class:`PruningPlan`) is plain data: the pruning history the meta copy recorded — the
same records :func:`~.history.apply_pruning_history` and :func:`~.history.load_pruned` replay — with
the state-dict shapes of the model before and after, so that a plan made for another model is
refused before anything changes. It saves as JSON (:meth:`PruningPlan.save`).

:func:`apply_plan` first replays the plan on a fresh meta copy of the target model (every record
checked, the pruned model verified on ``example_inputs``, the shapes compared with the plan's),
then prunes the real model one layer at a time through :func:`~.history.apply_pruning_history`,
each layer its own transaction. The whole apply is one transaction too, all or nothing
(``KeyboardInterrupt`` included), but it does not keep every replaced tensor alive until the end as
a model-wide snapshot would: once a layer is pruned, only the entries it lost are kept (the kept
ones are in the new tensor), so that the kept and the removed entries together never take more than
the dense model. Peak memory is about the model plus the largest layer (its old and new tensors
while it is pruned), not the model plus its pruned copy. A parameter changed in a way this cannot
undo from slices keeps its old tensor instead (correct, but that layer costs its full size).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..graph.attributes import SHARED_HOLDER_ATTR
from ..layers import (
    LayerPruner,
    function_by_name,
    get_pruning_functions,
    once_per_parameter,
    recorded_updates,
    track_parameter_updates,
)
from .history import apply_pruning_history, get_pruning_history
from .importance import BNScaleImportance, Importance, ParamImportance, RandomImportance, get_importance
from .pruner import Pruner

__all__ = ["PLAN_FORMAT", "PruningPlan", "apply_plan", "make_plan", "meta_skeleton"]

PLAN_FORMAT = "prune_callbacks.plan/1"

#: Criteria whose scores need gradients of the real model (refused by :func:`make_plan`).
_GRADIENT_CRITERIA = "taylor, fisher, obd, hessian"
#: Value criteria :func:`make_plan` computes from the real weights.
_VALUE_CRITERIA = "magnitude, l1, l2, lamp, bn_scale (or a ParamImportance subclass), random"


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class PruningPlan:
    """What :func:`make_plan` decided, as plain data (JSON-ready).

    Fields: ``history`` (the pruning records to replay, as :mod:`.history` defines them),
    ``base_history`` (the records the model already had when it was planned: the target of
    :func:`apply_plan` must have exactly these), ``dense_shapes`` and ``pruned_shapes`` (every
    state-dict entry's shape before and after, to refuse a plan made for another model),
    ``model_class`` and ``importance`` (for messages and reports).
    """

    history: list[dict[str, Any]]
    dense_shapes: dict[str, list[int]]
    pruned_shapes: dict[str, list[int]]
    model_class: str = ""
    importance: str = ""
    base_history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The plan as a dict of plain data (``json.dumps`` accepts it)."""
        return {
            "format": PLAN_FORMAT,
            "model_class": self.model_class,
            "importance": self.importance,
            "history": _copy(self.history),
            "base_history": _copy(self.base_history),
            "dense_shapes": {k: list(v) for k, v in self.dense_shapes.items()},
            "pruned_shapes": {k: list(v) for k, v in self.pruned_shapes.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        """A plan from :meth:`to_dict` output; ``ValueError`` for anything else."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"not a pruning plan of format {PLAN_FORMAT!r} (found {found!r})")
        for key in ("history", "dense_shapes", "pruned_shapes"):
            if key not in data:
                raise ValueError(f"the pruning plan has no {key!r} entry: it is damaged")
        if not isinstance(data["history"], list):
            raise ValueError(f"the plan's history is a {type(data['history']).__name__}, not a list")
        return cls(
            history=_copy(list(data["history"])),
            dense_shapes={str(k): [int(n) for n in v] for k, v in data["dense_shapes"].items()},
            pruned_shapes={str(k): [int(n) for n in v] for k, v in data["pruned_shapes"].items()},
            model_class=str(data.get("model_class", "")),
            importance=str(data.get("importance", "")),
            base_history=_copy(list(data.get("base_history", []))),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan to ``path`` as JSON (plain data: nothing runs when it is read)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        """Read a plan written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def parameter_counts(self) -> tuple[int, int]:
        """Entries of the state dict before and after the plan (tied weights counted per key)."""

        def total(shapes: Mapping[str, Sequence[int]]) -> int:
            out = 0
            for shape in shapes.values():
                n = 1
                for s in shape:
                    n *= int(s)
                out += n
            return out

        return total(self.dense_shapes), total(self.pruned_shapes)


def _copy(records: Any) -> Any:
    """A copy of plain data (records are JSON data: several times faster than ``deepcopy``)."""
    return json.loads(json.dumps(records))


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors of the same shapes,
    dtypes and ``requires_grad``: the structure without the values, built without copying a
    single weight (tied parameters stay tied). Other tensors the modules hold as plain attributes
    are copied as they are (they are small in practice)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------
# Scores from the real weights
# ---------------------------------------------------------------------------------------------


class _ValueSource:
    """The real tensor of every parameter of the meta copy, by name (no copies)."""

    __slots__ = ("names", "values")

    def __init__(self, skeleton: nn.Module, source: nn.Module | Mapping[str, Tensor]) -> None:
        self.names: dict[int, str] = {}
        for name, p in skeleton.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), name)
        values: dict[str, Tensor]
        if isinstance(source, nn.Module):
            values = {n: p for n, p in source.named_parameters(remove_duplicate=False)}
            values.update(source.named_buffers(remove_duplicate=False))
        elif isinstance(source, Mapping):
            values = dict(source)
        else:
            raise TypeError(
                "make_plan: scores_from must be the real model or its state dict, got "
                f"{type(source).__name__}"
            )
        self.values = values
        missing = [n for n in dict.fromkeys(self.names.values()) if n not in values]
        shapes = {n: p for n, p in skeleton.named_parameters(remove_duplicate=False)}
        wrong = [
            f"{n} {tuple(values[n].shape)} (planned model: {tuple(shapes[n].shape)})"
            for n in dict.fromkeys(self.names.values())
            if n in values and tuple(values[n].shape) != tuple(shapes[n].shape)
        ]
        meta = [
            n for n in dict.fromkeys(self.names.values()) if n in values and values[n].device.type == "meta"
        ]
        problems = []
        if missing:
            problems.append(f"no tensor for {_first(missing)}")
        if wrong:
            problems.append(f"other shapes for {_first(wrong)}")
        if meta:
            problems.append(f"no values (meta tensors) for {_first(meta)}")
        if problems:
            raise ValueError(
                "make_plan: scores_from does not hold the weights of the planned model: "
                + "; ".join(problems)
                + " (pass the real model built with the same config, or its state_dict with the same keys)"
            )

    def value(self, param: Tensor) -> Tensor:
        """The real tensor of ``param`` (a parameter of the meta copy)."""
        name = self.names.get(id(param))
        if name is None:
            raise ValueError(
                "make_plan: the criterion read a tensor that is not a parameter of the planned model"
            )
        t = self.values[name]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(
                f"make_plan: {name} was pruned on the meta copy before it was scored again; the real "
                "weights have not been pruned yet, so a plan is one pruning step (iterative_steps=1)"
            )
        return t.detach()


class _RealValues:
    """Mixin for a :class:`ParamImportance` on the meta copy: every parameter it reads is replaced
    by the real tensor of the same name, so the scores are those of the real model."""

    real: _ValueSource

    def param_tensor(self, param: Tensor) -> Tensor | None:
        return super().param_tensor(self.real.value(param))  # type: ignore[misc]

    def channel_values(self, module: Any, handler: Any) -> Tensor | None:
        if isinstance(self, BNScaleImportance):  # reads the weight itself, not through param_tensor
            if not self.accepts(module):
                return None
            return self.real.value(module.weight).abs().float()
        return super().channel_values(module, handler)  # type: ignore[misc]


def _on_real_values(criterion: ParamImportance, source: _ValueSource) -> ParamImportance:
    """A copy of ``criterion`` whose parameter reads go to ``source`` (same settings, same code)."""
    cls = type(f"{type(criterion).__name__}OnRealValues", (_RealValues, type(criterion)), {})
    wrapped = copy.copy(criterion)
    wrapped.__class__ = cls
    wrapped.real = source  # type: ignore[attr-defined]
    return wrapped


def _criterion(
    importance: Any, skeleton: nn.Module, source: nn.Module | Mapping[str, Tensor] | None
) -> tuple[Importance | Any, bool]:
    """The criterion to run on the meta copy, and whether it reads values."""
    crit = get_importance(importance)
    if getattr(crit, "requires_calibration", False):
        raise ValueError(
            f"make_plan: importance={importance!r} scores with activation statistics gathered from forward "
            "passes of the real model on calibration data, which planning on a meta copy does not run; "
            f"calibration criteria are not supported when planning on meta. Use a value criterion "
            f"({_VALUE_CRITERIA}), or prune the real model with Pruner"
        )
    if getattr(crit, "requires_gradients", False):
        raise ValueError(
            f"make_plan: importance={importance!r} scores with gradients of the real model, which a meta "
            f"copy cannot compute; gradient criteria ({_GRADIENT_CRITERIA}) are not supported when planning "
            f"on meta. Use a value criterion ({_VALUE_CRITERIA}), or prune the real model with Pruner"
        )
    if isinstance(crit, RandomImportance):
        return crit, False
    if not isinstance(crit, ParamImportance):
        raise TypeError(
            f"make_plan: the criterion {crit!r} is not a ParamImportance, so on the meta copy it would read "
            f"weights without values; use a built-in value criterion ({_VALUE_CRITERIA}) or subclass "
            "ParamImportance (param_tensor / reduce_rows), whose reads make_plan sends to the real weights"
        )
    if source is None:
        raise ValueError(
            f"make_plan: importance={importance!r} needs the real weights, and the model given is on the "
            "meta device: pass scores_from=<the real model or its state_dict>"
        )
    return _on_real_values(crit, _ValueSource(skeleton, source)), True


def _translate(obj: Any, table: Mapping[int, Any]) -> Any:
    """``obj`` with every module/parameter of the real model replaced by the meta copy's."""
    if isinstance(obj, (nn.Module, Tensor)):
        return table.get(id(obj), obj)
    if isinstance(obj, Mapping):
        return {_translate(k, table): _translate(v, table) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return type(obj)(_translate(v, table) for v in obj)
    return obj


def _object_table(real: nn.Module | None, skeleton: nn.Module) -> dict[int, Any]:
    """id of each module/parameter of ``real`` -> the meta copy's object of the same name."""
    if real is None:
        return {}
    table: dict[int, Any] = {}
    mods = dict(skeleton.named_modules())
    for name, m in real.named_modules():
        if name in mods:
            table[id(m)] = mods[name]
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    for name, p in real.named_parameters(remove_duplicate=False):
        if name in params:
            table[id(p)] = params[name]
    return table


def _has_values(model: nn.Module) -> bool:
    tensors = model.state_dict(keep_vars=True).values()
    return any(t.device.type != "meta" for t in tensors if isinstance(t, Tensor))


def make_plan(
    model: nn.Module,
    example_inputs: Any,
    *,
    scores_from: nn.Module | Mapping[str, Tensor] | None = None,
    importance: Any = "l2",
    **pruner_kwargs: Any,
) -> PruningPlan:
    """Plan one pruning step on a meta copy of ``model``; the model itself is not changed.

    ``model`` is either the real model (a meta copy is made of it without copying weights, and
    the scores read its weights) or a model built on the meta device (``with torch.device("meta"):
    model = Model(config)``), whose scores read ``scores_from``: the real model or a state dict
    with the same keys (tensors read by name, one at a time, never copied; an mmap-loaded file
    works). ``importance`` is a value criterion (``"magnitude"``, ``"l1"``, ``"l2"`` (default),
    ``"lamp"``, ``"bn_scale"``, ``"random"`` or a :class:`ParamImportance`); gradient criteria are
    refused. ``pruner_kwargs`` are the :class:`~.pruner.Pruner`'s (``pruning_ratio``,
    ``prune_num_heads``, ``ignored_layers``, ``target_speedup``, ``customized_pruners``...);
    modules and parameters of the real model in them are mapped to the copy's by name. A plan is
    one step: ``iterative_steps`` must be 1 for criteria that read values (the real weights are
    not pruned between steps).

    The result, applied with :func:`apply_plan`, gives the model that ``Pruner(model, ...,
    **pruner_kwargs).step()`` gives: same history, same weights.
    """
    skeleton = meta_skeleton(model)
    real = model if _has_values(model) else None
    source = scores_from if scores_from is not None else real
    crit, reads_values = _criterion(importance, skeleton, source)
    table = _object_table(real if real is not None else _as_module(scores_from), skeleton)
    kwargs = {k: _translate(v, table) for k, v in pruner_kwargs.items()}
    base = _copy(get_pruning_history(model))
    dense = _shapes(skeleton)
    pruner = Pruner(skeleton, _translate(example_inputs, table), importance=crit, **kwargs)
    if reads_values and pruner.iterative_steps > 1:
        raise ValueError(
            f"make_plan: iterative_steps={pruner.iterative_steps}: a plan is one step, since the real "
            "weights are pruned only when it is applied; plan and apply one step at a time (each with "
            "the ratio of that step), or use iterative_steps=1"
        )
    with track_parameter_updates():  # the copy's changes stay out of the caller's update log
        while pruner.current_step < pruner.iterative_steps:
            pruner.step()
    history = _copy(get_pruning_history(skeleton)[len(base) :])
    return PruningPlan(
        history=history,
        dense_shapes=dense,
        pruned_shapes=_shapes(skeleton),
        model_class=type(model).__name__,
        importance=repr(importance) if isinstance(importance, str) else type(importance).__name__,
        base_history=base,
    )


def _as_module(obj: Any) -> nn.Module | None:
    return obj if isinstance(obj, nn.Module) else None


# ---------------------------------------------------------------------------------------------
# Applying a plan
# ---------------------------------------------------------------------------------------------


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _check_fits(model: nn.Module, plan: PruningPlan) -> None:
    """Refuse a plan made for another model (or for this one in another state) before anything
    changes: the model's history must be the plan's base and its state-dict shapes the plan's
    dense shapes."""
    name = type(model).__name__
    made_for = f"a {plan.model_class}" if plan.model_class else "another model"
    if get_pruning_history(model) != plan.base_history:
        raise ValueError(
            f"apply_plan: this {name} has {len(get_pruning_history(model))} pruning record(s) and the plan "
            f"was made on a model with {len(plan.base_history)} other ones; apply a plan to the model it was "
            "made for, in the state it was made in. The model was left unchanged"
        )
    shapes = _shapes(model)
    missing = [k for k in plan.dense_shapes if k not in shapes]
    extra = [k for k in shapes if k not in plan.dense_shapes]
    wrong = [
        f"{k} {tuple(shapes[k])} (plan: {tuple(v)})"
        for k, v in plan.dense_shapes.items()
        if k in shapes and list(shapes[k]) != list(v)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if extra:
        problems.append(f"not in the plan {_first(extra)}")
    if wrong:
        problems.append(f"other shapes {_first(wrong)}")
    if problems:
        raise ValueError(
            f"apply_plan: the plan was made for {made_for} whose tensors differ from this {name}'s: "
            + "; ".join(problems)
            + ". Make the plan on this model (or a meta copy of the same config). "
            "The model was left unchanged"
        )


def _side_table(customized_pruners: Mapping[type, LayerPruner] | None) -> dict[str, str]:
    """Pruning-function name -> side, for the functions of ``customized_pruners``."""
    table: dict[str, str] = {}
    for pruner in (customized_pruners or {}).values():
        for fn in get_pruning_functions(pruner):
            table[fn.__name__] = fn.side
    return table


def _side(name: Any, table: Mapping[str, str]) -> str:
    if name in table:
        return table[name]
    try:
        return function_by_name(str(name)).side
    except KeyError:
        return "out"  # apply_pruning_history names the unknown function


def _layers(record: Mapping[str, Any], sides: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    """``record`` as one record per item, in the order a replay applies them (output sides first),
    then one with the record's attribute changes; replayed in order inside one
    ``once_per_parameter`` block they do what the record does."""
    items = sorted(record.get("items", []), key=lambda it: _side(it.get("function"), sides) != "out")
    for item in items:
        yield {"items": [item], "attributes": []}
    if record.get("attributes"):
        yield {"items": [], "attributes": list(record["attributes"])}


def apply_plan(
    model: nn.Module,
    plan: PruningPlan | Mapping[str, Any],
    example_inputs: Any = None,
    customized_pruners: Mapping[type, LayerPruner] | None = None,
) -> nn.Module:
    """Prune ``model`` in place as ``plan`` (from :func:`make_plan`) says, and return it.

    Before ``model`` is touched: the plan must have been made for it (same state-dict keys and
    shapes, same earlier pruning history; :func:`_check_fits`), and it is replayed on a meta copy
    of ``model`` (every record checked, and with ``example_inputs`` the pruned model verified on
    them), whose shapes must be the plan's. Then the real model is pruned one layer at a time
    (each layer through :func:`~.history.apply_pruning_history`), as one transaction: on any
    failure (``KeyboardInterrupt`` included) the model is put back exactly as it was (values bit
    for bit, parameter objects, buffers, attributes, configs, history, the update log of
    ``track_parameter_updates``). The model's history ends with the plan's records, so
    :func:`~.history.save_pruned` / :func:`~.history.load_pruned` work as after a ``Pruner`` step.

    Memory: the removed entries of each pruned layer are kept until the end (to undo), the old
    tensor is released; peak ≈ the dense model plus the largest layer.
    """
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan.from_dict(plan)
    _check_fits(model, plan)
    skeleton = meta_skeleton(model)
    try:
        with track_parameter_updates():  # the copy's changes stay out of the caller's update log
            apply_pruning_history(skeleton, plan.history, customized_pruners, example_inputs)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise ValueError(
            f"apply_plan: the plan does not replay on this {type(model).__name__}: {e}. "
            "The model was left unchanged"
        ) from e
    if _shapes(skeleton) != plan.pruned_shapes:
        raise ValueError(
            f"apply_plan: replayed on this {type(model).__name__} the plan gives other shapes than when it "
            "was made (another model or configuration). The model was left unchanged"
        )
    del skeleton
    sides = _side_table(customized_pruners)
    start = len(get_pruning_history(model))
    log = recorded_updates()
    with _UpdateLog(log) as updates, _LayerUndo(model, updates) as undo:
        for record in plan.history:
            with once_per_parameter():
                for layer in _layers(record, sides):
                    undo.apply(layer, customized_pruners)
        if _shapes(model) != plan.pruned_shapes:  # cannot happen after the meta replay; cheap to check
            raise ValueError("apply_plan: the pruned model's shapes differ from the plan's")
        history = get_pruning_history(model, create=True)
        del history[start:]
        history.extend(_copy(plan.history))
    return model


class _UpdateLog:
    """The active update log of ``track_parameter_updates`` (the user's, when one is active, so it
    gets the records too), else a log of our own for the duration of the block."""

    __slots__ = ("log", "own")

    def __init__(self, log: list | None) -> None:
        self.log = log
        self.own: Any = None

    def __enter__(self) -> list:
        if self.log is None:
            self.own = track_parameter_updates()
            self.log = self.own.__enter__()
        return self.log

    def __exit__(self, *exc: Any) -> None:
        if self.own is not None:
            self.own.__exit__(*exc)


#: One selection undone by :func:`_rebuild`: (dim, kept indices, removed indices, removed values).
_Step = tuple[int, Tensor, Tensor, Tensor]
#: An undo entry: ``("full", [(param, data, grad)])`` while a layer is pruned, then
#: ``("layer", [(param, old data, old grad)], [(param, steps, old grad)])``.
_Entry = tuple[Any, ...]


class _LayerUndo:
    """All-or-nothing for a change made layer by layer, keeping only what the layers lost.

    At the start it keeps every module's attributes, parameter and buffer tables and the configs
    they hold (references: parameters keep their identity when pruned, so no values are held).
    :meth:`apply` replays one layer's record; the tensors it replaced are then reduced to the
    entries that were removed (found from the pruning function in the update log, checked bit for
    bit), or kept whole when that fails. :meth:`rollback` rebuilds every parameter from its kept
    and removed entries, newest first, and restores the tables, configs, history and log.
    """

    __slots__ = ("model", "modules", "configs", "entries", "history_length", "log", "mark")

    def __init__(self, model: nn.Module, log: list) -> None:
        self.model = model
        self.modules: list[tuple[nn.Module, dict, dict, dict]] = []
        self.configs: list[tuple[Any, dict]] = []
        seen: set[int] = set()
        for m in model.modules():
            plain = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
            self.modules.append((m, plain, dict(m._parameters), dict(m._buffers)))
            holder = plain.get(SHARED_HOLDER_ATTR)
            if _plain_object(holder) and id(holder) not in seen and hasattr(holder, "__dict__"):
                seen.add(id(holder))
                self.configs.append((holder, dict(vars(holder))))
        self.entries: list[_Entry] = []
        self.history_length = len(get_pruning_history(model))
        self.log = log
        self.mark = len(log)

    def __enter__(self) -> _LayerUndo:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if kind is not None:
            self.rollback()

    def apply(self, record: dict[str, Any], customized_pruners: Mapping[type, LayerPruner] | None) -> None:
        """Replay one layer's ``record`` (its own transaction), then keep what it removed."""
        params = list(dict.fromkeys(self.model.parameters()))
        held = [(p, p.data, p.grad) for p in params]
        self.entries.append(("full", held))  # the undo while the layer is pruned
        at = len(self.entries) - 1
        mark = len(self.log)
        apply_pruning_history(self.model, [record], customized_pruners)
        changed = [(p, data, grad) for p, data, grad in held if _moved(p, data)]
        updates: dict[int, list[tuple[tuple[int, ...], Any]]] = {}
        for p, shape, fn in self.log[mark:]:
            updates.setdefault(id(p), []).append((shape, fn))
        light: list[tuple[Any, list[_Step], Tensor | None]] = []
        whole: list[tuple[Any, Tensor, Tensor | None]] = []
        for p, data, grad in changed:
            steps = _removed(data, p.data, updates.get(id(p), []))
            if steps is None:
                whole.append((p, data, grad))
            else:
                light.append((p, steps, grad))
        # one swap: the full references are dropped only once the light entries are complete
        self.entries[at] = ("layer", whole, light)
        del held, changed

    def rollback(self) -> None:
        """Put the model back as it was when the undo started (see the class docstring)."""
        with torch.no_grad():
            for entry in reversed(self.entries):
                if entry[0] == "full":
                    _restore_whole(entry[1])
                    continue
                _, whole, light = entry
                for p, steps, grad in reversed(light):
                    p.data = _rebuild(p.data, steps)
                    p.grad = grad
                _restore_whole(whole)
        for m, plain, params, buffers in self.modules:
            for k in [k for k in vars(m) if k not in ("_parameters", "_buffers", "_modules")]:
                if k not in plain:
                    delattr(m, k)
            vars(m).update(plain)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        for obj, attrs in self.configs:
            for k in [k for k in vars(obj) if k not in attrs]:
                delattr(obj, k)
            vars(obj).update(attrs)
        del get_pruning_history(self.model)[self.history_length :]
        del self.log[self.mark :]


def _plain_object(obj: Any) -> bool:
    return obj is not None and not isinstance(obj, (type, nn.Module, Tensor)) and not callable(obj)


def _moved(p: Tensor, old: Tensor) -> bool:
    """Whether ``p``'s values are no longer ``old``'s tensor (another storage or shape)."""
    return p.data.data_ptr() != old.data_ptr() or tuple(p.shape) != tuple(old.shape)


def _restore_whole(held: Sequence[tuple[Any, Tensor, Tensor | None]]) -> None:
    for p, data, grad in held:
        p.data = data
        p.grad = grad


def _rebuild(current: Tensor, steps: Sequence[_Step]) -> Tensor:
    """The tensor before the selections ``steps``, from the kept entries and the removed ones."""
    for dim, kept, gone, removed in reversed(steps):
        shape = list(current.shape)
        shape[dim] = len(kept) + len(gone)
        full = torch.empty(shape, dtype=current.dtype, device=current.device)
        full.index_copy_(dim, kept, current)
        full.index_copy_(dim, gone, removed)
        current = full
    return current


def _selection(fn: Any, shape: tuple[int, ...], device: torch.device) -> tuple[int, Tensor] | None:
    """``(dim, kept indices)`` when ``fn`` keeps a subset of one dim of a tensor shaped ``shape``,
    found by running it on a small index probe (``arange`` along one dim, size 1 elsewhere);
    None when no dim or several dims fit (the caller then keeps the old tensor whole)."""
    found: tuple[int, Tensor] | None = None
    for dim, n in enumerate(shape):
        probe_shape = [1] * len(shape)
        probe_shape[dim] = n
        probe = torch.arange(n, device=device).view(probe_shape)
        try:
            out = fn(probe)
        except (RuntimeError, IndexError, ValueError, TypeError):
            continue
        if not isinstance(out, Tensor) or out.dim() != len(shape) or out.numel() != out.shape[dim]:
            continue
        kept = out.reshape(-1)
        if out.dtype != probe.dtype or len(kept) >= n:
            continue
        if len(kept) and (int(kept[0]) < 0 or int(kept[-1]) >= n or not bool((kept[1:] > kept[:-1]).all())):
            continue  # not ascending positions of the probe
        if found is not None:
            return None
        found = (dim, kept)
    return found


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


#: Above this many entries, :func:`_selects` checks sampled slices instead of the whole tensor.
_FULL_CHECK_ENTRIES = 1 << 20
#: Slices checked along the sampled dim.
_SAMPLED_SLICES = 16


def _selects(old: Tensor, new: Tensor, dim: int, kept: Tensor) -> bool:
    """Whether ``new`` is ``old.index_select(dim, kept)``, bit for bit.

    Small tensors are compared whole. For a large one the comparison is made on
    :data:`_SAMPLED_SLICES` slices spread evenly along another dim (first and last included), all
    entries of each: this catches a pruning function that does more than select (one that also
    scales or reorders the values changes every slice) without a second copy of the layer and a
    full pass over it, which would double the time of an apply.
    """
    expected = list(old.shape)
    expected[dim] = len(kept)
    if list(new.shape) != expected:
        return False
    if old.numel() <= _FULL_CHECK_ENTRIES or old.dim() < 2:
        return _bits_equal(old.index_select(dim, kept), new)
    other = 0 if dim != 0 else 1
    n = old.shape[other]
    rows = torch.linspace(0, n - 1, min(n, _SAMPLED_SLICES), device=old.device).round().long().unique()
    return _bits_equal(old.index_select(other, rows).index_select(dim, kept), new.index_select(other, rows))


def _removed(
    old: Tensor, new: Tensor, updates: Sequence[tuple[tuple[int, ...], Any]]
) -> list[_Step] | None:
    """The entries of ``old`` that the logged ``updates`` removed, per step ``(dim, kept, removed
    indices, removed values)``, when replaying those selections on ``old`` gives ``new`` bit for
    bit; None otherwise (no update logged, or not a selection along one dim)."""
    if not updates:
        return None
    steps: list[_Step] = []
    current = old
    for k, (shape, fn) in enumerate(updates):
        if tuple(current.shape) != tuple(shape):
            return None
        found = _selection(fn, shape, old.device)
        if found is None:
            return None
        dim, kept = found
        mask = torch.ones(shape[dim], dtype=torch.bool, device=old.device)
        mask[kept] = False
        gone = mask.nonzero().reshape(-1)
        steps.append((dim, kept, gone, current.index_select(dim, gone)))
        if k == len(updates) - 1:
            return steps if _selects(current, new, dim, kept) else None
        current = current.index_select(dim, kept)  # several selections of one tensor: rare
    return None
