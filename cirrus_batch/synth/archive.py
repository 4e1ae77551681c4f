"""Archive writing: FITS files, the truth store, montages (camera x sky matrix)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cirrus_batch.synth.bodies import Site
from cirrus_batch.synth.camera import CAMERA_KINDS, DEFAULT_CAMERA, Camera, Pointing, make_camera
from cirrus_batch.synth.render import TAU_MIN, NightRenderer
from cirrus_batch.synth.sky import KINDS, Night, make_night

if TYPE_CHECKING:
    import distributed

EXPTIME = 0.03


@dataclass
class SynthSummary:
    """What :func:`write_archive` wrote."""

    archive: Path
    truth: Path
    n_images: int
    nights: list[tuple[str, str, int]]
    """(YYYYMMDD, kind, n_images) per night."""


# ---------------------------------------------------------------- files


def write_fits(path: str | Path, data: np.ndarray, header: dict[str, Any], compress: bool = False) -> None:
    """Write one image: plain FITS (uint16 as int16 + BZERO=32768) or RICE tile-compressed ``.fits.fz``.

    ``header`` values may be ``(value, comment)`` tuples.
    """
    from astropy.io import fits

    hdr = fits.Header()
    for key, value in header.items():
        hdr[key] = value
    if compress:
        hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, hdr, compression_type="RICE_1")])
    else:
        hdul = fits.HDUList([fits.PrimaryHDU(data, hdr)])
    hdul.writeto(path, overwrite=True)


def read_fits(path: str | Path) -> tuple[np.ndarray, Any]:
    """(data, header) of the first image HDU of a plain or compressed FITS file."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.data is not None)
        return np.asarray(hdu.data), hdu.header


def default_truth_path(dest: str | Path) -> Path:
    """``DEST_truth.zarr`` beside the archive."""
    return Path(str(dest).rstrip("/") + "_truth.zarr")


def _relpath(night: Night, k: int, camera: str, compress: bool) -> str:
    stamp = night.times[k].astype("datetime64[s]").item().strftime("%Y%m%dT%H%M%S")
    ext = ".fits.fz" if compress else ".fits"
    return f"{night.date[:4]}/{night.date}/{camera}_{stamp}{ext}"


def _header(night: Night, k: int, t_amb: float, camera: str, ambtemp: bool, site: Site | None) -> dict[str, Any]:
    hdr = {
        "DATE-OBS": (str(night.times[k]), "UTC start of exposure"),
        "EXPTIME": (EXPTIME, "[s] integration time"),
        "AMBTEMP": (round(t_amb, 2), "[deg C] ambient air temperature"),
        "INSTRUME": (camera, "LWIR 8-14 um all-sky camera"),
        "OBSERVAT": ("CIRRUS synthetic site", "cirrus_batch.synth"),
        "BUNIT": ("ADU", "14-bit counts"),
    }
    if not ambtemp:
        del hdr["AMBTEMP"]
    if site is not None:
        hdr |= {"SITELAT": (site.latitude_deg, "[deg] geodetic latitude"),
                "SITELONG": (site.longitude_deg, "[deg] east longitude"),
                "SITEELEV": (site.elevation_m, "[m] elevation")}  # fmt: skip
    return hdr


