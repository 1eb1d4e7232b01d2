"""Normalisation layers: batch, instance, layer/RMS and group norms. Their input and output channels
are the same channels (:class:`CoupledPruner`)."""

from __future__ import annotations

from collections.abc import Sequence

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
    normalize_idxs,
    register_pruner,
    removed_channels,
    select_buffer,
    select_parameter,
    type_name,
    vector_view,
)

__all__ = [
    "BATCHNORM_PRUNER",
    "GROUPNORM_PRUNER",
    "INSTANCENORM_PRUNER",
    "LAYERNORM_PRUNER",
    "BatchNormPruner",
    "GroupNormPruner",
    "InstanceNormPruner",
    "LayerNormLike",
    "LayerNormPruner",
    "StatsNorm",
    "prune_batchnorm_in_channels",
    "prune_batchnorm_out_channels",
    "prune_groupnorm_in_channels",
    "prune_groupnorm_out_channels",
    "prune_instancenorm_in_channels",
    "prune_instancenorm_out_channels",
    "prune_layernorm_in_channels",
    "prune_layernorm_out_channels",
]

# The classes under ``_BatchNorm`` / ``_InstanceNorm`` (lazy variants subclass these), named
# publicly; both store ``num_features`` channels with optional affine weights and running stats.
StatsNorm = (
    nn.BatchNorm1d
    | nn.BatchNorm2d
    | nn.BatchNorm3d
    | nn.SyncBatchNorm
    | nn.InstanceNorm1d
    | nn.InstanceNorm2d
    | nn.InstanceNorm3d
)
# Norms over trailing dims given by ``normalized_shape``.
LayerNormLike = nn.LayerNorm | nn.RMSNorm


def _affine_views(module: nn.Module, names: Sequence[str] = ("weight", "bias")) -> ParamViews:
    return [(n, vector_view) for n in names if getattr(module, n, None) is not None]


class _StatsNormPruner(CoupledPruner[StatsNorm]):
    """Norms storing ``num_features`` channels: optional affine weight/bias and running stats."""

    def channels(self, module: StatsNorm) -> int | None:
        """``num_features``."""
        return module.num_features

    def prune(self, module: StatsNorm, idxs: Idxs) -> StatsNorm:
        """Slice weight, bias, running_mean and running_var."""
        removed = removed_channels(idxs, module.num_features, module)
        if len(removed):
            keep = keep_indices(module.num_features, removed)
            select_parameter(module.weight, 0, keep)
            select_parameter(module.bias, 0, keep)
            select_buffer(module, "running_mean", 0, keep)
            select_buffer(module, "running_var", 0, keep)
            module.num_features = len(keep)
        return module

    def param_views(self, module: StatsNorm, side: Side) -> ParamViews:
        """One weight and one bias value per channel."""
        check_side(side)
        return _affine_views(module)


class BatchNormPruner(_StatsNormPruner):
    """All ``_BatchNorm`` modules (BatchNorm1d/2d/3d, SyncBatchNorm)."""


class InstanceNormPruner(_StatsNormPruner):
    """``InstanceNorm{1,2,3}d``: same storage as batch norm (optional affine and statistics)."""


class LayerNormPruner(CoupledPruner[LayerNormLike]):
    """``nn.LayerNorm`` and ``nn.RMSNorm``: channels are the last normalized dim."""

    def channels(self, module: LayerNormLike) -> int | None:
        """``normalized_shape[-1]``."""
        return module.normalized_shape[-1]

    def prune(self, module: LayerNormLike, idxs: Idxs) -> LayerNormLike:
        """Slice weight/bias along their last dim and update ``normalized_shape``."""
        shape = tuple(module.normalized_shape)
        removed = removed_channels(idxs, shape[-1], module)
        if len(removed):
            keep = keep_indices(shape[-1], removed)
            dim = len(shape) - 1
            select_parameter(getattr(module, "weight", None), dim, keep)
            select_parameter(getattr(module, "bias", None), dim, keep)
            module.normalized_shape = (*shape[:-1], len(keep))
        return module

    def param_views(self, module: LayerNormLike, side: Side) -> ParamViews:
        """Every weight/bias value of channel ``j`` (all leading normalized dims)."""
        check_side(side)
        return [
            (n, lambda t: t.movedim(-1, 0).reshape(t.shape[-1], -1))
            for n in ("weight", "bias")
            if getattr(module, n, None) is not None
        ]


class GroupNormPruner(CoupledPruner[nn.GroupNorm]):
    """``nn.GroupNorm``: ``num_channels`` must stay divisible by ``num_groups``."""

    def channels(self, module: nn.GroupNorm) -> int | None:
        """``num_channels``."""
        return module.num_channels

    def prune(self, module: nn.GroupNorm, idxs: Idxs) -> nn.GroupNorm:
        """Slice weight and bias; refuse a channel count that ``num_groups`` does not divide."""
        removed = normalize_idxs(idxs, module.num_channels, module)
        if not removed:
            return module
        new = module.num_channels - len(removed)
        if new % module.num_groups:
            raise ValueError(
                f"{type_name(module)}: pruning {len(removed)} of {module.num_channels} channels leaves "
                f"{new}, which is not divisible by num_groups={module.num_groups}"
            )
        keep = keep_indices(module.num_channels, removed)
        select_parameter(module.weight, 0, keep)
        select_parameter(module.bias, 0, keep)
        module.num_channels = new
        return module

    def param_views(self, module: nn.GroupNorm, side: Side) -> ParamViews:
        """One weight and one bias value per channel."""
        check_side(side)
        return _affine_views(module)


BATCHNORM_PRUNER = BatchNormPruner()
LAYERNORM_PRUNER = LayerNormPruner()
GROUPNORM_PRUNER = GroupNormPruner()
INSTANCENORM_PRUNER = InstanceNormPruner()

accepts_index_tensors(BatchNormPruner)
accepts_index_tensors(InstanceNormPruner)
accepts_index_tensors(LayerNormPruner)
register_pruner(nn.modules.batchnorm._BatchNorm, BATCHNORM_PRUNER)
register_pruner(nn.LayerNorm, LAYERNORM_PRUNER)
register_pruner(nn.RMSNorm, LAYERNORM_PRUNER)
register_pruner(nn.GroupNorm, GROUPNORM_PRUNER)
register_pruner(nn.modules.instancenorm._InstanceNorm, INSTANCENORM_PRUNER)

prune_batchnorm_out_channels, prune_batchnorm_in_channels = define_public_functions(
    BATCHNORM_PRUNER, "batchnorm"
)
prune_layernorm_out_channels, prune_layernorm_in_channels = define_public_functions(
    LAYERNORM_PRUNER, "layernorm"
)
prune_groupnorm_out_channels, prune_groupnorm_in_channels = define_public_functions(
    GROUPNORM_PRUNER, "groupnorm"
)
prune_instancenorm_out_channels, prune_instancenorm_in_channels = define_public_functions(
    INSTANCENORM_PRUNER, "instancenorm"
)
