"""Small building blocks shared by the model families: activations and normalisations by name."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

NORMALIZATIONS = ("none", "batch", "group", "layer", "instance")


def activation(name: str) -> nn.Module:
    """An activation module by name (one of ACTIVATIONS)."""
    return ACTIVATIONS[name]()


def normalization(name: str, channels: int) -> nn.Module:
    """A 2-d normalisation over ``channels`` by name (one of NORMALIZATIONS)."""
    if name == "none":
        return nn.Identity()
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "group":
        return nn.GroupNorm(min(8, channels) if channels % min(8, channels) == 0 else 1, channels)
    if name == "layer":
        return nn.GroupNorm(1, channels)
    if name == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"unknown normalization {name!r}; allowed: {', '.join(NORMALIZATIONS)}")
