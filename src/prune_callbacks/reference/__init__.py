"""Reference models and data: small, readable networks (:mod:`.models`, plain ``torch.nn``), Lightning
data modules that need no download at run time (:mod:`.data`) and LightningModule wrappers that add a
loss, metrics and an optimizer to any network (:mod:`.tasks`).

They are what the app, the tests and the benchmarks prune; they never import the pruning library
(an import contract checks it), so they stand for *any* user model.
"""
