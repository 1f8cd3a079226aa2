"""Study files (TOML) -> validated :class:`StudySpec`, with one-line errors for bad input.

A study file has four tables::

    [study]      name, objective, metrics, directions, sampler, sampler_options, pruner,
                 pruner_options, n_trials, timeout, seed, presets, warm_start, warm_start_top
    [objective]  the objective's data settings (see its OPTIONS)
    [training]   fixed training settings (loss, learning_rate, batch_size, epochs,
                 weight_decay, device)
    [space]      the searched dimensions (see spaces.dimensions)

Every error is a :class:`SpecError` whose message is ``<file>: <key path>: <what is allowed>``.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensnas.objectives import objective_class, objective_names
from lensnas.spaces import Dimension, SpaceError, parse_space
from lensnas.spaces.dimensions import closest, parse_dimension
from lensnas.spaces.errors import OptionError, StudyFileError

SAMPLERS = ("tpe", "random", "gp", "nsga2", "grid")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
DIRECTIONS = ("minimize", "maximize")
DEVICES = ("auto", "cpu", "cuda")
TABLES = ("study", "objective", "training", "space")
STUDY_KEYS = (
    "name", "objective", "metrics", "directions", "sampler", "sampler_options", "pruner",
    "pruner_options", "n_trials", "timeout", "seed", "presets", "warm_start", "warm_start_top",
    "description",
)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


SpecError = StudyFileError  # a study file that cannot be run: names the file, key, what is allowed


@dataclass(frozen=True)
class OptionRule:
    """One key of ``sampler_options`` / ``pruner_options``: its type, range and extra words."""

    kind: type  # int, float or bool
    low: float | None = None
    high: float | None = None
    words: tuple[str, ...] = ()  # strings allowed besides the numbers ("auto")

    def describe(self) -> str:
        """What the rule allows, in words."""
        what = {bool: "true or false", int: "an integer", float: "a number"}[self.kind]
        if self.low is not None and self.high is not None:
            what += f" in {self.low:g}..{self.high:g}"
        elif self.low is not None:
            what += f" >= {self.low:g}"
        return " or ".join([*(f'"{word}"' for word in self.words), what])

    def check(self, key: str, value: Any) -> Any:
        """``value`` if allowed (an int where a float is asked becomes a float), else SpaceError."""
        if isinstance(value, str) and value in self.words:
            return value
        kinds = (int, float) if self.kind is float else (self.kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and self.kind is not bool):
            raise SpaceError(key, f"must be {self.describe()}, got {value!r}")
        if self.kind is bool:
            return value
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise SpaceError(key, f"must be {self.describe()}, got {value!r}")
        return float(value) if self.kind is float else value


_COUNT = OptionRule(int, 0)
_POSITIVE = OptionRule(int, 1)
_FLAG = OptionRule(bool)
_PROBABILITY = OptionRule(float, 0.0, 1.0)
# The keys of [study] sampler_options per sampler (lensnas's defaults: search/samplers.py).
SAMPLER_OPTIONS: dict[str, dict[str, OptionRule]] = {
    "tpe": {
        "n_startup_trials": _COUNT, "n_ei_candidates": _POSITIVE, "multivariate": _FLAG,
        "group": _FLAG, "constant_liar": _FLAG,
    },
    "gp": {"n_startup_trials": _COUNT, "deterministic_objective": _FLAG},
    "nsga2": {
        "population_size": OptionRule(int, 2), "mutation_prob": _PROBABILITY,
        "crossover_prob": _PROBABILITY, "swapping_prob": _PROBABILITY,
    },
    "random": {},
    "grid": {},
}
# The keys of [study] pruner_options per pruner; steps and resources are epochs.
PRUNER_OPTIONS: dict[str, dict[str, OptionRule]] = {
    "median": {
        "n_startup_trials": _COUNT, "n_warmup_steps": _COUNT, "interval_steps": _POSITIVE,
        "n_min_trials": _POSITIVE,
    },
    "hyperband": {
        "min_resource": _POSITIVE, "max_resource": OptionRule(int, 1, words=("auto",)),
        "reduction_factor": OptionRule(int, 2), "bootstrap_count": _COUNT,
    },
    "successive_halving": {
        "min_resource": _POSITIVE, "reduction_factor": OptionRule(int, 2),
        "min_early_stopping_rate": _COUNT, "bootstrap_count": _COUNT,
    },
    "none": {},
}


@dataclass(frozen=True)
class StudySpec:
    """A validated study file."""

    path: Path
    name: str
    objective: str
    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    sampler: str
    pruner: str
    n_trials: int
    timeout: float | None
    seed: int
    presets: tuple[str, ...]
    space: tuple[Dimension, ...]
    objective_options: dict[str, Any]
    training: dict[str, Any]
    device: str
    description: str = ""
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)
    sampler_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    pruner_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    warm_start: tuple[str, ...] = ()  # earlier studies whose fitting trials start this one
    warm_start_top: int | None = None  # enqueue the best K of each instead of copying them

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def with_overrides(
        self, n_trials: int | None = None, seed: int | None = None,
        warm_start: Sequence[str] = (),
    ) -> StudySpec:
        """The same spec with ``n_trials`` and/or ``seed`` replaced and ``warm_start`` studies
        added to the file's (CLI overrides)."""
        changes: dict[str, Any] = {}
        if n_trials is not None:
            if n_trials < 1:
                raise OptionError(f"--n-trials: must be at least 1, got {n_trials}")
            changes["n_trials"] = n_trials
        if seed is not None:
            changes["seed"] = seed
        for name in warm_start:
            reason = _warm_start_problem(name, self.name)
            if reason:
                raise OptionError(f"--warm-start {name}: {reason}")
        stored = dict(changes)
        if warm_start:
            changes["warm_start"] = tuple(dict.fromkeys((*self.warm_start, *warm_start)))
            stored["warm_start"] = list(changes["warm_start"])
        raw = {**self.raw, "study": {**self.raw.get("study", {}), **stored}}
        return dataclasses.replace(self, raw=raw, **changes)

    def make_objective(self, cache_dir: str | Path | None = None, progress: bool = True) -> Any:
        """An instance of the study's objective (data not yet prepared)."""
        cls = objective_class(self.objective)
        return cls(self.objective_options, self.training, seed=self.seed, cache_dir=cache_dir, progress=progress)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file; raises SpecError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such study file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a study file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file (a TOML study file is expected)") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot read ({error.strerror})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: invalid TOML: {error}") from None
    return spec_from_dict(raw, path)


