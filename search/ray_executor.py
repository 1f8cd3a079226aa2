"""The Ray executor: trials run as Ray Tune trials, each one an Optuna trial of the stored study.

Each Ray trial (a worker process) opens the study's storage, loads the study with its sampler
(seeded apart per Ray trial) and pruner, claims one Optuna trial exactly as the local executor
does (:mod:`lensnas.search.local`: under the claim lock, only while the study needs more) and runs it
through :func:`lensnas.search.study.evaluate`, then tells COMPLETE, PRUNED or FAIL (with its
``fail_reason``). So each trial appears in the study as it runs (RUNNING, with heartbeats), the
study's pruner decides pruning, and the study stays resumable by either executor.

On the driver, a Tune searcher (:class:`_Feeder`) starts Ray trials while the study has fewer
than n_trials finished ones (failed trials are replaced), never more at once than the cluster
or ``max_concurrent`` allows; Tune places them on CPUs/GPUs. Its results folder is temporary:
the Optuna storage and the artifact store are the record.

A trial whose worker dies (out of memory, killed) is failed by the driver with Ray's error;
Ctrl+C stops every trial and fails the running ones; if the driver itself dies, the trials'
heartbeats stop and the next launch fails them as stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
from lensnas.search.local import WAIT_SECONDS, claim_trial, run_claimed_trial
from lensnas.search.samplers import make_pruner, make_sampler
from lensnas.search.spec import SpecError, StudySpec
from lensnas.search.storage import open_storage, redact
from lensnas.search.study import (
    FAIL_REASON,
    FINISHED,
    StopAfterFailures,
    fail_abandoned_trials,
    finished_count,
)
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import make_url

RUN_ATTR = "ray_run"
RAY_TRIAL_ATTR = "ray_trial_id"
SKIPPED = "SKIPPED"  # a Ray trial that found nothing left to run
# Tune's own tables off; Ctrl+C handled here (Tune's handler would not tell us it fired).
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_SIGINT_HANDLER": "1"}


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


class RayRun(StopAfterFailures):
    """What run_ray did: why it stopped early (or None) and the counts of trial outcomes."""

    def __init__(self, max_failures: int):
        super().__init__(max_failures)
        self.states: dict[str, int] = {}
        self.cache_misses = 0
        self.interrupted = False
        self.timed_out = False

    def why_stopped(self) -> str:
        """Why trials still running at the end of the run were stopped."""
        return "interrupted" if self.interrupted else "the Ray run ended before the trial"

    def count(self, state: str, reason: str | None) -> None:
        """Count one finished Ray trial (a SKIPPED one claimed nothing and counts for nothing)."""
        self.states[state] = self.states.get(state, 0) + 1
        if state != SKIPPED:
            self.record(state == TrialState.FAIL.name, reason)


_PREPARED: dict[str, Any] = {}  # per worker process: the objective of the current run
_STORAGES: dict[str, optuna.storages.RDBStorage] = {}  # per worker process: one engine per URL


def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per URL and process, reused by its trials."""
    if url not in _STORAGES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            _STORAGES[url] = open_storage(url)
    return _STORAGES[url]


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
            f"the launcher's working directory {job.working_dir} is not on this node ({error.strerror}): "
            "use absolute paths on a shared file system and a shared storage such as PostgreSQL"
        ) from None
    spec = job.spec
    objective = _prepared_objective(job)
    study = optuna.load_study(
        study_name=spec.name,
        storage=_storage(job.storage_url),
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
        _check_reachable(address)  # before the data is prepared, which can take minutes


def _head_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a --address host:port, None for 'auto'; SpecError for anything else."""
    if address == "auto":
        return None
    if "://" in address:
        raise SpecError(
            f"--address {address}: Ray Client addresses (ray://) are not supported; give the "
            "cluster's host:port, as `ray start --head` prints it, or 'auto' on a node of the cluster"
        )
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 host is written [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"--address {address!r}: expected host:port (e.g. 10.0.0.5:6379) or 'auto'")
    return host, int(port)


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
    CPU (said once). ``max_failures`` consecutive failures start no
    new trial. Ctrl+C stops the trials, fails the running ones and raises KeyboardInterrupt.
    """
    check_ray_options(gpus_per_trial, cpus_per_trial, max_concurrent)
    run = RayRun(max_failures)
    if finished_count(study) >= spec.n_trials:
        return run
    console = console or Console(stderr=True)
    say = (lambda text: None) if quiet else console.print
    with _quiet_ray_env(), _ray_session(address) as session:
        cluster = ray.cluster_resources()
        gpus, worker_device = _placement(spec, gpus_per_trial, cluster.get("GPU", 0.0), say)
        capacity = _capacity(cluster, cpus_per_trial, gpus, max_concurrent)
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
            with _progress(spec, study, console, quiet) as update, _interruptible(run):
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        search_alg=_Feeder(job, run, spec.timeout), num_samples=-1,
                        max_concurrent_trials=capacity,  # also Tune's limit of pending trials
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=f"lensnas-{job.run_id[:8]}", storage_path=results_dir, verbose=0,
                        stop=_StopAll(run), callbacks=[_Monitor(run, job, update)],
                        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    ),
                )
                try:
                    with _quiet_logger("ray.tune"):  # failures are shown and stored by us
                        tuner.fit()
                finally:
                    _fail_running(job, f"stopped by the ray executor: {run.why_stopped()}")
        finally:
            shutil.rmtree(results_dir, ignore_errors=True)
    if run.interrupted:
        raise KeyboardInterrupt
    if run.timed_out:
        say(f"{spec.name}: timeout of {spec.timeout:g} s reached")
    if run.cache_misses:
        say(f"[yellow]ray: workers rebuilt the dataset instead of reading the cache folder "
            f"{job.cache_dir}: is it shared by every node?")
    return run


