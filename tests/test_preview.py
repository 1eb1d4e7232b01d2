"""Issue 18, dry run: ``Pruner.preview()`` shows what the steps would remove and the MACs after
each, leaves the model bitwise unchanged (parameters, their ids, grads, buffers, history, schedule
position, criterion statistics), and the next real step removes what the preview showed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import TinyCNN
from prune_callbacks import Pruner, count_macs_and_params, get_pruning_history

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


def _model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


def _state(model: torch.nn.Module) -> dict[str, object]:
    return {
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "ids": [id(p) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "history": json.dumps(get_pruning_history(model)),
    }


def _same(model: torch.nn.Module, before: dict[str, object]) -> None:
    now = _state(model)
    assert now["ids"] == before["ids"] and now["history"] == before["history"]
    for k, v in before["values"].items():  # type: ignore[union-attr]
        assert torch.equal(now["values"][k], v), k  # type: ignore[index]
    for a, b in zip(now["grads"], before["grads"]):  # type: ignore[arg-type]
        assert (a is None and b is None) or torch.equal(a, b)


def _records(model: torch.nn.Module, start: int = 0) -> list[tuple[str, list[int]]]:
    return [(r["root"], list(r["idxs"])) for r in get_pruning_history(model)[start:]]


@pytest.mark.parametrize("target", [{"pruning_ratio": 0.5}, {"target_speedup": 2.0}])
def test_preview_changes_nothing_and_the_steps_do_what_it_showed(target: dict) -> None:
    model = _model()
    F.cross_entropy(model(X), Y).backward()  # grads present: they must survive too
    pruner = Pruner(model, X, "l2", iterative_steps=3, **target)
    before = _state(model)
    preview = pruner.preview()
    _same(model, before)
    assert pruner.current_step == 0 and len(preview.steps) == 3 and not preview.stopped
    assert preview.macs == count_macs_and_params(model, X)[0]
    for shown in preview.steps:
        start = len(get_pruning_history(model))
        pruner.step()
        assert _records(model, start) == [(c.root, list(c.removed)) for c in shown.changes]
        assert count_macs_and_params(model, X)[0] == shown.macs
    assert preview.steps[-1].macs < preview.macs
    text = str(preview)
    assert text.startswith("dry run:") and "conv1" in text
    json.dumps(preview.to_dict())


def test_gradient_criterion_preview_keeps_its_statistics_and_stops_after_one_step() -> None:
    model = _model()
    pruner = Pruner(model, X, "taylor", pruning_ratio=0.5, iterative_steps=2)
    F.cross_entropy(model(X), Y).backward()
    pruner.importance.accumulate(model)
    scores = [pruner.estimate_importance(g) for g in pruner.groups]
    preview = pruner.preview()
    assert len(preview.steps) == 1 and "gradients" in preview.stopped
    again = [pruner.estimate_importance(g) for g in pruner.groups]
    for a, b in zip(scores, again):
        assert (a is None and b is None) or torch.equal(a, b)
    pruner.step()
    assert _records(model) == [(c.root, list(c.removed)) for c in preview.steps[0].changes]


def test_random_criterion_draws_the_same_channels_after_a_preview() -> None:
    model = _model()
    pruner = Pruner(model, X, "random", pruning_ratio=0.5)
    preview = pruner.preview(steps=1)
    pruner.step()
    assert _records(model) == [(c.root, list(c.removed)) for c in preview.steps[0].changes]


def test_preview_of_a_finished_schedule_is_empty_and_bad_steps_are_refused() -> None:
    model = _model()
    pruner = Pruner(model, X, "l2", pruning_ratio=0.5)
    with pytest.raises(ValueError, match="positive int"):
        pruner.preview(steps=0)
    pruner.step()
    assert pruner.preview().steps == ()
