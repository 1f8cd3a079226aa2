"""Export networks that return an uncertainty, and calibrate it on the study's test set.

``lensnas export STUDY --ensemble K`` exports the top K trials as one deep ensemble; ``--seeds
K`` the best trial (or ``--trial N``) with K - 1 copies retrained by the objective's own trial
code under other training seeds; ``--mc-dropout N`` the trial's network with N fixed dropout
masks (it must have been trained with ``dropout`` > 0). Each writes ONE folder, loaded and
exported like any other (:mod:`lensnas.spaces.ensemble`): its network returns the mean of
each output and then its sigma (the spread), and ``lensnas predict`` writes them as columns.

Calibration, on the study's test set: the fraction of (example, output) pairs whose truth lies
within 1 and 2 sigma of the mean (68.3% and 95.4% for calibrated Gaussian errors) and the ratio
of predicted to actual scatter (RMS sigma over the RMSE of the mean: 1 when calibrated on
average), beside the same numbers for the reference estimator's own per-example errors where
the objective gives them. They go into the export's model card and into the study (user
attribute ``uncertainty``), which the report shows.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from lensnas import spaces
from lensnas.objectives.base import LocalContext, ReferenceErrors
from lensnas.objectives.report_html import format_value, lensnas_version, metric_rows
from lensnas.objectives.training import predict
from lensnas.search.artifacts import artifact_store, download_trial_artifacts
from lensnas.search.results.export import (
    MODEL_CARD,
    ONNX,
    TORCHSCRIPT,
    ExportError,
    data_configuration,
    example_input,
    input_description,
    max_differences,
    onnx,
    study_objective,
    study_spec,
    torchscript,
)
from lensnas.search.results.sections import (
    CALIBRATION_HEADER,
    CALIBRATION_NOTE,
    UNCERTAINTY_ATTR,
    calibration_rows,
)
from lensnas.search.storage import redact
from lensnas.search.study import resolve_device
from lensnas.search.summary import best_trials, markdown_table
from lensnas.spaces.dimensions import suggest
from lensnas.spaces.ensemble import ENSEMBLE_SUFFIX, Ensemble, MCDropout
from lensnas.spaces.errors import OptionError
from lensnas.spaces.loading import ARCHITECTURE_FILE, HEADER_KEYS, WEIGHTS_FILE, read_architecture

GAUSSIAN_WITHIN = {1: 0.6827, 2: 0.9545}  # fractions within 1 and 2 sigma of a Gaussian
MC_BATCH_STAMPS = 2048  # MC dropout runs batch x samples stamps at once: keep that below this


class MeanOf(nn.Module):
    """The first ``columns`` outputs of an uncertainty network: its mean alone (for scoring)."""

    def __init__(self, network: nn.Module, columns: int):
        super().__init__()
        self.network, self.columns = network, columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[:, : self.columns]


def calibration(values: np.ndarray, sigmas: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Coverage and scatter of 1-sigma errors ``sigmas`` on estimates ``values`` of ``truth``
    (all (N, C)); examples with a non-finite value or sigma are left out (``n`` counts those
    kept)."""
    values, sigmas, truth = (np.asarray(a, dtype=np.float64) for a in (values, sigmas, truth))
    kept = np.all(np.isfinite(values) & np.isfinite(sigmas), axis=1)
    error, sigma = values[kept] - truth[kept], sigmas[kept]
    if not len(error):
        return {"n": 0.0}
    rmse = float(np.sqrt(np.mean(error**2)))
    sigma_rms = float(np.sqrt(np.mean(sigma**2)))
    within = {k: float(np.mean(np.abs(error) <= k * sigma)) for k in GAUSSIAN_WITHIN}
    return {
        "n": float(len(error)), "within_1sigma": within[1], "within_2sigma": within[2],
        "scatter_ratio": sigma_rms / rmse if rmse > 0 else float("nan"),
        "sigma_rms": sigma_rms, "rmse": rmse,
    }


# ----------------------------------------------------------------------------- members


@dataclass
class Member:
    """One network of an uncertainty export: where it comes from, its architecture, the network
    with its weights, its own test metrics and its training seed."""

    label: str
    spec: dict[str, Any]
    network: nn.Module
    metrics: dict[str, Any]
    seed: Any