def render_night(
    dest: str | Path, truth: str | Path, night: Night, offset: int, *, seed: int, shape: tuple[int, int],
    camera: str, camera_kind: str, compress: bool, ambtemp: bool = True, bar: Any = None, site: Site | None = None,
    pointing: Pointing | None = None,
) -> tuple[str, str, int]:  # fmt: skip
    """Write the FITS files of one night and its region ``offset:offset+n`` of the truth store."""
    import xarray as xr

    dest = Path(dest)
    cam = make_camera(shape, seed, camera_kind, pointing)
    renderer = NightRenderer(cam, night, seed, site)
    n = len(night.t_s)
    masks = np.zeros((n, *shape), np.uint8)
    t_amb = np.zeros(n, np.float32)
    for k in range(n):
        raw, masks[k] = renderer.render(k)
        t_amb[k] = renderer.frame(k).t_amb
        rel = _relpath(night, k, camera, compress)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        write_fits(dest / rel, raw, _header(night, k, float(t_amb[k]), camera, ambtemp, site), compress)
        if bar is not None:
            bar.update(1)
    frac = (masks.reshape(n, -1)[:, cam.sky.ravel()].mean(axis=1)).astype(np.float32)
    region = xr.Dataset(
        {"mask": (("time", "y", "x"), masks), "cloud_fraction": ("time", frac), "ambtemp": ("time", t_amb)}
    )
    region.to_zarr(truth, region={"time": slice(offset, offset + n)}, zarr_format=3, consolidated=False)
    return night.date, night.kind, n


def geometry_attrs(cam: Camera) -> dict[str, Any]:
    """The camera's true geometry, as stored in the truth store's attributes."""
    return {
        "camera_kind": cam.kind.name,
        "projection": cam.kind.projection,
        "fov_deg": cam.kind.fov_deg,
        "center": [round(cam.cy, 4), round(cam.cx, 4)],
        "radius_px": round(cam.radius, 4),
        "image_circle_px": round(cam.circle_px, 4),
        "north_deg": round(cam.north_deg, 4),
        "east": ("clockwise from north (mirrored)" if cam.pointing.mirror
                 else "counterclockwise from north (sky seen from below)"),
        "up_azimuth_deg": round(-cam.north_deg % 360, 4),
        "mirror": bool(cam.pointing.mirror),
        "tilt_deg": float(cam.pointing.tilt_deg),
        "tilt_azimuth_deg": float(cam.pointing.tilt_az_deg),
        "tau_min": TAU_MIN,
    }


def _init_truth(truth: Path, nights: list[Night], cam: Camera, camera: str, compress: bool,
                site: Site | None = None) -> None:  # fmt: skip
    import dask.array as da
    import xarray as xr

    times = np.concatenate([nt.times for nt in nights]).astype("datetime64[ns]")
    if np.any(np.diff(times) <= np.timedelta64(0)):
        raise ValueError("nights overlap: per_night x cadence_min must be shorter than a day")
    per = max(len(nights[0].t_s), 1)
    ny, nx = cam.shape
    n = times.size

    def per_frame(values: list[str]) -> tuple[str, np.ndarray]:
        return ("time", np.array(values, dtype=object))

    ds = xr.Dataset(
        {
            "mask": (("time", "y", "x"), da.zeros((n, ny, nx), dtype=np.uint8, chunks=(1, ny, nx))),
            "sky": (("y", "x"), cam.sky.astype(np.uint8)),
            "cloud_fraction": ("time", da.full(n, np.nan, dtype=np.float32, chunks=per)),
            "ambtemp": ("time", da.full(n, np.nan, dtype=np.float32, chunks=per)),
            "night_kind": per_frame([nt.kind for nt in nights for _ in nt.t_s]),
            "night": per_frame([nt.date for nt in nights for _ in nt.t_s]),
            "source": per_frame(
                [_relpath(nt, k, camera, compress) for nt in nights for k in range(len(nt.t_s))]
            ),
        },
        coords={"time": times},
        attrs={
            "description": "true cloud masks of a cirrus_batch.synth archive (1 = cloud)",
            **geometry_attrs(cam),
            **({"site": {"latitude_deg": site.latitude_deg, "longitude_deg": site.longitude_deg,
                         "elevation_m": site.elevation_m}} if site is not None else {}),
        },
    )
    ds["mask"].attrs["description"] = (
        f"1 = cloud: a layer's (or fog's) optical depth along the line of sight >= {TAU_MIN}; 0 elsewhere"
    )
    ds["sky"].attrs["description"] = (
        "1 = valid sky: fully inside the image circle, zenith angle <= 90, above obstacles"
    )
    ds["ambtemp"].attrs["units"] = "deg C"
    ds.to_zarr(
        truth, mode="w", compute=False, zarr_format=3, consolidated=False,
        encoding={"time": {"units": "microseconds since 1970-01-01", "dtype": "int64"},
                  "mask": {"chunks": (1, ny, nx), "_FillValue": None}, "sky": {"_FillValue": None},
                  "cloud_fraction": {"chunks": (per,)}, "ambtemp": {"chunks": (per,)}},
    )  # fmt: skip


