"""The Optuna study of a StudySpec: create or resume it, enqueue presets, score and record trials.

Shared by every executor: each turns its own trial object into a TrialContext and calls
:func:`evaluate`, which runs the objective and stores its metrics on the Optuna trial.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState

from lensnas.objectives.base import TrialPruned
from lensnas.search.artifacts import store_trial_artifacts
from lensnas.search.samplers import make_pruner, make_sampler
from lensnas.search.spec import SpecError, StudySpec
from lensnas.spaces.dimensions import Dimension, admits, parse_space, suggest
from lensnas.spaces.errors import LensnasError, OptionError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
FAIL_REASON = "fail_reason"


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The training seed of one trial, derived from the study seed and the trial number."""
    return int(np.random.SeedSequence([study_seed, trial_number]).generate_state(1)[0])


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study or load it to resume; enqueue admitted presets on a new study."""
    try:
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            directions=list(spec.directions),
            sampler=make_sampler(spec),
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
    except ValueError as error:
        raise SpecError(f"{spec.path}: study.directions: the stored study '{spec.name}' differs ({error})") from None
    stored_objective = study.user_attrs.get("objective")
    if stored_objective not in (None, spec.objective):
        raise SpecError(f"{spec.path}: study.objective: the stored study '{spec.name}' uses '{stored_objective}'; pick another study name")
    stored_seed = study.user_attrs.get("seed", spec.seed)
    if stored_seed != spec.seed:
        raise SpecError(
            f"{spec.path}: study.seed: the stored study '{spec.name}' uses seed {stored_seed} "
            f"(its data and sampler depend on it); a different seed needs another study name"
        )
    if stored_objective is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.metrics))  # names instead of "Objective 0" in the dashboard
        study.set_user_attr("objective", spec.objective)
        study.set_user_attr("seed", spec.seed)
        study.set_user_attr("metrics", list(spec.metrics))
        study.set_user_attr("study_file", str(spec.path))
        study.set_user_attr("spec", _json_safe(spec.raw))
    if not study.trials:
        enqueue_presets(spec, study)
    return study


def enqueue_presets(spec: StudySpec, study: optuna.Study) -> list[str]:
    """Enqueue each listed preset the space admits; returns the names enqueued."""
    from lensnas.objectives import objective_class

    family = objective_class(spec.objective).family
    searched = [d for d in spec.space if d.searched]
    defaults = family.config(spec.training)
    enqueued = []
    for name in spec.presets:
        preset = family.presets[name]
        reason = admits(list(spec.space), preset, defaults)
        if reason is not None:
            optuna.logging.get_logger("lensnas").warning("preset %s not enqueued: %s", name, reason)
            continue
        params = {d.name: preset[d.name] for d in searched if d.name in preset}
        study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=True)
        enqueued.append(name)
    return enqueued


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards n_trials: COMPLETE and PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


WARM_START_FROM = "warm_start_from"  # trial user attribute: "study:number" it was copied from
WARM_STARTED = "warm_started_from"  # study user attribute: the earlier studies already used


Source = tuple[optuna.Study, dict[str, Any]]  # an earlier study and what it did not search


def warm_start_sources(
    spec: StudySpec, storage: optuna.storages.BaseStorage, from_cli: Collection[str] = (),
) -> dict[str, Source]:
    """The earlier studies of ``spec.warm_start`` not yet used by the stored study, checked.

    A study that is missing, or has another objective, metrics, directions or data settings
    ([objective]; the seed may differ) is a one-line SpecError (OptionError for ``from_cli``
    names, given with ``--warm-start``), raised before anything is created or copied.
    """
    if not spec.warm_start:
        return {}
    done: list[str] = []
    if spec.name in optuna.get_all_study_names(storage):
        stored = optuna.load_study(study_name=spec.name, storage=storage)
        done = list(stored.user_attrs.get(WARM_STARTED, []))
    return {
        name: _warm_start_source(spec, storage, name, name in from_cli)
        for name in spec.warm_start if name not in done
    }


def warm_start_study(spec: StudySpec, study: optuna.Study, sources: dict[str, Source]) -> list[str]:
    """Start ``study`` from earlier studies (:func:`warm_start_sources`); one line per study
    says what was done.

    The finished trials (COMPLETE and PRUNED) of each earlier study whose parameters fit this
    study's space (:func:`fit_params`) are copied with their values, intermediate values and
    user attributes, each marked ``warm_start_from = "study:number"``; with
    ``spec.warm_start_top = K`` the params of its best K fitting COMPLETE trials are enqueued
    as the first new trials instead. Copied trials are finished trials of this study: they
    count towards n_trials as presets and resumed trials do (``finished_count``), and the
    sampler (TPE, GP) and the median pruner see them; the rungs of Hyperband and successive
    halving, NSGA-II's generations and the grid's cells count only trials run here. An earlier study is used once: it is
    recorded in the study attribute ``warm_started_from`` and skipped on resume.
    """
    done = list(study.user_attrs.get(WARM_STARTED, []))
    copied = {t.user_attrs.get(WARM_START_FROM) for t in study.get_trials(deepcopy=False)}
    lines = []
    for name, (source, fixed) in sources.items():
        if name in done:  # another launcher used it meanwhile
            continue
        if spec.warm_start_top is None:
            lines.append(_copy_trials(spec, study, name, source, fixed, copied))
        else:
            lines.append(_enqueue_best(spec, study, name, source, fixed))
        done.append(name)
        study.set_user_attr(WARM_STARTED, done)
    return lines


def _warm_start_source(
    spec: StudySpec, storage: optuna.storages.BaseStorage, name: str, cli: bool
) -> Source:
    """The earlier study ``name`` and what it did not search; an error if it cannot be used."""
    from lensnas.objectives import objective_class

    def refuse(reason: str) -> LensnasError:
        if cli:
            return OptionError(f"--warm-start {name}: {reason}")
        return SpecError(f"{spec.path}: study.warm_start: '{name}' {reason}")

    stored = optuna.get_all_study_names(storage)
    if name not in stored:
        raise refuse(f"is not a study of this storage; stored studies: {', '.join(stored) or 'none'}")
    source = optuna.load_study(study_name=name, storage=storage)
    attrs = source.user_attrs
    if attrs.get("objective") != spec.objective:
        raise refuse(f"is a study of objective '{attrs.get('objective')}', this one of "
                     f"'{spec.objective}'; allowed: a study of the same objective")
    theirs = (list(attrs.get("metrics", [])), [d.name.lower() for d in source.directions])
    ours = (list(spec.metrics), list(spec.directions))
    if theirs != ours:
        raise refuse(f"optimises {theirs[0]} ({', '.join(theirs[1])}), this study {ours[0]} "
                     f"({', '.join(ours[1])}); allowed: a study of the same metrics and directions")
    cls = objective_class(spec.objective)
    raw = attrs.get("spec")
    try:
        options = cls.check_options(raw.get("objective", {}))
        space = parse_space(raw.get("space", {}))
        training = dict(raw.get("training", {}))
    except (AttributeError, LensnasError) as error:
        raise refuse(f"has a stored study file lensnas cannot read now ({error})") from None
    differ = sorted(k for k in {*options, *spec.objective_options}
                    if options.get(k) != spec.objective_options.get(k))
    if differ:
        raise refuse(f"has other data settings ({', '.join(f'objective.{k}' for k in differ[:4])} "
                     "differ): its values are not comparable; allowed: a study of the same [objective]")
    return source, fixed_config(cls.family, training, space)


def fixed_config(family: Any, training: dict[str, Any], space: Iterable[Dimension]) -> dict[str, Any]:
    """What a study does not search: family defaults < [training] < fixed [space] values."""
    fixed = {d.name: d.value for d in space if not d.searched}
    return family.config({**{k: v for k, v in training.items() if k != "device"}, **fixed})


def fit_params(
    trial: optuna.trial.FrozenTrial, space: list[Dimension], source_fixed: dict[str, Any],
    fixed: dict[str, Any],
) -> tuple[dict[str, Any], str | None]:
    """(this study's params for an earlier trial, None), or ({}, why it does not fit).

    The trial's full configuration (its study's fixed values < its params) must be one this
    study can produce: each active searched dimension holds a value its range or choices
    contain, a dimension inactive here was not set, and everything else equals this study's
    fixed value (``fixed``: :func:`fixed_config`).
    """
    config = {**source_fixed, **trial.params}
    chosen: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for dimension in space:  # parents first
        name = dimension.name
        if not dimension.active(chosen):
            if name in trial.params:
                return {}, f"{name} is set but inactive here ({_conditions(dimension)})"
            continue
        value = config.get(name)
        if dimension.searched:
            reason = _outside(dimension, value)
            if reason:
                return {}, reason
            params[name] = int(value) if dimension.kind == "int" else value
        elif value != dimension.value:
            return {}, f"{name}={value!r}, fixed at {dimension.value!r} here"
        chosen[name] = value
    names = {d.name for d in space}
    for key in sorted({*config, *fixed} - names):
        if config.get(key) != fixed.get(key):
            return {}, f"{key}={config.get(key)!r}, fixed at {fixed.get(key)!r} here"
    return params, None


def _conditions(dimension: Dimension) -> str:
    return ", ".join(f"{parent} in {list(values)}" for parent, values in dimension.when.items())


def _outside(dimension: Dimension, value: Any) -> str | None:
    """Why ``value`` is not an outcome of searched ``dimension``, or None."""
    name = dimension.name
    if dimension.kind == "categorical":
        return None if dimension.admits(value) else f"{name}={value!r} not one of {list(dimension.choices)}"
    on_grid = True
    if dimension.admits(value) and dimension.kind == "float" and dimension.step:
        steps = (value - dimension.low) / dimension.step
        on_grid = abs(steps - round(steps)) < 1e-8
    if dimension.admits(value) and on_grid:
        return None
    step = f" step {dimension.step:g}" if dimension.step else ""
    return f"{name}={value!r} outside {dimension.low:g}..{dimension.high:g}{step}"


def distribution(dimension: Dimension) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution that :func:`lensnas.spaces.dimensions.suggest` asks for."""
    if dimension.kind == "int":
        return optuna.distributions.IntDistribution(
            int(dimension.low), int(dimension.high), log=dimension.log, step=int(dimension.step or 1))
    if dimension.kind == "float":
        return optuna.distributions.FloatDistribution(
            dimension.low, dimension.high, log=dimension.log, step=dimension.step)
    return optuna.distributions.CategoricalDistribution(list(dimension.choices))


