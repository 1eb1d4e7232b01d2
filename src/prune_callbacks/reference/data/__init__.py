"""LightningDataModules that need no download at run time (CIFAR-10 reads a local copy)."""

from prune_callbacks.reference.data.cifar10 import CIFAR10DataModule
from prune_callbacks.reference.data.digits import DigitsDataModule
from prune_callbacks.reference.data.text import TextDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "TextDataModule"]
