"""Property test: pruning a random valid group of a random CNN gives exactly the output of the
original model with the same channels zeroed at every layer they touch."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_callbacks import DependencyGraph
from randnet import random_cnn, zero_channels


def _coupled(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.BatchNorm2d) or (
        isinstance(module, torch.nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
    )


def _size(module: torch.nn.Module, side: str) -> int:
    if isinstance(module, torch.nn.BatchNorm2d):
        return module.num_features
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels if side == "out" else module.in_channels
    return module.out_features if side == "out" else module.in_features


def _module_by_name(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(net=random_cnn(), data=st.data())
def test_pruned_model_equals_masked_model(net, data):
    model, x = net
    head = list(model.layers.values())[-1]
    masked = copy.deepcopy(model)
    masked_modules = dict(masked.named_modules())
    names = _module_by_name(model)
    dg = DependencyGraph().build_dependency(model, x, ignored_layers=[head])
    original: dict[tuple[str, str], list[int]] = {}  # current index -> original index
    rounds = data.draw(st.integers(1, 2))
    pruned_any = False
    for _ in range(rounds):
        groups = dg.get_all_groups()
        if not groups:
            break
        group = data.draw(st.sampled_from(groups))
        n = len(group.root.idxs)
        if n < 2:
            continue
        idxs = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True))
        root = group.root.dep
        try:
            sub = dg.get_pruning_group(root.target.module, root.handler, idxs)
        except ValueError as e:
            # The closure of these channels reaches every channel of some layer: refused with a
            # clear error before anything changed.
            assert "cannot prune" in str(e)
            continue
        assert set(idxs) <= set(sub.root.idxs)
        if not dg.check_pruning_group(sub):
            before = [p.detach().clone() for p in model.parameters()]
            try:
                sub.prune()
            except ValueError:
                pass
            else:
                raise AssertionError("an invalid group was pruned")
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            continue
        for item in sub:
            target = item.dep.target.module
            side = item.dep.handler.side
            key = (names[target], "coupled" if _coupled(target) else side)
            n_now = _size(target, side)
            kept = original.setdefault(key, list(range(n_now)))
            removed = [kept[i] for i in item.idxs]
            original[key] = [c for c in kept if c not in set(removed)]
            zero_channels(masked_modules[names[target]], side, removed)
        sub.prune()
        pruned_any = True
    with torch.no_grad():
        expected = masked(x)
        got = model(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if pruned_any:
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())
