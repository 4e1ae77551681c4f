"""PNG and TIFF camera frames as ``raw`` images, beside FITS (``[ingest.image_files]``).

Files are recognised by their leading bytes (PNG signature, TIFF ``II*\\0``/``MM\\0*``), never by their name, so
sets without extensions (WSISEG) ingest as they are. Read with Pillow:

* grey 8-bit (``L``), 16-bit (``I;16``) and 32-bit integer (``I``) images are stored as they are (16-bit 65535,
  the store's no-data value, is stored as 65534; 32-bit values must fit 0..65534);
* colour 8-bit images (``RGB``, ``RGBA``, palette ``P``) are reduced to one channel by ``rgb``: ``luma``
  (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B, rounded), ``red``, ``green``, ``blue``, ``mean`` or
  ``red_blue_ratio`` (round(1000 R / max(B, 1)), at most 65534: the classic cloud index of visible cameras, low
  for the blue clear sky, near 1000 for white or grey cloud); alpha is ignored. Colour with 16 bits per channel
  is rejected (Pillow would read it at 8 bits).

The observation time comes, by ``time_from``:

* ``auto`` (default): the header (EXIF ``DateTimeOriginal``, else EXIF/TIFF ``DateTime``, with
  ``OffsetTimeOriginal`` when given, else UTC; PNG text ``DATE-OBS`` or ``Creation Time`` in ISO 8601), else
  ``time_pattern``;
* ``header`` or ``name``: only that source;
* ``index``: ``time_start + index * time_step_s``, the index being the number ``index_pattern`` finds in the
  file name (default: its last number), for sets whose names hold only a frame number.

``time_pattern`` is a regular expression searched in the file's path relative to SOURCE, with named groups
``Y`` (year), ``m``, ``d``, ``H``, ``M`` and optionally ``S`` and ``f`` (fraction of a second), e.g.
``(?P<Y>\\d{4})(?P<m>\\d\\d)(?P<d>\\d\\d)_(?P<H>\\d\\d)(?P<M>\\d\\d)(?P<S>\\d\\d)``. A file no source gives a
time for is rejected (logged in the store's rejection log).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from cirrus_batch.fitsio import NODATA, Rejected

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
RGB_RULES = ("luma", "red", "green", "blue", "mean", "red_blue_ratio")
TIME_SOURCES = ("auto", "header", "name", "index")
_WEIGHTS = {"luma": (0.299, 0.587, 0.114), "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
            "mean": (1 / 3, 1 / 3, 1 / 3)}  # fmt: skip
_GREY = {"L", "I;16", "I;16L", "I;16B", "I", "1"}
_COLOUR = {"RGB", "RGBA", "P", "PA", "LA"}
_EXIF_IFD, _DATETIME, _DATETIME_ORIGINAL, _OFFSET_ORIGINAL = 0x8769, 306, 36867, 36881


@dataclass
class ImageFileConfig:
    """How PNG and TIFF frames become ``raw`` images (``[ingest.image_files]``; see :mod:`cirrus_batch.imagefiles`)."""

    rgb: str = "luma"
    """Colour to one channel: ``luma`` (BT.601), ``red``, ``green``, ``blue``, ``mean`` or ``red_blue_ratio``
    (1000 R / B: the cloud index of visible cameras)."""
    time_from: str = "auto"
    """``auto`` (header, then ``time_pattern``), ``header``, ``name`` (``time_pattern``) or ``index``."""
    time_pattern: str = ""
    """Regex with named groups Y, m, d, H, M (S, f optional) searched in the path relative to SOURCE."""
    time_start: str = ""
    """``index``: ISO time (UTC) of frame number 0."""
    time_step_s: float = 60.0
    """``index``: seconds between consecutive frame numbers."""
    index_pattern: str = r"(\d+)\D*$"
    """``index``: regex whose first group is the frame number, searched in the file name (default: its last
    number, ``ASC100-1006_042`` -> 42)."""

    def __post_init__(self) -> None:
        if self.rgb not in RGB_RULES:
            raise ValueError(f"rgb must be one of {', '.join(RGB_RULES)}, got {self.rgb!r}")
        if self.time_from not in TIME_SOURCES:
            raise ValueError(f"time_from must be one of {', '.join(TIME_SOURCES)}, got {self.time_from!r}")
        for key in ("time_pattern", "index_pattern"):
            try:
                re.compile(getattr(self, key))
            except re.error as exc:
                raise ValueError(f"{key} is not a regular expression: {exc}") from None
        if self.time_from == "name" and not self.time_pattern:
            raise ValueError('time_from = "name" needs a time_pattern')
        if self.time_from == "index":
            try:
                start = np.datetime64(self.time_start.rstrip("Z") or "NaT", "us")
            except ValueError:
                start = np.datetime64("NaT")
            if np.isnat(start):
                raise ValueError(f'time_from = "index" needs time_start, an ISO time; got {self.time_start!r}')


@dataclass(frozen=True)
class PictureLayout:
    """A PNG/TIFF frame's shape and how to reduce it to one channel (the scan's result; used like a FITS
    :class:`~cirrus_batch.fitsio.Layout` by the ingest's write tasks)."""

    shape: tuple[int, int]
    mode: str
    rgb: str
    end: int = 0
    """Bytes the file must have (checked while decoding, not from the header)."""


