"""FLAP with ``add_bias=True`` in the Lightning callback: the biases it adds are in the pruning
history of the checkpoint, so ``load_pruned`` and a resumed ``Trainer.fit(ckpt_path=...)`` on a
freshly constructed module rebuild them and load the weights strictly (issue 19).

A resume also loads the optimizer state saved after the prune into the optimizer that
``configure_optimizers`` builds on the replayed module, which trains the new biases; the
optimizer of the first run must therefore train them too
(:func:`~prune_callbacks.pruning.calibration.add_new_biases_to_optimizers`, which the callback
calls after every step).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import cpu_trainer
from prune_callbacks import get_pruning_history, load_pruned
from prune_callbacks.integrations.lightning.callback import StructuredPruning
from prune_callbacks.pruning.calibration import FLAPImportance
from prune_callbacks.pruning.history import ADD_BIAS
from prune_callbacks.reference.models.llama import LlamaMLP


class LitMLP(pl.LightningModule):
    """A SwiGLU MLP without biases, regressing random targets."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = LlamaMLP(8, 16)
        self.example_input_array = torch.randn(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data() -> DataLoader:
    gen = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.randn(32, 8, generator=gen), torch.randn(32, 8, generator=gen)), 8)


def _fit(tmp_path: Path, module: LitMLP, max_epochs: int, ckpt: str | None) -> pl.Trainer:
    callback = StructuredPruning(FLAPImportance(add_bias=True), pruning_ratio=0.5, epochs=[0], verbose=False)
    trainer = cpu_trainer(tmp_path, [callback], max_epochs=max_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(), ckpt_path=ckpt)
    return trainer


def test_flap_biases_survive_a_checkpoint_and_a_resume(tmp_path: Path) -> None:
    module = LitMLP()
    trainer = _fit(tmp_path, module, 1, None)
    assert module.mlp.down_proj.bias is not None and module.mlp.down_proj.in_features == 8
    assert [r.get("kind") for r in get_pruning_history(module)][-1] == ADD_BIAS
    ckpt = str(tmp_path / "pruned.ckpt")
    trainer.save_checkpoint(ckpt)

    loaded = load_pruned(LitMLP(seed=1), ckpt)  # strict
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)

    fresh = LitMLP(seed=1)
    resumed = _fit(tmp_path, fresh, 2, ckpt)  # the resume replays the history, biases included
    assert fresh.mlp.down_proj.bias is not None and fresh.mlp.down_proj.in_features == 8
    assert get_pruning_history(fresh)[: len(get_pruning_history(module))] == get_pruning_history(module)
    trained = {id(p) for g in resumed.optimizers[0].param_groups for p in g["params"]}
    assert id(fresh.mlp.down_proj.bias) in trained


def test_block_by_block_calibration_from_the_callback(tmp_path: Path) -> None:
    """``pruner_kwargs`` hands the callback's Pruner calibration batches and the blocks: each
    scheduled prune then calibrates the decoder layers one after another (on the outputs of the
    layers pruned before), and the result replays from the checkpoint's history."""
    from prune_callbacks.reference.models import TinyLlama
    from prune_callbacks.reference.tasks import CausalLM

    def module() -> CausalLM:
        torch.manual_seed(0)
        net = TinyLlama(
            vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16
        )
        return CausalLM(net, 64, seq_len=16)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (16, 17), generator=gen)
    data = DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4)
    calibration = [ids[i : i + 4, :-1] for i in range(0, 16, 4)]
    lit = module()
    callback = StructuredPruning(
        "wanda",
        pruning_ratio=0.5,
        epochs=[0],
        ignored_layers=["*embed_tokens", "*lm_head", "*.o_proj", "*.down_proj", "*norm*"],
        pruner_kwargs={"calibration_data": calibration, "calibration_blocks": "model.layers"},
        verbose=False,
    )
    trainer = cpu_trainer(tmp_path, [callback], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, data)
    assert callback.pruner is not None and callback.pruner.calibration_blocks is not None
    assert [layer.mlp.up_proj.out_features for layer in lit.model.layers] == [32, 32, 32]
    assert callback.pruner.timings.get("calibration", 0.0) > 0.0
    ckpt = str(tmp_path / "seq.ckpt")
    trainer.save_checkpoint(ckpt)
    fresh = load_pruned(module(), ckpt)
    x = calibration[0]
    lit.eval()
    with torch.no_grad():
        assert torch.equal(lit(x), fresh.eval()(x))
