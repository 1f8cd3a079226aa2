"""Is a search's best network better than the grid's beyond its training seed? The configurations
``benchmarks.search_efficiency`` picked, trained again from fresh training seeds, in one run.

    python -m benchmarks.retrain_best RESULTS.json [RESULTS.json ...] [--strategy tpe+hyperband]
        [--training-seeds 4] [--cache-dir FOLDER] [--out FILE.json]

In ``search_efficiency`` every trial of a replicate trains from one seed (the replicate's), so a
configuration scores the same whichever strategy proposes it; but which configuration is best
then depends on that one training seed as well as on the configuration. Per space and replicate
of the results (each ``search_efficiency.json`` written with ``--out``), three configurations:

- ``grid``: the grid's best (its lowest test ``rmse_over_crb``);
- ``at a third``: the strategy's best within a third of the grid's training epochs;
- ``at the budget``: the strategy's best within the grid's training epochs;

each trained again, in one real lensnas study per replicate (SQLite under a temporary folder, the
local executor, the replicate's data from the cache), from the replicate's own training seed
(which must give the stored value again: the check that the rest is comparable) and from
``--training-seeds`` fresh ones (the same for every configuration, so differences are paired).
Printed per replicate: each configuration's mean test ``rmse_over_crb`` over the fresh seeds with
its standard error, and the paired difference of the strategy's configuration from the grid's
with its standard error: a difference beyond 2 standard errors is the configuration, one within
them may be the training seed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.table import Table

from benchmarks.search_efficiency import (
    SPACES,
    STATE,
    Size,
    Strategy,
    StudyResult,
    TrialCompute,
    _quiet_worker,
    anytime_curve,
    study_spec,
)
from lensnas.search.launch import launch

FRESH_SEED_BASE = 100_000  # fresh training seeds are 100001, 100002, ...: no replicate's own seed
PICKS = ("grid", "at a third", "at the budget")
SCORES = ("value", "validation", "abs_m")  # a trial's scores: NaN (JSON null) unless COMPLETE


@dataclass(frozen=True)
class Pick:
    """One configuration chosen by a strategy in one replicate, with its stored score."""

    space: str
    seed: int  # the replicate's seed: its data and the training seed of its search
    pick: str  # one of PICKS
    params: dict[str, Any]
    stored: float  # its test rmse_over_crb in the search


@dataclass(frozen=True)
class Retrained:
    """A pick's test rmse_over_crb from its replicate's training seed and from each fresh one."""

    pick: Pick
    original: float
    fresh: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.fresh)

    @property
    def standard_error(self) -> float:
        return statistics.stdev(self.fresh) / math.sqrt(len(self.fresh)) if len(self.fresh) > 1 else math.nan


def load_results(path: Path) -> list[StudyResult]:
    """The studies of one ``search_efficiency.json``; ValueError names the file and what is wrong."""
    try:
        studies = json.loads(path.read_text(encoding="utf-8"))["studies"]
        results = []
        for study in studies:
            trials = [TrialCompute(**{**t, **{k: math.nan for k in SCORES if t[k] is None}})
                      for t in study["trials"]]
            results.append(StudyResult(**{**study, "trials": trials}))
        return results
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a search_efficiency.json written with --out ({error})") from error


def best_trial_within(result: StudyResult, epochs: float) -> TrialCompute | None:
    """The study's best COMPLETE trial among those finished with at most ``epochs`` summed."""
    best = None
    for trial, (spent, _) in zip(result.trials, anytime_curve(result.trials)):
        if spent > epochs:
            break
        if math.isfinite(trial.value) and (best is None or trial.value < best.value):
            best = trial
    return best


def picks(results: Sequence[StudyResult], strategy: str) -> list[Pick]:
    """The three picks of every replicate that has both a grid study and a ``strategy`` one."""
    grids = {(r.space, r.seed): r for r in results if r.strategy == "grid"}
    chosen = []
    for result in results:
        grid = grids.get((result.space, result.seed))
        if result.strategy != strategy or grid is None:
            continue
        candidates = (best_trial_within(grid, grid.budget_epochs),
                      best_trial_within(result, result.budget_epochs / 3),
                      best_trial_within(result, result.budget_epochs))
        for name, trial in zip(PICKS, candidates):
            if trial is not None:
                chosen.append(Pick(result.space, result.seed, name, trial.params, trial.value))
    return chosen


