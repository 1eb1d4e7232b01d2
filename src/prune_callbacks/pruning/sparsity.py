"""Sparse training: regularisers that push whole channel groups towards zero before they are cut.

Structural pruning hurts least when the channels it removes carry nothing any more. A regulariser
trained along with the loss drives chosen channels towards zero *as a whole*: every parameter entry
that pruning the channel would remove (conv/linear rows and the consumers' input columns, biases,
norm scales, attention heads... whatever its full-index group holds), so that the later prune only
cuts what is already (nearly) zero. Three regularisers, all over the full-index groups of a
:class:`~prune_callbacks.graph.dependency_graph.DependencyGraph` or a
:class:`~prune_callbacks.pruning.pruner.Pruner`:

* :class:`GroupLassoRegularizer` (``"group_lasso"``; group-norm sparse training, as Torch-Pruning's
  ``GroupNormPruner``): ``strength * sum over groups g and root channels c of ||v_gc||_2``, where
  ``v_gc`` are all entries of channel ``c`` across every parameter slice of group ``g``. Its
  gradient on an entry ``w`` of ``v_gc`` is ``strength * w / ||v_gc||`` (0 for a channel that is
  exactly zero), the same pull on every channel whatever its size: small channels reach zero.
* :class:`BNScaleRegularizer` (``"bn_scale"``; network slimming, Liu et al. 2017):
  ``strength * sum |gamma|`` over the batch-norm layers of the groups (the layers that
  :class:`~.importance.BNScaleImportance` scores); gradient ``strength * sign(gamma)``.
* :class:`GrowingRegularizer` (``"growing"``; growing regularisation, Wang et al. 2021, "GReg"):
  ``sum over groups and root channels of lambda_gc / 2 * ||v_gc||^2`` (gradient ``lambda_gc * w``)
  with one penalty ``lambda_gc`` per channel. Every ``interval`` updates, the channels each group
  would lose at ``pruning_ratio`` (the lowest group norms, counted like the Pruner's local
  selection: ``floor(ratio * original channels + 0.5)``, less those already pruned) have their
  penalty raised by ``strength``, up to ``max_strength``; the others keep theirs. The penalty
  grows slowly enough for the rest of the network to take over those channels' work. Prune
  after it with a magnitude criterion (``"l1"``/``"l2"``, as the paper does), not ``"taylor"``:
  the loss keeps pulling the penalised channels back (their Taylor score ``lambda * ||v||^2`` is
  positive) while the free channels sit near a stationary point (Taylor score about 0), so a
  Taylor ranking would keep the penalised channels. Under group lasso every channel's Taylor
  score is about ``strength * ||v||``, which ranks like the norm.

**Usage.** One call after ``backward`` and before the optimizer step (and before gradient
clipping, so that clipping sees the whole gradient)::

    pruner = Pruner(model, example_inputs, "l2", pruning_ratio=0.5)
    sparse = GroupLassoRegularizer(pruner, strength=1e-3)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        sparse.apply()                    # adds the penalty's gradient to every .grad
        optimizer.step()
        optimizer.zero_grad()
    pruner.step()

:meth:`GroupRegularizer.apply` adds the gradient of the penalty to ``.grad`` in place (it never
touches the loss, so the penalty is not in the loss a logger sees; :attr:`~GroupRegularizer.last_penalty`
holds its value). With gradient accumulation call it once per optimizer step, after the last
micro-batch. Under AMP call it after ``scaler.unscale_(optimizer)``, or pass
``grad_scale=scaler.get_scale()`` while the gradients are still scaled: the added gradient is then
multiplied by the scale so that the unscale divides it back. The penalty is computed in float32
outside autocast, on detached views of the parameters (no autograd hook of a
``DistributedDataParallel`` wrapper fires). Under DDP every rank holds the same weights, so every
rank adds the same gradient to the same averaged gradient: the ranks stay equal without any
communication.

**Groups.** ``source`` is a :class:`Pruner` (its current groups are read at every call, so they
follow its prunes: the regulariser covers exactly what the pruner would prune, without its
``ignored_layers``), a :class:`DependencyGraph` (all its groups, enumerated again when a prune
changed the model), a list of groups, or a callable returning the groups. A fixed list of groups
made stale by a prune raises a ``RuntimeError`` naming the fix. :meth:`~GroupRegularizer.group_norms`
gives each group's per-root-channel norms (what the regulariser drives to zero) and
:meth:`~GroupRegularizer.sparsity_report` the share of channels below a threshold.

**State.** :meth:`~GroupRegularizer.state_dict` / :meth:`~GroupRegularizer.load_state_dict` save the
update counter and, for growing regularisation, the per-channel penalties (keyed by the group's
root layer and side, so they load into a regulariser on a fresh copy of the model). After a prune,
a group that lost channels starts its penalties again at zero (its channels were renumbered).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..graph.dependency import Group
from ..graph.dependency_graph import DependencyGraph
from .importance import group_index, view_tensor
from .pruner import Pruner

__all__ = [
    "REGULARIZERS",
    "BNScaleRegularizer",
    "GroupLassoRegularizer",
    "GroupRegularizer",
    "GrowingRegularizer",
    "SparsityReport",
    "get_regularizer",
    "group_key_name",
]

#: Where a regulariser takes its groups from (see the module docstring).
GroupSource = Union[Pruner, DependencyGraph, Sequence[Group], Callable[[], Sequence[Group]]]

#: A squared norm below this counts as zero: its channel gets no gradient (the subgradient 0).
_ZERO_SQ = 1e-24


def group_key_name(group: Group) -> str:
    """``"<root layer name>|<side>"``: how a group is named in states and logs (the root's name in
    the traced model, e.g. ``"model.conv1|out"``)."""
    root = group.root.dep
    return f"{root.target.plain_name}|{getattr(root.handler, 'side', 'out')}"


class _StaleGroups(Exception):
    """A group indexes channels its layers no longer have (the model was pruned since)."""


class _ItemSlices:
    """The parameter slices of one group item: ``views`` are ``(parameter, view_fn)`` pairs whose
    views have one row per channel of the item's layer side; ``channels`` rows each."""

    __slots__ = ("module", "views", "channels")

    def __init__(self, module: Any, views: list[tuple[Tensor, Callable[[Tensor], Tensor]]], channels: int):
        self.module = module
        self.views = views
        self.channels = channels

    def squares(self, tensors: Mapping[int, Tensor]) -> Tensor:
        """``(channels,)`` sum of squares of each channel's entries over the item's parameters."""
        total: Tensor | None = None
        for param, view in self.views:
            rows = view(tensors[id(param)]).float()
            value = rows.pow(2).sum(1)
            total = value if total is None else total + value
        assert total is not None
        return total


