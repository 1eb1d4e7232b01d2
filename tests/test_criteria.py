"""The criteria of issue 16: LAMP (normaliser and criterion), Optimal Brain Damage with the
empirical-Fisher or Hutchinson Hessian diagonal, and isomorphic global ranking.

Every score is compared with a hand computation on a small group (Linear->ReLU->Linear and
Conv->BN->Conv); Hutchinson's estimate with the exact Hessian of a quadratic model; isomorphic
ranking with the per-class pruned fractions on a model with two block types whose scores are on
different scales. Then the by-name use in the Pruner and a one-epoch Lightning run with "obd".
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import LitNet, cpu_trainer, random_loader
from prune_callbacks import DependencyGraph, Pruner, PruningSettings
from prune_callbacks.integrations.lightning.callback import StructuredPruning
from prune_callbacks.pruning.importance import (
    IMPORTANCES,
    NORMALIZERS,
    MagnitudeImportance,
    OBDImportance,
    TaylorImportance,
    get_importance,
    lamp_normalize,
)
from prune_callbacks.pruning.settings import SettingsError

# ---------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Linear -> ReLU -> Linear: the group of fc1's outputs is (fc1 rows + bias, fc2 columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvBNConv(nn.Module):
    """Conv -> BN -> ReLU -> Conv: the group of conv1's outputs is (conv1 filters + bias, BN scale
    and shift, conv2 input columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _root_group(model: nn.Module, x: torch.Tensor, module: nn.Module):
    dg = DependencyGraph().build_dependency(model, x)
    for g in dg.get_all_groups():
        if g.root.dep.target.module is module:
            return g
    raise AssertionError("no group rooted at the module")


def _mlp():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(6, 3)
    return model, x, _root_group(model, x, model.fc1)


def _conv():
    torch.manual_seed(0)
    model = ConvBNConv()
    with torch.no_grad():  # BN parameters away from their (1, 0) initialisation
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 2, 5, 5)
    return model, x, _root_group(model, x, model.conv1)


def _layers(model: nn.Module) -> list[list[tuple[torch.Tensor, str]]]:
    """For each layer of the root group (root first), its parameters and how a channel reads them:
    ``"row"`` (dim 0 of the tensor belongs to the channel) or ``"col"`` (dim 1)."""
    if isinstance(model, MLP):
        return [
            [(model.fc1.weight, "row"), (model.fc1.bias, "row")],
            [(model.fc2.weight, "col")],
        ]
    return [
        [(model.conv1.weight, "row"), (model.conv1.bias, "row")],
        [(model.bn.weight, "row"), (model.bn.bias, "row")],
        [(model.conv2.weight, "col")],
    ]


def _per_channel(t: torch.Tensor, how: str) -> torch.Tensor:
    """Sum of ``t``'s entries per channel (dim 0 for a row, dim 1 for a column)."""
    t = t if how == "row" else t.transpose(0, 1)
    return t.reshape(t.shape[0], -1).sum(1)


def _hand_magnitude_per_layer(model: nn.Module) -> torch.Tensor:
    """``(layers, channels)``: sum of w^2 of each layer's entries of every channel."""
    return torch.stack(
        [sum(_per_channel(p.detach() ** 2, how) for p, how in layer) for layer in _layers(model)]
    )


def _hand_lamp(s: torch.Tensor) -> torch.Tensor:
    """LAMP written out: s_i / sum of the s_j >= s_i."""
    vals = s.tolist()
    return torch.tensor([v / sum(u for u in vals if u >= v) for v in vals])


# ---------------------------------------------------------------------------------------------- LAMP


def test_lamp_normalize_by_hand_with_ties() -> None:
    # sorted 1, 2, 2, 5: denominators 10, 9 (both 2s count each other), 9, 5
    got = lamp_normalize(torch.tensor([2.0, 5.0, 1.0, 2.0]))
    torch.testing.assert_close(got, torch.tensor([2 / 9, 1.0, 1 / 10, 2 / 9]))
    assert lamp_normalize(torch.zeros(0)).numel() == 0
    assert "lamp" in NORMALIZERS


@pytest.mark.parametrize("build", [_mlp, _conv], ids=["linear", "conv_bn"])
def test_lamp_normalizer_by_hand(build) -> None:
    model, _x, group = build()
    raw = _hand_magnitude_per_layer(model).sum(0)
    got = MagnitudeImportance(p=2, group_reduction="sum", normalizer="lamp")(group)
    torch.testing.assert_close(got, _hand_lamp(raw), rtol=1e-5, atol=1e-7)
    # the largest channel scores 1, and the order of the raw scores is kept
    assert float(got.max()) == pytest.approx(1.0)
    assert torch.equal(torch.argsort(got), torch.argsort(raw))


