"""Rules for ops that read part of a tensor: ``narrow`` / basic slicing, ``select``, ``gather``
and advanced indexing. A channel dimension may be sliced only by a partition (slices that tile
it exactly, a split written with fixed offsets); other dimensions may be sliced freely."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .. import index_mapping as im
from ..index_mapping import Barrier, RootMap
from ..node import Node
from ..ops import OpType
from .base import OpRule, Placed, norm_dim

_FIXED_BOUNDS = "slicing a channel dimension with fixed bounds"


def slice_partition(node: Node, dim: int) -> list[Node] | None:
    """The ``Slice`` nodes that read the same tensor as ``node`` along ``dim``, in order, when
    they tile it exactly (step 1, contiguous, every channel in exactly one piece): such pieces
    are a split written with fixed offsets. None when they do not."""
    edge = node.in_edges[0] if node.in_edges else None
    if edge is None:
        return None
    pieces = []
    for dst, pos in edge.dsts:
        if dst.type != OpType.SLICE or dst.attrs.get("op") != "Slice" or pos != 0:
            continue
        if norm_dim(dst.attrs.get("dim", 0), len(edge.shape)) != dim:
            continue
        start, end, step = (dst.attrs.get(k) for k in ("start", "end", "step"))
        if step != 1 or not isinstance(start, int) or not isinstance(end, int) or start < 0 or end < 0:
            return None
        pieces.append(dst)
    pieces.sort(key=lambda p: p.attrs["start"])
    # Bounds were recorded on the traced shapes; sizes follow later prunes, so the offsets
    # checked are the recorded ones and the current sizes must still add up.
    if not pieces or pieces[0].attrs["start"] != 0:
        return None
    for a, b in itertools.pairwise(pieces):
        if a.attrs["end"] != b.attrs["start"]:
            return None
    if sum(p.attrs["out_shapes"][0][dim] for p in pieces) != edge.shape[dim]:
        return None
    return pieces


def _partition_piece(node: Node, dim: int) -> tuple[int, int] | None:
    """(offset, length) of ``node``'s piece in its slice partition along ``dim`` (current sizes)."""
    pieces = slice_partition(node, dim)
    if pieces is None:
        return None
    off = 0
    for p in pieces:
        size = p.attrs["out_shapes"][0][dim]
        if p is node:
            return off, size
        off += size
    return None


@dataclass(frozen=True, slots=True)
class SliceRule(OpRule):
    """Basic slicing and ``narrow`` along one dimension with fixed bounds. A map constant along
    that dimension passes (the slice keeps whole channels); a varying one passes only through a
    piece of a slice partition, and not at all into a piece that keeps all its channels.

    ``partition_backward``: whether the way back also places the map into its piece of a
    partition (basic slices) or only accepts maps constant along the dimension (``narrow``).
    """

    partition_backward: bool = True

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        dim = norm_dim(node.attrs["dim"], len(node.attrs["in_shapes"][pos]))
        if im.constant_along(m, dim):
            return [(0, im.collapse(m, [dim], _FIXED_BOUNDS))]
        piece = _partition_piece(node, dim)
        if piece is None:
            raise Barrier(_FIXED_BOUNDS)
        r = im.narrow(m, dim, *piece)
        return [(0, r)] if bool((r.t >= 0).any()) else []

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        in_shape = node.attrs["in_shapes"][0]
        dim = norm_dim(node.attrs["dim"], len(in_shape))
        piece = (
            _partition_piece(node, dim)
            if self.partition_backward and not im.constant_along(m, dim)
            else None
        )
        if piece is not None:
            return [(0, im.place(m, dim, piece[0], in_shape[dim]))]
        return [(0, im.collapse(m, [dim], _FIXED_BOUNDS))]


class SelectRule(OpRule):
    """``select`` (integer indexing): the selected dimension disappears."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        return [(0, im.drop_dim(m, norm_dim(node.attrs["dim"], len(node.attrs["in_shapes"][pos]))))]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        return [(0, im.unsqueeze(m, norm_dim(node.attrs["dim"], len(node.attrs["in_shapes"][0]))))]


class GatherRule(OpRule):
    """``gather``: positions along the gathered dimension are chosen by data, so the map must
    not vary along it."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        dim = norm_dim(node.attrs["dim"], len(node.attrs["in_shapes"][pos]))
        return [(0, im.collapse(m, [dim], "gather along a channel dimension"))]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        dim = norm_dim(node.attrs["dim"], len(node.attrs["in_shapes"][0]))
        return [(0, im.collapse(m, [dim], _FIXED_BOUNDS))]


class IndexRule(OpRule):
    """Advanced indexing (``x[idx]``) on dimensions that carry no channels. Also the rule of a
    slicing op without a rule of its own."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        a = node.attrs
        return [(0, _index(node, m, a["in_shapes"][pos], a["out_shapes"][0]))]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        a = node.attrs
        return [(0, _index(node, m, a["out_shapes"][nr], a["in_shapes"][0]))]


def _index(node: Node, m: RootMap, src_shape: tuple, dst_shape: tuple) -> RootMap:
    """Advanced indexing on dimensions that carry no channels keeps the channel layout when the
    indexed dimensions are contiguous and replaced in place."""
    dims = node.attrs.get("indexed_dims")
    if dims is None:
        raise Barrier("indexing with unknown indices")
    m = im.collapse(m, [d for d in dims if d < m.ndim], "indexing a channel dimension")
    if len(src_shape) == len(dst_shape):
        return m
    if dims != list(range(dims[0], dims[0] + len(dims))):
        raise Barrier("advanced indexing on non-adjacent dimensions")
    start = dims[0]
    removed = len(src_shape) - len(dst_shape)
    t = m.t
    ex = list(m.explicit)
    if removed > 0:
        for _ in range(removed):
            t = t.squeeze(start)
            del ex[start]
    else:
        for _ in range(-removed):
            t = t.unsqueeze(start)
            ex.insert(start, False)
    return RootMap(t, tuple(ex))
