"""One rulebook for pruning settings: :class:`PruningSettings`, validated once, used everywhere.

The :class:`~prune_callbacks.pruning.pruner.Pruner`, the Lightning callback and the Hydra app all take
their options through this dataclass, so every entry point accepts exactly the same values and a
mistake gives the same one-line message naming the key and the fix, e.g. (one line)::

    pruning_ratio=1.5: must be in [0, 1) (the fraction of every group's channels to remove);
    e.g. pruning_ratio=0.5

The app prefixes the key with its config group (``pruning.pruning_ratio=1.5: ...``); the dataclass is
also the app's structured-config schema, so ``--cfg job`` shows exactly the values that will run.

Decisions made here, once:

* **Ratio or speedup.** ``pruning_ratio`` (fraction of every group's channels, in [0, 1)) and
  ``target_speedup`` (dense MACs / pruned MACs, > 1) are alternatives: setting both is an error.
  With neither set, ``pruning_ratio`` is 0.5 (with an explicit schedule: its last ratio). A
  ratio of 0 prunes nothing by itself (useful with ``pruning_ratio_dict`` or head pruning, or as
  the dense point of a sweep).
* **Numbers are numbers.** Strings (``"0.5"``) and booleans are refused where a number is expected.
* **Schedules** are ``linear``, ``cubic`` (alias ``agp``) and ``exp`` (alias ``exponential``), or an
  explicit list of cumulative ratios, one per step.
* **Steps.** ``iterative_steps`` (when set), the length of an explicit schedule and the number of
  pruning epochs (when ``epochs`` or ``end_epoch`` is set) must agree; the ones left unset follow.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from . import calibration  # noqa: F401 - registers the calibration criteria ("wanda", "flap")
from .importance import IMPORTANCES, Importance, importance_key

__all__ = ["SCHEDULE_ALIASES", "PruningSettings", "SettingsError", "format_value"]

#: Accepted schedule names and the canonical kind each stands for (see :func:`.schedule.ratio_schedule`).
SCHEDULE_ALIASES: dict[str, str] = {
    "linear": "linear",
    "cubic": "cubic",
    "agp": "cubic",
    "exp": "exp",
    "exponential": "exp",
}


def format_value(value: Any) -> str:
    """A value as a user would type it on a command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


class SettingsError(ValueError):
    """A setting a user can fix: ``key=value: problem; fix`` on one line.

    ``key``, ``value``, ``problem`` and ``fix`` are kept so that an entry point can name the key its
    own way (:meth:`with_prefix`: the app says ``pruning.pruning_ratio``).
    """

    def __init__(self, key: str, value: Any, problem: str, fix: str) -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        super().__init__(f"{key}={format_value(value)}: {problem}; {fix}")

    def with_prefix(self, prefix: str) -> SettingsError:
        """The same error with ``prefix`` before the key (and before keys named in the fix)."""
        names = {f.name for f in dataclasses.fields(PruningSettings)}

        def prefixed(text: str) -> str:
            return re.sub(
                r"(?<![\w.\[])([a-z_]+)(?=[=\[])",
                lambda m: prefix + m.group(1) if m.group(1) in names else m.group(1),
                text,
            )

        return type(self)(prefix + self.key, self.value, prefixed(self.problem), prefixed(self.fix))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction(
    key: str, value: Any, *, low_open: bool = False, high_closed: bool = False, what: str = ""
) -> float:
    """``value`` as a float in [0, 1) (or the open/closed variant), else a :class:`SettingsError`."""
    interval = f"{'(' if low_open else '['}0, 1{']' if high_closed else ')'}"
    example = "0.5"
    if not _is_number(value):
        raise SettingsError(key, value, f"must be a number in {interval}{what}", f"e.g. {key}={example}")
    v = float(value)
    if not ((v > 0 if low_open else v >= 0) and (v <= 1 if high_closed else v < 1)):
        raise SettingsError(key, value, f"must be in {interval}{what}", f"e.g. {key}={example}")
    return v


