"""Integrations with training frameworks (the layer above :mod:`prune_callbacks.pruning`).

:mod:`.lightning` holds the Lightning callback; nothing here is imported by the pruning library itself.
"""
