"""How a pruned channel set crosses each kind of virtual op (forward: input -> outputs,
backward: output -> inputs). Everything is expressed on :class:`~.index_mapping.RootMap`s, so
concat offsets, split regions, reshapes and permutations are handled by the same torch ops the
model used."""

from __future__ import annotations

import bisect
import itertools

import torch

from . import index_mapping as im
from .index_mapping import Barrier, RootMap
from .node import Node
from .ops import OpType


def _norm(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def _op(node: Node) -> str:
    return node.attrs["op"]


def _cat_sizes(node: Node, dim: int) -> list[int]:
    """Sizes of every concat operand along ``dim``; a single constant operand is inferred."""
    in_shapes = node.attrs["in_shapes"]
    out = node.attrs["out_shapes"][0][dim]
    known = [s[dim] if s is not None else None for s in in_shapes]
    missing = [i for i, s in enumerate(known) if s is None]
    if len(missing) > 1:
        raise Barrier("concatenation of several constant tensors along a channel dimension")
    if missing:
        known[missing[0]] = out - sum(s for s in known if s is not None)
    return known  # type: ignore[return-value]


def _check_constants(node: Node, m: RootMap) -> None:
    """A constant operand (a tensor that is neither a parameter nor computed from one) that
    spans pruned channels would keep its old size: refuse instead of breaking the model."""
    consts = [c for c in node.attrs.get("const_shapes") or () if c is not None]
    if not consts:
        return
    sq = im.squeeze_constant(m)
    for shape in consts:
        for k in range(1, min(len(shape), sq.ndim) + 1):
            if shape[-k] > 1 and sq.shape[-k] > 1:
                raise Barrier(f"a constant tensor of shape {list(shape)} spans the pruned channels")


def _hit_regions(m: RootMap, dim: int, offsets: list[int]) -> list[int]:
    """Indices of the consecutive regions (bounded by ``offsets``) along ``dim`` that hold pruned
    elements; every region when the map is broadcast along ``dim``."""
    if m.shape[dim] == 1:
        return list(range(len(offsets) - 1))
    spans = im.pruned_spans(m, dim)
    if spans is not None:
        regions: set[int] = set()
        for s, e in spans:
            regions.update(range(bisect.bisect_right(offsets, s) - 1, bisect.bisect_right(offsets, e - 1)))
        return sorted(regions)
    hit = (m.t >= 0).movedim(dim, 0).reshape(m.shape[dim], -1).any(dim=1).nonzero().flatten().tolist()
    return sorted({bisect.bisect_right(offsets, h) - 1 for h in hit})


def _reduced_dims(node: Node, ndim: int) -> list[int]:
    dims = node.attrs.get("dim")
    if dims is None or dims == () or dims == []:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(_norm(d, ndim) for d in dims)


def _perm(node: Node, ndim: int) -> list[int]:
    a = node.attrs
    if "dims" in a:
        return [_norm(d, ndim) for d in a["dims"]]
    if "dim0" in a:
        p = list(range(ndim))
        d0, d1 = _norm(a["dim0"], ndim), _norm(a["dim1"], ndim)
        p[d0], p[d1] = p[d1], p[d0]
        return p
    return list(reversed(range(ndim)))


def _trivial_on(m: RootMap, dims: list[int]) -> bool:
    """Whether the pruned pattern is constant along ``dims``."""
    return all(im.constant_along(m, d) for d in dims)


def from_input(node: Node, pos: int, m: RootMap) -> list[tuple[str, int, RootMap]]:
    """Maps implied on the node's other tensors by map ``m`` on its input ``pos``, tagged
    ``("out", output number, map)`` or ``("in", input position, map)``."""
    if node.type == OpType.MATMUL:
        return _matmul(node, ("in", pos), m)
    if node.type == OpType.ATTENTION:
        return _attention(node, ("in", pos), m)
    return [("out", k, r) for k, r in forward(node, pos, m)]


def from_output(node: Node, nr: int, m: RootMap) -> list[tuple[str, int, RootMap]]:
    """Like :func:`from_input`, for a map on the node's output ``nr``."""
    if node.type == OpType.MATMUL:
        return _matmul(node, ("out", nr), m)
    if node.type == OpType.ATTENTION:
        return _attention(node, ("out", nr), m)
    return [("in", i, r) for i, r in backward(node, nr, m)]


def round_trip_exact(node: Node, pos: int, m: RootMap) -> bool:
    """Whether mapping ``m`` from input ``pos`` to the outputs and back gives nothing beyond
    ``m`` on input ``pos`` and nothing on the other inputs: a one-input elementwise op, a permute,
    or a concat along the dimension that holds the channels (the map comes back to its own
    region only). Not a view: closing heads may grow the map (see ``product_closure``)."""
    t = node.type
    if t == OpType.PERMUTE:
        return True
    op = node.attrs.get("op")
    if t == OpType.ELEMENTWISE:
        return op != "Repeat" and sum(e is not None for e in node.in_edges) == 1
    if t == OpType.CONCAT and op != "Stack":
        return m.shape[_norm(node.attrs["dim"], len(node.attrs["out_shapes"][0]))] != 1
    return False


def forward(node: Node, pos: int, m: RootMap) -> list[tuple[int, RootMap]]:
    """Maps on the node's outputs (by output number) given map ``m`` on its input ``pos``."""
    t = node.type
    if t == OpType.INPUT:
        raise Barrier("it would change the channels of a model input")
    a = node.attrs
    outs = a["out_shapes"]
    in_shape = a["in_shapes"][pos]
    op = _op(node)
    if t in (OpType.ELEMENTWISE, OpType.EXPAND) and op not in ("Repeat",):
        _check_constants(node, m)
        res = []
        for k, shape in enumerate(outs):
            r = im.broadcast_to(m, shape)
            if r is None:
                raise Barrier(f"{op} collapses a channel dimension")
            res.append((k, r))
        return res
    if t == OpType.REDUCE:
        dims = _reduced_dims(node, len(in_shape))
        if not _trivial_on(m, dims):
            return []
        m = im.collapse(m, dims, "reduction")
        if not a.get("keepdim", False):
            for d in reversed(dims):
                m = im.drop_dim(m, d)
        return [(k, m) for k in range(len(outs)) if len(outs[k]) == m.ndim]
    if t == OpType.CONCAT:
        ndim = len(outs[0])
        if op == "Stack":
            dim = _norm(a["dim"], ndim)
            return [(0, im.unsqueeze(m, dim))]
        dim = _norm(a["dim"], ndim)
        sizes = _cat_sizes(node, dim)
        return [(0, im.place(m, dim, sum(sizes[:pos]), sum(sizes)))]
    if t == OpType.SPLIT:
        ndim = len(in_shape)
        dim = _norm(a.get("dim", 0), ndim)
        unbind = op == "Unbind"
        sizes = [1 if unbind else shape[dim] for shape in outs]
        offsets = list(itertools.accumulate(sizes, initial=0))
        ks = _hit_regions(m, dim, offsets) if m.shape[dim] != 1 else range(len(outs))
        res = []
        for k in ks:
            r = im.narrow(m, dim, offsets[k], sizes[k])
            res.append((k, im.drop_dim(r, dim) if unbind else r))
        return res
    if t == OpType.RESHAPE:
        return [(0, im.reshape(m, in_shape, outs[0]))]
    if t == OpType.PERMUTE:
        return [(0, im.permute(m, _perm(node, len(in_shape))))]
    if t == OpType.SLICE:
        r = _slice_forward(node, op, m, in_shape, outs[0])
        return [(0, r)] if r is not None else []
    if op == "Repeat":
        return [(0, _repeat(m, a["repeats"], in_shape, outs[0]))]
    raise Barrier(f"pruning through {op} ({t.name.lower()}) is not supported")


def backward(node: Node, nr: int, m: RootMap) -> list[tuple[int, RootMap]]:
    """Maps on the node's inputs (by input position) given map ``m`` on its output ``nr``."""
    t = node.type
    if t == OpType.INPUT:
        raise Barrier("it would change the channels of a model input")
    a = node.attrs
    in_shapes = a["in_shapes"]
    out_shape = a["out_shapes"][nr]
    op = _op(node)
    if t in (OpType.ELEMENTWISE, OpType.EXPAND) and op != "Repeat":
        _check_constants(node, m)
        res = []
        for i, shape in enumerate(in_shapes):
            if shape is None:
                continue
            if t == OpType.EXPAND:
                r = _unexpand(m, shape)
            else:
                r = im.broadcast_to(m, shape)
            if r is not None:
                res.append((i, r))
        return res
    if t == OpType.REDUCE:
        in_shape = in_shapes[0]
        dims = _reduced_dims(node, len(in_shape))
        if not a.get("keepdim", False):
            for d in dims:
                m = im.unsqueeze(m, d)
        return [(0, m)]
    if t == OpType.CONCAT:
        ndim = len(out_shape)
        if op == "Stack":
            dim = _norm(a["dim"], ndim)
            if m.shape[dim] == 1:
                r = im.drop_dim(m, dim)
                return [(i, r) for i, s in enumerate(in_shapes) if s is not None]
            return [
                (i, im.drop_dim(im.narrow(m, dim, i, 1), dim))
                for i, s in enumerate(in_shapes)
                if s is not None
            ]
        dim = _norm(a["dim"], ndim)
        if m.shape[dim] == 1:
            return [(i, m) for i, s in enumerate(in_shapes) if s is not None]
        sizes = _cat_sizes(node, dim)
        offsets = list(itertools.accumulate(sizes, initial=0))
        res = []
        for i in _hit_regions(m, dim, offsets):
            if in_shapes[i] is not None:
                res.append((i, im.narrow(m, dim, offsets[i], sizes[i])))
        return res
    if t == OpType.SPLIT:
        in_shape = in_shapes[0]
        ndim = len(in_shape)
        dim = _norm(a.get("dim", 0), ndim)
        if op == "Unbind":
            m = im.unsqueeze(m, dim)
            return [(0, im.place(m, dim, nr, in_shape[dim]) if not _trivial_on(m, [dim]) else m)]
        off = sum(s[dim] for s in a["out_shapes"][:nr])
        return [(0, im.place(m, dim, off, in_shape[dim]))]
    if t == OpType.RESHAPE:
        return [(0, im.reshape(m, out_shape, in_shapes[0]))]
    if t == OpType.PERMUTE:
        return [(0, im.permute(m, im.inverse_permutation(_perm(node, len(out_shape)))))]
    if t == OpType.SLICE:
        return [(0, _slice_backward(node, op, m, in_shapes[0], out_shape))]
    if op == "Repeat":
        return [(0, _unrepeat(m, a["repeats"], in_shapes[0], out_shape))]
    raise Barrier(f"pruning through {op} ({t.name.lower()}) is not supported")


def _slice_forward(node: Node, op: str, m: RootMap, in_shape: tuple, out_shape: tuple) -> RootMap | None:
    """Map on a slice's output; None when a piece of a slice partition keeps all its channels."""
    a = node.attrs
    ndim = len(in_shape)
    if op in ("Slice", "Narrow"):
        dim = _norm(a["dim"], ndim)
        if im.constant_along(m, dim):
            return im.collapse(m, [dim], "slicing a channel dimension with fixed bounds")
        piece = _partition_piece(node, dim)
        if piece is None:
            raise Barrier("slicing a channel dimension with fixed bounds")
        r = im.narrow(m, dim, *piece)
        return r if bool((r.t >= 0).any()) else None
    if op == "Select":
        dim = _norm(a["dim"], ndim)
        return im.drop_dim(m, dim)
    if op == "Gather":
        return im.collapse(m, [_norm(a["dim"], ndim)], "gather along a channel dimension")
    return _index(node, m, in_shape, out_shape)


def _slice_backward(node: Node, op: str, m: RootMap, in_shape: tuple, out_shape: tuple) -> RootMap:
    a = node.attrs
    ndim = len(in_shape)
    if op in ("Slice", "Narrow", "Gather"):
        dim = _norm(a["dim"], ndim)
        piece = _partition_piece(node, dim) if op == "Slice" and not im.constant_along(m, dim) else None
        if piece is not None:
            return im.place(m, dim, piece[0], in_shape[dim])
        return im.collapse(m, [dim], "slicing a channel dimension with fixed bounds")
    if op == "Select":
        return im.unsqueeze(m, _norm(a["dim"], ndim))
    return _index(node, m, out_shape, in_shape)


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
        if _norm(dst.attrs.get("dim", 0), len(edge.shape)) != dim:
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


def _unexpand(m: RootMap, in_shape: tuple) -> RootMap | None:
    extra = m.ndim - len(in_shape)
    m = im.collapse(m, range(extra), "expand: channels on a dimension that the input does not have")
    m = RootMap(m.t.reshape(m.shape[extra:]), m.explicit[extra:])
    expanded = [d for d, s in enumerate(in_shape) if s == 1]
    return im.collapse(
        m,
        expanded,
        "copies made by expand (e.g. repeated key/value heads) would be "
        "pruned differently; prune whole groups of copies",
    )


def _repeat(m: RootMap, repeats: tuple, in_shape: tuple, out_shape: tuple) -> RootMap:
    pad = len(out_shape) - m.ndim
    t = m.t.reshape((1,) * pad + tuple(m.shape))
    ex = (False,) * pad + m.explicit
    reps = [r if t.shape[d] != 1 else 1 for d, r in enumerate(repeats)]
    return RootMap(t.repeat(*reps), ex)


def _unrepeat(m: RootMap, repeats: tuple, in_shape: tuple, out_shape: tuple) -> RootMap:
    t = m.t
    pad = len(out_shape) - len(in_shape)
    for d, r in enumerate(repeats):
        if r > 1 and t.shape[d] != 1:
            size = t.shape[d] // r
            blocks = t.unflatten(d, (r, size))
            if not bool((blocks == blocks.narrow(d, 0, 1)).all()):
                raise Barrier("repeated copies of a channel are pruned differently")
            t = blocks.narrow(d, 0, 1).squeeze(d)
    if pad:
        if any(s != 1 for s in t.shape[:pad]):
            raise Barrier("repeat: channels on a dimension that the input does not have")
        t = t.reshape(t.shape[pad:])
    return RootMap(t, m.explicit[pad:])


# ---------------------------------------------------------------------------------------------
# Matrix products: out[..., i, j] = sum_k a[..., i, k] * b[..., k, j] (+ bias)
# ---------------------------------------------------------------------------------------------
_MATMUL_ROLES = {
    "Mm": (0, 1, None),
    "Bmm": (0, 1, None),
    "Matmul": (0, 1, None),
    "Addmm": (1, 2, 0),
    "Baddbmm": (1, 2, 0),
}


def _rows_cols(m: RootMap, rdim: int, cdim: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a matrix-shaped map into whole pruned rows and whole pruned columns (root ids,
    -1 elsewhere; shapes keep a size-1 dimension in place of the other axis). A pattern that is
    not such a union cannot be expressed by removing rows and columns."""
    t = m.t
    mask = t >= 0
    rows = mask.all(dim=cdim, keepdim=True) & (t == t.narrow(cdim, 0, 1)).all(dim=cdim, keepdim=True)
    cols = mask.all(dim=rdim, keepdim=True) & (t == t.narrow(rdim, 0, 1)).all(dim=rdim, keepdim=True)
    if not bool((mask == (rows | cols)).all()):
        raise Barrier(f"{what}: entries pruned in a pattern that is neither whole rows nor whole columns")
    row_t = torch.where(rows, t.narrow(cdim, 0, 1) if t.shape[cdim] > 1 else t, KEPT_T)
    col_t = torch.where(cols, t.narrow(rdim, 0, 1) if t.shape[rdim] > 1 else t, KEPT_T)
    return row_t, col_t


KEPT_T = torch.tensor(im.KEPT)


def _as_map(t: torch.Tensor, shape: tuple) -> RootMap | None:
    """Map onto an operand of ``shape`` (right-aligned batch dims); None when nothing is pruned."""
    if not bool((t >= 0).any()):
        return None
    m = RootMap(t, tuple(s != 1 for s in t.shape))
    r = im.broadcast_to(m, shape)
    if r is None:
        raise Barrier("a matrix product shares an operand across positions that are pruned differently")
    return r


def _matmul(node: Node, at: tuple[str, int], m: RootMap) -> list[tuple[str, int, RootMap]]:
    """Index mapping through a (batched) matrix product: removing rows of ``a`` removes rows of the
    result, removing columns of ``b`` removes its columns, and the contracted dimension couples
    the columns of ``a`` with the rows of ``b``."""
    a = node.attrs
    op = a["op"]
    if op not in _MATMUL_ROLES:
        raise Barrier(f"pruning through {op} is not supported")
    ia, ib, ibias = _MATMUL_ROLES[op]
    in_shapes = a["in_shapes"]
    out_shape = tuple(a["out_shapes"][0])
    sa, sb = in_shapes[ia], in_shapes[ib]
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        raise Barrier(f"{op} with a constant or 1-D operand")
    side, pos = at
    nd = len(out_shape)
    if side == "in" and pos == ibias:
        r = im.broadcast_to(m, out_shape)
        return [("out", 0, r)] if r is not None else []
    pad_a = (1,) * (nd - len(sa)) + tuple(sa)
    pad_b = (1,) * (nd - len(sb)) + tuple(sb)
    full = pad_a if (side, pos) == ("in", ia) else pad_b if (side, pos) == ("in", ib) else out_shape
    rows, cols = _rows_cols(_on(m, full), nd - 2, nd - 1, op)
    if (side, pos) == ("in", ia):
        parts = [("out", 0, rows, out_shape), ("in", ib, cols.transpose(-1, -2), tuple(sb))]
    elif (side, pos) == ("in", ib):
        parts = [("out", 0, cols, out_shape), ("in", ia, rows.transpose(-1, -2), tuple(sa))]
    else:
        parts = [("in", ia, rows, tuple(sa)), ("in", ib, cols, tuple(sb))]
        if ibias is not None and in_shapes[ibias] is not None:
            r = im.broadcast_to(m, in_shapes[ibias])
            if r is not None:
                parts.append(("in", ibias, r.t, tuple(in_shapes[ibias])))
    res = []
    for kind, i, t, shape in parts:
        r = _as_map(t, shape)
        if r is not None:
            res.append((kind, i, r))
    return res


def _on(m: RootMap, shape: tuple) -> RootMap:
    r = im.broadcast_to(m, shape)
    if r is None:
        raise Barrier("a matrix product operand is broadcast along a pruned dimension")
    return r


def _check_mask(node: Node, heads: torch.Tensor) -> None:
    """A constant attention mask with a head dimension would keep its old head count."""
    consts = node.attrs.get("const_shapes") or ()
    const = consts[3] if len(consts) > 3 else None
    if const is None or len(const) < 3 or const[-3] == 1 or not bool((heads >= 0).any()):
        return
    raise Barrier(f"a constant attention mask of shape {list(const)} has one entry per head")


def _attention(node: Node, at: tuple[str, int], m: RootMap) -> list[tuple[str, int, RootMap]]:
    """Fused scaled-dot-product attention: q (..., L, E), k (..., S, E), v (..., S, Ev) ->
    out (..., L, Ev). Query/key feature columns are coupled; value features go to the output;
    a batch position (a head) whose query/key features are all removed takes its values and
    outputs with it, and the other way round."""
    a = node.attrs
    in_shapes = a["in_shapes"]
    out_shape = tuple(a["out_shapes"][0])
    if any(s is None for s in in_shapes[:3]) or len({len(s) for s in in_shapes[:3]}) != 1:
        raise Barrier("attention with constant or differently shaped inputs")
    sq, sk, sv = (tuple(s) for s in in_shapes[:3])
    if sk[:-2] != sv[:-2] or sq[:-3] != sk[:-3] or len(sq) < 3 or sq[-3] % sk[-3]:
        raise Barrier("attention with broadcast batch or head dimensions")
    rep = sq[-3] // sk[-3]  # grouped-query attention: each key/value head serves `rep` query heads
    side, pos = at
    nd = len(sq)
    mask_shape = tuple(in_shapes[3]) if len(in_shapes) > 3 and in_shapes[3] is not None else None
    if side == "in" and pos >= 3:
        if pos > 3 or mask_shape is None:
            return []
        # An additive mask or bias (..., heads, L, S): its head entries go with whole heads.
        t = _on(m, mask_shape).t
        t = t.reshape((1,) * (nd - t.dim()) + tuple(t.shape))
        first = t.narrow(-1, 0, 1).narrow(-2, 0, 1)
        if not bool((t == first).all()):
            raise Barrier("attention: mask positions (tokens) cannot be pruned")
        feat = heads = first
        qk = False
    else:
        full = {0: sq, 1: sk, 2: sv}[pos] if side == "in" else out_shape
        rows, feat = _rows_cols(_on(m, full), nd - 2, nd - 1, "attention")
        kv_side = side == "in" and pos in (1, 2)
        if rep > 1 and kv_side:
            feat = feat.repeat_interleave(rep, dim=-3) if feat.shape[-3] > 1 else feat
            rows = rows.repeat_interleave(rep, dim=-3) if rows.shape[-3] > 1 else rows
        # a pruned row is a token unless every feature column is pruned there too (a whole head
        # whose map is broadcast over the tokens)
        if bool(((rows >= 0) & ~(feat >= 0).all(dim=-1, keepdim=True)).any()):
            raise Barrier("attention: whole query/key/value positions (tokens) cannot be pruned")
        whole = (feat >= 0).all(dim=-1, keepdim=True) & (feat == feat.narrow(-1, 0, 1)).all(
            dim=-1, keepdim=True
        )
        heads = torch.where(whole, feat.narrow(-1, 0, 1), KEPT_T)
        qk = side == "in" and pos in (0, 1)
    _check_mask(node, heads)
    parts = [
        ("in", 0, feat if qk else heads, sq),
        ("in", 1, feat if qk else heads, sk),
        ("in", 2, heads if qk else feat, sv),
        ("out", 0, heads if qk else feat, out_shape),
    ]
    res = []
    if mask_shape is not None and at != ("in", 3) and bool((heads >= 0).any()):
        r = im.broadcast_to(RootMap(heads, tuple(s != 1 for s in heads.shape)), mask_shape)
        if r is not None:  # a mask broadcast over heads is shared by all of them and stays
            res.append(("in", 3, r))
    for kind, i, t, shape in parts:
        if (kind, i) == at:
            continue
        if rep > 1 and kind == "in" and i in (1, 2) and t.shape[-3] > 1:
            grouped = t.unflatten(-3, (t.shape[-3] // rep, rep))
            first = grouped.narrow(-3, 0, 1).expand_as(grouped)
            differ = grouped != first
            if bool(differ.any()):
                # A full-index closure joins the root ids of query heads that share a key/value
                # head (they are one unit); a choice of channels that splits them is refused.
                if not im.joining() or bool((differ & ((grouped < 0) | (first < 0))).any()):
                    raise Barrier(
                        "copies made by grouped-query attention (query heads sharing a key/value "
                        "head) would be pruned differently; prune whole groups of copies"
                    )
                im.join_ids(first, grouped, differ)
            t = grouped.narrow(-3, 0, 1).squeeze(-3)
        r = _as_map(t, shape)
        if r is not None:
            res.append((kind, i, r))
    return res
