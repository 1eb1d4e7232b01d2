"""Structure analysis does not care how wide a layer is (issue 19, item 1).

A Llama built on the meta device at two widths has the same groups (the same layers, functions and
sources, every channel count scaled), and finding them makes the same number of Python function
calls: channel sets travel as runs and repeated blocks are copies, so no Python work is done per
channel. Counting calls (cProfile) instead of timing keeps the test independent of machine load.
"""

from __future__ import annotations

import cProfile
import pstats
import warnings

import pytest
import torch

from prune_callbacks import DependencyGraph, Pruner
from prune_callbacks.graph import index_mapping as im

transformers = pytest.importorskip("transformers")


def _meta_llama(width: int, layers: int = 2) -> torch.nn.Module:
    """A Llama of hidden ``width`` on meta: MLP 2 x width, 4 heads of width / 4 features, 2
    key/value heads (every size scales with the width)."""
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval()


def _inputs() -> dict:
    return {"input_ids": torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))}


def _graph(model: torch.nn.Module) -> DependencyGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DependencyGraph().build_dependency(model, _inputs())


def _groups(model: torch.nn.Module) -> tuple[DependencyGraph, list]:
    dg = _graph(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dg, dg.get_all_groups(ignored_layers=[model.lm_head])


def _names(model: torch.nn.Module) -> dict:
    return {m: n for n, m in model.named_modules()} | {p: n for n, p in model.named_parameters()}


def _structure(model: torch.nn.Module, groups: list) -> list:
    names = _names(model)
    return [
        [
            (
                names[it.dep.target.module],
                names[it.dep.source.module],
                str(it.dep.handler),
                str(it.dep.trigger),
            )
            for it in g
        ]
        for g in groups
    ]


def test_wide_groups_are_the_narrow_groups_scaled() -> None:
    """Width 128 and width 512: the same groups, item for item, each channel count times 4, and
    every channel list is the narrow one scaled (a whole layer, or whole heads)."""
    narrow, wide = _meta_llama(128), _meta_llama(512)
    _, g_narrow = _groups(narrow)
    _, g_wide = _groups(wide)
    assert len(g_narrow) >= 5  # residual stream, per layer: heads and MLP
    assert _structure(narrow, g_narrow) == _structure(wide, g_wide)
    for a, b in zip(g_narrow, g_wide):
        assert a.head_blocks == b.head_blocks
        for x, y in zip(a, b):
            assert 4 * len(x.idxs) == len(y.idxs)
            assert y.count == len(y.idxs)
            # the channels of the narrow item, each stretched to the 4 channels it became
            stretched = sorted(4 * c + k for c in x.idxs for k in range(4))
            assert y.idxs == stretched
            idx, roots = y.index_tensors()
            assert idx.tolist() == y.idxs and roots.tolist() == y.root_idxs


def _calls(fn) -> int:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return sum(s[1] for s in pstats.Stats(prof).stats.values())  # type: ignore[attr-defined]


def test_finding_groups_makes_as_many_python_calls_at_any_width() -> None:
    """The Python function calls of get_all_groups do not grow with the width (a per-channel
    comprehension or generator would add a call per channel)."""
    counts = []
    for width in (128, 1024):
        model = _meta_llama(width)
        dg = _graph(model)

        def groups(dg: DependencyGraph = dg, model: torch.nn.Module = model) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for g in dg.get_all_groups(ignored_layers=[model.lm_head]):
                    for it in g:
                        it.index_tensors()

        counts.append(_calls(groups))
    assert counts[1] <= counts[0] * 1.05, counts


def test_a_pruner_step_makes_as_many_python_calls_at_any_width() -> None:
    """Pruner construction and one step (random scores, 30% of every group and 25% of the heads)
    make about as many Python calls at width 1024 as at 128."""
    counts = []
    for width in (128, 1024):
        model = _meta_llama(width)

        def step(model: torch.nn.Module = model) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruner = Pruner(
                    model,
                    _inputs(),
                    "random",
                    pruning_ratio=0.3,
                    prune_num_heads=True,
                    head_pruning_ratio=0.25,
                    ignored_layers=["lm_head"],
                )
                pruner.step()

        counts.append(_calls(step))
    assert counts[1] <= counts[0] * 1.1, counts


def test_channel_sets_read_and_written_as_runs() -> None:
    """A channel set read from a wide map stays a few runs, and its lists, tensors and count
    agree."""
    m = im.channel_map(3, 2, 8192, range(4096, 8192), range(4096))
    s = im.channel_set(m, 2, 8192)
    assert s.runs == [(4096, 8192, 0, 1)] and not s.materialized
    idxs, roots = im.channel_lists(s)
    assert idxs == list(range(4096, 8192)) and roots == list(range(4096))
    t_idx, t_roots = im.channel_tensors(s)
    assert t_idx.tolist() == idxs and t_roots.tolist() == roots
    assert im.set_count(s) == 4096
    back = im.spread(s, 3, 2)
    assert back.runs == m.runs and back.shape == m.shape
    assert im.resize_set(im.channel_set(im.channel_map(1, 0, 4, [1], [7]), 0, 4), 6).t.tolist() == [
        -1,
        7,
        -1,
        -1,
        -1,
        -1,
    ]
