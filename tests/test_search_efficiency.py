"""benchmarks.search_efficiency: compute accounting, anytime curves and reach on hand-made trials,
a tiny real pruned study, and the printed comparison's shape (not its numbers).

The studies are real lensnas studies in SQLite (the --quick objective at a tiny size); the
command's micro run uses the local executor and a local Ray for the 4-in-flight strategy.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from benchmarks import search_efficiency as se
from lensnas.search.study import enqueue_presets, open_study
from lensnas.spaces.dimensions import parse_space

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9][0-9.e+-]*"
SPREAD = rf"{NUMBER} \[{NUMBER}-{NUMBER}\]"  # median [min-max]
TINY = se.Size(n_train=200, n_validation=100, n_test=100, epochs=3)


def _trial(number: int, epochs: int, value: float = math.nan, cpu: float = 1.0) -> se.TrialCompute:
    state = "COMPLETE" if math.isfinite(value) else "PRUNED"
    return se.TrialCompute(number, state, epochs, cpu * epochs, cpu * epochs, value, value, 0.01)


def _result(seed: int, trials: list[se.TrialCompute], strategy: str = "tpe", budget: int = 12) -> se.StudyResult:
    return se.StudyResult("shearnet", strategy, strategy, seed, 1, budget, trials, 1.0)


def test_pruned_trial_compute_is_its_reported_epochs():
    study = optuna.create_study(direction="minimize")
    pruned = study.ask()
    for epoch, score in ((1, 0.3), (2, 0.25)):
        pruned.report(score, epoch)
    pruned.report(float("nan"), 3)  # what lensnas reports after the last epoch of a pruned trial
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    complete = study.ask()
    for epoch in (1, 2, 3, 4):
        complete.report(0.2, epoch)
    complete.set_user_attr("validation_score", 0.2)
    complete.set_user_attr("abs_m", 0.01)
    complete.set_user_attr("cpu_seconds", 2.5)
    study.tell(complete, 30.0)
    first, second = (se.trial_compute(t) for t in study.trials)
    assert (first.state, first.epochs, math.isnan(first.value)) == ("PRUNED", 2, True)
    assert (second.state, second.epochs, second.value, second.cpu_seconds) == ("COMPLETE", 4, 30.0, 2.5)
    assert first.cpu_seconds == first.wall_seconds  # no measured CPU time: the trial's duration


def test_anytime_curve_is_the_best_so_far_against_epochs_summed():
    trials = [_trial(0, 1), _trial(1, 3, 5.0), _trial(2, 2), _trial(3, 3, 7.0), _trial(4, 3, 4.0)]
    curve = se.anytime_curve(trials)
    assert [spent for spent, _ in curve] == [1, 4, 6, 9, 12]
    assert math.isnan(curve[0][1]) and [best for _, best in curve[1:]] == [5.0, 5.0, 5.0, 4.0]
    assert math.isnan(se.best_at(curve, 3)) and se.best_at(curve, 4) == 5.0
    assert se.best_at(curve, 11.9) == 5.0 and se.best_at(curve, 12) == 4.0 == se.best_at(curve, 99)
    values = [se.best_at(curve, e) for e in range(4, 13)]
    assert values == sorted(values, reverse=True)  # never worse with more compute
    assert se.anytime_curve(trials, "cpu_seconds")[-1][0] == 12.0
    assert se.compute_to_reach(curve, 5.0) == 4 and se.compute_to_reach(curve, 4.5) == 12
    assert se.compute_to_reach(curve, 3.0) is None


def test_reach_counts_compute_to_the_grids_final_best_within_its_budget():
    grid = [_trial(i, 3, v, cpu=2.0) for i, v in enumerate((9.0, 6.0, 8.0, 7.0))]  # 12 epochs
    grids = {1: _result(1, grid, "grid"), 2: _result(2, grid, "grid")}
    assert grids[1].final_best() == 6.0 and grids[1].total("cpu_seconds") == 24.0
    fast = [_trial(0, 1), _trial(1, 3, 5.5), _trial(2, 3, 9.0)]  # reaches 6 or better at 4 epochs
    late = [_trial(0, 3, 7.0), _trial(1, 3, 7.0), _trial(2, 3, 7.0), _trial(3, 3, 7.0),
            _trial(4, 3, 5.0)]  # 5.0 only at 15 epochs, past the budget of 12
    found = se.reach([_result(1, fast), _result(2, late)], grids)
    assert found.epochs == [4, None] and found.within_third == 1
    assert found.cpu_ratio == [4 / 24, math.inf] and math.isinf(found.median_ratio)
    both = se.reach([_result(1, fast), _result(2, fast)], grids)
    assert both.within_third == 2 and both.median_ratio == pytest.approx(4 / 12)
    assert se.compute_marks(12) == [1, 2, 4, 6, 8, 12]


def test_random_share_counts_complete_trials_as_good_as_the_grids_best():
    grid = {1: _result(1, [_trial(0, 3, 6.0)], "grid"), 2: _result(2, [_trial(0, 3, 4.0)], "grid")}
    randoms = [_result(1, [_trial(0, 3, 5.0), _trial(1, 3, 9.0), _trial(2, 1)], "random"),
               _result(2, [_trial(0, 3, 4.5), _trial(1, 3, 4.0)], "random")]
    line = se.random_share_line(randoms, grid, "shearnet")
    assert "per seed: 1/2, 1/2 (50.0% of all)" in line


def test_strategies_parse_and_reject_with_what_is_allowed():
    assert se.parse_strategy("tpe+hyperband@4") == se.Strategy("tpe", "hyperband", 4)
    assert se.parse_strategy("random+median").label == "random+median"
    assert se.parse_strategy("tpe@4").label == "tpe, 4 in flight"
    assert se.parse_strategy("tpe+successive_halving").pruner == "successive_halving"
    for bad in ("grid+hyperband", "tpe+asha", "tpe@3", "cmaes", "random:5", "tpe:0"):
        with pytest.raises(ValueError, match="strategy"):
            se.parse_strategy(bad)


def test_a_start_up_count_reaches_the_studys_sampler(tmp_path):
    from lensnas.search.samplers import make_sampler

    strategy = se.parse_strategy("tpe:3+hyperband")
    assert strategy.name == "tpe:3+hyperband" and strategy.label == "tpe (3 start-up)+hyperband"
    spec = se.study_spec(tmp_path, se.SHEARNET, strategy, 1, 36, se.QUICK)
    assert make_sampler(spec)._n_startup_trials == 3
    optuna_default = se.study_spec(tmp_path, se.SHEARNET, se.parse_strategy("tpe:10"), 1, 36, se.QUICK)
    assert make_sampler(optuna_default)._n_startup_trials == 10 and spec.name != optuna_default.name


def test_architecture_grid_and_presets_fit_their_spaces(tmp_path):
    space = se.ARCHITECTURE
    dimensions = {d.name: d for d in parse_space(space.dimensions)}
    combinations = se.grid_combinations(space.grid)
    assert len(combinations) == 48 and combinations[1]["normalization"] == "batch"  # last key fastest
    for combination in combinations:
        assert set({**space.grid_fixed, **combination}) == set(dimensions)
        assert all(dimensions[k].admits(v) for k, v in {**space.grid_fixed, **combination}.items())
    spec = se.study_spec(tmp_path, space, se.Strategy("presets"), 1, 48, TINY)
    study = open_study(spec, optuna.storages.InMemoryStorage())
    assert sorted(t.user_attrs["preset"] for t in study.get_trials()) == sorted(space.presets)
    assert enqueue_presets(spec, optuna.create_study()) == list(space.presets)


def test_a_pruned_strategy_spends_the_grids_epochs_in_more_shorter_trials(tmp_path):
    result = se.run_study(tmp_path, "shearnet", "random+hyperband", 1, 6, TINY, tmp_path / "cache")
    budget = 6 * TINY.epochs
    pruned = [t for t in result.trials if t.state == "PRUNED"]
    assert pruned and all(1 <= t.epochs < TINY.epochs for t in pruned[:1])
    assert result.failed == 0 and all(t.cpu_seconds > 0 for t in result.trials)
    assert budget <= result.total() < budget + TINY.epochs  # the last trial started under the budget
    assert result.total() < len(result.trials) * TINY.epochs
    study = optuna.load_study(study_name=se.study_name(se.SHEARNET, se.parse_strategy("random+hyperband"), 1),
                              storage=f"sqlite:///{tmp_path}/shearnet-random-hyperband-seed1.db")
    stored = {t.number: t for t in study.trials}
    for trial in result.trials:  # the accounting is the stored trials' reported epochs
        assert trial.epochs == sum(math.isfinite(v) for v in stored[trial.number].intermediate_values.values())
    stopped = [t for t in study.trials if se.budget_stopped(t)]
    assert len(stopped) == se.BUDGET_STOP_FAILURES and not any(t.intermediate_values for t in stopped)
    assert not math.isnan(result.final_best())


def _row(text: str, label: str) -> list[str]:
    """The cells of the markdown table row that starts with ``label`` (the first such row)."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_micro_run_prints_every_table_and_writes_the_figures(tmp_path):
    labels = ("grid", "tpe", "tpe+hyperband", "tpe+hyperband, 4 in flight")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.search_efficiency", "--space", "shearnet", "--seeds", "1",
         "--trials", "3", "--epochs", "2", "--n-train", "200", "--strategies",
         "tpe,tpe+hyperband,tpe+hyperband@4", "--cache-dir", str(tmp_path / "cache"),
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=400, check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    for label in labels:  # one line per study as it ends
        assert re.search(rf"^  shearnet {re.escape(label)}, seed 1: \d+ trials \(\d+ pruned\), "
                         rf"\d+ epochs in \d+ s, best ({NUMBER}|nan)$", out, re.MULTILINE), label

    anytime, rest = out.split("shearnet: epochs summed to reach the grid's final best")
    assert "E=1" in anytime and "E=6" in anytime
    cells = _row(anytime, "grid")
    assert len(cells) == 5 and all(re.fullmatch(SPREAD, c) for c in cells[1:])
    values = [float(c.split()[0]) for c in cells[1:]]
    assert values == sorted(values, reverse=True)  # the best so far never gets worse

    reach, rest = rest.split("shearnet: compute per study")
    for label in labels[1:]:
        per_seed, within, ratio, cpu_ratio = _row(reach, label)
        assert re.fullmatch(r">6|[1-6]", per_seed) and re.fullmatch(r"[01]/1", within)
        if per_seed == ">6":
            assert ratio == cpu_ratio == ">1 (not reached)"
        else:
            assert abs(float(ratio) - int(per_seed) / 6) < 0.01

    compute, ranking = rest.split("shearnet grid: the trial ShearNet's ranking picks")
    trials, pruned, failed, epochs = _row(compute, "grid")[:4]
    assert (trials, pruned, failed, epochs) == ("3 [3-3]", "0 [0-0]", "0", "6 [6-6]")
    assert re.fullmatch(SPREAD, _row(compute, "tpe+hyperband")[4])  # CPU seconds
    assert re.search(r"shearnet: tpe\+hyperband \(one trial at a time\) reached the grid's final "
                     r"best within a third of the grid's training epochs \(2\) in [01] of 1 seeds",
                     ranking)
    assert re.search(r"ShearNet's ranking \(validation loss\) picked a grid trial", ranking)
    assert re.search(r"^\d+ trials \(\d+ pruned, 0 failed\) in [0-9.]+ min", out, re.MULTILINE)

    folder = tmp_path / "out"
    assert (folder / "search_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "search_efficiency.html").read_text()
    assert "anytime-shearnet" in page and "tpe+hyperband, 4 in flight" in page
    raw = json.loads((folder / "search_efficiency.json").read_text())
    studies = {s["label"]: s for s in raw["studies"]}
    assert set(studies) == set(labels) and raw["settings"]["size"]["epochs"] == 2
    grid = studies["grid"]
    assert grid["budget_epochs"] == 6 and sum(t["epochs"] for t in grid["trials"]) == 6
    assert all(t["state"] == "COMPLETE" and t["cpu_seconds"] > 0 for t in grid["trials"])
