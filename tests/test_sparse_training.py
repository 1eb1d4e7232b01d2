"""Sparse training: the group regularisers (pruning/sparsity.py) and the ``SparseTraining`` callback.

The added gradient of each regulariser is compared with a hand computation written from the layers'
own tensors (rows of the producer, columns of the consumer, the norm's scale and shift), in a plain
loop and through Lightning under bf16 autocast with 2-batch gradient accumulation; channels that
sparse training drives to zero are the ones ``StructuredPruning`` removes; states round-trip through
``weights_only`` checkpoints; the README's snippet runs as written; metrics reach a CSVLogger; two
DDP ranks (gloo) stay equal (slow; this file is also the per-rank script).
"""

from __future__ import annotations

import copy
import csv
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
README_SECTION = "Sparse training"


# ---------------------------------------------------------------------------------------------- models


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)
    )
    with torch.no_grad():  # scales and shifts away from 1 / 0, of both signs
        model[1].weight.normal_()
        model[1].bias.normal_()
    return model


MODELS = {"mlp": (mlp, (1, 5)), "conv_bn": (conv_bn, (1, 3, 5, 5))}

#: The one prunable group of each model, written out by hand: (parameter, dim that holds the channel).
#: Linear -> ReLU -> Linear: the first layer's rows and bias, the second layer's columns.
#: Conv -> BN -> ReLU -> Conv: the first conv's filters and bias, the BN's scale and shift, the second
#: conv's input channels. The last layer's own outputs are model outputs (never pruned).
SLICES = {
    "mlp": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)],
    "conv_bn": [("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("3.weight", 1)],
}


def _along(t: torch.Tensor, dim: int, coef: torch.Tensor) -> torch.Tensor:
    """``coef`` (one value per channel) broadcast along ``dim`` of ``t``."""
    shape = [1] * t.dim()
    shape[dim] = -1
    return coef.reshape(shape)


def hand_sq_norms(kind: str, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of each channel over every entry of the group (float64)."""
    total = None
    for name, dim in SLICES[kind]:
        t = params[name].double()
        other = [d for d in range(t.dim()) if d != dim]
        sq = t.pow(2).sum(other) if other else t.pow(2)
        total = sq if total is None else total + sq
    assert total is not None
    return total


def hand_lasso_grads(kind: str, params: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """d/dw of ``strength * sum_c ||v_c||``: ``strength * w / ||v_c||`` on every entry of channel c."""
    norm = hand_sq_norms(kind, params).sqrt()
    return {n: strength * params[n].double() / _along(params[n], d, norm) for n, d in SLICES[kind]}


def hand_growing_grads(
    kind: str, params: dict[str, torch.Tensor], table: torch.Tensor
) -> dict[str, torch.Tensor]:
    """d/dw of ``sum_c table_c / 2 * ||v_c||^2``: ``table_c * w``."""
    return {n: params[n].double() * _along(params[n], d, table.double()) for n, d in SLICES[kind]}


def hand_growing_table(
    kind: str, params: dict[str, torch.Tensor], table: torch.Tensor, delta: float, cap: float, ratio: float
) -> torch.Tensor:
    """One growth: the floor(ratio * n + 0.5) lowest-norm channels gain ``delta`` (capped)."""
    sq = hand_sq_norms(kind, params)
    k = int(len(sq) * ratio + 0.5)
    chosen = torch.argsort(sq, stable=True)[:k]
    table = table.clone()
    table[chosen] = torch.clamp(table[chosen] + delta, max=cap)
    return table


def hand_bn_grads(kind: str, params: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """d/dgamma of ``strength * sum |gamma|``."""
    return {"1.weight": strength * torch.sign(params["1.weight"].double())}


def _named(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {n[len(prefix) :]: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def _assert_added(
    kind: str,
    added: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    scale: float = 1.0,
    rtol: float = 1e-5,
) -> None:
    """Every parameter got exactly the expected gradient (zero where none is expected)."""
    for name, got in added.items():
        want = expected.get(name, torch.zeros_like(got, dtype=torch.float64)) * scale
        atol = 1e-6 * scale * max(1.0, float(want.abs().max()) if want.numel() else 1.0)
        torch.testing.assert_close(
            got.double(), want, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny models: one thread (the CPU is shared)."""


# ---------------------------------------------------------------------------------------------- plain loop


def _pruner(model: nn.Module, shape: tuple[int, ...], **kw: Any) -> Any:
    import prune_callbacks as pc

    return pc.Pruner(model, torch.randn(*shape), "l2", pruning_ratio=0.5, **kw)


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
def test_group_lasso_gradient_equals_hand_computation(kind: str) -> None:
    from prune_callbacks.pruning.sparsity import GroupLassoRegularizer

    build, shape = MODELS[kind]
    model = build()
    reg = GroupLassoRegularizer(_pruner(model, shape), strength=0.3)
    _zero_grads(model)
    value = reg.apply()
    params = _named(model)
    _assert_added(kind, {n: p.grad for n, p in model.named_parameters()}, hand_lasso_grads(kind, params, 0.3))
    assert float(value) == pytest.approx(0.3 * float(hand_sq_norms(kind, params).sqrt().sum()), rel=1e-5)
    norms = reg.group_norms()
    assert len(norms) == 1 and norms[0] is not None
    torch.testing.assert_close(norms[0].double(), hand_sq_norms(kind, params).sqrt(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
def test_group_norms_equal_the_l2_criterion_summed_over_the_group(kind: str) -> None:
    """The regulariser reads the same entries as the pruning criterion: its squared norms are the
    group-summed, unnormalised L2 magnitude scores."""
    from prune_callbacks.pruning.importance import MagnitudeImportance
    from prune_callbacks.pruning.sparsity import GroupLassoRegularizer

    build, shape = MODELS[kind]
    model = build()
    reg = GroupLassoRegularizer(_pruner(model, shape), strength=1.0)
    crit = MagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    (group,) = reg.groups
    (norms,) = reg.group_norms()
    assert norms is not None
    torch.testing.assert_close(norms.pow(2), crit(group), rtol=1e-5, atol=1e-7)


class MHANet(nn.Module):
    """``nn.MultiheadAttention`` between two linear layers (its embed channels are one group)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.att(h, h, h)
        return self.out(a.mean(1))


@pytest.mark.parametrize("name", ["mha", "llama_gqa", "bert"])
def test_attention_groups_are_regularised_over_every_slice(name: str) -> None:
    """Attention models (heads, grouped-query attention, q/k/v and output projections, norms):
    every group's norms are the L2 criterion's group sums, read through another code path, and
    the penalty's gradient is finite and lands on the groups' parameters only."""
    from prune_callbacks.pruning.importance import MagnitudeImportance
    from prune_callbacks.pruning.sparsity import GroupLassoRegularizer

    if name == "mha":
        torch.manual_seed(0)
        model, x = MHANet(), torch.randn(1, 5, 8)
    else:
        pytest.importorskip("transformers")
        from helpers import hf_models

        build, inputs = hf_models()[name]
        torch.manual_seed(0)
        model, x = build(), inputs()
    import prune_callbacks as pc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = pc.Pruner(model, x, "l2", pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5)
    reg = GroupLassoRegularizer(pruner, strength=0.01)
    crit = MagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    norms = reg.group_norms()
    assert norms and all(n is not None for n in norms)
    for group, n in zip(reg.groups, norms):
        assert n is not None
        torch.testing.assert_close(n.pow(2), crit(group), rtol=1e-4, atol=1e-6)
    _zero_grads(model)
    value = reg.apply()
    assert float(value) == pytest.approx(0.01 * float(sum(n.sum() for n in norms if n is not None)), rel=1e-5)
    # layers (modules, or bare parameters such as a hand-written RMSNorm's weight) of the groups
    in_groups = {id(item.dep.target.module) for g in reg.groups for item in g}
    modules = dict(model.named_modules())
    for p_name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all()
        if float(p.grad.abs().max()) == 0:
            continue
        owners = [p] + [modules[".".join(p_name.split(".")[:i])] for i in range(p_name.count(".") + 1)]
        assert any(id(o) in in_groups for o in owners), f"{p_name} is in no group but got a gradient"


def test_bn_scale_gradient_is_sign_of_gamma_and_needs_a_norm_layer() -> None:
    from prune_callbacks.pruning.sparsity import BNScaleRegularizer

    model = conv_bn()
    reg = BNScaleRegularizer(_pruner(model, MODELS["conv_bn"][1]), strength=0.05)
    _zero_grads(model)
    reg.apply()
    params = _named(model)
    _assert_added(
        "conv_bn", {n: p.grad for n, p in model.named_parameters()}, hand_bn_grads("conv_bn", params, 0.05)
    )
    (norms,) = reg.group_norms()
    assert norms is not None
    torch.testing.assert_close(norms, params["1.weight"].abs())

    other = mlp()
    with pytest.raises(ValueError, match="batch-norm"):
        BNScaleRegularizer(_pruner(other, MODELS["mlp"][1]), strength=0.05).apply()


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
def test_growing_penalty_grows_on_the_lowest_channels_up_to_the_cap(kind: str) -> None:
    from prune_callbacks.pruning.sparsity import GrowingRegularizer

    build, shape = MODELS[kind]
    model = build()
    delta, cap = 0.2, 0.5
    reg = GrowingRegularizer(
        _pruner(model, shape), strength=delta, interval=2, max_strength=cap, pruning_ratio=0.5
    )
    n = len(hand_sq_norms(kind, _named(model)))
    table = torch.zeros(n)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(7):  # growths at steps 0, 2, 4, 6: 0.2, 0.4, 0.5 (cap), 0.5
        params = _named(model)
        if step % 2 == 0:
            table = hand_growing_table(kind, params, table, delta, cap, 0.5)
        _zero_grads(model)
        reg.apply()
        _assert_added(
            kind, {n: p.grad for n, p in model.named_parameters()}, hand_growing_grads(kind, params, table)
        )
        with torch.no_grad():  # move the weights so that the ranking may change between growths
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
        opt.zero_grad()
    assert float(table.max()) == pytest.approx(cap)
    assert int((table > 0).sum()) >= int(n * 0.5 + 0.5)
    assert reg.steps == 7


@pytest.mark.parametrize("method", ["group_lasso", "growing"])
def test_grad_scale_scales_the_added_gradient_like_amp(method: str) -> None:
    """With a GradScaler the penalty is added to the still-scaled gradients with ``grad_scale``;
    after ``unscale_`` they equal those of an unscaled run. Also inside autocast and no_grad."""
    from prune_callbacks.pruning.sparsity import get_regularizer

    x = torch.randn(16, 5)
    y = torch.randint(0, 3, (16,))
    grads = []
    for scaled in (False, True):
        model = mlp()
        reg = get_regularizer(method, _pruner(model, (1, 5)), 0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = F.cross_entropy(model(x), y)
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            scaler.scale(loss).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
                reg.apply(grad_scale=scaler.get_scale())
            scaler.unscale_(opt)
        else:
            loss.backward()
            reg.apply()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_missing_and_frozen_gradients() -> None:
    """A parameter without ``.grad`` gets the penalty's gradient; a frozen one is left alone."""
    from prune_callbacks.pruning.sparsity import GroupLassoRegularizer

    model = mlp()
    reg = GroupLassoRegularizer(_pruner(model, (1, 5)), strength=0.1)
    model[0].bias.requires_grad_(False)
    reg.apply()
    expected = hand_lasso_grads("mlp", _named(model), 0.1)
    assert model[0].bias.grad is None
    torch.testing.assert_close(model[0].weight.grad.double(), expected["0.weight"])
    torch.testing.assert_close(model[2].weight.grad.double(), expected["2.weight"])
    assert model[2].bias.grad is None


def test_groups_follow_the_pruner_and_a_stale_list_is_refused() -> None:
    from prune_callbacks.pruning.sparsity import GroupLassoRegularizer

    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    pruner = _pruner(model, (1, 5))
    follows = GroupLassoRegularizer(pruner, strength=0.1)
    fixed = GroupLassoRegularizer(list(pruner.groups), strength=0.1)
    late = GroupLassoRegularizer(list(pruner.groups), strength=0.1)  # first used after the prune
    fixed.apply()
    assert [len(n) for n in follows.group_norms() if n is not None] == [8, 8]
    assert follows.group_names == ["0|out", "2|out"]
    pruner.step()
    assert [len(n) for n in follows.group_norms() if n is not None] == [4, 4]
    _zero_grads(model)
    follows.apply()
    for stale in (fixed, late):
        with pytest.raises(RuntimeError, match="pruned since its groups were built"):
            stale.apply()
        with pytest.raises(RuntimeError, match="pruned since"):  # the list itself stays the old one
            stale.group_norms()


def test_dependency_graph_source_and_sparsity_report() -> None:
    import prune_callbacks as pc
    from prune_callbacks.pruning.sparsity import GroupLassoRegularizer

    model = mlp()
    with torch.no_grad():
        model[0].weight[:3] = 0.0
        model[0].bias[:3] = 0.0
        model[2].weight[:, :3] = 0.0
    dg = pc.DependencyGraph().build_dependency(model, torch.randn(1, 5))
    reg = GroupLassoRegularizer(dg, strength=0.1)
    report = reg.sparsity_report(threshold=1e-6)
    assert (report.groups, report.channels, report.channels_below, report.groups_below) == (1, 8, 3, 1)
    assert report.below_threshold == pytest.approx(3 / 8) and report.min_norm == 0.0
    metrics = report.metrics()
    assert metrics["prune/sparsity/below_threshold"] == pytest.approx(3 / 8)
    # a channel that is exactly zero gets no gradient (the subgradient 0), not a NaN
    _zero_grads(model)
    reg.apply()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert float(model[0].weight.grad[:3].abs().max()) == 0.0
    assert reg.sparsity_report().penalty is not None


def test_regularizer_state_round_trips_through_weights_only_files(tmp_path: Path) -> None:
    from prune_callbacks.pruning.sparsity import GrowingRegularizer

    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    kw = dict(strength=0.1, interval=2, max_strength=0.35, pruning_ratio=0.5)
    reg = GrowingRegularizer(_pruner(model, (1, 5)), **kw)
    for _ in range(3):
        _zero_grads(model)
        reg.apply()
    torch.save(reg.state_dict(), tmp_path / "reg.pt")
    twin = copy.deepcopy(model)
    other = GrowingRegularizer(_pruner(twin, (1, 5)), **kw)
    other.load_state_dict(torch.load(tmp_path / "reg.pt", weights_only=True))
    assert other.steps == 3
    for _ in range(2):  # the next growth (step 4) continues from the saved penalties
        _zero_grads(model)
        _zero_grads(twin)
        reg.apply()
        other.apply()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=n: f"{n}: {m}")
    assert reg.penalties.keys() == other.penalties.keys()
    for key, table in reg.penalties.items():
        torch.testing.assert_close(other.penalties[key], table)
    assert max(float(t.max()) for t in reg.penalties.values()) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="growing"):
        from prune_callbacks.pruning.sparsity import GroupLassoRegularizer

        GroupLassoRegularizer(_pruner(twin, (1, 5)), strength=0.1).load_state_dict(reg.state_dict())


def test_bad_arguments_name_the_problem() -> None:
    from prune_callbacks.pruning.sparsity import GrowingRegularizer, get_regularizer

    model = mlp()
    with pytest.raises(ValueError, match="unknown sparse training method 'l0'"):
        get_regularizer("l0", [], 0.1)
    with pytest.raises(ValueError, match="strength must be a positive"):
        get_regularizer("group_lasso", [], -1.0)
    with pytest.raises(ValueError, match="apply to 'growing'"):
        get_regularizer("group_lasso", [], 0.1, interval=3)
    with pytest.raises(ValueError, match="pruning_ratio"):
        GrowingRegularizer([], 0.1, pruning_ratio=1.0)
    assert type(get_regularizer("GReg", _pruner(model, (1, 5)), 0.1)).__name__ == "GrowingRegularizer"


# ---------------------------------------------------------------------------------------------- README


def _readme_snippet() -> str:
    """The first python block of README.md's "### Sparse training" section, as written."""
    match = re.search(
        rf"^### {README_SECTION}\b.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S | re.M
    )
    assert match, "README.md has no Sparse training section with a python snippet"
    return match.group(1)


EXPORTS = (
    "GroupLassoRegularizer",
    "BNScaleRegularizer",
    "GrowingRegularizer",
    "get_regularizer",
    "SparseTraining",
)


def test_readme_snippet_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    import prune_callbacks as pc
    from prune_callbacks.integrations.lightning import sparse
    from prune_callbacks.pruning import sparsity

    for name in EXPORTS:  # until the top-level exports exist (test_top_level_exports checks them)
        if not hasattr(pc, name):
            monkeypatch.setattr(
                pc, name, getattr(sparsity, name, None) or getattr(sparse, name), raising=False
            )
    namespace: dict[str, Any] = {"__name__": "readme_sparse"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_readme_snippet(), "README.md#sparse-training", "exec"), namespace)
    report = namespace["report"]
    assert report.below_threshold >= 0.5, report
    assert namespace["max_diff"] < 1e-3
    assert namespace["model"][0].out_features == 32


def test_top_level_exports() -> None:
    import prune_callbacks as pc

    missing = [n for n in EXPORTS if not hasattr(pc, n)]
    assert not missing, f"prune_callbacks does not export {missing}"


# ---------------------------------------------------------------------------------------------- Lightning


def _lightning() -> Any:
    import lightning.pytorch as pl

    return pl


class _Lit:
    """Builds a LightningModule around a model (a factory so that Lightning is imported lazily)."""

    @staticmethod
    def make(model: nn.Module, example: torch.Tensor | None, lr: float = 0.05, momentum: float = 0.0) -> Any:
        pl = _lightning()

        class Lit(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                if example is not None:
                    self.example_input_array = example

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model(x)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                x, y = batch
                out = self(x).float()
                return F.cross_entropy(out.mean((2, 3)) if out.dim() == 4 else out, y)

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)

        return Lit()


def _loader(shape: tuple[int, ...], classes: int, n: int = 32, batch: int = 8, seed: int = 1) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape[1:], generator=gen)
    teacher = torch.randn(x[0].numel(), classes, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(1)  # learnable labels
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(root: Path, callbacks: list, **kw: Any) -> Any:
    pl = _lightning()
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        max_epochs=1,
    )
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def _grad_probe() -> Any:
    pl = _lightning()

    class GradProbe(pl.Callback):
        """Copies the gradients (and weights) it sees in ``on_before_optimizer_step``."""

        def __init__(self) -> None:
            self.grads: list[dict[str, torch.Tensor]] = []
            self.params: list[dict[str, torch.Tensor]] = []

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()})
            self.params.append(_named(pl_module.model))

    return GradProbe()


