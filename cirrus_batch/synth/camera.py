"""Camera kinds: fisheye projection, image circle, housing, horizon obstacles and sensor defects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cirrus_batch.synth.noise import fractal_noise

ADU_MAX = 16383
"""14-bit sensor."""


@dataclass(frozen=True)
class CameraKind:
    """Optical design of one camera kind (see the table in docs/synth.md)."""

    name: str
    projection: str
    """equidistant | equisolid | stereographic | orthographic."""
    fov_deg: float
    circle: float
    """Image-circle radius over half the sensor's short side (> 1: clipped by the sensor)."""
    housing: bool
    """Pixels outside the image circle see the warm lens barrel/housing (False: signal-free)."""
    housing_dt: tuple[float, float]
    """Housing temperature minus ambient (K), range of the night's mean."""
    vignette_deg: float
    """Vignetting cos⁴(ψ), ψ growing linearly to this angle at the image-circle rim."""
    description: str


_KINDS = (
    CameraKind("housing", "equidistant", 180.0, 0.96, True, (0.5, 5.0), 18.0,
               "equidistant 180°, image circle inside the sensor, warm housing around it"),
    CameraKind("darkrim", "equisolid", 180.0, 0.94, False, (0.0, 0.0), 22.0,
               "equisolid 180°, nothing but offset and noise outside the circle"),
    CameraKind("clipped", "stereographic", 180.0, 1.16, True, (1.0, 4.0), 25.0,
               "stereographic 180°, circle cut at the top and bottom, housing in the corners"),
    CameraKind("ortho", "orthographic", 170.0, 0.92, True, (-1.0, 3.0), 38.0,
               "orthographic 170° (horizon outside the image), strong vignetting, housing ring"),
)  # fmt: skip
CAMERA_KINDS: dict[str, CameraKind] = {k.name: k for k in _KINDS}
DEFAULT_CAMERA = "housing"


def project(kind: str, theta_rad: np.ndarray) -> np.ndarray:
    """Image radius over focal length for zenith angle θ."""
    if kind == "equidistant":
        return theta_rad
    if kind == "equisolid":
        return 2 * np.sin(theta_rad / 2)
    if kind == "stereographic":
        return 2 * np.tan(theta_rad / 2)
    if kind == "orthographic":
        return np.sin(theta_rad)
    raise ValueError(f"unknown projection {kind!r}")


def unproject(kind: str, rho: np.ndarray) -> np.ndarray:
    """Zenith angle (rad) for image radius over focal length (extrapolated beyond the circle)."""
    if kind == "equidistant":
        return rho
    if kind == "equisolid":
        return 2 * np.arcsin(np.clip(rho / 2, 0, 1)) + np.clip(rho - 2, 0, None)
    if kind == "stereographic":
        return 2 * np.arctan(rho / 2)
    if kind == "orthographic":
        return np.arcsin(np.clip(rho, 0, 1)) + np.clip(rho - 1, 0, None)
    raise ValueError(f"unknown projection {kind!r}")


@dataclass(frozen=True)
class Camera:
    """Fixed geometry, obstacles and sensor defects of one camera (same for every night)."""

    kind: CameraKind
    shape: tuple[int, int]
    cy: float
    cx: float
    radius: float
    """Radius (px) of the horizon (θ = 90°) circle; may exceed the sensor."""
    circle_px: float
    """Radius (px) of the image circle (θ = fov/2)."""
    north_deg: float
    """Image position angle of north, counterclockwise from up (east is counterclockwise of north), clockwise
    for a mirrored camera."""
    pointing: Pointing
    """Mirror and tilt of the optical axis (``north_deg`` holds the north actually used)."""
    focal_px: float
    """Focal length (px): image radius over ``project(θ)``; 1 / focal_px rad per px at the optical axis."""
    theta: np.ndarray
    """World zenith angle (deg) per pixel (beyond fov/2 outside the image circle)."""
    az: np.ndarray
    """World azimuth (rad, from north through east) per pixel."""
    sky: np.ndarray
    """True sky: fully inside the image circle, θ ≤ 90°, above the obstacles (bool)."""
    scene_idx: np.ndarray
    """Flat indices of pixels that see the sky (sky plus partly covered rim pixels)."""
    obstacle_idx: np.ndarray
    obstacle_dt: np.ndarray
    """Obstacle temperature minus ambient (K)."""
    obstacle_km: np.ndarray
    """Distance of the obstacle (km): buildings and mast near, the ridge far."""
    gain_scene: np.ndarray
    """Relative response to the scene: pixel gain x vignetting x fraction of the pixel inside the circle."""
    gain_house: np.ndarray
    """Relative response to the housing radiance (0 for a signal-free rim or inside the circle)."""
    house_dt: np.ndarray
    """Static temperature pattern of the housing (K) per pixel."""
    col_offset: np.ndarray
    """Column fixed-pattern offsets (ADU), shape (W,)."""
    adu_per_k: float
    """Gain: ADU per kelvin of a black body at 293 K."""
    offset: float
    netd_k: float
    lens_emissivity: float
    hot_idx: np.ndarray
    hot_add: np.ndarray
    dead_col: int

    @property
    def fov_deg(self) -> float:
        return self.kind.fov_deg


