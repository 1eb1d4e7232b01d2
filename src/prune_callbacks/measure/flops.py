"""Cost measurements of a model: MACs, parameter count and CPU latency.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the FLOPs of the aten
operators actually dispatched, so a pruned model is measured as it really runs (no per-layer table to
keep in sync with the model code). Every measurement runs in eval mode under ``torch.no_grad()`` and
puts each submodule back into the train/eval mode it had before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.benchmark import Measurement, Timer
from torch.utils.flop_counter import FlopCounterMode

from ..graph.tracing import call_model, eager_compiled_code, eval_mode, input_list

__all__ = [
    "call_model",
    "count_macs_and_params",
    "count_module_macs",
    "count_params",
    "counting",
    "eval_no_grad",
    "frozen_parameters",
    "measure_latency",
]

ForwardFn = Callable[[nn.Module, Any], Any]

#: Untimed calls ``Timer.timeit`` makes before each timed run.
_TIMER_WARMUP = 2


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
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode without autograd, then restore each submodule's own mode.

    Every measurement runs inside it, so measuring never changes a model that is being trained.
    """
    with eval_mode(model), torch.no_grad():
        yield


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters of ``model`` with ``requires_grad=False`` inside, each put back after (on any
    exception too). FLOP counting needs it: a view of a parameter made under ``no_grad``
    (``self.cls_token.expand(B, -1, -1)``) still says ``requires_grad`` but has no ``grad_fn``, and
    when it is passed to a submodule, the module tracker of ``FlopCounterMode`` fails on it
    ("Expected gradient function to be set")."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def counting(model: nn.Module) -> Iterator[FlopCounterMode]:
    """A ``FlopCounterMode`` over the body, with ``model`` as every count sees it: eval mode, no
    autograd, :func:`frozen_parameters`, SDPA on its math backend (the fused CPU kernel has no
    FLOP formula) and compiled code run eagerly."""
    counter = FlopCounterMode(display=False)
    math_sdpa = sdpa_kernel(SDPBackend.MATH)
    with eval_no_grad(model), frozen_parameters(model), math_sdpa, eager_compiled_code(), counter:
        yield counter


def count_macs_and_params(
    model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None
) -> tuple[int, int]:
    """MACs of one forward pass on ``example_inputs`` and the number of parameters.

    MACs are the FLOPs counted by ``FlopCounterMode`` divided by two. Scaled dot-product attention is
    forced onto its math backend while counting, so its matrix products are counted on every device
    (the fused CPU kernel has no FLOP formula). ``forward_fn(model, example_inputs)`` replaces the
    default :func:`call_model` dispatch. Works on the meta device, which makes counting large models
    cheap. Of :class:`~prune_callbacks.graph.tracing.MultipleInputs`, the first is counted.
    """
    example_inputs = input_list(example_inputs)[0]
    run = forward_fn if forward_fn is not None else call_model
    with counting(model) as counter:
        run(model, example_inputs)
    return int(counter.get_total_flops()) // 2, count_params(model)


def count_module_macs(
    model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None
) -> tuple[int, dict[str, int]]:
    """MACs of one forward pass, in total and per submodule (``{name in named_modules(): MACs}``,
    the root as ``""``; a module's MACs include those of its submodules; modules without MACs are
    left out). Counted as :func:`count_macs_and_params` counts."""
    example_inputs = input_list(example_inputs)[0]
    run = forward_fn if forward_fn is not None else call_model
    with counting(model) as counter:
        run(model, example_inputs)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    per: dict[str, int] = {}
    for name, _module in model.named_modules():
        key = f"{prefix}.{name}" if name else prefix
        if key in counts:
            per[name] = int(sum(counts[key].values())) // 2
    return int(counter.get_total_flops()) // 2, per


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    warmup: int = 3,
    repeats: int = 20,
    forward_fn: ForwardFn | None = None,
) -> float:
    """Median wall-clock seconds of one forward pass (no_grad, eval mode, modes restored).

    ``warmup`` untimed calls first, then ``repeats`` calls timed one by one with
    :class:`torch.utils.benchmark.Timer`, which synchronises an accelerator before reading the
    clock and makes two untimed calls before each timed one (those before the first timed call
    count towards ``warmup``). The model runs where it lives (meant for CPU), with torch's current
    number of threads. The median is robust to the occasional scheduler hiccup that would skew a
    mean. Of :class:`~prune_callbacks.graph.tracing.MultipleInputs`, the first is timed.
    """
    example_inputs = input_list(example_inputs)[0]
    run = forward_fn if forward_fn is not None else call_model
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    timer = Timer(
        stmt="run(model, example_inputs)",
        globals={"run": run, "model": model, "example_inputs": example_inputs},
        num_threads=torch.get_num_threads(),
    )
    with eval_no_grad(model):
        for _ in range(warmup - _TIMER_WARMUP):
            run(model, example_inputs)
        (merged,) = Measurement.merge(timer.timeit(number=1) for _ in range(repeats))
    return merged.median