CASES = [
    ("group_lasso", "mlp"),
    ("group_lasso", "conv_bn"),
    ("bn_scale", "conv_bn"),
    ("growing", "mlp"),
    ("growing", "conv_bn"),
]


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_lightning_adds_the_hand_gradient_under_bf16_and_accumulation(
    method: str, kind: str, tmp_path: Path
) -> None:
    """Through ``Trainer.fit(precision="bf16-mixed", accumulate_grad_batches=2)``: once per
    optimizer step (2 steps of 2 micro-batches), the gradient changes by the hand-computed one."""
    from prune_callbacks.integrations.lightning.sparse import SparseTraining

    build, shape = MODELS[kind]
    strength = 0.05
    extra = dict(interval=1, max_strength=0.08, pruning_ratio=0.5) if method == "growing" else {}
    sparse = SparseTraining(method, strength=strength, **extra)
    before, after = _grad_probe(), _grad_probe()
    module = _Lit.make(build(), torch.zeros(*shape))
    trainer = _trainer(
        tmp_path,
        [before, sparse, after],
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        limit_train_batches=4,
    )
    trainer.fit(module, _loader(shape, 3 if kind == "mlp" else 4))
    assert len(before.grads) == 2 and sparse.regularizer.steps == 2
    table = torch.zeros(8 if kind == "mlp" else 6)
    for i in range(2):
        params = before.params[i]
        if method == "group_lasso":
            expected = hand_lasso_grads(kind, params, strength)
        elif method == "bn_scale":
            expected = hand_bn_grads(kind, params, strength)
        else:
            table = hand_growing_table(kind, params, table, strength, 0.08, 0.5)
            expected = hand_growing_grads(kind, params, table)
        added = {n: after.grads[i][n] - g for n, g in before.grads[i].items()}
        assert any(float(before.grads[i][n].abs().max()) > 0 for n in added), "the loss must have a gradient"
        _assert_added(kind, added, expected, rtol=1e-4)


