"""The dependency graph: from a traced model to pruning groups.

:class:`DependencyGraph` is the entry point and a thin facade: ``build_dependency`` traces the
model (:mod:`.tracing`) and keeps the result; the questions are answered by the modules of the
graph core, each owning one concern:

- :mod:`.facts`: per-layer facts (channel counts, coupling, pruning functions, channel
  dimensions, tied weights, head reshapes), memoised while no layer changes;
- :mod:`.closure`: the closure search, everything that must go with a set of channels
  (:meth:`DependencyGraph.get_pruning_group`);
- :mod:`.groups`: every coupled channel set once (:meth:`DependencyGraph.get_all_groups`),
  with copies for repeated blocks;
- :mod:`.attributes`: the size attributes (head counts, split sizes) a prune must update;
- :mod:`.checks`: whether pruning a group leaves a valid model;
- :mod:`.apply`: the atomic prune, the shapes recorded after it, the history record.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch.nn as nn

from ..layers import LayerPruner, ParameterPruner, get_pruner
from . import attributes
from .apply import apply_group, history_record, probe_group
from .checks import GroupChecker
from .closure import ClosureSearch, OutputBarrier
from .dependency import AttributeUpdate, Group, PruningError
from .facts import LayerFacts
from .groups import GroupEnumerator
from .index_mapping import Barrier, RootMap
from .node import Dependency, Edge, Node
from .ops import OpType
from .provenance import derived_size_problem, size_readers
from .tracing import Trace, trace_model
from .verify import ForwardCheck


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: tracing, building groups and pruning create many
    small objects, and the collections they trigger would walk every live container of the process
    again and again (seconds on big models). Reference counting still frees memory."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


DEFAULT_ROOT_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.LSTM,
    nn.GRU,
    nn.Embedding,
    nn.MultiheadAttention,
)


class DependencyGraph:
    """Traced model plus the machinery to turn channel choices into pruning groups.

    Public fields, set by :meth:`build_dependency`: ``model``; ``nodes`` (every node of the
    trace); ``module2node`` (module or bare parameter -> node); ``ignored`` (ids of the modules
    whose output channels never change); ``unknown_ops`` (autograd ops treated as elementwise);
    ``traced_on_meta`` (whether the trace ran on meta tensors); ``pruning_history`` (one
    :meth:`history_record` per prune with ``record_history``; a caller may give it its own list);
    ``facts`` (:class:`~.facts.LayerFacts`); ``checker`` (:class:`~.checks.GroupChecker`);
    ``verifier`` (the :class:`~.verify.ForwardCheck` every prune ends with, None without
    verification); ``uncalled`` (names of layers with parameters that never ran in the trace);
    ``size_readers`` (tensor -> ops called with sizes computed from its shape, :mod:`.provenance`).
    """

    __slots__ = (
        "model",
        "module2node",
        "nodes",
        "ignored",
        "unknown_ops",
        "traced_on_meta",
        "pruning_history",
        "facts",
        "checker",
        "verifier",
        "uncalled",
        "size_readers",
        "_names",
        "_order",
        "_customized",
        "_head_block_hints",
    )

    def __init__(self, history: list[dict[str, Any]] | None = None) -> None:
        """``history``: the list prunes are recorded into (default: a new one); the Pruner passes
        the model's own history so that every prune is recorded with the model."""
        self.model: nn.Module | None = None
        self.module2node: dict[Any, Node] = {}
        self.nodes: list[Node] = []
        self.ignored: set[int] = set()
        self.unknown_ops: set[str] = set()
        self.traced_on_meta = False
        self.pruning_history: list[dict[str, Any]] = [] if history is None else history
        self.facts = LayerFacts(None, [])
        self._names: dict[Any, str] = {}
        self._order: dict[Any, int] = {}
        self.checker = GroupChecker(self.facts, None, self._names)
        self.verifier: ForwardCheck | None = None
        self.uncalled: list[str] = []
        self.size_readers: dict[Edge, list[Node]] = {}
        self._customized: dict[type, LayerPruner] = {}
        # Block size found per repeated attention layer (see GroupEnumerator.head_group).
        self._head_block_hints: dict[tuple[str, int, int], int] = {}

    # ------------------------------------------------------------------ build
    def build_dependency(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable | None = None,
        output_transform: Callable | None = None,
        unwrapped_parameters: Any = None,
        customized_pruners: Mapping[type, LayerPruner] | None = None,
        ignored_layers: Iterable[Any] | None = None,
        verify: bool = True,
    ) -> DependencyGraph:
        """Trace ``model`` once on ``example_inputs`` (tensor, tuple of positional arguments or
        dict of keyword arguments) and build the graph. Returns ``self``.

        ``unwrapped_parameters``: bare parameters to prune, as ``{param: dim}``, a list of
        ``(param, dim)`` pairs or a list of parameters (dim found from how they are used).
        ``ignored_layers``: modules or parameters whose output channels must never change.
        ``example_inputs`` may be :class:`~.tracing.MultipleInputs` (the traces are merged).
        ``verify``: every prune ends by running the model on the example inputs (on meta
        tensors where the trace could) and is undone when the forward fails or an output
        changes shape (:mod:`.verify`).
        """
        self.model = model
        self._customized = dict(customized_pruners or {})
        with gc_paused():
            trace: Trace = trace_model(
                model,
                example_inputs,
                forward_fn,
                output_transform,
                _unwrapped_dict(unwrapped_parameters),
                self._customized,
            )
        self.nodes = trace.nodes
        self.module2node = {**trace.module_nodes, **trace.param_nodes}
        self.traced_on_meta = trace.on_meta
        self.unknown_ops = trace.unknown_ops
        self.ignored = {id(m) for m in (ignored_layers or [])}
        self._names = {m: n for n, m in model.named_modules()}
        self._names.update({p: n for n, p in model.named_parameters()})
        self._order = {m: i for i, m in enumerate(self._names)}
        self.facts = LayerFacts(model, self.nodes)
        self.size_readers = size_readers(self.nodes)
        self.uncalled = [self._names[m] for m in trace.uncalled if id(m) not in self.ignored]
        self.checker = GroupChecker(self.facts, model, self._names, self._kept_sides(trace.uncalled))
        self.verifier = (
            ForwardCheck(
                model,
                example_inputs,
                trace.output_shapes,
                trace.on_meta,
                forward_fn,
                output_transform,
                trace.eval_mode,
            )
            if verify
            else None
        )
        with gc_paused():
            self._build_dependencies()
        if self.unknown_ops:
            warnings.warn(
                "prune_callbacks: treated these autograd ops as elementwise (channel layout kept): "
                f"{', '.join(sorted(self.unknown_ops))}. If one of them mixes channels, add a "
                "customized pruner for the module that calls it or list that module in ignored_layers.",
                stacklevel=2,
            )
        return self

    def _kept_sides(self, uncalled: list[nn.Module]) -> dict[tuple[Node, str], str]:
        """Layer sides that must keep their channels because a layer that never ran on the
        example inputs may share their tensors: for each such layer, the layers of the same
        parent module with as many input channels keep their inputs, and those with as many
        output channels keep their outputs (its likely alternatives, as in ``self.a(x) if cond
        else self.b(x)``, read the same input and feed the same consumers). The layers that
        never ran are named in a warning."""
        uncalled = [m for m in uncalled if id(m) not in self.ignored]
        if not uncalled:
            return {}
        parents = {m: n.rpartition(".")[0] for m, n in self._names.items() if isinstance(m, nn.Module)}
        kept: dict[tuple[Node, str], str] = {}
        for module in uncalled:
            pruner = get_pruner(module, self._customized)
            if pruner is None:
                continue
            widths = {"in": pruner.in_channels(module), "out": pruner.out_channels(module)}
            for other, node in self.module2node.items():
                if not isinstance(other, nn.Module) or parents.get(other) != parents.get(module):
                    continue
                for side, width in widths.items():
                    if width is not None and self.facts.channel_count(node, side) == width:  # type: ignore[arg-type]
                        kept.setdefault(
                            (node, side),
                            f"the {side}puts of {node.name} are kept: {self._names[module]} "
                            f"({type(module).__name__}) never ran on the example inputs and may share "
                            f"its {width}-channel {side}put (pass MultipleInputs covering that branch to "
                            "prune it)",
                        )
        warnings.warn(
            f"prune_callbacks: these layers never ran on the example inputs, so the graph cannot see "
            f"their tensors and does not prune them: {', '.join(self.uncalled)}. Layers beside them "
            "with as many input (output) channels keep their inputs (outputs); pass "
            "MultipleInputs([...]) covering every branch to prune them.",
            stacklevel=3,
        )
        return kept

    def _build_dependencies(self) -> None:
        """Each node's dependencies: both ways along every tensor, and between the two sides of a
        coupled layer."""
        fn = self.facts.function
        for node in self.nodes:
            node.dependencies = []
        for node in self.nodes:
            out_fn = fn(node, "out")
            for e in node.out_edges:
                for dst, _ in e.dsts:
                    in_fn = fn(dst, "in")
                    node.dependencies.append(Dependency(out_fn, in_fn, node, dst))
                    dst.dependencies.append(Dependency(in_fn, out_fn, dst, node))
            if node.is_module and self.facts.coupled(node):
                in_fn = fn(node, "in")
                node.dependencies.append(Dependency(out_fn, in_fn, node, node))
                node.dependencies.append(Dependency(in_fn, out_fn, node, node))

    # ------------------------------------------------------------------ queries
    def get_node(self, module: Any) -> Node:
        """The node of a module or bare parameter; a clear error if it is not in the graph."""
        node = self.module2node.get(module)
        if node is None:
            name = self._names.get(module, type(module).__name__) if self.model is not None else module
            raise KeyError(
                f"{name} is not in the dependency graph: it is either not used in the traced forward "
                "pass or not a prunable module type (register a customized pruner for it)"
            )
        return node

    def get_pruner_of_module(self, module: Any) -> LayerPruner:
        """The layer pruner the graph uses for ``module`` (or a bare parameter)."""
        return self.facts.pruner(self.get_node(module))

    def get_out_channels(self, module: Any) -> int | None:
        """Output channels of ``module`` as the graph sees them."""
        return self.facts.channel_count(self.get_node(module), "out")

    def get_in_channels(self, module: Any) -> int | None:
        """Input channels of ``module`` as the graph sees them."""
        return self.facts.channel_count(self.get_node(module), "in")

    def channel_count(self, node: Node, side: str, dim: int | None = None) -> int | None:
        """Channels of ``node`` on ``side`` (see :meth:`.facts.LayerFacts.channel_count`)."""
        return self.facts.channel_count(node, side, dim)  # type: ignore[arg-type]

    def get_pruning_group(self, module: Any, pruning_fn: Callable, idxs: Sequence[int]) -> Group:
        """The group of everything that must be pruned with channels ``idxs`` of ``module``
        removed by ``pruning_fn``. Raises ``ValueError`` when the channels cannot be pruned."""
        node = self.get_node(module)
        side = getattr(pruning_fn, "side", None)
        if side is None:
            raise TypeError(f"{pruning_fn!r} is not a pruning function (use e.g. prune_conv_out_channels)")
        idxs = sorted({int(i) for i in idxs})
        pruner = getattr(pruning_fn, "pruner", None)
        n = self.facts.channel_count(node, side, pruner.dim if isinstance(pruner, ParameterPruner) else None)
        bad = [i for i in idxs if i < 0 or (n is not None and i >= n)]
        if bad:
            raise ValueError(
                f"cannot prune {node.name}: channel indices {bad[:8]} are out of range for its "
                f"{n} {side}put channels"
            )
        is_param = isinstance(pruner, ParameterPruner) and node.type == OpType.PARAMETER
        dim = pruner.dim if is_param else None  # type: ignore[union-attr]
        try:
            # One root id for all chosen channels: they are removed together, so only the
            # pruned/kept pattern matters.
            search = ClosureSearch(self.facts, self, node, side, self.ignored, dim)
            group = search.run(idxs, [0] * len(idxs))
        except Barrier as b:
            raise ValueError(f"cannot prune {node.name}: {b}") from None
        problem = self.size_problem(group)
        if problem is not None:
            raise ValueError(f"cannot prune {node.name}: {problem}")
        return group

    def get_all_groups(
        self, ignored_layers: Iterable[Any] = (), root_module_types: Sequence[type] = DEFAULT_ROOT_TYPES
    ) -> list[Group]:
        """Every coupled set of channels exactly once, as full-index groups (for scoring).

        Groups rooted at ``ignored_layers`` (or that would change their output channels) and
        groups blocked by an op whose channel mapping cannot be proven are left out.
        """
        ignored = {id(m) for m in ignored_layers} | self.ignored
        root_types = tuple(root_module_types) + tuple(self._customized)
        enumerator = GroupEnumerator(
            self.facts, self, ignored, root_types, self._order, self._head_block_hints
        )
        with gc_paused(), self.facts.fixed():
            return enumerator.all_groups()

    # ------------------------------------------------------------------ checks and pruning
    def check_pruning_group(self, group: Group) -> bool:
        """Whether pruning ``group`` leaves a valid model (see :meth:`explain_pruning_group`)."""
        return self.checker.explain(group) is None

    def explain_pruning_group(self, group: Group, check_shared: bool = True) -> str | None:
        """Why ``group`` cannot be pruned (a layer left with no channels, grouped convolutions or
        GroupNorm losing divisibility, uneven chunks, slice bounds or shared config values that
        would go wrong), or None when it can.

        ``check_shared=False`` skips one test: that an attribute of an object shared by several
        modules (a config) is changed for all of them. The Pruner checks each layer's part of a
        step with it off and the merged prune of the whole step with it on."""
        return self.checker.explain(group, check_shared)

    def prune_group(self, group: Group, record_history: bool = True) -> None:
        """Prune ``group`` as one transaction (see :func:`.apply.apply_group`) and, with
        ``record_history``, append its :meth:`history_record` to ``pruning_history`` inside it
        (an interrupt never leaves a pruned model without its record). :meth:`Group.prune`
        comes here."""
        commit = (lambda: self.pruning_history.append(self.history_record(group))) if record_history else None
        apply_group(group, self.checker, self.verifier, commit=commit)

    def size_problem(self, group: Group) -> str | None:
        """Why pruning ``group`` would make a size computed from a tensor's shape wrong (see
        :mod:`.provenance`), or None. Only a whole prune can be judged (a step's groups together
        may keep such sizes consistent where each alone would not): the Pruner asks this of the
        merged group of a step, and :meth:`get_pruning_group` of the group it returns."""
        return derived_size_problem(group, self.size_readers)

    def probe(self, group: Group) -> str | None:
        """Why pruning ``group`` would break the model (a size computed from a shape, a check, a
        pruning function or the verifying forward fails), or None; the model is left unchanged
        either way. The shared config check is skipped: a probe may cover part of a step."""
        problem = self.size_problem(group)
        if problem is not None:
            return problem
        if self.verifier is None:
            return self.checker.explain(group, check_shared=False)
        return probe_group(group, self.checker, self.verifier)

    def history_record(self, group: Group) -> dict[str, Any]:
        """Plain-data description of a group prune (names, function names, indices)."""
        return history_record(group, self._names)

    # ------------------------------------------------------------------ size attributes
    @staticmethod
    def attribute_edges(edges: Iterable[Edge]) -> list[Edge]:
        """The tensors among ``edges`` whose maps :meth:`attribute_updates_for` reads (see
        :func:`.attributes.attribute_edges`)."""
        return attributes.attribute_edges(edges)

    @staticmethod
    def attribute_updates_for(edge_maps: dict[Edge, RootMap]) -> list[AttributeUpdate]:
        """Size attributes of the modules that run reshapes and splits, kept true after pruning
        (see :func:`.attributes.attribute_updates_for`)."""
        return attributes.attribute_updates_for(edge_maps)


def _unwrapped_dict(unwrapped: Any) -> dict[nn.Parameter, int | None]:
    if unwrapped is None:
        return {}
    if isinstance(unwrapped, Mapping):
        return dict(unwrapped)
    out: dict[nn.Parameter, int | None] = {}
    for entry in unwrapped:
        if isinstance(entry, nn.Parameter):
            out[entry] = None
        else:
            p, dim = entry
            out[p] = dim
    return out


__all__ = ["DEFAULT_ROOT_TYPES", "DependencyGraph", "OutputBarrier", "PruningError", "gc_paused"]