class _BoundGroup:
    """One group, indexed once for the regularisers: the slices of its items and, for every
    (item, channel) entry that belongs to a root channel, where its value is read (``gather``,
    into the items' concatenated per-channel values) and which root position it adds to (``pos``).

    ``shapes`` remembers the parameters' shapes, so that a prune done since (a stale group) is
    seen instead of indexing the wrong rows."""

    __slots__ = ("group", "key", "n", "items", "gather", "pos", "shapes")

    def __init__(self, group: Group) -> None:
        self.group = group
        self.key = group_key_name(group)
        gi = group_index(group)
        self.n = gi.n
        self.items: list[_ItemSlices] = []
        item_of: dict[int, int] = {}  # group item number -> position in self.items
        for k, item in enumerate(group):
            slices = _item_slices(item)
            if slices is None or not item.idxs:
                continue
            if slices.channels <= max(item.idxs):
                raise _StaleGroups  # the layer has fewer channels than the group indexes: pruned since
            item_of[k] = len(self.items)
            self.items.append(slices)
        offsets = torch.zeros(len(group.items), dtype=torch.long)
        sizes = [s.channels for s in self.items]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        used = torch.zeros(len(group.items), dtype=torch.bool)
        for k, i in item_of.items():
            offsets[k] = starts[i]
            used[k] = True
        keep = used[gi.item] & (gi.pos >= 0)
        self.gather = (gi.idx + offsets[gi.item])[keep]
        self.pos = gi.pos[keep]
        self.shapes = [(p, tuple(p.shape)) for s in self.items for p, _ in s.views]

    @property
    def params(self) -> Iterator[Tensor]:
        for s in self.items:
            for p, _ in s.views:
                yield p

    def stale(self) -> bool:
        """Whether a parameter of the group changed shape since it was indexed (a prune)."""
        return any(tuple(p.shape) != shape for p, shape in self.shapes)

    def squares(self, tensors: Mapping[int, Tensor]) -> Tensor:
        """``(n,)`` float32 squared L2 norm of every root channel over all the group's slices,
        differentiable in ``tensors`` (``{id(parameter): tensor}``)."""
        if not self.items:
            return torch.zeros(self.n)
        values = torch.cat([s.squares(tensors) for s in self.items])
        gather = self.gather.to(values.device)
        pos = self.pos.to(values.device)
        return torch.zeros(self.n, device=values.device).index_add(0, pos, values[gather])