def write_archive(
    dest: str | Path, *, nights: int = 5, per_night: int = 60, cadence_min: float = 2.0,
    shape: tuple[int, int] = (512, 640), seed: int = 0, start: str = "2026-01-05",
    kinds: Sequence[str] | None = None, compress: bool = False, camera: str = "lwircam",
    truth: str | Path | None = None, client: distributed.Client | None = None, progress: bool = True,
    camera_kind: str = DEFAULT_CAMERA, ambtemp: bool = True, site: Site | None = None,
    pointing: Pointing | None = None,
) -> SynthSummary:  # fmt: skip
    """Write a synthetic archive ``DEST/YYYY/YYYYMMDD/<camera>_YYYYMMDDTHHMMSS.fits`` and its truth store.

    Night i has sky kind ``kinds[i]`` (default: ``KINDS[i % len(KINDS)]``); ``camera_kind`` is one of
    ``CAMERA_KINDS``; ``ambtemp=False`` leaves AMBTEMP out of the headers; with ``site`` the Sun and the Moon are
    rendered where they are (and ``SITELAT``/``SITELONG``/``SITEELEV`` written); ``pointing`` sets north, the
    mirror and a tilt. With ``client``, nights render
    as parallel Dask tasks (one per night); the output is identical to the serial one.
    """
    from tqdm.auto import tqdm

    if nights < 1 or per_night < 1 or cadence_min <= 0:
        raise ValueError("nights and per_night must be >= 1 and cadence_min > 0")
    if camera_kind not in CAMERA_KINDS:
        raise ValueError(f"unknown camera kind {camera_kind!r}; expected one of {tuple(CAMERA_KINDS)}")
    kinds = list(kinds) if kinds is not None else [KINDS[i % len(KINDS)] for i in range(nights)]
    if len(kinds) != nights:
        raise ValueError(f"kinds has {len(kinds)} entries for {nights} nights")
    dest = Path(dest).absolute()
    truth = Path(truth).absolute() if truth is not None else default_truth_path(dest)
    shape = (int(shape[0]), int(shape[1]))
    specs = [make_night(seed, i, kinds[i], start, per_night, cadence_min) for i in range(nights)]
    dest.mkdir(parents=True, exist_ok=True)
    _init_truth(truth, specs, make_camera(shape, seed, camera_kind, pointing), camera, compress, site)
    common = {"seed": seed, "shape": shape, "camera": camera, "camera_kind": camera_kind}
    common |= {"compress": compress, "ambtemp": ambtemp, "site": site, "pointing": pointing}
    offsets = [i * per_night for i in range(nights)]
    done: list[tuple[str, str, int]]
    if client is None:
        with tqdm(total=nights * per_night, unit="img", file=sys.stderr, disable=not progress) as bar:
            done = [render_night(dest, truth, nt, off, bar=bar, **common) for nt, off in zip(specs, offsets)]
    else:
        from distributed import as_completed

        futures = client.map(
            render_night, [dest] * nights, [truth] * nights, specs, offsets, pure=False, **common
        )
        with tqdm(total=nights, unit="night", file=sys.stderr, disable=not progress) as bar:
            for _ in as_completed(futures):
                bar.update(1)
        done = client.gather(futures)
    return SynthSummary(archive=dest, truth=truth, n_images=nights * per_night, nights=list(done))


