"""Tests for the reference models: sizes, MACs, output shapes and head-prunable attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prune_callbacks.measure.flops import count_macs_and_params, count_params
from prune_callbacks.reference.data.digits import DigitsDataModule
from prune_callbacks.reference.models import (
    DigitsResNet,
    TinyLlama,
    TinyViT,
    cifar_resnet,
    densenet,
    densenet121_like,
    densenet201_like,
    resnet50_like,
    vgg_cifar,
)


def test_resnet50_size_and_macs_on_meta() -> None:
    with torch.device("meta"):
        model = resnet50_like()
        x = torch.empty(1, 3, 224, 224)
    macs, params = count_macs_and_params(model, x)
    assert params == 25_557_032  # torchvision's resnet50
    assert 4.0e9 < macs < 4.2e9  # the usual "4.1 GFLOPs" (MACs)


def test_densenet_sizes_on_meta() -> None:
    with torch.device("meta"):
        assert count_params(densenet121_like()) == 7_978_856  # torchvision's densenet121
        assert count_params(densenet201_like()) == 20_013_928  # torchvision's densenet201
        model = densenet121_like()
        x = torch.empty(1, 3, 224, 224)
    macs, _ = count_macs_and_params(model, x)
    assert 2.8e9 < macs < 2.9e9


def test_cifar_resnet56_size() -> None:
    with torch.device("meta"):
        model = cifar_resnet(56)
        x = torch.empty(1, 3, 32, 32)
    macs, params = count_macs_and_params(model, x)
    assert 0.84e6 < params < 0.87e6
    assert 120e6 < macs < 130e6
    with pytest.raises(ValueError, match="6n"):
        cifar_resnet(57)


@pytest.mark.parametrize(
    ("build", "shape", "out"),
    [
        (lambda: resnet50_like(num_classes=7), (1, 3, 64, 64), (1, 7)),
        (lambda: densenet121_like(num_classes=5), (1, 3, 64, 64), (1, 5)),
        (lambda: densenet(12, (2, 3), 16, 4), (2, 3, 32, 32), (2, 4)),
        (lambda: cifar_resnet(20), (2, 3, 32, 32), (2, 10)),
        (lambda: vgg_cifar(16, width_mult=0.25), (2, 3, 32, 32), (2, 10)),
        (lambda: vgg_cifar(19, num_classes=100, width_mult=0.125), (2, 3, 32, 32), (2, 100)),
        (lambda: TinyViT(), (2, 3, 32, 32), (2, 10)),
        (
            lambda: TinyViT(image_size=8, patch_size=2, in_chans=1, dim=32, depth=2, num_heads=2),
            (3, 1, 8, 8),
            (3, 10),
        ),
        (lambda: DigitsResNet(), (4, 1, 8, 8), (4, 10)),
    ],
)
def test_image_model_output_shapes(build, shape: tuple[int, ...], out: tuple[int, ...]) -> None:
    model = build().eval()
    with torch.no_grad():
        y = model(torch.randn(shape))
    assert y.shape == out
    assert torch.isfinite(y).all()


def test_densenet_layer_reads_concatenation() -> None:
    model = densenet(8, (3,), 16, 2)
    block = model.features.denseblock1
    assert [layer.conv1.in_channels for layer in block.layers] == [16, 24, 32]
    assert model.classifier.in_features == 16 + 3 * 8


def test_vgg_width_mult_and_errors() -> None:
    model = vgg_cifar(11, width_mult=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 256, 256, 256, 256]
    with pytest.raises(ValueError):
        vgg_cifar(17)


def _keep_heads(weight: torch.Tensor, heads: list[int], head_dim: int, dim: int) -> torch.Tensor:
    """Rows (dim=0) or columns (dim=1) of ``weight`` that belong to ``heads``."""
    index = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    return weight.index_select(dim, index).clone()


def test_vit_head_pruning_by_attributes() -> None:
    torch.manual_seed(0)
    model = TinyViT(dim=64, depth=2, num_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = [0, 2]
    for block in model.blocks:
        attn = block.attn
        with torch.no_grad():
            for h in (1, 3):
                attn.proj.weight[:, h * 16 : (h + 1) * 16] = 0.0
    with torch.no_grad():
        reference = model(x)
    for block in model.blocks:
        attn = block.attn
        for name in ("q", "k", "v"):
            old = getattr(attn, name)
            new = nn.Linear(64, 32)
            new.weight.data = _keep_heads(old.weight.data, keep, 16, 0)
            new.bias.data = _keep_heads(old.bias.data, keep, 16, 0)
            setattr(attn, name, new)
        attn.proj.weight = nn.Parameter(_keep_heads(attn.proj.weight.data, keep, 16, 1))
        attn.proj.in_features = 32
        attn.num_heads = 2
    with torch.no_grad():
        pruned = model(x)
    torch.testing.assert_close(pruned, reference)


def test_vit_head_dim_change_runs() -> None:
    model = TinyViT(dim=64, depth=1, num_heads=4).eval()
    attn = model.blocks[0].attn
    keep = torch.cat([torch.arange(h * 16, h * 16 + 8) for h in range(4)])
    for name in ("q", "k", "v"):
        old = getattr(attn, name)
        new = nn.Linear(64, 32)
        new.weight.data, new.bias.data = old.weight.data[keep].clone(), old.bias.data[keep].clone()
        setattr(attn, name, new)
    attn.proj.weight = nn.Parameter(attn.proj.weight.data[:, keep].clone())
    attn.head_dim = 8
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_tinyllama_shape_and_causality() -> None:
    torch.manual_seed(0)
    model = TinyLlama().eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits = model(ids)
        changed = ids.clone()
        changed[:, 10] = (changed[:, 10] + 1) % 256
        logits2 = model(changed)
    assert logits.shape == (2, 16, 256)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    with pytest.raises(ValueError, match="max_seq_len"):
        TinyLlama(max_seq_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_tinyllama_gqa_head_pruning_by_attributes() -> None:
    """Dropping query heads 2, 3 and their shared kv head 1 equals zeroing their o_proj columns."""
    torch.manual_seed(0)
    model = TinyLlama(dim=128, n_layers=2, n_heads=4, n_kv_heads=2).eval()
    ids = torch.randint(0, 256, (2, 12))
    hd = 32
    for layer in model.layers:
        with torch.no_grad():
            layer.self_attn.o_proj.weight[:, 2 * hd :] = 0.0
    with torch.no_grad():
        reference = model(ids)
    for layer in model.layers:
        attn = layer.self_attn
        attn.q_proj.weight = nn.Parameter(_keep_heads(attn.q_proj.weight.data, [0, 1], hd, 0))
        attn.k_proj.weight = nn.Parameter(_keep_heads(attn.k_proj.weight.data, [0], hd, 0))
        attn.v_proj.weight = nn.Parameter(_keep_heads(attn.v_proj.weight.data, [0], hd, 0))
        attn.o_proj.weight = nn.Parameter(_keep_heads(attn.o_proj.weight.data, [0, 1], hd, 1))
        attn.num_heads, attn.num_kv_heads = 2, 1
    with torch.no_grad():
        pruned = model(ids)
    torch.testing.assert_close(pruned, reference)


def test_tinyllama_head_dim_change_runs() -> None:
    model = TinyLlama(dim=64, n_layers=1, n_heads=4, n_kv_heads=2).eval()
    attn = model.layers[0].self_attn
    for name, heads in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2)):
        keep = torch.cat([torch.arange(h * 16, h * 16 + 8) for h in range(heads)])
        proj = getattr(attn, name)
        proj.weight = nn.Parameter(proj.weight.data[keep].clone())
        if name == "q_proj":
            attn.o_proj.weight = nn.Parameter(attn.o_proj.weight.data[:, keep].clone())
    attn.head_dim = 8
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 10))).shape == (1, 10, 256)


def test_digits_resnet_learns_digits_quickly() -> None:
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup()
    model = DigitsResNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        model.train()
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    assert correct / total > 0.9
