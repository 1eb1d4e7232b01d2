"""The one rulebook for pruning settings: every entry point accepts the same values, with the same message."""

from __future__ import annotations

import pytest

from prune_callbacks.pruning.settings import PruningSettings, SettingsError


def test_defaults() -> None:
    s = PruningSettings()
    assert s.ratio == 0.5 and s.steps == 1 and s.prune_epochs() == [0]
    assert s.schedule == "linear" and not s.ranks_globally


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pruning_ratio": 1.5}, "pruning_ratio=1.5: must be in [0, 1)"),
        ({"pruning_ratio": "0.5"}, "pruning_ratio=0.5: must be a number in [0, 1)"),
        ({"pruning_ratio": True}, "pruning_ratio=true: must be a number"),
        (
            {"pruning_ratio": 0.5, "target_speedup": 2.0},
            "target_speedup=2.0: is set together with pruning_ratio=0.5",
        ),
        ({"target_speedup": 1.0}, "target_speedup=1.0: must be a number > 1"),
        ({"schedule": "fast"}, "schedule=fast: unknown schedule"),
        ({"schedule": [0.3, 0.2]}, "schedule=[0.3,0.2]: must be non-decreasing"),
        (
            {"schedule": [0.1, 0.2], "iterative_steps": 3},
            "iterative_steps=3: gives 3 steps but schedule gives 2",
        ),
        (
            {"start_epoch": 2, "end_epoch": 6, "iterative_steps": 3},
            "iterative_steps=3: gives 3 steps but end_epoch",
        ),
        ({"end_epoch": 1, "start_epoch": 3}, "end_epoch=1: is before start_epoch=3"),
        ({"epochs": [4, 2]}, "epochs=[4,2]: must be strictly increasing"),
        ({"importance": "taylr"}, "importance=taylr: unknown importance; did you mean importance=taylor?"),
        ({"max_pruning_ratio": 0.0}, "max_pruning_ratio=0.0: must be in (0, 1]"),
        ({"round_to": 0}, "round_to=0: must be an integer >= 1"),
        ({"head_pruning_ratio": 1.0}, "head_pruning_ratio=1.0: must be in [0, 1)"),
        ({"pruning_ratio_dict": {"fc": 2}}, "pruning_ratio_dict[fc]=2: must be in [0, 1)"),
        ({"importance_batches": 0}, "importance_batches=0: must be an integer >= 1"),
        ({"global_pruning": "yes"}, "global_pruning=yes: must be true or false"),
        ({"global_pruning": False, "target_speedup": 2.0}, "global_pruning=false: a MACs target"),
    ],
)
def test_errors_name_the_key_and_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        PruningSettings(**kwargs)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text and "; " in text


def test_aliases_and_derived_steps() -> None:
    assert PruningSettings(schedule="agp").schedule == "cubic"
    assert PruningSettings(schedule="exponential").schedule == "exp"
    s = PruningSettings(start_epoch=2, iterative_steps=3)
    assert s.prune_epochs() == [2, 3, 4] and s.steps == 3
    s = PruningSettings(epochs=[1, 5], schedule=[0.2, 0.4])
    assert s.steps == 2 and s.prune_epochs() == [1, 5]
    assert PruningSettings(start_epoch=1, end_epoch=7, every_n_epochs=3).prune_epochs() == [1, 4, 7]
    assert PruningSettings(target_speedup=2).ratio == 0.0 and PruningSettings(target_speedup=2).ranks_globally
    assert PruningSettings(pruning_ratio=0).ratio == 0.0
    assert PruningSettings(global_pruning=True).ranks_globally
    assert (
        not PruningSettings(global_pruning=False).ranks_globally and PruningSettings().global_pruning is None
    )


def test_from_mapping_prefixes_keys_and_suggests() -> None:
    with pytest.raises(
        SettingsError, match=r"^pruning\.pruning_ratio=1\.5: .*e\.g\. pruning\.pruning_ratio=0\.5$"
    ):
        PruningSettings.from_mapping({"_target_": "x", "pruning_ratio": 1.5}, prefix="pruning.")
    with pytest.raises(
        SettingsError, match=r"^pruning\.pruning_rato=0\.5: is not a pruning setting; did you mean"
    ):
        PruningSettings.from_mapping({"pruning_rato": 0.5}, prefix="pruning.")


def test_replace_validates_again() -> None:
    s = PruningSettings(pruning_ratio=0.3)
    assert s.replace(pruning_ratio=0.6).pruning_ratio == 0.6
    with pytest.raises(SettingsError):
        s.replace(target_speedup=2.0)


def test_ratio_of_an_explicit_schedule() -> None:
    """With neither a ratio nor a speedup, an explicit schedule's last ratio is the ratio."""
    assert PruningSettings(schedule=[0.1, 0.3]).ratio == 0.3
    assert PruningSettings(schedule=[0.1, 0.3], pruning_ratio=0.5).ratio == 0.5
    assert PruningSettings(schedule=[0.1, 0.3], target_speedup=2.0).ratio == 0.0
