"""Soft segmentation targets from the residual: the mirror local false-discovery rate against a known mixture."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from cirrus_batch.masks import RESIDUAL_SOFTENING, residual_sigmas
from cirrus_batch.softmasks import fit_cloud_given_residual


def test_cloud_probability_follows_the_true_posterior_of_a_mixture() -> None:
    """Clear pixels N(0, 1), cloud pixels uniform on 2..10 sigmas: the fitted P(cloud | z) is the posterior
    within 0.05 per bin, 0 at and below 0, and never falls as z grows."""
    rng = np.random.default_rng(0)
    n0, n1 = 400_000, 40_000
    z = np.concatenate([rng.normal(0, 1, n0), rng.uniform(2, 10, n1)])
    fit = fit_cloud_given_residual(z)
    assert (np.diff(fit.prob) >= 0).all() and fit(np.array([-3.0, 0.0]))[0] == 0 == fit(np.array([0.0]))[0]
    for lo in (2.0, 2.5, 3.0, 4.0):
        cloud = n1 / 8 * 0.5
        clear = n0 * (norm.cdf(lo + 0.5) - norm.cdf(lo))
        assert fit(np.array([lo + 0.25]))[0] == pytest.approx(cloud / (cloud + clear), abs=0.05), lo
    assert fit(np.array([1.2]))[0] < 0.02 and fit(np.array([6.0]))[0] > 0.99


def test_residual_round_trip_and_too_few_pixels_is_an_error() -> None:
    z = np.array([-3.0, 0.0, 2.5, 40.0], np.float32)
    stored = np.arcsinh(z / RESIDUAL_SOFTENING) / 2
    np.testing.assert_allclose(residual_sigmas(stored), z, rtol=1e-5)
    with pytest.raises(ValueError, match="too few sky pixels"):
        fit_cloud_given_residual(np.full(100, 5.0))
