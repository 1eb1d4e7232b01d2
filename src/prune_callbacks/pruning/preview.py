"""What a dry run of the Pruner reports: per step, the channels each group would lose and the cost after.

:meth:`~prune_callbacks.pruning.pruner.Pruner.preview` runs the remaining steps inside one transaction
that is always rolled back, reads what each step recorded in the pruning history, and returns a
:class:`PruningPreview`: plain data (``to_dict()``) and a text table (``str()``). The model, the
schedule position, the criterion's statistics and the history are left exactly as they were, so the
next real :meth:`~prune_callbacks.pruning.pruner.Pruner.step` removes what the preview showed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["GroupChange", "PruningPreview", "StepPreview", "changes_of_records"]


@dataclasses.dataclass(frozen=True)
class GroupChange:
    """One group prune of a step: its root layer, the pruning function on the root (e.g.
    ``prune_linear_out_channels``), the root's channel indices removed (indices of the model as it
    was right before this prune) and every layer the prune touches."""

    root: str
    function: str
    removed: tuple[int, ...]
    layers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "root": self.root,
            "function": self.function,
            "removed": list(self.removed),
            "layers": list(self.layers),
        }


@dataclasses.dataclass(frozen=True)
class StepPreview:
    """One step of the dry run: its number (1-based, as ``Pruner.current_step`` would read after
    it), the group prunes it would make and the MACs / parameters after it."""

    step: int
    changes: tuple[GroupChange, ...]
    macs: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "step": self.step,
            "macs": self.macs,
            "params": self.params,
            "changes": [c.to_dict() for c in self.changes],
        }


@dataclasses.dataclass(frozen=True)
class PruningPreview:
    """The dry run of the remaining steps of a Pruner.

    Fields: ``dense_macs`` / ``dense_params`` (before the first previewed step), ``steps`` (one
    :class:`StepPreview` each) and ``stopped`` (why the preview ended before the schedule did,
    e.g. a gradient criterion, whose later steps depend on gradients not gathered yet; ``""``
    otherwise).
    """

    macs: int
    params: int
    steps: tuple[StepPreview, ...]
    stopped: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return {
            "macs": self.macs,
            "params": self.params,
            "steps": [s.to_dict() for s in self.steps],
            "stopped": self.stopped,
        }

    def __str__(self) -> str:
        rows = [("step", "group root", "channels removed", "layers", "MACs after", "speedup")]
        for s in self.steps:
            speedup = f"{self.macs / s.macs:.2f}x" if s.macs else "-"
            for i, c in enumerate(s.changes or (None,)):
                last = i == max(len(s.changes), 1) - 1
                rows.append(
                    (
                        str(s.step) if i == 0 else "",
                        c.root if c else "(nothing)",
                        _indices(c.removed) if c else "",
                        str(len(c.layers)) if c else "",
                        f"{s.macs:,}" if last else "",
                        speedup if last else "",
                    )
                )
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        lines = [f"dry run: {self.macs:,} MACs, {self.params:,} parameters before"]
        for n, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.stopped:
            lines.append(f"(stopped: {self.stopped})")
        return "\n".join(lines)


def _indices(removed: Sequence[int], shown: int = 8) -> str:
    head = ", ".join(str(i) for i in removed[:shown])
    more = f", ... ({len(removed)})" if len(removed) > shown else f" ({len(removed)})"
    return f"[{head}{more}]" if removed else "[]"


def changes_of_records(records: Sequence[Mapping[str, Any]]) -> tuple[GroupChange, ...]:
    """The group prunes recorded in pruning-history ``records`` (see :mod:`.history`)."""
    return tuple(
        GroupChange(
            root=str(r["root"]),
            function=str(r.get("function", "")),
            removed=tuple(int(i) for i in r.get("idxs", [])),
            layers=tuple(dict.fromkeys(str(it["target"]) for it in r.get("items", []))),
        )
        for r in records
    )
