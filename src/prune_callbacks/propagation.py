"""How a pruned channel set crosses each kind of virtual op (forward: input -> outputs,
backward: output -> inputs). Everything is expressed on :class:`~.index_mapping.RootMap`s, so
concat offsets, split regions, reshapes and permutations are handled by the same torch ops the
model used."""

from __future__ import annotations

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
    m = im.squeeze_constant(m)
    return all(m.t.shape[d] == 1 for d in dims)


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
        m = im.squeeze_constant(m)
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
        shapes = []
        for size in sizes:
            sh = list(outs[0])
            sh[dim] = size
            shapes.append(sh)
        maps = [m if i == pos else None for i in range(len(sizes))]
        return [(0, im.concat(maps, shapes, dim))]
    if t == OpType.SPLIT:
        ndim = len(in_shape)
        dim = _norm(a.get("dim", 0), ndim)
        unbind = op == "Unbind"
        res, off = [], 0
        for k, shape in enumerate(outs):
            size = 1 if unbind else shape[dim]
            r = im.narrow(m, dim, off, size)
            off += size
            if unbind:
                r = im.drop_dim(r, dim)
            if r.any():
                res.append((k, r))
        return res
    if t == OpType.RESHAPE:
        return [(0, im.reshape(m, in_shape, outs[0]))]
    if t == OpType.PERMUTE:
        return [(0, im.permute(m, _perm(node, len(in_shape))))]
    if t == OpType.SLICE:
        return [(0, _slice_forward(node, op, m, in_shape, outs[0]))]
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
            if m.t.shape[dim] == 1:
                r = im.drop_dim(m, dim)
                return [(i, r) for i, s in enumerate(in_shapes) if s is not None]
            return [
                (i, im.drop_dim(im.narrow(m, dim, i, 1), dim))
                for i, s in enumerate(in_shapes)
                if s is not None
            ]
        dim = _norm(a["dim"], ndim)
        if m.t.shape[dim] == 1:
            return [(i, m) for i, s in enumerate(in_shapes) if s is not None]
        sizes = _cat_sizes(node, dim)
        res, off = [], 0
        for i, size in enumerate(sizes):
            r = im.narrow(m, dim, off, size)
            off += size
            if in_shapes[i] is not None and r.any():
                res.append((i, r))
        return res
    if t == OpType.SPLIT:
        in_shape = in_shapes[0]
        ndim = len(in_shape)
        dim = _norm(a.get("dim", 0), ndim)
        if op == "Unbind":
            m = im.unsqueeze(m, dim)
            return [(0, im.embed(m, dim, nr, in_shape[dim]) if not _trivial_on(m, [dim]) else m)]
        off = sum(s[dim] for s in a["out_shapes"][:nr])
        return [(0, im.embed(m, dim, off, in_shape[dim]))]
    if t == OpType.RESHAPE:
        return [(0, im.reshape(m, out_shape, in_shapes[0]))]
    if t == OpType.PERMUTE:
        return [(0, im.permute(m, im.inverse_permutation(_perm(node, len(out_shape)))))]
    if t == OpType.SLICE:
        return [(0, _slice_backward(node, op, m, in_shapes[0], out_shape))]
    if op == "Repeat":
        return [(0, _unrepeat(m, a["repeats"], in_shapes[0], out_shape))]
    raise Barrier(f"pruning through {op} ({t.name.lower()}) is not supported")


def _slice_forward(node: Node, op: str, m: RootMap, in_shape: tuple, out_shape: tuple) -> RootMap:
    a = node.attrs
    ndim = len(in_shape)
    if op in ("Slice", "Narrow"):
        dim = _norm(a["dim"], ndim)
        if not _trivial_on(m, [dim]):
            raise Barrier("slicing a channel dimension with fixed bounds")
        return im.squeeze_constant(m)
    if op == "Select":
        dim = _norm(a["dim"], ndim)
        return im.drop_dim(m, dim)
    if op == "Gather":
        dim = _norm(a["dim"], ndim)
        if not _trivial_on(m, [dim]):
            raise Barrier("gather along a channel dimension")
        return im.squeeze_constant(m)
    return _index(node, m, in_shape, out_shape)


def _slice_backward(node: Node, op: str, m: RootMap, in_shape: tuple, out_shape: tuple) -> RootMap:
    a = node.attrs
    ndim = len(in_shape)
    if op in ("Slice", "Narrow", "Gather"):
        dim = _norm(a["dim"], ndim)
        if not _trivial_on(m, [dim]):
            raise Barrier("slicing a channel dimension with fixed bounds")
        return im.squeeze_constant(m)
    if op == "Select":
        return im.unsqueeze(m, _norm(a["dim"], ndim))
    return _index(node, m, out_shape, in_shape)


def _index(node: Node, m: RootMap, src_shape: tuple, dst_shape: tuple) -> RootMap:
    """Advanced indexing on dimensions that carry no channels keeps the channel layout when the
    indexed dimensions are contiguous and replaced in place."""
    dims = node.attrs.get("indexed_dims")
    if dims is None:
        raise Barrier("indexing with unknown indices")
    m = im.squeeze_constant(m)
    if not all(m.t.shape[d] == 1 for d in dims if d < m.ndim):
        raise Barrier("indexing a channel dimension")
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
    m = im.squeeze_constant(m)
    extra = m.ndim - len(in_shape)
    if any(m.t.shape[d] != 1 for d in range(extra)):
        raise Barrier("expand: channels on a dimension that the input does not have")
    t = m.t.reshape(m.t.shape[extra:])
    ex = m.explicit[extra:]
    for d, s in enumerate(in_shape):
        if s == 1 and t.shape[d] != 1:
            raise Barrier("channels vary along a broadcast (expanded) dimension")
    return RootMap(t, ex)


def _repeat(m: RootMap, repeats: tuple, in_shape: tuple, out_shape: tuple) -> RootMap:
    pad = len(out_shape) - m.ndim
    t = m.t.reshape((1,) * pad + tuple(m.t.shape))
    ex = (False,) * pad + m.explicit
    reps = [r if t.shape[d] != 1 else 1 for d, r in enumerate(repeats)]
    return RootMap(t.repeat(*reps), ex)


def _unrepeat(m: RootMap, repeats: tuple, in_shape: tuple, out_shape: tuple) -> RootMap:
    m = im.squeeze_constant(m)
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
