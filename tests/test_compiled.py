"""Issue 15, compiled modules keep compiling: tracing a model that holds a ``torch.compile``d
submodule (or is one) must not leave dynamo skipping the user's code, and after a prune the
compiled module recompiles for the new shapes and computes what its original module computes.

A counting backend stands for inductor (no C++ toolchain needed): it records every graph dynamo
compiles and every call of a compiled graph, so "ran compiled" is observable."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

from helpers import LitNet, TinyCNN, cpu_trainer, random_loader
from prune_callbacks import Pruner, StructuredPruning


class CountingBackend:
    """A dynamo backend that runs the captured graph as is and counts compiles and calls."""

    def __init__(self) -> None:
        self.compiles = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiles += 1

        def run(*args: Any) -> Any:
            self.calls += 1
            return gm.forward(*args)

        return run


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Holder(nn.Module):
    """A model whose body is compiled in ``__init__`` (``self.net = torch.compile(net)``)."""

    def __init__(self, backend: CountingBackend) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.compile(TinyCNN(), backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_tracing_does_not_make_dynamo_skip_the_model() -> None:
    backend = CountingBackend()
    model = Holder(backend)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    Pruner(model, x, "l2", pruning_ratio=0.5)
    calls = backend.calls
    model(x)
    assert backend.calls == calls + 1, "the compiled module ran eagerly after the graph was built"


@pytest.mark.parametrize("whole", [False, True], ids=["compiled-submodule", "compiled-model"])
def test_compiled_module_recompiles_after_a_prune(whole: bool) -> None:
    backend = CountingBackend()
    if whole:
        torch.manual_seed(0)
        original: nn.Module = TinyCNN()
        model: nn.Module = torch.compile(original, backend=backend)
    else:
        model = Holder(backend)
        original = model.net._orig_mod  # type: ignore[union-attr]
    x = torch.randn(2, 3, 8, 8)
    model(x)
    width = original.conv1.out_channels
    pruner = Pruner(model, x, "l2", pruning_ratio=0.5)
    pruner.step()
    assert original.conv1.out_channels == width // 2, "the original module was pruned"
    compiles, calls = backend.compiles, backend.calls
    out = model(x)
    assert backend.compiles == compiles + 1, "no recompile for the pruned shapes"
    assert backend.calls == calls + 1, "the pruned model did not run compiled"
    torch.testing.assert_close(out, original(x))


class CompiledLit(LitNet):
    """The Lightning style: ``self.model = torch.compile(...)`` inside the LightningModule."""

    def __init__(self, backend: CountingBackend) -> None:
        super().__init__()
        self.model = torch.compile(self.model, backend=backend)  # type: ignore[assignment]


def test_callback_prunes_a_compiled_submodule_and_training_runs_compiled(tmp_path) -> None:
    backend = CountingBackend()
    module = CompiledLit(backend)
    seen: dict[str, int] = {}

    class Watch(StructuredPruning):
        def _prune(self, trainer: Any, pl_module: Any, epoch: int) -> None:
            super()._prune(trainer, pl_module, epoch)
            seen.update(compiles=backend.compiles, calls=backend.calls)

    prune = Watch("l2", pruning_ratio=0.5, epochs=[0], verbose=False)
    trainer = cpu_trainer(tmp_path, [prune], max_epochs=2, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, random_loader())
    original = module.model._orig_mod
    assert original.conv1.out_channels == 8
    assert seen, "the callback did not prune"
    assert backend.compiles > seen["compiles"], "no recompile after the prune"
    # the second epoch's 4 training batches (forward and backward graphs) ran compiled
    assert backend.calls >= seen["calls"] + 4
