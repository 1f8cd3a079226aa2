"""launch(): run or resume a study from a study file, with any executor."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from lensnas.objectives.cache import cache_root
from lensnas.search.executors.local import run_local
from lensnas.search.spec import SpecError, StudySpec, load_spec
from lensnas.search.storage import (
    artifact_root,
    claim_lock,
    default_storage_url,
    open_storage,
    redact,
)
from lensnas.search.study import (
    fail_abandoned_trials,
    finished_count,
    open_study,
    resolve_device,
    warm_start_sources,
    warm_start_study,
)
from lensnas.search.summary import output_console, print_best
from lensnas.spaces.errors import OptionError

logger = logging.getLogger("lensnas")

EXECUTORS = ("local", "ray")


class LaunchStopped(Exception):
    """The launch stopped before the study was done: too many consecutive failed trials."""


def launch(
    spec: StudySpec | str | Path,
    storage: str | None = None,
    *,
    n_trials: int | None = None,
    seed: int | None = None,
    warm_start: Sequence[str] = (),
    quiet: bool = False,
    cache_dir: str | Path | None = None,
    max_failures: int = 3,
    console: Console | None = None,
    executor: str = "local",
    **executor_options: Any,
) -> optuna.Study:
    """Run the study of ``spec`` (a StudySpec or a study file path) until it has its n_trials.

    Rerunning resumes the same study in the same storage; nothing is done twice.
    ``warm_start`` names earlier studies of the same storage, in addition to the file's
    ``[study] warm_start``, whose fitting trials start the study (``warm_start_study``);
    copied trials count towards n_trials (n_trials is the study's total of finished trials).
    ``executor`` is "local" (in-process) or "ray" (``executor_options``: gpus_per_trial,
    cpus_per_trial, max_concurrent, address).
    """
    if executor not in EXECUTORS:
        raise OptionError(f"--executor: unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if max_failures < 0:
        raise OptionError(f"--max-failures: must be 0 (never stop) or more, got {max_failures}")
    if executor == "ray":
        from lensnas.search.executors.ray_driver import check_ray_options

        check_ray_options(**executor_options)  # before anything runs, even on a finished study
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    spec = spec.with_overrides(n_trials=n_trials, seed=seed, warm_start=warm_start)
    if executor == "local":  # trials train here: the device must exist (before anything is stored)
        device = resolve_device(spec.device, f"{spec.path}: training.device")
    folder = cache_root(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OptionError(f"--cache-dir {folder}: cannot create it ({error.strerror or error})") from None
    url = storage or default_storage_url()
    console = console or Console(stderr=True, quiet=quiet)
    optuna_storage = open_storage(url)
    sources = warm_start_sources(spec, optuna_storage, from_cli=warm_start)  # checked first
    study = open_study(spec, optuna_storage)
    fail_abandoned_trials(study)
    if sources:
        with claim_lock(url):  # two launchers of a new study copy the trials once
            for line in warm_start_study(spec, study, sources):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
    done = finished_count(study)
    stopped_reason = None
    console.print(f"study [bold]{spec.name}[/] in {redact(url)}: {done}/{spec.n_trials} trials finished")
    if done < spec.n_trials:
        objective = spec.make_objective(cache_dir, progress=not quiet)
        objective.prepare()
        stored_key = study.user_attrs.get("dataset_key")
        if stored_key is not None and stored_key != objective.dataset_key:
            raise SpecError(
                f"{spec.path}: objective: the data settings differ from those of the stored study "
                f"'{spec.name}' (dataset {stored_key}); trials would not be comparable: "
                "restore them or use another study name"
            )
        for key, value in objective.trial_attrs().items():
            study.set_user_attr(key, value)
        common = {
            "artifact_root": artifact_root(url), "max_failures": max_failures, "quiet": quiet,
            "console": console,
        }
        if executor == "ray":  # Ray workers choose their device on their node
            from lensnas.search.executors.ray_driver import run_ray

            failures = run_ray(spec, study, objective, storage_url=url, **common, **executor_options)
        else:
            failures = run_local(spec, study, objective, storage_url=url, device=device, **common)
        stopped_reason = failures.stopped_reason
    if not quiet:
        print_best(study, output_console())
    if stopped_reason:
        raise LaunchStopped(f"{spec.name}: {stopped_reason}")
    return study
