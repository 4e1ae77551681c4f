"""Network input normalization of raw ADU: a deterministic affine map, the same at training and inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cirrus_batch.geometry import SkyGeometry, usable
from cirrus_batch.radiometry import NODATA


@dataclass
class Normalization:
    """raw ADU -> float32 network input: ``clip((raw - offset) / scale, lo, hi)``; NODATA -> ``fill``."""

    method: str
    params: dict[str, float]

    def to_attrs(self) -> dict[str, Any]:
        return {"method": self.method, "params": {k: float(v) for k, v in self.params.items()}}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Normalization:
        return cls(method=str(attrs["method"]), params={k: float(v) for k, v in attrs["params"].items()})


def fit_normalization(sample: np.ndarray, geom: SkyGeometry) -> Normalization:
    """Affine normalization from a sample: offset = median dark level (else the 0.5th sky percentile), scale =
    99.5th sky percentile - offset.

    The clear zenith then sits near 0.2-0.4 and warm clouds/obstacles near 0.8-1; values are clipped to
    [-0.5, 2] and no-data pixels become ``fill`` = 0 (the dark level).
    """
    sample = np.asarray(sample)
    if sample.ndim == 2:
        sample = sample[None]
    good = sample[usable(sample)]
    if good.shape[0] == 0:
        raise ValueError("fit_normalization: no usable image in the sample")
    step = max(1, int(good[:, geom.sky].shape[1] // 20000))
    skyv = good[:, geom.sky][:, ::step].astype(np.float32)
    dark = geom.dark
    offset = float(np.median(good[:, dark])) if dark.any() else float(np.percentile(skyv, 0.5))
    hi = float(np.percentile(skyv, 99.5))
    scale = max(hi - offset, 1.0)
    return Normalization("affine", {"offset": offset, "scale": scale, "lo": -0.5, "hi": 2.0, "fill": 0.0})


def normalize(raw: np.ndarray, norm: Normalization) -> np.ndarray:
    """float32 ``clip((raw - offset) / scale, lo, hi)``, NODATA pixels -> ``fill`` (any shape)."""
    if norm.method != "affine":
        raise ValueError(f"unknown normalization method {norm.method!r}")
    p = norm.params
    raw = np.asarray(raw)
    out = (raw.astype(np.float32) - np.float32(p["offset"])) * np.float32(1.0 / p["scale"])
    np.clip(out, p["lo"], p["hi"], out=out)
    out[raw == NODATA] = p["fill"]
    return out
