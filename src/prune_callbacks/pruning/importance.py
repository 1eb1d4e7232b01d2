"""Importance criteria: one score per channel of a group's root, low scores are pruned first.

A criterion is called on a :class:`~prune_callbacks.graph.dependency.Group` (normally a full-index group
from :meth:`DependencyGraph.get_all_groups`) and returns a 1-D float tensor on the CPU with one
score per root channel (per entry of :func:`root_ids`: ``group.root.idxs``, or one id per head for
attention-head groups), or ``None`` when it cannot score that group (the pruner then leaves the
group alone).

How a group is scored (every parameter-based criterion):

1. **Per layer.** For each item of the group (a layer and the side of it that the group prunes)
   the layer's pruner lists, through ``param_views``, exactly the parameter entries that pruning
   each channel removes. The criterion turns those entries into one value per channel of the
   layer (e.g. ``sum |w|^p``), summing over all the layer's parameters.
2. **Into root channels.** Each item records which root channel each of its channels belongs to
   (``item.root_idxs``); the values are scatter-added into the root positions, so a root channel
   that owns several channels of a layer (a flatten into a linear layer, a depthwise multiplier)
   gets the sum of them.
3. **Across layers** (``group_reduction``): ``"mean"`` (over the layers that hold the channel),
   ``"sum"``, ``"max"``, ``"prod"`` or ``"first"`` (the root layer only).
4. **Normalisation** (``normalizer``), so that scores of different groups can be ranked together
   in global pruning: ``"none"``, ``"mean"`` (divide by the mean), ``"max"``, ``"sum"``,
   ``"standardization"`` (subtract the mean, divide by the standard deviation) or ``"lamp"``
   (Lee et al., 2021: each score divided by the sum of the group's scores that are at least as
   large, :func:`lamp_normalize`; the largest score of a group becomes 1).

Gradient criteria (:class:`TaylorImportance`, :class:`FisherImportance`, :class:`OBDImportance`)
read statistics that :meth:`~GradientImportance.accumulate` collects from ``.grad`` after each
backward pass.

Named criteria (:func:`get_importance`): ``"magnitude"``, ``"l1"``, ``"l2"``, ``"lamp"`` (L2
magnitude with the LAMP normaliser), ``"taylor"``, ``"fisher"``, ``"obd"`` (Optimal Brain Damage
with the empirical-Fisher Hessian diagonal), ``"hessian"`` (Optimal Brain Damage with a
Hutchinson estimate of the Hessian diagonal), ``"bn_scale"``, ``"random"``, and the calibration
criteria of :mod:`.calibration`: ``"wanda"`` (activation-aware ``|W| * ||x||``) and ``"flap"``
(fluctuation, with bias compensation).

**State.** Every criterion owns its state and saves it as plain data and tensors:
``state = importance.state_dict(model)`` and ``importance.load_state_dict(state, model)`` (a
fresh criterion of the same kind then scores exactly as the saved one did). Gradient criteria
save their accumulated statistics, keyed by parameter name in ``model``; the random criterion
saves its generator; the others have nothing to save (``{}``).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "GROUP_REDUCTIONS",
    "HESSIAN_ESTIMATORS",
    "IMPORTANCES",
    "NORMALIZERS",
    "BNScaleImportance",
    "FisherImportance",
    "GradientImportance",
    "Importance",
    "MagnitudeImportance",
    "OBDImportance",
    "RandomImportance",
    "TaylorImportance",
    "GroupIndex",
    "GroupIndexCache",
    "get_importance",
    "group_index",
    "group_indexes",
    "importance_key",
    "lamp_normalize",
    "root_id_tensor",
    "root_ids",
    "view_tensor",
]

GROUP_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "max", "prod", "first")
NORMALIZERS: tuple[str, ...] = ("none", "mean", "max", "sum", "standardization", "lamp")
_NORMALIZER_ALIASES = {
    None: "none",
    "none": "none",
    "mean": "mean",
    "max": "max",
    "sum": "sum",
    "standardization": "standardization",
    "standardisation": "standardization",
    "gaussian": "standardization",
    "lamp": "lamp",
}
_EPS = 1e-12


def _check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid values: {', '.join(choices)}")
    return value


class Importance:
    """Base class: ``importance(group) -> Tensor | None``, one score per root channel.

    Subclasses implement :meth:`__call__`. ``requires_gradients`` tells a pruner that the
    criterion needs :meth:`GradientImportance.accumulate` calls before scoring. A criterion with
    state (statistics, a random generator) saves and restores it with :meth:`state_dict` and
    :meth:`load_state_dict`.
    """

    requires_gradients: bool = False

    def __call__(self, group: Any) -> Tensor | None:
        raise NotImplementedError

    def score_groups(self, groups: Iterable[Any]) -> list[Tensor | None]:
        """Scores of several groups (same result as calling the criterion on each)."""
        return [self(g) for g in groups]

    def reset(self) -> None:
        """Forget accumulated statistics (nothing to forget for most criteria)."""

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The criterion's state as plain data and tensors (``{}``: nothing to save).

        ``model``: the model whose parameters the state refers to (gradient criteria key their
        statistics by parameter name in it); criteria without such state ignore it.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Restore a :meth:`state_dict` (``model``: as for :meth:`state_dict`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------------------------
# Parameter-based criteria
# ---------------------------------------------------------------------------------------------


def _weight_columns_are_channels(module: Any, side: str) -> bool:
    """Input side of a linear layer or of an ungrouped, non-transposed convolution: the channels
    are dim 1 of ``weight`` (its pruner's view is ``weight.transpose(0, 1).flatten(1)``)."""
    if side != "in":
        return False
    if type(module) is nn.Linear:
        return True
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not module.transposed and module.groups == 1
    )


