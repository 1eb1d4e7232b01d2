"""Size attributes that a prune must keep true: head counts, head sizes, split sizes.

Modules that reshape channels into heads, split them into chunks or cut a fused tensor at fixed
offsets read the sizes from their own attributes (``num_heads``, ``head_dim``, ``split_size``...)
or from a config they hold. A group's tensor maps (``{Edge: RootMap}``) say how the shapes of
those reshapes, splits and slices change, and :func:`attribute_updates_for` turns that into
``(object, attribute, old value, new value)`` updates. Changes no attribute explains become
notes in angle brackets (``<literal split>``, ``<literal slice>``, ``<chunks>``, ``<shared>``) that
:mod:`.checks` turns into refusals; they are never set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from . import index_mapping as im
from . import propagation
from .dependency import SHARED_HOLDER_ATTR, AttributeUpdate
from .facts import head_split_shape
from .index_mapping import RootMap
from .node import Edge, Node
from .ops import OpType

HEADS_ATTRS = (
    "num_heads",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "heads",
    "num_attn_heads",
)
KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head", "d_k", "kv_head_dim")
SIZE_ATTRS = (
    "all_head_size",
    "embed_dim",
    "hidden_size",
    "inner_dim",
    "nf",
    "split_size",
    "d_model",
    "attention_dim",
    "kv_dim",
    "q_dim",
    "proj_size",
)



def attribute_edges(edges: Iterable[Edge]) -> list[Edge]:
    """The tensors among ``edges`` whose maps :func:`attribute_updates_for` reads (outputs of
    reshapes run by a module, inputs of splits and slices): a subset of a group's channels
    changes attributes through these only."""
    return [
        e
        for e in edges
        if (e.src.type == OpType.RESHAPE and e.src.owner is not None)
        or any(d.type == OpType.SPLIT or d.attrs.get("op") == "Slice" for d, _ in e.dsts)
    ]


def attribute_updates_for(edge_maps: dict[Edge, RootMap]) -> list[AttributeUpdate]:
    """Size attributes of the modules that run reshapes and splits, kept true after pruning:
    head counts, head sizes and merged sizes of attention reshapes, split sizes, the sizes slice
    bounds are computed from."""
    updates = reshape_attribute_updates(edge_maps)
    for edge, m in edge_maps.items():
        for dst, _pos in edge.dsts:
            if dst.type == OpType.SPLIT and dst.owner is not None and dst.attrs.get("op") != "Unbind":
                updates.extend(_split_updates(dst, edge, m))
    updates.extend(slice_attribute_updates(edge_maps, updates))
    return updates


def _split_updates(split: Node, edge: Edge, m: RootMap) -> list[AttributeUpdate]:
    """Updates for a split run by a module, of the tensor ``edge`` with map ``m``: list
    attributes equal to the split sizes, or ``split_size`` of an equal split (noted ``<chunks>``);
    a ``<literal split>`` note when no attribute holds the sizes."""
    dim = split.attrs.get("dim", 0) % len(edge.shape)
    if m.shape[dim] == 1:
        return []
    pruned = (m.t >= 0).movedim(dim, 0).reshape(m.shape[dim], -1).any(dim=1)
    old = [s[dim] for s in split.attrs["out_shapes"]]
    new, off = [], 0
    for size in old:
        new.append(size - int(pruned[off : off + size].sum()))
        off += size
    if new == old:
        return []
    owner = split.owner
    if "split_sizes" in split.attrs:
        found: list[AttributeUpdate] = [
            (owner, attr, value, type(value)(new))
            for attr, value in vars(owner).items()
            if isinstance(value, (list, tuple)) and list(value) == old
        ]
        return found or _split_size_ints(owner, old, new)
    size = split.attrs.get("split_size")
    followed: list[AttributeUpdate] = [
        (owner, attr, value, new[0])
        for attr, value in vars(owner).items()
        if attr == "split_size" and value == size and len(set(new)) == 1
    ]
    if split.attrs.get("call") == "chunk" or followed:
        return [(owner, "<chunks>", tuple(old), tuple(new)), *followed]
    return [(owner, "<literal split>", tuple(old), tuple(new))]


#: Parts of attribute names that hold something other than a width (counts, positions...): an
#: int attribute named so is never taken for a split size just because its value matches.
_NOT_WIDTHS = (
    *("idx", "index", "layer", "depth", "num_", "n_"),
    *("resolution", "stride", "kernel", "pad", "step"),
)


def _split_size_ints(owner: Any, old: list[int], new: list[int]) -> list[AttributeUpdate]:
    """Int attributes the split sizes were built from (``split([self.key_dim, self.key_dim,
    self.val_dim])``, ``split((self.c, self.c))``): for every piece whose size changes, the
    owner's int attributes equal to its old size, set to its new size. Two pieces of one
    attribute pruned differently give two values (refused as a conflict); a changed piece no
    attribute explains gives a ``<literal split>`` note."""
    ints = [
        (attr, value)
        for attr, value in _plain_attributes(owner)
        if isinstance(value, int)
        and not isinstance(value, bool)
        and attr not in HEADS_ATTRS
        and not any(part in attr.lower() for part in _NOT_WIDTHS)
    ]
    updates: list[AttributeUpdate] = []
    for size, size_new in zip(old, new):
        matching = [(owner, attr, value, size_new) for attr, value in ints if value == size]
        if not matching and size != size_new:
            return [(owner, "<literal split>", tuple(old), tuple(new))]
        # an unchanged piece pins its attribute: another piece of it may not change
        updates.extend(u for u in matching if u not in updates)
    if len(set(old)) == 1 and len(old) > 1:  # equal pieces of one size: they must stay equal
        updates.append((owner, "<chunks>", tuple(old), tuple(new)))
    return updates


def slice_attribute_updates(
    edge_maps: dict[Edge, RootMap], known: list[AttributeUpdate]
) -> list[AttributeUpdate]:
    """Attributes that the bounds of a slice partition (a fused tensor cut at fixed offsets,
    e.g. ``qkv[..., :n_q * d]``) are computed from, updated to the new piece sizes; a piece
    whose new size no attribute explains gives a ``<literal slice>`` refusal. ``known`` are the
    updates found before (a head size changed there changes what a head count means)."""
    updates: list[AttributeUpdate] = []
    done: set[int] = set()
    for edge, m in edge_maps.items():
        for dst, _pos in edge.dsts:
            if dst.attrs.get("op") != "Slice" or id(dst) in done:
                continue
            dim = dst.attrs.get("dim", 0) % len(edge.shape)
            if im.constant_along(m, dim):
                continue  # the same at every offset: no slice partition is used
            pieces = propagation.slice_partition(dst, dim)
            if pieces is None:
                continue
            done.update(id(p) for p in pieces)
            _partition_updates(edge, m, dim, pieces, known, updates)
    return updates


def _partition_updates(
    edge: Edge,
    m: RootMap,
    dim: int,
    pieces: list[Node],
    known: list[AttributeUpdate],
    updates: list[AttributeUpdate],
) -> None:
    """Append to ``updates`` the attribute updates of one slice partition of ``edge``."""
    kept = (m.t < 0).movedim(dim, 0).reshape(m.shape[dim], -1).any(dim=1)
    old, new, off = [], [], 0
    for p in pieces:
        size = p.attrs["out_shapes"][0][dim]
        old.append(size)
        new.append(int(kept[off : off + size].sum()))
        off += size
    for k, p in enumerate(pieces):
        if old[k] == new[k] or p.owner is None:
            continue
        if k == len(pieces) - 1 and p.attrs["end"] >= edge.shape[dim]:
            continue  # open end (or one past the whole tensor): follows by itself
        found = size_attributes(p.owner, old[k], new[k], known + updates)
        if found is None:
            updates.append((p.owner, "<literal slice>", tuple(old), tuple(new)))
            return
        for obj, attr, value, value_new in found:
            if not has_update(known + updates, obj, attr, value_new):
                updates.append((obj, attr, value, value_new))
            path = f"{SHARED_HOLDER_ATTR}.{attr}"
            if obj is not p.owner and not has_update(updates, p.owner, "<shared>", value_new, path):
                updates.append((p.owner, "<shared>", path, value_new))


def reshape_attribute_updates(edge_maps: dict[Edge, RootMap]) -> list[AttributeUpdate]:
    """Head counts, head sizes and merged sizes of the modules whose reshapes change shape."""
    updates: list[AttributeUpdate] = []
    done: set[tuple[int, str]] = set()
    heads: dict[nn.Module, set[int]] = {}
    for edge, m in edge_maps.items():
        node = edge.src
        if node.type != OpType.RESHAPE or node.owner is None:
            continue
        old, new = edge.shape, pruned_shape(edge.shape, m)
        if old == new:
            continue
        split = head_split_shape(node)
        for d in range(len(old)):
            if old[d] == new[d]:
                continue
            names = _size_names(split, d, len(old)) + registered_size_attributes(node.owner)
            if names is HEADS_ATTRS:
                heads.setdefault(node.owner, set()).add(new[d])
            named = False
            for attr in names:
                if getattr(node.owner, attr, None) == old[d]:
                    named = True
                    if (id(node.owner), attr) not in done:
                        done.add((id(node.owner), attr))
                        updates.append((node.owner, attr, old[d], new[d]))
            if not named:
                updates.extend(_found_by_value(node.owner, node.attrs.get("size_args"), old, new, d, done))
    # Attention modules that read their (query) head count from elsewhere (a shared config)
    # still report their own new head counts.
    for owner, counts in heads.items():
        if not any(hasattr(owner, a) for a in HEADS_ATTRS if a not in KV_HEADS_ATTRS):
            updates.append((owner, "num_heads", None, max(counts)))
            if len(counts) > 1 and not any(hasattr(owner, a) for a in KV_HEADS_ATTRS):
                updates.append((owner, "num_key_value_heads", None, min(counts)))
    return updates


#: Extra size attribute names per module class (:func:`register_size_attributes`).
_REGISTERED: dict[type, tuple[str, ...]] = {}


def register_size_attributes(module_class: type, *names: str) -> None:
    """Declare that modules of ``module_class`` (and subclasses) hold sizes in the attributes
    ``names`` (ints, or tuples of ints such as a shape) that their reshapes use: a prune that
    changes such a size updates them. Attributes whose value equals the changed size are found
    without this; registering helps when several attributes hold the same value."""
    if not isinstance(module_class, type):
        raise TypeError(f"register_size_attributes: module_class must be a class, got {module_class!r}")
    bad = [n for n in names if not isinstance(n, str) or not n.isidentifier() or n.startswith("_")]
    if bad or not names:
        raise ValueError(
            f"register_size_attributes: give public attribute names (identifiers without a leading "
            f"underscore: a saved history may only set those), got {names!r}"
        )
    _REGISTERED[module_class] = tuple(dict.fromkeys((*_REGISTERED.get(module_class, ()), *names)))


def registered_size_attributes(owner: Any) -> tuple[str, ...]:
    """The size attribute names registered for ``owner``'s class and its bases."""
    return tuple(n for cls, names in _REGISTERED.items() if isinstance(owner, cls) for n in names)