def is_picture(buf: bytes) -> bool:
    """Whether the leading bytes are a PNG or TIFF file."""
    return buf.startswith(PNG_MAGIC) or buf[:4] in TIFF_MAGIC


def _open(buf: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(buf))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise Rejected(f"unreadable image: {exc}") from None


def _check_mode(im: Image.Image, buf: bytes) -> None:
    if im.mode not in _GREY | _COLOUR:
        raise Rejected(f"unsupported image mode {im.mode} (grey or RGB, 8 or 16 bits)")
    if buf.startswith(PNG_MAGIC) and buf[24] == 16 and buf[25] in (2, 4, 6):  # IHDR bit depth and colour type
        raise Rejected("16-bit colour PNG is not supported (read at 8 bits): convert it to 16-bit grey")
    if getattr(im, "n_frames", 1) > 1:
        raise Rejected(f"{im.n_frames} frames in one file, expected one image")


def scan(buf: bytes, source: str, cfg: ImageFileConfig) -> tuple[PictureLayout, np.datetime64]:
    """Layout and observation time of a whole PNG/TIFF file (pixels not decoded); :class:`Rejected` when it is
    not usable or no time source gives a time."""
    im = _open(buf)
    _check_mode(im, buf)
    time = observation_time(im, source, cfg)
    return PictureLayout((im.height, im.width), im.mode, cfg.rgb), time


def _header_time(im: Image.Image) -> np.datetime64 | None:
    exif = im.getexif()
    sub = exif.get_ifd(_EXIF_IFD)
    value, offset = sub.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME), sub.get(_OFFSET_ORIGINAL)
    if value:
        date, _, clock = str(value).strip().partition(" ")
        iso = f"{date.replace(':', '-')}T{clock}"
    else:
        text = getattr(im, "text", None) or im.info
        iso, offset = next((str(text[k]).strip() for k in ("DATE-OBS", "Creation Time") if text.get(k)), None), None
        if iso is None:
            return None
    m = re.fullmatch(r"(.*?)(Z|[+-]\d\d:?\d\d)?", iso.strip())
    iso, zone = m[1], offset or m[2]
    try:
        t = np.datetime64(iso, "us")
    except ValueError:
        raise Rejected(f"header time {iso!r} is not an ISO/EXIF date-time") from None
    if zone and zone != "Z":
        sign = -1 if zone[0] == "+" else 1
        hours, minutes = int(zone[1:3]), int(zone[-2:])
        t += sign * np.timedelta64(60 * hours + minutes, "m")
    return t


