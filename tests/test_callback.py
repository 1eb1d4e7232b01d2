"""Tests for the StructuredPruning Lightning callback (small models, CPU)."""

from __future__ import annotations

import copy
import csv
import glob
import json
import logging
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import LitNet, TinyCNN, last_batch
from helpers import cpu_trainer as _trainer
from helpers import random_loader as _data
from prune_callbacks.integrations.lightning.callback import (
    HISTORY_KEY,
    StructuredPruning,
    pruned_from_checkpoint,
)
from prune_callbacks.integrations.lightning.summary import format_summary
from prune_callbacks.measure.flops import count_macs_and_params
from prune_callbacks.pruning.history import load_pruned
from prune_callbacks.pruning.importance import TaylorImportance
from prune_callbacks.pruning.pruner import Pruner
from prune_callbacks.pruning.settings import PruningSettings, SettingsError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers.*",
        "ignore:.*cannot be pruned and are skipped.*",
        "ignore:.*is deprecated.*",
        "ignore:.*smaller than the logging interval.*",
        "ignore:.*but have no `val_dataloader`.*",
        "ignore:.*the last steps will not run.*",
    ),
]


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


class EpochProbe(pl.Callback):
    """Records the parameter count at the start of every training epoch."""

    def __init__(self) -> None:
        self.start: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start.append(sum(p.numel() for p in pl_module.parameters()))


# ---------------------------------------------------------------------------------------------- schedule


def test_fit_prunes_on_schedule_and_logged_macs_match_final_model(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = LitNet()
    probe = EpochProbe()
    cb = StructuredPruning("taylor", target_speedup=2.0, epochs=[0, 2], verbose=False)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = _trainer(tmp_path, [probe, cb], max_epochs=4, logger=logger, log_every_n_steps=1)
    trainer.fit(module, _data())

    dense_params = probe.start[0]
    # epoch 0 dense; pruned after epoch 0 -> epochs 1, 2 smaller; pruned again after epoch 2 -> epoch 3
    assert probe.start[1] < dense_params
    assert probe.start[2] == probe.start[1]
    assert probe.start[3] < probe.start[2]
    assert [r["epoch"] for r in cb.records] == [None, 0, 2]
    assert [r["global_step"] for r in cb.records] == [0, 4, 12]
    assert len(cb.history) >= 2

    macs, params = count_macs_and_params(module, module.example_input_array)
    dense_macs = cb.records[0]["macs"]
    assert dense_macs == count_macs_and_params(LitNet(), module.example_input_array)[0]
    assert macs <= dense_macs / 2.0 * 1.03, "final MACs miss target_speedup=2"
    assert cb.records[-1]["macs"] == macs and cb.records[-1]["params"] == params

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["prune/macs"]) for r in rows if r.get("prune/macs")]
    assert logged[0] == dense_macs
    assert logged[-1] == macs
    assert len(logged) == 3
    speedups = [float(r["prune/speedup"]) for r in rows if r.get("prune/speedup")]
    assert speedups[-1] == pytest.approx(dense_macs / macs)
    widths = [k for k in rows[0] if k.startswith("prune/width/")]
    assert "prune/width/model.conv1" in widths


def test_ratio_schedule_widths_follow_linear_steps(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = LitNet()
    cb = StructuredPruning("magnitude", pruning_ratio=0.5, start_epoch=0, end_epoch=1, verbose=False)
    _trainer(tmp_path, [cb], max_epochs=2).fit(module, _data())
    assert module.model.conv1.out_channels == 8
    assert module.model.conv2.out_channels == 8
    step1, step2 = cb.records[1], cb.records[2]
    for g in step1["groups"]:
        assert (g["channels_before"], g["channels_after"]) == (16, 12)
    for g in step2["groups"]:
        assert (g["channels_before"], g["channels_after"]) == (12, 8)
    assert step1["channel_ratio"] == pytest.approx(0.25)
    assert step2["channel_ratio"] == pytest.approx(0.5)
    # the pruned model still runs and trains
    out = module(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4)


def test_summary_is_printed_at_fit_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cb = StructuredPruning("l1", pruning_ratio=0.25, epochs=[0], verbose=True)
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [cb], max_epochs=1).fit(LitNet(), _data())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Structured pruning summary" in text
    assert format_summary(cb.records) in text
    table = format_summary(cb.records).splitlines()
    assert table[1].split("|")[0].strip() == "step" and len(table) == 5  # title, header, rule, 2 rows


