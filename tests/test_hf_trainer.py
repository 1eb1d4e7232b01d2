"""The Hugging Face ``Trainer`` callback (``prune_callbacks.integrations.hf.trainer``) on a tiny Llama
built from a config (random weights, no download), on CPU: the schedule (epochs and steps), logs,
resume from a mid-schedule checkpoint, gradient statistics under gradient accumulation and mixed
precision, the optimizer state across a prune, and the README snippet."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

tf = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from prune_callbacks.integrations.hf.trainer import (  # noqa: E402
    HISTORY_FILE,
    STATE_FILE,
    StructuredPruningCallback,
    read_checkpoint_history,
)
from prune_callbacks.measure.flops import count_macs_and_params  # noqa: E402
from prune_callbacks.pruning.history import apply_pruning_history  # noqa: E402
from prune_callbacks.pruning.settings import PruningSettings, SettingsError  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
GATE = "model.layers.0.mlp.gate_proj.weight"


def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(cfg)


def _data(n: int = 8, length: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 64, (n, length), generator=torch.Generator().manual_seed(1))
    return [
        {"input_ids": r, "attention_mask": torch.ones(length, dtype=torch.long), "labels": r} for r in ids
    ]


def _args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        num_train_epochs=3,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        learning_rate=1e-3,
    )
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Logs seen by callbacks (as a report_to logger sees them) and parameter shapes after events."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.epoch_shapes: list[tuple[int, ...]] = []
        self.step_shapes: list[tuple[int, ...]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epoch_shapes.append(tuple(model.get_parameter(GATE).shape))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_shapes.append(tuple(model.get_parameter(GATE).shape))

    def prune_logs(self) -> list[dict[str, float]]:
        return [log for log in self.logs if "prune/macs" in log]


def _train(model, args, pruning, *before: TrainerCallback, after: tuple = (), resume=None) -> Trainer:
    trainer = Trainer(model=model, args=args, train_dataset=_data())
    for cb in before:
        trainer.add_callback(cb)
    pruning.attach(trainer)
    for cb in after:
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=pruning.restore(resume) if resume else None)
    return trainer


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def test_settings_are_the_shared_rulebook():
    # the same SettingsError as the Pruner / Lightning callback, raised when the callback is built
    with pytest.raises(SettingsError, match=r"^pruning_ratio=1.5: must be in \[0, 1\)"):
        StructuredPruningCallback(pruning_ratio=1.5)
    with pytest.raises(SettingsError, match="did you mean pruning_ratio"):
        StructuredPruningCallback(pruning_ratoi=0.5)
    with pytest.raises(SettingsError, match="^epochs=.*epoch schedule.*step schedule"):
        StructuredPruningCallback(epochs=[1], prune_steps=[4])
    with pytest.raises(SettingsError, match="^prune_steps=.*strictly increasing"):
        StructuredPruningCallback(prune_steps=[4, 2])
    with pytest.raises(SettingsError, match="^prune_steps=.*gives 2 pruning steps but the settings give 3"):
        StructuredPruningCallback(prune_steps=[2, 4], iterative_steps=3)
    with pytest.raises(SettingsError, match=r"^pruner_kwargs\[round_to\]=8: is a pruning setting"):
        StructuredPruningCallback(pruner_kwargs={"round_to": 8})
    cb = StructuredPruningCallback(settings=PruningSettings(pruning_ratio=0.3, epochs=[1, 2]), round_to=4)
    assert (cb.settings.pruning_ratio, cb.settings.round_to, cb.prune_points, cb.by_steps) == (
        0.3,
        4,
        [1, 2],
        False,
    )
    cb = StructuredPruningCallback(every_n_steps=5, iterative_steps=3)
    assert (cb.prune_points, cb.by_steps) == ([5, 10, 15], True)
    assert StructuredPruningCallback(prune_steps=[3, 6]).settings.steps == 2


# ---------------------------------------------------------------------------------------------
# (a) the schedule, MACs logged
# ---------------------------------------------------------------------------------------------


def test_prunes_after_scheduled_epochs_and_logs_macs(tmp_path):
    model, rec = _llama(), Recorder()
    pruning = StructuredPruningCallback("taylor", pruning_ratio=0.5, epochs=[0, 1])
    trainer = _train(model, _args(tmp_path), pruning, after=(rec,))
    # 2 optimizer steps per epoch; linear schedule: 25 % then 50 % of every group's channels
    assert rec.epoch_shapes == [(48, 24), (32, 16), (32, 16)]
    assert rec.step_shapes == [(64, 32), (64, 32), (48, 24), (48, 24), (32, 16), (32, 16)]
    logs = rec.prune_logs()
    assert [log["prune/step"] for log in logs] == [0, 1, 2]
    dense, final = logs[0]["prune/macs"], logs[-1]["prune/macs"]
    assert logs[0]["prune/dense_macs"] == dense and dense > logs[1]["prune/macs"] > final
    macs, params = count_macs_and_params(model, pruning.example_inputs)
    assert (final, logs[-1]["prune/params"]) == (macs, params) == (pruning.records[-1]["macs"], params)
    assert logs[-1]["prune/speedup"] == pytest.approx(dense / final)
    assert logs[-1][f"prune/width/{GATE.removesuffix('.weight')}"] == 32
    # the same entries in the Trainer's history (saved in trainer_state.json)
    assert [h["prune/macs"] for h in trainer.state.log_history if "prune/macs" in h] == [
        dense,
        logs[1]["prune/macs"],
        final,
    ]


def test_prunes_after_scheduled_optimizer_steps(tmp_path):
    model, rec = _llama(), Recorder()
    pruning = StructuredPruningCallback("taylor", pruning_ratio=0.5, prune_steps=[2, 3], importance_batches=1)
    args = _args(tmp_path, max_steps=4, logging_strategy="steps", logging_steps=1)
    _train(model, args, pruning, after=(rec,))
    assert rec.step_shapes == [(64, 32), (48, 24), (32, 16), (32, 16)]
    assert [(r["step"], r["global_step"]) for r in pruning.records] == [(0, 0), (1, 2), (2, 3)]
    # the Trainer's own logs of the pruning steps are still there (loss at every step)
    assert len([log for log in rec.logs if "loss" in log]) == 4


# ---------------------------------------------------------------------------------------------
# (b) resume from a mid-schedule checkpoint
# ---------------------------------------------------------------------------------------------


def test_resume_mid_schedule_matches_an_uninterrupted_run(tmp_path):
    # checkpoints every 3 steps; checkpoint-3 is mid-epoch 1: one prune done, the gradient
    # statistics of the second prune half gathered
    kw = dict(save_strategy="steps", save_steps=3)
    full = StructuredPruningCallback("taylor", pruning_ratio=0.5, epochs=[0, 1])
    model_a = _llama()
    _train(model_a, _args(tmp_path / "a", **kw), full)
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / HISTORY_FILE).is_file() and (ckpt / STATE_FILE).is_file()
    assert not list(ckpt.glob("*.tmp-*"))
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert (state["steps_done"], state["window"], state["importance"]["num_batches"]) == (1, 1, 1)

    # a fresh model (same initial weights) gets the pruned structure, then the checkpoint's weights
    resumed = StructuredPruningCallback("taylor", pruning_ratio=0.5, epochs=[0, 1])
    model_b = _llama(seed=1)  # other initial weights: they all come from the checkpoint
    _train(model_b, _args(tmp_path / "b", **kw), resumed, resume=str(ckpt))
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert {k: v.shape for k, v in sd_a.items()} == {k: v.shape for k, v in sd_b.items()}
    assert sd_a[GATE].shape == (32, 16)
    for k in sd_a:
        torch.testing.assert_close(sd_b[k], sd_a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["macs"] for r in resumed.records] == [r["macs"] for r in full.records]
    assert resumed.history == full.history


def test_resume_without_restore_says_what_to_do(tmp_path):
    pruning = StructuredPruningCallback("magnitude", pruning_ratio=0.5, epochs=[0])
    _train(_llama(), _args(tmp_path / "a", num_train_epochs=1, save_strategy="epoch"), pruning)
    ckpt = tmp_path / "a" / "checkpoint-2"
    trainer = Trainer(model=_llama(), args=_args(tmp_path / "b"), train_dataset=_data())
    StructuredPruningCallback("magnitude", pruning_ratio=0.5, epochs=[0]).attach(trainer)
    with pytest.raises(RuntimeError, match=r"call StructuredPruningCallback.restore\(checkpoint\)"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    # the history file rebuilds the structure without the callback too
    fresh = _llama()
    apply_pruning_history(fresh, read_checkpoint_history(ckpt))
    assert fresh.get_parameter(GATE).shape == (32, 16)


# ---------------------------------------------------------------------------------------------
# (c) gradient statistics: gradient accumulation, clipping, mixed precision
# ---------------------------------------------------------------------------------------------


def _hand_taylor(
    model: nn.Module, batch: list[dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], float]:
    """w * dL/dw of the step's loss (the token mean over the whole step: 4 sequences of one length),
    and the gradient norm."""
    ids = torch.stack([b["input_ids"] for b in batch])
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))
    return {n: (model.get_parameter(n).detach() * g).float() for n, g in grads.items()}, norm


def _one_step(tmp_path: Path, pruning: StructuredPruningCallback | None, **kw: Any) -> Trainer:
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1, **kw)
    trainer = Trainer(model=_llama(), args=args, train_dataset=_data(n=4))
    if pruning is not None:
        pruning.attach(trainer)
    trainer.train()
    return trainer


def test_gradient_accumulation_statistic_is_the_full_unclipped_gradient(tmp_path):
    # 4 samples, 2 per micro-batch, 2 micro-batches: one optimizer step over the whole set, so the
    # accumulated gradient does not depend on the shuffle. max_grad_norm=1 clips this step (norm ~1.7).
    reference, norm = _hand_taylor(_llama(), _data(n=4))
    assert norm > 1.2  # so the Trainer's clipping would have scaled this gradient
    pruning = StructuredPruningCallback("taylor", pruning_ratio=0.5, prune_steps=[2])
    trainer = _one_step(tmp_path / "cb", pruning, max_grad_norm=1.0)
    stats = pruning.importance.state_dict(trainer.model)
    assert (stats["num_batches"], stats["skipped_batches"]) == (1, 0)
    assert set(stats["acc"]) == set(reference)
    for name, ref in reference.items():
        entry = stats["acc"][name]
        assert entry["count"] == 1
        torch.testing.assert_close(entry["total"], ref, rtol=1e-4, atol=1e-9, msg=name)
    # training itself is unchanged: the callback clipped exactly as the Trainer would have
    plain = _one_step(tmp_path / "plain", None, max_grad_norm=1.0)
    for (name, p), q in zip(trainer.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    assert trainer.args.max_grad_norm == 1.0


def test_bf16_autocast_statistic_matches_fp32_within_bf16_precision(tmp_path):
    reference, _ = _hand_taylor(_llama(), _data(n=4))
    pruning = StructuredPruningCallback("taylor", pruning_ratio=0.5, prune_steps=[2])
    trainer = _one_step(tmp_path, pruning, bf16=True)
    acc = pruning.importance.state_dict(trainer.model)["acc"]
    got = torch.cat([acc[n]["total"].flatten() for n in reference])
    ref = torch.cat([reference[n].flatten() for n in reference])
    # unscaled and complete: same size and direction as the fp32 statistic, up to bf16 rounding
    assert float(got.norm() / ref.norm()) == pytest.approx(1.0, abs=0.05)
    assert float(torch.nn.functional.cosine_similarity(got, ref, dim=0)) > 0.99


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_loss_scaled_gradients_are_unscaled_first(tmp_path, max_grad_norm):
    """fp16 AMP on a GPU scales the loss with a GradScaler, which accelerate leaves out on CPU: the
    test hands the Trainer's accelerator a CPU GradScaler (scale 4096) before ``train``, so the
    backward passes are scaled as on a GPU. The statistic must be the unscaled one."""
    reference, _ = _hand_taylor(_llama(), _data(n=4))
    args = _args(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        fp16=True,
        max_grad_norm=max_grad_norm,
    )
    trainer = Trainer(model=_llama(), args=args, train_dataset=_data(n=4))
    if not (hasattr(trainer.accelerator, "scaler") and hasattr(trainer.accelerator, "native_amp")):
        pytest.skip("this accelerate keeps its GradScaler elsewhere")
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    pruning = StructuredPruningCallback("taylor", pruning_ratio=0.5, prune_steps=[2]).attach(trainer)
    trainer.train()
    assert trainer.optimizer.scaler is trainer.accelerator.scaler  # the losses were scaled by 4096
    acc = pruning.importance.state_dict(trainer.model)["acc"]
    got = torch.cat([acc[n]["total"].flatten() for n in reference])
    ref = torch.cat([reference[n].flatten() for n in reference])
    assert float(got.norm() / ref.norm()) == pytest.approx(1.0, abs=0.02)
    assert float(torch.nn.functional.cosine_similarity(got, ref, dim=0)) > 0.999
    assert trainer.args.max_grad_norm == max_grad_norm


class StopEveryStep(TrainerCallback):
    """An early stop (as ``EarlyStoppingCallback`` requests one) after every optimizer step."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


