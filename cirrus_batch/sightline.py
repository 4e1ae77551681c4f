"""Line of sight: was there cloud between the telescope and its target during an exposure?

A pointing is a start time (UTC), an exposure (s) and a target, ICRS ``ra_deg, dec_deg`` (moving with the sky)
or fixed ``alt_deg, az_deg``. The frames taken during the exposure are used (or the nearest one within
``gap_min``); in each, the target is put on the image with the store's site and orientation (``cirrus orient``),
and the cloud probability is read at the target and over the sky within ``radius_deg`` of it: the U-Net's
``cloud_prob`` where the image was reprocessed (0 where the classifier called it clear), else ``prepare``'s
``mask``. Verdict per frame: ``cloudy`` when that maximum reaches ``cloudy_above``, ``clear`` when it stays below
``clear_below``, ``uncertain`` in between; ``below horizon`` under ``min_altitude_deg``; ``behind obstacle`` where
the target's pixel is not sky (obstacle, housing, outside the lens). A pointing takes its worst frame's verdict;
``no data`` without a frame, ``invalid`` for a row that cannot be read (with the reason). See docs/sightline.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from cirrus_batch.config import SightlineConfig, SiteConfig
from cirrus_batch.errors import CirrusError
from cirrus_batch.geometry import DEFECT, SKY
from cirrus_batch.orientation import (
    Lens,
    Orientation,
    altaz_to_pixel,
    camera_model,
    pixel_to_altaz,
    unit_vectors,
)

VERDICTS = ("clear", "uncertain", "cloudy", "behind obstacle", "below horizon", "no data", "invalid")
"""From best to worst: a pointing takes the worst verdict of its frames."""
COLUMNS = ("name", "start", "exposure_s", "ra_deg", "dec_deg", "alt_deg", "az_deg")


@dataclass
class SightlineResult:
    """Per pointing (``table``) and per frame used (``frames``); ``dataset`` holds both as xarray."""

    table: pd.DataFrame
    frames: pd.DataFrame
    config: SightlineConfig
    csv: Path | None = None
    zarr: Path | None = None
    plot: Path | None = None

    def counts(self) -> list[tuple[str, int]]:
        vc = self.table["verdict"].value_counts()
        return [(v, int(vc.get(v, 0))) for v in VERDICTS if vc.get(v, 0)]

    @property
    def dataset(self) -> xr.Dataset:
        t = self.table.rename_axis("pointing").to_xarray()
        f = self.frames.rename_axis("sample").to_xarray()
        ds = xr.merge([t, f.rename({k: f"frame_{k}" for k in f.data_vars})])
        ds.attrs.update({k: float(v) for k, v in vars(self.config).items()})
        return ds


# ---------------------------------------------------------------- reading the pointings


def read_targets(path: str | Path) -> pd.DataFrame:
    """The pointings of a CSV file (columns: ``start``, ``exposure_s``, ``ra_deg``/``dec_deg`` or
    ``alt_deg``/``az_deg``, optional ``name``); a :class:`CirrusError` when a needed column is missing."""
    try:
        df = pd.read_csv(path, dtype=str, skipinitialspace=True, comment="#")
    except FileNotFoundError:
        raise CirrusError(f"targets file {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CirrusError(f"targets file {path} is not a readable CSV: {exc}") from None
    return check_targets(df, str(path))


def check_targets(df: pd.DataFrame, where: str = "targets") -> pd.DataFrame:
    """Normalize a table of pointings; a :class:`CirrusError` for a missing column, one message per problem."""
    df = df.rename(columns=lambda c: str(c).strip().lower())
    if "start" not in df:
        raise CirrusError(f"{where} has no 'start' column: give the UTC start of each exposure "
                          "(start,exposure_s,ra_deg,dec_deg or start,exposure_s,alt_deg,az_deg)")  # fmt: skip
    has_radec = {"ra_deg", "dec_deg"} <= set(df)
    has_altaz = {"alt_deg", "az_deg"} <= set(df)
    if not (has_radec or has_altaz):
        raise CirrusError(f"{where} has neither ra_deg,dec_deg (ICRS) nor alt_deg,az_deg columns")
    out = pd.DataFrame({c: df[c] if c in df else None for c in COLUMNS})
    out["name"] = out["name"].fillna("").astype(str) if "name" in df else [f"#{i}" for i in range(len(df))]
    return out.reset_index(drop=True)


def _parse(row: pd.Series) -> tuple[dict[str, Any], str]:
    """(start, end, exposure, coordinates) of one pointing, or the reason it is invalid."""

    def num(key: str) -> float:
        value = row.get(key)
        return float(value) if value is not None and str(value).strip() not in ("", "nan", "None") else np.nan

    try:
        start = pd.Timestamp(str(row["start"]).strip())
    except (ValueError, TypeError):
        return {}, f"start {row['start']!r} is not a time"
    if pd.isna(start):
        return {}, "no start time"
    if start.tzinfo is not None:
        start = start.tz_convert("UTC").tz_localize(None)
    try:
        exposure = num("exposure_s")
        ra, dec, alt, az = num("ra_deg"), num("dec_deg"), num("alt_deg"), num("az_deg")
    except ValueError as exc:
        return {}, f"not a number: {exc}"
    exposure = 0.0 if np.isnan(exposure) else exposure
    if exposure < 0:
        return {}, f"exposure_s {exposure:g} is negative"
    p: dict[str, Any] = {"start": np.datetime64(start.to_datetime64(), "ns"), "exposure_s": exposure}
    p["end"] = p["start"] + np.timedelta64(int(round(exposure * 1e9)), "ns")
    if not (np.isnan(ra) or np.isnan(dec)):
        if not (0.0 <= ra < 360.0) or not (-90.0 <= dec <= 90.0):
            return {}, f"ra_deg {ra:g} / dec_deg {dec:g} out of range ([0, 360), [-90, 90])"
        p["radec"] = (ra, dec)
    elif not (np.isnan(alt) or np.isnan(az)):
        if not (-90.0 <= alt <= 90.0) or not np.isfinite(az):
            return {}, f"alt_deg {alt:g} / az_deg {az:g} out of range"
        p["altaz"] = (alt, az % 360.0)
    else:
        return {}, "no coordinates (ra_deg,dec_deg or alt_deg,az_deg)"
    return p, ""


# ---------------------------------------------------------------- the cloud map of a frame


class CloudMaps:
    """Cloud probability maps of a store's frames, read once each (U-Net where reprocessed, else the mask)."""

    def __init__(self, ds: xr.Dataset):
        self.ds = ds
        self.unet = "cloud_prob" in ds and "pred_model" in ds
        self.pred = ds["pred_model"].values if self.unet else None
        self.cloudy_pred = ds["cloudy_pred"].values if self.unet and "cloudy_pred" in ds else None
        self.has_mask = "mask" in ds
        self._cache: dict[int, tuple[np.ndarray, str]] = {}

    def __call__(self, i: int) -> tuple[np.ndarray, str]:
        """(y, x) float32 cloud probability (NaN: unknown) of frame i and where it came from."""
        if i not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[i] = self._read(i)
        return self._cache[i]

    def _read(self, i: int) -> tuple[np.ndarray, str]:
        if self.unet and self.pred[i] >= 0:  # type: ignore[index]
            if self.cloudy_pred is not None and not self.cloudy_pred[i]:
                return np.zeros((self.ds.sizes["y"], self.ds.sizes["x"]), np.float32), "classifier"
            q = self.ds["cloud_prob"].isel(time=i).values
            return np.where(q == 255, np.nan, q / 250.0).astype(np.float32), "unet"
        if self.has_mask:
            return self.ds["mask"].isel(time=i).values.astype(np.float32), "mask"
        raise CirrusError("the store has no cloud map: run cirrus prepare (masks) or cirrus reprocess first")


