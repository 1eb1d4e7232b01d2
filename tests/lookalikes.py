"""A zoo of small model blocks written in the style of popular libraries, and a harness that prunes
each one and checks the promise "never a broken model".

The blocks are look-alikes (our own code): they copy the *shape* of the code that timm,
torchvision, YOLO (ultralytics), guided-diffusion / diffusers, Hugging Face (Llama, GPT-2, T5)
and others write — the reshapes with sizes read from tensors or attributes, the splits, the
fused projections, the buffers of indices — not their weights or exact numerics. Every entry of
:data:`BLOCKS` is a complete small model: a stem from the input, the block (one or two repeats)
and a fixed-size head, so the output shape never depends on internal widths.

:func:`run_block` prunes one block with ``Pruner(..., importance="l2", pruning_ratio=0.5)`` and
one ``step()``, then checks that the pruned model runs, keeps its output shapes and computes
exactly what the dense model computes with the removed channels zeroed (:func:`masked_reference`).
``python tests/lookalikes.py`` prints a table of the results.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from prune_callbacks import Pruner
from prune_callbacks.layers import function_by_name
from prune_callbacks.layers.parameter import ParameterPruner, ParameterPruningFunction
from prune_callbacks.pruning.history import get_pruning_history

NUM_CLASSES = 10
VOCAB = 64


# =============================================================================================
# The Block record
# =============================================================================================


@dataclass(frozen=True)
class Block:
    """One look-alike model: how to build it and its example inputs.

    ``style`` says in one line which library design it imitates. ``heads``: the block has attention
    heads (it is also pruned with ``prune_num_heads=True``). ``exact=False`` only when the masked
    dense model cannot be the reference (a hand-written norm over pruned channels); ``note`` says
    why. ``alt_inputs``: other inputs the pruned model must also run on (a branch the example
    input does not take).
    """

    name: str
    style: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    heads: bool = False
    exact: bool = True
    note: str = ""
    alt_inputs: Callable[[], Any] | None = None


def _randomize(model: nn.Module) -> nn.Module:
    """Give norms non-trivial affine parameters and running statistics (deterministic: the caller
    seeds), so that pruning scores differ and the masked comparison is not trivially zero."""
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.data = 1.0 + 0.3 * torch.randn_like(m.weight)
            if getattr(m, "bias", None) is not None:
                m.bias.data = 0.1 * torch.randn_like(m.bias)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.data = 0.1 * torch.randn_like(m.running_mean)
            m.running_var.data = 0.5 + torch.rand_like(m.running_var)
    return model


def seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``fn`` run under ``torch.manual_seed(0)``, norms randomized, in eval mode."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return _randomize(fn()).eval()

    return build


def images(h: int = 16, batch: int = 2) -> Callable[[], Tensor]:
    """Deterministic image batch ``(batch, 3, h, h)``."""

    def make() -> Tensor:
        return torch.randn(batch, 3, h, h, generator=torch.Generator().manual_seed(1))

    return make


def tokens(n: int = 12, batch: int = 2) -> Callable[[], Tensor]:
    """Deterministic token ids ``(batch, n)`` below :data:`VOCAB`."""

    def make() -> Tensor:
        return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))

    return make


# =============================================================================================
# Shared model shells: stem -> body -> fixed head
# =============================================================================================


class ConvModel(nn.Module):
    """Image stem (conv-bn-relu), a body, global pooling and a linear head."""

    def __init__(self, body: nn.Module, c_in: int, c_out: int, stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_in, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)
        )
        self.body = body
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_out, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)))


class TokenModel(nn.Module):
    """Patch-embedding stem to ``(B, N, C)`` tokens, a body of token blocks, norm, mean, head."""

    def __init__(self, body: nn.Module, dim: int, patch: int = 4, norm: bool = True) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.body = body
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.body(x)
        return self.head(self.norm(x).mean(1))


class Mlp(nn.Module):
    """timm ``Mlp``: fc1, act, fc2 over the last dim."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, act: type = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBnAct(nn.Sequential):
    """``Conv2dNormActivation``: conv (no bias), batch norm, activation."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1, act: type | None = nn.ReLU):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


# =============================================================================================
# timm-style vision transformers
# =============================================================================================


class Attention(nn.Module):
    """timm ``Attention``: fused qkv reshaped with ``C // self.num_heads`` from the input width."""

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class AttentionAttrDims(nn.Module):
    """timm ``Attention`` with ``attn_dim != dim`` and head sizes in attributes, fused SDPA."""

    def __init__(self, dim: int, num_heads: int = 4, head_dim: int = 12) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.qkv = nn.Linear(dim, self.attn_dim * 3)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(x)


class LayerScale(nn.Module):
    """timm ``LayerScale``: ``x * self.scale.view(self.shape)`` with ``self.shape = (dim,)``."""

    def __init__(self, dim: int, init_values: float = 0.5) -> None:
        super().__init__()
        self.shape = (dim,)
        self.scale = nn.Parameter(init_values * (1 + 0.5 * torch.randn(dim)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view(self.shape)


class LayerScale2d(nn.Module):
    """MetaFormer ``Scale`` for channels-first maps: ``self.shape = (dim, 1, 1)``."""

    def __init__(self, dim: int, init_values: float = 0.5) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(init_values * (1 + 0.5 * torch.randn(dim)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view(self.shape)


class GammaScale(nn.Module):
    """DeiT/CaiT style ``self.gamma * x``."""

    def __init__(self, dim: int, init_values: float = 0.5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * (1 + 0.5 * torch.randn(dim)))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * x


class ViTBlock(nn.Module):
    """timm ``Block``: pre-norm attention and MLP with layer scale."""

    def __init__(self, dim: int, attn: nn.Module | None = None, ls: type | None = LayerScale) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn if attn is not None else Attention(dim)
        self.ls1 = ls(dim) if ls else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 2)
        self.ls2 = ls(dim) if ls else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class MlpBlock(nn.Module):
    """Pre-norm residual MLP with a layer-scale module."""

    def __init__(self, dim: int, ls: type) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 2)
        self.ls = ls(dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ls(self.mlp(self.norm(x)))


class VisionTransformer(nn.Module):
    """timm ``VisionTransformer``: patch embed, cls token, position embedding, blocks, cls head."""

    def __init__(self, dim: int = 32, depth: int = 2, attn: Callable[[int], nn.Module] = Attention) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, attn(dim)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class ClassAttn(nn.Module):
    """CaiT ``ClassAttn``: the query is the class token only."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q = (
            self.q(x[:, 0])
            .unsqueeze(1)
            .reshape(B, 1, self.num_heads, C // self.num_heads)
            .permute(0, 2, 1, 3)
        )
        k = self.k(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x_cls = (attn @ v).transpose(1, 2).reshape(B, 1, C)
        return self.proj(x_cls)


class LayerScaleBlockClassAttn(nn.Module):
    """CaiT class-attention block: updates the class token only, ``gamma_1 * attn(...)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttn(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 2)
        self.gamma_1 = nn.Parameter(0.5 * (1 + 0.5 * torch.randn(dim)))
        self.gamma_2 = nn.Parameter(0.5 * (1 + 0.5 * torch.randn(dim)))

    def forward(self, x: Tensor, x_cls: Tensor) -> Tensor:
        u = torch.cat((x_cls, x), dim=1)
        x_cls = x_cls + self.gamma_1 * self.attn(self.norm1(u))
        return x_cls + self.gamma_2 * self.mlp(self.norm2(x_cls))


class CaiT(nn.Module):
    """CaiT: self-attention blocks on patches, then class-attention blocks on the cls token."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 16, dim))
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(ViTBlock(dim, ls=GammaScale))
        self.blocks_token_only = nn.ModuleList([LayerScaleBlockClassAttn(dim) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.blocks(x)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls_tokens = blk(x, cls_tokens)
        x = self.norm(torch.cat((cls_tokens, x), dim=1))
        return self.head(x[:, 0])


class ConvPosEnc(nn.Module):
    """CoaT ``ConvRelPosEnc``-like: tokens to a map, ``torch.split(x, self.split_sizes, dim=1)``,
    one depthwise conv per split (kernels 3/5/7), concatenated back."""

    def __init__(self, dim: int, size: tuple[int, int] = (4, 4)) -> None:
        super().__init__()
        self.size = size
        self.split_sizes = [dim // 4, dim // 2, dim // 4]
        self.convs = nn.ModuleList(
            [nn.Conv2d(s, s, k, 1, k // 2, groups=s) for s, k in zip(self.split_sizes, (3, 5, 7))]
        )

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        H, W = self.size
        feat = x.transpose(1, 2).reshape(B, C, H, W)
        parts = torch.split(feat, self.split_sizes, dim=1)
        feat = torch.cat([conv(p) for conv, p in zip(self.convs, parts)], dim=1)
        return x + feat.flatten(2).transpose(1, 2)


class CoaTBlock(nn.Module):
    """CoaT serial block: conv position encoding, attention, MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cpe = ConvPosEnc(dim)
        self.block = ViTBlock(dim, ls=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.cpe(x))


# ---- Swin ------------------------------------------------------------------------------------


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Swin: ``(B, H, W, C)`` -> ``(B * nW, ws, ws, C)``."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    """Swin: ``(B * nW, ws, ws, C)`` -> ``(B, H, W, C)``."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def relative_position_index(win: int) -> Tensor:
    """Swin's ``(ws*ws, ws*ws)`` index into the relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += win - 1
    rel[:, :, 1] += win - 1
    rel[:, :, 0] *= 2 * win - 1
    return rel.sum(-1)


class WindowAttention(nn.Module):
    """Swin ``WindowAttention`` with a relative position bias table indexed by a buffer."""

    def __init__(self, dim: int, window_size: int, num_heads: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            0.5 * torch.randn((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class SwinTransformerBlock(nn.Module):
    """Swin block on ``(B, H*W, C)`` tokens with ``self.input_resolution``, optional shift + mask."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], window_size: int = 2, shift: int = 0):
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.shift_size = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)
        if shift:
            H, W = input_resolution
            img_mask = torch.zeros((1, H, W, 1))
            cnt = 0
            for h in (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None)):
                for w in (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None)):
                    img_mask[:, h, w, :] = cnt
                    cnt += 1
            mw = window_partition(img_mask, window_size).view(-1, window_size * window_size)
            attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        else:
            attn_mask = None
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        x_windows = window_partition(x, self.window_size).view(-1, self.window_size * self.window_size, C)
        attn_windows = self.attn(x_windows, mask=self.attn_mask)
        attn_windows = attn_windows.view(-1, self.window_size, self.window_size, C)
        x = window_reverse(attn_windows, self.window_size, H, W)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + x.view(B, H * W, C)
        return x + self.mlp(self.norm2(x))