def _name_time(source: str, pattern: str) -> np.datetime64 | None:
    m = re.search(pattern, source) if pattern else None
    if m is None:
        return None
    g = m.groupdict()
    try:
        iso = f"{g['Y']}-{g['m']}-{g['d']}T{g['H']}:{g['M']}:{g.get('S') or '00'}"
        return np.datetime64(iso + (f".{g['f']}" if g.get("f") else ""), "us")
    except (KeyError, ValueError):
        raise Rejected(f"time_pattern matched {m[0]!r}, which is not a date-time (groups Y m d H M [S f])") from None


def observation_time(im: Image.Image, source: str, cfg: ImageFileConfig) -> np.datetime64:
    """The frame's time (UTC) by ``cfg.time_from``; :class:`Rejected` when its source gives none."""
    if cfg.time_from == "index":
        m = re.search(cfg.index_pattern, PurePosixPath(source).name)
        if m is None:
            raise Rejected(f"no frame number (index_pattern {cfg.index_pattern!r}) in the file name")
        step = np.timedelta64(round(cfg.time_step_s * 1e6), "us")
        return np.datetime64(cfg.time_start.rstrip("Z"), "us") + int(m[1]) * step
    t = _header_time(im) if cfg.time_from in ("auto", "header") else None
    if t is None and cfg.time_from in ("auto", "name"):
        t = _name_time(source, cfg.time_pattern)
    if t is None:
        tried = {"auto": "no EXIF DateTimeOriginal/DateTime or PNG DATE-OBS/Creation Time"
                         + (", and time_pattern does not match the name" if cfg.time_pattern else
                            ", and no [ingest.image_files] time_pattern"),
                 "header": "no EXIF DateTimeOriginal/DateTime or PNG DATE-OBS/Creation Time",
                 "name": f"time_pattern {cfg.time_pattern!r} does not match the name"}[cfg.time_from]  # fmt: skip
        raise Rejected(f"no observation time: {tried} (see [ingest.image_files] time_from)")
    return t


def to_channel(data: np.ndarray, rgb: str) -> np.ndarray:
    """(y, x) or (y, x, c) pixels as one channel: colour by the ``rgb`` rule (alpha dropped), rounded."""
    if data.ndim == 2:
        return data
    if data.shape[2] < 3:  # LA: grey and alpha
        return data[..., 0]
    if rgb == "red_blue_ratio":
        red, blue = data[..., 0].astype(np.float64), data[..., 2].astype(np.float64)
        return np.minimum(np.rint(1000 * red / np.maximum(blue, 1)), NODATA - 1)
    weights = np.asarray(_WEIGHTS[rgb], dtype=np.float64)
    return np.rint(data[..., :3].astype(np.float64) @ weights)


def decode(buf: bytes, layout: PictureLayout) -> np.ndarray:
    """The frame as uint16 ``raw`` values (one channel)."""
    im = _open(buf)
    if (im.height, im.width) != layout.shape:
        raise Rejected(f"shape {(im.height, im.width)} differs from the scanned {layout.shape}")
    try:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        data = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise Rejected(f"cannot decode the image: {exc}") from None
    data = to_channel(data, layout.rgb)
    if (data.dtype.kind == "u" and data.itemsize <= 2) or data.dtype.kind == "b":
        return np.minimum(data, NODATA - 1).astype(np.uint16)
    if data.min() < 0 or data.max() >= NODATA:
        raise Rejected(f"pixel values {data.min():g}..{data.max():g} outside the 0..65534 range")
    return data.astype(np.uint16)


def read_raw(buf: bytes, layout: PictureLayout, out: np.ndarray) -> None:
    """Decode the frame into ``out`` (uint16 ``raw``), as :func:`cirrus_batch.fitsio.read_raw` does for FITS."""
    out[...] = decode(buf, layout)
