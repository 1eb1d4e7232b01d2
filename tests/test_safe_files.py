"""Safe pruned-model files: ``save_pruned`` records a digest per tensor and ``load_pruned`` refuses
damaged files, hostile histories and targets that do not fit, leaving the target exactly as it was
(on any failure, ``KeyboardInterrupt`` included)."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn

from prune_callbacks import Pruner
from prune_callbacks.pruning.history import (
    apply_pruning_history,
    get_pruning_history,
    load_pruned,
    save_pruned,
    tensor_digest,
)

pytestmark = [pytest.mark.filterwarnings("ignore:prune_callbacks"), pytest.mark.usefixtures("one_thread")]

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """Conv-BN-ReLU-Conv; ``width`` and ``head_bias`` are the constructor arguments a target may differ in."""

    def __init__(self, width: int = 8, head_bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, 4, 3, bias=head_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _fresh(seed: int = 1, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return Net(**kwargs).eval()


def _pruned(ratio: float = 0.5, steps: int = 1) -> nn.Module:
    model = _fresh(0)
    model.body[1].running_mean.uniform_()  # the file's values differ from a fresh model's everywhere
    pruner = Pruner(model, X, "l2", pruning_ratio=ratio, iterative_steps=steps)
    for _ in range(steps):
        pruner.step()
    return model.eval()


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    return _pruned()


@pytest.fixture(scope="module")
def saved(pruned: nn.Module) -> bytes:
    buf = io.BytesIO()
    save_pruned(pruned, buf)
    return buf.getvalue()


def _load(raw: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(raw), weights_only=True)


def _save(data: dict[str, Any]) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(data, buf)
    buf.seek(0)
    return buf


# -------------------------------------------------------------------------------------------- state


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was: parameter objects and values, buffers,
    plain attributes of every module, the history."""
    return {
        "params": {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: (id(b), b.clone()) for n, b in model.named_buffers()},
        "attrs": {
            n: {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
            for n, m in model.named_modules()
        },
        "history": copy.deepcopy(get_pruning_history(model)),
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _state(model)
    assert after["params"].keys() == before["params"].keys()
    for n, (ident, value) in before["params"].items():
        assert after["params"][n][0] == ident, n
        assert torch.equal(after["params"][n][1], value), n
    assert after["buffers"].keys() == before["buffers"].keys()
    for n, (ident, value) in before["buffers"].items():
        assert after["buffers"][n][0] == ident and torch.equal(after["buffers"][n][1], value), n
    assert after["attrs"] == before["attrs"]
    assert after["history"] == before["history"]


@pytest.fixture
def conv_class() -> Iterator[None]:
    """Fails the test if ``nn.Conv2d`` itself was changed (process-wide damage)."""
    before = dict(vars(nn.Conv2d))
    yield
    assert dict(vars(nn.Conv2d)) == before
    conv = nn.Conv2d(3, 8, 3)
    assert type(conv) is nn.Conv2d and conv.in_channels == 3 and conv.out_channels == 8


# ------------------------------------------------------------------------------------------ digests


def test_round_trip_with_digests(pruned: nn.Module, saved: bytes) -> None:
    data = _load(saved)
    assert set(data["digests"]) == set(data["state_dict"])
    assert all(isinstance(d, str) and len(d) == 64 for d in data["digests"].values())
    fresh = load_pruned(_fresh(), io.BytesIO(saved))
    assert torch.equal(fresh(X), pruned(X))
    assert get_pruning_history(fresh) == get_pruning_history(pruned)
    again = io.BytesIO()
    save_pruned(fresh, again)  # the loaded model saves the same tensors with the same digests
    assert _load(again.getvalue())["digests"] == data["digests"]


def test_old_format_without_digests_still_loads(pruned: nn.Module, saved: bytes) -> None:
    data = _load(saved)
    del data["digests"]
    fresh = load_pruned(_fresh(), _save(data))
    assert torch.equal(fresh(X), pruned(X))


def test_tensor_digest_covers_bytes_dtype_and_shape() -> None:
    t = torch.randn(4, 3, dtype=torch.bfloat16)
    assert tensor_digest(t) == tensor_digest(t.clone()) == tensor_digest(t.t().contiguous().t())
    changed = t.clone()
    changed[2, 1] += 1
    assert tensor_digest(changed) != tensor_digest(t)
    assert tensor_digest(t.view(torch.int16)) != tensor_digest(t)  # same bytes, other dtype
    assert tensor_digest(t.reshape(3, 4)) != tensor_digest(t)  # same bytes, other shape
    assert tensor_digest(torch.tensor(3)) != tensor_digest(torch.tensor(4))  # 0-d tensors


def test_changed_tensor_value_is_refused(saved: bytes) -> None:
    data = _load(saved)
    data["state_dict"]["body.0.weight"][0, 0, 0, 0] += 1e-3
    target = _fresh()
    before = _state(target)
    with pytest.raises(ValueError, match="tensor 'body.0.weight' does not match the digest saved with it"):
        load_pruned(target, _save(data))
    _assert_unchanged(target, before)


def test_flipped_bytes_in_the_file_are_refused(pruned: nn.Module, saved: bytes) -> None:
    raw = pruned.head.weight.detach().numpy().tobytes()
    assert saved.count(raw) == 1  # torch.save stores tensor data uncompressed
    damaged = bytearray(saved)
    damaged[saved.index(raw) + len(raw) // 2] ^= 0x10
    target = _fresh()
    before = _state(target)
    with pytest.raises(ValueError, match="'head.weight' does not match the digest.*the file is damaged"):
        load_pruned(target, io.BytesIO(bytes(damaged)))
    _assert_unchanged(target, before)


def test_several_damaged_tensors_and_tampered_digests_are_refused(saved: bytes) -> None:
    data = _load(saved)
    data["state_dict"]["head.bias"] += 1
    data["state_dict"]["body.1.running_var"] += 1
    with pytest.raises(ValueError, match="tensors 'body.1.running_var', 'head.bias' do not match"):
        load_pruned(_fresh(), _save(data))
    data = _load(saved)
    data["state_dict"]["extra"] = torch.zeros(2)  # a tensor slipped in without a digest
    with pytest.raises(ValueError, match="tensor 'extra' does not match"):
        load_pruned(_fresh(), _save(data))
    data = _load(saved)
    del data["state_dict"]["head.bias"]  # a tensor taken out, its digest left
    with pytest.raises(ValueError, match="'head.bias' has a digest but is missing"):
        load_pruned(_fresh(), _save(data))


# -------------------------------------------------------------------------------- hostile histories


HOSTILE = [
    ("body.0", "__class__", 1),
    ("body.0", "__dict__", [1]),
    ("body.0", "_parameters", 1),
    ("body.0", "forward", 3),
    ("body.0", "weight", 3),
    ("body.0", "training", 1),
    ("body.0.__class__", "in_channels", 5),
    ("body.0.weight", "size", 2),
    ("body.0.config", "in_channels", 5),
    ("no.such", "in_channels", 5),
    ("body.0", "out_channels", "4"),
    ("body.0", "out_channels", True),
    ("body.0", "out_channels", [1, [2]]),
]


@pytest.mark.usefixtures("conv_class")
@pytest.mark.parametrize(("module", "attr", "new"), HOSTILE)
def test_hostile_attribute_records_are_refused(saved: bytes, module: str, attr: str, new: Any) -> None:
    data = _load(saved)
    data["history"][0]["attributes"].append({"module": module, "attr": attr, "new": new})
    del data["digests"]  # only the history is checked here
    target = _fresh()
    before = _state(target)
    path = f"{module}.{attr}"
    with pytest.raises(ValueError, match=rf"history record 0 sets '{path}': only int or tuple-of-int size"):
        load_pruned(target, _save(data))
    _assert_unchanged(target, before)
    with pytest.raises(ValueError, match="history record 0 sets"):
        apply_pruning_history(target, data["history"])
    _assert_unchanged(target, before)


@pytest.mark.usefixtures("conv_class")
def test_hostile_item_target_is_refused(saved: bytes) -> None:
    data = _load(saved)
    data["history"][0]["items"][0]["target"] = "body.0.__class__"
    target = _fresh()
    before = _state(target)
    with pytest.raises(KeyError, match="no module or parameter named 'body.0.__class__'"):
        load_pruned(target, data)
    _assert_unchanged(target, before)


class WithConfig(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.lin = nn.Linear(4, 4)


def test_config_size_attributes_may_be_set_and_nothing_else() -> None:
    model = WithConfig(SimpleNamespace(sizes=(2, 2), hidden=4, act=torch.relu))
    apply_pruning_history(model, [{"attributes": [{"module": "config", "attr": "sizes", "new": [1, 3]}]}])
    assert model.config.sizes == (1, 3)  # a tuple stays a tuple
    for change in (
        {"module": "config", "attr": "act", "new": 1},  # a callable value
        {"module": "config", "attr": "__class__", "new": 1},
        {"module": "lin.config", "attr": "hidden", "new": 1},  # lin holds no config
    ):
        with pytest.raises(ValueError, match="only int or tuple-of-int size attributes"):
            apply_pruning_history(model, [{"attributes": [change]}])
    callable_config = WithConfig(lambda: None)
    change = {"module": "config", "attr": "x", "new": 1}
    with pytest.raises(ValueError, match="neither a module of the model nor the plain config"):
        apply_pruning_history(callable_config, [{"attributes": [change]}])


# -------------------------------------------------------------------------- targets that do not fit


def test_target_pruned_differently_is_refused(saved: bytes) -> None:
    target = _fresh()
    Pruner(target, X, "l2", pruning_ratio=0.25).step()
    before = _state(target)
    with pytest.raises(ValueError, match="load_pruned.*pruned differently.*freshly constructed model"):
        load_pruned(target, io.BytesIO(saved))
    _assert_unchanged(target, before)


def test_target_pruned_along_a_prefix_gets_the_rest() -> None:
    model = _pruned(ratio=0.5, steps=2)
    history = get_pruning_history(model)
    assert len(history) == 2
    target = apply_pruning_history(_fresh(), history[:1])
    load_pruned(target, save_pruned(model, io.BytesIO()))
    assert torch.equal(target(X), model(X))
    assert get_pruning_history(target) == history


def test_wider_target_is_refused_unchanged(saved: bytes) -> None:
    target = _fresh(width=16)
    before = _state(target)
    wanted = r"does not fit this Net.*size mismatch for 'body.0.weight' \(4, 3, 3, 3\) in the file"
    with pytest.raises(ValueError, match=wanted):
        load_pruned(target, io.BytesIO(saved))
    _assert_unchanged(target, before)


def test_missing_keys_are_refused_when_strict(pruned: nn.Module, saved: bytes) -> None:
    target = _fresh(head_bias=False)
    before = _state(target)
    with pytest.raises(ValueError, match=r"not in the model: 'head.bias' \(4,\)"):
        load_pruned(target, io.BytesIO(saved))
    _assert_unchanged(target, before)
    load_pruned(target, io.BytesIO(saved), strict=False)  # the rest fits
    assert torch.equal(target.head.weight, pruned.head.weight)


# --------------------------------------------------------------------------------------- interrupts


def test_interrupt_while_loading_the_weights_restores_values(
    monkeypatch: pytest.MonkeyPatch, pruned: nn.Module, saved: bytes
) -> None:
    target = _fresh()
    real = target.load_state_dict

    def load_then_interrupt(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # writes every value in place, the unpruned head.bias included
        assert torch.equal(target.head.bias, pruned.head.bias)
        raise KeyboardInterrupt

    monkeypatch.setattr(target, "load_state_dict", load_then_interrupt)
    before = _state(target)
    assert not torch.equal(before["params"]["head.bias"][1], pruned.head.bias)
    with pytest.raises(KeyboardInterrupt):
        load_pruned(target, io.BytesIO(saved))
    _assert_unchanged(target, before)


class InterruptingBatchNorm(nn.BatchNorm2d):
    """Raises ``KeyboardInterrupt`` when a prune sets its size (after its tensors were sliced)."""

    armed = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "num_features" and self.armed:
            raise KeyboardInterrupt
        super().__setattr__(name, value)


def test_interrupt_while_replaying_leaves_the_target_unchanged(saved: bytes) -> None:
    target = _fresh()
    target.body[1] = InterruptingBatchNorm(8)
    target.body[1].armed = True
    before = _state(target)
    with pytest.raises(KeyboardInterrupt):
        load_pruned(target, io.BytesIO(saved))
    _assert_unchanged(target, before)
    with pytest.raises(KeyboardInterrupt):
        apply_pruning_history(target, _load(saved)["history"])
    _assert_unchanged(target, before)