# ---- MaxViT grid attention -------------------------------------------------------------------


def grid_partition(x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """MaxViT: ``(B, H, W, C)`` -> ``(B * windows, gh, gw, C)`` with strided (dilated) grids."""
    B, H, W, C = x.shape
    x = x.view(B, grid_size[0], H // grid_size[0], grid_size[1], W // grid_size[1], C)
    return x.permute(0, 2, 4, 1, 3, 5).contiguous().view(-1, grid_size[0], grid_size[1], C)


def grid_reverse(windows: Tensor, grid_size: tuple[int, int], img_size: tuple[int, int]) -> Tensor:
    """MaxViT inverse of :func:`grid_partition`."""
    H, W = img_size
    C = windows.shape[-1]
    x = windows.view(-1, H // grid_size[0], W // grid_size[1], grid_size[0], grid_size[1], C)
    return x.permute(0, 3, 1, 4, 2, 5).contiguous().view(-1, H, W, C)


class AttentionCl(nn.Module):
    """MaxViT ``AttentionCl``: ``qkv(x).view(B, -1, self.num_heads, self.dim_head * 3)`` chunked."""

    def __init__(self, dim: int, dim_head: int = 8) -> None:
        super().__init__()
        self.num_heads = dim // dim_head
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.rel_pos = nn.Parameter(0.5 * torch.randn(self.num_heads, 4, 4))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        restore_shape = x.shape[:-1]
        q, k, v = self.qkv(x).view(B, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.rel_pos
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(restore_shape + (-1,))
        return self.proj(x)


class MaxViTGridBlock(nn.Module):
    """MaxViT ``PartitionAttentionCl`` (grid partition) on channels-last maps."""

    def __init__(self, dim: int, grid: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.grid_size = grid
        self.norm1 = nn.LayerNorm(dim)
        self.attn = AttentionCl(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        img_size = x.shape[1:3]
        partitioned = grid_partition(self.norm1(x), self.grid_size)
        partitioned = self.attn(partitioned)
        x = x + grid_reverse(partitioned, self.grid_size, img_size)
        return x + self.mlp(self.norm2(x))


class MaxViTModel(nn.Module):
    """Conv stem to a channels-last map, grid blocks, pooled head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(MaxViTGridBlock(dim), MaxViTGridBlock(dim))
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


class SwinModel(nn.Module):
    """Patch embed to ``(B, 16, C)`` tokens at 4x4, Swin blocks, mean head."""

    def __init__(self, dim: int = 32, shift: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        blocks = [SwinTransformerBlock(dim, (4, 4), 2, 0)]
        blocks.append(SwinTransformerBlock(dim, (4, 4), 2, 1 if shift else 0))
        self.layers = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.layers(x)).mean(1))


# ---- CrossViT ---------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """CrossViT ``CrossAttention``: the query is the first (cls) token, keys/values all tokens."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q = self.wq(x[:, 0:1, ...]).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.wk(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.wv(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, 1, C)
        return self.proj(x)


class CrossViT(nn.Module):
    """Two branches of different widths (32 and 16), each cls token attends to the other branch."""

    def __init__(self, dims: tuple[int, int] = (32, 16)) -> None:
        super().__init__()
        da, db = dims
        self.patch_a = nn.Conv2d(3, da, 4, 4)
        self.patch_b = nn.Conv2d(3, db, 8, 8)
        self.cls_a = nn.Parameter(0.02 * torch.randn(1, 1, da))
        self.cls_b = nn.Parameter(0.02 * torch.randn(1, 1, db))
        self.block_a = ViTBlock(da, ls=None)
        self.block_b = ViTBlock(db, Attention(db, 2), ls=None)
        self.proj_ab = nn.Sequential(nn.LayerNorm(da), nn.GELU(), nn.Linear(da, db))
        self.fusion_b = CrossAttention(db, 2)
        self.revert_ba = nn.Sequential(nn.LayerNorm(db), nn.GELU(), nn.Linear(db, da))
        self.proj_ba = nn.Sequential(nn.LayerNorm(db), nn.GELU(), nn.Linear(db, da))
        self.fusion_a = CrossAttention(da, 4)
        self.revert_ab = nn.Sequential(nn.LayerNorm(da), nn.GELU(), nn.Linear(da, db))
        self.norm_a = nn.LayerNorm(da)
        self.norm_b = nn.LayerNorm(db)
        self.head_a = nn.Linear(da, NUM_CLASSES)
        self.head_b = nn.Linear(db, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        xa = self.patch_a(x).flatten(2).transpose(1, 2)
        xb = self.patch_b(x).flatten(2).transpose(1, 2)
        xa = self.block_a(torch.cat((self.cls_a.expand(B, -1, -1), xa), 1))
        xb = self.block_b(torch.cat((self.cls_b.expand(B, -1, -1), xb), 1))
        # cls of a attends over b's patches (in b's width), and the other way round
        tmp_b = torch.cat((self.proj_ab(xa[:, 0:1]), xb[:, 1:]), dim=1)
        cls_a = xa[:, 0:1] + self.revert_ba(self.fusion_b(tmp_b))
        tmp_a = torch.cat((self.proj_ba(xb[:, 0:1]), xa[:, 1:]), dim=1)
        cls_b = xb[:, 0:1] + self.revert_ab(self.fusion_a(tmp_a))
        ya = self.head_a(self.norm_a(cls_a[:, 0]))
        yb = self.head_b(self.norm_b(cls_b[:, 0]))
        return (ya + yb) / 2


# ---- LeViT ------------------------------------------------------------------------------------


class LinearNorm(nn.Module):
    """LeViT ``LinearNorm``: linear without bias then BatchNorm1d over ``flatten(0, 1)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTAttention(nn.Module):
    """LeViT ``Attention``: key_dim != value dim, ``attention_biases[:, attention_bias_idxs]``."""

    def __init__(self, dim: int, key_dim: int = 8, num_heads: int = 4, attn_ratio: float = 2.0, res: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + self.key_attn_dim * 2)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(self.val_attn_dim, dim))
        pos = torch.stack(torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        rel_pos = (rel_pos[0] * res) + rel_pos[1]
        self.attention_biases = nn.Parameter(0.5 * torch.randn(num_heads, res**2))
        self.register_buffer("attention_bias_idxs", rel_pos, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (
            self.qkv(x)
            .view(B, N, self.num_heads, -1)
            .split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        )
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)
        attn = q @ k * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class LeViTBlock(nn.Module):
    """LeViT residual attention + residual LinearNorm MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = LeViTAttention(dim)
        self.mlp = nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


# ---- MetaFormer / PoolFormer ----------------------------------------------------------------


class Pooling(nn.Module):
    """MetaFormer/PoolFormer pooling token mixer: ``self.pool(x) - x``."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x) - x


class ConvMlp(nn.Module):
    """MetaFormer channels-first MLP with 1x1 convs."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MetaFormerBlock(nn.Module):
    """timm MetaFormer block (channels first): GroupNorm(1) norms, ``Scale`` with a shape attribute."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = Pooling()
        self.layer_scale1 = LayerScale2d(dim)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = ConvMlp(dim, 2 * dim)
        self.layer_scale2 = LayerScale2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale1(self.token_mixer(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class SepConv(nn.Module):
    """MetaFormer (ConvFormer) ``SepConv`` mixer, channels last: pwconv, act, dwconv, pwconv."""

    def __init__(self, dim: int, expansion: int = 2) -> None:
        super().__init__()
        med = expansion * dim
        self.pwconv1 = nn.Linear(dim, med, bias=False)
        self.act1 = nn.GELU()
        self.dwconv = nn.Conv2d(med, med, 7, padding=3, groups=med, bias=False)
        self.pwconv2 = nn.Linear(med, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.pwconv1(x))
        x = x.permute(0, 3, 1, 2)
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        return self.pwconv2(x)


class ConvFormerBlock(nn.Module):
    """MetaFormer channels-last block with a conv mixer and LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = SepConv(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvFormerModel(nn.Module):
    """Conv stem, channels-last ConvFormer blocks, pooled head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.blocks = nn.Sequential(ConvFormerBlock(dim), ConvFormerBlock(dim))
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


class PoolFormerBlock(nn.Module):
    """PoolFormer v1 block: ``layer_scale_1.unsqueeze(-1).unsqueeze(-1) * token_mixer(norm1(x))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = Pooling()
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = ConvMlp(dim, 4 * dim)
        self.layer_scale_1 = nn.Parameter(0.5 * (1 + 0.5 * torch.randn(dim)))
        self.layer_scale_2 = nn.Parameter(0.5 * (1 + 0.5 * torch.randn(dim)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x))


class MixerBlock(nn.Module):
    """MLP-Mixer block: token-mixing MLP over the sequence dim, then a channel MLP."""

    def __init__(self, dim: int, seq_len: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = Mlp(seq_len, 2 * seq_len)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


# =============================================================================================
# Convolutional blocks (torchvision / timm / YOLO / diffusion)
# =============================================================================================


def get_blur_coeffs(filt_size: int) -> Tensor:
    """Binomial filter coefficients (timm ``BlurPool2d``: ``poly1d((0.5, 0.5)) ** (filt_size - 1)``)."""
    coeffs = torch.tensor([1.0])
    for _ in range(filt_size - 1):
        coeffs = torch.cat([coeffs, torch.zeros(1)]) * 0.5 + torch.cat([torch.zeros(1), coeffs]) * 0.5
    return coeffs


class BlurPool2d(nn.Module):
    """timm ``BlurPool2d``: a fixed filter buffer, ``F.conv2d(..., groups=self.channels)``."""

    def __init__(self, channels: int, filt_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.filt_size = filt_size
        self.stride = stride
        self.padding = [filt_size // 2] * 4
        coeffs = get_blur_coeffs(filt_size)
        blur_filter = (coeffs[:, None] * coeffs[None, :])[None, None, :, :].repeat(self.channels, 1, 1, 1)
        self.register_buffer("filt", blur_filter, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, self.padding, "reflect")
        return F.conv2d(x, self.filt, stride=self.stride, groups=self.channels)


class AntiAliasBlock(nn.Module):
    """timm ResNet ``aa_layer`` downsample: conv-bn-relu, blur pool, conv-bn-relu."""

    def __init__(self, c: int, c2: int) -> None:
        super().__init__()
        self.conv1 = ConvBnAct(c, c2, 3)
        self.aa = BlurPool2d(c2)
        self.conv2 = ConvBnAct(c2, c2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.aa(self.conv1(x)))


class SqueezeExcite(nn.Module):
    """timm ``SqueezeExcite``: ``x * gate(conv_expand(act(conv_reduce(x.mean((2, 3), keepdim=True)))))``."""

    def __init__(self, c: int, rd: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, rd, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, c, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        return x * self.gate(x_se)


class SEFunctional(nn.Module):
    """Functional squeeze-excite: ``F.adaptive_avg_pool2d``, linear layers, ``s.view(b, c, 1, 1)``."""

    def __init__(self, c: int, rd: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, rd)
        self.fc2 = nn.Linear(rd, c)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        s = F.adaptive_avg_pool2d(x, 1).flatten(1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s.view(b, c, 1, 1)


class SEConvBlock(nn.Module):
    """conv-bn-relu, SE gate, conv-bn-relu (a plain SE-ResNet-like stage without residual)."""

    def __init__(self, c: int, se: type) -> None:
        super().__init__()
        self.conv1 = ConvBnAct(c, c, 3)
        self.se = se(c, c // 4)
        self.conv2 = ConvBnAct(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.se(self.conv1(x)))


# ---- YOLO -------------------------------------------------------------------------------------


class YConv(nn.Module):
    """YOLO ``Conv``: conv (no bias), bn, SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class YBottleneck(nn.Module):
    """YOLO ``Bottleneck``: ``x + cv2(cv1(x))`` when ``shortcut and c1 == c2``."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = YConv(c1, c_, 1)
        self.cv2 = YConv(c_, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    """YOLOv5 ``C3``: ``cv3(cat((m(cv1(x)), cv2(x)), 1))``."""

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = YConv(c1, c_, 1)
        self.cv2 = YConv(c1, c_, 1)
        self.cv3 = YConv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(YBottleneck(c_, c_, e=1.0) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C2f(nn.Module):
    """YOLOv8 ``C2f``: ``cv1(x).chunk(2, 1)`` (or ``split((self.c, self.c), 1)``), extend, concat."""

    def __init__(self, c1: int, c2: int, n: int = 2, e: float = 0.5, use_split: bool = False) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.use_split = use_split
        self.cv1 = YConv(c1, 2 * self.c, 1)
        self.cv2 = YConv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(YBottleneck(self.c, self.c, True, e=1.0) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_split:
            y = list(self.cv1(x).split((self.c, self.c), 1))
        else:
            y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """YOLOv5 ``Detect``: per level a 1x1 conv to ``na * no`` channels, ``view(bs, na, no, ny, nx)``."""

    def __init__(self, nc: int = 3, ch: Sequence[int] = (32, 32), na: int = 3) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.na = na
        self.nl = len(ch)
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, xs: list[Tensor]) -> Tensor:
        z = []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            z.append(x.view(bs, -1, self.no))
        return torch.cat(z, 1)


class DFL(nn.Module):
    """YOLOv8 distribution focal loss integral: a fixed 1x1 conv over ``reg_max`` bins."""

    def __init__(self, c1: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: Tensor) -> Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class DetectV8(nn.Module):
    """YOLOv8 decoupled ``Detect``: box branch ``cv2`` and class branch ``cv3`` per level, DFL."""

    def __init__(self, nc: int = 3, ch: Sequence[int] = (32, 32), reg_max: int = 4) -> None:
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = nc + reg_max * 4
        c2, c3 = 16, 16
        self.cv2 = nn.ModuleList(
            nn.Sequential(YConv(x, c2, 3), YConv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(YConv(x, c3, 3), YConv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch
        )
        self.dfl = DFL(reg_max)

    def forward(self, x: list[Tensor]) -> Tensor:
        x = list(x)
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        return torch.cat((self.dfl(box), cls.sigmoid()), 1)


class YoloNet(nn.Module):
    """A tiny YOLO: stride-2 conv, a CSP stage, stride-2 conv, a CSP stage, a detection head on both."""

    def __init__(self, csp: Callable[[int, int], nn.Module], head: str | None = None) -> None:
        super().__init__()
        self.b0 = YConv(3, 16, 3, 2)
        self.b1 = csp(16, 32)
        self.b2 = YConv(32, 32, 3, 2)
        self.b3 = csp(32, 32)
        if head == "v5":
            self.detect: nn.Module = Detect(ch=(32, 32))
        elif head == "v8":
            self.detect = DetectV8(ch=(32, 32))
        else:
            self.detect = nn.Identity()
            self.fc = nn.Linear(32, NUM_CLASSES)
        self.head_kind = head

    def forward(self, x: Tensor) -> Tensor:
        p3 = self.b1(self.b0(x))
        p4 = self.b3(self.b2(p3))
        if self.head_kind is None:
            return self.fc(p4.mean((2, 3)))
        return self.detect([p3, p4])


# ---- diffusion --------------------------------------------------------------------------------


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """guided-diffusion sinusoidal timestep embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D``: GroupNorm(self.groups), ``time_emb_proj(t)[:, :, None, None]``."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int = 4) -> None:
        super().__init__()
        self.groups = groups
        self.norm1 = nn.GroupNorm(num_groups=self.groups, num_channels=cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(num_groups=self.groups, num_channels=cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, input_tensor: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = h + temb
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + h


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion ``GroupNorm32``: computes in float32."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    """guided-diffusion ``ResBlock``: ``emb_out[..., None]`` until it matches ``h``."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(4, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(4, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """guided-diffusion ``Downsample``: ``assert x.shape[1] == self.channels`` then a stride-2 conv."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.op: nn.Module = nn.Conv2d(channels, channels, 3, 2, 1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class Upsample(nn.Module):
    """guided-diffusion ``Upsample``: assert the channel count, nearest x2, optional conv."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[1] == self.channels
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class DiffusionNet(nn.Module):
    """Time embedding MLP + one diffusers ResnetBlock2D per width, pooled head."""

    def __init__(self, ch: int = 16, temb: int = 32) -> None:
        super().__init__()
        self.temb_dim = temb
        self.time_embedding = nn.Sequential(nn.Linear(16, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.res1 = ResnetBlock2D(ch, 2 * ch, temb)
        self.res2 = ResnetBlock2D(2 * ch, 2 * ch, temb)
        self.head = nn.Linear(2 * ch, NUM_CLASSES)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_embedding(timestep_embedding(t, 16))
        h = self.res2(self.res1(self.conv_in(x), emb), emb)
        return self.head(h.mean((2, 3)))


class TinyUNet(nn.Module):
    """guided-diffusion UNet: ResBlocks with time embedding, down/upsample, skip concat, out conv."""

    def __init__(self, ch: int = 16, emb: int = 32, use_conv: bool = True) -> None:
        super().__init__()
        self.model_channels = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_conv = nn.Conv2d(3, ch, 3, padding=1)
        self.down_res = ResBlock(ch, emb, ch)
        self.down = Downsample(ch, use_conv)
        self.mid = ResBlock(ch, emb, 2 * ch)
        self.up = Upsample(2 * ch, use_conv)
        self.up_res = ResBlock(3 * ch, emb, ch)
        self.out = nn.Sequential(GroupNorm32(4, ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = self.input_conv(x)
        skip = self.down_res(h, emb)
        h = self.mid(self.down(skip), emb)
        h = torch.cat([self.up(h), skip], dim=1)
        return self.out(self.up_res(h, emb))


class FuncGroupNorm(nn.Module):
    """A hand-written group norm: ``F.group_norm(x, self.num_groups, self.weight, self.bias)``."""

    def __init__(self, num_groups: int, num_channels: int) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(num_channels))
        self.bias = nn.Parameter(0.1 * torch.randn(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, 1e-5)

    def kept_forward(self, kept: Tensor, pruned: nn.Module) -> Callable[[Tensor], Tensor]:
        """For :func:`masked_reference`: the norm over the kept channels with the pruned group count."""

        def forward(x: Tensor) -> Tensor:
            w, b = self.weight.index_select(0, kept), self.bias.index_select(0, kept)
            y = F.group_norm(
                x.index_select(1, kept), getattr(pruned, "num_groups", self.num_groups), w, b, 1e-5
            )
            return torch.zeros_like(x).index_copy(1, kept, y)

        return forward


class GNConvBlock(nn.Module):
    """conv, group norm with the group count in an attribute, SiLU, twice, residual."""

    def __init__(self, c: int, groups: int = 4) -> None:
        super().__init__()
        self.num_groups = groups
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm1 = FuncGroupNorm(self.num_groups, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = nn.GroupNorm(self.num_groups, c)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return x + F.silu(self.norm2(self.conv2(h)))


# ---- torchvision classics ---------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision ResNet ``BasicBlock`` with a 1x1 downsample."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision ResNet ``Bottleneck`` (expansion 4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class InvertedResidual(nn.Module):
    """torchvision MobileNetV2 ``InvertedResidual``: expand, depthwise, linear projection."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBnAct(inp, hidden_dim, 1, act=nn.ReLU6))
        layers.extend(
            [
                ConvBnAct(hidden_dim, hidden_dim, 3, stride, g=hidden_dim, act=nn.ReLU6),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class SqueezeExcitation(nn.Module):
    """torchvision ``SqueezeExcitation``: ``scale * input`` with 1x1 conv fc layers."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.activation(self.fc1(scale))
        return self.scale_activation(self.fc2(scale))

    def forward(self, input: Tensor) -> Tensor:
        return self._scale(input) * input


class MBConv(nn.Module):
    """torchvision EfficientNet ``MBConv``: expand, depthwise, SE, project, residual."""

    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        exp = cin * expand
        self.block = nn.Sequential(
            ConvBnAct(cin, exp, 1, act=nn.SiLU),
            ConvBnAct(exp, exp, 3, stride, g=exp, act=nn.SiLU),
            SqueezeExcitation(exp, max(1, cin // 4)),
            ConvBnAct(exp, cout, 1, act=None),
        )

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = result + input
        return result


class ConvNeXtBlock(nn.Module):
    """ConvNeXt (FB/timm) block: dwconv 7x7, permute, LayerNorm, MLP, ``self.gamma * x``, permute back."""

    def __init__(self, dim: int, layer_scale_init_value: float = 0.5) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * (1 + 0.5 * torch.randn(dim)))

    def forward(self, x: Tensor) -> Tensor:
        inp = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return inp + x


class LayerNorm2d(nn.LayerNorm):
    """timm/torchvision ``LayerNorm2d``: a LayerNorm over the channel dim of NCHW maps.

    ``channel_dim = 1`` tells :func:`masked_reference` where the normalized channels are."""

    channel_dim = 1

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """torchvision ``Permute`` module."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """torchvision ConvNeXt ``CNBlock``: Sequential with Permute modules, ``layer_scale`` (dim, 1, 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(0.5 * (1 + 0.5 * torch.randn(dim, 1, 1)))

    def forward(self, input: Tensor) -> Tensor:
        return self.layer_scale * self.block(input) + input


class ConvNeXtTV(nn.Module):
    """torchvision ConvNeXt: patchify stem with LayerNorm2d, blocks, LayerNorm2d + conv downsample."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 2, 2), LayerNorm2d(dim, eps=1e-6))
        self.stage1 = CNBlock(dim)
        self.down = nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, 2 * dim, 2, 2))
        self.stage2 = CNBlock(2 * dim)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), LayerNorm2d(2 * dim), nn.Flatten(1), nn.Linear(2 * dim, NUM_CLASSES)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))))


class DenseLayer(nn.Module):
    """torchvision ``_DenseLayer``: takes the list of previous features, concatenates them."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        concated = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck_output)))


class DenseBlock(nn.ModuleDict):
    """torchvision ``_DenseBlock`` + transition: ``features.append(layer(features))``, cat."""

    def __init__(self, num_layers: int, c: int, growth: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(c + i * growth, growth))
        out = c + num_layers * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(out), nn.ReLU(inplace=True), nn.Conv2d(out, out // 2, 1, bias=False)
        )

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for name, layer in self.items():
            if name != "transition":
                features.append(layer(features))
        return self.transition(torch.cat(features, 1))


class InceptionA(nn.Module):
    """torchvision ``InceptionA``: four branches concatenated."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBnAct(in_channels, 16, 1)
        self.branch5x5_1 = ConvBnAct(in_channels, 12, 1)
        self.branch5x5_2 = ConvBnAct(12, 16, 5)
        self.branch3x3dbl_1 = ConvBnAct(in_channels, 16, 1)
        self.branch3x3dbl_2 = ConvBnAct(16, 24, 3)
        self.branch3x3dbl_3 = ConvBnAct(24, 24, 3)
        self.branch_pool = ConvBnAct(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """torchvision ShuffleNetV2 ``channel_shuffle``."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """torchvision ShuffleNetV2 ``InvertedResidual`` (stride 1: chunk; stride 2: two branches)."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                ConvBnAct(inp, inp, 3, stride, g=inp, act=None), ConvBnAct(inp, branch_features, 1)
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            ConvBnAct(inp if stride > 1 else branch_features, branch_features, 1),
            ConvBnAct(branch_features, branch_features, 3, stride, g=branch_features, act=None),
            ConvBnAct(branch_features, branch_features, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class RepVGGBlock(nn.Module):
    """RepVGG training-time block: 3x3 conv-bn + 1x1 conv-bn + identity bn, summed, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.rbr_dense = ConvBnAct(c, c, 3, act=None)
        self.rbr_1x1 = ConvBnAct(c, c, 1, act=None)
        self.rbr_identity = nn.BatchNorm2d(c)
        self.nonlinearity = nn.ReLU()

    def forward(self, inputs: Tensor) -> Tensor:
        id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class GhostModule(nn.Module):
    """GhostNet ``GhostModule``: primary conv, cheap depthwise op, cat, ``[:, :self.oup]``."""

    def __init__(self, inp: int, oup: int, ratio: int = 2, relu: bool = True) -> None:
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = ConvBnAct(inp, init_channels, 1, act=nn.ReLU if relu else None)
        self.cheap_operation = ConvBnAct(
            init_channels, new_channels, 3, g=init_channels, act=nn.ReLU if relu else None
        )

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, : self.oup, :, :]


class GhostBottleneck(nn.Module):
    """GhostNet bottleneck: ghost (expand), ghost (project, no relu), identity shortcut."""

    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.ghost1 = GhostModule(c, mid, relu=True)
        self.ghost2 = GhostModule(mid, c, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ghost2(self.ghost1(x))


class RegNetBlock(nn.Module):
    """torchvision RegNet ``ResBottleneckBlock``: group conv with ``groups = w_b // group_width``."""

    def __init__(
        self, width_in: int, width_out: int, group_width: int = 8, bottleneck_multiplier: float = 1.0
    ):
        super().__init__()
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        self.a = ConvBnAct(width_in, w_b, 1)
        self.b = ConvBnAct(w_b, w_b, 3, g=g)
        self.c = ConvBnAct(w_b, width_out, 1, act=None)
        self.proj = ConvBnAct(width_in, width_out, 1, act=None) if width_in != width_out else None
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.c(self.b(self.a(x)))
        x = self.proj(x) if self.proj is not None else x
        return self.activation(x + y)


class ChannelGate(nn.Module):
    """CBAM ``ChannelGate``: shared MLP on avg- and max-pooled features."""

    def __init__(self, c: int, reduction: int = 4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(c, c // reduction), nn.ReLU(), nn.Linear(c // reduction, c)
        )

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(F.avg_pool2d(x, (x.size(2), x.size(3))))
        mx = self.mlp(F.max_pool2d(x, (x.size(2), x.size(3))))
        scale = torch.sigmoid(avg + mx).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


class SpatialGate(nn.Module):
    """CBAM ``SpatialGate``: ``cat(x.mean(1, keepdim=True), x.amax(1, keepdim=True))``, 7x7 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial = ConvBnAct(2, 1, 7, act=None)

    def forward(self, x: Tensor) -> Tensor:
        x_compress = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), dim=1)
        return x * torch.sigmoid(self.spatial(x_compress))


class CBAMBlock(nn.Module):
    """conv-bn-relu then CBAM channel and spatial gates, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = ConvBnAct(c, c, 3)
        self.channel_gate = ChannelGate(c)
        self.spatial_gate = SpatialGate()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.spatial_gate(self.channel_gate(self.conv(x)))


class FPNNet(nn.Module):
    """torchvision ``FeaturePyramidNetwork`` on a 3-level backbone: lateral 1x1, top-down
    ``F.interpolate(last_inner, size=feat_shape)`` + lateral, 3x3 output convs, pooled head."""

    def __init__(self, out_channels: int = 24) -> None:
        super().__init__()
        self.c3 = ConvBnAct(3, 16, 3)
        self.c4 = ConvBnAct(16, 32, 3, 2)
        self.c5 = ConvBnAct(32, 48, 3, 2)
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in (16, 32, 48))
        self.layer_blocks = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in range(3)
        )
        self.head = nn.Linear(out_channels, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        f3 = self.c3(x)
        f4 = self.c4(f3)
        f5 = self.c5(f4)
        feats = [f3, f4, f5]
        last_inner = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            inner_lateral = self.inner_blocks[idx](feats[idx])
            feat_shape = inner_lateral.shape[-2:]
            inner_top_down = F.interpolate(last_inner, size=feat_shape, mode="nearest")
            last_inner = inner_lateral + inner_top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        pooled = sum(r.mean((2, 3)) for r in results)
        return self.head(pooled)


class Hourglass(nn.Module):
    """Hourglass: downsample, recurse, ``F.interpolate(low, size=skip.shape[-2:])`` + skip."""

    def __init__(self, c: int, depth: int = 2) -> None:
        super().__init__()
        self.up1 = ConvBnAct(c, c, 3)
        self.low1 = ConvBnAct(c, c + 8, 3, 2)
        self.low2: nn.Module = Hourglass(c + 8, depth - 1) if depth > 1 else ConvBnAct(c + 8, c + 8, 3)
        self.low3 = ConvBnAct(c + 8, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.up1(x)
        low = self.low3(self.low2(self.low1(x)))
        return skip + F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)


# =============================================================================================
# Hugging Face style language models
# =============================================================================================


def rotate_half(x: Tensor) -> Tensor:
    """Llama ``rotate_half``."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Llama ``apply_rotary_pos_emb`` (cos/sin unsqueezed on the head dim)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: Tensor, n_rep: int) -> Tensor:
    """Llama ``repeat_kv``: ``(b, kv, s, d)`` -> ``(b, kv * n_rep, s, d)``."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class LlamaRotaryEmbedding(nn.Module):
    """Llama rotary embedding: ``inv_freq`` buffer, returns ``(cos, sin)``."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv_freq_expanded @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class LlamaAttention(nn.Module):
    """Llama GQA attention: q/k/v/o projections, RoPE, ``repeat_kv`` by ``num_key_value_groups``."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = heads
        self.num_key_value_heads = kv_heads
        self.num_key_value_groups = heads // kv_heads
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)
        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) * self.scaling + mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
        attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class LlamaMLP(nn.Module):
    """Llama gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaRMSNorm(nn.Module):
    """Hand-written RMSNorm: ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight``."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight

    def kept_forward(self, kept: Tensor, pruned: nn.Module) -> Callable[[Tensor], Tensor]:
        """For :func:`masked_reference`: the norm over the kept channels only, zeros elsewhere."""

        def forward(x: Tensor) -> Tensor:
            xk = x.index_select(-1, kept)
            y = xk * torch.rsqrt(xk.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return torch.zeros_like(x).index_copy(-1, kept, y * self.weight.index_select(0, kept))

        return forward


class LlamaDecoderLayer(nn.Module):
    """Llama decoder layer with ``norm`` (nn.RMSNorm or the hand-written one)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, norm: type) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hidden, heads, kv_heads, head_dim)
        self.mlp = LlamaMLP(hidden, 2 * hidden)
        self.input_layernorm = norm(hidden)
        self.post_attention_layernorm = norm(hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLike(nn.Module):
    """Llama causal LM: embeddings, rotary, decoder layers, final norm, lm head (vocab out)."""

    def __init__(self, hidden: int = 32, heads: int = 4, kv_heads: int = 2, norm: type = nn.RMSNorm) -> None:
        super().__init__()
        head_dim = 16
        self.embed_tokens = nn.Embedding(VOCAB, hidden)
        self.rotary_emb = LlamaRotaryEmbedding(head_dim)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hidden, heads, kv_heads, head_dim, norm) for _ in range(2)
        )
        self.norm = norm(hidden)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        n = input_ids.shape[1]
        position_ids = torch.arange(n)[None].expand(input_ids.shape[0], -1)
        cos, sin = self.rotary_emb(x, position_ids)
        mask = torch.full((n, n), float("-inf")).triu(1)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


class RMSNormMLPNet(nn.Module):
    """Embedding, two pre-norm residual gated MLPs with the hand-written RMSNorm, lm head."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, hidden)
        self.norms = nn.ModuleList(LlamaRMSNorm(hidden) for _ in range(2))
        self.mlps = nn.ModuleList(LlamaMLP(hidden, 2 * hidden) for _ in range(2))
        self.norm = LlamaRMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.lm_head(self.norm(x))


class Conv1D(nn.Module):
    """HF GPT-2 ``Conv1D``: weight ``(nx, nf)``; ``x @ self.weight + self.bias`` or ``addmm`` with
    ``self.nf``."""

    def __init__(self, nf: int, nx: int, addmm: bool = False) -> None:
        super().__init__()
        self.nf = nf
        self.addmm = addmm
        self.weight = nn.Parameter(0.1 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.02 * torch.randn(nf))

    def forward(self, x: Tensor) -> Tensor:
        if not self.addmm:
            return x @ self.weight + self.bias
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    """HF GPT-2 attention: ``c_attn(x).split(self.split_size, dim=2)``, ``_split_heads`` views."""

    def __init__(self, embed_dim: int, num_heads: int = 4, n_pos: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.split_size = embed_dim
        self.c_attn = Conv1D(3 * embed_dim, embed_dim)
        self.c_proj = Conv1D(embed_dim, embed_dim)
        self.register_buffer(
            "bias", torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos)
        )

    def _split_heads(self, tensor: Tensor, num_heads: int, attn_head_size: int) -> Tensor:
        new_shape = tensor.size()[:-1] + (num_heads, attn_head_size)
        return tensor.view(new_shape).permute(0, 2, 1, 3)

    def _merge_heads(self, tensor: Tensor, num_heads: int, attn_head_size: int) -> Tensor:
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        new_shape = tensor.size()[:-2] + (num_heads * attn_head_size,)
        return tensor.view(new_shape)

    def forward(self, hidden_states: Tensor) -> Tensor:
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) / (value.size(-1) ** 0.5)
        q_len, k_len = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, k_len - q_len : k_len, :k_len]
        mask_value = torch.finfo(attn_weights.dtype).min
        attn_weights = torch.where(causal_mask, attn_weights, torch.full([], mask_value))
        attn_weights = attn_weights.softmax(dim=-1)
        attn_output = self._merge_heads(torch.matmul(attn_weights, value), self.num_heads, self.head_dim)
        return self.c_proj(attn_output)


class GPT2Block(nn.Module):
    """GPT-2 block: ln_1, attention, ln_2, MLP of addmm Conv1D layers with ``self.nf``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = GPT2Attention(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = Conv1D(4 * dim, dim, addmm=True)
        self.c_proj = Conv1D(dim, 4 * dim, addmm=True)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2Like(nn.Module):
    """GPT-2 LM: wte + wpe, blocks, ln_f, lm_head tied to wte."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.wpe = nn.Embedding(16, dim)
        self.h = nn.ModuleList(GPT2Block(dim) for _ in range(2))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1])[None]
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class T5Attention(nn.Module):
    """HF T5 attention: no scaling, ``relative_attention_bias`` embedding of bucketed positions."""

    def __init__(
        self, d_model: int, n_heads: int = 4, d_kv: int = 8, has_relative_attention_bias: bool = False
    ):
        super().__init__()
        self.n_heads = n_heads
        self.key_value_proj_dim = d_kv
        self.inner_dim = n_heads * d_kv
        self.relative_attention_num_buckets = 16
        self.relative_attention_max_distance = 32
        self.has_relative_attention_bias = has_relative_attention_bias
        self.q = nn.Linear(d_model, self.inner_dim, bias=False)
        self.k = nn.Linear(d_model, self.inner_dim, bias=False)
        self.v = nn.Linear(d_model, self.inner_dim, bias=False)
        self.o = nn.Linear(self.inner_dim, d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.relative_attention_num_buckets, n_heads)

    @staticmethod
    def _relative_position_bucket(
        relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
    ) -> Tensor:
        relative_buckets = torch.zeros_like(relative_position)
        if bidirectional:
            num_buckets //= 2
            relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
            relative_position = torch.abs(relative_position)
        else:
            relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        relative_position_if_large = max_exact + (
            torch.log(relative_position.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        relative_position_if_large = torch.min(
            relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
        )
        relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
        return relative_buckets

    def compute_bias(self, query_length: int, key_length: int) -> Tensor:
        context_position = torch.arange(query_length, dtype=torch.long)[:, None]
        memory_position = torch.arange(key_length, dtype=torch.long)[None, :]
        relative_position = memory_position - context_position
        bucket = self._relative_position_bucket(
            relative_position,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        values = self.relative_attention_bias(bucket)
        return values.permute([2, 0, 1]).unsqueeze(0)

    def forward(self, hidden_states: Tensor, position_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch_size, seq_length = hidden_states.shape[:2]

        def shape(states: Tensor) -> Tensor:
            return states.view(batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)

        def unshape(states: Tensor) -> Tensor:
            return states.transpose(1, 2).contiguous().view(batch_size, -1, self.inner_dim)

        q, k, v = shape(self.q(hidden_states)), shape(self.k(hidden_states)), shape(self.v(hidden_states))
        scores = torch.matmul(q, k.transpose(3, 2))
        if position_bias is None:
            position_bias = self.compute_bias(seq_length, seq_length)
        scores = scores + position_bias
        attn_weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o(unshape(torch.matmul(attn_weights, v))), position_bias


class T5Like(nn.Module):
    """T5 encoder: shared embedding, layers (first has the relative bias, others reuse it), lm head."""

    def __init__(self, d_model: int = 32) -> None:
        super().__init__()
        self.shared = nn.Embedding(VOCAB, d_model)
        self.attn = nn.ModuleList(T5Attention(d_model, has_relative_attention_bias=i == 0) for i in range(2))
        self.ln_attn = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-6) for _ in range(2))
        self.ff = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, 64, bias=False), nn.ReLU(), nn.Linear(64, d_model, bias=False))
            for _ in range(2)
        )
        self.ln_ff = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-6) for _ in range(2))
        self.final_layer_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.lm_head = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.shared(input_ids)
        position_bias = None
        for attn, ln_a, ff, ln_f in zip(self.attn, self.ln_attn, self.ff, self.ln_ff):
            y, position_bias = attn(ln_a(x), position_bias)
            x = x + y
            x = x + ff(ln_f(x))
        return self.lm_head(self.final_layer_norm(x))


class MHASeqFirstLayer(nn.Module):
    """Post-norm encoder layer with a sequence-first ``nn.MultiheadAttention`` (fairseq/DETR style)."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, 2 * dim)
        self.linear2 = nn.Linear(2 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        s = x.transpose(0, 1)
        a, _ = self.self_attn(s, s, s, need_weights=False)
        x = self.norm1(x + a.transpose(0, 1))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


# =============================================================================================
# Odd shapes of code: literal sizes, attribute sizes, detach, no_grad, data-dependent branches
# =============================================================================================


class LiteralView(nn.Module):
    """Pools channels in 8 literal groups: ``x.view(b, 8, -1).mean(-1)`` (a hard-coded count)."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.conv = ConvBnAct(c, c, 3)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = self.conv(x)
        return self.fc(x.view(b, 8, -1).mean(-1))


class LiteralViewNet(nn.Module):
    """Stem then :class:`LiteralView` (the head is the block's own linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnAct(3, 32, 3, 2)
        self.block = LiteralView(32)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.stem(x))


class SeqToImage(nn.Module):
    """Tokens to an image: ``x.reshape(n, self.width, 4, 16)`` with the width in an attribute."""

    def __init__(self, dim: int = 16, width: int = 24) -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Linear(dim, 32)
        self.proj = nn.Linear(32, width)
        self.conv = ConvBnAct(width, 16, 3)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        x = self.proj(F.gelu(self.embed(x))).transpose(1, 2)
        x = x.reshape(n, self.width, 4, 16)
        return self.head(self.conv(x).mean((2, 3)))


class DetachBranch(nn.Module):
    """A stop-gradient branch: ``main(x) + aux(x.detach())``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.main = ConvBnAct(c, c, 3)
        self.aux = ConvBnAct(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.aux(x.detach())


class NoGradBranch(nn.Module):
    """A frozen teacher under ``torch.no_grad()`` added to the student."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.student = ConvBnAct(c, c, 3)
        self.teacher = ConvBnAct(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            t = self.teacher(x)
        return self.student(x) + t


class DataDependent(nn.Module):
    """``s.p(x) if x.sum() > 0 else s.n(x)``: the example input takes one branch only."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.p = nn.Conv2d(c, c, 3, padding=1)
        self.n = nn.Conv2d(c, c, 3, padding=1)

    def forward(s, x: Tensor) -> Tensor:  # noqa: N805 - the brief's spelling of self
        return s.p(x) if x.sum() > 0 else s.n(x)


class DataDependentNet(nn.Module):
    """Linear stem (no activation, so the sign of ``x.sum()`` follows the input), the branch, head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.block = DataDependent(c)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)))


# =============================================================================================
# The zoo
# =============================================================================================


def _seq(*mods: nn.Module) -> nn.Sequential:
    return nn.Sequential(*mods)


def _diffusion_inputs(h: int = 16) -> Callable[[], tuple[Tensor, Tensor]]:
    def make() -> tuple[Tensor, Tensor]:
        return images(h)(), torch.tensor([3, 250])

    return make


def _float_tokens(n: int = 64, dim: int = 16) -> Callable[[], Tensor]:
    def make() -> Tensor:
        return torch.randn(2, n, dim, generator=torch.Generator().manual_seed(1))

    return make


def _negated(make: Callable[[], Tensor]) -> Callable[[], Tensor]:
    return lambda: -make()


BLOCKS: list[Block] = [
    # --- timm vision transformers -----------------------------------------------------------
    Block(
        "vit_attention",
        "timm Attention: qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads), cls token, pos embed",
        seeded(lambda: VisionTransformer(32)),
        images(16),
        heads=True,
    ),
    Block(
        "vit_attention_attr_dims",
        "timm Attention with self.head_dim/self.attn_dim != dim, fused SDPA",
        seeded(lambda: VisionTransformer(32, attn=AttentionAttrDims)),
        images(16),
        heads=True,
    ),
    Block(
        "layerscale_view",
        "timm LayerScale: self.shape = (dim,), x * self.scale.view(self.shape)",
        seeded(lambda: TokenModel(_seq(MlpBlock(32, LayerScale), MlpBlock(32, LayerScale)), 32)),
        images(16),
    ),
    Block(
        "layerscale2d_view",
        "MetaFormer Scale on NCHW: self.shape = (dim, 1, 1)",
        seeded(
            lambda: ConvModel(
                _seq(ConvBnAct(16, 32, 3), LayerScale2d(32), ConvBnAct(32, 32, 3), LayerScale2d(32)), 16, 32
            )
        ),
        images(16),
    ),
    Block(
        "layerscale_gamma",
        "DeiT-III/CaiT layer scale: self.gamma * x",
        seeded(lambda: TokenModel(_seq(MlpBlock(32, GammaScale), MlpBlock(32, GammaScale)), 32)),
        images(16),
    ),
    Block(
        "cait_class_attention",
        "CaiT ClassAttn: query = cls token only, gamma_1 * attn(norm1(cat(cls, x)))",
        seeded(lambda: CaiT(32)),
        images(16),
        heads=True,
    ),
    Block(
        "coat_conv_pos_split",
        "CoaT ConvRelPosEnc: torch.split(x, self.split_sizes, dim=1) -> depthwise convs -> cat",
        seeded(lambda: TokenModel(_seq(CoaTBlock(32)), 32)),
        images(16),
        heads=True,
    ),
    Block(
        "swin_window_attention",
        "Swin window_partition/window_reverse, relative_position_bias_table[relative_position_index]",
        seeded(lambda: SwinModel(32)),
        images(16),
        heads=True,
    ),
    Block(
        "swin_shifted_window",
        "Swin with torch.roll shift and attention mask buffer",
        seeded(lambda: SwinModel(32, shift=True)),
        images(16),
        heads=True,
    ),
    Block(
        "maxvit_grid_attention",
        "MaxViT grid_partition/grid_reverse, AttentionCl qkv(x).view(B, -1, heads, dim_head * 3).chunk(3)",
        seeded(lambda: MaxViTModel(32)),
        images(16),
        heads=True,
    ),
    Block(
        "crossvit_cross_attention",
        "CrossViT: branches of widths 32/16, cls token projected across and attends to the other branch",
        seeded(lambda: CrossViT()),
        images(16),
        heads=True,
    ),
    Block(
        "levit_attention_bias",
        "LeViT Attention: split([key_dim, key_dim, val_dim]), attention_biases[:, attention_bias_idxs], "
        "LinearNorm",
        seeded(lambda: TokenModel(_seq(LeViTBlock(32), LeViTBlock(32)), 32)),
        images(16),
        heads=True,
    ),
    Block(
        "mha_encoder_batch_first",
        "torch nn.TransformerEncoderLayer(batch_first=True) (nn.MultiheadAttention inside)",
        seeded(
            lambda: TokenModel(
                _seq(
                    *[nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True) for _ in range(2)]
                ),
                32,
            )
        ),
        images(16),
        heads=True,
    ),
    Block(
        "mha_seq_first",
        "nn.MultiheadAttention(batch_first=False) in a DETR/fairseq-style post-norm layer",
        seeded(lambda: TokenModel(_seq(MHASeqFirstLayer(32), MHASeqFirstLayer(32)), 32)),
        images(16),
        heads=True,
    ),
    Block(
        "mlp_mixer",
        "timm MixerBlock: token-mixing MLP over the sequence dim (transpose(1, 2)), channel MLP",
        seeded(lambda: TokenModel(_seq(MixerBlock(32, 16), MixerBlock(32, 16)), 32)),
        images(16),
    ),
    # --- MetaFormer ---------------------------------------------------------------------------
    Block(
        "metaformer_pooling",
        "timm MetaFormer: GroupNorm(1) norms, Pooling mixer pool(x) - x, Scale view(self.shape)",
        seeded(lambda: ConvModel(_seq(MetaFormerBlock(32), MetaFormerBlock(32)), 32, 32, 2)),
        images(16),
    ),
    Block(
        "metaformer_sepconv",
        "MetaFormer ConvFormer SepConv mixer (channels last: Linear, permute, dwconv, permute, Linear)",
        seeded(lambda: ConvFormerModel(32)),
        images(16),
    ),
    Block(
        "poolformer",
        "PoolFormer v1: layer_scale_1.unsqueeze(-1).unsqueeze(-1) * token_mixer(norm1(x))",
        seeded(lambda: ConvModel(_seq(PoolFormerBlock(32), PoolFormerBlock(32)), 32, 32, 2)),
        images(16),
    ),
    # --- attention-free CNN gates --------------------------------------------------------------
    Block(
        "blurpool_antialias",
        "timm BlurPool2d: fixed filter buffer, F.conv2d(..., groups=self.channels)",
        seeded(lambda: ConvModel(AntiAliasBlock(16, 32), 16, 32)),
        images(16),
    ),
    Block(
        "se_module",
        "timm SqueezeExcite module: x * gate(conv_expand(act(conv_reduce(x.mean((2, 3))))))",
        seeded(lambda: ConvModel(_seq(SEConvBlock(32, SqueezeExcite)), 32, 32)),
        images(16),
    ),
    Block(
        "se_functional",
        "functional SE: F.adaptive_avg_pool2d, Linear, x * s.view(b, c, 1, 1)",
        seeded(lambda: ConvModel(_seq(SEConvBlock(32, SEFunctional)), 32, 32)),
        images(16),
    ),
    Block(
        "cbam",
        "CBAM ChannelGate (avg+max MLP) and SpatialGate (x.mean(1), x.amax(1), 7x7 conv)",
        seeded(lambda: ConvModel(_seq(CBAMBlock(32), CBAMBlock(32)), 32, 32)),
        images(16),
    ),
    # --- YOLO ----------------------------------------------------------------------------------
    Block(
        "yolov5_c3",
        "YOLOv5 C3: cv3(cat((m(cv1(x)), cv2(x)), 1))",
        seeded(lambda: YoloNet(lambda a, b: C3(a, b, 2))),
        images(16),
    ),
    Block(
        "yolov8_c2f_chunk",
        "YOLOv8 C2f: list(cv1(x).chunk(2, 1)), y.extend(m(y[-1]) ...), cv2(cat(y, 1))",
        seeded(lambda: YoloNet(lambda a, b: C2f(a, b, 2))),
        images(16),
    ),
    Block(
        "yolov8_c2f_split",
        "YOLOv8 C2f: cv1(x).split((self.c, self.c), 1)",
        seeded(lambda: YoloNet(lambda a, b: C2f(a, b, 2, use_split=True))),
        images(16),
    ),
    Block(
        "yolov5_detect_head",
        "YOLOv5 Detect: conv to na*no, x.view(bs, self.na, self.no, ny, nx).permute(...)",
        seeded(lambda: YoloNet(lambda a, b: C3(a, b, 1), head="v5")),
        images(16),
    ),
    Block(
        "yolov8_decoupled_head",
        "YOLOv8 Detect: box/cls branches cat, view(b, self.no, -1), split, DFL softmax",
        seeded(lambda: YoloNet(lambda a, b: C2f(a, b, 1), head="v8")),
        images(16),
    ),
    # --- diffusion -----------------------------------------------------------------------------
    Block(
        "diffusion_resblock_temb",
        "diffusers ResnetBlock2D: GroupNorm(self.groups), time_emb_proj(temb)[:, :, None, None], "
        "conv_shortcut",
        seeded(lambda: DiffusionNet()),
        _diffusion_inputs(),
    ),
    Block(
        "unet_skip_concat",
        "guided-diffusion UNet: ResBlock emb_out[..., None] loop, GroupNorm32, Down/Upsample, skip cat",
        seeded(lambda: TinyUNet()),
        _diffusion_inputs(),
    ),
    Block(
        "assert_channels_down_up",
        "guided-diffusion Downsample/Upsample(use_conv=False): assert x.shape[1] == self.channels",
        seeded(lambda: TinyUNet(use_conv=False)),
        _diffusion_inputs(),
    ),
    Block(
        "groupnorm_functional_attr",
        "hand-written group norm F.group_norm(x, self.num_groups, ...) + nn.GroupNorm(self.num_groups)",
        seeded(lambda: ConvModel(_seq(GNConvBlock(32), GNConvBlock(32)), 32, 32)),
        images(16),
    ),
    # --- torchvision classics -------------------------------------------------------------------
    Block(
        "resnet_basic",
        "torchvision ResNet BasicBlock with 1x1 downsample, out += identity",
        seeded(lambda: ConvModel(_seq(BasicBlock(16, 16), BasicBlock(16, 32, 2)), 16, 32)),
        images(16),
    ),
    Block(
        "resnet_bottleneck",
        "torchvision ResNet Bottleneck (expansion 4)",
        seeded(lambda: ConvModel(_seq(Bottleneck(16, 8), Bottleneck(32, 8)), 16, 32)),
        images(16),
    ),
    Block(
        "mobilenetv2_inverted_residual",
        "torchvision MobileNetV2 InvertedResidual (expand, depthwise, linear project)",
        seeded(
            lambda: ConvModel(_seq(InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4)), 16, 24)
        ),
        images(16),
    ),
    Block(
        "efficientnet_mbconv_se",
        "torchvision EfficientNet MBConv with SqueezeExcitation (scale * input)",
        seeded(lambda: ConvModel(_seq(MBConv(16, 24, 4, 2), MBConv(24, 24, 4)), 16, 24)),
        images(16),
    ),
    Block(
        "convnext_block",
        "ConvNeXt block: dwconv 7x7, permute, LayerNorm, MLP, self.gamma * x, permute back",
        seeded(lambda: ConvModel(_seq(ConvNeXtBlock(32), ConvNeXtBlock(32)), 32, 32, 2)),
        images(16),
    ),
    Block(
        "convnext_torchvision",
        "torchvision CNBlock (Permute modules, layer_scale (dim,1,1)) + LayerNorm2d downsample",
        seeded(lambda: ConvNeXtTV(16)),
        images(16),
    ),
    Block(
        "densenet_block",
        "torchvision _DenseBlock: features.append(layer(features)), cat(inputs, 1), transition",
        seeded(lambda: ConvModel(DenseBlock(3, 16, 8), 16, 20)),
        images(16),
    ),
    Block(
        "inception_a",
        "torchvision InceptionA: 1x1 / 5x5 / double 3x3 / pool branches concatenated",
        seeded(lambda: ConvModel(InceptionA(16, 8), 16, 64)),
        images(16),
    ),
    Block(
        "shufflenetv2_shuffle",
        "torchvision ShuffleNetV2: chunk(2, dim=1), cat, "
        "x.view(b, groups, c // groups, h, w).transpose(1, 2)",
        seeded(lambda: ConvModel(_seq(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1)), 16, 32)),
        images(16),
    ),
    Block(
        "repvgg_block",
        "RepVGG training block: rbr_dense + rbr_1x1 + rbr_identity(BN) summed",
        seeded(lambda: ConvModel(_seq(RepVGGBlock(32), RepVGGBlock(32)), 32, 32)),
        images(16),
    ),
    Block(
        "ghostnet_ghost_module",
        "GhostNet GhostModule: cat(primary, cheap depthwise)[:, :self.oup] (odd oup=15)",
        seeded(lambda: ConvModel(_seq(ConvBnAct(16, 15, 1), GhostBottleneck(15, 24)), 16, 15)),
        images(16),
    ),
    Block(
        "regnet_group_conv",
        "torchvision RegNet ResBottleneckBlock: conv b with groups = w_b // group_width",
        seeded(lambda: ConvModel(_seq(RegNetBlock(16, 32), RegNetBlock(32, 32)), 16, 32)),
        images(16),
    ),
    Block(
        "fpn_topdown",
        "torchvision FeaturePyramidNetwork: lateral 1x1 + F.interpolate(last_inner, size=feat_shape)",
        seeded(lambda: FPNNet()),
        images(16),
    ),
    Block(
        "hourglass_interpolate_size",
        "Hourglass: F.interpolate(low, size=skip.shape[-2:]) on odd sizes (15x15)",
        seeded(lambda: ConvModel(Hourglass(16), 16, 16)),
        images(15),
    ),
    # --- Hugging Face style LMs -----------------------------------------------------------------
    Block(
        "llama_gqa_rope",
        "HF Llama: GQA (num_key_value_groups) repeat_kv, rotate_half RoPE, nn.RMSNorm, gated MLP",
        seeded(lambda: LlamaLike(32, 4, 2)),
        tokens(12),
        heads=True,
    ),
    Block(
        "llama_mha_rope",
        "HF Llama with num_key_value_heads == num_heads",
        seeded(lambda: LlamaLike(32, 4, 4)),
        tokens(12),
        heads=True,
    ),
    Block(
        "rmsnorm_handwritten",
        "HF LlamaRMSNorm written by hand: "
        "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight",
        seeded(lambda: RMSNormMLPNet(32)),
        tokens(12),
    ),
    Block(
        "gpt2_attention",
        "HF GPT-2: Conv1D x @ self.weight, c_attn(x).split(self.split_size, dim=2), "
        "addmm MLP with self.nf, tied lm_head",
        seeded(lambda: GPT2Like(32)),
        tokens(12),
        heads=True,
    ),
    Block(
        "t5_relative_attention",
        "HF T5Attention: relative_attention_bias Embedding(buckets, n_heads), bias shared by later layers",
        seeded(lambda: T5Like(32)),
        tokens(12),
        heads=True,
    ),
    # --- odd code --------------------------------------------------------------------------------
    Block(
        "literal_view_8",
        "x.view(b, 8, -1).mean(-1): a literal channel-group count",
        seeded(lambda: LiteralViewNet()),
        images(16),
    ),
    Block(
        "reshape_self_width",
        "tokens to an image: x.reshape(n, self.width, 4, 16)",
        seeded(lambda: SeqToImage()),
        _float_tokens(64, 16),
    ),
    Block(
        "detach_branch",
        "stop-gradient branch: main(x) + aux(x.detach())",
        seeded(lambda: ConvModel(_seq(DetachBranch(16), DetachBranch(16)), 16, 16)),
        images(16),
    ),
    Block(
        "no_grad_block",
        "frozen teacher under torch.no_grad() added to the student",
        seeded(lambda: ConvModel(_seq(NoGradBranch(16), NoGradBranch(16)), 16, 16)),
        images(16),
    ),
    Block(
        "data_dependent_branch",
        "s.p(x) if x.sum() > 0 else s.n(x); the other sign is checked too",
        seeded(lambda: DataDependentNet()),
        images(16),
        alt_inputs=_negated(images(16)),
    ),
]


# =============================================================================================
# The masked reference
# =============================================================================================


def call(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list (positional) or a dict (keyword arguments)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _lookup(model: nn.Module, name: str) -> nn.Module | nn.Parameter:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    params = dict(model.named_parameters(remove_duplicate=False))
    if name in params:
        return params[name]
    raise KeyError(f"the model has no module or parameter named {name!r}")


def _kept_forward(module: nn.Module, kept: Tensor, num_groups: int | None) -> Callable[[Tensor], Tensor]:
    """A forward for a norm module of the reference that normalises over the kept channels only."""
    if isinstance(module, nn.GroupNorm):
        dim = 1
    else:
        dim = getattr(module, "channel_dim", -1)

    def forward(x: Tensor) -> Tensor:
        xk = x.index_select(dim, kept)
        w = (
            module.weight.index_select(-1 if not isinstance(module, nn.GroupNorm) else 0, kept)
            if module.weight is not None
            else None
        )
        b = getattr(module, "bias", None)
        b = b.index_select(-1 if not isinstance(module, nn.GroupNorm) else 0, kept) if b is not None else None
        if isinstance(module, nn.GroupNorm):
            y = F.group_norm(xk, num_groups or module.num_groups, w, b, module.eps)
        else:
            xm = xk.movedim(dim, -1)
            shape = (*tuple(module.normalized_shape)[:-1], len(kept))
            if isinstance(module, nn.RMSNorm):
                ym = F.rms_norm(xm, shape, w, module.eps)
            else:
                ym = F.layer_norm(xm, shape, w, b, module.eps)
            y = ym.movedim(-1, dim)
        out = torch.zeros_like(x)
        return out.index_copy(dim, kept, y.to(out.dtype))

    return forward


def masked_reference(dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """A deep copy of ``dense`` with every channel that ``pruned``'s pruning history removed zeroed.

    Record indices are in the numbering of the model as it was when that record was pruned, so the
    surviving original indices are tracked per (target, side) (one list for both sides of coupled
    layers, per dim for bare parameters) and each record's indices are mapped back through them.
    The original entries are zeroed through the pruner's ``param_views``. Norm modules
    (``nn.LayerNorm`` and subclasses, ``nn.GroupNorm``, ``nn.RMSNorm``) whose channels were pruned
    get a forward that normalises over the kept channels only (zeros elsewhere): that is what the
    masked dense model means for a norm. Batch norm needs nothing (per channel). Hand-written norms
    of the zoo (:class:`LlamaRMSNorm`, :class:`FuncGroupNorm`) provide that forward themselves
    through a ``kept_forward(kept, pruned_module)`` method.
    """
    ref = copy.deepcopy(dense)
    alive: dict[tuple[str, str, int | None], list[int]] = {}
    removed: dict[tuple[str, str, int | None], set[int]] = {}
    owners: dict[tuple[str, str, int | None], tuple[Any, Any, str]] = {}
    for record in get_pruning_history(pruned):
        # all items of one record index the same pre-record state: map first, then update
        pending: dict[tuple[str, str, int | None], set[int]] = {}
        for item in record.get("items", []):
            fn = function_by_name(item["function"])
            target = _lookup(ref, item["target"])
            if isinstance(target, nn.Parameter) and isinstance(fn, ParameterPruningFunction):
                pr: Any = ParameterPruner(item.get("dim"))
                dim = pr.pruning_dim(target)
                key = (item["target"], "both", dim)
                size = target.shape[dim]
            else:
                pr = fn.pruner
                side = "both" if pr.coupled(target) else fn.side
                key = (item["target"], side, None)
                size = pr.out_channels(target) if fn.side == "out" else pr.in_channels(target)
            if key not in alive:
                alive[key] = list(range(size))
                removed[key] = set()
                owners[key] = (target, pr, "out" if key[1] == "both" else key[1])
            cur = alive[key]
            pending.setdefault(key, set()).update(cur[i] for i in item["idxs"])
        for key, gone in pending.items():
            alive[key] = [i for i in alive[key] if i not in gone]
            removed[key] |= gone
    for key, gone in removed.items():
        if not gone:
            continue
        target, pr, side = owners[key]
        orig = torch.tensor(sorted(gone), dtype=torch.long)
        for pname, view in pr.param_views(target, side):
            p = target if pname == "" else target.get_parameter(pname)
            idx = torch.arange(p.numel()).reshape(p.shape)
            rows = view(idx)[orig]
            p.data.view(-1)[rows.reshape(-1)] = 0
        kept = torch.tensor(alive[key], dtype=torch.long)
        if isinstance(target, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
            groups = getattr(_lookup(pruned, key[0]), "num_groups", None)
            target.forward = _kept_forward(target, kept, groups)  # type: ignore[method-assign]
            continue
        # a hand-written norm of the zoo (its weight is a bare parameter) says how it normalises
        owner_name = key[0] if isinstance(target, nn.Module) else key[0].rpartition(".")[0]
        owner = _lookup(ref, owner_name) if owner_name else ref
        if hasattr(owner, "kept_forward"):
            pruned_owner = _lookup(pruned, owner_name) if owner_name else pruned
            owner.forward = owner.kept_forward(kept, pruned_owner)  # type: ignore[operator]
    return ref


# =============================================================================================
# Running one block
# =============================================================================================


@dataclass
class Result:
    """What pruning one block did."""

    name: str
    heads: bool
    cls: str = "BROKEN"
    runs: bool = False
    shapes_kept: bool = False
    params_before: int = 0
    params_after: int = 0
    max_diff: float | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def diagnosis(self) -> str:
        """One line on why the result is what it is."""
        bits = []
        if self.error:
            bits.append(self.error)
        if self.max_diff is not None:
            bits.append(f"max|pruned - masked| = {self.max_diff:.2e}")
        if self.refusals:
            bits.append("refused: " + refused_short(self.refusals))
        return "; ".join(bits)


_NOT_REFUSALS = ("treated these autograd ops as elementwise",)
_EXPLAINS_DIFF = ("approximat", "not exact", "inexact", "not equivalent")


def _is_refusal(msg: str) -> bool:
    return "prune_callbacks" in msg and not any(s in msg for s in _NOT_REFUSALS)


def refused_short(messages: Sequence[str]) -> str:
    """The layer names a list of refusal warnings mentions, shortly."""
    names: list[str] = []
    for msg in messages:
        found = re.findall(r"group of ([\w.\[\]]+)", msg)
        found += re.findall(r"^\s+([\w.]+)[\s:(]", msg, flags=re.M)
        if not found:
            found = [msg.replace("prune_callbacks: ", "")[:60]]
        for n in found:
            if n not in names:
                names.append(n)
    return ", ".join(names[:6]) + (f" (+{len(names) - 6})" if len(names) > 6 else "")


def _names_a_layer(msg: str, names: set[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", msg) for n in names if n)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    if isinstance(out, Tensor):
        return [tuple(out.shape)]
    if isinstance(out, (tuple, list)):
        return [s for o in out for s in _shapes(o)]
    if isinstance(out, Mapping):
        return [s for o in out.values() for s in _shapes(o)]
    return []


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return lines[0][:200] if lines else "(no message)"


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_block(block: Block, heads: bool, atol: float = 1e-4) -> Result:  # noqa: C901 - one check after another
    """Build ``block``, prune it with one l2 step at ratio 0.5 (heads at 0.5 when ``heads``) and check it.

    Classes: ``full`` (parameters dropped, no refusal warnings), ``partial`` (dropped, some groups
    refused with warnings), ``none`` (nothing pruned, refusal warnings present) and ``BROKEN`` (the
    prune raised, the pruned model does not run or changes output shapes, it is not equal to the
    masked dense model with no warning explaining it, or nothing was pruned without a warning).
    """
    res = Result(block.name, heads)
    start = time.perf_counter()
    model = block.build()
    dense = copy.deepcopy(model)
    x = block.inputs()
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        dense_out = call(dense, x)
        alt_out = call(dense, block.alt_inputs()) if block.alt_inputs else None
    res.params_before = _count(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pruner = Pruner(
                model,
                x,
                importance="l2",
                pruning_ratio=0.5,
                prune_num_heads=heads,
                head_pruning_ratio=0.5 if heads else 0.0,
            )
            pruner.step()
        except Exception as e:  # noqa: BLE001 - reported as BROKEN
            res.error = f"prune raised {type(e).__name__}: {_first_line(e)}"
    res.warnings = [str(w.message) for w in caught]
    res.refusals = [m for m in res.warnings if _is_refusal(m) and _names_a_layer(m, names)]
    res.params_after = _count(model)
    res.seconds = time.perf_counter() - start
    if res.error:
        return res
    try:
        with torch.no_grad():
            out = call(model, x)
            if block.alt_inputs is not None:
                try:
                    alt = call(model, block.alt_inputs())
                except Exception as e:
                    raise RuntimeError(f"on alt_inputs: {type(e).__name__}: {e}") from e
                if _shapes(alt) != _shapes(alt_out):
                    raise RuntimeError(f"on alt_inputs: output shapes {_shapes(alt)} != {_shapes(alt_out)}")
        res.runs = True
    except Exception as e:  # noqa: BLE001 - reported as BROKEN
        res.error = f"pruned model fails: {type(e).__name__}: {_first_line(e)}"
        return res
    res.shapes_kept = _shapes(out) == _shapes(dense_out)
    if not res.shapes_kept:
        res.error = f"output shapes {_shapes(out)} != {_shapes(dense_out)}"
        return res
    pruned_any = res.params_after < res.params_before
    if block.exact and pruned_any:
        try:
            ref = masked_reference(dense, model)
            with torch.enable_grad():  # no fused fast paths (they would skip the replaced norm forwards)
                ref_out = call(ref, x)
            res.max_diff = max(
                float((a - b).detach().abs().max()) if a.numel() else 0.0
                for a, b in zip(_tensors(out), _tensors(ref_out))
            )
        except Exception as e:  # noqa: BLE001 - a reference that cannot be built is reported
            res.error = f"masked reference failed: {type(e).__name__}: {_first_line(e)}"
            return res
        explained = any(s in m for m in res.warnings for s in _EXPLAINS_DIFF)
        if res.max_diff > atol and not explained:
            res.error = "not equal to the masked dense model"
            return res
    if pruned_any:
        res.cls = "partial" if res.refusals else "full"
    elif res.refusals:
        res.cls = "none"
    else:
        res.error = "nothing pruned and no warning naming a layer"
    return res


def run_all(blocks: Sequence[Block] = BLOCKS) -> list[tuple[Block, Result]]:
    """:func:`run_block` for every block, without and (for blocks with heads) with head pruning."""
    out = []
    for b in blocks:
        for heads in (False, True) if b.heads else (False,):
            out.append((b, run_block(b, heads)))
    return out


def main(argv: Sequence[str] = ()) -> int:
    """Print the table (``--verbose``: every warning in full) and the counts per class."""
    verbose = "--verbose" in argv
    only = [a for a in argv if not a.startswith("-")]
    blocks = [b for b in BLOCKS if not only or b.name in only]
    results = run_all(blocks)
    w = max(len(b.name) for b in blocks) + 2
    print(f"{'block':<{w}} {'heads':<5} {'class':<8} {'params':<17} {'s':>5}  refused / diagnosis")
    for b, r in results:
        params = f"{r.params_before}->{r.params_after}"
        line = f"{b.name:<{w}} {'yes' if r.heads else 'no':<5} {r.cls:<8} {params:<17} {r.seconds:5.2f}  "
        print(line + r.diagnosis)
        if verbose:
            print(f"    style: {b.style}")
            for m in r.warnings:
                print("    warning: " + m.replace("\n", "\n      "))
    counts: dict[str, int] = {}
    for _, r in results:
        counts[r.cls] = counts.get(r.cls, 0) + 1
    print(
        "\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        f"(of {len(results)} runs, {len(blocks)} blocks)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