def _norm_probe(sparse: Any, epoch: int) -> Any:
    pl = _lightning()

    class NormProbe(pl.Callback):
        """Listed before StructuredPruning: the group norms right before the epoch's prune."""

        def __init__(self) -> None:
            self.norms: dict[str, torch.Tensor] = {}

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if trainer.current_epoch == epoch and batch_idx + 1 == trainer.num_training_batches:
                names = sparse.regularizer.group_names
                self.norms = dict(zip(names, sparse.regularizer.group_norms()))
                self.outputs_before = pl_module(self.x).detach().clone()

    return NormProbe()


def _removed(history: list[dict[str, Any]], target: str, function: str) -> set[int]:
    """Channels removed from ``target`` by ``function`` according to the pruning history."""
    out: set[int] = set()
    for record in history:
        for item in record["items"]:
            if item["target"] == target and item["function"] == function:
                out.update(item["idxs"])
    return out


def _deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


#: (method, criterion, strength, growing options, learning rate, epochs): SGD with momentum 0.9 keeps
#: regularised channels oscillating around zero (amplitude about lr * strength / (1 - 0.9)), so
#: "zero" is a norm below 0.1 here, against 0.5 to 2 for the channels that stay. Growing
#: regularisation goes with a magnitude criterion (as in the GReg paper): near a stationary point the
#: loss pulls its penalised channels back (Taylor score reg * ||v||^2 > 0) while the free channels'
#: expected gradient is about zero (Taylor score about 0), so Taylor would keep the penalised ones.
#: Under group lasso every channel's Taylor score is about strength * ||v||, which ranks like the norm.
ZERO_CASES = [
    ("growing", "l2", 0.1, dict(interval=1, max_strength=5.0), 0.2, 4),
    ("group_lasso", "l2", 0.03, {}, 0.1, 8),
    ("group_lasso", "taylor", 0.03, {}, 0.1, 8),
]


