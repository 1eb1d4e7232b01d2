"""Importance criteria: hand computations on tiny models, reductions, normalisers, gradient
accumulation (batches, AMP scaling, stale shapes, errors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from prune_callbacks import DependencyGraph
from prune_callbacks.pruning.importance import (
    BNScaleImportance,
    FisherImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    get_importance,
    root_ids,
)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _group_of(model: nn.Module, x: torch.Tensor, module: nn.Module):
    dg = DependencyGraph().build_dependency(model, x)
    for g in dg.get_all_groups():
        if g.root.dep.target.module is module:
            return dg, g
    raise AssertionError("no group rooted at the module")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TwoLinear()
    x = torch.randn(5, 3)
    dg, group = _group_of(model, x, model.fc1)
    return model, x, dg, group


def _per_layer_l1(model: TwoLinear) -> tuple[torch.Tensor, torch.Tensor]:
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    return w1.abs().sum(1) + b1.abs(), w2.abs().sum(0)


def test_magnitude_l1_reductions_by_hand(tiny) -> None:
    model, _x, _dg, group = tiny
    a, b = _per_layer_l1(model)
    expected = {
        "sum": a + b,
        "mean": (a + b) / 2,
        "max": torch.maximum(a, b),
        "prod": a * b,
        "first": a,
    }
    for how, want in expected.items():
        got = MagnitudeImportance(p=1, group_reduction=how, normalizer=None)(group)
        torch.testing.assert_close(got, want, msg=how)


def test_magnitude_l2_is_sum_of_squares(tiny) -> None:
    model, _x, _dg, group = tiny
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    want = (w1**2).sum(1) + b1**2 + (w2**2).sum(0)
    got = MagnitudeImportance(p=2, group_reduction="sum", normalizer="none")(group)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("normalizer", "fn"),
    [
        ("mean", lambda s: s / s.mean()),
        ("max", lambda s: s / s.max()),
        ("sum", lambda s: s / s.sum()),
        ("standardization", lambda s: (s - s.mean()) / s.std(unbiased=False)),
        ("standardisation", lambda s: (s - s.mean()) / s.std(unbiased=False)),
    ],
)
def test_normalizers(tiny, normalizer, fn) -> None:
    _model, _x, _dg, group = tiny
    raw = MagnitudeImportance(p=1, group_reduction="sum", normalizer=None)(group)
    got = MagnitudeImportance(p=1, group_reduction="sum", normalizer=normalizer)(group)
    torch.testing.assert_close(got, fn(raw), rtol=1e-5, atol=1e-6)


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="group_reduction"):
        MagnitudeImportance(group_reduction="median")
    with pytest.raises(ValueError, match="normalizer"):
        MagnitudeImportance(normalizer="l2")
    with pytest.raises(ValueError, match="p must be"):
        MagnitudeImportance(p=0)
    with pytest.raises(ValueError, match="valid names"):
        get_importance("snip")


def test_get_importance_names() -> None:
    assert isinstance(get_importance("taylor"), TaylorImportance)
    assert isinstance(get_importance("Fisher"), FisherImportance)
    assert get_importance("l1").p == 1
    assert get_importance("l2").p == 2
    assert isinstance(get_importance("bn-scale"), BNScaleImportance)
    assert isinstance(get_importance("random"), RandomImportance)
    imp = MagnitudeImportance()
    assert get_importance(imp) is imp


def _batches(model: nn.Module, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


def _grads(model: TwoLinear, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    loss = ((model(x) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def _run(model: TwoLinear, imp, batches) -> None:
    for x, y in batches:
        model.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        imp.accumulate(model)


def test_taylor_matches_hand_computation(tiny) -> None:
    model, _x, _dg, group = tiny
    batches = _batches(model)
    imp = TaylorImportance(normalizer=None)  # group_reduction="sum" by default
    _run(model, imp, batches)
    assert imp.num_batches == 3
    p = dict(model.named_parameters())
    acc = {k: torch.zeros_like(v) for k, v in p.items()}
    for x, y in batches:
        for k, g in _grads(model, x, y).items():
            acc[k] += p[k].detach() * g
    acc = {k: v / len(batches) for k, v in acc.items()}
    # |sum over every entry of channel j in the group|: row j of fc1 (+ bias j), column j of fc2
    want = (acc["fc1.weight"].sum(1) + acc["fc1.bias"] + acc["fc2.weight"].sum(0)).abs()
    torch.testing.assert_close(imp(group), want)
    # mean: the signed sum divided by the number of layers, then the absolute value
    mean = TaylorImportance(group_reduction="mean", normalizer=None)
    _run(model, mean, batches)
    torch.testing.assert_close(mean(group), want / 2)
    # max uses the absolute per-layer sums
    mx = TaylorImportance(group_reduction="max", normalizer=None)
    _run(model, mx, batches)
    a = (acc["fc1.weight"].sum(1) + acc["fc1.bias"]).abs()
    b = acc["fc2.weight"].sum(0).abs()
    torch.testing.assert_close(mx(group), torch.maximum(a, b))


def test_fisher_matches_hand_computation(tiny) -> None:
    model, _x, _dg, group = tiny
    batches = _batches(model, 4)
    imp = FisherImportance(normalizer=None)
    _run(model, imp, batches)
    p = dict(model.named_parameters())
    acc = {k: torch.zeros_like(v) for k, v in p.items()}
    for x, y in batches:
        for k, g in _grads(model, x, y).items():
            acc[k] += (p[k].detach() * g) ** 2
    acc = {k: v / len(batches) for k, v in acc.items()}
    want = acc["fc1.weight"].sum(1) + acc["fc1.bias"] + acc["fc2.weight"].sum(0)
    torch.testing.assert_close(imp(group), want)


def test_gradient_importance_needs_batches(tiny) -> None:
    model, x, _dg, group = tiny
    imp = TaylorImportance()
    with pytest.raises(RuntimeError, match=r"accumulate\(model\)"):
        imp(group)
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        imp.accumulate(model)
    model(x).sum().backward()
    assert imp.accumulate(model)
    assert imp(group) is not None
    imp.reset()
    assert imp.num_batches == 0
    with pytest.raises(RuntimeError, match="no gradient statistics"):
        imp(group)


def test_grad_scale_and_nonfinite_batches(tiny) -> None:
    model, x, _dg, group = tiny
    model(x).sum().backward()
    plain = TaylorImportance(normalizer=None)
    plain.accumulate(model)
    # gradients still multiplied by an AMP scale: grad_scale undoes it
    for p in model.parameters():
        p.grad *= 1024.0
    scaled = TaylorImportance(normalizer=None)
    scaled.accumulate(model, grad_scale=1024.0)
    torch.testing.assert_close(scaled(group), plain(group))
    # an overflow step (inf gradients) is skipped, like GradScaler skips the optimizer step
    model.fc2.weight.grad[0, 0] = float("inf")
    assert not scaled.accumulate(model)
    assert scaled.skipped_batches == 1 and scaled.num_batches == 1
    torch.testing.assert_close(scaled(group), plain(group))


def test_low_precision_gradients() -> None:
    """A bfloat16 model (gradients in bfloat16, e.g. already unscaled under AMP): statistics are
    accumulated in float32 and match the float32 model."""
    import copy

    torch.manual_seed(0)
    model = TwoLinear()
    low = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(5, 3)
    scores = []
    for m, inp in ((model, x), (low, x.to(torch.bfloat16))):
        _dg, group = _group_of(m, inp, m.fc1)
        m(inp).float().sum().backward()
        imp = TaylorImportance(normalizer=None)
        imp.accumulate(m)
        totals = [e["total"] for e in imp.state_dict(m)["acc"].values()]
        assert len(totals) == 4 and all(t.dtype == torch.float32 for t in totals)
        scores.append(imp(group))
    torch.testing.assert_close(scores[1], scores[0], rtol=0.05, atol=0.02)


def test_stale_accumulators_are_dropped_after_a_prune(tiny) -> None:
    model, x, dg, group = tiny
    imp = FisherImportance(normalizer=None)
    model(x).sum().backward()
    imp.accumulate(model)
    dg.get_pruning_group(model.fc1, group.root.dep.handler, [1]).prune()
    new_group = next(g for g in dg.get_all_groups() if g.root.dep.target.module is model.fc1)
    # the accumulated shapes are stale: they are never indexed and the group cannot be scored
    assert imp(new_group) is None
    params = dict(model.named_parameters())
    saved = imp.state_dict(model)["acc"]
    assert "fc1.weight" not in saved  # the stale statistics of the scored group were dropped
    assert all(e["total"].shape == params[name].shape for name, e in saved.items())
    model.zero_grad()
    model(x).sum().backward()
    imp.accumulate(model)
    scores = imp(new_group)
    assert scores is not None and scores.shape == (3,)


@pytest.mark.parametrize("cls", [TaylorImportance, FisherImportance])
def test_gradient_state_round_trip(tiny, cls) -> None:
    """accumulate, state_dict, a fresh criterion on a fresh copy of the model, load_state_dict:
    the same scores, and accumulation continues from the restored statistics."""
    import copy

    model, x, _dg, group = tiny
    imp = cls(normalizer=None)
    _run(model, imp, _batches(model, 3))
    state = imp.state_dict(model)
    assert state["num_batches"] == 3 and state["skipped_batches"] == 0
    assert set(state["acc"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert all(e["count"] == 3 and e["total"].device.type == "cpu" for e in state["acc"].values())

    fresh_model = copy.deepcopy(model)
    _dg2, fresh_group = _group_of(fresh_model, x, fresh_model.fc1)
    fresh = cls(normalizer=None)
    fresh.load_state_dict(copy.deepcopy(state), fresh_model)
    assert fresh.num_batches == 3
    torch.testing.assert_close(fresh(fresh_group), imp(group))
    more = _batches(model, 5)[3:]
    _run(model, imp, more)
    _run(fresh_model, fresh, more)
    torch.testing.assert_close(fresh(fresh_group), imp(group))


def test_gradient_state_needs_the_model_and_skips_other_shapes(tiny) -> None:
    model, x, _dg, _group = tiny
    imp = TaylorImportance()
    assert imp.state_dict() == {"num_batches": 0, "skipped_batches": 0, "acc": {}}
    model(x).sum().backward()
    imp.accumulate(model)
    with pytest.raises(ValueError, match=r"state_dict\(model\)"):
        imp.state_dict()
    state = imp.state_dict(model)
    with pytest.raises(ValueError, match=r"load_state_dict\(state, model\)"):
        TaylorImportance().load_state_dict(state)
    other = TwoLinear()
    other.fc1 = nn.Linear(3, 3)  # pruned differently: fc1's statistics do not fit
    fresh = TaylorImportance()
    fresh.load_state_dict(state, other)
    assert set(fresh.state_dict(other)["acc"]) == {"fc2.weight", "fc2.bias"}


def test_random_and_magnitude_state(tiny) -> None:
    _model, _x, _dg, group = tiny
    imp = RandomImportance(seed=3)
    imp(group)
    state = imp.state_dict()
    fresh = RandomImportance(seed=99)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(group), imp(group))
    assert MagnitudeImportance().state_dict() == {}
    MagnitudeImportance().load_state_dict({})


def test_flatten_into_linear_sums_every_column_of_a_channel() -> None:
    class ConvFlat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).flatten(1))

    torch.manual_seed(0)
    model = ConvFlat()
    _dg, group = _group_of(model, torch.randn(2, 1, 2, 2), model.conv)
    got = MagnitudeImportance(p=1, group_reduction="sum", normalizer=None)(group)
    w, b, fw = model.conv.weight.detach(), model.conv.bias.detach(), model.fc.weight.detach()
    want = torch.stack(
        [w[c].abs().sum() + b[c].abs() + fw[:, c * 4 : (c + 1) * 4].abs().sum() for c in range(2)]
    )
    torch.testing.assert_close(got, want)


def test_bn_scale_importance() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0, -0.1, 3.0, 0.0]))
    _dg, group = _group_of(model.eval(), torch.randn(1, 3, 8, 8), model[0])
    got = BNScaleImportance(normalizer=None)(group)
    torch.testing.assert_close(got, torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0, 0.0]))
    # a group without batch norm cannot be scored
    lin = TwoLinear()
    _dg, g2 = _group_of(lin, torch.randn(2, 3), lin.fc1)
    assert BNScaleImportance()(g2) is None


def test_random_importance_is_reproducible(tiny) -> None:
    _model, _x, _dg, group = tiny
    a = RandomImportance(seed=3)(group)
    b = RandomImportance(seed=3)(group)
    assert a.shape == (4,) and torch.equal(a, b)


def test_head_groups_score_one_value_per_head() -> None:
    from prune_callbacks.reference.models import TinyViT

    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, num_heads=4).eval()
    dg = DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
    heads = [g for g in dg.get_all_groups() if getattr(g, "head_blocks", None)]
    if not heads:
        pytest.skip("the graph finds no attention-head groups in this model")
    group = heads[0]
    ids = root_ids(group)
    assert len(ids) == group.head_blocks
    scores = MagnitudeImportance(p=1, group_reduction="sum", normalizer=None)(group)
    assert scores.shape == (len(ids),)
    q = model.blocks[0].attn.q
    size = q.out_features // len(ids)
    for h in range(len(ids)):
        rows = slice(h * size, (h + 1) * size)
        part = q.weight[rows].abs().sum() + q.bias[rows].abs().sum()
        assert scores[h] > part  # the head's q rows are only part of its score


def test_in_place_column_reductions_match_the_views() -> None:
    """Linear and convolution inputs are reduced without the transposed copy; same values."""
    from prune_callbacks.pruning.importance import ParamImportance

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 6, 3, padding=1)
            self.c3 = nn.Conv2d(6, 5, 1)
            self.fc = nn.Linear(5, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
            return self.out(torch.relu(self.fc(x.mean((2, 3)))))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    groups = DependencyGraph().build_dependency(model, x).get_all_groups()

    def generic(cls):
        class Generic(cls):
            reduce_columns = ParamImportance.reduce_columns

        return Generic

    for make in (
        lambda c: c(p=1, group_reduction="sum", normalizer=None),
        lambda c: c(p=2, group_reduction="sum", normalizer=None),
        lambda c: c(p=3, group_reduction="sum", normalizer=None),
    ):
        fast, slow = make(MagnitudeImportance), make(generic(MagnitudeImportance))
        for g in groups:
            torch.testing.assert_close(fast(g), slow(g))
    for cls in (TaylorImportance, FisherImportance):
        fast, slow = cls(normalizer=None), generic(cls)(normalizer=None)
        fast.accumulate(model)
        slow.accumulate(model)
        for g in groups:
            torch.testing.assert_close(fast(g), slow(g))
