"""Clean strong-lensing images and the noise the denoising objective adds to them.

Clean images, normalised per image to [0, 1], float32 of shape (N, 1, H, W):

- simulated (``source`` simulate, euclid or hst): the LR images of the super-resolution
  simulation (``lensnas.objectives.sr.data``: same lenses, sources, instrument and PSF) without
  their noise. The SR simulation renders 2x finer noiseless images blurred by the LR PSF;
  summing their 2x2 blocks gives exactly its LR image before noise.
- a folder of ``.npy`` files: one image per file, shape (H, W) or (1, H, W), split into train,
  validation and test by ``validation_fraction`` and ``test_fraction``; or stacks (N, H, W) or
  (N, 1, H, W) named ``train.npy`` and optionally ``validation.npy`` (or ``val.npy``) and
  ``test.npy``. An SR data folder's ``LR/`` is such a folder.

Noise, added to [0, 1] images; ``level`` is in [0, 1] for every type, 0 meaning no noise:

- ``gaussian``: additive, standard deviation ``level``;
- ``poisson``: photon noise, the image scaled to ``1 / level`` counts at value 1:
  ``Poisson(clean / level) * level`` (mean ``clean``, variance ``clean * level``);
- ``uniform``: additive, uniform on [-level, level] (standard deviation ``level / sqrt(3)``);
- ``salt_and_pepper``: a fraction ``level`` of the pixels replaced, half by 0, half by 1.

Noisy images are not clipped (Gaussian and uniform noise go outside [0, 1]). The noise of
one split is drawn from a generator seeded by the data seed, the noise type, the noise level
and the split: the same settings always give the same noisy images.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from lensnas.objectives.sr.data import (
    MIN_HR_SIDE,
    SPLIT_FILE_NAMES,
    SPLIT_SEED_CODES,
    SPLITS,
    _as_images,
    _load_array,
    block_sum,
    normalize_per_image,
    simulate_dataset,
    simulation_config,
)
from lensnas.spaces.errors import DataError
from lensnas.spaces.sr.denoise import MAX_NOISE_LEVEL, NOISE_TYPES

SIMULATION_SCALE = 2  # the SR simulation's HR images are this much finer than the clean LR
NOISE_SEED_CODE = 4  # sr_data's splits use 1, 2, 3
MIN_SIDE = MIN_HR_SIDE  # pixels per side: the SSIM window


def clean_simulation_config(options: dict[str, Any]) -> dict[str, Any]:
    """The SR simulation settings whose noiseless HR images bin to the clean LR images."""
    config = simulation_config({**options, "scale": SIMULATION_SCALE, "hr_psf_fwhm": 0.0})
    config["hr_psf_fwhm"] = config["psf_fwhm"]  # HR blurred by the LR PSF: LR before binning
    config["hr_exposure_time"] = [0.0, 0.0]  # and noiseless
    return config


def simulate_clean(
    config: dict[str, Any], counts: dict[str, int], data_seed: int, progress: bool = True
) -> dict[str, np.ndarray]:
    """Clean LR images by split, (N, 1, lr_size, lr_size) float32 in [0, 1]."""
    pairs = simulate_dataset(config, counts, data_seed, progress=progress)
    clean = {}
    for split in SPLITS:
        hr = pairs[f"{split}_hr"]
        binned = np.stack([block_sum(image[0], config["scale"]) for image in hr])
        clean[split] = normalize_per_image(binned[:, None])
    return clean


def noise_rng(data_seed: int, noise_type: str, level: float, split: str) -> np.random.Generator:
    """The generator of one split's noise, seeded by data seed, noise type, level and split."""
    level_bits = int.from_bytes(struct.pack("<d", float(level)), "little")
    return np.random.default_rng(
        [data_seed, NOISE_SEED_CODE, NOISE_TYPES.index(noise_type), SPLIT_SEED_CODES[split],
         level_bits]
    )


