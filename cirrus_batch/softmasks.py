"""Soft segmentation targets: how likely a pixel that the mask left clear is cloud, from its clear-sky residual.

The astropy mask thresholds each pixel's residual ``z`` from the clear sky (in noise sigmas) at 4.5–5.5 sigmas, so
that clear skies stay clear; thin cirrus between about 2.5 and 4.5 sigmas is left out. A network trained on those
hard masks learns to call such pixels clear with confidence. Clouds only add radiance, so the residuals of the
pixels without cloud are about symmetric around 0 and the negative side of the season's residual histogram
shows the shape of that null (the "mirror" local false-discovery rate): per bin of ``z > 0``,
``P(cloud | z) = 1 - n(-z) / n(z)``, made non-decreasing in ``z``, and 0 for ``z <= 0``. A pixel's soft target is
``max(mask, P(cloud | z))``: the mask where it says cloud, the residual's evidence where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BIN_SIGMA = 0.5
"""Width of the residual bins (noise sigmas)."""
MIN_COUNT = 200
"""A bin with fewer pixels on its positive side takes the probability of the bin below it."""


@dataclass(frozen=True)
class CloudGivenResidual:
    """``P(cloud | z)`` on bins of ``z`` from 0 up (``edges``), as fitted by :func:`fit_cloud_given_residual`."""

    edges: np.ndarray
    prob: np.ndarray

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """float32 ``P(cloud | z)`` of residuals ``z`` (any shape): 0 at and below 0, the last bin's beyond."""
        k = np.clip(np.searchsorted(self.edges, z, side="right") - 1, 0, self.prob.size - 1)
        return np.where(np.asarray(z) > 0, self.prob[k], 0.0).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"edges": self.edges.tolist(), "prob": [round(float(p), 4) for p in self.prob]}


def fit_cloud_given_residual(z: np.ndarray, max_sigma: float = 12.0) -> CloudGivenResidual:
    """``P(cloud | z)`` from the residuals ``z`` of many sky pixels (noise sigmas, NaN ignored): the mirror local
    false-discovery rate (module docstring). Raises ValueError without enough pixels on both sides of 0."""
    z = np.asarray(z, np.float32).ravel()
    z = z[np.isfinite(z)]
    edges = np.arange(0.0, max_sigma + BIN_SIGMA / 2, BIN_SIGMA)
    pos, _ = np.histogram(z, edges)
    neg, _ = np.histogram(-z, edges)
    if pos[:2].sum() < MIN_COUNT or neg[:2].sum() < MIN_COUNT:
        raise ValueError(f"too few sky pixels near 0 sigmas ({pos[:2].sum()} above, {neg[:2].sum()} below) to "
                         "tell the residuals of clear pixels from those of clouds")  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"):
        prob = np.clip(1.0 - neg / pos, 0.0, 1.0)
    prob[0] = 0.0  # within half a sigma of the clear sky: no evidence either way
    for k in range(1, prob.size):  # thin bins take the one below; the probability never falls as z grows
        prob[k] = prob[k - 1] if pos[k] < MIN_COUNT else max(prob[k], prob[k - 1])
    return CloudGivenResidual(edges[:-1], prob.astype(np.float32))