@pytest.mark.parametrize(("method", "importance", "strength", "extra", "lr", "epochs"), ZERO_CASES)
def test_channels_driven_to_zero_are_the_ones_pruned(
    method: str, importance: str, strength: float, extra: dict, lr: float, epochs: int, tmp_path: Path
) -> None:
    """Sparse training, then ``StructuredPruning`` (ratio 0.5) after the last epoch: the removed
    channels are those whose group norm sparse training drove below the threshold, and removing
    them hardly changes the outputs."""
    from prune_callbacks.integrations.lightning.callback import StructuredPruning
    from prune_callbacks.integrations.lightning.sparse import SparseTraining

    threshold, last = 0.1, epochs - 1
    prune = StructuredPruning(importance, pruning_ratio=0.5, epochs=[last], verbose=False)
    sparse = SparseTraining(method, strength=strength, threshold=threshold, **extra)
    probe = _norm_probe(sparse, epoch=last)
    loader = _loader((1, 10), 4, n=64)
    probe.x = next(iter(loader))[0]
    module = _Lit.make(_deep_mlp(), torch.zeros(1, 10), lr=lr, momentum=0.9)
    _trainer(tmp_path, [probe, prune, sparse], max_epochs=epochs).fit(module, loader)

    assert sparse.end_epoch is None and sparse.active(last) and not sparse.active(last + 1)
    history = prune.history
    for layer in ("model.0", "model.2"):
        norms = probe.norms[f"{layer}|out"]
        assert norms is not None
        below = {int(i) for i in torch.nonzero(norms < threshold).flatten()}
        removed = _removed(history, layer, "prune_linear_out_channels")
        assert len(removed) == 16, removed
        if method == "growing":  # exactly the chosen half is driven to zero
            assert below == removed, (sorted(below), sorted(removed), norms)
            kept = [i for i in range(32) if i not in removed]
            assert float(norms[kept].min()) > 3 * threshold
        else:  # group lasso zeroes as many as it can afford: at least half here
            assert len(below) >= 16 and removed <= below, (sorted(below), sorted(removed))
    after = module(probe.x).detach()
    scale = float(probe.outputs_before.abs().max())
    assert float((after - probe.outputs_before).abs().max()) < 0.01 * scale


