"""The dihedral group D4 of a square stamp and what it does to a shear.

Element ``k`` in 0..7 transposes the stamp (``k >= 4``) and then rotates it by ``k % 4``
quarter turns. A quarter turn maps (g1, g2) to (-g1, -g2); a transpose (a reflection across
the diagonal) maps (g1, g2) to (-g1, g2). Each element therefore multiplies g1 and g2 by
signs, and for a D4-symmetric PSF the group maps a galaxy sheared by g exactly onto the same
galaxy sheared by the transformed g.
"""

from __future__ import annotations

import torch
from torch import nn

ELEMENTS = 8


def transform_images(x: torch.Tensor, element: int) -> torch.Tensor:
    """Images (..., H, W) under group element ``element`` (transpose if >= 4, then rotate)."""
    if element >= 4:
        x = x.transpose(-2, -1)
    turns = element % 4  # as torch.rot90(x, turns, dims=(-2, -1)), with ops ONNX exports
    if turns == 1:
        return x.flip(-1).transpose(-2, -1)
    if turns == 2:
        return x.flip(-2).flip(-1)
    if turns == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def shear_signs(element: int) -> tuple[float, float]:
    """The signs by which ``element`` multiplies (g1, g2)."""
    rotation = -1.0 if element % 2 else 1.0
    return (rotation * (-1.0 if element >= 4 else 1.0), rotation)


def sign_table(device: torch.device | str | None = None) -> torch.Tensor:
    """(8, 2) tensor of :func:`shear_signs` for every element."""
    return torch.tensor([shear_signs(k) for k in range(ELEMENTS)], device=device)


def random_transform(
    x: torch.Tensor, g: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of stamps (N, C, H, W) and shears (N, 2) under one random group element."""
    element = int(torch.randint(ELEMENTS, (1,), generator=generator, device=generator.device))
    signs = torch.tensor(shear_signs(element), dtype=g.dtype, device=g.device)
    return transform_images(x, element), g * signs


class D4Symmetrized(nn.Module):
    """A shear network averaged over the 8 group elements in evaluation (and so in exports):
    ``f(x) = mean_k s_k * net(T_k x)``. Exactly equivariant: a rotated or transposed stamp gives
    the transformed shear, and a D4-symmetric stamp (a round galaxy at g = 0) gives (0, 0).
    In training mode it is the bare network (train it with D4 augmentation)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.register_buffer("signs", sign_table(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.network(x)
        total = self.network(x) * self.signs[0]
        for element in range(1, ELEMENTS):
            total = total + self.network(transform_images(x, element)) * self.signs[element]
        return total / ELEMENTS
