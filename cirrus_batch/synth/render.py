"""Rendering of one night's frames: scene radiance (sky, clouds, obstacles, housing) -> 14-bit ADU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from cirrus_batch.synth import bodies as bd
from cirrus_batch.synth import radiometry as rad
from cirrus_batch.synth.camera import ADU_MAX, Camera
from cirrus_batch.synth.noise import WrapSampler, fractal_noise, smoothstep
from cirrus_batch.synth.sky import Layer, Night

TAU_MIN = 0.1
"""Truth: a sky pixel is cloud where a layer's (or the fog's) optical depth along the line of sight is
at least this (emissivity ≥ 0.095)."""
DOMAIN_PER_KM = 40.0
"""A cloud field covers (40 x height) km, periodic."""
M_GEO_MAX = 20.0
"""Cap of the slant path factor through a cloud layer (finite clouds seen edge-on)."""
OBSTACLE_EMISSIVITY = 0.95
NOISE_SPARE = 1 << 16
"""Temporal noise: the sum of two slices of a per-night Gaussian bank, at random offsets < NOISE_SPARE."""


@dataclass(frozen=True)
class Frame:
    """Conditions of one frame."""

    t_amb: float
    """Ambient air temperature (°C)."""
    pwv: float
    """Precipitable water (cm)."""
    tau_fog: float
    t_house: float
    """Housing (and lens) temperature (K)."""
    offset: float
    """Global offset (ADU) including drift and FFC steps."""
    adu_per_rad: float
    """Gain (ADU per W m⁻² sr⁻¹) including drift."""


@dataclass
class _LayerState:
    layer: Layer
    fields: np.ndarray
    """(2, n, n): two structure fields (the layer evolves by rotating between them)."""
    grid: np.ndarray
    """(n, n) complex64 buffer: real part the frame's structure field, imaginary part the texture field."""
    sampler: WrapSampler
    u_km: np.ndarray
    v_km: np.ndarray
    """Plane coordinates (km) of the scene pixels, u along the wind."""
    m_geo: np.ndarray
    cells_per_km: float
    reach_km: float
    """Ground distance of the layer at the horizon."""


