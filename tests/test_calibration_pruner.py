"""Calibration criteria driven by the Pruner (issue 19): ``calibration_data=`` (the pruner
calibrates before every step), sequential block-by-block calibration (``calibration_blocks=``)
and the ``add_bias`` record of the pruning history (FLAP's new biases replayed by
``load_pruned`` / ``apply_pruning_history``).

Equalities of pruned models are exact (same history, bit-equal tensors, outputs equal with
``atol=0``): the same arithmetic runs in the same order. Statistics are compared with a hand
computation at ``RTOL`` (float32 activations summed in float64).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn

from helpers import HF_LLAMA_RESIDUAL, LLAMA_RESIDUAL
from prune_callbacks import (
    Pruner,
    apply_pruning_history,
    get_pruning_history,
    load_pruned,
    prune_optimizer_state,
    save_pruned,
    track_parameter_updates,
)
from prune_callbacks.pruning.calibration import (
    FLAPImportance,
    InputStatistics,
    WandaImportance,
    add_biases,
    add_new_biases_to_optimizers,
    repeated_blocks,
)
from prune_callbacks.pruning.history import ADD_BIAS, bias_record
from prune_callbacks.pruning.preview import changes_of_records
from prune_callbacks.reference.models.llama import TinyLlama

RTOL = 1e-5
RESIDUAL, HF_RESIDUAL = LLAMA_RESIDUAL, HF_LLAMA_RESIDUAL
LLAMA = dict(prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=RESIDUAL)

pytestmark = pytest.mark.filterwarnings("ignore:prune_callbacks. these layers cannot be pruned")


class Block(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear: one group (up's outputs = down's inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(3, 6)
        self.drop = nn.Dropout(0.5)
        self.down = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(torch.relu(self.up(x))))


class TwoInputs(nn.Module):
    """``forward(x, scale)``: batches as tuples of positional arguments or dicts of keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.block(x * scale)


def _block() -> tuple[Block, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Block()
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(5, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)]


def _tiny_llama(n_layers: int = 2) -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(
        vocab_size=64, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32
    )


