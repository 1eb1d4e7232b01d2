"""Rules for ops that move channels around without computing on them: concatenation, stacking,
splitting, unbinding, reshapes and permutations."""

from __future__ import annotations

import bisect
import itertools

from .. import index_mapping as im
from ..index_mapping import Barrier, RootMap
from ..node import Node
from .base import OpRule, Placed, norm_dim


def hit_regions(m: RootMap, dim: int, offsets: list[int]) -> list[int]:
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


class CatRule(OpRule):
    """``torch.cat``: each input is a region of the output along the concat dimension."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        dim = norm_dim(node.attrs["dim"], len(node.attrs["out_shapes"][0]))
        sizes = _cat_sizes(node, dim)
        return [(0, im.place(m, dim, sum(sizes[:pos]), sum(sizes)))]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        in_shapes = node.attrs["in_shapes"]
        dim = norm_dim(node.attrs["dim"], len(node.attrs["out_shapes"][nr]))
        if m.shape[dim] == 1:
            return [(i, m) for i, s in enumerate(in_shapes) if s is not None]
        sizes = _cat_sizes(node, dim)
        offsets = list(itertools.accumulate(sizes, initial=0))
        res = []
        for i in hit_regions(m, dim, offsets):
            if in_shapes[i] is not None:
                res.append((i, im.narrow(m, dim, offsets[i], sizes[i])))
        return res

    def round_trip_exact(self, node: Node, pos: int, m: RootMap) -> bool:
        """Exact along the dimension that holds the channels: the map comes back to its own region only."""
        return m.shape[norm_dim(node.attrs["dim"], len(node.attrs["out_shapes"][0]))] != 1


class StackRule(OpRule):
    """``torch.stack``: each input is one index of a new output dimension."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        dim = norm_dim(node.attrs["dim"], len(node.attrs["out_shapes"][0]))
        return [(0, im.unsqueeze(m, dim))]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        in_shapes = node.attrs["in_shapes"]
        dim = norm_dim(node.attrs["dim"], len(node.attrs["out_shapes"][nr]))
        if m.shape[dim] == 1:
            r = im.drop_dim(m, dim)
            return [(i, r) for i, s in enumerate(in_shapes) if s is not None]
        return [
            (i, im.drop_dim(im.narrow(m, dim, i, 1), dim)) for i, s in enumerate(in_shapes) if s is not None
        ]


class SplitRule(OpRule):
    """``split`` / ``chunk``: each output is a region of the input along the split dimension."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        return _split_forward(node, pos, m, unbind=False)

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        a = node.attrs
        in_shape = a["in_shapes"][0]
        dim = norm_dim(a.get("dim", 0), len(in_shape))
        off = sum(s[dim] for s in a["out_shapes"][:nr])
        return [(0, im.place(m, dim, off, in_shape[dim]))]


class UnbindRule(OpRule):
    """``unbind``: each output is one index of the input's unbound dimension."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        return _split_forward(node, pos, m, unbind=True)

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        in_shape = node.attrs["in_shapes"][0]
        dim = norm_dim(node.attrs.get("dim", 0), len(in_shape))
        m = im.unsqueeze(m, dim)
        return [(0, im.place(m, dim, nr, in_shape[dim]) if not im.constant_along(m, dim) else m)]


def _split_forward(node: Node, pos: int, m: RootMap, unbind: bool) -> list[Placed]:
    """The outputs of a split (or unbind) that hold pruned elements, with their maps."""
    a = node.attrs
    outs = a["out_shapes"]
    dim = norm_dim(a.get("dim", 0), len(a["in_shapes"][pos]))
    sizes = [1 if unbind else shape[dim] for shape in outs]
    offsets = list(itertools.accumulate(sizes, initial=0))
    ks = hit_regions(m, dim, offsets) if m.shape[dim] != 1 else range(len(outs))
    res = []
    for k in ks:
        r = im.narrow(m, dim, offsets[k], sizes[k])
        res.append((k, im.drop_dim(r, dim) if unbind else r))
    return res


class ReshapeRule(OpRule):
    """``view`` / ``reshape`` / ``flatten`` / ``(un)squeeze``: the map is reshaped like the tensor."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        return [(0, im.reshape(m, node.attrs["in_shapes"][pos], node.attrs["out_shapes"][0]))]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        return [(0, im.reshape(m, node.attrs["out_shapes"][nr], node.attrs["in_shapes"][0]))]


def permutation(node: Node, ndim: int) -> list[int]:
    """The dimension order a permute, transpose or ``.T`` node produces."""
    a = node.attrs
    if "dims" in a:
        return [norm_dim(d, ndim) for d in a["dims"]]
    if "dim0" in a:
        p = list(range(ndim))
        d0, d1 = norm_dim(a["dim0"], ndim), norm_dim(a["dim1"], ndim)
        p[d0], p[d1] = p[d1], p[d0]
        return p
    return list(reversed(range(ndim)))


class PermuteRule(OpRule):
    """``permute`` / ``transpose`` / ``.T``: the map is permuted like the tensor."""

    __slots__ = ()

    def forward(self, node: Node, pos: int, m: RootMap) -> list[Placed]:
        return [(0, im.permute(m, permutation(node, len(node.attrs["in_shapes"][pos]))))]

    def backward(self, node: Node, nr: int, m: RootMap) -> list[Placed]:
        p = permutation(node, len(node.attrs["out_shapes"][nr]))
        return [(0, im.permute(m, im.inverse_permutation(p)))]

    def round_trip_exact(self, node: Node, pos: int, m: RootMap) -> bool:
        """Always exact: a permutation is undone exactly."""
        return True
