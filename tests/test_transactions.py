"""All or nothing (issue 15, transactions): a fault or an interrupt at any point of a group prune,
a ``Pruner.step()`` or a history replay leaves the model, its history, the graph and the
optimizer state exactly as they were, and training goes on.

Faults are injected by making the k-th call of a pruning function raise, before or after it
did its work (so a layer may be half-modified when the fault comes), for every k a clean run
makes; also in the verifying forward and in the history bookkeeping.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prune_callbacks import (
    DependencyGraph,
    Pruner,
    apply_pruning_history,
    get_pruning_history,
    prune_optimizer_state,
    track_parameter_updates,
)
from prune_callbacks.graph.verify import ForwardCheck
from prune_callbacks.layers import PruningFunction, function_by_name


class FaultNet(nn.Module):
    """Convs with batch norms, a split whose sizes live in ``self.c``, a layer scale viewed
    through ``self.shape``: a prune changes parameters, buffers and attributes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = 8
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.m = nn.Conv2d(8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(24, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.shape = (16, 1, 1)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.stem(x)))
        a, b = y.split((self.c, self.c), 1)
        y = F.relu(self.bn2(self.cv2(torch.cat([a, b, self.m(b)], 1))))
        y = y * self.scale.view(self.shape)
        return self.fc(y.mean((2, 3)))


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 3])


class Injected(Exception):
    """The fault injected (an ``Exception``; ``KeyboardInterrupt`` is injected too)."""


