"""Keep an optimizer's per-parameter state in step with a structural prune.

Pruning keeps every ``nn.Parameter`` object and only swaps its data for a slice, so the optimizer
still holds the right parameters; what goes stale is the state stored per parameter (SGD momentum,
Adam's ``exp_avg`` / ``exp_avg_sq``, RMSprop's ``square_avg``...), which still has the old shape.
:func:`prune_optimizer_state` slices that state with exactly the function that sliced the parameter
(the ``param_updates`` log of :func:`prune_callbacks.track_parameter_updates`), so the kept channels
keep their momentum and training continues as if the pruned channels had never existed. The
optimizer object, its param groups and any LR scheduler attached to it stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer

__all__ = ["ParamUpdate", "check_optimizer_state", "prune_optimizer_state"]

ParamUpdate = tuple[nn.Parameter, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]


def _as_list(optimizers: Optimizer | Iterable[Optimizer]) -> list[Optimizer]:
    """Accept one optimizer or several; unwrap Lightning's ``LightningOptimizer``."""
    if isinstance(optimizers, Optimizer) or hasattr(optimizers, "state"):
        optimizers = [optimizers]  # type: ignore[list-item]
    return [getattr(opt, "_optimizer", opt) for opt in optimizers]  # type: ignore[union-attr]


def _is_scalar(value: torch.Tensor) -> bool:
    """A step counter or other per-parameter scalar, which pruning leaves alone."""
    return value.dim() == 0


def check_optimizer_state(
    optimizers: Optimizer | Iterable[Optimizer], params: Iterable[torch.Tensor] | None = None
) -> None:
    """Raise ``ValueError`` if some state tensor could not follow a prune.

    Only scalars and tensors shaped exactly like their parameter can be sliced with the
    parameter's own pruning function. Factored state (Adafactor's row/column statistics) or state
    kept in another layout would silently go stale, so it is refused here, before anything is
    pruned. ``params`` restricts the check to those parameters (default: all of them).
    """
    wanted = None if params is None else {id(p) for p in params}
    for opt in _as_list(optimizers):
        names = _param_names(opt)
        for param, state in opt.state.items():
            if not isinstance(param, torch.Tensor) or (wanted is not None and id(param) not in wanted):
                continue
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or _is_scalar(value):
                    continue
                if tuple(value.shape) != tuple(param.shape):
                    name = names.get(id(param), f"a parameter of shape {tuple(param.shape)}")
                    raise ValueError(
                        f"{type(opt).__name__} keeps state {key!r} of shape {tuple(value.shape)} for {name} "
                        f"(shape {tuple(param.shape)}); only state shaped like its parameter can be pruned "
                        "with it. Use an optimizer with elementwise state (SGD, Adam, AdamW, RMSprop, "
                        "Adagrad...) or prune before the first optimizer step."
                    )


def _param_names(opt: Optimizer) -> dict[int, str]:
    """``"param_groups[g][i]"`` labels for error messages (optimizers do not know module names)."""
    return {
        id(p): f"param_groups[{g}]['params'][{i}]"
        for g, group in enumerate(opt.param_groups)
        for i, p in enumerate(group["params"])
    }


def prune_optimizer_state(
    optimizers: Optimizer | Iterable[Optimizer], param_updates: Sequence[ParamUpdate]
) -> int:
    """Slice every optimizer state tensor the way its parameter was sliced; return how many changed.

    ``param_updates`` is the ordered log of ``(param, old_shape, fn)`` recorded while pruning. For
    each entry, in order, every state tensor of ``param`` whose shape equals ``old_shape`` is
    replaced by ``fn(tensor)``; scalar entries (``step``) and non-tensor entries are untouched. A
    parameter pruned on two sides has two entries, applied one after the other, as on the
    parameter itself. State that lives on another device than the parameter (offloaded state) is
    sliced on the parameter's device and moved back.
    """
    opts = _as_list(optimizers)
    changed = 0
    for param, old_shape, fn in param_updates:
        old_shape = tuple(old_shape)
        for opt in opts:
            state: dict[str, Any] | None = opt.state.get(param)
            if not state:
                continue
            for key, value in list(state.items()):
                if (
                    not isinstance(value, torch.Tensor)
                    or _is_scalar(value)
                    or tuple(value.shape) != old_shape
                ):
                    continue
                if value.device != param.device:
                    state[key] = fn(value.to(param.device)).to(value.device)
                else:
                    state[key] = fn(value)
                changed += 1
    return changed
