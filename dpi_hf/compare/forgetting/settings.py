"""The ``sequential:`` section of a forgetting-benchmark recipe: pairs, seeds, lengths, rates, evaluation, and each
method's grid of settings.

A method's grid is a mapping ``parameter → list of values`` (the settings are every combination), or a list of such
mappings (their union: e.g. one λ range for the loss form of EWC and another for the decoupled form). Each setting
has a ``label`` (``"ewc form=loss lambda=100"``: how results name it, and what a rerun skips) and belongs to a
``line``: the method with every parameter but the swept one (the last of the method's parameters) fixed
(``"ewc form=loss"``). A line is one connected curve in the plot, the unit along which forgetting is interpolated
at matched B gain, and the unit whose best setting the validation split chooses.
"""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass, field

from ...core.errors import DPIConfigError
from ...utils import check_unknown_keys, did_you_mean, is_int

__all__ = ["METHODS", "PARAMETERS", "DEFAULT_GRIDS", "Setting", "ForgettingSettings"]

#: every method, in the order runs and tables list them
METHODS = ("none", "freeze", "random", "random_per_tensor", "largest_theta", "other_core", "ewc", "ewc_core",
           "freeze_ewc", "l2sp", "lora", "wise_ft", "core_interp", "replay")
#: each method's parameters; the last one is swept along a line
PARAMETERS = {
    "none": (), "freeze": ("p",), "random": (), "random_per_tensor": (), "largest_theta": (), "other_core": (),
    "ewc": ("form", "lambda"), "ewc_core": ("form", "lambda"), "freeze_ewc": ("form", "lambda"),
    "l2sp": ("form", "lambda"), "lora": ("r", "learning_rate"), "wise_ft": ("base", "alpha"),
    "core_interp": ("alpha_core", "alpha_rest"), "replay": ("fraction",),
}
_LAMBDAS = {"form": ["loss", "decoupled"], "lambda": [0.01, 1.0, 100.0, 10000.0]}
DEFAULT_GRIDS = {
    "freeze": {"p": [0.01, 0.05, 0.2]},
    "ewc": _LAMBDAS, "ewc_core": _LAMBDAS, "freeze_ewc": _LAMBDAS, "l2sp": _LAMBDAS,
    "lora": {"r": [8, 64], "learning_rate": [3e-4, 1e-3]},
    "wise_ft": {"base": ["none", "freeze"], "alpha": [0.1, 0.25, 0.5, 0.75]},
    "core_interp": {"alpha_core": [0.0, 0.5], "alpha_rest": [0.5, 1.0]},
    "replay": {"fraction": [0.05, 0.25]},
}
#: methods that train no model of their own: they interpolate trained ones (evaluation only)
POST_HOC = ("wise_ft", "core_interp")

_KEYS = ("pairs", "seeds", "methods", "grids", "a_steps", "b_steps", "a_learning_rate", "b_learning_rate",
         "control_task", "reference_fraction", "reference_gain", "eval_rows", "validation_rows", "max_new_tokens",
         "eval_batch_size", "bootstrap_reps")
_PAIR_KEYS = ("pair", "a_learning_rate", "b_learning_rate", "control_task")


@dataclass(frozen=True)
class Setting:
    """One point of a method's grid: ``method`` and its ``params`` (a tuple of (name, value) in the method's
    parameter order)."""

    method: str
    params: tuple = ()

    @property
    def values(self) -> dict:
        return dict(self.params)

    @property
    def label(self) -> str:
        return " ".join([self.method] + [f"{k}={_fmt(v)}" for k, v in self.params])

    @property
    def line(self) -> str:
        return " ".join([self.method] + [f"{k}={_fmt(v)}" for k, v in self.params[:-1]])


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Pair:
    """A (task A, task B) pair and its own learning rates and control task (None: the section's)."""

    a: str
    b: str
    a_learning_rate: float | None = None
    b_learning_rate: float | None = None
    control_task: str | None = None

    @property
    def name(self) -> str:
        return f"{self.a}->{self.b}"


