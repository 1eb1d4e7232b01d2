"""Layer pruners: how each layer family loses channels in place.

The graph core asks them for channel counts and pruning functions; they know nothing of graphs.
Imports torch only. :mod:`.base` holds the abstract :class:`LayerPruner`, the pruning-function
objects, in-place parameter slicing and the registry (:data:`DEFAULT_PRUNERS`,
:func:`~.base.register_pruner`); one module per family fills the registry on import:

* :mod:`.conv`: convolutions and transposed convolutions (plain, grouped, depthwise);
* :mod:`.linear`: ``nn.Linear``;
* :mod:`.norm`: batch, instance, layer/RMS and group norms;
* :mod:`.embedding`: ``nn.Embedding``;
* :mod:`.recurrent`: ``nn.LSTM`` / ``nn.GRU``;
* :mod:`.attention`: ``nn.MultiheadAttention``;
* :mod:`.activation`: ``nn.PReLU``;
* :mod:`.parameter`: bare ``nn.Parameter`` s.
"""

from .activation import PReLUPruner, prune_prelu_in_channels, prune_prelu_out_channels
from .attention import (
    MultiheadAttentionPruner,
    prune_multihead_attention_in_channels,
    prune_multihead_attention_out_channels,
)
from .base import (
    DEFAULT_PRUNERS,
    LayerPruner,
    PruningFunction,
    accepts_index_tensors,
    function_by_name,
    get_pruner,
    get_pruning_functions,
    normalize_idxs,
    once_per_parameter,
    recorded_updates,
    removed_channels,
    takes_index_tensors,
    track_parameter_updates,
)
from .conv import (
    ConvPruner,
    prune_conv_in_channels,
    prune_conv_out_channels,
    prune_depthwise_conv_in_channels,
    prune_depthwise_conv_out_channels,
)
from .embedding import EmbeddingPruner, prune_embedding_in_channels, prune_embedding_out_channels
from .linear import LinearPruner, prune_linear_in_channels, prune_linear_out_channels
from .norm import (
    BatchNormPruner,
    GroupNormPruner,
    InstanceNormPruner,
    LayerNormPruner,
    prune_batchnorm_in_channels,
    prune_batchnorm_out_channels,
    prune_groupnorm_in_channels,
    prune_groupnorm_out_channels,
    prune_instancenorm_in_channels,
    prune_instancenorm_out_channels,
    prune_layernorm_in_channels,
    prune_layernorm_out_channels,
)
from .parameter import (
    ParameterPruner,
    ParameterPruningFunction,
    prune_parameter_in_channels,
    prune_parameter_out_channels,
)
from .recurrent import LSTMPruner, prune_lstm_in_channels, prune_lstm_out_channels

__all__ = [
    "DEFAULT_PRUNERS",
    "BatchNormPruner",
    "ConvPruner",
    "EmbeddingPruner",
    "GroupNormPruner",
    "InstanceNormPruner",
    "LSTMPruner",
    "LayerNormPruner",
    "LayerPruner",
    "LinearPruner",
    "MultiheadAttentionPruner",
    "PReLUPruner",
    "ParameterPruner",
    "ParameterPruningFunction",
    "PruningFunction",
    "accepts_index_tensors",
    "function_by_name",
    "get_pruner",
    "get_pruning_functions",
    "normalize_idxs",
    "once_per_parameter",
    "recorded_updates",
    "removed_channels",
    "takes_index_tensors",
    "track_parameter_updates",
    "prune_batchnorm_in_channels",
    "prune_batchnorm_out_channels",
    "prune_conv_in_channels",
    "prune_conv_out_channels",
    "prune_depthwise_conv_in_channels",
    "prune_depthwise_conv_out_channels",
    "prune_embedding_in_channels",
    "prune_embedding_out_channels",
    "prune_groupnorm_in_channels",
    "prune_groupnorm_out_channels",
    "prune_instancenorm_in_channels",
    "prune_instancenorm_out_channels",
    "prune_layernorm_in_channels",
    "prune_layernorm_out_channels",
    "prune_linear_in_channels",
    "prune_linear_out_channels",
    "prune_lstm_in_channels",
    "prune_lstm_out_channels",
    "prune_multihead_attention_in_channels",
    "prune_multihead_attention_out_channels",
    "prune_parameter_in_channels",
    "prune_parameter_out_channels",
    "prune_prelu_in_channels",
    "prune_prelu_out_channels",
]
