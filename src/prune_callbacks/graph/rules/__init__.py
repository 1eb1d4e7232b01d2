"""Per-op propagation rules, registered by op name.

Every virtual op of the graph is crossed by one :class:`OpRule`: an object holding the op
family's forward, backward and round-trip behaviour together. :data:`RULES` maps an op name (the
autograd node name, as in ``node.attrs["op"]``, e.g. ``"Cat"``) to its rule; a name without an
entry (an op the graph does not know, or a node without a name) gets its family's rule from
:data:`TYPE_RULES` by ``node.type``. The registry is built once at import from the op vocabulary
of :mod:`..ops` (name -> :class:`~..ops.OpType`), so a new op name of an existing family is added
there only; an op that behaves differently from its family gets a rule of its own in
``_OWN_RULES`` here, or at run time through :func:`register_rule`.

A traced node's type is derived from its op name with the same vocabulary, so looking the rule
up by name first gives exactly the rule its type's family would pick.
"""

from __future__ import annotations

from ..node import Node
from ..ops import GRAD_FN_TYPES, KNOWN_ELEMENTWISE, OpType
from .base import OpRule, Placed, Tagged, norm_dim, unsupported
from .layout import (
    CatRule,
    PermuteRule,
    ReshapeRule,
    SplitRule,
    StackRule,
    UnbindRule,
    hit_regions,
    permutation,
)
from .pointwise import ElementwiseRule, ExpandRule, InputRule, ReduceRule, RepeatRule, SoftmaxRule
from .products import KEPT_T, MATMUL_ROLES, AttentionRule, MatmulRule, Roles
from .slicing import GatherRule, IndexRule, SelectRule, SliceRule, slice_partition

__all__ = [
    "KEPT_T",
    "MATMUL_ROLES",
    "RULES",
    "TYPE_RULES",
    "AttentionRule",
    "CatRule",
    "ElementwiseRule",
    "ExpandRule",
    "GatherRule",
    "IndexRule",
    "InputRule",
    "MatmulRule",
    "OpRule",
    "PermuteRule",
    "Placed",
    "ReduceRule",
    "RepeatRule",
    "SoftmaxRule",
    "ReshapeRule",
    "Roles",
    "SelectRule",
    "SliceRule",
    "SplitRule",
    "StackRule",
    "Tagged",
    "UnbindRule",
    "hit_regions",
    "norm_dim",
    "permutation",
    "register_rule",
    "rule_for",
    "slice_partition",
    "unsupported",
]

#: The rule of each op family (OpType): the rule of every op name of that type without a rule of
#: its own, and of a node without an op name. Types no rule crosses (modules, barriers) get the
#: base :class:`OpRule`, whose every direction is a barrier.
TYPE_RULES: dict[OpType, OpRule] = {
    **{t: OpRule() for t in OpType},
    OpType.INPUT: InputRule(),
    OpType.ELEMENTWISE: ElementwiseRule(),
    OpType.EXPAND: ExpandRule(),
    OpType.REDUCE: ReduceRule(),
    OpType.CONCAT: CatRule(),
    OpType.SPLIT: SplitRule(),
    OpType.RESHAPE: ReshapeRule(),
    OpType.PERMUTE: PermuteRule(),
    OpType.SLICE: IndexRule(),
    OpType.MATMUL: MatmulRule(),
    OpType.ATTENTION: AttentionRule(),
}

# Op names that behave differently from the rest of their family.
_OWN_RULES: dict[str, OpRule] = {
    "Stack": StackRule(),
    "Unbind": UnbindRule(),
    "Repeat": RepeatRule(),
    "Slice": SliceRule(),
    "Narrow": SliceRule(partition_backward=False),
    "Select": SelectRule(),
    "Gather": GatherRule(),
    **dict.fromkeys(("Softmax", "LogSoftmax", "SafeSoftmax"), SoftmaxRule()),
    **{name: MatmulRule(roles) for name, roles in MATMUL_ROLES.items()},
}


def _build() -> dict[str, OpRule]:
    """One entry per op name the vocabulary knows: its own rule, else its family's."""
    rules: dict[str, OpRule] = dict.fromkeys(sorted(KNOWN_ELEMENTWISE), TYPE_RULES[OpType.ELEMENTWISE])
    for t, names in GRAD_FN_TYPES.items():
        for name in names:
            rules[name] = TYPE_RULES[t]
    rules.update(_OWN_RULES)
    return rules


#: Op name -> rule. Looked up once per node visit of the closure (see :func:`rule_for`).
RULES: dict[str, OpRule] = _build()


def rule_for(node: Node) -> OpRule:
    """The rule that crosses ``node``: the one registered under its op name, else its type's."""
    rule = RULES.get(node.attrs.get("op", ""))
    return rule if rule is not None else TYPE_RULES[node.type]


def register_rule(key: str, rule: OpRule) -> OpRule | None:
    """Make ``rule`` the rule of op name ``key`` (an autograd node name without its
    ``Backward<n>`` suffix, e.g. ``"Cat"``); returns the rule it replaces, if any, so a caller can
    put it back. Takes effect for every graph built or closed afterwards.

    Raises:
        TypeError: ``key`` is not a string or ``rule`` is not an :class:`OpRule`.
    """
    if not isinstance(key, str) or not key:
        raise TypeError(f"register_rule: the op key must be a non-empty op name string, got {key!r}")
    if not isinstance(rule, OpRule):
        raise TypeError(
            f"register_rule: {rule!r} is not an OpRule; subclass prune_callbacks.graph.rules.OpRule "
            "and override forward/backward (or from_input/from_output)"
        )
    previous = RULES.get(key)
    RULES[key] = rule
    return previous
