"""Binning and store samples."""

from __future__ import annotations

import numpy as np

from cirrus_batch.data import bin_image


def test_bin_image_is_the_block_mean_and_cuts_the_remainder():
    x = np.random.default_rng(0).random((2, 1, 10, 13)).astype(np.float32)
    out = bin_image(x, 4)
    assert out.shape == (2, 1, 2, 3)
    expect = x[..., :8, :12].reshape(2, 1, 2, 4, 3, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    mask = (x[0, 0] > 0.5).astype(np.uint8)
    assert bin_image(mask, 2).shape == (5, 6) and bin_image(mask, 1) is mask
