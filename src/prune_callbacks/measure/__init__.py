"""Cost measurements of a model: MACs and parameters (:func:`.flops.count_macs_and_params`, via
``torch.utils.flop_counter``) and latency (:func:`.flops.measure_latency`, via
``torch.utils.benchmark.Timer``); ONNX export and ONNX Runtime timing (:mod:`.export`, the onnx
packages imported inside its functions). Imports the graph layer only for its model-call convention."""
