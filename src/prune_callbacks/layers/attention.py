"""Attention: ``nn.MultiheadAttention`` embed-dim pruning (input and output channels coupled)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import (
    CoupledPruner,
    Idxs,
    ParamViews,
    Side,
    block_rows_view,
    check_side,
    columns_without_rows_view,
    define_public_functions,
    keep_indices,
    normalize_idxs,
    register_pruner,
    select_parameter,
    type_name,
    update_parameter,
    vector_view,
)

__all__ = [
    "MHA_PRUNER",
    "MultiheadAttentionPruner",
    "prune_multihead_attention_in_channels",
    "prune_multihead_attention_out_channels",
]


class MultiheadAttentionPruner(CoupledPruner[nn.MultiheadAttention]):
    """``nn.MultiheadAttention`` embed-dim pruning (input and output channels are coupled).

    Channel ``j`` of the embed dim is row ``j`` of the q, k and v projections, column ``j`` of the
    query projection (and of the key/value projections when they share the embed dim), entry ``j``
    of ``bias_k``/``bias_v``, and row and column ``j`` of ``out_proj``. ``num_heads`` is kept, so
    the new embed dim must be divisible by it; the graph removes as many channels from every head
    (so heads stay heads: the kept channels of a head are chunked into the same head again) and
    the query projection is rescaled so that the attention scale ``1/sqrt(head_dim)`` of the
    smaller heads gives the scores of the dense layer with the removed channels zeroed. With separate
    ``kdim``/``vdim`` the key and value inputs are other tensors and keep their sizes.
    """

    def channels(self, module: nn.MultiheadAttention) -> int | None:
        """``embed_dim``."""
        return module.embed_dim

    def prune(self, module: nn.MultiheadAttention, idxs: Idxs) -> nn.MultiheadAttention:
        """Remove embed-dim channels from every projection and update the size attributes."""
        embed = module.embed_dim
        removed = normalize_idxs(idxs, embed, module)
        if not removed:
            return module
        new = embed - len(removed)
        if new % module.num_heads:
            raise ValueError(
                f"{type_name(module)}: pruning {len(removed)} of embed_dim={embed} leaves {new}, "
                f"which is not divisible by num_heads={module.num_heads}"
            )
        keep = keep_indices(embed, removed)
        keep3 = torch.cat([keep + b * embed for b in range(3)])
        # attention divides the scores by sqrt(head_dim): scale the queries so that the smaller
        # heads give the scores of the dense layer with the removed channels zeroed
        factor = math.sqrt((new // module.num_heads) / module.head_dim)
        if module._qkv_same_embed_dim:
            _select_rows_scaled(module.in_proj_weight, keep3, len(keep), factor)
            select_parameter(module.in_proj_weight, 1, keep)
        else:
            _select_rows_scaled(module.q_proj_weight, keep, len(keep), factor)
            select_parameter(module.q_proj_weight, 1, keep)
            select_parameter(module.k_proj_weight, 0, keep)
            select_parameter(module.v_proj_weight, 0, keep)
        if module.in_proj_bias is not None:
            _select_rows_scaled(module.in_proj_bias, keep3, len(keep), factor)
        select_parameter(module.bias_k, 2, keep)
        select_parameter(module.bias_v, 2, keep)
        out_proj = module.out_proj
        select_parameter(out_proj.weight, 0, keep)
        select_parameter(out_proj.weight, 1, keep)
        select_parameter(out_proj.bias, 0, keep)
        out_proj.in_features = out_proj.out_features = new
        module.embed_dim = new
        module.head_dim = new // module.num_heads
        if module._qkv_same_embed_dim:
            module.kdim = module.vdim = new
        return module

    def param_views(self, module: nn.MultiheadAttention, side: Side) -> ParamViews:
        """Rows of q/k/v (3 blocks), query columns, bias_k/v, out_proj rows and columns."""
        check_side(side)
        embed = module.embed_dim
        views: ParamViews = []
        if module._qkv_same_embed_dim:
            views.append(("in_proj_weight", block_rows_view(3, embed)))
            views.append(("in_proj_weight", columns_without_rows_view(embed)))
        else:
            views.append(("q_proj_weight", lambda t: t))
            views.append(("q_proj_weight", columns_without_rows_view(embed)))
            views.append(("k_proj_weight", lambda t: t))
            views.append(("v_proj_weight", lambda t: t))
        if module.in_proj_bias is not None:
            views.append(("in_proj_bias", block_rows_view(3, embed)))
        for name in ("bias_k", "bias_v"):
            if getattr(module, name) is not None:
                views.append((name, vector_view))
        views.append(("out_proj.weight", lambda t: t))
        views.append(("out_proj.weight", columns_without_rows_view(embed)))
        if module.out_proj.bias is not None:
            views.append(("out_proj.bias", vector_view))
        return views


def _select_rows_scaled(param: torch.Tensor, keep: torch.Tensor, n_scaled: int, factor: float) -> None:
    """Keep rows ``keep`` of ``param`` and multiply the first ``n_scaled`` kept rows (the query
    block) by ``factor``, as one update (new tensors; gradients and optimizer state follow)."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        rows = t.index_select(0, keep.to(t.device))
        if factor == 1.0:
            return rows
        return torch.cat([rows[:n_scaled] * factor, rows[n_scaled:]])

    update_parameter(param, fn, 0)


MHA_PRUNER = MultiheadAttentionPruner()
register_pruner(nn.MultiheadAttention, MHA_PRUNER)
prune_multihead_attention_out_channels, prune_multihead_attention_in_channels = define_public_functions(
    MHA_PRUNER, "multihead_attention"
)
