"""Issue 15, "plays well with the usual callbacks": a run that EarlyStopping ends before the
pruning schedule does says so, and ``hold_early_stopping`` keeps it going to the last prune."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping

from helpers import LitNet, cpu_trainer, random_loader
from prune_callbacks import StructuredPruning


class Worsening(LitNet):
    """Logs a validation loss that only grows, so EarlyStopping(patience=0) stops after the
    second validation."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y) * 0 + float(self.current_epoch))


def _fit(tmp_path, hold: bool) -> tuple[StructuredPruning, list[str], Any]:
    module = Worsening()
    prune = StructuredPruning(
        "l2", pruning_ratio=0.5, epochs=[0, 2, 4], verbose=False, hold_early_stopping=hold
    )
    stop = EarlyStopping(monitor="val_loss", patience=0, mode="min")
    trainer = cpu_trainer(tmp_path, [prune, stop], max_epochs=6, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, random_loader(), random_loader(n=16))
    return prune, [str(w.message) for w in caught], trainer


def test_early_stopping_mid_schedule_warns(tmp_path) -> None:
    prune, warned, trainer = _fit(tmp_path, hold=False)
    assert prune.steps_done < 3
    msg = next(w for w in warned if "scheduled prunes done" in w)
    assert f"{prune.steps_done} of 3 scheduled prunes done" in msg and "hold_early_stopping=True" in msg
    assert "pruning_ratio=0.5" in msg


def test_hold_early_stopping_runs_the_whole_schedule(tmp_path) -> None:
    prune, warned, trainer = _fit(tmp_path, hold=True)
    assert prune.steps_done == 3
    assert not any("scheduled prunes done" in w for w in warned)
    assert trainer.current_epoch == 5  # stopped right after the last pruning epoch (4)
    assert not trainer.fit_loop.min_epochs  # the loop's own setting is back
    assert torch.isfinite(prune.records[-1]["speedup"] * torch.ones(1)).all()


def test_interrupt_during_a_prune_in_fit_leaves_a_loadable_checkpoint(tmp_path) -> None:
    """Ctrl-C while the callback prunes: the prune is rolled back before Lightning's exception
    checkpoint is written, so the checkpoint's weights and history agree; it loads into a fresh
    module and training resumes from it."""
    import signal

    import pytest
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    from prune_callbacks import load_pruned
    from prune_callbacks.layers import PruningFunction

    module = LitNet()
    prune = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0, 1], verbose=False)
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path, filename="interrupted")
    trainer = cpu_trainer(tmp_path, [prune, on_exception], max_epochs=3, enable_checkpointing=True)
    real = PruningFunction.__call__
    calls = [0]

    def interrupted(self: PruningFunction, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        calls[0] += 1
        if prune.steps_done == 1 and calls[0] > 0:  # halfway through the second prune
            raise KeyboardInterrupt
        return out

    handler = signal.getsignal(signal.SIGINT)
    PruningFunction.__call__ = interrupted  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings(), pytest.raises(SystemExit):
            warnings.simplefilter("ignore")
            trainer.fit(module, random_loader())
    finally:
        PruningFunction.__call__ = real  # type: ignore[method-assign]
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C after an interrupt
    assert prune.steps_done == 1
    width = module.model.conv1.out_channels
    path = tmp_path / "interrupted.ckpt"
    fresh = load_pruned(LitNet(), path)  # weights and history agree: strict load works
    assert fresh.model.conv1.out_channels == width
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), module(x))
    resumed = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0, 1], verbose=False)
    cpu_trainer(tmp_path / "resume", [resumed], max_epochs=3, enable_checkpointing=True).fit(
        LitNet(), random_loader(), ckpt_path=str(path)
    )
    assert resumed.steps_done == 2