def test_metrics_reach_a_csv_logger_and_the_window_is_kept(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from prune_callbacks.integrations.lightning.sparse import SparseTraining

    sparse = SparseTraining("group_lasso", strength=0.05, start_epoch=1, end_epoch=2, threshold=1e-2)
    logger = CSVLogger(str(tmp_path), name="csv")
    module = _Lit.make(_deep_mlp(), torch.zeros(1, 10), lr=0.2, momentum=0.9)
    _trainer(tmp_path, [sparse], max_epochs=4, logger=logger).fit(module, _loader((1, 10), 4, n=32))
    assert sparse.regularizer.steps == 8, "4 steps per epoch, regularised in epochs 1 and 2 only"
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("prune/sparsity/below_threshold")]
    assert len(rows) == 4, rows
    for key in ("mean_group_norm", "min_group_norm", "max_group_norm", "groups_below_threshold", "active"):
        assert all(r[f"prune/sparsity/{key}"] != "" for r in rows), key
    assert [float(r["prune/sparsity/active"]) for r in rows] == [0.0, 1.0, 1.0, 0.0]
    assert [bool(r.get("prune/sparsity/penalty")) for r in rows] == [False, True, True, False]
    for r in rows:
        assert float(r["prune/sparsity/min_group_norm"]) <= float(r["prune/sparsity/mean_group_norm"])
        assert 0.0 <= float(r["prune/sparsity/below_threshold"]) <= 1.0
    # the penalty shrank the groups while it was on: epoch 2's mean norm is below epoch 0's
    mean = [float(r["prune/sparsity/mean_group_norm"]) for r in rows]
    assert mean[2] < mean[0]