def _fitting(
    spec: StudySpec, source: optuna.Study, source_fixed: dict[str, Any], states: tuple[TrialState, ...],
) -> tuple[list[tuple[optuna.trial.FrozenTrial, dict[str, Any]]], Counter[str], int]:
    """([(trial, params)] of the source's trials in ``states`` that fit, reasons of the rest, total)."""
    from lensnas.objectives import objective_class

    fixed = fixed_config(objective_class(spec.objective).family, spec.training, spec.space)
    trials = source.get_trials(deepcopy=False, states=states)
    fitting, reasons = [], Counter()
    for trial in trials:
        params, reason = fit_params(trial, list(spec.space), source_fixed, fixed)
        if reason is None:
            fitting.append((trial, params))
        else:
            reasons[reason] += 1
    return fitting, reasons, len(trials)


def _rest(reasons: Counter[str]) -> str:
    """'; 2 do not fit the space: depth=5 outside 1..3, ...' or ''."""
    if not reasons:
        return ""
    shown = [f"{reason}" + (f" ({count} trials)" if count > 1 else "")
             for reason, count in reasons.most_common(3)]
    more = ", ..." if len(reasons) > 3 else ""
    return f"; {reasons.total()} do not fit the space: {', '.join(shown)}{more}"


def _copy_trials(
    spec: StudySpec, study: optuna.Study, name: str, source: optuna.Study,
    source_fixed: dict[str, Any], copied: set[Any],
) -> str:
    """Copy the source's fitting finished trials into ``study``; the line that says so."""
    fitting, reasons, total = _fitting(spec, source, source_fixed, FINISHED)
    distributions = {d.name: distribution(d) for d in spec.space if d.searched}
    new = []
    for trial, params in fitting:
        mark = f"{name}:{trial.number}"
        if mark in copied:  # an earlier launch stopped before recording the study as used
            continue
        new.append(optuna.trial.create_trial(
            state=trial.state, values=trial.values, params=params,
            distributions={key: distributions[key] for key in params},
            user_attrs={**trial.user_attrs, WARM_START_FROM: mark},
            system_attrs={k: v for k, v in trial.system_attrs.items() if k.startswith("artifacts:")},
            intermediate_values=trial.intermediate_values,
        ))
    study.add_trials(new)
    here = len(fitting) - len(new)
    already = f" ({here} already here)" if here else ""
    return f"warm start: copied {len(new)} of {total} finished trials of {name}{already}{_rest(reasons)}"