def spec_from_dict(raw: Any, path: str | Path) -> StudySpec:
    """Validate an already parsed study (e.g. the copy stored with a study); errors name ``path``."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a study must be a table of tables, got {type(raw).__name__}")
    try:
        return _validate(path, raw)
    except SpaceError as error:
        raise SpecError(f"{path}: {error}") from None


def _expect(key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise SpaceError(key, f"must be {what}, got {value!r}")
    return value


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        hint = closest(value, allowed) if isinstance(value, str) else ""
        raise SpaceError(key, f"must be one of {', '.join(allowed)}, got {value!r}{hint}")
    return value


def _string_list(key: str, value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise SpaceError(key, f"must be a string or a non-empty list of strings, got {value!r}")
    return tuple(values)


def _validate(path: Path, raw: dict[str, Any]) -> StudySpec:
    for table in raw:
        if table not in TABLES:
            raise SpaceError(table, f"unknown table [{table}]{closest(table, TABLES)}; allowed: {', '.join(TABLES)}")
    for table in TABLES:
        if table in raw and not isinstance(raw[table], dict):
            raise SpaceError(table, f"must be a table [{table}], got {type(raw[table]).__name__}")
    if "study" not in raw:
        raise SpaceError("study", "missing table [study] (needs at least name and objective)")
    study = raw["study"]
    for key in study:
        if key not in STUDY_KEYS:
            raise SpaceError(f"study.{key}", f"unknown key{closest(key, STUDY_KEYS)}; allowed: {', '.join(STUDY_KEYS)}")
    for key in ("name", "objective"):
        if key not in study:
            raise SpaceError(f"study.{key}", "missing (required)")
    name = _expect("study.name", study["name"], str, "a string")
    if not NAME_PATTERN.match(name):
        raise SpaceError("study.name", f"must be 1-100 letters, digits, '_', '.', '-' (starting with a letter or digit), got {name!r}")
    objective_name = _one_of("study.objective", study["objective"], tuple(objective_names()))
    cls = objective_class(objective_name)

    metrics = _string_list("study.metrics", study.get("metrics", cls.DEFAULT_METRIC))
    optimisable = tuple(name for name, metric in cls.METRICS.items() if metric.direction)
    for i, metric in enumerate(metrics):
        _one_of(f"study.metrics[{i}]", metric, optimisable)
    if len(set(metrics)) != len(metrics):
        raise SpaceError("study.metrics", f"has repeated metrics: {list(metrics)}")
    if "directions" in study:
        directions = _string_list("study.directions", study["directions"])
        for i, direction in enumerate(directions):
            _one_of(f"study.directions[{i}]", direction, DIRECTIONS)
        if len(directions) != len(metrics):
            raise SpaceError("study.directions", f"needs one direction per metric ({len(metrics)}), got {len(directions)}")
    else:
        directions = tuple(cls.METRICS[m].direction for m in metrics)

    sampler = _one_of("study.sampler", study.get("sampler", "tpe" if len(metrics) == 1 else "nsga2"), SAMPLERS)
    pruner = _one_of("study.pruner", study.get("pruner", "median" if len(metrics) == 1 else "none"), PRUNERS)
    if len(metrics) > 1 and pruner != "none":
        raise SpaceError("study.pruner", 'Optuna cannot prune multi-objective studies; allowed: "none"')
    score = cls.VALIDATION_SCORE
    if pruner != "none" and directions[0] != score.direction:
        raise SpaceError(
            "study.pruner",
            f"the pruner compares trials by their {score.label} ({score.direction}), but the "
            f"study's metric is to {directions[0]}; allowed here: \"none\"",
        )
    if sampler == "gp" and len(metrics) > 1:
        raise SpaceError("study.sampler", "gp is single-objective here; allowed for several metrics: tpe, random, nsga2, grid")
    sampler_options = _options("study.sampler_options", study.get("sampler_options", {}), sampler, "sampler", SAMPLER_OPTIONS)
    pruner_options = _options("study.pruner_options", study.get("pruner_options", {}), pruner, "pruner", PRUNER_OPTIONS)
    n_trials = _expect("study.n_trials", study.get("n_trials", 20), int, "an integer")
    if not 1 <= n_trials <= 1_000_000:
        raise SpaceError("study.n_trials", f"must be in 1..1000000, got {n_trials}")
    timeout = study.get("timeout")
    if timeout is not None:
        timeout = float(_expect("study.timeout", timeout, (int, float), "a number of seconds"))
        if not 0 < timeout < 1e8:
            raise SpaceError("study.timeout", f"must be a positive number of seconds, got {timeout}")
    seed = _expect("study.seed", study.get("seed", 0), int, "an integer")
    if not 0 <= seed < 2**32:
        raise SpaceError("study.seed", f"must be in 0..{2**32 - 1}, got {seed}")
    description = _expect("study.description", study.get("description", ""), str, "a string")

    family = cls.family
    space = parse_space(raw.get("space", {}))
    family.check_space(space)
    training, device = _training(raw.get("training", {}), family, {d.name for d in space})
    options = cls.check_options(raw.get("objective", {}))
    cls.check_metrics(metrics, options)
    cls.check_training(training, space, options)

    presets = _string_list("study.presets", study["presets"]) if study.get("presets", []) != [] else ()
    for i, preset in enumerate(presets):
        _one_of(f"study.presets[{i}]", preset, tuple(family.presets) or ("(none for this objective)",))
    if sampler == "grid":
        _check_grid(space)
    _check_tpe(sampler_options)
    if pruner == "hyperband":
        _check_hyperband(pruner_options, training.get("epochs"))
    if pruner == "successive_halving":
        _check_min_resource(pruner_options, training.get("epochs"))
    warm_start = _warm_start(study.get("warm_start", []), name)
    warm_start_top = study.get("warm_start_top")
    if warm_start_top is not None:
        _expect("study.warm_start_top", warm_start_top, int, "an integer")
        if not 1 <= warm_start_top <= 10_000:
            raise SpaceError("study.warm_start_top", f"must be in 1..10000, got {warm_start_top}")
        if len(metrics) > 1:
            raise SpaceError("study.warm_start_top", "ranks trials by one metric; a study of several "
                             "metrics copies the earlier trials instead (remove warm_start_top)")
    return StudySpec(
        path=path, name=name, objective=objective_name, metrics=metrics, directions=directions,
        sampler=sampler, pruner=pruner, n_trials=n_trials, timeout=timeout, seed=seed,
        presets=presets, space=tuple(space), objective_options=options, training=training,
        device=device, description=description, raw=raw, sampler_options=sampler_options,
        pruner_options=pruner_options, warm_start=warm_start, warm_start_top=warm_start_top,
    )


def _options(key: str, table: Any, chosen: str, what: str, rules: dict[str, dict[str, OptionRule]]) -> dict[str, Any]:
    """A checked ``sampler_options`` / ``pruner_options`` table for the ``chosen`` sampler/pruner."""
    if not isinstance(table, dict):
        raise SpaceError(key, f"must be a table of options, got {table!r}")
    allowed = rules[chosen]
    options = {}
    for option, value in table.items():
        if option not in allowed:
            if not allowed:
                raise SpaceError(f"{key}.{option}", f'the {what} "{chosen}" takes no options; allowed: none')
            hint = closest(option, allowed)
            raise SpaceError(f"{key}.{option}", f"not an option of the {what} \"{chosen}\"{hint}; allowed: {', '.join(allowed)}")
        options[option] = allowed[option].check(f"{key}.{option}", value)
    return options


def _check_tpe(options: dict[str, Any]) -> None:
    if options.get("group") and options.get("multivariate") is False:
        raise SpaceError("study.sampler_options.group", "needs multivariate = true; allowed with multivariate = false: group = false")


def _check_min_resource(options: dict[str, Any], epochs: Any) -> int:
    """The pruner's first rung (epochs), which a trial must be able to reach."""
    min_resource = options.get("min_resource", 1)
    if isinstance(epochs, int) and min_resource > epochs:
        raise SpaceError("study.pruner_options.min_resource", f"{min_resource} epochs is more than training.epochs ({epochs}): no trial would be pruned; allowed: 1..{epochs}")
    return min_resource


