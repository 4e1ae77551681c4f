"""Night (sky) kinds: ambient temperature and humidity through the night, fog, cloud layers, sensor drift."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

KINDS = ("clear-dry", "broken", "cirrus", "overcast", "mixed", "clear-humid", "fog", "arriving")
"""Sky kinds; without ``kinds`` night i gets ``KINDS[i % len(KINDS)]``."""
NIGHT_START_H = 19.0
"""UTC hour of the first frame of a night."""


@dataclass(frozen=True)
class Layer:
    """One cloud layer: a plane at ``height_km`` carrying a fractal optical-depth field."""

    name: str
    height_km: float
    tau: float
    """Zenith 8-14 µm optical depth of the layer's core (emissivity 1 - exp(-tau))."""
    beta: float
    """Power-spectrum slope of the structure field, P(k) ~ k^-beta."""
    aniso: float
    """Elongation along the wind (1 = isotropic)."""
    scale_km: float
    """Outer scale of the structures (km)."""
    edge: float
    """Width of the edge ramp of the optical depth, in standard deviations of the field."""
    texture: float
    """Relative optical-depth modulation inside the cloud."""
    wind_ms: float
    wind_dir: float
    evol_s: float
    """Period (s) of the slow evolution (rotation between two independent fields)."""
    evol_phase: float
    cover: tuple[float, float, float, float]
    """Coverage c(t) = c0 + amp sin(2 pi t / period + phase)."""
    front: tuple[float, float] | None = None
    """The layer arrives: its upwind edge crosses the sky between these fractions of the night."""


@dataclass(frozen=True)
class Night:
    """Parameters of one night; ``t_s`` are frame times in seconds since ``start``."""

    index: int
    date: str
    kind: str
    start: np.datetime64
    t_s: np.ndarray
    t_amb0: float
    """Ambient temperature at the first frame (°C)."""
    t_rate: float
    """Ambient temperature change, K/h (negative: cooling)."""
    dew_dep: tuple[float, float, float]
    """Dew-point depression (K): value, amplitude of its slow variation, phase."""
    lapse: float
    """Tropospheric lapse rate (K/km)."""
    inversion: tuple[float, float]
    """Surface inversion: temperature rise (K) over depth (km)."""
    h_water_km: float
    fog: tuple[float, float] = (0.0, 0.0)
    """Fog zenith optical depth and top height (km); (0, 0) without fog."""
    ffc: tuple[int, ...] = ()
    """Frames just after a flat-field correction (shutter)."""
    ffc_step: tuple[float, ...] = ()
    """Offset step (ADU) at each FFC frame."""
    creep_adu_h: float = 0.0
    """Offset creep between FFCs (ADU/h)."""
    gain_drift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Relative gain change per 10 h, amplitude and phase of a 3-h wave."""
    house: tuple[float, float] = (0.5, 0.0)
    """Housing temperature: position in the camera's range (0..1), phase of its slow wave."""
    layers: tuple[Layer, ...] = field(default_factory=tuple)
    """Ascending height."""

    @property
    def times(self) -> np.ndarray:
        return self.start + np.round(self.t_s * 1000).astype("timedelta64[ms]")


def _cover(
    rng: np.random.Generator, c0: tuple[float, float], amp: float
) -> tuple[float, float, float, float]:
    return (rng.uniform(*c0), amp, rng.uniform(2, 6) * 3600, rng.uniform(0, 2 * np.pi))


