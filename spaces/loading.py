"""Rebuild an exported network: ``lensnas.spaces.load(folder)`` reads architecture.json and weights.pt.

``architecture.json`` holds ``family``, ``version``, ``config`` (the family's architecture
parameters) and the keyword arguments of the family's ``build`` (shear_cnn: in_channels,
image_size, input_scale, output_scale; sr_net: in_channels, scale).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lensnas.spaces.errors import ArchitectureError

ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "weights.pt"
HEADER_KEYS = ("family", "version", "config")
INPUT_KEY = "input"  # what the training inputs were like (units, ranges); not a build argument




def read_architecture(path: str | Path) -> dict[str, Any]:
    """The architecture spec in ``path`` (a folder or its architecture.json), checked."""
    from lensnas.spaces import family, family_names

    path = Path(path)
    if not path.exists():
        raise ArchitectureError(
            f"{path}: no such exported folder (one written by lensnas export, holding "
            f"{ARCHITECTURE_FILE} and {WEIGHTS_FILE})"
        )
    if path.is_dir():
        path = path / ARCHITECTURE_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArchitectureError(f"{path}: no such architecture file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArchitectureError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(spec, dict):
        raise ArchitectureError(f"{path}: must be a JSON object with keys {', '.join(HEADER_KEYS)}")
    for key in HEADER_KEYS:
        if key not in spec:
            raise ArchitectureError(f"{path}: {key}: missing (required)")
    name = spec["family"]
    if name not in family_names():
        known = ", ".join(family_names())
        raise ArchitectureError(f"{path}: family: unknown model family {name!r}; known: {known}")
    version = spec["version"]
    supported = family(name).version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArchitectureError(f"{path}: version: must be a positive integer, got {version!r}")
    if version > supported:
        raise ArchitectureError(
            f"{path}: version: {name} version {version} is newer than the version this lensnas "
            f"reads ({supported}); upgrade lensnas"
        )
    if not isinstance(spec["config"], dict):
        raise ArchitectureError(f"{path}: config: must be a JSON object, got {spec['config']!r}")
    return spec


def build_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the family's ``build`` stored in an architecture spec."""
    return {key: value for key, value in spec.items() if key not in (*HEADER_KEYS, INPUT_KEY)}


def build(spec: dict[str, Any], source: str | Path = "architecture") -> nn.Module:
    """The untrained network of an architecture spec (``source`` names it in errors)."""
    from lensnas.spaces import family as registered_family

    family = registered_family(spec["family"])
    config = dict(spec["config"])
    if spec["version"] < family.version:  # keys added since take the value that was implied
        config = {key: family.defaults[key] for key in family.architecture_keys
                  if key in family.defaults} | config
    missing = [key for key in family.architecture_keys if key not in config]
    if missing:
        raise ArchitectureError(
            f"{source}: config.{missing[0]}: missing (required by {family.name})"
        )
    try:
        return family.build(config, **build_arguments(spec))
    except TypeError as error:
        raise ArchitectureError(
            f"{source}: {family.name} cannot be built from it ({error})"
        ) from None


def load(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The network exported in ``folder`` (architecture.json + weights.pt), in eval mode."""
    folder = Path(folder)
    spec = read_architecture(folder)
    model = build(spec, folder / ARCHITECTURE_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ArchitectureError(f"{weights}: no such weights file")
    state = torch.load(weights, map_location=map_location, weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise ArchitectureError(
            f"{weights}: weights do not fit the architecture ({' '.join(first[:2])})"
        ) from None
    return model.eval()


def check_input(folder_or_spec: str | Path | dict[str, Any], x: Any) -> list[str]:
    """Warnings (empty when none) about inputs ``x`` (an array or tensor of the network's input
    shape) that lie outside what the exported network was trained on: one line each."""
    from lensnas.spaces import family as registered_family

    spec = folder_or_spec if isinstance(folder_or_spec, dict) else read_architecture(folder_or_spec)
    check = registered_family(spec["family"]).check_input
    return [] if check is None else check(spec, x)