def test_no_gradients_gathered_outside_pruning_epochs(tmp_path: Path) -> None:
    seen: list[int] = []

    class Probe(pl.Callback):  # runs before the pruning callback, which prunes after the last batch
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if last_batch(trainer, args[-1]):
                seen.append(cb.importance.num_batches)

    cb = StructuredPruning("taylor", pruning_ratio=0.25, epochs=[1], importance_batches=2, verbose=False)
    _trainer(tmp_path, [Probe(), cb], max_epochs=2).fit(LitNet(), _data(n=96))
    # epoch 0: nothing; epoch 1 (6 batches): only the last 2 optimizer steps
    assert seen == [0, 2]


# ---------------------------------------------------------------------------------------------- optimizer


class OptimizerProbe(pl.Callback):
    """Copies every parameter's optimizer state right before the prune of epoch 0 (at the end of
    its last batch, before the pruning callback's hook), then reads the
    state back at the start of epoch 1 (no optimizer step in between). ``bn1.weight``'s state is
    also tagged as ``3 * param + 1``, so after the prune it must still be ``3 * param + 1``."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.before: dict[str, dict[str, torch.Tensor]] = {}
        self.after: dict[str, dict[str, torch.Tensor]] = {}
        self.optimizer_ids: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.current_epoch != 0 or not last_batch(trainer, args[-1]):
            return
        opt = trainer.optimizers[0]
        self.optimizer_ids.append(id(opt))
        for name, p in pl_module.named_parameters():
            state = opt.state[p]
            self.before[name] = {k: state[k].clone() for k in self.keys}
            if name == "model.bn1.weight":
                for k in self.keys:
                    state[k] = p.detach() * 3 + 1  # tag: must still equal 3 * param + 1 after pruning

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 1:
            return
        opt = trainer.optimizers[0]
        self.optimizer_ids.append(id(opt))
        for name, p in pl_module.named_parameters():
            self.after[name] = {k: opt.state[p][k].clone() for k in self.keys}
            self.after[name]["param"] = p.detach().clone()


@pytest.mark.parametrize(
    ("optimizer", "keys"), [("sgd", ("momentum_buffer",)), ("adam", ("exp_avg", "exp_avg_sq"))]
)
def test_optimizer_state_of_kept_channels_survives_the_prune(
    tmp_path: Path, optimizer: str, keys: tuple[str, ...]
) -> None:
    pl.seed_everything(0)
    module = LitNet(optimizer=optimizer, scheduler=True)
    probe = OptimizerProbe(keys)
    cb = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0], verbose=False)
    trainer = _trainer(tmp_path, [probe, cb], max_epochs=2)
    trainer.fit(module, _data())

    assert probe.optimizer_ids[0] == probe.optimizer_ids[1], "the optimizer object must be kept"
    record = cb.history[0]
    removed = {(it["target"], it["function"]): it["idxs"] for it in record["items"]}
    conv1_removed = removed[("model.conv1", "prune_conv_out_channels")]
    kept = [i for i in range(16) if i not in conv1_removed]
    assert len(kept) == 8
    for key in keys:
        before_w = probe.before["model.conv1.weight"][key]
        assert torch.equal(probe.after["model.conv1.weight"][key], before_w[kept])
        assert torch.equal(probe.after["model.conv1.bias"][key], probe.before["model.conv1.bias"][key][kept])
        conv2_in = [i for i in range(16) if i not in removed[("model.conv2", "prune_conv_in_channels")]]
        conv2_out = [
            i for i in range(16) if i not in removed.get(("model.conv2", "prune_conv_out_channels"), [])
        ]
        before_w2 = probe.before["model.conv2.weight"][key]
        assert torch.equal(probe.after["model.conv2.weight"][key], before_w2[conv2_out][:, conv2_in])
        # the tagged state was sliced exactly like its parameter
        tagged = probe.after["model.bn1.weight"]
        assert torch.equal(tagged[key], tagged["param"] * 3 + 1)
    if optimizer == "adam":
        step = trainer.optimizers[0].state[module.model.conv1.weight]["step"]
        assert float(step) == 8  # 4 steps per epoch, 2 epochs: the step counter was left alone
    # training went on: the parameters moved after the prune and the scheduler kept stepping
    assert not torch.equal(module.model.conv1.weight.detach(), probe.after["model.conv1.weight"]["param"])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        (0.05 if optimizer == "sgd" else 1e-2) * 0.5**2
    )


# ---------------------------------------------------------------------------------------------- gradients


def test_importance_uses_final_unscaled_unclipped_gradients_bf16_accumulation(tmp_path: Path) -> None:
    """bf16 autocast, 2 accumulated micro-batches and clipping: the Taylor score equals the one
    computed by hand from the summed, unclipped gradient of the optimizer step."""
    pl.seed_everything(0)
    module = LitNet(bn=False)
    start = copy.deepcopy(module.model)
    loader = _data(n=32, batch_size=16)
    captured: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 1 and "clipped" not in captured:
                captured["clipped"] = pl_module.model.conv1.weight.grad.clone()
            if not last_batch(trainer, args[-1]):
                return
            group = next(g for g in cb.pruner.groups if g.root.dep.target.module is pl_module.model.conv1)
            captured["scores"] = cb.importance(group)
            captured["num_batches"] = cb.importance.num_batches

    imp = TaylorImportance(group_reduction="sum", normalizer=None)
    cb = StructuredPruning(imp, pruning_ratio=0.25, epochs=[0], verbose=False)
    trainer = _trainer(
        tmp_path,
        [Probe(), cb],
        max_epochs=1,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1e-3,
    )
    trainer.fit(module, loader)
    assert captured["num_batches"] == 1  # one optimizer step of two micro-batches

    # the gradient of that optimizer step, by hand: two bf16-autocast micro-batches, loss / 2 each
    net = start
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y) / 2
        loss.backward()
    w1, b1, w2 = net.conv1.weight, net.conv1.bias, net.conv2.weight
    hand = (
        (w1 * w1.grad).flatten(1).sum(1) + b1 * b1.grad + (w2 * w2.grad).transpose(0, 1).flatten(1).sum(1)
    ).abs()
    torch.testing.assert_close(captured["scores"], hand.detach(), rtol=1e-4, atol=1e-7)
    # clipping really happened after the importance was read
    assert not torch.allclose(captured["clipped"], w1.grad)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_resume_from_checkpoint_on_fresh_module_matches_uninterrupted_run(tmp_path: Path) -> None:
    def run(max_epochs: int, module: LitNet, ckpt: str | None = None) -> pl.Trainer:
        pl.seed_everything(0)
        cb = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0, 2], verbose=False)
        trainer = _trainer(tmp_path, [cb], max_epochs=max_epochs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, _data(), ckpt_path=ckpt)
        return trainer

    full = LitNet(optimizer="adam", scheduler=True)
    run(4, full)

    first = LitNet(optimizer="adam", scheduler=True)
    trainer = run(1, first)  # stops right after the first prune
    ckpt = str(tmp_path / "after_first_prune.ckpt")
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert len(raw[HISTORY_KEY]) >= 1

    fresh = LitNet(optimizer="adam", scheduler=True, seed=123)  # unpruned, other weights
    trainer = run(4, fresh, ckpt)
    cb = next(c for c in trainer.callbacks if isinstance(c, StructuredPruning))
    assert [r["epoch"] for r in cb.records] == [None, 0, 2]
    assert _shapes(fresh) == _shapes(full)
    for k, v in full.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), f"{k} differs after resume"


def test_callback_state_round_trips_gradient_statistics(tmp_path: Path) -> None:
    states: list[dict[str, Any]] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if not last_batch(trainer, args[-1]):
                return
            states.append(copy.deepcopy(cb.state_dict()))
            copies.append(copy.deepcopy(pl_module))
            groups = cb.pruner.groups
            scores.append([cb.importance(g) for g in groups])

    copies: list[LitNet] = []
    scores: list[list[torch.Tensor]] = []
    cb = StructuredPruning("fisher", pruning_ratio=0.5, epochs=[0], verbose=False)
    _trainer(tmp_path, [Probe(), cb], max_epochs=1).fit(LitNet(), _data())
    state = states[0]
    assert state["importance"]["num_batches"] == 4

    restored = StructuredPruning("fisher", pruning_ratio=0.5, epochs=[0], verbose=False)
    restored.load_state_dict(state)
    module = copies[0]
    trainer = _trainer(tmp_path, [restored], max_epochs=1)
    trainer.strategy.connect(module)
    restored.on_fit_start(trainer, module)
    again = [restored.importance(g) for g in restored.pruner.groups]
    assert len(again) == len(scores[0])
    for a, b in zip(again, scores[0]):
        assert torch.equal(a, b)


def test_checkpoint_loads_for_inference_with_weights_only(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = LitNet()
    cb = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0], verbose=False)
    ckpt_cb = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpts"), save_last=True, save_weights_only=True
    )
    trainer = _trainer(tmp_path, [cb, ckpt_cb], max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, _data())
    module.eval()
    x = torch.randn(5, 3, 8, 8)
    expected = module(x)

    path = str(tmp_path / "ckpts" / "last.ckpt")
    data = torch.load(path, weights_only=True)  # weights-only checkpoints carry the history too
    assert data[HISTORY_KEY] == cb.history

    fresh = LitNet(seed=7)
    load_pruned(fresh, pruned_from_checkpoint(path))
    torch.testing.assert_close(fresh.eval()(x), expected)

    bare = TinyCNN()
    load_pruned(bare, pruned_from_checkpoint(path, prefix="model."))
    torch.testing.assert_close(bare.eval()(x), expected)
    assert bare.conv1.out_channels == module.model.conv1.out_channels

    # Trainer.validate on a fresh module with the callback attached replays the structure too
    other = LitNet(seed=3)
    t = _trainer(tmp_path, [StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0], verbose=False)])
    t.validate(other, _data(n=16), ckpt_path=path, verbose=False)
    torch.testing.assert_close(other.eval()(x), expected)


def test_direct_load_pruned_of_lightning_checkpoint(tmp_path: Path) -> None:
    module = LitNet()
    cb = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0], verbose=False)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(module, _data())
    path = str(tmp_path / "final.ckpt")
    trainer.save_checkpoint(path)
    fresh = load_pruned(LitNet(seed=5), path)
    assert _shapes(fresh) == _shapes(module)


# ---------------------------------------------------------------------------------------------- inputs


def test_example_inputs_from_first_batch(tmp_path: Path) -> None:
    module = LitNet(example=False)
    cb = StructuredPruning("magnitude", pruning_ratio=0.5, epochs=[0], verbose=False)
    _trainer(tmp_path, [cb], max_epochs=1).fit(module, _data())
    assert module.model.conv1.out_channels == 8
    assert cb.example_inputs.shape == (1, 3, 8, 8)


class DictBatches(TensorDataset):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = super().__getitem__(i)
        return {"x": x, "y": y}


def _dict_data() -> DataLoader:
    return DataLoader(DictBatches(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))), batch_size=16)


def test_overridden_batch_hook_picks_inputs_from_dict_batches(tmp_path: Path) -> None:
    class DictPruning(StructuredPruning):
        def example_inputs_from_batch(self, batch: Any, pl_module: pl.LightningModule) -> Any:
            return batch["x"][:2]

    module = LitNet(example=False)
    cb = DictPruning("magnitude", pruning_ratio=0.5, epochs=[0], verbose=False)
    _trainer(tmp_path, [cb], max_epochs=1).fit(module, _dict_data())
    assert module.model.conv1.out_channels == 8


def test_ignored_layer_names_are_found_inside_the_wrapper(tmp_path: Path) -> None:
    module = LitNet()
    cb = StructuredPruning(
        "magnitude", pruning_ratio=0.5, epochs=[0], ignored_layers=["conv1"], verbose=False
    )
    _trainer(tmp_path, [cb], max_epochs=1).fit(module, _data())
    assert module.model.conv1.out_channels == 16
    assert module.model.conv2.out_channels == 8


def test_pruning_ratio_dict_names_are_found_inside_the_wrapper(tmp_path: Path) -> None:
    module = LitNet()
    cb = StructuredPruning(
        "magnitude", pruning_ratio=0.5, pruning_ratio_dict={"conv1": 0.25}, epochs=[0], verbose=False
    )
    _trainer(tmp_path, [cb], max_epochs=1).fit(module, _data())
    assert module.model.conv1.out_channels == 12
    assert module.model.conv2.out_channels == 8


# ---------------------------------------------------------------------------------------------- errors


def test_missing_example_input_is_a_clear_error_before_training(tmp_path: Path) -> None:
    module = LitNet(example=False)
    before = copy.deepcopy(module.state_dict())
    cb = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0], verbose=False)
    with pytest.raises(ValueError, match="example_input_array") as err:
        _trainer(tmp_path, [cb], max_epochs=1).fit(module, _dict_data())
    assert "example_inputs_from_batch" in str(err.value)
    assert module.training_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.2, float("nan")])
def test_ratio_outside_unit_interval_is_refused(ratio: float) -> None:
    # PruningSettings' rule: a ratio is in [0, 1) (0 prunes nothing by itself; it was refused before)
    with pytest.raises(SettingsError, match=r"pruning_ratio=\S+: must be (a number )?in \[0, 1\)"):
        StructuredPruning(pruning_ratio=ratio)


def test_ratio_zero_is_accepted() -> None:
    assert StructuredPruning(pruning_ratio=0.0).settings.pruning_ratio == 0.0


def test_string_ratio_is_refused_with_the_pruners_message() -> None:
    with pytest.raises(SettingsError) as from_callback:
        StructuredPruning(pruning_ratio="0.5")
    model = TinyCNN()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SettingsError) as from_pruner:
        Pruner(model, torch.randn(1, 3, 8, 8), "l1", pruning_ratio="0.5")
    assert str(from_callback.value) == str(from_pruner.value)
    assert str(from_callback.value).startswith("pruning_ratio=0.5: must be a number in [0, 1)")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_speedup": 0.8}, r"target_speedup=0.8: must be a number > 1"),
        ({"pruning_ratio": 0.5, "target_speedup": 2.0}, "they are alternatives"),
        ({"schedule": "quadratic"}, "unknown schedule"),
        ({"epochs": [3, 1]}, "strictly increasing"),
        ({"start_epoch": 4, "end_epoch": 2}, "before start_epoch"),
        ({"epochs": [1, 2], "schedule": [0.5]}, "gives 1 ratios but epochs gives 2 pruning epochs"),
        ({"epochs": [1, 2], "iterative_steps": 3}, "gives 3 steps but epochs gives 2 pruning epochs"),
        ({"importance": "tayler"}, "unknown importance"),
        ({"importance_batches": 0}, "importance_batches"),
        ({"pruner_kwargs": {"round_to": 8}}, r"pruner_kwargs\[round_to\]=8: is a pruning setting"),
        ({"pruner_kwargs": {"forward_func": None}}, r"is not a Pruner argument; did you mean forward_fn\?"),
        ({"settings": PruningSettings(), "start_epoch": -1}, "start_epoch=-1: must be an epoch index"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    # the messages are PruningSettings' (key=value: problem; fix), the same in the Pruner and the app
    with pytest.raises(SettingsError, match=message):
        StructuredPruning(**kwargs)


@pytest.mark.parametrize("schedule", ["agp", "exponential", "cubic"])
def test_schedule_aliases_are_accepted(tmp_path: Path, schedule: str) -> None:
    cb = StructuredPruning("magnitude", pruning_ratio=0.5, epochs=[0, 1], schedule=schedule, verbose=False)
    module = LitNet()
    _trainer(tmp_path, [cb], max_epochs=2).fit(module, _data())
    assert cb.settings.schedule == ("exp" if schedule == "exponential" else "cubic")
    assert cb.pruner is not None and cb.pruner.iterative_steps == 2
    assert module.model.conv1.out_channels == 8  # the schedule ends at the ratio


def test_settings_object_and_iterative_steps() -> None:
    settings = PruningSettings(importance="l1", pruning_ratio=0.25, iterative_steps=3, start_epoch=2)
    cb = StructuredPruning(settings=settings)
    assert cb.settings is settings and cb.prune_epochs == [2, 3, 4]
    # options passed as well replace the settings' values (as in the Pruner); the settings are kept
    changed = StructuredPruning(settings=settings, start_epoch=5, verbose=False)
    assert changed.prune_epochs == [5, 6, 7] and changed.settings.importance == "l1"
    assert settings.start_epoch == 2 and settings.verbose
    assert StructuredPruning(iterative_steps=2, every_n_epochs=2).prune_epochs == [0, 2]
    assert StructuredPruning(schedule=[0.2, 0.4, 0.5], start_epoch=1).prune_epochs == [1, 2, 3]


def test_hooks_are_marked_as_overrides() -> None:
    hooks = (
        "setup",
        "teardown",
        "on_fit_start",
        "on_train_batch_start",
        "on_before_optimizer_step",
        "on_train_epoch_end",
        "on_fit_end",
        "on_save_checkpoint",
        "state_dict",
        "load_state_dict",
    )
    for name in hooks:
        assert getattr(getattr(StructuredPruning, name), "__override__", False), name
        assert hasattr(pl.Callback, name), name
    assert getattr(StructuredPruning.state_key.fget, "__override__", False)


def test_sharded_strategy_is_refused_before_training(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    env = dict(os.environ)
    module = LitNet()
    cb = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0], verbose=False)
    try:
        trainer = _trainer(tmp_path, [cb], max_epochs=1, strategy=ModelParallelStrategy())
        with pytest.raises(ValueError, match="does not support the ModelParallelStrategy strategy"):
            trainer.fit(module, _data())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    assert module.training_steps == 0


# ---------------------------------------------------------------------------------------------- W&B


def _wandb_history(run_file: str) -> list[dict[str, Any]]:
    """History rows of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(run_file).read_bytes()
    block, pos, buf, rows = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf += raw[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_wandb_offline_run_holds_macs_and_groups_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="prune-test", save_dir=str(tmp_path), offline=True)
    module = LitNet()
    cb = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0, 1], verbose=False)
    try:
        _trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(module, _data())
    finally:
        wandb.finish()
        wandb.teardown()  # waits until the service has written the run file
    run_dir = Path(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))[0])
    rows = _wandb_history(glob.glob(str(run_dir / "run-*.wandb"))[0])
    macs = [r["prune/macs"] for r in rows if "prune/macs" in r]
    final_macs = count_macs_and_params(module, module.example_input_array)[0]
    assert macs[0] == cb.records[0]["macs"] and macs[-1] == final_macs and len(macs) == 3
    tables = sorted(run_dir.glob("files/media/table/prune/groups_*.table.json"))
    assert len(tables) == 2
    last = max(tables, key=lambda p: int(p.name.split("_")[1]))
    table = json.loads(last.read_text())
    assert table["columns"][:3] == ["step", "epoch", "group"]
    widths = {row[2]: row[5] for row in table["data"]}
    assert widths["model.conv1"] == module.model.conv1.out_channels
    assert any("prune/widths" in k for r in rows for k in r)


