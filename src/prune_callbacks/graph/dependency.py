"""Pruning groups.

A :class:`~.node.Dependency` says "pruning ``source`` with ``trigger`` forces ``target`` to be
pruned with ``handler``". A :class:`Group` is the ordered list of (dependency, indices) pairs that
must be applied together; its first entry is the root. Pruning a group is atomic: it goes
through the graph that made the group (:class:`GroupGraph`), which checks it, applies it and
restores everything (:func:`snapshot`) if a layer fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn as nn

from . import index_mapping as im
from .index_mapping import RootMap
from .node import Dependency, Edge

#: A size-attribute change a group makes: ``(object, attribute, old value, new value)``.
#: Attributes in angle brackets (``<chunks>``, ``<literal split>``, ``<literal slice>``,
#: ``<shared>``) are notes for the checks, never set.
AttributeUpdate = tuple[Any, str, Any, Any]


class GroupGraph(Protocol):
    """What a group needs from the graph that made it: a subset group of its root, and the
    atomic prune (the graph checks the group, applies it and records history)."""

    def get_pruning_group(self, module: Any, pruning_fn: Callable, idxs: Sequence[int]) -> Group: ...

    def prune_group(self, group: Group, record_history: bool = True) -> None: ...


class GroupItem:
    """One entry of a group; unpacks as ``dep, idxs``. ``root_idxs[i]`` is the root channel
    that ``idxs[i]`` belongs to.

    An item made by a closure search holds its channels as a channel set (``channels``: a 1-D
    :class:`~.index_mapping.RootMap` of the root id of every channel, a few runs in the common
    case), and an item of a subset or merged group made by the Pruner as two long tensors
    (:meth:`of_tensors`); either writes the lists ``idxs`` and ``root_idxs`` on first use: a
    wide layer's lists are thousands of Python ints, and most items of the groups of a big model
    are only counted (:attr:`count`) or indexed as tensors (:meth:`index_tensors`). Setting
    ``idxs`` or ``root_idxs`` drops the channel set and the tensors (change them by assignment,
    not in place).
    """

    __slots__ = ("dep", "_idxs", "_root_idxs", "_tensors", "channels")

    def __init__(
        self,
        dep: Dependency,
        idxs: list[int] | None = None,
        root_idxs: list[int] | None = None,
        channels: RootMap | None = None,
    ) -> None:
        if channels is None and (idxs is None or root_idxs is None):
            raise TypeError("GroupItem needs idxs and root_idxs, or a channel set")
        self.dep = dep
        self._idxs, self._root_idxs, self.channels = idxs, root_idxs, channels
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of_tensors(cls, dep: Dependency, idxs: torch.Tensor, root_idxs: torch.Tensor) -> GroupItem:
        """An item whose channels are given as 1-D long tensors: ``idxs`` ascending without
        repeats, ``root_idxs`` as long (the lists are written from them on first use)."""
        item = cls.__new__(cls)
        item.dep = dep
        item._idxs = item._root_idxs = None
        item.channels = None
        item._tensors = (idxs, root_idxs)
        return item

    def _lists(self) -> None:
        if self._idxs is None or self._root_idxs is None:
            if self._tensors is not None:
                idxs, roots = self._tensors
                self._idxs = idxs.tolist()
                self._root_idxs = self._idxs if roots is idxs else roots.tolist()
                return
            assert self.channels is not None
            self._idxs, self._root_idxs = im.channel_lists(self.channels)

    @property
    def idxs(self) -> list[int]:
        """The target layer's channels, ascending."""
        if self._idxs is None:
            self._lists()
        return self._idxs  # type: ignore[return-value]  # written by _lists

    @idxs.setter
    def idxs(self, value: list[int]) -> None:
        self._lists()
        self._idxs, self.channels, self._tensors = value, None, None

    @property
    def root_idxs(self) -> list[int]:
        """The root channel id of every entry of :attr:`idxs`."""
        if self._root_idxs is None:
            self._lists()
        return self._root_idxs  # type: ignore[return-value]  # written by _lists

    @root_idxs.setter
    def root_idxs(self, value: list[int]) -> None:
        self._lists()
        self._root_idxs, self.channels, self._tensors = value, None, None

    @property
    def count(self) -> int:
        """``len(idxs)``, without writing the lists."""
        if self._tensors is not None:
            return len(self._tensors[0])
        if self._idxs is not None:
            return len(self._idxs)
        if self.channels is not None:
            return im.set_count(self.channels)
        return len(self.idxs)

    @property
    def distinct(self) -> bool:
        """Whether :attr:`idxs` is known to hold no channel twice without looking at it (a
        channel set or tensors; lists given by a caller may repeat channels)."""
        return self._tensors is not None or self.channels is not None

    def index_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``idxs`` and ``root_idxs`` as long tensors, built from the channel set or kept
        tensors when the item has them (assign new lists to change an item's channels: that
        drops them)."""
        if self._tensors is not None:
            return self._tensors
        if self.channels is not None:
            return im.channel_tensors(self.channels)
        return (
            torch.as_tensor(self.idxs, dtype=torch.long),
            torch.as_tensor(self.root_idxs, dtype=torch.long),
        )

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


class VerificationError(PruningError):
    """The pruned model failed its verifying forward (it raised, or an output changed shape); the
    model was restored. ``problem`` says what the forward did."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


