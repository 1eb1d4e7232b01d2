"""Pruning dependencies and groups.

A :class:`Dependency` says "pruning ``source`` with ``trigger`` forces ``target`` to be pruned
with ``handler``". A :class:`Group` is the ordered list of (dependency, indices) pairs that
must be applied together; its first entry is the root. Pruning a group is atomic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .node import Node

if TYPE_CHECKING:
    from .dependency_graph import DependencyGraph


class Dependency:
    """Edge of the dependency graph: ``trigger`` on ``source`` implies ``handler`` on ``target``.

    ``index_mapping`` is a pair of callables: the first maps indices of the group's root to this
    dependency's target indices, the second maps target indices back to the root. It may be given
    as the target's ``{channel: root channel}`` dict instead; the pair is then made on first use
    (a group has one dependency per layer and most are never asked).
    """

    def __init__(
        self,
        trigger: Callable,
        handler: Callable,
        source: Node,
        target: Node,
        index_mapping: tuple[Callable, Callable] | Mapping[int, int] | None = None,
    ) -> None:
        self.trigger = trigger
        self.handler = handler
        self.source = source
        self.target = target
        self._index_mapping = index_mapping if index_mapping is not None else (_identity, _identity)

    @property
    def index_mapping(self) -> tuple[Callable, Callable]:
        m = self._index_mapping
        if isinstance(m, Mapping):
            m = self._index_mapping = (_RootToTarget(m), _TargetToRoot(m))
        return m

    def __call__(self, idxs: Sequence[int]) -> Any:
        """Apply the handler to the target module."""
        return self.handler(self.target.module, idxs)

    def is_triggered_by(self, pruning_fn: Callable) -> bool:
        return self.trigger is pruning_fn

    def __repr__(self) -> str:
        return (
            f"[{self.source.name}] {_fn_name(self.trigger)} => [{self.target.name}] {_fn_name(self.handler)}"
        )


def _identity(idxs: Sequence[int]) -> list[int]:
    return list(idxs)


class _RootToTarget:
    """Index mapping of a dependency: root indices -> the target's indices."""

    __slots__ = ("rec",)

    def __init__(self, rec: Mapping[int, int]) -> None:
        self.rec = rec

    def __call__(self, idxs: Sequence[int]) -> list[int]:
        wanted = set(idxs)
        return sorted(c for c, r in self.rec.items() if r in wanted)


class _TargetToRoot(_RootToTarget):
    """Index mapping of a dependency: the target's indices -> root indices."""

    __slots__ = ()

    def __call__(self, idxs: Sequence[int]) -> list[int]:
        rec = self.rec
        return sorted({rec[i] for i in idxs if i in rec})


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", repr(fn))


class GroupItem:
    """One entry of a group; unpacks as ``dep, idxs``. ``root_idxs[i]`` is the root channel
    that ``idxs[i]`` belongs to."""

    __slots__ = ("dep", "idxs", "root_idxs")

    def __init__(self, dep: Dependency, idxs: list[int], root_idxs: list[int]) -> None:
        self.dep, self.idxs, self.root_idxs = dep, idxs, root_idxs

    def __iter__(self) -> Iterator:
        yield self.dep
        yield self.idxs

    def __repr__(self) -> str:
        return f"({self.dep!r}, idxs={_short(self.idxs)})"


def _short(idxs: Sequence[int], n: int = 8) -> str:
    idxs = list(idxs)
    body = ", ".join(map(str, idxs[:n]))
    return f"[{body}{', ...' if len(idxs) > n else ''}]"


class PruningError(RuntimeError):
    """A group prune failed; the model was restored to its state before the prune."""


