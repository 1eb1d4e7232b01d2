"""Pruning history: replay on a fresh model reproduces the pruned model exactly; save/load of
pruned models through plain tensors and ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from prune_callbacks.pruning.history import (
    apply_pruning_history,
    get_pruning_history,
    load_pruned,
    save_pruned,
)
from prune_callbacks.pruning.pruner import Pruner
from prune_callbacks.reference.models import TinyViT, cifar_resnet, densenet
from randnet import SplitSizes

pytestmark = pytest.mark.filterwarnings("ignore:prune_callbacks")


def _x(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _replay_equal(make, x: torch.Tensor, prune) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = make().eval()
    prune(model, x)
    history = get_pruning_history(model)
    assert history
    torch.manual_seed(123)  # a fresh model with other weights: only the structure comes from the history
    fresh = make().eval()
    apply_pruning_history(fresh, history)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    return model, fresh


def _steps(n: int, **kwargs):
    def prune(model: nn.Module, x: torch.Tensor) -> None:
        pruner = Pruner(model, x, "l2", iterative_steps=n, **kwargs)
        for _ in range(n):
            pruner.step()

    return prune


def test_replay_resnet_iterative_global() -> None:
    _replay_equal(lambda: cifar_resnet(20), _x(), _steps(2, pruning_ratio=0.5, global_pruning=True))


def test_replay_densenet_interactive_records() -> None:
    def prune(model: nn.Module, x: torch.Tensor) -> None:
        pruner = Pruner(model, x, "l1", pruning_ratio=0.4)
        for group in pruner.step(interactive=True):
            group.prune()

    make = lambda: densenet(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=10)  # noqa: E731
    model, _ = _replay_equal(make, _x(), prune)
    assert len(get_pruning_history(model)) > 1  # one record per group


def test_replay_vit_parameters_and_heads() -> None:
    make = lambda: TinyViT(dim=64, depth=2, num_heads=4)  # noqa: E731
    model, fresh = _replay_equal(
        make, _x(1), _steps(1, pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5)
    )
    assert fresh.cls_token.shape == model.cls_token.shape and fresh.cls_token.shape[-1] < 64
    assert fresh.blocks[0].attn.num_heads == model.blocks[0].attn.num_heads


class SplitNet(nn.Module):
    """A split whose sizes live in a module attribute, so the history must record them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.split = SplitSizes([4, 8])
        self.a = nn.Conv2d(4, 6, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.split(torch.relu(self.c1(x)))
        y = torch.cat([self.a(p), self.b(q)], dim=1)
        return self.head(y.mean((2, 3)))


def test_replay_split_attributes() -> None:
    model, fresh = _replay_equal(SplitNet, _x(), _steps(1, pruning_ratio=0.5))
    assert model.split.sizes != [4, 8]
    assert fresh.split.sizes == model.split.sizes


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_replay_tied_weights() -> None:
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = Tied()
    Pruner(model, ids, "l2", pruning_ratio=0.5).step()
    assert model.emb.weight.shape[1] < 16 and model.head.weight is model.emb.weight
    fresh = Tied()
    apply_pruning_history(fresh, get_pruning_history(model))
    assert fresh.emb.weight.shape == model.emb.weight.shape and fresh.head.weight is fresh.emb.weight
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(ids), model(ids))


def test_save_and_load_pruned_with_weights_only(tmp_path) -> None:
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    x = _x()
    pruner = Pruner(model, x, "l2", pruning_ratio=0.5, iterative_steps=2)
    pruner.step()
    pruner.step()
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    data = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert set(data) == {"format", "history", "state_dict", "digests"}
    json.dumps(data["history"])  # the history is plain data
    fresh = load_pruned(cifar_resnet(20).eval(), path)
    assert torch.equal(fresh(x), model(x))
    again = load_pruned(cifar_resnet(20).eval(), data)  # an already loaded dict works too
    assert torch.equal(again(x), model(x))
    # the loaded model carries its history, so it can be saved and loaded again
    path2 = tmp_path / "again.pt"
    save_pruned(fresh, path2)
    assert torch.equal(load_pruned(cifar_resnet(20).eval(), path2)(x), model(x))


def test_save_unpruned_model(tmp_path) -> None:
    model = cifar_resnet(20).eval()
    save_pruned(model, tmp_path / "dense.pt")
    loaded = load_pruned(cifar_resnet(20).eval(), tmp_path / "dense.pt")
    assert torch.equal(loaded(_x()), model(_x()))


def test_bad_history_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    Pruner(model, _x(), "l2", pruning_ratio=0.5).step()
    history = copy.deepcopy(get_pruning_history(model))
    history[-1]["items"][-1]["target"] = "no.such.layer"
    fresh = cifar_resnet(20).eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(KeyError, match="no.such.layer"):
        apply_pruning_history(fresh, history)
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not get_pruning_history(fresh)
    history[-1]["items"][-1]["target"] = get_pruning_history(model)[-1]["items"][-1]["target"]
    history[0]["items"][0]["idxs"] = [10_000]
    with pytest.raises(ValueError, match="record 0"):
        apply_pruning_history(fresh, history)


def test_load_rejects_other_files(tmp_path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="save_pruned"):
        load_pruned(cifar_resnet(20), tmp_path / "other.pt")


def test_load_a_checkpoint_style_dict() -> None:
    """A Lightning checkpoint keeps the history under ``prune_callbacks_history``."""
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    Pruner(model, _x(), "l2", pruning_ratio=0.5).step()
    ckpt = {
        "state_dict": model.state_dict(),
        "prune_callbacks_history": get_pruning_history(model),
        "epoch": 3,
    }
    fresh = load_pruned(cifar_resnet(20).eval(), ckpt)
    assert torch.equal(fresh(_x()), model(_x()))