def _tokens(n: int = 3, vocab: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(n)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(state) and all(
        now[k].shape == v.shape and torch.equal(now[k], v) for k, v in state.items()
    )


@torch.no_grad()
def _out(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return getattr(out, "logits", out)


class RecordingWanda(WandaImportance):
    """Wanda that keeps, per layer name, the squared input norms it scored with (each step)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, torch.Tensor]] = [{}]
        self.batches_seen: list[int] = []
        self.names: dict[int, str] = {}

    def consumer_values(self, module: nn.Module, stats: InputStatistics) -> torch.Tensor:
        self.seen[-1][self.names[id(module)]] = stats.squared_norm().clone()
        self.batches_seen.append(stats.calls)
        return super().consumer_values(module, stats)

    def reset(self) -> None:
        super().reset()
        if self.seen[-1]:
            self.seen.append({})


def _recording(model: nn.Module) -> RecordingWanda:
    imp = RecordingWanda()
    imp.names = {id(m): n for n, m in model.named_modules()}
    return imp


# ------------------------------------------------------------------------ calibration_data=


def test_calibration_data_equals_calibrating_by_hand() -> None:
    """``Pruner(..., calibration_data=batches).step()`` prunes exactly like ``calibrate`` by hand
    followed by ``step()``; the model's training mode is back after the step (calibration ran in
    eval mode, without autograd), and no hook is left on it."""
    hand, batches = _block()
    pruner = Pruner(hand, batches[0], importance="wanda", pruning_ratio=0.5)
    pruner.importance.calibrate(hand, batches)
    pruner.step()

    model, _ = _block()
    model.train()
    modes: list[tuple[bool, bool]] = []
    model.up.register_forward_pre_hook(lambda m, a: modes.append((m.training, torch.is_grad_enabled())))
    pruner = Pruner(model, batches[0], importance="wanda", pruning_ratio=0.5, calibration_data=batches)
    modes.clear()
    pruner.step()
    assert modes[:2] == [(False, False)] * 2  # the two calibration batches, first thing in the step
    assert all(m.training for m in model.modules())
    assert model.up.out_features == 3 and get_pruning_history(model) == get_pruning_history(hand)
    assert _same_state(model, _state(hand))
    assert not model.down._forward_pre_hooks and not pruner.importance.attached
    assert pruner.timings["calibration"] > 0


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_calibration_batches_in_the_forms_of_example_inputs(form: str) -> None:
    torch.manual_seed(0)
    model = TwoInputs()
    gen = torch.Generator().manual_seed(2)
    xs = [(torch.randn(4, 3, generator=gen), torch.full((1,), 2.0)) for _ in range(2)]
    batches: list[Any] = xs if form == "tuple" else [{"x": x, "scale": s} for x, s in xs]
    pruner = Pruner(model, batches[0], importance="wanda", pruning_ratio=0.5, calibration_data=batches)
    pruner.step()
    # the hand score of the group: down's inputs, computed from the batches
    torch.manual_seed(0)
    dense = TwoInputs().block
    with torch.no_grad():
        h = torch.cat([torch.relu(dense.up(x * s)) for x, s in xs])
    hand = dense.down.weight.abs().sum(0) * h.pow(2).sum(0).sqrt()
    keep = torch.sort(torch.topk(hand, 3).indices).values
    torch.testing.assert_close(model.block.down.weight.detach(), dense.down.weight.detach()[:, keep])


def test_every_step_calibrates_again_on_the_pruned_model() -> None:
    """With two steps the data (a one-shot generator here, read into a list) is used before each
    step: the second step's scores come from statistics of the pruned model."""
    model = _tiny_llama()
    batches = _tokens()
    imp = _recording(model)
    pruner = Pruner(
        model,
        batches[0],
        importance=imp,
        pruning_ratio=0.5,
        iterative_steps=2,
        calibration_data=iter(batches),
        **LLAMA,
    )
    pruner.step()
    pruner.step()
    assert model.layers[0].mlp.up_proj.out_features == 32 and pruner.current_step == 2
    assert set(imp.batches_seen) == {3}  # every scored layer saw the three batches, each step
    first, second = imp.seen[0], imp.seen[1]
    name = "layers.1.mlp.down_proj"
    assert first[name].numel() == 64 and second[name].numel() == 48  # the layer's width at each step


def test_preview_with_calibration_data_previews_every_step() -> None:
    model = _tiny_llama()
    batches = _tokens()
    before = _state(model)
    pruner = Pruner(
        model,
        batches[0],
        importance="wanda",
        pruning_ratio=0.5,
        iterative_steps=2,
        calibration_data=batches,
        **LLAMA,
    )
    preview = pruner.preview()
    assert len(preview.steps) == 2 and not preview.stopped
    assert _same_state(model, before) and not get_pruning_history(model)
    pruner.step()
    assert preview.steps[0].changes == changes_of_records(get_pruning_history(model))
    assert model.layers[0].mlp.up_proj.out_features == 48


def test_calibration_data_errors_name_the_fix() -> None:
    model, batches = _block()
    before = _state(model)
    with pytest.raises(ValueError, match="calibration_data is read only by a calibration criterion"):
        Pruner(model, batches[0], importance="l2", pruning_ratio=0.5, calibration_data=batches)
    with pytest.raises(ValueError, match=r"calibration_data=\[batch\]"):
        Pruner(model, batches[0], importance="wanda", calibration_data=batches[0])
    with pytest.raises(ValueError, match="empty"):
        Pruner(model, batches[0], importance="wanda", calibration_data=[])
    pruner = Pruner(model, batches[0], importance="flap", pruning_ratio=0.5)
    with pytest.raises(RuntimeError, match=r"calibration_data=batches"):
        pruner.step()
    with pytest.raises(RuntimeError, match=r"calibration_data=batches"):
        pruner.preview()
    assert _same_state(model, before) and not get_pruning_history(model) and pruner.current_step == 0


# ------------------------------------------------------------------------ sequential calibration


def _llama_pruner(
    model: nn.Module, batches: list, blocks: Any, importance: Any = "wanda", **kw: Any
) -> Pruner:
    return Pruner(
        model,
        batches[0],
        importance=importance,
        pruning_ratio=0.5,
        calibration_data=batches,
        calibration_blocks=blocks,
        **{**LLAMA, **kw},
    )


@pytest.mark.parametrize("name", ["wanda", "flap"])
def test_one_block_is_the_one_shot_step(name: str) -> None:
    batches = _tokens()
    one_shot = _tiny_llama(1)
    kw = {"importance": FLAPImportance(add_bias=True)} if name == "flap" else {"importance": name}
    _llama_pruner(one_shot, batches, None, **kw).step()
    seq = _tiny_llama(1)
    kw = {"importance": FLAPImportance(add_bias=True)} if name == "flap" else {"importance": name}
    _llama_pruner(seq, batches, "layers", **kw).step()
    assert get_pruning_history(seq) == get_pruning_history(one_shot)
    assert _same_state(seq, _state(one_shot))
    assert seq.layers[0].mlp.up_proj.out_features == 32


def test_sequential_block_one_sees_the_pruned_block_zero() -> None:
    """Block 1's statistics are those of its inputs computed by the already pruned block 0 (a
    hand computation: the pruned model's block-0 output run through the dense block 1), not the
    one-shot statistics; block 0's are the one-shot ones."""
    batches = _tokens()
    dense = _tiny_llama()
    one_shot = copy.deepcopy(dense)
    imp1 = _recording(one_shot)
    _llama_pruner(one_shot, batches, None, importance=imp1).step()

    model = copy.deepcopy(dense)
    imp = _recording(model)
    pruner = _llama_pruner(model, batches, "layers", importance=imp)
    pruner.step()
    seq = {k: v for stage in imp.seen for k, v in stage.items()}
    one = imp1.seen[0]
    assert (
        set(seq)
        == set(one)
        == {f"layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")}
    )
    for layer in ("self_attn.o_proj", "mlp.down_proj"):
        torch.testing.assert_close(seq[f"layers.0.{layer}"], one[f"layers.0.{layer}"], rtol=0, atol=0)
        assert not torch.allclose(seq[f"layers.1.{layer}"], one[f"layers.1.{layer}"], rtol=1e-3)

    inputs: list[torch.Tensor] = []
    handle = model.layers[1].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    for b in batches:
        _out(model, b)
    handle.remove()
    seen: list[torch.Tensor] = []
    block1 = copy.deepcopy(dense.layers[1])
    block1.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for x in inputs:
            block1(x)
    hand = torch.cat(seen).double().pow(2).sum(0)
    torch.testing.assert_close(seq["layers.1.mlp.down_proj"], hand, rtol=RTOL, atol=1e-8)