@pytest.mark.parametrize("build", [_mlp, _conv], ids=["linear", "conv_bn"])
def test_lamp_criterion_by_name_by_hand(build) -> None:
    model, _x, group = build()
    per_layer = _hand_magnitude_per_layer(model)
    want = _hand_lamp(per_layer.sum(0) / per_layer.shape[0])  # "mean" over the layers, then LAMP
    imp = get_importance("lamp")
    assert isinstance(imp, MagnitudeImportance) and imp.p == 2 and imp.normalizer == "lamp"
    torch.testing.assert_close(imp(group), want, rtol=1e-5, atol=1e-7)
    # a reduction of one's own choice is kept, LAMP stays
    first = get_importance("lamp", group_reduction="first")(group)
    torch.testing.assert_close(first, _hand_lamp(per_layer[0]), rtol=1e-5, atol=1e-7)


def test_lamp_normalizer_for_a_gradient_criterion() -> None:
    model, x, group = _mlp()
    raw_imp = TaylorImportance(normalizer=None)
    lamp_imp = TaylorImportance(normalizer="lamp")
    model(x).pow(2).sum().backward()
    raw_imp.accumulate(model)
    lamp_imp.accumulate(model)
    torch.testing.assert_close(lamp_imp(group), _hand_lamp(raw_imp(group)), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- OBD


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def _batches(model: nn.Module, x: torch.Tensor, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        shape = model(x).shape
    return [(torch.randn(x.shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("build", [_mlp, _conv], ids=["linear", "conv_bn"])
def test_obd_from_squared_gradients_by_hand(build) -> None:
    """Two batches, gradients scaled by 1024 (as under AMP) and unscaled by ``grad_scale``:
    score = sum over a channel's entries of 1/2 * mean_b(g_b^2) * w^2."""
    model, x, group = build()
    batches = _batches(model, x)
    params = [p for layer in _layers(model) for p, _ in layer]
    squares = [torch.zeros_like(p) for p in params]
    for bx, by in batches:  # the hand part: plain gradients of each batch
        grads = torch.autograd.grad(_mse(model, bx, by), params)
        for s, g in zip(squares, grads):
            s += g.detach() ** 2 / len(batches)
    fisher = dict(zip(map(id, params), squares))
    want = sum(
        _per_channel(0.5 * fisher[id(p)] * p.detach() ** 2, how)
        for layer in _layers(model)
        for p, how in layer
    )

    imp = OBDImportance(normalizer=None)  # group_reduction="sum": the layers add up
    named = get_importance("obd")
    assert isinstance(named, OBDImportance) and named.estimator == "fisher" and named.requires_gradients
    scale = 1024.0
    for bx, by in batches:
        model.zero_grad()
        (_mse(model, bx, by) * scale).backward()
        assert imp.accumulate(model, grad_scale=scale)
        assert named.accumulate(model, grad_scale=scale)
    assert imp.num_batches == 2
    torch.testing.assert_close(imp(group), want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(named(group), want / want.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(imp.hessian_diagonal(params[0]), squares[0], rtol=1e-5, atol=1e-9)

    # the weights are those at scoring time (the curvature is what was accumulated)
    with torch.no_grad():
        params[0].mul_(2.0)
    first = _per_channel(0.5 * squares[0] * params[0].detach() ** 2, "row")
    before = _per_channel(0.5 * squares[0] * (params[0].detach() / 2) ** 2, "row")
    torch.testing.assert_close(imp(group), want + first - before, rtol=1e-5, atol=1e-9)

    imp.reset()
    assert imp.num_batches == 0
    with pytest.raises(RuntimeError, match="no gradient statistics"):
        imp(group)


def test_obd_state_dict_round_trip() -> None:
    model, x, group = _mlp()
    imp = get_importance("obd")
    for bx, by in _batches(model, x):
        model.zero_grad()
        _mse(model, bx, by).backward()
        imp.accumulate(model)
    state = imp.state_dict(model)
    assert state["estimator"] == "fisher" and state["num_batches"] == 2
    assert set(state["acc"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    buf = io.BytesIO()
    torch.save(state, buf)  # as a checkpoint stores it
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    twin = copy.deepcopy(model)  # a resumed run: the same names, other parameter objects
    fresh = get_importance("obd")
    fresh.load_state_dict(loaded, twin)
    twin_group = _root_group(twin, x, twin.fc1)
    torch.testing.assert_close(fresh(twin_group), imp(group))
    assert fresh.num_batches == 2

    with pytest.raises(ValueError, match="estimator='hutchinson'"):
        get_importance("hessian").load_state_dict(loaded, twin)


# ---------------------------------------------------------------------------------------------- Hutchinson


class Quadratic(nn.Module):
    """A linear layer: with a squared-error loss the loss is quadratic in its parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    """loss = sum a_i w_i^2 has H = diag(2a): z_i (Hz)_i = 2 a_i z_i^2 = 2 a_i for every draw."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    a = torch.tensor([0.5, 1.0, 2.0, 4.0])
    imp = OBDImportance(estimator="hutchinson", seed=0)
    assert imp.accumulate_hutchinson([w], (a * w**2).sum(), samples=3)
    torch.testing.assert_close(imp.hessian_diagonal(w), 2 * a)


def test_hutchinson_approximates_the_true_hessian_diagonal() -> None:
    """On a quadratic model the estimate is unbiased with per-entry variance sum_{k != i} H_ik^2 /
    samples (Rademacher vectors); the tolerance is 5 standard errors (seeded: the test is
    deterministic), and it is checked to be tight (well below the diagonal itself)."""
    torch.manual_seed(0)
    model = Quadratic()
    x, y = torch.randn(16, 3) + 0.5, torch.randn(16, 2)
    params = dict(model.named_parameters())
    names = list(params)

    def loss_of(*flat: torch.Tensor) -> torch.Tensor:
        values = dict(zip(names, flat))
        return F.mse_loss(torch.func.functional_call(model, values, (x,)), y)

    blocks = torch.autograd.functional.hessian(loss_of, tuple(params.values()))
    sizes = [p.numel() for p in params.values()]
    full = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], 1)
            for i in range(len(sizes))
        ]
    )
    diag = full.diagonal()
    off = (full**2).sum(1) - diag**2
    samples = 4000
    tolerance = 5 * (off / samples).sqrt() + 1e-6
    assert bool((tolerance < 0.25 * diag.abs()).all()), "the tolerance would not test anything"

    imp = get_importance("hessian", seed=0)
    assert isinstance(imp, OBDImportance) and imp.estimator == "hutchinson"
    loss = F.mse_loss(model(x), y)
    assert imp.accumulate_hutchinson(model, loss, samples=samples)
    loss.backward()  # the graph is kept for the usual backward, and .grad was left alone
    est = torch.cat([imp.hessian_diagonal(p).reshape(-1) for p in params.values()])
    err = (est - diag).abs()
    assert bool((err <= tolerance).all()), f"max error {float(err.max()):.4f}, tolerance {tolerance.tolist()}"


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_hutchinson_through_accumulate_after_create_graph_backward() -> None:
    """``loss.backward(create_graph=True)`` then ``accumulate(model)`` (the callback's interface)
    gives the same estimate as ``accumulate_hutchinson`` with the same draws; the score is OBD's
    1/2 H_ii w^2 summed over the channel, a negative estimate counting as 0."""
    model, x, group = _mlp()
    ((bx, by),) = _batches(model, x, 1)
    via_loss = OBDImportance(estimator="hutchinson", seed=3, samples=2, normalizer=None)
    via_grad = OBDImportance(estimator="hutchinson", seed=3, samples=2, normalizer=None)
    via_loss.accumulate_hutchinson(model, _mse(model, bx, by))
    model.zero_grad(set_to_none=True)
    _mse(model, bx, by).backward(create_graph=True)
    assert via_grad.accumulate(model)
    for p in model.parameters():
        torch.testing.assert_close(via_grad.hessian_diagonal(p), via_loss.hessian_diagonal(p))
    want = sum(
        _per_channel(0.5 * via_loss.hessian_diagonal(p).clamp(min=0) * p.detach() ** 2, how)
        for layer in _layers(model)
        for p, how in layer
    )
    torch.testing.assert_close(via_grad(group), want, rtol=1e-5, atol=1e-9)
    model.zero_grad(set_to_none=True)

    _mse(model, bx, by).backward()  # without the graph: explained
    with pytest.raises(RuntimeError, match="create_graph=True"):
        via_grad.accumulate(model)
    with pytest.raises(RuntimeError, match="importance='hessian'"):
        OBDImportance().accumulate_hutchinson(model, _mse(model, bx, by))


# ---------------------------------------------------------------------------------------------- isomorphic


class _Attention(nn.Module):
    """Single-head attention without a head reshape: (q, k) and (v, proj) are channel groups."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) * self.scale, dim=-1)
        return self.proj(a @ self.v(x))


class _Mlp(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.attn, self.mlp = _Attention(d), _Mlp(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class TwoBlockTypes(nn.Module):
    """Two ViT-like blocks: three structure classes of groups ((q, k), (v, proj), MLP), two
    groups each. The MLP weights are 10x larger, so with unnormalised scores a single global
    ranking would prune the attention first."""

    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, d)
        self.blocks = nn.Sequential(_Block(d, h), _Block(d, h))
        self.head = nn.Linear(d, 3)
        with torch.no_grad():
            for block in self.blocks:
                block.mlp.fc1.weight.mul_(10.0)
                block.mlp.fc2.weight.mul_(10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def _class_fractions(model: TwoBlockTypes, d: int = 8, h: int = 16) -> dict[str, float]:
    """Fraction of its original channels each structure class lost."""
    kept = {
        "qk": sum(b.attn.q.out_features for b in model.blocks) / (2 * d),
        "vproj": sum(b.attn.v.out_features for b in model.blocks) / (2 * d),
        "mlp": sum(b.mlp.fc1.out_features for b in model.blocks) / (2 * h),
    }
    return {k: 1.0 - v for k, v in kept.items()}


def _prune_two_block_types(**options) -> tuple[TwoBlockTypes, Pruner]:
    model = TwoBlockTypes()
    x = torch.randn(2, 5, 4)
    settings = PruningSettings(
        importance=MagnitudeImportance(p=2, normalizer=None), ignored_layers=["embed"], **options
    )
    pruner = Pruner(model, x, settings=settings)
    pruner.step()
    model(x)  # still runs
    return model, pruner


pytestmark = pytest.mark.filterwarnings("ignore:prune_callbacks. these layers cannot be pruned")


def test_isomorphic_ratio_is_equal_per_structure_class() -> None:
    _model, pruner = _prune_two_block_types(pruning_ratio=0.5, global_pruning=True, isomorphic=True)
    classes = {pruner._counts.structure(g) for g in pruner.groups}
    assert len(classes) == 3  # (q, k), (v, proj), MLP: the two blocks' groups share a class
    iso = _class_fractions(_model)
    assert iso == {"qk": 0.5, "vproj": 0.5, "mlp": 0.5}

    plain_model, _ = _prune_two_block_types(pruning_ratio=0.5, global_pruning=True)
    plain = _class_fractions(plain_model)
    # one global ranking over scores of different scales: the attention groups go down to their last
    # channel (7 of 8) before the MLP loses any, which loses only the 4 channels still missing
    assert plain == {"qk": 0.875, "vproj": 0.875, "mlp": 0.125}, plain


def test_isomorphic_speedup_prunes_every_class_alike() -> None:
    model, pruner = _prune_two_block_types(target_speedup=1.6, isomorphic=True)
    assert pruner.dense_macs is not None and pruner.last_macs is not None
    assert pruner.last_macs <= pruner.dense_macs / 1.6 * 1.03
    iso = _class_fractions(model)
    # the same fraction for every class, up to one channel of the smallest class (2 x 8 channels)
    assert max(iso.values()) - min(iso.values()) <= 1 / 16 + 1e-9, iso
    assert min(iso.values()) > 0.1

    plain_model, plain_pruner = _prune_two_block_types(target_speedup=1.6)
    plain = _class_fractions(plain_model)
    assert plain["mlp"] < 0.1 and max(plain.values()) - min(plain.values()) > 0.5, plain


def test_isomorphic_setting_is_validated() -> None:
    with pytest.raises(
        SettingsError, match="isomorphic=true: ranks channels among groups.*global_pruning=true"
    ):
        PruningSettings(pruning_ratio=0.5, isomorphic=True)
    with pytest.raises(SettingsError, match="isomorphic=yes: must be true or false"):
        PruningSettings(global_pruning=True, isomorphic="yes")
    with pytest.raises(SettingsError, match=r"pruning\.isomorphic=true: .*set pruning\.global_pruning=true"):
        PruningSettings.from_mapping({"pruning_ratio": 0.5, "isomorphic": True}, prefix="pruning.")
    assert PruningSettings(target_speedup=2.0, isomorphic=True).isomorphic
    assert PruningSettings(global_pruning=True, isomorphic=True).ranks_globally
    assert "isomorphic:" in (PruningSettings.__doc__ or "")


# ---------------------------------------------------------------------------------------------- by name


def test_names_are_registered_and_accepted_by_the_settings() -> None:
    for name in ("lamp", "obd", "hessian"):
        assert name in IMPORTANCES
        assert PruningSettings(importance=name).importance == name
    assert "lamp" in (PruningSettings.__doc__ or "") and "obd" in (PruningSettings.__doc__ or "")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_pruner_by_name_lamp_obd_hessian() -> None:
    # lamp: no gradients; the two lowest LAMP channels (= lowest magnitude) of fc1 go
    model, x, group = _mlp()
    per_layer = _hand_magnitude_per_layer(model)
    keep = sorted(torch.argsort(per_layer.mean(0), descending=True)[:2].tolist())
    kept_rows = model.fc1.weight.detach()[keep].clone()
    pruner = Pruner(model, x, importance="lamp", pruning_ratio=0.5)
    pruner.step()
    assert torch.equal(model.fc1.weight.detach(), kept_rows)

    # obd: accumulate after backward, then the channels with the lowest hand OBD scores go
    model, x, group = _mlp()
    pruner = Pruner(model, x, importance="obd", pruning_ratio=0.5)
    ((bx, by),) = _batches(model, x, 1)
    _mse(model, bx, by).backward()
    pruner.importance.accumulate(model)
    grads = {id(p): p.grad.detach() for p in model.parameters()}
    hand = sum(
        _per_channel(0.5 * grads[id(p)] ** 2 * p.detach() ** 2, how)
        for layer in _layers(model)
        for p, how in layer
    )
    keep = sorted(torch.argsort(hand, descending=True)[:2].tolist())
    kept_rows = model.fc1.weight.detach()[keep].clone()
    pruner.step()
    assert torch.equal(model.fc1.weight.detach(), kept_rows)
    assert pruner.importance.num_batches == 0  # reset after the step

    # hessian: Hutchinson from a create_graph backward, through the same accumulate call
    model, x, group = _mlp()
    pruner = Pruner(model, x, importance="hessian", pruning_ratio=0.5)
    _mse(model, bx, by).backward(create_graph=True)
    pruner.importance.accumulate(model)
    model.zero_grad(set_to_none=True)
    pruner.step()
    assert model.fc1.out_features == 2 and model.fc2.in_features == 2


def test_callback_one_epoch_with_obd(tmp_path: Path) -> None:
    module = LitNet()
    callback = StructuredPruning("obd", pruning_ratio=0.5, epochs=[0], verbose=False)
    assert isinstance(callback.importance, OBDImportance)
    seen: list[int] = []
    accumulate = callback.importance.accumulate

    def counting(model, grad_scale=None):  # count the batches the callback feeds the criterion
        seen.append(1)
        return accumulate(model, grad_scale=grad_scale)

    callback.importance.accumulate = counting  # type: ignore[method-assign]
    trainer = cpu_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(module, random_loader(n=32, batch_size=8))
    assert len(seen) == 4  # every optimizer step of the pruning epoch
    assert module.model.conv1.out_channels == 8 and module.model.conv2.out_channels == 8
    assert callback.steps_done == 1
    with torch.no_grad():
        assert math.isfinite(float(module(torch.randn(1, 3, 8, 8)).sum()))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_callback_one_epoch_with_hessian_and_create_graph(tmp_path: Path) -> None:
    """The "hessian" criterion through the callback: the LightningModule keeps the gradients' graph."""

    class CreateGraph(LitNet):
        def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
            loss.backward(*args, create_graph=True, **kwargs)

    module = CreateGraph()
    callback = StructuredPruning("hessian", pruning_ratio=0.5, epochs=[0], verbose=False)
    cpu_trainer(tmp_path, [callback], max_epochs=1).fit(module, random_loader(n=16, batch_size=8))
    assert module.model.conv1.out_channels == 8 and callback.steps_done == 1

    plain = StructuredPruning("hessian", pruning_ratio=0.5, epochs=[0], verbose=False)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        cpu_trainer(tmp_path, [plain], max_epochs=1).fit(LitNet(), random_loader(n=16, batch_size=8))
