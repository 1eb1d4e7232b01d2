"""Pruned models deploy: ONNX export (both of torch's exporters) and ``torch.export``, ONNX Runtime
outputs equal to PyTorch, and int8 quantisation after pruning.

Three pruned models: a CIFAR ResNet-20 (residual adds across a stage), a Hugging Face
``ViTForImageClassification`` with heads pruned and a Hugging Face Llama with grouped-query
attention, heads pruned. Each is exported on a batch of 1 and run in ONNX Runtime at batch 1 and
at another batch size (the batch dimension is dynamic); outputs must equal PyTorch's within
``atol=1e-4, rtol=1e-4`` (float32; the differences measured are about 1e-7).

Quantisation: dynamic int8 (``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``), the FX
static flow (``prepare_fx``/``convert_fx``, x86 qconfig) and the PT2E static flow (``torch.export``
+ ``prepare_pt2e``/``convert_pt2e`` with ``X86InductorQuantizer``; in torch 2.13 it lives in
``torchao``, so that test is skipped without it). Quantised outputs must stay within 10% (relative
L2 error) of the float pruned model's.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from prune_callbacks import Pruner
from prune_callbacks.graph.tracing import call_model, flatten_tensors
from prune_callbacks.reference.models import TinyViT, cifar_resnet

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from prune_callbacks.measure.export import (  # noqa: E402 - after the importorskip
    INSTALL_HINT,
    check_onnx,
    export_onnx,
    onnx_feeds,
    onnx_input_names,
    onnxruntime_latency,
    onnxruntime_outputs,
    onnxruntime_session,
)

ROOT = Path(__file__).resolve().parents[1]
ATOL = RTOL = 1e-4
#: Relative L2 error allowed between a quantised model and the float pruned model.
QUANT_TOLERANCE = 0.1


def _prune(model: nn.Module, example: Any, **kw: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Pruner(model, example, "l2", pruning_ratio=0.5, **kw).step()
    return model.eval()


def _convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _run(model: nn.Module, example: Any) -> torch.Tensor:
    with torch.no_grad():
        return flatten_tensors(call_model(model, example))[0]


class Case:
    """A pruned model, its example input (batch 1) and a maker of inputs of another batch size."""

    def __init__(self, dense: nn.Module, model: nn.Module, example: Any, batch: Callable[[int], Any]) -> None:
        self.dense = dense
        self.model = model
        self.example = example
        self.batch = batch


def _resnet() -> Case:
    torch.manual_seed(0)
    dense = cifar_resnet(20).eval()
    x = torch.randn(1, 3, 32, 32)
    model = _prune(copy.deepcopy(dense), x)
    assert _convs(model)[1].out_channels < _convs(dense)[1].out_channels
    return Case(dense, model, x, lambda b: torch.randn(b, 3, 32, 32))


def _vit() -> Case:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    dense = tf.ViTForImageClassification(config).eval()
    x = torch.randn(1, 3, 32, 32)
    model = _prune(copy.deepcopy(dense), x, prune_num_heads=True, head_pruning_ratio=0.5)
    q_dense = dense.get_submodule("vit.layers.0.attention.q_proj")
    q = model.get_submodule("vit.layers.0.attention.q_proj")
    assert q.out_features < q_dense.out_features  # heads were pruned
    return Case(dense, model, x, lambda b: torch.randn(b, 3, 32, 32))


def _llama() -> Case:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    dense = tf.LlamaForCausalLM(config).eval()

    def tokens(b: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (b, 8))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    example = tokens(1)
    model = _prune(copy.deepcopy(dense), example, prune_num_heads=True, head_pruning_ratio=0.5)
    attn, attn_dense = model.model.layers[0].self_attn, dense.model.layers[0].self_attn
    assert attn.k_proj.out_features < attn_dense.k_proj.out_features  # key/value heads were pruned
    assert attn.q_proj.out_features // attn.k_proj.out_features == 2  # still 2 query heads per kv head
    return Case(dense, model, example, tokens)


BUILDERS = {"resnet20": _resnet, "hf_vit": _vit, "hf_llama_gqa": _llama}
_CASES: dict[str, Case] = {}


def case(name: str) -> Case:
    """The pruned model of ``name``, built once per test session."""
    if name not in _CASES:
        _CASES[name] = BUILDERS[name]()
    return _CASES[name]


# ---------------------------------------------------------------------------------------------- ONNX


#: The torch.export-based exporter takes 5-10 s of CPU per model: the HF models' runs are slow tests.
EXPORTS = [
    pytest.param(name, dynamo, id=f"{name}-{'dynamo' if dynamo else 'torchscript'}", marks=marks)
    for name in sorted(BUILDERS)
    for dynamo in (True, False)
    for marks in [[pytest.mark.slow] if dynamo and name != "resnet20" else []]
]


@pytest.mark.parametrize(("name", "dynamo"), EXPORTS)
def test_pruned_model_exports_to_onnx_and_runs_in_onnxruntime(
    name: str, dynamo: bool, tmp_path: Path
) -> None:
    if dynamo:
        pytest.importorskip("onnxscript")
    c = case(name)
    path = export_onnx(c.model, c.example, tmp_path / "model.onnx", dynamo=dynamo)
    session = onnxruntime_session(path)
    for inputs in (c.example, c.batch(3)):  # exported at batch 1, the batch dimension is dynamic
        diff = check_onnx(c.model, session, inputs, atol=ATOL, rtol=RTOL)
        assert diff <= ATOL
    # The pruned widths are what ONNX Runtime runs: its output equals the pruned model's, not the dense's.
    got = torch.from_numpy(onnxruntime_outputs(session, c.example)[0])
    assert not torch.allclose(got, _run(c.dense, c.example), atol=ATOL, rtol=RTOL)


def _args_kwargs(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return ((), example) if isinstance(example, dict) else ((example,), {})


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pruned_model_torch_export_equals_eager(name: str) -> None:
    c = case(name)
    args, kwargs = _args_kwargs(c.example)
    program = torch.export.export(c.model, args, kwargs)
    with torch.no_grad():
        exported = flatten_tensors(program.module()(*args, **kwargs))[0]
    torch.testing.assert_close(exported, _run(c.model, c.example), atol=ATOL, rtol=RTOL)


@pytest.mark.slow  # the dynamo tests above already go through torch.export: about 15 s
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_exported_program_converts_to_onnx(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    c = case(name)
    args, kwargs = _args_kwargs(c.example)
    program = torch.export.export(c.model, args, kwargs)
    path = tmp_path / "program.onnx"
    torch.onnx.export(program, f=str(path), input_names=onnx_input_names(c.example))
    assert check_onnx(c.model, path, c.example, atol=ATOL, rtol=RTOL) <= ATOL


def test_check_onnx_fails_when_the_model_changed(tmp_path: Path) -> None:
    c = case("resnet20")
    model = copy.deepcopy(c.model)
    path = export_onnx(model, c.example, tmp_path / "m.onnx", dynamo=False)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    with pytest.raises(ValueError, match="output 0: ONNX Runtime differs from PyTorch by up to 1"):
        check_onnx(model, path, c.example)


def test_input_names_and_feeds_follow_the_call_convention() -> None:
    x = torch.zeros(2, 3)
    assert onnx_input_names(x) == ["input"]
    assert onnx_input_names((x, None, x)) == ["input_0", "input_2"]
    assert onnx_input_names({"input_ids": x, "use_cache": False}) == ["input_ids"]
    feeds = onnx_feeds({"input_ids": x.long(), "attention_mask": x})
    assert list(feeds) == ["input_ids", "attention_mask"] and feeds["input_ids"].dtype.name == "int64"
    with pytest.raises(TypeError, match="example inputs must be a tensor"):
        onnx_input_names(3)


def test_export_restores_training_mode_and_grad(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    export_onnx(model, torch.randn(1, 4), tmp_path / "m.onnx", dynamo=False)
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


class FixedBatch(nn.Module):
    """Reshapes to a literal batch size of 1: it cannot have a dynamic batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).view(1, 2)


