"""Hugging Face round trip: a pruned ``PreTrainedModel`` saved with
``prune_callbacks.integrations.hf.save_pretrained`` loads back into its pruned shapes with equal outputs.

Uniform widths (every layer pruned by the same share, heads with it): the rewritten config alone
describes the model, so transformers' own ``from_pretrained`` (auto class and model class) loads
it. Widths that differ between layers (global ranking): ``config.json`` carries the per-layer
structure, this library's ``from_pretrained`` restores it, and transformers' own loader refuses the
folder with a message naming ours. A failed save or load changes nothing.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from prune_callbacks import Pruner, get_pruning_history

tf = pytest.importorskip("transformers")

from helpers import hf_models  # noqa: E402 - after the importorskip
from prune_callbacks.integrations.hf import (  # noqa: E402
    HISTORY_FILE,
    LOADER,
    STRUCTURE_KEY,
    from_pretrained,
    save_pretrained,
    sync_config,
)

HF_MODELS = hf_models()
#: The models of the round trip and the auto class that loads each.
AUTO = {
    "llama_gqa": "AutoModelForCausalLM",
    "qwen2": "AutoModelForCausalLM",
    "mistral": "AutoModelForCausalLM",
    "gpt2": "AutoModelForCausalLM",
    "opt": "AutoModelForCausalLM",
    "bert": "AutoModelForSequenceClassification",
    "vit": "AutoModelForImageClassification",
    "convnext": "AutoModelForImageClassification",
    "resnet": "AutoModelForImageClassification",
}
#: Every layer loses the same share of its channels and of its heads.
UNIFORM = dict(pruning_ratio=0.5, global_pruning=False, prune_num_heads=True, head_pruning_ratio=0.5)
#: Channels ranked across layers: each layer keeps its own number.
PER_LAYER = dict(pruning_ratio=0.5, global_pruning=True, prune_num_heads=True, head_pruning_ratio=0.5)
ATOL = 1e-5
README_SECTION = "Hugging Face models: save_pretrained / from_pretrained"


def _logits(model: torch.nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return (model(**x) if isinstance(x, dict) else model(x)).logits


def _pruned(name: str, settings: dict):
    torch.manual_seed(0)
    build, inputs = HF_MODELS[name]
    model = build().eval()
    x = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # refused groups (see the report of GPT-2 under global ranking)
        Pruner(model, x, "l2", **settings).step()
    return model, x


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def _dense_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return _shapes(HF_MODELS[name][0]())


def _check_same(loaded, model, x) -> float:
    assert type(loaded) is type(model)
    assert _shapes(loaded) == _shapes(model)
    diff = (_logits(loaded.eval(), x) - _logits(model, x)).abs().max().item()
    assert diff <= ATOL, f"outputs differ by {diff}"
    return diff


#: More architectures (Phi-3: fused q/k/v and gate/up projections, head counts the pruner already
#: wrote into the shared config, a head size the config must state once the hidden size is not
#: heads x head size, else the rotary frequencies come out wrong; DistilBERT: dim, hidden_dim,
#: n_heads; Llama with as many key-value heads as heads).
MORE = {
    "phi3": "AutoModelForCausalLM",
    "phi3_gqa": "AutoModelForCausalLM",
    "llama_mha": "AutoModelForCausalLM",
    "distilbert": "AutoModelForSequenceClassification",
}
AUTO_ALL = {**AUTO, **MORE}


@pytest.mark.parametrize("name", [*AUTO, *(pytest.param(n, marks=pytest.mark.slow) for n in MORE)])
def test_uniform_widths_load_with_plain_transformers(name, tmp_path):
    model, x = _pruned(name, UNIFORM)
    assert _shapes(model) != _dense_shapes(name), "nothing was pruned"
    result = save_pretrained(model, tmp_path)
    assert result.uniform, result.differences
    assert result.changed, "the config keeps its dense sizes"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert STRUCTURE_KEY not in saved
    for key, (_, new) in result.changed.items():
        assert saved[key] == new and getattr(model.config, key) == new
    # transformers alone: the auto class and the model class
    _check_same(getattr(tf, AUTO_ALL[name]).from_pretrained(tmp_path), model, x)
    _check_same(type(model).from_pretrained(tmp_path), model, x)
    # this library's loader loads it as well, with the pruning history
    ours = from_pretrained(getattr(tf, AUTO_ALL[name]), tmp_path)
    _check_same(ours, model, x)
    assert get_pruning_history(ours) == json.loads(json.dumps(get_pruning_history(model)))


@pytest.mark.parametrize(
    "name",
    [*AUTO, "phi3_gqa", *(pytest.param(n, marks=pytest.mark.slow) for n in MORE if n != "phi3_gqa")],
)
def test_per_layer_widths_load_with_our_loader(name, tmp_path):
    model, x = _pruned(name, PER_LAYER)
    with pytest.warns(UserWarning, match=re.escape(LOADER)):
        result = save_pretrained(model, tmp_path)
    assert not result.uniform and result.structure
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved[STRUCTURE_KEY]["shapes"], "no per-layer shapes stored"
    auto = getattr(tf, AUTO_ALL[name])
    # transformers alone refuses the folder, naming the loader to use
    for plain in (auto, type(model)):
        with pytest.raises(Exception, match=re.escape(LOADER)):
            plain.from_pretrained(tmp_path)
    ours = from_pretrained(auto, tmp_path)
    _check_same(ours, model, x)
    assert get_pruning_history(ours) == json.loads(json.dumps(get_pruning_history(model)))


def test_a_loaded_per_layer_model_saves_and_loads_again(tmp_path):
    model, x = _pruned("llama_gqa", PER_LAYER)
    with pytest.warns(UserWarning):
        save_pretrained(model, tmp_path / "a")
    first = from_pretrained(tf.LlamaForCausalLM, tmp_path / "a")
    with pytest.warns(UserWarning):
        save_pretrained(first, tmp_path / "b")
    _check_same(from_pretrained(tf.AutoModelForCausalLM, tmp_path / "b"), model, x)


def test_an_unpruned_model_keeps_its_config():
    torch.manual_seed(0)
    model = HF_MODELS["llama_gqa"][0]()
    before = model.config.to_dict()
    result = sync_config(model)
    assert result.uniform and result.changed == {}
    assert model.config.to_dict() == before


def _state(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("settings", [UNIFORM, PER_LAYER], ids=["uniform", "per-layer"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_save_changes_nothing(settings, error, tmp_path, monkeypatch):
    model, x = _pruned("llama_gqa", settings)
    config, values, objects = model.config.to_dict(), _state(model), dict(model.named_parameters())
    target = tmp_path / "out"

    def broken_save(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise error("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with warnings.catch_warnings(), pytest.raises(error):
        warnings.simplefilter("ignore")
        save_pretrained(model, target)
    assert model.config.to_dict() == config  # the config rewrite is undone
    assert dict(model.named_parameters()) == objects
    assert all(torch.equal(t, values[n]) for n, t in model.state_dict().items())
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no folder, no staging left


def test_a_save_into_a_file_is_refused(tmp_path):
    model, _ = _pruned("bert", UNIFORM)
    config = model.config.to_dict()
    target = tmp_path / "file"
    target.write_text("keep")
    with pytest.raises(ValueError, match="not a directory"):
        save_pretrained(model, target)
    assert target.read_text() == "keep" and model.config.to_dict() == config


def _saved_per_layer(tmp_path):
    model, x = _pruned("llama_gqa", PER_LAYER)
    with pytest.warns(UserWarning):
        save_pretrained(model, tmp_path)
    return model, x, json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda e: e["shapes"].update({"model.no_such.weight": [2, 2]}), "does not have"),
        (lambda e: e["attributes"].update({"model": {"__class__": 3}}), "public attribute name"),
        (lambda e: e["attributes"].update({"model.layers.0.mlp": {"act_fn": 3}}), "not a size attribute"),
        (lambda e: e["shapes"].update({"lm_head.weight": "big"}), "not a list of sizes"),
        (lambda e: e.update({"format": "other/9"}), "damaged"),
    ],
    ids=["unknown tensor", "private attribute", "module attribute", "shape", "format"],
)
def test_a_damaged_structure_is_refused_and_loading_still_works(tmp_path, damage, message):
    model, x, saved = _saved_per_layer(tmp_path)
    good = json.dumps(saved)
    damage(saved[STRUCTURE_KEY])
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=message):
        from_pretrained(tf.AutoModelForCausalLM, tmp_path)
    (tmp_path / "config.json").write_text(good)
    _check_same(from_pretrained(tf.AutoModelForCausalLM, tmp_path), model, x)


def test_the_history_file_comes_back_and_a_second_save_drops_stale_files(tmp_path):
    model, x = _pruned("resnet", UNIFORM)
    save_pretrained(model, tmp_path)
    assert (tmp_path / HISTORY_FILE).exists()
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    torch.manual_seed(0)
    dense = HF_MODELS["resnet"][0]().eval()
    save_pretrained(dense, tmp_path)  # unpruned: no history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _check_same(tf.AutoModelForImageClassification.from_pretrained(tmp_path), dense, x)


def test_config_may_not_be_passed(tmp_path):
    with pytest.raises(TypeError, match="config"):
        from_pretrained(tf.AutoModel, tmp_path, config=object())


def _readme_snippet() -> str:
    """The first python block of the README section, as written."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.find(f"## {README_SECTION}")
    assert start >= 0, f"README.md has no section {README_SECTION!r}"
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, "the README section has no python snippet"
    return block.group(1)


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_snippet(), "<README snippet>", "exec"), {"__name__": "readme"})
