"""Autograd tracing: run the model once and turn its autograd graph into nodes and edges.

The trace needs the structure of the computation, not its values, so it first runs on the
``meta`` device (no arithmetic, no memory for activations). Models that need real values
(data-dependent control flow) are traced on real tensors instead. Either way the model's own
parameters, buffers, ``requires_grad`` flags, ``.grad`` and train/eval mode are left untouched:
the forward pass runs through :func:`torch.func.functional_call` on stand-in tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..layers import LayerPruner, get_pruner
from .node import Edge, Node
from .ops import OpType, grad_fn2type, grad_fn_name, is_known_grad_fn, module2type

# Modules whose inputs after the first are not channel inputs (e.g. an LSTM's initial state).
_FIRST_INPUT_ONLY = (nn.LSTM, nn.GRU, nn.RNNBase)


class MultipleInputs(list):
    """Several example inputs for one model (a list subclass, so that a plain list still means
    positional arguments): the trace runs the model on each and merges what it sees, so that
    branches taken only for some inputs are in the graph, and every prune is verified on all of
    them. ``Pruner(model, MultipleInputs([x_pos, x_neg]))``."""


def input_list(example_inputs: Any) -> list[Any]:
    """The example inputs as a list of model inputs (one unless :class:`MultipleInputs`)."""
    if isinstance(example_inputs, MultipleInputs):
        if not example_inputs:
            raise ValueError("MultipleInputs needs at least one example input")
        return list(example_inputs)
    return [example_inputs]


@contextlib.contextmanager
def eval_mode(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode (with ``active``), then give every submodule its own mode back."""
    if not active:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list (positional) or a dict (keyword arguments)."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """All tensors inside a nested output: tuples, lists, dicts, dataclasses (HF ``ModelOutput``)."""
    out: list[torch.Tensor] = []
    stack = [obj]
    seen: set[int] = set()
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif id(o) in seen or o is None or isinstance(o, (str, bytes, int, float, bool)):
            continue
        elif isinstance(o, Mapping):
            seen.add(id(o))
            stack.extend(reversed(list(o.values())))
        elif isinstance(o, (tuple, list)):
            seen.add(id(o))
            stack.extend(reversed(o))
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            seen.add(id(o))
            stack.extend(reversed([getattr(o, f.name) for f in dataclasses.fields(o)]))
    return out


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a nested tuple/list/dict, keeping the structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return (
            type(obj)(**{k: map_tensors(v, fn) for k, v in obj.items()})
            if not isinstance(obj, dict)
            else {k: map_tensors(v, fn) for k, v in obj.items()}
        )
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def edge_size(fn: Any, nr: int, dim: int) -> int:
    """Size ``dim`` of output ``nr`` of autograd node ``fn``."""
    return _shape(fn, nr)[dim]


def _shape(fn: Any, nr: int) -> tuple[int, ...]:
    if hasattr(fn, "variable"):
        return tuple(fn.variable.shape)
    return tuple(fn._input_metadata[nr].shape)


_BOOL_RESULT = frozenset(
    (
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "logical_and",
        "logical_or",
        "logical_xor",
        "logical_not",
        "isnan",
        "isinf",
        "isfinite",
        "signbit",
    )
)
_MATMUL_OPS = {
    torch.ops.aten.addmm.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}
_SOFTMAX_OPS = {
    torch.ops.aten._softmax.default,
    torch.ops.aten._safe_softmax.default,
    torch.ops.aten._log_softmax.default,
}
_BN_OPS = {
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit.no_stats,
    torch.ops.aten.native_batch_norm.default,
}


#: A size expression: ``("src", tensor key, dim)`` (a size read from a tensor), ``("const",
#: value)``, or ``(operator name, left, right)`` of :data:`_INT_OPS`.
SizeExpr = tuple


class SizeInt(int):
    """An int read from a traced tensor's shape (``x.shape``, ``x.size(d)``, ``len(x)``) that
    remembers how it was computed: Python arithmetic on it (``C // self.num_heads``) gives a
    ``SizeInt`` again, so that an op called with it as a size argument can be checked against a
    prune that changes the dimension it came from (:func:`evaluate_size`)."""

    expr: SizeExpr

    @staticmethod
    def of(value: int, expr: SizeExpr) -> SizeInt:
        """``value`` computed as ``expr``."""
        out = SizeInt(value)
        out.expr = expr
        return out

    def __neg__(self) -> SizeInt:
        return SizeInt.of(-int(self), ("sub", ("const", 0), self.expr))


def _size_expr(v: Any) -> SizeExpr:
    return v.expr if isinstance(v, SizeInt) else ("const", int(v))


_INT_OPS: dict[str, Callable[[int, int], int]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
}


def _int_method(name: str, reflected: bool) -> Callable[[SizeInt, Any], Any]:
    plain = getattr(int, f"__r{name}__" if reflected else f"__{name}__")

    def method(self: SizeInt, other: Any) -> Any:
        result = plain(self, other)
        if not isinstance(other, int) or isinstance(other, bool) or not isinstance(result, int):
            return result
        pair = (_size_expr(other), self.expr) if reflected else (self.expr, _size_expr(other))
        return SizeInt.of(result, (name, *pair))

    return method


for _name in _INT_OPS:
    setattr(SizeInt, f"__{_name}__", _int_method(_name, False))
    setattr(SizeInt, f"__r{_name}__", _int_method(_name, True))


def evaluate_size(expr: SizeExpr, sizes: Callable[[Any, int], int | None]) -> int | None:
    """The value of a size expression with ``sizes(source, dim)`` giving each read size (None
    when the expression cannot be evaluated, e.g. a division by zero)."""
    kind = expr[0]
    if kind == "const":
        return expr[1]
    if kind == "src":
        return sizes(expr[1], expr[2])
    left, right = evaluate_size(expr[1], sizes), evaluate_size(expr[2], sizes)
    if left is None or right is None or (kind in ("floordiv", "mod") and right == 0):
        return None
    return _INT_OPS[kind](left, right)


def size_sources(expr: SizeExpr) -> list[tuple[Any, int]]:
    """The ``(source, dim)`` reads a size expression depends on."""
    if expr[0] == "src":
        return [(expr[1], expr[2])]
    if expr[0] == "const":
        return []
    return size_sources(expr[1]) + size_sources(expr[2])


class TracedShape(tuple):
    """``x.shape`` of a traced tensor: a tuple of :class:`SizeInt` with the ``torch.Size``
    methods models use (``torch.Size`` itself cannot be subclassed). A model that needs a real
    ``torch.Size`` makes the trace retry without size tracking."""

    def __getitem__(self, k: Any) -> Any:  # type: ignore[override]
        got = super().__getitem__(k)
        return TracedShape(got) if isinstance(k, slice) else got

    def numel(self) -> int:
        return math.prod(self)

    def __add__(self, other: Any) -> Any:  # type: ignore[override]
        return TracedShape(tuple(self) + tuple(other)) if isinstance(other, tuple) else NotImplemented

    def __radd__(self, other: Any) -> Any:
        return TracedShape(tuple(other) + tuple(self)) if isinstance(other, tuple) else NotImplemented


_SIZE_READS = frozenset(
    (torch.Tensor.shape.__get__, torch.Tensor.size, torch.Tensor.__len__)  # type: ignore[attr-defined]
)


class _ArgShapes(TorchFunctionMode):
    """Remembers, for the autograd node each torch function creates, the shapes of all its tensor
    arguments (autograd does not record constants: tensors that need no grad) and the innermost
    module running at that moment (whose size attributes may describe the op). Attention runs as
    one fused op where it can (see :func:`_fused_attention`)."""

    def __init__(self, running: list[nn.Module]) -> None:
        super().__init__()
        self.running = running
        self.shapes: dict[Any, list[tuple[int, ...]]] = {}
        self.owners: dict[Any, nn.Module | None] = {}
        self.calls: dict[Any, str] = {}
        self.size_args: dict[Any, list[int | None]] = {}
        self.size_exprs: dict[Any, list[tuple[int, SizeExpr]]] = {}
        self.track_sizes = True

    def read_size(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A shape read of a tensor in the graph, as :class:`SizeInt` values sourced from it."""
        out = func(*args, **kwargs)
        t = args[0]
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            return out
        key = (t.grad_fn, t.output_nr) if t.grad_fn is not None else (_leaf_fn(t), 0)
        if isinstance(out, torch.Size):
            return TracedShape(SizeInt.of(v, ("src", key, d)) for d, v in enumerate(out))
        if isinstance(out, int):
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return SizeInt.of(out, ("src", key, dim % max(t.dim(), 1)))
        return out

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = None
        if self.track_sizes and func in _SIZE_READS and args:
            return self.read_size(func, args, kwargs or {})
        if func in _DETACHING and args and isinstance(args[0], torch.Tensor):
            # A tensor leaving autograd still carries the same channels: keep it in the graph
            # (as an alias) so that its consumers stay coupled to its producer.
            return args[0].view_as(args[0]) if args[0].requires_grad else func(*args, **(kwargs or {}))
        if func is _SDPA:
            with contextlib.suppress(TypeError):  # arguments this torch added: run it as called
                out = _fused_attention(*args, **(kwargs or {}))
        if out is None:
            if torch.is_grad_enabled() or _is_inplace(func) or not _needs_grad(args, kwargs):
                out = func(*args, **(kwargs or {}))
            else:  # under no_grad: record the op anyway, its result keeps the channels
                with torch.enable_grad():
                    out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for r in results:
            fn = r.grad_fn if isinstance(r, torch.Tensor) else None
            if fn is not None and fn not in self.shapes:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [a for a in (kwargs or {}).values() if isinstance(a, torch.Tensor)]
                self.shapes[fn] = [tuple(t.shape) for t in tensors]
                self.owners[fn] = self.running[-1] if self.running else None
                name = self.calls[fn] = getattr(func, "__name__", "")
                if name in _SIZED_CALLS:
                    sizes = _int_arguments(args[1:])
                    self.size_args[fn] = [None if a is None else int(a) for a in sizes]
                    derived = [(k, a.expr) for k, a in enumerate(sizes) if isinstance(a, SizeInt)]
                    if derived:
                        self.size_exprs[fn] = derived
        return out


_SDPA = torch.nn.functional.scaled_dot_product_attention
#: Calls whose size arguments are recorded (size attributes are matched against them).
_SIZED_CALLS = frozenset(("view", "reshape", "expand", "broadcast_to", "unflatten"))


def _int_arguments(args: tuple) -> list[int | None]:
    """The size arguments of a ``view(*sizes)`` or ``view(sizes)`` call (ints, possibly
    :class:`SizeInt`), None for anything that is not an int."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    return [a if isinstance(a, int) and not isinstance(a, bool) else None for a in args]


#: Ways a tensor leaves autograd (the trace keeps the coupling through them).
_DETACHING = frozenset((torch.Tensor.detach, torch.detach, torch.Tensor.data.__get__))  # type: ignore[attr-defined]


def _needs_grad(args: tuple, kwargs: dict | None) -> bool:
    """Whether a tensor argument (also inside a list, as for ``cat``) requires grad."""
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in a):
            return True
    return False


def _is_inplace(func: Any) -> bool:
    """Whether a torch function writes into its first argument (``add_``, ``copy_``...): such
    ops run in the grad mode the model chose (writing into a leaf that needs grad is an error
    with grad on)."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__iadd__", "__imul__")


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor | None:
    """Scaled-dot-product attention as one fused CPU op, or None to run it as called.

    On meta tensors (and on CPU ones when it picks its math path) torch decomposes attention
    into a dozen ops: matmuls, softmax, head copies for grouped queries, and the add of a
    constant mask, which the trace cannot see as such. The fused op is one node for the graph,
    one step for the trace, and its mask argument is recorded. A mask that needs grad must stay
    an input of the graph, so that attention keeps the decomposed form.
    """
    tensors = (query, key, value)
    if any(t.dim() != 4 or t.device.type not in ("cpu", "meta") for t in tensors):
        return None
    if query.shape[-1] != value.shape[-1]:
        return None
    if attn_mask is not None and attn_mask.requires_grad:
        return None
    if query.shape[1] != key.shape[1] and not (enable_gqa and query.shape[1] % key.shape[1] == 0):
        return None
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )[0]
    except RuntimeError:  # a case the fused kernel does not take (mask dtype, layout...)
        return None