def _item_slices(item: Any) -> _ItemSlices | None:
    """The slices of one group item (None when its layer side has no parameter entries)."""
    module = item.dep.target.module
    handler = item.dep.handler
    pruner, side = getattr(handler, "pruner", None), getattr(handler, "side", None)
    if pruner is None or side is None:
        return None
    views: list[tuple[Tensor, Callable[[Tensor], Tensor]]] = []
    channels: int | None = None
    for name, view in pruner.param_views(module, side):
        param = view_tensor(module, name)
        if param is None:
            continue
        with torch.no_grad():
            rows = view(param.detach()).shape[0]
        if channels is not None and rows != channels:
            raise RuntimeError(
                f"{type(module).__name__}: param_views({side!r}) gives {rows} rows for {name!r} but "
                f"{channels} for an earlier parameter; every view must have one row per channel"
            )
        channels = rows
        views.append((param, view))
    if not views or channels is None:
        return None
    return _ItemSlices(module, views, channels)


@dataclass(frozen=True)
class SparsityReport:
    """How sparse the groups are: per root channel, the norm the regulariser drives to zero.

    ``below_threshold``: share of all root channels (over every group) whose norm is below
    ``threshold``; ``groups_below_threshold``: share of the groups with at least one such
    channel. ``mean_norm``/``min_norm``/``max_norm`` over all root channels; ``penalty``: the
    penalty at the last :meth:`GroupRegularizer.apply` (``None`` before the first).
    """

    threshold: float
    groups: int
    channels: int
    channels_below: int
    groups_below: int
    mean_norm: float
    min_norm: float
    max_norm: float
    penalty: float | None = None

    @property
    def below_threshold(self) -> float:
        return self.channels_below / self.channels if self.channels else 0.0

    @property
    def groups_below_threshold(self) -> float:
        return self.groups_below / self.groups if self.groups else 0.0

    def metrics(self, prefix: str = "prune/sparsity/") -> dict[str, float]:
        """The report as scalars for a logger (``prefix`` + ``below_threshold``,
        ``groups_below_threshold``, ``mean_group_norm``, ``min_group_norm``, ``max_group_norm``,
        ``penalty`` when known)."""
        out = {
            f"{prefix}below_threshold": self.below_threshold,
            f"{prefix}groups_below_threshold": self.groups_below_threshold,
            f"{prefix}mean_group_norm": self.mean_norm,
            f"{prefix}min_group_norm": self.min_norm,
            f"{prefix}max_group_norm": self.max_norm,
        }
        if self.penalty is not None:
            out[f"{prefix}penalty"] = self.penalty
        return out