@pytest.mark.parametrize("hold", [True, False])
def test_hold_early_stopping_keeps_training_until_the_last_prune(tmp_path, hold, caplog):
    pruning = StructuredPruningCallback("magnitude", pruning_ratio=0.5, epochs=[1], hold_early_stopping=hold)
    trainer = _train(_llama(), _args(tmp_path), pruning, StopEveryStep())
    if hold:  # epoch 1 ends after step 4: the prune, then the next stop request is honoured
        assert (trainer.state.global_step, pruning.steps_done) == (5, 1)
    else:
        assert (trainer.state.global_step, pruning.steps_done) == (1, 0)
        assert "0 of 1 scheduled prunes done" in caplog.text


# ---------------------------------------------------------------------------------------------
# (d) optimizer state across a prune, LR schedule
# ---------------------------------------------------------------------------------------------


class OptimizerSnapshot(TrainerCallback):
    """AdamW moments and weights of the 2-D parameters at the end of epoch 0."""

    def __init__(self) -> None:
        self.taken: dict[str, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.taken:
            return
        for name, p in model.named_parameters():
            if p.dim() == 2:
                st = optimizer.state[p]
                self.taken[name] = {
                    "w": p.detach().clone(),
                    "m": st["exp_avg"].clone(),
                    "v": st["exp_avg_sq"].clone(),
                }


def _kept(before: torch.Tensor, after: torch.Tensor) -> tuple[list[int], list[int]]:
    """Rows and columns of ``before`` kept in ``after``, found by value (random weights are distinct;
    repeated values such as the padding embedding's zeros are not used to locate them)."""
    counts: dict[float, int] = {}
    for v in before.flatten().tolist():
        counts[v] = counts.get(v, 0) + 1
    where = {v: divmod(i, before.shape[1]) for i, v in enumerate(before.flatten().tolist()) if counts[v] == 1}
    rows: dict[int, int] = {}
    cols: dict[int, int] = {}
    for i, row in enumerate(after.tolist()):
        for j, v in enumerate(row):
            if v in where:
                r, c = where[v]
                assert rows.setdefault(i, r) == r and cols.setdefault(j, c) == c
    col_idx = [cols[j] for j in range(after.shape[1])]
    for i in range(after.shape[0]):  # a row of repeated values (the padding embedding): by its content
        if i not in rows:
            free = [r for r in range(before.shape[0]) if r not in rows.values()]
            rows[i] = next(r for r in free if torch.equal(before[r, col_idx], after[i]))
    kept = [rows[i] for i in range(after.shape[0])], col_idx
    torch.testing.assert_close(after, before[kept[0]][:, kept[1]], rtol=0, atol=0)
    return kept


def test_adamw_moments_follow_the_prune_and_training_continues(tmp_path):
    before, after, rec = OptimizerSnapshot(), OptimizerSnapshot(), Recorder()
    pruning = StructuredPruningCallback("taylor", pruning_ratio=0.5, epochs=[0])
    args = _args(
        tmp_path, num_train_epochs=2, logging_strategy="steps", logging_steps=1, lr_scheduler_type="linear"
    )
    trainer = _train(_llama(), args, pruning, before, after=(after, rec))
    changed = 0
    for name, b in before.taken.items():
        a = after.taken[name]
        rows, cols = _kept(b["w"], a["w"])
        if a["w"].shape != b["w"].shape:
            changed += 1
        for key in ("m", "v"):
            torch.testing.assert_close(a[key], b[key][rows][:, cols], rtol=0, atol=0, msg=f"{name} {key}")
    assert changed >= 10  # embeddings, q/k/v/o, gate/up/down of both layers, lm_head
    # training went on with the same optimizer: 4 steps, moments shaped like their parameters
    assert trainer.state.global_step == 4
    opt = trainer.optimizer
    for p in trainer.model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
        assert int(opt.state[p]["step"]) == 4
    # and the LR scheduler too: linear decay from 1e-3 over 4 steps, logged before each step's update
    lrs = [log["learning_rate"] for log in rec.logs if "learning_rate" in log]
    assert lrs == pytest.approx([1e-3 * (1 - k / 4) for k in range(4)], rel=1e-6)
    assert all(math.isfinite(log["loss"]) for log in rec.logs if "loss" in log)


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Hugging Face Trainer\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section is not None, "README.md has no '## Hugging Face Trainer' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block is not None, "the section has no python snippet"
    return block.group(1)


def test_readme_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _readme_snippet()
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(code, "README: Hugging Face Trainer", "exec"), namespace)
    # the resumed model has the structure of the end of the schedule, written into every checkpoint
    model = namespace["model"]
    assert model.model.layers[0].mlp.gate_proj.out_features == 64
    assert namespace["pruning"].records[-1]["speedup"] > 1.5
    history = read_checkpoint_history(tmp_path / "hf_pruned" / "checkpoint-3")
    assert history is not None and json.loads(json.dumps(history)) == namespace["pruning"].history
