"""Hugging Face ``save_pretrained`` / ``from_pretrained`` for pruned models.

A pruned ``PreTrainedModel`` still holds the ``config`` it was built from, so after a plain
``model.save_pretrained(path)`` transformers' ``from_pretrained`` builds the dense model and refuses
the pruned weights (a size mismatch). This module makes the saved directory describe the pruned model:

* :func:`sync_config` rewrites the model's ``config`` in place so that it describes the pruned
  shapes. Candidate values of the standard keys (hidden size, intermediate size, attention heads,
  key-value heads, head size, per-model names such as ``hidden_sizes`` / ``embedding_size`` /
  ``word_embed_proj_dim``) are read from the model itself: widths from the weights, head counts from
  the attributes the pruner keeps true on the attention modules. Nothing is trusted until checked:
  the model class is built from the candidate config with its parameters on the ``meta`` device
  (no memory, no initialisation) and every module, every parameter and buffer shape, every size
  attribute (``head_dim``, ``scaling``...) and the values of the buffers that are not saved with
  the weights but computed from the config (rotary frequencies) must equal the pruned model's.
  When they do, the widths are *uniform* and transformers' own ``from_pretrained`` loads the saved
  directory.
* When layers differ (global pruning, per-layer ratios), no config key can say so. The config then
  keeps what it can say truly and ``config.json`` gets a ``"prune_callbacks"`` entry: the shape of
  every parameter and buffer, and the value of every size attribute, that differ from the model the
  config builds. :func:`from_pretrained` builds the model from the config, gives those tensors and
  attributes their stored sizes (before any weight is read, inside transformers' own loading, so
  ``dtype``, ``device_map`` and tied weights behave as usual) and lets transformers load the
  weights. One width key of the saved ``config.json`` holds a string naming this loader (its true
  value is kept in the entry), so transformers' own loader refuses the directory with a message
  that says what to call instead of failing on a size mismatch or, worse, being told
  ``ignore_mismatched_sizes=True`` and loading random weights. (That refusal relies on the strict
  config validation of transformers 5; with older versions the key is left alone and transformers
  fails on the size mismatch.)

Why a shape map and not a replay of the pruning history: the history's indices are only valid on
the model the pruning started from, whose dense config the saved one no longer is (the pruner may
itself have rewritten sizes of a shared config, and uniform keys were just updated); a replay also
needs every custom layer pruner the model was pruned with, and its index lists grow with the
width. The shape map needs none of that, holds one short entry per changed tensor or attribute, is
checked against the built model before a weight is read, and reproduces exactly the pruned model's
sizes. The pruning history is still saved, as ``prune_callbacks_history.json`` next to the weights,
and :func:`from_pretrained` puts it back on the loaded model (so further pruning, ``save_pruned``
and ``load_pruned`` go on from it).

``transformers`` is imported only by the modules of :mod:`prune_callbacks.integrations.hf`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import keyword
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import transformers

from ...pruning.history import get_pruning_history

__all__ = [
    "CONFIG_KEYS",
    "ConfigSync",
    "HISTORY_FILE",
    "LOADER",
    "STRUCTURE_KEY",
    "from_pretrained",
    "save_pretrained",
    "sync_config",
]

#: What to call to load a directory whose layers differ (named in every message about it).
LOADER = "prune_callbacks.integrations.hf.from_pretrained"
#: The ``config.json`` entry that holds the per-layer sizes the config keys cannot express.
STRUCTURE_KEY = "prune_callbacks"
STRUCTURE_FORMAT = "prune_callbacks.hf-structure/1"
#: The file, next to the weights, that holds the pruning history.
HISTORY_FILE = "prune_callbacks_history.json"
HISTORY_FORMAT = "prune_callbacks.hf-history/1"
#: The value a width key of ``config.json`` gets when the widths differ between layers.
MARKER = f"differs between layers (pruned model): load it with {LOADER}"

#: Config keys by the width they set, each tuple in the order the names are tried.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model", "dim", "embed_dim"),
    "intermediate": (
        "intermediate_size",
        "n_inner",
        "ffn_dim",
        "hidden_dim",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "d_ff",
        "mlp_dim",
    ),
    "heads": (
        "num_attention_heads",
        "n_head",
        "n_heads",
        "num_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
    ),
    "kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim", "attention_head_size", "kv_channels"),
    "embedding": ("word_embed_proj_dim", "embedding_size"),
    "stages": ("hidden_sizes",),
}
#: Keys a config may lack but its model reads when set (``getattr(config, "head_dim", None) or
#: hidden_size // num_attention_heads``): tried when the config alone cannot give the head size.
OPTIONAL_KEYS = {"head_dim": "head_dim"}
#: Roles whose keys may hold the marker, in order of preference.
MARKER_ROLES = ("hidden", "stages", "intermediate", "heads", "embedding")
#: Attributes under which attention modules report their (query) head count and head size.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
#: Last name parts of the first projection of an MLP block, and how many intermediate-size blocks its
#: output holds (Phi-3's fused gate and up projection holds two): its width gives the intermediate size.
MLP_INPUTS = {
    **dict.fromkeys(
        ("gate_proj", "up_proj", "fc1", "c_fc", "intermediate.dense", "lin1", "w1", "wi", "fc_in"), 1
    ),
    "gate_up_proj": 2,
}
#: Keyword arguments of ``from_pretrained`` that say where the files are.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
#: At most this many combinations of candidate values are built and compared.
MAX_CANDIDATES = 16

_MISSING = object()
_STAGE = re.compile(r"(?:^|\.)stages\.(\d+)$")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ConfigSync:
    """What :func:`sync_config` did to a model's config.

    ``uniform``: the config alone describes the pruned model (transformers' ``from_pretrained``
    restores it). ``changed``: config key -> (old value, new value). ``structure``: when not uniform,
    the per-layer shapes and size attributes the config cannot express (what ``config.json`` stores
    under :data:`STRUCTURE_KEY`). ``nonuniform_keys``: config keys whose width differs between
    layers. ``differences``: the first differences between the pruned model and the model its
    (updated) config builds, as text, when not uniform.
    """

    uniform: bool
    changed: dict[str, tuple[Any, Any]]
    structure: dict[str, Any] | None = None
    nonuniform_keys: tuple[str, ...] = ()
    differences: tuple[str, ...] = ()


@dataclass
class _Comparison:
    """Differences between a pruned model and a model built from a config (see :func:`_compare`).

    ``problems``: what a stored structure cannot reproduce (other modules or tensors, a pruned
    buffer that is not saved with the weights, a non-size attribute the config changes);
    ``changes``: differences that change what the model computes; ``shapes`` / ``attributes``:
    the pruned model's values where they differ, the structure stored when the config cannot
    express them.
    """

    problems: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def structure(self) -> dict[str, Any]:
        return {"format": STRUCTURE_FORMAT, "shapes": self.shapes, "attributes": self.attributes}


# ---------------------------------------------------------------------------------------------
# Reading widths off the pruned model
# ---------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    """An int or float (not a bool), or a non-empty tuple/list of them: a size attribute."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_number(v) and not isinstance(v, (tuple, list)) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_plain(value: Any) -> bool:
    """Plain data that can be compared by value (numbers, bools, strings, None, tuples of them)."""
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _own_int(module: nn.Module, names: Iterable[str]) -> int | None:
    """The first of ``names`` that ``module`` holds (in its own attributes) as a positive int."""
    own = vars(module)
    for name in names:
        value = own.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _out_width(module: nn.Module | None) -> int | None:
    """Output width of an embedding or projection layer (or of the first such layer inside it)."""
    for m in module.modules() if module is not None else ():
        if isinstance(m, nn.Embedding):
            return m.embedding_dim
        weight = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            return m.out_features
        if type(m).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):  # GPT-2's (in, out) linear
            return int(weight.shape[-1])
        if isinstance(m, _CONVS):
            return m.out_channels
    return None