class GroupRegularizer:
    """Base of the group regularisers (see the module docstring).

    Subclasses define :meth:`penalty` (the scalar penalty of the bound groups, differentiable in
    the tensors it is given) and may define :meth:`channel_norms` (what :meth:`group_norms`
    reports), :meth:`prepare` (state updates before each step's penalty) and :meth:`on_bind`
    (called when the groups change).

    Args:
        source: a Pruner, a DependencyGraph, a list of groups or a callable returning them.
        strength: the regularisation coefficient (> 0; see each regulariser).
    """

    #: Name in :data:`REGULARIZERS` and in the saved state.
    method: str = ""

    def __init__(self, source: GroupSource, strength: float) -> None:
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 0):
            raise ValueError(f"{type(self).__name__}: strength must be a positive number, got {strength!r}")
        self.source = source
        self.strength = float(strength)
        #: Optimizer steps regularised so far (calls of :meth:`apply`).
        self.steps = 0
        #: The penalty's value at the last :meth:`apply` (a detached float32 scalar), or None.
        self.last_penalty: Tensor | None = None
        self._groups: list[Group] = []
        self._bound: list[_BoundGroup] = []
        self._dg_groups: list[Group] | None = None  # groups enumerated from a DependencyGraph source

    # ------------------------------------------------------------------ groups
    def _fetch(self) -> list[Group]:
        source = self.source
        if isinstance(source, Pruner):
            return list(source.groups)
        if isinstance(source, DependencyGraph):
            if self._dg_groups is None:
                self._dg_groups = source.get_all_groups()
            return self._dg_groups
        if callable(source):
            return list(source())
        return list(source)

    def _current(self) -> list[_BoundGroup]:
        """The bound groups, indexed again when the source gives other groups (after a prune)."""
        groups = self._fetch()
        try:
            if len(groups) != len(self._groups) or any(a is not b for a, b in zip(groups, self._groups)):
                self._bind(groups)
            elif any(b.stale() for b in self._bound):
                raise _StaleGroups
        except _StaleGroups:
            if not isinstance(self.source, DependencyGraph):
                self.refresh()
                raise RuntimeError(
                    f"{type(self).__name__}: the model was pruned since its groups were built, so they "
                    "index channels that moved. Give the regulariser the Pruner (it follows its prunes), "
                    "a DependencyGraph, or a callable returning the current groups"
                ) from None
            self._dg_groups = None
            self._bind(self._fetch())
        return self._bound

    def _bind(self, groups: list[Group]) -> None:
        self._groups = list(groups)
        self._bound = [_BoundGroup(g) for g in groups]
        self.on_bind(self._bound)

    def refresh(self) -> None:
        """Forget the groups: they are fetched from the source again (a DependencyGraph enumerates
        them again) at the next call."""
        self._groups = []
        self._bound = []
        self._dg_groups = None

    @property
    def groups(self) -> list[Group]:
        """The groups the regulariser works on now."""
        self._current()
        return list(self._groups)

    @property
    def group_names(self) -> list[str]:
        """``"<root layer>|<side>"`` of every group, in the order of :attr:`groups`."""
        return [b.key for b in self._current()]

    # ------------------------------------------------------------------ hooks for subclasses
    def on_bind(self, groups: list[_BoundGroup]) -> None:
        """Called when the groups change (first use, after a prune)."""

    def prepare(self, groups: list[_BoundGroup]) -> None:
        """Called by :meth:`apply` before the penalty, with the weights of this step."""

    def penalty(self, groups: list[_BoundGroup], tensors: Mapping[int, Tensor]) -> Tensor:
        """The scalar penalty, differentiable in ``tensors`` (``{id(parameter): tensor}``)."""
        raise NotImplementedError

    def channel_norms(self, group: _BoundGroup, tensors: Mapping[int, Tensor]) -> Tensor | None:
        """Per-root-channel norm of one group that the regulariser drives to zero (default: the
        L2 norm over all its slices); None when the regulariser does not act on the group."""
        return group.squares(tensors).sqrt()

    # ------------------------------------------------------------------ the step
    def apply(self, grad_scale: float | None = None) -> Tensor:
        """Add the penalty's gradient to the ``.grad`` of every parameter of the groups.

        Call it once per optimizer step, after ``backward`` (after the last micro-batch under
        gradient accumulation) and before gradient clipping and ``optimizer.step()``. A parameter
        that requires grad but has none gets the penalty's gradient as its ``.grad``; frozen
        parameters are left alone. ``grad_scale``: the gradients are still multiplied by this
        AMP loss scale (``scaler.get_scale()`` before ``scaler.unscale_``), and so is the added
        gradient. Returns the penalty (a detached float32 scalar, also in :attr:`last_penalty`).
        """
        bound = self._current()
        params = _unique(p for b in bound for p in b.params)
        trainable = [p for p in params if p.requires_grad]
        tensors = {id(p): p.detach().requires_grad_(p.requires_grad) for p in params}
        grads: Sequence[Tensor | None] = [None] * len(trainable)
        with _float32_math():
            self.prepare(bound)
            value = self.penalty(bound, tensors) if bound else torch.zeros(())
            if trainable and value.requires_grad:
                grads = torch.autograd.grad(value, [tensors[id(p)] for p in trainable], allow_unused=True)
        scale = 1.0 if grad_scale is None else float(grad_scale)
        with torch.no_grad():
            for p, g in zip(trainable, grads):
                if g is None:
                    continue
                if scale != 1.0:
                    g = g * scale
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))
        self.steps += 1
        self.last_penalty = value.detach()
        return self.last_penalty

    # ------------------------------------------------------------------ reports
    @torch.no_grad()
    def group_norms(self) -> list[Tensor | None]:
        """Per group (in the order of :attr:`groups`), the CPU float32 norm of every root channel
        that the regulariser drives to zero (None for a group it does not act on)."""
        bound = self._current()
        tensors = {id(p): p.detach() for p in _unique(p for b in bound for p in b.params)}
        with _float32_math():
            norms = [self.channel_norms(b, tensors) for b in bound]
        return [None if n is None else n.detach().float().cpu() for n in norms]

    def sparsity_report(
        self, threshold: float = 1e-3, norms: Sequence[Tensor | None] | None = None
    ) -> SparsityReport:
        """How many root channels have a norm (:meth:`group_norms`, or ``norms`` already taken
        from it) below ``threshold``."""
        present = [n for n in (self.group_norms() if norms is None else norms) if n is not None and n.numel()]
        flat = torch.cat(present) if present else torch.zeros(0)
        penalty = None if self.last_penalty is None else float(self.last_penalty)
        if flat.numel() == 0:
            return SparsityReport(float(threshold), 0, 0, 0, 0, 0.0, 0.0, 0.0, penalty)
        return SparsityReport(
            threshold=float(threshold),
            groups=len(present),
            channels=int(flat.numel()),
            channels_below=int((flat < threshold).sum()),
            groups_below=sum(int(bool((n < threshold).any())) for n in present),
            mean_norm=float(flat.mean()),
            min_norm=float(flat.min()),
            max_norm=float(flat.max()),
            penalty=penalty,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"method", "strength", "steps"}`` as plain data (subclasses add theirs)."""
        return {"method": self.method, "strength": self.strength, "steps": int(self.steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of the same method (the strength given to this
        regulariser is kept: it may be changed on resume)."""
        method = state.get("method", self.method)
        if method != self.method:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict(): the state was saved by the {method!r} "
                f"regulariser, this one is {self.method!r}"
            )
        self.steps = int(state.get("steps", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength})"


