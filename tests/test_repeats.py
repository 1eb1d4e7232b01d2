"""Groups of repeated blocks are copied from an earlier block (prune_callbacks.graph.repeats): the copies
must equal what the graph search finds for each block, and differing blocks must not be copied."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

from helpers import hf_models
from prune_callbacks import DependencyGraph
from prune_callbacks.graph.groups import GroupEnumerator, block_pattern
from prune_callbacks.reference.models.densenet import densenet
from prune_callbacks.reference.models.llama import TinyLlama
from prune_callbacks.reference.models.resnet import cifar_resnet

HF_MODELS = hf_models()


def _describe(dg: DependencyGraph, groups: list) -> list[Any]:
    names = {id(m): k for k, m in dg.model.named_modules()}
    out = []
    for g in groups:
        items = [
            (
                it.dep.target.plain_name,
                it.dep.source.plain_name,
                it.dep.handler.__name__,
                list(it.idxs),
                list(it.root_idxs),
            )
            for it in g
        ]
        attrs = [(names.get(id(m), type(m).__name__), a, o, n) for m, a, o, n in g.attribute_updates]
        maps = sorted(
            (e.src.plain_name, e.src_pos, tuple(e.shape), m.t.flatten().tolist(), m.explicit)
            for e, m in g.edge_maps.items()
        )
        out.append((items, attrs, g.head_blocks, maps))
    return out


def _groups(model: nn.Module, x: Any, copies: bool, monkeypatch: pytest.MonkeyPatch, **kw: Any):
    dg = DependencyGraph().build_dependency(model, x)
    copied = []
    original = GroupEnumerator.copy_group

    def spy(self, template, root, *args):
        group = original(self, template, root, *args) if copies else None
        if group is not None:
            copied.append(root.plain_name)
        return group

    with monkeypatch.context() as mp:
        mp.setattr(GroupEnumerator, "copy_group", spy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = dg.get_all_groups(**kw)
    return _describe(dg, groups), copied


def _assert_copies_exact(model, x, monkeypatch, min_copied: int, **kw: Any) -> list[str]:
    searched, _ = _groups(model, x, False, monkeypatch, **kw)
    copied_groups, copied = _groups(model, x, True, monkeypatch, **kw)
    assert copied_groups == searched
    assert len(copied) >= min_copied, copied
    return copied


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_copied_groups_equal_the_search_on_hf_models(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    build, inputs = HF_MODELS[name]
    _assert_copies_exact(build().eval(), inputs(), monkeypatch, min_copied=0)


@pytest.mark.parametrize(
    ("factory", "min_copied"),
    [
        (lambda: (TinyLlama(dim=32, n_layers=4, ffn_dim=64), torch.randint(0, 64, (1, 8))), 6),
        (lambda: (cifar_resnet(20), torch.randn(1, 3, 16, 16)), 2),
        # dense layers differ in width from one to the next (and are named denselayer1, ...)
        (lambda: (densenet(4, (2, 3), 8, num_classes=5), torch.randn(1, 3, 16, 16)), 0),
    ],
    ids=["tiny-llama", "cifar-resnet20", "small-densenet"],
)
def test_copied_groups_equal_the_search_on_reference_models(
    factory, min_copied: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model, x = factory()
    _assert_copies_exact(model.eval(), x, monkeypatch, min_copied=min_copied)


def test_llama_layers_after_the_first_are_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    import transformers as tf

    _, inputs = HF_MODELS["llama_gqa"]

    model = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    ignored = [m for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj", "embed_tokens"))]
    copied = _assert_copies_exact(model, inputs(), monkeypatch, min_copied=6, ignored_layers=ignored)
    patterns = {block_pattern(n) for n in copied}
    assert "model.layers.#.self_attn.q_proj" in patterns and "model.layers.#.mlp.gate_proj" in patterns
    assert not any(".layers.0." in n for n in copied)


class Block(nn.Module):
    def __init__(self, dim: int, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        if self.scale is not None:
            h = h * self.scale  # a constant spanning the hidden channels: they cannot be pruned
        return x + self.down(h)


class Stack(nn.Module):
    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_a_block_that_differs_is_searched_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Stack([Block(8), Block(8), Block(8, scale=torch.rand(16)), Block(8)])
    x = torch.randn(2, 8)
    searched, _ = _groups(model, x, False, monkeypatch)
    got, copied = _groups(model, x, True, monkeypatch)
    assert got == searched
    assert "blocks.1.up" in copied and "blocks.3.up" in copied
    assert "blocks.2.up" not in copied
    roots = [items[0][0] for items, *_ in got]
    assert "blocks.2.up" not in roots  # blocked by the constant, as the search says


def test_ignored_layers_differing_between_blocks_are_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Stack([Block(8) for _ in range(3)])
    x = torch.randn(2, 8)
    kw = {"ignored_layers": [model.blocks[1].down]}
    searched, _ = _groups(model, x, False, monkeypatch, **kw)
    got, copied = _groups(model, x, True, monkeypatch, **kw)
    assert got == searched
    # the ignored layer is not part of that group, but a difference in ignored status is
    # enough to search instead of copying
    assert "blocks.1.up" not in copied