def view_tensor(module: Any, name: str) -> Tensor | None:
    """The parameter ``name`` of ``module`` as a ``param_views`` entry names it (``""``: the module
    is itself a bare parameter); None when it has none (the criteria and the sparse-training
    regularisers read a group's slices through it)."""
    if name == "":
        return module if isinstance(module, Tensor) else None
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


def root_ids(group: Any) -> list[int]:
    """The root channels of ``group`` that criteria score and pruners choose from, ascending.

    For most groups these are ``group.root.idxs``. Attention-head groups give every channel of a
    head the id of the head's first channel (``item.root_idxs``), so they have one root id per
    head and are scored and pruned by whole heads.
    """
    return root_id_tensor(group).tolist()


def root_id_tensor(group: Any, root_tensors: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """:func:`root_ids` as a long tensor (no Python int per channel); ``root_tensors``: the
    root item's :meth:`~prune_callbacks.graph.dependency.GroupItem.index_tensors` when the
    caller has them."""
    idxs, roots = root_tensors if root_tensors is not None else group.root.index_tensors()
    if roots is idxs or torch.equal(roots, idxs):
        return idxs
    if bool((roots[1:] >= roots[:-1]).all()):  # ascending (heads: a block's channels share an id)
        return torch.unique_consecutive(roots)
    return torch.unique(roots, sorted=True)


class GroupIndex:
    """Flat index tensors of a group, built once per group and shared by the criteria and the
    pruner: for every (item, channel) entry its item number (``item``, built on first use),
    target channel (``idx``) and root position (``pos``: the position of its root id in
    :func:`root_ids`; -1 for an id outside it). Item ``k``'s entries are
    ``offsets[k]:offsets[k + 1]``. ``id_tensor`` holds the root ids (``ids`` is the same as a
    list, written on first use)."""

    __slots__ = ("n", "id_tensor", "_ids", "identity", "lengths", "offsets", "_item", "idx", "pos")

    def __init__(self, group: Any) -> None:
        items = list(group)
        # from the items' channel sets where they have them: no Python int per channel
        parts = [it.index_tensors() for it in items]
        ids = root_id_tensor(group, parts[0] if parts else None)
        self.id_tensor = ids
        self._ids: list[int] | None = None
        self.n = n = len(ids)
        self.identity = n == 0 or (int(ids[0]) == 0 and int(ids[-1]) == n - 1)
        self.lengths = [len(p[0]) for p in parts]
        self.offsets = [0, *itertools.accumulate(self.lengths)]
        self._item: Tensor | None = None
        empty = torch.zeros(0, dtype=torch.long)
        self.idx = torch.cat([p[0] for p in parts]) if parts else empty
        roots = torch.cat([p[1] for p in parts]) if parts else empty
        if self.identity:
            if not len(roots) or (int(roots.min()) >= 0 and int(roots.max()) < n):
                self.pos = roots  # every root id is a position already
            else:
                self.pos = torch.where((roots >= 0) & (roots < n), roots, torch.full_like(roots, -1))
        else:
            top = int(max(int(ids.max()), int(roots.max()) if len(roots) else 0)) + 1
            lut = torch.full((top,), -1, dtype=torch.long)
            lut[ids] = torch.arange(n)
            self.pos = lut[roots.clamp(min=0)]
            self.pos[roots < 0] = -1

    @property
    def item(self) -> Tensor:
        """The item number of every entry."""
        if self._item is None:
            self._item = torch.repeat_interleave(
                torch.arange(len(self.lengths)), torch.as_tensor(self.lengths, dtype=torch.long)
            )
        return self._item

    @property
    def ids(self) -> list[int]:
        """The root ids (:func:`root_ids`) as a list."""
        if self._ids is None:
            self._ids = self.id_tensor.tolist()
        return self._ids


class GroupIndexCache:
    """:class:`GroupIndex` of groups by identity, so that every group is indexed once.

    The cache holds the groups it indexes (their ids stay unique while they are cached) until
    :meth:`clear`; an entry is rebuilt when its group's items change size. It is read through
    :func:`group_indexes`: the pruner owns one for its groups and activates it while it works,
    so the criteria and the pruner share the indexes.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, GroupIndex]] = {}

    def get(self, group: Any) -> GroupIndex:
        """The index of ``group``, built on first request."""
        entry = self._entries.get(id(group))
        if entry is not None and entry[0] is group and entry[1].lengths == [it.count for it in group]:
            return entry[1]
        gi = GroupIndex(group)
        self._entries[id(group)] = (group, gi)
        return gi

    def clear(self) -> None:
        """Forget every index (and release the groups)."""
        self._entries.clear()


_ACTIVE_INDEXES: ContextVar[GroupIndexCache | None] = ContextVar(
    "prune_callbacks_group_indexes", default=None
)


@contextmanager
def group_indexes(cache: GroupIndexCache | None = None) -> Iterator[GroupIndexCache]:
    """Within the block, :func:`group_index` reads and fills ``cache`` (default: the cache that
    is active already, else a new one for the block)."""
    if cache is None:
        cache = _ACTIVE_INDEXES.get() or GroupIndexCache()
    token = _ACTIVE_INDEXES.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE_INDEXES.reset(token)


def group_index(group: Any) -> GroupIndex:
    """The :class:`GroupIndex` of ``group``: from the active :func:`group_indexes` cache, else
    built for this call."""
    cache = _ACTIVE_INDEXES.get()
    return GroupIndex(group) if cache is None else cache.get(group)


def lamp_normalize(scores: Tensor) -> Tensor:
    """LAMP scores (Lee et al., 2021, "Layer-adaptive sparsity for the magnitude-based pruning"):
    ``s_i / sum of s_j over every j with s_j >= s_i``.

    Computed on the sorted scores (suffix sums); tied scores share one denominator, which counts
    all of them. The largest score becomes 1 and every score lies in (0, 1], so groups of very
    different magnitudes can be ranked together: a channel's LAMP score says how much of what
    remains of its group (at and above it) it carries. Meant for non-negative scores.
    """
    s = scores.reshape(-1)
    if s.numel() == 0:
        return scores
    ascending = torch.sort(s).values
    suffix = torch.flip(torch.cumsum(torch.flip(ascending, [0]), 0), [0])
    first = torch.searchsorted(ascending, s).clamp(max=s.numel() - 1)
    return (s / (suffix[first] + _EPS)).reshape(scores.shape)


class ParamImportance(Importance):
    """Shared machinery of the criteria that score parameter entries (see the module docstring).

    Subclasses define :meth:`param_tensor` (which tensor to read for a parameter, shaped like it)
    and :meth:`reduce_rows` (``(C, k)`` entries of each channel -> ``(C,)`` values).
    """

    #: Per-layer values keep their sign until the group reduction (Taylor): for ``"sum"`` and
    #: ``"mean"`` the absolute value is taken after reducing, for other reductions before.
    signed: bool = False

    def __init__(self, group_reduction: str = "mean", normalizer: str | None = "mean") -> None:
        self.group_reduction = _check_choice(group_reduction, GROUP_REDUCTIONS, "group_reduction")
        if normalizer not in _NORMALIZER_ALIASES:
            raise ValueError(
                f"unknown normalizer {normalizer!r}; valid values: {', '.join(NORMALIZERS)} (or None)"
            )
        self.normalizer = _NORMALIZER_ALIASES[normalizer]
        self._cache: dict[tuple[int, str], Tensor | None] | None = None

    # -- hooks for subclasses ------------------------------------------------------------------
    def param_tensor(self, param: Tensor) -> Tensor | None:
        """Tensor shaped like ``param`` whose entries are scored (None: skip this parameter)."""
        return param.detach()

    def reduce_rows(self, rows: Tensor) -> Tensor:
        """``(C, k)`` entries of every channel -> ``(C,)`` per-channel values."""
        raise NotImplementedError

    def reduce_columns(self, t: Tensor) -> Tensor:
        """``(O, C, K)`` weight whose dim 1 holds the channels -> ``(C,)`` values (the same as
        :meth:`reduce_rows` of ``t.transpose(0, 1).flatten(1)``, without the copy)."""
        return self.reduce_rows(t.transpose(0, 1).flatten(1))

    def accepts(self, module: Any) -> bool:
        """Whether layers of this type contribute to the score."""
        return True

    # -- scoring -------------------------------------------------------------------------------
    @contextmanager
    def _cached(self):
        outer = self._cache is not None
        if not outer:
            self._cache = {}
        try:
            yield
        finally:
            if not outer:
                self._cache = None

    def score_groups(self, groups: Iterable[Any]) -> list[Tensor | None]:
        """Scores of several groups; per-layer values are computed once and shared."""
        with torch.no_grad(), self._cached(), group_indexes():
            return [self(g) for g in groups]

    def channel_values(self, module: Any, handler: Any) -> Tensor | None:
        """One value per channel of ``module`` on the side ``handler`` prunes (None: no data)."""
        pruner = getattr(handler, "pruner", None)
        side = getattr(handler, "side", None)
        if pruner is None or side is None or not self.accepts(module):
            return None
        key = (id(module), side)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        total: Tensor | None = None
        columns = _weight_columns_are_channels(module, side)
        for name, view in pruner.param_views(module, side):
            param = view_tensor(module, name)
            if param is None:
                continue
            t = self.param_tensor(param)
            if t is None:
                continue
            if columns and name == "weight":
                # dim 1 of the weight: reduce in place instead of a transposed copy (same entries)
                vals = self.reduce_columns(t.float().reshape(t.shape[0], t.shape[1], -1))
            else:
                vals = self.reduce_rows(view(t).float())
            total = vals if total is None else total + vals
        if self._cache is not None:
            self._cache[key] = total
        return total

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        gi = group_index(group)
        n = gi.n
        if n == 0:
            return torch.zeros(0)
        vals_list: list[Tensor] = []
        used: list[int] = []
        device: torch.device | None = None
        for k, item in enumerate(group):
            if k > 0 and self.group_reduction == "first":
                break
            if not item.idxs:
                continue
            vals = self.channel_values(item.dep.target.module, item.dep.handler)
            if vals is None or len(vals) <= item.idxs[-1]:
                continue  # no data, or a stale group (the layer was pruned since it was built)
            device = vals.device if device is None else device
            vals_list.append(vals.reshape(-1).float().to(device))
            used.append(k)
        if not used:
            return None
        # all entries of the group at once, on the device of the parameters
        rows = len(used)
        n_items = len(gi.lengths)
        used_t = torch.as_tensor(used, dtype=torch.long)
        row_of = torch.full((n_items,), -1, dtype=torch.long)
        row_of[used_t] = torch.arange(rows)
        sizes = torch.as_tensor([len(v) for v in vals_list], dtype=torch.long)
        offsets = torch.zeros(n_items, dtype=torch.long)
        offsets[used_t] = torch.cumsum(sizes, 0) - sizes
        entry_row = row_of[gi.item]
        mask = (entry_row >= 0) & (gi.pos >= 0)
        if not bool(mask.all()):
            entry_row, idx, pos, item = entry_row[mask], gi.idx[mask], gi.pos[mask], gi.item[mask]
        else:
            idx, pos, item = gi.idx, gi.pos, gi.item
        gather = (idx + offsets[item]).to(device)
        flat = (entry_row * n + pos).to(device)
        picked = torch.cat(vals_list)[gather]
        scores = torch.zeros(rows * n, device=device).index_add_(0, flat, picked).view(rows, n)
        covered = torch.zeros(rows * n, dtype=torch.bool, device=device)
        covered[flat] = True
        return self._normalize(self._reduce(scores, covered.view(rows, n))).cpu()

    def _reduce(self, scores: Tensor, covered: Tensor) -> Tensor:
        """``(layers, C)`` per-layer scores -> ``(C,)`` by the group reduction."""
        how = self.group_reduction
        if self.signed and how not in ("sum", "mean"):
            scores = scores.abs()
        if how == "first":
            out = scores[0]
        elif how == "sum":
            out = scores.sum(0)
        elif how == "mean":
            out = scores.sum(0) / covered.sum(0).clamp(min=1)
        elif how == "max":
            out = scores.masked_fill(~covered, -math.inf).amax(0)
            out = torch.where(covered.any(0), out, torch.zeros_like(out))
        else:  # prod
            out = torch.where(covered, scores, torch.ones_like(scores)).prod(0)
        return out.abs() if self.signed else out

    def _normalize(self, s: Tensor) -> Tensor:
        how = self.normalizer
        if how == "none" or s.numel() == 0:
            return s
        if how == "mean":
            return s / (s.mean() + _EPS)
        if how == "max":
            return s / (s.max() + _EPS)
        if how == "sum":
            return s / (s.sum() + _EPS)
        if how == "lamp":
            return lamp_normalize(s)
        return (s - s.mean()) / (s.std(unbiased=False) + _EPS)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(group_reduction={self.group_reduction!r}, normalizer={self.normalizer!r})"
        )


class MagnitudeImportance(ParamImportance):
    """Weight magnitude: a layer's value for channel ``j`` is ``sum |w|^p`` over every parameter
    entry that pruning ``j`` removes (weights, biases, norm scales), ``p`` = 1 or 2."""

    def __init__(self, p: float = 2, group_reduction: str = "mean", normalizer: str | None = "mean") -> None:
        super().__init__(group_reduction, normalizer)
        if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
            raise ValueError(f"MagnitudeImportance: p must be a positive number (1 or 2), got {p!r}")
        self.p = p

    def reduce_rows(self, rows: Tensor) -> Tensor:
        if rows.stride(1) == 1 or rows.shape[1] == 1:
            # entries of a channel are contiguous: a fused norm is fastest
            norm = torch.linalg.vector_norm(rows, ord=self.p, dim=1)
            return norm if self.p == 1 else norm.pow(self.p)
        # columns of a weight (strided rows): an elementwise pass and a sum over the outer dim,
        # several times faster than a strided norm; on the CPU in cache-sized chunks
        cols = rows.t()
        if rows.device.type == "cpu" and cols.is_contiguous():
            return self._chunked_column_sums(cols)
        return self._entrywise(rows).sum(1)

    def reduce_columns(self, t: Tensor) -> Tensor:
        cols = t.reshape(t.shape[0], t.shape[1] * t.shape[2])
        if cols.device.type == "cpu" and cols.is_contiguous():
            # sums over the outer dim in cache-sized chunks, then over each channel's k entries:
            # about twice as fast as a norm over dims (0, 2)
            sums = self._chunked_column_sums(cols)
        else:
            sums = self._entrywise(cols).sum(0)
        return sums.view(t.shape[1], t.shape[2]).sum(1) if t.shape[2] > 1 else sums

    def _entrywise(self, t: Tensor, out: Tensor | None = None) -> Tensor:
        if self.p == 2:
            return torch.mul(t, t, out=out)
        if self.p == 1:
            return torch.abs(t, out=out)
        return torch.abs(t, out=out).pow_(self.p)

    def _chunked_column_sums(self, cols: Tensor) -> Tensor:
        """``sum |x|^p`` over dim 0 of a contiguous ``(k, C)`` tensor without a full-size temporary."""
        k, c = cols.shape
        step = max(1, (1 << 18) // max(c, 1))
        buf = torch.empty(min(step, k), c, dtype=cols.dtype)
        part = torch.empty(c, dtype=cols.dtype)
        total = torch.zeros(c, dtype=cols.dtype)
        for start in range(0, k, step):
            chunk = cols[start : start + step]
            b = buf[: chunk.shape[0]]
            self._entrywise(chunk, out=b)
            torch.sum(b, 0, out=part)
            total.add_(part)
        return total

    def __repr__(self) -> str:
        return (
            f"MagnitudeImportance(p={self.p}, group_reduction={self.group_reduction!r}, "
            f"normalizer={self.normalizer!r})"
        )


class BNScaleImportance(ParamImportance):
    """Network slimming: ``|gamma|`` of the batch-norm layers in the group.

    Only affine batch-norm layers contribute; a group without one cannot be scored (``None``).
    """

    def __init__(self, group_reduction: str = "mean", normalizer: str | None = "mean") -> None:
        super().__init__(group_reduction, normalizer)

    def accepts(self, module: Any) -> bool:
        return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None

    def channel_values(self, module: Any, handler: Any) -> Tensor | None:
        if not self.accepts(module):
            return None
        return module.weight.detach().abs().float()


class RandomImportance(Importance):
    """Uniform random scores (a baseline). ``seed`` makes the draws reproducible."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, group: Any) -> Tensor | None:
        return torch.rand(len(root_id_tensor(group)), generator=self.generator)

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """``{"generator": state of the random generator}`` (the next draws continue from it)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Continue the draws of a saved criterion."""
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"


# ---------------------------------------------------------------------------------------------
# Gradient criteria
# ---------------------------------------------------------------------------------------------


def _parameter_gradients(model: nn.Module | Iterable[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, dense gradient)`` of every distinct parameter of ``model`` whose ``.grad`` is
    set and shaped like it."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    seen: set[int] = set()
    out: list[tuple[Tensor, Tensor]] = []
    for p in params:
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        g = p.grad
        if g.is_sparse:
            g = g.to_dense()
        if g.shape == p.shape:
            out.append((p, g))
    return out


class _Accumulator:
    """Running sum of one parameter's per-entry statistic over ``count`` batches."""

    __slots__ = ("param", "total", "count")

    def __init__(self, param: Tensor, total: Tensor) -> None:
        self.param = weakref.ref(param)
        self.total = total
        self.count = 1


class GradientImportance(ParamImportance):
    """Criteria computed from ``weight`` and ``weight.grad``, averaged over many batches.

    Call :meth:`accumulate` after every backward pass whose gradients should count (the
    gradients must be the true ones: call it after ``scaler.unscale_(optimizer)`` under AMP, or
    pass ``grad_scale``). For every parameter with a gradient it adds a per-entry statistic
    (:meth:`contribution`) to a running sum kept per parameter; the score reads the mean over
    the batches that parameter took part in. Batches whose statistics are not finite (an AMP
    overflow step) are skipped and counted in ``skipped_batches``.

    Accumulators are keyed by parameter identity (weakly referenced). One whose shape no longer
    matches its parameter (the parameter was pruned since) is dropped, never indexed;
    :meth:`reset` forgets everything (the pruner does it after each pruning step).
    :meth:`state_dict` saves the statistics by parameter name (for a checkpoint) and
    :meth:`load_state_dict` restores them onto the parameters of the same names.
    """

    requires_gradients = True

    def __init__(self, group_reduction: str = "sum", normalizer: str | None = "mean") -> None:
        super().__init__(group_reduction, normalizer)
        self._acc: dict[int, _Accumulator] = {}
        self.num_batches = 0
        self.skipped_batches = 0

    def contribution(self, weight: Tensor, grad: Tensor) -> Tensor:
        """Per-entry statistic of one batch (float32, shaped like the parameter)."""
        raise NotImplementedError

    def accumulate(self, model: nn.Module | Iterable[Tensor], grad_scale: float | None = None) -> bool:
        """Add the current gradients of ``model`` (a module or an iterable of parameters).

        ``grad_scale``: divide the gradients by it first (gradients still scaled by an AMP
        ``GradScaler``). Returns False when the batch was skipped for non-finite values.
        Raises ``RuntimeError`` when no parameter has a gradient (call it after ``backward``).
        """
        with torch.no_grad():
            contribs: list[tuple[Tensor, Tensor]] = []
            for p, g in _parameter_gradients(model):
                g = g.detach().float()
                if grad_scale is not None:
                    g = g / float(grad_scale)
                contribs.append((p, self.contribution(p.detach().float(), g)))
            if not contribs:
                raise RuntimeError(
                    f"{type(self).__name__}.accumulate(): no parameter has a gradient. Call it right after "
                    "loss.backward() (and before optimizer.zero_grad())."
                )
            return self.add_batch(contribs)

    @torch.no_grad()
    def add_batch(self, contribs: Sequence[tuple[Tensor, Tensor]]) -> bool:
        """Add one batch's per-entry statistics, ``(parameter, statistic shaped like it)`` pairs,
        to the running sums (the shared machinery of every way of accumulating). Returns False,
        adding nothing, when a statistic is not finite (counted in ``skipped_batches``)."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for _, c in contribs:
            by_device.setdefault(c.device, []).append(torch.isfinite(c).all())
        if not all(bool(torch.stack(flags).all()) for flags in by_device.values()):
            self.skipped_batches += 1
            return False
        for p, c in contribs:
            entry = self._acc.get(id(p))
            if entry is None or entry.param() is not p or entry.total.shape != c.shape:
                self._acc[id(p)] = _Accumulator(p, c)
            else:
                entry.total.add_(c)
                entry.count += 1
        self.num_batches += 1
        return True

    def mean_statistic(self, param: Tensor) -> Tensor | None:
        """The mean over the accumulated batches of ``param``'s per-entry statistic (float32,
        shaped like it), or None when nothing was accumulated for it or it was pruned since."""
        entry = self._acc.get(id(param))
        if entry is None or entry.param() is not param or entry.total.shape != param.shape:
            return None
        return entry.total / entry.count

    def reset(self) -> None:
        """Forget every accumulated batch."""
        self._acc.clear()
        self.num_batches = 0
        self.skipped_batches = 0

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The accumulated statistics as plain data::

            {"num_batches": int, "skipped_batches": int,
             "acc": {parameter name: {"total": CPU float32 tensor, "count": int}}}

        ``total`` is the running sum of the per-entry statistic over ``count`` batches, keyed by
        the parameter's name in ``model`` (parameters outside ``model``, or no longer alive, are
        left out). ``model`` may be omitted only while nothing is accumulated.
        """
        state: dict[str, Any] = {
            "num_batches": int(self.num_batches),
            "skipped_batches": int(self.skipped_batches),
        }
        live = [(entry.param(), entry) for entry in self._acc.values()]
        live = [(p, entry) for p, entry in live if p is not None]
        if model is None:
            if live:
                raise ValueError(
                    f"{type(self).__name__}.state_dict(): the statistics are saved by parameter name; "
                    "pass the model whose parameters were accumulated: state_dict(model)"
                )
            state["acc"] = {}
            return state
        names = {id(p): n for n, p in model.named_parameters()}
        state["acc"] = {
            names[id(p)]: {"total": entry.total.detach().cpu(), "count": int(entry.count)}
            for p, entry in live
            if id(p) in names
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Replace the statistics by those of :meth:`state_dict`, put on the parameters of the
        same names in ``model`` (on their devices). Entries whose parameter is missing or has
        another shape (pruned differently) are skipped."""
        saved = state.get("acc") or {}
        if saved and model is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict(): the statistics are saved by parameter name; "
                "pass the model to put them on: load_state_dict(state, model)"
            )
        self._acc.clear()
        params = dict(model.named_parameters()) if model is not None else {}
        for name, entry in saved.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(entry["total"].shape):
                continue
            acc = _Accumulator(p, entry["total"].to(device=p.device, dtype=torch.float32))
            acc.count = int(entry["count"])
            self._acc[id(p)] = acc
        self.num_batches = int(state.get("num_batches", 0))
        self.skipped_batches = int(state.get("skipped_batches", 0))

    def param_tensor(self, param: Tensor) -> Tensor | None:
        if self.num_batches == 0:
            raise RuntimeError(
                f"{type(self).__name__} has no gradient statistics yet: run loss.backward() and then "
                "importance.accumulate(model) on at least one batch before scoring or pruning "
                "(the pruner resets the statistics after every pruning step)"
            )
        entry = self._acc.get(id(param))
        if entry is None:
            return None
        if entry.param() is not param or entry.total.shape != param.shape:
            del self._acc[id(param)]  # stale: the parameter was pruned (or replaced) since
            return None
        return entry.total / entry.count

    def __call__(self, group: Any) -> Tensor | None:
        if self.num_batches == 0:
            self.param_tensor(group.root.dep.target.module)  # raises the explanation
        return super().__call__(group)

    def reduce_rows(self, rows: Tensor) -> Tensor:
        return rows.sum(1)

    def reduce_columns(self, t: Tensor) -> Tensor:
        return t.sum((0, 2))


class TaylorImportance(GradientImportance):
    """First-order Taylor expansion of the loss change when a channel is removed (Molchanov et
    al., 2019, group form).

    ``accumulate`` adds ``w * dL/dw`` per parameter entry; with ``A`` its mean over the
    accumulated batches, the score of root channel ``c`` with the default ``group_reduction="sum"``
    is ``|sum of A over every parameter entry of the group that belongs to c|`` (weights and biases
    of every layer the group touches), then normalised. With ``"mean"`` the sum is divided by the
    number of layers holding ``c`` before taking the absolute value; ``"max"``, ``"prod"`` and
    ``"first"`` use the absolute per-layer sums.
    """

    signed = True

    def contribution(self, weight: Tensor, grad: Tensor) -> Tensor:
        return weight * grad


class FisherImportance(GradientImportance):
    """Second-order (diagonal empirical Fisher) saliency: ``(w * dL/dw)^2`` per entry.

    ``accumulate`` adds ``(w * dL/dw)^2`` per parameter entry; with ``F`` its mean over the
    accumulated batches, the score of root channel ``c`` with the default ``group_reduction="sum"``
    is the sum of ``F`` over every parameter entry of the group that belongs to ``c``, then
    normalised. This is the Optimal-Brain-Damage estimate ``1/2 * F_ii * w_i^2`` of the loss
    increase with the empirical Fisher ``E[g_i^2]`` for the Hessian diagonal, up to the factor 1/2
    (ranking is unaffected), with the weights of each batch; gradients are taken per batch.
    :class:`OBDImportance` (``"obd"``) uses the weights at scoring time instead, and can estimate
    the diagonal by Hutchinson's method (``"hessian"``).
    """

    def contribution(self, weight: Tensor, grad: Tensor) -> Tensor:
        return (weight * grad).pow(2)


#: Ways :class:`OBDImportance` estimates the Hessian diagonal.
HESSIAN_ESTIMATORS: tuple[str, ...] = ("fisher", "hutchinson")


class OBDImportance(GradientImportance):
    """Optimal Brain Damage (LeCun et al., 1990): the loss increase of removing a channel,
    ``sum over its entries of 1/2 * H_ii * w_i^2``, with ``H_ii`` an estimate of the diagonal of
    the Hessian of the loss averaged over the accumulated batches.

    The score of root channel ``c`` (default ``group_reduction="sum"``) is that sum over every
    parameter entry of the group that belongs to ``c`` (weights and biases of every layer the
    group touches), with the weights as they are when the group is scored, then normalised.

    ``estimator`` says where ``H_ii`` comes from:

    * ``"fisher"`` (the criterion named ``"obd"``): the empirical Fisher, ``H_ii ~ mean over
      batches of g_i^2`` with ``g`` the batch gradient. :meth:`accumulate` adds ``g^2`` after each
      backward pass (``grad_scale`` divides ``g`` first), exactly like Taylor and Fisher, so the
      callback, the Hugging Face callback and a plain loop use it unchanged. It differs from
      :class:`FisherImportance` (``mean of (w_i g_i)^2``) by taking the weights at scoring time,
      not per batch.
    * ``"hutchinson"`` (the criterion named ``"hessian"``): Hutchinson's estimator
      ``H_ii ~ mean of z_i (H z)_i`` over Rademacher vectors ``z`` (``samples`` per batch), from
      Hessian-vector products, which need the gradient's own graph. Either call
      :meth:`accumulate_hutchinson` with the batch's loss (the gradients are taken by it; ``.grad``
      is left alone and ``loss.backward()`` can follow), or run
      ``loss.backward(create_graph=True)`` and then :meth:`accumulate` (in Lightning: override
      ``LightningModule.backward`` to pass ``create_graph=True``; full precision only: an AMP
      ``GradScaler`` unscales ``.grad`` in place). The estimate is unbiased but noisy and may be
      negative away from a minimum; a negative entry counts as 0 in the score (OBD's quadratic
      model assumes a minimum). :meth:`hessian_diagonal` gives the raw mean estimate.

    State (:meth:`state_dict`) is that of every gradient criterion plus the estimator; the
    random draws of Hutchinson's vectors are not part of it.
    """

    def __init__(
        self,
        estimator: str = "fisher",
        samples: int = 1,
        group_reduction: str = "sum",
        normalizer: str | None = "mean",
        seed: int | None = None,
    ) -> None:
        super().__init__(group_reduction, normalizer)
        self.estimator = _check_choice(estimator, HESSIAN_ESTIMATORS, "estimator")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"OBDImportance: samples must be an integer >= 1, got {samples!r}")
        self.samples = samples
        self.seed = seed
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed)

    def contribution(self, weight: Tensor, grad: Tensor) -> Tensor:
        return grad * grad

    def accumulate(self, model: nn.Module | Iterable[Tensor], grad_scale: float | None = None) -> bool:
        """Add one batch: ``g^2`` of the current gradients (``"fisher"``), or Hutchinson's
        estimate from gradients computed with ``loss.backward(create_graph=True)``
        (``"hutchinson"``). ``grad_scale``, the return value and the errors are those of
        :meth:`GradientImportance.accumulate`."""
        if self.estimator == "fisher":
            return super().accumulate(model, grad_scale)
        pairs = _parameter_gradients(model)
        if not pairs:
            raise RuntimeError(
                "OBDImportance.accumulate(): no parameter has a gradient. Call it right after "
                "loss.backward(create_graph=True) (and before optimizer.zero_grad())."
            )
        with_graph = [(p, g) for p, g in pairs if g.requires_grad]
        if not with_graph:
            raise RuntimeError(
                "OBDImportance(estimator='hutchinson') needs Hessian-vector products, so the gradients "
                "must keep their graph: call loss.backward(create_graph=True) before accumulate(model) "
                "(in Lightning, override LightningModule.backward), or call "
                "accumulate_hutchinson(model, loss) instead of backward; importance='obd' estimates the "
                "Hessian diagonal from plain gradients"
            )
        return self.add_batch(self._hutchinson(with_graph, self.samples, grad_scale))

    def accumulate_hutchinson(
        self,
        model: nn.Module | Iterable[Tensor],
        loss: Tensor,
        samples: int | None = None,
        grad_scale: float | None = None,
    ) -> bool:
        """Add Hutchinson's estimate of the Hessian diagonal of ``loss`` for one batch.

        Takes the gradients of ``loss`` with respect to the parameters of ``model`` that need
        grad (``create_graph=True``) and ``samples`` (default: the criterion's) Hessian-vector
        products with Rademacher vectors; ``.grad`` is not touched and the loss's graph is kept,
        so ``loss.backward()`` can follow as usual. ``grad_scale``: the loss was multiplied by it
        (AMP ``scaler.scale(loss)``). Returns False when the batch was skipped for non-finite
        values.
        """
        if self.estimator != "hutchinson":
            raise RuntimeError(
                "accumulate_hutchinson(): this criterion estimates the Hessian diagonal from the "
                "empirical Fisher (estimator='fisher', importance='obd'); use importance='hessian' or "
                "OBDImportance(estimator='hutchinson') for Hutchinson's estimate"
            )
        params = model.parameters() if isinstance(model, nn.Module) else model
        unique: dict[int, Tensor] = {}
        for p in params:
            if p.requires_grad:
                unique.setdefault(id(p), p)
        plist = list(unique.values())
        if not plist:
            raise RuntimeError("accumulate_hutchinson(): no parameter of the model requires grad")
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
        with_graph = [(p, g) for p, g in zip(plist, grads) if g is not None and g.requires_grad]
        if not with_graph:
            raise RuntimeError(
                "accumulate_hutchinson(): the gradient of the loss does not depend on the parameters "
                "(the loss is linear in them or was computed without grad), so its Hessian is zero"
            )
        n = self.samples if samples is None else samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"accumulate_hutchinson(): samples must be an integer >= 1, got {samples!r}")
        return self.add_batch(self._hutchinson(with_graph, n, grad_scale))

    def _hutchinson(
        self, pairs: Sequence[tuple[Tensor, Tensor]], samples: int, grad_scale: float | None
    ) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, mean of z * (H z) over samples)`` for parameters whose gradients ``g``
        keep their graph. A parameter whose gradient has no graph has a zero Hessian row (and,
        by symmetry, column), so leaving it out changes no product."""
        params = [p for p, _ in pairs]
        grads = [g for _, g in pairs]
        totals = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        scale = 1.0 if grad_scale is None else float(grad_scale)
        with torch.enable_grad():
            for _ in range(samples):
                zs = [self._rademacher(g) for g in grads]
                hvs = torch.autograd.grad(
                    grads, params, grad_outputs=zs, retain_graph=True, allow_unused=True
                )
                for total, z, hv in zip(totals, zs, hvs):
                    if hv is not None:
                        total.add_(z.detach().float() * hv.detach().float())
        return [(p, t / (samples * scale)) for p, t in zip(params, totals)]

    def _rademacher(self, like: Tensor) -> Tensor:
        """A tensor of random +-1 shaped like ``like`` (from the seeded generator when set)."""
        if self.generator is not None:
            bits = torch.randint(0, 2, like.shape, generator=self.generator).to(like.device)
        else:
            bits = torch.randint(0, 2, like.shape, device=like.device)
        return (bits * 2 - 1).to(like.dtype)

    def hessian_diagonal(self, param: Tensor) -> Tensor | None:
        """The estimate of the Hessian diagonal of ``param`` (mean over the accumulated batches,
        float32, shaped like it; unclamped), or None when none was accumulated for it."""
        return self.mean_statistic(param)

    def param_tensor(self, param: Tensor) -> Tensor | None:
        h = super().param_tensor(param)
        if h is None:
            return None
        if self.estimator == "hutchinson":
            h = h.clamp(min=0)
        w = param.detach().float()
        return 0.5 * h * w * w

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The statistics of :meth:`GradientImportance.state_dict` plus ``"estimator"``."""
        state = super().state_dict(model)
        state["estimator"] = self.estimator
        return state

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Restore a :meth:`state_dict`; statistics of another estimator are refused."""
        saved = state.get("estimator", self.estimator)
        if saved != self.estimator:
            raise ValueError(
                f"OBDImportance.load_state_dict(): the state holds {saved!r} statistics but this criterion "
                f"uses estimator={self.estimator!r}; load it into OBDImportance(estimator={saved!r}) "
                f"(importance={'obd' if saved == 'fisher' else 'hessian'!r})"
            )
        super().load_state_dict(state, model)

    def __repr__(self) -> str:
        return (
            f"OBDImportance(estimator={self.estimator!r}, samples={self.samples}, "
            f"group_reduction={self.group_reduction!r}, normalizer={self.normalizer!r})"
        )


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

IMPORTANCES: dict[str, Callable[..., Importance]] = {
    "magnitude": MagnitudeImportance,
    "l1": lambda **kw: MagnitudeImportance(p=1, **kw),
    "l2": lambda **kw: MagnitudeImportance(p=2, **kw),
    "lamp": lambda **kw: MagnitudeImportance(**{"p": 2, "normalizer": "lamp", **kw}),
    "taylor": TaylorImportance,
    "fisher": FisherImportance,
    "obd": lambda **kw: OBDImportance(**{"estimator": "fisher", **kw}),
    "hessian": lambda **kw: OBDImportance(**{"estimator": "hutchinson", **kw}),
    "bn_scale": BNScaleImportance,
    "random": RandomImportance,
}
# ``"wanda"`` and ``"flap"`` are added by :mod:`.calibration` (which imports this module), imported
# by :mod:`.settings`, so every entry point (and ``import prune_callbacks``) has them.


def importance_key(name: str) -> str:
    """A criterion name as the registry reads it (case, surrounding spaces and ``-`` ignored;
    ``bn`` and ``bnscale`` stand for ``bn_scale``)."""
    key = name.strip().lower().replace("-", "_")
    return "bn_scale" if key in ("bnscale", "bn") else key


def get_importance(name: str | Importance | Callable, **kwargs: Any) -> Importance | Callable:
    """A criterion by name (``"magnitude"``, ``"l1"``, ``"l2"``, ``"lamp"``, ``"taylor"``,
    ``"fisher"``, ``"obd"``, ``"hessian"``, ``"bn_scale"``, ``"random"``, ``"wanda"``, ``"flap"``;
    see :func:`importance_key`), built with ``kwargs``; objects are returned as they are."""
    if not isinstance(name, str):
        if callable(name):
            return name
        raise TypeError(f"importance must be a name or a callable criterion, got {type(name).__name__}")
    key = importance_key(name)
    factory = IMPORTANCES.get(key)
    if factory is None:
        raise ValueError(f"unknown importance {name!r}; valid names: {', '.join(IMPORTANCES)}")
    return factory(**kwargs)
