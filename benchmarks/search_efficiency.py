"""Does Bayesian optimisation beat ShearNet's grid sweep and random search? Measured in one run.

    python -m benchmarks.search_efficiency [--quick] [--seeds 5] [--trials 36] [--no-parallel]

The space is ShearNet's example sweep (research/hyperparam_search/example_sweep.yaml of
s-Sayan/ShearNet): learning rate, batch size, weight decay and weight averaging (EMA) of its
small CNN, on the shear objective at a small size (25x25 stamps, cached data, seconds a
trial). Four samplers get the same space and the same budget (the grid's size):

- grid: ShearNet's layout, a few values per key and every combination in its order
  (itertools.product of the keys as listed), enqueued as the study's trials;
- random, tpe, gp: the lensnas samplers (``search/samplers.py``) over the same ranges, written
  as a lensnas user would: log-uniform learning rate and weight decay, the batch sizes and EMA
  settings as choices.

Every study is a real lensnas study (``lensnas.search.launch``: Optuna in SQLite under a
temporary folder). With one trial in flight the studies use the local executor (two studies
side by side, one per core); with 4 trials in flight, TPE (constant liar) and GP (q-batch
expected improvement over the running trials) use the Ray executor on a local Ray. All rank
trials by test RMSE over the Cramér-Rao bound (``rmse_over_crb``); the grid is also ranked as
ShearNet ranks it, by validation loss.

Noise: a trial's score depends on its training seed. Here every trial of a replicate trains
from the same seed (the study seed: same initial weights, same batch order), so a
configuration scores the same whichever sampler proposes it and trials differ by their
configuration only. Replicates (``--seeds``) differ in data, training seed and sampler seed.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lensnas.objectives import register_objective
from lensnas.objectives.shear.objective import ShearObjective
from lensnas.search.launch import launch
from lensnas.search.spec import StudySpec, spec_from_dict

METRIC = "rmse_over_crb"
# ShearNet's example sweep, in its order (its EMA null, off, is 0 here).
SHEARNET_GRID: dict[str, list[Any]] = {
    "learning_rate": [1.0e-3, 5.0e-4, 1.0e-4],
    "batch_size": [32, 64, 128],
    "weight_decay": [1.0e-4, 1.0e-5],
    "ema_decay": [0.0, 0.999],
}
# The same ranges as lensnas dimensions, for the samplers that choose.
SPACE: dict[str, Any] = {
    "width": 8,  # ShearNet's small CNN at half width, fixed (ShearNet's sweep fixes the network)
    "learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "weight_decay": {"type": "float", "low": 1.0e-5, "high": 1.0e-4, "log": True},
    "ema_decay": {"type": "categorical", "choices": [0.0, 0.999]},
}
SEQUENTIAL = ("grid", "random", "tpe", "gp")
PARALLEL = ("tpe", "gp")  # the samplers whose proposals depend on the trials still running
IN_FLIGHT = 4


@dataclass(frozen=True)
class Size:
    """The shear objective's size: galaxies per split and training epochs."""

    n_train: int
    n_validation: int
    n_test: int
    epochs: int


FULL = Size(n_train=2000, n_validation=300, n_test=500, epochs=4)
QUICK = Size(n_train=1000, n_validation=300, n_test=500, epochs=3)


