"""prune_callbacks: structural channel pruning for PyTorch, driven by a dependency graph.

Flow: model -> :mod:`.tracing` -> :class:`DependencyGraph` (nodes, dependencies) -> full-index
:class:`Group` s -> importance scores -> subset groups -> atomic prune -> history record.
"""

from .dependency import Dependency, Group, GroupItem, PruningError
from .graph import DependencyGraph
from .index_mapping import Barrier
from .node import Edge, Node
from .ops import OpType, module2type
from .pruning_functions import *  # noqa: F403 - the low-level pruning functions are public API
from .pruning_functions import __all__ as _pf_all

__all__ = [
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
