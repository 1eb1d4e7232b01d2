"""The Hydra app: train dense, prune inside ``Trainer.fit``, fine-tune, measure, report.

Modules: :mod:`.train` (the job, ``python -m prune_callbacks.train`` / ``prune-train``), :mod:`.config`
(the ``pruning`` schema and the checks run before anything is built), :mod:`.inputs` (which model and
task fit which data), :mod:`.help` (``--help``), :mod:`.tables` (console and markdown tables) and
:mod:`.report` (``python -m prune_callbacks.report``).
``conf/`` (config groups) and ``recipes/`` ship inside this package, so a wheel install runs the app.
"""