def stored_member(trial: FrozenTrial, storage_url: str, folder: Path) -> Member:
    """A completed trial's network from the artifact store."""
    download_trial_artifacts(trial, artifact_store(storage_url), folder,
                             (ARCHITECTURE_FILE, WEIGHTS_FILE))
    if not (folder / WEIGHTS_FILE).is_file():
        raise ExportError(f"trial {trial.number}: no stored {ARCHITECTURE_FILE} and "
                          f"{WEIGHTS_FILE} in the artifact store")
    preset = f" (preset {trial.user_attrs['preset']})" if "preset" in trial.user_attrs else ""
    return Member(f"trial {trial.number}{preset}", read_architecture(folder),
                  spaces.load(folder), dict(trial.user_attrs), trial.user_attrs.get("seed"))


def retrained_member(study: optuna.Study, objective: Any, trial: FrozenTrial, seed: int,
                     device: str, folder: Path) -> Member:
    """The trial's configuration trained again under training seed ``seed`` by the objective's
    own trial code (train, score, save)."""
    params = suggest(optuna.trial.FixedTrial(trial.params), list(study_spec(study).space))
    metrics = objective.run_trial(params, LocalContext(device=device, artifact_dir=folder,
                                                       seed=seed))
    return Member(f"trial {trial.number} retrained, seed {seed}", read_architecture(folder),
                  spaces.load(folder), metrics, seed)


def member_seeds(trial: FrozenTrial, count: int) -> list[int]:
    """``count`` training seeds for retrained copies of ``trial``, derived from its own."""
    own = int(trial.user_attrs.get("seed", trial.number))
    return [int(np.random.SeedSequence([own, k]).generate_state(1)[0]) for k in range(1, count + 1)]


def chosen_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """Trial ``number`` (completed), or the study's best."""
    if number is None:
        best = best_trials(study, 1)
        if not best:
            raise ExportError(f"study '{study.study_name}' has no completed trial to export")
        return best[0]
    complete = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if number not in complete:
        raise OptionError(f"--trial: study '{study.study_name}' has no completed trial {number}; "
                          f"completed: {', '.join(map(str, sorted(complete))) or 'none'}")
    return complete[number]


