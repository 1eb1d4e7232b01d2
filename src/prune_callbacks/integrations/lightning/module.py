"""A mixin that makes pruned checkpoints load the Lightning way, with or without the callback.

A pruned checkpoint holds smaller tensors than a freshly constructed module, so
``MyModule.load_from_checkpoint(path)`` or ``Trainer().validate(MyModule(), ckpt_path=path)``
fail with torch's size-mismatch error unless the module gets the pruned structure first.
Lightning calls ``LightningModule.on_load_checkpoint`` right before it loads the weights in both
paths (``saving._load_state`` and ``_CheckpointConnector.restore_model``), so a module class that
inherits :class:`PrunedCheckpoints` once replays the checkpoint's pruning history there (the
:class:`~.callback.StructuredPruning` callback does the same while it is attached).

The other way round also works: a *dense* checkpoint (no history) loaded into a module that is
already pruned is sliced to the module's structure: a dense twin of the module (built from its
``hparams``) takes the dense weights, the module's history is replayed on it, and its weights are
what loads.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ...pruning.history import apply_pruning_history, get_pruning_history
from ..state import replay_history
from .checkpoint import drop_marker, history_from_checkpoint

__all__ = ["PrunedCheckpoints"]


class PrunedCheckpoints:
    """Mixin for a ``LightningModule`` (put it first among the bases)::

        class MyModule(PrunedCheckpoints, L.LightningModule): ...

        model = MyModule.load_from_checkpoint("pruned.ckpt")          # pruned structure, weights
        L.Trainer().validate(MyModule(), dataloader, ckpt_path="pruned.ckpt")

    ``on_load_checkpoint`` gives the module the checkpoint's pruned structure before Lightning
    loads the weights, and slices a dense checkpoint for a module that is already pruned. A
    module pruned differently from the checkpoint is refused before anything changes.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replay the checkpoint's pruning history on this module, or slice a dense checkpoint's
        weights to this (pruned) module's structure; then the class's own hook runs."""
        if not isinstance(self, pl.LightningModule):
            raise TypeError("PrunedCheckpoints is a mixin for LightningModule subclasses")
        drop_marker(checkpoint)
        history = history_from_checkpoint(checkpoint)
        if history:
            replay_history(self, history)
        elif get_pruning_history(self) and "state_dict" in checkpoint:
            checkpoint["state_dict"] = self.pruned_weights(checkpoint["state_dict"])
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]  # the LightningModule's hook

    def pruned_weights(self, dense_state: dict[str, Any]) -> dict[str, Any]:
        """``dense_state`` (the weights of the unpruned module) sliced to this module's pruned
        structure: a dense twin built from ``hparams`` loads them and replays this module's
        history. A module that cannot be built again from its ``hparams`` gets an error naming
        the alternative."""
        assert isinstance(self, pl.LightningModule)
        try:
            twin = type(self)(**dict(self.hparams))
        except TypeError as e:
            raise ValueError(
                f"{type(self).__name__} is pruned and the checkpoint is dense; slicing it needs a dense "
                f"{type(self).__name__} built from its hparams, which failed ({e}): call "
                "self.save_hyperparameters() in __init__, or load the dense weights into a fresh module "
                "and prune it again (prune_callbacks.apply_pruning_history / load_pruned)"
            ) from e
        twin.load_state_dict(dense_state)
        apply_pruning_history(twin, get_pruning_history(self))
        return twin.state_dict()