# ---------------------------------------------------------------- verdicts


def frame_verdict(p_max: float, cfg: SightlineConfig) -> str:
    """clear / uncertain / cloudy from the maximum cloud probability within the radius."""
    if np.isnan(p_max):
        return "uncertain"
    if p_max >= cfg.cloudy_above:
        return "cloudy"
    return "clear" if p_max < cfg.clear_below else "uncertain"


def _nanmax(values: list[float]) -> float:
    v = np.asarray(values, np.float64)
    return float(v[np.isfinite(v)].max()) if np.isfinite(v).any() else np.nan


def _worst(verdicts: list[str]) -> str:
    return max(verdicts, key=VERDICTS.index)


def sightline(ds: xr.Dataset, targets: pd.DataFrame, cfg: SightlineConfig | None = None,
              site: SiteConfig | None = None) -> SightlineResult:  # fmt: skip
    """Verdicts for the pointings of ``targets`` (see :func:`check_targets`) on an opened store ``ds``
    (``store.open_dataset``: prepared and oriented; the site from its attributes unless given)."""
    from cirrus_batch.site import radec_altaz, site_from_attrs

    cfg = cfg or SightlineConfig()
    targets = check_targets(targets)
    site = site if site is not None and site.latitude_deg is not None else site_from_attrs(ds.attrs)
    lens, ori = camera_model(ds.attrs)
    if "pixel_class" not in ds:
        raise CirrusError("the store has no pixel classes: run cirrus prepare first")
    sky = ds["pixel_class"].values == SKY
    seen = sky | (ds["pixel_class"].values == DEFECT)  # a dead pixel hides no sky: judged from the sky around it
    shape = sky.shape
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    p_alt, p_az = pixel_to_altaz(yy[sky], xx[sky], lens, ori)
    sky_vec = unit_vectors(p_alt, p_az)
    sky_y, sky_x = yy[sky], xx[sky]
    times = ds["time"].values.astype("datetime64[ns]")
    p_cloudy = ds["p_cloudy"].values if "p_cloudy" in ds else np.full(times.size, np.nan)
    cfrac = ds["cloud_fraction"].values if "cloud_fraction" in ds else np.full(times.size, np.nan)
    maps = CloudMaps(ds)
    cos_r = np.cos(np.radians(cfg.radius_deg))
    gap = np.timedelta64(int(cfg.gap_min * 60e9), "ns")
    span = (f"{np.datetime_as_string(times.min(), 's')} to {np.datetime_as_string(times.max(), 's')}"
            if times.size else "none")  # fmt: skip

    rows, frames = [], []
    for k, row in targets.iterrows():
        p, reason = _parse(row)
        radec = p.get("radec", (np.nan, np.nan))
        base = {"name": row["name"], "start": row["start"], "exposure_s": p.get("exposure_s", np.nan),
                "ra_deg": radec[0], "dec_deg": radec[1]}
        if reason:
            rows.append({**base, "verdict": "invalid", "reason": reason, "n_frames": 0})
            continue
        idx = np.flatnonzero((times >= p["start"]) & (times <= p["end"]))
        how = "during"
        if idx.size == 0 and times.size:
            mid = p["start"] + (p["end"] - p["start"]) // 2
            near = int(np.argmin(np.abs(times - mid)))
            if abs(times[near] - mid) <= gap + (p["end"] - p["start"]) // 2:
                idx, how = np.array([near]), "nearest"
        if idx.size == 0:
            rows.append({**base, "verdict": "no data", "n_frames": 0,
                         "reason": f"no frame within {cfg.gap_min:g} min (the store spans {span})"})  # fmt: skip
            continue
        if "radec" in p:
            alt, az = radec_altaz(p["radec"][0], p["radec"][1], times[idx], site)
        else:
            alt, az = np.full(idx.size, p["altaz"][0]), np.full(idx.size, p["altaz"][1])
        ty, tx = altaz_to_pixel(alt, az, lens, ori)
        tvec = unit_vectors(alt, az)
        verdicts = []
        for j, i in enumerate(idx):
            f = {"pointing": k, "time": times[i], "alt_deg": float(alt[j]), "az_deg": float(az[j]),
                 "y": float(ty[j]), "x": float(tx[j]), "p_target": np.nan, "p_max": np.nan,
                 "p_cloudy": float(p_cloudy[i]), "cloud_fraction": float(cfrac[i]), "source": ""}  # fmt: skip
            iy, ix = int(round(float(ty[j]))), int(round(float(tx[j])))
            inside = 0 <= iy < shape[0] and 0 <= ix < shape[1]
            if alt[j] < cfg.min_altitude_deg:
                v = "below horizon"
            elif not (inside and seen[iy, ix]):
                v = "behind obstacle"
            else:
                cmap, source = maps(int(i))
                near = sky_vec @ tvec[j] >= cos_r
                vals = cmap[sky_y[near], sky_x[near]]
                f["p_target"] = float(cmap[iy, ix])
                f["p_max"] = float(np.nanmax(vals)) if np.isfinite(vals).any() else np.nan
                f["source"] = source
                v = frame_verdict(f["p_max"], cfg)
            f["verdict"] = v
            verdicts.append(v)
            frames.append(f)
        mine = frames[-len(idx) :]
        rows.append({**base, "verdict": _worst(verdicts), "n_frames": int(idx.size), "frames": how,
                     "first_frame": times[idx[0]], "last_frame": times[idx[-1]],
                     "alt_deg": float(np.mean(alt)), "az_deg": float(np.mean(az) if np.ptp(az) < 180 else az[0]),
                     "y": float(ty[0]), "x": float(tx[0]),
                     **{key: _nanmax([m[key] for m in mine]) for key in ("p_target", "p_max", "p_cloudy")},
                     "reason": ""})  # fmt: skip
    table = pd.DataFrame(rows)
    for col in ("frames", "first_frame", "last_frame", "alt_deg", "az_deg", "y", "x", "p_target", "p_max",
                "p_cloudy"):  # fmt: skip
        if col not in table:
            table[col] = np.nan
    table = table[["name", "start", "exposure_s", "ra_deg", "dec_deg", "verdict", "reason", "n_frames", "frames",
                   "first_frame", "last_frame", "alt_deg", "az_deg", "y", "x", "p_target", "p_max", "p_cloudy"]]  # fmt: skip
    table["reason"] = table["reason"].fillna("")
    table["frames"] = table["frames"].fillna("")
    frames_df = pd.DataFrame(frames, columns=["pointing", "time", "alt_deg", "az_deg", "y", "x", "p_target",
                                              "p_max", "p_cloudy", "cloud_fraction", "source", "verdict"])  # fmt: skip
    return SightlineResult(table, frames_df, cfg)


