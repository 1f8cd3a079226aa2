"""The Ray executor's driver: trials run as Ray Tune trials, each one an Optuna trial of the
stored study, until the study has n_trials finished ones.

run_ray starts or joins Ray (:mod:`lensnas.search.executors.ray_cluster`), places trials on CPUs/GPUs,
and hands Tune a searcher that feeds it Ray trials, a callback that records their outcomes and
a stopper (:mod:`lensnas.search.executors.ray_tune`); each Ray trial claims and runs one Optuna trial in
a worker (:mod:`lensnas.search.executors.ray_worker`). So each trial appears in the study as it runs
(RUNNING, with heartbeats), the study's pruner decides pruning, and the study stays resumable
by either executor. Tune's results folder is temporary: the Optuna storage and the artifact
store are the record.

Ctrl+C (or SIGTERM) stops every trial and fails the running ones; if the driver itself dies,
the trials' heartbeats stop and the next launch fails them as stale.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from rich.console import Console
from sqlalchemy.engine import make_url

from lensnas.search.executors.ray_cluster import check_address, quiet_ray_env, ray_session
from lensnas.search.executors.ray_tune import Feeder, Monitor, RayRun, StopAll, fail_running
from lensnas.search.executors.ray_worker import RayJob, ray_trial
from lensnas.search.progress import TrialProgress
from lensnas.search.spec import SpecError, StudySpec
from lensnas.search.storage import redact
from lensnas.search.study import finished_count
from lensnas.spaces.errors import LensnasError


def check_ray_options(
    gpus_per_trial: float = 0.0, cpus_per_trial: float = 1.0, max_concurrent: int | None = None,
    address: str | None = None,
) -> None:
    """Raise SpecError for resources no trial can have, or an address that is not one."""
    if gpus_per_trial < 0 or cpus_per_trial <= 0:
        raise SpecError(
            "--gpus-per-trial must be >= 0 and --cpus-per-trial > 0, "
            f"got {gpus_per_trial:g} and {cpus_per_trial:g}"
        )
    if max_concurrent is not None and max_concurrent < 1:
        raise SpecError(f"--max-concurrent: must be at least 1, got {max_concurrent}")
    if address:
        check_address(address)  # before the data is prepared, which can take minutes


def run_ray(
    spec: StudySpec,
    study: optuna.Study,
    objective: Any,
    *,
    storage_url: str,
    artifact_root: Path,
    max_failures: int = 3,
    quiet: bool = False,
    console: Console | None = None,
    gpus_per_trial: float = 0.0,
    cpus_per_trial: float = 1.0,
    max_concurrent: int | None = None,
    address: str | None = None,
) -> RayRun:
    """Run Ray Tune trials until the study has ``spec.n_trials`` finished trials (as run_local).

    ``objective`` must be prepared: workers rebuild it from the spec and its cache folder (a cache
    hit). Workers use a GPU only when ``gpus_per_trial`` > 0 and the cluster has one, else the
    CPU (said once). ``max_failures`` consecutive failures start no new trial. Ctrl+C stops the
    trials, fails the running ones and raises KeyboardInterrupt.
    """
    check_ray_options(gpus_per_trial, cpus_per_trial, max_concurrent)
    run = RayRun(max_failures)
    if finished_count(study) >= spec.n_trials:
        return run
    console = console or Console(stderr=True)
    say: Callable[[str], None] = (lambda text: None) if quiet else console.print
    with quiet_ray_env(), ray_session(address) as session:
        cluster = ray.cluster_resources()
        gpus, worker_device = placement(spec, gpus_per_trial, cluster.get("GPU", 0.0), say)
        capacity = fitting_trials(cluster, cpus_per_trial, gpus, max_concurrent)
        if capacity == 0:
            needs = f"{cpus_per_trial:g} CPUs" + (f" + {gpus:g} GPUs" if gpus else "")
            has = f"{cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs"
            if address is None:
                raise SpecError(f"--cpus-per-trial/--gpus-per-trial: a trial needs {needs}, "
                                f"this machine's Ray has {has}")
            say(f"[yellow]ray: a trial needs {needs}, the cluster has {has} now: waiting for more")
            capacity = 1
        say(
            f"ray: {session} with {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs; "
            f"each trial {cpus_per_trial:g} CPU + {gpus:g} GPU, {capacity} at once"
        )
        if address is not None and make_url(storage_url).get_backend_name() == "sqlite":
            say(f"[yellow]ray: {redact(storage_url)} is a file on this machine: trials on other "
                "nodes need a shared storage such as PostgreSQL")
        job = RayJob(
            spec=spec, storage_url=storage_url, run_id=uuid.uuid4().hex,
            objective_class=type(objective), cache_dir=_cache_dir(objective),
            device=worker_device, artifact_root=Path(artifact_root).resolve(),
            threads=max(1, int(cpus_per_trial)), first_trial=len(study.trials),
            working_dir=Path.cwd(),
        )
        trainable = tune.with_resources(
            tune.with_parameters(ray_trial, job=job), {"cpu": cpus_per_trial, "gpu": gpus}
        )
        results_dir = tempfile.mkdtemp(prefix="lensnas-ray-")
        try:
            with (
                TrialProgress(spec.name, study, spec.n_trials, console, quiet) as progress,
                _interruptible(run),
            ):
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        search_alg=Feeder(job, run, spec.timeout), num_samples=-1,
                        max_concurrent_trials=capacity,  # also Tune's limit of pending trials
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=f"lensnas-{job.run_id[:8]}", storage_path=results_dir, verbose=0,
                        stop=StopAll(run), callbacks=[Monitor(run, job, progress)],
                        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    ),
                )
                try:
                    with _quiet_logger("ray.tune"):  # failures are shown and stored by us
                        tuner.fit()
                finally:
                    fail_running(job, f"stopped by the ray executor: {run.why_stopped()}")
        finally:
            shutil.rmtree(results_dir, ignore_errors=True)
    if run.interrupted:
        raise KeyboardInterrupt
    if run.bad_input:
        raise LensnasError(f"a Ray worker: {run.bad_input}")
    if run.timed_out:
        say(f"{spec.name}: timeout of {spec.timeout:g} s reached")
    if run.cache_misses:
        say(f"[yellow]ray: workers rebuilt the dataset instead of reading the cache folder "
            f"{job.cache_dir}: is it shared by every node?")
    return run


def placement(
    spec: StudySpec, gpus_per_trial: float, cluster_gpus: float, say: Callable[[str], None]
) -> tuple[float, str]:
    """(GPUs per trial, worker device): CPUs when no GPU is asked for, present, or allowed."""
    if spec.device == "cpu":
        if gpus_per_trial > 0:
            say("ray: training.device is cpu: --gpus-per-trial ignored, trials run on CPUs")
        return 0.0, "cpu"
    if gpus_per_trial > 0 and cluster_gpus > 0:
        return gpus_per_trial, "cuda"
    if gpus_per_trial > 0:
        say("ray: no GPU in the Ray cluster: trials run on CPUs")
    else:
        say("ray: no GPU per trial (--gpus-per-trial 0): trials run on CPUs")
    return 0.0, "cpu"


def fitting_trials(
    cluster: dict[str, float], cpus_per_trial: float, gpus_per_trial: float,
    max_concurrent: int | None,
) -> int:
    """How many trials the cluster can run at once now (0: not one), capped by max_concurrent."""
    fits = [int(cluster.get("CPU", 0.0) / cpus_per_trial + 1e-9)]
    if gpus_per_trial > 0:
        fits.append(int(cluster.get("GPU", 0.0) / gpus_per_trial + 1e-9))
    if max_concurrent is not None:
        fits.append(max_concurrent)
    return min(fits)


@contextlib.contextmanager
def _interruptible(run: RayRun) -> Iterator[None]:
    """First Ctrl+C or SIGTERM: stop every trial cleanly (run.interrupted); a second: at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in signals}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def on_interrupt(signum: int, frame: Any) -> None:
        run.interrupted = True
        restore()

    for number in signals:
        signal.signal(number, on_interrupt)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Only critical messages from logger ``name`` while inside."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _cache_dir(objective: Any) -> Path | None:
    """The objective's dataset cache folder, absolute (workers may start elsewhere)."""
    folder = getattr(objective, "cache_dir", None)
    return None if folder is None else Path(folder).resolve()
