"""Binning and store samples."""

from __future__ import annotations

import numpy as np
import pytest

from cirrus_batch.data import InputSpec, bin_image


def test_bin_image_is_the_block_mean_and_cuts_the_remainder():
    x = np.random.default_rng(0).random((2, 1, 10, 13)).astype(np.float32)
    out = bin_image(x, 4)
    assert out.shape == (2, 1, 2, 3)
    expect = x[..., :8, :12].reshape(2, 1, 2, 4, 3, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    mask = (x[0, 0] > 0.5).astype(np.uint8)
    assert bin_image(mask, 2).shape == (5, 6) and bin_image(mask, 1) is mask


def test_input_spec_adds_the_binned_zenith_channel_and_round_trips():
    norm = np.random.default_rng(1).random((3, 8, 12)).astype(np.float32)
    zenith = np.tile(np.linspace(0, 120, 12, dtype=np.float32), (8, 1))
    spec = InputSpec("segment", bin=2, zenith=True)
    x = spec.inputs(norm, zenith)
    assert x.shape == (3, 2, 4, 6) and x.dtype == np.float32 and spec.in_channels == 2
    np.testing.assert_allclose(x[:, 0], bin_image(norm, 2), rtol=1e-6)
    np.testing.assert_allclose(x[1, 1], bin_image(np.clip(zenith / 90, 0, 1.25), 2), rtol=1e-6)
    assert InputSpec.from_metadata(spec.to_metadata()) == spec
    plain = InputSpec("classify", bin=1, zenith=False)
    assert plain.inputs(norm).shape == (3, 1, 8, 12) and plain.in_channels == 1
    with pytest.raises(ValueError, match="zenith map"):
        spec.inputs(norm)
    with pytest.raises(ValueError, match="cirrus train"):
        InputSpec.from_metadata({})
