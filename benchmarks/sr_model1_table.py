"""The Model-1 table of a finished SR study, beside DeepLense's published numbers.

    python -m benchmarks.sr_model1_table studies/sr_model1_cpu.toml \
        --storage sqlite:///lensnas.db --cache-dir ~/.cache/lensnas

For the study's best trial by PSNR gain (and ``--trial N`` if given), exported from the
storage and applied to the study's own test set: PSNR and SSIM in both conventions (ours:
scikit-image's Gaussian window, data range 1; the published: scikit-image's defaults, data range
of the SR image), their gain over bilinear beside the published RCAN's (30.50 dB against 24.78:
+5.72 dB; SSIM 0.570 against 0.303), the gain as a fraction of the noise ceiling (the noiseless
HR image against the noisy HR target, on the same test pairs: the simulation replayed from its
seed, checked against the cached targets), consistency_chi, and the lens-model recovery beside
the baselines' (HR target, LR input, bicubic, bilinear).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from rich.console import Console
from rich.table import Table

from lensnas import spaces
from lensnas.objectives.sr.data import (
    SIMULATION_BATCH,
    LensSimulator,
    normalized_pair,
    split_rng,
)
from lensnas.objectives.sr.metrics import psnr_per_image, ssim_per_image, ssim_published_per_image
from lensnas.objectives.training import predict
from lensnas.search.results.export import export_trial
from lensnas.search.spec import load_spec
from lensnas.spaces.loading import read_architecture

PUBLISHED = {"bilinear": (24.78, 0.303), "RCAN": (30.50, 0.570)}  # PSNR dB, SSIM (published convention)
LENS_KEYS = ("lens_theta_e_bias", "lens_theta_e_scatter", "lens_ellipticity_scatter", "lens_shear_scatter")


def noiseless_test_hr(objective: Any) -> np.ndarray:
    """The test split's noiseless HR images in the units of their noisy targets (each target's
    own min-max normalisation: what a perfect network would return), by replaying the
    simulation from the split's seed exactly as ``simulate_split`` drew it (N, 1, H, W)."""
    simulator = LensSimulator(objective.dataset_config()["simulation"])
    rng = split_rng(objective.data_seed, "test")
    count = len(objective.data["test_hr"])
    clean, targets = [], []
    for start in range(0, count, SIMULATION_BATCH):
        skies = np.stack([simulator.sky(*simulator.draw_parameters(rng))
                          for _ in range(min(SIMULATION_BATCH, count - start))])
        hr_clean, lr_clean = simulator.render_clean(skies)
        for hr, lr in zip(hr_clean, lr_clean):
            observed = simulator.observe(hr, lr, rng)
            targets.append(normalized_pair(observed)[1])
            low, span = float(observed.hr.min()), float(np.ptp(observed.hr))
            clean.append((hr - low) / span)
    replay = np.max(np.abs(np.array(targets)[:, None] - objective.data["test_hr"]))
    if replay > 1e-5:
        raise RuntimeError(f"the replayed test targets differ from the cached ones by {replay:g}")
    return np.array(clean)[:, None].astype(np.float32)


def image_scores(truth: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """Mean PSNR, SSIM (ours) and SSIM (published convention) over the test images."""
    estimate = np.clip(estimate, 0.0, 1.0)
    return {"psnr": float(np.mean(psnr_per_image(truth, estimate))),
            "ssim": float(np.mean(ssim_per_image(truth, estimate))),
            "ssim_published": float(np.mean(ssim_published_per_image(truth, estimate)))}


def main(argv: list[str] | None = None) -> None:
    """Parse the options, score the best trial and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_file")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--trial", type=int, action="append", default=[],
                        help="also score this trial (repeatable)")
    args = parser.parse_args(argv)
    spec = load_spec(args.study_file)
    objective = spec.make_objective(args.cache_dir, progress=False)
    objective.prepare()
    study = optuna.load_study(study_name=spec.name, storage=args.storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    index = spec.metrics.index("psnr_gain")
    best = max(complete, key=lambda t: t.values[index])
    chosen = [best] + [t for t in complete if t.number in args.trial and t.number != best.number]
    data = objective.data
    truth = data["test_hr"]
    rows: dict[str, dict[str, float]] = {}
    for mode in ("bilinear", "bicubic"):
        rows[mode] = {**image_scores(truth, data[f"test_{mode}"]),
                      "consistency_chi": objective.meta[mode].get("consistency_chi", math.nan)}
    clean = noiseless_test_hr(objective)
    rows["noiseless HR (ceiling)"] = image_scores(truth, clean)
    with tempfile.TemporaryDirectory() as folder:
        for trial in chosen:
            exported = export_trial(study, trial, args.storage, Path(folder) / f"trial-{trial.number}")
            model = spaces.load(exported)
            prediction = predict(model, data["test_lr"], 16, "cpu")
            backbone = read_architecture(exported)["config"].get("backbone", "?")
            label = f"trial {trial.number} ({backbone})"
            rows[label] = {**image_scores(truth, prediction),
                           "consistency_chi": float(trial.user_attrs.get("consistency_chi", math.nan)),
                           **{key: float(trial.user_attrs[key]) for key in LENS_KEYS
                              if key in trial.user_attrs}}
    baselines = {b.key: b.metrics for b in objective.baselines}
    for key, label in (("lens_hr_target", "HR target"), ("lens_lr_input", "LR input"),
                       ("lens_bicubic", "bicubic"), ("lens_bilinear", "bilinear")):
        if key in baselines:
            rows.setdefault(label, {}).update(baselines[key])
    bilinear, ceiling = rows["bilinear"], rows["noiseless HR (ceiling)"]
    console = Console(width=240)
    table = Table(title=f"{spec.name}: {len(truth)} test pairs; gains over bilinear")
    table.add_column("", no_wrap=True)
    for column in ("PSNR dB", "gain dB", "of ceiling", "SSIM", "gain", "SSIM published",
                   "gain", "consistency_chi", *LENS_KEYS):
        table.add_column(column, justify="right")
    for name, (psnr_value, ssim_value) in PUBLISHED.items():
        table.add_row(f"published {name}", f"{psnr_value:.2f}",
                      f"{psnr_value - PUBLISHED['bilinear'][0]:+.2f}", "", "", "", f"{ssim_value:.3f}",
                      f"{ssim_value - PUBLISHED['bilinear'][1]:+.3f}", *[""] * (1 + len(LENS_KEYS)))
    for name, row in rows.items():
        if "psnr" not in row:
            table.add_row(name, *[""] * 8, *(f"{row[k]:.4f}" if k in row else "" for k in LENS_KEYS))
            continue
        gain = row["psnr"] - bilinear["psnr"]
        fraction = gain / (ceiling["psnr"] - bilinear["psnr"])
        table.add_row(
            name, f"{row['psnr']:.2f}", f"{gain:+.2f}", f"{fraction:.0%}", f"{row['ssim']:.3f}",
            f"{row['ssim'] - bilinear['ssim']:+.3f}", f"{row['ssim_published']:.3f}",
            f"{row['ssim_published'] - bilinear['ssim_published']:+.3f}",
            f"{row.get('consistency_chi', math.nan):.2f}",
            *(f"{row[k]:.4f}" if k in row else "" for k in LENS_KEYS))
    console.print(table)


if __name__ == "__main__":
    main()
