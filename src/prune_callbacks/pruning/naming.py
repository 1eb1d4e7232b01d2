"""Find modules and parameters of a model from plain-text names or patterns.

Configuration files cannot hold module objects, so options such as ``ignored_layers`` and
``pruning_ratio_dict`` also accept names: an exact module or parameter name (``"classifier"``,
``"vit.embeddings.cls_token"``) or a shell-style pattern matched against every name
(``"layer4.*"``, ``"*.attention.*_proj"``; ``*`` also matches dots). A name that matches
nothing is an error that lists the closest existing names, so a typo never silently disables an
option.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable
from typing import Any

import torch.nn as nn

__all__ = ["is_pattern", "lookup", "resolve_modules", "resolve_one"]

_WILDCARDS = set("*?[")


def is_pattern(name: str) -> bool:
    """True when ``name`` contains shell wildcards (``*``, ``?``, ``[``)."""
    return any(ch in _WILDCARDS for ch in name)


def lookup(model: nn.Module, name: str) -> Any:
    """The submodule or parameter of ``model`` with the exact name ``name`` (``AttributeError``
    when there is none)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_parameter(name)


def _named(model: nn.Module) -> dict[str, Any]:
    """Every module and parameter of ``model`` by name (modules first, shared ones once)."""
    named: dict[str, Any] = {}
    for name, module in model.named_modules():
        named.setdefault(name, module)
    for name, param in model.named_parameters():
        named.setdefault(name, param)
    return named


def _unknown(name: str, names: Iterable[str], what: str) -> ValueError:
    names = [n for n in names if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:
        # Also compare against the last components, so "fc1" suggests "blocks.0.mlp.fc1".
        tail = {n.rsplit(".", 1)[-1]: n for n in names}
        close = [tail[t] for t in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tail), n=5)]
    hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
    return ValueError(f"{what}: no module or parameter of the model is named {name!r}{hint}")


def resolve_one(
    model: nn.Module, spec: Any, what: str = "module name", named: dict[str, Any] | None = None
) -> list[Any]:
    """Modules/parameters selected by one ``spec``.

    ``spec`` may be a module or parameter of ``model``, a module class (every instance inside
    ``model``), an exact name or a wildcard pattern. Raises ``ValueError`` for a name or pattern
    that matches nothing (listing close matches) and for an object that is not part of ``model``;
    ``TypeError`` for anything else. ``named`` may pass in the model's names (from an earlier call)
    so that resolving many specs lists the model once.
    """
    if isinstance(spec, nn.Parameter):
        if not any(p is spec for p in model.parameters()):
            raise ValueError(
                f"{what}: the given parameter (shape {tuple(spec.shape)}) is not part of the model"
            )
        return [spec]
    if isinstance(spec, nn.Module):
        if not any(m is spec for m in model.modules()):
            raise ValueError(f"{what}: {type(spec).__name__} module is not part of the model")
        return [spec]
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return [m for m in model.modules() if isinstance(m, spec)]
    if isinstance(spec, str):
        named = _named(model) if named is None else named
        if spec in named:
            return [named[spec]]
        if is_pattern(spec):
            found = [obj for name, obj in named.items() if name and fnmatch.fnmatchcase(name, spec)]
            if found:
                return found
        raise _unknown(spec, named, what)
    raise TypeError(
        f"{what}: expected a module, a parameter, a module class or a name/pattern string, "
        f"got {type(spec).__name__}"
    )


def resolve_modules(model: nn.Module, specs: Iterable[Any] | None, what: str = "module name") -> list[Any]:
    """Modules/parameters selected by every spec in ``specs`` (see :func:`resolve_one`), in order
    and without duplicates."""
    out: list[Any] = []
    seen: set[int] = set()
    specs = list(specs or ())
    named = _named(model) if any(isinstance(s, str) for s in specs) else None
    for spec in specs:
        for obj in resolve_one(model, spec, what, named):
            if id(obj) not in seen:
                seen.add(id(obj))
                out.append(obj)
    return out