# ---------------------------------------------------------------- files


def sightline_store(url: str, targets: str | Path, cfg: SightlineConfig | None = None, site: SiteConfig | None = None,
                    out: str | Path | None = None, plot: str | Path | None = None) -> SightlineResult:  # fmt: skip
    """:func:`sightline` on the store at ``url`` for the pointings of the CSV ``targets``; writes ``OUT.csv``
    (one row per pointing, thresholds as columns), ``OUT.zarr`` (pointings and frames) and the track ``plot``."""
    from cirrus_batch.store import open_dataset

    cfg = cfg or SightlineConfig()
    table = read_targets(targets)
    ds = open_dataset(url)
    res = sightline(ds, table, cfg, site)
    prefix = Path(out) if out is not None else Path(str(targets).removesuffix(".csv") + "-sightline")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv = res.table.assign(radius_deg=cfg.radius_deg, clear_below=cfg.clear_below, cloudy_above=cfg.cloudy_above)
    res.csv = prefix.with_name(prefix.name + ".csv")
    csv.to_csv(res.csv, index=False)
    res.zarr = prefix.with_name(prefix.name + ".zarr")
    _to_zarr(res.dataset, res.zarr)
    if plot is not None:
        res.plot = track_plot(ds, res, plot, site)
    return res


def _to_zarr(ds: xr.Dataset, path: Path) -> None:
    for name in list(ds.variables):
        if ds[name].dtype == object or ds[name].dtype.kind == "U":  # variable-length UTF-8, as the store's
            ds[name] = ds[name].astype(str).astype(object)
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)


