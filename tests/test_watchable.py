"""Issue 18, watchable runs: one log line per prune as it happens, and the callback's settings
stored as hyperparameters by every logger (a CSV logger's ``hparams.yaml`` here)."""

from __future__ import annotations

import logging
import warnings

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

from helpers import LitNet, cpu_trainer, random_loader
from prune_callbacks import StructuredPruning


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