def horizon_profile(rng: np.random.Generator, n: int = 1440) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(elevation deg, ΔT K, distance km) on an azimuth grid: a ridge plus 1-2 buildings or domes."""
    az = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ridge = np.zeros(n)
    for k in range(1, 12):
        ridge += k**-1.4 * np.cos(k * az + rng.uniform(0, 2 * np.pi))
    elev = 2.0 + 10.0 * (ridge - ridge.min()) / np.ptp(ridge)
    d_t = np.full(n, rng.uniform(-3.0, 0.0))  # distant ridge: slope air, radiatively cooled
    dist = np.full(n, rng.uniform(3.0, 15.0))
    for _ in range(rng.integers(1, 3)):
        c, w, top = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(8, 18)), rng.uniform(10, 25)
        d = np.angle(np.exp(1j * (az - c))) / (w / 2)
        roof = np.clip(1 - d**2, 0, 1) ** 0.2 if rng.random() < 0.5 else 1.0
        bldg = np.where(np.abs(d) < 1, top * roof, 0.0)
        hit = bldg > elev
        elev = np.where(hit, bldg, elev)
        d_t = np.where(hit, rng.uniform(0.5, 3.0), d_t)  # heated building
        dist = np.where(hit, rng.uniform(0.03, 0.1), dist)
    return elev, d_t, dist


@dataclass(frozen=True)
class Pointing:
    """How the camera is mounted: ``None`` fields keep the seed's draw."""

    north_deg: float | None = None
    """Image position angle of north (deg), counterclockwise from up (clockwise when mirrored)."""
    mirror: bool = False
    """East-west mirror: east clockwise of north on the image (False: counterclockwise, the sky seen from below)."""
    tilt_deg: float = 0.0
    """Angle (deg) between the optical axis and the zenith."""
    tilt_az_deg: float = 0.0
    """Azimuth (deg, from north through east) towards which the optical axis leans."""


