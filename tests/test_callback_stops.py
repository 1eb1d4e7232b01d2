"""Issue 15, "plays well with the usual callbacks": a run that EarlyStopping ends before the
pruning schedule does says so, and ``hold_early_stopping`` keeps it going to the last prune;
Ctrl-C mid-prune leaves a loadable checkpoint; ModelCheckpoint scores the weights it saves on
pruning epochs; DDP in spawned workers is refused before training."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping

from helpers import LitNet, cpu_trainer, random_loader
from prune_callbacks import PrunedCheckpoints, StructuredPruning


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


class Scored(PrunedCheckpoints, LitNet):
    """Logs its validation loss, for ModelCheckpoint to score checkpoints with."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def test_checkpoints_on_pruning_epochs_are_scored_on_the_weights_they_hold(tmp_path) -> None:
    """The prune runs after the epoch's last training batch, before its validation: every
    checkpoint's score is the validation loss of the (pruned) weights it holds."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    prune = StructuredPruning("l2", pruning_ratio=0.75, epochs=[0, 1], verbose=False)
    save = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, filename="{epoch}")
    trainer = cpu_trainer(tmp_path, [prune, save], max_epochs=3, enable_checkpointing=True)
    val = random_loader(n=32, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Scored(), random_loader(), val)
    scores = {Path(p).name: float(s) for p, s in save.best_k_models.items()}
    assert sorted(scores) == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    widths = []
    for name, score in scores.items():
        loaded = Scored.load_from_checkpoint(tmp_path / name)
        widths.append(loaded.model.conv1.out_channels)
        again = cpu_trainer(tmp_path / "again", []).validate(loaded, val, verbose=False)[0]["val_loss"]
        assert again == pytest.approx(score, rel=1e-5), f"{name}: scored {score}, its weights give {again}"
    assert sorted(widths, reverse=True) == [10, 4, 4]  # pruned after epochs 0 and 1 (75% in 2 steps)


def test_ddp_spawn_is_refused_before_training() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from prune_callbacks.integrations.lightning.ddp import check_strategy

    check_strategy(DDPStrategy())  # the launcher-per-process DDP is supported
    for method in ("spawn", "fork"):
        with pytest.raises(ValueError, match=f"start_method='{method}'.*strategy='ddp'"):
            check_strategy(DDPStrategy(start_method=method))


@pytest.mark.slow
def test_ddp_spawn_fit_is_refused_in_setup(tmp_path) -> None:
    """End to end: two spawned CPU workers refuse in ``setup``; no training step runs."""
    module = LitNet()
    prune = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0], verbose=False)
    trainer = cpu_trainer(tmp_path, [prune], strategy="ddp_spawn", devices=2, max_epochs=1)
    with pytest.raises(Exception, match="start_method='spawn'"):
        trainer.fit(module, random_loader())
    assert module.training_steps == 0
