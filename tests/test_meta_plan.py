"""Meta-first pruning (``pruning/plan.py``): a plan made on a meta copy and applied to the real
weights layer by layer gives what pruning the real model directly gives, bit for bit; a plan for
another model is refused before anything changes; an interrupted apply changes nothing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from prune_callbacks import Pruner, get_pruning_history, load_pruned, save_pruned
from prune_callbacks.layers import track_parameter_updates
from prune_callbacks.layers.linear import LinearPruner
from prune_callbacks.pruning.plan import PruningPlan, apply_plan, make_plan, meta_skeleton
from prune_callbacks.reference.models.llama import TinyLlama
from prune_callbacks.reference.models.resnet import cifar_resnet


def _tiny_llama() -> nn.Module:
    return TinyLlama(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


def _hf_llama_gqa() -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaForCausalLM(config).eval()


def _cnn() -> nn.Module:
    model = cifar_resnet(8)
    with torch.no_grad():  # BN scales and statistics that differ per channel
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))


def _images() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


LLM_KW: dict[str, Any] = {"pruning_ratio": 0.5, "prune_num_heads": True, "head_pruning_ratio": 0.5}
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], str, dict[str, Any]]] = {
    "tiny_llama": (_tiny_llama, _tokens, "l2", LLM_KW),
    "hf_llama_gqa": (_hf_llama_gqa, _tokens, "l2", LLM_KW),
    "tiny_llama_speedup": (_tiny_llama, _tokens, "l2", {"target_speedup": 1.5}),  # MACs counted on meta
    "resnet": (_cnn, _images, "l1", {"pruning_ratio": 0.5}),
    "resnet_lamp_global": (_cnn, _images, "lamp", {"pruning_ratio": 0.4, "global_pruning": True}),
    "resnet_bn_scale": (_cnn, _images, "bn_scale", {"pruning_ratio": 0.3}),
}


def _twins(build: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = build()
    torch.manual_seed(0)
    b = build()
    return a, b


def _assert_bitwise_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k].view(-1).view(torch.uint8), sb[k].view(-1).view(torch.uint8)), k


def _assert_same_sizes(a: nn.Module, b: nn.Module) -> None:
    """Every int / tuple size attribute of every module, and of the config a model holds, agrees."""

    def sizes(obj: Any) -> dict[str, Any]:
        return {k: v for k, v in vars(obj).items() if isinstance(v, (int, tuple)) and not isinstance(v, bool)}

    for (name, ma), (_, mb) in zip(a.named_modules(), b.named_modules()):
        assert sizes(ma) == sizes(mb), name
    if hasattr(a, "config"):
        assert sizes(a.config) == sizes(b.config)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape, k
        assert torch.equal(after[k], v), k
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert get_pruning_history(model) == []


@pytest.mark.parametrize("case", list(CASES))
def test_plan_on_meta_copy_equals_pruning_the_real_model(case: str) -> None:
    build, inputs, importance, kwargs = CASES[case]
    direct, real = _twins(build)
    x = inputs()
    Pruner(direct, x, importance=importance, **kwargs).step()
    assert get_pruning_history(direct), "the reference prune removed nothing"

    plan = make_plan(real, x, importance=importance, **kwargs)
    assert get_pruning_history(real) == [] and all(p.device.type == "cpu" for p in real.parameters())
    plan = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))  # plain data, through JSON
    params = {n: id(p) for n, p in real.named_parameters()}
    apply_plan(real, plan, example_inputs=x)

    assert get_pruning_history(real) == get_pruning_history(direct)
    _assert_bitwise_equal(real, direct)
    assert {n: id(p) for n, p in real.named_parameters()} == params  # pruned in place
    _assert_same_sizes(real, direct)
    with torch.no_grad():
        out_a, out_b = real(x), direct(x)
    out_a = out_a.logits if hasattr(out_a, "logits") else out_a
    out_b = out_b.logits if hasattr(out_b, "logits") else out_b
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("case", ["tiny_llama", "hf_llama_gqa"])
def test_plan_from_a_model_built_on_meta_with_scores_from_a_state_dict(case: str) -> None:
    build, inputs, importance, kwargs = CASES[case]
    direct, real = _twins(build)
    x = inputs()
    Pruner(direct, x, importance=importance, **kwargs).step()
    with torch.device("meta"):
        meta = build()
    plan = make_plan(meta, x, scores_from=real.state_dict(), importance=importance, **kwargs)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert get_pruning_history(meta) == []  # the user's meta model is not pruned either
    apply_plan(real, plan, example_inputs=x)
    assert get_pruning_history(real) == get_pruning_history(direct)
    _assert_bitwise_equal(real, direct)


def test_applied_plan_saves_and_loads_like_a_pruner_step(tmp_path: Any) -> None:
    direct, real = _twins(_tiny_llama)
    x = _tokens()
    apply_plan(real, make_plan(real, x, **LLM_KW), example_inputs=x)
    save_pruned(real, tmp_path / "m.pt")
    torch.manual_seed(5)
    fresh = _tiny_llama()
    load_pruned(fresh, tmp_path / "m.pt", example_inputs=x)
    _assert_bitwise_equal(fresh, real)


def test_plan_saves_as_json(tmp_path: Any) -> None:
    model = _tiny_llama()
    plan = make_plan(model, _tokens(), importance="random", **LLM_KW)
    plan.save(tmp_path / "plan.json")
    again = PruningPlan.load(tmp_path / "plan.json")
    assert again == plan
    dense, pruned = plan.parameter_counts()
    assert pruned < dense


def test_random_criterion_needs_no_values() -> None:
    with torch.device("meta"):
        meta = _tiny_llama()
    plan = make_plan(meta, _tokens(), importance=Pruner_random(), **LLM_KW)
    assert plan.history and plan.pruned_shapes != plan.dense_shapes


def Pruner_random() -> Any:  # noqa: N802 - a seeded criterion object
    from prune_callbacks.pruning.importance import RandomImportance

    return RandomImportance(seed=0)


@pytest.mark.parametrize("criterion", ["taylor", "fisher", "obd", "hessian"])
def test_gradient_criteria_are_refused_with_a_clear_error(criterion: str) -> None:
    with pytest.raises(ValueError, match="gradient criteria .* not supported when planning on meta"):
        make_plan(_tiny_llama(), _tokens(), importance=criterion, **LLM_KW)


@pytest.mark.parametrize("criterion", ["wanda", "flap"])
def test_calibration_criteria_are_refused_with_a_clear_error(criterion: str) -> None:
    from prune_callbacks.pruning.importance import get_importance

    try:
        get_importance(criterion)
    except ValueError:
        pytest.skip(f"no {criterion!r} criterion in this build")
    with pytest.raises(ValueError, match="calibration criteria are not supported when planning on meta"):
        make_plan(_tiny_llama(), _tokens(), importance=criterion, **LLM_KW)


def test_meta_model_without_scores_from_is_refused() -> None:
    with torch.device("meta"):
        meta = _tiny_llama()
    with pytest.raises(ValueError, match="pass scores_from="):
        make_plan(meta, _tokens(), **LLM_KW)


def test_scores_from_another_model_is_refused() -> None:
    with torch.device("meta"):
        meta = _tiny_llama()
    other = TinyLlama(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    with pytest.raises(ValueError, match="other shapes for"):
        make_plan(meta, _tokens(), scores_from=other, **LLM_KW)


def test_several_steps_are_refused_for_value_criteria() -> None:
    with pytest.raises(ValueError, match="a plan is one step"):
        make_plan(_tiny_llama(), _tokens(), pruning_ratio=0.5, iterative_steps=2)


def test_real_modules_in_pruner_arguments_are_mapped_to_the_copy() -> None:
    direct, real = _twins(_tiny_llama)
    x = _tokens()
    ignored = [direct.layers[0].mlp]
    Pruner(direct, x, importance="l2", ignored_layers=ignored, **LLM_KW).step()
    plan = make_plan(real, x, ignored_layers=[real.layers[0].mlp], **LLM_KW)
    apply_plan(real, plan)
    assert get_pruning_history(real) == get_pruning_history(direct)
    _assert_bitwise_equal(real, direct)


def test_plan_for_another_model_is_refused_before_anything_changes() -> None:
    x = _tokens()
    plan = make_plan(_tiny_llama(), x, **LLM_KW)
    wider = TinyLlama(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256)
    deeper = TinyLlama(vocab_size=64, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128)
    for target, match in ((wider, "other shapes"), (deeper, "not in the plan")):
        before, params = _state_copy(target), {n: id(p) for n, p in target.named_parameters()}
        with pytest.raises(ValueError, match=match):
            apply_plan(target, plan, example_inputs=x)
        _assert_unchanged(target, before, params)
    cnn = _cnn()
    before, params = _state_copy(cnn), {n: id(p) for n, p in cnn.named_parameters()}
    with pytest.raises(ValueError, match="made for a TinyLlama"):
        apply_plan(cnn, plan)
    _assert_unchanged(cnn, before, params)


def test_damaged_plan_is_refused_before_anything_changes() -> None:
    x = _tokens()
    model = _tiny_llama()
    plan = make_plan(model, x, **LLM_KW).to_dict()
    plan["history"][0]["items"][-1]["target"] = "layers.7.mlp.up_proj"
    before, params = _state_copy(model), {n: id(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="does not replay"):
        apply_plan(model, plan, example_inputs=x)
    _assert_unchanged(model, before, params)
    with pytest.raises(ValueError, match="not a pruning plan"):
        apply_plan(model, {"history": []})


def test_a_model_already_pruned_is_refused() -> None:
    x = _tokens()
    model = _tiny_llama()
    plan = make_plan(model, x, **LLM_KW)
    apply_plan(model, plan)
    with pytest.raises(ValueError, match="pruning record"):
        apply_plan(model, plan)


@pytest.mark.parametrize("after", [1, 5, 11])
def test_interrupt_mid_apply_leaves_the_model_unchanged(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    x = _tokens()
    model = _tiny_llama()
    plan = make_plan(model, x, **LLM_KW)
    before = _state_copy(model)
    params = {n: id(p) for n, p in model.named_parameters()}
    attrs = {n: dict(vars(m)) for n, m in model.named_modules() if hasattr(m, "num_heads")}
    calls = {"n": 0, "pruned_before_interrupt": 0}
    real_out = LinearPruner.prune_out_channels
    real_in = LinearPruner.prune_in_channels

    def count(layer: nn.Module) -> None:
        if layer.weight.device.type == "meta":
            return  # the dry run on the meta copy
        calls["n"] += 1
        if calls["n"] > after:
            shapes = {n: p.shape for n, p in model.named_parameters()}
            calls["pruned_before_interrupt"] = sum(shapes[n] != before[n].shape for n in shapes)
            raise KeyboardInterrupt

    def out(self: Any, layer: nn.Module, idxs: Any) -> nn.Module:
        count(layer)
        return real_out(self, layer, idxs)

    def inn(self: Any, layer: nn.Module, idxs: Any) -> nn.Module:
        count(layer)
        return real_in(self, layer, idxs)

    monkeypatch.setattr(LinearPruner, "prune_out_channels", out)
    monkeypatch.setattr(LinearPruner, "prune_in_channels", inn)
    with track_parameter_updates() as log, pytest.raises(KeyboardInterrupt):
        apply_plan(model, plan)
    assert calls["n"] == after + 1  # it did stop mid-way, with layers of the real model already pruned
    assert calls["pruned_before_interrupt"] >= after
    assert log == []
    _assert_unchanged(model, before, params)
    for n, m in model.named_modules():
        if n in attrs:
            assert {k: vars(m)[k] for k in ("num_heads", "num_kv_heads", "head_dim")} == {
                k: attrs[n][k] for k in ("num_heads", "num_kv_heads", "head_dim")
            }
    monkeypatch.undo()
    apply_plan(model, plan, example_inputs=x)  # and the plan still applies afterwards
    assert get_pruning_history(model) == plan.history


def test_apply_keeps_only_removed_entries_for_undo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer by layer: when the last layer is pruned, the tensors held for the undo are the
    removed entries (no old parameter is held whole), so undo + pruned model <= dense model."""
    from prune_callbacks.pruning import plan as plan_module

    x = _tokens()
    model = _tiny_llama()
    plan = make_plan(model, x, **LLM_KW)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seen: dict[str, int] = {}
    original = plan_module._LayerUndo.rollback

    def spy(self: Any) -> None:
        whole = sum(len(e[1]) for e in self.entries if e[0] == "layer")
        layers = [e for e in self.entries if e[0] == "layer"]
        removed = sum(s[3].numel() * s[3].element_size() for e in layers for _, st, _ in e[2] for s in st)
        seen.update(whole=whole, removed=removed)
        original(self)

    monkeypatch.setattr(plan_module._LayerUndo, "rollback", spy)

    def stop(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    # interrupt at the final shape check: every layer is pruned by then
    monkeypatch.setattr(plan_module, "_shapes", _shapes_then(stop, plan_module._shapes))
    with pytest.raises(KeyboardInterrupt):
        apply_plan(model, plan)
    pruned_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert seen["whole"] == 0
    names = dict(model.named_parameters())
    kept_after = sum(torch.Size(s).numel() * 4 for k, s in plan.pruned_shapes.items() if k in names)
    assert seen["removed"] == dense_bytes - kept_after > 0
    assert pruned_bytes == dense_bytes  # rolled back


def _shapes_then(stop: Callable[..., None], shapes: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """``_shapes`` that raises on its 3rd call: 1 in the fit check, 2 after the meta replay, 3 at
    the end of the real apply."""
    calls = {"n": 0}

    def wrapped(model: nn.Module) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            stop()
        return shapes(model)

    return wrapped


def test_meta_skeleton_copies_no_values() -> None:
    model = _cnn()
    skeleton = meta_skeleton(model)
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert all(p.device.type == "cpu" for p in model.parameters())
    tied = copy.deepcopy(_tiny_llama())
    tied.lm_head.weight = tied.embed_tokens.weight
    sk = meta_skeleton(tied)
    assert sk.lm_head.weight is sk.embed_tokens.weight


def test_the_callers_update_log_gets_the_real_changes_only() -> None:
    x = _tokens()
    model = _tiny_llama()
    with track_parameter_updates() as log:
        plan = make_plan(model, x, **LLM_KW)
        assert log == []  # the meta copy's prunes are not the caller's
        apply_plan(model, plan, example_inputs=x)
    own = {id(p) for p in model.parameters()}
    assert log and all(id(p) in own and p.device.type == "cpu" for p, _, _ in log)


@pytest.mark.parametrize("sampled", [False, True])
def test_removed_entries_rebuild_the_old_tensor_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, sampled: bool
) -> None:
    from prune_callbacks.pruning import plan as plan_module

    if sampled:
        monkeypatch.setattr(plan_module, "_FULL_CHECK_ENTRIES", 0)
    old = torch.randn(40, 24, 3).to(torch.bfloat16)
    old[3, 5, 0] = float("nan")
    keep = torch.tensor([0, 2, 3, 7, 11, 23])
    select = lambda t: t.index_select(1, keep)  # noqa: E731 - a pruning function's shape
    new = select(old)
    steps = plan_module._removed(old, new, [(tuple(old.shape), select)])
    assert steps is not None and steps[0][0] == 1 and torch.equal(steps[0][1], keep)
    rebuilt = plan_module._rebuild(new, steps)
    assert torch.equal(rebuilt.view(torch.int16), old.view(torch.int16))
    # a function that does more than select cannot be undone from slices: the caller keeps it whole
    scaled = lambda t: t.index_select(1, keep) * 2  # noqa: E731
    assert plan_module._removed(old, scaled(old), [(tuple(old.shape), scaled)]) is None
    assert plan_module._removed(old, new, []) is None


def test_sampled_check_still_gives_an_exact_apply_and_rollback(monkeypatch: pytest.MonkeyPatch) -> None:
    from prune_callbacks.pruning import plan as plan_module

    monkeypatch.setattr(plan_module, "_FULL_CHECK_ENTRIES", 0)
    direct, real = _twins(_tiny_llama)
    x = _tokens()
    Pruner(direct, x, importance="l2", **LLM_KW).step()
    plan = make_plan(real, x, **LLM_KW)
    before = _state_copy(real)
    params = {n: id(p) for n, p in real.named_parameters()}
    shapes = plan_module._shapes
    monkeypatch.setattr(plan_module, "_shapes", _shapes_then(_interrupt, shapes))
    with pytest.raises(KeyboardInterrupt):
        apply_plan(real, plan)
    _assert_unchanged(real, before, params)
    monkeypatch.setattr(plan_module, "_shapes", shapes)
    apply_plan(real, plan, example_inputs=x)
    _assert_bitwise_equal(real, direct)


def _interrupt(*args: Any, **kwargs: Any) -> None:
    raise KeyboardInterrupt


class _MHANet(nn.Module):
    """nn.MultiheadAttention: its pruning rescales the query rows, which is not a plain selection."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a + h)


def test_layers_pruned_by_more_than_a_selection_are_undone_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from prune_callbacks.pruning import plan as plan_module

    direct, real = _twins(_MHANet)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    Pruner(direct, x, importance="l2", pruning_ratio=0.25).step()
    plan = make_plan(real, x, pruning_ratio=0.25)
    before = _state_copy(real)
    params = {n: id(p) for n, p in real.named_parameters()}
    held: dict[str, int] = {}
    rollback = plan_module._LayerUndo.rollback

    def spy(self: Any) -> None:
        held["whole"] = sum(len(e[1]) for e in self.entries if e[0] == "layer")
        rollback(self)

    monkeypatch.setattr(plan_module._LayerUndo, "rollback", spy)
    shapes = plan_module._shapes
    monkeypatch.setattr(plan_module, "_shapes", _shapes_then(_interrupt, shapes))
    with pytest.raises(KeyboardInterrupt):
        apply_plan(real, plan)
    assert held["whole"] >= 1  # the attention's in-projection: kept whole for the undo
    _assert_unchanged(real, before, params)
    monkeypatch.setattr(plan_module, "_shapes", shapes)
    apply_plan(real, plan, example_inputs=x)
    assert get_pruning_history(real) == get_pruning_history(direct)
    _assert_bitwise_equal(real, direct)


def test_readme_snippet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The python block of README.md's "Big models: plan on meta, apply in place" section, as written."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"^## Big models: plan on meta\b.*?```python\n(.*?)```", readme, flags=re.S | re.M)
    assert match, "README.md has no 'Big models' section with a python snippet"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(match.group(1), "README.md#big-models", "exec"), namespace)
    attention = namespace["attention"]
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (32, 16)
    assert (tmp_path / "plan.json").is_file()
