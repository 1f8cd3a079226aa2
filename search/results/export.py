"""Export the best trials of a study as reloadable networks.

For each of the top K completed trials, ``DIR/trial-<n>/`` gets ``architecture.json`` and
``weights.pt`` (from the artifact store), ``model.ts`` (TorchScript), ``model.onnx`` and a
``MODEL_CARD.md``. ``lensnas.spaces.load(DIR/trial-<n>)`` rebuilds the PyTorch network.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial
from torch import nn

from lensnas import spaces
from lensnas.objectives.base import TrialRecord
from lensnas.objectives.report_html import lensnas_version, metric_rows
from lensnas.search.artifacts import artifact_store, download_trial_artifacts
from lensnas.search.results.comparison import (
    comparison_tables,
    study_baselines,
    study_objective_class,
)
from lensnas.search.spec import SpecError, StudySpec
from lensnas.search.storage import redact
from lensnas.search.summary import best_trials, format_value, markdown_table, summary_columns
from lensnas.spaces.errors import OptionError
from lensnas.spaces.family import Axes
from lensnas.spaces.loading import ARCHITECTURE_FILE as ARCHITECTURE
from lensnas.spaces.loading import WEIGHTS_FILE as WEIGHTS
from lensnas.spaces.loading import ArchitectureError, read_architecture

TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
MODEL_CARD = "MODEL_CARD.md"
CHECK_BATCH = 3


class ExportError(SpecError):
    """A trial that cannot be exported (no stored artifacts, bad spec, missing exporter)."""


def example_input(
    spec: dict[str, Any], batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, dict[int, str], dict[int, str]]:
    """A random input for the network of ``spec`` (its family's); its and the output's
    dynamic axes."""
    family = spaces.family(spec["family"])
    if family.example_input is None:
        raise ExportError(f"model family {family.name!r} declares no example input")
    return family.example_input(spec, batch, torch.Generator().manual_seed(seed))


def input_description(spec: dict[str, Any]) -> str:
    """What the network takes and returns, in words (its family's description)."""
    family = spaces.family(spec["family"])
    return family.describe_io(spec) if family.describe_io else "see architecture.json"


def torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``x`` and save it as TorchScript at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, str(path))
    return traced


def explicit_padding(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``padding="same"`` convolutions pad explicitly.

    The ONNX exporter writes "same" as auto_pad=SAME_UPPER, which onnxruntime refuses for
    dilated convolutions; explicit zero padding (asymmetric for even kernels, as PyTorch does)
    computes the same outputs.
    """
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Conv2d) or child.padding != "same":
                continue
            pads = []
            for dilation, kernel in zip(child.dilation, child.kernel_size):
                total = dilation * (kernel - 1)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            if top == bottom and left == right:
                child.padding = (top, left)
            else:
                child.padding = (0, 0)
                setattr(
                    parent, name, nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), child)
                )
    return model


def onnx(model: nn.Module, x: torch.Tensor, axes: tuple[Axes, Axes], path: Path) -> None:
    """Export ``model`` to ONNX at ``path`` (input "input", output "output")."""
    try:
        import onnx as _onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ExportError(
            f"{path}: writing ONNX needs the onnx package (pip install onnx onnxruntime)"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            explicit_padding(model),
            (x,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": axes[0], "output": axes[1]},
        )


def max_differences(model: nn.Module, folder: Path, spec: dict[str, Any]) -> dict[str, float]:
    """Max |difference| of TorchScript and ONNX (onnxruntime, if installed) outputs vs PyTorch."""
    x, _, _ = example_input(spec, batch=CHECK_BATCH, seed=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = model(x).numpy()
        scripted = torch.jit.load(str(folder / TORCHSCRIPT))(x).numpy()
    differences = {"torchscript": float(np.max(np.abs(scripted - expected)))}
    try:
        import onnxruntime
    except ImportError:
        return differences
    session = onnxruntime.InferenceSession(str(folder / ONNX), providers=["CPUExecutionProvider"])
    try:
        (output,) = session.run(None, {"input": x.numpy()})
    except Exception as error:  # noqa: BLE001 (onnxruntime's errors subclass only Exception)
        raise ExportError(
            f"{folder / ONNX}: onnxruntime cannot run the exported model ({error})"
        ) from None
    differences["onnx"] = float(np.max(np.abs(output - expected)))
    return differences


def _fetch_artifacts(trial: FrozenTrial, storage_url: str, folder: Path) -> None:
    """architecture.json and weights.pt (and any other trial file) from the artifact store."""
    store = artifact_store(storage_url)
    paths = download_trial_artifacts(trial, store, folder)
    if ARCHITECTURE in paths and WEIGHTS in paths:
        return
    # Trials recorded before artifacts were uploaded: their artifact folder, if still present.
    source = Path(str(trial.user_attrs.get("artifact_dir", "")))
    if source.is_dir() and (source / ARCHITECTURE).is_file() and (source / WEIGHTS).is_file():
        for path in source.iterdir():
            if path.is_file():
                shutil.copy2(path, folder / path.name)
        return
    raise ExportError(
        f"trial {trial.number}: no stored {ARCHITECTURE} and {WEIGHTS} in the artifact store"
    )


def export_trial(
    study: optuna.Study, trial: FrozenTrial, storage_url: str, folder: str | Path, rank: int = 1
) -> Path:
    """Export one completed trial into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _fetch_artifacts(trial, storage_url, folder)
    try:
        spec = read_architecture(folder)
        model = spaces.load(folder)
    except ArchitectureError as error:
        raise ExportError(f"trial {trial.number}: {error}") from None
    x, input_axes, output_axes = example_input(spec)
    with torch.no_grad():
        torchscript(model, x, folder / TORCHSCRIPT)
        onnx(model, x, (input_axes, output_axes), folder / ONNX)
    differences = max_differences(model, folder, spec)
    (folder / MODEL_CARD).write_text(
        model_card(study, trial, spec, storage_url, rank, differences), encoding="utf-8"
    )
    return folder


def export_study(
    study: optuna.Study, storage_url: str, output: str | Path = "best", top: int = 3
) -> list[Path]:
    """Export the ``top`` best completed trials of ``study`` into ``output/trial-<n>/``."""
    if top < 1:
        raise OptionError(f"--top: must be at least 1, got {top}")
    trials = best_trials(study, top)
    if not trials:
        raise SpecError(f"study '{study.study_name}' has no completed trial to export")
    output = Path(output)
    return [
        export_trial(study, trial, storage_url, output / f"trial-{trial.number}", rank)
        for rank, trial in enumerate(trials, start=1)
    ]


def study_spec(study: optuna.Study) -> StudySpec:
    """The StudySpec stored with the study (study user attribute "spec")."""
    from lensnas.search.spec import spec_from_dict

    raw = study.user_attrs.get("spec")
    source = Path(str(study.user_attrs.get("study_file", f"study '{study.study_name}'")))
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the stored study has no spec (user attribute 'spec')")
    return spec_from_dict(raw, source)


def study_objective(study: optuna.Study, cache_dir: str | Path | None = None) -> Any:
    """The study's objective rebuilt from its stored spec, data prepared (a cache hit when kept).

    Raises SpecError when the rebuilt dataset differs from the study's (e.g. a --seed override).
    """
    objective = study_spec(study).make_objective(cache_dir, progress=False)
    _check_dataset(study, objective)  # before simulating anything, when the key is known
    objective.prepare()
    _check_dataset(study, objective)
    return objective


def _check_dataset(study: optuna.Study, objective: Any) -> None:
    stored, key = study.user_attrs.get("dataset_key"), getattr(objective, "dataset_key", None)
    if stored is not None and key is not None and key != stored:
        raise SpecError(
            f"study '{study.study_name}': dataset_key: the stored spec gives dataset {key}, "
            f"the study used {stored} (was the study launched with --seed?)"
        )


def _reference_text(study: optuna.Study, trial: FrozenTrial) -> str:
    """The network beside the study's baselines (markdown)."""
    attrs = study.user_attrs
    baselines = [b for b in study_baselines(attrs) if not b.conditions]
    if not baselines:
        return "No baseline stored with this study (no reference estimator or interpolation)."
    tables = comparison_tables(
        study_objective_class(attrs), baselines,
        (f"this network (trial {trial.number})", trial.user_attrs),
    )
    objective = study_objective_class(attrs)
    if objective is not None:
        tables += objective.trial_tables(dict(attrs), TrialRecord(trial.number, trial.params,
                                                                  trial.user_attrs))
    return "\n".join(
        f"### {title}\n\n{sentence}\n\n{markdown_table(header, rows)}"
        for title, sentence, header, rows in tables
    )


def data_configuration(study: optuna.Study) -> dict[str, Any]:
    """The study's objective options and training settings (defaults filled in when valid)."""
    try:
        stored = study_spec(study)
        return {"objective": stored.objective_options, "training": stored.training}
    except SpecError:
        raw = study.user_attrs.get("spec")
        raw = raw if isinstance(raw, dict) else {}
        return {"objective": raw.get("objective", {}), "training": raw.get("training", {})}


def model_card(
    study: optuna.Study,
    trial: FrozenTrial,
    spec: dict[str, Any],
    storage_url: str,
    rank: int,
    differences: dict[str, float],
) -> str:
    """MODEL_CARD.md: metrics with errors, reference comparison, data, seeds, how to load."""
    attrs = study.user_attrs
    raw = attrs.get("spec") if isinstance(attrs.get("spec"), dict) else {}
    metrics = tuple(attrs.get("metrics", ()))
    directions = [d.name.lower() for d in study.directions]
    first = tuple(dict.fromkeys((*metrics, *summary_columns(study))))
    metric_table = markdown_table(
        ("metric", "value", "error"),
        [
            (name, format_value(value), "" if error is None else f"{error:.2e}")
            for name, value, error in metric_rows(trial.user_attrs, first)
        ],
    )
    ranked_by = ", ".join(f"{m} ({d})" for m, d in zip(metrics, directions))
    counts = "".join(
        f", {k} = {attrs[k]}" for k in ("n_train", "n_validation", "n_test") if k in attrs
    )
    searched = ", ".join(f"{k}={v}" for k, v in trial.params.items()) or "none"
    checks = ", ".join(
        f"{name} max |difference| {value:.1e}" for name, value in differences.items()
    )
    preset = f" (preset {trial.user_attrs['preset']})" if "preset" in trial.user_attrs else ""
    lines = [
        f"# {study.study_name}: trial {trial.number}{preset}",
        "",
        (
            f"Rank {rank} of the study's completed trials by {ranked_by}. Model family "
            f"`{spec['family']}` version {spec['version']}; "
            f"exported by lensnas {lensnas_version()}."
        ),
        "",
        (
            f"- study: `{study.study_name}` in `{redact(storage_url)}`, "
            f"objective `{attrs.get('objective')}`"
        ),
        f"- dataset key: `{attrs.get('dataset_key', '?')}`{counts}",
        (
            f"- seeds: study seed {raw.get('study', {}).get('seed', 0)} (data and sampler), "
            f"trial training seed {trial.user_attrs.get('seed', '?')}"
        ),
        f"- searched parameters: {searched}",
        "",
        "## Metrics (test set)",
        "",
        metric_table,
        "",
        "## Compared with the baselines",
        "",
        _reference_text(study, trial),
        "",
        "## Data configuration",
        "",
        "The study's `[objective]` and `[training]` settings:",
        "",
        "```json",
        json.dumps(data_configuration(study), indent=1, default=str),
        "```",
        "",
        "## Architecture",
        "",
        "```json",
        json.dumps(spec, indent=1),
        "```",
        "",
        input_description(spec),
        "",
        "## Files",
        "",
        f"- `{ARCHITECTURE}`, `{WEIGHTS}`: PyTorch architecture and state dict",
        f"- `{TORCHSCRIPT}`: TorchScript (traced); `{ONNX}`: ONNX (input `input`, output `output`)",
        f"- checked on a random input against PyTorch: {checks}",
        "",
        "## How to load",
        "",
        (
            "lensnas is installed from its repository (it is not on PyPI): "
            "`pip install torch==2.13.0 && pip install -e <lensnas clone>`; that install "
            "includes onnxruntime. Run this next to this card (paths relative to its folder):"
        ),
        "",
        "```python",
        "from pathlib import Path",
        "",
        "import onnxruntime",
        "import torch",
        "",
        "from lensnas import spaces",
        "from lensnas.search.results.export import example_input",
        "",
        "folder = Path(\".\")  # this card's folder: run from it, or write its path here",
        "model = spaces.load(folder)  # nn.Module in eval mode",
        "x, _, _ = example_input(spaces.loading.read_architecture(folder))  # input of the right shape",
        "with torch.no_grad():",
        "    y = model(x)",
        f'scripted = torch.jit.load(str(folder / "{TORCHSCRIPT}"))',
        f'session = onnxruntime.InferenceSession(str(folder / "{ONNX}"))',
        'y_onnx = session.run(None, {"input": x.numpy()})[0]',
        "print(y.shape, abs(y.numpy() - y_onnx).max())",
        "for warning in spaces.check_input(folder, x):  # inputs unlike the training data",
        '    print("warning:", warning)  # (the random example input is no galaxy)',
        "```",
        "",
    ]
    return "\n".join(lines)