class GroupLassoRegularizer(GroupRegularizer):
    """Group lasso: ``strength * sum over groups and root channels of the L2 norm of the channel's
    entries across every slice of the group`` (see the module docstring)."""

    method = "group_lasso"

    def penalty(self, groups: list[_BoundGroup], tensors: Mapping[int, Tensor]) -> Tensor:
        total = torch.zeros(())
        for b in groups:
            sq = b.squares(tensors)
            total = total.to(sq.device) + sq.clamp_min(_ZERO_SQ).sqrt().sum()
        return self.strength * total


class BNScaleRegularizer(GroupRegularizer):
    """Network slimming: ``strength * sum |gamma|`` over the affine batch-norm layers of the groups;
    its :meth:`group_norms` are the ``|gamma|`` of each root channel (summed over the group's
    batch-norm layers; None for a group without one). Raises ``ValueError`` when no group holds
    a batch-norm layer."""

    method = "bn_scale"

    @staticmethod
    def _norm_layers(group: _BoundGroup) -> list[Tensor]:
        return [
            s.module.weight
            for s in group.items
            if isinstance(s.module, nn.modules.batchnorm._BatchNorm) and s.module.weight is not None
        ]

    def on_bind(self, groups: list[_BoundGroup]) -> None:
        if groups and not any(self._norm_layers(b) for b in groups):
            raise ValueError(
                "BNScaleRegularizer: none of the prunable groups holds an affine batch-norm layer, so "
                "there are no scales to push to zero; use the 'group_lasso' or 'growing' regulariser"
            )

    def penalty(self, groups: list[_BoundGroup], tensors: Mapping[int, Tensor]) -> Tensor:
        gammas = _unique(w for b in groups for w in self._norm_layers(b))
        total = sum((tensors[id(w)].float().abs().sum() for w in gammas), torch.zeros(()))
        return self.strength * total

    def channel_norms(self, group: _BoundGroup, tensors: Mapping[int, Tensor]) -> Tensor | None:
        if not self._norm_layers(group):
            return None
        gi_values: list[Tensor] = []
        for s in group.items:
            if isinstance(s.module, nn.modules.batchnorm._BatchNorm) and s.module.weight is not None:
                gi_values.append(tensors[id(s.module.weight)].float().abs())
            else:
                gi_values.append(torch.zeros(s.channels, device=tensors[id(s.views[0][0])].device))
        values = torch.cat(gi_values)
        gather, pos = group.gather.to(values.device), group.pos.to(values.device)
        return torch.zeros(group.n, device=values.device).index_add(0, pos, values[gather])