def test_sequential_tiny_llama_replays_from_its_history(tmp_path) -> None:
    batches = _tokens()
    model = _tiny_llama(3)
    pruner = _llama_pruner(model, batches, "auto")
    assert pruner.calibration_blocks == list(model.layers)
    pruner.step()
    assert [m.mlp.up_proj.out_features for m in model.layers] == [32, 32, 32]
    assert [m.self_attn.num_heads for m in model.layers] == [2, 2, 2]
    replayed = apply_pruning_history(_tiny_llama(3), get_pruning_history(model))
    replayed.load_state_dict(model.state_dict(), strict=True)
    save_pruned(model, tmp_path / "seq.pt")
    loaded = load_pruned(_tiny_llama(3), tmp_path / "seq.pt")
    for b in batches:
        torch.testing.assert_close(_out(replayed, b), _out(model, b), rtol=0, atol=0)
        torch.testing.assert_close(_out(loaded, b), _out(model, b), rtol=0, atol=0)
    # the sequential result is not the one-shot one (later blocks were scored on pruned inputs)
    one_shot = _tiny_llama(3)
    _llama_pruner(one_shot, batches, None).step()
    assert get_pruning_history(one_shot) != get_pruning_history(model)


def _hf_llama(layers: int = 2) -> Any:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("importance", ["wanda", "flap"])
def test_sequential_hf_llama(importance: str, tmp_path) -> None:
    model = _hf_llama()
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128, (2, 12), generator=gen)} for _ in range(2)]
    assert repeated_blocks(model)[0] == "model.layers"  # type: ignore[index]
    imp = FLAPImportance(add_bias=True) if importance == "flap" else RecordingWanda()
    if isinstance(imp, RecordingWanda):
        imp.names = {id(m): n for n, m in model.named_modules()}
    pruner = Pruner(
        model,
        batches[0],
        importance=imp,
        pruning_ratio=0.5,
        prune_num_heads=True,
        head_pruning_ratio=0.5,
        ignored_layers=HF_RESIDUAL,
        calibration_data=batches,
        calibration_blocks="auto",
    )
    pruner.step()
    for layer in model.model.layers:
        assert layer.mlp.up_proj.out_features == 64 and layer.self_attn.q_proj.out_features == 32
    if isinstance(imp, RecordingWanda):
        assert len(imp.seen[0]) == 2 and len(imp.seen[1]) == 2  # one stage per block
    else:
        assert model.model.layers[1].mlp.down_proj.bias is not None
    save_pruned(model, tmp_path / "hf.pt")
    fresh = load_pruned(_hf_llama(), tmp_path / "hf.pt")
    replayed = apply_pruning_history(_hf_llama(), get_pruning_history(model))
    replayed.load_state_dict(model.state_dict(), strict=True)
    for b in batches:
        torch.testing.assert_close(_out(fresh, b), _out(model, b), rtol=0, atol=0)
        torch.testing.assert_close(_out(replayed, b), _out(model, b), rtol=0, atol=0)


