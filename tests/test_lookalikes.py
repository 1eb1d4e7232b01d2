"""Prune every look-alike block of :mod:`lookalikes` and check the promise "never a broken model".

Each block (and, for blocks with attention heads, each block with head pruning too) is pruned with
one l2 step at ratio 0.5. The pruned model must run on its example inputs (and on ``alt_inputs``,
the branch the example does not take), keep its output shapes, and compute what the dense model
computes with the removed channels zeroed (within 1e-4, for blocks marked ``exact``). A block the
library cannot prune must say so: nothing pruned is fine only with a warning naming the layers.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lookalikes import BLOCKS, Block, call, masked_reference, run_block
from prune_callbacks import Pruner

ATOL = 1e-4
CASES = [
    pytest.param(b, heads, id=f"{b.name}-{'heads' if heads else 'channels'}")
    for b in BLOCKS
    for heads in ((False, True) if b.heads else (False,))
]


def test_zoo_is_big_and_named_uniquely() -> None:
    assert len(BLOCKS) >= 40
    names = [b.name for b in BLOCKS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(("block", "heads"), CASES)
def test_never_a_broken_model(block: Block, heads: bool) -> None:
    r = run_block(block, heads, atol=ATOL)
    context = f"{block.name} ({block.style}), heads={heads}: {r.diagnosis}\nwarnings:\n"
    context += "\n".join(r.warnings)
    assert r.error is None, context
    assert r.runs, context
    assert r.shapes_kept, context
    pruned_any = r.params_after < r.params_before
    if block.exact and pruned_any:
        assert r.max_diff is not None and r.max_diff <= ATOL, context
    if not pruned_any or r.cls == "partial":
        # refusing is allowed, silently is not: the warnings name the refused layers
        assert r.refusals, context
    assert r.cls in ("full", "partial", "none"), context


def _block(name: str) -> Block:
    return next(b for b in BLOCKS if b.name == name)


def test_masked_reference_of_an_unpruned_model_is_the_model() -> None:
    b = _block("resnet_basic")
    model, x = b.build(), b.inputs()
    ref = masked_reference(model, model)
    with torch.no_grad():
        assert torch.equal(call(ref, x), call(model, x))


@pytest.mark.parametrize(
    "name", ["resnet_basic", "vit_attention", "convnext_block", "rmsnorm_handwritten", "llama_gqa_rope"]
)
def test_masked_reference_is_not_trivial(name: str) -> None:
    """The harness check has teeth: the reference differs from the dense model, and a changed
    weight of a kept channel in the pruned model is caught."""
    b = _block(name)
    model, x = b.build(), b.inputs()
    dense = copy.deepcopy(model)
    Pruner(model, x, importance="l2", pruning_ratio=0.5).step()
    ref = masked_reference(dense, model)
    with torch.no_grad():
        out, ref_out, dense_out = call(model, x), call(ref, x), call(dense, x)
        assert (out - ref_out).abs().max() <= ATOL
        assert (dense_out - ref_out).abs().max() > 1e-2
        next(p for p in model.parameters() if p.dim() > 1).data.mul_(1.5)
        assert (call(model, x) - ref_out).abs().max() > 1e-3
