"""benchmarks.warm_start: the trials counted to reach the cold study's best, and one tiny real
replicate (source, cold, copy and top3 studies in SQLite) whose new trials are told apart from
the copied ones."""

from __future__ import annotations

import optuna

from benchmarks import search_efficiency as se
from benchmarks import warm_start as ws
from lensnas.search.study import WARM_START_FROM

TINY = se.Size(n_train=200, n_validation=100, n_test=100, epochs=2)


def test_trials_to_reach_counts_from_one():
    assert ws.trials_to_reach([5.0, 3.0, 2.0], 3.0) == 2
    assert ws.trials_to_reach([5.0, 3.0], 1.0) is None
    row = ws.summarise({"seed": 0, "cold": [4.0, 2.0, 3.0], "copy": [2.5, 1.0], "top3": [3.0, 3.0]})
    assert row["cold_best"] == 2.0 and row["cold_trials"] == 2
    assert row["copy_trials"] == 2 and row["copy_best"] == 1.0 and row["top3_trials"] is None
    assert ws.trials_to_reach([5.0], 3.0, known=2.5) == 0


def test_architectures_ignore_the_learning_rate():
    params = [{"depth": 2, "learning_rate": 1e-3}, {"depth": 2, "learning_rate": 2e-3}, {"depth": 3, "learning_rate": 1e-3}]
    assert ws.architectures(params) == 2


def test_same_data_copies_count_what_the_source_measured():
    """Same data: the copied values are exact, so a copy starts from the source's best; on other
    data it does not."""
    result = {"seed": 0, "same_data": True, "source": [2.0, 6.0], "cold": [4.0, 3.0],
              "copy": [5.0, 1.0], "top3": [2.0, 9.0]}
    row = ws.summarise(result)
    assert row["cold_best"] == 3.0 and row["cold_trials"] == 2
    assert row["copy_trials"] == 0 and row["copy_best"] == 1.0 and row["top3_trials"] == 1
    assert ws.best_after(result, "copy", 1) == 2.0 and ws.best_after(result, "top3", 1) == 2.0
    assert ws.fewer_trials([result], "copy", 2) == 1 and ws.fewer_trials([result], "top3", 2) == 1
    assert ws.fewer_trials([result], "top3", 1) == 0  # cold's best of 1 is 4.0, reached at once: 1 vs 1
    other = ws.summarise({**result, "same_data": False})
    assert other["copy_trials"] == 2 and ws.best_after({**result, "same_data": False}, "copy", 1) == 5.0


def test_one_replicate_counts_only_the_trials_run_here(tmp_path):
    result = ws.run_seed(tmp_path, "architecture", 0, source_trials=3, trials=3, size=TINY,
                         cache_dir=tmp_path / "cache")
    url = f"sqlite:///{tmp_path}/warm-start-seed0.db"
    source = optuna.load_study(study_name="source-seed0", storage=url)
    copy = optuna.load_study(study_name="copy-seed0", storage=url)
    top3 = optuna.load_study(study_name="top3-seed0", storage=url)
    copied = [t for t in copy.trials if WARM_START_FROM in t.user_attrs]
    assert [t.value for t in copied] == [t.value for t in source.trials]
    assert len(copy.trials) == 6 and len(result["copy"]) == 3
    assert sorted(result["copy"]) == sorted(t.value for t in copy.trials[3:])
    assert len(result["cold"]) == 3 and len(result["top3"]) == 3
    best_source = sorted(source.trials, key=lambda t: t.value)
    # top3 trains the source's best configurations here first, on its own data
    assert [t.params for t in top3.trials] == [t.params for t in best_source]
    assert sorted(result["top3"]) == sorted(t.value for t in top3.trials)
    assert result["source"] == [t.value for t in source.trials] and result["same_data"] is False
    assert result["copy_params"] == [t.params for t in copy.trials[3:]]
    assert result["source_params"] == [t.params for t in source.trials]  # what retrain_best trains again
    assert 1 <= ws.architectures(result["cold_params"]) <= 3


def test_same_data_source_is_a_random_search_of_the_replicates_own_seed(tmp_path):
    """--same-data: the earlier study searches at random on this replicate's data and training
    seed, so the top3 study re-trains the source's best configurations on the same data."""
    ws.run_seed(tmp_path, "architecture", 0, source_trials=3, trials=3, size=TINY,
                cache_dir=tmp_path / "cache", same_data=True)
    url = f"sqlite:///{tmp_path}/warm-start-seed0.db"
    source = optuna.load_study(study_name="source-seed0", storage=url)
    stored = source.user_attrs["spec"]["study"]
    assert (stored["sampler"], stored["seed"]) == ("random", 0)
    top3 = optuna.load_study(study_name="top3-seed0", storage=url)
    best_source = sorted(source.trials, key=lambda t: t.value)
    assert [t.params for t in top3.trials] == [t.params for t in best_source]
