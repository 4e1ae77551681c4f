"""Clear-sky model: band radiance, scale, the season fit from profiles, per-night trends of ε0."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cirrus_batch import clearsky as C
from cirrus_batch.radiometry import air_mass, band_radiance


def test_band_radiance_and_air_mass() -> None:
    assert band_radiance(0.0) == pytest.approx(1.0)
    ratio = float(band_radiance(20.0))
    assert 1.35 < ratio < 1.45  # the 8-14 µm band grows faster than T^4 (1.32) near 0 °C
    assert np.all(np.diff(band_radiance(np.linspace(-40, 40, 50))) > 0)
    m = air_mass(np.array([0.0, 60.0, 90.0]))
    assert m[0] == pytest.approx(1.0, abs=1e-3) and m[1] == pytest.approx(2.0, abs=0.02) and 30 < m[2] < 45


def synthetic_profiles(eps: np.ndarray, p: float, span: float = 8000.0, ambient: float = 10000.0,
                       deck: np.ndarray | None = None, housing: float = 0.0,
                       loss: float = 0.1, temp: float = 15.0) -> C.Profiles:  # fmt: skip
    """Profiles of frames whose clear sky has zenith emissivity ``eps`` (deck: a flat brightness instead), seen
    through optics that lose ``loss`` of the view at the horizon to parts of brightness ``housing``, at ambient
    temperature ``temp`` (15 °C: air that can hold a clear sky of ε0 0.66)."""
    theta = np.arange(0.5, 90, 1.0)
    shape = 1 - (1 - eps[:, None]) ** (air_mass(theta)[None, :] ** p)
    w = 1 - loss * (theta / 90) ** 2
    e = housing + w[None, :] * (shape - housing)
    if deck is not None:
        e = np.where(np.isfinite(deck)[:, None], np.maximum(e, np.nan_to_num(deck)[:, None]), e)
    q = np.stack([e - 0.004, e, e + 0.003])  # brightness quantiles 10, 50, 75 %
    deficit = (1 - q[[0, 1, 2]]) * span  # deficit quantiles 90, 50, 25 %
    n = eps.size
    return C.Profiles(np.full(n, ambient), np.full(n, ambient - span), np.full(n, temp), deficit, theta)


def test_season_fit_recovers_the_physics_and_ignores_decks() -> None:
    eps = np.concatenate([np.linspace(0.2, 0.45, 12), np.full(8, 0.3)])
    deck = np.concatenate([np.full(12, np.nan), np.full(8, 0.93)])  # eight overcast frames
    model = C.fit_clear_sky(synthetic_profiles(eps, 0.6, deck=deck))
    assert not model.prior_only and model.n_clear == 12
    assert model.exponent == pytest.approx(0.6, abs=0.1) and model.p_lo <= 0.6 <= model.p_hi
    assert min(model.clear_eps) < 0.22 and max(model.clear_eps) > 0.42  # dry and humid clear frames alike
    assert model.scale["source"] == "dark"
    assert np.allclose(model.transmission[:10], 1.0, atol=0.02)
    prof = model.profile(0.3)
    assert np.all(np.diff(prof[:80]) > 0)  # brighter towards the horizon
    assert C.ClearSkyModel.from_attrs(json.loads(json.dumps(model.to_attrs()))) == model


@pytest.mark.parametrize("housing", [0.0, 1.0])
def test_the_optics_seen_on_dry_nights_predict_a_humid_clear_sky(housing: float) -> None:
    """Vignetting that shows the camera's own warm parts (housing 1) or loses signal (0): fitted on clear frames
    of several nights, the model predicts a humid clear sky to the horizon, never above the ambient black body."""
    eps = np.concatenate([np.linspace(0.06, 0.16, 16), np.linspace(0.45, 0.55, 6)])
    prof = synthetic_profiles(eps, 0.6, housing=housing, loss=0.4)
    prof.deficit += np.random.default_rng(0).normal(0, 8, prof.deficit.shape[1:])[None]  # 0.1 % noise
    model = C.fit_clear_sky(prof)
    assert abs(model.housing - housing) <= 0.25
    truth = synthetic_profiles(np.array([0.5]), 0.6, housing=housing, loss=0.4)
    seen = 1 - truth.deficit[1, 0] / 8000.0
    best = min(np.abs(model.profile(0.5, p) - seen)[:85].max() for p in np.linspace(model.p_lo, model.p_hi, 30))
    assert best < 0.015  # a plain multiplicative vignetting is off by 0.1 at 80 deg for housing 1
    assert np.all(model.profile(0.7, model.p_hi) <= 1.0 + 1e-9)


def test_no_clear_frame_gives_the_physical_prior() -> None:
    deck = np.full(10, 0.95)
    model = C.fit_clear_sky(synthetic_profiles(np.full(10, 0.3), 0.6, deck=deck))
    assert model.prior_only and model.n_clear == 0 and model.eps_hi <= C.ClearSkyConfig().eps_max


def test_no_clear_sky_is_more_humid_than_the_air_can_hold() -> None:
    """A fog with a clear sky's shape at ε0 0.72 is no clear sky on a night at -2 °C (air that cold holds too
    little water); at 20 °C the same sky is a humid clear one. Unknown temperatures keep ``eps_cap``."""
    cfg = C.ClearSkyConfig()
    bound = C.eps_bound(np.array([-2.0, 10.0, 20.0, 35.0, np.nan]), "dark", cfg)
    assert 0.3 < bound[0] < 0.45 and 0.45 < bound[1] < 0.6 and bound[2] == bound[3] == cfg.eps_max
    assert bound[4] == cfg.eps_cap and np.all(C.eps_bound(np.array([-2.0]), "assumed", cfg) == cfg.eps_cap)
    eps = np.concatenate([np.linspace(0.12, 0.2, 10), np.full(6, 0.72)])
    assert C.fit_clear_sky(synthetic_profiles(eps, 0.6, temp=-2.0)).n_clear == 10
    assert C.fit_clear_sky(synthetic_profiles(eps, 0.6, temp=20.0)).n_clear == 16
    model = C.ClearSkyModel(theta=[0.5], transmission=[1.0], sigma=[0.01], exponent=0.6, p_lo=0.4, p_hi=0.8, eps_lo=0.01,
                            eps_hi=0.8, eps_typical=0.2, scale={"source": "dark"}, n_clear=10)  # fmt: skip
    t0 = np.datetime64("2026-01-05T19:00")
    times = np.concatenate([t0 + np.arange(10) * np.timedelta64(10, "m"),
                            t0 + np.timedelta64(1, "D") + np.arange(10) * np.timedelta64(10, "m")])  # fmt: skip
    eps_fit = np.concatenate([np.full(10, 0.15), np.full(10, 0.72)])
    for night2, source in ((-2.0, "season"), (20.0, "fit")):
        temps = np.concatenate([np.full(10, 10.0), np.full(10, night2)])  # every fit matches its frame
        use, _, src = C.choose_eps(times, temps, eps_fit, np.full(20, 0.6), np.zeros(20), np.ones(20), model, cfg)
        assert (src[10:] == C.EPS_SOURCES[source]).all()
        assert np.allclose(use[10:], 0.15 if source == "season" else 0.72)


def test_scale_sources() -> None:
    cfg = C.ClearSkyConfig()
    temps = np.linspace(-5, 20, 30)
    nan = np.full(30, np.nan)
    ambient = 1500 + 8000 * band_radiance(temps) + np.random.default_rng(0).normal(0, 20, 30)
    prof = synthetic_profiles(np.linspace(0.2, 0.4, 30), 0.6, span=8000.0)
    # the clear profiles' shape gives the span whatever the offset
    shape = C.fit_scale(ambient, nan, temps, prof.deficit[1], prof.theta, cfg)
    assert shape.source == "shape" and shape.gain * float(band_radiance(shape.t_ref)) == pytest.approx(8000, rel=0.1)
    # profiles with no clear sky's shape: the ambient reference's regression on the band radiance
    flat = np.broadcast_to(300.0 + 10 * prof.theta, prof.deficit[1].shape)  # darker towards the horizon
    s = C.fit_scale(ambient, nan, temps, flat, prof.theta, cfg)
    assert s.source == "temperature" and s.gain == pytest.approx(8000, rel=0.03)
    np.testing.assert_allclose(s.span(ambient, nan, temps), s.gain * band_radiance(temps), rtol=1e-9)
    assert C.fit_scale(ambient, ambient - 7000, temps, flat, prof.theta, cfg).source == "dark"
    assert C.fit_scale(ambient, nan, nan, flat, prof.theta, cfg).source == "assumed"


def test_night_trend_holds_cloudy_frames_to_the_clear_ones() -> None:
    model = C.ClearSkyModel(theta=[0.5], transmission=[1.0], sigma=[0.01], exponent=0.6, p_lo=0.4, p_hi=0.8, eps_lo=0.01,
                            eps_hi=0.6, eps_typical=0.3, scale={"source": "dark"}, n_clear=5)  # fmt: skip
    cfg = C.ClearSkyConfig()
    t0 = np.datetime64("2026-01-05T19:00")
    night1 = t0 + np.arange(20) * np.timedelta64(10, "m")
    night2 = t0 + np.timedelta64(1, "D") + np.arange(10) * np.timedelta64(10, "m")
    times = np.concatenate([night1, night2])
    eps_fit = np.concatenate([np.linspace(0.30, 0.34, 10), np.full(10, 0.6), np.full(10, 0.55)])
    p_fit = np.full(30, 0.6)
    excess = np.concatenate([np.zeros(10), np.full(10, 0.9), np.full(10, 0.9)])
    consistent = np.concatenate([np.ones(10), np.zeros(10), np.full(10, 0.1)])  # decks: no clear gap
    assert list(C.night_index(times, 3.0)) == [0] * 20 + [1] * 10
    use, p, source = C.choose_eps(times, np.full(30, np.nan), eps_fit, p_fit, excess, consistent, model, cfg)
    assert np.allclose(use[:10], eps_fit[:10]) and (source[:10] == C.EPS_SOURCES["fit"]).all()
    assert (use[10:20] <= 0.34 + 1e-9).all() and (source[10:20] == C.EPS_SOURCES["night"]).all()
    # night 2 has nothing that looks clear: the driest clear sky of the season
    assert np.allclose(use[20:], np.percentile(eps_fit[:10], 10)) and (source[20:] == C.EPS_SOURCES["season"]).all()
    assert np.allclose(p, 0.6)


def test_config_ranges() -> None:
    with pytest.raises(ValueError, match="eps_cap"):
        C.ClearSkyConfig(eps_cap=1.5)
    with pytest.raises(ValueError, match="search_images"):
        C.ClearSkyConfig(search_images=0)