def _attention_widths(model: nn.Module) -> dict[str, list[list[Any]]]:
    """Head counts, key-value head counts and head sizes, one observation per attention module."""
    heads, kv_heads, dims = [], [], []
    for m in model.modules():
        h = _own_int(m, HEAD_ATTRS)
        if h is None:
            continue
        heads.append(h)
        d = _own_int(m, HEAD_DIM_ATTRS)
        if d is not None:
            dims.append(d)
        kv = _own_int(m, ("num_key_value_heads",))
        groups = _own_int(m, ("num_key_value_groups",))
        if kv is None and groups is not None and h % groups == 0:
            kv = h // groups
        if kv is not None:
            kv_heads.append(kv)
    return {"heads": [heads], "kv_heads": [kv_heads], "head_dim": [dims]}


def _mlp_width(name: str, module: nn.Module) -> int | None:
    """The intermediate size an MLP input projection gives (None for any other module)."""
    blocks = next((n for suffix, n in MLP_INPUTS.items() if ("." + name).endswith("." + suffix)), None)
    if blocks is None or not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
        return None
    width = _out_width(module)
    return width // blocks if width is not None and width % blocks == 0 else None


def _stream_widths(model: Any) -> dict[str, list[list[Any]]]:
    """Widths of the residual stream (the input embedding's and the last layer norm's, alternatives
    for the hidden size), of the MLP blocks (one observation per block) and of CNN stages."""
    try:
        embed = _out_width(model.get_input_embeddings())
    except (AttributeError, NotImplementedError):
        embed = None
    norm = None
    stem = None
    stages: dict[int, int] = {}
    mlp = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        weight = getattr(m, "weight", None)
        if (
            kind.endswith("Norm")
            and "Batch" not in kind
            and isinstance(weight, torch.Tensor)
            and weight.ndim == 1
        ):
            norm = int(weight.shape[0])
        if stem is None and isinstance(m, _CONVS):
            stem = m.out_channels
        width = _mlp_width(name, m)
        if width is not None:
            mlp.append(width)
        stage = _STAGE.search(name)
        params = list(m.parameters()) if stage else []
        if stage and params:
            stages[int(stage.group(1))] = int(params[-1].shape[0])
    ordered = [stages[i] for i in sorted(stages)] if sorted(stages) == list(range(len(stages))) else []
    return {
        "hidden": [[v] for v in dict.fromkeys((norm, embed)) if v is not None],
        "embedding": [[v] for v in dict.fromkeys((embed, stem)) if v is not None],
        "intermediate": [mlp],
        "stages": [[ordered]] if ordered else [],
    }


