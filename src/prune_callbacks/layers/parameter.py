"""Bare parameters: an ``nn.Parameter`` used directly by the forward pass (a class token, a
position embedding, a scale vector), pruned along one dim.

:class:`ParameterPruningFunction` lives here rather than in :mod:`.base` because it builds a
:class:`ParameterPruner` for an explicit ``dim``.
"""

from __future__ import annotations

import operator

import torch.nn as nn
from torch import Tensor

from .base import (
    CoupledPruner,
    Idxs,
    ParamViews,
    PruningFunction,
    Side,
    accepts_index_tensors,
    check_side,
    define_public_functions,
    keep_indices,
    register_pruner,
    removed_channels,
    select_parameter,
)

__all__ = [
    "PARAMETER_PRUNER",
    "ParameterPruner",
    "ParameterPruningFunction",
    "prune_parameter_in_channels",
    "prune_parameter_out_channels",
]


class ParameterPruningFunction(PruningFunction[nn.Parameter]):
    """Pruning function for bare Parameters, with an optional ``dim`` argument."""

    def __call__(self, module: nn.Parameter, idxs: Idxs, dim: int | None = None) -> nn.Parameter:
        """Prune index ``idxs`` of the Parameter along ``dim`` (default: the pruner's dim)."""
        pruner = self.pruner if dim is None else ParameterPruner(dim)
        if self.side == "out":
            return pruner.prune_out_channels(module, idxs)
        return pruner.prune_in_channels(module, idxs)


class ParameterPruner(CoupledPruner[nn.Parameter]):
    """A bare ``nn.Parameter`` pruned along one dim (the "module" argument is the Parameter).

    ``dim=None`` uses the parameter's ``pruning_dim`` attribute when it has one, else 0. Views are
    named ``""``: the Parameter itself. Not stateless: instances with different dims get their own
    pruning functions.
    """

    function_class = ParameterPruningFunction

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim

    def __repr__(self) -> str:
        return f"ParameterPruner(dim={self.dim})"

    def pruning_dim(self, param: Tensor) -> int:
        """The dim this pruner slices ``param`` along (non-negative)."""
        dim = self.dim if self.dim is not None else getattr(param, "pruning_dim", 0)
        return operator.index(dim) % param.dim()

    def channels(self, module: nn.Parameter) -> int | None:
        """Size of the pruning dim."""
        return module.shape[self.pruning_dim(module)]

    def prune(self, module: nn.Parameter, idxs: Idxs) -> nn.Parameter:
        """Slice the Parameter along its pruning dim (identity kept)."""
        dim = self.pruning_dim(module)
        removed = removed_channels(idxs, module.shape[dim], module)
        if len(removed):
            select_parameter(module, dim, keep_indices(module.shape[dim], removed))
        return module

    def param_views(self, module: nn.Parameter, side: Side) -> ParamViews:
        """All values of index ``j`` along the pruning dim."""
        check_side(side)
        dim = self.pruning_dim(module)
        return [("", lambda t: t.movedim(dim, 0).reshape(t.shape[dim], -1))]


PARAMETER_PRUNER = ParameterPruner()
accepts_index_tensors(ParameterPruner)
register_pruner(nn.Parameter, PARAMETER_PRUNER)
prune_parameter_out_channels, prune_parameter_in_channels = define_public_functions(
    PARAMETER_PRUNER, "parameter", stateless=False
)