@dataclass
class ForgettingSettings:
    """The ``sequential:`` section of a recipe (``dpi-hf sequential``).

    Attributes:
        pairs: ``[[A, B], ...]`` (train A, then B), or mappings ``{pair: [A, B], a_learning_rate, b_learning_rate,
            control_task}`` with that pair's own values (default: the recipe's first two tasks).
        seeds: harness seeds (default ``[0, 1, 2]``). Seed s trains with seed s and draws other rows: every task's
            ``seed`` (and ``eval_seed``) is offset by s.
        methods: the methods to run, from :data:`METHODS` (default: all).
        grids: method → its grid (see the module docstring); a method not named keeps :data:`DEFAULT_GRIDS`.
        a_steps: optimizer steps of the A training (default None: the recipe's ``max_steps``).
        b_steps: B lengths to run (default None: ``[max_steps]``); each length is its own group of runs.
        a_learning_rate, b_learning_rate: the two trainings' learning rates (default None: ``learning_rate``);
            LoRA uses its grid's ``learning_rate`` instead of ``b_learning_rate``.
        control_task: whose core the ``other_core`` control freezes, probed at θ_A like A's (default None: B).
        reference_fraction: the core size p of the controls, of EWC's core scope, of the core-frozen WiSE-FT base
            and of the core-aware interpolation (default 0.05).
        reference_gain: the B gain (accuracy) at which forgetting is matched (default None: "none"'s own gain).
        eval_rows, validation_rows: the most held-out rows scored per task (default None: the whole ``eval`` /
            ``validation`` split).
        max_new_tokens: tokens generated per answer (default 32: the answers are short).
        eval_batch_size: rows per generation and NLL batch (default 16).
        bootstrap_reps: bootstrap replicates of every interval (default 2000).
    """

    pairs: list = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    grids: dict = field(default_factory=dict)
    a_steps: int | None = None
    b_steps: list[int] | None = None
    a_learning_rate: float | None = None
    b_learning_rate: float | None = None
    control_task: str | None = None
    reference_fraction: float = 0.05
    reference_gain: float | None = None
    eval_rows: int | None = None
    validation_rows: int | None = None
    max_new_tokens: int = 32
    eval_batch_size: int = 16
    bootstrap_reps: int = 2000

    @classmethod
    def from_dict(cls, data: dict | None, task_names: list[str]) -> "ForgettingSettings":
        """Validate the section (``data``; None: every default) against the recipe's ``task_names``.

        Raises:
            DPIConfigError: an unknown key, method or parameter, a pair or task the recipe lacks, or a bad value;
                the message names the key and the fix.
        """
        data = dict(data or {})
        check_unknown_keys(data, _KEYS, "recipe: sequential")
        s = cls(**data)
        s.pairs = [_pair(p, task_names) for p in (s.pairs or [task_names[:2]])]
        for task in [s.control_task] + [p.control_task for p in s.pairs]:
            if task is not None and task not in task_names:
                raise DPIConfigError(f"sequential.control_task {task!r} is not a task of the recipe ({task_names}).")
        if not s.seeds or not all(is_int(x) for x in s.seeds) or len(set(s.seeds)) != len(s.seeds):
            raise DPIConfigError(f"sequential.seeds must be a non-empty list of distinct integers, got {s.seeds!r}.")
        s.methods = _methods(s.methods)
        unknown = [m for m in s.grids if m not in DEFAULT_GRIDS]
        if unknown:
            raise DPIConfigError(f"sequential.grids names {unknown}, which have no grid; methods with a grid: "
                                 f"{list(DEFAULT_GRIDS)}.")
        s.grids = {m: _grid(m, s.grids.get(m, DEFAULT_GRIDS[m])) for m in DEFAULT_GRIDS}
        s.b_steps = None if s.b_steps is None else [s.b_steps] if is_int(s.b_steps) else list(s.b_steps)
        for key in ("a_steps", "eval_rows", "validation_rows", "max_new_tokens", "eval_batch_size",
                    "bootstrap_reps"):
            _positive_int(key, getattr(s, key), none_ok=key in ("a_steps", "eval_rows", "validation_rows"))
        for n in s.b_steps or []:
            _positive_int("b_steps", n)
        for rate in [s.a_learning_rate, s.b_learning_rate] + [x for p in s.pairs for x in (p.a_learning_rate,
                                                                                              p.b_learning_rate)]:
            if rate is not None:
                _positive("learning_rate", rate)
        _fraction("reference_fraction", s.reference_fraction)
        if s.reference_gain is not None and (not isinstance(s.reference_gain, numbers.Real)
                                             or isinstance(s.reference_gain, bool)
                                             or not -1 <= s.reference_gain <= 1):
            raise DPIConfigError(f"sequential.reference_gain must be an accuracy gain in [-1, 1] or null, got "
                                 f"{s.reference_gain!r}.")
        return s

    def settings(self, method: str) -> list[Setting]:
        """Every setting of ``method``'s grid, in grid order (one setting for a method without parameters)."""
        if not PARAMETERS[method]:
            return [Setting(method)]
        out: list[Setting] = []
        for grid in self.grids[method]:
            names = PARAMETERS[method]
            for values in itertools.product(*(grid[n] for n in names)):
                setting = Setting(method, tuple(zip(names, values)))
                if setting not in out:
                    out.append(setting)
        return out

    def all_settings(self) -> list[Setting]:
        """The settings of every selected method, in :data:`METHODS` order."""
        return [s for m in METHODS if m in self.methods for s in self.settings(m)]

    def keep_only(self, chosen: dict[str, str]) -> None:
        """Restrict each line named in ``chosen`` (line → setting label, e.g. from an earlier run's validation
        choice) to that one setting; lines not named keep their grid.

        Raises:
            DPIConfigError: a chosen label that is not a setting of the grids.
        """
        for method in DEFAULT_GRIDS:
            settings = self.settings(method)
            picked = {chosen[s.line] for s in settings if s.line in chosen}
            labels = {s.label for s in settings}
            missing = picked - labels
            if missing:
                raise DPIConfigError(f"the chosen settings {sorted(missing)} are not in the grid of {method!r}; "
                                     "give that grid the values, or choose from a run with the same grids.")
            if picked:
                keep = [s for s in settings if s.line not in chosen or s.label in picked]
                self.grids[method] = [{k: [v] for k, v in s.params} for s in keep]

    def b_lengths(self, max_steps: int) -> list[int]:
        return list(self.b_steps or [max_steps])


