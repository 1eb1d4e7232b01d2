"""Linear layers: ``nn.Linear`` (weight ``(out, in)``, optional bias)."""

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
    vector_view,
)

__all__ = ["LINEAR_PRUNER", "LinearPruner", "prune_linear_in_channels", "prune_linear_out_channels"]


class LinearPruner(LayerPruner[nn.Linear]):
    """``nn.Linear``: weight ``(out, in)`` and optional bias ``(out,)``."""

    def out_channels(self, module: nn.Linear) -> int | None:
        """Number of output features."""
        return module.out_features

    def in_channels(self, module: nn.Linear) -> int | None:
        """Number of input features."""
        return module.in_features

    def prune_out_channels(self, module: nn.Linear, idxs: Idxs) -> nn.Linear:
        """Remove weight rows and bias entries."""
        removed = removed_channels(idxs, module.out_features, module)
        if len(removed):
            keep = keep_indices(module.out_features, removed, module.weight.device)
            select_parameter(module.weight, 0, keep)
            select_parameter(module.bias, 0, keep)
            module.out_features = len(keep)
        return module

    def prune_in_channels(self, module: nn.Linear, idxs: Idxs) -> nn.Linear:
        """Remove weight columns."""
        removed = removed_channels(idxs, module.in_features, module)
        if len(removed):
            keep = keep_indices(module.in_features, removed, module.weight.device)
            select_parameter(module.weight, 1, keep)
            module.in_features = len(keep)
        return module

    def param_views(self, module: nn.Linear, side: Side) -> ParamViews:
        """Weight rows and bias (out side) or weight columns (in side)."""
        check_side(side)
        if side == "in":
            return [("weight", lambda t: t.t())]
        views: ParamViews = [("weight", lambda t: t)]
        if module.bias is not None:
            views.append(("bias", vector_view))
        return views


LINEAR_PRUNER = LinearPruner()
accepts_index_tensors(LinearPruner)
register_pruner(nn.Linear, LINEAR_PRUNER)
prune_linear_out_channels, prune_linear_in_channels = define_public_functions(LINEAR_PRUNER, "linear")
