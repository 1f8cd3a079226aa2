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
with its standard error: ``better`` or ``worse`` when the 95% interval of the difference
(Student's t, fresh seeds - 1 degrees of freedom) excludes 0, the configuration; ``same`` when it
holds 0, which the training seed alone may explain.

It also reads a ``warm_start`` JSON (``--out`` of ``benchmarks.warm_start``, this version): the
final best of its cold, copy and top3 studies per replicate, compared with the cold one's.
"""

from __future__ import annotations

import argparse
import dataclasses
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
import scipy.stats
from rich.console import Console
from rich.table import Table

from benchmarks.search_efficiency import (
    FULL,
    QUICK,
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
SEARCH_PICKS = ("grid", "at a third", "at the budget")
WARM_START_PICKS = ("cold", "copy", "top3")
SCORES = ("value", "validation", "abs_m")  # a trial's scores: NaN (JSON null) unless COMPLETE


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (NaN from fewer than two values)."""
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), error


@dataclass(frozen=True)
class Pick:
    """One configuration chosen in one replicate, with its stored score."""

    space: str
    seed: int  # the replicate's seed: its data and the training seed of its studies
    pick: str  # one of SEARCH_PICKS or WARM_START_PICKS; the first is the replicate's baseline
    params: dict[str, Any]
    stored: float  # its test rmse_over_crb where it was found


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
        return mean_and_error(self.fresh)[1]


def search_results(studies: list[dict[str, Any]]) -> list[StudyResult]:
    """The studies of a ``search_efficiency.json`` as the benchmark held them."""
    results = []
    for study in studies:
        trials = [TrialCompute(**{**t, **{k: math.nan for k in SCORES if t[k] is None}})
                  for t in study["trials"]]
        results.append(StudyResult(**{**study, "trials": trials}))
    return results


def best_trial_within(result: StudyResult, epochs: float) -> TrialCompute | None:
    """The study's best COMPLETE trial among those finished with at most ``epochs`` summed."""
    best = None
    for trial, (spent, _) in zip(result.trials, anytime_curve(result.trials)):
        if spent > epochs:
            break
        if math.isfinite(trial.value) and (best is None or trial.value < best.value):
            best = trial
    return best


def search_picks(results: Sequence[StudyResult], strategy: str) -> list[Pick]:
    """The grid's best and the strategy's at a third and at the budget, in every replicate that
    has both a grid study and a ``strategy`` one."""
    grids = {(r.space, r.seed): r for r in results if r.strategy == "grid"}
    chosen = []
    for result in results:
        grid = grids.get((result.space, result.seed))
        if result.strategy != strategy or grid is None:
            continue
        candidates = (best_trial_within(grid, grid.budget_epochs),
                      best_trial_within(result, result.budget_epochs / 3),
                      best_trial_within(result, result.budget_epochs))
        for name, trial in zip(SEARCH_PICKS, candidates):
            if trial is not None:
                chosen.append(Pick(result.space, result.seed, name, trial.params, trial.value))
    return chosen


def warm_start_picks(results: list[dict[str, Any]]) -> list[Pick]:
    """Each replicate's final best of the cold, copy and top3 studies of a ``warm_start`` JSON
    (a same-data copy's best may be one of its copied trials, whose values are exact)."""
    chosen = []
    for result in results:
        for name in WARM_START_PICKS:
            found = list(zip(result[name], result[f"{name}_params"]))
            if name == "copy" and result["same_data"]:
                found += zip(result["source"], result["source_params"])
            value, params = min(found, key=lambda pair: pair[0])
            chosen.append(Pick(result["space"], result["seed"], name, params, value))
    return chosen