class PrunesAtEpochEnd(StructuredPruning):
    """The order of earlier versions: the prune at ``on_train_epoch_end``, after validation."""

    def on_train_batch_end(self, *args: Any) -> None:
        pass


def test_resume_from_checkpoint_saved_before_the_epochs_prune(tmp_path: Path) -> None:
    """A checkpoint saved after an epoch's training but before its prune (written at validation end
    by an earlier version, which pruned at ``on_train_epoch_end``): the resumed run makes up for the
    missed prune before its first step, with the saved gradient statistics."""

    def run(
        max_epochs: int, module: LitNet, ckpt: str | None = None, save: bool = False
    ) -> StructuredPruning:
        pl.seed_everything(0)
        kind = PrunesAtEpochEnd if save or ckpt else StructuredPruning
        cb = kind("taylor", pruning_ratio=0.5, epochs=[0, 1], verbose=False)
        callbacks: list[pl.Callback] = [cb]
        if save:
            callbacks.append(
                pl.callbacks.ModelCheckpoint(
                    dirpath=str(tmp_path / "ckpts"), save_last=True, save_on_train_epoch_end=False
                )
            )
        trainer = _trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=save)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, _data(), _data(n=16), ckpt_path=ckpt)
        return cb

    full = LitNet(optimizer="adam")
    run(3, full)
    run(1, LitNet(optimizer="adam"), save=True)
    ckpt = str(tmp_path / "ckpts" / "last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved[HISTORY_KEY] == []  # saved before the prune of epoch 0
    fresh = LitNet(optimizer="adam", seed=9)
    cb = run(3, fresh, ckpt)
    assert [r["epoch"] for r in cb.records] == [None, 0, 1]
    for k, v in full.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), f"{k} differs after resume"


