"""Operation types: the vocabulary every graph node is classified into.

Modules are classified by class (``module2type``); operations that autograd reveals without a
module (``torch.cat``, ``view``, ``+``...) are classified by the name of their autograd node
(``grad_fn2type``) and represented in the graph by a small virtual op object.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch.nn as nn


class OpType(enum.IntEnum):
    """Kind of a graph node. The first group are real modules, the second virtual ops."""

    CONV = 0
    DEPTHWISE_CONV = 1
    LINEAR = 2
    BN = 3
    LN = 4
    GN = 5
    IN = 6
    PRELU = 7
    EMBED = 8
    PARAMETER = 9
    MHA = 10
    LSTM = 11
    CUSTOMIZED = 12
    # Virtual ops, recognised from autograd node names.
    CONCAT = 20
    SPLIT = 21
    RESHAPE = 22
    PERMUTE = 23
    ELEMENTWISE = 24
    SLICE = 25
    EXPAND = 26
    MATMUL = 27
    ATTENTION = 28
    REDUCE = 29
    BARRIER = 30
    INPUT = 31

    @property
    def is_virtual(self) -> bool:
        """True for ops that own no parameters (found from autograd, not from a module)."""
        return self >= _FIRST_VIRTUAL


_FIRST_VIRTUAL = int(OpType.CONCAT)
_NORM_LN = tuple(c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if c is not None)


def _conv_type(module: nn.modules.conv._ConvNd) -> OpType:
    """Depthwise convolutions (one group per input channel) couple their input and output channels."""
    if module.groups > 1 and module.groups == module.in_channels:
        return OpType.DEPTHWISE_CONV
    return OpType.CONV


# Module classes and their type, tried in order (the first match wins); a callable instead of a
# type decides from the module itself.
_MODULE_TYPES: tuple[tuple[type | tuple[type, ...], OpType | Callable[[Any], OpType]], ...] = (
    (nn.modules.conv._ConvNd, _conv_type),
    (nn.modules.batchnorm._BatchNorm, OpType.BN),
    (nn.Linear, OpType.LINEAR),
    (_NORM_LN, OpType.LN),
    (nn.GroupNorm, OpType.GN),
    (nn.modules.instancenorm._InstanceNorm, OpType.IN),
    (nn.PReLU, OpType.PRELU),
    (nn.Embedding, OpType.EMBED),
    (nn.MultiheadAttention, OpType.MHA),
    ((nn.LSTM, nn.GRU), OpType.LSTM),
    (nn.Parameter, OpType.PARAMETER),
)


def module2type(module: nn.Module) -> OpType:
    """Classify a module by the first matching class of ``_MODULE_TYPES``. Unknown modules fall
    back to ``ELEMENTWISE``.

    Depthwise convolutions (one group per input channel) are a separate type because their
    input and output channels are coupled.
    """
    for classes, kind in _MODULE_TYPES:
        if isinstance(module, classes):
            return kind if isinstance(kind, OpType) else kind(module)
    return OpType.ELEMENTWISE


#: Autograd node names (without the ``Backward<n>`` suffix) of each virtual op type: the op
#: vocabulary (read-only). A name found nowhere here is elementwise. The propagation rules
#: registry (:mod:`.rules`) gives each of these names its family's rule.
GRAD_FN_TYPES: Mapping[OpType, tuple[str, ...]] = MappingProxyType(
    {
        OpType.CONCAT: ("Cat", "Stack"),
        OpType.SPLIT: ("Split", "SplitWithSizes", "Unbind", "Chunk", "UnsafeSplit", "UnsafeSplitWithSizes"),
        OpType.RESHAPE: (
            "View",
            "Reshape",
            "ReshapeAlias",
            "UnsafeView",
            "Flatten",
            "Squeeze",
            "Unsqueeze",
            "SqueezeDim",
            "SqueezeDims",
            "UnsqueezeDim",
            "Unflatten",
        ),
        OpType.PERMUTE: ("Permute", "Transpose", "T"),
        OpType.SLICE: ("Slice", "Select", "Index", "Narrow", "Gather"),
        OpType.EXPAND: ("Expand", "Repeat", "RepeatInterleave"),
        OpType.MATMUL: ("Mm", "Bmm", "Matmul", "Addmm", "Baddbmm", "Mv", "Dot"),
        OpType.ATTENTION: (
            "ScaledDotProductFlashAttentionForCpu",
            "ScaledDotProductEfficientAttention",
            "ScaledDotProductFlashAttention",
            "ScaledDotProductAttentionMath",
            "ScaledDotProductCudnnAttention",
        ),
        OpType.REDUCE: (
            "Mean",
            "Sum",
            "Amax",
            "Amin",
            "Max",
            "Min",
            "Std",
            "Var",
            "VarMean",
            "Norm",
            "LinalgVectorNorm",
            "Logsumexp",
            "Prod",
            "Cumsum",
        ),
    }
)
_NAME_TO_TYPE = {name: t for t, names in GRAD_FN_TYPES.items() for name in names}

# Elementwise-style ops we know about (activation, arithmetic, pooling, dropout, casts...).
# They keep the channel layout of their inputs; anything else also falls back to elementwise,
# but the graph warns about it.
KNOWN_ELEMENTWISE = frozenset(
    [
        "Add",
        "AddScalar",
        "Sub",
        "SubScalar",
        "Rsub",
        "Mul",
        "MulScalar",
        "Div",
        "DivScalar",
        "Neg",
        "Pow",
        "PowTensorScalar",
        "PowTensorTensor",
        "Sqrt",
        "Rsqrt",
        "Exp",
        "Log",
        "Log1p",
        "Abs",
        "Sign",
        "Clamp",
        "ClampMin",
        "ClampMax",
        "Clip",
        "Relu",
        "Relu6",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Silu",
        "Mish",
        "Hardswish",
        "Hardsigmoid",
        "Hardtanh",
        "Sigmoid",
        "Tanh",
        "Softplus",
        "Softsign",
        "Softmax",
        "LogSoftmax",
        "SafeSoftmax",
        "Threshold",
        "Where",
        "MaskedFill",
        "Dropout",
        "NativeDropout",
        "FusedDropout",
        "Erf",
        "Sin",
        "Cos",
        "Reciprocal",
        "ToCopy",
        "Clone",
        "Copy",
        "Contiguous",
        "Alias",
        "Detach",
        "AvgPool1D",
        "AvgPool2D",
        "AvgPool3D",
        "MaxPool1DWithIndices",
        "MaxPool2DWithIndices",
        "MaxPool3DWithIndices",
        "AdaptiveAvgPool1D",
        "AdaptiveAvgPool2D",
        "AdaptiveAvgPool3D",
        "AdaptiveMaxPool1D",
        "AdaptiveMaxPool2D",
        "AdaptiveMaxPool3D",
        "MeanDim",
        "UpsampleNearest1D",
        "UpsampleNearest2D",
        "UpsampleNearest3D",
        "UpsampleBilinear2D",
        "UpsampleBicubic2D",
        "UpsampleLinear1D",
        "UpsampleTrilinear3D",
        "UpsampleNearestExact2D",
        "ConstantPadNd",
        "ReflectionPad1D",
        "ReflectionPad2D",
        "ReplicationPad1D",
        "ReplicationPad2D",
        "Roll",
        "Flip",
        "Lerp",
        "Addcmul",
        "Addcdiv",
        "Maximum",
        "Minimum",
        "Fmod",
        "Remainder",
        "Tril",
        "Triu",
        "NativeLayerNormNoAffine",
        "Glu",
        "Masked",
        "Float",
        "Half",
        "Bfloat16",
        "Round",
        "Floor",
        "Ceil",
        "Trunc",
        "NanToNum",
        "Im2Col",
        "Col2Im",
        "Erfinv",
        "Atan2",
        "Tan",
        "Asin",
        "Acos",
        "Atan",
        "Sinh",
        "Cosh",
        "Asinh",
        "Acosh",
        "Atanh",
        "Expm1",
        "Exp2",
        "Log2",
        "Log10",
        "Sgn",
        "Lgamma",
        "Digamma",
        "Logit",
        "Hypot",
        "Xlogy",
        "LogSigmoid",
        "Softshrink",
        "Hardshrink",
        "Tanhshrink",
        "Prelu",
        "Rrelu",
    ]
)

_SUFFIX = re.compile(r"(Backward\d*)$")


def grad_fn_name(grad_fn: Any) -> str:
    """``'ConvolutionBackward0'`` -> ``'Convolution'``."""
    return _op_name(type(grad_fn))  # type: ignore[arg-type]  # mypy sees no class as Hashable


@functools.cache
def _op_name(cls: type) -> str:
    return _SUFFIX.sub("", cls.__name__)


def op_name2type(name: str) -> OpType:
    """The type of a virtual op from its autograd node name. Unknown names map to elementwise."""
    return _NAME_TO_TYPE.get(name, OpType.ELEMENTWISE)


def grad_fn2type(grad_fn: object) -> OpType:
    """Classify an autograd node that belongs to no module. Unknown names map to elementwise."""
    return _NAME_TO_TYPE.get(grad_fn_name(grad_fn), OpType.ELEMENTWISE)


def is_known_grad_fn(grad_fn: object) -> bool:
    """Whether the autograd node's name is one the graph understands (others trigger a warning)."""
    name = grad_fn_name(grad_fn)
    return name in _NAME_TO_TYPE or name in KNOWN_ELEMENTWISE