class GrowingRegularizer(GroupRegularizer):
    """Growing regularisation (GReg): per-channel L2 penalties that grow on the channels to prune.

    Args:
        source: as for every regulariser.
        strength: how much a chosen channel's penalty grows every ``interval`` updates (the
            paper's delta, e.g. 1e-4).
        interval: updates (:meth:`apply` calls) between growths; the first call grows.
        max_strength: no channel's penalty grows above this (the paper's cap, e.g. 1).
        pruning_ratio: the share of each group's original root channels that will be pruned: the
            lowest-norm channels up to that count are the ones whose penalty grows.
    """

    method = "growing"

    def __init__(
        self,
        source: GroupSource,
        strength: float = 1e-4,
        interval: int = 10,
        max_strength: float = 1.0,
        pruning_ratio: float = 0.5,
    ) -> None:
        super().__init__(source, strength)
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f"GrowingRegularizer: interval must be an int >= 1, got {interval!r}")
        if not (isinstance(max_strength, (int, float)) and max_strength >= self.strength):
            raise ValueError(
                f"GrowingRegularizer: max_strength must be a number >= strength={self.strength}, "
                f"got {max_strength!r}"
            )
        if not (isinstance(pruning_ratio, (int, float)) and 0.0 <= pruning_ratio < 1.0):
            raise ValueError(f"GrowingRegularizer: pruning_ratio must be in [0, 1), got {pruning_ratio!r}")
        self.interval = interval
        self.max_strength = float(max_strength)
        self.pruning_ratio = float(pruning_ratio)
        #: Per group (by :func:`group_key_name`): the penalty of every root channel (CPU float32).
        self.penalties: dict[str, Tensor] = {}
        #: Per group: its root channels when first seen (before any prune), for the counts.
        self.original: dict[str, int] = {}

    def on_bind(self, groups: list[_BoundGroup]) -> None:
        for b in groups:
            self.original.setdefault(b.key, b.n)
            table = self.penalties.get(b.key)
            if table is None or len(table) != b.n:
                self.penalties[b.key] = torch.zeros(b.n)

    def to_prune(self, group: _BoundGroup) -> int:
        """How many of the group's current root channels are still to be pruned."""
        n0 = self.original.get(group.key, group.n)
        total = int(math.floor(n0 * self.pruning_ratio + 0.5))
        return max(0, min(group.n - 1, total - (n0 - group.n)))

    @torch.no_grad()
    def prepare(self, groups: list[_BoundGroup]) -> None:
        if self.steps % self.interval:
            return
        tensors = {id(p): p.detach() for p in _unique(p for b in groups for p in b.params)}
        for b in groups:
            k = self.to_prune(b)
            if k <= 0:
                continue
            sq = b.squares(tensors).cpu()
            chosen = torch.argsort(sq, stable=True)[:k]
            table = self.penalties[b.key]
            table[chosen] = (table[chosen] + self.strength).clamp_(max=self.max_strength)

    def penalty(self, groups: list[_BoundGroup], tensors: Mapping[int, Tensor]) -> Tensor:
        total = torch.zeros(())
        for b in groups:
            sq = b.squares(tensors)
            table = self.penalties[b.key].to(sq.device)
            total = total.to(sq.device) + 0.5 * (table * sq).sum()
        return total

    def state_dict(self) -> dict[str, Any]:
        """Adds ``"penalties"`` (``{group: CPU tensor}``), ``"original"`` (``{group: channels}``),
        ``"interval"``, ``"max_strength"`` and ``"pruning_ratio"``."""
        state = super().state_dict()
        state.update(
            penalties={k: v.clone() for k, v in self.penalties.items()},
            original=dict(self.original),
            interval=self.interval,
            max_strength=self.max_strength,
            pruning_ratio=self.pruning_ratio,
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counter and the penalties (a group whose channel count differs from the
        saved table starts again at zero when it is next bound)."""
        super().load_state_dict(state)
        saved = state.get("penalties", {})
        self.penalties = {k: torch.as_tensor(v, dtype=torch.float32).clone() for k, v in saved.items()}
        self.original = {k: int(v) for k, v in state.get("original", {}).items()}
        if self._bound:
            self.on_bind(self._bound)

    def __repr__(self) -> str:
        return (
            f"GrowingRegularizer(strength={self.strength}, interval={self.interval}, "
            f"max_strength={self.max_strength}, pruning_ratio={self.pruning_ratio})"
        )


REGULARIZERS: dict[str, type[GroupRegularizer]] = {
    "group_lasso": GroupLassoRegularizer,
    "bn_scale": BNScaleRegularizer,
    "growing": GrowingRegularizer,
}

_ALIASES = {"group_norm": "group_lasso", "lasso": "group_lasso", "slimming": "bn_scale", "greg": "growing"}


def get_regularizer(method: str, source: GroupSource, strength: float, **kwargs: Any) -> GroupRegularizer:
    """A regulariser by name: ``"group_lasso"`` (alias ``"group_norm"``), ``"bn_scale"`` (alias
    ``"slimming"``) or ``"growing"`` (alias ``"greg"``); ``kwargs`` go to its constructor
    (``interval``, ``max_strength``, ``pruning_ratio`` for ``"growing"``)."""
    key = method.strip().lower().replace("-", "_") if isinstance(method, str) else method
    key = _ALIASES.get(key, key)
    cls = REGULARIZERS.get(key)
    if cls is None:
        raise ValueError(
            f"unknown sparse training method {method!r}; valid values: {', '.join(REGULARIZERS)}"
        )
    if kwargs and cls is not GrowingRegularizer:
        raise ValueError(
            f"sparse training method {key!r} takes only a strength; {', '.join(sorted(kwargs))} "
            "apply to 'growing'"
        )
    return cls(source, strength, **kwargs)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _unique(tensors: Any) -> list[Tensor]:
    """Tensors in first-seen order, each once (by identity)."""
    seen: set[int] = set()
    out: list[Tensor] = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


@contextmanager
def _float32_math() -> Iterator[None]:
    """Autograd on and autocast off (the penalty is computed in float32 even when called inside
    an autocast region or under ``no_grad``)."""
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield
