"""The default SR simulation matches DeepLense Model 1: its bilinear baseline, measured as a study
measures it, is within 1.5 dB of the published 24.8 dB PSNR and within 0.05 of SSIM 0.30.

Published (ML4SCI/DeepLense, Super_Resolution_Pranath_Reddy, Model-1 test set): bilinear
interpolation MSE 0.00333, PSNR 24.78 dB, SSIM 0.303.

How many pairs: per image, the bilinear PSNR scatters by about 0.6 dB and the SSIM by about 0.04
(measured on this simulation), so the mean over 300 test pairs has a standard error of about
0.035 dB and 0.0025. The simulation sits 0.8 dB and 0.025 inside the tolerances (README), more than
8 standard errors from either edge: a seed cannot flip this test, a change of the simulation can.
"""

from __future__ import annotations

import numpy as np
import pytest

from lensnas.objectives.sr.metrics import psnr_per_image
from lensnas.objectives.sr.objective import SRObjective

PUBLISHED_BILINEAR_PSNR = 24.78  # dB
PUBLISHED_BILINEAR_SSIM = 0.303
PSNR_TOLERANCE = 1.5  # dB
SSIM_TOLERANCE = 0.05
N_TEST = 300


@pytest.fixture(scope="module")
def model_1(tmp_path_factory) -> SRObjective:
    objective = SRObjective(
        {"n_train": 1, "n_validation": 1, "n_test": N_TEST}, {}, seed=2026,
        cache_dir=tmp_path_factory.mktemp("cache"), progress=False,
    )
    objective.prepare()
    return objective


def test_bilinear_baseline_matches_the_published_model_1_numbers(model_1):
    bilinear = {row.key: row for row in model_1.baselines}["bilinear"].metrics
    assert bilinear["psnr"] == pytest.approx(PUBLISHED_BILINEAR_PSNR, abs=PSNR_TOLERANCE)
    assert bilinear["ssim"] == pytest.approx(PUBLISHED_BILINEAR_SSIM, abs=SSIM_TOLERANCE)
    per_image = psnr_per_image(model_1.data["test_hr"], model_1.data["test_bilinear"])
    assert per_image.std() / np.sqrt(N_TEST) < 0.1  # the mean is measured to better than 0.1 dB


def test_model_1_images_are_what_deeplense_describes(model_1):
    data, attrs = model_1.data, model_1.trial_attrs()
    assert attrs["lr_shape"] == [75, 75] and attrs["hr_shape"] == [150, 150]
    assert attrs["degradation"] == {"psf_fwhm_hr_pixels": 0.0, "binning": 2}  # same PSF on both
    hr = data["test_hr"][:, 0]
    assert hr.min() == 0 and np.allclose(hr.max(axis=(1, 2)), 1)
    # the HR target carries photon noise: its normalised values come in steps of 1 / peak counts
    counts_per_unit = 1 / np.diff(np.unique(hr[0])).min()
    assert 20 < counts_per_unit < 1000
    assert np.allclose(hr[0] * counts_per_unit, np.round(hr[0] * counts_per_unit), atol=1e-3)
    # an Einstein ring of radius 1.28" (51 HR pixels) around the centre, dark in the middle
    rows, columns = np.mgrid[:150, :150] - 74.5
    radius = np.hypot(rows, columns)
    assert hr[:, radius < 20].mean() < 0.05 < hr[:, (radius > 40) & (radius < 62)].mean()
    noise = data["test_lr_noise"]
    assert 0.05 < np.median(noise) < 0.12  # LR peak / noise RMS around 11.5 (median)
