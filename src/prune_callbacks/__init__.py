"""prune_callbacks: structural channel pruning for PyTorch, driven by a dependency graph.

Flow (each arrow owned by one subpackage, see ``docs/architecture.md``)::

    model -> trace -> graph -> full-index groups          (graph/, with layers/ for each layer family)
          -> scores -> subset groups -> atomic prune      (pruning/: importance, selection, Pruner)
          -> history -> optimizer / DDP / logger updates  (pruning/history, integrations/lightning/)

This module holds what a user needs; everything else stays importable from its subpackage
(:mod:`prune_callbacks.graph` for ``Node``, ``Edge``, ``OpType``...; :mod:`prune_callbacks.layers` for
every layer pruner and ``prune_*`` function).
"""

from .graph import DependencyGraph, Group, MultipleInputs, PruningError, VerificationError
from .graph.attributes import register_size_attributes
from .layers import LayerPruner, prune_conv_out_channels, prune_linear_out_channels, track_parameter_updates
from .measure.export import check_onnx, export_onnx, onnxruntime_latency
from .measure.flops import count_macs_and_params, count_params, measure_latency
from .pruning.calibration import FLAPImportance, WandaImportance, add_biases, add_new_biases_to_optimizers
from .pruning.history import apply_pruning_history, get_pruning_history, load_pruned, save_pruned
from .pruning.importance import (
    BNScaleImportance,
    FisherImportance,
    GradientImportance,
    Importance,
    MagnitudeImportance,
    OBDImportance,
    RandomImportance,
    TaylorImportance,
    get_importance,
)
from .pruning.optim_state import prune_optimizer_state
from .pruning.plan import PruningPlan, apply_plan, make_plan, meta_skeleton
from .pruning.pruner import Pruner
from .pruning.sensitivity import Allocation, SensitivityResult, allocate, sensitivity_scan
from .pruning.settings import PruningSettings, SettingsError
from .pruning.sparsity import (
    BNScaleRegularizer,
    GroupLassoRegularizer,
    GroupRegularizer,
    GrowingRegularizer,
    SparsityReport,
    get_regularizer,
)

__all__ = [
    # pruning: the Pruner, its settings and the criteria
    "Pruner",
    "PruningSettings",
    "SettingsError",
    "Importance",
    "GradientImportance",
    "TaylorImportance",
    "FisherImportance",
    "OBDImportance",
    "MagnitudeImportance",
    "BNScaleImportance",
    "RandomImportance",
    "WandaImportance",
    "FLAPImportance",
    "add_biases",
    "add_new_biases_to_optimizers",
    "get_importance",
    # sparse training before the cut
    "GroupRegularizer",
    "GroupLassoRegularizer",
    "BNScaleRegularizer",
    "GrowingRegularizer",
    "SparsityReport",
    "get_regularizer",
    # which groups can lose how much: sensitivity scan and per-group ratio allocation
    "sensitivity_scan",
    "allocate",
    "SensitivityResult",
    "Allocation",
    # Lightning (imported on first use)
    "StructuredPruning",
    "SparseTraining",
    "PrunedCheckpoints",
    "pruned_from_checkpoint",
    # Hugging Face (imported on first use; needs the [hf] extra)
    "StructuredPruningCallback",
    # the dependency graph
    "DependencyGraph",
    "Group",
    "PruningError",
    "VerificationError",
    "MultipleInputs",
    "register_size_attributes",
    "LayerPruner",
    "prune_conv_out_channels",
    "prune_linear_out_channels",
    # history, files, optimizer state
    "save_pruned",
    "load_pruned",
    "get_pruning_history",
    "apply_pruning_history",
    # big models: plan on a meta copy, apply in place
    "make_plan",
    "apply_plan",
    "PruningPlan",
    "meta_skeleton",
    "prune_optimizer_state",
    "track_parameter_updates",
    # cost
    "count_macs_and_params",
    "count_params",
    "measure_latency",
    # deployment (onnx / onnxruntime imported on first use; the [onnx] extra)
    "export_onnx",
    "check_onnx",
    "onnxruntime_latency",
]
__version__ = "0.1.0"

_LAZY = ("StructuredPruning", "pruned_from_checkpoint", "PrunedCheckpoints", "SparseTraining")
_LAZY_HF = ("StructuredPruningCallback",)


def __getattr__(name: str) -> object:
    """The Lightning callback is imported on first use, so the graph core and the Pruner work
    (and import quickly) without Lightning."""
    if name in _LAZY:
        from .integrations import lightning

        return getattr(lightning, name)
    if name in _LAZY_HF:
        from .integrations.hf import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'prune_callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_HF))
