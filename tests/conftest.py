"""Shared fixtures. The shared builders (the Hugging Face configs, a small CNN and LightningModule, random
data, a quiet CPU Trainer) live in ``helpers.py``, importable from every test module; random
architectures for property tests in ``randnet.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not stall when the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