def _pair(value, task_names: list[str]) -> Pair:
    if isinstance(value, dict):
        check_unknown_keys(value, _PAIR_KEYS, "recipe: sequential.pairs entry")
        if "pair" not in value:
            raise DPIConfigError(f"sequential.pairs entry {value!r} needs `pair: [A, B]`.")
        extra = {k: v for k, v in value.items() if k != "pair"}
        value = value["pair"]
    else:
        extra = {}
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[0] != value[1]):
        raise DPIConfigError(f"sequential.pairs: {value!r} is not a pair of two different task names [A, B].")
    unknown = [t for t in value if t not in task_names]
    if unknown:
        raise DPIConfigError(f"sequential.pairs names {unknown}, which are not tasks of the recipe ({task_names}).")
    return Pair(value[0], value[1], **extra)


def _methods(methods) -> list[str]:
    methods = [methods] if isinstance(methods, str) else list(methods or [])
    if not methods:
        raise DPIConfigError(f"sequential.methods is empty; name at least one of {list(METHODS)}.")
    for m in methods:
        if m not in METHODS:
            raise DPIConfigError(f"unknown method {m!r}{did_you_mean(m, METHODS)}; the methods are {list(METHODS)}.")
    return [m for m in METHODS if m in methods]


def _grid(method: str, grid) -> list[dict]:
    grids = grid if isinstance(grid, list) else [grid]
    out = []
    for g in grids:
        if not isinstance(g, dict):
            raise DPIConfigError(f"sequential.grids.{method} must be a mapping of parameter → values (or a list of "
                                 f"them), got {g!r}.")
        check_unknown_keys(g, PARAMETERS[method], f"recipe: sequential.grids.{method}")
        full = {k: g.get(k, DEFAULT_GRIDS[method][k]) for k in PARAMETERS[method]}
        full = {k: [_number(k, x) for x in (v if isinstance(v, (list, tuple)) else [v])] for k, v in full.items()}
        for k, values in full.items():
            if not values:
                raise DPIConfigError(f"sequential.grids.{method}.{k} is empty; give at least one value.")
            for v in values:
                _check_value(method, k, v)
        out.append(full)
    return out


def _number(key: str, v):
    """``v``, a numeric string (YAML reads ``1e-4`` as one) turned into its float for the numeric parameters."""
    if key not in ("form", "base") and isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def _check_value(method: str, key: str, v) -> None:
    where = f"grids.{method}.{key}"
    if key == "p":
        _fraction(where, v)
    elif key == "form":
        if v not in ("loss", "decoupled"):
            raise DPIConfigError(f"sequential.{where}: {v!r} is not 'loss' or 'decoupled'.")
    elif key == "lambda":
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not v >= 0:  # not >=: NaN too
            raise DPIConfigError(f"sequential.{where}: λ must be a number >= 0, got {v!r}.")
    elif key == "r":
        _positive_int(where, v)
    elif key == "learning_rate":
        _positive(where, v)
    elif key == "base":
        if v not in ("none", "freeze"):
            raise DPIConfigError(f"sequential.{where}: {v!r} is not 'none' (the unprotected B model) or 'freeze' "
                                 "(B with A's core at reference_fraction frozen).")
    elif key in ("alpha", "alpha_core", "alpha_rest"):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0 <= v <= 1:
            raise DPIConfigError(f"sequential.{where}: α must be in [0, 1], got {v!r}.")
    elif key == "fraction":
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0 < v < 1:
            raise DPIConfigError(f"sequential.{where}: the replayed share of the rows must be in (0, 1), got {v!r}.")


def _fraction(where: str, v) -> None:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0 < v <= 1:
        raise DPIConfigError(f"sequential.{where}: a core fraction p must be in (0, 1], got {v!r}.")


def _positive(where: str, v) -> None:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not v > 0:  # not >: NaN too
        raise DPIConfigError(f"sequential.{where} must be a number > 0, got {v!r}.")


def _positive_int(where: str, v, none_ok: bool = False) -> None:
    if v is None and none_ok:
        return
    if not is_int(v) or v < 1:
        raise DPIConfigError(f"sequential.{where} must be a positive integer{' or null' if none_ok else ''}, got "
                             f"{v!r}.")
