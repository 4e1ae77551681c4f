"""Binning and store samples."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import zarr

from cirrus_batch.data import InputSpec, StoreSamples, bin_image


def test_bin_image_is_the_block_mean_and_cuts_the_remainder():
    x = np.random.default_rng(0).random((2, 1, 10, 13)).astype(np.float32)
    out = bin_image(x, 4)
    assert out.shape == (2, 1, 2, 3)
    expect = x[..., :8, :12].reshape(2, 1, 2, 4, 3, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    mask = (x[0, 0] > 0.5).astype(np.uint8)
    assert bin_image(mask, 2).shape == (5, 6) and bin_image(mask, 2).dtype == np.float32
    np.testing.assert_array_equal(bin_image(mask, 1), mask.astype(np.float32))
    assert bin_image(mask, 1).dtype == np.float32


def test_bin_image_of_float16_is_the_float32_mean_at_float16_precision():
    x = (np.random.default_rng(0).normal(0, 3, (2, 2, 16, 20))).astype(np.float16)
    out = bin_image(x, 4)
    exact = x.astype(np.float32).reshape(2, 2, 4, 4, 5, 4).mean(axis=(3, 5))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, exact.astype(np.float16).astype(np.float32))  # one rounding, not a sum of
    np.testing.assert_allclose(out, exact, rtol=2**-11, atol=2**-24)  # float16 rounded terms


def test_input_spec_adds_the_binned_zenith_channel_and_round_trips():
    norm = np.random.default_rng(1).random((3, 8, 12)).astype(np.float32)
    zenith = np.tile(np.linspace(0, 120, 12, dtype=np.float32), (8, 1))
    spec = InputSpec("segment", bin=2, zenith=True)
    x = spec.inputs(norm, zenith)
    assert x.shape == (3, 2, 4, 6) and x.dtype == np.float32 and spec.in_channels == 2
    np.testing.assert_allclose(x[:, 0], bin_image(norm, 2), rtol=1e-6)
    np.testing.assert_allclose(x[1, 1], bin_image(np.clip(zenith / 90, 0, 1.25), 2), rtol=1e-6)
    assert InputSpec.from_metadata(spec.to_metadata()) == spec
    residual = InputSpec("segment", bin=2, zenith=True, image="residual")
    assert InputSpec.from_metadata(residual.to_metadata()) == residual and not residual.inputs_like(spec)
    assert InputSpec.from_metadata({"task": "segment", "bin": 2, "zenith_channel": True}) == spec  # older models
    with pytest.raises(ValueError, match="image must be one or more of"):
        InputSpec("segment", image="raw")
    with pytest.raises(ValueError, match="image must be one or more of"):
        InputSpec("segment", image="residual+residual")
    both = InputSpec("segment", bin=2, zenith=True, image="residual+brightness")
    assert both.images == ("residual", "brightness") and both.in_channels == 3
    stacked = np.stack([norm, 1 - norm], axis=1)
    x2 = both.inputs(stacked, zenith)
    assert x2.shape == (3, 3, 4, 6)
    np.testing.assert_allclose(x2[:, 1], bin_image(1 - norm, 2), rtol=1e-6)
    with pytest.raises(ValueError, match="reads 2 images"):
        both.inputs(norm, zenith)
    plain = InputSpec("classify", bin=1, zenith=False)
    assert plain.inputs(norm).shape == (3, 1, 8, 12) and plain.in_channels == 1
    with pytest.raises(ValueError, match="zenith map"):
        spec.inputs(norm)
    with pytest.raises(ValueError, match="cirrus train"):
        InputSpec.from_metadata({})


def test_store_samples_read_the_spec_images_and_majority_or_soft_targets(store):
    group = zarr.open_group(store, mode="r")
    cloudy = np.flatnonzero(group["cloudy"][:])
    spec = InputSpec("segment", bin=4, zenith=True, image="residual+brightness")
    hard, soft = (StoreSamples(store, cloudy, spec, soft=s) for s in (False, True))
    assert hard.binned == ("residual", "brightness")  # prepare's residual_bin4, brightness_bin4
    unbinned = StoreSamples(store, cloudy, InputSpec("segment", bin=2, zenith=True, image="residual+brightness"))
    assert unbinned.binned == ()  # no residual_bin2: binned from the full images
    edges = 0
    for i in range(len(cloudy)):
        image, target, weight = hard[i]
        _, fraction, _ = soft[i]
        expect = bin_image(group["mask"][int(cloudy[i])], 4)
        assert image.shape == (3, 24, 30) and target.shape == fraction.shape == weight.shape == (1, 24, 30)
        for c, name in enumerate(("residual", "brightness")):
            full = group[name][int(cloudy[i])]
            np.testing.assert_array_equal(image[c].numpy(), bin_image(full, 4))  # stored binned: the same values
            np.testing.assert_allclose(image[c].numpy(), bin_image(full.astype(np.float32), 4), rtol=2**-11, atol=1e-6)
            np.testing.assert_array_equal(unbinned[i][0][c].numpy(), bin_image(full, 2))
        np.testing.assert_array_equal(target[0].numpy(), (expect > 0.5).astype(np.float32))
        np.testing.assert_allclose(fraction[0].numpy(), expect, rtol=1e-6)
        edges += int(((expect > 0) & (expect < 1)).sum())
    assert edges > 0  # the soft targets carry more than the majority


def test_store_samples_unbinned_soft_targets_are_float(store):
    """bin = 1 leaves the uint8 mask unbinned: its soft target must still be a float for the loss."""
    group = zarr.open_group(store, mode="r")
    cloudy = np.flatnonzero(group["cloudy"][:])
    spec = InputSpec("segment", bin=1, zenith=True, image="residual+brightness")
    _, fraction, weight = StoreSamples(store, cloudy, spec, soft=True)[0]
    assert fraction.dtype == weight.dtype == torch.float32
    np.testing.assert_array_equal(fraction[0].numpy(), group["mask"][int(cloudy[0])].astype(np.float32))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros_like(fraction), fraction)
    assert torch.isfinite(loss)


def test_store_samples_cache_built_samples_within_their_budget(store, monkeypatch):
    group = zarr.open_group(store, mode="r")
    cloudy = np.flatnonzero(group["cloudy"][:])[:3]
    spec = InputSpec("segment", bin=4, zenith=True, image="residual")
    sample_mib = (2 + 1) * 24 * 30 * 4 / 2**20  # input (2 channels) + target, float32
    cached = StoreSamples(store, cloudy, spec, soft=True, cache_mb=2.5 * sample_mib)
    first = [cached[i] for i in range(3)]
    reads = []
    real_read = cached._read
    monkeypatch.setattr(cached, "_read", lambda p: reads.append(p) or real_read(p))
    again = [cached[i] for i in range(3)]
    assert reads == [int(cloudy[2])]  # two samples fit in the budget, the third is read again
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    monkeypatch.undo()
    assert cached._cache and pickle.loads(pickle.dumps(cached))._cache == {}  # DataLoader workers start empty
    uncached = StoreSamples(store, cloudy, spec, soft=True)
    uncached[0]
    assert uncached._cache == {}


def test_residual_evidence_raises_the_targets_the_mask_left_clear(store):
    """With ``cloud_given_residual`` a pixel the mask calls cloud stays 1 and a clear one takes P(cloud | z)."""
    from cirrus_batch.masks import residual_sigmas
    from cirrus_batch.softmasks import CloudGivenResidual

    group = zarr.open_group(store, mode="r")
    cloudy = np.flatnonzero(group["cloudy"][:])
    spec = InputSpec("segment", bin=1, zenith=False, image="residual")
    table = CloudGivenResidual(np.array([0.0, 2.0, 4.0]), np.array([0.0, 0.5, 0.9], np.float32))
    _, target, _ = StoreSamples(store, cloudy, spec, soft=True, cloud_given_residual=table)[0]
    mask = group["mask"][int(cloudy[0])].astype(bool)
    z = residual_sigmas(group["residual"][int(cloudy[0])])
    t = target[0].numpy()
    assert (t[mask] == 1).all()
    faint = ~mask & (z >= 2) & (z < 4)
    assert faint.any() and np.allclose(t[faint], 0.5) and (t[~mask & (z < 2)] == 0).all()
