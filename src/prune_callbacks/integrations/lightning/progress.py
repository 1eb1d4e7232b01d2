"""A progress bar for one pruning step, in the style of Lightning's own bar (its ``Tqdm``).

On a big model one step (scoring every group, selecting, the verified prune, recounting MACs,
maybe several rounds to meet a speedup target) can take long enough to look like a hang. The bar
appears only when a step lasts more than :data:`SHOW_AFTER_S` seconds, only on rank zero and only
when the trainer has a progress bar; it shows the step number, the phase running now and how
many phases are done, and disappears when the step ends.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["SHOW_AFTER_S", "PruneProgress", "wants_progress"]

#: Seconds a step runs before its bar is drawn (shorter steps print nothing).
SHOW_AFTER_S = 1.0


def wants_progress(trainer: pl.Trainer) -> bool:
    """Whether a bar should be drawn: rank zero of a trainer that shows a progress bar."""
    return bool(trainer.is_global_zero and trainer.progress_bar_callback is not None)


class PruneProgress:
    """``listener(phase, started)`` for :meth:`Pruner.phase_listener` that drives a tqdm bar.

    Use as a context manager around the step; :meth:`close` removes the bar.
    """

    __slots__ = ("bar", "done")

    def __init__(self, step: int, steps: int, delay: float | None = None) -> None:
        self.done = 0
        self.bar: Any = Tqdm(
            desc=f"Pruning step {step}/{steps}",
            total=None,
            unit="phase",
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            delay=SHOW_AFTER_S if delay is None else delay,
            bar_format="{desc}: {n_fmt} phases [{elapsed}{postfix}]",
        )

    def __call__(self, phase: str, started: bool) -> None:
        if started:
            self.bar.set_postfix_str(phase, refresh=False)
        else:
            self.done += 1
            self.bar.update(1)

    def close(self) -> None:
        """Remove the bar (nothing was drawn if the step was short)."""
        self.bar.close()

    def __enter__(self) -> PruneProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
