"""m/c estimators recover an injected bias within their errors."""

from __future__ import annotations

import numpy as np

from lensnas.objectives.shear.metrics import (
    linear_bias,
    paired_bias,
    response_matched_bias,
    rmse,
    shear_metrics,
)


def _truth(count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-0.1, 0.1, (count, 2))


def test_linear_fit_recovers_injected_m_and_c():
    rng = np.random.default_rng(1)
    truth = _truth(4000, rng)
    estimate = 1.02 * truth + 0.001 + rng.normal(0, 0.003, truth.shape)
    bias = linear_bias(estimate, truth)
    for i in (0, 1):
        assert abs(bias.m[i] - 0.02) < 4 * bias.m_err[i]
        assert abs(bias.c[i] - 0.001) < 4 * bias.c_err[i]
        assert 0 < bias.m_err[i] < 0.01


def test_paired_protocol_cancels_shape_noise_and_recovers_bias():
    rng = np.random.default_rng(2)
    truth = _truth(2000, rng)
    shape_noise = rng.normal(0, 0.2, truth.shape)  # identical at +g and -g: cancels in the pair
    noise_plus, noise_minus = rng.normal(0, 1e-3, (2, *truth.shape))
    plus = 1.02 * truth + 0.001 + shape_noise + noise_plus
    minus = -1.02 * truth + 0.001 + shape_noise + noise_minus
    bias = paired_bias(plus, minus, truth)
    for i in (0, 1):
        assert abs(bias.m[i] - 0.02) < 4 * bias.m_err[i]
        assert bias.m_err[i] < 1e-3  # shape noise of 0.2 would give ~1e-1 without pairing
    assert linear_bias(plus, truth).m_err[0] > 20 * bias.m_err[0]


def _responses(count: int, rng: np.random.Generator) -> np.ndarray:
    """Per-object 2x2 responses that scatter widely between objects, as metacal's do."""
    response = np.zeros((count, 2, 2))
    response[:, 0, 0], response[:, 1, 1] = rng.uniform(0.2, 0.8, (2, count))
    response[:, 0, 1] = response[:, 1, 0] = rng.normal(0, 0.02, count)
    return response


def test_response_matched_bias_recovers_m_without_the_scatter_of_responses():
    """An estimator e = (1 + m) R g + c with per-object R: m and c come back with errors far
    below those of dividing by the mean response, whose error is the responses' scatter."""
    rng = np.random.default_rng(4)
    truth = _truth(1000, rng)
    response = _responses(1000, rng)
    shape_noise = rng.normal(0, 0.2, truth.shape)
    plus = 1.003 * np.einsum("nij,nj->ni", response, truth) + 2e-4 + shape_noise
    minus = -1.003 * np.einsum("nij,nj->ni", response, truth) + 2e-4 + shape_noise
    measured = response + rng.normal(0, 1e-3, response.shape)  # metacal's finite-difference noise
    bias = response_matched_bias(plus, minus, measured, measured, truth)
    inverse = np.linalg.inv(response.mean(axis=0))
    by_mean_response = paired_bias(plus @ inverse.T, minus @ inverse.T, truth)
    c_expected = (2e-4 + shape_noise.mean(axis=0)) @ np.linalg.inv(measured.mean(axis=0)).T
    for i in (0, 1):
        assert abs(bias.m[i] - 0.003) < 4 * bias.m_err[i] and bias.m_err[i] < 2e-4
        assert abs(bias.c[i] - c_expected[i]) < 1e-9
        assert by_mean_response.m_err[i] > 10 * bias.m_err[i]


def test_jackknife_errors_match_the_scatter_of_repeated_experiments():
    rng = np.random.default_rng(3)
    estimates = []
    errors = []
    for _ in range(200):
        truth = _truth(300, rng)
        plus = truth + rng.normal(0, 0.01, truth.shape)
        minus = -truth + rng.normal(0, 0.01, truth.shape)
        bias = paired_bias(plus, minus, truth)
        estimates.append(bias.m[0])
        errors.append(bias.m_err[0])
    assert 0.8 < np.std(estimates) / np.mean(errors) < 1.25


def test_rmse_and_flat_metrics():
    truth = np.array([[0.1, 0.0], [0.0, -0.1]])
    estimate = truth + np.array([[0.03, 0.0], [-0.03, 0.04]])
    g1, g2, both = rmse(estimate, truth)
    assert np.isclose(g1, 0.03) and np.isclose(g2, np.sqrt(0.04**2 / 2))
    assert np.isclose(both, np.sqrt((0.03**2 * 2 + 0.04**2) / 4))
    metrics = shear_metrics(np.tile(estimate, (2, 1)), np.tile(truth, (2, 1)), -np.tile(estimate, (2, 1)))
    assert {"rmse", "m1", "m1_err", "c2_err", "linear_m1", "paired_m1", "abs_m"} <= set(metrics)
