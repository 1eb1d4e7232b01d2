"""Byte-level language-modelling data built from the Python standard library's own source files.

Every Python installation carries a few megabytes of real, varied text in its standard library, so a
small language model can be trained and pruned without any download.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["ByteWindows", "TextDataModule", "read_stdlib_bytes"]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def _stdlib_sources(root: Path) -> Iterator[Path]:
    """The stdlib's top-level ``*.py`` files, sorted, then those of its subpackages, sorted."""
    yield from sorted(root.glob("*.py"))
    nested = (p for p in root.rglob("*.py") if p.parent != root)
    yield from sorted(p for p in nested if not _SKIP_DIRS.intersection(p.relative_to(root).parts))


def read_stdlib_bytes(max_chars: int) -> bytes:
    """Concatenate standard-library source files, in a fixed order, up to ``max_chars`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in _stdlib_sources(root):
        if total >= max_chars:
            break
        data = path.read_bytes()[: max_chars - total]
        chunks.append(data)
        total += len(data)
    if total == 0:
        raise FileNotFoundError(f"no Python source files found in the standard library at {root}")
    return b"".join(chunks)


class ByteWindows(Dataset):
    """Consecutive windows of ``seq_len + 1`` bytes split into ``(input_ids[:-1], input_ids[1:])``."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data = data
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.data) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        chunk = self.data[start : start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class TextDataModule(pl.LightningDataModule):
    """Next-byte prediction on stdlib sources; vocab of 256 byte values, deterministic split and order.

    The last ``val_fraction`` of the byte stream is the validation (and test) split, kept contiguous
    so no validation window overlaps a training one.
    """

    vocab_size = 256

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 32,
        max_chars: int = 2_000_000,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_set: ByteWindows | None = None
        self.val_set: ByteWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the sources and cut them into train/val windows (idempotent)."""
        if self.train_set is not None:
            return
        raw = read_stdlib_bytes(self.max_chars)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        n_val = max(self.seq_len + 1, int(len(data) * self.val_fraction))
        if len(data) - n_val < self.seq_len + 1:
            raise ValueError(f"max_chars={self.max_chars} is too small for seq_len={self.seq_len}")
        self.train_set = ByteWindows(data[:-n_val], self.seq_len)
        self.val_set = ByteWindows(data[-n_val:], self.seq_len)

    def _loader(self, dataset: ByteWindows | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training windows, in an order fixed by ``seed``."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation windows in order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        return self._loader(self.val_set, shuffle=False)

    def example_batch(self, n: int = 1) -> torch.Tensor:
        """The input ids of the first ``n`` training windows, shape (n, seq_len), dtype int64."""
        self.setup()
        assert self.train_set is not None
        return torch.stack([self.train_set[i][0] for i in range(n)])