def _tilted(theta_deg: np.ndarray, az_rad: np.ndarray, tilt_deg: float, tilt_az_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """World (zenith angle deg, azimuth rad) of camera-frame directions when the optical axis leans by ``tilt_deg``
    towards azimuth ``tilt_az_deg`` (Rodrigues rotation taking the zenith onto the axis)."""
    th = np.radians(np.minimum(theta_deg, 179.0))
    v = np.stack([np.sin(th) * np.sin(az_rad), np.sin(th) * np.cos(az_rad), np.cos(th)])
    t, a = np.radians(tilt_deg), np.radians(tilt_az_deg)
    k = np.array([-np.cos(a), np.sin(a), 0.0])[:, None, None]
    kv = (k * v).sum(axis=0)
    kxv = np.stack([k[1] * v[2] - k[2] * v[1], k[2] * v[0] - k[0] * v[2], k[0] * v[1] - k[1] * v[0]])
    w = v * np.cos(t) + kxv * np.sin(t) + k * kv * (1 - np.cos(t))
    theta_w = np.degrees(np.arccos(np.clip(w[2], -1, 1)))
    return np.where(theta_deg > 179.0, theta_deg, theta_w), np.arctan2(w[0], w[1]) % (2 * np.pi)


def make_camera(shape: tuple[int, int], seed: int, kind: str = DEFAULT_CAMERA, pointing: Pointing | None = None) -> Camera:
    """Geometry, obstacles and sensor defects of a camera of ``kind``, from ``(seed, 0, kind index)``; ``pointing``
    sets north, the mirror and a tilt of the optical axis (the obstacles and the sky then follow the world's
    directions)."""
    if kind not in CAMERA_KINDS:
        raise ValueError(f"unknown camera kind {kind!r}; expected one of {tuple(CAMERA_KINDS)}")
    spec = CAMERA_KINDS[kind]
    rng = np.random.default_rng([seed, 0, list(CAMERA_KINDS).index(kind)])
    ny, nx = shape
    cy = (ny - 1) / 2 + rng.uniform(-0.015, 0.015) * ny
    cx = (nx - 1) / 2 + rng.uniform(-0.015, 0.015) * nx
    circle_px = spec.circle * min(ny, nx) / 2
    theta_max = np.radians(spec.fov_deg / 2)
    focal = circle_px / float(project(spec.projection, np.asarray(theta_max)))
    radius = focal * float(project(spec.projection, np.asarray(np.pi / 2)))
    north = rng.uniform(-20, 20) + (90.0 if rng.random() < 0.25 else 0.0)
    pointing = pointing or Pointing()
    if pointing.north_deg is not None:
        north = pointing.north_deg
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    theta = np.degrees(unproject(spec.projection, r / focal))
    az = (np.arctan2(dx if pointing.mirror else -dx, -dy) - np.radians(north)) % (2 * np.pi)
    if pointing.tilt_deg:
        theta, az = _tilted(theta, az, pointing.tilt_deg, pointing.tilt_az_deg)

    elev_p, dt_p, km_p = horizon_profile(rng)
    pos = np.rint(az / (2 * np.pi) * elev_p.size).astype(np.intp) % elev_p.size
    h_az, dt_az, km_az = elev_p[pos], dt_p[pos], km_p[pos]
    elev = 90.0 - theta
    # mast: a radial segment, widening towards the horizon, up to 30-50° elevation, a few metres away
    az_m, top_m = rng.uniform(0, 2 * np.pi), rng.uniform(30, 50)
    half_w = max(0.6, 0.004 * radius) * (1 + 1.5 * np.clip(r / radius, 0, 1) ** 2)
    mast = (np.cos(az - az_m) > 0) & (r * np.abs(np.sin(az - az_m)) < half_w) & (elev < top_m)
    inside = np.clip(circle_px + 0.5 - r, 0.0, 1.0)  # fraction of the pixel inside the image circle
    above = (elev > h_az) & ~mast & (theta <= 90.0)
    sky = (inside >= 1.0) & above
    scene = (inside > 0) & above
    obstacle = (inside > 0) & ~above
    dt_map = np.where(mast, rng.uniform(-1.0, 2.0), dt_az) + 0.4 * _smooth(rng, shape)
    km_map = np.where(mast, rng.uniform(0.005, 0.02), km_az)

    psi = np.radians(spec.vignette_deg) * np.clip(r / circle_px, 0, 1.2)
    pix_gain = 1 + 0.01 * rng.standard_normal(shape)
    gain_scene = pix_gain * np.cos(psi) ** 4 * inside
    gain_house = pix_gain * (1 - inside) * float(spec.housing)
    dead_col = int(rng.integers(nx // 8, nx - nx // 8))
    gain_scene[:, dead_col] = 0.0
    gain_house[:, dead_col] = 0.0
    ang = rng.uniform(0, 2 * np.pi)
    house_dt = 0.6 * (np.cos(ang) * dx + np.sin(ang) * dy) / max(ny, nx) + 0.3 * (r / max(ny, nx)) ** 2
    n_hot = max(2, round(2e-4 * ny * nx))
    hot_idx = rng.choice(ny * nx, n_hot, replace=False)
    hot_add = np.where(rng.random(n_hot) < 0.3, ADU_MAX, rng.uniform(300, 6000, n_hot))
    obstacle_idx = np.flatnonzero(obstacle)
    return Camera(
        kind=spec, shape=(ny, nx), cy=float(cy), cx=float(cx), radius=float(radius),
        circle_px=float(circle_px),
        north_deg=float(north % 360), pointing=pointing, focal_px=float(focal), theta=theta.astype(np.float32),
        az=az.astype(np.float32), sky=sky,
        scene_idx=np.flatnonzero(scene), obstacle_idx=obstacle_idx,
        obstacle_dt=dt_map.ravel()[obstacle_idx].astype(np.float32),
        obstacle_km=km_map.ravel()[obstacle_idx].astype(np.float32),
        gain_scene=gain_scene.astype(np.float32).ravel(), gain_house=gain_house.astype(np.float32).ravel(),
        house_dt=house_dt.astype(np.float32).ravel(),
        col_offset=(4.0 * rng.standard_normal(nx)).astype(np.float32),
        adu_per_k=float(rng.uniform(40, 80)), offset=float(rng.uniform(3000, 6000)),
        netd_k=float(rng.uniform(0.05, 0.08)), lens_emissivity=float(rng.uniform(0.02, 0.05)),
        hot_idx=hot_idx, hot_add=hot_add.astype(np.float32), dead_col=dead_col,
    )  # fmt: skip


def _smooth(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    n = int(2 ** np.ceil(np.log2(max(shape))))
    return fractal_noise(rng, n, 4.0)[: shape[0], : shape[1]]
