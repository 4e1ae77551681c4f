"""Shared fixtures: tiny FITS archives built in tmp_path and one local Dask cluster per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from distributed import Client, LocalCluster

from cirrus_batch.config import IngestConfig, PrepareConfig
from cirrus_batch.ingest import ingest
from cirrus_batch.prepare import prepare
from cirrus_batch.synth import write_archive

SHAPE = (32, 40)


def write_fits(
    path: Path,
    data: np.ndarray,
    date_obs: str | None,
    header: dict[str, Any] | None = None,
    compress: bool = False,
) -> Path:
    """One FITS image with DATE-OBS and extra header cards (uint16 goes the BZERO=32768 way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hdr = fits.Header()
    if date_obs is not None:
        hdr["DATE-OBS"] = date_obs
    for key, value in (header or {}).items():
        hdr[key] = value
    if compress:
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=hdr)]).writeto(path)
    else:
        fits.PrimaryHDU(data, header=hdr).writeto(path)
    return path


def frame(i: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """A deterministic 14-bit test image that differs for every ``i``."""
    rng = np.random.default_rng(i)
    return rng.integers(1000, 16000, size=shape, dtype=np.uint16)


def make_archive(
    root: Path,
    nights: int = 2,
    per_night: int = 5,
    start_day: int = 5,
    shape: tuple[int, int] = SHAPE,
    compress: bool = False,
) -> list[Path]:
    """Archive laid out like a camera's: YYYY/YYYYMMDD/cam_YYYYMMDDTHHMMSS.fits, 2 minutes apart."""
    paths = []
    for n in range(nights):
        day = start_day + n
        for k in range(per_night):
            minute = 2 * k
            stamp = f"2026-01-{day:02d}T20:{minute:02d}:00"
            name = f"cam_202601{day:02d}T20{minute:02d}00.fits" + (".fz" if compress else "")
            i = 100 * day + k
            path = root / "2026" / f"202601{day:02d}" / name
            header = {"EXPTIME": 0.03, "AMBTEMP": float(day) + k / 10}
            paths.append(write_fits(path, frame(i, shape), stamp, header, compress))
    return paths


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    """Two single-threaded local worker processes, as on a 2-core laptop."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    make_archive(root)
    return root


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids oversubscription slowdowns on busy CI cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory, client) -> str:
    """A prepared 5-night store of 96x120 images (8 a night) and its truth beside it (training, tuning)."""
    tmp = tmp_path_factory.mktemp("prepared")
    # nights whose deck arrives mid-night hold clear and cloudy frames: every split (whole nights) has both
    write_archive(tmp / "archive", nights=5, per_night=8, cadence_min=10, shape=(96, 120), seed=5, progress=False,
                  kinds=["arriving"] * 5)  # fmt: skip
    ingest(str(tmp / "archive"), str(tmp / "s.zarr"), client, IngestConfig(shard_size=8), progress=False)
    prepare(str(tmp / "s.zarr"), client, PrepareConfig(fit_images=40), progress=False)
    return str(tmp / "s.zarr")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, client):
    """A prepared tiny store and both models trained on it (``test_reprocess.Trained``), built once per session
    for the reprocess, export and report tests."""
    from test_reprocess import build_trained

    return build_trained(tmp_path_factory, client)