def has_dropout(network: nn.Module) -> bool:
    """Whether ``network`` has a dropout layer that drops anything."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in network.modules())


# ----------------------------------------------------------------------------- export


def export_uncertainty(
    study: optuna.Study, storage_url: str, output: str | Path = "best", *,
    ensemble: int | None = None, seeds: int | None = None, mc_dropout: int | None = None, trial_number: int | None = None,
    cache_dir: str | Path | None = None, device: str = "auto",
) -> Path:
    """Export one network with an uncertainty (deep ensemble of the top ``ensemble`` trials,
    ``seeds`` training seeds of one trial, or ``mc_dropout`` dropout masks of one trial) into a
    folder under ``output``, calibrated on the test set; returns the folder."""
    chosen = {name: value for name, value in
              (("--ensemble", ensemble), ("--seeds", seeds), ("--mc-dropout", mc_dropout))
              if value is not None}
    if len(chosen) != 1:
        raise OptionError("give one of --ensemble K, --seeds K or --mc-dropout N")
    (flag, count), = chosen.items()
    if count < 2:
        raise OptionError(f"{flag}: must be at least 2 (a spread needs two), got {count}")
    if ensemble is not None and trial_number is not None:
        raise OptionError("--trial: goes with --seeds or --mc-dropout (--ensemble takes the top K)")
    ensemble, seeds, mc_dropout = ensemble or 0, seeds or 0, mc_dropout or 0  # the others: 0
    device = resolve_device(device, "--device")
    family = spaces.family(study_objective_family(study))
    try:
        ensemble_family = spaces.family(family.name + ENSEMBLE_SUFFIX)
    except KeyError:
        raise ExportError(f"model family {family.name} has no ensemble family: uncertainties "
                          "are for networks that return numbers") from None
    objective = study_objective(study, cache_dir)
    with tempfile.TemporaryDirectory(prefix="lensnas-uncertainty-") as scratch:
        scratch = Path(scratch)
        if ensemble:
            trials = best_trials(study, ensemble)
            if len(trials) < ensemble:
                raise ExportError(f"--ensemble {ensemble}: study '{study.study_name}' has only "
                                  f"{len(trials)} completed trial(s)")
            members = [stored_member(t, storage_url, scratch / f"trial-{t.number}") for t in trials]
            name = f"ensemble-top-{ensemble}"
            label = f"deep ensemble of the top {ensemble} trials ({', '.join(m.label for m in members)})"
        else:
            trial = chosen_trial(study, trial_number)
            members = [stored_member(trial, storage_url, scratch / f"trial-{trial.number}")]
            if seeds:
                for seed in member_seeds(trial, seeds - 1):
                    members.append(retrained_member(study, objective, trial, seed, device,
                                                    scratch / f"seed-{seed}"))
                name = f"trial-{trial.number}-seeds-{seeds}"
                copies = "1 copy" if seeds == 2 else f"{seeds - 1} copies"
                label = f"trial {trial.number} and {copies} retrained under other training seeds"
            else:
                if not has_dropout(members[0].network):
                    raise ExportError(
                        f"trial {trial.number}: its network has no dropout (dropout = 0); MC "
                        "dropout needs a trial trained with dropout > 0 (a dropout dimension "
                        "in [space]); choose one with --trial N")
                name = f"trial-{trial.number}-mc-dropout-{mc_dropout}"
                label = f"MC dropout of trial {trial.number} ({mc_dropout} fixed masks)"
        seed = int(study.user_attrs.get("seed", 0))
        spec = ensemble_spec(ensemble_family.name, ensemble_family.version,
                             [m.spec for m in members], mc_dropout, seed)
        networks = [m.network for m in members]
        if mc_dropout:
            example, _, _ = example_input(members[0].spec, batch=1)
            model = MCDropout(networks[0], mc_dropout, seed, example).eval()
        else:
            model = Ensemble(networks).eval()
        folder = Path(output) / name
        write_network(model, spec, folder)
        columns = family.output_columns
        calibrated = calibrate(objective, model, members, len(columns), device,
                               mc_dropout or 1)
    differences = max_differences(spaces.load(folder), folder, spec)
    record = {"name": name, "label": label, "method": next(iter(chosen)).lstrip("-"),
              "members": [m.label for m in members], **calibrated}
    (folder / MODEL_CARD).write_text(
        uncertainty_card(study, storage_url, record, members, spec, differences), encoding="utf-8")
    stored = dict(study.user_attrs.get(UNCERTAINTY_ATTR) or {})
    stored[name] = json.loads(json.dumps(record, default=float))
    study.set_user_attr(UNCERTAINTY_ATTR, stored)
    return folder


def study_objective_family(study: optuna.Study) -> str:
    """The name of the model family the study's objective searches."""
    from lensnas.objectives import objective_class

    return objective_class(str(study.user_attrs.get("objective"))).family.name


def ensemble_spec(family_name: str, version: int, members: list[dict[str, Any]],
                  mc_dropout: int, seed: int) -> dict[str, Any]:
    """The architecture.json of an uncertainty export: the members' architectures, and the first
    member's input (build arguments and training inputs) repeated for input checks."""
    first = {key: value for key, value in members[0].items() if key not in HEADER_KEYS}
    return {"family": family_name, "version": version,
            "config": {"members": members, "mc_dropout_samples": mc_dropout, "seed": seed},
            **first}


