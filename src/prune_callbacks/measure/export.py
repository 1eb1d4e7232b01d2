"""Export a (pruned) model to ONNX and time it in ONNX Runtime, the usual CPU deployment target.

A pruned model is an ordinary ``nn.Module`` with smaller layers, so it exports like any other
model; these helpers only take the library's example-input convention (a tensor, a tuple or list
of positional arguments, or a dict of keyword arguments, as in
:func:`~prune_callbacks.graph.tracing.call_model`) and give the graph inputs stable names, so the
same example inputs feed the exported file in ONNX Runtime:

* :func:`export_onnx` writes the file with ``torch.onnx.export`` (the ``torch.export``-based
  exporter by default, the TorchScript one with ``dynamo=False``), with a dynamic batch dimension;
* :func:`onnxruntime_outputs` runs it, :func:`check_onnx` compares it with the PyTorch model;
* :func:`onnxruntime_latency` times it (median of single calls, one thread by default).

``onnx``, ``onnxscript`` and ``onnxruntime`` are optional (``pip install prune_callbacks[onnx]``):
they are imported inside the functions that need them, and a missing one is an ImportError
that says what to install.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..graph.tracing import call_model, flatten_tensors, input_list
from .flops import eval_no_grad

__all__ = [
    "INSTALL_HINT",
    "check_onnx",
    "export_onnx",
    "onnx_feeds",
    "onnx_input_names",
    "onnxruntime_latency",
    "onnxruntime_outputs",
    "onnxruntime_session",
]

#: What to install when an ONNX package is missing.
INSTALL_HINT = "pip install prune_callbacks[onnx]"
#: Loggers of the exporters that report every optimisation pass at INFO level (and torch's
#: registry warnings about torchvision ops): kept at ERROR while :func:`export_onnx` runs.
_CHATTY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")
#: Above this many bytes of parameters the weights go to an external data file (ONNX's protobuf
#: limit is 2 GiB).
_EXTERNAL_DATA_BYTES = 1_800_000_000


def _require(module: str, purpose: str) -> Any:
    """Import an optional package, or raise an ImportError naming it and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the {module} package, which is not installed: {INSTALL_HINT} "
            f"(or pip install onnx onnxruntime onnxscript)"
        ) from exc


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Raise the exporters' loggers to ERROR inside, then give them their levels back; torch's own
    deprecation notice about ``LeafSpec`` (raised by its pytree code during export) is hidden too."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _tensor_items(example_inputs: Any) -> list[tuple[str, torch.Tensor]]:
    """``(graph input name, tensor)`` of every tensor model input, in call order.

    A tensor is ``input``, positional tensors ``input_0``, ``input_1``... (their position among
    the arguments), keyword tensors keep their keyword. Non-tensor arguments are no graph inputs:
    the exporters bake them into the graph.
    """
    example_inputs = input_list(example_inputs)[0]
    if isinstance(example_inputs, torch.Tensor):
        return [("input", example_inputs)]
    if isinstance(example_inputs, Mapping):
        return [(str(k), v) for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
    if isinstance(example_inputs, (tuple, list)):
        return [(f"input_{i}", v) for i, v in enumerate(example_inputs) if isinstance(v, torch.Tensor)]
    raise TypeError(
        f"example inputs must be a tensor, a tuple/list of positional arguments or a dict of keyword "
        f"arguments, got {type(example_inputs).__name__}"
    )


def onnx_input_names(example_inputs: Any) -> list[str]:
    """The graph input names :func:`export_onnx` gives the tensors of ``example_inputs``:
    ``input`` for a single tensor, ``input_<i>`` for positional tensors, the keyword for keyword
    tensors (``input_ids``, ``attention_mask``)."""
    return [name for name, _ in _tensor_items(example_inputs)]


def onnx_feeds(example_inputs: Any) -> dict[str, Any]:
    """``example_inputs`` as ONNX Runtime feeds: ``{graph input name: numpy array}`` (on the CPU)."""
    return {name: t.detach().cpu().numpy() for name, t in _tensor_items(example_inputs)}


def _batched(items: list[tuple[str, torch.Tensor]]) -> set[str]:
    """Inputs whose first dimension is the batch: those as long as the first input's first one."""
    if not items or items[0][1].dim() == 0:
        return set()
    batch = items[0][1].shape[0]
    return {name for name, t in items if t.dim() > 0 and t.shape[0] == batch}


def _widen_batch(example_inputs: Any, batched: set[str]) -> Any:
    """The example inputs with a batch of 1 repeated to 2: ``torch.export`` specialises a
    dimension of size 1 to a constant, which would make a dynamic batch impossible."""

    def widen(name: str, v: Any) -> Any:
        if name in batched and isinstance(v, torch.Tensor) and v.shape[0] == 1:
            return v.expand(2, *v.shape[1:]).clone()
        return v

    if isinstance(example_inputs, torch.Tensor):
        return widen("input", example_inputs)
    if isinstance(example_inputs, Mapping):
        return {k: widen(str(k), v) for k, v in example_inputs.items()}
    return type(example_inputs)(widen(f"input_{i}", v) for i, v in enumerate(example_inputs))


def _dynamic_shapes(example_inputs: Any, batched: set[str]) -> Any:
    """``dynamic_shapes`` for ``torch.export`` with one shared dynamic batch dimension."""
    batch = torch.export.Dim("batch")

    def spec(name: str, v: Any) -> Any:
        return {0: batch} if name in batched and isinstance(v, torch.Tensor) else None

    if isinstance(example_inputs, torch.Tensor):
        return (spec("input", example_inputs),)
    if isinstance(example_inputs, Mapping):
        return {str(k): spec(str(k), v) for k, v in example_inputs.items()}
    return tuple(spec(f"input_{i}", v) for i, v in enumerate(example_inputs))


class _KeywordCall(nn.Module):
    """Calls a model with keyword arguments from positional tensors, for the TorchScript exporter.

    That exporter binds keyword inputs to the whole forward signature and turns defaults it meets
    (Hugging Face's ``logits_to_keep=0``) into extra graph inputs; calling through this wrapper
    makes exactly the given tensors the graph inputs and bakes the other values in.
    """

    def __init__(self, model: nn.Module, keys: list[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys
        self.constants = constants

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.keys, tensors)), **self.constants)


