"""The reference-estimator baseline table (``lensnas baseline STUDY_FILE [--noise ...]``).

For each noise level, the study's test set is simulated (the same galaxies as the shear
objective's test split: same seed, same count, rendered at +g and -g with the same noise),
every available reference estimator is run on it once (cached on disk), and the table shows
RMSE, the multiplicative and additive biases (noise-cancelling paired protocol, jackknife
errors), failed objects and throughput per CPU core.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from lensnas.objectives import ngmix_backend
from lensnas.objectives.cache import config_hash
from lensnas.objectives.reference import cached_measure, is_available
from lensnas.objectives.shear_data import (
    SPLITS,
    GalaxySimulation,
    simulate_split,
    simulation_config,
)
from lensnas.objectives.shear_metrics import linear_bias, paired_bias, rmse
from rich.console import Console
from rich.table import Table

BASELINE_ESTIMATORS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("metacal", "metacal", {}),
    ("hsm REGAUSS", "hsm", {"method": "REGAUSS"}),
    ("hsm KSB", "hsm", {"method": "KSB"}),
    ("ngmix admom", "ngmix", {"fitter": "admom"}),
)


def paired_test_key(simulation: GalaxySimulation, test_count: int, seed: int) -> str:
    """Content key of the paired test split of ``simulation`` drawn from study seed ``seed``."""
    config = {
        "simulation": simulation_config(simulation),
        "seed": seed,
        "count": test_count,
        "split": "test",
        "paired": True,
        "version": 1,
    }
    return config_hash(config)


def simulate_paired_test(
    simulation: GalaxySimulation, test_count: int, seed: int, progress: bool = False
) -> dict[str, np.ndarray]:
    """The shear objective's test split for study seed ``seed`` (paired: +g and -g images)."""
    from rich.progress import Progress

    test_seed = np.random.SeedSequence(seed).spawn(len(SPLITS))[SPLITS.index("test")]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"simulating {test_count} test galaxies at ±g", total=2 * test_count)
        return simulate_split(
            simulation,
            test_seed,
            test_count,
            paired=True,
            on_progress=lambda n: bar.advance(task, n),
        )


def _row(label: str, noise: float, plus: Any, minus: Any, labels: np.ndarray) -> dict[str, Any]:
    ok = plus.ok & minus.ok
    row: dict[str, Any] = {
        "estimator": label,
        "name": plus.name,
        "settings": dict(plus.settings),
        "noise_sigma": noise,
        "n": plus.n,
        "n_failed": int(plus.n - np.count_nonzero(ok)),
        "galaxies_per_core_second": (plus.n + minus.n) / (plus.core_seconds + minus.core_seconds),
        "cached": bool(plus.cache_hit and minus.cache_hit),
    }
    if np.count_nonzero(ok) < 3:
        return row
    rmse_g1, rmse_g2, rmse_all = rmse(plus.g[ok], labels[ok])
    row.update(rmse_g1=rmse_g1, rmse_g2=rmse_g2, rmse=rmse_all)
    row.update(paired_bias(plus.g[ok], minus.g[ok], labels[ok]).as_dict())
    row.update(linear_bias(plus.g[ok], labels[ok]).as_dict(prefix="linear_"))
    return row


def baseline_rows(
    simulation: GalaxySimulation,
    test_count: int,
    seed: int,
    noise_levels: list[float] | None,
    cache_dir: str | os.PathLike | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """One row per (available estimator, noise level) on the study's paired test set.

    ``noise_levels`` replaces the simulation's ``noise_sigma`` (None: use it as is). Row keys:
    estimator, noise_sigma, n, n_failed, rmse_g1, rmse_g2, rmse, m1, m1_err, m2, m2_err,
    c1, c1_err, c2, c2_err (paired protocol), linear_m1 ... (line fit), galaxies_per_core_second,
    cached.
    """
    levels = [simulation.noise_sigma] if noise_levels is None else [float(x) for x in noise_levels]
    rows = []
    for noise in levels:
        noisy = dataclasses.replace(simulation, noise_sigma=noise)
        data = simulate_paired_test(noisy, test_count, seed, progress)
        key = paired_test_key(noisy, test_count, seed)
        psf = noisy.psf_image()
        for label, name, settings in BASELINE_ESTIMATORS:
            if not is_available(name):
                continue
            common = dict(cache_dir=cache_dir, progress=progress, **settings)
            plus = cached_measure(
                name, data["images"], psf, noisy.pixel_scale, noise, dataset_key=f"{key}+", **common
            )
            minus = cached_measure(
                name,
                data["images_minus"],
                psf,
                noisy.pixel_scale,
                noise,
                dataset_key=f"{key}-",
                **common,
            )
            rows.append(_row(label, noise, plus, minus, data["labels"]))
    return rows


def _with_error(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:+.2e} ± {row[key + '_err']:.1e}"


def print_baseline(rows: list[dict[str, Any]], console: Console) -> None:
    """Rich table of :func:`baseline_rows`."""
    table = Table(
        title="Reference shear estimators on the test set",
        caption="m, c: paired ±g protocol, jackknife errors; speed: galaxies per CPU-core second",
    )
    for column in ("estimator", "noise σ", "RMSE g1", "RMSE g2", "m1", "m2", "c1", "c2"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    table.add_column("failed", justify="right")
    table.add_column("gal/s/core", justify="right")
    for row in rows:
        table.add_row(
            row["estimator"] + (" (cached)" if row.get("cached") else ""),
            f"{row['noise_sigma']:.0e}",
            f"{row['rmse_g1']:.2e}" if "rmse_g1" in row else "-",
            f"{row['rmse_g2']:.2e}" if "rmse_g2" in row else "-",
            _with_error(row, "m1"),
            _with_error(row, "m2"),
            _with_error(row, "c1"),
            _with_error(row, "c2"),
            f"{row['n_failed']}/{row['n']}",
            f"{row['galaxies_per_core_second']:.1f}",
        )
    console.print(table)
    if not is_available("ngmix"):
        console.print(f"[dim]ngmix row skipped: {ngmix_backend.INSTALL_HINT}[/dim]")
