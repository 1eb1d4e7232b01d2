"""CIFAR-10 from the standard python-pickle release, as a LightningDataModule (never downloads).

Reads ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``; augmentation (random crop with
4-pixel padding and horizontal flip) is done with plain torch ops.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10DataModule", "CIFAR10Dataset"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBDIR = "cifar-10-batches-py"


def _load_batches(folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpickle CIFAR batch files into uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class CIFAR10Dataset(Dataset):
    """Normalised CIFAR images (3, 32, 32), optionally with random crop (padding 4) and flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment
        self.mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].float().div_(255.0)
        if self.augment:
            x = F.pad(x, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = x[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[index]


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 read from ``data_dir`` or ``data_dir/cifar-10-batches-py``; val and test use the test set."""

    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str | Path = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.train_set: CIFAR10Dataset | None = None
        self.test_set: CIFAR10Dataset | None = None

    def check_available(self) -> Path:
        """Return the folder holding the batch files, or raise a one-line FileNotFoundError."""
        for folder in (self.data_dir, self.data_dir / SUBDIR):
            if all((folder / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
                return folder
        raise FileNotFoundError(
            f"CIFAR-10 not found: expected {self.data_dir / SUBDIR}/data_batch_1..5 and test_batch; download "
            f"cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) and extract it into "
            f"{self.data_dir}"
        )

    def prepare_data(self) -> None:
        """Only checks that the files are there: this module never downloads."""
        self.check_available()

    def setup(self, stage: str | None = None) -> None:
        """Load the pickled batches into memory (idempotent)."""
        if self.train_set is not None:
            return
        folder = self.check_available()
        self.train_set = CIFAR10Dataset(*_load_batches(folder, TRAIN_FILES), augment=self.augment)
        self.test_set = CIFAR10Dataset(*_load_batches(folder, (TEST_FILE,)), augment=False)

    def _loader(self, dataset: CIFAR10Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The test set, in order, without augmentation."""
        return self._loader(self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        return self._loader(self.test_set, shuffle=False)

    def example_batch(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` normalised test images, shape (n, 3, 32, 32)."""
        self.setup()
        assert self.test_set is not None
        return torch.stack([self.test_set[i][0] for i in range(n)])
