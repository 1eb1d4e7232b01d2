"""Tests for slicing optimizer state along with a structural prune."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import prune_callbacks as pc
from prune_callbacks.pruning.optim_state import check_optimizer_state, prune_optimizer_state


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=gen)
        y = torch.randint(0, 4, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _prune_conv1(model: SmallNet, idxs: list[int]) -> list:
    dg = pc.DependencyGraph().build_dependency(model, torch.randn(1, 3, 6, 6))
    group = dg.get_pruning_group(model.conv1, pc.prune_conv_out_channels, idxs)
    with pc.track_parameter_updates() as log:
        group.prune()
    return log


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "adam_foreach_off": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
}


@pytest.mark.parametrize("make_opt", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_state_of_kept_channels_is_preserved(make_opt) -> None:
    torch.manual_seed(0)
    model = SmallNet()
    opt = make_opt(model.parameters())
    _train_steps(model, opt)
    before = {
        name: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for name, p in model.named_parameters()
    }
    removed = [1, 4, 6]
    kept = [i for i in range(8) if i not in removed]
    log = _prune_conv1(model, removed)
    changed = prune_optimizer_state(opt, log)
    assert changed > 0
    expected_slices = {
        "conv1.weight": lambda t: t[kept],
        "conv1.bias": lambda t: t[kept],
        "bn1.weight": lambda t: t[kept],
        "bn1.bias": lambda t: t[kept],
        "conv2.weight": lambda t: t[:, kept],
    }
    for name, p in model.named_parameters():
        state = opt.state[p]
        for key, old in before[name].items():
            new = state[key]
            if old.dim() == 0:
                assert torch.equal(new, old), f"{name}.{key}: scalar state must not change"
                continue
            assert new.shape == p.shape, f"{name}.{key}: state shape {new.shape} != param {p.shape}"
            slicer = expected_slices.get(name, lambda t: t)
            assert torch.equal(new, slicer(old)), f"{name}.{key} of kept channels changed"
    # The same optimizer object takes the next step on the pruned model.
    _train_steps(model, opt, steps=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_two_sided_parameter_gets_both_updates_in_order() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train_steps(model, opt)
    w_state = opt.state[model.conv2.weight]["exp_avg"].clone()
    log = _prune_conv1(model, [0, 7])
    dg = pc.DependencyGraph().build_dependency(model, torch.randn(1, 3, 6, 6))
    group = dg.get_pruning_group(model.conv2, pc.prune_conv_out_channels, [2])
    with pc.track_parameter_updates() as log2:
        group.prune()
    prune_optimizer_state([opt], log + log2)
    expected = w_state[[0, 1, 3, 4, 5]][:, 1:7]
    assert torch.equal(opt.state[model.conv2.weight]["exp_avg"], expected)
    _train_steps(model, opt, steps=1)


def test_parameters_without_state_and_non_tensor_entries_are_skipped() -> None:
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    log = _prune_conv1(model, [0])
    assert prune_optimizer_state(opt, log) == 0
    opt.state[model.conv1.weight]["note"] = "not a tensor"
    assert prune_optimizer_state(opt, log) == 0
    assert opt.state[model.conv1.weight]["note"] == "not a tensor"


def test_factored_state_is_refused_before_pruning() -> None:
    model = SmallNet()
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    _train_steps(model, opt, steps=1)
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(ValueError, match="only state shaped like its parameter"):
        check_optimizer_state(opt)
    assert shapes == [tuple(p.shape) for p in model.parameters()]
    # Restricting the check to 1-D parameters (whose Adafactor state is elementwise) passes.
    check_optimizer_state(opt, [p for p in model.parameters() if p.dim() == 1])


def test_elementwise_state_passes_the_check() -> None:
    model = SmallNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_steps(model, opt, steps=1)
    check_optimizer_state([opt])