def add_noise(
    clean: np.ndarray, noise_type: str, level: float, rng: np.random.Generator
) -> np.ndarray:
    """``clean`` ([0, 1] images) with noise of ``noise_type`` and ``level``, float32."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}; allowed: {', '.join(NOISE_TYPES)}")
    if not 0.0 <= level <= MAX_NOISE_LEVEL:
        raise ValueError(f"noise level must be in [0, {MAX_NOISE_LEVEL}], got {level}")
    image = np.asarray(clean, dtype=np.float64)
    if noise_type == "gaussian":
        noisy = image + level * rng.standard_normal(image.shape)
    elif noise_type == "uniform":
        noisy = image + rng.uniform(-level, level, image.shape)
    elif noise_type == "poisson":
        noisy = image if level == 0 else rng.poisson(np.maximum(image, 0.0) / level) * level
    else:  # salt_and_pepper
        hit = rng.random(image.shape) < level
        salt = rng.random(image.shape) < 0.5
        noisy = np.where(hit, np.where(salt, 1.0, 0.0), image)
    return np.asarray(noisy, dtype=np.float32)


def noisy_splits(
    clean: dict[str, np.ndarray], noise_type: str, level: float, data_seed: int
) -> dict[str, np.ndarray]:
    """Each split of ``clean`` with its own seeded noise."""
    return {
        split: add_noise(images, noise_type, level, noise_rng(data_seed, noise_type, level, split))
        for split, images in clean.items()
    }


# ---------------------------------------------------------------------------- user folders


def folder_files(folder: Path) -> list[Path]:
    """The sorted ``.npy`` files directly in ``folder`` (DataError when there are none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(str(folder), "no such folder (expected .npy files of clean images)")
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise DataError(str(folder), "contains no .npy files")
    return files


def folder_fingerprint(folder: Path) -> list[list[Any]]:
    """[name, size, mtime_ns] of every ``.npy`` in ``folder``: part of the cache key."""
    return [
        [path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in folder_files(folder)
    ]


def load_clean_folder(folder: Path, unit_range: bool = False) -> dict[str, np.ndarray]:
    """Validated raw (N, H, W) float64 stacks by split from ``folder`` (see the module doc)."""
    files = folder_files(folder)
    stems = {path.stem for path in files}
    stacked = "train" in stems and stems <= set(SPLIT_FILE_NAMES)
    pools: dict[str, list[np.ndarray]] = {}
    first: tuple[Path, tuple[int, ...]] | None = None
    for path in files:
        images = _as_images(path, _load_array(path, unit_range), stacked)
        if first is None:
            first = (path, images.shape[1:])
            if min(images.shape[1:]) < MIN_SIDE:
                raise DataError(
                    str(path), f"images of {images.shape[1:]} are too small; SSIM needs 11x11"
                )
        elif images.shape[1:] != first[1]:
            raise DataError(str(path), f"shape {images.shape[1:]} differs from {first[1]} of "
                            f"{first[0]}")
        split = SPLIT_FILE_NAMES[path.stem] if stacked else "train"
        pools.setdefault(split, []).append(images)
    return {split: np.concatenate(stacks).astype(np.float64) for split, stacks in pools.items()}


def folder_clean_dataset(
    folder: Path,
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    normalize: bool,
) -> dict[str, np.ndarray]:
    """Clean images by split, (N, 1, H, W) float32; missing splits are carved from train."""
    pools = load_clean_folder(folder, unit_range=not normalize)
    train = pools["train"]
    rng = np.random.default_rng([seed, 0])
    for split, fraction in (("test", test_fraction), ("validation", validation_fraction)):
        if split in pools:
            continue
        count = max(1, round(fraction * len(train)))
        if len(train) - count < 1:
            raise DataError(
                str(folder), f"too few images ({len(train)}) for a {split} split of {count} "
                "and training"
            )
        order = rng.permutation(len(train))
        pools[split], train = train[np.sort(order[:count])], train[np.sort(order[count:])]
    pools["train"] = train
    clean = {}
    for split in SPLITS:
        images = pools[split][:, None]
        clean[split] = normalize_per_image(images) if normalize else images.astype(np.float32)
    return clean