def load_picks(path: Path, strategy: str) -> tuple[list[Pick], Size]:
    """The picks of a ``search_efficiency.json`` (against ``strategy``) or a ``warm_start`` JSON,
    and the objective's size; ValueError names the file and what is wrong."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if "studies" in payload:
            return search_picks(search_results(payload["studies"]), strategy), Size(**payload["settings"]["size"])
        return warm_start_picks(payload["results"]), QUICK if payload["settings"]["quick"] else FULL
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a search_efficiency.json or warm_start JSON written by this "
                         f"version's --out ({type(error).__name__}: {error})") from error


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
    spec = dataclasses.replace(study_spec(folder, space, Strategy("grid"), seed, len(configurations) * len(seeds),
                                          size), name=name)
    url = f"sqlite:///{folder}/{name}.db"
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    for params in configurations:
        for training_seed in seeds:
            study.enqueue_trial(params, user_attrs={"training_seed": training_seed})
    study = launch(spec, url, quiet=True, cache_dir=cache_dir, executor="local")
    scores: dict[tuple[str, int], float] = {}
    for trial in study.get_trials(states=(STATE.COMPLETE,)):
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
    order = {(p.space, p.seed, p.pick): index for index, p in enumerate(chosen)}
    return sorted(results, key=lambda r: order[r.pick.space, r.pick.seed, r.pick.pick])


def paired_difference(pick: Retrained, baseline: Retrained) -> tuple[float, float]:
    """Mean and standard error of the pick's minus the baseline's score over the shared fresh seeds."""
    return mean_and_error([a - b for a, b in zip(pick.fresh, baseline.fresh)])


def verdict(difference: float, error: float, pairs: int) -> str:
    """'better' or 'worse' when the 95% t interval of a mean ``difference`` with standard error
    ``error`` over ``pairs`` pairs excludes 0, else 'same'."""
    if pairs < 2 or not math.isfinite(error) or abs(difference) <= scipy.stats.t.ppf(0.975, pairs - 1) * error:
        return "same"
    return "better" if difference < 0 else "worse"


def _mean_error(retrained: Retrained) -> str:
    return f"{retrained.mean:.3g} ± {retrained.standard_error:.2g}"


def report(retrained: Sequence[Retrained], console: Console) -> dict[str, dict[str, int]]:
    """Print one table per space, a row per replicate, its baseline (grid or cold) first; returns,
    per space, how many replicates each other pick is better, the same or worse than the baseline
    on the fresh seeds."""
    counts: dict[str, dict[str, int]] = {}
    for space in dict.fromkeys(r.pick.space for r in retrained):
        rows: dict[int, list[Retrained]] = {}
        for result in retrained:
            if result.pick.space == space:
                rows.setdefault(result.pick.seed, []).append(result)
        names = list(dict.fromkeys(r.pick.pick for row in rows.values() for r in row))
        baseline_name = names[0]
        table = Table(title=f"{space}: test rmse_over_crb of each pick, stored (trained again from the "
                      f"same seed) and mean ± standard error over fresh training seeds")
        table.add_column("seed", justify="right")
        for name in names:
            table.add_column(f"{name}: stored (again)", justify="right")
            table.add_column(f"{name}: fresh", justify="right")
            if name != baseline_name:
                table.add_column(f"{name} − {baseline_name}", justify="right")
        for seed, row in rows.items():
            by_name = {r.pick.pick: r for r in row}
            baseline = by_name.get(baseline_name)
            cells = [str(seed)]
            for name in names:
                result = by_name.get(name)
                if result is None:
                    cells += ["-", "-"] if name == baseline_name else ["-", "-", "-"]
                    continue
                cells += [f"{result.pick.stored:.4g} ({result.original:.4g})", _mean_error(result)]
                if name == baseline_name:
                    continue
                if baseline is None:
                    cells.append("-")
                    continue
                difference, error = paired_difference(result, baseline)
                outcome = verdict(difference, error, len(result.fresh))
                key = f"{name}: {outcome}"
                counts.setdefault(space, {})[key] = counts.get(space, {}).get(key, 0) + 1
                cells.append(f"{difference:+.3g} ± {error:.2g} ({outcome})")
            table.add_row(*cells)
        console.print(table)
        console.print(f"{space}, against {baseline_name} on fresh training seeds: "
                      + "; ".join(f"{k} in {v}" for k, v in sorted(counts.get(space, {}).items())),
                      markup=False, highlight=False)
        for name in names[1:]:
            console.print(f"  {summary_line(rows, name, baseline_name)}", markup=False, highlight=False)
    return counts


def summary_line(rows: dict[int, list[Retrained]], name: str, baseline_name: str) -> str:
    """Over the replicates: the mean paired difference of ``name`` from the baseline (each
    replicate's mean over its fresh seeds, t interval over replicates), both picks' median
    fresh-seed score and how much lower their stored scores were."""
    pairs = []
    for row in rows.values():
        by_name = {r.pick.pick: r for r in row}
        if name in by_name and baseline_name in by_name:
            pairs.append((by_name[name], by_name[baseline_name]))
    differences = [paired_difference(pick, baseline)[0] for pick, baseline in pairs]
    if not differences:
        return f"{name}: no replicate has it and {baseline_name}"
    mean, error = mean_and_error(differences)
    optimism = {label: statistics.median(r.mean / r.pick.stored for r in picked)
                for label, picked in ((name, [p for p, _ in pairs]), (baseline_name, [b for _, b in pairs]))}
    return (f"{name} − {baseline_name} over {len(differences)} replicates: {mean:+.3g} ± {error:.2g} "
            f"({verdict(mean, error, len(differences))}); median fresh-seed score {name} "
            f"{statistics.median(p.mean for p, _ in pairs):.3g}, {baseline_name} "
            f"{statistics.median(b.mean for _, b in pairs):.3g}; fresh-seed over stored score (median) "
            f"{optimism[name]:.2f} and {optimism[baseline_name]:.2f}")


def reproduced(retrained: Sequence[Retrained]) -> float:
    """The largest relative difference between a stored score and the same configuration trained
    again from the same seed (0: the search's numbers are reproduced exactly)."""
    return max((abs(r.original - r.pick.stored) / r.pick.stored for r in retrained), default=0.0)


def main(argv: list[str] | None = None) -> None:
    """Parse the options, retrain the picks and print the tables (and write them with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+",
                        help="search_efficiency.json or warm_start JSON files (written with --out)")
    parser.add_argument("--strategy", default="tpe+hyperband",
                        help="the strategy compared with the grid, as named in the results (default tpe+hyperband)")
    parser.add_argument("--training-seeds", type=int, default=4, help="fresh training seeds (default 4, at least 2)")
    parser.add_argument("--cache-dir", default=None,
                        help="dataset cache (the search's, to skip simulating again; default a temporary folder)")
    parser.add_argument("--out", default=None, help="a JSON file for every retrained score")
    args = parser.parse_args(argv)
    if args.training_seeds < 2:
        parser.error("--training-seeds: at least 2 (a standard error needs two)")
    chosen: list[Pick] = []
    sizes = set()
    for name in args.results:
        try:
            found, size = load_picks(Path(name), args.strategy)
        except ValueError as error:
            parser.error(str(error))
        chosen += found
        sizes.add(size)
    if len(sizes) != 1:
        parser.error(f"the results were run at different sizes: {sorted(map(str, sizes))}")
    size = sizes.pop()
    if not chosen:
        held = sorted({study["strategy"] for name in args.results
                       for study in json.loads(Path(name).read_text(encoding="utf-8")).get("studies", [])})
        parser.error(f"--strategy {args.strategy}: no replicate has both it and the grid in "
                     f"{', '.join(args.results)}; they hold {', '.join(held) or 'no search studies'}")
    if len({(p.space, p.seed, p.pick) for p in chosen}) != len(chosen):
        parser.error("the same replicate is in two of the results files")
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
    counts = report(retrained, console)
    worst = reproduced(retrained)
    minutes = (time.perf_counter() - started) / 60
    console.print(f"stored scores trained again from the same seed: largest relative difference {worst:.2g}; "
                  f"{minutes:.1f} min", markup=False, highlight=False)
    if args.out:
        payload = {"results": args.results, "strategy": args.strategy, "size": asdict(size), "training_seeds": args.training_seeds,
                   "minutes": minutes, "counts": counts,
                   "retrained": [{**asdict(r.pick), "original": r.original, "fresh": r.fresh} for r in retrained]}
        Path(args.out).write_text(json.dumps(payload, indent=1), encoding="utf-8")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
