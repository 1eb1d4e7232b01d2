"""Per-layer structural pruning: physically remove channels from modules, keeping them consistent.

Each family of modules (convolutions, linear layers, norms, attention, recurrent layers...) has a
:class:`LayerPruner` that knows where that family stores its channels. A pruner answers three
questions:

* how many output / input channels the module has (:meth:`LayerPruner.out_channels`,
  :meth:`LayerPruner.in_channels`) and whether they are the same channels
  (:meth:`LayerPruner.coupled`);
* how to remove some of them (:meth:`LayerPruner.prune_out_channels`,
  :meth:`LayerPruner.prune_in_channels`);
* which parameter entries belong to each channel (:meth:`LayerPruner.param_views`), so importance
  criteria can score channels with exactly the values that pruning would remove.

Pruning is done in place and is optimizer friendly: every ``nn.Parameter`` keeps its identity (only
its ``.data`` and ``.grad`` are swapped for sliced copies), buffers are replaced by sliced copies,
and no tensor storage is ever written to, so a caller that kept the old tensors can restore them.

The public ``prune_*_channels`` names are :class:`PruningFunction` objects: plain callables
``fn(module, idxs) -> module`` that also tell which pruner and which side they use.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "DEFAULT_PRUNERS",
    "BatchNormPruner",
    "ConvPruner",
    "EmbeddingPruner",
    "GroupNormPruner",
    "InstanceNormPruner",
    "LSTMPruner",
    "LayerNormPruner",
    "LayerPruner",
    "LinearPruner",
    "MultiheadAttentionPruner",
    "PReLUPruner",
    "ParameterPruner",
    "ParameterPruningFunction",
    "PruningFunction",
    "function_by_name",
    "get_pruner",
    "get_pruning_functions",
    "normalize_idxs",
    "once_per_parameter",
    "track_parameter_updates",
    "prune_batchnorm_in_channels",
    "prune_batchnorm_out_channels",
    "prune_conv_in_channels",
    "prune_conv_out_channels",
    "prune_depthwise_conv_in_channels",
    "prune_depthwise_conv_out_channels",
    "prune_embedding_in_channels",
    "prune_embedding_out_channels",
    "prune_groupnorm_in_channels",
    "prune_groupnorm_out_channels",
    "prune_instancenorm_in_channels",
    "prune_instancenorm_out_channels",
    "prune_layernorm_in_channels",
    "prune_layernorm_out_channels",
    "prune_linear_in_channels",
    "prune_linear_out_channels",
    "prune_lstm_in_channels",
    "prune_lstm_out_channels",
    "prune_multihead_attention_in_channels",
    "prune_multihead_attention_out_channels",
    "prune_parameter_in_channels",
    "prune_parameter_out_channels",
    "prune_prelu_in_channels",
    "prune_prelu_out_channels",
]

Side = Literal["out", "in"]
ViewFn = Callable[[Tensor], Tensor]
ParamViews = list[tuple[str, ViewFn]]
Idxs = Sequence[int] | Tensor


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _name(module: object) -> str:
    return type(module).__name__


def normalize_idxs(idxs: Idxs, num_channels: int, module: object) -> list[int]:
    """Turn ``idxs`` (list, tuple or integer tensor) into a sorted list without duplicates.

    Raises ``ValueError`` for out-of-range indices (negative ones included: they are almost always
    a bug here) and for removing every channel, since a layer without channels cannot run.
    """
    if isinstance(idxs, Tensor):
        if idxs.dtype == torch.bool or idxs.is_floating_point() or idxs.is_complex():
            raise TypeError(f"{_name(module)}: channel indices must be integers, got a {idxs.dtype} tensor")
        values = idxs.reshape(-1).tolist()
    elif isinstance(idxs, list) and all(type(i) is int for i in idxs):
        values = idxs
    else:
        values = [operator.index(i) for i in idxs]
    unique = sorted(set(values))
    if unique and (unique[0] < 0 or unique[-1] >= num_channels):
        bad = [i for i in unique if i < 0 or i >= num_channels]
        raise ValueError(
            f"{_name(module)}: channel indices {bad} are out of range for {num_channels} channels"
        )
    if unique and len(unique) >= num_channels:
        raise ValueError(
            f"{_name(module)}: cannot prune all {num_channels} channels (a layer needs at least one)"
        )
    return unique


def _keep(num_channels: int, removed: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Indices of the channels that survive, as a long tensor."""
    mask = torch.ones(num_channels, dtype=torch.bool)
    if removed:
        mask[torch.as_tensor(list(removed), dtype=torch.long)] = False
    return mask.nonzero().flatten().to(device)


# (id(param), dim) -> param for every slice done inside ``once_per_parameter`` (None: not active).
_SLICED: contextvars.ContextVar[dict[tuple[int, int], Tensor] | None] = contextvars.ContextVar(
    "prune_callbacks_sliced", default=None
)


@contextlib.contextmanager
def once_per_parameter() -> Iterator[None]:
    """Inside the block, each parameter is sliced at most once along each dim.

    A parameter shared by several modules (an embedding tied to the output layer) is reached once
    per module when a group is pruned; slicing it again would remove more entries than chosen.
    The later modules still update their own size attributes. Nested blocks share the outer one.
    """
    if _SLICED.get() is not None:
        yield
        return
    token = _SLICED.set({})
    try:
        yield
    finally:
        _SLICED.reset(token)


