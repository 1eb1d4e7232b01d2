"""Wall-clock seconds per phase of the pruner's work (graph, groups, importance, selection,
pruning, macs), for benchmarks and profiling."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Sums the seconds spent in each phase into ``timings`` (``{phase: seconds}``).

    ``with timer("importance"): ...`` adds the block's duration to ``timings["importance"]``.
    ``timings`` may be cleared or replaced at any time.
    """

    __slots__ = ("timings",)

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start
