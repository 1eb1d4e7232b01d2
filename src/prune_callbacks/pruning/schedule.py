"""Iterative pruning schedules: how much of the model is pruned after each pruning step.

Pruning in several small steps with fine-tuning in between usually recovers accuracy better than
one large cut; the schedule decides how the target ratio is spread over the steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SCHEDULE_KINDS", "RatioSchedule", "ratio_schedule"]

SCHEDULE_KINDS: tuple[str, ...] = ("linear", "cubic", "exp")


def _check_ratio(value: float, what: str) -> float:
    """Return ``value`` as a float after checking it is a finite ratio in [0, 1)."""
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{what} must be in [0, 1), got {value}")
    return value


def _explicit_schedule(target: float, ratios: Sequence[float]) -> list[float]:
    """Validate a user-given list of cumulative ratios and return it as floats."""
    values = [_check_ratio(r, f"schedule entry {i}") for i, r in enumerate(ratios)]
    if not values:
        raise ValueError("an explicit pruning schedule must contain at least one ratio")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(
                f"an explicit pruning schedule must be non-decreasing, but entry {i} ({values[i]}) "
                f"< entry {i - 1} ({values[i - 1]})"
            )
    if not math.isclose(values[-1], target, rel_tol=0.0, abs_tol=1e-9):
        warnings.warn(
            f"explicit pruning schedule ends at {values[-1]}, not at target {target}; the schedule wins",
            stacklevel=3,
        )
    return values


def ratio_schedule(target: float, steps: int, kind: str | Sequence[float] = "linear") -> list[float]:
    """Cumulative pruning ratio after each of ``steps`` pruning steps, ending exactly at ``target``.

    ``kind`` selects how the ratio grows with step ``k = 1..steps``:

    * ``"linear"``: ``target * k / steps``, equal slices.
    * ``"cubic"``: ``target * (1 - (1 - k / steps) ** 3)``, Zhu & Gupta's automated gradual pruning:
      prune hard early, while the network still has redundancy, and gently near the end.
    * ``"exp"``: ``1 - (1 - target) ** (k / steps)``, every step keeps the same fraction of what is left.
    * a sequence of ratios: validated (each in [0, 1), non-decreasing) and returned as is; ``steps`` is
      ignored, and a last value other than ``target`` only warns.

    Raises ``ValueError`` for a target outside [0, 1), ``steps < 1`` or an unknown kind.
    """
    target = _check_ratio(target, "target pruning ratio")
    if not isinstance(kind, str):
        return _explicit_schedule(target, list(kind))
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    if kind == "linear":
        values = [target * k / steps for k in range(1, steps + 1)]
    elif kind == "cubic":
        values = [target * (1.0 - (1.0 - k / steps) ** 3) for k in range(1, steps + 1)]
    elif kind == "exp":
        values = [1.0 - (1.0 - target) ** (k / steps) for k in range(1, steps + 1)]
    else:
        raise ValueError(
            f"unknown schedule kind {kind!r}; valid kinds are {', '.join(SCHEDULE_KINDS)} "
            "or an explicit list of ratios"
        )
    values[-1] = target
    return values


#: Largest cumulative ratio a scaled schedule may reach (a group always keeps a channel).
_MAX_SCALED = 0.999999


@dataclass(frozen=True)
class RatioSchedule:
    """The schedule of one pruning run, for any final ratio.

    ``kind`` is a schedule kind (``"linear"``, ``"cubic"``, ``"exp"``) or an explicit tuple of
    cumulative ratios, one per step; ``ratio`` is the run's ``pruning_ratio``, the final ratio the
    explicit list stands for. Groups with a ratio of their own (``pruning_ratio_dict``, attention
    heads) and MAC targets follow the same shape scaled to their own final value.
    """

    kind: str | tuple[float, ...]
    steps: int
    ratio: float

    @property
    def explicit(self) -> bool:
        """Whether the schedule is an explicit list of ratios."""
        return not isinstance(self.kind, str)

    def ratios_for(self, target: float) -> list[float]:
        """Cumulative ratio after each step for a final ratio ``target``. An explicit list is used
        as given for ``ratio`` and scaled for other targets."""
        if isinstance(self.kind, str):
            return ratio_schedule(target, self.steps, self.kind)
        last = self.kind[-1]
        if last == 0 or math.isclose(target, self.ratio):
            return list(self.kind)
        return [min(v * target / last, _MAX_SCALED) for v in self.kind]

    def fractions_for(self, reduction: float) -> list[float]:
        """Cumulative fraction of a reduction (e.g. of MACs, ``1 - 1/speedup``) reached after each
        step: the schedule's shape ending at ``reduction``."""
        if isinstance(self.kind, str):
            return ratio_schedule(min(reduction, _MAX_SCALED), self.steps, self.kind)
        last = self.kind[-1] or 1.0
        return [v / last * reduction for v in self.kind]