def test_callback_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """The growing penalties and the step counter go into the checkpoint (loadable with
    ``weights_only=True``) and a resumed fit continues from them."""
    from prune_callbacks.integrations.lightning.callback import StructuredPruning
    from prune_callbacks.integrations.lightning.sparse import SparseTraining

    def run(max_epochs: int, ckpt: str | None) -> tuple[Any, Any, dict[str, Any]]:
        prune = StructuredPruning("l2", pruning_ratio=0.5, epochs=[3], verbose=False)
        sparse = SparseTraining("growing", strength=0.01, interval=1, max_strength=1.0)
        pl = _lightning()
        seen: dict[str, Any] = {}

        class AtStart(pl.Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                seen["steps"] = sparse.regularizer.steps
                seen["penalties"] = {k: v.clone() for k, v in sparse.regularizer.penalties.items()}

        module = _Lit.make(_deep_mlp(), torch.zeros(1, 10))
        trainer = _trainer(tmp_path, [prune, sparse, AtStart()], max_epochs=max_epochs)
        trainer.fit(module, _loader((1, 10), 4), ckpt_path=ckpt)
        return trainer, sparse, seen

    trainer, first, _ = run(2, None)
    path = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"][first.state_key]
    assert saved["method"] == "growing" and saved["regularizer"]["steps"] == 8
    assert set(saved["regularizer"]["penalties"]) == {"model.0|out", "model.2|out"}
    _, resumed, seen = run(3, path)
    assert seen["steps"] == 8
    for key, table in first.regularizer.penalties.items():
        torch.testing.assert_close(seen["penalties"][key], table)
    assert resumed.regularizer.steps == 12
    assert max(float(t.max()) for t in resumed.regularizer.penalties.values()) > max(
        float(t.max()) for t in first.regularizer.penalties.values()
    )


def test_warns_when_listed_before_a_gradient_criterion_and_checks_arguments(tmp_path: Path) -> None:
    from prune_callbacks.integrations.lightning.callback import StructuredPruning
    from prune_callbacks.integrations.lightning.sparse import SparseTraining

    sparse = SparseTraining("group_lasso", strength=0.01)
    prune = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0], verbose=False)
    module = _Lit.make(_deep_mlp(), torch.zeros(1, 10))
    with pytest.warns(UserWarning, match="list SparseTraining after"):
        _trainer(tmp_path, [sparse, prune], limit_train_batches=2).fit(module, _loader((1, 10), 4))
    with pytest.raises(ValueError, match="pruning_ratio"):
        SparseTraining("group_lasso", pruning_ratio=0.5)
    with pytest.raises(ValueError, match="end_epoch"):
        SparseTraining(start_epoch=3, end_epoch=1)
    growing = SparseTraining("growing")
    two = [StructuredPruning("l2", target_speedup=2.0, verbose=False)]
    with pytest.raises(ValueError, match="pass pruning_ratio="):
        _trainer(tmp_path, [*two, growing]).fit(
            _Lit.make(_deep_mlp(), torch.zeros(1, 10)), _loader((1, 10), 4)
        )


