"""Rules for ops that keep each channel in place: model inputs (never pruned), elementwise
ops (broadcasting), expand, repeat and reductions."""

from __future__ import annotations

from .. import index_mapping as im
from ..index_mapping import Barrier, RootMap
from ..node import Edge, Node
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


class SoftmaxRule(ElementwiseRule):
    """``softmax`` / ``log_softmax``: elementwise, except over its own dimension, where every
    channel counts in the denominator (a zeroed channel adds ``exp(0)``): a map that is not
    constant along that dimension is refused."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        self.check(node, m)
        return super().forward(node, pos, m)

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        self.check(node, m)
        return super().backward(node, nr, m)

    @staticmethod
    def check(node: Node, m: RootMap) -> None:
        dim = node.attrs.get("dim")
        if isinstance(dim, int) and m.ndim and not im.constant_along(m, norm_dim(dim, m.ndim)):
            where = f" in {node.owner_name}" if node.owner_name else ""
            raise Barrier(
                f"{node.attrs['op'].lower()} over dim {dim}{where} normalises over the pruned channels: "
                "the pruned model would not compute what the dense one does with those channels zeroed"
            )


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


#: Reductions whose result changes when channels that are zero are removed (a mean divides by
#: the count, a max or min compares with the zeros, a product multiplies by them): pruning over
#: their reduced dimension would not compute what the masked model computes.
COUNT_DEPENDENT = frozenset(
    ("Mean", "Var", "Std", "VarMean", "StdMean", "Logsumexp", "Prod", "Amax", "Amin", "Max", "Min", "Median")
)
#: Ops a normalisation statistic passes through between the tensor and the reduction, or between
#: the reduction and where it rescales the tensor (``x.float().pow(2)``, ``+ eps``, ``rsqrt``).
_STAT_PATH = frozenset(
    (
        *("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Rsqrt", "Reciprocal"),
        *("ToCopy", "Clone", "Abs", "Neg", "Clamp", "ClampMin"),
    )
)
_INVERTING = frozenset(("Rsqrt", "Reciprocal", "Pow"))
#: Ops above this many steps from the reduction are not looked at.
_STAT_DEPTH = 6


def _origins(edge: Edge | None) -> set[int]:
    """Ids of ``edge`` and the tensors it was computed from through :data:`_STAT_PATH` ops
    (first operand), up to :data:`_STAT_DEPTH` steps back."""
    found: set[int] = set()
    while edge is not None and len(found) < _STAT_DEPTH:
        found.add(id(edge))
        src = edge.src
        if not src.type.is_virtual or src.attrs.get("op") not in _STAT_PATH:
            break
        edge = next((e for e in src.in_edges if e is not None), None)
    return found


def renormalises(node: Node) -> bool:
    """Whether the reduction ``node`` is the statistic of a normalisation written in code: its
    (keepdim) result, through ``+ eps`` / ``sqrt`` / ``rsqrt``..., divides or subtracts from the
    tensor it was computed from, or multiplies it once inverted (``x * rsqrt(mean(x**2) + eps)``,
    ``(x - mean) / std``). Such a layer is pruned like a LayerNorm module: its statistics are
    then taken over the kept channels."""
    if not node.attrs.get("keepdim") or not node.in_edges or node.in_edges[0] is None:
        return False
    base = _origins(node.in_edges[0])
    frontier = [(e, 0, False) for e in node.out_edges]
    while frontier:
        edge, depth, inverted = frontier.pop()
        for dst, pos in edge.dsts:
            op = dst.attrs.get("op") if dst.type.is_virtual else None
            if op in ("Mul", "Div", "Sub") and (op != "Mul" or inverted) and (op != "Div" or pos == 1):
                others = [e for i, e in enumerate(dst.in_edges) if i != pos and e is not None]
                if any(base & _origins(e) for e in others):
                    return True
            if op in _STAT_PATH and depth < _STAT_DEPTH:
                frontier.extend((e, depth + 1, inverted or op in _INVERTING) for e in dst.out_edges)
    return False


class ReduceRule(OpRule):
    """``mean``, ``sum``, ``amax``...: a map crosses only when it is constant along the reduced
    dimensions (a whole channel is reduced away together). Otherwise a sum (or a norm) simply
    ends the coupling (zeros add nothing), but a reduction whose result depends on how many
    channels there are (:data:`COUNT_DEPENDENT`) refuses the channels, unless it is the
    statistic of a normalisation (:func:`renormalises`)."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        a = node.attrs
        outs = a["out_shapes"]
        dims = reduced_dims(node, len(a["in_shapes"][pos]))
        if not all(im.constant_along(m, d) for d in dims):
            if a.get("op") in COUNT_DEPENDENT and not renormalises(node):
                where = f" in {node.owner_name}" if node.owner_name else ""
                raise Barrier(
                    f"{a['op'].lower()} over dims {dims}{where} reduces over the pruned channels: its "
                    "result depends on the channel count, so the pruned model would not compute what "
                    "the dense one does with those channels zeroed"
                )
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
