"""Transformers and sequence models: Hugging Face architectures built from small configs
(random weights, no download) pruned by half and still runnable; own reference blocks
(ShuffleNet unit, Swin-style window attention, LSTM classifier) checked for exact equivalence
with the original model whose pruned channels are zeroed."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prune_callbacks import DependencyGraph, PruningError
from prune_callbacks.graph import OpType
from prune_callbacks.pruning.pruner import Pruner

tf = pytest.importorskip("transformers")

from helpers import HEAD_ATTRS, hf_models, tok_inputs  # noqa: E402 - after the importorskip

HF_MODELS = hf_models()
_tok = tok_inputs


def _run(model: nn.Module, x):
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_model_pruned_by_half_still_runs(name):
    torch.manual_seed(0)
    build, inputs = HF_MODELS[name]
    model = build().eval()
    x = inputs()
    dense_out = _run(model, x).logits
    heads_before = {n: getattr(m, a) for n, m in model.named_modules() for a in HEAD_ATTRS if hasattr(m, a)}
    p0 = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, "random", pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5)
        pruner.step()
    out = _run(model, x).logits
    p1 = sum(p.numel() for p in model.parameters())
    assert out.shape == dense_out.shape
    assert torch.isfinite(out).all()
    assert p1 <= 0.7 * p0, f"parameters {p0} -> {p1}"
    heads_after = {n: getattr(m, a) for n, m in model.named_modules() for a in HEAD_ATTRS if hasattr(m, a)}
    attention = [
        m for n, m in model.named_modules() if type(m).__name__.endswith(("Attention", "SelfAttention"))
    ]
    if attention:
        # Every attention module reports its (reduced) head count.
        reported = [
            getattr(m, a) for m in attention for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int)
        ]
        assert reported, "attention modules do not report head counts"
        assert any(h < max(heads_before.values() or [h + 1]) for h in reported), (heads_before, heads_after)


# ---------------------------------------------------------------------------------------------
# Own reference blocks, masked equivalence
# ---------------------------------------------------------------------------------------------


class ShuffleUnit(nn.Module):
    """ShuffleNet-v2-style unit: split, a conv branch, concat, channel shuffle."""

    def __init__(self, c: int = 16, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(c, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


class WindowAttention(nn.Module):
    """Swin-style window attention with a learned relative position bias per head."""

    def __init__(self, dim: int = 32, num_heads: int = 4, window: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.window = num_heads, dim // num_heads, window
        self.qkv_q = nn.Linear(dim, dim)
        self.qkv_k = nn.Linear(dim, dim)
        self.qkv_v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        n = window * window
        self.bias_table = nn.Parameter(torch.randn(n * n, num_heads) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.qkv_q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.qkv_k(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.qkv_v(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        bias = self.bias_table.view(n, n, self.num_heads).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1)) * 0.35 + bias
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class WindowBlock(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = WindowAttention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h)
        h = h + self.mlp(h)
        return self.head(h.mean(1))


class FusedAttentionBlock(nn.Module):
    """timm-style attention: one fused qkv projection reshaped to (3, heads, head size), and a
    learned per-head bias passed to ``scaled_dot_product_attention`` as its additive mask."""

    def __init__(self, dim: int = 32, num_heads: int = 4, tokens: int = 8) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(num_heads, tokens, tokens) * 0.1)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        h = h + self.proj(out.transpose(1, 2).reshape(b, n, -1))
        return self.head(h.mean(1))


class ConstantHeadMaskAttention(FusedAttentionBlock):
    """Attention with a constant (buffer) additive mask per head. With ``data_dependent`` the
    forward reads values, so the graph is traced on real tensors instead of meta ones."""

    def __init__(self, data_dependent: bool = False) -> None:
        super().__init__()
        del self.bias
        self.register_buffer("bias", torch.randn(self.num_heads, 8, 8) * 0.1)
        self.data_dependent = data_dependent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_dependent and x.sum() > 1e9:
            x = x * 0
        return super().forward(x)


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.fc(out[:, -1])


@torch.no_grad()
def _zero_group(model: nn.Module, original: nn.Module, group) -> None:
    """Zero, in ``model`` (a copy of ``original``), every parameter entry that pruning ``group``
    removes from output sides and coupled layers: the masked reference of the prune."""
    names = {m: n for n, m in original.named_modules()}
    names.update({p: n for n, p in original.named_parameters()})
    for item in group:
        target, fn = item.dep.target.module, item.dep.handler
        pruner = fn.pruner
        if isinstance(target, nn.Parameter):
            copy_target = model.get_parameter(names[target])
        else:
            copy_target = model.get_submodule(names[target])
            if fn.side == "in" and not pruner.coupled(copy_target):
                continue
        for pname, view in pruner.param_views(copy_target, fn.side):
            p = copy_target if pname == "" else copy_target.get_parameter(pname)
            flat = view(torch.arange(p.numel()).view(p.shape))[item.idxs].flatten()
            p.view(-1)[flat] = 0


def _masked_check(model: nn.Module, x, pick) -> None:
    model.eval()
    dg = DependencyGraph().build_dependency(model, x)
    groups = dg.get_all_groups()
    assert groups
    checked = 0
    for group in groups:
        idxs = pick(group)
        if not idxs:
            continue
        masked = copy.deepcopy(model)
        root = group.root.dep
        sub = dg.get_pruning_group(root.target.module, root.handler, idxs)
        if not dg.check_pruning_group(sub):
            continue
        _zero_group(masked, model, sub)
        sub.prune()
        with torch.no_grad():
            torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked >= 2


def _half(group) -> list[int]:
    """Every other root unit of the group (a channel, or a whole head of a head group)."""
    root = group.root
    ids = sorted(set(root.root_idxs))
    if len(ids) < 2:
        return []
    chosen = set(ids[::2])
    return [c for c, r in zip(root.idxs, root.root_idxs) if r in chosen]


def test_shuffle_unit_masked_equivalence():
    torch.manual_seed(0)
    model = ShuffleUnit()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.bias.data.uniform_(-0.3, 0.3)
    _masked_check(model, torch.randn(2, 3, 8, 8), _half)


def test_window_attention_masked_equivalence_and_heads():
    torch.manual_seed(0)
    model = WindowBlock()
    x = torch.randn(2, 16, 6)
    _masked_check(model, x, _half)
    assert model.attn.num_heads == 2
    assert model.attn.bias_table.shape[1] == 2
    assert model(x).shape == (2, 3)


def test_fused_qkv_heads_with_attention_bias_masked_equivalence():
    torch.manual_seed(0)
    model = FusedAttentionBlock()
    x = torch.randn(2, 8, 6)
    dg = DependencyGraph().build_dependency(model, x)
    heads = next(g for g in dg.get_all_groups() if g.root.dep.target.module is model.qkv)
    # q, k and v of a head are one unit: four heads, not twelve blocks
    assert heads.head_blocks == 4 and len(set(heads.root.root_idxs)) == 4
    assert any(it.dep.target.module is model.bias for it in heads)
    _masked_check(model, x, _half)
    assert model.num_heads == 2
    assert model.bias.shape == (2, 8, 8) and model.qkv.out_features == 3 * 2 * model.head_dim
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("data_dependent", [False, True], ids=["meta-trace", "real-trace"])
def test_constant_head_mask_keeps_heads_on_both_trace_paths(data_dependent: bool) -> None:
    # The trace records attention as one fused op, whose constant mask is not an input of the
    # autograd graph; its shape is still known, so the heads it has entries for stay.
    torch.manual_seed(0)
    model = ConstantHeadMaskAttention(data_dependent)
    x = torch.randn(2, 8, 6)
    dg = DependencyGraph().build_dependency(model, x)
    assert dg.traced_on_meta is not data_dependent
    assert any(n.type == OpType.ATTENTION for n in dg.nodes)
    with pytest.warns(UserWarning, match="constant attention mask"):
        groups = dg.get_all_groups()
    assert all(g.root.dep.target.module is not model.qkv for g in groups)


def test_meta_trace_records_attention_as_one_fused_op():
    torch.manual_seed(0)
    model = FusedAttentionBlock()
    del model.bias
    model.bias = None
    dg = DependencyGraph().build_dependency(model, torch.randn(2, 8, 6))
    assert dg.traced_on_meta
    ops = [n.attrs.get("op") for n in dg.nodes if n.type.is_virtual]
    assert ops.count("ScaledDotProductFlashAttentionForCpu") == 1 and "Bmm" not in ops
    # a learned bias needs its gradient path: that attention stays decomposed (and is pruned
    # with its heads, see the masked-equivalence test above)
    dg = DependencyGraph().build_dependency(FusedAttentionBlock(), torch.randn(2, 8, 6))
    assert not any(n.type == OpType.ATTENTION for n in dg.nodes)


def test_lstm_classifier_masked_equivalence():
    torch.manual_seed(0)
    model = LSTMClassifier()
    ids = torch.randint(0, 50, (2, 7))
    _masked_check(model, ids, _half)
    assert model.lstm.hidden_size < 16


def test_gqa_single_query_head_cannot_be_pruned_alone():
    torch.manual_seed(0)
    model = HF_MODELS["llama_gqa"][0]().eval()
    x = _tok()
    dg = DependencyGraph().build_dependency(model, x)
    attn = model.model.layers[0].self_attn
    group = next(g for g in dg.get_all_groups() if g.root.dep.target.module is attn.q_proj)
    assert group.head_blocks == 2  # two key/value heads, each with its two query heads
    head_dim = attn.head_dim
    with pytest.raises(ValueError, match="copies"):
        dg.get_pruning_group(attn.q_proj, group.root.dep.handler, list(range(head_dim)))
    sub = dg.get_pruning_group(attn.q_proj, group.root.dep.handler, list(range(2 * head_dim)))
    sub.prune()
    assert attn.k_proj.out_features == head_dim and attn.v_proj.out_features == head_dim
    assert attn.num_heads == 2 and attn.num_key_value_heads == 1
    assert _run(model, x).logits.shape == (1, 8, 128)


# ---------------------------------------------------------------------------------------------
# Fused projections cut at fixed offsets (Phi-3 style): slice partitions and shared configs
# ---------------------------------------------------------------------------------------------


class SharedConfig:
    """Plain config object held by every layer, like a Hugging Face config."""

    def __init__(self, num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 4) -> None:
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim


class SlicedQKVAttention(nn.Module):
    """Grouped-query attention whose fused q/k/v projection is cut at offsets computed from the
    query head count of the shared config and the module's own key/value head count."""

    def __init__(self, config: SharedConfig, dim: int = 16) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_key_value_heads = config.num_key_value_heads
        width = (config.num_attention_heads + 2 * config.num_key_value_heads) * self.head_dim
        self.qkv = nn.Linear(dim, width)
        self.o = nn.Linear(config.num_attention_heads * self.head_dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        qkv = self.qkv(h)
        q_end = self.config.num_attention_heads * self.head_dim
        k_end = q_end + self.num_key_value_heads * self.head_dim
        q = qkv[..., :q_end].view(b, n, -1, self.head_dim).transpose(1, 2)
        k = qkv[..., q_end:k_end].view(b, n, -1, self.head_dim).transpose(1, 2)
        v = qkv[..., k_end:].view(b, n, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class SlicedQKVModel(nn.Module):
    def __init__(self, layers: int = 1, dim: int = 16) -> None:
        super().__init__()
        self.config = SharedConfig()
        self.embed = nn.Linear(6, dim)
        self.layers = nn.ModuleList(SlicedQKVAttention(self.config, dim) for _ in range(layers))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h.mean(1))


def _qkv_group(dg: DependencyGraph, layer: nn.Module):
    return next(g for g in dg.get_all_groups() if g.root.dep.target.module is layer.qkv)


def test_sliced_qkv_heads_masked_equivalence():
    torch.manual_seed(0)
    model = SlicedQKVModel()
    x = torch.randn(2, 8, 6)
    dg = DependencyGraph().build_dependency(model, x)
    assert _qkv_group(dg, model.layers[0]).head_blocks == 2  # a key/value head with its query heads
    _masked_check(model, x, _half)
    attn = model.layers[0]
    assert model.config.num_attention_heads == 2 and attn.num_key_value_heads == 1
    assert attn.num_heads == 2  # reported by the module itself
    assert attn.qkv.out_features == 4 * attn.head_dim
    assert model(x).shape == (2, 3)


def test_shared_config_heads_change_only_for_all_layers():
    torch.manual_seed(0)
    model = SlicedQKVModel(layers=2).eval()
    x = torch.randn(2, 8, 6)
    dg = DependencyGraph().build_dependency(model, x)
    group = _qkv_group(dg, model.layers[0])
    sub = dg.get_pruning_group(model.layers[0].qkv, group.root.dep.handler, _half(group))
    reason = dg.explain_pruning_group(sub)
    assert reason is not None and "config.num_attention_heads" in reason
    assert "SlicedQKVAttention" in reason and "every SlicedQKVAttention" in reason
    assert dg.explain_pruning_group(sub, check_shared=False) is None
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="config.num_attention_heads"):
        sub.prune()
    assert model.config.num_attention_heads == 4 and model.layers[0].num_key_value_heads == 2
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    # The Pruner prunes every layer's heads in one merged step, which may change the config.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Pruner(model, x, "random", pruning_ratio=0.0, prune_num_heads=True, head_pruning_ratio=0.5).step()
    assert model.config.num_attention_heads == 2
    assert [layer.num_key_value_heads for layer in model.layers] == [1, 1]
    assert model(x).shape == (2, 3)


