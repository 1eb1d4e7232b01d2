"""Tests for MAC/parameter counting and latency measurement."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prune_callbacks.measure.flops import call_model, count_macs_and_params, count_params, measure_latency


def test_conv2d_macs_match_formula() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 3, 16, 16)
    macs, params = count_macs_and_params(conv, x)
    h_out = w_out = 8
    assert macs == 2 * 8 * 3 * 3 * 3 * h_out * w_out
    assert params == 8 * 3 * 3 * 3 + 8


def test_grouped_conv_macs_match_formula() -> None:
    conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8, bias=False)
    macs, _ = count_macs_and_params(conv, torch.randn(1, 8, 5, 5))
    assert macs == 8 * 1 * 3 * 3 * 5 * 5


def test_linear_macs_match_formula() -> None:
    fc = nn.Linear(20, 7)
    macs, params = count_macs_and_params(fc, torch.randn(5, 20))
    assert macs == 5 * 20 * 7
    assert params == 20 * 7 + 7


def test_attention_matmuls_are_counted() -> None:
    class Sdpa(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, q, q)

    b, h, n, d = 2, 4, 10, 16
    macs, params = count_macs_and_params(Sdpa(), torch.randn(b, h, n, d))
    assert macs == 2 * b * h * n * n * d
    assert params == 0


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.a(x)
        return out if y is None else out + self.b(y)


def test_tuple_dict_and_forward_fn_inputs() -> None:
    model = TwoInputs()
    x, y = torch.randn(2, 4), torch.randn(2, 6)
    only_x = 2 * 4 * 3
    both = only_x + 2 * 6 * 3
    assert count_macs_and_params(model, x)[0] == only_x
    assert count_macs_and_params(model, (x, y))[0] == both
    assert count_macs_and_params(model, [x, y])[0] == both
    assert count_macs_and_params(model, {"x": x, "y": y})[0] == both
    assert count_macs_and_params(model, {"x": x})[0] == only_x
    macs, _ = count_macs_and_params(model, (x, y), forward_fn=lambda m, inp: m(inp[0]))
    assert macs == only_x


def test_call_model_dispatch() -> None:
    model = TwoInputs()
    x, y = torch.randn(2, 4), torch.randn(2, 6)
    expected = model(x, y=y)
    assert torch.equal(call_model(model, (x, y)), expected)
    assert torch.equal(call_model(model, {"x": x, "y": y}), expected)
    assert torch.equal(call_model(model, x), model(x))


def test_tied_weights_counted_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    model = Tied()
    assert count_params(model) == 40
    macs, params = count_macs_and_params(model, torch.tensor([[1, 2, 3]]))
    assert params == 40
    assert macs == 3 * 4 * 10


def test_modes_restored_and_no_grad() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    model.train()
    model[2].eval()
    seen: list[tuple[bool, bool]] = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad)))
    before = [m.training for m in model.modules()]
    count_macs_and_params(model, torch.randn(3, 4))
    assert [m.training for m in model.modules()] == before
    measure_latency(model, torch.randn(3, 4), warmup=1, repeats=2)
    assert [m.training for m in model.modules()] == before
    assert seen and all(not training and not grad for training, grad in seen)


def test_mode_restored_after_exception() -> None:
    model = nn.Linear(4, 4)
    model.train()
    with pytest.raises(RuntimeError):
        count_macs_and_params(model, torch.randn(3, 5))
    assert model.training


def test_meta_device_counting() -> None:
    with torch.device("meta"):
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
        )
        x = torch.empty(1, 3, 8, 8)
    macs, params = count_macs_and_params(model, x)
    assert macs == 16 * 3 * 9 * 64 + 16 * 64 * 10
    assert params == count_params(model)


def test_measure_latency_positive() -> None:
    model = nn.Linear(32, 32)
    latency = measure_latency(model, torch.randn(8, 32), warmup=1, repeats=5)
    assert 0.0 < latency < 1.0
    with pytest.raises(ValueError):
        measure_latency(model, torch.randn(8, 32), repeats=0)


def test_measure_latency_keeps_threads_and_counts_calls() -> None:
    """Timed with torch.utils.benchmark.Timer at torch's current thread count (not Timer's default
    of one), which is left as it was; every timed call is preceded by at least ``warmup`` calls."""
    calls = []

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(torch.get_num_threads())
        return model(x)

    threads = torch.get_num_threads()
    model = nn.Linear(4, 4)
    assert measure_latency(model, torch.randn(2, 4), warmup=5, repeats=3, forward_fn=forward) > 0
    assert torch.get_num_threads() == threads and set(calls) == {threads}
    # 5 calls before the first timed one (the Timer's own two included), then two untimed calls
    # before each further timed one
    assert len(calls) == 5 + 1 + (3 - 1) * 3


def test_eval_no_grad_is_public() -> None:
    from prune_callbacks.measure.flops import eval_no_grad

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    with eval_no_grad(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and model[1].training


def test_count_module_macs_per_submodule() -> None:
    from prune_callbacks.measure.flops import count_module_macs

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    total, per = count_module_macs(model, x)
    assert total == count_macs_and_params(model, x)[0] == 5 * (4 * 8 + 8 * 3)
    assert per == {"": total, "0": 5 * 4 * 8, "2": 5 * 8 * 3}


class _TokenToBlock(nn.Module):
    """CaiT style: a parameter expanded in forward and passed to a submodule. Under ``no_grad``
    such a view still says ``requires_grad`` but has no ``grad_fn``, which the module tracker of
    ``FlopCounterMode`` rejects unless the parameters are frozen while counting."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = self.cls_token.expand(x.shape[0], -1, -1)
        return self.head(self.block(token)[:, 0] + x)


def test_counting_a_model_that_passes_an_expanded_parameter_to_a_submodule() -> None:
    from prune_callbacks import Pruner

    model = _TokenToBlock()
    model.head.weight.requires_grad_(False)  # a frozen layer stays frozen after counting
    macs, params = count_macs_and_params(model, torch.randn(2, 8))
    assert macs == 2 * (8 * 8 + 8 * 3) and params == sum(p.numel() for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False, True]
    Pruner(model, torch.randn(2, 8), "l2", target_speedup=1.3)  # counts MACs at construction