def _enqueue_best(
    spec: StudySpec, study: optuna.Study, name: str, source: optuna.Study,
    source_fixed: dict[str, Any],
) -> str:
    """Enqueue the params of the source's best ``warm_start_top`` fitting COMPLETE trials."""
    fitting, reasons, total = _fitting(spec, source, source_fixed, (TrialState.COMPLETE,))
    sign = -1.0 if spec.directions[0] == "maximize" else 1.0
    best = sorted(fitting, key=lambda pair: sign * pair[0].values[0])[: spec.warm_start_top]
    for trial, params in best:
        study.enqueue_trial(params, user_attrs={WARM_START_FROM: f"{name}:{trial.number}"},
                            skip_if_exists=True)
    return (f"warm start: enqueued the params of the best {len(best)} of {total} complete "
            f"trials of {name}{_rest(reasons)}")


class OptunaContext:
    """TrialContext over an ``optuna.Trial`` (the local executor's adapter)."""

    def __init__(self, trial: optuna.Trial, device: str, artifact_dir: Path, seed: int,
                 multi_objective: bool, on_log: Callable[[str], None] | None = None):
        self.trial = trial
        self.device = device
        self.artifact_dir = artifact_dir
        self.seed = seed
        self.multi_objective = multi_objective
        self.on_log = on_log
        self.last_step = 0

    def report(self, step: int, value: float) -> None:
        self.last_step = max(self.last_step, step)
        if not self.multi_objective:  # Optuna keeps intermediate values for single objectives only
            self.trial.report(value, step)

    def should_prune(self) -> bool:
        return not self.multi_objective and self.trial.should_prune()

    def log(self, message: str) -> None:
        if self.on_log is not None:
            self.on_log(f"trial {self.trial.number}: {message}")