def test_failed_prune_restores_the_shared_config():
    class Frozen:
        """An object whose attributes cannot be set (fails after the config was updated)."""

        def __setattr__(self, name: str, value) -> None:
            raise AttributeError("frozen")

    torch.manual_seed(0)
    model = SlicedQKVModel()
    x = torch.randn(2, 8, 6)
    dg = DependencyGraph().build_dependency(model, x)
    group = _qkv_group(dg, model.layers[0])
    sub = dg.get_pruning_group(model.layers[0].qkv, group.root.dep.handler, _half(group))
    assert any(obj is model.config for obj, *_ in sub.attribute_updates)
    sub.attribute_updates.append((Frozen(), "size", 1, 2))
    with pytest.raises(PruningError, match="frozen"):
        sub.prune()
    assert model.config.num_attention_heads == 4 and model.layers[0].num_key_value_heads == 2
    assert model.layers[0].qkv.out_features == 32 and model(x).shape == (2, 3)


class LiteralSlices(nn.Module):
    """A fused projection cut at literal offsets: nothing says how they change."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.qkv = nn.Linear(16, 32)
        self.o = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        y = self.qkv(h)
        q, k, v = (t.reshape(b, n, -1, 4).transpose(1, 2) for t in (y[..., :16], y[..., 16:24], y[..., 24:]))
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.head((h + self.o(out.transpose(1, 2).reshape(b, n, -1))).mean(1))


def test_literal_slice_offsets_are_refused_clearly():
    torch.manual_seed(0)
    model = LiteralSlices()
    x = torch.randn(2, 8, 6)
    dg = DependencyGraph().build_dependency(model, x)
    group = next(g for g in dg.get_all_groups() if g.root.dep.target.module is model.qkv)
    sub = dg.get_pruning_group(model.qkv, group.root.dep.handler, _half(group))
    assert "slices at fixed offsets inside LiteralSlices" in dg.explain_pruning_group(sub)
    with pytest.raises(ValueError, match="fixed offsets"):
        sub.prune()
    assert model.qkv.out_features == 32 and model(x).shape == (2, 3)


class UntiledSlices(nn.Module):
    """Slices of a fused projection that do not cut it into pieces: overlapping bounds, or
    pieces taken with a step."""

    def __init__(self, strided: bool) -> None:
        super().__init__()
        self.strided = strided
        self.embed = nn.Linear(6, 16)
        self.qkv = nn.Linear(16, 48)
        self.o = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        y = self.qkv(h)
        if self.strided:
            parts = (y[..., 0:32:2], y[..., 1:32:2], y[..., 32:])
        else:
            parts = (y[..., :16], y[..., 16:32], y[..., 16:32])
        q, k, v = (t.reshape(b, n, 4, 4).transpose(1, 2) for t in parts)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.head((h + self.o(out.transpose(1, 2).reshape(b, n, -1))).mean(1))


@pytest.mark.parametrize("strided", [False, True], ids=["overlapping", "strided"])
def test_slices_that_do_not_tile_stay_a_barrier(strided: bool):
    torch.manual_seed(0)
    model = UntiledSlices(strided)
    dg = DependencyGraph().build_dependency(model, torch.randn(2, 8, 6))
    with pytest.warns(UserWarning, match=r"qkv.*slicing a channel dimension with fixed bounds"):
        groups = dg.get_all_groups()
    assert all(g.root.dep.target.module is not model.qkv for g in groups)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_phi3_heads_masked_equivalence(kv_heads: int):
    # One layer: its config is held by one attention module, so one group may change it.
    torch.manual_seed(0)
    cfg = tf.Phi3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        pad_token_id=0,
    )
    model = tf.Phi3ForCausalLM(cfg).eval()
    x = _tok()
    dg = DependencyGraph().build_dependency(model, x)
    attn = model.model.layers[0].self_attn
    group = next(g for g in dg.get_all_groups() if g.root.dep.target.module is attn.qkv_proj)
    sub = dg.get_pruning_group(attn.qkv_proj, group.root.dep.handler, _half(group))
    masked = copy.deepcopy(model)
    _zero_group(masked, model, sub)
    sub.prune()
    torch.testing.assert_close(_run(model, x).logits, _run(masked, x).logits, atol=1e-5, rtol=1e-5)
    assert (model.config.num_attention_heads, attn.num_heads, attn.num_key_value_heads) == (
        2,
        2,
        kv_heads // 2,
    )


def test_phi3_gqa_heads_pruned_and_reloaded(tmp_path):
    from prune_callbacks.pruning.history import load_pruned, save_pruned

    torch.manual_seed(0)
    build, inputs = HF_MODELS["phi3_gqa"]
    model = build().eval()
    fresh = copy.deepcopy(model)
    x = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Pruner(model, x, "random", pruning_ratio=0.0, prune_num_heads=True, head_pruning_ratio=0.5).step()
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    for layer in model.model.layers:
        attn = layer.self_attn
        assert (attn.num_heads, attn.num_key_value_heads, attn.num_key_value_groups) == (2, 1, 2)
        assert attn.qkv_proj.out_features == 4 * attn.head_dim
    save_pruned(model, tmp_path / "phi3.pt")
    load_pruned(fresh, tmp_path / "phi3.pt")
    assert fresh.config.num_attention_heads == 2 and fresh.model.layers[1].self_attn.num_key_value_heads == 1
    torch.testing.assert_close(_run(fresh, x).logits, _run(model, x).logits)


# ---------------------------------------------------------------------------------------------
# Fused attention op (seen when a model is traced on real tensors): the additive mask's heads
# ---------------------------------------------------------------------------------------------


def _attention_node(mask_shape, const_mask=None):
    from prune_callbacks.graph.node import Node
    from prune_callbacks.graph.ops import OpType

    q = (2, 4, 8, 16)
    node = Node(None, None, "sdpa", OpType.ATTENTION)
    node.attrs["in_shapes"] = [q, q, q, mask_shape]
    node.attrs["out_shapes"] = [q]
    node.attrs["const_shapes"] = [None, None, None, const_mask]
    return node


def _head_map(head: int, mask: bool = False):
    """Map removing whole head ``head``: on q/k/v/out every feature of the head (explicit head and
    feature dims), on a (heads, L, S) mask its head entries."""
    from prune_callbacks.graph.index_mapping import RootMap

    width = 1 if mask else 16
    t = torch.full((4, 1, width), -1)
    t[head] = 0
    if mask:
        return RootMap(t, (True, False, False))
    return RootMap(t.unsqueeze(0), (False, True, False, True))


def test_fused_attention_prunes_the_heads_of_its_mask():
    from prune_callbacks.graph import propagation

    got = {(k, i): r for k, i, r in propagation.from_input(_attention_node((4, 8, 8)), 0, _head_map(1))}
    mask = got[("in", 3)].t
    assert mask.shape[-3] == 4 and (mask.flatten() >= 0).tolist() == [False, True, False, False]
    from_mask = propagation.from_input(_attention_node((4, 8, 8)), 3, _head_map(2, mask=True))
    back = {(k, i): r for k, i, r in from_mask}
    for key in (("in", 0), ("in", 1), ("in", 2), ("out", 0)):
        pruned = back[key].t >= 0
        assert pruned.shape[1] == 4
        assert pruned.any(-1).any(-1).flatten().tolist() == [False, False, True, False]
    # a mask shared by all heads stays as it is
    shared = propagation.from_input(_attention_node((1, 8, 8)), 0, _head_map(1))
    assert ("in", 3) not in {(k, i) for k, i, _ in shared}


def test_fused_attention_refuses_token_masks_and_constant_head_masks():
    from prune_callbacks.graph import propagation
    from prune_callbacks.graph.index_mapping import Barrier, RootMap

    tokens = RootMap(torch.tensor([-1, 0, -1, -1, -1, -1, -1, -1]).view(1, 8, 1), (False, True, False))
    with pytest.raises(Barrier, match="tokens"):
        propagation.from_input(_attention_node((4, 8, 8)), 3, tokens)
    with pytest.raises(Barrier, match="constant attention mask"):
        propagation.from_input(_attention_node(None, const_mask=(4, 8, 8)), 0, _head_map(1))
