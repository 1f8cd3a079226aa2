"""Networks that return an uncertainty: a deep ensemble, or MC dropout with fixed masks.

An exported ensemble is one network: ``Ensemble`` runs its K members on the same input and
returns, per input, the members' mean of each output column and then their spread (the
standard deviation over members, with K - 1 in the denominator): (N, 2C) for members that
return C numbers. ``MCDropout`` does the same with one network whose dropout layers take N
fixed masks, drawn once from a seed when the export is made and stored with its weights, so
that the exported network is deterministic (the same input always gives the same mean and
sigma) and exports to TorchScript and ONNX as any other network. Members that are averaged
over D4 (``symmetrize``) keep that: each member, and each masked network, is exactly
equivariant, so the mean is too and the sigma is invariant.

For every family whose networks return numbers, :func:`ensemble_family` makes the family of
its ensembles (``<name>_ensemble``): its architecture.json holds the member architectures
(``config.members``), ``config.mc_dropout_samples`` (0 for a deep ensemble) and
``config.seed`` (of the masks), and repeats the first member's input (``in_channels``,
``image_size``, ``input``) for input checks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lensnas.spaces.errors import ArchitectureError
from lensnas.spaces.family import Family
from lensnas.spaces.shear.cnn import SHEAR_CNN

ENSEMBLE_SUFFIX = "_ensemble"


def mean_and_spread(outputs: torch.Tensor) -> torch.Tensor:
    """(K, N, C) outputs of K networks -> (N, 2C): their mean, then their standard deviation
    (denominator K - 1). Written with the operations every ONNX runtime has."""
    mean = outputs.mean(dim=0)
    variance = ((outputs - mean) ** 2).sum(dim=0) / (outputs.shape[0] - 1)
    return torch.cat([mean, variance.sqrt()], dim=1)


class Ensemble(nn.Module):
    """K networks on the same input: (N, 2C) = their mean and their spread per output."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_and_spread(torch.stack([member(x) for member in self.members]))


class FixedMasks(nn.Module):
    """A dropout layer with ``samples`` fixed masks: input row ``s * B + b`` (sample s of the
    B inputs) gets mask s (entries 0 or 1 / (1 - p)), in training and evaluation alike."""

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.register_buffer("masks", masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        samples = self.masks.shape[0]
        return (x.unflatten(0, (samples, -1)) * self.masks.unsqueeze(1)).flatten(0, 1)


def dropout_shapes(network: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape (without the batch axis) of each dropout layer of ``network``, by name,
    seen on one forward pass of ``example``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))
        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in network.named_modules()
        if isinstance(module, nn.Dropout) and module.p > 0
    ]
    try:
        with torch.no_grad():
            network.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


class MCDropout(nn.Module):
    """One network whose dropout layers take ``samples`` fixed masks (seeded): (N, 2C) = the
    mean and the spread over the masked networks. The input is repeated ``samples`` times
    along the batch axis, so the network runs once per batch."""

    def __init__(self, network: nn.Module, samples: int, seed: int, example: torch.Tensor):
        super().__init__()
        if samples < 2:
            raise ValueError(f"MC dropout needs at least 2 samples, got {samples}")
        self.samples = samples
        self.network = copy.deepcopy(network)
        shapes = dropout_shapes(self.network, example)
        if not shapes:
            raise ValueError("the network has no dropout layer (dropout = 0): nothing to sample")
        generator = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.network.get_submodule(parent_name)
            keep = 1.0 - getattr(parent, child).p
            masks = (torch.rand((samples, *shape), generator=generator) < keep).float() / keep
            setattr(parent, child, FixedMasks(masks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeated = x.repeat(self.samples, *([1] * (x.dim() - 1)))
        outputs = self.network(repeated)
        return mean_and_spread(outputs.unflatten(0, (self.samples, -1)))


def ensemble_family(base: Family) -> Family:
    """The family of ensembles (deep or MC dropout) of ``base`` networks (which return numbers)."""
    if not base.output_columns:
        raise ValueError(f"family {base.name} returns images; ensembles are of networks that "
                         "return numbers")

    def members(config: dict[str, Any]) -> list[dict[str, Any]]:
        specs = config["members"]
        if not isinstance(specs, list) or not specs:
            raise ArchitectureError("config.members: must be a non-empty list of architectures")
        for index, spec in enumerate(specs):
            if not isinstance(spec, dict) or spec.get("family") != base.name:
                raise ArchitectureError(
                    f"config.members[{index}]: must be a {base.name} architecture"
                )
            if not isinstance(spec.get("version"), int) or spec["version"] > base.version:
                raise ArchitectureError(
                    f"config.members[{index}].version: {spec.get('version')!r}; this lensnas "
                    f"reads {base.name} up to version {base.version}"
                )
        return specs

    def build(config: dict[str, Any], **_: Any) -> nn.Module:
        """The ensemble; the top-level build arguments repeat the first member's input and
        are used by the input checks only."""
        from lensnas.spaces.loading import build as build_member

        specs = members(config)
        networks = [build_member(spec, f"config.members[{i}]") for i, spec in enumerate(specs)]
        samples = int(config["mc_dropout_samples"])
        if samples == 0:
            return Ensemble(networks)
        if len(networks) != 1:
            raise ArchitectureError("config.members: MC dropout takes exactly one network")
        example, _, _ = base.example_input(specs[0], 1, torch.Generator().manual_seed(0))
        return MCDropout(networks[0], samples, int(config["seed"]), example)

    def example_input(spec: dict[str, Any], batch: int, generator: torch.Generator) -> Any:
        return base.example_input(members(spec["config"])[0], batch, generator)

    def describe_io(spec: dict[str, Any]) -> str:
        first = members(spec["config"])[0]
        samples = int(spec["config"]["mc_dropout_samples"])
        what = (f"{samples} fixed dropout masks of one network" if samples
                else f"{len(spec['config']['members'])} networks")
        columns = ", ".join(base.output_columns)
        described = base.describe_io(first) if base.describe_io else ""
        return (f"{described} This export runs {what} and returns (N, "
                f"{2 * len(base.output_columns)}): the mean of ({columns}) over them, then "
                f"their standard deviation (sigma_ of each).")

    def check_input(spec: dict[str, Any], x: Any) -> list[str]:
        return [] if base.check_input is None else base.check_input(members(spec["config"])[0], x)

    return Family(
        name=f"{base.name}{ENSEMBLE_SUFFIX}",
        version=1,
        build=build,
        rules={},
        defaults={},
        architecture_keys=("members", "mc_dropout_samples", "seed"),
        example_input=example_input if base.example_input else None,
        describe_io=describe_io,
        check_input=check_input,
        output_columns=(*base.output_columns, *(f"sigma_{c}" for c in base.output_columns)),
    )


SHEAR_CNN_ENSEMBLE = ensemble_family(SHEAR_CNN)
