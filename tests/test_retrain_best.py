"""benchmarks.retrain_best: the picks on hand-made studies, paired differences, and a tiny real
run: a search's configuration trained again from its own seed gives its stored score, from fresh
seeds other scores, and the command reads a search_efficiency.json and prints its table."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import retrain_best as rb
from benchmarks import search_efficiency as se

ROOT = Path(__file__).resolve().parents[1]
TINY = se.Size(n_train=200, n_validation=100, n_test=100, epochs=2)


def _trial(number: int, epochs: int, value: float = math.nan) -> se.TrialCompute:
    state = "COMPLETE" if math.isfinite(value) else "PRUNED"
    return se.TrialCompute(number, state, epochs, 1.0, 1.0, value, value, 0.01,
                           params={"learning_rate": number / 1000})


def _study(strategy: str, trials: list[se.TrialCompute], seed: int = 1) -> se.StudyResult:
    return se.StudyResult("shearnet", strategy, strategy, seed, 1, 12, trials, 1.0)


def test_picks_are_the_grids_best_and_the_strategys_best_at_a_third_and_at_the_budget():
    grid = _study("grid", [_trial(i, 3, v) for i, v in enumerate((9.0, 6.0, 8.0, 7.0))])
    search = _study("tpe+hyperband", [_trial(10, 1), _trial(11, 3, 7.5), _trial(12, 3, 8.0),
                                      _trial(13, 3, 5.0), _trial(14, 3, 4.0)])  # 14: past 12 epochs
    other_seed = _study("tpe+hyperband", [_trial(20, 3, 1.0)], seed=2)  # no grid on seed 2
    chosen = {p.pick: p for p in rb.search_picks([grid, search, other_seed], "tpe+hyperband")}
    assert set(chosen) == set(rb.SEARCH_PICKS)
    assert (chosen["grid"].stored, chosen["grid"].params) == (6.0, {"learning_rate": 0.001})
    assert (chosen["at a third"].stored, chosen["at the budget"].stored) == (7.5, 5.0)
    assert rb.search_picks([grid, search], "tpe") == []


def test_warm_start_picks_are_each_studys_final_best_a_same_data_copy_counting_its_copies():
    result = {"space": "architecture", "seed": 4, "same_data": True,
              "source": [5.0, 9.0], "source_params": [{"depth": 1}, {"depth": 2}],
              "cold": [8.0, 6.0], "cold_params": [{"depth": 3}, {"depth": 4}],
              "copy": [7.0], "copy_params": [{"depth": 5}],
              "top3": [4.0, 5.0], "top3_params": [{"depth": 1}, {"depth": 6}]}
    chosen = rb.warm_start_picks([result])
    assert [(p.pick, p.stored, p.params) for p in chosen] == [
        ("cold", 6.0, {"depth": 4}), ("copy", 5.0, {"depth": 1}), ("top3", 4.0, {"depth": 1})]
    other_data = rb.warm_start_picks([{**result, "same_data": False}])
    assert (other_data[1].stored, other_data[1].params) == (7.0, {"depth": 5})  # copies measured elsewhere


def test_paired_differences_and_their_verdicts():
    pick = rb.Pick("shearnet", 1, "grid", {}, 10.0)
    grid = rb.Retrained(pick, 10.0, [10.0, 12.0, 11.0, 13.0])
    better = rb.Retrained(pick, 9.0, [9.0, 11.1, 9.9, 12.0])  # about 1 lower on every seed
    difference, error = rb.paired_difference(better, grid)
    assert difference == pytest.approx(-1.0) and error < 0.1
    assert rb.verdict(difference, error, 4) == "better"
    assert rb.verdict(1.0, 0.2, 4) == "worse" and rb.verdict(-0.3, 0.2, 4) == "same"
    assert rb.verdict(0.5, 0.2, 4) == "same" and rb.verdict(0.5, 0.2, 30) == "worse"  # t: 3.18 vs 2.05
    assert grid.mean == 11.5 and grid.standard_error == pytest.approx(math.sqrt(5 / 3) / 2)


def test_the_summary_is_over_replicates_with_a_t_interval():
    def retrained(seed: int, name: str, stored: float, fresh: list[float]) -> rb.Retrained:
        return rb.Retrained(rb.Pick("architecture", seed, name, {}, stored), stored, fresh)

    rows = {seed: [retrained(seed, "grid", 10.0, [20.0 + seed, 22.0 + seed]),
                   retrained(seed, "at a third", 10.0, [15.0 + seed, 17.0 + seed])]
            for seed in (1, 2, 3)}  # 5 lower on every fresh seed of every replicate
    line = rb.summary_line(rows, "at a third", "grid")
    assert line.startswith("at a third − grid over 3 replicates: -5 ± 0 (better)")  # no spread
    rows[3][1] = retrained(3, "at a third", 10.0, [17.0, 19.0])  # 6 lower in replicate 3
    line = rb.summary_line(rows, "at a third", "grid")
    assert "-5.33 ± 0.33 (better)" in line and "at a third 18, grid 23" in line
    assert line.endswith("fresh-seed over stored score (median) 1.80 and 2.30")
    assert rb.summary_line({1: rows[1][:1]}, "at a third", "grid") == "at a third: no replicate has it and grid"


def test_a_retrained_configuration_gives_its_stored_score_from_its_own_seed(tmp_path):
    cache = tmp_path / "cache"
    grid = se.run_study(tmp_path, "shearnet", "grid", 3, 3, TINY, cache)  # a third: its first trial
    chosen = rb.search_picks([grid, dataclasses.replace(grid, strategy="again")], "again")
    retrained = rb.retrain_replicate(tmp_path, chosen, 2, TINY, cache)
    assert [r.pick.pick for r in retrained] == list(rb.SEARCH_PICKS)
    assert retrained[0].pick.stored == grid.final_best() and retrained[1].pick.params == grid.trials[0].params
    for result in retrained:
        assert result.original == result.pick.stored  # the search's score, trained again
        assert len(result.fresh) == 2 and all(math.isfinite(v) for v in result.fresh)
    grid_pick, _, budget_pick = retrained
    assert budget_pick.fresh == grid_pick.fresh  # the same configuration: trained once per seed
    assert len(set(grid_pick.fresh) | {grid_pick.original}) == 3  # other seeds, other scores
    assert rb.reproduced(retrained) == 0.0


def test_the_command_reads_search_results_and_prints_the_table(tmp_path):
    search = subprocess.run(
        [sys.executable, "-m", "benchmarks.search_efficiency", "--space", "shearnet", "--seeds", "1",
         "--trials", "3", "--epochs", "1", "--n-train", "200", "--strategies", "random",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "search")],
        cwd=ROOT, capture_output=True, text=True, timeout=400, check=False,
    )
    assert search.returncode == 0, search.stderr[-3000:]
    results = tmp_path / "search" / "search_efficiency.json"
    command = [sys.executable, "-m", "benchmarks.retrain_best", str(results), "--strategy", "random",
               "--training-seeds", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"largest relative difference 0(\.0)?;", run.stdout), run.stdout
    assert re.search(r"shearnet, against grid on fresh training seeds: at a third: (better|same|worse) in 1; "
                     r"at the budget: (better|same|worse) in 1",
                     run.stdout), run.stdout
    written = json.loads((tmp_path / "r.json").read_text())
    assert {r["pick"] for r in written["retrained"]} == set(rb.SEARCH_PICKS)
    assert all(len(r["fresh"]) == 2 for r in written["retrained"])

    bad = subprocess.run([*command[:3], str(tmp_path / "r.json")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "r.json: not a search_efficiency.json or warm_start JSON" in bad.stderr
    other = subprocess.run([*command[:3], str(results), "--strategy", "tpe"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=False)
    assert other.returncode == 2 and "--strategy tpe: no replicate has both it and the grid" in other.stderr
    assert "they hold grid, random" in other.stderr
