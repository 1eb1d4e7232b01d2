"""Calibration criteria (issue 19, item 3): Wanda-style and FLAP-style structured scores from
forward hooks, FLAP's bias compensation, grouped-query attention, use by name.

Scores are compared with hand computations on explicit tensors (Linear -> ReLU -> Linear, a
1x1 convolution consumer); bias compensation with the mean of the block's output over the
calibration data (the layer is linear in its input, so the means agree up to rounding: 1e-5);
then the library's tiny Llama and a Hugging Face Llama with grouped-query attention are pruned
(heads and MLP channels) and must still run, with fewer MACs; the kept MLP channels must be the
top-scored ones by the hand formula.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import HF_LLAMA_RESIDUAL, LLAMA_RESIDUAL, LitNet, cpu_trainer, random_loader
from prune_callbacks import DependencyGraph, Pruner, PruningSettings, load_pruned, save_pruned
from prune_callbacks.integrations.lightning.callback import StructuredPruning
from prune_callbacks.measure.flops import count_macs_and_params
from prune_callbacks.pruning.calibration import (
    CalibrationImportance,
    FLAPImportance,
    WandaImportance,
    add_biases,
)
from prune_callbacks.pruning.importance import IMPORTANCES, get_importance
from prune_callbacks.reference.models.llama import LlamaMLP, TinyLlama

#: Tolerance of the comparisons with hand computations (float32 arithmetic, float64 statistics).
RTOL = 1e-5
RESIDUAL, HF_RESIDUAL = LLAMA_RESIDUAL, HF_LLAMA_RESIDUAL


class Block(nn.Module):
    """Linear -> ReLU -> Linear: the group of ``up``'s outputs is (up rows, down columns)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(3, 6)
        self.down = nn.Linear(6, 2, bias=bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.up(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))


def _root_group(model: nn.Module, x, module: nn.Module):
    dg = DependencyGraph().build_dependency(model, x)
    for g in dg.get_all_groups():
        if g.root.dep.target.module is module:
            return g
    raise AssertionError("no group rooted at the module")


def _block(bias: bool = True):
    torch.manual_seed(0)
    model = Block(bias)
    batches = [torch.randn(5, 3), torch.randn(2, 4, 3)]  # 13 tokens, two batches of other shapes
    return model, batches


def _hidden_rows(model: Block, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.hidden(b).reshape(-1, 6) for b in batches])


# ------------------------------------------------------------------------ hand computations


def test_wanda_equals_hand_computation() -> None:
    model, batches = _block()
    group = _root_group(model, batches[0], model.up)
    imp = WandaImportance(normalizer="none")
    assert imp.calibrate(model, batches) == 2
    h = _hidden_rows(model, batches)
    expected = model.down.weight.detach().abs().sum(0) * h.pow(2).sum(0).sqrt()
    torch.testing.assert_close(imp(group), expected, rtol=RTOL, atol=1e-7)

    # producers=True adds the Wanda scores of the up rows: sum_i |W_up[c, i]| * ||x_i||
    both = WandaImportance(producers=True, normalizer="none")
    both.calibrate(model, batches)
    x = torch.cat([b.reshape(-1, 3) for b in batches])
    rows = (model.up.weight.detach().abs() * x.pow(2).sum(0).sqrt()).sum(1)
    torch.testing.assert_close(both(group), expected + rows, rtol=RTOL, atol=1e-7)


def test_flap_equals_hand_computation() -> None:
    model, batches = _block()
    group = _root_group(model, batches[0], model.up)
    imp = FLAPImportance(normalizer="none")
    imp.calibrate(model, batches)
    h = _hidden_rows(model, batches)
    expected = h.var(0, unbiased=True) * model.down.weight.detach().pow(2).sum(0)
    torch.testing.assert_close(imp(group), expected, rtol=RTOL, atol=1e-7)
    stats = imp.statistics(model.down)
    assert stats is not None and stats.count == 13
    torch.testing.assert_close(stats.mean.float(), h.mean(0), rtol=RTOL, atol=1e-7)