def _interrupt_at(module: nn.Module, when: Callable[[], bool]) -> Any:
    def hook(m: nn.Module, args: Any) -> None:
        if when():
            raise KeyboardInterrupt

    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("importance", ["wanda", "flap"])
def test_sequential_step_is_a_transaction(importance: str) -> None:
    """A KeyboardInterrupt while block 1 is calibrated (block 0 pruned already, FLAP's biases
    added) puts back the model, its history, the optimizer-update log and the schedule; the step
    then runs as if nothing had happened."""
    batches = _tokens()
    model = _tiny_llama()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(batches[0]).float().pow(2).mean().backward()
    opt.step()
    moments = {id(p): s["exp_avg"].clone() for p, s in opt.state.items()}
    before = _state(model)
    reference = copy.deepcopy(model)

    def make(m: nn.Module) -> Pruner:
        imp = FLAPImportance(add_bias=True) if importance == "flap" else "wanda"
        return _llama_pruner(m, batches, "layers", importance=imp)

    pruner = make(model)
    pruned_block0: list[int] = []
    handle = _interrupt_at(
        model.layers[1], lambda: pruned_block0.append(model.layers[0].mlp.up_proj.out_features) or True
    )
    with track_parameter_updates() as log, pytest.raises(KeyboardInterrupt):
        pruner.step()
    handle.remove()
    assert pruned_block0 == [32]  # it was interrupted mid-way, with block 0 pruned
    assert _same_state(model, before) and not get_pruning_history(model) and not log
    assert model.layers[0].mlp.down_proj.bias is None
    assert pruner.current_step == 0 and not model.layers[0]._forward_pre_hooks
    assert prune_optimizer_state(opt, log) == 0
    assert all(torch.equal(s["exp_avg"], moments[id(p)]) for p, s in opt.state.items())

    with track_parameter_updates() as log:
        pruner.step()
    assert log and prune_optimizer_state(opt, log) > 0
    make(reference).step()
    assert get_pruning_history(model) == get_pruning_history(reference)
    for b in batches:
        torch.testing.assert_close(_out(model, b), _out(reference, b), rtol=0, atol=0)