ParamUpdate = tuple[nn.Parameter, tuple[int, ...], Callable[[Tensor], Tensor]]
_UPDATES: contextvars.ContextVar[list[ParamUpdate] | None] = contextvars.ContextVar(
    "prune_callbacks_updates", default=None
)


@contextlib.contextmanager
def track_parameter_updates() -> Iterator[list[ParamUpdate]]:
    """Record every in-place parameter change made inside the block.

    Yields a list that fills with ``(param, old_shape, fn)``: ``fn`` maps any tensor shaped like
    the old parameter (an optimizer's momentum, Adam moments, an importance accumulator) to the
    matching tensor for the pruned parameter, so such state can follow the prune exactly.
    """
    log: list[ParamUpdate] = []
    token = _UPDATES.set(log)
    try:
        yield log
    finally:
        _UPDATES.reset(token)


def _update_param(param: Tensor, fn: Callable[[Tensor], Tensor], dim: int) -> None:
    """Replace ``param``'s data (and gradient) by ``fn`` of them, keeping the Parameter object.

    ``fn`` must build new tensors (``index_select``, ``cat``...), never write into its argument.
    ``dim`` is the dim ``fn`` shrinks; inside :func:`once_per_parameter` a repeat is skipped.
    """
    sliced = _SLICED.get()
    if sliced is not None:
        key = (id(param), dim)
        if key in sliced:
            return
        sliced[key] = param
    log = _UPDATES.get()
    if log is not None:
        log.append((param, tuple(param.shape), fn))
    param.data = fn(param.data)
    if param.grad is not None:
        param.grad = fn(param.grad)


def _select(param: Tensor | None, dim: int, keep: Tensor) -> None:
    """Keep only indices ``keep`` of ``param`` along ``dim`` (in place, identity kept)."""
    if param is None:
        return
    idx = keep.to(param.device)
    _update_param(param, lambda t: t.index_select(dim, idx), dim)


def _select_buffer(module: nn.Module, name: str, dim: int, keep: Tensor) -> None:
    """Replace buffer ``name`` by its slice along ``dim`` (the old tensor is left untouched)."""
    buf = module._buffers.get(name)
    if buf is not None:
        module._buffers[name] = buf.index_select(dim, keep.to(buf.device))


def _vector_view(t: Tensor) -> Tensor:
    """View of a per-channel vector: one value per row."""
    return t.reshape(-1, 1)


def _block_rows_view(blocks: int, channels: int) -> ViewFn:
    """Rows of a tensor made of ``blocks`` stacked chunks of ``channels`` rows (q/k/v, RNN gates).

    Row ``j`` gathers row ``j`` of every block.
    """

    def view(t: Tensor) -> Tensor:
        return t.reshape(blocks, channels, -1).transpose(0, 1).reshape(channels, -1)

    return view


def _columns_without_rows_view(channels: int, col_blocks: int = 1) -> ViewFn:
    """Columns of a 2-D weight whose rows are indexed by the same channels (``W_hh``, ``out_proj``).

    Column ``j`` (and ``j + b * channels`` for every column block ``b``) minus the entries whose row
    also belongs to channel ``j`` (rows ``r`` with ``r % channels == j``): those entries are already
    in the row view, and leaving them out means every removed entry is counted exactly once.
    """

    def view(t: Tensor) -> Tensor:
        rows = t.shape[0]
        cols = t.t().reshape(col_blocks, channels, rows).transpose(0, 1)  # (channels, blocks, rows)
        row_channel = torch.arange(rows, device=t.device) % channels
        mask = row_channel.view(1, 1, rows) != torch.arange(channels, device=t.device).view(channels, 1, 1)
        mask = mask.expand(channels, col_blocks, rows)
        return cols[mask].reshape(channels, -1)

    return view


def _refresh_rnn(module: nn.Module) -> None:
    """Re-read the flat weight list of an RNN module after its parameters changed shape."""
    init = getattr(module, "_init_flat_weights", None)
    if callable(init):
        init()
    elif hasattr(module, "flatten_parameters"):
        module.flatten_parameters()


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------


