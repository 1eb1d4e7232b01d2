"""LightningDataModules that need no download at run time (CIFAR-10 reads a local copy)."""

from prune_callbacks.data.cifar10 import CIFAR10DataModule
from prune_callbacks.data.digits import DigitsDataModule
from prune_callbacks.data.text import TextDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "TextDataModule"]