def track_plot(ds: xr.Dataset, res: SightlineResult, out_png: str | Path, site: SiteConfig | None = None,
               pointing: int | None = None) -> Path | None:  # fmt: skip
    """PNG: the cloud map of a frame of ``pointing`` (default: the first RA/Dec target with a sky frame; grey: not
    sky), the target's track
    over ± 3 h, its position and the ``radius_deg`` circle at the frame. None when no pointing has one."""
    from cirrus_batch.plots import new_figure, save
    from cirrus_batch.site import radec_altaz, site_from_attrs

    f = res.frames[res.frames["source"] != ""]
    if pointing is not None:
        f = f[f["pointing"] == pointing]
    moving = f[np.isfinite(res.table["ra_deg"].to_numpy()[f["pointing"].to_numpy(int)])]
    f = moving if not moving.empty else f
    if f.empty:
        return None
    first = f.iloc[0]
    k = int(first["pointing"])
    site = site if site is not None and site.latitude_deg is not None else site_from_attrs(ds.attrs)
    lens, ori = camera_model(ds.attrs)
    times = ds["time"].values.astype("datetime64[ns]")
    i = int(np.flatnonzero(times == first["time"])[0])
    cmap, source = CloudMaps(ds)(i)
    sky = ds["pixel_class"].values == SKY
    fig = new_figure(6.0, 5.4)
    ax = fig.subplots()
    from matplotlib import colormaps

    palette = colormaps["Blues_r"].with_extremes(bad="0.55")
    im = ax.imshow(np.where(sky, cmap, np.nan), cmap=palette, vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.04, label=f"cloud probability ({source})")
    row = res.table.iloc[k]
    track_t = first["time"] + np.arange(-180, 181, 5).astype("timedelta64[m]")
    target = _target_of(res, k)
    if target[0] == "radec":
        alt, az = radec_altaz(target[1], target[2], track_t, site)
    else:
        alt, az = np.full(track_t.size, target[1]), np.full(track_t.size, target[2])
    ty, tx = altaz_to_pixel(alt, az, lens, ori)
    up = alt > 0
    ax.plot(np.where(up, tx, np.nan), np.where(up, ty, np.nan), color="orange", lw=1, label="track ± 3 h")
    ax.plot(first["x"], first["y"], "+", color="red", ms=10, label=f"target: {row['verdict']}")
    ring = np.linspace(0, 2 * np.pi, 73)
    ry, rx = _circle(first["alt_deg"], first["az_deg"], res.config.radius_deg, ring, lens, ori)
    ax.plot(rx, ry, color="red", lw=0.8, label=f"{res.config.radius_deg:g}° radius")
    ax.set_xlim(0, sky.shape[1] - 1)
    ax.set_ylim(sky.shape[0] - 1, 0)
    ax.legend(loc="lower right", fontsize=7)
    stamp = np.datetime_as_string(np.datetime64(first["time"], "s"))
    ax.set_title(f"{row['name']} at {stamp}Z: p_max {first['p_max']:.2f}, alt {first['alt_deg']:.1f}°", fontsize=9)
    fig.tight_layout()
    return save(fig, out_png)