def test_sequential_errors_name_the_fix() -> None:
    batches = _tokens()
    model = _tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="needs calibration_data"):
        Pruner(model, batches[0], importance="wanda", calibration_blocks="layers")
    with pytest.raises(ValueError, match="global ranking"):
        _llama_pruner(model, batches, "layers", global_pruning=True)
    with pytest.raises(ValueError, match="did you mean 'layers'"):
        _llama_pruner(model, batches, "layer")
    with pytest.raises(ValueError, match="not an nn.ModuleList"):
        _llama_pruner(model, batches, "layers.0")
    with pytest.raises(ValueError, match="no repeated blocks"):
        Pruner(*_block(), importance="wanda", calibration_data=_block()[1][:1], calibration_blocks="auto")
    pruner = _llama_pruner(model, batches, "layers")
    with pytest.raises(ValueError, match="interactive"):
        pruner.step(interactive=True)
    backwards = _llama_pruner(model, batches, [model.layers[1], "layers.0"])
    with pytest.raises(ValueError, match="order the model's forward runs them"):
        backwards.step()
    assert _same_state(model, before) and not get_pruning_history(model)


def test_calibrate_stop_after_records_only_up_to_the_block() -> None:
    model = _tiny_llama()
    imp = WandaImportance()
    ran: list[str] = []
    model.lm_head.register_forward_pre_hook(lambda m, a: ran.append("lm_head"))
    assert imp.calibrate(model, _tokens(), stop_after=model.layers[0]) == 3
    assert (
        not ran
        and imp.statistics(model.lm_head) is None
        and imp.statistics(model.layers[1].mlp.up_proj) is None
    )
    stats = imp.statistics(model.layers[0].mlp.down_proj)
    assert stats is not None and stats.calls == 3 and stats.count == 3 * 2 * 16
    with pytest.raises(ValueError, match="did not run"):
        imp.calibrate(model, _tokens(1), stop_after=nn.Linear(2, 2))


# ------------------------------------------------------------------------ FLAP's biases in the history


def _flap_llama(tmp_path=None) -> tuple[TinyLlama, FLAPImportance, list[torch.Tensor]]:
    batches = _tokens()
    model = _tiny_llama()
    flap = FLAPImportance(add_bias=True)
    Pruner(model, batches[0], importance=flap, pruning_ratio=0.5, calibration_data=batches, **LLAMA).step()
    return model, flap, batches


def test_flap_biases_are_recorded_and_rebuilt_by_load_pruned() -> None:
    model, flap, batches = _flap_llama()
    history = get_pruning_history(model)
    assert [r.get("kind") for r in history] == [None, ADD_BIAS]
    assert [it["target"] for it in history[1]["items"]] == flap.added_biases
    assert set(flap.added_biases) == {
        f"layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")
    }
    buf = io.BytesIO()
    save_pruned(model, buf)
    buf.seek(0)
    fresh = load_pruned(_tiny_llama(), buf)  # strict
    assert fresh.layers[1].mlp.down_proj.bias is not None
    replayed = apply_pruning_history(_tiny_llama(), history)
    replayed.load_state_dict(model.state_dict(), strict=True)
    for b in batches:
        torch.testing.assert_close(_out(fresh, b), _out(model, b), rtol=0, atol=0)
        torch.testing.assert_close(_out(replayed, b), _out(model, b), rtol=0, atol=0)