# ---------------------------------------------------------------------------------------------- state keys


def _count_equal(obj: Any, value: Any) -> int:
    """How many times ``value`` occurs (by equality) anywhere inside nested dicts and lists."""
    if isinstance(obj, (list, tuple)) and obj == value:
        return 1
    if isinstance(obj, dict):
        return sum(_count_equal(v, value) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_equal(v, value) for v in obj)
    return 0


def test_history_is_stored_once_per_checkpoint(tmp_path: Path) -> None:
    cb = StructuredPruning("l1", pruning_ratio=0.5, epochs=[0], verbose=False)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_last=True)
    trainer = _trainer(tmp_path, [cb, ckpt_cb], max_epochs=2, enable_checkpointing=True)
    trainer.fit(LitNet(), _data())
    path = str(tmp_path / "after.ckpt")
    trainer.save_checkpoint(path)
    for file in (path, str(tmp_path / "ckpts" / "last.ckpt")):
        raw = torch.load(file, weights_only=True)
        assert raw[HISTORY_KEY] == cb.history and len(cb.history) >= 1
        assert _count_equal(raw, cb.history) == 1, "the history must be stored exactly once"
        state = raw["callbacks"][cb.state_key]
        assert "history" not in state and state["history_key"] == HISTORY_KEY


def test_checkpoint_with_history_in_callback_state_still_resumes(tmp_path: Path) -> None:
    """Checkpoints of earlier versions: the callback state under the bare class name, holding the
    history (and no top-level history key)."""

    def run(max_epochs: int, module: LitNet, ckpt: str | None = None) -> tuple[pl.Trainer, StructuredPruning]:
        pl.seed_everything(0)
        cb = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0, 2], verbose=False)
        trainer = _trainer(tmp_path, [cb], max_epochs=max_epochs)
        trainer.fit(module, _data(), ckpt_path=ckpt)
        return trainer, cb

    full = LitNet(optimizer="adam")
    run(4, full)
    trainer, cb = run(1, LitNet(optimizer="adam"))
    old = str(tmp_path / "old.ckpt")
    trainer.save_checkpoint(old)
    raw = torch.load(old, weights_only=True)
    state = raw["callbacks"].pop(cb.state_key)
    state["history"] = raw.pop(HISTORY_KEY)
    state["version"] = 1
    del state["history_key"]
    raw["callbacks"]["StructuredPruning"] = state
    torch.save(raw, old)

    assert _shapes(load_pruned(LitNet(seed=4), pruned_from_checkpoint(old))) != _shapes(LitNet())
    fresh = LitNet(optimizer="adam", seed=11)
    with warnings.catch_warnings():
        # the old state is adopted: no "add the callbacks" warning, no "written with pruning epochs"
        warnings.simplefilter("error", UserWarning)
        for ignored in ("many workers", "smaller than the logging interval", "no `val_dataloader`"):
            warnings.filterwarnings("ignore", f".*{ignored}.*")
        _, resumed = run(4, fresh, old)
    assert [r["epoch"] for r in resumed.records] == [None, 0, 2]
    for k, v in full.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), f"{k} differs after resume"


