"""Applying a group: the atomic prune, the graph's recorded shapes after it, its history record.

:func:`apply_group` checks a group (:mod:`.checks`), runs every item's pruning function and sets
the size attributes, and on any failure restores every parameter, buffer and attribute it touched
(:func:`~.dependency.snapshot`) before raising :class:`~.dependency.PruningError`. Afterwards the
tensor shapes recorded in the graph are shrunk (:func:`update_shapes`) so the same graph keeps
answering for the pruned model. :func:`history_record` describes the prune as plain data (names,
function names, indices) for replay on a fresh model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from ..layers import once_per_parameter, recorded_updates, takes_index_tensors
from .attributes import SHARED_HOLDER_ATTR, pruned_shape
from .checks import GroupChecker
from .dependency import Group, GroupItem, PruningError, VerificationError, snapshot
from .facts import VirtualFunction, param_dim, side_of
from .node import Dependency, Edge, fn_name
from .verify import ForwardCheck


def apply_group(
    group: Group,
    checker: GroupChecker,
    verify: ForwardCheck | None = None,
    *,
    check_shared: bool = True,
    keep: bool = True,
    commit: Callable[[], None] | None = None,
) -> None:
    """Prune ``group`` as one transaction: refuse it with ``ValueError`` (nothing changed) when
    ``checker`` finds a problem; restore everything and raise :class:`PruningError` naming the
    layer when a pruning function fails, or :class:`VerificationError` when the pruned model fails
    ``verify`` (its forward raises or an output changes shape). Then shrink the shapes the graph
    records and run ``commit`` (the caller's bookkeeping, e.g. the history record). Any other
    exception on the way, ``KeyboardInterrupt`` included, restores the model, the recorded
    shapes and the parameter-update log before it propagates. ``keep=False`` restores the model
    after a successful prune too (a probe: see :func:`probe_group`); ``check_shared`` is passed
    to :meth:`GroupChecker.explain`."""
    reason = checker.explain(group, check_shared)
    if reason is not None:
        raise ValueError(f"refusing to prune this group: {reason}")
    targets = [item.dep.target.module for item in group] + [m for m, *_ in group.attribute_updates]
    restore = _undo(snapshot(targets))
    current: Dependency | None = None
    try:
        with once_per_parameter():
            # Output sides first: removing a grouped convolution's inputs first could turn it
            # into a depthwise one, which prunes its outputs by other rules.
            for item in sorted(group, key=lambda it: side_of(it.dep.handler) != "out"):
                current = item.dep
                item.dep(indices_for(item))
        current = None
        for module, attr, _old, new in group.attribute_updates:
            if not attr.startswith("<"):
                setattr(module, attr, new)
        problem = verify.problem() if verify is not None else None
    except Exception as e:
        restore()
        where = f"{current.target.name} ({fn_name(current.handler)})" if current is not None else "attributes"
        raise PruningError(f"pruning failed at {where}: {e}. The model was restored unchanged.") from e
    except BaseException:
        restore()
        raise
    if problem is not None or not keep:
        restore()
    if problem is not None:
        raise VerificationError(f"{describe(group)}: {problem}. The model was restored unchanged.", problem)
    if not keep:
        return
    undo_shapes = recorded_shapes(group.edge_maps)
    try:
        update_shapes(group)
        if commit is not None:
            commit()
    except BaseException:
        undo_shapes()
        restore()
        raise


def indices_for(item: GroupItem) -> list[int] | torch.Tensor:
    """The channels of ``item`` as its pruning function is given them: a long tensor for the
    built-in layer pruners that take one (:func:`~prune_callbacks.layers.takes_index_tensors`)
    and for the name-only functions of virtual ops, when the item holds no channel twice; else
    the list ``item.idxs`` (what custom pruners always got)."""
    handler = item.dep.handler
    if item.distinct and (isinstance(handler, VirtualFunction) or takes_index_tensors(handler)):
        return item.index_tensors()[0]
    return item.idxs


def _undo(restore: Callable[[], None]) -> Callable[[], None]:
    """``restore`` that also takes back the parameter updates the prune recorded (see
    :func:`~prune_callbacks.layers.recorded_updates`): an undone prune must not slice the
    optimizer state."""
    log = recorded_updates()
    mark = len(log) if log is not None else 0

    def undo() -> None:
        restore()
        if log is not None:
            del log[mark:]

    return undo


def probe_group(group: Group, checker: GroupChecker, verify: ForwardCheck) -> str | None:
    """Why pruning ``group`` would break the model (refused by the checks other than the shared
    config one, a pruning function failing, or the verifying forward failing), or None when the
    pruned model runs; the model is left unchanged either way."""
    try:
        apply_group(group, checker, verify, check_shared=False, keep=False)
    except VerificationError as e:
        return e.problem
    except (ValueError, PruningError) as e:
        return str(e)
    return None


def describe(group: Group, limit: int = 4) -> str:
    """The layers of a group, for messages: ``"the group of conv1 (conv1, bn1, conv2, +3 more)"``."""
    names: list[str] = []
    for item in group:
        name = item.dep.target.name
        if name not in names:
            names.append(name)
    shown = ", ".join(names[:limit]) + (f", +{len(names) - limit} more" if len(names) > limit else "")
    return f"the group of {group.root.dep.target.name} ({shown})"


def recorded_shapes(edges: Iterable[Edge]) -> Callable[[], None]:
    """Remember the shapes the graph records for ``edges`` (and for the ops at their ends);
    return a function that puts them back (undoing :func:`update_shapes`)."""
    saved: list[tuple[Edge, tuple[int, ...]]] = [(e, e.shape) for e in edges]
    lists: dict[int, tuple[list, list]] = {}
    for e, _shape in saved:
        for node in (e.src, *(d for d, _ in e.dsts)):
            for key in ("out_shapes", "in_shapes", "size_args"):
                shapes = node.attrs.get(key)
                if isinstance(shapes, list) and id(shapes) not in lists:
                    lists[id(shapes)] = (shapes, list(shapes))

    def undo() -> None:
        for e, shape in saved:
            e.shape = shape
        for shapes, old in lists.values():
            shapes[:] = old

    return undo


def update_shapes(group: Group) -> None:
    """After a prune, shrink the recorded tensor shapes so the graph stays usable."""
    shapes: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}  # maps may share tensors
    for edge, m in group.edge_maps.items():
        key = (id(m.t), edge.shape)
        new = shapes.get(key)
        if new is None:
            new = shapes[key] = pruned_shape(edge.shape, m)
        if new == edge.shape:
            continue
        old = edge.shape
        edge.shape = new
        src = edge.src
        if src.type.is_virtual:
            src.attrs["out_shapes"][edge.src_pos] = new
            sizes = src.attrs.get("size_args")
            if edge.src_pos == 0 and sizes is not None and len(sizes) == len(new):
                # the sizes a view was called with follow its output (attributes were updated)
                for d, (a, b) in enumerate(zip(old, new)):
                    if a != b and sizes[d] == a:
                        sizes[d] = b
        for dst, pos in edge.dsts:
            dst.attrs["in_shapes"][pos] = new


def history_record(group: Group, names: dict[Any, str]) -> dict[str, Any]:
    """Plain-data description of a group prune (names, function names, indices); ``names``
    maps modules and parameters to their qualified names."""
    root = group.root
    return {
        "root": names.get(root.dep.target.module, root.dep.target.plain_name),
        "function": fn_name(root.dep.handler),
        "idxs": list(root.idxs),
        "items": [
            {
                "target": names.get(it.dep.target.module, it.dep.target.plain_name),
                "function": fn_name(it.dep.handler),
                "dim": param_dim(it.dep.handler),
                "idxs": list(it.idxs),
            }
            for it in group
        ],
        "attributes": [
            {"module": object_name(m, names), "attr": a, "new": list(n) if isinstance(n, tuple) else n}
            for m, a, _o, n in group.attribute_updates
            if not a.startswith("<")
        ],
    }


def object_name(obj: Any, names: dict[Any, str]) -> str:
    """Name of a module, or ``<module name>.config`` for a config object a module holds."""
    name = names.get(obj) if isinstance(obj, (nn.Module, torch.Tensor)) else None
    if name is not None:
        return name
    for m, n in names.items():
        if isinstance(m, nn.Module) and getattr(m, SHARED_HOLDER_ATTR, None) is obj:
            return f"{n}.{SHARED_HOLDER_ATTR}" if n else SHARED_HOLDER_ATTR
    return ""


__all__ = [
    "apply_group",
    "describe",
    "history_record",
    "indices_for",
    "object_name",
    "probe_group",
    "recorded_shapes",
    "update_shapes",
]