def test_old_files_without_bias_records_still_load_with_add_biases() -> None:
    model, flap, batches = _flap_llama()
    payload = save_pruned(model, io.BytesIO())
    old = dict(payload, history=[r for r in payload["history"] if r.get("kind") != ADD_BIAS])
    with pytest.raises(ValueError, match="bias"):
        load_pruned(_tiny_llama(), old)
    fresh = _tiny_llama()
    add_biases(fresh, flap.added_biases)
    load_pruned(fresh, old)
    torch.testing.assert_close(_out(fresh, batches[0]), _out(model, batches[0]), rtol=0, atol=0)
    # a new file refuses a model given the biases by hand: the history gives them
    fresh = _tiny_llama()
    add_biases(fresh, flap.added_biases)
    before = _state(fresh)
    with pytest.raises(ValueError, match="has a bias already"):
        load_pruned(fresh, payload)
    assert _same_state(fresh, before) and not get_pruning_history(fresh)


def test_interrupted_replay_leaves_the_model_unchanged() -> None:
    model, _, _ = _flap_llama()
    payload = save_pruned(model, io.BytesIO())
    fresh = _tiny_llama()
    before = _state(fresh)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        assert fresh.layers[1].mlp.down_proj.bias is not None  # the biases were replayed by now
        raise KeyboardInterrupt

    fresh.load_state_dict = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        load_pruned(fresh, payload)
    del fresh.load_state_dict
    assert _same_state(fresh, before) and not get_pruning_history(fresh)
    assert all(m.bias is None for m in fresh.modules() if isinstance(m, nn.Linear))
    load_pruned(fresh, payload)  # and it loads afterwards


@pytest.mark.parametrize(
    "record, error, match",
    [
        (bias_record(["norm"]), ValueError, "not an nn.Linear"),
        (bias_record(["nowhere"]), KeyError, "nowhere"),
        (
            dict(bias_record(["lm_head"]), items=[{"target": "lm_head", "function": ADD_BIAS, "idxs": [1]}]),
            ValueError,
            "carries indices",
        ),
        ([bias_record(["lm_head"]), bias_record(["lm_head"])], ValueError, "has a bias already"),
    ],
)
def test_bias_records_are_checked_before_anything_changes(record: Any, error: type, match: str) -> None:
    model = _tiny_llama()
    before = _state(model)
    with pytest.raises(error, match=match):
        apply_pruning_history(model, record if isinstance(record, list) else [record])
    assert _same_state(model, before) and not get_pruning_history(model) and model.lm_head.bias is None


def test_preview_of_a_flap_step_adds_no_bias() -> None:
    batches = _tokens()
    model = _tiny_llama()
    pruner = Pruner(
        model,
        batches[0],
        importance=FLAPImportance(add_bias=True),
        pruning_ratio=0.5,
        calibration_data=batches,
        **LLAMA,
    )
    pruner.preview()
    assert not get_pruning_history(model)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))


def test_new_biases_join_the_optimizer_and_its_state_reloads() -> None:
    """After a FLAP step that added biases, ``add_new_biases_to_optimizers`` lets the optimizer
    train them, at the place a fresh optimizer on the reloaded model has them: the optimizer
    state saved after training loads into that optimizer, and both continue alike."""
    batches = _tokens()
    model = _tiny_llama()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = Pruner(
        model,
        batches[0],
        importance=FLAPImportance(add_bias=True),
        pruning_ratio=0.5,
        calibration_data=batches,
        **LLAMA,
    )
    with track_parameter_updates() as log:
        pruner.step()
    prune_optimizer_state(opt, log)
    added = add_new_biases_to_optimizers(opt, model)
    assert set(added) == {f"layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert add_new_biases_to_optimizers([opt], model) == []
    bias = model.layers[0].mlp.down_proj.bias
    start = bias.detach().clone()
    model(batches[0]).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(bias.detach(), start)  # trained

    payload = save_pruned(model, io.BytesIO())
    fresh = load_pruned(_tiny_llama(), payload)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as read back from a file
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(batches[1]).pow(2).mean().backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
