"""Issue 14: never hand back a broken model.

Each case of the issue's "Why" is a small model here: after pruning it runs on the example input
with the output shapes kept (or the groups involved are refused with a warning naming them), and
the MultiheadAttention and channel-reduction cases compute what the dense model computes with the
removed channels zeroed (or are refused).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prune_callbacks import (
    DependencyGraph,
    MultipleInputs,
    Pruner,
    VerificationError,
    load_pruned,
    register_size_attributes,
    save_pruned,
)
from prune_callbacks.layers import function_by_name
from prune_callbacks.pruning.history import get_pruning_history


class ViTAttention(nn.Module):
    """timm's older Attention: the head size is the *input* width over the head count."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.attn = ViTAttention(dim)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.attn(x)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim,)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self.shape)


class LayerScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.ls = LayerScale(32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.ls(self.a(x))))


class BlurPool(nn.Module):
    """A fixed depthwise filter buffer, the channel count passed as ``groups=``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.ones(channels, 1, 3, 3) / 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.filt, padding=1, groups=self.channels)


class BlurNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.blur = BlurPool(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.blur(F.relu(self.c1(x))))


class LiteralViewNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = F.relu(self.c1(x)).view(b, 8, -1)  # a channel count written in code
        return self.c2(y.view(b, 8, 16, 8))


class WidthNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.width = 16
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.c2(self.c1(x).reshape(n, self.width, 4, 16))


class CheckedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.channels = 16
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        assert y.shape[1] == self.channels
        return self.down(y)


class DetachNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.g = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        return self.c2(y) + self.g(y.detach())


class DataNet(DetachNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        return self.c2(y) + self.g(y.data)


class NoGradNet(DetachNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        with torch.no_grad():
            z = self.g(y)
        return self.c2(y) + z


class BranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.p = nn.Conv2d(16, 8, 3, padding=1)
        self.n = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        return self.p(y) if x.sum() > 0 else self.n(y)


class MHANet(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        return self.head(x + self.mha(x, x, x, need_weights=False)[0])


class ChannelMeanNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        return self.c2(y) * y.mean(1, keepdim=True)


class ChannelSoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.softmax(self.a(x), -1))


class HandRMSNorm(nn.Module):
    """An RMSNorm written by hand (Llama style): a normalisation, pruned like a norm layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class RMSNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.norm = HandRMSNorm(32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


def image() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def tokens(features: int = 16) -> torch.Tensor:
    return torch.randn(2, 10, features, generator=torch.Generator().manual_seed(0))


def prune(model: nn.Module, x: Any, **kwargs: Any) -> tuple[Pruner, list[str]]:
    """One 50% step; returns the pruner and the prune_callbacks warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = Pruner(model, x, "l2", pruning_ratio=0.5, **kwargs)
        pruner.step()
    return pruner, [str(w.message) for w in caught if "prune_callbacks" in str(w.message)]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def masked(dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """``dense`` with the channels of ``pruned``'s single-step history zeroed (a merged step
    records original indices)."""
    out = copy.deepcopy(dense)
    modules = dict(out.named_modules())
    parameters = dict(out.named_parameters())
    for record in get_pruning_history(pruned):
        for item in record["items"]:
            fn = function_by_name(item["function"])
            if item["target"] in parameters:  # a bare parameter, pruned along its dim
                with torch.no_grad():
                    parameters[item["target"]].index_fill_(item["dim"], torch.tensor(item["idxs"]), 0.0)
                continue
            module = modules[item["target"]]
            for name, view in fn.pruner.param_views(module, fn.side):
                p = module.get_parameter(name)
                rows = view(torch.arange(p.numel()).reshape(p.shape))[item["idxs"]]
                with torch.no_grad():
                    p.view(-1)[rows.reshape(-1)] = 0
    return out


# ---------------------------------------------------------------------------------------------
# The seven cases of sizes the trace does not see
# ---------------------------------------------------------------------------------------------


def test_derived_head_size_refused_before_anything_is_cut():
    """``C // self.num_heads`` with C the block's input width: pruning the residual width alone
    would break the reshape: refused, named, nothing cut (with heads pruned in the same step the
    sizes can stay consistent: see the next test)."""
    torch.manual_seed(0)
    model, x = ViTBlock(), tokens()
    dg = DependencyGraph().build_dependency(model, x)
    with pytest.raises(ValueError, match=r"reshape in attn is called with size .*inp\(\.\.\.\)\.shape\[2\]"):
        dg.get_pruning_group(model.inp, function_by_name("prune_linear_out_channels"), [0, 1])
    pruner, warned = prune(model, x)
    assert model(x).shape == (2, 10, 5)
    assert model.fc1.out_features == 32  # the MLP still prunes
    assert model.inp.out_features == 32 and model.attn.qkv.out_features == 96
    assert any(
        "refusing the group of inp (Linear)" in w and "reshape in attn is called with" in w for w in warned
    )


def test_vit_derived_head_size_consistent_when_heads_follow():
    """Half the residual width and half the heads in one step keep ``C // num_heads`` equal to the
    head size: the merged prune passes verification and is exact (whole heads, scale kept)."""
    torch.manual_seed(0)
    model, x = ViTBlock().eval(), tokens()
    dense = copy.deepcopy(model)
    _, warned = prune(model, x, prune_num_heads=True, head_pruning_ratio=0.5)
    assert not warned
    assert (model.inp.out_features, model.attn.num_heads, model.attn.qkv.out_features) == (16, 2, 48)
    torch.testing.assert_close(model(x), masked(dense, model)(x), atol=1e-5, rtol=1e-5)


def test_layer_scale_shape_attribute_is_found_and_updated():
    torch.manual_seed(0)
    model, x = LayerScaleNet(), torch.randn(2, 8)
    dense = copy.deepcopy(model)
    _, warned = prune(model, x)
    assert model.ls.shape == (16,) and model.a.out_features == 16
    assert not warned
    torch.testing.assert_close(model(x), masked(dense, model)(x))


def test_width_attribute_used_as_reshape_size_is_updated():
    torch.manual_seed(0)
    model, x = WidthNet(), image()
    dense = copy.deepcopy(model)
    prune(model, x)
    assert model.width == 8 == model.c1.out_channels
    torch.testing.assert_close(model(x), masked(dense, model)(x), atol=1e-5, rtol=1e-5)


def test_registered_size_attribute_names():
    class Shaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.width = self.other = 16  # two attributes hold the size: registering picks one
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(self.c1(x).reshape(x.shape[0], self.width, 4, 16))

    register_size_attributes(Shaped, "width")
    model, x = Shaped(), image()
    prune(model, x)
    assert model.width == 8 and model.other == 16
    assert model(x).shape == (2, 8, 4, 16)
    with pytest.raises(ValueError, match="attribute names"):
        register_size_attributes(Shaped, "not a name")


@pytest.mark.parametrize(
    ("factory", "refused"),
    [
        (BlurNet, "groups=self.channels"),
        (CheckedNet, "assert y.shape"),
        (LiteralViewNet, "c1 (Conv2d)"),
    ],
    ids=["blur-groups-buffer", "assert-width", "literal-view"],
)
def test_invisible_sizes_refused_with_a_warning_naming_the_layer(factory, refused):
    torch.manual_seed(0)
    model, x = factory(), image()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected_shape = model(x).shape
    _, warned = prune(model, x)
    assert any("c1 (Conv2d)" in w for w in warned), warned
    assert model(x).shape == expected_shape
    assert any(refused in w for w in warned), warned
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_verification_names_the_failing_line_and_marks_the_group():
    torch.manual_seed(0)
    model, x = CheckedNet(), image()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = Pruner(model, x, "l2", pruning_ratio=0.5, iterative_steps=2)
        pruner.step()
        pruner.step()
    refusals = [str(w.message) for w in caught if "refusing the group of c1" in str(w.message)]
    assert len(refusals) == 1  # marked unprunable: the second step does not try again
    assert (
        "AssertionError at test_verify.py" in refusals[0]
        and "assert y.shape[1] == self.channels" in refusals[0]
    )
    assert list(pruner.refused.values()) and "AssertionError" in next(iter(pruner.refused.values()))


@pytest.mark.parametrize("factory", [DetachNet, DataNet, NoGradNet], ids=["detach", "data", "no_grad"])
def test_tensors_leaving_autograd_keep_their_coupling(factory):
    torch.manual_seed(0)
    model, x = factory(), image()
    dense = copy.deepcopy(model)
    _, warned = prune(model, x)
    assert model.c1.out_channels == 8 and model.g.in_channels == 8 and model.c2.in_channels == 8
    assert not warned
    torch.testing.assert_close(model(x), masked(dense, model)(x), atol=1e-5, rtol=1e-5)


def test_branch_not_taken_is_named_and_its_inputs_kept():
    torch.manual_seed(0)
    model = BranchNet()
    x = image().abs() + 0.1  # takes self.p
    _, warned = prune(model, x)
    assert any("never ran on the example inputs" in w and "n" in w for w in warned)
    assert model.c1.out_channels == 16 and model.n.in_channels == 16
    assert model(-x).shape == model(x).shape  # the other branch still runs


def test_multiple_inputs_cover_both_branches():
    torch.manual_seed(0)
    model = BranchNet()
    x = image().abs() + 0.1
    _, warned = prune(model, MultipleInputs([x, -x]))
    assert not any("never ran" in w for w in warned)
    assert model.c1.out_channels == 8 == model.n.in_channels == model.p.in_channels
    assert model(-x).shape == model(x).shape == (2, 8, 8, 8)


# ---------------------------------------------------------------------------------------------
# The two silent cases: MultiheadAttention heads and reductions over channels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_stay_heads(seed, batch_first):
    torch.manual_seed(seed)
    model = MHANet(batch_first).eval()
    x = tokens() if batch_first else tokens().transpose(0, 1)
    dense = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Pruner(model, x, "random", pruning_ratio=0.5).step()
    mha = model.mha
    assert mha.embed_dim == 16 and mha.num_heads == 4 and mha.head_dim == 4
    (record,) = get_pruning_history(model)
    removed = next(it["idxs"] for it in record["items"] if it["target"] == "mha")
    assert len({sum(1 for c in removed if c // 8 == h) for h in range(4)}) == 1  # as many per head
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(dense, model)(x), atol=1e-5, rtol=1e-5)


def test_multihead_attention_uneven_channels_refused():
    model, x = MHANet(), tokens()
    dg = DependencyGraph().build_dependency(model, x)
    group = dg.get_pruning_group(model.inp, function_by_name("prune_linear_out_channels"), [0, 1, 2, 3])
    assert "every head must lose the same number" in dg.explain_pruning_group(group)


@pytest.mark.parametrize("factory", [ChannelMeanNet, ChannelSoftmaxNet], ids=["mean", "softmax"])
def test_channel_reductions_refused_and_rest_masked_equal(factory):
    torch.manual_seed(0)
    model = factory()
    x = image() if factory is ChannelMeanNet else torch.randn(2, 8)
    dense = copy.deepcopy(model)
    _, warned = prune(model, x)
    assert any("over the pruned channels" in w or "normalises over the pruned" in w for w in warned), warned
    torch.testing.assert_close(model(x), masked(dense, model)(x), atol=1e-5, rtol=1e-5)


def test_hand_written_normalisation_is_pruned_like_a_norm_layer():
    torch.manual_seed(0)
    model, x = RMSNet(), torch.randn(2, 8)
    _, warned = prune(model, x)
    assert not warned and model.a.out_features == 16 and model.norm.weight.shape == (16,)
    assert model(x).shape == (2, 4)


# ---------------------------------------------------------------------------------------------
# Verification itself: rollback, cost, replay
# ---------------------------------------------------------------------------------------------


def test_group_prune_failing_verification_restores_everything():
    model, x = CheckedNet(), image()
    dg = DependencyGraph().build_dependency(model, x)
    group = dg.get_pruning_group(model.c1, function_by_name("prune_conv_out_channels"), [0, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VerificationError, match="AssertionError") as err:
        group.prune()
    assert "restored unchanged" in str(err.value)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not dg.pruning_history


def test_fault_free_step_costs_one_meta_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    pruner = Pruner(model, image(), "l2", pruning_ratio=0.5)
    assert pruner.DG.traced_on_meta and pruner.DG.verifier is not None and pruner.DG.verifier.meta
    pruner.step()
    assert pruner.DG.verifier.runs == 1


def test_verify_off():
    model, x = CheckedNet(), image()
    dg = DependencyGraph().build_dependency(model, x, verify=False)
    assert dg.verifier is None
    dg.get_pruning_group(model.c1, function_by_name("prune_conv_out_channels"), [0]).prune()
    with pytest.raises(AssertionError):
        model(x)


def test_load_pruned_verifies_the_replay(tmp_path):
    torch.manual_seed(0)
    model, x = LayerScaleNet(), torch.randn(2, 8)
    prune(model, x)
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    fresh = load_pruned(LayerScaleNet(), path, example_inputs=x)
    torch.testing.assert_close(fresh(x), model(x))

    class Stale(LayerScaleNet):  # the same layers, but its layer scale keeps its old shape
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x) * self.ls.scale.view(32)))

    target = Stale()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="replayed pruning history breaks the model"):
        load_pruned(target, path, example_inputs=x)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert not get_pruning_history(target)


class C2fLike(nn.Module):
    """YOLOv8 C2f: ``cv1(x).split((self.c, self.c), 1)`` with the sizes from an int attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.c = 8
        self.cv1 = nn.Conv2d(3, 2 * self.c, 1)
        self.m = nn.Conv2d(self.c, self.c, 3, padding=1)
        self.cv2 = nn.Conv2d(3 * self.c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


def test_split_sizes_from_int_attributes_are_updated():
    torch.manual_seed(0)
    model, x = C2fLike(), image()
    dense = copy.deepcopy(model)
    _, warned = prune(model, x)
    assert not warned and model.c == 4 and model.cv1.out_channels == 8
    torch.testing.assert_close(model(x), masked(dense, model)(x), atol=1e-5, rtol=1e-5)


def test_split_pieces_of_one_attribute_pruned_differently_are_refused():
    model, x = C2fLike(), image()
    dg = DependencyGraph().build_dependency(model, x)
    group = dg.get_pruning_group(model.cv1, function_by_name("prune_conv_out_channels"), [0, 9, 10])
    assert "equal chunks inside C2fLike would get unequal sizes (7, 6)" in dg.explain_pruning_group(group)


class BranchHeadNet(BranchNet):
    """The branch's alternatives also feed one head: the one that ran must keep its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(super().forward(x)))


def test_branch_not_taken_keeps_the_outputs_of_its_alternative():
    torch.manual_seed(0)
    model = BranchHeadNet()
    x = image().abs() + 0.1
    _, warned = prune(model, x)
    assert any("the outputs of p (Conv2d) are kept" in w for w in warned), warned
    assert model.p.out_channels == model.n.out_channels == model.head.in_channels == 8
    assert model(-x).shape == model(x).shape


class CheckedCNN(nn.Module):
    """TinyCNN's layout with a width check the trace cannot see, for the callback test."""

    def __init__(self) -> None:
        super().__init__()
        self.channels = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        assert y.shape[1] == self.channels
        return self.fc(torch.relu(self.conv2(y)).mean((2, 3)))


def test_callback_steps_are_verified(tmp_path):
    from helpers import LitNet, cpu_trainer, random_loader
    from prune_callbacks import StructuredPruning

    module = LitNet()
    module.model = CheckedCNN()
    callback = StructuredPruning("l2", pruning_ratio=0.5, epochs=[0], verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(tmp_path, [callback], max_epochs=2).fit(module, random_loader())
    assert any("refusing the group of model.conv1" in str(w.message) for w in caught)
    assert module.model.conv1.out_channels == 16 and module.model.conv2.out_channels == 8
    assert module(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_undone_prunes_leave_no_parameter_updates_for_the_optimizer():
    from prune_callbacks import prune_optimizer_state, track_parameter_updates

    torch.manual_seed(0)
    model, x = CheckedNet(), image()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    optimizer.step()  # momentum buffers exist
    pruner = Pruner(model, x, "l2", pruning_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with track_parameter_updates() as updates:
            pruner.step()  # c1's group is probed, refused and undone; nothing else prunes
    assert updates == [] and model.c1.out_channels == 16
    prune_optimizer_state(optimizer, updates)
    model(x).sum().backward()
    optimizer.step()


def test_batch_norm_after_pooling_traces_on_a_batch_of_one():
    """Batch norm in train mode cannot run on one sample per channel: the trace and the
    verification run in eval mode then, and the model keeps its own modes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 4),
    ).train()
    pruner, warned = prune(model, torch.randn(1, 3, 8, 8))
    assert not warned and pruner.DG.verifier is not None and pruner.DG.verifier.eval_mode
    assert all(m.training for m in model.modules())
    assert (model[0].out_channels, model[4].out_features) == (8, 16)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
