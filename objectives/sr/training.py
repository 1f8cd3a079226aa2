"""The training steps of the SR backbones that need more than a loss, as hooks of the shared
loop (``lensnas.objectives.training.TrainingStep``):

- ``lapsrn``: the loss on every x2 level of the pyramid, against the HR image block-averaged to
  that level's size, summed (LapSRN's multi-scale supervision); a ``consistency`` term (the
  study's degradation operator, made for the full scale) applies to the last level only.
- ``srgan``: ``pretrain_epochs`` epochs of the content loss (the trial's ``loss``, L1 by
  default) alone; then each batch adds ``adversarial_weight`` x the generator's adversarial loss
  and ``feature_weight`` x the feature loss, and the discriminator takes one step of its own
  (Adam at the trial's learning rate; non-saturating GAN losses on logits). The feature loss is
  the squared distance between the features of SR and HR under the encoder of a denoising
  autoencoder trained first, in the trial, on the HR training images for ``feature_epochs``
  (``lensnas.spaces.sr.adversary.FeatureNet``), relative to the HR features' mean square. The
  best epoch is chosen among the adversarial ones (among all when there are none). With a
  lapsrn generator (or SISR network) the loss is on the last level only.
- ``denoised_sisr``: before the first epoch the denoiser is loaded from the exported folder
  ``[objective] denoiser_folder``, or else trained for ``denoiser_epochs`` (MSE, Adam at the
  trial's learning rate) on the training LR images against their noiseless estimate: the HR
  image degraded by the study's operator (its PSF and binning, the map that makes the
  simulation's noiseless LR image), fitted to each LR image's gain and offset (LR and HR are
  normalised apart). On simulated data this is the noiseless LR image, up to the HR target's own
  noise, which an MSE fit averages out; on a folder without a known PSF the operator only bins,
  and the stage also learns to blur. Then it is frozen and the loop trains the SISR network
  behind it.

lapsrn's step calls the model's ``pyramid``, so the ``compile`` option does not apply to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lensnas.objectives.sr.metrics import Degradation, fitted_residual, sr_loss
from lensnas.objectives.training import TrainingStep
from lensnas.spaces.dimensions import SpaceError
from lensnas.spaces.errors import ArchitectureError, DataError
from lensnas.spaces.sr.adversary import FEATURE_NOISE_SIGMA, FeatureNet, build_discriminator
from lensnas.spaces.sr.net import SR_NET

DENOISER_FAMILY = "denoise_net"
FEATURE_LEARNING_RATE = 1e-3
RELATIVE_EPSILON = 1e-12


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _fit(network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, epochs: int,
         batch_size: int, learning_rate: float, device: str, generator: torch.Generator,
         corrupt: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> None:
    """Train ``network`` to map ``corrupt(inputs)`` to ``targets`` (MSE, Adam), then freeze it."""
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    network.train()
    for _ in range(epochs):
        for index in _batches(len(inputs), batch_size, generator):
            x = inputs[index].to(device, non_blocking=True)
            y = targets[index].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(network(corrupt(x)), y)
            loss.backward()
            optimizer.step()
    network.eval().requires_grad_(False)


class PyramidStep(TrainingStep):
    """LapSRN's loss: the trial's loss on the output, ``level_loss`` on every other level of
    the pyramid, summed."""

    def __init__(self, loss_fn: nn.Module, level_loss: nn.Module):
        super().__init__(loss_fn)
        self.level_loss = level_loss

    def setup(self, model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, device: str,
              seed: int) -> None:
        self.model = model

    def loss(self, forward, x, y, epoch):
        *levels, output = self.model.pyramid(x)
        total = self.loss_fn(output.float(), y)
        for level, image in enumerate(levels):
            target = F.avg_pool2d(y, 2 ** (len(levels) - level))
            total = total + self.level_loss(image.float(), target)
        return total


class AdversarialStep(TrainingStep):
    """SRGAN's training: content, adversarial and feature losses; the discriminator's step."""

    def __init__(self, loss_fn: nn.Module, config: dict[str, Any]):
        super().__init__(loss_fn)
        self.config = config
        self.pretrain_epochs = config["pretrain_epochs"]
        self.any_adversarial = self.pretrain_epochs < config["epochs"]
        self.adversarial_loss = nn.BCEWithLogitsLoss()
        self.features: FeatureNet | None = None
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, model, train_x, train_y, device, seed):
        config = self.config
        self.discriminator = build_discriminator(config, train_y.shape[1]).to(device)
        self.optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=config["learning_rate"], betas=(0.9, 0.999)
        )
        if config["feature_weight"] > 0:
            generator = torch.Generator().manual_seed(seed)
            self.features = FeatureNet(train_y.shape[1]).to(device)

            def noisy(x: torch.Tensor) -> torch.Tensor:
                noise = torch.randn(x.shape, generator=generator).to(x.device)
                return x + FEATURE_NOISE_SIGMA * noise

            _fit(self.features, train_y, train_y, epochs=config["feature_epochs"],
                 batch_size=config["batch_size"], learning_rate=FEATURE_LEARNING_RATE,
                 device=device, generator=generator, corrupt=noisy)

    def adversarial(self, epoch: int) -> bool:
        return epoch > self.pretrain_epochs

    def loss(self, forward, x, y, epoch):
        prediction = forward(x).float()
        loss = self.loss_fn(prediction, y)
        if not self.adversarial(epoch):
            self.batch = None
            return loss
        self.batch = (prediction.detach(), y)
        if self.features is not None:
            fake, real = self.features.features(prediction), self.features.features(y)
            relative = F.mse_loss(fake, real) / (real.pow(2).mean() + RELATIVE_EPSILON)
            loss = loss + self.config["feature_weight"] * relative
        self.discriminator.requires_grad_(False)  # the generator's step leaves it alone
        logits = self.discriminator(prediction)
        self.discriminator.requires_grad_(True)
        fooled = self.adversarial_loss(logits, torch.ones_like(logits))
        return loss + self.config["adversarial_weight"] * fooled

    def after_step(self, epoch):
        if self.batch is None:
            return
        fake, real = self.batch
        self.optimizer.zero_grad(set_to_none=True)
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        loss = self.adversarial_loss(real_logits, torch.ones_like(real_logits)) + \
            self.adversarial_loss(fake_logits, torch.zeros_like(fake_logits))
        loss.backward()
        self.optimizer.step()

    def selectable(self, epoch):
        return self.adversarial(epoch) or not self.any_adversarial


class DenoiserStep(TrainingStep):
    """denoised_sisr: load or train the denoiser, then freeze it."""

    def __init__(self, loss_fn: nn.Module, config: dict[str, Any], operator: Degradation,
                 folder: str | Path | None):
        super().__init__(loss_fn)
        self.config, self.operator, self.folder = config, operator, folder

    def setup(self, model, train_x, train_y, device, seed):
        if self.folder:
            model.denoiser.load_state_dict(load_denoiser(self.folder)[1].state_dict())
            model.denoiser.eval().requires_grad_(False)
            return
        target = noiseless_estimate(train_x, train_y, self.operator)
        _fit(model.denoiser, train_x, target, epochs=self.config["denoiser_epochs"],
             batch_size=self.config["batch_size"], learning_rate=self.config["learning_rate"],
             device=device, generator=torch.Generator().manual_seed(seed))


def noiseless_estimate(lr: torch.Tensor, hr: torch.Tensor, operator: Degradation,
                       batch_size: int = 256) -> torch.Tensor:
    """``operator(hr)`` with each image's least-squares gain and offset to ``lr``: the LR images
    without their noise, as far as the operator is the study's degradation."""
    estimates = []
    with torch.no_grad():
        for start in range(0, len(lr), batch_size):
            observed = lr[start : start + batch_size]
            degraded = operator(hr[start : start + batch_size].to(observed.device))
            estimates.append(observed - fitted_residual(degraded, observed))
    return torch.cat(estimates)


