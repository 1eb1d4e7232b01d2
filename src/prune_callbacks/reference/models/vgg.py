"""VGG with batch norm for 32x32 inputs (CIFAR), in plain ``torch.nn``.

A plain chain of conv-BN-ReLU layers: the simplest structure to prune, useful as a baseline.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["VGG", "VGG_CONFIGS", "vgg_cifar"]

# Output channels per conv layer; "M" is a 2x2 max pool.
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"],
}


class VGG(nn.Module):
    """Conv-BN-ReLU feature extractor, global average pooling, and a two-layer classifier."""

    def __init__(
        self, config: list[int | str], num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_chans
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_ch = max(1, round(int(item) * width_mult))
            layers += [
                nn.Conv2d(ch, out_ch, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            ch = out_ch
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = max(1, round(512 * width_mult))
        self.classifier = nn.Sequential(
            nn.Linear(ch, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg_cifar(depth: int = 16, num_classes: int = 10, width_mult: float = 1.0) -> VGG:
    """VGG-``depth`` (11, 13, 16 or 19) with BN for 32x32 images; ``width_mult`` scales every width."""
    if depth not in VGG_CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    return VGG(VGG_CONFIGS[depth], num_classes=num_classes, width_mult=width_mult)
