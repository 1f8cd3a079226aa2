"""What running trials through Ray costs next to the local executor, measured in one run.

    python -m benchmarks.executor_overhead [--trials 20] [--shear-trials 8]

1. Framework overhead per trial: a trial that does almost nothing (the ``noop`` objective
   registered below), run N times, one at a time, by each executor against SQLite. Per trial:
   the span from the first trial's start to the last one's end, over N; fixed per launch: the
   executor's wall time less that span (Ray: starting trial actors). ``ray.init`` is timed
   apart; the Ray runs share one started Ray.
2. Throughput of a small real shear trial (1500 GalSim stamps, a small CNN, 3 epochs): Ray
   with 1 CPU per trial and 1 vs 2 trials at once, and the local executor (one trial, all
   cores), in trials per minute over the same span.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import optuna
import ray
from rich.console import Console
from rich.table import Table

from lensnas.objectives import Metric, Objective, ValidationScore, register_objective
from lensnas.search.executors.local import run_local
from lensnas.search.executors.ray_driver import run_ray
from lensnas.search.spec import StudySpec, load_spec
from lensnas.search.storage import open_storage
from lensnas.search.study import open_study
from lensnas.spaces.shear.cnn import SHEAR_CNN

NOOP_STUDY = """
[study]
name = "{name}"
objective = "noop"
sampler = "random"
pruner = "none"
n_trials = {n_trials}

[space]
learning_rate = {{ type = "float", low = 1e-4, high = 1e-2, log = true }}
"""

SHEAR_STUDY = """
[study]
name = "{name}"
objective = "shear"
sampler = "random"
pruner = "none"
n_trials = {n_trials}
seed = 7

[objective]
n_train = 1500
n_validation = 300
n_test = 200
stamp_size = 25
pixel_scale = 0.2
reference = "none"

[training]
epochs = 3
batch_size = 32

[space]
depth = 2
width = 8
pooling = "avg"
head = "gap"
learning_rate = {{ type = "float", low = 1e-3, high = 3e-3, log = true }}
"""


class NoopObjective(Objective):
    """A trial that does almost nothing: all of its time is the executor's."""

    name = "noop"
    family = SHEAR_CNN
    METRICS: ClassVar[dict[str, Metric]] = {"loss": Metric("minimize", "the learning rate", True)}
    DEFAULT_METRIC = "loss"
    VALIDATION_SCORE = ValidationScore("the learning rate", "minimize", "loss")

    def prepare(self) -> None:
        """Nothing to prepare."""

    def dataset_config(self) -> dict[str, Any]:
        """No data."""
        return {}

    def run_trial(self, params: dict[str, Any], ctx: Any) -> dict[str, float]:
        """Report one intermediate value and return the learning rate as the loss."""
        ctx.report(1, float(params["learning_rate"]))
        return {"loss": float(params["learning_rate"])}


register_objective("noop", NoopObjective)


def _spec(folder: Path, template: str, name: str, n_trials: int) -> StudySpec:
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(template.format(name=name, n_trials=n_trials)))
    return load_spec(path)


def _run(executor: str, spec: StudySpec, folder: Path, **options: Any) -> tuple[float, float]:
    """(wall seconds of the executor, seconds from first trial start to last trial end)."""
    url = f"sqlite:///{folder}/{spec.name}.db"
    study = open_study(spec, open_storage(url))
    objective = spec.make_objective(folder / "cache", progress=False)
    objective.prepare()
    common = {"artifact_root": folder / "artifacts", "quiet": True}
    started = time.perf_counter()
    if executor == "ray":
        run_ray(spec, study, objective, storage_url=url, **common, **options)
    else:
        run_local(spec, study, objective, storage_url=url, device="cpu", **common)
    wall = time.perf_counter() - started
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == spec.n_trials and all(t.datetime_complete for t in trials)
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return wall, (end - start).total_seconds()


def main(argv: list[str] | None = None) -> None:
    """Run both measurements and print them as tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="noop trials per executor")
    parser.add_argument("--shear-trials", type=int, default=8)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    console = Console()
    n = args.trials
    cores = os.cpu_count()
    console.print(f"{cores} CPU cores, load average {os.getloadavg()[0]:.1f} at start")

    with tempfile.TemporaryDirectory(prefix="lensnas-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        ray_init = time.perf_counter() - started
        try:
            overhead = {}
            for executor in ("local", "ray"):
                spec = _spec(folder, NOOP_STUDY, f"noop-{executor}", n)
                options = {"max_concurrent": 1} if executor == "ray" else {}
                wall, span = _run(executor, spec, folder, **options)
                overhead[executor] = (span / n, wall - span)
            table = Table(title=f"framework overhead: {n} noop trials, one at a time")
            for column in ("executor", "per trial (s)", "fixed per launch (s)"):
                table.add_column(column, justify="right")
            for executor, (per_trial, fixed) in overhead.items():
                table.add_row(executor, f"{per_trial:.3f}", f"{fixed:.1f}")
            table.add_row("ray.init", "", f"{ray_init:.1f}")
            console.print(table)
            ratio = overhead["ray"][0] / overhead["local"][0]
            console.print(f"ray / local per-trial overhead: {ratio:.1f}x")

            n = args.shear_trials
            rates = {}
            for label, executor, options in (
                ("local (1 at a time, all cores)", "local", {}),
                ("ray, 1 at a time, 1 CPU each", "ray", {"max_concurrent": 1}),
                ("ray, 2 at a time, 1 CPU each", "ray", {"max_concurrent": 2}),
            ):
                name = f"shear-{executor}-{options.get('max_concurrent', 0)}"
                wall, span = _run(executor, _spec(folder, SHEAR_STUDY, name, n), folder, **options)
                rates[label] = (60.0 * n / span, wall)
            table = Table(title=f"throughput, small shear trial ({n} trials)")
            for column in ("run", "trials / minute", "wall (s)"):
                table.add_column(column, justify="right")
            for label, (rate, seconds) in rates.items():
                table.add_row(label, f"{rate:.2f}", f"{seconds:.1f}")
            console.print(table)
            one, two = (rates[k][0] for k in list(rates)[1:])
            console.print(f"ray 2 at a time / 1 at a time: {two / one:.2f}x throughput")
            console.print(f"load average {os.getloadavg()[0]:.1f} at the end")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