# ---------------------------------------------------------------- montages


def _stretch(ax: Any, raw: np.ndarray, sky: np.ndarray) -> None:
    raw = raw.astype(np.float32)
    lo, hi = np.percentile(raw[sky], 0.5), np.percentile(raw, 99.5)
    ax.imshow(raw, cmap="inferno", vmin=lo - 0.1 * (hi - lo), vmax=hi)
    ax.set_axis_off()


def _pick_frames(kinds: np.ndarray, n: int) -> list[int]:
    """One frame per sky kind (late in the night for ``arriving``, else mid-night), at most n."""
    picks: list[int] = []
    for kind in KINDS:
        idx = np.flatnonzero(kinds == kind)
        if idx.size:
            picks.append(int(idx[int(0.6 * (idx.size - 1))] if kind == "arriving" else idx[idx.size // 2]))
    return sorted(picks[:n])


def montage(dest: str | Path, out_png: str | Path, n: int = 8, truth: str | Path | None = None) -> Path:
    """PNG of frames of up to n sky kinds of an archive: raw image (top) and true mask (bottom)."""
    import xarray as xr

    from cirrus_batch.plots import new_figure, save

    dest = Path(dest)
    truth = Path(truth) if truth is not None else default_truth_path(dest)
    ds = xr.open_zarr(truth, consolidated=False)
    kinds = np.array(ds["night_kind"].values.tolist())
    picks = _pick_frames(kinds, n)
    sky = ds["sky"].values.astype(bool)
    fig = new_figure(2.6 * len(picks), 5.0)
    axes = fig.subplots(2, len(picks), squeeze=False)
    for col, i in enumerate(picks):
        raw, _ = read_fits(dest / str(ds["source"].values[i]))
        _stretch(axes[0, col], raw, sky)
        mask = ds["mask"][i].values
        axes[1, col].imshow(np.where(sky, 1 + mask, 0), cmap="Blues_r", vmin=-0.5, vmax=2.2)
        axes[1, col].set_axis_off()
        stamp = np.datetime_as_string(ds["time"].values[i], unit="m").replace("T", " ")
        axes[0, col].set_title(f"{kinds[i]}\n{stamp}Z", fontsize=9)
        axes[1, col].set_title(f"true mask, cf={float(ds['cloud_fraction'].values[i]):.2f}", fontsize=8)
    fig.tight_layout()
    return save(fig, out_png, dpi=80)


def matrix(
    out_png: str | Path, *, cameras: Sequence[str] | None = None, kinds: Sequence[str] | None = None,
    shape: tuple[int, int] = (512, 640), seed: int = 0, per_night: int = 20, frame: float = 0.5,
) -> Path:  # fmt: skip
    """PNG of one frame per camera kind (rows) x sky kind (columns), rendered in memory; the frame at
    fraction ``frame`` of a night of ``per_night`` frames every 15 min. Cloud edges are outlined in cyan."""
    from cirrus_batch.plots import new_figure, save

    cameras = list(cameras or CAMERA_KINDS)
    kinds = list(kinds or KINDS)
    fig = new_figure(2.4 * len(kinds), 2.1 * len(cameras))
    axes = fig.subplots(len(cameras), len(kinds), squeeze=False)
    k = round(frame * (per_night - 1))
    for row, cam_kind in enumerate(cameras):
        cam = make_camera(shape, seed, cam_kind)
        for col, kind in enumerate(kinds):
            night = make_night(seed, col, kind, "2026-01-05", per_night, 15.0)
            raw, mask = NightRenderer(cam, night, seed).render(k)
            ax = axes[row, col]
            _stretch(ax, raw, cam.sky)
            if mask.any() and not mask[cam.sky].all():
                ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.4)
            ax.set_title(f"{cam_kind} / {kind}", fontsize=8)
    fig.tight_layout()
    return save(fig, out_png, dpi=70)