def _plain_attributes(owner: Any) -> list[tuple[str, Any]]:
    """The owner's own public attributes (no parameters, buffers or submodules)."""
    return [(k, v) for k, v in vars(owner).items() if not k.startswith("_") and k != "training"]


def _found_by_value(
    owner: Any,
    sizes: list[int | None] | None,
    old: tuple[int, ...],
    new: tuple[int, ...],
    d: int,
    done: set[tuple[int, str]],
) -> list[AttributeUpdate]:
    """Size attributes found by their value rather than their name, for dimension ``d`` of a
    reshape's output going from ``old`` to ``new`` when the reshape was called with the size
    arguments ``sizes`` and ``sizes[d]`` is that size: an int attribute equal to it, or a tuple /
    list equal to the size arguments from some position on (``self.shape = (dim,)`` used as
    ``scale.view(self.shape)``). Head counts and head sizes are left to the name lists; the
    verifying forward catches an attribute that was not the one the reshape read."""
    if not sizes or len(sizes) != len(old) or sizes[d] != old[d]:
        return []  # the size was computed (or -1): no attribute holds it as such
    found: list[AttributeUpdate] = []
    for attr, value in _plain_attributes(owner):
        if (id(owner), attr) in done or attr in HEADS_ATTRS or attr in HEAD_DIM_ATTRS:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value == old[d] > 1:
            found.append((owner, attr, value, new[d]))
        elif isinstance(value, (tuple, list)) and 0 < len(value) <= len(old):
            tail = len(old) - len(value)
            if tail <= d and list(value) == sizes[tail:]:
                found.append((owner, attr, value, type(value)(new[tail:])))
            else:
                continue
        else:
            continue
        done.add((id(owner), attr))
    return found


