"""Convolutions: ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``, plain, grouped or depthwise."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .base import (
    Idxs,
    LayerPruner,
    ParamViews,
    Side,
    check_side,
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
    "CONV_PRUNER",
    "ConvLayer",
    "ConvPruner",
    "prune_conv_in_channels",
    "prune_conv_out_channels",
    "prune_depthwise_conv_in_channels",
    "prune_depthwise_conv_out_channels",
]

# Every ``nn.modules.conv._ConvNd`` (the class the pruner is registered for) is one of these or a
# subclass (lazy convolutions); the public classes are named so no private torch name is needed.
ConvLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


class ConvPruner(LayerPruner[ConvLayer]):
    """``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``, plain, grouped or depthwise.

    Weight layout is ``(out, in/groups, *k)`` for convolutions and ``(in, out/groups, *k)`` for
    transposed ones, so the side stored along dim 0 is called the *row* side and the other one the
    *column* side. Grouped convolutions keep their ``groups`` and require every group to lose the
    same number of channels. Depthwise ones (``groups == in_channels > 1``, ``out = m * in``) couple
    input channel ``i`` with output channels ``[i*m, (i+1)*m)``; pruning them shrinks ``groups``.
    """

    @staticmethod
    def is_depthwise(module: ConvLayer) -> bool:
        """One group per input channel: input and output channels are tied."""
        return module.groups > 1 and module.groups == module.in_channels

    def out_channels(self, module: ConvLayer) -> int | None:
        """Number of output channels."""
        return module.out_channels

    def in_channels(self, module: ConvLayer) -> int | None:
        """Number of input channels."""
        return module.in_channels

    def coupled(self, module: ConvLayer) -> bool:
        """Depthwise convolutions tie inputs to outputs; other convolutions do not."""
        return self.is_depthwise(module)

    def prune_out_channels(self, module: ConvLayer, idxs: Idxs) -> ConvLayer:
        """Remove output channels (whole multiplier blocks for depthwise convolutions)."""
        removed = normalize_idxs(idxs, module.out_channels, module)
        if not removed:
            return module
        if self.is_depthwise(module):
            return self._prune_depthwise(module, self._depthwise_blocks(module, removed))
        self._prune_side(module, "out", removed)
        return module

    def prune_in_channels(self, module: ConvLayer, idxs: Idxs) -> ConvLayer:
        """Remove input channels (and, for depthwise convolutions, their output channels)."""
        removed = normalize_idxs(idxs, module.in_channels, module)
        if not removed:
            return module
        if self.is_depthwise(module):
            return self._prune_depthwise(module, removed)
        self._prune_side(module, "in", removed)
        return module

    @staticmethod
    def _row_side(module: ConvLayer) -> Side:
        return "in" if module.transposed else "out"

    @staticmethod
    def _depthwise_blocks(module: ConvLayer, removed: list[int]) -> list[int]:
        """Input channels whose whole block of ``m`` output channels is in ``removed``."""
        mult = module.out_channels // module.in_channels
        blocks = sorted({o // mult for o in removed})
        wanted = {b * mult + r for b in blocks for r in range(mult)}
        if wanted != set(removed):
            raise ValueError(
                f"{type_name(module)} (depthwise, {module.in_channels} -> {module.out_channels}, "
                f"multiplier {mult}): output channels can only be pruned in whole blocks of {mult} "
                f"belonging to one input channel"
            )
        return blocks

    @staticmethod
    def _check_groups(module: ConvLayer, removed: list[int], total: int) -> None:
        per_group = total // module.groups
        counts = [0] * module.groups
        for c in removed:
            counts[c // per_group] += 1
        if len(set(counts)) > 1:
            raise ValueError(
                f"{type_name(module)} with groups={module.groups}: every group must lose the same number "
                f"of channels, got per-group counts {counts} ({total} channels, {per_group} per group)"
            )

    def _prune_side(self, module: ConvLayer, side: Side, removed: list[int]) -> None:
        total = module.out_channels if side == "out" else module.in_channels
        groups = module.groups
        if groups > 1:
            self._check_groups(module, removed, total)
        keep = keep_indices(total, removed, module.weight.device)
        if side == self._row_side(module):
            select_parameter(module.weight, 0, keep)
        elif groups == 1:
            select_parameter(module.weight, 1, keep)
        else:
            rows_per_group = module.weight.shape[0] // groups
            cols_per_group = total // groups
            local = [
                (keep[(keep >= g * cols_per_group) & (keep < (g + 1) * cols_per_group)] - g * cols_per_group)
                for g in range(groups)
            ]

            def grouped_columns(t: Tensor) -> Tensor:
                chunks = [
                    t[g * rows_per_group : (g + 1) * rows_per_group].index_select(1, local[g].to(t.device))
                    for g in range(groups)
                ]
                return torch.cat(chunks, dim=0)

            update_parameter(module.weight, grouped_columns, 1)
        if side == "out":
            select_parameter(module.bias, 0, keep)
            module.out_channels = len(keep)
        else:
            module.in_channels = len(keep)

    def _prune_depthwise(self, module: ConvLayer, removed_in: list[int]) -> ConvLayer:
        in_ch, out_ch = module.in_channels, module.out_channels
        mult = out_ch // in_ch
        keep_in = keep_indices(in_ch, removed_in, module.weight.device)
        keep_out = (keep_in.view(-1, 1) * mult + torch.arange(mult, device=keep_in.device)).reshape(-1)
        select_parameter(module.weight, 0, keep_in if module.transposed else keep_out)
        select_parameter(module.bias, 0, keep_out)
        module.in_channels = len(keep_in)
        module.out_channels = len(keep_out)
        module.groups = len(keep_in)
        return module

    def param_views(self, module: ConvLayer, side: Side) -> ParamViews:
        """Weight rows/columns of each channel (per-group columns for grouped convolutions)."""
        check_side(side)
        in_ch, out_ch, groups = module.in_channels, module.out_channels, module.groups
        views: ParamViews = []
        if self.is_depthwise(module):
            # Rows of the weight are in channels (transposed) or out channels; both are contiguous
            # in ``i * m + r`` order, so a reshape groups them by the requested side.
            channels = out_ch if side == "out" else in_ch
            views.append(("weight", lambda t: t.reshape(channels, -1)))
            if module.bias is not None:
                views.append(("bias", lambda t: t.reshape(channels, -1)))
            return views
        channels = out_ch if side == "out" else in_ch
        if side == self._row_side(module):
            views.append(("weight", lambda t: t.flatten(1)))
        elif groups == 1:
            views.append(("weight", lambda t: t.transpose(0, 1).flatten(1)))
        else:
            cols_per_group = channels // groups

            def grouped(t: Tensor) -> Tensor:
                rows_per_group = t.shape[0] // groups
                t = t.reshape(groups, rows_per_group, cols_per_group, -1)
                return t.permute(0, 2, 1, 3).reshape(channels, -1)

            views.append(("weight", grouped))
        if side == "out" and module.bias is not None:
            views.append(("bias", vector_view))
        return views


CONV_PRUNER = ConvPruner()
register_pruner(nn.modules.conv._ConvNd, CONV_PRUNER)
prune_conv_out_channels, prune_conv_in_channels = define_public_functions(CONV_PRUNER, "conv")
# Same pruner under the names Torch-Pruning users know; get_pruning_functions returns the conv pair.
prune_depthwise_conv_out_channels, prune_depthwise_conv_in_channels = define_public_functions(
    CONV_PRUNER, "depthwise_conv", canonical=False
)