def trained(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A FaultNet after one training step: it has grads and optimizer state."""
    model = FaultNet()
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if kind == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    train_step(model, opt)
    model.zero_grad(set_to_none=False)
    F.cross_entropy(model(X), Y).backward()  # grads present when the prune comes
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    F.cross_entropy(model(X), Y).backward()
    opt.step()


def state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything a prune may touch, copied: parameters (with ids), grads, buffers, plain
    attributes of every module, the pruning history and the optimizer state."""
    return {
        "params": [
            (n, id(p), p.detach().clone(), None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        ],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "attrs": {
            n: {
                k: copy.copy(v)
                for k, v in vars(m).items()
                if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor))
            }
            for n, m in model.named_modules()
        },
        "history": copy.deepcopy(get_pruning_history(model)),
        "opt": copy.deepcopy(opt.state_dict()),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bitwise equality of two :func:`state` copies."""
    assert [(n, i) for n, i, _, _ in before["params"]] == [(n, i) for n, i, _, _ in after["params"]]
    for (n, _, v0, g0), (_, _, v1, g1) in zip(before["params"], after["params"]):
        assert v0.shape == v1.shape and torch.equal(v0, v1), n
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1)), f"grad of {n}"
    assert before["buffers"].keys() == after["buffers"].keys()
    assert all(torch.equal(before["buffers"][k], after["buffers"][k]) for k in before["buffers"])
    assert before["attrs"] == after["attrs"]
    assert before["history"] == after["history"]
    o0, o1 = before["opt"], after["opt"]
    assert o0["param_groups"] == o1["param_groups"] and o0["state"].keys() == o1["state"].keys()
    for k in o0["state"]:
        for name, v in o0["state"][k].items():
            w = o1["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, name)


@contextmanager
def fault_at(k: int, exc: type[BaseException], after: bool) -> Iterator[list[int]]:
    """Make the ``k``-th call of any pruning function raise ``exc`` (before it runs, or after
    it did its work); yields a one-element list that counts the calls made."""
    real = PruningFunction.__call__
    calls = [0]

    def faulty(self: PruningFunction, module: Any, idxs: Any, *args: Any, **kwargs: Any) -> Any:
        n = calls[0]
        calls[0] += 1
        if n == k and not after:
            raise exc("injected")
        out = real(self, module, idxs, *args, **kwargs)
        if n == k and after:
            raise exc("injected")
        return out

    PruningFunction.__call__ = faulty  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        PruningFunction.__call__ = real  # type: ignore[method-assign]


def count_calls(run: Callable[[], None]) -> int:
    with fault_at(-1, Injected, False) as calls:
        run()
    return calls[0]


def edge_shapes(dg: DependencyGraph) -> list[tuple[int, ...]]:
    return [e.shape for n in dg.nodes for e in n.out_edges]


def check_training_goes_on(model: nn.Module, opt: torch.optim.Optimizer, updates: list) -> None:
    prune_optimizer_state(opt, updates)
    train_step(model, opt)
    assert torch.isfinite(model(X)).all()


FAULTS = [(Injected, False), (Injected, True), (KeyboardInterrupt, False), (KeyboardInterrupt, True)]
FAULT_IDS = ["error-before", "error-after", "interrupt-before", "interrupt-after"]


# ---------------------------------------------------------------------------------------------
# A group prune
# ---------------------------------------------------------------------------------------------


def _group(dg: DependencyGraph, model: FaultNet) -> Any:
    return dg.get_pruning_group(model.stem, function_by_name("prune_conv_out_channels"), [0, 1, 8, 9])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize(("exc", "after"), FAULTS, ids=FAULT_IDS)
def test_fault_at_every_item_of_a_group_prune(kind: str, exc: type[BaseException], after: bool) -> None:
    def clean() -> None:
        m, _ = trained(kind)
        _group(DependencyGraph().build_dependency(m, X), m).prune()

    n_calls = count_calls(clean)
    assert n_calls >= 4
    for k in range(n_calls):
        model, opt = trained(kind)
        dg = DependencyGraph().build_dependency(model, X)
        group = _group(dg, model)
        before, shapes = state(model, opt), edge_shapes(dg)
        with (
            track_parameter_updates() as updates,
            pytest.raises((exc, RuntimeError)),
            fault_at(k, exc, after),
        ):
            group.prune()
        assert_same(before, state(model, opt))
        assert edge_shapes(dg) == shapes and not dg.pruning_history and updates == []
        check_training_goes_on(model, opt, updates)
        group.prune()  # the same group prunes cleanly afterwards
        assert model(X).shape == (4, 4)


@pytest.mark.parametrize("stage", ["verification", "history record"])
def test_interrupt_in_verification_or_bookkeeping_restores(stage: str, monkeypatch) -> None:
    model, opt = trained("sgd")
    dg = DependencyGraph().build_dependency(model, X)
    before, shapes = state(model, opt), edge_shapes(dg)

    def interrupt(*_args: Any) -> Any:
        raise KeyboardInterrupt

    if stage == "verification":
        monkeypatch.setattr(ForwardCheck, "problem", interrupt)
    else:
        monkeypatch.setattr(DependencyGraph, "history_record", interrupt)
    with track_parameter_updates() as updates, pytest.raises(KeyboardInterrupt):
        _group(dg, model).prune()
    assert_same(before, state(model, opt))
    assert edge_shapes(dg) == shapes and updates == []
    check_training_goes_on(model, opt, updates)


# ---------------------------------------------------------------------------------------------
# A Pruner step
# ---------------------------------------------------------------------------------------------


def _pruner(model: nn.Module, fast: bool) -> Pruner:
    return Pruner(model, X, "l2", pruning_ratio=0.5, fast_subsets=fast)


@pytest.mark.parametrize("fast", [True, False], ids=["merged", "group-by-group"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize(("exc", "after"), FAULTS, ids=FAULT_IDS)
def test_fault_at_every_group_of_a_step(fast: bool, kind: str, exc: type[BaseException], after: bool) -> None:
    def clean() -> None:
        m, _ = trained(kind)
        _pruner(m, fast).step()

    n_calls = count_calls(clean)
    assert n_calls >= 4
    for k in range(n_calls):
        model, opt = trained(kind)
        pruner = _pruner(model, fast)
        before, shapes = state(model, opt), edge_shapes(pruner.DG)
        raised = False
        with warnings.catch_warnings(), track_parameter_updates() as updates:
            warnings.simplefilter("ignore")
            try:
                with fault_at(k, exc, after):
                    pruner.step()
            except (KeyboardInterrupt, Injected):
                raised = True
        if exc is KeyboardInterrupt:
            assert raised, "an interrupt must never be swallowed"
        if raised:
            assert_same(before, state(model, opt))
            assert edge_shapes(pruner.DG) == shapes and updates == [] and pruner.current_step == 0
        else:
            # an error in one group: that group is skipped with a warning, the rest is pruned,
            # and what was pruned is consistent (the history replays to the same structure)
            assert pruner.current_step == 1
            fresh = apply_pruning_history(FaultNet(), get_pruning_history(model))
            assert {n: p.shape for n, p in fresh.named_parameters()} == {
                n: p.shape for n, p in model.named_parameters()
            }
        check_training_goes_on(model, opt, updates)
        if raised:
            pruner.step()  # the step can be taken again
            assert model(X).shape == (4, 4)


# ---------------------------------------------------------------------------------------------
# A history replay
# ---------------------------------------------------------------------------------------------


def _history(steps: int = 2) -> list[dict[str, Any]]:
    model = FaultNet()
    pruner = Pruner(model, X, "l2", pruning_ratio=0.5, iterative_steps=steps, fast_subsets=False)
    for _ in range(steps):
        pruner.step()
    return copy.deepcopy(get_pruning_history(model))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize(("exc", "after"), FAULTS, ids=FAULT_IDS)
def test_fault_at_every_record_of_a_replay(kind: str, exc: type[BaseException], after: bool) -> None:
    history = _history()
    assert len(history) >= 3

    def clean() -> None:
        apply_pruning_history(trained(kind)[0], history)

    n_calls = count_calls(clean)
    for k in range(n_calls):
        model, opt = trained(kind)
        before = state(model, opt)
        with track_parameter_updates() as updates, pytest.raises((exc, ValueError)), fault_at(k, exc, after):
            apply_pruning_history(model, history)
        assert_same(before, state(model, opt))
        assert updates == []
        check_training_goes_on(model, opt, updates)
    model, opt = trained(kind)
    with track_parameter_updates() as updates:
        apply_pruning_history(model, history)
    check_training_goes_on(model, opt, updates)


def test_a_module_snapshot_keeps_the_config_it_holds() -> None:
    """A prune may update sizes on a config shared by modules (``module.config``); rolling back a
    step or a replay puts it back with the model."""
    from types import SimpleNamespace

    from prune_callbacks.pruning.history import ModelTransaction

    config = SimpleNamespace(num_heads=4, head_dim=8)
    model = FaultNet()
    model.m.config = config
    with pytest.raises(KeyboardInterrupt), ModelTransaction(model):
        config.num_heads = 2
        del config.head_dim
        config.extra = 1
        raise KeyboardInterrupt
    assert vars(config) == {"num_heads": 4, "head_dim": 8}
