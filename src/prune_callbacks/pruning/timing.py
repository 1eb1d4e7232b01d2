"""Wall-clock seconds per phase of the pruner's work (graph, groups, importance, selection,
pruning, macs), for benchmarks and profiling, and a listener told when each phase starts and ends
(what a progress bar shows during a long step)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: ``listener(phase, started)``: called with ``started=True`` when a phase begins, False when it ends.
PhaseListener = Callable[[str, bool], None]

__all__ = ["PhaseListener", "PhaseTimer"]


class PhaseTimer:
    """Sums the seconds spent in each phase into ``timings`` (``{phase: seconds}``).

    ``with timer("importance"): ...`` adds the block's duration to ``timings["importance"]``.
    ``timings`` may be cleared or replaced at any time. ``listener`` (None: nobody) is told when
    each phase starts and ends; an exception it raises propagates like one of the phase's own.
    """

    __slots__ = ("listener", "timings")

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.listener: PhaseListener | None = None

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        listener = self.listener
        if listener is not None:
            listener(phase, True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start
            if listener is not None:
                listener(phase, False)
