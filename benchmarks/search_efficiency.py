"""Does the search pay for itself? lensnas's samplers and pruners against ShearNet's grid sweep,
measured in training compute, in one run.

    python -m benchmarks.search_efficiency [--quick] [--space shearnet|architecture|both]
        [--seeds 5] [--trials N] [--strategies grid,tpe,tpe+hyperband,...] [--no-parallel]
        [--out FOLDER]

Two spaces, on the shear objective at a small size (25x25 stamps, cached data, seconds a trial):

- ``shearnet``: ShearNet's example sweep (research/hyperparam_search/example_sweep.yaml of
  s-Sayan/ShearNet): learning rate x batch size x weight decay x weight averaging (EMA) of its
  small CNN at half width, 36 combinations;
- ``architecture``: the network itself (depth, width, kernel size, dilation, pooling, residual,
  normalisation, head) and the learning rate; ShearNet's grid extended the way a ShearNet user
  writes it in YAML (learning rate x depth x width x kernel size x normalisation, 48
  combinations, the other keys at ShearNet's CNN), and ShearNet's presets (``shearnet_cnn``,
  ``research_backed``; ``fork_like`` needs the PSF as an input channel) trained with the same
  recipe.

Strategies, each a real lensnas study (``lensnas.search.launch``: Optuna in SQLite under a
temporary folder), all with the same training budget, the grid's: its combinations x epochs:

- ``grid``: ShearNet's layout, every combination in its order (``itertools.product`` of the keys
  as listed), enqueued as the study's trials;
- ``random``, ``tpe``, ``gp``: the lensnas samplers (``search/samplers.py``) over the same ranges,
  every trial trained to the end (pruner none);
- ``tpe+hyperband``, ``tpe+median``, ``random+hyperband``: with the lensnas pruner (its default
  options) on the per-epoch validation score. A pruned trial trains fewer epochs, so these
  studies run more trials: each trial first checks the epochs the study has trained (all its
  trials, running ones included) and, once they reach the budget, fails at once with
  ``BUDGET_SPENT`` (no training); three such failures in a row stop the launch (lensnas's
  ``max_failures``). One launch, one sampler: a launch per chunk of trials would rebuild the
  sampler from the study seed and propose the first random points again;
- ``presets`` (architecture space): each of ShearNet's presets trained once;
- ``NAME@4``: the same with 4 trials in flight (the Ray executor on a local Ray, 0.5 CPU each).

Compute, per trial, read back from the Optuna trials the studies store (COMPLETE, PRUNED and
FAIL trials all count; only COMPLETE ones have a test value, so a pruned trial is never the
best): ``epochs``, the epochs it trained (its finite intermediate values, one per epoch: a
pruned trial's NaN after its last epoch is not one); ``cpu_seconds``, measured: the CPU time
(``time.process_time``, all threads) of the process that ran the trial, around the objective's
``run_trial`` (training, validation and test scoring; stored as the trial's ``cpu_seconds``);
``wall_seconds``, the trial's duration. The figures are anytime curves: the best test
``rmse_over_crb`` reached after a given number of epochs summed over the study's trials in the
order they finished, median and range over seeds, and the compute each strategy needs to reach
the grid's final best.

Noise: a trial's score depends on its training seed. Here every trial of a replicate trains
from the same seed (the study seed: same initial weights, same batch order), so a
configuration scores the same whichever strategy proposes it, and trials differ by their
configuration only. Replicates (``--seeds``) differ in data, training seed and sampler seed.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import optuna
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lensnas.objectives import register_objective
from lensnas.objectives.shear.objective import ShearObjective
from lensnas.objectives.trial import TrialFailed
from lensnas.search.launch import LaunchStopped, launch
from lensnas.search.spec import StudySpec, spec_from_dict
from lensnas.search.study import FAIL_REASON
from lensnas.spaces.shear.cnn import SHEAR_CNN

METRIC = "rmse_over_crb"
BUDGET_SPENT = "compute budget spent"  # the fail reason of a trial started after the budget
BUDGET_STOP_FAILURES = 3  # max_failures of a launch: three budget-spent trials in a row stop it
IN_FLIGHT = 4
STATE = optuna.trial.TrialState


@dataclass(frozen=True)
class Space:
    """One searched space: ShearNet's grid over it and the lensnas dimensions over its ranges."""

    name: str
    grid: dict[str, list[Any]]  # ShearNet's sweep: values per key, in its order
    grid_fixed: dict[str, Any]  # the grid's value of each searched key it does not sweep
    dimensions: dict[str, Any]  # the [space] table of the samplers' studies
    training: dict[str, Any]  # the recipe, beside epochs and device
    presets: tuple[str, ...] = ()  # ShearNet's networks, each trained once with the recipe
    preset_learning_rate: float = 1.0e-3


