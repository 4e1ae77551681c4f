"""PNG/TIFF ingest: 8/16-bit grey and RGB files recognised by content, times from EXIF, PNG text, the name or
the frame number, rejections logged, idempotent and resumable like FITS."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image, PngImagePlugin

from cirrus_batch.config import ConfigError, IngestConfig, load_config
from cirrus_batch.imagefiles import PNG_MAGIC, ImageFileConfig, to_channel
from cirrus_batch.ingest import ingest
from cirrus_batch.store import Store, open_rejections

SHAPE = (12, 16)


def pixels(i: int, dtype=np.uint8, channels: int = 0) -> np.ndarray:
    rng = np.random.default_rng(i)
    top = 255 if dtype == np.uint8 else 60000
    return rng.integers(0, top, size=(*SHAPE, channels) if channels else SHAPE, dtype=dtype)


def exif_with(when: str, offset: str | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x8769] = {36867: when, **({36881: offset} if offset else {})}  # DateTimeOriginal, OffsetTimeOriginal
    return exif


def save(path: Path, data: np.ndarray, fmt: str = "PNG", exif: Image.Exif | None = None,
         text: dict[str, str] | None = None, datetime: str | None = None) -> Path:  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(data)
    kwargs: dict = {"tiffinfo": {306: datetime}} if datetime else {}  # TIFF DateTime
    if exif is not None:
        kwargs["exif"] = exif
    if text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        kwargs["pnginfo"] = info
    with open(path, "wb") as f:  # no extension: the format comes from the content
        im.save(f, format=fmt, **kwargs)
    return path


def png_rgb48(data: np.ndarray) -> bytes:
    """A valid 16-bit-per-channel RGB PNG (Pillow cannot write one)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = data.shape
    rows = b"".join(b"\x00" + data[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def cfg(**image_files) -> IngestConfig:
    return IngestConfig(shard_size=4, header_keys=["EXPTIME"], image_files=ImageFileConfig(**image_files))


def stored(store: Path) -> dict[str, tuple[np.datetime64, np.ndarray]]:
    g = zarr.open_group(str(store), mode="r")
    n = int(g.attrs["committed"])
    times = np.asarray(g["time"][:n]).astype("datetime64[us]")
    return {s: (t, g["raw"][i]) for i, (s, t) in enumerate(zip(g["source"][:n].tolist(), times))}


def test_rgb_rules():
    rgb = np.array([[[100, 200, 50]]], dtype=np.uint8)
    assert to_channel(rgb, "luma")[0, 0] == round(0.299 * 100 + 0.587 * 200 + 0.114 * 50)
    assert [to_channel(rgb, r)[0, 0] for r in ("red", "green", "blue", "mean")] == [100, 200, 50, 117]
    assert to_channel(rgb, "red_blue_ratio")[0, 0] == 2000
    assert to_channel(np.array([[[255, 0, 0]]], np.uint8), "red_blue_ratio")[0, 0] == 65534  # no blue: capped


def test_grey_and_colour_png_tiff_with_header_and_name_times(tmp_path, client):
    root = tmp_path / "cam"
    grey8, grey16, rgb = pixels(1), pixels(2, np.uint16), pixels(3, channels=3)
    grey16[0, 0] = 65535  # the store's no-data value: kept as 65534
    save(root / "a", grey8, exif=exif_with("2026:01:05 20:00:00"))
    save(root / "b", grey16, text={"DATE-OBS": "2026-01-05T20:02:00"})
    save(root / "c", rgb, exif=exif_with("2026:01:05 21:04:00", "+01:00"))  # 20:04 UTC
    save(root / "d", pixels(4), "TIFF", datetime="2026:01:05 20:06:00")
    save(root / "e", pixels(5, np.uint16), "TIFF", datetime="2026:01:05 20:08:00")
    save(root / "f_20260105_201000", rgb)  # no header time: the name
    pattern = r"(?P<Y>\d{4})(?P<m>\d\d)(?P<d>\d\d)_(?P<H>\d\d)(?P<M>\d\d)(?P<S>\d\d)"
    report = ingest(str(root), str(tmp_path / "s.zarr"), client, cfg(time_pattern=pattern, rgb="green"),
                    progress=False)  # fmt: skip
    assert report.ingested == 6 and not report.rejected
    got = stored(tmp_path / "s.zarr")
    assert [str(t)[11:16] for t, _ in got.values()] == ["20:00", "20:02", "20:04", "20:06", "20:08", "20:10"]
    expect16 = np.minimum(grey16, 65534)
    assert np.array_equal(got["a"][1], grey8) and np.array_equal(got["b"][1], expect16)
    assert np.array_equal(got["c"][1], rgb[..., 1]) and np.array_equal(got["f_20260105_201000"][1], rgb[..., 1])
    assert np.array_equal(got["d"][1], pixels(4)) and np.array_equal(got["e"][1], pixels(5, np.uint16))
    again = ingest(str(root), str(tmp_path / "s.zarr"), client, cfg(time_pattern=pattern), progress=False)
    assert again.ingested == 0 and again.already == 6  # idempotent


def test_index_times_for_numbered_frames_and_png_without_time_rejected(tmp_path, client):
    root = tmp_path / "wsiseg"
    for k in (3, 1, 2):
        save(root / f"ASC100-1006_{k:03d}", pixels(k, channels=3))
    store = tmp_path / "s.zarr"
    report = ingest(str(root), str(store), client, cfg(time_from="index", time_start="2020-01-01T00:00:00",
                                                      time_step_s=180), progress=False)  # fmt: skip
    assert report.ingested == 3
    got = stored(store)
    assert list(got) == ["ASC100-1006_001", "ASC100-1006_002", "ASC100-1006_003"]
    assert [str(t) for t, _ in got.values()][0] == "2020-01-01T00:03:00.000000"
    luma = np.rint(pixels(2, channels=3) @ np.array([0.299, 0.587, 0.114]))
    assert np.array_equal(got["ASC100-1006_002"][1], luma)

    # a frame with no time source: a logged rejection, the store's images untouched
    timeless = tmp_path / "timeless"
    save(timeless / "noon", pixels(9))
    before = {k: (t, r.copy()) for k, (t, r) in stored(store).items()}
    report = ingest(str(timeless), str(store), client, cfg(), progress=False)
    assert report.ingested == 0 and len(report.rejected) == 1
    reason = report.rejected[0].reason
    assert "no observation time" in reason and "time_pattern" in reason
    after = stored(store)
    assert list(after) == list(before) and all(np.array_equal(after[k][1], before[k][1]) for k in before)
    assert open_rejections(str(store))["source"].values.tolist() == ["noon"]
    assert ingest(str(timeless), str(store), client, cfg(), progress=False).previously_rejected == 1


def test_broken_png_and_16_bit_colour_are_rejected(tmp_path, client):
    root = tmp_path / "cam"
    good = save(root / "good", pixels(1), exif=exif_with("2026:01:05 20:00:00"))
    (root / "cut").write_bytes(good.read_bytes()[:60])
    (root / "rgb48").write_bytes(png_rgb48(pixels(2, np.uint16, channels=3)))
    report = ingest(str(root), str(tmp_path / "s.zarr"), client, cfg(), progress=False)
    reasons = {r.source: r.reason for r in report.rejected}
    assert report.ingested == 1 and set(reasons) == {"cut", "rgb48"}
    assert "16-bit colour PNG" in reasons["rgb48"]


def test_interrupted_png_ingest_completes_on_the_next_run(tmp_path, client):
    root, store = tmp_path / "cam", tmp_path / "s.zarr"
    for k in range(10):
        save(root / f"f{k:02d}", pixels(k), exif=exif_with(f"2026:01:05 20:{k:02d}:00"))

    def crash(committed: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(str(root), str(store), client, cfg(), progress=False, on_commit=crash)
    assert 0 < Store.open(str(store), mode="r").committed < 10
    report = ingest(str(root), str(store), client, cfg(), progress=False)
    assert report.total == 10
    got = stored(store)
    assert all(np.array_equal(got[f"f{k:02d}"][1], pixels(k)) for k in range(10))


def test_config_errors():
    with pytest.raises(ConfigError, match="rgb must be one of"):
        load_config(overrides={"ingest.image_files.rgb": "purple"})
    with pytest.raises(ConfigError, match="needs time_start"):
        load_config(overrides={"ingest.image_files.time_from": "index"})
    with pytest.raises(ConfigError, match="needs a time_pattern"):
        load_config(overrides={"ingest.image_files.time_from": "name"})
