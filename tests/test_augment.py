"""Tests for cirrus_batch.augment: image and mask move together, masks stay binary, flips are exact."""

from __future__ import annotations

import pytest
import torch

from cirrus_batch.augment import AugmentConfig, apply_affine, augment, random_affine

H, W = 32, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blob_batch(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random Gaussian blobs, away from the frame edges."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    img = torch.zeros(n, 1, H, W)
    for i in range(n):
        for _ in range(3):
            cy, cx = torch.rand(2, generator=g) * torch.tensor([H / 2, W / 2]) + torch.tensor([H / 4, W / 4])
            s = 2.5 + 3 * torch.rand(1, generator=g)
            img[i, 0] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    return img


def test_identity_theta_is_exact() -> None:
    img = torch.rand(3, 2, H, W)
    mask = (torch.rand(3, 1, H, W) > 0.5).to(torch.uint8)
    theta = torch.eye(2, 3).repeat(3, 1, 1)
    out, m, valid = apply_affine(img, mask, theta)
    assert torch.equal(out, img)
    assert torch.equal(m, mask) and m.dtype == torch.uint8
    assert torch.equal(valid, torch.ones(3, 1, H, W))


def test_flips_equal_torch_flip() -> None:
    img = torch.rand(4, 1, H, W)
    mask = (img > 0.5).float()
    theta = torch.zeros(4, 2, 3)
    signs = torch.tensor([[1, 1], [-1, 1], [1, -1], [-1, -1]], dtype=torch.float32)
    theta[:, 0, 0], theta[:, 1, 1] = signs[:, 0], signs[:, 1]
    out, m, _ = apply_affine(img, mask, theta)
    expected = [img[0], img[1].flip(-1), img[2].flip(-2), img[3].flip([-1, -2])]
    for i, e in enumerate(expected):
        assert torch.equal(out[i], e)
    assert torch.equal(m[1], mask[1].flip(-1))


def test_flip_only_config_matches_torch_flip() -> None:
    img = torch.rand(8, 1, H, W)
    cfg = AugmentConfig(rotate_deg=0, shear_deg=0, zoom=0, flip=True)
    theta = random_affine(8, cfg, torch.Generator().manual_seed(1), size=(H, W))
    out, _, _ = apply_affine(img, None, theta)
    for i in range(8):
        dims = [d for d, s in ((-1, theta[i, 0, 0]), (-2, theta[i, 1, 1])) if s < 0]
        assert torch.equal(out[i], img[i].flip(dims) if dims else img[i])


@pytest.mark.parametrize("seed", range(10))
def test_mask_stays_aligned_and_binary(seed: int) -> None:
    img = blob_batch(4, seed)
    t = 0.5
    mask = (img > t).to(torch.uint8)
    out, m, valid = augment(img, mask, AugmentConfig(), torch.Generator().manual_seed(seed))
    assert m.dtype == torch.uint8 and set(m.unique().tolist()) <= {0, 1}
    ref = out > t
    inter = (ref & (m == 1)).sum().item()
    union = (ref | (m == 1)).sum().item()
    assert union > 0 and inter / union > 0.9


def test_deterministic_with_seed() -> None:
    img = torch.rand(3, 1, H, W)
    a = augment(img, None, AugmentConfig(), torch.Generator().manual_seed(7))
    b = augment(img, None, AugmentConfig(), torch.Generator().manual_seed(7))
    c = augment(img, None, AugmentConfig(), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[0], c[0])


def test_valid_zero_outside_frame() -> None:
    img = torch.ones(1, 1, H, W)
    mask = torch.ones(1, 1, H, W)
    theta = torch.tensor([[[2.0, 0, 0], [0, 2.0, 0]]])  # zoom out: the border reads outside the frame
    out, m, valid = apply_affine(img, mask, theta)
    assert valid[0, 0, 0, 0] == 0 and valid[0, 0, H // 2, W // 2] == 1
    assert torch.equal(out, valid) and torch.equal(m, valid)
    assert 0.2 < valid.mean() < 0.3  # about a quarter of the output comes from inside


def test_input_valid_is_warped() -> None:
    img = torch.rand(1, 1, H, W)
    valid_in = torch.ones(1, 1, H, W)
    valid_in[..., :, : W // 2] = 0
    theta = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]])
    _, _, valid = apply_affine(img, None, theta, valid_in)
    assert torch.equal(valid, valid_in.flip(-1))


def test_p_zero_is_identity() -> None:
    img = torch.rand(5, 1, H, W)
    out, _, valid = augment(img, None, AugmentConfig(p=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, img) and bool((valid == 1).all())


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="p must be"):
        AugmentConfig(p=1.5)
    with pytest.raises(ValueError, match="theta must be"):
        apply_affine(torch.rand(2, 1, H, W), None, torch.eye(2, 3)[None])
    with pytest.raises(ValueError, match="masks must be"):
        apply_affine(torch.rand(2, 1, H, W), torch.rand(2, 1, H, W + 1), torch.eye(2, 3).repeat(2, 1, 1))
