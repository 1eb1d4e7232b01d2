"""Tests for the data modules (digits, CIFAR-10 from a fake local copy, stdlib text)."""

from __future__ import annotations

import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from prune_callbacks.reference.data import CIFAR10DataModule, DigitsDataModule, TextDataModule
from prune_callbacks.reference.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD

# ---------------------------------------------------------------- digits


def test_digits_shapes_split_and_normalisation() -> None:
    dm = DigitsDataModule(batch_size=50, val_fraction=0.2, seed=0)
    dm.setup()
    assert len(dm.train_set) == 1437 and len(dm.val_set) == 360
    x_train, y_train = dm.train_set.tensors
    x_val, y_val = dm.val_set.tensors
    assert x_train.shape == (1437, 1, 8, 8) and x_train.dtype == torch.float32
    assert y_train.dtype == torch.int64
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1.0) < 1e-2
    # Stratified: every class is in the validation split in (almost) its overall proportion.
    counts = torch.bincount(y_val, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,)
    assert dm.example_batch(3).shape == (3, 1, 8, 8)
    assert torch.equal(dm.example_batch(2), x_train[:2])


def test_digits_deterministic_and_seeded() -> None:
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])
    first_a = next(iter(a.train_dataloader()))[1]
    first_b = next(iter(b.train_dataloader()))[1]
    assert torch.equal(first_a, first_b)
    val_1 = torch.cat([y for _, y in a.val_dataloader()])
    val_2 = torch.cat([y for _, y in a.test_dataloader()])
    assert torch.equal(val_1, val_2) and torch.equal(val_1, a.val_set.tensors[1])


# ---------------------------------------------------------------- CIFAR-10


def _write_fake_cifar(folder: Path, per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Write the standard python-format files with ``per_batch`` random images each; return test data."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    test = None
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        test = (data, np.array(labels))
    assert test is not None
    return test


def test_cifar_reads_standard_format(tmp_path: Path) -> None:
    test_data, test_labels = _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        dm = CIFAR10DataModule(data_dir=data_dir, batch_size=4, augment=False)
        assert dm.check_available() == tmp_path / "cifar-10-batches-py"
        dm.prepare_data()
        dm.setup()
        assert len(dm.train_set) == 30 and len(dm.test_set) == 6
        x, y = next(iter(dm.val_dataloader()))
        assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(test_labels[:4]))
        raw = torch.from_numpy(test_data[0].reshape(3, 32, 32)).float() / 255.0
        mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
        torch.testing.assert_close(x[0], (raw - mean) / std)
        assert dm.example_batch(2).shape == (2, 3, 32, 32)


def test_cifar_augmentation_is_crop_and_flip(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(data_dir=tmp_path, batch_size=8, augment=True)
    dm.setup()
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    padded = torch.nn.functional.pad(dm.train_set.images[0].float() / 255.0, (4, 4, 4, 4))
    candidates = []
    for top in range(9):
        for left in range(9):
            crop = padded[:, top : top + 32, left : left + 32]
            candidates += [(crop - mean) / std, (crop.flip(-1) - mean) / std]
    torch.manual_seed(0)
    for _ in range(10):
        x, _ = dm.train_set[0]
        assert x.shape == (3, 32, 32)
        assert any(torch.allclose(x, c) for c in candidates)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


def test_cifar_missing_gives_one_clear_line(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=tmp_path / "nowhere")
    for call in (dm.check_available, dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
        assert "cifar-10-python.tar.gz" in message


# ---------------------------------------------------------------- text


def test_text_windows() -> None:
    dm = TextDataModule(seq_len=32, batch_size=8, max_chars=20_000, val_fraction=0.1)
    dm.setup()
    total = 20_000
    n_val = 2_000
    assert len(dm.train_set) == (total - n_val - 1) // 32
    assert len(dm.val_set) == (n_val - 1) // 32
    x, y = dm.train_set[0]
    assert x.shape == (32,) and y.shape == (32,) and x.dtype == torch.int64
    assert torch.equal(x[1:], y[:-1])
    x1, _ = dm.train_set[1]
    assert x1[0] == y[-1]  # windows tile the stream
    assert int(torch.cat([x, y]).max()) < dm.vocab_size
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    first_file = sorted(stdlib.glob("*.py"))[0].read_bytes()
    assert bytes(x.tolist()) == first_file[:32]
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (8, 32) and yb.shape == (8, 32)
    assert dm.example_batch(3).shape == (3, 32)


def test_text_deterministic() -> None:
    a = TextDataModule(seq_len=16, batch_size=4, max_chars=10_000, seed=3)
    b = TextDataModule(seq_len=16, batch_size=4, max_chars=10_000, seed=3)
    a.setup()
    b.setup()
    assert torch.equal(a.train_set.data, b.train_set.data)
    assert torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])
    with pytest.raises(IndexError):
        a.train_set[len(a.train_set)]
