"""The Pruner: local/global semantics, ratios, rounding, caps, MAC targets, schedules, interactive
mode, argument validation, and the fast subset/merged prune against the graph's own search."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_callbacks.measure.flops import count_macs_and_params
from prune_callbacks.pruning.importance import (
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    root_ids,
)
from prune_callbacks.pruning.pruner import Pruner
from prune_callbacks.pruning.settings import PruningSettings, SettingsError
from prune_callbacks.pruning.subsets import root_channels
from prune_callbacks.reference.models import TinyViT, cifar_resnet, densenet, vgg_cifar
from randnet import random_cnn

pytestmark = pytest.mark.filterwarnings("ignore:prune_callbacks")


def _x(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _sizes(pruner: Pruner) -> dict[tuple[int, str], tuple[str, int]]:
    """Current root-channel count of every group, by root layer."""
    out = {}
    for g in pruner.groups:
        root = g.root.dep
        out[(id(root.target.module), root.handler.side)] = (root.target.name, len(root_ids(g)))
    return out


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return cifar_resnet(20).eval()


# ---------------------------------------------------------------------------------------------
# Ratios, rounding, caps
# ---------------------------------------------------------------------------------------------


def test_local_pruning_removes_each_groups_share() -> None:
    model = _resnet()
    x = _x()
    out_shape = model(x).shape
    pruner = Pruner(model, x, MagnitudeImportance(), pruning_ratio=0.4)
    before = _sizes(pruner)
    pruner.step()
    after = _sizes(pruner)
    assert before.keys() == after.keys()
    for key, (name, n0) in before.items():
        kept = after[key][1]
        assert kept == n0 - math.floor(n0 * 0.4 + 0.5), name
        assert abs((n0 - kept) / n0 - 0.4) <= 1 / n0
    assert model(x).shape == out_shape  # the classifier keeps its outputs
    assert model.fc.out_features == 10


def test_global_pruning_ranks_across_groups() -> None:
    model = vgg_cifar(11).eval()
    x = _x()
    imp = MagnitudeImportance(normalizer=None)
    probe = Pruner(copy.deepcopy(model), x, imp)
    quiet = probe.groups[2].root.dep.target.name.split(" ")[0]
    with torch.no_grad():  # one group with tiny weights: global ranking takes it first
        for g in probe.groups:
            if g.root.dep.target.name.startswith(quiet + " "):
                for item in g:
                    for p in (
                        item.dep.target.module.parameters()
                        if isinstance(item.dep.target.module, nn.Module)
                        else []
                    ):
                        p.mul_(1e-3)
    model = probe.model
    pruner = Pruner(model, x, imp, pruning_ratio=0.3, global_pruning=True, max_pruning_ratio=0.9)
    before = _sizes(pruner)
    pruner.step()
    after = _sizes(pruner)
    total0 = sum(n for _, n in before.values())
    total1 = sum(n for _, n in after.values())
    assert total0 - total1 == math.floor(total0 * 0.3 + 0.5)
    removed = {before[k][0]: 1 - after[k][1] / before[k][1] for k in before}
    quiet_key = next(k for k in removed if k.startswith(quiet + " "))
    assert removed[quiet_key] == pytest.approx(0.9, abs=0.02)  # capped, not emptied
    assert len({round(v, 2) for v in removed.values()}) > 2  # uneven, unlike local pruning
    assert all(v <= 0.9 + 1e-9 for v in removed.values())
    model(x)


def test_round_to_keeps_multiples() -> None:
    model = vgg_cifar(11).eval()
    x = _x()
    pruner = Pruner(model, x, "l1", pruning_ratio=0.3, round_to=8)
    before = _sizes(pruner)
    pruner.step()
    for key, (name, kept) in _sizes(pruner).items():
        if before[key][1] >= 8:
            assert kept % 8 == 0, (name, kept)
    model(x)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_max_pruning_ratio_caps_every_layer(global_pruning: bool) -> None:
    model = _resnet()
    x = _x()
    pruner = Pruner(
        model,
        x,
        MagnitudeImportance(normalizer=None),
        pruning_ratio=0.8,
        max_pruning_ratio=0.5,
        global_pruning=global_pruning,
    )
    before = _sizes(pruner)
    pruner.step()
    after = _sizes(pruner)
    for key, (name, n0) in before.items():
        assert after[key][1] >= math.ceil(n0 * 0.5), name
    model(x)


def test_pruning_ratio_dict_and_ignored_layers_by_name() -> None:
    model = _resnet()
    x = _x()
    pruner = Pruner(
        model, x, "l2", pruning_ratio=0.5, pruning_ratio_dict={"layers.1.*": 0.25}, ignored_layers=["stem"]
    )
    before = _sizes(pruner)
    stem_conv = model.stem[0]
    assert all(not name.startswith("stem") for name, _ in before.values())
    pruner.step()
    after = _sizes(pruner)
    assert stem_conv.out_channels == 16
    for key, (name, n0) in before.items():
        ratio = 0.25 if name.startswith("layers.1.") else 0.5
        assert after[key][1] == n0 - math.floor(n0 * ratio + 0.5), name
    model(x)


# ---------------------------------------------------------------------------------------------
# MAC target
# ---------------------------------------------------------------------------------------------


def _small_densenet() -> nn.Module:
    torch.manual_seed(0)
    return densenet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, num_classes=10).eval()


@pytest.mark.parametrize("make", [_resnet, lambda: vgg_cifar(11).eval(), _small_densenet])
def test_target_speedup_is_met_within_3_percent(make) -> None:
    model = make()
    x = _x(1)
    dense, _ = count_macs_and_params(model, x)
    pruner = Pruner(model, x, "l2", target_speedup=2.0)
    pruner.step()
    macs, _ = count_macs_and_params(model, x)
    speedup = dense / macs
    assert abs(speedup / 2.0 - 1) <= 0.03, speedup
    assert pruner.last_macs == macs
    model(x)


def test_target_speedup_iterative_and_transformer() -> None:
    torch.manual_seed(0)
    model = TinyViT(dim=64, depth=2, num_heads=4).eval()
    x = _x(1)
    dense, _ = count_macs_and_params(model, x)
    pruner = Pruner(model, x, "l2", target_speedup=1.5, iterative_steps=2, schedule="cubic")
    pruner.step()
    mid, _ = count_macs_and_params(model, x)
    assert mid < dense
    pruner.step()
    macs, _ = count_macs_and_params(model, x)
    assert abs(dense / macs / 1.5 - 1) <= 0.03
    model(x)


def test_target_speedup_interactive() -> None:
    model = _resnet()
    x = _x(1)
    dense, _ = count_macs_and_params(model, x)
    pruner = Pruner(model, x, "l1", target_speedup=2.0)
    groups = list(pruner.step(interactive=True))
    assert groups
    for group in groups:
        group.prune()
    macs, _ = count_macs_and_params(model, x)
    assert abs(dense / macs / 2.0 - 1) <= 0.03


def test_ignored_layers_by_class_and_parameter() -> None:
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, num_heads=4).eval()
    x = _x(1)
    pruner = Pruner(model, x, "l2", pruning_ratio=0.5, ignored_layers=[nn.LayerNorm, model.cls_token])
    assert pruner.groups == [] or all(
        not isinstance(it.dep.target.module, nn.LayerNorm) or it.dep.handler.side == "in"
        for g in pruner.groups
        for it in g
    )
    pruner.step()
    assert model.cls_token.shape[-1] == 32 and model.norm.normalized_shape == (32,)
    model(x)


# ---------------------------------------------------------------------------------------------
# Schedules, iterative steps
# ---------------------------------------------------------------------------------------------


def test_schedule_values() -> None:
    model = _resnet()
    x = _x()
    cases = {
        "linear": [0.2, 0.4, 0.6],
        "cubic": [0.6 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)],
        "exponential": [1 - 0.4 ** (k / 3) for k in (1, 2, 3)],
    }
    for kind, want in cases.items():
        p = Pruner(model, x, "l1", pruning_ratio=0.6, iterative_steps=3, schedule=kind)
        assert p.per_step_ratio == pytest.approx(want), kind
    p = Pruner(model, x, "l1", pruning_ratio=0.5, schedule=[0.1, 0.3, 0.5])
    assert p.iterative_steps == 3 and p.per_step_ratio == pytest.approx([0.1, 0.3, 0.5])


def test_iterative_steps_follow_the_schedule_of_original_sizes() -> None:
    model = _resnet()
    x = _x()
    pruner = Pruner(model, x, "l2", pruning_ratio=0.6, iterative_steps=3, schedule="cubic")
    before = _sizes(pruner)
    for k in range(3):
        pruner.step()
        ratio = pruner.per_step_ratio[k]
        after = _sizes(pruner)
        for key, (name, n0) in before.items():
            assert after[key][1] == n0 - math.floor(n0 * ratio + 0.5), (k, name)
        model(x)
    with pytest.warns(UserWarning, match="pruning steps are done"):
        pruner.step()
    assert _sizes(pruner) == after


# ---------------------------------------------------------------------------------------------
# Interactive mode
# ---------------------------------------------------------------------------------------------


def test_interactive_mode_yields_groups_to_prune_by_hand() -> None:
    model = _resnet()
    x = _x()
    pruner = Pruner(model, x, "l2", pruning_ratio=0.5)
    before = _sizes(pruner)
    yielded = []
    for i, group in enumerate(pruner.step(interactive=True)):
        assert pruner.DG.check_pruning_group(group)
        yielded.append((id(group.root.dep.target.module), group.root.dep.handler.side))
        n = before[yielded[-1]][1]
        assert len(group.root.idxs) == math.floor(n * 0.5 + 0.5)
        if i % 2 == 0:  # the user decides: prune every other group
            group.prune()
    after = _sizes(pruner)
    assert len(yielded) == len(before)
    for i, key in enumerate(yielded):
        n0 = before[key][1]
        assert after[key][1] == (n0 - math.floor(n0 * 0.5 + 0.5) if i % 2 == 0 else n0)
    model(x)
    assert pruner.current_step == 1


def test_merged_step_equals_pruning_group_by_group() -> None:
    fast, slow = _small_densenet(), _small_densenet()
    x = _x()
    Pruner(fast, x, "l2", pruning_ratio=0.5).step()
    p = Pruner(slow, x, "l2", pruning_ratio=0.5)
    for group in p.step(interactive=True):
        group.prune()
    assert {k: v.shape for k, v in fast.state_dict().items()} == {
        k: v.shape for k, v in slow.state_dict().items()
    }
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(fast(x), slow(x))


def test_graph_search_subsets_give_the_same_result() -> None:
    fast, slow = _small_densenet(), _small_densenet()
    x = _x()
    Pruner(fast, x, "l2", pruning_ratio=0.5).step()
    p = Pruner(slow, x, "l2", pruning_ratio=0.5, fast_subsets=False)
    p.step()
    assert len(p.pruning_history()) > 1  # one record per group
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(a, b), k
    torch.manual_seed(0)
    model = GroupedNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Pruner(model, x, RandomImportance(seed=1), pruning_ratio=0.5, fast_subsets=False).step()
    assert model(x).shape == (2, 5)


# ---------------------------------------------------------------------------------------------
# Subset groups made by filtering equal the graph's own search
# ---------------------------------------------------------------------------------------------


def _signature(group) -> set:
    return {(it.dep.target.name, it.dep.handler.__name__, tuple(it.idxs)) for it in group if it.idxs}


def _check_subsets(model: nn.Module, x: torch.Tensor, data, ignored=()) -> None:
    pruner = Pruner(model, x, RandomImportance(seed=0), ignored_layers=list(ignored))
    for group in pruner.groups:
        n = len(root_ids(group))
        if n < 2:
            continue
        positions = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1)))
        fast = pruner.subsets.subset(group, positions)
        root = group.root.dep
        try:
            slow = pruner.DG.get_pruning_group(
                root.target.module, root.handler, root_channels(group, positions)
            )
        except ValueError:
            # The search refuses the channel set outright (it would empty a coupled layer, e.g. a
            # grouped conv whose groups all lose their channels): the filtered group must be refused too.
            assert pruner.DG.explain_pruning_group(fast) is not None
            continue
        assert _signature(fast) == _signature(slow)
        assert (pruner.DG.explain_pruning_group(fast) is None) == (
            pruner.DG.explain_pruning_group(slow) is None
        )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(net=random_cnn(), data=st.data())
def test_subset_groups_equal_graph_search_on_random_cnns(net, data) -> None:
    model, x = net
    head = list(model.layers.values())[-1]
    _check_subsets(model, x, data, ignored=[head])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_subset_groups_equal_graph_search_on_reference_models(data) -> None:
    _check_subsets(_small_densenet(), _x(1), data)
    torch.manual_seed(0)
    _check_subsets(TinyViT(dim=32, depth=1, num_heads=4).eval(), _x(1), data)


# ---------------------------------------------------------------------------------------------
# Constrained layers never crash a step
# ---------------------------------------------------------------------------------------------


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn(self.c1(x)))
        x = torch.relu(self.c3(self.c2(x)))
        x = self.dw(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_grouped_convolutions_and_groupnorm(ratio: float) -> None:
    torch.manual_seed(0)
    model = GroupedNet().eval()
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, RandomImportance(seed=1), pruning_ratio=ratio)
        pruner.step()
    assert model.gn.num_channels % model.gn.num_groups == 0
    assert model.c2.in_channels % model.c2.groups == 0 and model.c2.out_channels % model.c2.groups == 0
    assert model.c1.out_channels < 16 and model.dw.out_channels < 32
    assert model(x).shape == (2, 5)


# ---------------------------------------------------------------------------------------------
# Gradient criteria through the pruner
# ---------------------------------------------------------------------------------------------


def test_taylor_through_the_pruner() -> None:
    model = _resnet()
    x = _x()
    imp = TaylorImportance()
    pruner = Pruner(model, x, imp, pruning_ratio=0.25, iterative_steps=2)
    with pytest.raises(RuntimeError, match="accumulate"):
        pruner.step()
    assert pruner.current_step == 0
    for _ in range(2):
        model.zero_grad()
        model(x).logsumexp(1).mean().backward()
        imp.accumulate(model)
    pruner.step()
    assert imp.num_batches == 0  # reset after the step
    model.zero_grad()
    model(x).logsumexp(1).mean().backward()
    imp.accumulate(model)
    pruner.step()
    model(x)


def test_hf_vit_hidden_mlp_and_heads() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=64,
        patch_size=8,
    )
    model = transformers.ViTForImageClassification(cfg).eval()
    x = _x(1, 64)
    out = model(x).logits.shape
    pruner = Pruner(model, x, "l2", pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5)
    pruner.step()
    assert model(x).logits.shape == out
    attn = (
        model.vit.layers[0].attention
        if hasattr(model.vit, "layers")
        else model.vit.encoder.layer[0].attention
    )
    heads = getattr(attn, "num_attention_heads", None) or attn.attention.num_attention_heads
    assert heads == 2


# ---------------------------------------------------------------------------------------------
# Argument validation happens before the model is touched
# ---------------------------------------------------------------------------------------------


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model must not run before the arguments are checked")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pruning_ratio": 1.0}, "pruning_ratio=1.0: must be in [0, 1)"),
        ({"pruning_ratio": -0.1}, "pruning_ratio=-0.1: must be in [0, 1)"),
        ({"pruning_ratio": "0.5"}, "pruning_ratio=0.5: must be a number in [0, 1)"),
        (
            {"pruning_ratio": 0.5, "target_speedup": 2.0},
            "target_speedup=2.0: is set together with pruning_ratio",
        ),
        ({"max_pruning_ratio": 0.0}, "max_pruning_ratio=0.0: must be in (0, 1]"),
        ({"max_pruning_ratio": 1.5}, "max_pruning_ratio=1.5: must be in (0, 1]"),
        ({"iterative_steps": 0}, "iterative_steps=0: must be an integer >= 1"),
        (
            {"iterative_steps": 2, "schedule": [0.1, 0.3, 0.5]},
            "iterative_steps=2: gives 2 steps but schedule",
        ),
        ({"schedule": "quadratic"}, "schedule=quadratic: unknown schedule"),
        ({"schedule": [0.3, 0.2]}, "schedule=[0.3,0.2]: must be non-decreasing"),
        ({"round_to": 0}, "round_to=0: must be an integer >= 1"),
        ({"target_speedup": 0.5}, "target_speedup=0.5: must be a number > 1"),
        ({"target_speedup": 1.0}, "target_speedup=1.0: must be a number > 1"),
        ({"head_pruning_ratio": 1.0}, "head_pruning_ratio=1.0: must be in [0, 1)"),
        ({"pruning_ratio_dict": {"fc1": 1.2}}, "pruning_ratio_dict[fc1]=1.2: must be in [0, 1)"),
        ({"importance": "snip"}, "importance=snip: unknown importance"),
    ],
)
def test_settings_are_validated_first_by_the_one_rulebook(kwargs, match) -> None:
    """Every option of the settings is checked by PruningSettings: one-line ``key=value: problem;
    fix`` messages, the same as the callback's and the app's."""
    kwargs = {"importance": "l1", **kwargs}
    with pytest.raises(SettingsError) as info:
        Pruner(Exploding(), torch.randn(1, 4), **kwargs)
    assert str(info.value).startswith(match), str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ignored_layers": ["fc_1"]}, "close matches: 'fc1'"),
        ({"pruning_ratio_dict": {"layer4.*": 0.5}}, "no module or parameter"),
        ({"unwrapped_parameters": {"fc_1.weight": 0}}, "close matches"),
    ],
)
def test_names_are_resolved_before_the_model_runs(kwargs, match) -> None:
    kwargs = {"importance": "l1", **kwargs}
    with pytest.raises(ValueError, match=match):
        Pruner(Exploding(), torch.randn(1, 4), **kwargs)


def test_settings_object_and_overrides() -> None:
    """``settings=`` gives every option at once; options passed as well replace its values, and a
    speedup target alone is not "both set" (the ratio defaults to none)."""
    model = _resnet()
    base = PruningSettings(importance="l2", pruning_ratio=0.3, iterative_steps=2, schedule="agp")
    p = Pruner(model, _x(), settings=base)
    assert p.settings is base and isinstance(p.importance, MagnitudeImportance)
    assert p.pruning_ratio == 0.3 and p.iterative_steps == 2 and p.schedule == "cubic"
    p = Pruner(model, _x(), "l1", settings=base, pruning_ratio=0.6)
    assert p.pruning_ratio == 0.6 and p.iterative_steps == 2 and p.importance.p == 1
    p = Pruner(model, _x(), "l2", target_speedup=2)
    assert p.target_speedup == 2.0 and p.global_pruning and p.dense_macs
    p = Pruner(model, _x(), "l2", schedule=[0.1, 0.2])
    assert p.pruning_ratio == 0.2 and p.iterative_steps == 2 and p.per_step_ratio == [0.1, 0.2]
    assert Pruner(model, _x(), "l2").pruning_ratio == 0.5
    with pytest.raises(SettingsError, match="is set together with"):
        Pruner(model, _x(), settings=base, target_speedup=2.0)


def test_history_is_recorded_on_the_model() -> None:
    from prune_callbacks.pruning.history import get_pruning_history

    model = _resnet()
    pruner = Pruner(model, _x(), "l2", pruning_ratio=0.5)
    pruner.step()
    hist = get_pruning_history(model)
    assert hist and hist is pruner.pruning_history()
    assert all(isinstance(r["items"], list) for r in hist)


def test_state_dict_resumes_the_schedule_on_a_fresh_model() -> None:
    """A pruner rebuilt on a fresh copy (history replayed, weights loaded) continues the schedule
    exactly where the first one stopped, e.g. after a checkpoint."""
    from prune_callbacks.pruning.history import apply_pruning_history, get_pruning_history

    torch.manual_seed(0)
    dense = _resnet()
    model = copy.deepcopy(dense)
    kwargs = {"pruning_ratio": 0.6, "iterative_steps": 3, "global_pruning": True}
    first = Pruner(model, _x(), "l2", **kwargs)
    first.step()
    state = first.state_dict()
    assert state["current_step"] == 1 and state["init_channels"]
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in state["init_channels"].items())

    fresh = copy.deepcopy(dense)
    apply_pruning_history(fresh, get_pruning_history(model))
    fresh.load_state_dict(model.state_dict())
    resumed = Pruner(fresh, _x(), "l2", **kwargs)
    resumed.load_state_dict(state)
    assert resumed.current_step == 1
    first.step()
    resumed.step()
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    # without the state, the new pruner would start the schedule again (different widths)
    restarted = Pruner(copy.deepcopy(fresh), _x(), "l2", **kwargs)
    assert restarted.current_step == 0


def test_round_to_does_not_cancel_head_pruning() -> None:
    """round_to rounds channel counts; a head group counts heads (6 heads, half pruned: 3 stay,
    although 3 is no multiple of 8)."""
    torch.manual_seed(0)
    model = TinyViT(dim=48, depth=1, num_heads=6).eval()
    pruner = Pruner(
        model, _x(1), "l2", pruning_ratio=0.0, prune_num_heads=True, head_pruning_ratio=0.5, round_to=8
    )
    pruner.step()
    assert model.blocks[0].attn.num_heads == 3
    assert model(_x(1)).shape == (1, 10)


def test_each_group_is_indexed_once(monkeypatch) -> None:
    """The flat index of a group is built once and shared by the criterion, the counts, the
    selection and the merged prune (kept by the pruner, not on the groups)."""
    from prune_callbacks.pruning import importance as importance_module

    built: list[int] = []
    original = importance_module.GroupIndex.__init__

    def counting(self, group) -> None:
        built.append(id(group))
        original(self, group)

    monkeypatch.setattr(importance_module.GroupIndex, "__init__", counting)
    pruner = Pruner(_resnet(), _x(), "l2", pruning_ratio=0.5, iterative_steps=2)
    groups = pruner.groups
    assert sorted(built) == sorted(id(g) for g in groups)
    built.clear()
    pruner.step()
    assert built == []
    pruner.step()  # new groups after the prune: each indexed once again
    assert len(built) == len(set(built)) > 0