def test_without_a_pruning_callback_it_traces_from_the_first_batch(tmp_path: Path) -> None:
    from prune_callbacks.integrations.lightning.sparse import SparseTraining

    sparse = SparseTraining("group_lasso", strength=0.01, ignored_layers=["model.2"])
    module = _Lit.make(_deep_mlp(), None)
    _trainer(tmp_path, [sparse], limit_train_batches=2).fit(module, _loader((1, 10), 4))
    assert sparse.regularizer.group_names == ["model.0|out"]
    assert sparse.regularizer.steps == 2


@pytest.mark.slow
def test_wandb_gets_a_histogram_and_a_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from lightning.pytorch.loggers import WandbLogger

    from prune_callbacks.integrations.lightning.sparse import SparseTraining

    logged: list[dict[str, Any]] = []
    logger = WandbLogger(project="sparse-test", save_dir=str(tmp_path), offline=True)
    sparse = SparseTraining("group_lasso", strength=0.01)
    try:
        run = logger.experiment
        original = run.log
        monkeypatch.setattr(
            run, "log", lambda data, *a, **k: (logged.append(dict(data)), original(data, *a, **k))
        )
        _trainer(tmp_path, [sparse], max_epochs=2, logger=logger).fit(
            _Lit.make(_deep_mlp(), torch.zeros(1, 10)), _loader((1, 10), 4)
        )
    finally:
        wandb.finish()
        wandb.teardown()
    hist = [d for d in logged if "prune/sparsity/group_norms" in d]
    assert len(hist) == 2
    assert isinstance(hist[0]["prune/sparsity/group_norms"], wandb.Histogram)
    table = hist[-1]["prune/sparsity/groups"]
    assert [row[0] for row in table.data] == ["model.0|out", "model.2|out"]
    assert any("prune/sparsity/below_threshold" in d for d in logged)