class LayerPruner:
    """Knows how one family of modules stores its channels and how to remove some.

    Subclass it to teach the library a new module type and register the instance through the
    ``customized`` argument of :func:`get_pruner`. Pruners are stateless unless stated otherwise.
    """

    def out_channels(self, module: nn.Module) -> int | None:
        """Size of the output channel dim, ``None`` if the module has no prunable outputs."""
        raise NotImplementedError(f"{type(self).__name__} does not define out_channels")

    def in_channels(self, module: nn.Module) -> int | None:
        """Size of the input channel dim, ``None`` if the module has no prunable inputs."""
        raise NotImplementedError(f"{type(self).__name__} does not define in_channels")

    def prune_out_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove output channels ``idxs`` in place and return the module."""
        raise NotImplementedError(f"{type(self).__name__} cannot prune output channels")

    def prune_in_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove input channels ``idxs`` in place and return the module."""
        raise NotImplementedError(f"{type(self).__name__} cannot prune input channels")

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """Per-channel views of the parameters that ``side`` touches.

        Returns ``(name, fn)`` pairs: ``name`` is the parameter's name for ``module.get_parameter``
        and ``fn`` maps a tensor shaped like that parameter (weight, gradient, statistic) to a
        ``(C, -1)`` tensor whose row ``j`` holds exactly the entries that pruning channel ``j`` of
        that side removes. A name may appear twice (rows and columns of a square weight); within
        one channel's rows no entry appears twice, but an entry tying two channels of the same side
        (``W_hh[row of a, column b]``) is in the rows of both. The default, no views, suits
        modules without parameters.
        """
        return []

    def coupled(self, module: nn.Module) -> bool:
        """True when input and output channels are the same channels (norms, depthwise conv...)."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_side(side: str) -> None:
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")


# ---------------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------------


class ConvPruner(LayerPruner):
    """``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``, plain, grouped or depthwise.

    Weight layout is ``(out, in/groups, *k)`` for convolutions and ``(in, out/groups, *k)`` for
    transposed ones, so the side stored along dim 0 is called the *row* side and the other one the
    *column* side. Grouped convolutions keep their ``groups`` and require every group to lose the
    same number of channels. Depthwise ones (``groups == in_channels > 1``, ``out = m * in``) couple
    input channel ``i`` with output channels ``[i*m, (i+1)*m)``; pruning them shrinks ``groups``.
    """

    @staticmethod
    def is_depthwise(module: nn.modules.conv._ConvNd) -> bool:
        """One group per input channel: input and output channels are tied."""
        return module.groups > 1 and module.groups == module.in_channels

    def out_channels(self, module: nn.Module) -> int | None:
        """Number of output channels."""
        return module.out_channels

    def in_channels(self, module: nn.Module) -> int | None:
        """Number of input channels."""
        return module.in_channels

    def coupled(self, module: nn.Module) -> bool:
        """Depthwise convolutions tie inputs to outputs; other convolutions do not."""
        return self.is_depthwise(module)

    def prune_out_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove output channels (whole multiplier blocks for depthwise convolutions)."""
        removed = normalize_idxs(idxs, module.out_channels, module)
        if not removed:
            return module
        if self.is_depthwise(module):
            return self._prune_depthwise(module, self._depthwise_blocks(module, removed))
        self._prune_side(module, "out", removed)
        return module

    def prune_in_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove input channels (and, for depthwise convolutions, their output channels)."""
        removed = normalize_idxs(idxs, module.in_channels, module)
        if not removed:
            return module
        if self.is_depthwise(module):
            return self._prune_depthwise(module, removed)
        self._prune_side(module, "in", removed)
        return module

    @staticmethod
    def _row_side(module: nn.Module) -> Side:
        return "in" if module.transposed else "out"

    @staticmethod
    def _depthwise_blocks(module: nn.Module, removed: list[int]) -> list[int]:
        """Input channels whose whole block of ``m`` output channels is in ``removed``."""
        mult = module.out_channels // module.in_channels
        blocks = sorted({o // mult for o in removed})
        wanted = {b * mult + r for b in blocks for r in range(mult)}
        if wanted != set(removed):
            raise ValueError(
                f"{_name(module)} (depthwise, {module.in_channels} -> {module.out_channels}, "
                f"multiplier {mult}): output channels can only be pruned in whole blocks of {mult} "
                f"belonging to one input channel"
            )
        return blocks

    @staticmethod
    def _check_groups(module: nn.Module, removed: list[int], total: int) -> None:
        per_group = total // module.groups
        counts = [0] * module.groups
        for c in removed:
            counts[c // per_group] += 1
        if len(set(counts)) > 1:
            raise ValueError(
                f"{_name(module)} with groups={module.groups}: every group must lose the same number "
                f"of channels, got per-group counts {counts} ({total} channels, {per_group} per group)"
            )

    def _prune_side(self, module: nn.Module, side: Side, removed: list[int]) -> None:
        total = module.out_channels if side == "out" else module.in_channels
        groups = module.groups
        if groups > 1:
            self._check_groups(module, removed, total)
        keep = _keep(total, removed, module.weight.device)
        if side == self._row_side(module):
            _select(module.weight, 0, keep)
        elif groups == 1:
            _select(module.weight, 1, keep)
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

            _update_param(module.weight, grouped_columns, 1)
        if side == "out":
            _select(module.bias, 0, keep)
            module.out_channels = len(keep)
        else:
            module.in_channels = len(keep)

    def _prune_depthwise(self, module: nn.Module, removed_in: list[int]) -> nn.Module:
        in_ch, out_ch = module.in_channels, module.out_channels
        mult = out_ch // in_ch
        keep_in = _keep(in_ch, removed_in, module.weight.device)
        keep_out = (keep_in.view(-1, 1) * mult + torch.arange(mult, device=keep_in.device)).reshape(-1)
        _select(module.weight, 0, keep_in if module.transposed else keep_out)
        _select(module.bias, 0, keep_out)
        module.in_channels = len(keep_in)
        module.out_channels = len(keep_out)
        module.groups = len(keep_in)
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """Weight rows/columns of each channel (per-group columns for grouped convolutions)."""
        _check_side(side)
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
            views.append(("bias", _vector_view))
        return views


# ---------------------------------------------------------------------------------------------
# Linear and embedding
# ---------------------------------------------------------------------------------------------


class LinearPruner(LayerPruner):
    """``nn.Linear``: weight ``(out, in)`` and optional bias ``(out,)``."""

    def out_channels(self, module: nn.Module) -> int | None:
        """Number of output features."""
        return module.out_features

    def in_channels(self, module: nn.Module) -> int | None:
        """Number of input features."""
        return module.in_features

    def prune_out_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove weight rows and bias entries."""
        removed = normalize_idxs(idxs, module.out_features, module)
        if removed:
            keep = _keep(module.out_features, removed, module.weight.device)
            _select(module.weight, 0, keep)
            _select(module.bias, 0, keep)
            module.out_features = len(keep)
        return module

    def prune_in_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove weight columns."""
        removed = normalize_idxs(idxs, module.in_features, module)
        if removed:
            keep = _keep(module.in_features, removed, module.weight.device)
            _select(module.weight, 1, keep)
            module.in_features = len(keep)
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """Weight rows and bias (out side) or weight columns (in side)."""
        _check_side(side)
        if side == "in":
            return [("weight", lambda t: t.t())]
        views: ParamViews = [("weight", lambda t: t)]
        if module.bias is not None:
            views.append(("bias", _vector_view))
        return views


class EmbeddingPruner(LayerPruner):
    """``nn.Embedding``: the output channels are the ``embedding_dim`` columns of the table.

    Token ids are not channels, so there is no input side.
    """

    def out_channels(self, module: nn.Module) -> int | None:
        """Embedding dimension."""
        return module.embedding_dim

    def in_channels(self, module: nn.Module) -> int | None:
        """Always ``None``: embeddings read token ids, not channels."""
        return None

    def prune_out_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove columns of the embedding table."""
        removed = normalize_idxs(idxs, module.embedding_dim, module)
        if removed:
            keep = _keep(module.embedding_dim, removed, module.weight.device)
            _select(module.weight, 1, keep)
            module.embedding_dim = len(keep)
        return module

    def prune_in_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Always raises: embeddings have no input channels (token ids are not channels)."""
        raise ValueError(
            f"{_name(module)} has no input channels to prune (its input is token ids out of "
            f"{module.num_embeddings}); only the embedding_dim={module.embedding_dim} output side exists"
        )

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """Table columns for the out side; nothing for the in side."""
        _check_side(side)
        return [("weight", lambda t: t.t())] if side == "out" else []


# ---------------------------------------------------------------------------------------------
# Normalisation layers and PReLU (coupled: in == out)
# ---------------------------------------------------------------------------------------------


class _CoupledPruner(LayerPruner):
    """Shared logic for modules whose input and output channels are the same channels."""

    def coupled(self, module: nn.Module) -> bool:
        """Input and output channels are the same."""
        return True

    def channels(self, module: nn.Module) -> int | None:
        """Number of channels (both sides)."""
        raise NotImplementedError

    def out_channels(self, module: nn.Module) -> int | None:
        """Number of channels."""
        return self.channels(module)

    def in_channels(self, module: nn.Module) -> int | None:
        """Number of channels (same as the output side)."""
        return self.channels(module)

    def prune(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove channels ``idxs``; both sides prune the same way."""
        raise NotImplementedError

    def prune_out_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove channels ``idxs``."""
        return self.prune(module, idxs)

    def prune_in_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove channels ``idxs`` (same as the output side)."""
        return self.prune(module, idxs)