def write_network(model: nn.Module, spec: dict[str, Any], folder: Path) -> None:
    """architecture.json, weights.pt, TorchScript and ONNX of ``model`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ARCHITECTURE_FILE).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    x, input_axes, output_axes = example_input(spec)
    with torch.no_grad():
        torchscript(model, x, folder / TORCHSCRIPT)
        onnx(model, x, (input_axes, output_axes), folder / ONNX)


def calibrate(objective: Any, model: nn.Module, members: list[Member], columns: int, device: str,
              samples: int) -> dict[str, Any]:
    """The mean's test metrics (the objective's own scoring), the calibration of the sigmas and
    of the reference estimator's errors, on the test set."""
    inputs, truth = objective.examples("test")
    batch = max(1, min(256, MC_BATCH_STAMPS // samples))
    model = model.to(device)
    outputs = predict(model, inputs, batch, device)
    config = objective.config({})
    config["batch_size"] = batch
    context = LocalContext(device=device)
    metrics = objective.score(MeanOf(model, columns), config, context)
    reference = objective.reference_errors()
    return {
        "calibration": calibration(outputs[:, :columns], outputs[:, columns:], truth),
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
        "reference": reference_record(reference, truth),
        "member_metrics": [{k: m.metrics.get(k) for k in ("rmse",) if k in m.metrics}
                           for m in members],
        "member_seeds": [m.seed for m in members],
    }


def reference_record(reference: ReferenceErrors | None, truth: np.ndarray) -> dict[str, Any]:
    """The reference estimator's calibration (or why there is none), for storing."""
    if reference is None:
        return {"name": "reference", "unavailable": "the objective gives no reference errors"}
    if reference.unavailable or reference.estimates is None or reference.sigmas is None:
        return {"name": reference.name, "description": reference.description,
                "unavailable": reference.unavailable or "no per-example errors"}
    return {"name": reference.name, "description": reference.description,
            "calibration": calibration(reference.estimates, reference.sigmas, truth)}


# ----------------------------------------------------------------------------- card and report


def uncertainty_card(study: optuna.Study, storage_url: str, record: dict[str, Any],
                     members: list[Member], spec: dict[str, Any],
                     differences: dict[str, float]) -> str:
    """MODEL_CARD.md of an uncertainty export: members, the mean's metrics, the calibration."""
    attrs = study.user_attrs
    member_rows = [(m.label, str(m.seed), format_value(m.metrics.get("rmse"))) for m in members]
    metric_table = markdown_table(("metric", "value", "error"), [
        (name, format_value(value), "" if error is None else f"{error:.2e}")
        for name, value, error in metric_rows(record["metrics"], ("rmse",))
    ])
    reference = record["reference"]
    checks = ", ".join(f"{k} max |difference| {v:.1e}" for k, v in differences.items())
    columns = spaces.family(spec["family"]).output_columns
    lines = [
        f"# {study.study_name}: {record['label']}",
        "",
        (f"One network returning ({', '.join(columns)}): the mean of its members' outputs, "
         f"then their spread (sigma). Family `{spec['family']}` version {spec['version']}; "
         f"exported by lensnas {lensnas_version()}."),
        "",
        f"- study: `{study.study_name}` in `{redact(storage_url)}`, objective `{attrs.get('objective')}`",
        f"- dataset key: `{attrs.get('dataset_key', '?')}`",
        "",
        "## Members",
        "",
        markdown_table(("member", "training seed", "its test RMSE"), member_rows),
        "",
        "## Metrics of the mean (test set)",
        "",
        metric_table,
        "",
        "## Calibration of sigma (test set)",
        "",
        markdown_table(CALIBRATION_HEADER, calibration_rows(record, "this export")),
        "",
        CALIBRATION_NOTE,
        "",
        f"Reference: {reference.get('description') or reference.get('unavailable', '')}",
        "",
        "## Data configuration",
        "",
        "```json",
        json.dumps(data_configuration(study), indent=1, default=str),
        "```",
        "",
        "## Input and output",
        "",
        input_description(spec),
        "",
        "## Files",
        "",
        (f"- `{ARCHITECTURE_FILE}` (the members' architectures under `config.members`), "
         f"`{WEIGHTS_FILE}`: PyTorch"),
        f"- `{TORCHSCRIPT}`: TorchScript (traced); `{ONNX}`: ONNX (input `input`, output `output`)",
        f"- checked on a random input against PyTorch: {checks}",
        "",
        "## How to load",
        "",
        "```python",
        "import torch",
        "",
        "from lensnas import spaces",
        "from lensnas.search.results.export import example_input",
        "",
        'folder = "."  # this card\'s folder',
        "model = spaces.load(folder)  # nn.Module in eval mode",
        "x, _, _ = example_input(spaces.loading.read_architecture(folder))",
        "with torch.no_grad():",
        "    y = model(x)",
        f"mean, sigma = y[:, :{len(columns) // 2}], y[:, {len(columns) // 2}:]",
        "print(mean.shape, bool((sigma >= 0).all()))",
        "```",
        "",
    ]
    return "\n".join(lines)