def _layer(rng: np.random.Generator, name: str) -> Layer:
    common = {"wind_dir": rng.uniform(0, 2 * np.pi), "evol_phase": rng.uniform(0, 2 * np.pi)}
    if name == "cirrus":
        return Layer(name, height_km=rng.uniform(8, 11), tau=rng.uniform(0.15, 0.7), beta=3.6, aniso=4.0,
                     scale_km=rng.uniform(15, 40), edge=0.7, texture=0.4,
                     wind_ms=rng.uniform(10, 30), evol_s=rng.uniform(3, 6) * 3600,
                     cover=_cover(rng, (0.45, 0.7), 0.12), **common)  # fmt: skip
    if name == "stratus":
        return Layer(name, height_km=rng.uniform(0.3, 1.5), tau=rng.uniform(8, 20), beta=3.0, aniso=1.3,
                     scale_km=rng.uniform(3, 8), edge=1.0, texture=0.3,
                     wind_ms=rng.uniform(2, 8), evol_s=rng.uniform(3, 6) * 3600,
                     cover=(0.999, 0.0, 3600.0, 0.0), **common)  # fmt: skip
    if name == "cumulus":
        return Layer(name, height_km=rng.uniform(0.8, 2.5), tau=rng.uniform(4, 15), beta=3.4, aniso=1.2,
                     scale_km=rng.uniform(1.5, 4), edge=0.25, texture=0.3,
                     wind_ms=rng.uniform(3, 10), evol_s=rng.uniform(2, 4) * 3600,
                     cover=_cover(rng, (0.25, 0.5), 0.1), **common)  # fmt: skip
    raise ValueError(name)


def make_night(seed: int, index: int, kind: str, start: str, per_night: int, cadence_min: float) -> Night:
    """Parameters of night ``index`` (evening date ``start`` + index days), from ``(seed, 1, index)``."""
    if kind not in KINDS:
        raise ValueError(f"unknown sky kind {kind!r}; expected one of {KINDS}")
    rng = np.random.default_rng([seed, 1, index])
    day = np.datetime64(start, "D") + np.timedelta64(index, "D")
    t0 = day + np.timedelta64(int(NIGHT_START_H * 3600), "s")
    jitter = min(4.0, 0.2 * cadence_min * 60)
    t_s = np.round(np.arange(per_night) * cadence_min * 60 + rng.uniform(0, jitter, per_night), 3)
    clear = kind in ("clear-dry", "clear-humid")
    t_amb0 = rng.uniform(10, 22) if kind == "clear-humid" else rng.uniform(-8, 15)
    if kind == "clear-dry":
        dep = rng.uniform(12, 25)
    elif kind in ("clear-humid", "fog", "overcast"):
        dep = rng.uniform(0.3, 3.0)
    else:
        dep = rng.uniform(3, 10)
    inversion = (rng.uniform(1.5, 4.0), rng.uniform(0.08, 0.3)) if clear else (rng.uniform(0, 1), 0.2)
    layers: tuple[Layer, ...] = ()
    fog = (0.0, 0.0)
    if kind in ("broken", "mixed"):
        layers = (_layer(rng, "cumulus"),)
        if kind == "mixed":
            low = layers[0]
            layers = (replace(low, cover=(rng.uniform(0.15, 0.35), *low.cover[1:])), _layer(rng, "cirrus"))
    elif kind == "cirrus":
        layers = (_layer(rng, "cirrus"),)
    elif kind == "overcast":
        layers = (_layer(rng, "stratus"),)
    elif kind == "arriving":
        layers = (replace(_layer(rng, "stratus"), front=(0.35, 0.65)),)
    elif kind == "fog":
        fog = (rng.uniform(1.5, 4.0), rng.uniform(0.05, 0.3))
    n = len(t_s)
    ffc = [k for k in range(1, n) if rng.random() < 0.25]
    if not ffc and n > 1:
        ffc = [int(rng.integers(1, n))]
    steps = rng.uniform(10, 60, len(ffc)) * rng.choice([-1.0, 1.0], len(ffc))
    return Night(
        index=index, date=str(day).replace("-", ""), kind=kind, start=t0, t_s=t_s,
        t_amb0=t_amb0, t_rate=-rng.uniform(0.1, 0.3 if not clear else 0.6),
        dew_dep=(dep, rng.uniform(0.1, 0.2) * dep, rng.uniform(0, 2 * np.pi)),
        lapse=rng.uniform(5.5, 7.0), inversion=inversion, h_water_km=rng.uniform(1.5, 2.5), fog=fog,
        ffc=tuple(ffc), ffc_step=tuple(float(s) for s in steps), creep_adu_h=rng.uniform(-60, 60),
        gain_drift=(rng.uniform(-0.03, 0.03), rng.uniform(0.002, 0.008), rng.uniform(0, 2 * np.pi)),
        house=(rng.uniform(0, 1), rng.uniform(0, 2 * np.pi)), layers=layers,
    )  # fmt: skip