class Group:
    """Every (layer, channel indices) pair that must be removed together, root first.

    Fields: ``items`` (root first); ``graph``, the graph that made the group (it builds subset
    groups and prunes); ``attribute_updates``, the size attributes the prune changes;
    ``edge_maps``, the index map of every tensor the closure reached (``{Edge: RootMap}``: where
    size attributes are read from, and what shapes the graph records after the prune);
    ``head_blocks``, set on attention groups: the root's channels form this many equal
    consecutive blocks (heads, or key/value heads with their query heads), to be pruned as whole
    blocks or at the same offsets in every block. The fields are fixed (``__slots__``).
    """

    __slots__ = ("items", "graph", "attribute_updates", "edge_maps", "head_blocks")

    def __init__(
        self,
        items: list[GroupItem],
        graph: GroupGraph,
        attribute_updates: list[AttributeUpdate] | None = None,
        edge_maps: dict[Edge, RootMap] | None = None,
        head_blocks: int | None = None,
    ) -> None:
        self.items = items
        self.graph = graph
        self.attribute_updates: list[AttributeUpdate] = attribute_updates or []
        self.edge_maps: dict[Edge, RootMap] = edge_maps if edge_maps is not None else {}
        self.head_blocks = head_blocks

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[GroupItem]:
        return iter(self.items)

    def __getitem__(self, k: int) -> GroupItem:
        return self.items[k]

    @property
    def root(self) -> GroupItem:
        return self.items[0]

    def has_dep(self, dep: Dependency) -> bool:
        return any(item.dep is dep for item in self.items)

    def has_pruning_op(self, dep: Dependency, idxs: Sequence[int]) -> bool:
        return any(
            item.dep.target is dep.target and item.dep.handler is dep.handler and set(idxs) <= set(item.idxs)
            for item in self.items
        )

    def prune(self, idxs: Sequence[int] | None = None, record_history: bool = True) -> None:
        """Remove the channels. With ``idxs`` (root indices) a new subset group is built from the
        root and pruned instead. Atomic: on any failure every parameter, buffer and size
        attribute is restored and :class:`PruningError` names the layer that failed."""
        if idxs is not None:
            root = self.root.dep
            group = self.graph.get_pruning_group(root.target.module, root.handler, idxs)
            group.prune(record_history=record_history)
            return
        self.graph.prune_group(self, record_history)

    def details(self) -> str:
        """A readable table of the group: one row per layer, root first."""
        width = 100
        lines = ["-" * width, " " * 38 + "Pruning Group", "-" * width]
        for i, item in enumerate(self.items):
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
    saved = Snapshot()
    for t in targets:
        saved.keep(t)
    return saved.restore


_MODULE_STATE = ("_parameters", "_buffers", "_modules")

#: Attribute through which modules hold a shared object whose sizes a prune may update (a
#: Hugging Face ``config``): a snapshot of a module keeps that object too.
SHARED_HOLDER_ATTR = "config"


class Snapshot:
    """What :func:`snapshot` keeps: per parameter its tensor and gradient, per module (and
    submodule) its plain attributes, parameters and buffers and the config it holds, per other
    object its attributes."""

    __slots__ = ("params", "modules", "objects", "seen")

    def __init__(self) -> None:
        self.params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
        self.modules: list[tuple[nn.Module, dict, dict, dict]] = []
        self.objects: list[tuple[Any, dict]] = []
        self.seen: set[int] = set()

    def keep(self, target: Any) -> None:
        """Remember ``target`` (a parameter, a module with its submodules, or a plain object)."""
        if id(target) in self.seen:
            return
        if isinstance(target, nn.Parameter):
            self._keep_param(target)
            return
        self.seen.add(id(target))
        if isinstance(target, nn.Module):
            for sub in target.modules():
                plain = {k: v for k, v in vars(sub).items() if k not in _MODULE_STATE}
                self.modules.append((sub, plain, dict(sub._parameters), dict(sub._buffers)))
                for p in sub._parameters.values():
                    if p is not None:
                        self._keep_param(p)
                shared = plain.get(SHARED_HOLDER_ATTR)
                if shared is not None and not isinstance(shared, type) and not callable(shared):
                    self.keep(shared)  # a config whose sizes a prune may update
        elif hasattr(target, "__dict__"):
            self.objects.append((target, dict(vars(target))))

    def _keep_param(self, p: nn.Parameter) -> None:
        if id(p) not in self.seen:
            self.seen.add(id(p))
            self.params.append((p, p.data, p.grad))

    def tensors(self) -> list[torch.Tensor]:
        """The parameter values and buffers kept (the tensors as they were)."""
        kept = [data for _p, data, _grad in self.params]
        kept += [b for *_rest, buffers in self.modules for b in buffers.values() if b is not None]
        return kept

    def restore(self) -> None:
        """Put everything back as it was when it was kept."""
        for p, data, grad in self.params:
            p.data = data
            p.grad = grad
        for sub, plain, params, buffers in self.modules:
            for k in [k for k in vars(sub) if k not in _MODULE_STATE]:
                if k not in plain:
                    delattr(sub, k)
            vars(sub).update(plain)
            sub._parameters.clear()
            sub._parameters.update(params)
            sub._buffers.clear()
            sub._buffers.update(buffers)
        for obj, plain in self.objects:
            for k in [k for k in vars(obj) if k not in plain]:
                delattr(obj, k)
            vars(obj).update(plain)


__all__ = [
    "AttributeUpdate",
    "Dependency",
    "Group",
    "GroupGraph",
    "GroupItem",
    "VerificationError",
    "PruningError",
    "SHARED_HOLDER_ATTR",
    "Snapshot",
    "snapshot",
]
