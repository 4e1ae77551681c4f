"""Periodic fractal fields and their sampling (cloud structure, housing and obstacle texture)."""

from __future__ import annotations

import numpy as np


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Cubic smoothstep of x clipped to [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def fractal_noise(
    rng: np.random.Generator, n: int, beta: float, aniso: float = 1.0, k0: float = 2.0
) -> np.ndarray:
    """Periodic (n, n) Gaussian field with power spectrum ~ (k² + k0²)^(-beta/2), zero mean, unit variance.

    ``k0`` (cycles per field) sets the outer scale; axis 0 is stretched by ``aniso`` (structures elongated
    along axis 0).
    """
    ku = np.fft.fftfreq(n)[:, None] * n
    kv = np.fft.rfftfreq(n)[None, :] * n
    k2 = (ku / aniso) ** 2 + kv**2 + k0**2
    amp = k2 ** (-beta / 4)
    amp[0, 0] = 0.0
    spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
    f = np.fft.irfft2(spec, s=(n, n))
    return ((f - f.mean()) / f.std()).astype(np.float32)


class WrapSampler:
    """Bilinear sampling of periodic (n, n) fields (n a power of two) at fixed fractional grid
    coordinates (u, v), shifted along u by a per-call amount (advection)."""

    def __init__(self, n: int, u: np.ndarray, v: np.ndarray):
        if n & (n - 1):
            raise ValueError(f"field size {n} is not a power of two")
        self.n = n
        fu, fv = np.floor(u), np.floor(v)
        self.iu = (fu.astype(np.int64) % n).astype(np.int32)
        self.wu = (u - fu).astype(np.float32)
        j0 = fv.astype(np.int64) % n
        self.j0 = j0.astype(np.int32)
        self.j1 = ((j0 + 1) % n).astype(np.int32)
        self.wv = (v - fv).astype(np.float32)

    def __call__(self, field: np.ndarray, shift: float) -> np.ndarray:
        """Values of ``field`` (n, n) at (u - shift, v); complex fields sample two real ones at once."""
        n = self.n
        s_int = int(np.floor(shift))
        wu = self.wu - np.float32(shift - s_int)
        back = wu < 0
        wu += back
        i0 = (self.iu - s_int - back) & (n - 1)
        i1 = ((i0 + 1) & (n - 1)) * n
        i0 *= n
        flat = field.ravel()
        wv = self.wv
        top = flat.take(i0 + self.j0) * (1 - wv) + flat.take(i0 + self.j1) * wv
        bottom = flat.take(i1 + self.j0) * (1 - wv) + flat.take(i1 + self.j1) * wv
        return top * (1 - wu) + bottom * wu
