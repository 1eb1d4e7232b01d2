"""Recurrent layers: ``nn.LSTM`` and ``nn.GRU`` (hidden units and input features)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import (
    Idxs,
    LayerPruner,
    ParamViews,
    Side,
    block_rows_view,
    check_side,
    columns_without_rows_view,
    define_public_functions,
    keep_indices,
    normalize_idxs,
    register_pruner,
    select_parameter,
    type_name,
)

__all__ = ["LSTM_PRUNER", "LSTMPruner", "prune_lstm_in_channels", "prune_lstm_out_channels"]

# Gate blocks stacked in the weights of each RNNBase mode.
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _refresh_rnn(module: nn.RNNBase) -> None:
    """Re-read the flat weight list of an RNN module after its parameters changed shape."""
    init = getattr(module, "_init_flat_weights", None)
    if callable(init):
        init()
    elif hasattr(module, "flatten_parameters"):
        module.flatten_parameters()


class LSTMPruner(LayerPruner[nn.RNNBase]):
    """``nn.LSTM`` and ``nn.GRU`` (any ``RNNBase``): out side = hidden units, in side = input size.

    Hidden unit ``j`` is pruned in every layer and direction: its gate rows of ``weight_ih``,
    ``weight_hh`` and the biases, column ``j`` of ``weight_hh``, and the columns of the next
    layer's ``weight_ih`` that read it (``j`` and ``hidden + j`` when bidirectional). The sides are
    not coupled. LSTMs with ``proj_size > 0`` have no prunable output side.
    """

    @staticmethod
    def _gates(module: nn.RNNBase) -> int:
        return _RNN_GATES[module.mode]

    @staticmethod
    def _suffixes(module: nn.RNNBase) -> tuple[str, ...]:
        return ("", "_reverse") if module.bidirectional else ("",)

    @staticmethod
    def _check_proj(module: nn.RNNBase) -> None:
        if getattr(module, "proj_size", 0) > 0:
            raise ValueError(
                f"{type_name(module)} with proj_size={module.proj_size}: pruning hidden units of "
                f"projected LSTMs is not supported"
            )

    def out_channels(self, module: nn.RNNBase) -> int | None:
        """``hidden_size`` (``None`` for a projected LSTM)."""
        return None if getattr(module, "proj_size", 0) > 0 else module.hidden_size

    def in_channels(self, module: nn.RNNBase) -> int | None:
        """``input_size``."""
        return module.input_size

    def prune_out_channels(self, module: nn.RNNBase, idxs: Idxs) -> nn.RNNBase:
        """Remove hidden units from every layer and direction."""
        self._check_proj(module)
        hidden = module.hidden_size
        removed = normalize_idxs(idxs, hidden, module)
        if not removed:
            return module
        gates = self._gates(module)
        keep = keep_indices(hidden, removed)
        gate_rows = torch.cat([keep + g * hidden for g in range(gates)])
        num_dirs = 2 if module.bidirectional else 1
        next_cols = torch.cat([keep + d * hidden for d in range(num_dirs)])
        for layer in range(module.num_layers):
            for sfx in self._suffixes(module):
                w_ih = getattr(module, f"weight_ih_l{layer}{sfx}")
                w_hh = getattr(module, f"weight_hh_l{layer}{sfx}")
                select_parameter(w_ih, 0, gate_rows)
                if layer > 0:
                    select_parameter(w_ih, 1, next_cols)
                select_parameter(w_hh, 0, gate_rows)
                select_parameter(w_hh, 1, keep)
                if module.bias:
                    select_parameter(getattr(module, f"bias_ih_l{layer}{sfx}"), 0, gate_rows)
                    select_parameter(getattr(module, f"bias_hh_l{layer}{sfx}"), 0, gate_rows)
        module.hidden_size = len(keep)
        _refresh_rnn(module)
        return module

    def prune_in_channels(self, module: nn.RNNBase, idxs: Idxs) -> nn.RNNBase:
        """Remove input features: columns of the first layer's ``weight_ih``."""
        removed = normalize_idxs(idxs, module.input_size, module)
        if not removed:
            return module
        keep = keep_indices(module.input_size, removed)
        for sfx in self._suffixes(module):
            select_parameter(getattr(module, f"weight_ih_l0{sfx}"), 1, keep)
        module.input_size = len(keep)
        _refresh_rnn(module)
        return module

    def param_views(self, module: nn.RNNBase, side: Side) -> ParamViews:
        """Gate rows, recurrent columns and next-layer input columns of each hidden unit."""
        check_side(side)
        if side == "in":
            return [(f"weight_ih_l0{sfx}", lambda t: t.t()) for sfx in self._suffixes(module)]
        self._check_proj(module)
        hidden, gates = module.hidden_size, self._gates(module)
        num_dirs = 2 if module.bidirectional else 1
        rows = block_rows_view(gates, hidden)
        views: ParamViews = []
        for layer in range(module.num_layers):
            for sfx in self._suffixes(module):
                views.append((f"weight_ih_l{layer}{sfx}", rows))
                if layer > 0:
                    views.append((f"weight_ih_l{layer}{sfx}", columns_without_rows_view(hidden, num_dirs)))
                views.append((f"weight_hh_l{layer}{sfx}", rows))
                views.append((f"weight_hh_l{layer}{sfx}", columns_without_rows_view(hidden)))
                if module.bias:
                    views.append((f"bias_ih_l{layer}{sfx}", rows))
                    views.append((f"bias_hh_l{layer}{sfx}", rows))
        return views


LSTM_PRUNER = LSTMPruner()
register_pruner(nn.LSTM, LSTM_PRUNER)
register_pruner(nn.GRU, LSTM_PRUNER)
prune_lstm_out_channels, prune_lstm_in_channels = define_public_functions(LSTM_PRUNER, "lstm")