def _target_of(res: SightlineResult, k: int) -> tuple[str, float, float]:
    row = res.table.iloc[k]
    if np.isfinite(row["ra_deg"]):
        return ("radec", float(row["ra_deg"]), float(row["dec_deg"]))
    return ("altaz", float(row["alt_deg"]), float(row["az_deg"]))


def _circle(alt: float, az: float, radius_deg: float, ring: np.ndarray, lens: Lens,
            ori: Orientation) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Pixel outline of the circle of ``radius_deg`` about (alt, az)."""
    a, z, r = np.radians(alt), np.radians(az), np.radians(radius_deg)
    lat = np.arcsin(np.sin(a) * np.cos(r) + np.cos(a) * np.sin(r) * np.cos(ring))
    lon = z + np.arctan2(np.sin(ring) * np.sin(r) * np.cos(a), np.cos(r) - np.sin(a) * np.sin(lat))
    return altaz_to_pixel(np.degrees(lat), np.degrees(lon), lens, ori)


# ---------------------------------------------------------------- nights for observers


AIRMASS2_ALTITUDE = 30.0
"""Altitude (deg) of air mass 2 (plane-parallel): observers' usual limit."""


def night_summary(ds: xr.Dataset, nights: np.ndarray, hours: np.ndarray, min_altitude_deg: float = AIRMASS2_ALTITUDE,
                  cfg: SightlineConfig | None = None, tolerance: float = 0.01) -> pd.DataFrame:  # fmt: skip
    """Per night: observed hours, hours when the sky above ``min_altitude_deg`` was clear (all but ``tolerance``
    of its pixels below ``clear_below``: a target anywhere up there had a clear line of sight), and the mean
    fraction of that sky that was clear. ``nights`` and ``hours`` (what each frame stands for) are per frame of
    ``ds`` (an oriented store's dataset); frames without a cloud map count as observed, not clear."""
    cfg = cfg or SightlineConfig()
    lens, ori = camera_model(ds.attrs)
    sky = ds["pixel_class"].values == SKY
    yy, xx = np.mgrid[0 : sky.shape[0], 0 : sky.shape[1]]
    alt, _ = pixel_to_altaz(yy, xx, lens, ori)
    up = sky & (alt >= min_altitude_deg)
    if not up.any():
        raise CirrusError(f"no sky pixel above {min_altitude_deg:g} deg of altitude: check the orientation")
    maps = CloudMaps(ds)
    clear_frac = np.full(ds.sizes["time"], np.nan)
    for i in range(ds.sizes["time"]):
        try:
            p = maps(i)[0][up]
        except CirrusError:
            continue
        if np.isfinite(p).any():
            clear_frac[i] = float((p[np.isfinite(p)] < cfg.clear_below).mean())
    rows = []
    for night in np.unique(nights):
        on = nights == night
        rows.append({"night": str(night), "observed_hours": round(float(hours[on].sum()), 3),
                     "clear_sightline_hours": round(float(hours[on & (clear_frac >= 1.0 - tolerance)].sum()), 3),
                     "clear_sky_fraction": round(float(np.nanmean(clear_frac[on])), 4)
                     if np.isfinite(clear_frac[on]).any() else np.nan})  # fmt: skip
    return pd.DataFrame(rows)
