"""DenseNet-BC in plain ``torch.nn`` (DenseNet-121 and -201 layouts and a general builder).

Every dense layer reads the ``torch.cat`` of all earlier feature maps of its block, so pruning one
layer's output channels means slicing the input channels of every later layer at the right offset:
a demanding test of a pruner's concatenation handling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "Transition",
    "densenet",
    "densenet121_like",
    "densenet201_like",
]


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck to ``bn_size * growth_rate``) then BN-ReLU-conv3x3 to ``growth_rate``."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, mid, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; returns the concatenation of the input and every layer's output."""

    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size) for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compression) and 2x2 average pooling between dense blocks."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC for ImageNet-sized inputs: 7x7 stem, dense blocks with transitions, linear head."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        num_classes: int = 1000,
        bn_size: int = 4,
        compression: float = 0.5,
    ) -> None:
        super().__init__()
        features: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]
        ch = num_init_features
        for i, num_layers in enumerate(block_config):
            features.append((f"denseblock{i + 1}", DenseBlock(num_layers, ch, growth_rate, bn_size)))
            ch += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_ch = int(ch * compression)
                features.append((f"transition{i + 1}", Transition(ch, out_ch)))
                ch = out_ch
        features.append(("norm5", nn.BatchNorm2d(ch)))
        self.features = nn.Sequential(OrderedDict(features))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def densenet(
    growth_rate: int = 32,
    block_config: Sequence[int] = (6, 12, 24, 16),
    num_init_features: int = 64,
    num_classes: int = 1000,
) -> DenseNet:
    """General DenseNet-BC builder (bottleneck width 4 x growth, compression 0.5)."""
    return DenseNet(growth_rate, tuple(block_config), num_init_features, num_classes)


def densenet121_like(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121: growth 32, blocks (6, 12, 24, 16), 64 stem channels; 7.98M parameters."""
    return densenet(32, (6, 12, 24, 16), 64, num_classes)


def densenet201_like(num_classes: int = 1000) -> DenseNet:
    """DenseNet-201: growth 32, blocks (6, 12, 48, 32), 64 stem channels; 20.0M parameters."""
    return densenet(32, (6, 12, 48, 32), 64, num_classes)
