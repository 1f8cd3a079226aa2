"""What runs inside a Ray worker: one Ray Tune trial claims one Optuna trial and runs it.

Each Ray trial opens the study's storage, loads the study with its sampler (seeded apart per
Ray trial) and pruner, claims one Optuna trial exactly as the local executor does
(:func:`lensnas.search.executors.local.claim_trial`: under the claim lock, only while the study needs
more) and runs it with :func:`lensnas.search.executors.local.run_claimed_trial`, which tells COMPLETE,
PRUNED or FAIL (with its ``fail_reason``). The objective is built and prepared once per worker
process (its dataset is a cache hit), and so is the storage's connection pool.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from ray import tune

from lensnas.search.executors.local import WAIT_SECONDS, claim_trial, run_claimed_trial
from lensnas.search.samplers import make_pruner, make_sampler
from lensnas.search.spec import StudySpec
from lensnas.search.storage import open_storage
from lensnas.search.study import FAIL_REASON
from lensnas.spaces.errors import LensnasError

RUN_ATTR = "ray_run"  # user attribute: the run (one run_ray call) that started the trial
RAY_TRIAL_ATTR = "ray_trial_id"  # user attribute: the Ray trial that runs it
SKIPPED = "SKIPPED"  # the state a Ray trial reports when it found nothing left to run
BAD_INPUT = "BAD_INPUT"  # the state of a Ray trial whose worker found bad input (a data file)


@dataclass(frozen=True)
class RayJob:
    """Everything a Ray worker needs to run one trial of the study (small and picklable)."""

    spec: StudySpec
    storage_url: str
    run_id: str
    objective_class: type
    cache_dir: Path | None
    device: str
    artifact_root: Path
    threads: int
    first_trial: int
    working_dir: Path  # the launcher's: relative paths of the study (a SQLite file, a data folder)

    def sampler_seed(self, index: int) -> int:
        """A distinct sampler seed per Ray trial: workers must not draw the same random params."""
        entropy = [self.spec.seed, self.first_trial, index]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])


_PREPARED: dict[str, Any] = {}  # per worker process: the objective of the current run
_STORAGES: dict[str, optuna.storages.RDBStorage] = {}  # per process: one engine per URL


def shared_storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per URL and process, reused by its trials."""
    if url not in _STORAGES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            _STORAGES[url] = open_storage(url)
    return _STORAGES[url]


def ray_trial(config: dict[str, Any], job: RayJob) -> None:
    """One Ray Tune trial: claim one Optuna trial of the stored study, run it, tell its state."""
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(job.threads)
    # Workers of a cluster joined with --address start elsewhere; relative paths of the study
    # must mean what they mean to the launcher.
    try:
        os.chdir(job.working_dir)
    except OSError as error:
        raise RuntimeError(
            f"the launcher's working directory {job.working_dir} is not on this node "
            f"({error.strerror}): use absolute paths on a shared file system and a shared "
            "storage such as PostgreSQL"
        ) from None
    spec = job.spec
    try:
        objective = _prepared_objective(job)
    except LensnasError as error:  # bad input found on this node: the launch stops, one line
        tune.report({"state": BAD_INPUT, "number": -1, "fail_reason": str(error)})
        return
    study = optuna.load_study(
        study_name=spec.name,
        storage=shared_storage(job.storage_url),
        sampler=make_sampler(dataclasses.replace(spec, seed=job.sampler_seed(config["index"]))),
        pruner=make_pruner(spec),
    )
    trial = claim_trial(study, spec.n_trials, job.storage_url)
    if not isinstance(trial, optuna.Trial):  # done, or the last trials run elsewhere
        if trial is None:
            time.sleep(WAIT_SECONDS)
        tune.report({"state": SKIPPED, "number": -1})
        return
    trial.set_user_attr("executor", "ray")
    trial.set_user_attr(RUN_ATTR, job.run_id)
    trial.set_user_attr(RAY_TRIAL_ATTR, tune.get_context().get_trial_id())
    frozen = run_claimed_trial(spec, study, objective, trial, job.device, job.artifact_root, None)
    tune.report({
        "state": frozen.state.name,
        "number": frozen.number,
        "fail_reason": str(frozen.user_attrs.get(FAIL_REASON, "")),
        "cache_hit": getattr(objective, "cache_hit", None) is not False,
    })


def _prepared_objective(job: RayJob) -> Any:
    """The job's objective, built and prepared once per worker process (a dataset cache hit)."""
    if job.run_id not in _PREPARED:
        spec = job.spec
        objective = job.objective_class(
            spec.objective_options, spec.training, seed=spec.seed, cache_dir=job.cache_dir,
            progress=False,
        )
        objective.prepare()
        _PREPARED.clear()
        _PREPARED[job.run_id] = objective
    return _PREPARED[job.run_id]
