"""Tests for the iterative pruning-ratio schedules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prune_callbacks.pruning.schedule import SCHEDULE_KINDS, ratio_schedule


def test_linear_values() -> None:
    assert ratio_schedule(0.5, 4, "linear") == pytest.approx([0.125, 0.25, 0.375, 0.5])


def test_cubic_values() -> None:
    values = ratio_schedule(0.8, 4, "cubic")
    expected = [0.8 * (1 - (1 - k / 4) ** 3) for k in range(1, 5)]
    assert values == pytest.approx(expected)
    assert values[0] == pytest.approx(0.8 * (1 - 0.75**3))
    # AGP prunes most in the first steps.
    increments = [b - a for a, b in zip([0.0, *values], values)]
    assert increments == sorted(increments, reverse=True)


def test_exp_keeps_constant_fraction() -> None:
    values = ratio_schedule(0.75, 2, "exp")
    assert values == pytest.approx([0.5, 0.75])
    keeps = [1 - v for v in [0.0, *ratio_schedule(0.9, 5, "exp")]]
    ratios = [b / a for a, b in zip(keeps, keeps[1:])]
    assert ratios == pytest.approx([ratios[0]] * 5)


def test_default_is_linear_and_single_step() -> None:
    assert ratio_schedule(0.3, 3) == ratio_schedule(0.3, 3, "linear")
    for kind in SCHEDULE_KINDS:
        assert ratio_schedule(0.3, 1, kind) == [0.3]


@given(
    target=st.floats(min_value=0.0, max_value=0.999, allow_nan=False),
    steps=st.integers(min_value=1, max_value=50),
    kind=st.sampled_from(SCHEDULE_KINDS),
)
def test_ends_at_target_and_monotone(target: float, steps: int, kind: str) -> None:
    values = ratio_schedule(target, steps, kind)
    assert len(values) == steps
    assert values[-1] == target
    assert all(0.0 <= v < 1.0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_explicit_list() -> None:
    assert ratio_schedule(0.5, 3, [0.1, 0.3, 0.5]) == [0.1, 0.3, 0.5]
    assert ratio_schedule(0.5, 99, (0.2, 0.5)) == [0.2, 0.5]
    with pytest.warns(UserWarning, match="not at target"):
        assert ratio_schedule(0.5, 2, [0.1, 0.4]) == [0.1, 0.4]


@pytest.mark.parametrize(
    ("target", "steps", "kind", "match"),
    [
        (1.0, 3, "linear", "target"),
        (-0.1, 3, "linear", "target"),
        (float("nan"), 3, "linear", "target"),
        (0.5, 0, "linear", "steps"),
        (0.5, 2.5, "linear", "steps"),
        (0.5, 3, "quadratic", "linear, cubic, exp"),
        (0.5, 3, [0.3, 0.2, 0.5], "non-decreasing"),
        (0.5, 3, [0.1, 1.0], r"\[0, 1\)"),
        (0.5, 3, [], "at least one"),
    ],
)
def test_errors(target: float, steps: int, kind: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ratio_schedule(target, steps, kind)  # type: ignore[arg-type]


def test_ratio_schedule_scales_an_explicit_list_for_other_targets() -> None:
    from prune_callbacks.pruning.schedule import RatioSchedule

    linear = RatioSchedule("linear", 4, 0.5)
    assert linear.ratios_for(0.5) == ratio_schedule(0.5, 4, "linear")
    assert linear.ratios_for(0.2) == ratio_schedule(0.2, 4, "linear")
    assert linear.fractions_for(0.5) == pytest.approx([0.125, 0.25, 0.375, 0.5])
    explicit = RatioSchedule((0.1, 0.3, 0.4), 3, 0.4)
    assert explicit.explicit and not linear.explicit
    assert explicit.ratios_for(0.4) == [0.1, 0.3, 0.4]  # used as given for the run's ratio
    assert explicit.ratios_for(0.8) == pytest.approx([0.2, 0.6, 0.8])  # same shape, other target
    assert explicit.fractions_for(0.5) == pytest.approx([0.125, 0.375, 0.5])
