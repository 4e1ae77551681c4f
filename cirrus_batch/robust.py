"""Robust spread: the normal-equivalent width of a sample from its median absolute deviation."""

from __future__ import annotations

import numpy as np

MAD_TO_SIGMA = 1.4826
"""Standard deviation of a normal distribution per unit of its median absolute deviation (1 / Φ⁻¹(3/4))."""


def mad_sigma(values: np.ndarray) -> float:
    """``MAD_TO_SIGMA * median(|x - median(x)|)``: a standard deviation that outliers (clouds, hot pixels,
    stars) do not inflate."""
    values = np.asarray(values)
    return MAD_TO_SIGMA * float(np.median(np.abs(values - np.median(values))))
