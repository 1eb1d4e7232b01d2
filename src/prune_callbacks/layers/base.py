"""What every layer pruner shares: the abstract :class:`LayerPruner`, pruning functions, in-place
parameter slicing and the registry that maps module classes to pruners.

Each family of modules (convolutions, linear layers, norms, attention, recurrent layers...) has a
:class:`LayerPruner` subclass, in its own module, that knows where that family stores its
channels. A pruner answers three questions:

* how many output / input channels the module has (:meth:`LayerPruner.out_channels`,
  :meth:`LayerPruner.in_channels`) and whether they are the same channels
  (:meth:`LayerPruner.coupled`);
* how to remove some of them (:meth:`LayerPruner.prune_out_channels`,
  :meth:`LayerPruner.prune_in_channels`);
* which parameter entries belong to each channel (:meth:`LayerPruner.param_views`), so importance
  criteria can score channels with exactly the values that pruning would remove.

Pruning is done in place and is optimizer friendly: every ``nn.Parameter`` keeps its identity (only
its ``.data`` and ``.grad`` are swapped for sliced copies, see :func:`update_parameter`), buffers
are replaced by sliced copies, and no tensor storage is ever written to, so a caller that kept the
old tensors can restore them.

The public ``prune_*_channels`` names are :class:`PruningFunction` objects: plain callables
``fn(module, idxs) -> module`` that also tell which pruner and which side they use. The registry is
data: :data:`DEFAULT_PRUNERS` maps module classes to pruner instances (filled by each family module
through :func:`register_pruner`, open to users too) and :func:`define_public_functions` makes the
named functions of a pruner; :func:`get_pruner` and :func:`get_pruning_functions` only look up.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import torch
import torch.nn as nn
from torch import Tensor

Side = Literal["out", "in"]
ViewFn = Callable[[Tensor], Tensor]
ParamViews = list[tuple[str, ViewFn]]
Idxs = Sequence[int] | Tensor
ParamUpdate = tuple[nn.Parameter, tuple[int, ...], Callable[[Tensor], Tensor]]
# The module class a pruner handles (a bare ``nn.Parameter`` for ParameterPruner). Only for type
# checking: the registry decides at runtime which pruner a module gets.
ModuleT = TypeVar("ModuleT", bound="nn.Module | Tensor")


# ---------------------------------------------------------------------------------------------
# Index helpers
# ---------------------------------------------------------------------------------------------


def type_name(module: object) -> str:
    """Class name of ``module``, for error messages."""
    return type(module).__name__


def check_side(side: str) -> None:
    """Raise ``ValueError`` unless ``side`` is ``"out"`` or ``"in"``."""
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def normalize_idxs(idxs: Idxs, num_channels: int, module: object) -> list[int]:
    """Turn ``idxs`` (list, tuple or integer tensor) into a sorted list without duplicates.

    Raises ``ValueError`` for out-of-range indices (negative ones included: they are almost always
    a bug here) and for removing every channel, since a layer without channels cannot run.
    """
    if isinstance(idxs, Tensor):
        if idxs.dtype == torch.bool or idxs.is_floating_point() or idxs.is_complex():
            raise TypeError(
                f"{type_name(module)}: channel indices must be integers, got a {idxs.dtype} tensor"
            )
        values = idxs.reshape(-1).tolist()
    elif isinstance(idxs, list) and set(map(type, idxs)) <= {int}:  # no Python call per index
        values = idxs
    else:
        values = [operator.index(i) for i in idxs]
    unique = sorted(set(values))
    if unique and (unique[0] < 0 or unique[-1] >= num_channels):
        bad = [i for i in unique if i < 0 or i >= num_channels]
        raise ValueError(
            f"{type_name(module)}: channel indices {bad} are out of range for {num_channels} channels"
        )
    if unique and len(unique) >= num_channels:
        raise ValueError(
            f"{type_name(module)}: cannot prune all {num_channels} channels (a layer needs at least one)"
        )
    return unique


def removed_channels(idxs: Idxs, num_channels: int, module: object) -> Tensor:
    """:func:`normalize_idxs` as a long CPU tensor (sorted, without duplicates), with the same
    checks and errors; an index tensor is checked and sorted with torch ops, without a Python
    int per index (the channels of a wide layer)."""
    if not isinstance(idxs, Tensor):
        return torch.as_tensor(normalize_idxs(idxs, num_channels, module), dtype=torch.long)
    if idxs.dtype == torch.bool or idxs.is_floating_point() or idxs.is_complex():
        raise TypeError(f"{type_name(module)}: channel indices must be integers, got a {idxs.dtype} tensor")
    flat = idxs.detach().reshape(-1).cpu().long()
    # a group's channels come sorted and distinct already: checked in one pass, not sorted again
    unique = flat if bool((flat[1:] > flat[:-1]).all()) else torch.unique(flat, sorted=True)
    if len(unique) and (int(unique[0]) < 0 or int(unique[-1]) >= num_channels):
        bad = unique[(unique < 0) | (unique >= num_channels)].tolist()
        raise ValueError(
            f"{type_name(module)}: channel indices {bad} are out of range for {num_channels} channels"
        )
    if len(unique) and len(unique) >= num_channels:
        raise ValueError(
            f"{type_name(module)}: cannot prune all {num_channels} channels (a layer needs at least one)"
        )
    return unique


def keep_indices(
    num_channels: int, removed: Sequence[int] | Tensor, device: torch.device | None = None
) -> Tensor:
    """Indices of the channels that survive removing ``removed`` (a sequence or a long tensor),
    as a long tensor on ``device``."""
    mask = torch.ones(num_channels, dtype=torch.bool)
    if len(removed):
        if isinstance(removed, Tensor):
            mask[removed.to(device="cpu", dtype=torch.long)] = False
        else:
            mask[torch.as_tensor(list(removed), dtype=torch.long)] = False
    return mask.nonzero().flatten().to(device)


# ---------------------------------------------------------------------------------------------
# In-place parameter slicing
# ---------------------------------------------------------------------------------------------

# (id(param), dim) -> param for every slice done inside ``once_per_parameter`` (None: not active).
_SLICED: contextvars.ContextVar[dict[tuple[int, int], Tensor] | None] = contextvars.ContextVar(
    "prune_callbacks_sliced", default=None
)
_UPDATES: contextvars.ContextVar[list[ParamUpdate] | None] = contextvars.ContextVar(
    "prune_callbacks_updates", default=None
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


def recorded_updates() -> list[ParamUpdate] | None:
    """The list :func:`track_parameter_updates` is filling now (None outside such a block). A
    prune that is undone removes what it appended, so that the optimizer state is not sliced
    for a change that did not happen."""
    return _UPDATES.get()


def update_parameter(param: Tensor, fn: Callable[[Tensor], Tensor], dim: int) -> None:
    """Replace ``param``'s data (and gradient) by ``fn`` of them, keeping the Parameter object.

    ``fn`` must build new tensors (``index_select``, ``cat``...), never write into its argument.
    ``dim`` is the dim ``fn`` shrinks; inside :func:`once_per_parameter` a repeat is skipped, and
    inside :func:`track_parameter_updates` the change is recorded.
    """
    sliced = _SLICED.get()
    if sliced is not None:
        key = (id(param), dim)
        if key in sliced:
            return
        sliced[key] = param
    log = _UPDATES.get()
    if log is not None:
        # torch's stubs type module weights as Tensor; at runtime they are Parameters.
        log.append((cast(nn.Parameter, param), tuple(param.shape), fn))
    param.data = fn(param.data)
    if param.grad is not None:
        param.grad = fn(param.grad)


def select_parameter(param: Tensor | None, dim: int, keep: Tensor) -> None:
    """Keep only indices ``keep`` of ``param`` along ``dim`` (in place, identity kept; ``None`` is
    ignored so optional biases need no check)."""
    if param is None:
        return
    idx = keep.to(param.device)
    update_parameter(param, lambda t: t.index_select(dim, idx), dim)


def select_buffer(module: nn.Module, name: str, dim: int, keep: Tensor) -> None:
    """Replace buffer ``name`` of ``module`` by its slice along ``dim`` (the old tensor is left
    untouched; a missing buffer is ignored)."""
    buf = module._buffers.get(name)
    if buf is not None:
        module._buffers[name] = buf.index_select(dim, keep.to(buf.device))


# ---------------------------------------------------------------------------------------------
# Per-channel views (for LayerPruner.param_views)
# ---------------------------------------------------------------------------------------------


def vector_view(t: Tensor) -> Tensor:
    """View of a per-channel vector: one value per row."""
    return t.reshape(-1, 1)


def block_rows_view(blocks: int, channels: int) -> ViewFn:
    """Rows of a tensor made of ``blocks`` stacked chunks of ``channels`` rows (q/k/v, RNN gates).

    Row ``j`` gathers row ``j`` of every block.
    """

    def view(t: Tensor) -> Tensor:
        return t.reshape(blocks, channels, -1).transpose(0, 1).reshape(channels, -1)

    return view


def columns_without_rows_view(channels: int, col_blocks: int = 1) -> ViewFn:
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


# ---------------------------------------------------------------------------------------------
# Pruning functions
# ---------------------------------------------------------------------------------------------


#: Pruner classes (exact classes, not their subclasses) whose pruning functions take an index
#: tensor as cheaply as a list (checked and sorted with torch ops: :func:`removed_channels`),
#: with the function classes they use; see :func:`takes_index_tensors`.
_TENSOR_INDEX_PRUNERS: set[type] = set()
_TENSOR_INDEX_FUNCTIONS: set[type] = set()


def accepts_index_tensors(pruner_class: type[LayerPruner[Any]]) -> None:
    """Declare that the pruning functions of ``pruner_class`` (exactly that class) handle an index
    tensor without a Python int per index: a graph then hands them a group's channels as a
    tensor. Other pruners, subclasses of these included, keep getting lists."""
    _TENSOR_INDEX_PRUNERS.add(pruner_class)
    _TENSOR_INDEX_FUNCTIONS.add(pruner_class.function_class)


def takes_index_tensors(fn: object) -> bool:
    """Whether ``fn`` is the pruning function of a pruner declared with
    :func:`accepts_index_tensors`, so that it can be given the channels to remove as a long
    tensor."""
    return type(fn) in _TENSOR_INDEX_FUNCTIONS and type(getattr(fn, "pruner", None)) in _TENSOR_INDEX_PRUNERS


class PruningFunction(Generic[ModuleT]):
    """A callable ``fn(module, idxs) -> module`` bound to one pruner and one side.

    Other code can ask it which pruner (``fn.pruner``) and side (``fn.side``) it uses; public ones
    are found again by name with :func:`function_by_name` (history replay, pickling). The type
    parameter is the pruner's module class.
    """

    def __init__(self, pruner: LayerPruner[ModuleT], side: Side, name: str) -> None:
        check_side(side)
        self.pruner = pruner
        self.side: Side = side
        self.__name__ = name

    def __call__(self, module: ModuleT, idxs: Idxs) -> ModuleT:
        """Prune channels ``idxs`` of ``module`` on this function's side."""
        if self.side == "out":
            return self.pruner.prune_out_channels(module, idxs)
        return self.pruner.prune_in_channels(module, idxs)

    def __repr__(self) -> str:
        return self.__name__

    def __reduce__(self) -> tuple:
        if _PUBLIC.get(self.__name__) is self:
            return (function_by_name, (self.__name__,))
        return (type(self), (self.pruner, self.side, self.__name__))


