"""Training-only augmentation: one random affine transform applied identically to an image and its mask.

Images are resampled bilinearly, masks with nearest neighbour (they stay binary).  Output pixels whose source
lies outside the frame are set to 0 and get weight 0 in the returned ``valid`` tensor, so a loss can
ignore them.
Pure flips (and the identity) take an exact ``torch.flip`` path, so they are lossless.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cirrus_batch.config import AugmentConfig

__all__ = ["AugmentConfig", "random_affine", "apply_affine", "augment"]


def _uniform(
    n: int, half_width: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=device, dtype=torch.float64) * 2 - 1) * half_width


def random_affine(
    n: int,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Draw ``n`` affine matrices (n, 2, 3) for ``F.affine_grid``: rotation ∘ shear ∘ zoom, flips as signs.

    The matrices map output to input coordinates (no translation).  Give ``size=(h, w)`` to make rotation and
    shear exact in pixel space for non-square images (normalised coordinates stretch the shorter side).
    Random numbers are drawn on the generator's device, then the result is moved to ``device``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    angle = _uniform(n, math.radians(cfg.rotate_deg), generator, gen_device)
    shear = _uniform(n, math.radians(cfg.shear_deg), generator, gen_device)
    scale = 1 + _uniform(n, cfg.zoom, generator, gen_device)
    if cfg.flip:
        signs = torch.randint(0, 2, (n, 2), generator=generator, device=gen_device).to(torch.float64) * 2 - 1
    else:
        signs = torch.ones(n, 2, dtype=torch.float64, device=gen_device)
    apply = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64) < cfg.p

    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shr = torch.eye(2, dtype=torch.float64, device=gen_device).repeat(n, 1, 1)
    shr[:, 0, 1] = torch.tan(shear)
    lin = rot @ shr * scale[:, None, None] @ torch.diag_embed(signs)
    if size is not None:
        h, w = size
        d = torch.tensor([w / 2, h / 2], dtype=torch.float64, device=gen_device)
        lin = lin * d[None, None, :] / d[None, :, None]  # D^-1 A D: pixel-space transform
    lin = torch.where(apply[:, None, None], lin, torch.eye(2, dtype=torch.float64, device=gen_device))
    theta = torch.cat([lin, torch.zeros(n, 2, 1, dtype=torch.float64, device=gen_device)], dim=2)
    return theta.to(device=device if device is not None else gen_device, dtype=torch.float32)


def _flip_signs(theta: torch.Tensor) -> torch.Tensor:
    """Per sample: (sign_x, sign_y) when theta is exactly a flip/identity, else (0, 0)."""
    diag = theta[:, [0, 1], [0, 1]]
    pure = (
        (theta[:, :, 2] == 0).all(1)
        & (theta[:, 0, 1] == 0)
        & (theta[:, 1, 0] == 0)
        & (diag.abs() == 1).all(1)
    )
    return torch.where(pure[:, None], diag, torch.zeros_like(diag))


def _sample(t: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    return F.grid_sample(t, grid, mode=mode, padding_mode="border", align_corners=False)


def _flip(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    return t.flip(dims) if dims else t


def apply_affine(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    theta: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Warp ``images`` (n, c, h, w) and ``masks`` (n, 1, h, w) with the same ``theta`` (n, 2, 3).

    ``valid`` (n, 1, h, w), optional, marks usable input pixels and is warped like a mask.  Returns
    ``(images, masks, valid)`` on the input device; masks keep their dtype, ``valid`` is float 0/1.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (n, c, h, w), got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if theta.shape != (n, 2, 3):
        raise ValueError(f"theta must be ({n}, 2, 3) to match images, got {tuple(theta.shape)}")
    for name, t in (("masks", masks), ("valid", valid)):
        if t is not None and (t.ndim != 4 or t.shape[0] != n or t.shape[2:] != images.shape[2:]):
            raise ValueError(f"{name} must be ({n}, 1, {h}, {w}) to match images, got {tuple(t.shape)}")
    theta = theta.to(device=images.device)
    dtype = images.dtype if images.is_floating_point() else torch.float32
    ones = torch.ones(n, 1, h, w, device=images.device, dtype=dtype)
    valid_in = ones if valid is None else valid.to(device=images.device, dtype=dtype)

    grid = F.affine_grid(theta.to(dtype), [n, 1, h, w], align_corners=False)
    inside = (grid.abs() <= 1).all(-1)[:, None].to(dtype)
    out_img = _sample(images.to(dtype), grid, "bilinear")
    out_valid = _sample(valid_in, grid, "nearest") * inside
    out_mask = _sample(masks.to(dtype), grid, "nearest") if masks is not None else None

    # exact path for pure flips / identity
    signs = _flip_signs(theta)
    for sx, sy in ((1, 1), (-1, 1), (1, -1), (-1, -1)):
        sel = (signs[:, 0] == sx) & (signs[:, 1] == sy)
        if not bool(sel.any()):
            continue
        dims = [d for d, s in ((-1, sx), (-2, sy)) if s == -1]
        out_img[sel] = _flip(images[sel].to(dtype), dims)
        out_valid[sel] = _flip(valid_in[sel], dims)
        if out_mask is not None and masks is not None:
            out_mask[sel] = _flip(masks[sel].to(dtype), dims)

    out_img = out_img * out_valid
    if out_mask is not None and masks is not None:
        out_mask = (out_mask * out_valid).to(masks.dtype)
    return out_img, out_mask, out_valid


def augment(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Draw one random transform per sample and apply it to the batch; returns ``(images, masks, valid)``."""
    if images.ndim != 4:
        raise ValueError(f"images must be (n, c, h, w), got shape {tuple(images.shape)}")
    theta = random_affine(images.shape[0], cfg, generator, images.device, size=tuple(images.shape[2:]))
    return apply_affine(images, masks, theta)