def evaluate(
    spec: StudySpec,
    objective: Any,
    trial: optuna.Trial,
    device: str,
    artifact_root: Path,
    on_log: Callable[[str], None] | None = None,
    artifact_store: Any = None,
) -> list[float]:
    """Suggest params, run the objective, store its metrics as user attributes, return the values.

    A pruned trial raises optuna.TrialPruned; any other failure stores its reason and re-raises.
    The files the trial wrote go to ``artifact_store`` (default: a file-system artifact store
    rooted at ``artifact_root``), linked from the trial.
    """
    params = suggest(trial, list(spec.space))
    seed = trial_seed(spec.seed, trial.number)
    trial.set_user_attr("seed", seed)
    artifact_dir = artifact_root / spec.name / f"trial-{trial.number}"
    ctx = OptunaContext(trial, device, artifact_dir, seed, spec.multi_objective, on_log)
    try:
        metrics = objective.run_trial(params, ctx)
        store = artifact_store or FileSystemArtifactStore(artifact_root)
        store_trial_artifacts(trial, artifact_dir, store=store)
    except TrialPruned as pruned:
        if spec.metrics[0] != objective.VALIDATION_SCORE.metric:
            # Optuna stores a pruned trial's last intermediate value as its value; a validation
            # score in other units would then pass for the study's metric. A last NaN leaves
            # the pruned trial without a value (pruners ignore NaN).
            trial.report(float("nan"), ctx.last_step + 1)
        raise optuna.TrialPruned(str(pruned)) from None
    except KeyboardInterrupt:
        trial.set_user_attr(FAIL_REASON, "interrupted (Ctrl-C or SIGTERM)")
        raise
    except Exception as error:
        trial.set_user_attr(FAIL_REASON, f"{type(error).__name__}: {error}"[:2000])
        raise
    for key, value in metrics.items():  # a dict is a group of metrics stored together
        trial.set_user_attr(key, _json_safe(value) if isinstance(value, dict) else float(value))
    trial.set_user_attr("artifact_dir", str(artifact_dir))
    values = [float(metrics[m]) for m in spec.metrics]
    bad = [m for m, v in zip(spec.metrics, values) if not math.isfinite(v)]
    if bad:
        trial.set_user_attr(FAIL_REASON, f"non-finite metric(s): {', '.join(bad)}")
    return values


