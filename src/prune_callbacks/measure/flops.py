"""Cost measurements of a model: MACs, parameter count and CPU latency.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the FLOPs of the aten
operators actually dispatched, so a pruned model is measured as it really runs (no per-layer table to
keep in sync with the model code). Every measurement runs in eval mode under ``torch.no_grad()`` and
puts each submodule back into the train/eval mode it had before.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..graph.tracing import call_model

__all__ = ["call_model", "count_macs_and_params", "count_params", "measure_latency"]

ForwardFn = Callable[[nn.Module, Any], Any]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements; shared (tied) parameters are counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode without autograd, then restore each submodule's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def count_macs_and_params(
    model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None
) -> tuple[int, int]:
    """MACs of one forward pass on ``example_inputs`` and the number of parameters.

    MACs are the FLOPs counted by ``FlopCounterMode`` divided by two. Scaled dot-product attention is
    forced onto its math backend while counting, so its matrix products are counted on every device
    (the fused CPU kernel has no FLOP formula). ``forward_fn(model, example_inputs)`` replaces the
    default :func:`call_model` dispatch. Works on the meta device, which makes counting large models
    cheap.
    """
    run = forward_fn if forward_fn is not None else call_model
    counter = FlopCounterMode(display=False)
    with _eval_no_grad(model), sdpa_kernel(SDPBackend.MATH), counter:
        run(model, example_inputs)
    return int(counter.get_total_flops()) // 2, count_params(model)


def _synchronize(example_inputs: Any) -> None:
    """Wait for queued CUDA work when the inputs live on a GPU, so timings are honest."""
    tensors: list[torch.Tensor] = []
    if isinstance(example_inputs, torch.Tensor):
        tensors = [example_inputs]
    elif isinstance(example_inputs, Mapping):
        tensors = [v for v in example_inputs.values() if isinstance(v, torch.Tensor)]
    elif isinstance(example_inputs, (tuple, list)):
        tensors = [v for v in example_inputs if isinstance(v, torch.Tensor)]
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    warmup: int = 3,
    repeats: int = 20,
    forward_fn: ForwardFn | None = None,
) -> float:
    """Median wall-clock seconds of one forward pass (no_grad, eval mode, modes restored).

    The model runs where it lives (meant for CPU); CUDA work is synchronised before reading the clock.
    The median is robust to the occasional scheduler hiccup that would skew a mean.
    """
    run = forward_fn if forward_fn is not None else call_model
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    times: list[float] = []
    with _eval_no_grad(model):
        for _ in range(warmup):
            run(model, example_inputs)
        _synchronize(example_inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            run(model, example_inputs)
            _synchronize(example_inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
