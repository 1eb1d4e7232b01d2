"""Issue 18, watchable runs: one log line per prune as it happens, and the callback's settings
stored as hyperparameters by every logger (a CSV logger's ``hparams.yaml`` here)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from helpers import LitNet, TinyCNN, cpu_trainer, random_loader
from prune_callbacks import Pruner, StructuredPruning


def test_each_prune_logs_a_line_and_the_settings_reach_the_logger(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    prune = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0, 1], verbose=True)
    logger = CSVLogger(tmp_path, name="run")
    trainer = cpu_trainer(tmp_path, [prune], max_epochs=2, logger=logger)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LitNet(), random_loader())
    lines = [r.getMessage() for r in caplog.records if "StructuredPruning: step" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("StructuredPruning: step 1/2 after epoch 0:")
    assert f"({prune.records[-1]['speedup']:.2f}x fewer than dense)" in lines[1]
    assert "group(s) changed" in lines[1]
    hparams = yaml.safe_load((tmp_path / "run" / "version_0" / "hparams.yaml").read_text())
    assert hparams["prune_callbacks/pruning_ratio"] == 0.5
    assert hparams["prune_callbacks/prune_epochs"] == [0, 1]
    assert hparams["prune_callbacks/importance"] == "l2"


def test_pruner_phase_listener_sees_every_phase_of_a_step() -> None:
    model = TinyCNN()
    pruner = Pruner(model, torch.randn(1, 3, 8, 8), importance="l2", target_speedup=1.5, iterative_steps=2)
    events: list[tuple[str, bool]] = []
    with pruner.phase_listener(lambda phase, started: events.append((phase, started))):
        pruner.step()
    seen = len(events)
    pruner.step()  # the listener is gone after the block
    assert len(events) == seen
    phases = [p for p, started in events if started]
    assert {"importance", "pruning", "macs"} <= set(phases)
    assert [p for p, started in events if not started] == phases  # every start has its end, in order
    assert pruner.timings  # the timer still sums the phases


def test_a_long_prune_shows_a_progress_bar_on_rank_zero(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prune_callbacks.integrations.lightning import progress

    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)  # every step counts as long
    prune = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0], verbose=True)
    trainer = cpu_trainer(tmp_path, [prune], max_epochs=1, enable_progress_bar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LitNet(), random_loader())
    out = capsys.readouterr().out
    assert "Pruning step 1/1" in out and "phases" in out


def test_no_progress_bar_without_the_trainers_bar(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prune_callbacks.integrations.lightning import progress

    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    prune = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0], verbose=True)
    trainer = cpu_trainer(tmp_path, [prune], max_epochs=1)  # enable_progress_bar=False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LitNet(), random_loader())
    assert "Pruning step" not in capsys.readouterr().out
