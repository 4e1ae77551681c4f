"""Sky flat: each sky pixel's response to the clear sky, measured on the season's clear frames.

The clear-sky model (:mod:`cirrus_batch.clearsky`) depends on the zenith angle only. A real camera adds what no
radial model follows: a tilt, vignetting or a warm lens rim on one side, flat-field residue. These are fixed in
the camera, so the clear frames the model was fitted on show them again and again. On those frames *j* every sky
pixel's brightness is regressed on the model's clear sky ``m_j``:

    e_j = a + (1 + b) m_j + noise

with the gain ``b`` shrunk towards 0 where the clear frames span little of ``m`` (``ridge``), in two passes (the
second leaves out what lies more than ``flat_clip`` sigmas above the first, a cloud in a clear frame, and whole
frames whose residuals scatter far more than the first pass's noise: thin cirrus the clear-frame search let
through, whose texture would raise the noise that every mask's threshold rests on). Every image is
then flattened, ``e' = (e - a) / (1 + b)``, and the noise per zenith-angle bin is what the flattened clear frames
keep: much less than the azimuthal scatter of an unflattened frame, so faint cirrus stands out. Astronomers divide
by a sky flat for the same reason; Wang et al. (2021, Remote Sens. 13, 1852) subtract a per-pixel clear-sky image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cirrus_batch.geometry import SkyGeometry

GAIN_PRIOR = 0.1
"""Prior standard deviation of the gain ``b``: clear frames that span little of the clear sky leave it near 0
and uncertain, and the noise of skies far from theirs grows by that uncertainty."""
MAX_GAIN = 0.5
"""|b| above this is not a flat-field effect: clipped."""


@dataclass
class FlatSums:
    """Per-sky-pixel sums over clear frames of ``m`` (model), ``r = e - m`` (residual) and their products; the
    number of frames summed (shape (1,))."""

    n: np.ndarray
    m: np.ndarray
    r: np.ndarray
    mm: np.ndarray
    mr: np.ndarray
    rr: np.ndarray
    frames: np.ndarray

    def __add__(self, other: FlatSums) -> FlatSums:
        return FlatSums(*(getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__))

    @classmethod
    def zeros(cls, size: int) -> FlatSums:
        return cls(*(np.zeros(1 if k == "frames" else size) for k in cls.__dataclass_fields__))


@dataclass
class SkyFlat:
    """Offset ``a`` and gain ``b`` maps (y, x) float32 (0 off the sky), the mean clear sky ``m0`` of the frames
    they were measured on and the variance of ``b``, and the noise per zenith-angle bin left on the flattened
    clear frames (ambient units)."""

    offset: np.ndarray
    gain: np.ndarray
    mean_clear: np.ndarray
    gain_var: np.ndarray
    sigma: list[float]
    frames: int

    ARRAYS = ("offset", "gain", "mean_clear", "gain_var")

    def on(self, sky_idx: np.ndarray) -> tuple[np.ndarray, ...]:
        """(a, 1 / (1 + b), m0, var b) on the flat sky pixels ``sky_idx`` (float32)."""
        a, b, m0, vb = (getattr(self, k).ravel()[sky_idx].astype(np.float32) for k in self.ARRAYS)
        return a, (1.0 / (1.0 + b)).astype(np.float32), m0, vb


def accumulate(e: np.ndarray, m: np.ndarray, valid: np.ndarray, sums: FlatSums) -> None:
    """Add one clear frame (brightness ``e``, model ``m`` on the sky pixels; ``valid`` pixels only) to ``sums``."""
    w = valid.astype(np.float64)
    m = m.astype(np.float64) * w
    r = (e.astype(np.float64) - m) * w
    sums.n += w
    sums.m += m
    sums.r += r
    sums.mm += m * m
    sums.mr += m * r
    sums.rr += r * r
    sums.frames += 1


def _bin_median(values: np.ndarray, bins: np.ndarray, seen: np.ndarray, n_bins: int) -> np.ndarray:
    out = np.full(n_bins, np.nan)
    for k in np.unique(bins[seen]):
        out[k] = np.median(values[seen & (bins == k)])
    ok = np.isfinite(out)
    return np.where(ok, out, np.max(out[ok]) if ok.any() else 0.02**2)


def fit_flat(sums: FlatSums, geom: SkyGeometry, bins: np.ndarray, n_bins: int, floor: float) -> SkyFlat:
    """The :class:`SkyFlat` of ``sums`` over the sky pixels of ``geom``; ``bins`` their zenith-angle bin,
    ``floor`` added to the noise in quadrature. The gain has the prior N(0, GAIN_PRIOR²)."""
    n = np.maximum(sums.n, 1.0)
    mean_m, mean_r = sums.m / n, sums.r / n
    sxx = np.maximum(sums.mm - n * mean_m**2, 0.0)
    sxy = sums.mr - n * mean_m * mean_r
    syy = np.maximum(sums.rr - n * mean_r**2, 0.0)
    seen = sums.n >= 2
    # the noise first from the offset alone (an upper bound), then the gain's posterior with that noise
    noise = _bin_median(syy / np.maximum(sums.n - 1, 1.0), bins, seen, n_bins)[bins]
    shrink = noise / GAIN_PRIOR**2
    b = np.clip(sxy / (sxx + shrink), -MAX_GAIN, MAX_GAIN)
    var_b = noise / (sxx + shrink)
    a = mean_r - b * mean_m
    sse = np.maximum(syy - 2 * b * sxy + b**2 * sxx, 0.0)
    var = sse / np.maximum(sums.n - 2, 1.0) / (1.0 + b) ** 2
    sig = ndimage.gaussian_filter1d(np.hypot(np.sqrt(_bin_median(var, bins, seen, n_bins)), floor), 2.0,
                                    mode="nearest")  # fmt: skip
    sky_idx = np.flatnonzero(geom.sky)
    maps = {k: np.zeros(geom.shape, np.float32) for k in SkyFlat.ARRAYS}
    for k, v in (("offset", a), ("gain", b), ("mean_clear", mean_m), ("gain_var", var_b)):
        maps[k].ravel()[sky_idx] = np.where(seen, v, 0.0)
    return SkyFlat(**maps, sigma=sig.tolist(), frames=int(sums.frames[0]))
