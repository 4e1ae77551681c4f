import numpy as np

from cirrus_batch.robust import mad_sigma


def test_mad_sigma_is_the_standard_deviation_of_a_normal_sample_whatever_its_outliers():
    x = np.random.default_rng(0).normal(5.0, 2.0, 100_000)
    assert abs(mad_sigma(x) - 2.0) < 0.03
    x[:10_000] = 1e6  # a tenth of the sample hot
    assert abs(mad_sigma(x) - 2.0) < 0.4
    assert np.std(x) > 1e5


def test_mad_sigma_of_a_constant_is_zero():
    assert mad_sigma(np.full(7, 3.5, np.float32)) == 0.0
