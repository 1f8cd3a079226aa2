"""Does a warm start save trials? A TPE study started from an earlier study against the same
study started cold, in one run.

    python -m benchmarks.warm_start [--quick] [--space architecture|shearnet] [--seeds 5]
        [--source-trials 12] [--trials 24] [--same-data] [--out FILE.json]

Per replicate (seed s), three kinds of real lensnas studies in one SQLite file, on the shear
objective of ``benchmarks.search_efficiency`` (same spaces, same sizes, one training seed per
study so that a configuration scores the same whichever trial proposes it):

- ``source``: an earlier TPE study of the same space with another seed (s + 1000: other data,
  training seed and sampler seed), ``--source-trials`` trials: what a user has from yesterday;
  with ``--same-data``, a random search on seed s itself (its values are exact here: an
  exploratory study continued by TPE);
- ``cold``: TPE, seed s, ``--trials`` trials;
- ``copy``: TPE, seed s, ``warm_start = [source]`` (the source's trials copied with their
  values, which TPE sees), then ``--trials`` new trials;
- ``top3``: TPE, seed s, ``warm_start_top = 3`` (the source's best 3 configurations enqueued and
  trained here first), ``--trials`` new trials in all.

Measured: the new trials each warm study needs until its best test ``rmse_over_crb`` reaches
the cold study's final best, against the trials the cold study needed to reach it (the index of
its best trial, counted from 1); and, paired per seed, each study's best after 6, 12 and all new
trials. A copy's best is over its new trials only when the source ran on other data (its copied
values were measured there); with ``--same-data`` the copied values are exact and count (a copy
whose source already beat the cold study's best needs 0 new trials). Copied trials cost nothing
here; they were paid for by the source study.
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
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from benchmarks.search_efficiency import (
    FULL,
    QUICK,
    SPACES,
    STATE,
    Size,
    _quiet_worker,
    parse_strategy,
    study_spec,
)
from lensnas.search.launch import launch
from lensnas.search.study import WARM_START_FROM

SOURCE_SEED_OFFSET = 1000
KINDS = ("cold", "copy", "top3")
NO_BUDGET = 10**6  # study_spec's grid size: its epoch budget is then never reached


def new_trials(study: optuna.Study, copied: int = 0) -> list[optuna.trial.FrozenTrial]:
    """The study's COMPLETE trials run here, in completion order: all but its first ``copied``
    trials (the copied ones; enqueued top-K trials are run here and count)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(STATE.COMPLETE,))
              if t.number >= copied]
    return sorted(trials, key=lambda t: (t.datetime_complete, t.number))


def new_values(study: optuna.Study, copied: int = 0) -> list[float]:
    """Test values of the study's trials run here (:func:`new_trials`), in completion order."""
    return [float(t.value) for t in new_trials(study, copied)]


def architectures(params: list[dict[str, Any]]) -> int:
    """Distinct networks among parameter sets: every parameter but the learning rate."""
    return len({tuple(sorted((k, v) for k, v in p.items() if k != "learning_rate")) for p in params})


def trials_to_reach(values: list[float], target: float, known: float = math.inf) -> int | None:
    """How many trials (from 1) until the best of ``values`` is ``target`` or better; 0 when
    ``known``, the best value the study already had before them, is."""
    if known <= target:
        return 0
    for index, value in enumerate(values):
        if value <= target:
            return index + 1
    return None


def run_seed(folder: Path, space_name: str, seed: int, source_trials: int, trials: int,
             size: Size, cache_dir: Path, same_data: bool = False) -> dict[str, Any]:
    """The source, cold, copy and top3 studies of one replicate; their new trials' values.
    ``same_data``: the source is a random-search study on this replicate's own data and
    training seed (its copied values are exact here), else a TPE study of another seed."""
    space, tpe = SPACES[space_name], parse_strategy("tpe")
    url = f"sqlite:///{folder}/warm-start-seed{seed}.db"
    if same_data:
        source = study_spec(folder, space, parse_strategy("random"), seed, NO_BUDGET, size)
    else:
        source = study_spec(folder, space, tpe, seed + SOURCE_SEED_OFFSET, NO_BUDGET, size)
    source = dataclasses.replace(source, name=f"source-seed{seed}", n_trials=source_trials)
    source_study = launch(source, url, quiet=True, cache_dir=cache_dir)
    base = study_spec(folder, space, tpe, seed, NO_BUDGET, size)
    specs = {
        "cold": dataclasses.replace(base, name=f"cold-seed{seed}", n_trials=trials),
        "copy": dataclasses.replace(base, name=f"copy-seed{seed}", n_trials=source_trials + trials,
                                    warm_start=(source.name,)),
        "top3": dataclasses.replace(base, name=f"top3-seed{seed}", n_trials=trials,
                                    warm_start=(source.name,), warm_start_top=3),
    }
    values = {"source": new_values(source_study),
              "source_params": [t.params for t in new_trials(source_study)]}
    for kind, spec in specs.items():
        study = launch(spec, url, quiet=True, cache_dir=cache_dir)
        copied = sum(WARM_START_FROM in t.user_attrs for t in study.trials) if kind == "copy" else 0
        values[kind] = new_values(study, copied)
        values[f"{kind}_params"] = [t.params for t in new_trials(study, copied)]
    return {"seed": seed, "space": space_name, "same_data": same_data, **values}


def known_best(result: dict[str, Any], kind: str) -> float:
    """The best value a study held before its new trials: the copied source's on the same data
    (exact there), else none."""
    return min(result["source"]) if kind == "copy" and result.get("same_data") else math.inf


