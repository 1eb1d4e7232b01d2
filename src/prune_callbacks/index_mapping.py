"""Index mapping: how a set of pruned channels moves through layout operations.

A pruned channel set on a tensor is a :class:`RootMap`: an integer tensor that broadcasts to the
tensor's shape, holding for every element the root channel it belongs to (``-1`` = kept).
Dimensions that carry channel information are *explicit* (stored at full size); the others are
stored with size 1 and mean "every position along this dimension". Layout ops (concat, split,
view, permute, slice, expand...) are applied to the map with the same torch op, so the mapping
is exact by construction; what cannot be expressed per channel raises :class:`Barrier`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

KEPT = -1


class Barrier(Exception):
    """A channel mapping that cannot be proven correct: the coupled layers are left unprunable."""


@dataclass
class RootMap:
    """Root-channel ids of one tensor's pruned elements (see module docstring)."""

    t: torch.Tensor
    explicit: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return self.t.dim()

    def any(self) -> bool:
        return bool((self.t >= 0).any())


class RootUnion:
    """Root ids that a full-index closure found to be one unit (union-find).

    A full-index group gives every root channel its own id, so that any subset of ids can be
    removed. Sometimes the closure finds two ids on the same element (``cat(x, dw(x))`` read by one
    depthwise conv, a channel-shuffle reshape, ...): removing one without the other would break the
    model, so they become one id. The smallest id of a set represents it.
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        while parent.get(x, x) != x:
            nxt = parent[x]
            parent[x] = parent.get(nxt, nxt)
            x = nxt
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Join ``a[i]`` with ``b[i]`` for every element pair."""
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1).unique(dim=0)
        for x, y in pairs.tolist():
            self.union(x, y)

    def canonical(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with every id replaced by its set's representative (``KEPT`` stays)."""
        if not self.parent:
            return t
        top = max(max(self.parent), int(t.max()) if t.numel() else 0) + 1
        lut = torch.arange(-1, top)
        for x in self.parent:
            lut[x + 1] = self.find(x)
        return lut[t + 1]


_UNION: ContextVar[RootUnion | None] = ContextVar("prune_callbacks_root_union", default=None)


@contextmanager
def joining_roots(union: RootUnion) -> Iterator[RootUnion]:
    """Within the block, elements found to carry two root ids join those ids in ``union``."""
    token = _UNION.set(union)
    try:
        yield union
    finally:
        _UNION.reset(token)


def joining() -> bool:
    """Whether root ids found on one element are joined here (a full-index closure) rather than
    a conflict (a subset closure, with one id)."""
    return _UNION.get() is not None


def join_ids(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> None:
    """Join the root ids ``a[where]`` and ``b[where]`` (elementwise) when ids are being joined."""
    union = _UNION.get()
    if union is not None and bool(where.any()):
        union.add(a[where], b[where])


def channel_map(ndim: int, dim: int, size: int, idxs: Sequence[int], roots: Sequence[int]) -> RootMap:
    """Map for a tensor whose channel dimension ``dim`` has ``size`` channels, ``idxs`` pruned."""
    dim = dim % ndim
    idxs, roots = list(idxs), list(roots)
    if len(idxs) == size and idxs == roots and idxs == list(range(size)):
        flat = torch.arange(size)
    else:
        flat = torch.full((size,), KEPT, dtype=torch.long)
        ix = torch.tensor(idxs, dtype=torch.long)
        flat[ix] = ix if idxs == roots else torch.tensor(roots, dtype=torch.long)
    shape = [1] * ndim
    shape[dim] = size
    return RootMap(flat.view(shape), tuple(d == dim for d in range(ndim)))


def merge(old: RootMap | None, new: RootMap) -> tuple[RootMap, bool]:
    """Union of two maps of the same tensor; returns (merged, whether anything was added)."""
    if old is None:
        return new, True
    explicit = tuple(a or b for a, b in zip(old.explicit, new.explicit))
    if old.t.shape == new.t.shape:
        a, b = old.t, new.t
    else:
        shape = tuple(max(x, y) for x, y in zip(old.t.shape, new.t.shape))
        a, b = old.t.expand(shape), new.t.expand(shape)
    diff = a != b
    if not bool(diff.any()):
        return old, False
    if _UNION.get() is not None:
        join_ids(a, b, diff & (a >= 0) & (b >= 0))
    added = (a < 0) & (b >= 0)
    if not bool(added.any()):
        return old, False
    return RootMap(torch.where(a >= 0, a, b).contiguous(), explicit), True


def squeeze_constant(m: RootMap, keep: Sequence[int] = ()) -> RootMap:
    """Collapse explicit dimensions along which the map does not vary (except ``keep``)."""
    t, explicit = m.t, list(m.explicit)
    for d in range(t.dim()):
        if d in keep or t.shape[d] == 1:
            continue
        first = t.narrow(d, 0, 1)
        if bool((t == first).all()):
            t = first
            explicit[d] = False
    return RootMap(t, tuple(explicit))


def constant_along(m: RootMap, dim: int) -> bool:
    """Whether the map is the same at every position along ``dim``.

    Root ids are compared, not just pruned/kept: in a full-index group every root channel is an
    independent choice, so a pattern is only fixed along ``dim`` if the same roots sit there.
    (Subset groups use a single root id, where this is the pruned/kept pattern.)
    """
    if m.t.shape[dim] == 1:
        return True
    return bool((m.t == m.t.narrow(dim, 0, 1)).all())


def collapse(m: RootMap, dims: Sequence[int], why: str) -> RootMap:
    """Make the map broadcast along ``dims``; it must not vary along them."""
    t, explicit = m.t, list(m.explicit)
    for d in dims:
        if t.shape[d] == 1:
            continue
        if not bool((t == t.narrow(d, 0, 1)).all()):
            raise Barrier(why)
        t = t.narrow(d, 0, 1)
        explicit[d] = False
    return RootMap(t, tuple(explicit))


def channels_at(m: RootMap, dim: int, size: int) -> tuple[list[int], list[int]]:
    """Read the pruned channels of dimension ``dim`` (of ``size`` channels) from a map.

    The map must not vary along any other dimension: otherwise a channel would be pruned at
    some positions only, which no layer can do.
    """
    dim = dim % m.ndim
    m = collapse(
        m,
        [d for d in range(m.ndim) if d != dim],
        f"the pruned channels vary along other dimensions than dimension {dim}",
    )
    if m.t.shape[dim] == 1 and size != 1:
        if bool((m.t >= 0).any()):
            raise Barrier(f"every channel of dimension {dim} would be pruned")
        return [], []
    if m.t.shape[dim] != size:
        raise Barrier(f"dimension {dim} has {m.t.shape[dim]} positions, the layer expects {size}")
    flat = m.t.reshape(-1)
    idxs = torch.nonzero(flat >= 0).flatten()
    return idxs.tolist(), flat[idxs].tolist()


def _align(m: RootMap, ndim: int) -> RootMap:
    """Right-align a map to ``ndim`` dimensions (broadcasting rules)."""
    if m.ndim == ndim:
        return m
    if m.ndim < ndim:
        pad = ndim - m.ndim
        return RootMap(m.t.reshape((1,) * pad + tuple(m.t.shape)), (False,) * pad + m.explicit)
    extra = m.ndim - ndim
    m = collapse(m, range(extra), "channels live on a dimension the result does not have")
    return RootMap(m.t.reshape(m.t.shape[extra:]), m.explicit[extra:])


def broadcast_to(m: RootMap, shape: Sequence[int]) -> RootMap | None:
    """Map onto a broadcast operand or result of ``shape``; None when the operand is broadcast
    along a dimension where the pruned pattern varies (then its elements are shared by pruned and
    kept channels and stay). Along a dimension where the pattern is the same everywhere (e.g. a
    per-head bias broadcast over the batch while whole heads go), the operand is pruned with it."""
    m = _align(m, len(shape))
    for d, size in enumerate(shape):
        msize = m.t.shape[d]
        if msize == 1:
            continue
        if size == 1:
            if not constant_along(m, d):
                return None
            m = RootMap(m.t.narrow(d, 0, 1), m.explicit[:d] + (False,) + m.explicit[d + 1 :])
            continue
        if size != msize:
            raise Barrier(f"an elementwise op changes the size of channel dimension {d} ({msize} -> {size})")
    return m


def _blocks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up groups of dimensions of two shapes with the same number of elements that a
    view maps onto each other (size-1 dimensions are left out)."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [i for i, s in enumerate(b) if s != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia):
                    raise Barrier("reshape between incompatible shapes")
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                if j >= len(ib):
                    raise Barrier("reshape between incompatible shapes")
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        out.append((ga, gb))
    return out


def reshape(m: RootMap, in_shape: Sequence[int], out_shape: Sequence[int]) -> RootMap:
    """Map through a view/reshape/flatten/(un)squeeze. Only the blocks of dimensions that carry
    channels are materialised, so the cost is the size of those blocks."""
    if math.prod(in_shape) != math.prod(out_shape):
        raise Barrier("reshape changes the number of elements")
    m = squeeze_constant(m)
    red_in = [1] * len(in_shape)
    red_out = [1] * len(out_shape)
    explicit = [False] * len(out_shape)
    splits: list[list[int]] = []
    merges: list[list[int]] = []
    for ga, gb in _blocks(in_shape, out_shape):
        if any(m.t.shape[d] != 1 for d in ga):
            for d in ga:
                red_in[d] = in_shape[d]
            for d in gb:
                red_out[d] = out_shape[d]
                explicit[d] = True
            (merges if len(ga) > 1 else splits).append(ga if len(ga) > 1 else gb)
    for d, s in enumerate(m.t.shape):
        if s != 1 and red_in[d] == 1 and in_shape[d] != 1:
            raise Barrier("reshape lost a channel dimension")
    t = m.t.expand(red_in)
    for dims in merges:
        t = product_closure(t, dims)
    t = t.reshape(red_out)
    for dims in splits:
        t = product_closure(t, dims)
    return RootMap(t, tuple(explicit))


def product_closure(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Close a pruned pattern over dimensions that one reshape splits a channel dimension into
    (e.g. (heads, head size) or (groups, channels per group)).

    A tensor of that shape stays rectangular only if what is removed is whole rows (a head) or
    whole columns (the same offsets in every head): a position pruned in some rows only is
    extended to every row, which is the closure's answer to "what else must go".
    """
    dims = [d for d in dims if t.shape[d] > 1]
    if len(dims) < 2:
        return t
    k = len(dims)
    x = t.movedim(dims, list(range(t.dim() - k, t.dim())))
    shape = x.shape
    x = x.reshape(*shape[:-k], shape[-k], -1)
    mask = x >= 0
    full_rows = mask.all(-1, keepdim=True) & (x == x[..., :1]).all(-1, keepdim=True)
    partial = mask & ~full_rows
    cols = partial.any(-2, keepdim=True)
    if bool(cols.any()):
        fill = torch.where(partial, x, torch.full_like(x, KEPT)).amax(-2, keepdim=True)
        # Every root on a column that some root only partly covers goes with that column.
        join_ids(fill.expand_as(x), x, cols & mask & (x != fill))
        x = torch.where(cols & ~mask, fill.expand_as(x), x)
    x = x.reshape(shape).movedim(list(range(t.dim() - k, t.dim())), dims)
    return product_closure(x, dims[1:])


def permute(m: RootMap, dims: Sequence[int]) -> RootMap:
    """Map through ``permute(dims)``."""
    return RootMap(m.t.permute(*dims), tuple(m.explicit[d] for d in dims))


def inverse_permutation(dims: Sequence[int]) -> list[int]:
    inv = [0] * len(dims)
    for i, d in enumerate(dims):
        inv[d] = i
    return inv


def concat(maps: Sequence[RootMap | None], shapes: Sequence[Sequence[int]], dim: int) -> RootMap:
    """Map of ``torch.cat`` of operands with maps ``maps`` (None = nothing pruned there)."""
    ndim = len(shapes[0])
    present = [m for m in maps if m is not None]
    if all(m.t.shape[dim] == 1 for m in present):
        # Channels live on another dimension: every operand shares them.
        out = present[0]
        for m in present[1:]:
            out, _ = merge(out, m)
        return out
    shape = [1] * ndim
    for m in present:
        shape = [max(x, y) for x, y in zip(shape, m.t.shape)]
    explicit = tuple(any(m.explicit[d] for m in present) or d == dim for d in range(ndim))
    if len(present) == 1:
        # One operand carries channels (the common case): place it, no per-operand tensors.
        i = next(k for k, m in enumerate(maps) if m is not None)
        start = sum(s[dim] for s in shapes[:i])
        shape[dim] = sum(s[dim] for s in shapes)
        out = torch.full(shape, KEPT, dtype=torch.long)
        region = out.narrow(dim, start, shapes[i][dim])
        region.copy_(present[0].t.expand(region.shape))
        return RootMap(out, explicit)
    parts = []
    for m, s in zip(maps, shapes):
        part_shape = list(shape)
        part_shape[dim] = s[dim]
        if m is None:
            parts.append(torch.full(part_shape, KEPT, dtype=torch.long))
        else:
            parts.append(m.t.expand(part_shape))
    return RootMap(torch.cat(parts, dim), explicit)


def narrow(m: RootMap, dim: int, start: int, length: int) -> RootMap:
    """Part of a map along ``dim`` (a split/concat operand); broadcast dims pass unchanged."""
    if m.t.shape[dim] == 1:
        return m
    return RootMap(m.t.narrow(dim, start, length), m.explicit)


def embed(m: RootMap, dim: int, start: int, total: int) -> RootMap:
    """Place a map of one split output back into the map of the whole input."""
    if m.t.shape[dim] == 1:
        return m
    shape = list(m.t.shape)
    shape[dim] = total
    t = torch.full(shape, KEPT, dtype=torch.long)
    t.narrow(dim, start, m.t.shape[dim]).copy_(m.t)
    return RootMap(t, m.explicit)


def unsqueeze(m: RootMap, dim: int) -> RootMap:
    ex = list(m.explicit)
    ex.insert(dim, False)
    return RootMap(m.t.unsqueeze(dim), tuple(ex))


def drop_dim(m: RootMap, dim: int) -> RootMap:
    """Remove a dimension along which the map must not vary."""
    m = collapse(m, [dim], f"channels live on dimension {dim}, which the op removes")
    ex = list(m.explicit)
    del ex[dim]
    return RootMap(m.t.squeeze(dim), tuple(ex))