# ---------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_add_the_same_penalty_and_stay_equal(tmp_path: Path) -> None:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            NODE_RANK="0",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert a["steps"] == b["steps"] == 8, "4 steps per epoch, regularised until the prune after epoch 1"
    assert a["history"] == b["history"] and a["history"], "both ranks prune the same channels"
    for k, v in a["params"].items():
        assert torch.equal(v, b["params"][k]), f"{k} differs between ranks"
    for i, (ga, gb) in enumerate(zip(a["added"], b["added"])):
        for k, v in ga.items():
            assert torch.equal(v, gb[k]), f"penalty gradient of {k} differs at step {i}"
    assert any(float(v.abs().max()) > 0 for g in a["added"] for v in g.values())
    assert not torch.equal(a["first_batch"], b["first_batch"]), "the ranks must see different data"


def _ddp_worker(out_dir: str) -> None:
    import lightning.pytorch as pl

    from prune_callbacks.integrations.lightning.callback import StructuredPruning
    from prune_callbacks.integrations.lightning.sparse import SparseTraining

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    before, after = _grad_probe(), _grad_probe()
    prune = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[1], verbose=False)
    sparse = SparseTraining("group_lasso", strength=0.02)
    module = _Lit.make(conv_bn(), torch.zeros(1, 3, 5, 5), lr=0.1, momentum=0.9)
    first: list[torch.Tensor] = []

    class FirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if not first:
                first.append(batch[0].clone())

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=1,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
        callbacks=[FirstBatch(), before, prune, sparse, after],
    )
    trainer.fit(module, _loader((1, 3, 5, 5), 4, n=64, batch=8))
    added = [
        {n: after.grads[i][n] - g for n, g in before.grads[i].items() if after.grads[i][n].shape == g.shape}
        for i in range(len(before.grads))
    ]
    torch.save(
        {
            "steps": sparse.regularizer.steps,
            "history": prune.history,
            "params": {k: v.detach().clone() for k, v in module.named_parameters()},
            "added": added,
            "first_batch": first[0],
        },
        Path(out_dir) / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
