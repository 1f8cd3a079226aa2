"""Draw docs/images/quickstart.png from a real run of studies/quickstart.toml.

    python docs/make_figure.py                          # runs the quickstart in a temporary folder
    python docs/make_figure.py --storage sqlite:///lensnas.db   # or reads (and finishes) yours

Left: the RMSE of g of every trial of the quickstart study, the best so far, and the study's
baseline rows (metacal with each galaxy by its own response, metacal with the mean response,
the Cramér-Rao bound). Right: the best trial's exported network applied to galaxies it has
never seen (the study's simulation, another seed): measured against true g1 and g2.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
from optuna.trial import TrialState

from lensnas import spaces
from lensnas.objectives.shear.data import GalaxySimulation, simulate_split
from lensnas.search import launch
from lensnas.search.results.export import export_study

REPOSITORY = Path(__file__).resolve().parents[1]
STUDY_FILE = REPOSITORY / "studies" / "quickstart.toml"
OUTPUT = REPOSITORY / "docs" / "images" / "quickstart.png"
NEW_GALAXIES = 400
NEW_SEED = 2027  # not the study's seed: these galaxies were never trained or scored on


def new_galaxies(objective_options: dict, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` stamps (N, 1, H, W) of the study's simulation drawn from ``seed``, and their g."""
    fields = {f.name for f in dataclasses.fields(GalaxySimulation)}
    simulation = GalaxySimulation(**{k: v for k, v in objective_options.items() if k in fields})
    split = simulate_split(simulation, np.random.SeedSequence(seed), count)
    return split["images"][:, None], split["labels"]


def draw(study, storage: str, output: Path, work: Path) -> None:
    trials = [t for t in study.trials if t.value is not None
              and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    numbers = [t.number for t in trials]
    best = np.minimum.accumulate([t.value if t.state == TrialState.COMPLETE else np.inf
                                  for t in trials])

    folder = export_study(study, storage, work / "best", top=1)[0]
    model = spaces.load(folder)
    options = study.user_attrs["spec"]["objective"]
    images, truth = new_galaxies(options, NEW_GALAXIES, NEW_SEED)
    with torch.no_grad():
        measured = model(torch.from_numpy(images)).numpy()
    rmse = float(np.sqrt(np.mean((measured - truth) ** 2)))

    figure, (left, right) = plt.subplots(1, 2, figsize=(9.2, 4.4), dpi=100)
    for state, marker, label in ((TrialState.COMPLETE, "o", "trial"),
                                 (TrialState.PRUNED, "x", "pruned trial (last validation)")):
        chosen = [t for t in trials if t.state == state]
        if chosen:
            left.scatter([t.number for t in chosen], [t.value for t in chosen], marker=marker,
                         color="C0", label=label, zorder=3)
    left.step(numbers, best, where="post", color="C0", alpha=0.6, label="best so far")
    styles = {"reference_object": "C1", "reference": "C2", "bound": "C3"}
    for row in study.user_attrs.get("baselines", []):
        rmse_row = row.get("metrics", {}).get("rmse")
        if rmse_row is None or row.get("conditions"):
            continue
        color = styles.get(row["key"], "grey")
        left.axhline(rmse_row, color=color, linestyle="--", linewidth=1, label=row["name"])
    left.set_yscale("log")
    left.set_xlabel("trial")
    left.set_ylabel("RMSE of g on the test set")
    left.set_title(f"{study.study_name}: {len(study.trials)} trials", fontsize=10)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)

    lim = float(np.abs(truth).max()) * 1.1
    for component, color in ((0, "C0"), (1, "C1")):
        right.scatter(truth[:, component], measured[:, component], s=5, alpha=0.6, color=color,
                      label=f"g{component + 1}")
    right.plot([-lim, lim], [-lim, lim], color="black", linewidth=0.8)
    right.set_xlim(-lim, lim)
    right.set_ylim(-lim, lim)
    right.set_aspect("equal")
    right.set_xlabel("true shear")
    right.set_ylabel("network's shear")
    right.set_title(f"best trial ({folder.name}) on {NEW_GALAXIES} new galaxies: "
                    f"RMSE {rmse:.2g}", fontsize=10)
    right.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    print(f"{output}: best trial {folder.name}, RMSE {rmse:.3g} on {NEW_GALAXIES} new galaxies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="the study's storage URL (default: a temporary SQLite)")
    parser.add_argument("--cache-dir", help="dataset cache (default: lensnas's)")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        storage = args.storage or f"sqlite:///{Path(work) / 'lensnas.db'}"
        study = launch(STUDY_FILE, storage, quiet=True, cache_dir=args.cache_dir)
        draw(study, storage, args.output, Path(work))


if __name__ == "__main__":
    main()
