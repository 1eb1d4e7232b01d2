"""The dependency graph: from a traced model to pruning groups.

``DependencyGraph.build_dependency`` traces the model (:mod:`.tracing`), then answers two
questions: which (layer, channels) pairs must be pruned together with a given set of channels
(:meth:`DependencyGraph.get_pruning_group`, a breadth-first closure over the tensors that
connect layers, with index mapping done by :mod:`.propagation`), and what are all the coupled
channel sets of the model (:meth:`DependencyGraph.get_all_groups`).
"""

from __future__ import annotations

import gc
import math
import re
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn

from . import index_mapping as im
from . import propagation, repeats
from .dependency import Dependency, Group, GroupItem, PruningError, snapshot
from .index_mapping import Barrier, RootMap
from .node import Edge, Node
from .ops import OpType
from ..layers import (
    LayerPruner,
    ParameterPruner,
    PruningFunction,
    ParameterPruningFunction,
    get_pruning_functions,
    once_per_parameter,
    prune_depthwise_conv_in_channels,
    prune_depthwise_conv_out_channels,
)
from .tracing import Trace, trace_model

Side = str


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


class OutputBarrier(Barrier):
    """The channels reach a model output, whose shape pruning must keep."""


class DependencyGraph:
    """Traced model plus the machinery to turn channel choices into pruning groups."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.module2node: dict[Any, Node] = {}
        self.nodes: list[Node] = []
        self.ignored: set[int] = set()
        self.unknown_ops: set[str] = set()
        self.pruning_history: list[dict[str, Any]] = []
        self._param_fns: dict[int, tuple[PruningFunction, PruningFunction]] = {}
        self._head_reshapes: list[list[Edge]] | None = None
        self._head_reshape_of: dict[int, list[Edge]] = {}
        self._head_block_hints: dict[tuple[str, int, int], int] = {}
        self._tied_sides: dict[tuple[Node, Side], list[tuple[Node, Side]]] | None = None
        self._memo: dict[tuple, Any] | None = None  # see _layers_fixed
        self._customized: dict[type, LayerPruner] = {}

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
    ) -> DependencyGraph:
        """Trace ``model`` once on ``example_inputs`` (tensor, tuple of positional arguments or
        dict of keyword arguments) and build the graph. Returns ``self``.

        ``unwrapped_parameters``: bare parameters to prune, as ``{param: dim}``, a list of
        ``(param, dim)`` pairs or a list of parameters (dim found from how they are used).
        ``ignored_layers``: modules or parameters whose output channels must never change.
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
        self._head_reshapes: list[list[Edge]] | None = None
        self._head_reshape_of: dict[int, list[Edge]] = {}
        self._tied_sides: dict[tuple[Node, Side], list[tuple[Node, Side]]] | None = None
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

    def _build_dependencies(self) -> None:
        for node in self.nodes:
            node.dependencies = []
        for node in self.nodes:
            out_fn = self._fn(node, "out")
            for e in node.out_edges:
                for dst, _ in e.dsts:
                    in_fn = self._fn(dst, "in")
                    node.dependencies.append(Dependency(out_fn, in_fn, node, dst))
                    dst.dependencies.append(Dependency(in_fn, out_fn, dst, node))
            if node.is_module and self._coupled(node):
                in_fn = self._fn(node, "in")
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
        node = self.get_node(module)
        return self._pruner(node)

    def get_out_channels(self, module: Any) -> int | None:
        node = self.get_node(module)
        return self.channel_count(node, "out")

    def get_in_channels(self, module: Any) -> int | None:
        node = self.get_node(module)
        return self.channel_count(node, "in")

    def get_pruning_group(self, module: Any, pruning_fn: Callable, idxs: Sequence[int]) -> Group:
        """The group of everything that must be pruned with channels ``idxs`` of ``module``
        removed by ``pruning_fn``. Raises ``ValueError`` when the channels cannot be pruned."""
        node = self.get_node(module)
        side = getattr(pruning_fn, "side", None)
        if side is None:
            raise TypeError(f"{pruning_fn!r} is not a pruning function (use e.g. prune_conv_out_channels)")
        idxs = sorted({int(i) for i in idxs})
        pruner = getattr(pruning_fn, "pruner", None)
        n = self.channel_count(node, side, pruner.dim if isinstance(pruner, ParameterPruner) else None)
        bad = [i for i in idxs if i < 0 or (n is not None and i >= n)]
        if bad:
            raise ValueError(
                f"cannot prune {node.name}: channel indices {bad[:8]} are out of range for its "
                f"{n} {side}put channels"
            )
        try:
            # One root id for all chosen channels: they are removed together, so only the
            # pruned/kept pattern matters.
            pruner = getattr(pruning_fn, "pruner", None)
            is_param = isinstance(pruner, ParameterPruner) and node.type == OpType.PARAMETER
            dim = pruner.dim if is_param else None
            return self._closure(node, side, idxs, [0] * len(idxs), root_dim=dim)
        except Barrier as b:
            raise ValueError(f"cannot prune {node.name}: {b}") from None

    def get_all_groups(
        self, ignored_layers: Iterable[Any] = (), root_module_types: Sequence[type] = DEFAULT_ROOT_TYPES
    ) -> list[Group]:
        """Every coupled set of channels exactly once, as full-index groups (for scoring).

        Groups rooted at ``ignored_layers`` (or that would change their output channels) and
        groups blocked by an op whose channel mapping cannot be proven are left out.
        """
        with gc_paused(), self._layers_fixed():
            return self._all_groups(ignored_layers, root_module_types)

    @contextmanager
    def _layers_fixed(self) -> Iterator[None]:
        """Within the block no layer changes, so per-layer facts (channel counts, coupling,
        pruning functions) are computed once per layer and side instead of once per visit."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def _all_groups(self, ignored_layers: Iterable[Any], root_module_types: Sequence[type]) -> list[Group]:
        ignored = {id(m) for m in ignored_layers} | self.ignored
        root_types = tuple(root_module_types) + tuple(self._customized)
        covered: set[tuple[int, Side]] = set()
        groups: list[tuple[Group, set[tuple[int, Side]]]] = []
        blocked: list[str] = []
        # The last group found for each layer name up to block numbers (with its channel count,
        # head size and dimension): the next block's layer may be its copy (see repeats.py).
        templates: dict[tuple, Group] = {}
        signatures: dict[Node, tuple] = {}
        for node in self._ordered_module_nodes():
            module = node.module
            if id(module) in ignored:
                continue
            if node.type == OpType.PARAMETER:
                if not self._matmul_weight(node):
                    continue
            elif not isinstance(module, root_types):
                continue
            root_dim = None
            if node.type == OpType.PARAMETER:
                root_dim = (node.pruning_dim if node.pruning_dim is not None else 1) % node.module.dim()
            if _cover_key(node, "out", root_dim) in covered:
                continue
            n = self.channel_count(node, "out", root_dim)
            if not n or n < 2:
                continue
            head_dim = self._head_split(node, n)
            key = (_block_pattern(node.name), n, head_dim, root_dim)
            template = templates.get(key)
            group = self._copy_group(template, node, ignored, signatures) if template is not None else None
            if group is None:
                try:
                    if head_dim:
                        group = self._head_group(node, n, head_dim, ignored, root_dim)
                    else:
                        group = self._closure(node, "out", list(range(n)), list(range(n)), ignored, root_dim)
                except OutputBarrier:
                    continue
                except Barrier as b:
                    blocked.append(f"{node.name}: {b}")
                    continue
                templates[key] = group
            full = self._fully_covered(group)
            covered |= full
            groups.append((group, full))
        if blocked:
            warnings.warn(
                "prune_callbacks: these layers cannot be pruned and are skipped:\n  " + "\n  ".join(blocked),
                stacklevel=2,
            )
        # Drop a group whose root is fully contained in a larger later group.
        root_keys = [_root_key(g) for g, _ in groups]
        holders: dict[tuple[int, str], list[int]] = {}
        for i, (_g, full) in enumerate(groups):
            for key in full:
                holders.setdefault(key, []).append(i)
        return [
            g
            for i, (g, full) in enumerate(groups)
            if not any(j != i and root_keys[j] not in full for j in holders.get(root_keys[i], ()))
        ]

    def _copy_group(
        self, template: Group, root: Node, ignored: set[int], signatures: dict[Node, tuple]
    ) -> Group | None:
        """The full group of ``root`` as a copy of ``template`` (the same layer of another block),
        or None unless everything the template's closure read has an identical counterpart.
        ``signatures`` caches :meth:`_signature` for this search."""

        def signature(node: Node) -> tuple:
            sig = signatures.get(node)
            if sig is None:
                sig = signatures[node] = self._signature(node, ignored)
            return sig

        # Cheap differences first (DenseNet layers grow, and each one's output has fewer readers
        # than the last): everything checked here, the correspondence would check too.
        first = template.root.dep.target
        if any(self.channel_count(first, sd) != self.channel_count(root, sd) for sd in ("in", "out")):
            return None
        if len(first.out_edges) != len(root.out_edges) or any(
            len(a.dsts) != len(b.dsts) or a.shape != b.shape for a, b in zip(first.out_edges, root.out_edges)
        ):
            return None
        maps: dict[Edge, RootMap] = template.edge_maps
        explored = {it.dep.target for it in template} | {it.dep.source for it in template}
        for e in maps:
            explored.add(e.src)
            explored.update(d for d, _ in e.dsts)
        match = repeats.correspondence(
            explored, template.root.dep.target, root, lambda a, b: signature(a) == signature(b)
        )
        if match is None or not self._same_head_reshapes(explored, match):
            return None
        items = []
        for it in template:
            dep = it.dep
            src, tgt = match.nodes[dep.source], match.nodes[dep.target]
            trigger = self._fn(src, _side_of(dep.trigger), _param_dim(dep.trigger))
            handler = self._fn(tgt, _side_of(dep.handler), _param_dim(dep.handler))
            items.append(
                GroupItem(
                    Dependency(trigger, handler, src, tgt, dep._index_mapping),
                    list(it.idxs),
                    list(it.root_idxs),
                )
            )
        edge_maps = {match.edges[e]: m for e, m in maps.items()}
        group = Group(items, self, self.attribute_updates_for(edge_maps), edge_maps)
        group.head_blocks = template.head_blocks
        return group

    def _signature(self, node: Node, ignored: set[int]) -> tuple:
        """Everything a closure reads from ``node`` itself, as a comparable value: op, recorded
        shapes and arguments, and for layers their kind, sizes, parameters and ignored status.
        (A layer with a tied parameter gets a unique signature: it is never copied.)"""
        sig: tuple = (node.type, node.pruning_dim, repeats.freeze(node.attrs))
        if not node.is_module:
            return sig
        module = node.module
        if node.type == OpType.PARAMETER:
            return (*sig, id(module) in ignored, tuple(module.shape), module.dtype)
        if self._tied(node, "in") or self._tied(node, "out"):
            return (*sig, id(node))
        return (
            *sig,
            id(module) in ignored,
            type(module),
            id(node.pruner),
            tuple((k, tuple(p.shape)) for k, p in module.named_parameters()),
            self.channel_count(node, "out"),
            self.channel_count(node, "in"),
            self._coupled(node),
            self._dw_mult(node),
            getattr(module, "data_format", None),
        )

    def _same_head_reshapes(self, explored: set[Node], match: repeats.Match) -> bool:
        """Head-splitting reshapes are coupled per module (see :meth:`_couple_head_sizes`): the
        explored ones must have counterparts coupled in the same way."""
        self._head_reshape_groups()
        by_edge = self._head_reshape_of
        for node in explored:
            for e in node.out_edges if node.type == OpType.RESHAPE else ():
                edges = by_edge.get(id(e))
                if edges is None:
                    if id(match.edges[e]) in by_edge:
                        return False
                    continue
                if any(x not in match.edges for x in edges):
                    return False
                mine = by_edge.get(id(match.edges[e]))
                if mine is None or {id(match.edges[x]) for x in edges} != {id(x) for x in mine}:
                    return False
        return True

    def _matmul_weight(self, node: Node) -> bool:
        """A bare 2-D parameter used as the right operand of a matrix product is a linear layer
        written by hand (e.g. Hugging Face's ``Conv1D``): a root, pruned along its last dim."""
        if node.module.dim() != 2:
            return False
        for e in node.out_edges:
            for dst, pos in e.dsts:
                roles = propagation._MATMUL_ROLES.get(dst.attrs.get("op", ""))
                if dst.type == OpType.MATMUL and roles and pos == roles[1]:
                    return node.pruning_dim in (None, 1, -1)
        return False

    def _head_split(self, node: Node, n: int) -> int | None:
        """Head size when the layer's output channels are reshaped into (heads, head size) on the
        way to an attention product (found by a short walk over the ops after the layer)."""
        frontier = list(node.out_edges)
        seen: set[int] = set()
        for _ in range(8):
            nxt = []
            for e in frontier:
                for dst, _pos in e.dsts:
                    if id(dst) in seen or not dst.type.is_virtual:
                        continue
                    seen.add(id(dst))
                    if dst.type == OpType.RESHAPE and _head_split_shape(dst):
                        return dst.attrs["out_shapes"][0][-1]
                    if (
                        dst.type
                        in (
                            OpType.ELEMENTWISE,
                            OpType.SPLIT,
                            OpType.RESHAPE,
                            OpType.PERMUTE,
                            OpType.MATMUL,
                        )
                        or dst.attrs.get("op") == "Slice"
                    ):
                        nxt.extend(dst.out_edges)
            frontier = nxt
        return None

    def _head_group(
        self, node: Node, n: int, head_dim: int, ignored: set[int], root_dim: int | None = None
    ) -> Group:
        """Full-index group of an attention projection, scored and pruned by heads: each root
        channel's id is its block's first channel. Under grouped-query attention a block is a
        key/value head with its query heads (the smallest block size that works)."""
        error: Barrier | None = None
        # Repeated layers (same name up to layer numbers) have the same block size: try the one
        # found for an earlier layer first.
        key = (_block_pattern(node.name), n, head_dim)
        sizes = [b for b in range(head_dim, n + 1, head_dim) if n % b == 0 and b != n]
        hint = self._head_block_hints.get(key)
        if hint in sizes:
            sizes.remove(hint)
            sizes.insert(0, hint)
        for b in sizes:
            try:
                roots = [c - c % b for c in range(n)]
                group = self._closure(node, "out", list(range(n)), roots, ignored, root_dim)
            except OutputBarrier:
                raise
            except Barrier as exc:
                error = error or exc
                continue
            # heads found to be one unit (a fused q/k/v projection) share one root id
            group.head_blocks = len(set(group.root.root_idxs))
            self._head_block_hints[key] = b
            return group
        raise error or Barrier("no head structure could be pruned")

    def check_pruning_group(self, group: Group) -> bool:
        """Whether pruning ``group`` leaves a valid model (see :meth:`explain_pruning_group`)."""
        return self.explain_pruning_group(group) is None

    def explain_pruning_group(self, group: Group, check_shared: bool = True) -> str | None:
        """Why ``group`` cannot be pruned (a layer left with no channels, grouped convolutions or
        GroupNorm losing divisibility, uneven chunks, slice bounds or shared config values that
        would go wrong), or None when it can.

        ``check_shared=False`` skips one test: that an attribute of an object shared by several
        modules (a config) is changed for all of them. The Pruner checks each layer's part of a
        step with it off and the merged prune of the whole step with it on."""
        for item in group:
            node, fn = item.dep.target, item.dep.handler
            side = _side_of(fn)
            pruner = getattr(fn, "pruner", None)
            n = self.channel_count(node, side, pruner.dim if isinstance(pruner, ParameterPruner) else None)
            idxs = set(item.idxs)
            if n is None:
                continue
            if len(idxs) >= n:
                return f"{node.name} would be left with no channels ({len(idxs)} of {n} pruned)"
            module = node.module
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and node.type == OpType.CONV:
                per = n // module.groups
                counts = {sum(1 for i in idxs if i // per == g) for g in range(module.groups)}
                if len(counts) > 1:
                    return (
                        f"{node.name} is a grouped convolution with {module.groups} groups: every group must "
                        f"lose the same number of {side}put channels"
                    )
            if isinstance(module, nn.GroupNorm) and (n - len(idxs)) % module.num_groups:
                left = n - len(idxs)
                return f"{node.name}: {left} channels are not divisible by num_groups={module.num_groups}"
            if isinstance(module, nn.MultiheadAttention) and (n - len(idxs)) % module.num_heads:
                return (
                    f"{node.name}: embed dim {n - len(idxs)} is not divisible by num_heads={module.num_heads}"
                )
        for module, attr, old, new in group.attribute_updates:
            if attr == "<literal split>":
                return (
                    f"a split into chunks of a fixed size inside {type(module).__name__} would get sizes "
                    f"{list(new)}; use torch.chunk or keep the split size in a `split_size` attribute"
                )
            if attr == "<chunks>" and len(set(new)) > 1:
                return (
                    f"a split into equal chunks inside {type(module).__name__} would get unequal sizes "
                    f"{new}; prune the same number of channels in every chunk"
                )
            if attr == "<literal slice>":
                return (
                    f"slices at fixed offsets inside {type(module).__name__} would get sizes {list(new)} "
                    f"(now {list(old)}), and no head-count or size attribute of the module or its config "
                    "gives their bounds; compute the offsets from such attributes (e.g. "
                    "num_heads * head_dim) or keep these channels"
                )
        return _conflicting_update(group.attribute_updates) or (
            self._partial_shared_update(group.attribute_updates) if check_shared else None
        )

    def _partial_shared_update(self, updates: list[tuple[Any, str, Any, Any]]) -> str | None:
        """Why updating a shared object (a config held by every layer) with ``updates`` would break
        a layer: every module of the same class that holds the object must be in the group."""
        for obj, attr, old, new in updates:
            if isinstance(obj, nn.Module) or attr.startswith("<"):
                continue
            path = f"{SHARED_HOLDER_ATTR}.{attr}"
            holders = [h for h, a, p, _n in updates if a == "<shared>" and p == path]
            holders = [h for h in holders if getattr(h, SHARED_HOLDER_ATTR, None) is obj]
            types = tuple({type(h) for h in holders})
            reported = {id(h) for h in holders}
            expected = [
                m
                for m in self.model.modules()
                if type(m) in types and getattr(m, SHARED_HOLDER_ATTR, None) is obj
            ]
            missing = [m for m in expected if id(m) not in reported]
            if missing:
                cls = types[0].__name__
                return (
                    f"{path} ({old} -> {new}) is shared by {len(expected)} {cls} modules but this prune "
                    f"changes the heads of only {len(expected) - len(missing)} of them, which would break "
                    f"the others (e.g. {self._names.get(missing[0], cls)}); prune the heads of every {cls} "
                    "equally in one step (e.g. with the Pruner) or disable head pruning"
                )
        return None

    # ------------------------------------------------------------------ pruning
    def _prune_group(self, group: Group, record_history: bool) -> None:
        reason = self.explain_pruning_group(group)
        if reason is not None:
            raise ValueError(f"refusing to prune this group: {reason}")
        targets = [item.dep.target.module for item in group] + [m for m, *_ in group.attribute_updates]
        restore = snapshot(targets)
        current = None
        try:
            with once_per_parameter():
                # Output sides first: removing a grouped convolution's inputs first could turn it
                # into a depthwise one, which prunes its outputs by other rules.
                for item in sorted(group, key=lambda it: _side_of(it.dep.handler) != "out"):
                    current = item.dep
                    item.dep(item.idxs)
            current = None
            for module, attr, _old, new in group.attribute_updates:
                if not attr.startswith("<"):
                    setattr(module, attr, new)
        except Exception as e:
            restore()
            where = (
                f"{current.target.name} ({_fn_name(current.handler)})"
                if current is not None
                else "attributes"
            )
            raise PruningError(f"pruning failed at {where}: {e}. The model was restored unchanged.") from e
        self._update_shapes(group)
        if record_history:
            self.pruning_history.append(self.history_record(group))

    def history_record(self, group: Group) -> dict[str, Any]:
        """Plain-data description of a group prune (names, function names, indices)."""
        root = group.root
        return {
            "root": self._names.get(root.dep.target.module, root.dep.target._name),
            "function": _fn_name(root.dep.handler),
            "idxs": list(root.idxs),
            "items": [
                {
                    "target": self._names.get(it.dep.target.module, it.dep.target._name),
                    "function": _fn_name(it.dep.handler),
                    "dim": it.dep.handler.pruner.dim
                    if isinstance(it.dep.handler.pruner, ParameterPruner)
                    else None,
                    "idxs": list(it.idxs),
                }
                for it in group
            ],
            "attributes": [
                {"module": self._object_name(m), "attr": a, "new": list(n) if isinstance(n, tuple) else n}
                for m, a, _o, n in group.attribute_updates
                if not a.startswith("<")
            ],
        }

    def _object_name(self, obj: Any) -> str:
        """Name of a module, or ``<module name>.config`` for a config object a module holds."""
        name = self._names.get(obj) if isinstance(obj, (nn.Module, torch.Tensor)) else None
        if name is not None:
            return name
        for m, n in self._names.items():
            if isinstance(m, nn.Module) and getattr(m, SHARED_HOLDER_ATTR, None) is obj:
                return f"{n}.{SHARED_HOLDER_ATTR}" if n else SHARED_HOLDER_ATTR
        return ""

    # ------------------------------------------------------------------ closure (BFS)
    def _closure(
        self,
        root: Node,
        side: Side,
        idxs: list[int],
        roots: list[int],
        ignored: set[int] | None = None,
        root_dim: int | None = None,
    ) -> Group:
        """Breadth-first search over tensors: every layer whose channels must go with ``idxs``."""
        ignored = self.ignored if ignored is None else ignored
        edge_maps: dict[Edge, RootMap] = {}
        records: dict[tuple[Node, Side], dict[int, int]] = {}
        sources: dict[tuple[Node, Side], tuple[Node, Side]] = {}
        param_dims: dict[Node, int] = {root: root_dim} if root_dim is not None else {}
        # (edge, the group item that caused the change, the module the change came from: it has
        # already put its channels on all its tensors, so it is not asked again)
        queue: deque[tuple[Edge, tuple[Node, Side], Node | None]] = deque()
        # Full-index closures give every root channel its own id; ids found to share an element
        # are joined (see im.RootUnion). A subset closure has one id, so nothing to join.
        union = im.RootUnion() if len(set(roots)) > 1 else None

        def visit(edge: Edge, m: RootMap, origin: tuple[Node, Side], via: Node | None = None) -> None:
            merged, changed = im.merge(edge_maps.get(edge), m)
            if changed:
                if edge.is_output:
                    raise OutputBarrier(
                        f"it would change the shape of the model's output (produced by {edge.src.name})"
                    )
                edge_maps[edge] = merged
                queue.append((edge, origin, via))

        def at_module(
            node: Node,
            s: Side,
            chans: list[int],
            croots: list[int],
            origin: tuple[Node, Side],
            from_edge: Edge | None = None,
        ) -> None:
            if not chans:
                return
            coupled = self._coupled(node)
            rec_side = "out" if coupled else s
            if self._dw_mult(node) and coupled:
                from_edge = None  # whole blocks may add channels to the edge they came from
                chans, croots, rec_side = self._depthwise_to_in(node, s, chans, croots, union)
            if id(node.module) in ignored and (rec_side == "out" or coupled):
                raise Barrier(f"{node.name} is ignored, so its output channels cannot change")
            rec = records.setdefault((node, rec_side), {})
            if rec:
                new = [(c, r) for c, r in zip(chans, croots) if c not in rec]
                if union is not None and len(new) < len(chans):
                    for c, r in zip(chans, croots):
                        if c in rec and rec[c] != r:
                            union.union(rec[c], r)
                if not new:
                    return
                rec.update(new)
                all_c, all_r = list(rec), list(rec.values())
            else:
                rec.update(zip(chans, croots))
                all_c, all_r = (chans, croots) if len(rec) == len(chans) else (list(rec), list(rec.values()))
            sources.setdefault((node, rec_side), origin)
            here = (node, rec_side)
            sides = ("in", "out") if coupled else (s,)
            for sd in sides:
                for other, other_side in self._tied(node, sd):
                    at_module(other, other_side, all_c, all_r, here)
                for e in node.out_edges if sd == "out" else node.in_edges:
                    if e is None or e is from_edge:
                        continue
                    m = self._module_map(node, sd, e, all_c, all_r, rec_side, param_dims)
                    if m is not None:
                        visit(e, m, here, node)

        try:
            with im.joining_roots(union) if union is not None else nullcontext():
                at_module(root, side, idxs, roots, (root, side))
                self._drain(queue, edge_maps, visit, at_module, param_dims, (root, side), union)
        finally:
            # at_module calls itself: drop that reference cycle now, so the search's records
            # are freed when it returns instead of waiting for the cyclic garbage collector.
            at_module = None  # type: ignore[assignment]
        if union is not None and union.parent:
            for rec in records.values():
                for c, r in rec.items():
                    rec[c] = union.find(r)
            for edge, m in edge_maps.items():
                edge_maps[edge] = RootMap(union.canonical(m.t), m.explicit)
        return self._make_group(root, side, records, sources, param_dims, edge_maps)

    def _drain(
        self,
        queue: deque,
        edge_maps: dict[Edge, RootMap],
        visit: Callable,
        at_module: Callable,
        param_dims: dict,
        origin0: tuple[Node, Side],
        union: im.RootUnion | None,
    ) -> None:
        """Run the closure's queue until no tensor map changes."""
        while queue or self._couple_head_sizes(edge_maps, visit, origin0, union):
            edge, origin, via = queue.popleft()
            m = edge_maps[edge]
            src = edge.src
            if src is via:
                pass
            elif src.is_module:
                got = self._read_module(src, "out", edge, m, param_dims, union)
                if got is not None:
                    at_module(src, "out", *got, origin, edge)
            else:
                for kind, i, r in _through(propagation.from_output, src, edge.src_pos, m):
                    for e in _edges_at(src, kind, i):
                        visit(e, r, origin)
            for dst, pos in edge.dsts:
                if dst is via:
                    continue
                if dst.is_module:
                    got = self._read_module(dst, "in", edge, m, param_dims, union)
                    if got is not None:
                        at_module(dst, "in", *got, origin, edge)
                else:
                    # Going back through this op from an output it gave a map adds nothing then,
                    # so that step is skipped (as for a module's own tensors).
                    back = dst if propagation.round_trip_exact(dst, pos, m) else None
                    for kind, i, r in _through(propagation.from_input, dst, pos, m):
                        for e in _edges_at(dst, kind, i):
                            visit(e, r, origin, back if kind == "out" else None)

    def _tied(self, node: Node, side: Side) -> list[tuple[Node, Side]]:
        """Module sides that prune the same parameter along the same dimension as ``(node, side)``
        (a weight shared by two modules, e.g. an embedding tied to the output layer): their
        channels are the same channels."""
        if self._tied_sides is None:
            self._tied_sides = {}
            ids = [id(p) for _, p in self.model.named_parameters(remove_duplicate=False)]
            if len(ids) == len(set(ids)):
                return []  # no parameter is used twice
            owners: dict[int, set[int]] = {}
            modules = [n for n in self.nodes if n.is_module and n.type != OpType.PARAMETER]
            for n in modules:
                for p in n.module.parameters():
                    owners.setdefault(id(p), set()).add(id(n))
            shared = {pid for pid, o in owners.items() if len(o) > 1}
            users: dict[tuple[int, int], list[tuple[Node, Side]]] = {}
            for n in modules:
                if not any(id(p) in shared for p in n.module.parameters()):
                    continue
                for sd in ("out", "in"):
                    for p, dim in _param_dims(n, sd):
                        users.setdefault((id(p), dim), []).append((n, sd))
            for sides in users.values():
                if len({id(n) for n, _ in sides}) > 1:
                    for n, sd in sides:
                        self._tied_sides.setdefault((n, sd), []).extend(
                            (o, osd) for o, osd in sides if o is not n
                        )
        return self._tied_sides.get((node, side), [])

    def _head_reshape_groups(self) -> list[list[Edge]]:
        """Outputs of the reshapes that one module runs to split channels into heads of one size
        (its queries, keys and values), per module and head size, where there are several."""
        if self._head_reshapes is None:
            by_owner: dict[tuple[int, int], list[Edge]] = {}
            for node in self.nodes:
                if node.type == OpType.RESHAPE and node.owner is not None and _head_split_shape(node):
                    for e in node.out_edges:
                        by_owner.setdefault((id(node.owner), e.shape[-1]), []).append(e)
            self._head_reshapes = [edges for edges in by_owner.values() if len(edges) > 1]
            self._head_reshape_of = {id(e): edges for edges in self._head_reshapes for e in edges}
        return self._head_reshapes

    def _couple_head_sizes(
        self,
        edge_maps: dict[Edge, RootMap],
        visit: Callable,
        origin: tuple,
        union: im.RootUnion | None = None,
    ) -> bool:
        """Reshapes in one module that split channels into (heads, head size) with the same head
        size read it from the same place (one ``head_dim`` for queries, keys and values): when
        offsets inside the heads are removed from one of them, remove them from all of them.
        An offset counts as removed when one root id covers it in every head (whole heads with
        their own ids are not offsets). Returns whether anything new was queued."""
        queued = False
        for edges in self._head_reshape_groups():
            if not any(e in edge_maps for e in edges):
                continue
            cols: dict[int, int] = {}
            for e in edges:
                m = edge_maps.get(e)
                if m is None or m.shape[-1] == 1:
                    continue
                t = m.t.reshape(-1, m.shape[-1]) if m.t.dim() > 1 else m.t[None]
                if union is not None:
                    t = union.canonical(t)
                in_all = ((t >= 0) & (t == t[:1])).all(0).nonzero().flatten().tolist()
                for d in in_all:
                    cols.setdefault(d, int(t[0, d]))
            if not cols:
                continue
            for e in edges:
                size = e.shape[-1]
                flat = torch.full((size,), im.KEPT, dtype=torch.long)
                flat[list(cols)] = torch.tensor(list(cols.values()))
                m = RootMap(
                    flat.view((1,) * (len(e.shape) - 1) + (size,)), (False,) * (len(e.shape) - 1) + (True,)
                )
                before = len(edge_maps)
                old = edge_maps.get(e)
                visit(e, m, origin)
                queued = queued or len(edge_maps) != before or edge_maps.get(e) is not old
        return queued

    def _make_group(
        self,
        root: Node,
        side: Side,
        records: dict,
        sources: dict,
        param_dims: dict,
        edge_maps: dict[Edge, RootMap],
    ) -> Group:
        items: list[GroupItem] = []
        root_key = next(k for k in records if k[0] is root)
        keys = [root_key] + [k for k in records if k != root_key]
        for node, s in keys:
            rec = records[(node, s)]
            chans = sorted(rec)
            src_node, src_side = sources[(node, s)]
            fn = self._fn(node, s, param_dims.get(node))
            trigger = self._fn(src_node, src_side, param_dims.get(src_node))
            dep = Dependency(trigger, fn, src_node, node, rec)
            items.append(GroupItem(dep, chans, [rec[c] for c in chans]))
        group = Group(items, self, self.attribute_updates_for(edge_maps), edge_maps)
        return group

    def _update_shapes(self, group: Group) -> None:
        """After a prune, shrink the recorded tensor shapes so the graph stays usable."""
        shapes: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}  # maps may share tensors
        for edge, m in group.edge_maps.items():
            key = (id(m.t), edge.shape)
            new = shapes.get(key)
            if new is None:
                new = shapes[key] = _pruned_shape(edge.shape, m)
            if new == edge.shape:
                continue
            edge.shape = new
            src = edge.src
            if src.type.is_virtual:
                src.attrs["out_shapes"][edge.src_pos] = new
            for dst, pos in edge.dsts:
                dst.attrs["in_shapes"][pos] = new

    @staticmethod
    def attribute_edges(edges: Iterable[Edge]) -> list[Edge]:
        """The tensors among ``edges`` whose maps :meth:`attribute_updates_for` reads (outputs of
        reshapes run by a module, inputs of splits and slices): a subset of a group's channels
        changes attributes through these only."""
        return [
            e
            for e in edges
            if (e.src.type == OpType.RESHAPE and e.src.owner is not None)
            or any(d.type == OpType.SPLIT or d.attrs.get("op") == "Slice" for d, _ in e.dsts)
        ]

    def attribute_updates_for(self, edge_maps: dict[Edge, RootMap]) -> list[tuple[nn.Module, str, Any, Any]]:
        """Size attributes of the modules that run reshapes and splits, kept true after pruning:
        head counts, head sizes and merged sizes of attention reshapes, split sizes."""
        updates = self._reshape_attribute_updates(edge_maps)
        for edge, m in edge_maps.items():
            for dst, _pos in edge.dsts:
                if dst.type != OpType.SPLIT or dst.owner is None or dst.attrs.get("op") == "Unbind":
                    continue
                dim = dst.attrs.get("dim", 0) % len(edge.shape)
                if m.shape[dim] == 1:
                    continue
                pruned = (m.t >= 0).movedim(dim, 0).reshape(m.shape[dim], -1).any(dim=1)
                old = [s[dim] for s in dst.attrs["out_shapes"]]
                new, off = [], 0
                for size in old:
                    new.append(size - int(pruned[off : off + size].sum()))
                    off += size
                if new == old:
                    continue
                if "split_sizes" in dst.attrs:
                    for attr, value in vars(dst.owner).items():
                        if isinstance(value, (list, tuple)) and list(value) == old:
                            updates.append((dst.owner, attr, value, type(value)(new)))
                else:
                    size = dst.attrs.get("split_size")
                    followed = [
                        (dst.owner, attr, value, new[0])
                        for attr, value in vars(dst.owner).items()
                        if attr == "split_size" and value == size and len(set(new)) == 1
                    ]
                    if dst.attrs.get("call") == "chunk" or followed:
                        updates.append((dst.owner, "<chunks>", tuple(old), tuple(new)))
                        updates.extend(followed)
                    else:
                        updates.append((dst.owner, "<literal split>", tuple(old), tuple(new)))
        updates.extend(self._slice_attribute_updates(edge_maps, updates))
        return updates

    def _slice_attribute_updates(
        self, edge_maps: dict[Edge, RootMap], known: list[tuple[Any, str, Any, Any]]
    ) -> list[tuple[Any, str, Any, Any]]:
        """Attributes that the bounds of a slice partition (a fused tensor cut at fixed offsets,
        e.g. ``qkv[..., :n_q * d]``) are computed from, updated to the new piece sizes; a piece
        whose new size no attribute explains gives a ``<literal slice>`` refusal."""
        updates: list[tuple[Any, str, Any, Any]] = []
        done: set[int] = set()
        for edge, m in edge_maps.items():
            for dst, _pos in edge.dsts:
                if dst.attrs.get("op") != "Slice" or id(dst) in done:
                    continue
                dim = dst.attrs.get("dim", 0) % len(edge.shape)
                if im.constant_along(m, dim):
                    continue  # the same at every offset: no slice partition is used
                pieces = propagation.slice_partition(dst, dim)
                if pieces is None:
                    continue
                done.update(id(p) for p in pieces)
                kept = (m.t < 0).movedim(dim, 0).reshape(m.shape[dim], -1).any(dim=1)
                old, new, off = [], [], 0
                for p in pieces:
                    size = p.attrs["out_shapes"][0][dim]
                    old.append(size)
                    new.append(int(kept[off : off + size].sum()))
                    off += size
                for k, p in enumerate(pieces):
                    if old[k] == new[k] or p.owner is None:
                        continue
                    if k == len(pieces) - 1 and p.attrs["end"] >= edge.shape[dim]:
                        continue  # open end (or one past the whole tensor): follows by itself
                    found = _size_attributes(p.owner, old[k], new[k], known + updates)
                    if found is None:
                        updates.append((p.owner, "<literal slice>", tuple(old), tuple(new)))
                        break
                    for obj, attr, value, value_new in found:
                        if not _has_update(known + updates, obj, attr, value_new):
                            updates.append((obj, attr, value, value_new))
                        path = f"{SHARED_HOLDER_ATTR}.{attr}"
                        if obj is not p.owner and not _has_update(
                            updates, p.owner, "<shared>", value_new, path
                        ):
                            updates.append((p.owner, "<shared>", path, value_new))
        return updates

    def _reshape_attribute_updates(
        self, edge_maps: dict[Edge, RootMap]
    ) -> list[tuple[nn.Module, str, Any, Any]]:
        updates: list[tuple[nn.Module, str, Any, Any]] = []
        done: set[tuple[int, str]] = set()
        heads: dict[nn.Module, set[int]] = {}
        for edge, m in edge_maps.items():
            node = edge.src
            if node.type != OpType.RESHAPE or node.owner is None:
                continue
            old, new = edge.shape, _pruned_shape(edge.shape, m)
            if old == new:
                continue
            split = _head_split_shape(node)
            for d in range(len(old)):
                if old[d] == new[d]:
                    continue
                if split and d == len(old) - 1:
                    names = HEAD_DIM_ATTRS
                elif split and d == len(old) - 2:
                    names = HEADS_ATTRS
                else:
                    names = SIZE_ATTRS
                if names is HEADS_ATTRS:
                    heads.setdefault(node.owner, set()).add(new[d])
                for attr in names:
                    if getattr(node.owner, attr, None) == old[d] and (id(node.owner), attr) not in done:
                        done.add((id(node.owner), attr))
                        updates.append((node.owner, attr, old[d], new[d]))
        # Attention modules that read their (query) head count from elsewhere (a shared config)
        # still report their own new head counts.
        for owner, counts in heads.items():
            if not any(hasattr(owner, a) for a in HEADS_ATTRS if a not in KV_HEADS_ATTRS):
                updates.append((owner, "num_heads", None, max(counts)))
                if len(counts) > 1 and not any(hasattr(owner, a) for a in KV_HEADS_ATTRS):
                    updates.append((owner, "num_key_value_heads", None, min(counts)))
        return updates

    # ------------------------------------------------------------------ module helpers
    def _pruner(self, node: Node) -> LayerPruner:
        if node.type == OpType.PARAMETER:
            return self._param_functions(node, node.pruning_dim)[0].pruner
        return node.pruner

    def _memoized(self, key: tuple, compute: Callable[..., Any], *args: Any) -> Any:
        """``compute(*args)``, kept under ``key`` within :meth:`_layers_fixed`."""
        memo = self._memo
        if memo is None:
            return compute(*args)
        if key in memo:
            return memo[key]
        value = memo[key] = compute(*args)
        return value

    def _coupled(self, node: Node) -> bool:
        if node.type == OpType.PARAMETER:
            return True
        return self._memoized((node, "coupled"), _coupled_layer, node)

    def channel_count(self, node: Node, side: Side, dim: int | None = None) -> int | None:
        return self._memoized((node, side, dim), self._count_channels, node, side, dim)

    def _count_channels(self, node: Node, side: Side, dim: int | None) -> int | None:
        if node.type == OpType.PARAMETER:
            dim = node.pruning_dim if node.pruning_dim is not None else dim
            return node.module.shape[dim] if dim is not None else None
        if node.type.is_virtual:
            return None
        pruner = node.pruner
        return pruner.out_channels(node.module) if side == "out" else pruner.in_channels(node.module)

    def _fn(self, node: Node, side: Side, dim: int | None = None) -> Callable:
        return self._memoized((node, side, dim, "fn"), self._pruning_function, node, side, dim)

    def _dw_mult(self, node: Node) -> int:
        """:func:`_depthwise_mult`, once per layer within :meth:`_layers_fixed`."""
        return self._memoized((node, "dw"), _depthwise_mult, node)

    def _pruning_function(self, node: Node, side: Side, dim: int | None) -> Callable:
        if node.type == OpType.PARAMETER:
            out_fn, in_fn = self._param_functions(
                node, node.pruning_dim if node.pruning_dim is not None else dim
            )
        elif node.type.is_virtual:
            return _virtual_function(node)
        else:
            out_fn, in_fn = get_pruning_functions(node.pruner)
            if self._dw_mult(node):
                out_fn, in_fn = prune_depthwise_conv_out_channels, prune_depthwise_conv_in_channels
        return out_fn if side == "out" else in_fn

    def _param_functions(self, node: Node, dim: int | None) -> tuple[PruningFunction, PruningFunction]:
        key = (id(node), dim)
        fns = self._param_fns.get(key)
        if fns is None:
            pruner = ParameterPruner(dim)
            fns = (
                ParameterPruningFunction(pruner, "out", "prune_parameter_out_channels"),
                ParameterPruningFunction(pruner, "in", "prune_parameter_in_channels"),
            )
            self._param_fns[key] = fns
        return fns

    def _channel_dim(self, node: Node, side: Side, shape: tuple[int, ...], param_dims: dict) -> int | None:
        nd = len(shape)
        t = node.type
        if t in (OpType.CONV, OpType.DEPTHWISE_CONV):
            return 1 if nd == len(node.module.kernel_size) + 2 else 0
        if t in (OpType.BN, OpType.GN, OpType.IN, OpType.PRELU):
            return 1 if nd >= 2 else 0
        if t == OpType.PARAMETER:
            dim = node.pruning_dim if node.pruning_dim is not None else param_dims.get(node)
            return dim % nd if dim is not None else None
        size = self.channel_count(node, side, param_dims.get(node))
        if t == OpType.LN and "channel_dims" in node.attrs:
            d = node.attrs["channel_dims"][side]
            return d if d < nd and shape[d] == size else None
        if t == OpType.LN and getattr(node.module, "data_format", None) == "channels_first" and nd > 1:
            return 1
        if t == OpType.CUSTOMIZED or (t == OpType.LN and size is not None and shape[-1] != size):
            # Unknown layout (or a channels-first LayerNorm that permutes inside): the dimension
            # with the channel count, preferring the channels-first and channels-last positions.
            for d in [1, nd - 1, *range(nd)]:
                if 0 <= d < nd and shape[d] == size:
                    return d
            return None
        return nd - 1

    def _module_map(
        self,
        node: Node,
        side: Side,
        edge: Edge,
        chans: list[int],
        roots: list[int],
        rec_side: Side,
        param_dims: dict,
    ) -> RootMap | None:
        """Channel map on one of a module's tensors for the recorded channels."""
        dim = self._channel_dim(node, side, edge.shape, param_dims)
        if dim is None:
            return None
        size = edge.shape[dim]
        mult = self._dw_mult(node)
        if mult and side == "out" and rec_side == "in":
            chans, roots = _expand_blocks(chans, roots, mult)
        n = self.channel_count(node, side, param_dims.get(node))
        if n is None or size == n:
            return im.channel_map(len(edge.shape), dim, size, chans, roots)
        if node.type == OpType.LSTM and side == "out" and size % n == 0:
            k = size // n
            return im.channel_map(
                len(edge.shape), dim, size, [c + j * n for j in range(k) for c in chans], roots * k
            )
        return None

    def _read_module(
        self,
        node: Node,
        side: Side,
        edge: Edge,
        m: RootMap,
        param_dims: dict,
        union: im.RootUnion | None = None,
    ) -> tuple[list[int], list[int]] | None:
        """Channels of a module implied by a map on one of its tensors."""
        if node.type == OpType.PARAMETER and node.pruning_dim is None and node not in param_dims:
            sq = im.squeeze_constant(m)
            dims = [d for d in range(sq.ndim) if sq.shape[d] != 1]
            if len(dims) != 1:
                raise Barrier(f"cannot tell which dimension of {node.name} holds the channels")
            param_dims[node] = dims[0]
        dim = self._channel_dim(node, side, edge.shape, param_dims)
        if dim is None:
            return None
        size = edge.shape[dim]
        n = self.channel_count(node, side) if node.type != OpType.PARAMETER else size
        if n is not None and size != n:
            if node.type == OpType.LSTM and side == "out" and size % n == 0:
                chans, roots = im.channels_at(m, dim, size)
                folded: dict[int, int] = {}
                for c, r in zip(chans, roots):
                    first = folded.setdefault(c % n, r)
                    if union is not None and first != r:
                        union.union(first, r)
                if len(chans) != len(folded) * (size // n):
                    raise Barrier(f"{node.name}: forward and backward directions pruned differently")
                return list(folded), list(folded.values())
            return None
        return im.channels_at(m, dim, size)

    def _depthwise_to_in(
        self,
        node: Node,
        side: Side,
        chans: list[int],
        roots: list[int],
        union: im.RootUnion | None = None,
    ) -> tuple[list[int], list[int], Side]:
        mult = node.module.out_channels // node.module.in_channels
        if side == "in" or mult == 1:
            return chans, roots, "in" if mult > 1 else "out"
        # An output channel of a depthwise convolution goes with its input channel, and so with
        # that input's whole block of outputs: the closure grows to whole blocks.
        blocks: dict[int, int] = {}
        for c, r in zip(chans, roots):
            first = blocks.setdefault(c // mult, r)
            if union is not None and first != r:
                union.union(first, r)
        return list(blocks), list(blocks.values()), "in"

    def _fully_covered(self, group: Group) -> set[tuple[int, str]]:
        full = set()
        for item in group:
            node = item.dep.target
            side = _side_of(item.dep.handler)
            pruner = getattr(item.dep.handler, "pruner", None)
            n = self.channel_count(node, side, pruner.dim if isinstance(pruner, ParameterPruner) else None)
            if n is not None and len(item.idxs) >= n:
                full.add(_item_key(item))
                if self._coupled(node) and node.type != OpType.PARAMETER:
                    full.add((id(node), "in" if side == "out" else "out"))
        return full

    def _ordered_module_nodes(self) -> list[Node]:
        nodes = [n for n in self.nodes if n.is_module]
        return sorted(nodes, key=lambda n: self._order.get(n.module, len(self._order)))


_BLOCK_NUMBER = re.compile(r"\.\d+(?=\.|$)")


def _block_pattern(name: str) -> str:
    """A layer name with its block numbers blanked: ``layers.3.attn.q`` -> ``layers.#.attn.q``."""
    return _BLOCK_NUMBER.sub(".#", name)


def _param_dim(fn: Callable) -> int | None:
    pruner = getattr(fn, "pruner", None)
    return pruner.dim if isinstance(pruner, ParameterPruner) else None


def _through(rule: Callable, node: Node, i: int, m: RootMap) -> list[tuple[str, int, RootMap]]:
    """Apply a propagation rule; a barrier names the op and the module that ran it."""
    try:
        return rule(node, i, m)
    except Barrier as b:
        where = f" in {node.owner_name}" if node.owner_name else ""
        raise type(b)(f"{b} (at {node.attrs.get('op', node.type.name)}{where})") from None


def _edges_at(node: Node, kind: str, i: int) -> list[Edge]:
    """The node's input edge at position ``i`` or its output edges with output number ``i``."""
    if kind == "in":
        e = node.in_edges[i]
        return [e] if e is not None else []
    return [e for e in node.out_edges if e.src_pos == i]


def _cover_key(node: Node, side: Side, dim: int | None = None) -> tuple[int, str]:
    """Identity of a prunable channel set: a module side, or a bare parameter's dimension."""
    if node.type == OpType.PARAMETER:
        return (id(node), f"dim{dim}")
    return (id(node), side)


def _item_key(item: GroupItem) -> tuple[int, str]:
    pruner = getattr(item.dep.handler, "pruner", None)
    dim = pruner.dim % item.dep.target.module.dim() if isinstance(pruner, ParameterPruner) else None
    return _cover_key(item.dep.target, _side_of(item.dep.handler), dim)


def _root_key(g: Group) -> tuple[int, str]:
    return _item_key(g.root)


def _side_of(fn: Callable) -> Side:
    return getattr(fn, "side", "out")


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", repr(fn))


HEADS_ATTRS = (
    "num_heads",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "heads",
    "num_attn_heads",
)
KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head", "d_k", "kv_head_dim")
SIZE_ATTRS = (
    "all_head_size",
    "embed_dim",
    "hidden_size",
    "inner_dim",
    "nf",
    "split_size",
    "d_model",
    "attention_dim",
    "kv_dim",
    "q_dim",
    "proj_size",
)


#: Attribute through which modules hold a shared object whose sizes a prune may update.
SHARED_HOLDER_ATTR = "config"


def _size_objects(owner: nn.Module) -> list[Any]:
    """The module and the plain object it holds as ``config`` (sizes are read from either)."""
    shared = getattr(owner, SHARED_HOLDER_ATTR, None)
    if shared is None or isinstance(shared, (nn.Module, torch.Tensor)):
        return [owner]
    return [owner, shared]


def _int_attr(obj: Any, attr: str) -> int | None:
    value = getattr(obj, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _has_update(updates: list, obj: Any, attr: str, new: Any, old: Any = None) -> bool:
    return any(u is obj and a == attr and n == new and (old is None or o == old) for u, a, o, n in updates)


def _size_attributes(
    owner: nn.Module, old: int, new: int, known: list[tuple[Any, str, Any, Any]]
) -> list[tuple[Any, str, int, int]] | None:
    """``(object, attribute, value, new value)`` explaining a slice size going from ``old`` to
    ``new``: head counts ``v`` of the owner or its config with ``old = v * head size`` and
    ``new = v' * head size`` (the head size after ``known`` updates), else sizes equal to ``old``.
    Every attribute that fits is returned (with equal query and key/value head counts several
    do); None when none does."""
    objects = _size_objects(owner)
    units: set[tuple[int, int]] = set()
    for obj in objects:
        for attr in HEAD_DIM_ATTRS:
            u = _int_attr(obj, attr)
            if u is not None:
                changed = [n for o, a, _v, n in known if o is obj and a == attr and isinstance(n, int)]
                units.add((u, changed[-1] if changed else u))
    found = []
    for obj in objects:
        for attr in HEADS_ATTRS:
            v = _int_attr(obj, attr)
            for u, u_new in units:
                if v is not None and v * u == old and u_new > 0 and new % u_new == 0:
                    found.append((obj, attr, v, new // u_new))
                    break
    if not found:
        found = [
            (obj, attr, old, new) for obj in objects for attr in SIZE_ATTRS if _int_attr(obj, attr) == old
        ]
    return found or None


def _conflicting_update(updates: list[tuple[Any, str, Any, Any]]) -> str | None:
    """Why ``updates`` cannot all be applied: one attribute would get two different values."""
    values: dict[tuple[int, str], tuple[Any, str, Any]] = {}
    for obj, attr, _old, new in updates:
        if attr.startswith("<"):
            continue
        seen = values.setdefault((id(obj), attr), (obj, attr, new))
        if seen[2] != new:
            return (
                f"{type(obj).__name__}.{attr} would have to be both {seen[2]} and {new} "
                "(parts of it are pruned differently); prune them equally"
            )
    return None


def _param_dims(node: Node, side: Side) -> list[tuple[nn.Parameter, int]]:
    """(parameter, dimension) pairs a module side prunes, when a channel is a slice along one
    dimension (read from the pruner's parameter views)."""
    try:
        views = node.pruner.param_views(node.module, side)
    except (ValueError, NotImplementedError, AttributeError):
        return []
    out = []
    for name, view in views:
        p = node.module if name == "" else node.module.get_parameter(name)
        if p.dim() == 0:
            continue
        index = torch.arange(p.numel()).view(p.shape)
        flat = view(index)
        for d in range(p.dim()):
            coord = (flat // index.stride(d)) % p.shape[d]
            if flat.shape[0] == p.shape[d] and bool((coord == torch.arange(p.shape[d])[:, None]).all()):
                out.append((p, d))
                break
    return out


def _head_split_shape(node: Node) -> bool:
    """Whether a reshape splits the last dimension into (heads, head size), possibly after
    leading factors such as the 3 of a fused (q, k, v, heads, head size) projection."""
    src, out = node.attrs["in_shapes"][0], node.attrs["out_shapes"][0]
    if src is None or len(out) < len(src) + 1:
        return False
    lead = len(src) - 1
    return (
        out[-2] > 1
        and out[-1] > 1
        and math.prod(out[lead:]) == src[-1]
        and tuple(src[:-1]) == tuple(out[:lead])
    )


def _pruned_shape(shape: tuple[int, ...], m: RootMap) -> tuple[int, ...]:
    """Shape of a tensor after the elements marked in ``m`` are removed."""
    if m.runs is not None:
        d = m.dim
        if m.shape[d] != shape[d] or shape[d] <= 1:
            return tuple(shape)
        out = list(shape)
        out[d] -= sum(e - s for s, e, _b, _st in m.runs)
        return tuple(out)
    t = m.t
    dims = [d for d in range(t.dim()) if t.shape[d] == shape[d] and shape[d] > 1]
    if not dims:
        return tuple(shape)
    out = list(shape)
    kept = t < 0
    for d in dims:
        others = tuple(k for k in range(t.dim()) if k != d and t.shape[k] > 1)
        out[d] = int((kept.any(dim=others) if others else kept).sum())
    return tuple(out)


def _coupled_layer(node: Node) -> bool:
    return bool(node.pruner.coupled(node.module))


def _depthwise_mult(node: Node) -> int:
    """Output channels per input channel of a depthwise convolution (0 if it is not one now:
    pruning a depthwise convolution down to one channel leaves an ordinary convolution)."""
    m = node.module
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels:
        return m.out_channels // m.in_channels
    return 0


def _expand_blocks(chans: list[int], roots: list[int], mult: int) -> tuple[list[int], list[int]]:
    if mult == 1:
        return chans, roots
    return [c * mult + j for c in chans for j in range(mult)], [r for r in roots for _ in range(mult)]


class _VirtualFunction:
    """Name-only pruning function of a virtual op (it owns no parameters)."""

    side = "out"

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __call__(self, module: Any, idxs: Sequence[int]) -> Any:
        return module

    def __repr__(self) -> str:
        return self.__name__


_VIRTUAL: dict[OpType, _VirtualFunction] = {}


def _virtual_function(node: Node) -> _VirtualFunction:
    fn = _VIRTUAL.get(node.type)
    if fn is None:
        fn = _VIRTUAL[node.type] = _VirtualFunction(f"prune_{node.type.name.lower()}")
    return fn


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


__all__ = ["DependencyGraph", "PruningError"]
