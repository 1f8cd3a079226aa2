"""What the Ray driver plugs into Tune: a searcher that starts Ray trials while the study needs
more, a callback that records how each ended, and a stopper for Ctrl+C.

Params never come from Tune: each Ray trial asks the stored Optuna study (see
:mod:`lensnas.search.executors.ray_worker`). The searcher (:class:`Feeder`) starts Ray trials while the
study has fewer than n_trials finished ones (failed trials are replaced), never more at once
than the room left. A Ray trial whose worker died (out of memory, killed) is failed by the
callback (:class:`Monitor`) with Ray's error.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher

from lensnas.search.executors.ray_worker import (
    BAD_INPUT,
    RAY_TRIAL_ATTR,
    RUN_ATTR,
    SKIPPED,
    RayJob,
    shared_storage,
)
from lensnas.search.progress import TrialProgress
from lensnas.search.study import FINISHED, StopAfterFailures, fail_abandoned_trials, fail_trial


class RayRun(StopAfterFailures):
    """What run_ray did: why it stopped early (or None) and the counts of trial outcomes."""

    def __init__(self, max_failures: int):
        super().__init__(max_failures)
        self.states: dict[str, int] = {}
        self.cache_misses = 0
        self.interrupted = False
        self.timed_out = False
        self.bad_input: str | None = None  # a worker's one-line error about the study's input

    def why_stopped(self) -> str:
        """Why trials still running at the end of the run were stopped."""
        return "interrupted" if self.interrupted else "the Ray run ended before the trial"

    def count(self, state: str, reason: str | None) -> None:
        """Count one finished Ray trial (a SKIPPED one claimed nothing and counts for nothing)."""
        self.states[state] = self.states.get(state, 0) + 1
        if state != SKIPPED:
            self.record(state == TrialState.FAIL.name, reason)


class Feeder(Searcher):
    """Tune searcher that starts Ray trials while the study needs more: as the local loop, until
    n_trials are finished (failed trials are replaced) or the run stops."""

    def __init__(self, job: RayJob, run: RayRun, timeout: float | None):
        super().__init__()
        self.job = job
        self.run = run
        self.deadline = math.inf if timeout is None else time.monotonic() + timeout
        self.live: set[str] = set()  # Ray trials started by this run and not yet complete
        self.started = 0
        self.study: optuna.Study | None = None
        self.polled_at = -math.inf
        self.counts = (0, 0)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its search algorithm into its results folder; the storage stays here.
        return {**self.__dict__, "study": None}

    def set_search_properties(self, metric: Any, mode: Any, config: Any, **spec: Any) -> bool:
        """Accept Tune's metric, mode and config: params come from the Optuna study."""
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The config of a new Ray trial, None to wait, or FINISHED when no trial is needed."""
        if self.run.stopped_reason or self.run.interrupted or self.run.bad_input:
            return Searcher.FINISHED
        if time.monotonic() > self.deadline:  # study.timeout: running trials finish
            self.run.timed_out = True
            return Searcher.FINISHED
        finished, running_elsewhere = self._poll()
        if finished >= self.job.spec.n_trials:
            return Searcher.FINISHED
        room = self.job.spec.n_trials - finished - running_elsewhere
        if len(self.live) >= room:
            return None  # wait for a running trial to end
        self.live.add(trial_id)
        self.started += 1
        return {"index": self.started - 1}

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Forget an ended Ray trial; read the study again at the next suggest."""
        self.live.discard(trial_id)
        self.polled_at = -math.inf

    def _poll(self) -> tuple[int, int]:
        """(finished trials, trials running for other launchers), read at most once a second."""
        if time.monotonic() - self.polled_at < 1.0:
            return self.counts
        if self.study is None:
            storage = shared_storage(self.job.storage_url)
            self.study = optuna.load_study(study_name=self.job.spec.name, storage=storage)
        for attempt in range(2):
            trials = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            finished = sum(t.state in FINISHED for t in trials)
            elsewhere = sum(
                t.state == TrialState.RUNNING and t.user_attrs.get(RUN_ATTR) != self.job.run_id
                for t in trials
            )
            if not elsewhere or attempt or not fail_abandoned_trials(self.study):
                break  # else look again: trials of dead processes were just failed
        self.counts = (finished, elsewhere)
        self.polled_at = time.monotonic()
        return self.counts


class Monitor(tune.Callback):
    """Driver-side Tune callback: counts outcomes, fails trials of dead workers, shows progress."""

    def __init__(self, run: RayRun, job: RayJob, progress: TrialProgress | None):
        self.run = run
        self.job = job
        self.progress = progress

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config into its (temporary) results folder; the display stays here.
        return {**self.__dict__, "progress": None}

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        """Count the outcome a Ray trial reported and show it."""
        state = result.get("state", "")
        reason = result.get("fail_reason") or None
        if state == BAD_INPUT:
            self.run.bad_input = self.run.bad_input or reason
            return
        self.run.count(state, reason)
        if state == SKIPPED:
            return
        if not result.get("cache_hit", True):
            self.run.cache_misses += 1
        if self.progress is not None:
            self.progress.trial_finished(result.get("number", "?"), state, reason)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A Ray trial's worker failed: fail its Optuna trial with Ray's error."""
        reason = f"ray worker error: {trial_error(trial)}"
        self.run.count(TrialState.FAIL.name, reason)
        numbers = fail_running(self.job, reason, ray_trial_id=trial.trial_id)
        if self.progress is not None:
            self.progress.trial_finished(", ".join(map(str, numbers)) or "?", "FAIL", reason)


class StopAll(tune.Stopper):
    """Tune stopper: stops every running trial after Ctrl+C."""

    def __init__(self, run: RayRun):
        self.run = run

    def __call__(self, trial_id: str, result: dict) -> bool:
        """Never stop one trial alone."""
        return False

    def stop_all(self) -> bool:
        """Stop them all once the run is interrupted or a worker found bad input."""
        return self.run.interrupted or bool(self.run.bad_input)


def fail_running(job: RayJob, reason: str, ray_trial_id: str | None = None) -> list[int]:
    """Fail this run's RUNNING trials (those of one Ray trial if given); returns their numbers."""
    storage = shared_storage(job.storage_url)
    study = optuna.load_study(study_name=job.spec.name, storage=storage)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get(RUN_ATTR) != job.run_id:
            continue
        if ray_trial_id is not None and attrs.get(RAY_TRIAL_ATTR) != ray_trial_id:
            continue
        if fail_trial(study, trial.number, reason):
            failed.append(trial.number)
    return failed


def trial_error(trial: Any) -> str:
    """Ray's error for a failed Ray trial, on one line (read from the trial's local error files)."""
    if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
        with open(trial.pickled_error_file, "rb") as handle:
            error = ray.cloudpickle.load(handle)
        while getattr(error, "cause", None) is not None:  # RayTaskError wraps the trial's error
            error = error.cause
        text = f"{type(error).__name__}: {error}"
    elif trial.error_file and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text()
    else:
        text = "the Ray worker failed (no error recorded)"
    return " ".join(text.split())[:1000]