def _capacity(
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


def _placement(
    spec: StudySpec, gpus_per_trial: float, cluster_gpus: float, say: Any
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


def _cache_dir(objective: Any) -> Path | None:
    folder = getattr(objective, "cache_dir", None)
    return None if folder is None else Path(folder).resolve()


@contextlib.contextmanager
def _quiet_ray_env() -> Iterator[None]:
    """Set QUIET_ENV for the duration of the run."""
    saved = {key: os.environ.get(key) for key in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[str]:
    """Use the running Ray, or start/join one and shut it down afterwards; yields which it is."""
    if ray.is_initialized():
        yield "using the running Ray"
        return
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        options["include_dashboard"] = False
    try:
        # Only when joining: processes a local Ray starts would inherit the redirected stderr.
        catch = _stderr_of_ray_core() if address else contextlib.nullcontext(io.StringIO())
        with catch as ray_messages:
            # "local": a new Ray even where `ray start` runs one (joining is what --address is for)
            ray.init(address=address or "local", **options)
    except ConnectionError as error:
        reason = str(error).strip().splitlines()[0]
        if "InvalidAuthToken" in ray_messages.getvalue():
            reason += (
                "; the cluster uses token authentication and this launcher has no valid token: "
                "set RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token or $RAY_AUTH_TOKEN)"
            )
        raise SpecError(f"--address {address}: cannot join the Ray cluster ({reason})") from None
    try:
        yield "started a local Ray" if address is None else f"joined the Ray cluster at {address}"
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """SpecError at once when nothing listens at a host:port (Ray would retry for minutes)."""
    head = _head_host_port(address)
    if head is None:
        return
    try:
        socket.create_connection(head, timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise SpecError(
            f"--address {address}: cannot reach it ({reason}): is `ray start --head` running there?"
        ) from None


@contextlib.contextmanager
def _stderr_of_ray_core() -> Iterator[io.StringIO]:
    """Catch what Ray's C++ core writes to file descriptor 2 while inside (a connection failure
    repeats a warning every second); shown again afterwards unless the block raised."""
    caught = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+", errors="replace") as capture:
        os.dup2(capture.fileno(), 2)
        raised = True
        try:
            yield caught
            raised = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            caught.write(capture.read())
    if not raised:
        sys.stderr.write(caught.getvalue())


@contextlib.contextmanager
def _progress(
    spec: StudySpec, study: optuna.Study, console: Console, quiet: bool
) -> Iterator[Any]:
    """A progress bar over the study's finished trials; yields ``update(status)``."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
        console=console, disable=quiet, transient=False,
    ) as progress:
        task = progress.add_task(
            spec.name, total=spec.n_trials, completed=finished_count(study), status=""
        )

        def update(status: str) -> None:
            progress.update(task, completed=finished_count(study), status=status)

        yield update


def _trial_error(trial: Any) -> str:
    """Ray's error for a failed Ray trial, on one line (read from the trial's local error files)."""
    if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
        with open(trial.pickled_error_file, "rb") as handle:
            error = ray.cloudpickle.load(handle)
        while getattr(error, "cause", None) is not None:  # RayTaskError wraps the trial's own error
            error = error.cause
        text = f"{type(error).__name__}: {error}"
    elif trial.error_file and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text()
    else:
        text = "the Ray worker failed (no error recorded)"
    return " ".join(text.split())[:1000]


class _Feeder(Searcher):
    """Tune searcher that starts Ray trials while the study needs more: as the local loop, until
    n_trials are finished (failed trials are replaced) or the run stops. Params come from Optuna."""

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
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.run.stopped_reason or self.run.interrupted:
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
        self.live.discard(trial_id)
        self.polled_at = -math.inf  # the study changed: look again at the next suggest

    def _poll(self) -> tuple[int, int]:
        """(finished trials, trials running for other launchers), read at most once a second."""
        if time.monotonic() - self.polled_at < 1.0:
            return self.counts
        if self.study is None:
            storage = _storage(self.job.storage_url)
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


class _Monitor(tune.Callback):
    """Driver-side Tune callback: counts outcomes, fails trials of dead workers, shows progress."""

    def __init__(self, run: RayRun, job: RayJob, update: Any):
        self.run = run
        self.job = job
        self.update = update

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config into its (temporary) results folder; the bar stays here.
        return {"run": self.run, "job": self.job, "update": lambda status: None}

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        state = result.get("state", "")
        reason = result.get("fail_reason") or None
        self.run.count(state, reason)
        if state != SKIPPED and not result.get("cache_hit", True):
            self.run.cache_misses += 1
        self.update(f"trial {result.get('number')} {state}" + (f": {reason}" if reason else ""))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = f"ray worker error: {_trial_error(trial)}"
        self.run.count(TrialState.FAIL.name, reason)
        numbers = _fail_running(self.job, reason, ray_trial_id=trial.trial_id)
        self.update(f"trial {', '.join(map(str, numbers)) or '?'} FAIL: {reason}")


class _StopAll(tune.Stopper):
    """Tune stopper: stops every running trial after Ctrl+C."""

    def __init__(self, run: RayRun):
        self.run = run

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.run.interrupted


def _fail_running(job: RayJob, reason: str, ray_trial_id: str | None = None) -> list[int]:
    """Fail this run's RUNNING trials (those of one Ray trial if given); returns their numbers."""
    storage = _storage(job.storage_url)
    study = optuna.load_study(study_name=job.spec.name, storage=storage)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get(RUN_ATTR) != job.run_id:
            continue
        if ray_trial_id is not None and attrs.get(RAY_TRIAL_ATTR) != ray_trial_id:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            failed.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # its worker finished it meanwhile
    return failed
