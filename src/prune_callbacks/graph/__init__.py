"""The graph core: from a model to the groups of channels that must be pruned together.

Flow:

1. :mod:`.tracing` runs the model once (on meta tensors where it can) and records a
   :class:`~.node.Node` per prunable module, bare parameter and autograd op, and an
   :class:`~.node.Edge` per tensor with its shape (:func:`trace_model`). :mod:`.ops` is the op
   vocabulary (:class:`OpType`).
2. :class:`DependencyGraph` (:mod:`.dependency_graph`, the facade) keeps the trace and links nodes
   by :class:`Dependency` objects. Per-layer facts (channel counts, coupling, pruning
   functions) come from :mod:`.facts`.
3. A set of channels of one layer becomes a :class:`Group` by a closure search
   (:mod:`.closure`): channel sets travel over tensors as :class:`RootMap` index maps
   (:mod:`.index_mapping`), through ops by the per-op rules of :mod:`.propagation` /
   :mod:`.rules`, and into layers; an op whose mapping cannot be proven raises :class:`Barrier`.
4. :mod:`.groups` enumerates every coupled channel set once (for scoring), copying groups of
   repeated blocks (:mod:`.repeats`) instead of searching again.
5. Before a prune, :mod:`.attributes` works out the size attributes (head counts, split sizes)
   that must follow and :mod:`.checks` says whether the result is a valid model; :mod:`.apply`
   prunes atomically (:class:`PruningError` after restoring the model) and :mod:`.verify` runs
   the pruned model on its example inputs (:class:`VerificationError`: restored too); then the
   recorded shapes are updated and the history record written.

The graph core imports torch and :mod:`prune_callbacks.layers` only.
"""

from .closure import OutputBarrier
from .dependency import (
    AttributeUpdate,
    Dependency,
    Group,
    GroupGraph,
    GroupItem,
    PruningError,
    VerificationError,
    snapshot,
)
from .dependency_graph import DEFAULT_ROOT_TYPES, DependencyGraph, gc_paused
from .index_mapping import Barrier, RootMap
from .node import Edge, Node
from .ops import OpType
from .tracing import MultipleInputs, trace_model
from .verify import ForwardCheck

__all__ = [
    "DEFAULT_ROOT_TYPES",
    "AttributeUpdate",
    "Barrier",
    "Dependency",
    "DependencyGraph",
    "Edge",
    "ForwardCheck",
    "Group",
    "GroupGraph",
    "GroupItem",
    "MultipleInputs",
    "Node",
    "OpType",
    "OutputBarrier",
    "PruningError",
    "RootMap",
    "VerificationError",
    "gc_paused",
    "snapshot",
    "trace_model",
]