def test_wanda_on_a_convolution_consumer() -> None:
    """A 1x1 convolution reading the group's channels: ||X_c|| over batch and positions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    x = torch.randn(2, 2, 5, 5)
    group = _root_group(model, x, model[0])
    imp = WandaImportance(normalizer="none")
    imp.calibrate(model, [x])
    with torch.no_grad():
        h = torch.relu(model[0](x))
    expected = model[2].weight.detach().abs().sum((0, 2, 3)) * h.pow(2).sum((0, 2, 3)).sqrt()
    torch.testing.assert_close(imp(group), expected, rtol=RTOL, atol=1e-7)


# ------------------------------------------------------------------------ bias compensation


def _output_mean(model: nn.Module, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b).reshape(-1, 2) for b in batches]).mean(0)


def test_flap_bias_compensation_keeps_the_output_mean() -> None:
    model, batches = _block()
    dense = _output_mean(model, batches)
    pruner = Pruner(model, batches[0], importance=FLAPImportance(), pruning_ratio=0.5)
    pruner.importance.calibrate(model, batches)
    pruner.step()
    assert model.down.in_features == 3
    torch.testing.assert_close(_output_mean(model, batches), dense, rtol=0, atol=1e-5)

    # without compensation the mean moves (the test can fail)
    plain, _ = _block()
    pruner = Pruner(plain, batches[0], importance=FLAPImportance(compensate=False), pruning_ratio=0.5)
    pruner.importance.calibrate(plain, batches)
    pruner.step()
    assert (_output_mean(plain, batches) - dense).abs().max() > 1e-3


def test_flap_adds_a_bias_only_when_asked_and_reloads_with_add_biases(tmp_path: Path) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 8) for _ in range(3)]

    def mlp_mean(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([m(b).reshape(-1, 8) for b in batches]).mean(0)

    torch.manual_seed(1)
    skipped = LlamaMLP(8, 16)
    pruner = Pruner(skipped, batches[0], importance="flap", pruning_ratio=0.5)
    pruner.importance.calibrate(skipped, batches)
    with pytest.warns(UserWarning, match="no bias"):
        pruner.step()
    assert skipped.down_proj.bias is None

    torch.manual_seed(1)
    model = LlamaMLP(8, 16)
    dense = mlp_mean(model)
    flap = FLAPImportance(add_bias=True)
    pruner = Pruner(model, batches[0], importance=flap, pruning_ratio=0.5)
    flap.calibrate(model, batches)
    pruner.step()
    assert model.down_proj.bias is not None and flap.added_biases == ["down_proj"]
    torch.testing.assert_close(mlp_mean(model), dense, rtol=0, atol=1e-5)

    # the history records the new bias: load_pruned gives a fresh model one before the weights load
    path = tmp_path / "flap.pt"
    save_pruned(model, path)
    fresh = load_pruned(LlamaMLP(8, 16), path)
    torch.testing.assert_close(mlp_mean(fresh), mlp_mean(model), rtol=0, atol=0)
    # a file without that record (written before it existed) needs add_biases() first
    old = torch.load(path, weights_only=True)
    old["history"] = [r for r in old["history"] if r.get("kind") != "add_bias"]
    with pytest.raises(ValueError):
        load_pruned(LlamaMLP(8, 16), old)
    fresh = LlamaMLP(8, 16)
    assert add_biases(fresh, flap.added_biases) == ["down_proj"]
    load_pruned(fresh, old)
    torch.testing.assert_close(mlp_mean(fresh), mlp_mean(model), rtol=0, atol=0)


def test_compensation_is_part_of_the_step_transaction() -> None:
    """A dry run (preview) prunes and compensates inside the step's transaction, then rolls it
    all back: weights, bias and the criterion's statistics are as before, and the real step
    then compensates as usual."""
    model, batches = _block()
    bias = model.down.bias.detach().clone()
    weight = model.down.weight.detach().clone()
    flap = FLAPImportance()
    pruner = Pruner(model, batches[0], importance=flap, pruning_ratio=0.5)
    flap.calibrate(model, batches)
    preview = pruner.preview()
    assert len(preview.steps) == 1
    assert torch.equal(model.down.bias, bias) and torch.equal(model.down.weight, weight)
    dense = _output_mean(model, batches)
    pruner.step()
    torch.testing.assert_close(_output_mean(model, batches), dense, rtol=0, atol=1e-5)


def test_pruned_model_reloads_with_compensated_existing_bias(tmp_path: Path) -> None:
    model, batches = _block()
    pruner = Pruner(model, batches[0], importance="flap", pruning_ratio=0.5)
    pruner.importance.calibrate(model, batches)
    pruner.step()
    save_pruned(model, tmp_path / "m.pt")
    fresh = load_pruned(Block(), tmp_path / "m.pt")
    torch.testing.assert_close(_output_mean(fresh, batches), _output_mean(model, batches), rtol=0, atol=0)


# ------------------------------------------------------------------------ LLMs, grouped-query attention


def _tiny_llama() -> tuple[TinyLlama, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyLlama(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randint(0, 64, (2, 16), generator=gen) for _ in range(3)]


@pytest.mark.parametrize("name", ["wanda", "flap"])
def test_tiny_llama_heads_and_mlp_channels_under_gqa(name: str) -> None:
    model, batches = _tiny_llama()
    macs0, _ = count_macs_and_params(model, batches[0])
    pruner = Pruner(
        model,
        batches[0],
        importance=name,
        pruning_ratio=0.5,
        prune_num_heads=True,
        head_pruning_ratio=0.5,
        ignored_layers=RESIDUAL,
    )
    # the hand score of layer 0's MLP channels, from its own record of down_proj's inputs
    seen: list[torch.Tensor] = []
    down = model.layers[0].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, 64)))
    pruner.importance.calibrate(model, batches)
    handle.remove()
    h = torch.cat(seen)
    w = down.weight.detach().clone()
    if name == "wanda":
        hand = w.abs().sum(0) * h.pow(2).sum(0).sqrt()
    else:
        hand = h.var(0) * w.pow(2).sum(0)
    keep = torch.sort(torch.topk(hand, 32).indices).values
    if name == "flap":  # no bias in this Llama: compensation skipped with one warning
        with pytest.warns(UserWarning, match="compensation skipped for layers.0.self_attn.o_proj"):
            pruner.step()
    else:
        pruner.step()

    attn = model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)  # one key/value head and its 2 query heads
    assert model.layers[0].mlp.gate_proj.out_features == 32
    torch.testing.assert_close(down.weight.detach(), w[:, keep])  # the top-scored channels stayed
    macs1, _ = count_macs_and_params(model, batches[0])
    assert macs1 < 0.75 * macs0
    with torch.no_grad():
        assert math.isfinite(float(model(batches[0]).sum()))
    assert down.bias is None


@pytest.mark.parametrize("name", ["wanda", "flap"])
def test_hf_llama_gqa(name: str) -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = tf.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128, (2, 12), generator=gen)} for _ in range(2)]
    macs0, _ = count_macs_and_params(model, batches[0])
    imp = get_importance(name, **({"add_bias": True} if name == "flap" else {}))
    pruner = Pruner(
        model,
        batches[0],
        importance=imp,
        pruning_ratio=0.5,
        prune_num_heads=True,
        head_pruning_ratio=0.5,
        ignored_layers=HF_RESIDUAL,
    )
    with torch.no_grad():
        dense_logits = model(**batches[0]).logits
    imp.calibrate(model, batches)
    pruner.step()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16  # 2 query heads, 1 kv head
    assert model.model.layers[0].mlp.up_proj.out_features == 64
    assert count_macs_and_params(model, batches[0])[0] < 0.75 * macs0
    with torch.no_grad():
        logits = model(**batches[0]).logits
    assert logits.shape == dense_logits.shape and torch.isfinite(logits).all()
    if name == "flap":
        assert model.model.layers[0].mlp.down_proj.bias is not None
        assert model.model.layers[0].self_attn.o_proj.bias is not None


# ------------------------------------------------------------------------ by name, state, training loops


def test_by_name_everywhere_and_error_without_statistics() -> None:
    assert {"wanda", "flap"} <= set(IMPORTANCES)
    assert isinstance(get_importance("wanda"), WandaImportance)
    assert isinstance(get_importance("FLAP"), FLAPImportance)
    assert PruningSettings(importance="wanda").importance == "wanda"
    assert isinstance(StructuredPruning("flap", pruning_ratio=0.5, verbose=False).importance, FLAPImportance)

    model, batches = _block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model, batches[0], importance="wanda", pruning_ratio=0.5)
    assert isinstance(pruner.importance, CalibrationImportance)
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # rolled back
    pruner.importance.calibrate(model, batches)
    pruner.step()
    assert model.up.out_features == 3


def test_state_dict_round_trip() -> None:
    model, batches = _block()
    group = _root_group(model, batches[0], model.up)
    imp = FLAPImportance()
    imp.calibrate(model, batches)
    state = imp.state_dict(model)
    assert set(state["stats"]) == {"up", "down"}
    other = FLAPImportance()
    other.load_state_dict(state, model)
    torch.testing.assert_close(other(group), imp(group), rtol=0, atol=0)


def test_training_loop_accumulate_records_the_following_forwards() -> None:
    """``accumulate`` (what the callbacks call after backward) puts the hooks on; the pruner's
    step compensates, resets and takes them off."""
    model, batches = _block()
    imp = WandaImportance()
    pruner = Pruner(model, batches[0], importance=imp, pruning_ratio=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for b in batches * 2:
        loss = model(b).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        imp.accumulate(model)
        opt.step()
    assert imp.num_batches == 3  # the first forward ran before the hooks were on
    pruner.step()
    assert imp.num_batches == 0 and not imp.attached
    assert not model.down._forward_pre_hooks and model.up.out_features == 3


def test_callback_one_epoch_with_wanda(tmp_path: Path) -> None:
    module = LitNet()
    callback = StructuredPruning("wanda", pruning_ratio=0.5, epochs=[0], verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu_trainer(tmp_path, [callback], max_epochs=1).fit(module, random_loader(n=32, batch_size=8))
    assert callback.steps_done == 1
    assert module.model.conv1.out_channels == 8 and module.model.conv2.out_channels == 8
    assert not callback.importance.attached
    with torch.no_grad():
        assert math.isfinite(float(module(torch.randn(1, 3, 8, 8)).sum()))


def test_readme_snippet() -> None:
    """The python block of README.md's "### Calibration criteria" section, as written."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"^### Calibration criteria\b.*?```python\n(.*?)```", readme, flags=re.S | re.M)
    assert match, "README.md has no Calibration criteria section with a python snippet"
    namespace: dict = {"__name__": "readme"}
    exec(compile(match.group(1), "README.md#calibration-criteria", "exec"), namespace)
    mlp, attention = namespace["mlp"], namespace["attention"]
    assert (mlp.up_proj.out_features, attention.q_proj.out_features) == (64, 32)
    assert namespace["pruner"].importance.num_batches == 0  # the step used the statistics, then forgot them


def test_readme_block_by_block_snippet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second python block of that section (sequential FLAP, saved and reloaded), as written,
    after the first (it reuses its batches and names)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.search(r"^### Calibration criteria\b(.*?)^## ", readme, flags=re.S | re.M)
    assert section, "README.md has no Calibration criteria section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S)
    assert len(blocks) == 2, "expected the one-shot and the block-by-block snippets"
    monkeypatch.chdir(tmp_path)  # the snippet writes flap.pt
    namespace: dict = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md#calibration-criteria-{i}", "exec"), namespace)
    model, fresh = namespace["model"], namespace["fresh"]
    assert model.layers[0].mlp.down_proj.bias is not None  # FLAP gave it one, the history rebuilt it
    assert fresh.layers[1].mlp.up_proj.out_features == 64
    x = namespace["batches"][0]
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
