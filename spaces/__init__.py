"""Search spaces: declarative dimensions and the model families they build.

Families are found by name in a registry (as timm's model registry): the built-in ones and
those of installed plug-ins (entry point group ``lensnas.families``, each naming a
:class:`Family` object as ``module:attribute``), imported only when first asked for.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from lensnas.spaces.dimensions import Dimension, SpaceError, parse_space, suggest
from lensnas.spaces.errors import ArchitectureError, LensnasError
from lensnas.spaces.family import Family
from lensnas.spaces.loading import check_input, load

ENTRY_POINT_GROUP = "lensnas.families"
_BUILT_IN = {
    "shear_cnn": "lensnas.spaces.shear.cnn:SHEAR_CNN",
    "sr_net": "lensnas.spaces.sr.net:SR_NET",
    "denoise_net": "lensnas.spaces.sr.denoise:DENOISE_NET",
    "shear_cnn_ensemble": "lensnas.spaces.ensemble:SHEAR_CNN_ENSEMBLE",
}
_LOCATIONS: dict[str, str] = dict(_BUILT_IN)
_LOADED: dict[str, Family] = {}


def register_family(family: Family | str, name: str | None = None) -> None:
    """Register a family object, or its ``"module:attribute"`` location under ``name``."""
    if isinstance(family, Family):
        _LOADED[family.name] = family
        _LOCATIONS.setdefault(family.name, "")
    else:
        if name is None:
            raise ValueError("a family location needs its name")
        _LOCATIONS[name] = family


def family_names() -> list[str]:
    """Every registered family name (built-in and plug-ins), sorted."""
    _discover()
    return sorted(_LOCATIONS)


def family(name: str) -> Family:
    """The model family registered under ``name``; KeyError naming the known ones otherwise."""
    if name in _LOADED:
        return _LOADED[name]
    _discover()
    if name not in _LOCATIONS:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(family_names())}")
    module_name, _, attribute = _LOCATIONS[name].partition(":")
    found = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(found, Family) or found.name != name:
        raise TypeError(f"{_LOCATIONS[name]} is not the Family named {name!r}")
    _LOADED[name] = found
    return found


def _discover() -> None:
    for point in entry_points(group=ENTRY_POINT_GROUP):
        _LOCATIONS.setdefault(point.name, point.value)


__all__ = [
    "ArchitectureError",
    "Dimension",
    "Family",
    "LensnasError",
    "SpaceError",
    "check_input",
    "family",
    "family_names",
    "load",
    "parse_space",
    "register_family",
    "suggest",
]
