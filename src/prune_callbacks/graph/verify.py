"""The verifying forward: after a prune, does the model still run on its example inputs?

The graph sees what autograd records. Sizes that live elsewhere (an int attribute passed to a
reshape, an ``assert`` on a width, a literal channel count, a fixed buffer) are invisible to it,
and a prune that changes them would hand back a model that fails on its very next forward. So
every prune ends with :meth:`ForwardCheck.problem`: the model runs once on the example inputs and
its outputs must keep their shapes. It runs on the meta device when the trace could (no
arithmetic, no activation memory: the cost is the Python of one forward pass), else on real
values without autograd. The model's own tensors, buffers and random state are not touched.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .tracing import output_shapes

#: Longest error text quoted in a problem.
_MAX_MESSAGE = 300


#: Frames in these directories are library code, not the user's model.
_LIBRARY_DIRS = (
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
)


def where(error: BaseException) -> str:
    """`` at file:line (`code`)`` of the innermost frame of ``error``'s traceback that is not
    torch's or this library's: the line of the model that failed; empty when there is none."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not os.path.abspath(frame.filename).startswith(_LIBRARY_DIRS):
            code = f" (`{frame.line.strip()}`)" if frame.line else ""
            return f" at {os.path.basename(frame.filename)}:{frame.lineno}{code}"
    return ""


class ForwardCheck:
    """Runs a model on its example inputs and compares the output shapes with the dense ones.

    Fields: ``model``, ``example_inputs``, ``forward_fn``, ``output_transform``, ``meta``
    (whether it runs on meta tensors), ``eval_mode`` (whether it runs the model in eval mode, as
    the trace had to), ``expected`` (output shapes per example input, as traced),
    and ``runs`` / ``seconds`` (how many checks ran and how long they took in all: the cost of
    verification, for benchmarks).
    """

    __slots__ = (
        "eval_mode",
        "example_inputs",
        "expected",
        "forward_fn",
        "meta",
        "model",
        "output_transform",
        "runs",
        "seconds",
    )

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        expected: list[list[tuple[int, ...]]],
        meta: bool,
        forward_fn: Callable | None = None,
        output_transform: Callable | None = None,
        eval_mode: bool = False,
    ) -> None:
        self.model = model
        self.eval_mode = eval_mode
        self.example_inputs = example_inputs
        self.expected = expected
        self.meta = meta
        self.forward_fn = forward_fn
        self.output_transform = output_transform
        self.runs = 0
        self.seconds = 0.0

    @classmethod
    def of_dense(
        cls,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable | None = None,
        output_transform: Callable | None = None,
    ) -> ForwardCheck:
        """A check against the model as it is now (its output shapes measured on meta tensors,
        or on real values when the model cannot run on meta; in eval mode when it cannot run in
        its own)."""
        error: Exception | None = None
        for in_eval in (False, True):
            for meta in (True, False):
                try:
                    expected = output_shapes(
                        model, example_inputs, forward_fn, output_transform, meta, in_eval
                    )
                except Exception as e:  # noqa: BLE001 - meta first, real values next, eval mode last
                    error = error or e
                    continue
                return cls(model, example_inputs, expected, meta, forward_fn, output_transform, in_eval)
        assert error is not None
        raise error

    def problem(self) -> str | None:
        """What is wrong with the model now (its forward raises, or an output changed shape), or
        None when it runs and every output keeps its shape."""
        start = time.perf_counter()
        try:
            got = output_shapes(
                self.model,
                self.example_inputs,
                self.forward_fn,
                self.output_transform,
                self.meta,
                self.eval_mode,
            )
        except Exception as e:  # noqa: BLE001 - any failure of the user's forward is the finding
            text = " ".join(str(e).split()) or "(no message)"
            if len(text) > _MAX_MESSAGE:
                text = text[: _MAX_MESSAGE - 3] + "..."
            return f"the forward pass on the example inputs raises {type(e).__name__}{where(e)}: {text}"
        finally:
            self.runs += 1
            self.seconds += time.perf_counter() - start
        for k, (want, have) in enumerate(zip(self.expected, got)):
            if want != have:
                which = f" on example input {k}" if len(self.expected) > 1 else ""
                return f"the model outputs{which} change shape from {want} to {have}"
        return None


__all__ = ["ForwardCheck", "where"]