# ShearNet's example sweep, in its order (its EMA null, off, is 0 here), and the same ranges as
# lensnas dimensions, log-uniform learning rate and weight decay.
SHEARNET = Space(
    name="shearnet",
    grid={
        "learning_rate": [1.0e-3, 5.0e-4, 1.0e-4],
        "batch_size": [32, 64, 128],
        "weight_decay": [1.0e-4, 1.0e-5],
        "ema_decay": [0.0, 0.999],
    },
    grid_fixed={},
    dimensions={
        "width": 8,  # ShearNet's small CNN at half width, fixed (ShearNet's sweep fixes the network)
        "learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
        "weight_decay": {"type": "float", "low": 1.0e-5, "high": 1.0e-4, "log": True},
        "ema_decay": {"type": "categorical", "choices": [0.0, 0.999]},
    },
    training={},
)
# The network searched: what a lensnas user writes (README), at sizes a 25x25 stamp allows. The
# grid is ShearNet's sweep extended by architecture keys, a few values each, and keeps
# ShearNet's CNN (dilation 1, average pooling, no residual, dense head) for the keys it leaves out.
ARCHITECTURE = Space(
    name="architecture",
    grid={
        "learning_rate": [1.0e-3, 5.0e-4, 1.0e-4],
        "depth": [2, 3],
        "width": [8, 16],
        "kernel_size": [3, 5],
        "normalization": ["none", "batch"],
    },
    grid_fixed={"dilation": 1, "pooling": "avg", "residual": False, "head": "dense"},
    dimensions={
        "depth": {"type": "int", "low": 1, "high": 3},
        "width": {"type": "categorical", "choices": [8, 16]},
        "kernel_size": {"type": "categorical", "choices": [3, 5]},
        "dilation": {"type": "categorical", "choices": [1, 2]},
        "pooling": {"type": "categorical", "choices": ["avg", "max", "conv"]},
        "residual": {"type": "categorical", "choices": [False, True]},
        "normalization": {"type": "categorical", "choices": ["none", "batch"]},
        "head": {"type": "categorical", "choices": ["dense", "gap"]},
        "learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True},
    },
    training={"batch_size": 64},
    presets=("shearnet_cnn", "research_backed"),
)
SPACES = {space.name: space for space in (SHEARNET, ARCHITECTURE)}

SAMPLERS = ("grid", "random", "tpe", "gp", "presets")
PRUNERS = ("none", "hyperband", "median", "successive_halving")
STRATEGIES = (
    "grid", "random", "tpe", "gp", "tpe+hyperband", "tpe+median", "random+hyperband", "presets",
    f"tpe@{IN_FLIGHT}", f"tpe+hyperband@{IN_FLIGHT}",
)


@dataclass(frozen=True)
class Strategy:
    """A sampler, a pruner and the trials in flight."""

    sampler: str
    pruner: str = "none"
    in_flight: int = 1
    startup: int | None = None  # the sampler's n_startup_trials (None: lensnas's default)

    @property
    def name(self) -> str:
        """As written on the command line: sampler[:startup][+pruner][@in_flight]."""
        text = self.sampler if self.startup is None else f"{self.sampler}:{self.startup}"
        text = text if self.pruner == "none" else f"{text}+{self.pruner}"
        return text if self.in_flight == 1 else f"{text}@{self.in_flight}"

    @property
    def label(self) -> str:
        """As the tables show it."""
        text = self.sampler if self.startup is None else f"{self.sampler} ({self.startup} start-up)"
        text = text if self.pruner == "none" else f"{text}+{self.pruner}"
        return text if self.in_flight == 1 else f"{text}, {self.in_flight} in flight"


def parse_strategy(text: str) -> Strategy:
    """A strategy from ``sampler[:startup][+pruner][@in_flight]`` (``startup``: the TPE or GP
    sampler's n_startup_trials); ValueError says what is allowed."""
    match = re.fullmatch(r"([a-z]+)(?::(\d+))?(?:\+([a-z_]+))?(?:@(\d+))?", text.strip())
    if match is None:
        raise ValueError(f"strategy {text!r}: write sampler[:startup][+pruner][@{IN_FLIGHT}], "
                         f"e.g. tpe+hyperband@{IN_FLIGHT} or tpe:5+hyperband")
    sampler, pruner, in_flight = match.group(1), match.group(3) or "none", int(match.group(4) or 1)
    startup = None if match.group(2) is None else int(match.group(2))
    if startup is not None and (sampler not in ("tpe", "gp") or startup < 1):
        raise ValueError(f"strategy {text!r}: a start-up count (:N, N >= 1) is for tpe and gp")
    if sampler not in SAMPLERS or pruner not in PRUNERS:
        raise ValueError(f"strategy {text!r}: samplers {', '.join(SAMPLERS)}; pruners "
                         f"{', '.join(PRUNERS[1:])}")
    if sampler in ("grid", "presets") and (pruner != "none" or in_flight != 1):
        raise ValueError(f"strategy {text!r}: {sampler} trains every trial to the end, one at a time")
    if in_flight not in (1, IN_FLIGHT):
        raise ValueError(f"strategy {text!r}: 1 or {IN_FLIGHT} trials in flight")
    return Strategy(sampler, pruner, in_flight, startup)


@dataclass(frozen=True)
class Size:
    """The shear objective's size: galaxies per split and training epochs."""

    n_train: int
    n_validation: int
    n_test: int
    epochs: int


FULL = Size(n_train=2000, n_validation=300, n_test=500, epochs=6)
QUICK = Size(n_train=800, n_validation=200, n_test=300, epochs=4)  # 4: Hyperband's rungs 1, 3 < 4


def spent_epochs(study: optuna.Study) -> int:
    """The epochs every trial of ``study`` has trained so far, running ones included."""
    return sum(epochs_trained(t) for t in study.get_trials(deepcopy=False))


