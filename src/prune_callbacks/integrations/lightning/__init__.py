"""The Lightning integration: the :class:`~.callback.StructuredPruning` callback and its parts.

Modules: :mod:`.callback` (the callback: settings, hooks, pruning steps); :mod:`.checkpoint` (the
history stored once per checkpoint, the module hooks that replay it, ``pruned_from_checkpoint``);
:mod:`.module` (the :class:`PrunedCheckpoints` mixin: pruned checkpoints load the Lightning way);
:mod:`.ddp` (supported strategies, rank 0's scores, the DDP wrapper rebuild); :mod:`.records` (group
widths and the record of each pruning step); :mod:`.loggers` (metrics to the Trainer's loggers);
:mod:`.wandb_logging` (W&B table and chart, imported only with a ``WandbLogger``); :mod:`.summary`
(the console table); :mod:`.sparse` (the :class:`SparseTraining` callback: sparse training before the
cut); :mod:`.optimizers` (the AMP scale still on the gradients in ``on_before_optimizer_step``).
"""

from .callback import HISTORY_KEY, StructuredPruning, pruned_from_checkpoint
from .module import PrunedCheckpoints
from .sparse import SparseTraining

__all__ = [
    "HISTORY_KEY",
    "PrunedCheckpoints",
    "SparseTraining",
    "StructuredPruning",
    "pruned_from_checkpoint",
]