def _affine_views(module: nn.Module, names: Sequence[str] = ("weight", "bias")) -> ParamViews:
    return [(n, _vector_view) for n in names if getattr(module, n, None) is not None]


class _StatsNormPruner(_CoupledPruner):
    """Norms storing ``num_features`` channels: optional affine weight/bias and running stats."""

    def channels(self, module: nn.Module) -> int | None:
        """``num_features``."""
        return module.num_features

    def prune(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Slice weight, bias, running_mean and running_var."""
        removed = normalize_idxs(idxs, module.num_features, module)
        if removed:
            keep = _keep(module.num_features, removed)
            _select(module.weight, 0, keep)
            _select(module.bias, 0, keep)
            _select_buffer(module, "running_mean", 0, keep)
            _select_buffer(module, "running_var", 0, keep)
            module.num_features = len(keep)
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """One weight and one bias value per channel."""
        _check_side(side)
        return _affine_views(module)


class BatchNormPruner(_StatsNormPruner):
    """All ``_BatchNorm`` modules (BatchNorm1d/2d/3d, SyncBatchNorm)."""


class InstanceNormPruner(_StatsNormPruner):
    """``InstanceNorm{1,2,3}d``: same storage as batch norm (optional affine and statistics)."""


class LayerNormPruner(_CoupledPruner):
    """``nn.LayerNorm`` and ``nn.RMSNorm``: channels are the last normalized dim."""

    def channels(self, module: nn.Module) -> int | None:
        """``normalized_shape[-1]``."""
        return module.normalized_shape[-1]

    def prune(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Slice weight/bias along their last dim and update ``normalized_shape``."""
        shape = tuple(module.normalized_shape)
        removed = normalize_idxs(idxs, shape[-1], module)
        if removed:
            keep = _keep(shape[-1], removed)
            dim = len(shape) - 1
            _select(getattr(module, "weight", None), dim, keep)
            _select(getattr(module, "bias", None), dim, keep)
            module.normalized_shape = (*shape[:-1], len(keep))
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """Every weight/bias value of channel ``j`` (all leading normalized dims)."""
        _check_side(side)
        return [
            (n, lambda t: t.movedim(-1, 0).reshape(t.shape[-1], -1))
            for n in ("weight", "bias")
            if getattr(module, n, None) is not None
        ]


class GroupNormPruner(_CoupledPruner):
    """``nn.GroupNorm``: ``num_channels`` must stay divisible by ``num_groups``."""

    def channels(self, module: nn.Module) -> int | None:
        """``num_channels``."""
        return module.num_channels

    def prune(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Slice weight and bias; refuse a channel count that ``num_groups`` does not divide."""
        removed = normalize_idxs(idxs, module.num_channels, module)
        if not removed:
            return module
        new = module.num_channels - len(removed)
        if new % module.num_groups:
            raise ValueError(
                f"{_name(module)}: pruning {len(removed)} of {module.num_channels} channels leaves {new}, "
                f"which is not divisible by num_groups={module.num_groups}"
            )
        keep = _keep(module.num_channels, removed)
        _select(module.weight, 0, keep)
        _select(module.bias, 0, keep)
        module.num_channels = new
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """One weight and one bias value per channel."""
        _check_side(side)
        return _affine_views(module)


class PReLUPruner(_CoupledPruner):
    """``nn.PReLU``: one slope per channel, or a single shared slope (nothing to prune)."""

    def channels(self, module: nn.Module) -> int | None:
        """``num_parameters``, or ``None`` for a shared slope (any channel count works)."""
        return None if module.num_parameters == 1 else module.num_parameters

    def prune(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Slice the slopes; a shared slope is left alone."""
        if module.num_parameters == 1:
            return module
        removed = normalize_idxs(idxs, module.num_parameters, module)
        if removed:
            keep = _keep(module.num_parameters, removed)
            _select(module.weight, 0, keep)
            module.num_parameters = len(keep)
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """One slope per channel; nothing for a shared slope."""
        _check_side(side)
        return [] if module.num_parameters == 1 else [("weight", _vector_view)]


class ParameterPruner(_CoupledPruner):
    """A bare ``nn.Parameter`` pruned along one dim (the "module" argument is the Parameter).

    ``dim=None`` uses the parameter's ``pruning_dim`` attribute when it has one, else 0. Views are
    named ``""``: the Parameter itself.
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim

    def __repr__(self) -> str:
        return f"ParameterPruner(dim={self.dim})"

    def pruning_dim(self, param: Tensor) -> int:
        """The dim this pruner slices ``param`` along (non-negative)."""
        dim = self.dim if self.dim is not None else getattr(param, "pruning_dim", 0)
        return operator.index(dim) % param.dim()

    def channels(self, module: nn.Module) -> int | None:
        """Size of the pruning dim."""
        return module.shape[self.pruning_dim(module)]

    def prune(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Slice the Parameter along its pruning dim (identity kept)."""
        dim = self.pruning_dim(module)
        removed = normalize_idxs(idxs, module.shape[dim], module)
        if removed:
            _select(module, dim, _keep(module.shape[dim], removed))
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """All values of index ``j`` along the pruning dim."""
        _check_side(side)
        dim = self.pruning_dim(module)
        return [("", lambda t: t.movedim(dim, 0).reshape(t.shape[dim], -1))]


# ---------------------------------------------------------------------------------------------
# Multi-head attention
# ---------------------------------------------------------------------------------------------


class MultiheadAttentionPruner(_CoupledPruner):
    """``nn.MultiheadAttention`` embed-dim pruning (input and output channels are coupled).

    Channel ``j`` of the embed dim is row ``j`` of the q, k and v projections, column ``j`` of the
    query projection (and of the key/value projections when they share the embed dim), entry ``j``
    of ``bias_k``/``bias_v``, and row and column ``j`` of ``out_proj``. ``num_heads`` is kept, so
    the new embed dim must be divisible by it. With separate ``kdim``/``vdim`` the key and value
    inputs are other tensors and keep their sizes.
    """

    def channels(self, module: nn.Module) -> int | None:
        """``embed_dim``."""
        return module.embed_dim

    def prune(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove embed-dim channels from every projection and update the size attributes."""
        embed = module.embed_dim
        removed = normalize_idxs(idxs, embed, module)
        if not removed:
            return module
        new = embed - len(removed)
        if new % module.num_heads:
            raise ValueError(
                f"{_name(module)}: pruning {len(removed)} of embed_dim={embed} leaves {new}, "
                f"which is not divisible by num_heads={module.num_heads}"
            )
        keep = _keep(embed, removed)
        keep3 = torch.cat([keep + b * embed for b in range(3)])
        if module._qkv_same_embed_dim:
            _select(module.in_proj_weight, 0, keep3)
            _select(module.in_proj_weight, 1, keep)
        else:
            _select(module.q_proj_weight, 0, keep)
            _select(module.q_proj_weight, 1, keep)
            _select(module.k_proj_weight, 0, keep)
            _select(module.v_proj_weight, 0, keep)
        _select(module.in_proj_bias, 0, keep3)
        _select(module.bias_k, 2, keep)
        _select(module.bias_v, 2, keep)
        out_proj = module.out_proj
        _select(out_proj.weight, 0, keep)
        _select(out_proj.weight, 1, keep)
        _select(out_proj.bias, 0, keep)
        out_proj.in_features = out_proj.out_features = new
        module.embed_dim = new
        module.head_dim = new // module.num_heads
        if module._qkv_same_embed_dim:
            module.kdim = module.vdim = new
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """Rows of q/k/v (3 blocks), query columns, bias_k/v, out_proj rows and columns."""
        _check_side(side)
        embed = module.embed_dim
        views: ParamViews = []
        if module._qkv_same_embed_dim:
            views.append(("in_proj_weight", _block_rows_view(3, embed)))
            views.append(("in_proj_weight", _columns_without_rows_view(embed)))
        else:
            views.append(("q_proj_weight", lambda t: t))
            views.append(("q_proj_weight", _columns_without_rows_view(embed)))
            views.append(("k_proj_weight", lambda t: t))
            views.append(("v_proj_weight", lambda t: t))
        if module.in_proj_bias is not None:
            views.append(("in_proj_bias", _block_rows_view(3, embed)))
        for name in ("bias_k", "bias_v"):
            if getattr(module, name) is not None:
                views.append((name, _vector_view))
        views.append(("out_proj.weight", lambda t: t))
        views.append(("out_proj.weight", _columns_without_rows_view(embed)))
        if module.out_proj.bias is not None:
            views.append(("out_proj.bias", _vector_view))
        return views


# ---------------------------------------------------------------------------------------------
# Recurrent layers
# ---------------------------------------------------------------------------------------------

_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class LSTMPruner(LayerPruner):
    """``nn.LSTM`` and ``nn.GRU`` (any ``RNNBase``): out side = hidden units, in side = input size.

    Hidden unit ``j`` is pruned in every layer and direction: its gate rows of ``weight_ih``,
    ``weight_hh`` and the biases, column ``j`` of ``weight_hh``, and the columns of the next
    layer's ``weight_ih`` that read it (``j`` and ``hidden + j`` when bidirectional). The sides are
    not coupled. LSTMs with ``proj_size > 0`` have no prunable output side.
    """

    @staticmethod
    def _gates(module: nn.Module) -> int:
        return _RNN_GATES[module.mode]

    @staticmethod
    def _suffixes(module: nn.Module) -> tuple[str, ...]:
        return ("", "_reverse") if module.bidirectional else ("",)

    @staticmethod
    def _check_proj(module: nn.Module) -> None:
        if getattr(module, "proj_size", 0) > 0:
            raise ValueError(
                f"{_name(module)} with proj_size={module.proj_size}: pruning hidden units of projected "
                f"LSTMs is not supported"
            )

    def out_channels(self, module: nn.Module) -> int | None:
        """``hidden_size`` (``None`` for a projected LSTM)."""
        return None if getattr(module, "proj_size", 0) > 0 else module.hidden_size

    def in_channels(self, module: nn.Module) -> int | None:
        """``input_size``."""
        return module.input_size

    def prune_out_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove hidden units from every layer and direction."""
        self._check_proj(module)
        hidden = module.hidden_size
        removed = normalize_idxs(idxs, hidden, module)
        if not removed:
            return module
        gates = self._gates(module)
        keep = _keep(hidden, removed)
        gate_rows = torch.cat([keep + g * hidden for g in range(gates)])
        num_dirs = 2 if module.bidirectional else 1
        next_cols = torch.cat([keep + d * hidden for d in range(num_dirs)])
        for layer in range(module.num_layers):
            for sfx in self._suffixes(module):
                w_ih = getattr(module, f"weight_ih_l{layer}{sfx}")
                w_hh = getattr(module, f"weight_hh_l{layer}{sfx}")
                _select(w_ih, 0, gate_rows)
                if layer > 0:
                    _select(w_ih, 1, next_cols)
                _select(w_hh, 0, gate_rows)
                _select(w_hh, 1, keep)
                if module.bias:
                    _select(getattr(module, f"bias_ih_l{layer}{sfx}"), 0, gate_rows)
                    _select(getattr(module, f"bias_hh_l{layer}{sfx}"), 0, gate_rows)
        module.hidden_size = len(keep)
        _refresh_rnn(module)
        return module

    def prune_in_channels(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Remove input features: columns of the first layer's ``weight_ih``."""
        removed = normalize_idxs(idxs, module.input_size, module)
        if not removed:
            return module
        keep = _keep(module.input_size, removed)
        for sfx in self._suffixes(module):
            _select(getattr(module, f"weight_ih_l0{sfx}"), 1, keep)
        module.input_size = len(keep)
        _refresh_rnn(module)
        return module

    def param_views(self, module: nn.Module, side: Side) -> ParamViews:
        """Gate rows, recurrent columns and next-layer input columns of each hidden unit."""
        _check_side(side)
        if side == "in":
            return [(f"weight_ih_l0{sfx}", lambda t: t.t()) for sfx in self._suffixes(module)]
        self._check_proj(module)
        hidden, gates = module.hidden_size, self._gates(module)
        num_dirs = 2 if module.bidirectional else 1
        rows = _block_rows_view(gates, hidden)
        views: ParamViews = []
        for layer in range(module.num_layers):
            for sfx in self._suffixes(module):
                views.append((f"weight_ih_l{layer}{sfx}", rows))
                if layer > 0:
                    views.append((f"weight_ih_l{layer}{sfx}", _columns_without_rows_view(hidden, num_dirs)))
                views.append((f"weight_hh_l{layer}{sfx}", rows))
                views.append((f"weight_hh_l{layer}{sfx}", _columns_without_rows_view(hidden)))
                if module.bias:
                    views.append((f"bias_ih_l{layer}{sfx}", rows))
                    views.append((f"bias_hh_l{layer}{sfx}", rows))
        return views


# ---------------------------------------------------------------------------------------------
# Pruning functions, registry
# ---------------------------------------------------------------------------------------------


class PruningFunction:
    """A callable ``fn(module, idxs) -> module`` bound to one pruner and one side.

    Other code can ask it which pruner (``fn.pruner``) and side (``fn.side``) it uses; public ones
    are found again by name with :func:`function_by_name` (history replay, pickling).
    """

    def __init__(self, pruner: LayerPruner, side: Side, name: str) -> None:
        _check_side(side)
        self.pruner = pruner
        self.side: Side = side
        self.__name__ = name

    def __call__(self, module: nn.Module, idxs: Idxs) -> nn.Module:
        """Prune channels ``idxs`` of ``module`` on this function's side."""
        if self.side == "out":
            return self.pruner.prune_out_channels(module, idxs)
        return self.pruner.prune_in_channels(module, idxs)

    def __repr__(self) -> str:
        return self.__name__

    def __reduce__(self) -> tuple:
        if _PUBLIC.get(self.__name__) is self:
            return (function_by_name, (self.__name__,))
        return (PruningFunction, (self.pruner, self.side, self.__name__))


class ParameterPruningFunction(PruningFunction):
    """Pruning function for bare Parameters, with an optional ``dim`` argument."""

    def __call__(self, module: nn.Module, idxs: Idxs, dim: int | None = None) -> nn.Module:
        """Prune index ``idxs`` of the Parameter along ``dim`` (default: the pruner's dim)."""
        pruner = self.pruner if dim is None else ParameterPruner(dim)
        if self.side == "out":
            return pruner.prune_out_channels(module, idxs)
        return pruner.prune_in_channels(module, idxs)


CONV_PRUNER = ConvPruner()
LINEAR_PRUNER = LinearPruner()
BATCHNORM_PRUNER = BatchNormPruner()
LAYERNORM_PRUNER = LayerNormPruner()
GROUPNORM_PRUNER = GroupNormPruner()
INSTANCENORM_PRUNER = InstanceNormPruner()
PRELU_PRUNER = PReLUPruner()
EMBEDDING_PRUNER = EmbeddingPruner()
MHA_PRUNER = MultiheadAttentionPruner()
LSTM_PRUNER = LSTMPruner()
PARAMETER_PRUNER = ParameterPruner()

DEFAULT_PRUNERS: dict[type, LayerPruner] = {
    nn.modules.conv._ConvNd: CONV_PRUNER,
    nn.Linear: LINEAR_PRUNER,
    nn.modules.batchnorm._BatchNorm: BATCHNORM_PRUNER,
    nn.LayerNorm: LAYERNORM_PRUNER,
    nn.RMSNorm: LAYERNORM_PRUNER,
    nn.GroupNorm: GROUPNORM_PRUNER,
    nn.modules.instancenorm._InstanceNorm: INSTANCENORM_PRUNER,
    nn.PReLU: PRELU_PRUNER,
    nn.Embedding: EMBEDDING_PRUNER,
    nn.MultiheadAttention: MHA_PRUNER,
    nn.LSTM: LSTM_PRUNER,
    nn.GRU: LSTM_PRUNER,
    nn.Parameter: PARAMETER_PRUNER,
}


def _pair(pruner: LayerPruner, stem: str, cls: type[PruningFunction] = PruningFunction) -> tuple:
    return (cls(pruner, "out", f"prune_{stem}_out_channels"), cls(pruner, "in", f"prune_{stem}_in_channels"))


prune_conv_out_channels, prune_conv_in_channels = _pair(CONV_PRUNER, "conv")
prune_depthwise_conv_out_channels, prune_depthwise_conv_in_channels = _pair(CONV_PRUNER, "depthwise_conv")
prune_linear_out_channels, prune_linear_in_channels = _pair(LINEAR_PRUNER, "linear")
prune_batchnorm_out_channels, prune_batchnorm_in_channels = _pair(BATCHNORM_PRUNER, "batchnorm")
prune_layernorm_out_channels, prune_layernorm_in_channels = _pair(LAYERNORM_PRUNER, "layernorm")
prune_groupnorm_out_channels, prune_groupnorm_in_channels = _pair(GROUPNORM_PRUNER, "groupnorm")
prune_instancenorm_out_channels, prune_instancenorm_in_channels = _pair(INSTANCENORM_PRUNER, "instancenorm")
prune_prelu_out_channels, prune_prelu_in_channels = _pair(PRELU_PRUNER, "prelu")
prune_embedding_out_channels, prune_embedding_in_channels = _pair(EMBEDDING_PRUNER, "embedding")
prune_multihead_attention_out_channels, prune_multihead_attention_in_channels = _pair(
    MHA_PRUNER, "multihead_attention"
)
prune_lstm_out_channels, prune_lstm_in_channels = _pair(LSTM_PRUNER, "lstm")
prune_parameter_out_channels, prune_parameter_in_channels = _pair(
    PARAMETER_PRUNER, "parameter", ParameterPruningFunction
)

_PUBLIC: dict[str, PruningFunction] = {
    fn.__name__: fn
    for fn in (
        prune_conv_out_channels,
        prune_conv_in_channels,
        prune_depthwise_conv_out_channels,
        prune_depthwise_conv_in_channels,
        prune_linear_out_channels,
        prune_linear_in_channels,
        prune_batchnorm_out_channels,
        prune_batchnorm_in_channels,
        prune_layernorm_out_channels,
        prune_layernorm_in_channels,
        prune_groupnorm_out_channels,
        prune_groupnorm_in_channels,
        prune_instancenorm_out_channels,
        prune_instancenorm_in_channels,
        prune_prelu_out_channels,
        prune_prelu_in_channels,
        prune_embedding_out_channels,
        prune_embedding_in_channels,
        prune_multihead_attention_out_channels,
        prune_multihead_attention_in_channels,
        prune_lstm_out_channels,
        prune_lstm_in_channels,
        prune_parameter_out_channels,
        prune_parameter_in_channels,
    )
}

# Canonical (out, in) functions of each built-in pruner instance.
_BUILTIN_FUNCTIONS: dict[int, tuple[PruningFunction, PruningFunction]] = {
    id(fn_out.pruner): (fn_out, fn_in)
    for fn_out, fn_in in (
        (prune_conv_out_channels, prune_conv_in_channels),
        (prune_linear_out_channels, prune_linear_in_channels),
        (prune_batchnorm_out_channels, prune_batchnorm_in_channels),
        (prune_layernorm_out_channels, prune_layernorm_in_channels),
        (prune_groupnorm_out_channels, prune_groupnorm_in_channels),
        (prune_instancenorm_out_channels, prune_instancenorm_in_channels),
        (prune_prelu_out_channels, prune_prelu_in_channels),
        (prune_embedding_out_channels, prune_embedding_in_channels),
        (prune_multihead_attention_out_channels, prune_multihead_attention_in_channels),
        (prune_lstm_out_channels, prune_lstm_in_channels),
        (prune_parameter_out_channels, prune_parameter_in_channels),
    )
}

# Built-in pruner classes whose instances all behave alike, mapped to their registered instance.
_STATELESS_BUILTINS: dict[type, LayerPruner] = {
    type(p): p for p in DEFAULT_PRUNERS.values() if not isinstance(p, ParameterPruner)
}

# Functions made for user pruners, keyed by id; the pruner is held so its id is never reused.
_CUSTOM_FUNCTIONS: dict[int, tuple[LayerPruner, PruningFunction, PruningFunction]] = {}


def get_pruner(module: object, customized: dict[type, LayerPruner] | None = None) -> LayerPruner | None:
    """Pruner for ``module``: ``customized`` first, then the defaults, most specific class first.

    Each table is searched along the module's MRO, so subclasses of registered classes are found
    and a customized entry for a base class wins over a default for the exact class.
    """
    mro = type(module).__mro__
    for table in (customized or {}, DEFAULT_PRUNERS):
        for cls in mro:
            if cls in table:
                return table[cls]
    return None


def get_pruning_functions(pruner: LayerPruner) -> tuple[PruningFunction, PruningFunction]:
    """``(out_fn, in_fn)`` for ``pruner``: the public functions for built-in pruners.

    A fresh instance of a built-in pruner class gets the public functions too when the class is
    stateless (every instance behaves the same). Other pruners get functions named
    ``prune_<Class>_out_channels`` / ``..._in_channels``, created once per pruner instance.
    """
    builtin = _BUILTIN_FUNCTIONS.get(id(pruner))
    if builtin is not None:
        return builtin
    if type(pruner) in _STATELESS_BUILTINS:
        return _BUILTIN_FUNCTIONS[id(_STATELESS_BUILTINS[type(pruner)])]
    cached = _CUSTOM_FUNCTIONS.get(id(pruner))
    if cached is None:
        stem = type(pruner).__name__
        cls = ParameterPruningFunction if isinstance(pruner, ParameterPruner) else PruningFunction
        cached = (pruner, *_pair(pruner, stem, cls))
        _CUSTOM_FUNCTIONS[id(pruner)] = cached
    return cached[1], cached[2]


def function_by_name(name: str) -> PruningFunction:
    """The public pruning function called ``name`` (e.g. ``"prune_conv_out_channels"``)."""
    try:
        return _PUBLIC[name]
    except KeyError:
        raise KeyError(f"no public pruning function named {name!r}; known: {sorted(_PUBLIC)}") from None
