"""Pruning on top of the dependency graph: what to prune, how much, and when.

Modules (each imports only those listed before it, and the lower layers):

* :mod:`.importance`: the criteria (one score per root channel of a group) and the flat group
  index they share with the pruner; every criterion saves its state with ``state_dict``.
* :mod:`.schedule`: how a target ratio is spread over the pruning steps.
* :mod:`.settings`: :class:`~.settings.PruningSettings`, the one validated settings object of
  the Pruner, the Lightning callback and the app.
* :mod:`.naming`: layer names and patterns resolved to modules.
* :mod:`.history`, :mod:`.optim_state`: the record of what was pruned (replay, save/load) and
  optimizer state that follows a prune.
* :mod:`.timing`: seconds per phase of the pruner's work.
* :mod:`.subsets`: subset groups of chosen channels, the merged group of a step, the prune.
* :mod:`.selection`: how many channels every group loses, and which.
* :mod:`.budget`: the channel choice that meets a ``target_speedup`` (MAC budget).
* :mod:`.pruner`: :class:`~.pruner.Pruner`, the facade (construction, ``step``, state).
"""