def training_step(config: dict[str, Any], loss_fn: nn.Module, operator: Degradation,
                  denoiser_folder: str | Path | None = None) -> nn.Module | TrainingStep:
    """The loss (or training step) of an SR trial of ``config``, whose full loss is ``loss_fn``:
    a step for lapsrn, srgan and denoised_sisr, ``loss_fn`` itself otherwise. ``operator``: the
    study's HR -> LR degradation; ``denoiser_folder``: an exported denoiser for denoised_sisr."""
    backbone = config["backbone"]
    if backbone == "srgan":
        return AdversarialStep(loss_fn, config)
    if backbone == "denoised_sisr":
        return DenoiserStep(loss_fn, config, operator, denoiser_folder)
    if backbone == "lapsrn":
        return PyramidStep(loss_fn, sr_loss(config["loss"]))
    return loss_fn


def load_denoiser(folder: str | Path) -> tuple[dict[str, Any], nn.Module]:
    """The configuration and network of the denoiser exported in ``folder`` (by ``lensnas
    export`` of a denoise study); DataError in one line when it is not one."""
    from lensnas import spaces

    try:
        spec = spaces.loading.read_architecture(folder)
        network = spaces.load(folder)
    except ArchitectureError as error:
        raise DataError(str(folder), f"is not a usable exported denoiser: {error}") from None
    if spec["family"] != DENOISER_FAMILY:
        raise DataError(str(folder), f"holds a {spec['family']} network; denoiser_folder needs "
                        f"an exported {DENOISER_FAMILY} network (from a denoise study)")
    if spec.get("in_channels", 1) != 1:
        raise DataError(str(folder), f"its denoiser takes {spec['in_channels']} channels; SR "
                        "images have 1")
    return dict(spec["config"]), network


def check_scale(training: dict[str, Any], space: list[Any], scale: int,
                key: str = "objective.scale") -> None:
    """SpaceError when a trial may build lapsrn (alone or as sisr_backbone) and ``scale`` is
    not a power of 2: its pyramid has log2(scale) x2 levels."""
    def possible(name: str) -> set[Any]:
        for dimension in space:
            if dimension.name == name:
                return set(dimension.possible_values() or ())
        return {training.get(name, SR_NET.defaults[name])}

    backbones = possible("backbone")
    lapsrn = "lapsrn" in backbones or (
        bool(backbones & {"srgan", "denoised_sisr"}) and "lapsrn" in possible("sisr_backbone")
    )
    if lapsrn and 2 ** round(np.log2(scale)) != scale:
        raise SpaceError(key, f"lapsrn upsamples by powers of 2 (2, 4, 8), not by {scale}; "
                         "choose such a scale or leave lapsrn out of backbone and sisr_backbone")
