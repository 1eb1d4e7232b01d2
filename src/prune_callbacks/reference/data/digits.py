"""scikit-learn's 8x8 handwritten digits as a LightningDataModule.

The digits ship inside scikit-learn, so experiments and tests on them need no download and train in
seconds on a CPU, while still being a real image classification task.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule"]


class DigitsDataModule(pl.LightningDataModule):
    """Digits images as (N, 1, 8, 8) float tensors with a stratified, seeded train/val split.

    Pixels are scaled to [0, 1] and then standardised with the mean and std of the training split.
    The test loader serves the validation split (the dataset is too small for three splits).
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.mean = 0.0
        self.std = 1.0

    def setup(self, stage: str | None = None) -> None:
        """Load, split and normalise the digits (idempotent)."""
        if self.train_set is not None:
            return
        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        labels = digits.target.astype(np.int64)
        x_train, x_val, y_train, y_val = train_test_split(
            images, labels, test_size=self.val_fraction, random_state=self.seed, stratify=labels
        )
        self.mean = float(x_train.mean())
        self.std = float(x_train.std())
        self.train_set = TensorDataset(self._to_tensor(x_train), torch.from_numpy(y_train))
        self.val_set = TensorDataset(self._to_tensor(x_val), torch.from_numpy(y_val))

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """Standardise (N, 8, 8) images and add the channel dimension."""
        return torch.from_numpy((images - self.mean) / self.std).unsqueeze(1).contiguous()

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, in an order fixed by ``seed``."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same data as :meth:`val_dataloader`."""
        return self._loader(self.val_set, shuffle=False)

    def example_batch(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` normalised training images, shape (n, 1, 8, 8): a real input for tracing."""
        self.setup()
        assert self.train_set is not None
        return self.train_set.tensors[0][:n].clone()