def _export_call(
    model: nn.Module, example_inputs: Any, dynamo: bool
) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any] | None]:
    """The module, positional and keyword arguments ``torch.onnx.export`` is called with."""
    if isinstance(example_inputs, Mapping):
        if dynamo:
            return model, (), dict(example_inputs)
        keys = [str(k) for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
        constants = {str(k): v for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)}
        return _KeywordCall(model, keys, constants), tuple(example_inputs[k] for k in keys), None
    if isinstance(example_inputs, (tuple, list)):
        return model, tuple(example_inputs), None
    return model, (example_inputs,), None


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamo: bool = True,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` and return the path.

    The model is exported in eval mode without autograd (each submodule's mode is restored), on
    ``example_inputs`` in the library's convention (a tensor, positional arguments as a tuple or
    list, keyword arguments as a dict; of :class:`~prune_callbacks.graph.tracing.MultipleInputs`
    the first). Graph inputs are named as :func:`onnx_input_names` says, so
    :func:`onnx_feeds` of the same inputs feeds the file.

    ``dynamo=True`` uses torch's ``torch.export``-based exporter (needs ``onnxscript``),
    ``dynamo=False`` the TorchScript one. With ``dynamic_batch`` the first dimension of every
    input whose first dimension equals the first input's is one dynamic ``batch`` dimension (so
    one file serves every batch size); an example batch of 1 is repeated to 2 for the export,
    since ``torch.export`` would otherwise fix that size to 1. ``external_data=None`` keeps the
    weights in the file unless they exceed about 1.8 GB (then ``<path>.data`` holds them). When
    the exporter fixes the batch anyway (a model that reshapes to a literal batch size), the file
    is exported again at the example's batch size, with a warning. (The TorchScript exporter cannot
    tell: a batch size the model hard-codes is traced as a constant, and the file fails at other
    batch sizes; :func:`check_onnx` at another batch size finds that.) The exporters' progress
    logging is silenced (errors still show).
    """
    if dynamo:
        _require("onnxscript", "export_onnx(dynamo=True)")
    _require("onnx", "export_onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example_inputs = input_list(example_inputs)[0]
    items = _tensor_items(example_inputs)
    batched = _batched(items) if dynamic_batch else set()
    if external_data is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        external_data = weight_bytes > _EXTERNAL_DATA_BYTES
    names = [n for n, _ in items]
    problem = None
    try:
        _export(model, example_inputs, path, names, batched, dynamo, opset_version, external_data)
        fixed = _static_inputs(path, batched)
        if fixed:
            problem = f"inputs {fixed} came out with a fixed first dimension"
    except Exception as exc:
        if not batched:
            raise
        problem = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    if problem is not None:
        # A model that reshapes to a literal batch size, say: export at the example's own batch.
        warnings.warn(
            f"{type(model).__name__} did not export with a dynamic batch dimension ({problem}); exported "
            f"with the example's batch size instead. Pass dynamic_batch=False to skip the attempt.",
            stacklevel=2,
        )
        _export(model, example_inputs, path, names, set(), dynamo, opset_version, external_data)
    return path


def _export(
    model: nn.Module,
    example_inputs: Any,
    path: Path,
    names: list[str],
    batched: set[str],
    dynamo: bool,
    opset_version: int | None,
    external_data: bool,
) -> None:
    """One ``torch.onnx.export`` call (eval mode, no grad, exporters' logging quiet)."""
    if batched and dynamo:
        example_inputs = _widen_batch(example_inputs, batched)
    module, args, kwargs = _export_call(model, example_inputs, dynamo)
    options: dict[str, Any] = {
        "kwargs": kwargs,
        "verbose": False,
        "input_names": names,
        "opset_version": opset_version,
        "dynamo": dynamo,
        "external_data": external_data,
    }
    if dynamo:
        options["dynamic_shapes"] = _dynamic_shapes(example_inputs, batched) if batched else None
    else:
        options["dynamic_axes"] = {name: {0: "batch"} for name in names if name in batched} or None
    with eval_no_grad(model), _quiet_exporters():
        torch.onnx.export(module, args, str(path), **options)


def _static_inputs(path: Path, batched: set[str]) -> list[str]:
    """The inputs meant to have a dynamic batch whose first dimension the file fixes."""
    if not batched:
        return []
    onnx = _require("onnx", "export_onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    fixed = []
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in batched and dims and dims[0].HasField("dim_value"):
            fixed.append(value.name)
    return fixed


def onnxruntime_session(path: str | Path, threads: int | None = 1) -> Any:
    """An ONNX Runtime CPU ``InferenceSession`` on ``path`` with all graph optimisations,
    sequential execution and ``threads`` intra-op threads (None: ONNX Runtime's default, one per
    physical core). One thread gives timings that a busy machine disturbs least."""
    ort = _require("onnxruntime", "ONNX Runtime inference")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _session_and_feeds(session_or_path: Any, example_inputs: Any, threads: int | None) -> tuple[Any, dict]:
    session = (
        onnxruntime_session(session_or_path, threads)
        if isinstance(session_or_path, (str, Path))
        else session_or_path
    )
    feeds = onnx_feeds(example_inputs)
    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise ValueError(
            f"the ONNX graph wants inputs {wanted} but the example inputs give {list(feeds)} "
            f"(missing {missing}); pass inputs like those the file was exported with (export_onnx names "
            f"them as onnx_input_names(example_inputs) does)"
        )
    return session, {n: feeds[n] for n in wanted}  # an input the graph dropped (unused) is not fed


def onnxruntime_outputs(
    session_or_path: Any, example_inputs: Any, threads: int | None = 1
) -> list[Any]:
    """The outputs (numpy arrays, in graph order) of an ONNX file or session on ``example_inputs``."""
    session, feeds = _session_and_feeds(session_or_path, example_inputs, threads)
    return list(session.run(None, feeds))


def check_onnx(
    model: nn.Module,
    session_or_path: Any,
    example_inputs: Any,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> float:
    """Compare ONNX Runtime's outputs with ``model``'s (eval mode, no grad) on ``example_inputs``;
    return the largest absolute difference, or raise a ValueError naming the output that differs
    by more than ``atol + rtol * |expected|``.

    PyTorch outputs are flattened as the exporters flatten them (tuples, lists, dicts and
    dataclasses such as Hugging Face's ``ModelOutput``, ``None`` fields skipped).
    """
    example_inputs = input_list(example_inputs)[0]
    with eval_no_grad(model):
        expected = [t.detach().cpu() for t in flatten_tensors(call_model(model, example_inputs))]
    got = onnxruntime_outputs(session_or_path, example_inputs)
    if len(got) != len(expected):
        raise ValueError(
            f"ONNX Runtime gave {len(got)} outputs, the model {len(expected)}; was the file exported "
            f"from this model?"
        )
    worst = 0.0
    for i, (want, have) in enumerate(zip(expected, got)):
        have_t = torch.from_numpy(have).to(want.dtype)
        if have_t.shape != want.shape:
            raise ValueError(
                f"output {i}: ONNX Runtime gave shape {tuple(have_t.shape)}, the model {tuple(want.shape)}"
            )
        diff = (have_t.double() - want.double()).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        bound = atol + rtol * want.double().abs()
        if bool((diff > bound).any()):
            raise ValueError(
                f"output {i}: ONNX Runtime differs from PyTorch by up to {float(diff.max()):.3g} "
                f"(allowed atol={atol:g} + rtol={rtol:g} x |value|)"
            )
    return worst


def onnxruntime_latency(
    session_or_path: Any,
    example_inputs: Any,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = 1,
) -> float:
    """Median wall-clock seconds of one ONNX Runtime run of ``example_inputs``.

    ``session_or_path`` is an ONNX file (a CPU session with ``threads`` intra-op threads is made
    for it, see :func:`onnxruntime_session`) or a session to reuse: timing several models in
    alternating rounds then pays the session set-up once. ``warmup`` untimed runs first, then
    ``repeats`` runs timed one by one with ``time.perf_counter``; the median is robust to the
    occasional scheduler hiccup that would skew a mean.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    session, feeds = _session_and_feeds(session_or_path, example_inputs, threads)
    for _ in range(warmup):
        session.run(None, feeds)
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)

