"""Which model and task fit which data: declared as tables, checked before anything is built.

Every model option in ``conf/model`` has an entry in :data:`MODEL_TAKES` (what input it takes), every
data option in ``conf/data`` one in :data:`DATA_GIVES` (what its batches hold) and every task in
``conf/task`` one in :data:`TASK_TAKES`. The tables are keyed by the object a ``_target_`` names, so
``model=tiny_vit``, a recipe and ``model._target_=prune_callbacks.reference.models.vit.TinyViT`` all
find the same entry; a target that is in no table (your own model or data module) is not checked.
An :class:`Inputs` entry holds the option's defaults and, in ``keys``, which config key overrides a
fact (``model.in_chans`` sets the channels TinyViT takes), so overrides are taken into account.

:func:`check_inputs` compares the selected options with the rules of :data:`COMPARISONS` and
reports an incompatible pair as one line naming both options and what fits, e.g.::

    model=tiny_llama: takes token ids (vocabulary 256, up to 256 per sequence), but data=digits gives
    1x8x8 images; use data=stdlib_text task=language_model with this model, or model=digits_resnet
    with this data

instead of a traceback from the first forward once ``Trainer.fit`` has started.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from ..reference.data import CIFAR10DataModule, DigitsDataModule, TextDataModule
from ..reference.models import DigitsResNet, TinyLlama, TinyViT, cifar_resnet, vgg_cifar
from ..reference.tasks import CausalLM, ImageClassifier
from .config import ConfigError, error

__all__ = [
    "COMPARISONS",
    "DATA_GIVES",
    "IMAGES",
    "MODEL_TAKES",
    "TASK_TAKES",
    "TOKENS",
    "Inputs",
    "TaskInputs",
    "check_inputs",
    "fits",
    "mismatches",
    "spec_of",
]

#: Input kinds: float images ``(N, C, H, W)``, or integer token ids ``(N, T)``.
IMAGES = "images"
TOKENS = "token ids"


@dataclass(frozen=True)
class Inputs:
    """What a model takes, or what a data module's batches give; a fact left None is not fixed.

    ``channels`` and ``size`` (the side of square images) describe images; a model that pools
    adaptively takes any size, one with a chain of pools needs at least ``min_size``. ``vocab_size``
    and, for data, ``seq_len`` (window length) or, for a model, ``max_seq_len`` describe token ids.
    ``keys`` maps a fact to the key of the option's config that sets it (the values here are the
    defaults, used when the config lacks the key).
    """

    kind: str
    channels: int | None = None
    size: int | None = None
    min_size: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    max_seq_len: int | None = None
    keys: Mapping[str, str] = field(default_factory=dict)

    def resolved(self, node: Mapping[str, Any] | None) -> Inputs:
        """These facts with the values of ``node`` (the option's config) for the keys in ``keys``.

        A value that is not a plain integer makes the fact unknown (None): building the model or the
        data module reports it then, and nothing is compared with it here.
        """
        changes: dict[str, Any] = {}
        for fact, key in self.keys.items():
            if node is not None and key in node:
                value = node.get(key)
                changes[fact] = value if isinstance(value, int) and not isinstance(value, bool) else None
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """In words, e.g. ``1x8x8 images``, ``3-channel images of at least 32x32``, ``token ids
        (vocabulary 256, windows of 128)``."""
        if self.kind == IMAGES:
            if self.channels is not None and self.size is not None:
                return f"{self.channels}x{self.size}x{self.size} images"
            text = f"{self.channels}-channel images" if self.channels is not None else "images"
            return text + (f" of at least {self.min_size}x{self.min_size}" if self.min_size else "")
        details = [f"vocabulary {self.vocab_size}"] if self.vocab_size is not None else []
        if self.seq_len is not None:
            details.append(f"windows of {self.seq_len}")
        if self.max_seq_len is not None:
            details.append(f"up to {self.max_seq_len} per sequence")
        return self.kind + (f" ({', '.join(details)})" if details else "")


@dataclass(frozen=True)
class TaskInputs:
    """What a task (the LightningModule wrapping the model) trains on: the input kind and, in words,
    what it does with it."""

    kind: str
    does: str


#: What each model option takes. DigitsResNet and the CIFAR ResNet end in adaptive pooling (any image
#: size); VGG halves the size five times (at least 32x32); TinyViT has a position embedding per patch
#: (exactly ``image_size``); TinyLlama embeds ``vocab_size`` ids and has rotary tables for
#: ``max_seq_len`` positions.
MODEL_TAKES: dict[Any, Inputs] = {
    DigitsResNet: Inputs(IMAGES, channels=1),  # model=digits_resnet
    cifar_resnet: Inputs(IMAGES, channels=3),  # model=cifar_resnet
    vgg_cifar: Inputs(IMAGES, channels=3, min_size=32),  # model=vgg_cifar
    TinyViT: Inputs(  # model=tiny_vit
        IMAGES, channels=3, size=32, keys={"channels": "in_chans", "size": "image_size"}
    ),
    TinyLlama: Inputs(  # model=tiny_llama
        TOKENS,
        vocab_size=256,
        max_seq_len=256,
        keys={"vocab_size": "vocab_size", "max_seq_len": "max_seq_len"},
    ),
}

#: What each data option's batches give (the images' shape is the module's own ``input_shape``).
DATA_GIVES: dict[Any, Inputs] = {
    DigitsDataModule: Inputs(  # data=digits
        IMAGES, channels=DigitsDataModule.input_shape[0], size=DigitsDataModule.input_shape[1]
    ),
    CIFAR10DataModule: Inputs(  # data=cifar10
        IMAGES, channels=CIFAR10DataModule.input_shape[0], size=CIFAR10DataModule.input_shape[1]
    ),
    TextDataModule: Inputs(  # data=stdlib_text
        TOKENS, vocab_size=TextDataModule.vocab_size, seq_len=128, keys={"seq_len": "seq_len"}
    ),
}

#: What each task option trains on.
TASK_TAKES: dict[Any, TaskInputs] = {
    ImageClassifier: TaskInputs(IMAGES, "trains an image classifier"),  # task=classification(_adamw)
    CausalLM: TaskInputs(TOKENS, "trains a next-token language model"),  # task=language_model
}

_RELATIONS: dict[str, Callable[[int, int], bool]] = {
    "==": lambda a, b: a == b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}

#: ``(model fact, relation, data fact)``: what must hold between what a model takes and what the data
#: gives, when both facts are known.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("channels", "==", "channels"),
    ("size", "==", "size"),
    ("min_size", "<=", "size"),
    ("vocab_size", "==", "vocab_size"),
    ("max_seq_len", ">=", "seq_len"),
)


def spec_of(table: Mapping[Any, Any], node: Any) -> Any:
    """The entry of ``table`` for the object ``node._target_`` names, or None (no target, a target
    that does not import, or one the table does not know)."""
    target = _target_object(node)
    try:
        return table.get(target)
    except TypeError:  # an unhashable target object
        return None


def mismatches(takes: Inputs, gives: Inputs) -> list[tuple[str, str, str]]:
    """The :data:`COMPARISONS` that fail between a model's and a data module's inputs (kinds equal)."""
    failed = []
    for model_fact, relation, data_fact in COMPARISONS:
        have, want = getattr(takes, model_fact), getattr(gives, data_fact)
        if have is not None and want is not None and not _RELATIONS[relation](have, want):
            failed.append((model_fact, relation, data_fact))
    return failed


def fits(takes: Inputs, gives: Inputs) -> bool:
    """Whether a model taking ``takes`` can train on data giving ``gives``."""
    return takes.kind == gives.kind and not mismatches(takes, gives)


def check_inputs(
    cfg: Mapping[str, Any], choices: Mapping[str, Any] | None = None, conf: Path | None = None
) -> None:
    """Check that the selected model and task take what the selected data gives; raise a one-line
    :class:`~.config.ConfigError` naming both options and the ones that fit otherwise.

    ``choices`` are Hydra's selected options (``hydra.runtime.choices``), used to name them; without
    them an option is named by the file of ``conf`` (the app's ``conf/``) with the same target.
    Options whose targets are in no table are not checked. Runs before the data module is built.
    """
    conf = Path(__file__).resolve().parent / "conf" if conf is None else conf
    choices = choices or {}
    model, data, task = cfg.get("model"), cfg.get("data"), cfg.get("task")
    data_spec = spec_of(DATA_GIVES, data)
    if data_spec is None:
        return
    gives = data_spec.resolved(data)
    model_spec = spec_of(MODEL_TAKES, model)
    if model_spec is not None:
        takes = model_spec.resolved(model)
        if not fits(takes, gives):
            raise _model_error(takes, gives, cfg, choices, conf)
    model_class = _target_object(model)
    if isinstance(model_class, type) and issubclass(model_class, pl.LightningModule):
        return  # the model is its own LightningModule: no task wraps it
    task_spec = spec_of(TASK_TAKES, task)
    if task_spec is not None and task_spec.kind != gives.kind:
        task_key, task_name = _label("task", task, choices, conf)
        data_key, data_name = _label("data", data, choices, conf)
        tasks = _names(conf, "task", lambda node: _task_kind(node) == gives.kind, exclude=task_name)
        fix = f"use task={tasks} with this data" if tasks else "set task._target_ to a module for this data"
        raise error(
            task_key,
            task_name,
            f"{task_spec.does}, which takes {task_spec.kind}, but {data_key}={data_name} gives "
            f"{gives.describe()}",
            fix,
        )


# ---------------------------------------------------------------------------------------------- helpers


def _target_object(node: Any) -> Any:
    """The object ``node._target_`` names, or None when there is none or it does not import."""
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str):
        return None
    try:
        return get_object(target)
    except Exception:  # noqa: BLE001 - a bad target is reported by the build, with its own message
        return None


def _options(conf: Path, group: str) -> dict[str, DictConfig]:
    """The options of config group ``group`` in ``conf``: name -> the file's config."""
    options: dict[str, DictConfig] = {}
    for path in sorted((conf / group).glob("*.yaml")):
        node = OmegaConf.load(path)
        if isinstance(node, DictConfig):
            options[path.stem] = node
    return options


def _label(group: str, node: Any, choices: Mapping[str, Any], conf: Path) -> tuple[str, str]:
    """``(key, value)`` naming the selected option of ``group``: ``("model", "tiny_llama")``, from the
    choices, else from the option file with the same target, else ``("model._target_", target)``."""
    chosen = choices.get(group)
    if isinstance(chosen, str) and chosen:
        return group, chosen
    target = node.get("_target_") if isinstance(node, Mapping) else None
    for name, option in _options(conf, group).items():
        if option.get("_target_") == target:
            return group, name
    return f"{group}._target_", str(target)


def _task_kind(node: Mapping[str, Any]) -> str | None:
    """The input kind of the task ``node`` builds, or None when it is in no table."""
    spec = spec_of(TASK_TAKES, node)
    return spec.kind if spec is not None else None


def _names(conf: Path, group: str, accept: Callable[[DictConfig], bool], exclude: str | None = None) -> str:
    """The options of ``group`` that ``accept`` takes, as ``a (or b, c)``; empty when there are none."""
    names = [name for name, node in _options(conf, group).items() if name != exclude and accept(node)]
    if not names:
        return ""
    return names[0] + (f" (or {', '.join(names[1:])})" if len(names) > 1 else "")


def _with_task(option: str, kind: str, task: Any, conf: Path) -> str:
    """``option``, plus the tasks to select with it when the current task does not train on ``kind``."""
    task_spec = spec_of(TASK_TAKES, task)
    if task_spec is None or task_spec.kind == kind:
        return option
    tasks = _names(conf, "task", lambda node: _task_kind(node) == kind)
    return f"{option} task={tasks}" if tasks else option


def _key_fixes(takes: Inputs, gives: Inputs) -> tuple[list[str], list[str]]:
    """Overrides that make the pair fit: ``model.<key>=...`` and ``data.<key>=...``, each list only when
    every failing comparison can be fixed on that side by a key of the option's config."""
    failed = mismatches(takes, gives)
    if takes.kind != gives.kind or not failed:
        return [], []
    model_side = [f"model.{takes.keys[m]}={getattr(gives, d)}" for m, _, d in failed if m in takes.keys]
    data_side = [f"data.{gives.keys[d]}={getattr(takes, m)}" for m, _, d in failed if d in gives.keys]
    return (
        model_side if len(model_side) == len(failed) else [],
        data_side if len(data_side) == len(failed) else [],
    )


def _model_error(
    takes: Inputs, gives: Inputs, cfg: Mapping[str, Any], choices: Mapping[str, Any], conf: Path
) -> ConfigError:
    """The one-line error for a model that does not take what the data gives, with every way out:
    overrides that fix the pair, data options for this model, model options for this data."""
    model, data, task = cfg.get("model"), cfg.get("data"), cfg.get("task")
    model_key, model_name = _label("model", model, choices, conf)
    data_key, data_name = _label("data", data, choices, conf)
    model_fix, data_fix = _key_fixes(takes, gives)
    fixes = [f"set {' '.join(side)}" for side in (model_fix, data_fix) if side]

    def data_fits(node: DictConfig) -> bool:
        spec = spec_of(DATA_GIVES, node)
        return spec is not None and fits(takes, spec.resolved(node))

    def model_fits(node: DictConfig) -> bool:
        spec = spec_of(MODEL_TAKES, node)
        return spec is not None and fits(spec.resolved(node), gives)

    datas = _names(conf, "data", data_fits, exclude=data_name)
    if datas:
        fixes.append(f"use data={_with_task(datas, takes.kind, task, conf)} with this model")
    models = _names(conf, "model", model_fits, exclude=model_name)
    if models:
        fixes.append(f"use model={_with_task(models, gives.kind, task, conf)} with this data")
    fix = ", or ".join(fixes) if fixes else f"point {model_key} at a model for {gives.describe()}"
    problem = f"takes {takes.describe()}, but {data_key}={data_name} gives {gives.describe()}"
    return error(model_key, model_name, problem, fix)
