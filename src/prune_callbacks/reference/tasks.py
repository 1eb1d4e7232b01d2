"""Generic LightningModules that wrap any ``nn.Module`` so the app (and users) can train and prune it.

The wrapped network is the ``model`` attribute; the optimizer and learning-rate scheduler are given
as factories (``functools.partial`` objects, which is what Hydra's ``_partial_: true`` builds), so the
same wrapper serves every recipe. Both wrappers set ``example_input_array``: the pruning callback
traces the model with it, and Lightning's model summary uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

__all__ = ["CausalLM", "ImageClassifier"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def _configure(
    module: pl.LightningModule, optimizer: OptimizerFactory | None, lr_scheduler: SchedulerFactory | None
) -> Any:
    """Build the optimizer (SGD with momentum when none is given) and, optionally, a per-epoch scheduler."""
    opt: torch.optim.Optimizer
    if optimizer is None:
        opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    else:
        opt = optimizer(module.parameters())
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "epoch"}}


class ImageClassifier(pl.LightningModule):
    """Cross-entropy training of any image classifier, with top-1 accuracy from torchmetrics.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (and ``test/...``). ``input_shape``
    (without the batch dimension) sets ``example_input_array`` to one zero image; the app replaces
    it with a real batch from the data module when that offers ``example_batch``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        input_shape: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.model = model
        self.num_classes = int(num_classes)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.label_smoothing = float(label_smoothing)
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro")
        if input_shape is not None:
            self.example_input_array = torch.zeros(1, *[int(s) for s in input_shape])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped model."""
        return self.model(x)

    def _shared_step(self, batch: Any, stage: str, acc: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        acc(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy loss on one batch."""
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and accuracy on the validation split."""
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and accuracy on the test split."""
        self._shared_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        """Optimizer and scheduler from the factories given at construction."""
        return _configure(self, self.optimizer_factory, self.scheduler_factory)


class CausalLM(pl.LightningModule):
    """Next-token training of a causal language model mapping ``input_ids (B, T)`` to logits ``(B, T, V)``.

    Logs ``train/loss``, ``val/loss``, ``val/acc`` (next-token top-1 accuracy) and ``val/ppl``
    (perplexity from torchmetrics). ``example_input_array`` is one sequence of ``seq_len`` token ids.
    """

    def __init__(
        self,
        model: nn.Module,
        vocab_size: int,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        seq_len: int = 128,
    ) -> None:
        super().__init__()
        if int(vocab_size) < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if int(seq_len) < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.model = model
        self.vocab_size = int(vocab_size)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.val_acc = MulticlassAccuracy(self.vocab_size, average="micro")
        self.test_acc = MulticlassAccuracy(self.vocab_size, average="micro")
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()
        self.example_input_array = torch.zeros(1, int(seq_len), dtype=torch.long)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped model."""
        return self.model(input_ids)

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids, targets = batch
        logits = self(input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return loss, logits, targets

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean next-token cross-entropy on one batch."""
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, stage: str, acc: MulticlassAccuracy, ppl: Perplexity) -> None:
        loss, logits, targets = self._loss(batch)
        acc(logits.flatten(0, 1), targets.flatten())
        ppl(logits.float(), targets)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", acc, on_epoch=True)
        self.log(f"{stage}/ppl", ppl, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Loss, next-token accuracy and perplexity on the validation split."""
        self._eval_step(batch, "val", self.val_acc, self.val_ppl)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Loss, next-token accuracy and perplexity on the test split."""
        self._eval_step(batch, "test", self.test_acc, self.test_ppl)

    def configure_optimizers(self) -> Any:
        """Optimizer and scheduler from the factories given at construction."""
        return _configure(self, self.optimizer_factory, self.scheduler_factory)
