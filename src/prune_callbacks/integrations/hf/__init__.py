"""The Hugging Face integration (``transformers`` is imported by these modules only).

:mod:`.pretrained`: ``save_pretrained`` / ``from_pretrained`` that keep a pruned model's shapes
(:func:`sync_config` rewrites the config; widths that differ between layers are stored in
``config.json`` for :func:`from_pretrained`). :mod:`.trainer`: :class:`StructuredPruningCallback`,
the pruning callback of the ``transformers.Trainer``.
"""

from .pretrained import (
    HISTORY_FILE,
    LOADER,
    STRUCTURE_KEY,
    ConfigSync,
    from_pretrained,
    save_pretrained,
    sync_config,
)
from .trainer import STATE_FILE, StructuredPruningCallback, read_checkpoint_history

__all__ = [
    "HISTORY_FILE",
    "LOADER",
    "STRUCTURE_KEY",
    "STATE_FILE",
    "ConfigSync",
    "StructuredPruningCallback",
    "from_pretrained",
    "read_checkpoint_history",
    "save_pretrained",
    "sync_config",
]