class _FusedAttentionMode(TorchFunctionMode):
    """Runs scaled-dot-product attention as one fused op (see :func:`_fused_attention`): on meta
    tensors torch would otherwise run a dozen Python reference ops for it."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is _SDPA:
            with contextlib.suppress(TypeError):
                out = _fused_attention(*args, **(kwargs or {}))
                if out is not None:
                    return out
        return func(*args, **(kwargs or {}))


class _ShapeOnlyMode(TorchDispatchMode):
    """Below autograd, answer pointwise ops and batch norm on meta tensors with an empty result of
    the right shape and dtype instead of running their (Python) meta kernels. Autograd has
    already recorded the op by then, which is all the trace needs."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.cat.default:
            tensors = [t for t in args[0] if t.dim() > 1 or t.numel() > 0]
            dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % tensors[0].dim()
            shape = list(tensors[0].shape)
            shape[dim] = sum(t.shape[dim] for t in tensors)
            dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
            return torch.empty(shape, dtype=dtype, device="meta")
        if func in _MATMUL_OPS:
            a, b = args[-2], args[-1]
            return torch.empty(
                (*a.shape[:-1], b.shape[-1]), dtype=torch.promote_types(a.dtype, b.dtype), device="meta"
            )
        if func is torch.ops.aten.convolution.default and len(args) == 9 and not kwargs:
            out = conv_result(*args)
            if out is not None:
                return out
        if func is torch.ops.aten.native_layer_norm.default:
            x, normalized = args[0], args[1]
            stats = (*x.shape[: x.dim() - len(normalized)], *([1] * len(normalized)))
            return _meta_like(x), _meta(stats, x.dtype), _meta(stats, x.dtype)
        if func in _SOFTMAX_OPS:
            return _meta_like(args[0])
        if func is torch.ops.aten.mean.dim:
            out = _mean_result(*args, **kwargs)
            if out is not None:
                return out
        if func in _BN_OPS:
            x = args[0]
            return _meta_like(x), _meta((x.shape[1],), torch.float32), _meta((x.shape[1],), torch.float32)
        if torch.Tag.pointwise in func.tags and "out" not in kwargs:
            if torch.Tag.inplace in func.tags:
                return args[0]
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if tensors and all(t.device.type == "meta" for t in tensors):
                shape = _broadcast_shapes([t.shape for t in tensors])
                return torch.empty(shape, dtype=_result_dtype(func, args, tensors), device="meta")
        return func(*args, **kwargs)