# ---------------------------------------------------------------------------------------------
# Abstract base classes
# ---------------------------------------------------------------------------------------------


class LayerPruner(abc.ABC, Generic[ModuleT]):
    """Knows how one family of modules stores its channels and how to remove some.

    Subclass it to teach the library a new module type, implementing the four abstract methods
    (channel counts and pruning of each side), and register an instance with
    :func:`register_pruner` or through the ``customized`` argument of :func:`get_pruner`. A side
    the module does not have reports ``None`` channels and raises when pruned. Pruners are
    stateless unless stated otherwise. ``function_class`` is the :class:`PruningFunction` type
    :func:`get_pruning_functions` wraps the pruner in. The type parameter is the module class the
    pruner handles (``LayerPruner[nn.Linear]``), for type checking only.
    """

    function_class: ClassVar[type[PruningFunction[Any]]] = PruningFunction

    @abc.abstractmethod
    def out_channels(self, module: ModuleT) -> int | None:
        """Size of the output channel dim, ``None`` if the module has no prunable outputs."""

    @abc.abstractmethod
    def in_channels(self, module: ModuleT) -> int | None:
        """Size of the input channel dim, ``None`` if the module has no prunable inputs."""

    @abc.abstractmethod
    def prune_out_channels(self, module: ModuleT, idxs: Idxs) -> ModuleT:
        """Remove output channels ``idxs`` in place and return the module."""

    @abc.abstractmethod
    def prune_in_channels(self, module: ModuleT, idxs: Idxs) -> ModuleT:
        """Remove input channels ``idxs`` in place and return the module."""

    def param_views(self, module: ModuleT, side: Side) -> ParamViews:
        """Per-channel views of the parameters that ``side`` touches.

        Returns ``(name, fn)`` pairs: ``name`` is the parameter's name for ``module.get_parameter``
        and ``fn`` maps a tensor shaped like that parameter (weight, gradient, statistic) to a
        ``(C, -1)`` tensor whose row ``j`` holds exactly the entries that pruning channel ``j`` of
        that side removes. A name may appear twice (rows and columns of a square weight); within
        one channel's rows no entry appears twice, but an entry tying two channels of the same side
        (``W_hh[row of a, column b]``) is in the rows of both. The default, no views, suits
        modules without parameters (and user pruners that leave importance to other layers).
        """
        return []

    def coupled(self, module: ModuleT) -> bool:
        """True when input and output channels are the same channels (norms, depthwise conv...)."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CoupledPruner(LayerPruner[ModuleT]):
    """Base for modules whose input and output channels are the same channels (norms, PReLU,
    attention embed dims, bare parameters): subclasses implement :meth:`channels` and
    :meth:`prune` once and both sides use them."""

    def coupled(self, module: ModuleT) -> bool:
        """Input and output channels are the same."""
        return True

    @abc.abstractmethod
    def channels(self, module: ModuleT) -> int | None:
        """Number of channels (both sides)."""

    @abc.abstractmethod
    def prune(self, module: ModuleT, idxs: Idxs) -> ModuleT:
        """Remove channels ``idxs``; both sides prune the same way."""

    def out_channels(self, module: ModuleT) -> int | None:
        """Number of channels."""
        return self.channels(module)

    def in_channels(self, module: ModuleT) -> int | None:
        """Number of channels (same as the output side)."""
        return self.channels(module)

    def prune_out_channels(self, module: ModuleT, idxs: Idxs) -> ModuleT:
        """Remove channels ``idxs``."""
        return self.prune(module, idxs)

    def prune_in_channels(self, module: ModuleT, idxs: Idxs) -> ModuleT:
        """Remove channels ``idxs`` (same as the output side)."""
        return self.prune(module, idxs)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# Module class -> pruner for it (and its subclasses); filled by the family modules.
DEFAULT_PRUNERS: dict[type, LayerPruner[Any]] = {}
# Public pruning functions by name (function_by_name, pickling by name).
_PUBLIC: dict[str, PruningFunction] = {}
# Canonical (out, in) functions of each pruner instance given public functions, by id.
_BUILTIN_FUNCTIONS: dict[int, tuple[PruningFunction, PruningFunction]] = {}
# Pruner classes whose instances all behave alike, mapped to the instance with public functions.
_STATELESS_BUILTINS: dict[type, LayerPruner[Any]] = {}
# Functions made for other pruners, keyed by id; the pruner is held so its id is never reused.
_CUSTOM_FUNCTIONS: dict[int, tuple[LayerPruner[Any], PruningFunction, PruningFunction]] = {}


def register_pruner(module_class: type, pruner: LayerPruner[Any], *, replace: bool = False) -> None:
    """Make ``pruner`` the default pruner of ``module_class`` and its subclasses.

    Every graph built afterwards treats such modules as prunable layers, as if the pruner were
    passed in ``customized_pruners`` each time. Registering a class that already has a different
    pruner raises ``ValueError`` unless ``replace=True``; wrong argument types raise ``TypeError``.
    """
    if not isinstance(module_class, type):
        raise TypeError(f"register_pruner: module_class must be a class, got {module_class!r}")
    if not isinstance(pruner, LayerPruner):
        raise TypeError(
            f"register_pruner: pruner must be a LayerPruner instance, got {type(pruner).__name__} "
            f"(subclass LayerPruner and pass an instance)"
        )
    current = DEFAULT_PRUNERS.get(module_class)
    if current is not None and current is not pruner and not replace:
        raise ValueError(
            f"register_pruner: {module_class.__name__} already uses {current!r}; pass replace=True to "
            f"replace it"
        )
    DEFAULT_PRUNERS[module_class] = pruner


def _pair(pruner: LayerPruner[Any], stem: str) -> tuple[PruningFunction, PruningFunction]:
    cls = type(pruner).function_class
    return (cls(pruner, "out", f"prune_{stem}_out_channels"), cls(pruner, "in", f"prune_{stem}_in_channels"))


def define_public_functions(
    pruner: LayerPruner[Any], stem: str, *, canonical: bool = True, stateless: bool = True
) -> tuple[PruningFunction, PruningFunction]:
    """Create ``prune_<stem>_out_channels`` / ``prune_<stem>_in_channels`` for ``pruner``.

    They are found by :func:`function_by_name` and pickled by name. ``canonical``: they are what
    :func:`get_pruning_functions` returns for ``pruner`` (the first pair of a pruner should be;
    aliases such as the depthwise-conv names are not). ``stateless``: every instance of the
    pruner's class behaves alike, so fresh instances get these functions too.
    """
    fns = _pair(pruner, stem)
    taken = [fn.__name__ for fn in fns if fn.__name__ in _PUBLIC]
    if taken:
        raise ValueError(f"define_public_functions: {taken} already exist; choose another stem than {stem!r}")
    for fn in fns:
        _PUBLIC[fn.__name__] = fn
    if canonical:
        _BUILTIN_FUNCTIONS.setdefault(id(pruner), fns)
        if stateless:
            _STATELESS_BUILTINS.setdefault(type(pruner), pruner)
    return fns


def get_pruner(
    module: object, customized: dict[type, LayerPruner[Any]] | None = None
) -> LayerPruner[Any] | None:
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


def get_pruning_functions(pruner: LayerPruner[Any]) -> tuple[PruningFunction, PruningFunction]:
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
        cached = (pruner, *_pair(pruner, type(pruner).__name__))
        _CUSTOM_FUNCTIONS[id(pruner)] = cached
    return cached[1], cached[2]


def function_by_name(name: str) -> PruningFunction:
    """The public pruning function called ``name`` (e.g. ``"prune_conv_out_channels"``)."""
    try:
        return _PUBLIC[name]
    except KeyError:
        raise KeyError(f"no public pruning function named {name!r}; known: {sorted(_PUBLIC)}") from None
