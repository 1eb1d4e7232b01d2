"""Integrations with training frameworks (the layer above :mod:`prune_callbacks.pruning`).

:mod:`.lightning` holds the Lightning callback, :mod:`.hf` the Hugging Face ``Trainer`` callback and
``save_pretrained`` / ``from_pretrained`` for pruned models; :mod:`.records` and :mod:`.state` are what
both callbacks share (no framework imported). Nothing here is imported by the pruning library itself.
"""
