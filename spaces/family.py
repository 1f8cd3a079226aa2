"""A model family: the parameters it understands, their allowed values, its builder, presets,
and what its networks take and return (an example input for export, the I/O in words)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lensnas.spaces.dimensions import Dimension, SpaceError, closest

Axes = dict[int, str]
# (architecture spec, batch size, generator) -> (input, its dynamic axes, the output's)
ExampleInput = Callable[[dict[str, Any], int, torch.Generator], tuple[torch.Tensor, Axes, Axes]]


@dataclass(frozen=True)
class Choice:
    """A parameter that takes one of a fixed set of values."""

    values: tuple[Any, ...]

    def check(self, key: str, dimension: Dimension) -> None:
        for value in dimension.possible_values() or ():
            if not any(value == v and type(value) is type(v) for v in self.values):
                allowed = ", ".join(repr(v) for v in self.values)
                raise SpaceError(key, f"{value!r} is not allowed{closest(str(value), map(str, self.values))}; allowed: {allowed}")
        if dimension.kind in ("int", "float"):
            numbers = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if not numbers or dimension.low < min(numbers) or dimension.high > max(numbers):
                raise SpaceError(key, f"a range is not allowed here; allowed values: {list(self.values)}")


@dataclass(frozen=True)
class Range:
    """A numeric parameter within [low, high]; ``integer`` for counts."""

    low: float
    high: float
    integer: bool = False

    def check(self, key: str, dimension: Dimension) -> None:
        values = dimension.possible_values()
        if values is None:
            if self.integer and dimension.kind == "float":
                raise SpaceError(f"{key}.type", "must be 'int' (this parameter is an integer)")
            values = (dimension.low, dimension.high)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpaceError(key, f"must be a number, got {value!r}")
            if self.integer and not float(value).is_integer():
                raise SpaceError(key, f"must be an integer, got {value!r}")
            if not self.low <= value <= self.high:
                raise SpaceError(key, f"{value!r} is outside the allowed range {self.low}..{self.high}")


@dataclass(frozen=True)
class Family:
    """Everything the engine needs to know about one kind of network.

    ``build(config, **arguments)`` makes the network from its architecture parameters and the
    keyword arguments stored in an export's architecture.json; ``example_input`` gives a random
    input of the right shape and units (export traces and checks on it) and ``describe_io``
    says in words what the network takes and returns (model cards); ``check_input(spec, x)``
    warns about inputs unlike the training data (``lensnas.spaces.check_input``).
    ``output_columns`` names the numbers the network returns per input, one row each (written
    as a CSV by ``lensnas predict``); empty for networks that return images.
    """

    name: str
    version: int
    build: Callable[..., nn.Module]
    rules: dict[str, Choice | Range]
    defaults: dict[str, Any]
    architecture_keys: tuple[str, ...]
    example_input: ExampleInput | None = None
    describe_io: Callable[[dict[str, Any]], str] | None = None
    check_input: Callable[[dict[str, Any], Any], list[str]] | None = None
    output_columns: tuple[str, ...] = ()
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check_space(self, dimensions: list[Dimension], prefix: str = "space") -> None:
        """Raise SpaceError for a dimension this family does not know or a value it cannot build."""
        for dimension in dimensions:
            key = f"{prefix}.{dimension.name}"
            rule = self.rules.get(dimension.name)
            if rule is None:
                allowed = ", ".join(sorted(self.rules))
                raise SpaceError(key, f"unknown dimension '{dimension.name}'{closest(dimension.name, self.rules)} for {self.name}; allowed: {allowed}")
            rule.check(key, dimension)

    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the trial's params: the full configuration of one trial."""
        return {**self.defaults, **params}

    def architecture(self, params: dict[str, Any]) -> dict[str, Any]:
        """Only the parameters that define the network (what an export must store)."""
        config = self.config(params)
        return {key: config[key] for key in self.architecture_keys}


# The training keys every family accepts ([training] or [space]), whatever its network.
TRAINING_RULES = {
    "learning_rate": Range(1e-7, 1.0),
    "batch_size": Range(1, 65536, integer=True),
    "epochs": Range(1, 10000, integer=True),
    "weight_decay": Range(0.0, 1.0),
    # the training recipe (lensnas.objectives.training.RECIPE_DEFAULTS)
    "lr_schedule": Choice(("constant", "cosine", "onecycle", "plateau")),
    "warmup_fraction": Range(0.0, 0.5),
    "optimizer": Choice(("adamw", "sgd")),
    "momentum": Range(0.0, 0.999),
    "grad_clip": Range(0.0, 1e6),
    "ema_decay": Range(0.0, 0.99999),
    "precision": Choice(("fp32", "bf16")),
    "channels_last": Choice((True, False)),
    "compile": Choice((True, False)),
}