class Group:
    """Every (layer, channel indices) pair that must be removed together, root first."""

    def __init__(
        self,
        items: list[GroupItem],
        graph: DependencyGraph,
        attribute_updates: list[tuple[nn.Module, str, Any, Any]] | None = None,
        edge_maps: dict[Any, Any] | None = None,
    ) -> None:
        self._group = items
        self._DG = graph
        self.attribute_updates = attribute_updates or []
        # The index map of every tensor the closure reached ({Edge: RootMap}): where size
        # attributes are read from, and what shapes the graph records after the prune.
        self.edge_maps: dict[Any, Any] = edge_maps if edge_maps is not None else {}
        # Set on attention groups: the root's channels form this many equal consecutive blocks
        # (heads, or key/value heads with their query heads); prune whole blocks or the same
        # offsets in every block.
        self.head_blocks: int | None = None

    def __len__(self) -> int:
        return len(self._group)

    def __iter__(self) -> Iterator[GroupItem]:
        return iter(self._group)

    def __getitem__(self, k: int) -> GroupItem:
        return self._group[k]

    @property
    def items(self) -> list[GroupItem]:
        return self._group

    @property
    def root(self) -> GroupItem:
        return self._group[0]

    def has_dep(self, dep: Dependency) -> bool:
        return any(item.dep is dep for item in self._group)

    def has_pruning_op(self, dep: Dependency, idxs: Sequence[int]) -> bool:
        return any(
            item.dep.target is dep.target and item.dep.handler is dep.handler and set(idxs) <= set(item.idxs)
            for item in self._group
        )

    def prune(self, idxs: Sequence[int] | None = None, record_history: bool = True) -> None:
        """Remove the channels. With ``idxs`` (root indices) a new subset group is built from the
        root and pruned instead. Atomic: on any failure every parameter, buffer and size
        attribute is restored and :class:`PruningError` names the layer that failed."""
        if idxs is not None:
            root = self.root.dep
            group = self._DG.get_pruning_group(root.target.module, root.handler, idxs)
            group.prune(record_history=record_history)
            return
        self._DG._prune_group(self, record_history)

    def details(self) -> str:
        """A readable table of the group: one row per layer, root first."""
        width = 100
        lines = ["-" * width, " " * 38 + "Pruning Group", "-" * width]
        for i, item in enumerate(self._group):
            dep = item.dep
            tag = "(root)" if i == 0 else ""
            lines.append(f"[{i}] {dep!r}, #idxs={len(item.idxs)} {tag}".rstrip())
            lines.append(f"      idxs={_short(item.idxs)} root_idxs={_short(item.root_idxs)}")
        for module, attr, old, new in self.attribute_updates:
            lines.append(f"[attr] {type(module).__name__}.{attr}: {old} -> {new}")
        lines.append("-" * width)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.details()


def snapshot(targets: Sequence[Any]) -> Callable[[], None]:
    """Remember the tensors and plain attributes of modules/parameters (and the attributes of
    other objects, such as a config whose sizes a prune updates); return a restore function.

    Pruning only ever swaps tensors (it never writes into storage), so keeping references to
    the old tensors is enough to restore them bit for bit.
    """
    saved_params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
    saved_modules: list[tuple[nn.Module, dict, dict, dict]] = []
    saved_objects: list[tuple[Any, dict]] = []
    seen: set[int] = set()

    def keep_param(p: nn.Parameter) -> None:
        if id(p) not in seen:
            seen.add(id(p))
            saved_params.append((p, p.data, p.grad))

    for t in targets:
        if id(t) in seen:
            continue
        if isinstance(t, nn.Parameter):
            keep_param(t)
            continue
        seen.add(id(t))
        if not isinstance(t, nn.Module):
            if hasattr(t, "__dict__"):
                saved_objects.append((t, dict(vars(t))))
            continue
        for sub in t.modules():
            plain = {k: v for k, v in vars(sub).items() if k not in ("_parameters", "_buffers", "_modules")}
            saved_modules.append((sub, plain, dict(sub._parameters), dict(sub._buffers)))
            for p in sub._parameters.values():
                if p is not None:
                    keep_param(p)

    def restore() -> None:
        for p, data, grad in saved_params:
            p.data = data
            p.grad = grad
        for sub, plain, params, buffers in saved_modules:
            for k in [k for k in vars(sub) if k not in ("_parameters", "_buffers", "_modules")]:
                if k not in plain:
                    delattr(sub, k)
            vars(sub).update(plain)
            sub._parameters.clear()
            sub._parameters.update(params)
            sub._buffers.clear()
            sub._buffers.update(buffers)
        for obj, plain in saved_objects:
            for k in [k for k in vars(obj) if k not in plain]:
                delattr(obj, k)
            vars(obj).update(plain)

    return restore
