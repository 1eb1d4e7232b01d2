"""Issue 15, Lightning-native loading: with the :class:`PrunedCheckpoints` mixin a pruned
checkpoint loads through ``load_from_checkpoint`` and ``Trainer.validate(ckpt_path=...)``
without the callback, and a dense checkpoint loads into a pruned module."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import LitNet, cpu_trainer, random_loader
from prune_callbacks import (
    PrunedCheckpoints,
    Pruner,
    StructuredPruning,
    apply_pruning_history,
    get_pruning_history,
    load_pruned,
)


class Net(PrunedCheckpoints, LitNet):
    """The tests' LitNet with the mixin."""


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def _pruned_checkpoint(tmp_path: Path) -> tuple[Net, Path]:
    module = Net()
    prune = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0], verbose=False)
    save = ModelCheckpoint(dirpath=tmp_path, filename="pruned", save_last=False)
    trainer = cpu_trainer(tmp_path, [prune, save], max_epochs=1, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, random_loader())
    return module, tmp_path / "pruned.ckpt"


def test_load_from_checkpoint_gets_the_pruned_structure(tmp_path: Path) -> None:
    module, path = _pruned_checkpoint(tmp_path)
    assert module.model.conv1.out_channels == 8
    loaded = Net.load_from_checkpoint(path)
    assert loaded.model.conv1.out_channels == 8
    assert get_pruning_history(loaded) == get_pruning_history(module)
    module.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(X), module(X))


def test_validate_with_ckpt_path_without_the_callback(tmp_path: Path) -> None:
    module, path = _pruned_checkpoint(tmp_path)
    fresh = Net()
    trainer = _trainer()
    trainer.validate(fresh, random_loader(n=16), ckpt_path=str(path))
    assert fresh.model.conv1.out_channels == 8
    module.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(X), module(X))


def test_dense_checkpoint_loads_into_a_pruned_module(tmp_path: Path) -> None:
    dense = Net()
    dense_path = tmp_path / "dense.ckpt"
    trainer = _trainer()
    trainer.strategy.connect(dense)
    trainer.save_checkpoint(dense_path)
    pruned, _ = _pruned_checkpoint(tmp_path / "run")
    before = {n: p.shape for n, p in pruned.named_parameters()}
    trainer = _trainer()
    trainer.validate(pruned, random_loader(n=16), ckpt_path=str(dense_path))
    assert {n: p.shape for n, p in pruned.named_parameters()} == before
    # the pruned module now holds the dense weights of its kept channels
    expected = apply_pruning_history(copy.deepcopy(dense), get_pruning_history(pruned)).state_dict()
    assert pruned.state_dict().keys() == expected.keys()
    for name, value in pruned.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_module_pruned_differently_is_refused(tmp_path: Path) -> None:
    _, path = _pruned_checkpoint(tmp_path)
    other = Net()
    Pruner(other, X, "l2", pruning_ratio=0.25).step()
    shapes = {n: p.shape for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="pruned differently"):
        _trainer().validate(other, random_loader(n=16), ckpt_path=str(path))
    assert {n: p.shape for n, p in other.named_parameters()} == shapes


class Predicting(Net):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def test_test_and_predict_with_ckpt_path_without_the_callback(tmp_path: Path) -> None:
    module, path = _pruned_checkpoint(tmp_path)
    module.eval()
    loader = random_loader(n=16)
    fresh = Predicting()
    results = _trainer().test(fresh, loader, ckpt_path=str(path))
    assert fresh.model.conv1.out_channels == 8
    expected = F.cross_entropy(module(loader.dataset.tensors[0]), loader.dataset.tensors[1])
    assert results[0]["test_loss"] == pytest.approx(float(expected), rel=1e-5)
    fresh = Predicting()
    predictions = _trainer().predict(fresh, loader, ckpt_path=str(path))
    assert predictions is not None
    torch.testing.assert_close(torch.cat(predictions), module(loader.dataset.tensors[0]))  # type: ignore[arg-type]


def test_fit_resumes_from_a_pruned_checkpoint_without_the_callback(tmp_path: Path) -> None:
    """The mixin alone: fine-tuning goes on from a pruned checkpoint (weights, optimizer state
    for the pruned shapes) in a Trainer without the pruning callback."""
    module, path = _pruned_checkpoint(tmp_path)
    fresh = Net()
    trainer = cpu_trainer(tmp_path / "more", [], max_epochs=2)
    trainer.fit(fresh, random_loader(), ckpt_path=str(path))
    assert fresh.model.conv1.out_channels == 8
    assert trainer.current_epoch == 2
    assert not torch.equal(fresh.model.conv1.weight, module.model.conv1.weight)  # it trained on


def test_without_the_mixin_the_error_names_load_pruned(tmp_path: Path) -> None:
    """A module class without the mixin and no callback attached cannot take the pruned weights;
    the checkpoint's marker entry makes torch's error say how to load it."""
    module, path = _pruned_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match=r"prune_callbacks\.load_pruned"):
        LitNet.load_from_checkpoint(path)
    with pytest.raises(RuntimeError, match=r"PrunedCheckpoints"):
        _trainer().validate(LitNet(), random_loader(n=16), ckpt_path=str(path))
    # the documented way works, and the marker is not a weight
    loaded = load_pruned(LitNet(), path)
    assert loaded.model.conv1.out_channels == 8
    assert set(loaded.state_dict()) == set(module.state_dict())
