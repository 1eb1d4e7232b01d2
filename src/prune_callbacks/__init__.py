"""prune_callbacks: structural channel pruning for PyTorch, driven by a dependency graph.

Flow: model -> :mod:`.tracing` -> :class:`DependencyGraph` (nodes, dependencies) -> full-index
:class:`Group` s -> importance scores -> subset groups -> atomic prune -> history record.
"""

from .graph.dependency import Dependency, Group, GroupItem, PruningError
from .measure.flops import count_macs_and_params, count_params, measure_latency
from .graph.dependency_graph import DependencyGraph
from .pruning.history import apply_pruning_history, get_pruning_history, load_pruned, save_pruned
from .pruning.importance import (
    BNScaleImportance,
    FisherImportance,
    GradientImportance,
    Importance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    get_importance,
)
from .graph.index_mapping import Barrier
from .graph.node import Edge, Node
from .graph.ops import OpType, module2type
from .pruning.optim_state import prune_optimizer_state
from .pruning.pruner import Pruner
from .layers import *  # noqa: F403 - the low-level pruning functions are public API
from .layers import __all__ as _pf_all

__all__ = [
    "BNScaleImportance",
    "FisherImportance",
    "GradientImportance",
    "Importance",
    "MagnitudeImportance",
    "Pruner",
    "RandomImportance",
    "StructuredPruning",  # noqa: F405 - resolved lazily by __getattr__
    "TaylorImportance",
    "apply_pruning_history",
    "count_macs_and_params",
    "count_params",
    "get_importance",
    "get_pruning_history",
    "load_pruned",
    "measure_latency",
    "prune_optimizer_state",
    "pruned_from_checkpoint",  # noqa: F405 - resolved lazily by __getattr__
    "save_pruned",
    "Barrier",
    "Dependency",
    "DependencyGraph",
    "Edge",
    "Group",
    "GroupItem",
    "Node",
    "OpType",
    "PruningError",
    "module2type",
    *_pf_all,
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """The Lightning callback is imported on first use, so the graph core and the Pruner work
    (and import quickly) without Lightning."""
    if name in ("StructuredPruning", "pruned_from_checkpoint"):
        from .integrations.lightning import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'prune_callbacks' has no attribute {name!r}")