class SharedSeedShear(ShearObjective):
    """The shear objective with one training seed for every trial of a study (the study seed),
    so that a configuration scores the same whichever sampler proposes it; it measures each
    trial's CPU time and starts no training once the study has spent ``budget_epochs``."""

    name = "shear_shared_seed"
    OPTIONS: ClassVar[dict[str, Any]] = {**ShearObjective.OPTIONS, "budget_epochs": 0}  # 0: none

    def run_trial(self, params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        """Train from the study seed instead of the per-trial seed (or from the trial's
        ``training_seed`` user attribute, set when it was enqueued); store it as training_seed and
        the trial's CPU seconds as cpu_seconds (also when pruned)."""
        ctx.seed = int(ctx.trial.user_attrs.get("training_seed", self.seed))
        budget = self.options["budget_epochs"]
        if budget and spent_epochs(ctx.trial.study) >= budget:  # ctx: lensnas's Optuna context
            raise TrialFailed(f"{BUDGET_SPENT} ({budget} epochs)")
        started = time.process_time()
        try:
            metrics = super().run_trial(params, ctx)
        finally:
            cpu_seconds = time.process_time() - started
            ctx.trial.set_user_attr("cpu_seconds", cpu_seconds)
        return {**metrics, "training_seed": float(ctx.seed), "cpu_seconds": cpu_seconds}


register_objective(SharedSeedShear.name, SharedSeedShear)


def grid_combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in ShearNet's order (the last key varies fastest)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def preset_dimensions(names: Sequence[str], learning_rate: float) -> dict[str, Any]:
    """A space that holds exactly the named presets: each key on which they differ as a choice of
    their values (the rest at the family's defaults, ShearNet's CNN), the learning rate fixed."""
    presets = [SHEAR_CNN.presets[name] for name in names]
    keys = sorted({key for preset in presets for key in preset})
    dimensions: dict[str, Any] = {"learning_rate": learning_rate}
    for key in keys:
        values = [preset.get(key, SHEAR_CNN.defaults[key]) for preset in presets]
        if any(v != values[0] for v in values):
            choices = list(dict.fromkeys(values))
            dimensions[key] = {"type": "categorical", "choices": choices}
    return dimensions


def study_name(space: Space, strategy: Strategy, seed: int) -> str:
    """The study's name (and database file name)."""
    name = strategy.name.replace("+", "-").replace("@", "-x").replace(":", "-s")
    return f"{space.name}-{name}-seed{seed}"


def study_spec(
    folder: Path, space: Space, strategy: Strategy, seed: int, n_grid: int, size: Size
) -> StudySpec:
    """The study of one space, strategy and replicate. The grid's and the presets' trials are all
    enqueued (their sampler is never consulted); a pruned strategy gets trials enough to spend
    the grid's compute even if every trial stops after one epoch (the budget stops it)."""
    budget = n_grid * size.epochs
    n_trials = {"grid": n_grid, "presets": len(space.presets)}.get(strategy.sampler, n_grid)
    if strategy.pruner != "none":
        n_trials = budget + BUDGET_STOP_FAILURES
    raw = {
        "study": {
            "name": study_name(space, strategy, seed), "objective": SharedSeedShear.name,
            "metrics": [METRIC], "pruner": strategy.pruner, "n_trials": n_trials, "seed": seed,
            "sampler": strategy.sampler if strategy.sampler in ("random", "tpe", "gp") else "random",
        },
        "objective": {
            "n_train": size.n_train, "n_validation": size.n_validation, "n_test": size.n_test,
            "stamp_size": 25, "pixel_scale": 0.2, "reference": "none", "budget_epochs": budget,
        },
        "training": {**space.training, "epochs": size.epochs, "device": "cpu"},
        "space": space.dimensions,
    }
    if strategy.startup is not None:
        raw["study"]["sampler_options"] = {"n_startup_trials": strategy.startup}
    if strategy.sampler == "presets":
        raw["study"]["presets"] = list(space.presets)
        raw["space"] = preset_dimensions(space.presets, space.preset_learning_rate)
    return spec_from_dict(raw, folder / f"{raw['study']['name']}.toml")


@dataclass(frozen=True)
class TrialCompute:
    """One finished trial: what it cost and, when COMPLETE, what it scored."""

    number: int
    state: str  # COMPLETE, PRUNED or FAIL
    epochs: int  # epochs trained
    cpu_seconds: float  # measured CPU time of the trial's process during the trial
    wall_seconds: float
    value: float  # test rmse_over_crb; NaN unless COMPLETE
    validation: float  # best per-epoch validation RMSE of g (ShearNet's val loss); NaN unless COMPLETE
    abs_m: float
    params: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None


def epochs_trained(trial: optuna.trial.FrozenTrial) -> int:
    """The epochs a trial trained: its finite intermediate values, one reported per epoch (a
    pruned trial's NaN reported after its last epoch, so that it has no value, is not one)."""
    return sum(math.isfinite(v) for v in trial.intermediate_values.values())


def trial_compute(trial: optuna.trial.FrozenTrial) -> TrialCompute:
    """A finished Optuna trial's compute and scores."""
    attrs = trial.user_attrs
    complete = trial.state == STATE.COMPLETE
    wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return TrialCompute(
        number=trial.number, state=trial.state.name, epochs=epochs_trained(trial),
        cpu_seconds=float(attrs.get("cpu_seconds", wall)), wall_seconds=wall,
        value=float(trial.value) if complete else math.nan,
        validation=float(attrs["validation_score"]) if complete else math.nan,
        abs_m=float(attrs["abs_m"]) if complete else math.nan,
        params=dict(trial.params), preset=attrs.get("preset"),
    )


def budget_stopped(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial failed because the budget was spent when it started (it trained nothing)."""
    return trial.state == STATE.FAIL and BUDGET_SPENT in str(trial.user_attrs.get(FAIL_REASON, ""))


def finished_trials(study: optuna.Study) -> list[TrialCompute]:
    """The study's finished trials in the order they finished, without the budget-stopped ones."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(STATE.COMPLETE, STATE.PRUNED, STATE.FAIL))
              if not budget_stopped(t)]
    trials.sort(key=lambda t: (t.datetime_complete, t.number))
    return [trial_compute(t) for t in trials]


def anytime_curve(trials: Sequence[TrialCompute], cost: str = "epochs") -> list[tuple[float, float]]:
    """(compute summed, best value so far) after each trial in the given (completion) order; the
    compute is the trials' ``cost`` attribute (epochs or cpu_seconds); NaN before a COMPLETE one."""
    curve, spent, best = [], 0.0, math.nan
    for trial in trials:
        spent += getattr(trial, cost)
        if math.isfinite(trial.value) and not trial.value >= best:
            best = trial.value
        curve.append((spent, best))
    return curve


def best_at(curve: Sequence[tuple[float, float]], compute: float) -> float:
    """The best value reached with at most ``compute`` summed (NaN if no trial completed by then)."""
    best = math.nan
    for spent, value in curve:
        if spent > compute:
            break
        best = value
    return best


def first_reaching(curve: Sequence[tuple[float, float]], target: float) -> int | None:
    """The index of the first point of ``curve`` whose best value is ``target`` or better."""
    for index, (_, value) in enumerate(curve):
        if value <= target:
            return index
    return None


def compute_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The compute summed when the best value first reaches ``target`` or better; None if never."""
    index = first_reaching(curve, target)
    return None if index is None else curve[index][0]


@dataclass(frozen=True)
class StudyResult:
    """The finished trials of one study, in completion order, and how it ran."""

    space: str
    strategy: str
    label: str
    seed: int
    in_flight: int
    budget_epochs: int
    trials: list[TrialCompute]
    wall_seconds: float

    @property
    def failed(self) -> int:
        """Trials that failed (the budget-stopped ones are not in ``trials``)."""
        return sum(t.state == "FAIL" for t in self.trials)

    @property
    def pruned(self) -> int:
        """Trials the pruner stopped."""
        return sum(t.state == "PRUNED" for t in self.trials)

    def curve(self, cost: str = "epochs") -> list[tuple[float, float]]:
        """The study's anytime curve against ``cost`` summed."""
        return anytime_curve(self.trials, cost)

    def total(self, cost: str = "epochs") -> float:
        """The compute summed over every trial (may pass the budget by the trials in flight)."""
        return sum(getattr(t, cost) for t in self.trials)

    def final_best(self) -> float:
        """The best value within the budget."""
        return best_at(self.curve(), self.budget_epochs)


def run_study(
    folder: Path, space_name: str, strategy_text: str, seed: int, n_grid: int, size: Size,
    cache_dir: Path,
) -> StudyResult:
    """Run one study through lensnas (SQLite under ``folder``) and read its trials back."""
    space, strategy = SPACES[space_name], parse_strategy(strategy_text)
    spec = study_spec(folder, space, strategy, seed, n_grid, size)
    url = f"sqlite:///{folder}/{spec.name}.db"
    if strategy.sampler == "grid":
        study = optuna.create_study(study_name=spec.name, storage=url, direction="minimize")
        for index, params in enumerate(grid_combinations(space.grid)[:n_grid]):
            study.enqueue_trial({**space.grid_fixed, **params}, user_attrs={"grid_index": index})
    options: dict[str, Any] = {}
    executor = "local" if strategy.in_flight == 1 else "ray"
    if executor == "ray":
        cpus = (os.cpu_count() or 1) / strategy.in_flight
        options = {"cpus_per_trial": cpus, "max_concurrent": strategy.in_flight}
    started = time.perf_counter()
    try:
        study = launch(spec, url, quiet=True, cache_dir=cache_dir, executor=executor,
                       max_failures=BUDGET_STOP_FAILURES, **options)
    except LaunchStopped:  # the budget, or failures: the trials say which
        study = optuna.load_study(study_name=spec.name, storage=url)
    wall = time.perf_counter() - started
    trials = finished_trials(study)
    if strategy.sampler == "presets" and sorted(t.preset or "" for t in trials) != sorted(space.presets):
        raise RuntimeError(f"{spec.name}: the presets {space.presets} were not all trained: "
                           f"{[t.preset for t in trials]}")
    return StudyResult(space.name, strategy.name, strategy.label, seed, strategy.in_flight,
                       n_grid * size.epochs, trials, wall)


def spread(values: Sequence[float]) -> str:
    """'median [min-max]' of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    return f"{statistics.median(finite):.3g} [{min(finite):.3g}-{max(finite):.3g}]"


def compute_marks(budget: int) -> list[int]:
    """The compute (epochs summed) the anytime table shows: a ninth, a sixth, a third, half,
    two thirds and all of the budget."""
    marks = {round(budget * f) for f in (1 / 9, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 1)}
    return sorted(m for m in marks if m >= 1)


@dataclass(frozen=True)
class TableData:
    """A table as text cells, drawn by rich on the terminal and as HTML in the report."""

    title: str
    header: list[str]
    rows: list[list[str]]

    def rich(self) -> Table:
        """The table for the terminal (markdown borders)."""
        table = Table(title=escape(self.title), box=box.MARKDOWN)
        for i, column in enumerate(self.header):
            table.add_column(escape(column), justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*(escape(cell) for cell in row))
        return table


def anytime_table(groups: dict[str, list[StudyResult]], budget: int, space: str) -> TableData:
    """Best value after N epochs summed, per strategy: median [min-max] over seeds."""
    marks = compute_marks(budget)
    seeds = len(next(iter(groups.values())))
    rows = [[label, *(spread([best_at(r.curve(), m) for r in results]) for m in marks)]
            for label, results in groups.items()]
    return TableData(
        f"{space}: best {METRIC} after E training epochs summed over trials (the grid's budget: "
        f"{budget}): median [min-max] over {seeds} seeds",
        ["strategy", *(f"E={m}" for m in marks)], rows,
    )


def compute_table(groups: dict[str, list[StudyResult]], space: str) -> TableData:
    """What each strategy ran: trials, pruned trials, epochs, CPU and wall seconds (over seeds)."""
    rows = []
    for label, results in groups.items():
        rows.append([
            label, spread([len(r.trials) for r in results]), spread([r.pruned for r in results]),
            str(sum(r.failed for r in results)), spread([r.total("epochs") for r in results]),
            spread([r.total("cpu_seconds") for r in results]),
            spread([r.total("cpu_seconds") / max(r.total("epochs"), 1) for r in results]),
            spread([r.wall_seconds for r in results]),
        ])
    return TableData(
        f"{space}: compute per study, median [min-max] over seeds (CPU s measured per trial process)",
        ["strategy", "trials", "pruned", "failed (all seeds)", "epochs", "CPU s", "CPU s per epoch",
         "wall s"], rows,
    )


@dataclass(frozen=True)
class Reach:
    """One strategy's compute to reach the grid's final best, per seed (None: not within budget)."""

    epochs: list[float | None]
    cpu_ratio: list[float]  # CPU seconds to reach / the grid's CPU seconds (inf: not reached)
    budget: int

    @property
    def within_third(self) -> int:
        """Seeds that reached it within a third of the grid's epochs."""
        return sum(e is not None and e <= self.budget / 3 for e in self.epochs)

    @property
    def median_ratio(self) -> float:
        """Median over seeds of the epochs needed over the grid's (inf when not reached)."""
        return statistics.median([math.inf if e is None else e / self.budget for e in self.epochs])


def reach(results: Sequence[StudyResult], grids: dict[int, StudyResult]) -> Reach:
    """The compute each replicate of a strategy needed to reach its grid's final best, in epochs
    and as a share of the grid's CPU seconds, counting only what it reached within the budget."""
    epochs: list[float | None] = []
    cpu_ratio = []
    budget = grids[results[0].seed].budget_epochs
    for result in results:
        grid = grids[result.seed]
        curve = result.curve()
        index = first_reaching(curve, grid.final_best())
        if index is None or curve[index][0] > budget:
            epochs.append(None)
            cpu_ratio.append(math.inf)
            continue
        epochs.append(curve[index][0])
        cpu_ratio.append(result.curve("cpu_seconds")[index][0] / grid.total("cpu_seconds"))
    return Reach(epochs, cpu_ratio, budget)


def _ratio(value: float) -> str:
    return ">1 (not reached)" if math.isinf(value) else f"{value:.2f}"


def reach_table(groups: dict[str, list[StudyResult]], grids: dict[int, StudyResult],
                space: str) -> tuple[TableData, dict[str, Reach]]:
    """Per strategy: the epochs it needed to reach the grid's final best in each seed, how often
    within a third of the grid's epochs, and the median ratios to the grid's epochs and CPU s."""
    budget = next(iter(grids.values())).budget_epochs
    rows, reaches = [], {}
    for label, results in groups.items():
        if label == "grid":
            continue
        found = reach(results, grids)
        reaches[label] = found
        rows.append([
            label, ", ".join(f">{budget}" if e is None else f"{e:g}" for e in found.epochs),
            f"{found.within_third}/{len(results)}", _ratio(found.median_ratio),
            _ratio(statistics.median(found.cpu_ratio)),
        ])
    table = TableData(
        f"{space}: epochs summed to reach the grid's final best (the grid trained {budget})",
        ["strategy", "per seed", f"within {budget / 3:g} (a third)", "median ratio (epochs)",
         "median ratio (CPU s)"], rows,
    )
    return table, reaches


def ranking_table(grids: dict[int, StudyResult], space: str) -> tuple[TableData, int, int, list[float]]:
    """The grid's trial ShearNet's ranking picks (best validation loss) against the trial best by
    the test metric and the one with the smallest |m|; returns how often each differs and the
    picked trial's value over the best, per seed."""
    rows = []
    not_best = not_flattest = 0
    excess = []
    for seed, grid in sorted(grids.items()):
        complete = [t for t in grid.trials if t.state == "COMPLETE"]
        picked = min(complete, key=lambda t: t.validation)
        best = min(complete, key=lambda t: t.value)
        flattest = min(complete, key=lambda t: t.abs_m)
        not_best += picked.number != best.number
        not_flattest += picked.number != flattest.number
        excess.append(picked.value / best.value)
        rows.append([
            str(seed), str(picked.number), f"{picked.value:.3g}", f"{best.value:.3g} ({best.number})",
            f"{picked.abs_m:.2g}", f"{flattest.abs_m:.2g} ({flattest.number})",
        ])
    table = TableData(
        f"{space} grid: the trial ShearNet's ranking picks (best validation loss) and the best by "
        "test metrics",
        ["seed", "picked trial", f"its {METRIC}", f"best {METRIC} (trial)", "its |m|",
         "smallest |m| (trial)"], rows,
    )
    return table, not_best, not_flattest, excess


def _quiet_worker() -> None:
    """A process of the pool: one torch thread (as a Ray trial with a fraction of a CPU), no
    Optuna logs or warnings."""
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")


def run_all(spaces: Sequence[str], strategies: Sequence[str], seeds: Sequence[int], n_trials: int | None,
            size: Size, cache_dir: Path | None, console: Console) -> list[StudyResult]:
    """Every study of the comparison: the Ray ones (4 trials in flight) first, then the others
    (one trial at a time), two studies side by side (one per core)."""
    cores = os.cpu_count() or 1
    results: list[StudyResult] = []

    def done(result: StudyResult) -> None:
        results.append(result)
        console.print(
            f"  {result.space} {result.label}, seed {result.seed}: {len(result.trials)} trials "
            f"({result.pruned} pruned), {result.total():.0f} epochs in {result.wall_seconds:.0f} s, "
            f"best {result.final_best():.3g}"
        )

    jobs = [(space, strategy, seed) for seed in seeds for space in spaces for strategy in strategies
            if not (strategy == "presets" and not SPACES[space].presets)]
    grid_sizes = {space: n_grid(SPACES[space], n_trials) for space in spaces}
    with tempfile.TemporaryDirectory(prefix="lensnas-search-efficiency-") as tmp:
        folder = Path(tmp)
        cache_dir = cache_dir or folder / "cache"
        for seed in seeds:  # each replicate's data and bound once, before its studies share them
            spec = study_spec(folder, SPACES[spaces[0]], Strategy("grid"), seed, 1, size)
            spec.make_objective(cache_dir, progress=False).prepare()
        ray_jobs = [job for job in jobs if parse_strategy(job[1]).in_flight > 1]
        if ray_jobs:  # first: a Ray that cannot start fails the run before the long part
            import ray

            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
            try:
                for space, strategy, seed in ray_jobs:
                    done(run_study(folder, space, strategy, seed, grid_sizes[space], size, cache_dir))
            finally:
                ray.shutdown()
        local_jobs = [job for job in jobs if job not in ray_jobs]
        local_jobs.sort(key=lambda job: job[1] != "presets")  # the slowest trials first
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(cores, mp_context=context, initializer=_quiet_worker) as pool:
            futures = [pool.submit(run_study, folder, space, strategy, seed, grid_sizes[space],
                                   size, cache_dir) for space, strategy, seed in local_jobs]
            for future in as_completed(futures):
                done(future.result())
    order = {name: i for i, name in enumerate(strategies)}
    return sorted(results, key=lambda r: (spaces.index(r.space), order[r.strategy], r.seed))


def n_grid(space: Space, n_trials: int | None) -> int:
    """The grid combinations a space's studies get (its first ``n_trials``, default all)."""
    size = len(grid_combinations(space.grid))
    return size if n_trials is None else min(n_trials, size)


def grouped(results: Sequence[StudyResult], space: str) -> dict[str, list[StudyResult]]:
    """One space's results by strategy label, in the order given."""
    groups: dict[str, list[StudyResult]] = {}
    for result in results:
        if result.space == space:
            groups.setdefault(result.label, []).append(result)
    return groups


def report(results: list[StudyResult], console: Console) -> list[tuple[str, list[TableData], list[str]]]:
    """Print the comparison's tables and verdicts per space; returns them (for the HTML page)."""
    sections = []
    for space in dict.fromkeys(r.space for r in results):
        groups = grouped(results, space)
        grids = {r.seed: r for r in groups["grid"]}
        budget = next(iter(grids.values())).budget_epochs
        tables = [anytime_table(groups, budget, space)]
        table, reaches = reach_table(groups, grids, space)
        tables += [table, compute_table(groups, space)]
        ranking, not_best, not_flattest, excess = ranking_table(grids, space)
        tables.append(ranking)
        lines = []
        grid_final = statistics.median(g.final_best() for g in grids.values())
        for label in ("tpe+hyperband", "tpe"):
            if label in reaches:
                found = reaches[label]
                ends = statistics.median(r.final_best() for r in groups[label])
                lines.append(
                    f"{space}: {label} (one trial at a time) reached the grid's final best within a "
                    f"third of the grid's training epochs ({budget / 3:g}) in {found.within_third} of "
                    f"{len(found.epochs)} seeds, within all {budget} in "
                    f"{sum(e is not None for e in found.epochs)} of {len(found.epochs)}; at the "
                    f"grid's compute it ends at {ends:.3g} against the grid's {grid_final:.3g} "
                    f"(medians over seeds)."
                )
        if "random" in groups:
            lines.append(random_share_line(groups["random"], grids, space))
        if "presets" in groups:
            presets = [r.final_best() for r in groups["presets"]]
            lines.append(
                f"{space}: the best of ShearNet's presets ({', '.join(SPACES[space].presets)}), "
                f"trained with the same recipe: {spread(presets)} (median [min-max] over seeds), "
                f"against the grid's final best {grid_final:.3g} (median)."
            )
        lines.append(
            f"{space}: ShearNet's ranking (validation loss) picked a grid trial that is not the best "
            f"by test {METRIC} in {not_best} of {len(grids)} seeds, and not the one with the "
            f"smallest |m| in {not_flattest} of {len(grids)}; the picked trial's {METRIC} over the "
            f"grid's best: {spread(excess)}."
        )
        for table in tables:
            console.print()
            console.print(table.rich())
        console.print()
        for line in lines:
            console.print(line, markup=False, highlight=False)
        sections.append((space, tables, lines))
    return sections


def random_share_line(randoms: Sequence[StudyResult], grids: dict[int, StudyResult], space: str) -> str:
    """How rare a configuration as good as the grid's best is in the samplers' space: the share
    of the random strategy's complete trials (trained to the end) that reached it, per seed."""
    shares = []
    for result in randoms:
        values = [t.value for t in result.trials if t.state == "COMPLETE"]
        shares.append((sum(v <= grids[result.seed].final_best() for v in values), len(values)))
    total = sum(k for k, _ in shares) / max(sum(n for _, n in shares), 1)
    return (f"{space}: random configurations (trained to the end) as good as the grid's final best, "
            f"per seed: {', '.join(f'{k}/{n}' for k, n in shares)} ({total:.1%} of all).")


def curve_bands(results: Sequence[StudyResult], budget: int) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs 1..budget and the median, min and max over seeds of the best value at each (NaN
    where a seed has no complete trial yet)."""
    xs = list(range(1, budget + 1))
    median, low, high = [], [], []
    for x in xs:
        values = [best_at(r.curve(), x) for r in results]
        if any(math.isnan(v) for v in values):
            median.append(math.nan), low.append(math.nan), high.append(math.nan)
            continue
        median.append(statistics.median(values))
        low.append(min(values))
        high.append(max(values))
    return xs, median, low, high


COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692",
           "#b6e880", "#ff97ff", "#fecb52")  # plotly's default cycle, as the report's


def write_png(results: Sequence[StudyResult], path: Path) -> None:
    """The anytime curves with matplotlib: a panel per space, x epochs summed, y the best value
    (median line, min-max band over seeds), one colour per strategy."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = list(dict.fromkeys(r.space for r in results))
    figure, axes = plt.subplots(1, len(spaces), figsize=(7 * len(spaces), 5), squeeze=False)
    for axis, space in zip(axes[0], spaces):
        groups = grouped(results, space)
        budget = groups["grid"][0].budget_epochs
        for colour, (label, group) in zip(itertools.cycle(COLOURS), groups.items()):
            xs, median, low, high = curve_bands(group, budget)
            axis.step(xs, median, where="post", color=colour, label=label)
            axis.fill_between(xs, low, high, step="post", color=colour, alpha=0.15, linewidth=0)
        axis.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(plain)
        axis.set_xlabel("training epochs summed over trials")
        axis.set_ylabel(f"best test {METRIC}")
        axis.set_title(f"{space} ({len(groups['grid'])} seeds; line median, band min-max)")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_html(results: Sequence[StudyResult], sections: Sequence[tuple[str, list[TableData], list[str]]],
               header: str, path: Path) -> None:
    """The anytime curves (plotly, in the lensnas report's style) and the tables, as one page."""
    import plotly.graph_objects as go
    import plotly.offline

    from lensnas.objectives.report_html import STYLE, figure_html, html_table, note

    parts = ["<h1>Search efficiency: lensnas against ShearNet's grid, in training compute</h1>",
             note(header)]
    for space, tables, lines in sections:
        groups = grouped(results, space)
        budget = groups["grid"][0].budget_epochs
        figure = go.Figure()
        for colour, (label, group) in zip(itertools.cycle(COLOURS), groups.items()):
            xs, median, low, high = curve_bands(group, budget)
            figure.add_trace(go.Scatter(x=xs, y=high, line={"width": 0, "shape": "hv"},
                                        legendgroup=label, showlegend=False, hoverinfo="skip"))
            figure.add_trace(go.Scatter(x=xs, y=low, line={"width": 0, "shape": "hv"}, fill="tonexty",
                                        fillcolor=_transparent(colour), legendgroup=label,
                                        showlegend=False, hoverinfo="skip"))
            figure.add_trace(go.Scatter(x=xs, y=median, name=label, legendgroup=label,
                                        line={"color": colour, "shape": "hv"}))
        figure.update_layout(
            title=f"{space}: best {METRIC} against training compute (median, min-max over seeds)",
            xaxis_title="training epochs summed over trials", yaxis_title=f"best test {METRIC}",
            yaxis_type="log", template="plotly_white",
        )
        parts += [f"<h2>{html.escape(space)}</h2>", figure_html(figure, f"anytime-{space}")]
        for table in tables:
            parts += [f"<h3>{html.escape(table.title)}</h3>", html_table(table.header, table.rows)]
        parts += [f"<p>{html.escape(line)}</p>" for line in lines]
    path.write_text(
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>lensnas search efficiency</title>\n<style>{STYLE}</style>\n"
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>\n'
        "</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n",
        encoding="utf-8",
    )


def _transparent(colour: str, alpha: float = 0.15) -> str:
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def _json_ready(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_json(results: Sequence[StudyResult], settings: dict[str, Any], path: Path) -> None:
    """Every study's finished trials (compute and scores, completion order) and the run's settings."""
    studies = [asdict(r) for r in results]
    path.write_text(json.dumps(_json_ready({"settings": settings, "studies": studies}), indent=1,
                               allow_nan=False), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the comparison and print its tables (and write them with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a smaller objective ({QUICK.n_train} training galaxies, "
                        f"{QUICK.epochs} epochs) and 1 seed")
    parser.add_argument("--space", choices=(*SPACES, "both"), default="both",
                        help="the space searched (default both)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated sampler[:startup][+pruner][@4] (the grid is always run; :N sets TPE's or GP's n_startup_trials); "
                        f"default {','.join(STRATEGIES)}")
    parser.add_argument("--seeds", type=int, default=None, help="replicates (default 5; 1 with --quick)")
    parser.add_argument("--first-seed", type=int, default=1,
                        help="the first replicate's seed (default 1): fresh seeds confirm a choice "
                        "made on others")
    parser.add_argument("--trials", type=int, default=None,
                        help="the grid's first N combinations in its order (default all: 36 on "
                        "shearnet, 48 on architecture); the budget is N x epochs")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of a full trial")
    parser.add_argument("--n-train", type=int, default=None, help="training galaxies")
    parser.add_argument("--no-parallel", action="store_true",
                        help=f"skip the strategies with {IN_FLIGHT} trials in flight (Ray)")
    parser.add_argument("--cache-dir", default=None, help="dataset cache (default: a temporary folder)")
    parser.add_argument("--out", default=None,
                        help="folder for search_efficiency.png, .html and .json (raw per-trial results)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    try:
        strategies = [parse_strategy(s).name for s in args.strategies.split(",") if s.strip()]
    except ValueError as error:
        parser.error(str(error))
    strategies = list(dict.fromkeys(["grid", *strategies]))
    if args.no_parallel:
        strategies = [s for s in strategies if parse_strategy(s).in_flight == 1]
    size = QUICK if args.quick else FULL
    size = Size(args.n_train or size.n_train, size.n_validation, size.n_test, args.epochs or size.epochs)
    if (seeds < 1 or args.first_seed < 0 or (args.trials is not None and args.trials < 1)
            or size.epochs < 1 or size.n_train < 2):
        parser.error("--seeds, --trials and --epochs must be at least 1, --first-seed at least 0, "
                     "--n-train at least 2")
    spaces = list(SPACES) if args.space == "both" else [args.space]
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    console = Console(width=180, soft_wrap=True)  # tables at 180 columns; sentences unwrapped
    budgets = ", ".join(f"{s} {n_grid(SPACES[s], args.trials)} x {size.epochs} = "
                        f"{n_grid(SPACES[s], args.trials) * size.epochs}" for s in spaces)
    header = (
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; shear: "
        f"{size.n_train}/{size.n_validation}/{size.n_test} galaxies (train/validation/test), "
        f"25x25 stamps, {size.epochs} epochs a full trial; spaces {', '.join(spaces)}; budget "
        f"(grid trials x epochs): {budgets}; strategies {', '.join(strategies)}; {seeds} seeds "
        f"from {args.first_seed}. "
        f"Every trial of a seed trains from that seed: a configuration scores the same whichever "
        f"strategy proposes it."
    )
    console.print(header, markup=False, highlight=False)
    started = time.perf_counter()
    seed_list = list(range(args.first_seed, args.first_seed + seeds))
    results = run_all(spaces, strategies, seed_list, args.trials, size,
                      Path(args.cache_dir) if args.cache_dir else None, console)
    sections = report(results, console)
    trials = [t for r in results for t in r.trials]
    minutes = (time.perf_counter() - started) / 60
    console.print(
        f"\n{len(trials)} trials ({sum(t.state == 'PRUNED' for t in trials)} pruned, "
        f"{sum(t.state == 'FAIL' for t in trials)} failed) in {minutes:.1f} min; a complete trial "
        f"took {statistics.median(t.wall_seconds for t in trials if t.state == 'COMPLETE'):.1f} s "
        f"(median); load average {os.getloadavg()[0]:.1f} at the end"
    )
    if out is not None:
        settings = {"size": asdict(size), "spaces": spaces, "strategies": strategies, "seeds": seed_list,
                    "grid_trials": {s: n_grid(SPACES[s], args.trials) for s in spaces},
                    "minutes": minutes, "header": header}
        write_json(results, settings, out / "search_efficiency.json")
        write_png(results, out / "search_efficiency.png")
        write_html(results, sections, header, out / "search_efficiency.html")
        console.print(f"wrote {out / 'search_efficiency.png'}, .html and .json")


if __name__ == "__main__":
    main()
