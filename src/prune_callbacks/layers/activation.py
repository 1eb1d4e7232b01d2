"""Activations with parameters: ``nn.PReLU`` (one slope per channel, or one shared slope)."""

from __future__ import annotations

import torch.nn as nn

from .base import (
    CoupledPruner,
    Idxs,
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

__all__ = ["PRELU_PRUNER", "PReLUPruner", "prune_prelu_in_channels", "prune_prelu_out_channels"]


class PReLUPruner(CoupledPruner[nn.PReLU]):
    """``nn.PReLU``: one slope per channel, or a single shared slope (nothing to prune)."""

    def channels(self, module: nn.PReLU) -> int | None:
        """``num_parameters``, or ``None`` for a shared slope (any channel count works)."""
        return None if module.num_parameters == 1 else module.num_parameters

    def prune(self, module: nn.PReLU, idxs: Idxs) -> nn.PReLU:
        """Slice the slopes; a shared slope is left alone."""
        if module.num_parameters == 1:
            return module
        removed = removed_channels(idxs, module.num_parameters, module)
        if len(removed):
            keep = keep_indices(module.num_parameters, removed)
            select_parameter(module.weight, 0, keep)
            module.num_parameters = len(keep)
        return module

    def param_views(self, module: nn.PReLU, side: Side) -> ParamViews:
        """One slope per channel; nothing for a shared slope."""
        check_side(side)
        return [] if module.num_parameters == 1 else [("weight", vector_view)]


PRELU_PRUNER = PReLUPruner()
accepts_index_tensors(PReLUPruner)
register_pruner(nn.PReLU, PRELU_PRUNER)
prune_prelu_out_channels, prune_prelu_in_channels = define_public_functions(PRELU_PRUNER, "prelu")