def _count(key: str, value: Any, minimum: int, example: int) -> int:
    if not _is_int(value) or value < minimum:
        raise SettingsError(key, value, f"must be an integer >= {minimum}", f"e.g. {key}={example}")
    return int(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(key, value, "must be true or false", f"e.g. {key}=true")
    return value


@dataclass
class PruningSettings:
    """What to prune, how much, and when: every option of the Pruner, the callback and the app.

    Fields are validated (and normalised: schedule aliases, floats) in ``__post_init__``; change them
    with :meth:`replace`, which validates again. See the module docstring for the rules.

    What and how much (Pruner, callback, app):
        importance: criterion name (``taylor``, ``fisher``, ``obd``, ``hessian``, ``magnitude``,
            ``l1``, ``l2``, ``lamp``, ``bn_scale``, ``random``, or the calibration criteria ``wanda``
            and ``flap``, fed by the forward passes of the pruning epochs), an
            :class:`~.importance.Importance` (or any ``fn(group) -> scores``), or, in the app, a
            config with ``_target_``.
        pruning_ratio: fraction of every group's channels removed after the last step, in [0, 1).
        target_speedup: instead of a ratio, prune until dense MACs / MACs reaches this (> 1);
            channels are then ranked globally.
        iterative_steps: number of pruning steps (default: the length of an explicit schedule,
            else the number of pruning epochs of the callback, else 1).
        schedule: how the target is spread over the steps: ``linear``, ``cubic``/``agp``,
            ``exp``/``exponential`` or one cumulative ratio per step.
        global_pruning: rank channels across groups instead of pruning each group by its share
            (``None``, the default: only with a ``target_speedup``, whose MAC budget is always met
            by global ranking; ``false`` with a speedup target is an error).
        isomorphic: with global ranking, rank channels only among groups of the same structure
            (isomorphic pruning, Fang et al. 2024: same layer types, pruned sides, kernel shapes
            and original width, e.g. all MLP groups of a transformer, all groups of one ResNet
            stage), every such class losing the same fraction of its channels (with a
            ``target_speedup``: the same fraction, as large as the MACs target needs); needs
            global ranking (``global_pruning=true`` or a ``target_speedup``).
        max_pruning_ratio: no group loses more than this fraction of its channels, in (0, 1].
        round_to: channels kept per group are a multiple of this (``None``: off).
        ignored_layers: layers whose output channels are kept (names, glob patterns; the Pruner
            also takes modules, parameters and module classes).
        pruning_ratio_dict: ``{layer or pattern: ratio}`` for layers with a ratio of their own.
        prune_num_heads, head_pruning_ratio: remove this fraction of every attention group's heads.

    When (callback and app):
        epochs: explicit 0-based epochs after which to prune; otherwise ``start_epoch`` to
            ``end_epoch`` (inclusive; default: as many epochs as steps) every ``every_n_epochs``.
        importance_batches: optimizer steps of gradient (or calibration) statistics gathered before
            each prune (``None``: the whole pruning epoch).
        log_group_widths: log ``prune/width/<group>`` at every prune.
        verbose: report the dense cost at fit start and the pruning table at fit end.
        hold_early_stopping: keep training (and so early stopping such as Lightning's
            ``EarlyStopping`` from ending it) at least until the epoch of the last prune.
    """

    importance: Any = "taylor"
    pruning_ratio: Optional[float] = None
    target_speedup: Optional[float] = None
    iterative_steps: Optional[int] = None
    schedule: Any = "linear"
    global_pruning: Optional[bool] = None
    isomorphic: bool = False
    max_pruning_ratio: float = 1.0
    round_to: Optional[int] = None
    ignored_layers: Any = field(default_factory=list)
    pruning_ratio_dict: Any = field(default_factory=dict)
    prune_num_heads: bool = False
    head_pruning_ratio: float = 0.0
    epochs: Any = None
    start_epoch: int = 0
    end_epoch: Optional[int] = None
    every_n_epochs: int = 1
    importance_batches: Optional[int] = None
    log_group_widths: bool = True
    verbose: bool = True
    hold_early_stopping: bool = False

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], prefix: str = "") -> PruningSettings:
        """Settings from a mapping (a config group); unknown keys are refused with a suggestion.

        Keys starting with ``_`` (Hydra's ``_target_``, ``_convert_``) are skipped. Errors name the
        key with ``prefix`` in front (the app passes ``"pruning."``).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            key = str(key)
            if key.startswith("_"):
                continue
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                fix = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(names)}"
                raise SettingsError(prefix + key, value, "is not a pruning setting", fix)
            kwargs[key] = _plain(value)
        try:
            return cls(**kwargs)
        except SettingsError as exc:
            raise exc.with_prefix(prefix) if prefix else exc from None

    @classmethod
    def merged(cls, settings: PruningSettings | None, options: Mapping[str, Any]) -> PruningSettings:
        """``settings`` (or the defaults) with the ``options`` an entry point was called with applied.

        The Pruner and the callback take every field as a keyword argument *and* a ready ``settings``
        object; an option still at its default (or ``None`` where the field's default is not ``None``:
        "not given") keeps the settings' value, any other replaces it and the result is validated.
        """
        if settings is not None and not isinstance(settings, PruningSettings):
            raise TypeError(f"settings must be a PruningSettings, got {type(settings).__name__}")
        defaults = _field_defaults()
        given: dict[str, Any] = {}
        for name, value in options.items():
            default = defaults[name]
            if (value is None and default is not None) or _same(value, default):
                continue
            if (
                name in ("ignored_layers", "schedule")
                and not isinstance(value, (str, bytes))
                and _iterable(value)
            ):
                value = list(value)
            given[name] = value
        if settings is None:
            return cls(**given)
        return settings.replace(**given) if given else settings

    def replace(self, **changes: Any) -> PruningSettings:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for loggers and hyperparameter tables)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # ------------------------------------------------------------------ derived values
    @property
    def steps(self) -> int:
        """Number of pruning steps (see the module docstring's rule)."""
        if self.iterative_steps is not None:
            return self.iterative_steps
        if isinstance(self.schedule, list):
            return len(self.schedule)
        if self.epochs is not None or self.end_epoch is not None:
            return len(self.prune_epochs())
        return 1

    @property
    def ratio(self) -> float:
        """The effective ``pruning_ratio``: when neither a ratio nor a speedup is set, the last
        ratio of an explicit schedule, else 0.5 (0 with a speedup target)."""
        if self.pruning_ratio is not None:
            return self.pruning_ratio
        if self.target_speedup is not None:
            return 0.0
        return self.schedule[-1] if isinstance(self.schedule, list) else 0.5

    @property
    def ranks_globally(self) -> bool:
        """Whether channels are ranked across groups (always so with a speedup target)."""
        if self.global_pruning is None:
            return self.target_speedup is not None
        return self.global_pruning

    def prune_epochs(self) -> list[int]:
        """The 0-based epochs after which the callback prunes, one per step."""
        if self.epochs is not None:
            return list(self.epochs)
        end = self.end_epoch
        if end is None:
            n = self.iterative_steps or (len(self.schedule) if isinstance(self.schedule, list) else 1)
            end = self.start_epoch + (n - 1) * self.every_n_epochs
        return list(range(self.start_epoch, end + 1, self.every_n_epochs))

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Check and normalise every field; raise :class:`SettingsError` on the first problem."""
        self._validate_target()
        self._validate_importance()
        self._validate_epochs()
        self._validate_schedule()
        self.max_pruning_ratio = _fraction(
            "max_pruning_ratio", self.max_pruning_ratio, low_open=True, high_closed=True
        )
        if self.round_to is not None:
            self.round_to = _count("round_to", self.round_to, 1, 8)
        if self.global_pruning is not None:
            self.global_pruning = _flag("global_pruning", self.global_pruning)
            if not self.global_pruning and self.target_speedup is not None:
                raise SettingsError(
                    "global_pruning",
                    False,
                    "a MACs target (target_speedup) is always met by ranking channels globally",
                    "leave global_pruning unset (null), or prune by pruning_ratio",
                )
        self.isomorphic = _flag("isomorphic", self.isomorphic)
        if self.isomorphic and not self.ranks_globally:
            raise SettingsError(
                "isomorphic",
                True,
                "ranks channels among groups of the same structure, which needs channels ranked across "
                "groups (here every group is pruned by its own share)",
                "set global_pruning=true (or a target_speedup), or isomorphic=false",
            )
        self.prune_num_heads = _flag("prune_num_heads", self.prune_num_heads)
        self.head_pruning_ratio = _fraction("head_pruning_ratio", self.head_pruning_ratio)
        self.log_group_widths = _flag("log_group_widths", self.log_group_widths)
        self.verbose = _flag("verbose", self.verbose)
        self.hold_early_stopping = _flag("hold_early_stopping", self.hold_early_stopping)
        if self.importance_batches is not None:
            self.importance_batches = _count("importance_batches", self.importance_batches, 1, 20)
        self._validate_layers()

    def _validate_target(self) -> None:
        ratio, speedup = self.pruning_ratio, self.target_speedup
        if ratio is not None and speedup is not None:
            raise SettingsError(
                "target_speedup",
                speedup,
                f"is set together with pruning_ratio={format_value(ratio)}; they are alternatives",
                "set one of them and the other to null (target_speedup=null or pruning_ratio=null)",
            )
        if ratio is not None:
            self.pruning_ratio = _fraction(
                "pruning_ratio", ratio, what=" (the fraction of every group's channels to remove)"
            )
        if speedup is not None:
            if not _is_number(speedup) or speedup <= 1.0:
                raise SettingsError(
                    "target_speedup",
                    speedup,
                    "must be a number > 1 (dense MACs / pruned MACs)",
                    "e.g. target_speedup=2.0",
                )
            self.target_speedup = float(speedup)

    def _validate_importance(self) -> None:
        imp = self.importance
        if isinstance(imp, str):
            names = tuple(IMPORTANCES)
            if importance_key(imp) not in names:
                close = difflib.get_close_matches(importance_key(imp), names, n=1)
                hint = f"did you mean importance={close[0]}? " if close else ""
                raise SettingsError(
                    "importance",
                    imp,
                    "unknown importance",
                    f"{hint}choose one of {', '.join(names)} (or an Importance object / _target_ config)",
                )
        elif not (
            isinstance(imp, Importance) or callable(imp) or (isinstance(imp, Mapping) and "_target_" in imp)
        ):
            raise SettingsError(
                "importance",
                imp,
                "must be a criterion name, an Importance object or a config with _target_",
                "e.g. importance=taylor",
            )

    def _validate_epochs(self) -> None:
        if self.epochs is not None:
            values = [self.epochs] if _is_int(self.epochs) else self.epochs
            if not isinstance(values, (list, tuple)) or not values:
                raise SettingsError(
                    "epochs", self.epochs, "must be a non-empty list of epochs", "e.g. epochs=[2,4,6]"
                )
            for e in values:
                if not _is_int(e) or e < 0:
                    raise SettingsError(
                        "epochs",
                        self.epochs,
                        "must list epoch indices (integers >= 0)",
                        "e.g. epochs=[2,4,6]",
                    )
            if sorted(set(values)) != list(values):
                raise SettingsError(
                    "epochs", self.epochs, "must be strictly increasing", "e.g. epochs=[2,4,6]"
                )
            self.epochs = [int(e) for e in values]
        self.start_epoch = _epoch("start_epoch", self.start_epoch)
        if self.end_epoch is not None:
            self.end_epoch = _epoch("end_epoch", self.end_epoch)
            if self.end_epoch < self.start_epoch:
                raise SettingsError(
                    "end_epoch",
                    self.end_epoch,
                    f"is before start_epoch={self.start_epoch}",
                    f"set end_epoch>={self.start_epoch}",
                )
        self.every_n_epochs = _count("every_n_epochs", self.every_n_epochs, 1, 1)
        if self.iterative_steps is not None:
            self.iterative_steps = _count("iterative_steps", self.iterative_steps, 1, 4)

    def _validate_schedule(self) -> None:
        schedule = self.schedule
        if isinstance(schedule, str):
            kind = SCHEDULE_ALIASES.get(schedule.strip().lower())
            if kind is None:
                raise SettingsError(
                    "schedule",
                    schedule,
                    "unknown schedule",
                    f"choose one of {', '.join(SCHEDULE_ALIASES)} or a list of cumulative ratios",
                )
            self.schedule = kind
        elif isinstance(schedule, (list, tuple)) and schedule:
            values = [_fraction("schedule", v) for v in schedule]
            if any(b < a for a, b in zip(values, values[1:])):
                raise SettingsError(
                    "schedule",
                    schedule,
                    "must be non-decreasing (cumulative ratios)",
                    "e.g. schedule=[0.2,0.4,0.5]",
                )
            self.schedule = values
        else:
            raise SettingsError(
                "schedule",
                schedule,
                "must be a schedule name or a non-empty list of ratios",
                "e.g. schedule=linear",
            )
        # (key, value shown, count) of each source of a step count; the epochs come last, so the
        # error names the step count or the schedule against the one after it.
        counts: list[tuple[str, Any, int]] = []
        if self.iterative_steps is not None:
            counts.append(("iterative_steps", self.iterative_steps, self.iterative_steps))
        if isinstance(self.schedule, list):
            counts.append(("schedule", schedule, len(self.schedule)))
        if self.epochs is not None or self.end_epoch is not None:
            counts.append(
                ("epochs" if self.epochs is not None else "end_epoch", None, len(self.prune_epochs()))
            )
        what = {
            "iterative_steps": "steps",
            "schedule": "ratios",
            "epochs": "pruning epochs",
            "end_epoch": "pruning epochs (start_epoch..end_epoch)",
        }
        for (key_a, value_a, n_a), (key_b, _, n_b) in zip(counts, counts[1:]):
            if n_a != n_b:
                raise SettingsError(
                    key_a,
                    value_a,
                    f"gives {n_a} {what[key_a]} but {key_b} gives {n_b} {what[key_b]}",
                    "make them agree (one step per pruning epoch, one ratio per step) or leave one unset",
                )

    def _validate_layers(self) -> None:
        if isinstance(self.ignored_layers, (str, bytes)) or not _iterable(self.ignored_layers):
            raise SettingsError(
                "ignored_layers",
                self.ignored_layers,
                "must be a list of layer names or patterns",
                "e.g. ignored_layers=[fc]",
            )
        self.ignored_layers = list(self.ignored_layers)
        if not isinstance(self.pruning_ratio_dict, Mapping):
            raise SettingsError(
                "pruning_ratio_dict",
                self.pruning_ratio_dict,
                "must be a mapping {layer or pattern: ratio}",
                "e.g. pruning_ratio_dict={layer1.*: 0.3}",
            )
        ratios = {}
        for key, value in self.pruning_ratio_dict.items():
            ratios[key] = _fraction(f"pruning_ratio_dict[{key}]", value)
        self.pruning_ratio_dict = ratios


def _field_defaults() -> dict[str, Any]:
    """Every field's default value (a fresh one for list and dict fields)."""
    out = {}
    for f in dataclasses.fields(PruningSettings):
        factory = f.default_factory
        out[f.name] = factory() if factory is not dataclasses.MISSING else f.default
    return out


def _same(value: Any, default: Any) -> bool:
    """``value == default`` without counting ``True == 1`` or failing on tensors and odd types."""
    if value is default:
        return True
    if isinstance(value, bool) != isinstance(default, bool) or type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):
        return False


def _epoch(key: str, value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise SettingsError(key, value, "must be an epoch index (an integer >= 0)", f"e.g. {key}=2")
    return int(value)


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain lists and dicts (other values unchanged)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value