def _mean_result(
    x: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """The empty result of ``mean`` over the dims ``dim`` of a floating meta tensor (an RMS norm's
    mean of squares), or None for the cases left to the op (no dims, integers, another dtype):
    its meta kernel is a Python reference implementation."""
    if (
        x.device.type != "meta"
        or not dim
        or dtype is not None
        or not x.is_floating_point()
        or any(not isinstance(d, int) or not -max(x.dim(), 1) <= d < max(x.dim(), 1) for d in dim)
    ):
        return None
    reduced = {d % x.dim() for d in dim} if x.dim() else set()
    if len(reduced) != len(dim) and x.dim():
        return None  # a dim named twice: the op raises
    shape = [1 if k in reduced else n for k, n in enumerate(x.shape) if keepdim or k not in reduced]
    return _meta(shape, x.dtype)


def _meta(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` for a meta tensor (whose own ``empty_like`` runs a slow Python
    reference implementation)."""
    return _meta(x.shape, x.dtype) if x.is_contiguous() else torch.empty_like(x)


def conv_result(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor | None:
    """The empty result of a convolution on contiguous meta tensors (the shape formula of the
    convolution docs); None for anything else, which then runs torch's meta kernel."""
    k = w.dim() - 2
    if x.device.type != "meta" or x.dim() != k + 2 or x.dtype != w.dtype:
        return None
    if not (x.is_contiguous() and w.is_contiguous()):
        return None
    if not all(len(v) == k for v in (stride, padding, dilation, output_padding)):
        return None
    channels = w.shape[1] * groups if transposed else w.shape[0]
    if x.shape[1] != (w.shape[0] if transposed else w.shape[1] * groups):
        return None  # torch's kernel names the mismatch
    if bias is not None and tuple(bias.shape) != (channels,):
        return None
    spatial = []
    for i in range(k):
        size, kern = x.shape[2 + i], w.shape[2 + i]
        span = dilation[i] * (kern - 1)
        if transposed:
            spatial.append((size - 1) * stride[i] - 2 * padding[i] + span + output_padding[i] + 1)
        else:
            spatial.append((size + 2 * padding[i] - span - 1) // stride[i] + 1)
    if min(spatial, default=1) < 1:
        return None  # let torch raise its own error
    return _meta((x.shape[0], channels, *spatial), x.dtype)


def _broadcast_shapes(shapes: list[torch.Size]) -> list[int]:
    """``torch.broadcast_shapes`` for plain integer shapes, without its per-call overhead (it
    runs for every pointwise op of the trace)."""
    nd = max(len(s) for s in shapes)
    out = [1] * nd
    for s in shapes:
        off = nd - len(s)
        for i, d in enumerate(s):
            cur = out[off + i]
            if d != 1 and d != cur:
                if cur != 1:
                    raise RuntimeError(f"shapes {[list(x) for x in shapes]} cannot be broadcast together")
                out[off + i] = d
    return out


def _result_dtype(func: Any, args: tuple, tensors: list[torch.Tensor]) -> torch.dtype:
    """Result dtype of a pointwise op (type promotion; comparisons give bool)."""
    if func._schema.name.split("::")[-1] in _BOOL_RESULT:
        return torch.bool
    dtypes = [t.dtype for t in tensors if t.dtype != torch.bool] or [torch.bool]
    dtype = functools.reduce(torch.promote_types, dtypes)
    if not dtype.is_floating_point and any(isinstance(a, float) for a in args):
        dtype = torch.get_default_dtype()
    return dtype


def _input_stand_in(t: torch.Tensor) -> torch.Tensor:
    """Floating-point inputs require grad in the trace, so the graph sees where they are used
    (their channels can never be pruned)."""
    return t.requires_grad_(True) if t.is_floating_point() else t


@dataclasses.dataclass
class Trace:
    """What the tracer found: the nodes, the module and parameter nodes by identity, the
    autograd op names it did not recognise, whether it ran on meta tensors, the shapes of the
    output tensors per example input, the layers with parameters that never ran, and whether the
    model had to be traced in eval mode."""

    nodes: list[Node]
    module_nodes: dict[nn.Module, Node]
    param_nodes: dict[nn.Parameter, Node]
    unknown_ops: set[str]
    on_meta: bool
    output_shapes: list[list[tuple[int, ...]]]
    uncalled: list[nn.Module]
    eval_mode: bool = False


def leaf_modules(
    model: nn.Module,
    customized: Mapping[type, LayerPruner] | None = None,
) -> dict[nn.Module, tuple[str, LayerPruner]]:
    """Modules the graph treats as single nodes: those with a pruner. Their children are not
    visited (a module with a custom pruner is atomic)."""
    found: dict[nn.Module, tuple[str, LayerPruner]] = {}
    custom = dict(customized) if customized else None

    def visit(module: nn.Module, prefix: str) -> None:
        pruner = get_pruner(module, custom)
        if pruner is not None:
            found.setdefault(module, (prefix, pruner))
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return found


def trace_model(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Callable | None = None,
    output_transform: Callable | None = None,
    unwrapped_parameters: Mapping[nn.Parameter, int | None] | None = None,
    customized_pruners: Mapping[type, LayerPruner] | None = None,
) -> Trace:
    """Trace ``model`` on ``example_inputs`` and return its computational graph."""
    leaves = leaf_modules(model, customized_pruners)
    unwrapped_parameters = dict(unwrapped_parameters or {})
    # The structure is all the graph needs: try the meta device first (no arithmetic, no activation
    # memory) and fall back to real values only for models whose control flow reads them.
    # Size tracking hands the model int subclasses and a tuple for ``x.shape``: a model that
    # insists on a real torch.Size is traced again without it.
    # A model that cannot run in its current mode on the example inputs (batch norm in train mode
    # on a batch of one) is traced in eval mode, its own modes restored afterwards.
    args = (model, example_inputs, forward_fn, output_transform, unwrapped_parameters, leaves)
    error: Exception | None = None
    for in_eval in (False, True):
        for meta, track_sizes in ((True, True), (False, True), (True, False), (False, False)):
            try:
                with eval_mode(model, in_eval):
                    trace = _trace(*args, meta=meta, track_sizes=track_sizes)
                trace.eval_mode = in_eval
                return trace
            except Exception as e:  # noqa: BLE001 - the next way of tracing may work
                error = error if in_eval and error is not None else e
    assert error is not None
    raise error


def _stand_ins(model: nn.Module, meta: bool) -> dict[str, torch.Tensor]:
    """Stand-ins for the model's parameters (requiring grad) and buffers: empty meta tensors, or
    detached parameters and cloned buffers, so that running the model changes none of its state."""
    if meta:
        stand_in = {n: _meta_stand_in(p).requires_grad_(True) for n, p in model.named_parameters()}
        stand_in.update({n: _meta_stand_in(b) for n, b in model.named_buffers()})
    else:
        stand_in = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
        stand_in.update({n: b.clone() for n, b in model.named_buffers()})
    return stand_in


def _meta_stand_in(t: torch.Tensor) -> torch.Tensor:
    """An empty meta tensor like ``t`` (``torch.empty_like`` on the meta device, whose Python
    reference implementation is slow; contiguous tensors take a plain ``torch.empty``)."""
    if t.layout == torch.strided and t.is_contiguous():
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    return torch.empty_like(t, device="meta")


def _input_stand_ins(example_inputs: Any, meta: bool) -> Any:
    if meta:
        return map_tensors(example_inputs, lambda t: _input_stand_in(torch.empty_like(t, device="meta")))
    return map_tensors(example_inputs, lambda t: _input_stand_in(t.detach()))


def _trace(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Callable | None,
    output_transform: Callable | None,
    unwrapped: dict[nn.Parameter, int | None],
    leaves: dict[nn.Module, tuple[str, LayerPruner]],
    meta: bool,
    track_sizes: bool = True,
) -> Trace:
    """One trace: run the model on stand-ins of its parameters and inputs (meta tensors with
    ``meta``) with :class:`_ForwardRecorder` hooks, once per example input, then build the nodes
    from the autograd graph of all the outputs (:class:`_GraphBuilder`)."""
    params = dict(model.named_parameters())
    stand_in = _stand_ins(model, meta)
    recorder = _ForwardRecorder(model, leaves)
    recorder.arg_shapes.track_sizes = track_sizes
    outputs: list[torch.Tensor] = []
    output_shapes: list[list[tuple[int, ...]]] = []
    input_ids: set[int] = set()
    for example in input_list(example_inputs):
        inputs = _input_stand_ins(example, meta)
        input_ids.update(id(t) for t in flatten_tensors(inputs) if t.requires_grad)
        out = flatten_tensors(recorder.run(stand_in, inputs, forward_fn, output_transform, meta))
        output_shapes.append([tuple(t.shape) for t in out])
        outputs.extend(t for t in out if t.grad_fn is not None)
    if not outputs:
        raise RuntimeError(
            "the model's output has no tensor that depends on its parameters: "
            "pass output_transform= to select the tensors to trace"
        )
    builder = _GraphBuilder(recorder, unwrapped)
    builder.original_param = {id(stand_in[n]): p for n, p in params.items()}
    builder.param_names = {p: n for n, p in params.items()}
    builder.input_ids = input_ids
    builder.build(outputs)
    if not meta:
        # Real-valued autograd nodes hold activations: keep only their names.
        for node in builder.nodes:
            node.grad_fn = type(node.grad_fn).__name__
    called = set(recorder.called)
    return Trace(
        builder.nodes,
        builder.module_nodes,
        builder.param_nodes,
        builder.unknown,
        meta,
        output_shapes,
        [m for m in leaves if m not in called and _has_parameters(m)],
    )


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def output_shapes(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Callable | None = None,
    output_transform: Callable | None = None,
    meta: bool = True,
    in_eval: bool = False,
) -> list[list[tuple[int, ...]]]:
    """The shapes of the model's output tensors on each example input, computed without touching
    the model's state: on meta stand-ins (no arithmetic, no activation memory) with ``meta``, else
    on copies of its tensors without autograd; in eval mode with ``in_eval`` (modes restored).
    Raises whatever the model raises."""
    stand_in = _stand_ins(model, meta)
    runs = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]), eval_mode(model, in_eval):
        for example in input_list(example_inputs):
            inputs = map_tensors(
                example, (lambda t: torch.empty_like(t, device="meta")) if meta else (lambda t: t.detach())
            )
            runner = _Runner(model, forward_fn or call_model, inputs)
            modes = (_FusedAttentionMode(), _ShapeOnlyMode()) if meta else ()
            with contextlib.ExitStack() as stack:
                for mode in modes:
                    stack.enter_context(mode)
                params = {f"model.{k}": v for k, v in stand_in.items()}
                out = functional_call(runner, params, (), strict=False)
                if output_transform is not None:
                    out = output_transform(out)
            runs.append([tuple(t.shape) for t in flatten_tensors(out)])
    return runs


class _ForwardRecorder:
    """Runs the model once with a hook on every module, recording per leaf module (a module with
    a pruner) the autograd nodes of its inputs and outputs, and per op (through
    :class:`_ArgShapes`) its argument shapes and the module running it.

    Fields: ``model``, ``leaves`` (leaf module -> (name, pruner)), ``module_names`` (every
    module's name), ``running`` (modules whose forward is executing, innermost last),
    ``arg_shapes``, ``quiet`` (the torch-function switches turned off inside running leaves),
    ``out_fn_module`` (autograd node of a leaf's output -> the leaf), ``module_inputs``
    (leaf -> the (autograd node, output number) of each input, None for a constant) and
    ``called`` (the leaves that ran).
    """

    __slots__ = (
        "model",
        "leaves",
        "module_names",
        "running",
        "arg_shapes",
        "quiet",
        "out_fn_module",
        "module_inputs",
        "called",
    )

    def __init__(self, model: nn.Module, leaves: dict[nn.Module, tuple[str, LayerPruner]]) -> None:
        self.model = model
        self.leaves = leaves
        self.module_names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        self.running: list[nn.Module] = []
        self.arg_shapes = _ArgShapes(self.running)
        # Inside a layer the trace needs only what goes in and what comes out (its own ops become
        # its node), so the argument recorder is switched off there: it is most of a trace's cost.
        self.quiet: list[Any] = []
        self.out_fn_module: dict[Any, nn.Module] = {}
        self.module_inputs: dict[nn.Module, list[tuple[Any, int] | None]] = {}
        self.called: set[nn.Module] = set()

    def run(
        self,
        stand_in: dict[str, torch.Tensor],
        inputs: Any,
        forward_fn: Callable | None,
        output_transform: Callable | None,
        meta: bool,
    ) -> Any:
        """The model's (transformed) output on ``inputs`` with ``stand_in`` parameters and buffers."""
        handles = []
        for m in self.module_names:
            handles.append(m.register_forward_pre_hook(self.pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(self.post_hook, with_kwargs=True))
        runner = _Runner(self.model, forward_fn or call_model, inputs)
        try:
            with torch.enable_grad(), self.arg_shapes, _ShapeOnlyMode() if meta else contextlib.nullcontext():
                out = functional_call(
                    runner, {f"model.{k}": v for k, v in stand_in.items()}, (), strict=False
                )
                if output_transform is not None:
                    out = output_transform(out)
        finally:
            while self.quiet:  # a layer that raised never reached its post hook
                self.quiet.pop().__exit__(None, None, None)
            for h in handles:
                h.remove()
        return out

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.running.append(module)
        if module in self.leaves:
            self.called.add(module)
            tensors = flatten_tensors((args, kwargs))
            if isinstance(module, _FIRST_INPUT_ONLY):
                tensors = tensors[:1]
            lst = self.module_inputs.setdefault(module, [])
            for t in tensors:
                lst.append(
                    (t.grad_fn, t.output_nr)
                    if t.grad_fn is not None
                    else (_leaf_fn(t), 0)
                    if t.requires_grad
                    else None
                )
            quiet: Any = torch._C.DisableTorchFunction()
            if not torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                stack = contextlib.ExitStack()  # a layer run under no_grad stays coupled
                stack.enter_context(quiet)
                stack.enter_context(torch.enable_grad())
                self.quiet.append(stack)
            else:
                quiet.__enter__()
                self.quiet.append(quiet)

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.running.pop()
        if module in self.leaves:
            self.quiet.pop().__exit__(None, None, None)
            for t in flatten_tensors(output):
                if t.grad_fn is not None:
                    self.out_fn_module.setdefault(t.grad_fn, module)


def _leaf_fn(t: torch.Tensor) -> Any:
    """A parameter fed straight into a module: reach its AccumulateGrad node through a view."""
    return t.view_as(t).grad_fn.next_functions[0][0]  # type: ignore[union-attr]  # a view has one


class _GraphBuilder:
    """Builds the nodes and edges of a trace from the autograd graph of the outputs, walking it
    backwards from them: a leaf module's output node becomes the module's node (its inputs are
    the ones :class:`_ForwardRecorder` saw), an AccumulateGrad node a parameter or input node,
    any other autograd node a virtual op node.

    Fields: ``recorder`` (what the forward pass recorded), ``unwrapped`` (bare parameters to
    prune -> dim), ``original_param`` (id of a stand-in -> the model's parameter),
    ``param_names``, ``input_ids`` (ids of the input stand-ins), the results ``nodes``,
    ``module_nodes``, ``param_nodes``, ``unknown`` (op names treated as elementwise), and the
    walk's ``fn_nodes`` (autograd node -> node), ``edges`` ((autograd node id, output number) ->
    edge) and ``pending`` (nodes whose inputs are not linked yet).
    """

    __slots__ = (
        "recorder",
        "unwrapped",
        "original_param",
        "param_names",
        "input_ids",
        "nodes",
        "module_nodes",
        "param_nodes",
        "unknown",
        "fn_nodes",
        "edges",
        "pending",
    )

    def __init__(self, recorder: _ForwardRecorder, unwrapped: dict[nn.Parameter, int | None]) -> None:
        self.recorder = recorder
        self.unwrapped = unwrapped
        self.original_param: dict[int, nn.Parameter] = {}
        self.param_names: dict[nn.Parameter, str] = {}
        self.input_ids: set[int] = set()
        self.nodes: list[Node] = []
        self.module_nodes: dict[nn.Module, Node] = {}
        self.param_nodes: dict[nn.Parameter, Node] = {}
        self.unknown: set[str] = set()
        self.fn_nodes: dict[Any, Node] = {}
        self.edges: dict[tuple[int, int], Edge] = {}
        self.pending: list[Node] = []

    def build(self, outputs: list[torch.Tensor]) -> None:
        """Nodes and edges of everything the outputs depend on, with inputs and outputs linked."""
        for t in outputs:
            self.edge_of(t.grad_fn, t.output_nr).is_output = True
        pending = self.pending
        while pending:
            self.link_inputs(pending.pop())
        self.link_size_expressions()
        for node in self.nodes:
            for e in node.out_edges:
                for dst, _ in e.dsts:
                    node.add_output(dst)
                    dst.add_input(node)

    def node_of(self, fn: Any) -> Node:
        """The node of an autograd node (made on first sight)."""
        node = self.fn_nodes.get(fn)
        if node is not None:
            return node
        module = self.recorder.out_fn_module.get(fn)
        if module is not None:
            node = self.module_nodes.get(module)
            if node is None:
                node = self.module_nodes[module] = self._new_module_node(module, fn)
        elif hasattr(fn, "variable"):
            node = self._leaf_node(fn)
        else:
            node = self._new_op_node(fn)
        self.fn_nodes[fn] = node
        return node

    def _new_module_node(self, module: nn.Module, fn: Any) -> Node:
        name, pruner = self.recorder.leaves[module]
        node = Node(module, fn, name, _leaf_type(module, pruner), pruner)
        self.nodes.append(node)
        self.pending.append(node)
        return node

    def _leaf_node(self, fn: Any) -> Node:
        """The node of an AccumulateGrad node: a parameter's node, or the input's."""
        param = self.original_param.get(id(fn.variable))
        if param is None:
            if id(fn.variable) not in self.input_ids:
                raise RuntimeError(
                    "the forward pass uses a tensor that requires grad but is neither a "
                    "model parameter nor an example input"
                )
            node = Node(None, fn, "input", OpType.INPUT)
            node.attrs.update(op="input", in_shapes=[], out_shapes=[tuple(fn.variable.shape)])
            self.nodes.append(node)
            return node
        known = self.param_nodes.get(param)
        if known is not None:
            return known
        node = Node(param, fn, self.param_names[param], OpType.PARAMETER)
        node.pruning_dim = self.unwrapped.get(param) if param in self.unwrapped else None
        self.param_nodes[param] = node
        self.nodes.append(node)
        return node

    def _new_op_node(self, fn: Any) -> Node:
        op_type = grad_fn2type(fn)
        if op_type == OpType.ELEMENTWISE and not is_known_grad_fn(fn):
            self.unknown.add(grad_fn_name(fn))
        node = Node(None, fn, grad_fn_name(fn), op_type)
        owner = self.recorder.arg_shapes.owners.get(fn)
        node.owner = owner
        node.owner_name = self.recorder.module_names.get(owner) if owner is not None else None
        self.nodes.append(node)
        self.pending.append(node)
        return node

    def edge_of(self, fn: Any, nr: int) -> Edge:
        """The edge of output ``nr`` of an autograd node (made on first sight)."""
        key = (id(fn), nr)
        e = self.edges.get(key)
        if e is None:
            src = self.node_of(fn)
            e = Edge(src, nr, _shape(fn, nr))
            src.out_edges.append(e)
            self.edges[key] = e
        return e

    def link_inputs(self, node: Node) -> None:
        """Give ``node`` its input edges and the recorded attributes index mapping needs."""
        if node.type.is_virtual:
            srcs = node.grad_fn.next_functions
            node.attrs["out_shapes"] = [tuple(m.shape) for m in node.grad_fn._input_metadata]
        else:
            srcs = self.recorder.module_inputs.get(node.module, [])
        for fn_nr in srcs:
            fn = fn_nr[0] if fn_nr is not None else None
            if fn is None:
                node.in_edges.append(None)
                continue
            e = self.edge_of(fn, fn_nr[1])
            e.dsts.append((node, len(node.in_edges)))
            node.in_edges.append(e)
        node.attrs["in_shapes"] = [e.shape if e is not None else None for e in node.in_edges]
        if node.type == OpType.LN and srcs and srcs[0] is not None:
            dims = _layer_norm_channel_dims(node.grad_fn, srcs[0][0])
            if dims is not None:
                node.attrs["channel_dims"] = dims
        if node.type.is_virtual:
            _read_saved(node)
            self._read_arguments(node)

    def _read_arguments(self, node: Node) -> None:
        """The op's call name and the shapes of its constant operands (tensors without grad)."""
        arg_shapes = self.recorder.arg_shapes
        node.attrs["call"] = arg_shapes.calls.get(node.grad_fn, "")
        if node.grad_fn in arg_shapes.size_args:
            node.attrs["size_args"] = arg_shapes.size_args[node.grad_fn]
        args = arg_shapes.shapes.get(node.grad_fn)
        if args is not None and len(args) == len(node.in_edges):
            node.attrs["const_shapes"] = [a if e is None else None for a, e in zip(args, node.in_edges)]
        elif args is not None and node.type == OpType.ATTENTION and len(args) > 3 == len(node.in_edges):
            # the fused op does not record a constant mask as an input: keep its shape
            node.attrs["const_shapes"] = [None, None, None, args[3]]

    def link_size_expressions(self) -> None:
        """Give every op called with sizes computed from shapes (:class:`SizeInt`) those
        expressions, with the tensors read as edges (a tensor outside the graph: a constant).
        Done once every edge exists."""
        exprs = self.recorder.arg_shapes.size_exprs
        for node in self.nodes:
            found = exprs.get(node.grad_fn) if node.type.is_virtual else None
            if found:
                node.attrs["size_exprs"] = [(k, self.edge_expr(e)) for k, e in found]

    def edge_expr(self, expr: SizeExpr) -> SizeExpr:
        """``expr`` with its sources turned into the edges of the tensors read."""
        if expr[0] == "src":
            (fn, nr), dim = expr[1], expr[2]
            edge = self.edges.get((id(fn), nr))
            return ("src", edge, dim) if edge is not None else ("const", edge_size(fn, nr, dim))
        if expr[0] == "const":
            return expr
        return (expr[0], self.edge_expr(expr[1]), self.edge_expr(expr[2]))


class _Runner(nn.Module):
    """Wraps the model so that ``functional_call`` can run a user ``forward_fn`` on stand-ins.

    ``torch.compile``d submodules run eagerly here (``set_stance("force_eager")``): under the
    trace's torch-function modes and on stand-in tensors dynamo would not compile them anyway, and
    a frame it refuses while a mode is active is marked to be skipped for good, so the user's
    compiled code would run eagerly ever after."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Any], inputs: Any) -> None:
        super().__init__()
        self.model = model
        self._fn, self._inputs = fn, inputs

    def forward(self) -> Any:
        with eager_compiled_code():
            return self._fn(self.model, self._inputs)


def eager_compiled_code() -> contextlib.AbstractContextManager:
    """Run ``torch.compile``d code eagerly inside (``torch.compiler.set_stance("force_eager")``,
    where torch has it: 2.6 and later). Every run of the model under a torch-function or dispatch
    mode (the trace, FLOP counting) goes through it: dynamo would refuse such a frame and mark it
    to be skipped for good, leaving the user's compiled module eager ever after."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _leaf_type(module: nn.Module, pruner: LayerPruner) -> OpType:
    t = module2type(module)
    if t == OpType.ELEMENTWISE:
        return OpType.CUSTOMIZED
    return t


def _layer_norm_channel_dims(out_fn: Any, in_fn: Any) -> dict[str, int] | None:
    """Channel dimension of a LayerNorm module's input and output, read from the ops it ran.

    A LayerNorm subclass may permute inside (channels-first feature maps normalised over the
    channel dimension): following its permutes around the layer-norm op tells which dimension
    holds the channels, which guessing by size cannot when a spatial size equals the channel
    count. None when the module ran anything else.
    """
    chain: list[Any] = []
    fn = out_fn
    while fn is not in_fn:
        if fn is None or len(chain) > 16:
            return None
        chain.append(fn)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    names = [grad_fn_name(f) for f in chain]
    if names.count("NativeLayerNorm") != 1:
        return None
    at = names.index("NativeLayerNorm")
    ndim = len(chain[at]._input_metadata[0].shape)

    def perm(f: Any) -> list[int] | None:
        name = grad_fn_name(f)
        if name in ("Clone", "Contiguous"):
            return list(range(ndim))
        if name == "Permute":
            return [d % ndim for d in _signed(f._saved_dims)]
        if name == "Transpose":
            p = list(range(ndim))
            d0, d1 = _signed(f._saved_dim0) % ndim, _signed(f._saved_dim1) % ndim
            p[d0], p[d1] = p[d1], p[d0]
            return p
        return None

    out_dim = ndim - 1
    for f in reversed(chain[:at]):  # ops after the layer norm, in the order they ran
        p = perm(f)
        if p is None:
            return None
        out_dim = p.index(out_dim)
    in_dim = ndim - 1
    for f in chain[at + 1 :]:  # ops before it, from the layer norm back to the module input
        p = perm(f)
        if p is None:
            return None
        in_dim = p[in_dim]
    return {"in": in_dim, "out": out_dim}


_SAVED = (
    "dim",
    "keepdim",
    "split_size",
    "split_sizes",
    "dims",
    "dim0",
    "dim1",
    "start",
    "end",
    "step",
    "index",
    "repeats",
    "self_sym_sizes",
)


def _signed(value: Any) -> Any:
    """Autograd saves some dims as unsigned 64-bit integers: turn -1 back into -1."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**63:
        return value - 2**64
    if isinstance(value, tuple):
        return tuple(_signed(v) for v in value)
    return value


@functools.cache
def _saved_attrs(cls: type) -> list[tuple[str, str]]:
    """(key, attribute) pairs of :data:`_SAVED` that an autograd node class has."""
    return [(key, f"_saved_{key}") for key in _SAVED if hasattr(cls, f"_saved_{key}")]


def _read_saved(node: Node) -> None:
    """Copy the autograd node's saved scalars (dims, sizes...) that index mapping needs."""
    fn = node.grad_fn
    node.attrs["op"] = grad_fn_name(fn)
    for key, attr in _saved_attrs(type(fn)):  # type: ignore[arg-type]  # classes are hashable
        try:
            node.attrs[key] = _signed(getattr(fn, attr))
        except RuntimeError:
            continue
    if grad_fn_name(fn) == "Index" and hasattr(fn, "_saved_indices"):
        try:
            node.attrs["indexed_dims"] = [i for i, ix in enumerate(fn._saved_indices) if ix is not None]
        except RuntimeError:
            node.attrs["indexed_dims"] = None
