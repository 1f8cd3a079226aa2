"""Study files (TOML) -> validated :class:`StudySpec`, with one-line errors for bad input.

A study file has four tables::

    [study]      name, objective, metrics, directions, sampler, pruner, n_trials, timeout,
                 seed, presets
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensnas.objectives import objective_class, objective_names
from lensnas.spaces import Dimension, SpaceError, parse_space
from lensnas.spaces.dimensions import closest, parse_dimension
from lensnas.spaces.errors import OptionError, StudyFileError

SAMPLERS = ("tpe", "random", "gp", "nsga2", "grid")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = ("minimize", "maximize")
DEVICES = ("auto", "cpu", "cuda")
TABLES = ("study", "objective", "training", "space")
STUDY_KEYS = (
    "name", "objective", "metrics", "directions", "sampler", "pruner", "n_trials", "timeout",
    "seed", "presets", "description",
)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


SpecError = StudyFileError  # a study file that cannot be run: names the file, key, what is allowed


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

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def with_overrides(self, n_trials: int | None = None, seed: int | None = None) -> StudySpec:
        """The same spec with ``n_trials`` and/or ``seed`` replaced (CLI overrides)."""
        changes: dict[str, Any] = {}
        if n_trials is not None:
            if n_trials < 1:
                raise OptionError(f"--n-trials: must be at least 1, got {n_trials}")
            changes["n_trials"] = n_trials
        if seed is not None:
            changes["seed"] = seed
        raw = {**self.raw, "study": {**self.raw.get("study", {}), **changes}}
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
    return StudySpec(
        path=path, name=name, objective=objective_name, metrics=metrics, directions=directions,
        sampler=sampler, pruner=pruner, n_trials=n_trials, timeout=timeout, seed=seed,
        presets=presets, space=tuple(space), objective_options=options, training=training,
        device=device, description=description, raw=raw,
    )


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
