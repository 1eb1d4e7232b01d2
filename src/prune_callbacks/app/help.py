"""``prune-train --help``: the config groups with their options, and what the main keys mean.

The text is written from what the app ships, so it cannot drift from it: each group's line comes
from its comment in ``conf/config.yaml``'s defaults list, each option's line from the first sentence
of its yaml file (``conf/<group>/<option>.yaml``, ``recipes/<name>.yaml``), the pruning keys from
the docstring of :class:`~prune_callbacks.pruning.settings.PruningSettings` (the one settings
object) and the other top-level keys from their comments in ``conf/config.yaml``. It is stored in
Hydra's ConfigStore as the ``hydra/help`` option ``prune_train`` (selected in ``conf/config.yaml``).
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..pruning.settings import PruningSettings
from .config import APP_PRUNING_KEYS

__all__ = ["HELP_OPTION", "help_template", "pruning_key_help", "register_help", "yaml_summary"]

#: The option of Hydra's ``hydra/help`` group that holds this help.
HELP_OPTION = "prune_train"

_WIDTH = 100
_DEFAULTS_LINE = re.compile(r"^\s*-\s*(?:override\s+)?/?(\w+)\s*:\s*([\w.]+)\s*(?:#\s*(.*))?$")
_TOP_KEY = re.compile(r"^(\w+)\s*:")
_DOC_ENTRY = re.compile(r"^(\w+(?:, \w+)*): (.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
_NAME_WIDTH = 24  # a longer name gets a line of its own


def _plain(text: str) -> str:
    """reStructuredText markup of a docstring as plain text (``x`` and :class:`~.a.B` as x and B)."""
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def yaml_summary(path: Path) -> str:
    """The first sentence of a yaml file's leading comment (``# @package`` lines and a ``Recipe
    `name`:`` prefix skipped)."""
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not text:
            if lines:
                break
            continue
        lines.append(text)
    summary = " ".join(lines)
    summary = re.sub(r"^Recipe `[^`]*`:\s*", "", summary)
    summary = _SENTENCE_END.split(summary, maxsplit=1)[0]
    return summary


def pruning_key_help() -> list[tuple[str, str]]:
    """``(keys, meaning)`` for every entry of :class:`PruningSettings`' docstring, in its order."""
    doc = inspect.cleandoc(PruningSettings.__doc__ or "")
    entries: list[tuple[str, str]] = []
    for line in doc.splitlines():
        if not line.startswith("    "):  # a paragraph or a section title, not a key
            continue
        if not line.startswith("        "):
            match = _DOC_ENTRY.match(line.strip())
            if match:
                entries.append((match.group(1), match.group(2)))
                continue
        if entries:  # a continuation line of the last entry
            keys, text = entries[-1]
            entries[-1] = (keys, f"{text} {line.strip()}")
    return [(keys, _plain(text)) for keys, text in entries]


def _entries(items: Iterable[tuple[str, str]], indent: int = 2) -> list[str]:
    """``name  text`` lines, the text wrapped to the help width and aligned in one column.

    Names longer than :data:`_NAME_WIDTH` stand on a line of their own, the text below them.
    """
    items = list(items)
    width = min(_NAME_WIDTH, max((len(name) for name, _ in items), default=0))
    column = " " * (indent + width + 2)
    lines: list[str] = []
    for name, text in items:
        if len(name) > width:
            lines.append(" " * indent + name)
            lead = column
        else:
            lead = " " * indent + name.ljust(width) + "  "
        lines += textwrap.wrap(text, _WIDTH, initial_indent=lead, subsequent_indent=column) or [lead.rstrip()]
    return lines


def _config_defaults(config: Path) -> tuple[dict[str, str], dict[str, str]]:
    """From ``config.yaml``'s defaults list: each group's selected option and its comment."""
    selected: dict[str, str] = {}
    comments: dict[str, str] = {}
    for raw in config.read_text().splitlines():
        match = _DEFAULTS_LINE.match(raw)
        if match and match.group(1) not in ("hydra", "_self_"):
            selected[match.group(1)] = match.group(2)
            comments[match.group(1)] = (match.group(3) or "").strip()
    return selected, comments