def _observe(model: nn.Module) -> dict[str, list[list[Any]]]:
    """Per width role (a key of :data:`CONFIG_KEYS`): alternative probes, each a list of
    observations that must all agree for the role to have one (uniform) value."""
    return {**_stream_widths(model), **_attention_widths(model)}


def _candidates(
    config: Any, observed: Mapping[str, list[list[Any]]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Config updates to try (each a {key: value} of keys the config has) and the config keys
    whose width differs between layers."""
    present = config.to_dict()
    options: dict[str, list[Any]] = {}
    nonuniform: list[str] = []
    for role, probes in observed.items():
        uniform = {json.dumps(p[0]): p[0] for p in probes if p and all(v == p[0] for v in p)}
        values = list(uniform.values())
        differing = any(len({json.dumps(v) for v in p}) > 1 for p in probes)
        for key in CONFIG_KEYS[role]:
            if key not in present:
                continue
            kind = list if role == "stages" else int
            current = present[key]
            if not (isinstance(current, kind) and not isinstance(current, bool)) and current is not None:
                continue
            if differing:
                nonuniform.append(key)
            elif values:
                options[key] = values
    for role, key in OPTIONAL_KEYS.items():
        values = [p[0] for p in observed.get(role, []) if p and all(v == p[0] for v in p)]
        if values and not any(k in present for k in CONFIG_KEYS[role]):
            options[key] = [_MISSING, values[0]]  # first without it, then with it
    keys = list(options)
    combos = itertools.islice(itertools.product(*(options[k] for k in keys)), MAX_CANDIDATES)
    updates = [{k: v for k, v in zip(keys, combo) if v is not _MISSING} for combo in combos]
    return updates, nonuniform


# ---------------------------------------------------------------------------------------------
# Building from a config and comparing
# ---------------------------------------------------------------------------------------------


def _updated(config: Any, updates: Mapping[str, Any]) -> Any:
    """A copy of ``config`` with ``updates``, checked by the config class's own validation (which
    ``save_pretrained`` runs too, e.g. that the hidden size is a multiple of the head count)."""
    new = copy.deepcopy(config)
    for key, value in updates.items():
        setattr(new, key, value)
    validate = getattr(new, "validate", None)
    if callable(validate):
        validate()
    return new


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile is moved to the meta device as it is registered (the
    way ``accelerate.init_empty_weights(include_buffers=False)`` does it); buffers stay real.
    Each parameter exists in memory only until it is registered: no initialisation work is done
    and the peak is one parameter. Patches ``nn.Module.register_parameter`` for the duration."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _build(model_cls: type, config: Any) -> nn.Module:
    """The model ``config`` builds, its parameters on the meta device (shapes only) and its buffers
    real: buffers that are not saved with the weights (rotary frequencies) are computed from the
    config, so their values must be compared, not only their shapes."""
    with _parameters_on_meta():
        return model_cls(copy.deepcopy(config))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return found


def _compare_tensors(pruned: nn.Module, built: nn.Module, out: _Comparison) -> None:
    """Parameter and buffer shapes. A buffer that is not saved with the weights (non-persistent:
    rotary frequencies, position ids) is computed from the config when the model is built, so its
    values must come out right from the config: a stored shape could not give it its values."""
    mine, theirs = _tensors(pruned), _tensors(built)
    if set(mine) != set(theirs):
        odd = sorted(set(mine) ^ set(theirs))[:3]
        out.problems.append(f"the config builds other parameters or buffers ({', '.join(odd)})")
        return
    saved = set(pruned.state_dict(keep_vars=True))
    for name, t in mine.items():
        shape, other = list(t.shape), list(theirs[name].shape)
        if name not in saved and not _same_values(t, theirs[name]):
            out.problems.append(
                f"buffer {name!r} is not saved with the weights and the config builds it with other "
                f"{'values' if shape == other else f'shape {tuple(other)}'} than {tuple(shape)}"
            )
            out.changes.append(out.problems[-1])
        if shape == other:
            continue
        out.shapes[name] = shape
        out.changes.append(f"{name}: {tuple(shape)} here, {tuple(other)} from the config")


def _same_values(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether a buffer the config builds (on the CPU) holds the pruned model's values."""
    if mine.shape != theirs.shape or mine.device.type == "meta" or theirs.device.type == "meta":
        return mine.shape == theirs.shape
    return torch.equal(mine.detach().cpu(), theirs.detach().to(mine.dtype))


def _compare_attributes(pruned: nn.Module, built: nn.Module, base: nn.Module, out: _Comparison) -> None:
    """Public plain attributes of every module. A size attribute that differs is stored; it changes
    the computation unless it is an int the pruning left as the config set it (a size the forward
    does not read, such as ``LlamaMLP.hidden_size``: a read size is kept true by the pruner). Any
    other attribute the candidate config sets differently from the pruned model is a problem;
    other differences are runtime state (``training``, gradient checkpointing) and ignored."""
    theirs, dense = dict(built.named_modules()), dict(base.named_modules())
    for name, module in pruned.named_modules():
        other, first = vars(theirs[name]), vars(dense[name]) if name in dense else {}
        for attr, value in vars(module).items():
            if attr.startswith("_") or not _is_plain(value):
                continue
            new, old = other.get(attr, _MISSING), first.get(attr, _MISSING)
            if new is not _MISSING and new == value and type(new) is type(value):
                continue
            where = f"{name}.{attr}" if name else attr
            if _is_number(value) and (new is _MISSING or _is_number(new)):
                out.attributes.setdefault(name, {})[attr] = list(value) if isinstance(value, tuple) else value
                stale = old == value and not isinstance(value, float) and not _has_float(value)
                if new is not _MISSING and not stale:
                    out.changes.append(f"{where} = {value!r} here, {new!r} from the config")
            elif new is not _MISSING and old == value:
                out.problems.append(f"{where} = {value!r} here, {new!r} from the config")
                out.changes.append(out.problems[-1])


def _has_float(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and any(isinstance(v, float) for v in value)


def _compare(pruned: nn.Module, built: nn.Module, base: nn.Module) -> _Comparison:
    """How ``built`` (from a candidate config) differs from ``pruned``; ``base`` is the model the
    current config builds, which tells sizes the pruning changed from sizes a config change moved."""
    out = _Comparison()
    kinds = {n: type(m) for n, m in pruned.named_modules()}
    others = {n: type(m) for n, m in built.named_modules()}
    if kinds != others:
        odd = sorted(n for n in set(kinds) | set(others) if kinds.get(n) is not others.get(n))[:3]
        out.problems.append(f"the config builds other modules ({', '.join(odd) or 'order'})")
        return out
    _compare_tensors(pruned, built, out)
    _compare_attributes(pruned, built, base, out)
    return out


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------


def _check_model(model: Any) -> None:
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"expected a transformers PreTrainedModel, got {type(model).__name__}; for other models use "
            "prune_callbacks.save_pruned / load_pruned"
        )


def sync_config(model: Any) -> ConfigSync:
    """Rewrite ``model.config`` (in place) so that it describes the pruned model; say whether it can.

    Candidate values of the standard width keys are read from the model (see the module
    docstring) and checked by building the model class from the candidate config, its parameters
    on the meta device: every module, parameter and buffer shape, size attribute and the values of
    the buffers the config computes must match the pruned model. The first candidate that matches
    is written into the config (``ConfigSync.uniform``). When none does, the widths differ between
    layers: the keys with one verified value are still written, and the per-layer shapes and size
    attributes are returned as ``ConfigSync.structure`` (what :func:`save_pretrained` stores in
    ``config.json`` for :func:`from_pretrained`).

    The model's parameters are never touched; the config is changed only once the result is
    known. Raises ``ValueError`` when even the per-layer structure cannot describe the model (a
    buffer that is not saved with the weights and that no candidate config computes right,
    modules the config does not build).
    """
    _check_model(model)
    config = model.config
    base = _build(type(model), config)
    candidates, nonuniform = _candidates(config, _observe(model))
    fallback: tuple[dict[str, Any], _Comparison] | None = None
    problems: list[str] = []
    for updates in [*[c for c in candidates if c], {}]:
        try:
            built = _build(type(model), _updated(config, updates)) if updates else base
        except Exception as e:  # noqa: BLE001 - a candidate the config class refuses is just not it
            problems.append(f"{updates}: {type(e).__name__}: {e}")
            continue
        found = _compare(model, built, base)
        if not found.changes and not found.problems:
            return _commit(config, updates, ConfigSync(uniform=True, changed={}))
        if fallback is None and not found.problems:
            fallback = (updates, found)
        problems.extend(found.problems)
    if fallback is None:
        raise ValueError(
            f"{type(model).__name__}: the pruned model cannot be described by its config, even with "
            f"per-layer sizes: {'; '.join(dict.fromkeys(problems))}. Save it with "
            "prune_callbacks.save_pruned instead"
        )
    updates, found = fallback
    result = ConfigSync(
        uniform=False,
        changed={},
        structure=found.structure(),
        nonuniform_keys=tuple(dict.fromkeys(nonuniform)),
        differences=tuple(found.changes[:5]),
    )
    return _commit(config, updates, result)


def _commit(config: Any, updates: Mapping[str, Any], result: ConfigSync) -> ConfigSync:
    changed = {}
    for key, value in updates.items():
        old = getattr(config, key, None)
        if old != value:
            changed[key] = (old, value)
            setattr(config, key, value)
    return ConfigSync(result.uniform, changed, result.structure, result.nonuniform_keys, result.differences)


def _marker_keys(data: Mapping[str, Any], result: ConfigSync) -> Iterator[str]:
    """Width keys of ``config.json`` that may hold :data:`MARKER`: the differing ones first (also
    when unset, like GPT-2's ``n_inner``), then the main widths."""
    for key in result.nonuniform_keys:
        if key in data and (data[key] is None or _is_number(data[key])):
            yield key
    for role in MARKER_ROLES:
        for key in CONFIG_KEYS[role]:
            if _is_number(data.get(key)):
                yield key


def _mark(data: dict[str, Any], result: ConfigSync, config_class: Any) -> bool:
    """Add the structure entry to a saved ``config.json`` dict and put :data:`MARKER` into the first
    width key whose config class refuses it with a message quoting it; False if none does."""
    marked: dict[str, Any] = {}
    for key in dict.fromkeys(_marker_keys(data, result)):
        trial = {**copy.deepcopy(data), key: MARKER}
        try:
            config_class.from_dict(trial)
        except Exception as e:  # noqa: BLE001 - the refusal is what is wanted
            if LOADER in str(e):
                marked[key] = data[key]
                data[key] = MARKER
                break
    data[STRUCTURE_KEY] = {**(result.structure or {}), "loader": LOADER, "marked": marked}
    return bool(marked)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _write_history(model: nn.Module, directory: Path) -> None:
    history = get_pruning_history(model)
    if not history:
        return
    try:
        text = json.dumps({"format": HISTORY_FORMAT, "history": list(history)})
    except TypeError as e:
        raise ValueError(f"the model's pruning history is not plain data: {e}") from e
    (directory / HISTORY_FILE).write_text(text)


def _move_into(staging: Path, target: Path) -> None:
    """Move the files written in ``staging`` into ``target``, removing weight files and a history
    of an earlier save there that this save does not write (as transformers does)."""
    target.mkdir(parents=True, exist_ok=True)
    written = {p.name for p in staging.iterdir()}
    stale = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
    for old in target.iterdir():
        if old.is_file() and old.name not in written and (stale.match(old.name) or old.name == HISTORY_FILE):
            old.unlink()
    for path in staging.iterdir():
        os.replace(path, target / path.name)


def _restore(config: Any, refs: dict[str, Any], values: dict[str, Any]) -> None:
    """Put ``config``'s attributes back: the same objects, with the values they had."""
    config.__dict__.clear()
    config.__dict__.update(refs)
    for key, value in values.items():
        if isinstance(refs[key], (dict, list)) and refs[key] != value:
            config.__dict__[key] = value


def save_pretrained(model: Any, save_directory: str | os.PathLike, **kwargs: Any) -> ConfigSync:
    """Save a pruned Hugging Face model so that it loads back into its pruned shapes.

    :func:`sync_config` updates ``model.config``; ``model.save_pretrained`` then writes the weights
    (safetensors) and config into a staging folder next to ``save_directory``, ``config.json`` gets
    the per-layer structure when the widths differ between layers (with a ``UserWarning`` that says
    to load it with :func:`from_pretrained`), the pruning history is written as
    :data:`HISTORY_FILE`, and the files are moved into ``save_directory``. ``kwargs`` go to
    ``model.save_pretrained`` (``push_to_hub`` excepted: upload the folder once saved); with
    ``is_main_process=False`` (the other ranks of a distributed run) only the config is updated and
    nothing is written. Returns the :class:`ConfigSync`.

    On any failure (``KeyboardInterrupt`` included) ``model.config`` is put back as it was and
    ``save_directory`` is not written; the model's parameters are never changed.
    """
    _check_model(model)
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "save_pretrained(push_to_hub=True) is not supported here: save, then upload the folder "
            "(huggingface_hub.upload_folder)"
        )
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_pretrained: {str(target)!r} is a file, not a directory")
    config = model.config
    refs = dict(config.__dict__)
    values = copy.deepcopy({k: v for k, v in refs.items() if isinstance(v, (dict, list))})
    try:
        result = sync_config(model)
        if not kwargs.get("is_main_process", True):
            return result  # the config is kept in step on every rank; only the main one writes
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(staging, **kwargs)
            if not result.uniform:
                _write_structure(model, staging, result)
            _write_history(model, staging)
            _move_into(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        _restore(config, refs, values)
        raise
    return result


def _write_structure(model: Any, directory: Path, result: ConfigSync) -> None:
    path = directory / transformers.utils.CONFIG_NAME
    data = json.loads(path.read_text())
    blocked = _mark(data, result, type(model.config))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    keys = ", ".join(result.nonuniform_keys) or "per-layer sizes"
    plain = (
        "transformers' own from_pretrained refuses this config"
        if blocked
        else "transformers' own from_pretrained will fail on a size mismatch"
    )
    warnings.warn(
        f"{type(model).__name__}: the widths differ between layers ({keys}), which no config key can "
        f"express: config.json holds them under {STRUCTURE_KEY!r}. Load the model with {LOADER} "
        f"({plain})",
        UserWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _damaged(why: str) -> ValueError:
    return ValueError(f"config.json: the {STRUCTURE_KEY!r} entry is damaged: {why}")


def _read_structure(entry: Any) -> dict[str, Any]:
    """Check the entry read from ``config.json`` (untrusted data) before anything is built."""
    if not isinstance(entry, Mapping) or entry.get("format") != STRUCTURE_FORMAT:
        raise _damaged(f"expected a mapping with format {STRUCTURE_FORMAT!r}")
    shapes, attributes, marked = entry.get("shapes"), entry.get("attributes"), entry.get("marked", {})
    if (
        not isinstance(shapes, Mapping)
        or not isinstance(attributes, Mapping)
        or not isinstance(marked, Mapping)
    ):
        raise _damaged("'shapes', 'attributes' and 'marked' must be mappings")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise _damaged(f"the shape of {name!r} is {shape!r}, not a list of sizes")
    for module, attrs in attributes.items():
        if not isinstance(attrs, Mapping):
            raise _damaged(f"the attributes of {module!r} are not a mapping")
        for attr, value in attrs.items():
            if (
                not isinstance(attr, str)
                or not attr.isidentifier()
                or keyword.iskeyword(attr)
                or attr[0] == "_"
            ):
                raise _damaged(f"{attr!r} of {module!r} is not a public attribute name")
            if not _is_number(value):
                raise _damaged(f"{module}.{attr} = {value!r} is not a size")
    for key, value in marked.items():
        if not (_is_number(value) or value is None):
            raise _damaged(f"the saved value of {key!r} is {value!r}, not a size")
    return {"shapes": dict(shapes), "attributes": dict(attributes), "marked": dict(marked)}


def _resize(model: nn.Module, shapes: Mapping[str, list[int]]) -> None:
    """Give the named parameters and buffers their stored shapes (empty tensors of the model's
    dtype and device: the weights are loaded after). A tensor shared by several names (tied
    weights) is replaced once, everywhere it is used."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    tensors = _tensors(model)
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        owners.setdefault(id(t), []).append((model.get_submodule(prefix), leaf))
    done: dict[int, list[int]] = {}
    for name, shape in shapes.items():
        old = tensors.get(name)
        if old is None:
            raise ValueError(
                f"config.json's {STRUCTURE_KEY!r} entry names {name!r}, which {type(model).__name__} does "
                "not have: the files were saved from another model class"
            )
        if done.setdefault(id(old), shape) != shape:
            raise _damaged(f"{name!r} shares its tensor with another name of a different shape")
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        for module, leaf in owners[id(old)]:
            setattr(module, leaf, new)
        tensors.update({n: new for n, t in tensors.items() if t is old})


def _set_attributes(model: nn.Module, attributes: Mapping[str, Mapping[str, Any]]) -> None:
    """Set the stored size attributes; only attributes that are sizes now (or missing) may be set."""
    modules = dict(model.named_modules())
    for name, attrs in attributes.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"config.json's {STRUCTURE_KEY!r} entry names module {name!r}, which "
                f"{type(model).__name__} does not have: the files were saved from another model class"
            )
        for attr, value in attrs.items():
            current = vars(module).get(attr, _MISSING)
            if current is _MISSING:  # a class attribute, submodule, parameter or property
                current = getattr(module, attr, _MISSING)
            if current is not _MISSING and not _is_number(current):
                raise _damaged(f"{name}.{attr} is a {type(current).__name__}, not a size attribute")
            setattr(module, attr, tuple(value) if isinstance(current, tuple) else value)


def _restoring_class(model_cls: type, structure: Mapping[str, Any]) -> type:
    """``model_cls`` whose constructor gives the model its stored structure right after building
    it, before transformers loads the weights into it (the loaded model gets ``model_cls`` back)."""

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        model_cls.__init__(self, config, *args, **kwargs)  # type: ignore[misc]
        _resize(self, structure["shapes"])
        _set_attributes(self, structure["attributes"])

    namespace = {
        "__init__": __init__,
        "__module__": model_cls.__module__,
        "__qualname__": model_cls.__qualname__,
    }
    return type(model_cls.__name__, (model_cls,), namespace)


def _config_class(cls_or_auto: Any, config_dict: Mapping[str, Any]) -> Any:
    config_class = getattr(cls_or_auto, "config_class", None)
    if isinstance(config_class, type) and issubclass(config_class, transformers.PretrainedConfig):
        return config_class
    model_type = str(config_dict.get("model_type"))
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"config.json: unknown model_type {model_type!r}")
    return transformers.CONFIG_MAPPING[model_type]


def _model_class(cls_or_auto: Any, config: Any) -> type:
    """The concrete model class: ``cls_or_auto`` itself, or the one an auto class picks for ``config``."""
    if isinstance(cls_or_auto, type) and issubclass(cls_or_auto, transformers.PreTrainedModel):
        return cls_or_auto
    with torch.device("meta"):
        return type(cls_or_auto.from_config(copy.deepcopy(config)))


def _read_history(path: str | os.PathLike, hub: Mapping[str, Any]) -> list[dict[str, Any]]:
    file = transformers.utils.cached_file(
        path,
        HISTORY_FILE,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub,
    )
    if file is None:
        return []
    data = json.loads(Path(file).read_text())
    history = data.get("history") if isinstance(data, Mapping) else None
    if data.get("format") != HISTORY_FORMAT or not isinstance(history, list):
        raise ValueError(f"{HISTORY_FILE}: not a pruning history written by save_pretrained")
    if not all(isinstance(r, Mapping) for r in history):
        raise ValueError(f"{HISTORY_FILE}: every pruning record must be a mapping")
    return history


def from_pretrained(
    cls_or_auto: Any, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
) -> Any:
    """Load a model saved by :func:`save_pretrained` into its pruned shapes.

    ``cls_or_auto`` is a model class (``LlamaForCausalLM``) or an auto class
    (``AutoModelForCausalLM``); the other arguments are those of transformers' ``from_pretrained``
    (``dtype``, ``device_map``, hub options...). A directory whose config describes the model
    (uniform widths, or any plain Hugging Face checkpoint) is loaded by transformers as it is. One
    whose ``config.json`` holds the per-layer structure is built from its config, the stored
    shapes and size attributes are given to the built model before any weight is read (the entry
    is checked first: it may only name parameters, buffers and size attributes of that model),
    and transformers loads the weights into it. The pruning history saved with the model is put
    back on it (:func:`prune_callbacks.get_pruning_history`).
    """
    if "config" in kwargs:
        raise TypeError(f"{LOADER}: pass no config=: the saved config.json is the one that fits the weights")
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    config_dict, _ = transformers.PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
    history = _read_history(pretrained_model_name_or_path, hub)
    entry = config_dict.pop(STRUCTURE_KEY, None)
    if entry is None:
        model = cls_or_auto.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
    else:
        structure = _read_structure(entry)
        config_dict.update(structure["marked"])
        config = _config_class(cls_or_auto, config_dict).from_dict(config_dict)
        model_cls = _model_class(cls_or_auto, config)
        restoring = _restoring_class(model_cls, structure)
        load = getattr(restoring, "from_pretrained")  # noqa: B009 - a class built at run time
        model = load(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        model.__class__ = model_cls
    if history:
        get_pruning_history(model, create=True).extend(copy.deepcopy(history))
    return model
