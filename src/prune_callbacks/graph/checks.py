"""Checks before a prune: would pruning this group leave a valid model?

:class:`GroupChecker` names the first problem of a group, or returns None: a layer left with no
channels, a layer-specific divisibility rule broken (grouped convolutions, GroupNorm, multi-head
attention: the :data:`LAYER_RULES` registry), a size change no attribute can follow (the notes
:mod:`.attributes` leaves: :data:`NOTE_RULES`), one attribute set to two values, or a shared
config changed for only some of the modules that read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ..layers import ParameterPruner
from ..layers.base import Side
from .attributes import SHARED_HOLDER_ATTR
from .dependency import AttributeUpdate, Group
from .facts import LayerFacts
from .node import Node
from .ops import OpType

#: A layer rule: ``(node, side, channels now, channels removed) -> problem or None``.
LayerRule = Callable[[Node, str, int, set[int]], "str | None"]


def _unequal_parts(idxs: set[int], n: int, parts: int) -> bool:
    """Whether removing ``idxs`` of ``n`` channels in ``parts`` equal consecutive parts takes more
    from some part than from another."""
    per = n // parts
    return len({sum(1 for i in idxs if i // per == g) for g in range(parts)}) > 1


def _grouped_conv_rule(node: Node, side: str, n: int, idxs: set[int]) -> str | None:
    module = node.module
    if not (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and node.type == OpType.CONV):
        return None
    if _unequal_parts(idxs, n, module.groups):
        return (
            f"{node.name} is a grouped convolution with {module.groups} groups: every group must "
            f"lose the same number of {side}put channels"
        )
    return None


def _group_norm_rule(node: Node, side: str, n: int, idxs: set[int]) -> str | None:
    module = node.module
    if isinstance(module, nn.GroupNorm) and (n - len(idxs)) % module.num_groups:
        return f"{node.name}: {n - len(idxs)} channels are not divisible by num_groups={module.num_groups}"
    return None


def _multihead_attention_rule(node: Node, side: str, n: int, idxs: set[int]) -> str | None:
    module = node.module
    if isinstance(module, nn.MultiheadAttention) and _unequal_parts(idxs, n, module.num_heads):
        return (
            f"{node.name} is an nn.MultiheadAttention with {module.num_heads} heads: every head must "
            "lose the same number of embed channels, or channels would move to other heads"
        )
    return None


#: Rules a layer's remaining channels must follow, asked in order for every item of a group.
LAYER_RULES: list[LayerRule] = [_grouped_conv_rule, _group_norm_rule, _multihead_attention_rule]

#: The built-in rules, with the module types they judge (any other layer passes them).
_BUILTIN_RULES: dict[LayerRule, tuple[type, ...]] = {
    _grouped_conv_rule: (nn.modules.conv._ConvNd,),
    _group_norm_rule: (nn.GroupNorm,),
    _multihead_attention_rule: (nn.MultiheadAttention,),
}


def _reads_channels(node: Node) -> bool:
    """Whether a rule of :data:`LAYER_RULES` may have something to say about ``node``: a rule
    added by a user, or a built-in one for the node's module type. (Otherwise the channels of a
    wide layer need not be written as a set of Python ints.)"""
    module = node.module
    for rule in LAYER_RULES:
        types = _BUILTIN_RULES.get(rule)
        if types is None or isinstance(module, types):
            return True
    return False


def _literal_split(module: Any, old: Any, new: Any) -> str | None:
    return (
        f"a split into chunks of a fixed size inside {type(module).__name__} would get sizes "
        f"{list(new)}; use torch.chunk or keep the split size in a `split_size` attribute"
    )


def _unequal_chunks(module: Any, old: Any, new: Any) -> str | None:
    if len(set(new)) <= 1:
        return None
    return (
        f"a split into equal chunks inside {type(module).__name__} would get unequal sizes "
        f"{new}; prune the same number of channels in every chunk"
    )


def _literal_slice(module: Any, old: Any, new: Any) -> str | None:
    return (
        f"slices at fixed offsets inside {type(module).__name__} would get sizes {list(new)} "
        f"(now {list(old)}), and no head-count or size attribute of the module or its config "
        "gives their bounds; compute the offsets from such attributes (e.g. "
        "num_heads * head_dim) or keep these channels"
    )


#: Per note that :mod:`.attributes` leaves, the problem it may mean: ``(module, old, new) ->
#: problem or None``.
NOTE_RULES: dict[str, Callable[[Any, Any, Any], str | None]] = {
    "<literal split>": _literal_split,
    "<chunks>": _unequal_chunks,
    "<literal slice>": _literal_slice,
}


class GroupChecker:
    """Explains why a group cannot be pruned (see the module docstring).

    ``facts`` gives channel counts; ``model`` and ``names`` (object -> qualified name) are used
    to find every module that holds a shared config and to name one in a message;
    ``kept`` (``(node, side)`` -> why) are layer sides whose channels must not change.
    """

    __slots__ = ("facts", "kept", "model", "names")

    def __init__(
        self,
        facts: LayerFacts,
        model: nn.Module | None,
        names: dict[Any, str],
        kept: dict[tuple[Node, str], str] | None = None,
    ) -> None:
        self.facts = facts
        self.model = model
        self.names = names
        self.kept = kept or {}

    def explain(self, group: Group, check_shared: bool = True) -> str | None:
        """Why ``group`` cannot be pruned, or None when it can. ``check_shared=False`` skips the
        test that a shared config is changed for every module holding it."""
        for item in group:
            node, fn = item.dep.target, item.dep.handler
            side: Side = getattr(fn, "side", "out")  # per item: side_of and param_dim inlined
            pruner = getattr(fn, "pruner", None)
            n = self.facts.channel_count(
                node, side, pruner.dim if isinstance(pruner, ParameterPruner) else None
            )
            if self.kept and item.count and (node, side) in self.kept:
                return self.kept[(node, side)]
            if n is None:
                continue
            # the set of channels is only written when a rule may read more than its size
            idxs = set(item.idxs) if not item.distinct or _reads_channels(node) else None
            count = len(idxs) if idxs is not None else item.count
            if count >= n:
                return f"{node.name} would be left with no channels ({count} of {n} pruned)"
            if idxs is None:
                continue
            for rule in LAYER_RULES:
                problem = rule(node, side, n, idxs)
                if problem is not None:
                    return problem
        for module, attr, old, new in group.attribute_updates:
            note = NOTE_RULES.get(attr)
            problem = note(module, old, new) if note is not None else None
            if problem is not None:
                return problem
        return conflicting_update(group.attribute_updates) or (
            self.partial_shared_update(group.attribute_updates) if check_shared else None
        )

    def partial_shared_update(self, updates: list[AttributeUpdate]) -> str | None:
        """Why updating a shared object (a config held by every layer) with ``updates`` would break
        a layer: every module of the same class that holds the object must be in the group."""
        for obj, attr, old, new in updates:
            if isinstance(obj, nn.Module) or attr.startswith("<"):
                continue
            path = f"{SHARED_HOLDER_ATTR}.{attr}"
            holders = [h for h, a, p, _n in updates if a == "<shared>" and p == path]
            holders = [h for h in holders if getattr(h, SHARED_HOLDER_ATTR, None) is obj]
            types = tuple({type(h) for h in holders})
            reported = {id(h) for h in holders}
            modules = self.model.modules() if self.model is not None else ()
            expected = [
                m for m in modules if type(m) in types and getattr(m, SHARED_HOLDER_ATTR, None) is obj
            ]
            missing = [m for m in expected if id(m) not in reported]
            if missing:
                cls = types[0].__name__
                return (
                    f"{path} ({old} -> {new}) is shared by {len(expected)} {cls} modules but this prune "
                    f"changes the heads of only {len(expected) - len(missing)} of them, which would break "
                    f"the others (e.g. {self.names.get(missing[0], cls)}); prune the heads of every {cls} "
                    "equally in one step (e.g. with the Pruner) or disable head pruning"
                )
        return None


def conflicting_update(updates: list[AttributeUpdate]) -> str | None:
    """Why ``updates`` cannot all be applied: one attribute would get two different values."""
    values: dict[tuple[int, str], tuple[Any, str, Any]] = {}
    for obj, attr, _old, new in updates:
        if attr.startswith("<"):
            continue
        seen = values.setdefault((id(obj), attr), (obj, attr, new))
        if seen[2] != new:
            return (
                f"{type(obj).__name__}.{attr} would have to be both {seen[2]} and {new} "
                "(parts of it are pruned differently); prune them equally"
            )
    return None


__all__ = ["LAYER_RULES", "NOTE_RULES", "GroupChecker", "LayerRule", "conflicting_update"]