class SharedSeedShear(ShearObjective):
    """The shear objective with one training seed for every trial of a study (the study seed),
    so that a configuration scores the same whichever sampler proposes it."""

    name = "shear_shared_seed"

    def run_trial(self, params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        """Train from the study seed instead of the per-trial seed; store it as training_seed."""
        ctx.seed = self.seed
        return {**super().run_trial(params, ctx), "training_seed": float(self.seed)}


register_objective(SharedSeedShear.name, SharedSeedShear)


def grid_combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in ShearNet's order (the last key varies fastest)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


GRID_SIZE = len(grid_combinations(SHEARNET_GRID))


def study_spec(folder: Path, sampler: str, seed: int, n_trials: int, size: Size) -> StudySpec:
    """The study of one sampler and replicate. The grid's sampler is never consulted: all of its
    trials are enqueued."""
    name = f"{sampler}-seed{seed}"
    raw = {
        "study": {
            "name": name, "objective": SharedSeedShear.name, "metrics": [METRIC],
            "sampler": "random" if sampler == "grid" else sampler, "pruner": "none",
            "n_trials": n_trials, "seed": seed,
        },
        "objective": {
            "n_train": size.n_train, "n_validation": size.n_validation, "n_test": size.n_test,
            "stamp_size": 25, "pixel_scale": 0.2, "reference": "none",
        },
        "training": {"epochs": size.epochs, "device": "cpu"},
        "space": SPACE,
    }
    return spec_from_dict(raw, folder / f"{name}.toml")


@dataclass(frozen=True)
class TrialResult:
    """What the comparison needs of one completed trial."""

    number: int
    value: float  # the study's metric, rmse_over_crb
    validation: float  # best per-epoch validation RMSE of g: orders trials as ShearNet's val loss
    abs_m: float
    seconds: float


@dataclass(frozen=True)
class StudyResult:
    """The completed trials of one study (by trial number) and how it ran."""

    sampler: str
    seed: int
    in_flight: int
    trials: list[TrialResult]
    failed: int
    wall_seconds: float

    @property
    def label(self) -> str:
        return self.sampler if self.in_flight == 1 else f"{self.sampler}, {self.in_flight} in flight"

    def best_after(self, n: int) -> float:
        """The best value among the first ``n`` completed trials."""
        values = [t.value for t in self.trials[:n]]
        return min(values) if values else math.nan

    def trials_to_reach(self, target: float) -> int | None:
        """How many trials (by number) until one scores ``target`` or better; None if none does."""
        for count, trial in enumerate(self.trials, start=1):
            if trial.value <= target:
                return count
        return None


def run_study(
    folder: Path, sampler: str, seed: int, n_trials: int, size: Size, cache_dir: Path,
    executor: str = "local",
) -> StudyResult:
    """Run one study through lensnas (SQLite under ``folder``) and read its trials back."""
    spec = study_spec(folder, sampler, seed, n_trials, size)
    in_flight = 1 if executor == "local" else IN_FLIGHT
    url = f"sqlite:///{folder}/{spec.name}-x{in_flight}.db"
    if sampler == "grid":
        study = optuna.create_study(study_name=spec.name, storage=url, direction="minimize")
        for index, params in enumerate(grid_combinations(SHEARNET_GRID)[:n_trials]):
            study.enqueue_trial(params, user_attrs={"grid_index": index})
    options: dict[str, Any] = {}
    if executor == "ray":
        options = {"cpus_per_trial": (os.cpu_count() or 1) / IN_FLIGHT, "max_concurrent": IN_FLIGHT}
    started = time.perf_counter()
    study = launch(spec, url, quiet=True, cache_dir=cache_dir, executor=executor, **options)
    wall = time.perf_counter() - started
    state = optuna.trial.TrialState
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [
        TrialResult(
            t.number, float(t.value), float(t.user_attrs["validation_score"]),
            float(t.user_attrs["abs_m"]), (t.datetime_complete - t.datetime_start).total_seconds(),
        )
        for t in trials if t.state == state.COMPLETE
    ]
    failed = sum(t.state == state.FAIL for t in trials)
    return StudyResult(sampler, seed, in_flight, complete, failed, wall)


def checkpoints(n_trials: int) -> list[int]:
    """The trial counts the table shows: two early ones, a third, half, two thirds, all."""
    marks = {5, 10, n_trials // 3, n_trials // 2, (2 * n_trials) // 3, n_trials}
    return sorted(m for m in marks if 1 <= m <= n_trials)


def spread(values: Sequence[float]) -> str:
    """'median [min-max]' of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    return f"{statistics.median(finite):.3g} [{min(finite):.3g}-{max(finite):.3g}]"


def best_value_table(groups: dict[str, list[StudyResult]], n_trials: int) -> Table:
    """Best value after N trials per sampler: median [min-max] over seeds."""
    marks = checkpoints(n_trials)
    seeds = len(next(iter(groups.values())))
    title = f"best {METRIC} after N trials: median [min-max] over {seeds} seeds"
    table = Table(title=escape(title), box=box.MARKDOWN)
    table.add_column("sampler")
    for mark in marks:
        table.add_column(f"N={mark}", justify="right")
    for name, results in groups.items():
        table.add_row(name, *(spread([r.best_after(m) for r in results]) for m in marks))
    return table


def reach_table(
    groups: dict[str, list[StudyResult]], grids: dict[int, StudyResult], n_trials: int
) -> tuple[Table, dict[str, list[int | None]]]:
    """Per sampler: the trials it needed to reach the grid's final best in each seed, how often
    within a third of the grid's trials, and the median ratio to the grid's trial count."""
    third = n_trials // 3
    table = Table(title=f"trials needed to reach the grid's final best (the grid used {n_trials})",
                  box=box.MARKDOWN)
    table.add_column("sampler")
    for column in ("per seed", f"within {third} (a third)", "median ratio"):
        table.add_column(column, justify="right")
    needed: dict[str, list[int | None]] = {}
    for name, results in groups.items():
        if name == "grid":
            continue
        counts = [r.trials_to_reach(grids[r.seed].best_after(n_trials)) for r in results]
        needed[name] = counts
        median = statistics.median([math.inf if c is None else c / n_trials for c in counts])
        within = sum(c is not None and c <= third for c in counts)
        table.add_row(
            name, ", ".join(f">{n_trials}" if c is None else str(c) for c in counts),
            f"{within}/{len(counts)}", ">1 (not reached)" if math.isinf(median) else f"{median:.2f}",
        )
    return table, needed


def ranking_table(grids: dict[int, StudyResult]) -> tuple[Table, int, int, list[float]]:
    """The grid's trial ShearNet's ranking picks (best validation loss) against the trial best by
    the test metric and the one with the smallest |m|; returns how often each differs and the
    picked trial's value over the best, per seed."""
    table = Table(title="grid: the trial ShearNet's ranking picks (best validation loss) and the "
                  "best by test metrics", box=box.MARKDOWN)
    for column in ("seed", "picked trial", f"its {METRIC}", f"best {METRIC} (trial)", "its |m|",
                   "smallest |m| (trial)"):
        table.add_column(column, justify="right")
    not_best = not_flattest = 0
    excess = []
    for seed, grid in sorted(grids.items()):
        picked = min(grid.trials, key=lambda t: t.validation)
        best = min(grid.trials, key=lambda t: t.value)
        flattest = min(grid.trials, key=lambda t: t.abs_m)
        not_best += picked.number != best.number
        not_flattest += picked.number != flattest.number
        excess.append(picked.value / best.value)
        table.add_row(
            str(seed), str(picked.number), f"{picked.value:.3g}", f"{best.value:.3g} ({best.number})",
            f"{picked.abs_m:.2g}", f"{flattest.abs_m:.2g} ({flattest.number})",
        )
    return table, not_best, not_flattest, excess


def _quiet_worker() -> None:
    """A process of the pool: one torch thread (as a Ray trial with a fraction of a CPU), no
    Optuna logs or warnings."""
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")


def run_all(seeds: list[int], n_trials: int, size: Size, parallel: bool, cache_dir: Path | None,
            console: Console) -> list[StudyResult]:
    """Every study of the comparison: the Ray ones (4 trials in flight), then the others (one
    trial at a time), two studies side by side."""
    cores = os.cpu_count() or 1
    results: list[StudyResult] = []

    def done(result: StudyResult) -> None:
        results.append(result)
        console.print(f"  {result.label}, seed {result.seed}: {len(result.trials)} trials in "
                      f"{result.wall_seconds:.0f} s, best {result.best_after(n_trials):.3g}")

    with tempfile.TemporaryDirectory(prefix="lensnas-search-efficiency-") as tmp:
        folder = Path(tmp)
        cache_dir = cache_dir or folder / "cache"
        for seed in seeds:  # each replicate's data and bound once, before its studies share them
            spec = study_spec(folder, "grid", seed, n_trials, size)
            spec.make_objective(cache_dir, progress=False).prepare()
        if parallel:  # first: a Ray that cannot start fails the run before the long part
            import ray

            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
            try:
                for seed in seeds:
                    for sampler in PARALLEL:
                        done(run_study(folder, sampler, seed, n_trials, size, cache_dir, "ray"))
            finally:
                ray.shutdown()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(cores, mp_context=context, initializer=_quiet_worker) as pool:
            jobs = [pool.submit(run_study, folder, sampler, seed, n_trials, size, cache_dir)
                    for seed in seeds for sampler in SEQUENTIAL]
            for job in as_completed(jobs):
                done(job.result())
    order = {name: i for i, name in enumerate((*SEQUENTIAL, *PARALLEL))}
    return sorted(results, key=lambda r: (r.in_flight, order[r.sampler], r.seed))


def report(results: list[StudyResult], n_trials: int, console: Console) -> None:
    """The comparison's tables and verdicts."""
    groups: dict[str, list[StudyResult]] = {}
    for result in results:
        groups.setdefault(result.label, []).append(result)
    grids = {r.seed: r for r in groups["grid"]}
    console.print()
    console.print(best_value_table(groups, n_trials))
    console.print()
    table, needed = reach_table(groups, grids, n_trials)
    console.print(table)
    tpe = needed["tpe"]
    within = sum(c is not None and c <= n_trials // 3 for c in tpe)
    reached = sum(c is not None for c in tpe)
    console.print(
        f"TPE (one trial at a time) reached the grid's final best within a third of the grid's "
        f"trials ({n_trials // 3}) in {within} of {len(tpe)} seeds, within all {n_trials} in "
        f"{reached} of {len(tpe)}."
    )
    console.print()
    table, not_best, not_flattest, excess = ranking_table(grids)
    console.print(table)
    console.print(
        f"ShearNet's ranking (validation loss) picked a trial that is not the best by test "
        f"{METRIC} in {not_best} of {len(grids)} seeds, and not the one with the smallest |m| "
        f"in {not_flattest} of {len(grids)}; the picked trial's {METRIC} over the grid's best: "
        f"{spread(excess)}."
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the comparison and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a smaller objective ({QUICK.n_train} training galaxies, "
                        f"{QUICK.epochs} epochs) and 2 seeds: under 10 minutes on 2 cores")
    parser.add_argument("--seeds", type=int, default=None, help="replicates (default 5; 2 with --quick)")
    parser.add_argument("--trials", type=int, default=GRID_SIZE,
                        help=f"trials per study (default: the grid's {GRID_SIZE}; fewer runs the "
                        "grid's first combinations in its order)")
    parser.add_argument("--no-parallel", action="store_true",
                        help=f"skip the studies with {IN_FLIGHT} trials in flight (Ray)")
    parser.add_argument("--cache-dir", default=None, help="dataset cache (default: a temporary folder)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if seeds < 1 or not 1 <= args.trials <= GRID_SIZE:
        parser.error(f"--seeds must be at least 1 and --trials in 1..{GRID_SIZE}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    size = QUICK if args.quick else FULL
    console = Console(width=160, soft_wrap=True)  # tables at 160 columns; sentences unwrapped
    console.print(
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; shear: "
        f"{size.n_train}/{size.n_validation}/{size.n_test} galaxies (train/validation/test), "
        f"25x25 stamps, {size.epochs} epochs, ShearNet's CNN at width 8; {args.trials} trials "
        f"per study, {seeds} seeds. Every trial of a seed trains from that seed: a configuration "
        f"scores the same whichever sampler proposes it."
    )
    started = time.perf_counter()
    results = run_all(list(range(1, seeds + 1)), args.trials, size, not args.no_parallel,
                      Path(args.cache_dir) if args.cache_dir else None, console)
    report(results, args.trials, console)
    seconds = [t.seconds for r in results for t in r.trials]
    console.print(
        f"\n{len(seconds)} trials ({sum(r.failed for r in results)} failed) in "
        f"{(time.perf_counter() - started) / 60:.1f} min; a trial took "
        f"{statistics.median(seconds):.1f} s (median); load average {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