def _top_level_keys(config: Path) -> list[tuple[str, str]]:
    """``(key, comment)`` of the top-level keys of ``config.yaml``, the comment being the lines above."""
    values = OmegaConf.load(config)
    assert isinstance(values, DictConfig), f"{config} is not a mapping"
    keys: list[tuple[str, str]] = []
    comment: list[str] = []
    for raw in config.read_text().splitlines():
        if raw.startswith("#"):
            comment.append(raw.lstrip("#").strip())
            continue
        match = _TOP_KEY.match(raw)
        if match and match.group(1) not in ("defaults", "hydra"):
            key = match.group(1)
            node = values.get(key)
            if isinstance(node, DictConfig):
                key = f"{key}.{{{','.join(str(k) for k in node)}}}"
            keys.append((key, " ".join(comment)))
        comment = []
    return [(key, text) for key, text in keys if text]


def _group_lines(
    group: str, what: str, options: Iterable[Path], default: str | None
) -> list[str]:
    """A group's title line and one line per option (the default marked with ``*``)."""
    lines = [f"{group}: {what}" if what else f"{group}:"]
    items = [(p.stem + (" *" if p.stem == default else ""), yaml_summary(p)) for p in sorted(options)]
    return lines + _entries(items)


def help_template(conf_dir: Path, recipes_dir: Path) -> str:
    """The full help text, as Hydra's help template (a literal ``$`` is written ``$$`` there)."""
    config = conf_dir / "config.yaml"
    selected, comments = _config_defaults(config)
    lines = [
        "prune-train (python -m prune_callbacks.train): train a model dense, prune it inside Trainer.fit,",
        "fine-tune it, and compare dense vs pruned accuracy, MACs, parameters and CPU latency.",
        "",
        "Usage: prune-train [GROUP=OPTION ...] [KEY=VALUE ...], e.g.",
        "  prune-train pruning.target_speedup=3 pruning.importance=fisher logger=csv",
        "  prune-train recipe=resnet56_cifar10 --cfg job       # print what would run, run nothing",
        "  prune-train -m pruning=taylor_ratio pruning.pruning_ratio=0.3,0.5,0.7   # a sweep; then",
        "  python -m prune_callbacks.report multirun/<date>/<time>                  # its table and plot",
        "",
        "== Config groups (GROUP=OPTION; * = default) ==",
    ]
    groups = sorted(p for p in conf_dir.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    for group in groups:
        what = comments.get(group.name, "")
        lines += _group_lines(group.name, what, group.glob("*.yaml"), selected.get(group.name))
    if recipes_dir.is_dir():
        lines += _group_lines("recipe", comments.get("recipe", ""), recipes_dir.glob("*.yaml"), None)
    hydra_dir = conf_dir / "hydra"  # the app's sweeper and launcher options (need the [sweep] extra)
    if hydra_dir.is_dir():
        for sub in sorted(p for p in hydra_dir.iterdir() if p.is_dir() and any(p.glob("*.yaml"))):
            what = f"Hydra's {sub.name} for sweeps (-m; pip install prune_callbacks[sweep])"
            lines += _group_lines(f"hydra/{sub.name}", what, sub.glob("*.yaml"), None)
    lines += [
        "",
        "== Pruning keys (pruning.KEY=VALUE) ==",
        "pruning_ratio and target_speedup are alternatives: setting both is an error (the default sets",
        "target_speedup=2.0; use pruning=taylor_ratio, or add pruning.target_speedup=null, for a ratio).",
    ]
    lines += _entries([*pruning_key_help(), *APP_PRUNING_KEYS.items()])
    lines += [
        "",
        "== Other keys ==",
        "model.*, data.*, task.*, trainer.*, logger.*: keys of the selected options (--cfg job lists them)",
    ]
    lines += _entries(_top_level_keys(config))
    lines += [
        "",
        "== Flags ==",
        *_entries(
            [
                ("--cfg job", "print the config that would run, and stop (with --resolve: interpolated)"),
                ("-m, --multirun", "one job per combination of comma-separated values (a sweep)"),
                ("--info defaults-tree", "which file each part of the config comes from"),
                ("--hydra-help", "Hydra's own options (output directories, launchers, logging)"),
            ]
        ),
    ]
    text = "\n".join(lines)
    # Hydra reads the template through OmegaConf (${...}) and string.Template ($NAME): keep it literal.
    return text.replace("${", "$ {").replace("$", "$$")


def register_help(conf_dir: Path, recipes_dir: Path) -> None:
    """Store the help as the ``hydra/help`` option :data:`HELP_OPTION` in Hydra's ConfigStore."""
    template = help_template(conf_dir, recipes_dir)
    node = {"app_name": "prune-train", "header": "", "footer": "", "template": template}
    ConfigStore.instance().store(group="hydra/help", name=HELP_OPTION, node=node)