class NightRenderer:
    """Renders the frames of one night on one camera: raw ADU and the true mask; with a ``site``, the Sun and the
    Moon where they are."""

    def __init__(self, cam: Camera, night: Night, seed: int, site: bd.Site | None = None):
        self.cam, self.night, self.seed = cam, night, seed
        self.bodies = bd.locate(night.times, site) if site is not None else None
        self._vectors = bd.scene_vectors(cam) if site is not None else None
        idx = cam.scene_idx
        th = np.minimum(cam.theta.ravel()[idx], 90.0)
        self.bin = np.rint(th / rad.THETA_STEP).astype(np.intp)
        self.truth_sky = cam.sky.ravel()[idx]
        self.profile = rad.make_profile(
            tuple(lay.height_km for lay in night.layers), night.h_water_km, night.fog[1]
        )
        rng = np.random.default_rng([seed, 3, night.index])
        n = 256 if max(cam.shape) <= 160 else 512
        az = cam.az.ravel()[idx].astype(np.float64)
        self.layers: list[_LayerState] = []
        for lay in night.layers:
            k0 = DOMAIN_PER_KM * lay.height_km / lay.scale_km
            fields = np.stack([fractal_noise(rng, n, lay.beta, lay.aniso, k0) for _ in range(2)])
            grid = np.zeros((n, n), np.complex64)
            grid.imag = fractal_noise(rng, n, 2.2, 3 * lay.aniso, 2 * k0)
            dist, m_geo = rad.layer_incidence(th, lay.height_km)
            x, y = dist * np.sin(az), dist * np.cos(az)
            c, s = np.cos(lay.wind_dir), np.sin(lay.wind_dir)
            u_km, v_km = x * c + y * s, -x * s + y * c
            cells = n / (DOMAIN_PER_KM * lay.height_km)
            reach = float(rad.layer_incidence(np.asarray(90.0), lay.height_km)[0])
            self.layers.append(_LayerState(
                layer=lay, fields=fields, grid=grid, sampler=WrapSampler(n, u_km * cells, v_km * cells),
                u_km=u_km.astype(np.float32), v_km=v_km.astype(np.float32),
                m_geo=np.minimum(m_geo, M_GEO_MAX).astype(np.float32),
                cells_per_km=cells, reach_km=reach,
            ))  # fmt: skip
        t = night.t_s
        steps = np.zeros(len(t))
        last = np.zeros(len(t))
        for k, step in zip(night.ffc, night.ffc_step):
            steps[k:] += step
            last[k:] = t[k]
        self._ffc_offset = steps + night.creep_adu_h * (t - last) / 3600
        self._columns = np.tile(cam.col_offset, cam.shape[0])
        npx = cam.shape[0] * cam.shape[1]
        bank = np.random.default_rng([seed, 4, night.index]).standard_normal(
            npx + NOISE_SPARE, dtype=np.float32
        )
        self._noise = bank * np.float32(cam.netd_k * cam.adu_per_k / np.sqrt(2))
        self._g_scene = cam.gain_scene * np.float32(1 - cam.lens_emissivity)
        self._g_lens = cam.gain_scene * np.float32(cam.lens_emissivity)
        self._g_house = cam.gain_house
        self._g_house_dt = cam.gain_house * cam.house_dt

    def frame(self, k: int) -> Frame:
        """Conditions of frame k."""
        nt, cam, t = self.night, self.cam, float(self.night.t_s[k])
        t_amb = nt.t_amb0 + nt.t_rate * t / 3600 + 0.3 * np.sin(t / 2700 + nt.index)
        dep, amp, ph = nt.dew_dep
        pwv = rad.pwv_cm(t_amb - max(dep + amp * np.sin(2 * np.pi * t / 14400 + ph), 0.0))
        tau_fog = nt.fog[0] * (1 + 0.2 * np.sin(2 * np.pi * t / 10800 + ph))
        lo, hi = cam.kind.housing_dt
        u, hph = nt.house
        t_house = t_amb + rad.T0 + lo + u * (hi - lo) + 0.5 * np.sin(2 * np.pi * t / 5400 + hph)
        g10, gamp, gph = nt.gain_drift
        gain = 1 + g10 * t / 36000 + gamp * np.sin(2 * np.pi * t / 10800 + gph)
        offset = cam.offset + self._ffc_offset[k] - 8.0 * (t_amb - nt.t_amb0)
        adu_per_rad = cam.adu_per_k / rad.band_slope(293.0) * gain
        return Frame(
            float(t_amb), float(pwv), float(tau_fog), float(t_house), float(offset), float(adu_per_rad)
        )

    def _coverage(self, lay: Layer, k: int) -> float:
        t = float(self.night.t_s[k])
        c0, amp, per, ph = lay.cover
        return float(np.clip(c0 + amp * np.sin(2 * np.pi * t / per + ph), 0.0, 0.999))

    def _arrived(self, lay: Layer, k: int) -> float:
        """How far an arriving layer's upwind edge has crossed the sky (0..1); 1 for other layers."""
        if lay.front is None:
            return 1.0
        frac = k / max(len(self.night.t_s) - 1, 1)
        return float(np.clip((frac - lay.front[0]) / (lay.front[1] - lay.front[0]), 0.0, 1.0))

    @staticmethod
    def _front(st: _LayerState, s: float, noise: np.ndarray) -> np.ndarray:
        """Optical-depth multiplier of a layer whose edge has crossed fraction s of the sky: the edge
        moves at a uniform angular speed from one horizon to the other and follows the deck's structure."""
        h = st.layer.height_km
        edge_km = float(np.clip(h * np.tan(np.radians(-89.0 + 178.0 * s)), -st.reach_km, st.reach_km))
        return smoothstep((edge_km - st.u_km + 0.6 * h * noise) / (0.5 * h) + 0.5).astype(np.float32)

    def scene(self, k: int) -> tuple[np.ndarray, np.ndarray, Frame]:
        """(radiance of the scene pixels, cloud flag of the scene pixels, conditions) of frame k."""
        fr = self.frame(k)
        nt = self.night
        s_seg, t_seg, _ = rad.segments(self.profile, fr.t_amb, fr.pwv, fr.tau_fog, nt.lapse, nt.inversion)
        acc = s_seg[-1][self.bin]
        if self.bodies is not None:
            above = bd.radiance(self._vectors, self.bodies, k, self.cam.focal_px)
            if above is not None:
                acc = acc + t_seg[-1][self.bin] * above
        cloud = np.full(self.bin.size, fr.tau_fog >= TAU_MIN)
        t = float(nt.t_s[k])
        for j in range(len(self.layers) - 1, -1, -1):
            st = self.layers[j]
            lay = st.layer
            arrived = self._arrived(lay, k)
            if arrived > 0:
                thr = float(ndtri(1 - self._coverage(lay, k)))
                shift = lay.wind_ms * t / 1000 * st.cells_per_km
                ph = 2 * np.pi * t / lay.evol_s + lay.evol_phase
                st.grid.real = np.float32(np.cos(ph)) * st.fields[0] + np.float32(np.sin(ph)) * st.fields[1]
                f = st.sampler(st.grid, shift)
                noise, tex = f.real, f.imag
                front = 1.0 if arrived >= 1 else self._front(st, arrived, noise)
                tau = (
                    lay.tau
                    * smoothstep((noise - thr) / lay.edge)
                    * (1 - lay.texture * smoothstep(0.5 + 0.3 * tex))
                )
                tau_los = tau * front * st.m_geo
                cloud |= tau_los >= TAU_MIN
                t_cloud = rad.cloud_temperature(lay.height_km, fr.t_amb, nt.lapse, nt.inversion)
                e = -np.expm1(-tau_los)
                acc = e * np.float32(rad.band_radiance(t_cloud)) + (1 - e) * acc
            acc = s_seg[j][self.bin] + t_seg[j][self.bin] * acc
        return acc, cloud & self.truth_sky, fr

    def render(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(raw uint16 image, true mask uint8) of frame k."""
        cam, nt = self.cam, self.night
        l_scene, cloud, fr = self.scene(k)
        npx = cam.shape[0] * cam.shape[1]
        scene = np.zeros(npx, np.float32)
        scene[cam.scene_idx] = l_scene
        # obstacles through the air (and fog) between them and the camera
        k_h = rad.tau_water(fr.pwv) / nt.h_water_km + rad.TAU_DRY / 8.0
        if nt.fog[1] > 0:
            k_h += fr.tau_fog / nt.fog[1]
        t_air = fr.t_amb + rad.T0
        trans = np.exp(-k_h * cam.obstacle_km)
        cold = (1 - OBSTACLE_EMISSIVITY) * float(rad.band_radiance(t_air - 30.0))
        surface = OBSTACLE_EMISSIVITY * rad.band_radiance(t_air + cam.obstacle_dt) + cold
        scene[cam.obstacle_idx] = trans * surface + (1 - trans) * float(rad.band_radiance(t_air))
        # ADU = offset + columns + gain [(1 - eps_lens) scene + eps_lens L_lens (in) + L_housing (out)]
        g = fr.adu_per_rad
        l_lens = float(rad.band_radiance(fr.t_house))
        adu = scene
        adu *= self._g_scene
        adu += self._g_lens
        adu *= np.float32(g)
        adu += (
            np.float32(g * l_lens) * self._g_house
            + np.float32(g * rad.band_slope(fr.t_house)) * self._g_house_dt
        )
        adu += self._columns
        o1, o2 = np.random.default_rng([self.seed, 2, nt.index, k]).integers(0, NOISE_SPARE, 2)
        adu += self._noise[o1 : o1 + npx] + self._noise[o2 : o2 + npx]
        adu[cam.hot_idx] += cam.hot_add
        adu += np.float32(fr.offset + 0.5)
        np.clip(adu, 0, ADU_MAX, out=adu)
        mask = np.zeros(npx, np.uint8)
        mask[cam.scene_idx] = cloud
        shape = cam.shape
        return adu.astype(np.uint16).reshape(shape), mask.reshape(shape)
