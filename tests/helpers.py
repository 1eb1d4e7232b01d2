"""Shared test material: the Hugging Face configs, a small CNN and LightningModule, data and a Trainer.

Fixtures built on these live in ``conftest.py``; test modules import the builders directly when they
need them at collection time (``pytest.mark.parametrize`` over the HF model names).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def tok_inputs() -> dict:
    return {"input_ids": torch.randint(0, 128, (1, 8))}


def image_inputs() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32)


def _lm(cls: Any, cfg: Any, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: cls(cfg(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, **kw))


def hf_models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]]:
    """Hugging Face architectures from small configs (random weights, no download): name ->
    (build the model, make its example inputs). Needs ``transformers``."""
    import transformers as tf

    return {
        "llama_gqa": (
            _lm(tf.LlamaForCausalLM, tf.LlamaConfig, num_attention_heads=4, num_key_value_heads=2),
            tok_inputs,
        ),
        "llama_mha": (
            _lm(tf.LlamaForCausalLM, tf.LlamaConfig, num_attention_heads=4, num_key_value_heads=4),
            tok_inputs,
        ),
        "qwen2": (
            _lm(tf.Qwen2ForCausalLM, tf.Qwen2Config, num_attention_heads=4, num_key_value_heads=2),
            tok_inputs,
        ),
        "mistral": (
            _lm(
                tf.MistralForCausalLM,
                tf.MistralConfig,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            ),
            tok_inputs,
        ),
        "phi3": (
            _lm(
                tf.Phi3ForCausalLM,
                tf.Phi3Config,
                num_attention_heads=4,
                num_key_value_heads=4,
                pad_token_id=0,
            ),
            tok_inputs,
        ),
        "phi3_gqa": (
            _lm(
                tf.Phi3ForCausalLM,
                tf.Phi3Config,
                num_attention_heads=4,
                num_key_value_heads=2,
                pad_token_id=0,
            ),
            tok_inputs,
        ),
        "gpt2": (
            lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
            tok_inputs,
        ),
        "opt": (
            lambda: tf.OPTForCausalLM(
                tf.OPTConfig(
                    vocab_size=128,
                    hidden_size=64,
                    ffn_dim=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    word_embed_proj_dim=64,
                    pad_token_id=1,
                )
            ),
            tok_inputs,
        ),
        "bert": (
            lambda: tf.BertForSequenceClassification(
                tf.BertConfig(
                    vocab_size=128,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                )
            ),
            tok_inputs,
        ),
        "distilbert": (
            lambda: tf.DistilBertForSequenceClassification(
                tf.DistilBertConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128)
            ),
            tok_inputs,
        ),
        "vit": (
            lambda: tf.ViTForImageClassification(
                tf.ViTConfig(
                    image_size=32,
                    patch_size=8,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                    num_labels=10,
                )
            ),
            image_inputs,
        ),
        "dinov2": (
            lambda: tf.Dinov2ForImageClassification(
                tf.Dinov2Config(
                    image_size=32,
                    patch_size=8,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    mlp_ratio=2,
                    num_labels=10,
                )
            ),
            image_inputs,
        ),
        "swin": (
            lambda: tf.SwinForImageClassification(
                tf.SwinConfig(
                    image_size=32,
                    patch_size=2,
                    embed_dim=16,
                    depths=[1, 1],
                    num_heads=[2, 4],
                    window_size=4,
                    num_labels=10,
                )
            ),
            image_inputs,
        ),
        "convnext": (
            lambda: tf.ConvNextForImageClassification(
                tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)
            ),
            image_inputs,
        ),
        "resnet": (
            lambda: tf.ResNetForImageClassification(
                tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
            ),
            image_inputs,
        ),
        "mobilenetv2": (
            lambda: tf.MobileNetV2ForImageClassification(
                tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=10)
            ),
            image_inputs,
        ),
        "efficientnet": (
            lambda: tf.EfficientNetForImageClassification(
                tf.EfficientNetConfig(image_size=32, depth_coefficient=0.2, num_labels=10)
            ),
            image_inputs,
        ),
        "regnet": (
            lambda: tf.RegNetForImageClassification(
                tf.RegNetConfig(
                    embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=10
                )
            ),
            image_inputs,
        ),
        "mobilevit": (
            lambda: tf.MobileViTForImageClassification(
                tf.MobileViTConfig(
                    image_size=32,
                    hidden_sizes=[32, 48, 64],
                    neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 64],
                    num_labels=10,
                )
            ),
            image_inputs,
        ),
    }


#: Attribute names under which attention modules report their head count.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")


class TinyCNN(nn.Module):
    def __init__(self, bn: bool = True, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class LitNet(pl.LightningModule):
    def __init__(
        self,
        optimizer: str = "sgd",
        example: bool = True,
        bn: bool = True,
        scheduler: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = TinyCNN(bn=bn)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.training_steps = 0
        if example:
            self.example_input_array = torch.randn(1, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.validation_loss = F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if not self.scheduler:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        }


def random_loader(n: int = 64, batch_size: int = 16, seed: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def cpu_trainer(root: Path, callbacks: list, **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        max_epochs=2,
    )
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


def last_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the epoch's last training batch: a probe callback listed before
    ``StructuredPruning`` sees the model there right before the epoch's prune."""
    return batch_idx + 1 == trainer.num_training_batches


def run_app(args: list[str]) -> None:
    """Call the Hydra app's entry point (``prune-train``) as the command line would."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from prune_callbacks.app import train

    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["prune-train", *args]
    try:
        train.main()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


#: The residual stream of a Llama (the repo's TinyLlama names): kept, so that only heads and MLP
#: channels are pruned.
LLAMA_RESIDUAL = ["embed_tokens", "lm_head", "norm", "*.o_proj", "*.down_proj", "*layernorm*"]
#: The same for a Hugging Face ``LlamaForCausalLM``.
HF_LLAMA_RESIDUAL = ["model.embed_tokens", "lm_head", "model.norm", "*.o_proj", "*.down_proj", "*layernorm*"]
