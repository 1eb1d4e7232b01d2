"""Rules for ops that couple their inputs with each other: (batched) matrix products and fused
scaled-dot-product attention. A map on one operand implies maps on the other operands as well as
on the output, so these rules work on tagged maps (:meth:`~.base.OpRule.from_input` /
:meth:`~.base.OpRule.from_output`) rather than on one direction at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import index_mapping as im
from ..index_mapping import Barrier, RootMap
from ..node import Node
from .base import OpRule, Tagged

#: Operand positions ``(a, b, bias)`` of a matrix product ``out = a @ b (+ bias)``; bias is None
#: when the op has none.
Roles = tuple[int, int, int | None]

#: The roles of each matrix-product op the graph prunes through (the registry gives each op its
#: :class:`MatmulRule` from here). Products missing here (``mv``, ``dot``) are not pruned through.
MATMUL_ROLES: dict[str, Roles] = {
    "Mm": (0, 1, None),
    "Bmm": (0, 1, None),
    "Matmul": (0, 1, None),
    "Addmm": (1, 2, 0),
    "Baddbmm": (1, 2, 0),
}

#: The "kept" root id as a 0-d tensor (for ``torch.where``).
KEPT_T = torch.tensor(im.KEPT)


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


def _as_map(t: torch.Tensor, shape: tuple) -> RootMap | None:
    """Map onto an operand of ``shape`` (right-aligned batch dims); None when nothing is pruned."""
    if not bool((t >= 0).any()):
        return None
    m = RootMap(t, tuple(s != 1 for s in t.shape))
    r = im.broadcast_to(m, shape)
    if r is None:
        raise Barrier("a matrix product shares an operand across positions that are pruned differently")
    return r


def _on(m: RootMap, shape: tuple) -> RootMap:
    r = im.broadcast_to(m, shape)
    if r is None:
        raise Barrier("a matrix product operand is broadcast along a pruned dimension")
    return r


@dataclass(frozen=True, slots=True)
class MatmulRule(OpRule):
    """Index mapping through a (batched) matrix product ``out[..., i, j] = sum_k a[..., i, k] *
    b[..., k, j] (+ bias)``: removing rows of ``a`` removes rows of the result, removing columns
    of ``b`` removes its columns, and the contracted dimension couples the columns of ``a`` with
    the rows of ``b``.

    ``roles``: the op's operand positions ``(a, b, bias)``; None for a product that is not
    pruned through (every map is a barrier).
    """

    roles: Roles | None = None

    def from_input(self, node: Node, pos: int, m: RootMap) -> list[Tagged]:
        return _matmul(node, self.roles, ("in", pos), m)

    def from_output(self, node: Node, nr: int, m: RootMap) -> list[Tagged]:
        return _matmul(node, self.roles, ("out", nr), m)


def _matmul(node: Node, roles: Roles | None, at: tuple[str, int], m: RootMap) -> list[Tagged]:
    """The maps a matrix product with operand ``roles`` implies from map ``m`` on its tensor ``at``."""
    a = node.attrs
    op = a["op"]
    if roles is None:
        raise Barrier(f"pruning through {op} is not supported")
    ia, ib, ibias = roles
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


class AttentionRule(OpRule):
    """Fused scaled-dot-product attention: q (..., L, E), k (..., S, E), v (..., S, Ev) ->
    out (..., L, Ev), with an optional additive mask (..., heads, L, S) as input 3. Query/key
    feature columns are coupled; value features go to the output; a batch position (a head)
    whose query/key features are all removed takes its values, outputs and mask entries with it,
    and the other way round."""

    __slots__ = ()

    def from_input(self, node: Node, pos: int, m: RootMap) -> list[Tagged]:
        return _attention(node, ("in", pos), m)

    def from_output(self, node: Node, nr: int, m: RootMap) -> list[Tagged]:
        return _attention(node, ("out", nr), m)


def _check_mask(node: Node, heads: torch.Tensor) -> None:
    """A constant attention mask with a head dimension would keep its old head count."""
    consts: Sequence[tuple[int, ...] | None] = node.attrs.get("const_shapes") or ()
    const = consts[3] if len(consts) > 3 else None
    if const is None or len(const) < 3 or const[-3] == 1 or not bool((heads >= 0).any()):
        return
    raise Barrier(f"a constant attention mask of shape {list(const)} has one entry per head")


def _attention(node: Node, at: tuple[str, int], m: RootMap) -> list[Tagged]:  # noqa: C901
    """The maps fused attention implies from map ``m`` on its tensor ``at``. Long because the
    query/key/value/mask roles and grouped-query head sharing are one coupled computation."""
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