def test_two_callbacks_on_disjoint_parts_coexist_and_resume(tmp_path: Path) -> None:
    def callbacks() -> list[StructuredPruning]:
        first = StructuredPruning(
            "l2", pruning_ratio=0.5, epochs=[0], ignored_layers=["conv2"], verbose=False
        )
        second = StructuredPruning(
            "magnitude", pruning_ratio=0.25, epochs=[0, 1], ignored_layers=["conv1"], verbose=False
        )
        return [first, second]

    def run(max_epochs: int, module: LitNet, ckpt: str | None = None) -> tuple[pl.Trainer, list]:
        pl.seed_everything(0)
        cbs = callbacks()
        trainer = _trainer(tmp_path, cbs, max_epochs=max_epochs)
        trainer.fit(module, _data(), ckpt_path=ckpt)
        return trainer, cbs

    full = LitNet()
    _, (a, b) = run(3, full)
    assert a.state_key != b.state_key
    assert not (a.pruned_layers & b.pruned_layers)
    # both pruned after epoch 0: the second traced the model again after the first one's prune
    assert full.model.conv1.out_channels == 8 and full.model.conv2.in_channels == 8
    assert full.model.conv2.out_channels == 12
    assert [r["epoch"] for r in a.records] == [None, 0] and [r["epoch"] for r in b.records] == [None, 0, 1]
    assert a.history == b.history  # one history per module, in prune order

    trainer, (a1, b1) = run(1, LitNet())
    path = str(tmp_path / "two.ckpt")
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert {a1.state_key, b1.state_key} <= set(raw["callbacks"])
    fresh = LitNet(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, (a2, b2) = run(3, fresh, path)
    assert [r["epoch"] for r in b2.records] == [None, 0, 1]
    assert _shapes(fresh) == _shapes(full)
    for k, v in full.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), f"{k} differs after resume"


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"importance": "l1", "epochs": [1], "ignored_layers": ["fc"]}, "would prune the same layers"),
        ({"importance": "taylor", "epochs": [0], "ignored_layers": ["conv1"]}, "gradient criterion"),
    ],
)
def test_conflicting_callbacks_are_refused_before_training(
    tmp_path: Path, second: dict[str, Any], message: str
) -> None:
    module = LitNet()
    before = copy.deepcopy(module.state_dict())
    first = StructuredPruning("l1", pruning_ratio=0.5, epochs=[0], verbose=False)
    other = StructuredPruning(pruning_ratio=0.5, verbose=False, **second)
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, [first, other], max_epochs=2).fit(module, _data())
    assert module.training_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_callbacks_with_the_same_state_key_are_refused_by_lightning(tmp_path: Path) -> None:
    """Same ignored_layers: the same groups, and the same state key; Lightning refuses the pair."""
    first = StructuredPruning("l1", pruning_ratio=0.5, epochs=[0], verbose=False)
    second = StructuredPruning("l2", pruning_ratio=0.25, epochs=[1], verbose=False)
    assert first.state_key == second.state_key
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        _trainer(tmp_path, [first, second])
