"""Embeddings: ``nn.Embedding`` (output channels only: token ids are not channels)."""

from __future__ import annotations

import torch.nn as nn

from .base import (
    Idxs,
    LayerPruner,
    ParamViews,
    Side,
    accepts_index_tensors,
    check_side,
    define_public_functions,
    keep_indices,
    register_pruner,
    removed_channels,
    select_parameter,
    type_name,
)

__all__ = [
    "EMBEDDING_PRUNER",
    "EmbeddingPruner",
    "prune_embedding_in_channels",
    "prune_embedding_out_channels",
]


class EmbeddingPruner(LayerPruner[nn.Embedding]):
    """``nn.Embedding``: the output channels are the ``embedding_dim`` columns of the table.

    Token ids are not channels, so there is no input side.
    """

    def out_channels(self, module: nn.Embedding) -> int | None:
        """Embedding dimension."""
        return module.embedding_dim

    def in_channels(self, module: nn.Embedding) -> int | None:
        """Always ``None``: embeddings read token ids, not channels."""
        return None

    def prune_out_channels(self, module: nn.Embedding, idxs: Idxs) -> nn.Embedding:
        """Remove columns of the embedding table."""
        removed = removed_channels(idxs, module.embedding_dim, module)
        if len(removed):
            keep = keep_indices(module.embedding_dim, removed, module.weight.device)
            select_parameter(module.weight, 1, keep)
            module.embedding_dim = len(keep)
        return module

    def prune_in_channels(self, module: nn.Embedding, idxs: Idxs) -> nn.Embedding:
        """Always raises: embeddings have no input channels (token ids are not channels)."""
        raise ValueError(
            f"{type_name(module)} has no input channels to prune (its input is token ids out of "
            f"{module.num_embeddings}); only the embedding_dim={module.embedding_dim} output side exists"
        )

    def param_views(self, module: nn.Embedding, side: Side) -> ParamViews:
        """Table columns for the out side; nothing for the in side."""
        check_side(side)
        return [("weight", lambda t: t.t())] if side == "out" else []


EMBEDDING_PRUNER = EmbeddingPruner()
accepts_index_tensors(EmbeddingPruner)
register_pruner(nn.Embedding, EMBEDDING_PRUNER)
prune_embedding_out_channels, prune_embedding_in_channels = define_public_functions(
    EMBEDDING_PRUNER, "embedding"
)
