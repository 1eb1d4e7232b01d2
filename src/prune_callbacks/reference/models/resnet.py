"""ResNets in plain ``torch.nn``: ImageNet ResNet-50, the CIFAR ResNets and a tiny one for digits.

Residual additions couple the output channels of every block in a stage with its shortcut, which is
exactly the dependency a structural pruner has to discover; these models exercise it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["BasicBlock", "Bottleneck", "DigitsResNet", "ResNet", "cifar_resnet", "resnet50_like"]


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN projection when the block changes shape, otherwise ``None`` (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ResNet-18/34 and CIFAR ResNets)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's "v1.5"), 1x1 expand by 4, plus residual."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _init_weights(model: nn.Module) -> None:
    """He init for convs and unit BN, the usual ResNet initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """Generic ResNet: a stem, stages of residual blocks, global average pooling and a linear head."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        widths: list[int],
        stem: nn.Module,
        stem_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        in_ch = stem_channels
        stages = []
        for i, (n_blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, width, stride if j == 0 else 1))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_like(num_classes: int = 1000) -> ResNet:
    """ImageNet ResNet-50 (25.56M parameters, about 4.1 GMACs at 224x224), torchvision's layout."""
    stem = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], stem, 64, num_classes)


def cifar_resnet(depth: int = 56, num_classes: int = 10) -> ResNet:
    """The CIFAR ResNet of He et al.: 3 stages of ``(depth - 2) / 6`` BasicBlocks with 16/32/64 channels.

    Shape-changing shortcuts are 1x1 conv + BN projections.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110...), got {depth}"
        )
    n = (depth - 2) // 6
    stem = nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
    )
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], stem, 16, num_classes)


class DigitsResNet(ResNet):
    """Small ResNet for 8x8 one-channel images (scikit-learn digits).

    Stem conv3x3, then three BasicBlocks: ``width`` at 8x8, ``2 * width`` at 4x4 (downsampling with a
    projection shortcut) and another ``2 * width`` block; global average pooling and a linear head.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        stem = nn.Sequential(
            nn.Conv2d(1, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        super().__init__(BasicBlock, [1, 2], [width, 2 * width], stem, width, num_classes)
