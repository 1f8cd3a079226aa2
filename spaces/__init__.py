"""Search spaces: declarative dimensions and the model families they build."""

from lensnas.spaces.dimensions import Dimension, SpaceError, parse_space, suggest
from lensnas.spaces.family import Family
from lensnas.spaces.loading import ArchitectureError, load
from lensnas.spaces.shear_cnn import SHEAR_CNN
from lensnas.spaces.sr_net import SR_NET

FAMILIES: dict[str, Family] = {SHEAR_CNN.name: SHEAR_CNN, SR_NET.name: SR_NET}


def family(name: str) -> Family:
    """The model family registered under ``name``."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


__all__ = [
    "FAMILIES",
    "ArchitectureError",
    "Dimension",
    "Family",
    "SpaceError",
    "family",
    "load",
    "parse_space",
    "suggest",
]
