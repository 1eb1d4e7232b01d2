"""Multi-process pieces of the pruning callback: supported strategies, rank 0's scores, the DDP rebuild.

Structural pruning changes parameter shapes, so every process must hold every parameter whole (single
device or DDP; sharded strategies are refused), all ranks must remove exactly the same channels
(:class:`RankZeroScores`), and the ``DistributedDataParallel`` wrapper, whose reducer is built for the
old shapes, must be dropped before a prune (:func:`release_ddp_wrapper`) and rebuilt after it.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "RankZeroScores",
    "check_ranks_agree",
    "check_strategy",
    "rebuild_ddp_wrapper",
    "release_ddp_wrapper",
    "requires_gradients",
    "world_size",
]

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy", "XLAFSDPStrategy")


def world_size() -> int:
    """Number of processes of the default process group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def requires_gradients(importance: Any) -> bool:
    """Whether a criterion needs gradient statistics (``requires_gradients``; ``requires_grad`` for
    criteria written against older versions)."""
    return bool(getattr(importance, "requires_gradients", getattr(importance, "requires_grad", False)))


class RankZeroScores:
    """Importance wrapper for multi-process training: every rank uses rank 0's scores.

    Ranks see the same averaged gradients, but float reductions, unseeded random criteria or a
    user criterion could still differ by a hair and make ranks remove different channels, which
    would break DDP. Broadcasting the scores (one small collective per pruning step) rules it out.
    Everything else (accumulation, reset) is delegated to the wrapped criterion.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def requires_gradients(self) -> bool:
        """The wrapped criterion's need for gradients."""
        return requires_gradients(self.inner)

    def reset(self) -> None:
        """Reset the wrapped criterion (when it has statistics)."""
        reset = getattr(self.inner, "reset", None)
        if callable(reset):
            reset()

    def score_groups(self, groups: Sequence[Any]) -> list[torch.Tensor | None]:
        """Rank 0's scores of ``groups`` (every rank computes its own, then takes rank 0's)."""
        score = getattr(self.inner, "score_groups", None)
        scores = score(groups) if callable(score) else [self.inner(g) for g in groups]
        return _broadcast_scores(scores)

    def __call__(self, group: Any) -> torch.Tensor | None:
        return _broadcast_scores([self.inner(group)])[0]


def _broadcast_scores(scores: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    payload = [[None if s is None else s.detach().float().cpu() for s in scores]]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def check_strategy(strategy: Any) -> None:
    """Refuse strategies that do not keep a full copy of every parameter on each process, and DDP
    in processes started by Lightning from the running one (``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``).

    Those hand the result back at the end of ``fit``: rank 0's weights are loaded into the module
    of the process that called ``fit``, which never saw the prunes, so the smaller tensors do not
    fit it (and the history, which lives on the module object, stays in the worker). The check
    runs in ``setup``, in the workers, before any training.
    """
    name = type(strategy).__name__
    sharded = any(cls.__name__ in _SHARDED for cls in type(strategy).__mro__)
    if sharded or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"StructuredPruning does not support the {name} strategy: structural pruning needs every "
            "parameter whole on each process. Supported: single device (strategy='auto') and DDP "
            "(strategy='ddp' or 'ddp_find_unused_parameters_true'); prune with one of them and "
            "fine-tune with the sharded strategy afterwards"
        )
    start_method = getattr(strategy, "_start_method", "popen")  # DDPStrategy(start_method=...)
    if isinstance(strategy, DDPStrategy) and start_method != "popen":
        raise ValueError(
            f"StructuredPruning does not support DDP with start_method={start_method!r} (strategy="
            "'ddp_spawn', 'ddp_fork' or 'ddp_notebook'): at the end of fit Lightning copies the pruned "
            "weights back into the unpruned module of the process that called fit, and they do not "
            "fit it. Use strategy='ddp' (Lightning launches the script once per device; on a "
            "cluster, torchrun or SLURM)"
        )


def release_ddp_wrapper(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Drop the DDP wrapper before pruning; True when there was one (then call
    :func:`rebuild_ddp_wrapper` after the prune).

    Its reducer holds each parameter's gradient accumulator, built for the old shape; a new
    wrapper would reuse those while the old one lives, so the old one must be gone first. The
    strategy's public ``model`` setter is how Lightning itself swaps the wrapped model.
    """
    strategy = trainer.strategy
    wrapper = strategy.model
    if not isinstance(wrapper, DistributedDataParallel):
        return False
    ref = weakref.ref(wrapper)
    strategy.model = pl_module
    del wrapper
    gc.collect()
    if ref() is not None:
        raise RuntimeError(
            "StructuredPruning: the DistributedDataParallel wrapper is still referenced somewhere "
            "after the strategy released it, so it cannot be rebuilt for the pruned shapes; do not "
            "keep references to trainer.model / trainer.strategy.model"
        )
    return True


def rebuild_ddp_wrapper(trainer: pl.Trainer) -> None:
    """Wrap the (pruned) module in a new ``DistributedDataParallel`` for its current shapes."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy.configure_ddp()


def check_ranks_agree(pl_module: nn.Module) -> None:
    """Raise when the ranks ended a pruning step with different parameter shapes (one collective)."""
    shapes = [tuple(p.shape) for p in pl_module.parameters()]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, shapes)
    if any(g != shapes for g in gathered):
        raise RuntimeError("StructuredPruning: ranks ended a pruning step with different parameter shapes")