class StopAfterFailures:
    """Counts consecutive FAIL trials of this run; ``stopped_reason`` is set at ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.stopped_reason: str | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.record(trial.state == TrialState.FAIL, trial.user_attrs.get(FAIL_REASON))

    def record(self, failed: bool, reason: str | None = None) -> None:
        """Count one finished trial; the first time ``limit`` failures in a row are reached, say why."""
        if not failed:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.limit and self.consecutive >= self.limit and self.stopped_reason is None:
            self.stopped_reason = (
                f"stopped after {self.consecutive} consecutive failed trials; last: {reason or 'see the log'}"
            )


WORKER = "worker"


def mark_worker(trial: optuna.Trial) -> None:
    """Record which process runs ``trial`` (host:pid), so a dead launcher's trial can be failed."""
    trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_abandoned_trials(study: optuna.Study, claims_locked: bool = False) -> list[int]:
    """Fail RUNNING trials whose process is gone: a dead process on this host at once,
    others once their heartbeat is older than the storage's grace period.

    ``claims_locked``: the caller holds the exclusive claim lock, under which every claimer
    marks its trial's worker right after asking for it; a RUNNING trial without that mark was
    then abandoned by a process that died while claiming it (it has no heartbeat either).
    """
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if claims_locked and WORKER not in trial.user_attrs:
            if fail_trial(study, trial.number, "abandoned: its launcher died while claiming it"):
                failed.append(trial.number)
            continue
        worker_host, _, pid = str(trial.user_attrs.get(WORKER, "")).rpartition(":")
        dead = worker_host == host and pid.isdigit() and not _process_alive(int(pid))
        if dead and fail_trial(study, trial.number, f"abandoned: process {pid} on {host} died"):
            failed.append(trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


def fail_trial(study: optuna.Study, number: int, reason: str) -> bool:
    """Store ``reason`` on RUNNING trial ``number`` and set it FAIL; False if it had finished.

    The one way lensnas fails a trial it is not telling the outcome of (Ctrl-C, a dead process,
    a dead Ray worker). It writes to the storage as ``optuna.storages.fail_stale_trials`` does,
    not through ``study.tell``: tell would run the sampler's ``after_trial``, which may call
    ``study.stop()`` (the grid sampler), an error outside ``study.optimize``.
    """
    storage = storage_of(study)
    trial_id = stored_trial_id(storage, study.study_name, number)
    try:  # the reason first: a finished trial accepts no attribute
        storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process finished or failed it meanwhile


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage ``study`` reads and writes (the one private Optuna access of lensnas).

    Optuna (4.4 to 5.0) has no public accessor for a study's storage: an asked ``optuna.Trial``
    has ``trial.storage``, a Study only the private ``_storage``. Failing a trial that another
    process runs needs it, to store the reason first (``study.tell`` stores no user attribute).
    """
    return study._storage


def stored_trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number`` of study ``study_name`` (public storage calls)."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


@contextlib.contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """Record the heartbeat of an asked trial while inside, as ``study.optimize`` does, so that
    other launchers can fail the trial as stale if this process dies (storages with heartbeats)."""
    storage = trial.storage
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if interval is None:
        yield
        return
    trial_id = stored_trial_id(storage, trial.study.study_name, trial.number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(timeout=interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def resolve_device(device: str, source: str = "training.device") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; SpecError (naming ``source``) for a
    CUDA device this machine does not have."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            has = f"{count} CUDA device(s)" if count else "no CUDA GPU visible to torch"
            raise SpecError(f"{source}: {device!r} asked for, this machine has {has}; "
                            'allowed here: "auto" or "cpu"' + (f", cuda:0..cuda:{count - 1}" if count else ""))
    return device