def training_seeds(seed: int, n_fresh: int) -> list[int]:
    """The replicate's own training seed, then the fresh ones."""
    return [seed, *(FRESH_SEED_BASE + k for k in range(1, n_fresh + 1))]


def retrain_replicate(folder: Path, replicate: list[Pick], n_fresh: int, size: Size,
                      cache_dir: Path) -> list[Retrained]:
    """Train every distinct configuration of one replicate from each training seed, in one lensnas
    study (one trial per configuration and seed, enqueued), and read the scores back."""
    space, seed = SPACES[replicate[0].space], replicate[0].seed
    configurations = list({json.dumps(p.params, sort_keys=True): p.params for p in replicate}.values())
    seeds = training_seeds(seed, n_fresh)
    name = f"{space.name}-retrain-seed{seed}"
    spec = study_spec(folder, space, Strategy("grid"), seed, len(configurations) * len(seeds), size, name=name)
    url = f"sqlite:///{folder}/{name}.db"
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    for params in configurations:
        for training_seed in seeds:
            study.enqueue_trial(params, user_attrs={"training_seed": training_seed})
    launch(spec, url, quiet=True, cache_dir=cache_dir, executor="local")
    scores: dict[tuple[str, int], float] = {}
    for trial in optuna.load_study(study_name=name, storage=url).get_trials(states=(STATE.COMPLETE,)):
        key = json.dumps(trial.params, sort_keys=True)
        scores[key, int(trial.user_attrs["training_seed"])] = float(trial.value)
    retrained = []
    for pick in replicate:
        key = json.dumps(pick.params, sort_keys=True)
        values = [scores.get((key, s), math.nan) for s in seeds]
        retrained.append(Retrained(pick, values[0], values[1:]))
    return retrained


def retrain_all(chosen: Sequence[Pick], n_fresh: int, size: Size, cache_dir: Path | None,
                console: Console) -> list[Retrained]:
    """Every replicate's picks retrained, two replicates side by side (one per core)."""
    replicates: dict[tuple[str, int], list[Pick]] = {}
    for pick in chosen:
        replicates.setdefault((pick.space, pick.seed), []).append(pick)
    results: list[Retrained] = []
    with tempfile.TemporaryDirectory(prefix="lensnas-retrain-best-") as tmp:
        folder = Path(tmp)
        cache = cache_dir or folder / "cache"
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context, initializer=_quiet_worker) as pool:
            futures = [pool.submit(retrain_replicate, folder, replicate, n_fresh, size, cache)
                       for replicate in replicates.values()]
            for future in as_completed(futures):
                done = future.result()
                results.extend(done)
                console.print(f"  {done[0].pick.space}, seed {done[0].pick.seed}: "
                              + ", ".join(f"{r.pick.pick} {r.mean:.3g}" for r in done))
    return sorted(results, key=lambda r: (r.pick.space, r.pick.seed, PICKS.index(r.pick.pick)))


def paired_difference(strategy: Retrained, grid: Retrained) -> tuple[float, float]:
    """Mean and standard error of the strategy's minus the grid's score over the shared fresh seeds."""
    differences = [a - b for a, b in zip(strategy.fresh, grid.fresh)]
    mean = statistics.fmean(differences)
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    return mean, error


def verdict(difference: float, error: float) -> str:
    """'better', 'worse' (beyond 2 standard errors) or 'same' (within them)."""
    if not math.isfinite(error) or abs(difference) <= 2 * error:
        return "same"
    return "better" if difference < 0 else "worse"


def _mean_error(retrained: Retrained) -> str:
    return f"{retrained.mean:.3g} ± {retrained.standard_error:.2g}"