def _size_names(head_split: bool, d: int, ndim: int) -> tuple[str, ...]:
    """The attribute names that may hold dimension ``d`` of a reshape's output."""
    if head_split and d == ndim - 1:
        return HEAD_DIM_ATTRS
    if head_split and d == ndim - 2:
        return HEADS_ATTRS
    return SIZE_ATTRS


def size_objects(owner: nn.Module) -> list[Any]:
    """The module and the plain object it holds as ``config`` (sizes are read from either)."""
    shared = getattr(owner, SHARED_HOLDER_ATTR, None)
    if shared is None or isinstance(shared, (nn.Module, torch.Tensor)):
        return [owner]
    return [owner, shared]


def _int_attr(obj: Any, attr: str) -> int | None:
    value = getattr(obj, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def has_update(updates: list[AttributeUpdate], obj: Any, attr: str, new: Any, old: Any = None) -> bool:
    """Whether ``updates`` sets ``obj.attr`` to ``new`` (from ``old``, when given)."""
    return any(u is obj and a == attr and n == new and (old is None or o == old) for u, a, o, n in updates)


def size_attributes(
    owner: nn.Module, old: int, new: int, known: list[AttributeUpdate]
) -> list[AttributeUpdate] | None:
    """``(object, attribute, value, new value)`` explaining a slice size going from ``old`` to
    ``new``: head counts ``v`` of the owner or its config with ``old = v * head size`` and
    ``new = v' * head size`` (the head size after ``known`` updates), else sizes equal to ``old``.
    Every attribute that fits is returned (with equal query and key/value head counts several
    do); None when none does."""
    objects = size_objects(owner)
    units: set[tuple[int, int]] = set()
    for obj in objects:
        for attr in HEAD_DIM_ATTRS:
            u = _int_attr(obj, attr)
            if u is not None:
                changed = [n for o, a, _v, n in known if o is obj and a == attr and isinstance(n, int)]
                units.add((u, changed[-1] if changed else u))
    found: list[AttributeUpdate] = []
    for obj in objects:
        for attr in HEADS_ATTRS:
            v = _int_attr(obj, attr)
            for u, u_new in units:
                if v is not None and v * u == old and u_new > 0 and new % u_new == 0:
                    found.append((obj, attr, v, new // u_new))
                    break
    if not found:
        found = [
            (obj, attr, old, new) for obj in objects for attr in SIZE_ATTRS if _int_attr(obj, attr) == old
        ]
    return found or None


def pruned_shape(shape: tuple[int, ...], m: RootMap) -> tuple[int, ...]:
    """Shape of a tensor after the elements marked in ``m`` are removed."""
    if m.runs is not None:
        d = m.dim
        if m.shape[d] != shape[d] or shape[d] <= 1:
            return tuple(shape)
        out = list(shape)
        out[d] -= sum(e - s for s, e, _b, _st in m.runs)
        return tuple(out)
    t = m.t
    dims = [d for d in range(t.dim()) if t.shape[d] == shape[d] and shape[d] > 1]
    if not dims:
        return tuple(shape)
    out = list(shape)
    kept = t < 0
    for d in dims:
        others = tuple(k for k in range(t.dim()) if k != d and t.shape[k] > 1)
        out[d] = int((kept.any(dim=others) if others else kept).sum())
    return tuple(out)


__all__ = [
    "HEADS_ATTRS",
    "HEAD_DIM_ATTRS",
    "KV_HEADS_ATTRS",
    "SHARED_HOLDER_ATTR",
    "SIZE_ATTRS",
    "attribute_edges",
    "attribute_updates_for",
    "register_size_attributes",
    "registered_size_attributes",
    "has_update",
    "pruned_shape",
    "reshape_attribute_updates",
    "size_attributes",
    "size_objects",
    "slice_attribute_updates",
]
