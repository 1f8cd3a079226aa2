"""Speed and accuracy of the reference shear estimators, side by side on the same galaxies.

    python -m benchmarks.reference_speed [--count 1000] [--noise 1e-5] [--workers N]

Galaxies: round exponentials, half-light radius 0.5", Moffat PSF (beta 2.5, FWHM 0.9"),
0.2"/pixel, 53x53 stamps, |g| <= 0.1, pixel noise relative to unit flux. Prints galaxies
per CPU-core second, RMSE and m/c (least-squares line, standard errors) for the built-in
metacal (with and without its noise correction), HSM REGAUSS and KSB, and NGMix metacal
when ngmix is installed, plus the speed ratio of the built-in metacal to NGMix.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from lensnas.objectives.shear import ngmix_backend
from lensnas.objectives.shear.data import metacal_benchmark_simulation, simulate_split
from lensnas.objectives.shear.metrics import linear_bias, rmse
from lensnas.objectives.shear.reference import cpu_count, is_available, measure

ESTIMATORS = (
    ("metacal", "metacal", {}),
    ("metacal + noise fix", "metacal", {"fix_noise": True}),
    ("hsm REGAUSS", "hsm", {"method": "REGAUSS"}),
    ("hsm KSB", "hsm", {"method": "KSB"}),
    ("ngmix admom", "ngmix", {"fitter": "admom"}),
)


def run(
    count: int, noise_sigma: float, workers: int, seed: int, progress: bool = True
) -> list[dict]:
    """Measure every available estimator on the same ``count`` galaxies; one dict per estimator."""
    simulation = metacal_benchmark_simulation(noise_sigma)
    data = simulate_split(simulation, np.random.SeedSequence(seed), count)
    psf = simulation.psf_image()
    rows = []
    for label, name, settings in ESTIMATORS:
        if not is_available(name):
            continue
        result = measure(
            name,
            data["images"],
            psf,
            simulation.pixel_scale,
            noise_sigma,
            workers=workers,
            progress=progress,
            **settings,
        )
        ok = result.ok
        rmse_g1, rmse_g2, _ = rmse(result.g[ok], data["labels"][ok])
        bias = linear_bias(result.g[ok], data["labels"][ok])
        rows.append(
            {
                "estimator": label,
                "galaxies_per_core_second": result.galaxies_per_core_second,
                "seconds": result.seconds,
                "workers": result.workers,
                "n_failed": result.n_failed,
                "rmse_g1": rmse_g1,
                "rmse_g2": rmse_g2,
                **bias.as_dict(),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference_speed")
    parser.add_argument("--count", type=int, default=1000, help="galaxies (default 1000)")
    parser.add_argument("--noise", type=float, default=1e-5, help="pixel noise sigma")
    parser.add_argument("--workers", type=int, default=cpu_count(), help="processes (default all)")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    rows = run(args.count, args.noise, args.workers, args.seed, progress=console.is_terminal)
    table = Table(title=f"{args.count} galaxies, noise σ={args.noise:g}, {args.workers} workers")
    for column in ("estimator", "gal/s/core", "wall s", "RMSE g1", "RMSE g2", "m1", "m2", "failed"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for row in rows:
        table.add_row(
            row["estimator"],
            f"{row['galaxies_per_core_second']:.1f}",
            f"{row['seconds']:.1f}",
            f"{row['rmse_g1']:.2e}",
            f"{row['rmse_g2']:.2e}",
            f"{row['m1']:+.2e} ± {row['m1_err']:.1e}",
            f"{row['m2']:+.2e} ± {row['m2_err']:.1e}",
            str(row["n_failed"]),
        )
    console.print(table)
    speed = {row["estimator"]: row["galaxies_per_core_second"] for row in rows}
    if "ngmix admom" in speed:
        ratio = speed["metacal"] / speed["ngmix admom"]
        console.print(f"built-in metacal / NGMix metacal speed per core: {ratio:.2f}")
    else:
        console.print(f"[dim]ngmix not measured: {ngmix_backend.INSTALL_HINT}[/dim]")
    ratio = speed["hsm REGAUSS"] / speed["metacal"]
    console.print(f"HSM REGAUSS / built-in metacal speed per core: {ratio:.1f}")


if __name__ == "__main__":
    main()
