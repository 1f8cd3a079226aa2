"""The objective contract, written once: what the engine needs from an objective.

An objective is a subclass of :class:`Objective`. As Ray Tune's ``Trainable``, the base owns a
trial's steps — prepare, build, train, score, save, figure — and a subclass supplies small
hooks:

=====================  ==================================================================
declare (class attrs)  ``name``, ``family`` (a :class:`~lensnas.spaces.Family`), ``OPTIONS``
                       (the ``[objective]`` keys and defaults), ``METRICS`` (name ->
                       :class:`Metric`), ``DEFAULT_METRIC``, ``VALIDATION_SCORE`` (the
                       per-epoch score the pruner compares, in the units of the metrics)
data                   ``dataset_config()`` (what the cache key is made of), ``load_data()``
                       (simulate or read the arrays), ``after_load()`` (reference estimators,
                       baselines)
model                  ``architecture_arguments()`` (the build arguments an export stores)
train                  ``training_data(config)``, ``loss(config)``, ``validation_score(model,
                       device)``, ``batch_transform(config)`` (optional)
score                  ``score(model, config, ctx)`` -> metrics of the test set
figure                 ``figure(model, path)`` (optional)
engine extras          ``check_options``, ``check_metrics``, ``baseline_table(noise_levels)``
                       (``lensnas baseline``), ``report_sections(study_attrs, best)``,
                       ``examples(split)`` and ``reference_errors()`` (networks that return
                       numbers: the inspector's probe, the calibration of uncertainties)
=====================  ==================================================================

A trial's metrics are a flat ``{name: float}``; metrics that belong together (one noise
level's, say) are returned as one ``{group: {name: float}}`` entry and stored together.
Reference estimators and interpolation baselines are :class:`Baseline` rows, computed once
per dataset and stored with the study.

Objectives never import Optuna or Ray: executors adapt their own trial objects to
:class:`TrialContext` and translate :class:`TrialPruned` / :class:`TrialFailed`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lensnas.objectives.cache import cache_root, cached_arrays, config_hash
from lensnas.objectives.options import check_options
from lensnas.objectives.trial import (  # noqa: F401  (re-exported: the contract's names)
    LocalContext,
    TrainingResult,
    TrialContext,
    TrialFailed,
    TrialPruned,
)
from lensnas.spaces.errors import OptionError
from lensnas.spaces.family import Family
from lensnas.spaces.loading import ARCHITECTURE_FILE, WEIGHTS_FILE, build_arguments

FIGURE = "diagnostics.png"  # file name of a trial's diagnostic figure in its artifact folder
DIRECTIONS = ("minimize", "maximize")


@dataclass(frozen=True)
class Metric:
    """One metric of an objective: its direction (None: reported, not optimised, as a bias
    whose best value is 0), what it means in words, whether summaries show it."""

    direction: str | None
    description: str
    summary: bool = False

    def __post_init__(self) -> None:
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")


@dataclass(frozen=True)
class ValidationScore:
    """The per-epoch validation score the pruner compares, whatever the training loss.

    ``metric`` names the test-set metric it estimates on the validation split: when it is the
    study's metric, a pruned trial keeps its last score as its value; otherwise a pruned trial
    is stored without a value (it would not be comparable with the metric).
    """

    label: str  # e.g. "validation RMSE of g"
    direction: str  # "minimize" | "maximize"
    metric: str  # e.g. "rmse"


@dataclass(frozen=True)
class Baseline:
    """One row of comparison: an estimator that is not a searched network, on the test set.

    ``key`` is a short stable identifier ("reference", "bicubic"), ``name`` and
    ``description`` say what it is in words; ``conditions`` says where it was measured when
    that differs from the study's own setting (e.g. ``{"noise_sigma": 1e-3}``).
    """

    key: str
    name: str
    description: str
    metrics: dict[str, float]
    conditions: dict[str, float] = field(default_factory=dict)
    group: str = ""  # "" for the headline comparison, else a key of the objective's BASELINE_GROUPS

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Baseline:
        return cls(
            key=str(value.get("key", "")),
            name=str(value.get("name", "?")),
            description=str(value.get("description", "")),
            metrics={k: float(v) for k, v in dict(value.get("metrics", {})).items()},
            conditions=dict(value.get("conditions", {})),
            group=str(value.get("group", "")),
        )


@dataclass(frozen=True)
class TrialRecord:
    """A stored trial as report hooks see it: number, params and user attributes."""

    number: int
    params: dict[str, Any]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class ReportSection:
    """One section of the HTML report contributed by an objective."""

    section_id: str
    title: str
    html: str


@dataclass(frozen=True)
class ReferenceErrors:
    """The reference estimator's own per-example estimates and 1-sigma errors on the test set,
    beside which a network's uncertainties are calibrated; ``unavailable`` says why there are
    none (then the arrays are None)."""

    name: str
    description: str
    estimates: np.ndarray | None = None  # (N, C), NaN where the estimator failed
    sigmas: np.ndarray | None = None  # (N, C)
    unavailable: str = ""


class Objective:
    """One scientific objective: prepares its data once, then trains and scores trials."""

    name: ClassVar[str]
    family: ClassVar[Family]
    OPTIONS: ClassVar[dict[str, Any]] = {}
    METRICS: ClassVar[dict[str, Metric]] = {}
    DEFAULT_METRIC: ClassVar[str]
    VALIDATION_SCORE: ClassVar[ValidationScore]
    BASELINE_COLUMNS: ClassVar[tuple[str, ...]] = ()  # shown by `lensnas baseline` after the summary
    # Baselines shown apart from the headline comparison: group -> (title, one sentence on it).
    BASELINE_GROUPS: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(
        self,
        options: dict[str, Any],
        training: dict[str, Any],
        *,
        seed: int,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ):
        self.options = self.check_options(options)
        self.training = dict(training)
        self.seed = seed
        self.cache_dir = cache_root(cache_dir)
        self.progress = progress
        self.data: dict[str, np.ndarray] | None = None
        self.meta: dict[str, Any] = {}
        self.cache_hit: bool | None = None
        self.baselines: list[Baseline] = []
        self._dataset_key: str | None = None
        self.setup()

    # ----- declarations and validation (class level: no data needed)

    @classmethod
    def check_options(cls, table: dict[str, Any], prefix: str = "objective") -> dict[str, Any]:
        """Validated ``[objective]`` options with defaults filled in; raises SpaceError."""
        return check_options(table, cls.OPTIONS, prefix)

    @classmethod
    def check_metrics(
        cls, metrics: tuple[str, ...], options: dict[str, Any], prefix: str = "study.metrics"
    ) -> None:
        """Raise SpaceError for metrics these options cannot give (default: all can)."""

    @classmethod
    def check_training(
        cls, training: dict[str, Any], space: list[Any], options: dict[str, Any]
    ) -> None:
        """Raise SpaceError for training settings (fixed in ``training`` or possible in the
        ``space`` dimensions) these options cannot use (default: all can)."""

    @classmethod
    def summary_metrics(cls) -> tuple[str, ...]:
        """The metrics tables show first (status, report, model card)."""
        return tuple(name for name, metric in cls.METRICS.items() if metric.summary)

    @classmethod
    def report_sections(
        cls, study_attrs: dict[str, Any], best: TrialRecord | None
    ) -> list[ReportSection]:
        """Sections of the HTML report only this objective knows how to draw (default: none)."""
        return []

    @classmethod
    def trial_tables(
        cls, study_attrs: dict[str, Any], trial: TrialRecord
    ) -> list[tuple[str, str, list[str], list[list[str]]]]:
        """Tables of one trial's grouped metrics (title, sentence, header, rows), shown by
        ``lensnas status --wide`` for the best trial, in the model card and in the report
        (default: none)."""
        return []

    # ----- data hooks

    def setup(self) -> None:
        """Derive state from ``self.options`` (simulation objects, split sizes); no data yet."""

    def dataset_config(self) -> dict[str, Any]:
        """What the dataset's cache key is made of (every setting that changes the arrays)."""
        raise NotImplementedError

    def load_data(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Simulate or read the dataset: ``(arrays, meta)``; cached by the base."""
        raise NotImplementedError

    def after_load(self) -> None:
        """Work on the loaded data done once per process (reference estimators, baselines)."""

    def training_data(self, config: dict[str, Any]) -> tuple[Any, Any]:
        """``(inputs, targets)`` of the training split for a trial of ``config``, array-like and
        indexable by integer arrays."""
        raise NotImplementedError

    def batch_transform(self, config: dict[str, Any]) -> Callable[..., Any] | None:
        """A function ``(x, y, generator) -> (x, y)`` applied to every training batch (data
        augmentation, fresh noise), or None."""
        return None

    @property
    def dataset_key(self) -> str:
        """The content hash of the dataset's configuration (cache key, stored with the study)."""
        if self._dataset_key is None:
            self._dataset_key = config_hash(self.dataset_config())
        return self._dataset_key

    def prepare(self) -> None:
        """Simulate or load the data (cached on disk by content hash), then ``after_load``."""
        if self.data is not None:
            return
        config = self.dataset_config()
        self._dataset_key = config_hash(config)

        def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            arrays, meta = self.load_data()
            return arrays, {**meta, "dataset_key": self._dataset_key}

        self.data, self.meta, self.cache_hit = cached_arrays(self.cache_dir, self.name, config, build)
        self.after_load()

    # ----- model hooks

    def architecture_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``family.build`` besides the config (stored in an export)."""
        return {}

    def input_description(self) -> dict[str, Any]:
        """What the training inputs were like (units, ranges), stored with an export under
        ``input`` for the family's ``check_input`` (default: nothing)."""
        return {}

    def architecture(self, params: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to rebuild the trial's network (family, version, build arguments)
        and, under ``input``, what its training inputs were like."""
        description = self.input_description()
        return {
            "family": self.family.name,
            "version": self.family.version,
            "config": self.family.architecture(self.config(params)),
            **self.architecture_arguments(),
            **({"input": description} if description else {}),
        }

    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's full configuration: family defaults < [training] < sampled params."""
        return self.family.config({**self.training, **params})

    def build_model(self, params: dict[str, Any]) -> Any:
        """The trial's network, untrained."""
        spec = self.architecture(params)
        return self.family.build(spec["config"], **build_arguments(spec))

    # ----- training hooks

    def loss(self, config: dict[str, Any]) -> Any:
        """The training loss (an nn.Module) named by ``config["loss"]``."""
        raise NotImplementedError

    def validation_score(self, model: Any, device: str) -> float:
        """``VALIDATION_SCORE`` of ``model`` on the validation split (one number per epoch)."""
        raise NotImplementedError

    def train(self, model: Any, config: dict[str, Any], ctx: TrialContext) -> TrainingResult:
        """Train ``model`` with the shared loop (AdamW, per-epoch validation score, pruning)."""
        from lensnas.objectives.training import train_model  # torch: imported when training

        return train_model(
            model,
            self.training_data(config),
            loss_fn=self.loss(config),
            validation_score=lambda m: self.validation_score(m, ctx.device),
            maximize=self.VALIDATION_SCORE.direction == "maximize",
            score_label=self.VALIDATION_SCORE.label,
            learning_rate=config["learning_rate"],
            batch_size=config["batch_size"],
            epochs=config["epochs"],
            weight_decay=config["weight_decay"],
            ctx=ctx,
            options=config,
            batch_transform=self.batch_transform(config),
        )

    # ----- scoring hooks

    def score(self, model: Any, config: dict[str, Any], ctx: TrialContext) -> dict[str, Any]:
        """Metrics of the trained ``model`` on the test set (flat floats and groups)."""
        raise NotImplementedError

    def figure(self, model: Any, path: Path) -> None:
        """Write a diagnostic PNG of the trained model at ``path`` (default: none)."""

    # ----- the steps (owned by the base)

    def run_trial(self, params: dict[str, Any], ctx: TrialContext) -> dict[str, Any]:
        """prepare -> build -> train -> score -> save -> figure; returns the trial's metrics."""
        from lensnas.objectives.training import parameter_count, seed_everything

        self.prepare()
        config = self.config(params)
        seed_everything(ctx.seed)  # the initial weights depend on the trial seed only
        model = self.build_model(params)
        result = self.train(model, config, ctx)
        metrics = self.score(result.model, config, ctx)
        metrics.update(
            validation_score=result.best_validation_score,
            n_params=float(parameter_count(result.model)),
            train_seconds=result.train_seconds,
            epochs_run=float(result.epochs_run),
        )
        self.save(result.model, params, ctx)
        self.figure(result.model, Path(ctx.artifact_dir) / FIGURE)
        return metrics

    def save(self, model: Any, params: dict[str, Any], ctx: TrialContext) -> None:
        """The trial's weights and architecture into its artifact folder."""
        import torch

        folder = Path(ctx.artifact_dir)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.cpu().state_dict(), folder / WEIGHTS_FILE)
        (folder / ARCHITECTURE_FILE).write_text(json.dumps(self.architecture(params), indent=1))

    # ----- what the engine stores and shows

    def split_sizes(self) -> dict[str, int]:
        """Number of examples per split (train, validation, test) of the prepared data."""
        return {}

    def extra_attrs(self) -> dict[str, Any]:
        """Study-wide facts beyond the dataset key, split sizes and baselines (default: none)."""
        return {}

    def trial_attrs(self) -> dict[str, Any]:
        """Study-wide facts stored with the study: dataset key, split sizes, baselines, extras."""
        self.prepare()
        return {
            "dataset_key": self.dataset_key,
            **{f"n_{split}": count for split, count in self.split_sizes().items()},
            "baselines": [baseline.as_dict() for baseline in self.baselines],
            **self.extra_attrs(),
        }

    def baseline_notes(self) -> list[str]:
        """Lines printed under the ``lensnas baseline`` table (e.g. an estimator not installed)."""
        return []

    def examples(self, split: str) -> tuple[Any, np.ndarray]:
        """The network inputs of ``split`` ("validation" or "test") and the numbers the network
        should return for them, (N, C): for objectives whose networks return numbers."""
        raise OptionError(f"objective '{self.name}' gives no labelled examples (its networks "
                          "return images)")

    def reference_errors(self) -> ReferenceErrors | None:
        """The reference estimator's per-example estimates and errors on the test set, to
        calibrate uncertainties against (default: None, no reference estimator)."""
        return None

    def baseline_table(self, noise_levels: list[float] | None = None) -> list[Baseline]:
        """Every baseline estimator on the test set (``lensnas baseline``); ``noise_levels``
        re-renders it at other noise sigmas where the objective can."""
        if noise_levels:
            raise OptionError(f"--noise: objective '{self.name}' cannot change its noise level")
        self.prepare()
        return list(self.baselines)