@pytest.mark.slow  # three exports with the dynamo exporter: about 8 s
def test_a_model_with_a_fixed_batch_exports_at_the_example_batch(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    import onnx

    model, x = FixedBatch().eval(), torch.randn(1, 4)
    with pytest.warns(UserWarning, match="FixedBatch did not export with a dynamic batch dimension"):
        path = export_onnx(model, x, tmp_path / "m.onnx")
    (graph_input,) = onnx.load(str(path)).graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_value == 1
    assert check_onnx(model, path, x) <= ATOL
    # A batched model keeps its dynamic batch, with no warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(nn.Linear(4, 2), x, tmp_path / "l.onnx")
    assert not [w for w in caught if "did not export" in str(w.message)]
    (graph_input,) = onnx.load(str(path)).graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnxruntime_latency_is_a_positive_median(tmp_path: Path) -> None:
    c = case("resnet20")
    path = export_onnx(c.model, c.example, tmp_path / "m.onnx", dynamo=False)
    t = onnxruntime_latency(path, c.example, warmup=1, repeats=3, threads=1)
    assert 0 < t < 5
    session = onnxruntime_session(path, threads=1)
    assert onnxruntime_latency(session, c.batch(4), warmup=0, repeats=1) > 0  # a session is reused
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        onnxruntime_latency(session, c.example, repeats=0)
    with pytest.raises(ValueError, match="wants inputs"):
        onnxruntime_latency(session, {"pixels": c.example})


def test_missing_onnx_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        onnxruntime_session(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"export_onnx\(dynamo=True\) needs the onnxscript package"):
        export_onnx(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "m.onnx")
    assert INSTALL_HINT == "pip install prune_callbacks[onnx]"


# ---------------------------------------------------------------------------------------------- int8


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _tiny_vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = _prune(TinyViT(image_size=32, patch_size=8, dim=64, depth=2, num_heads=4).eval(), x)
    return model, x


@pytest.mark.parametrize("name", ["tiny_vit", "hf_llama_gqa"])
def test_dynamic_int8_quantisation_after_pruning(name: str) -> None:
    if name == "tiny_vit":
        model, _ = _tiny_vit()
        inputs: Any = torch.randn(4, 3, 32, 32)
    else:
        c = case(name)
        model, inputs = c.model, c.batch(4)
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        quantised = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    layers = [m for m in quantised.modules() if isinstance(m, dynamic)]
    assert [m.out_features for m in layers] == widths  # every pruned Linear, at its pruned width
    error = _relative_error(_run(quantised, inputs), _run(model, inputs))
    assert 0 < error < QUANT_TOLERANCE, error


def test_fx_static_int8_quantisation_after_pruning() -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    c = case("resnet20")
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(c.model), get_default_qconfig_mapping("x86"), (c.example,))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        quantised = convert_fx(prepared)
    convs = [m for m in quantised.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    assert [m.out_channels for m in convs] == [m.out_channels for m in _convs(c.model)]
    x = torch.randn(8, 3, 32, 32, generator=gen)
    error = _relative_error(_run(quantised, x), _run(c.model, x))
    assert 0 < error < QUANT_TOLERANCE, error


class SmallConvNet(nn.Module):
    """Conv-BN-ReLU stem, a residual block and a classifier, each module used once (the PT2E
    x86 quantizer refuses a module called twice, such as ResNet's shared ``self.relu``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.head(self.relu2(x + y))


@pytest.mark.parametrize("name", [pytest.param("small_convnet", marks=pytest.mark.slow), "tiny_vit"])
def test_pt2e_static_int8_quantisation_after_pruning(name: str) -> None:
    pytest.importorskip("torchao.quantization.pt2e", reason="PT2E quantisation moved to torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    if name == "tiny_vit":
        model, _ = _tiny_vit()
    else:
        torch.manual_seed(0)
        model = _prune(SmallConvNet().eval(), torch.randn(1, 3, 32, 32))
        assert model.conv1.out_channels < 16
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    program = torch.export.export(copy.deepcopy(model), (x,)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(program, quantizer)
    for _ in range(4):
        prepared(torch.randn(8, 3, 32, 32, generator=gen))
    quantised = convert_pt2e(prepared)
    targets = {str(n.target) for n in quantised.graph.nodes}
    assert any("quantize_per_tensor" in t for t in targets)
    assert any("dequantize_per_channel" in t for t in targets)  # per-channel int8 weights
    error = _relative_error(quantised(x), _run(model, x))
    assert 0 < error < QUANT_TOLERANCE, error


# ---------------------------------------------------------------------------------------------- README


def _deploy_snippet() -> str:
    """The first python block of README.md's "Deploy" section, as written."""
    section = re.search(r"^## Deploy\b.*?(?=^## |\Z)", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    assert section, "README.md has no Deploy section"
    block = re.search(r"```python\n(.*?)```", section.group(0), flags=re.S)
    assert block, "README.md's Deploy section has no python snippet"
    return block.group(1)


def test_readme_deploy_snippet_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_deploy"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_deploy_snippet(), "README.md#deploy", "exec"), namespace)
    assert (tmp_path / "pruned.onnx").is_file()
    assert namespace["max_diff"] <= 1e-4
    assert namespace["ort_ms"] > 0


# ---------------------------------------------------------------------------------------------- benchmarks


def _bench(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_ort_columns_render_and_check_targets() -> None:
    results_md, latency = _bench("results_md"), _bench("latency")
    acc, committed = results_md.load_results()
    assert ("### ONNX Runtime" in results_md.render(acc, committed)) == results_md.has_ort(committed)
    lat = copy.deepcopy(committed)  # the eager columns only
    lat.pop("ort_targets", None)
    for fam in lat["families"]:
        for r in fam["rows"]:
            for key in [k for k in r if k.startswith(("ort_", "onnx_"))]:
                del r[key]
    assert not results_md.has_ort(lat)
    with_ort = copy.deepcopy(lat)
    with_ort["meta"].update(onnxruntime="1.0", onnx_exporter="dynamo")
    for fam in with_ort["families"]:
        for r in fam["rows"]:
            dense = fam["rows"][0]
            r["ort_max_abs_diff"] = 2e-6
            r["ort_latency_ms"] = {bs: t / 2 for bs, t in r["latency_ms"].items()}
            r["ort_speedup"] = {bs: dense["latency_ms"][bs] / t for bs, t in r["latency_ms"].items()}
            r["ort_efficiency"] = {bs: s / r["macs_reduction"] for bs, s in r["ort_speedup"].items()}
    with_ort["families"][1]["rows"][2]["ort_latency_ms"]["1"] = 4321.5
    with_ort["ort_targets"] = latency.check_targets(with_ort["families"], "ort_")
    assert len(with_ort["ort_targets"]) == 2 * len(lat["families"])
    assert all("ONNX Runtime speedup >= 0.8" in t["target"] for t in with_ort["ort_targets"])
    assert latency.check_targets(lat["families"], "ort_") == []  # rows without ORT columns: no targets
    text = results_md.render(acc, with_ort)
    section = text.split("### ONNX Runtime latency against MACs")[1]
    assert "| 4321.5 |" in section and "within 2.0e-06" in section and "ONNX Runtime 1.0" in section
    assert section.count(" — **") == len(with_ort["ort_targets"])
    # The eager table is unchanged by the ORT columns.
    assert text.split("### ONNX Runtime")[0] == results_md.render(acc, lat) + "\n\n"
