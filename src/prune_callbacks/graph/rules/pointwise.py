"""Rules for ops that keep each channel in place: model inputs (never pruned), elementwise
ops (broadcasting), expand, repeat and reductions."""

from __future__ import annotations

from .. import index_mapping as im
from ..index_mapping import Barrier, RootMap
from ..node import Node
from .base import OpRule, Placed, norm_dim


class InputRule(OpRule):
    """A model input: its channels are the caller's and cannot change."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        raise Barrier("it would change the channels of a model input")

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        raise Barrier("it would change the channels of a model input")


def check_constants(node: Node, m: RootMap) -> None:
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


class ElementwiseRule(OpRule):
    """Activations, arithmetic, pooling, casts...: every tensor has the layout of the others up
    to broadcasting, so a map is broadcast onto each of them. Also the rule of any op name the
    graph does not know (it warns about those)."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        check_constants(node, m)
        res = []
        for k, shape in enumerate(node.attrs["out_shapes"]):
            r = im.broadcast_to(m, shape)
            if r is None:
                raise Barrier(f"{node.attrs['op']} collapses a channel dimension")
            res.append((k, r))
        return res

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        check_constants(node, m)
        res = []
        for i, shape in enumerate(node.attrs["in_shapes"]):
            if shape is None:
                continue
            r = self.onto_input(m, shape)
            if r is not None:
                res.append((i, r))
        return res

    def onto_input(self, m: RootMap, in_shape: tuple) -> RootMap | None:
        """The output map ``m`` seen on an input of ``in_shape``; None when it does not reach it."""
        return im.broadcast_to(m, in_shape)

    def round_trip_exact(self, node: Node, pos: int, m: RootMap) -> bool:
        """Exact for a one-input op: the map comes back unchanged and has no other input to reach."""
        return sum(e is not None for e in node.in_edges) == 1


class ExpandRule(ElementwiseRule):
    """``expand`` / ``repeat_interleave``: forward like an elementwise op; backward, copies made
    along an expanded dimension must all be pruned alike."""

    __slots__ = ()

    def onto_input(self, m: RootMap, in_shape: tuple) -> RootMap | None:
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

    def round_trip_exact(self, node: Node, pos: int, m: RootMap) -> bool:
        return False


class RepeatRule(OpRule):
    """``Tensor.repeat``: each channel is tiled ``repeats`` times along its dimension."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        out_shape = node.attrs["out_shapes"][0]
        pad = len(out_shape) - m.ndim
        t = m.t.reshape((1,) * pad + tuple(m.shape))
        ex = (False,) * pad + m.explicit
        reps = [r if t.shape[d] != 1 else 1 for d, r in enumerate(node.attrs["repeats"])]
        return [(0, RootMap(t.repeat(*reps), ex))]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        a = node.attrs
        t = m.t
        pad = len(a["out_shapes"][nr]) - len(a["in_shapes"][0])
        for d, r in enumerate(a["repeats"]):
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
        return [(0, RootMap(t, m.explicit[pad:]))]


def reduced_dims(node: Node, ndim: int) -> list[int]:
    """The dimensions a reduction runs over, non-negative and sorted (all of them by default)."""
    dims = node.attrs.get("dim")
    if dims is None or dims == () or dims == []:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(norm_dim(d, ndim) for d in dims)


class ReduceRule(OpRule):
    """``mean``, ``sum``, ``amax``...: a map crosses only when it is constant along the reduced
    dimensions (a whole channel is reduced away together); otherwise nothing goes through."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        a = node.attrs
        outs = a["out_shapes"]
        dims = reduced_dims(node, len(a["in_shapes"][pos]))
        if not all(im.constant_along(m, d) for d in dims):
            return []
        m = im.collapse(m, dims, "reduction")
        if not a.get("keepdim", False):
            for d in reversed(dims):
                m = im.drop_dim(m, d)
        return [(k, m) for k in range(len(outs)) if len(outs[k]) == m.ndim]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        a = node.attrs
        dims = reduced_dims(node, len(a["in_shapes"][0]))
        if not a.get("keepdim", False):
            for d in dims:
                m = im.unsqueeze(m, d)
        return [(0, m)]