def best_after(result: dict[str, Any], kind: str, trials: int) -> float:
    """The study's best after its first ``trials`` new trials (what it knew before included)."""
    return min([known_best(result, kind), *result[kind][:trials]])


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per replicate: the cold final best and the trials each study needed to reach it."""
    target = min(result["cold"])
    return {"seed": result["seed"], "cold_best": target,
            **{f"{kind}_best": best_after(result, kind, len(result[kind])) for kind in KINDS},
            **{f"{kind}_trials": trials_to_reach(result[kind], target, known_best(result, kind))
               for kind in KINDS}}


def fewer_trials(results: list[dict[str, Any]], kind: str, trials: int) -> int:
    """Seeds where, had every study run only its first ``trials`` new trials (TPE's proposals do
    not depend on n_trials), ``kind`` reached the cold study's final best in fewer of them."""
    count = 0
    for result in results:
        row = summarise({**result, **{k: result[k][:trials] for k in KINDS}})
        needed = row[f"{kind}_trials"]
        count += needed is not None and needed < row["cold_trials"]
    return count


def run_all(space: str, seeds: list[int], source_trials: int, trials: int, size: Size,
            console: Console, same_data: bool = False) -> list[dict[str, Any]]:
    """Every replicate, two side by side (one per core), sharing one dataset cache."""
    results = []
    with tempfile.TemporaryDirectory(prefix="lensnas-warm-start-") as tmp:
        folder = Path(tmp)
        cache_dir = folder / "cache"
        for seed in seeds:  # each seed's data once, before the studies share it
            for data_seed in (seed, seed + SOURCE_SEED_OFFSET):
                spec = study_spec(folder, SPACES[space], parse_strategy("tpe"), data_seed, 1, size)
                spec.make_objective(cache_dir, progress=False).prepare()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context,
                                 initializer=_quiet_worker) as pool:
            futures = [pool.submit(run_seed, folder, space, seed, source_trials, trials, size,
                                   cache_dir, same_data) for seed in seeds]
            for future in as_completed(futures):
                result = future.result()
                row = summarise(result)
                console.print(f"  seed {row['seed']}: cold best {row['cold_best']:.3g} after "
                              f"{row['cold_trials']} trials; copy {row['copy_trials']}, top3 "
                              f"{row['top3_trials']} new trials to reach it")
                results.append(result)
    return sorted(results, key=lambda r: r["seed"])


def report(results: list[dict[str, Any]], trials: int, console: Console) -> None:
    """How many new trials each warm start needed to reach the cold study's final best."""
    rows = [summarise(result) for result in results]
    for kind in ("copy", "top3"):
        needed = [math.inf if row[f"{kind}_trials"] is None else row[f"{kind}_trials"] for row in rows]
        cold = [row["cold_trials"] for row in rows]
        fewer = sum(n < c for n, c in zip(needed, cold))
        middle = statistics.median(needed)
        console.print(
            f"{kind}: reached the cold study's final best in fewer trials than the cold study in "
            f"{fewer} of {len(rows)} seeds; new trials needed {[n if math.isfinite(n) else '>' + str(trials) for n in needed]} "
            f"(median {middle if math.isfinite(middle) else '>' + str(trials)}) against the cold "
            f"study's {cold} (median {statistics.median(cold)}); final best median "
            f"{statistics.median(row[f'{kind}_best'] for row in rows):.3g} against "
            f"{statistics.median(row['cold_best'] for row in rows):.3g}")
        if all(f"{kind}_params" in result for result in results):
            distinct = [architectures(result[f"{kind}_params"]) for result in results]
            cold_distinct = [architectures(result["cold_params"]) for result in results]
            console.print(f"  distinct networks among the new trials: {kind} median "
                          f"{statistics.median(distinct)} {distinct}, cold "
                          f"{statistics.median(cold_distinct)} {cold_distinct}")
        for after in sorted({6, 12, trials} & set(range(1, trials + 1))):
            warm = [best_after(result, kind, after) for result in results]
            cold_after = [best_after(result, "cold", after) for result in results]
            console.print(
                f"  after {after} new trials: {kind} at least as good as cold in "
                f"{sum(w <= c for w, c in zip(warm, cold_after))} of {len(rows)} seeds; median best "
                f"{statistics.median(warm):.3g} against {statistics.median(cold_after):.3g}; in "
                f"studies of {after} trials, it reached the cold study's final best in fewer "
                f"trials in {fewer_trials(results, kind, after)} of {len(rows)} seeds")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the smaller objective of search_efficiency --quick")
    parser.add_argument("--space", choices=sorted(SPACES), default="architecture")
    parser.add_argument("--seeds", type=int, default=5, help="replicates (default 5)")
    parser.add_argument("--source-trials", type=int, default=12,
                        help="trials of the earlier study (default 12)")
    parser.add_argument("--trials", type=int, default=24, help="new trials a study runs (default 24)")
    parser.add_argument("--same-data", action="store_true",
                        help="the earlier study is a random search on the same data and training "
                        "seed (its values are exact here) instead of a TPE study of another seed")
    parser.add_argument("--out", type=Path, help="JSON of every study's new trial values")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.source_trials < 3 or args.trials < 1:
        parser.error("--seeds and --trials must be at least 1, --source-trials at least 3")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    console = Console()
    size = QUICK if args.quick else FULL
    console.print(f"warm start on the {args.space} space: {args.seeds} seeds, source "
                  f"{args.source_trials} trials ({'random, same data' if args.same_data else 'TPE, other data'}), "
                  f"{args.trials} new trials a study, "
                  f"{size.n_train} training galaxies, {size.epochs} epochs a trial")
    results = run_all(args.space, list(range(args.seeds)), args.source_trials, args.trials, size,
                      console, args.same_data)
    report(results, args.trials, console)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