def _check_hyperband(options: dict[str, Any], epochs: Any) -> None:
    """Hyperband's resources (epochs) must be reachable: min <= max <= training.epochs."""
    max_resource = options.get("max_resource", epochs if isinstance(epochs, int) else "auto")
    min_resource = _check_min_resource(options, epochs)
    if max_resource == "auto":
        if options.get("bootstrap_count", 0) > 0:
            raise SpaceError("study.pruner_options.bootstrap_count", 'needs an integer max_resource (not "auto"); allowed with "auto": 0')
        return
    key = "study.pruner_options.max_resource"
    if max_resource < min_resource:
        raise SpaceError(key, f"must be at least min_resource ({min_resource}), got {max_resource}")
    if isinstance(epochs, int) and max_resource > epochs:
        raise SpaceError(key, f"{max_resource} epochs is more than training.epochs ({epochs}): no trial reaches it; allowed: {min_resource}..{epochs} or \"auto\"")


def _warm_start_problem(name: Any, own_name: str) -> str | None:
    """Why ``name`` cannot be a warm-start study, or None."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        return f"must be a study name (letters, digits, '_', '.', '-'), got {name!r}"
    if name == own_name:
        return "is this study itself; allowed: the name of an earlier study in the same storage"
    return None


def _warm_start(value: Any, own_name: str) -> tuple[str, ...]:
    if value == []:
        return ()
    names = _string_list("study.warm_start", value)
    for i, name in enumerate(names):
        reason = _warm_start_problem(name, own_name)
        if reason:
            raise SpaceError(f"study.warm_start[{i}]", reason)
    if len(set(names)) != len(names):
        raise SpaceError("study.warm_start", f"has repeated studies: {list(names)}")
    return names


def _training(table: dict[str, Any], family: Any, searched: set[str]) -> tuple[dict[str, Any], str]:
    training_keys = [k for k in family.rules if k not in family.architecture_keys]
    allowed = (*training_keys, "device")
    values, device = {}, "auto"
    for key, value in table.items():
        if key not in allowed:
            raise SpaceError(f"training.{key}", f"unknown key{closest(key, allowed)}; allowed: {', '.join(allowed)}")
        if key in searched:
            raise SpaceError(f"training.{key}", "is also a dimension in [space]; set it in one place")
        if key == "device":
            if not isinstance(value, str) or not (value in DEVICES or re.fullmatch(r"cuda:\d+", value)):
                raise SpaceError("training.device", f"must be one of auto, cpu, cuda, cuda:N, got {value!r}")
            device = value
            continue
        dimension = parse_dimension(key, value, "training")
        if dimension.searched:
            raise SpaceError(f"training.{key}", "must be a single value here; search it in [space]")
        family.check_space([dimension], "training")
        values[key] = value
    return values, device


def _check_grid(space: list[Dimension]) -> None:
    for dimension in space:
        if dimension.kind == "float" and dimension.step is None:
            raise SpaceError(f"space.{dimension.name}", "the grid sampler needs choices or a step for every float dimension")
