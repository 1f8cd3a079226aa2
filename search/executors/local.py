"""The local executor: trials run one at a time in this process, with a progress bar.

Trials are asked and told explicitly (not through ``study.optimize``) so that several
launchers sharing one study stop at exactly ``n_trials`` finished trials: each claims a
trial under a lock (a file lock beside a SQLite database) only while finished plus running
trials are fewer than ``n_trials``, and waits while the last ones run elsewhere.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console

from lensnas.search.progress import TrialProgress
from lensnas.search.spec import StudySpec
from lensnas.search.storage import claim_lock, sqlite_path
from lensnas.search.study import (
    FAIL_REASON,
    FINISHED,
    StopAfterFailures,
    evaluate,
    fail_abandoned_trials,
    fail_trial,
    heartbeat,
    mark_worker,
    storage_of,
    stored_trial_id,
)

WAIT_SECONDS = 2.0
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"


def claim_trial(
    study: optuna.Study, n_trials: int, storage_url: str
) -> optuna.Trial | None | bool:
    """A new trial, False when the study is done, None when others run the last trials."""
    with claim_lock(storage_url):
        fail_abandoned_trials(study, claims_locked=sqlite_path(storage_url) is not None)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        finished = sum(s in FINISHED for s in states)
        running = states.count(TrialState.RUNNING)
        if finished >= n_trials:
            return False
        if finished + running >= n_trials:
            return None
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for optimize(); run_claimed_trial runs them.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        mark_worker(trial)
        return trial


def run_local(
    spec: StudySpec,
    study: optuna.Study,
    objective: Any,
    *,
    storage_url: str,
    device: str,
    artifact_root: Path,
    max_failures: int = 3,
    quiet: bool = False,
    console: Console | None = None,
) -> StopAfterFailures:
    """Run trials in this process until the study has ``spec.n_trials`` finished trials.

    A trial that raises or returns a non-finite metric is told FAIL with its reason and the
    study goes on; ``max_failures`` consecutive failures stop this launcher. On Ctrl-C the
    running trial is told FAIL and KeyboardInterrupt propagates.
    """
    failures = StopAfterFailures(max_failures)
    console = console or Console(stderr=True)
    started = time.monotonic()
    with TrialProgress(spec.name, study, spec.n_trials, console, quiet) as progress:
        while failures.stopped_reason is None:
            if spec.timeout is not None and time.monotonic() - started > spec.timeout:
                console.print(f"{spec.name}: timeout of {spec.timeout:g} s reached")
                break
            trial = claim_trial(study, spec.n_trials, storage_url)
            if trial is False:
                break
            if trial is None:
                progress.show("waiting for trials running elsewhere")
                time.sleep(WAIT_SECONDS)
                continue
            frozen = run_claimed_trial(
                spec, study, objective, trial, device, artifact_root, progress.show
            )
            failures(study, frozen)
            progress.trial_finished(
                frozen.number, frozen.state.name, frozen.user_attrs.get(FAIL_REASON)
            )
    return failures


def run_claimed_trial(
    spec: StudySpec, study: optuna.Study, objective: Any, trial: optuna.Trial,
    device: str, artifact_root: Path, on_log: Any,
) -> optuna.trial.FrozenTrial:
    """Run a claimed trial with its heartbeat and tell its state: COMPLETE, PRUNED or FAIL
    (an error or a non-finite metric); on Ctrl-C fail it and let KeyboardInterrupt go on."""
    with heartbeat(trial):
        try:
            values = evaluate(spec, objective, trial, device, artifact_root, on_log)
        except optuna.TrialPruned:
            return tell(study, trial, state=TrialState.PRUNED)
        except KeyboardInterrupt:
            fail_trial(study, trial.number, INTERRUPTED)
            raise
        except Exception:  # noqa: BLE001 - any error of a trial is that trial's FAIL (reason stored)
            return tell(study, trial, state=TrialState.FAIL)
    if not all(math.isfinite(v) for v in values):
        return tell(study, trial, state=TrialState.FAIL)
    return tell(study, trial, values)


def tell(
    study: optuna.Study, trial: optuna.Trial, values: Any = None, state: TrialState | None = None
) -> optuna.trial.FrozenTrial:
    """``study.tell``, where the grid sampler's wish to stop once its grid is done is not an
    error: its ``after_trial`` calls ``study.stop()``, which raises outside ``study.optimize``,
    after Optuna has stored the trial's state (a ``finally``); the study's ``n_trials`` ends it."""
    try:
        return study.tell(trial, values, state=state)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise
        storage = storage_of(study)
        return storage.get_trial(stored_trial_id(storage, study.study_name, trial.number))