def report(retrained: Sequence[Retrained], strategy: str, console: Console) -> dict[str, dict[str, int]]:
    """Print one table per space; returns, per space and strategy pick, the count of replicates
    where it is better, the same or worse than the grid's pick on fresh seeds."""
    counts: dict[str, dict[str, int]] = {}
    for space in dict.fromkeys(r.pick.space for r in retrained):
        table = Table(title=f"{space}: grid's best and {strategy}'s, test rmse_over_crb retrained")
        for column in ("seed", "grid: stored (own seed, again)", "grid: fresh seeds",
                       "at a third: stored", "at a third: fresh", "at a third − grid",
                       "at the budget: stored", "at the budget: fresh", "at the budget − grid"):
            table.add_column(column, justify="right")
        for seed in dict.fromkeys(r.pick.seed for r in retrained if r.pick.space == space):
            row = {r.pick.pick: r for r in retrained if (r.pick.space, r.pick.seed) == (space, seed)}
            grid = row["grid"]
            cells = [str(seed), f"{grid.pick.stored:.4g} ({grid.original:.4g})", _mean_error(grid)]
            for name in PICKS[1:]:
                if name not in row:
                    cells += ["-", "-", "-"]
                    continue
                difference, error = paired_difference(row[name], grid)
                outcome = verdict(difference, error)
                counts.setdefault(space, {}).setdefault(f"{name}: {outcome}", 0)
                counts[space][f"{name}: {outcome}"] += 1
                cells += [f"{row[name].pick.stored:.4g} ({row[name].original:.4g})", _mean_error(row[name]),
                          f"{difference:+.3g} ± {error:.2g} ({outcome})"]
            table.add_row(*cells)
        console.print(table)
        console.print(f"{space}: " + "; ".join(f"{k} in {v}" for k, v in sorted(counts.get(space, {}).items())))
    return counts


def reproduced(retrained: Sequence[Retrained]) -> float:
    """The largest relative difference between a stored score and the same configuration trained
    again from the same seed (0: the search's numbers are reproduced exactly)."""
    return max((abs(r.original - r.pick.stored) / r.pick.stored for r in retrained), default=0.0)


def main(argv: list[str] | None = None) -> None:
    """Parse the options, retrain the picks and print the tables (and write them with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="search_efficiency.json files (written with --out)")
    parser.add_argument("--strategy", default="tpe+hyperband",
                        help="the strategy compared with the grid, as named in the results (default tpe+hyperband)")
    parser.add_argument("--training-seeds", type=int, default=4, help="fresh training seeds (default 4, at least 2)")
    parser.add_argument("--cache-dir", default=None,
                        help="dataset cache (the search's, to skip simulating again; default a temporary folder)")
    parser.add_argument("--out", default=None, help="a JSON file for every retrained score")
    args = parser.parse_args(argv)
    if args.training_seeds < 2:
        parser.error("--training-seeds: at least 2 (a standard error needs two)")
    results, sizes = [], set()
    for name in args.results:
        try:
            results += load_results(Path(name))
            sizes.add(json.dumps(json.loads(Path(name).read_text(encoding="utf-8"))["settings"]["size"]))
        except (ValueError, KeyError) as error:
            parser.error(str(error))
    if len(sizes) != 1:
        parser.error(f"the results were run at different sizes: {sorted(sizes)}")
    size = Size(**json.loads(sizes.pop()))
    chosen = picks(results, args.strategy)
    if not chosen:
        strategies = sorted({r.strategy for r in results})
        parser.error(f"--strategy {args.strategy}: no replicate has both it and the grid; the results hold {strategies}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    console = Console(width=180, soft_wrap=True)
    replicates = sorted({(p.space, p.seed) for p in chosen})
    console.print(f"{len(replicates)} replicates, {len(chosen)} picks; each trained from its replicate's "
                  f"seed and {args.training_seeds} fresh ones ({size.n_train} training galaxies, "
                  f"{size.epochs} epochs)", markup=False, highlight=False)
    started = time.perf_counter()
    retrained = retrain_all(chosen, args.training_seeds, size,
                            Path(args.cache_dir) if args.cache_dir else None, console)
    counts = report(retrained, args.strategy, console)
    worst = reproduced(retrained)
    minutes = (time.perf_counter() - started) / 60
    console.print(f"stored scores trained again from the same seed: largest relative difference {worst:.2g}; "
                  f"{minutes:.1f} min", markup=False, highlight=False)
    if args.out:
        payload = {"strategy": args.strategy, "size": asdict(size), "training_seeds": args.training_seeds,
                   "minutes": minutes, "counts": counts,
                   "retrained": [{**asdict(r.pick), "original": r.original, "fresh": r.fresh} for r in retrained]}
        Path(args.out).write_text(json.dumps(payload, indent=1), encoding="utf-8")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
