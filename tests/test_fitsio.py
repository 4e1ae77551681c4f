"""The FITS reader agrees with astropy's on every pixel type and scaling, and rejects bad files."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits

from cirrus_batch.fitsio import (
    NODATA,
    CardValues,
    Rejected,
    decode,
    find_image,
    header_values,
    observation_time,
    read_raw,
    simple_value,
    to_raw,
)

SHAPE = (6, 7)


def to_bytes(hdul: fits.HDUList) -> bytes:
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def astropy_pixels(buf: bytes) -> np.ndarray:
    with fits.open(io.BytesIO(buf)) as hdul:
        return next(h.data for h in hdul if h.data is not None and h.is_image)


def rice(data: np.ndarray) -> fits.CompImageHDU:
    return fits.CompImageHDU(data, compression_type="RICE_1")


def _hdus():
    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 16384, SHAPE).astype(np.uint16)
    yield "uint16", fits.HDUList([fits.PrimaryHDU(u16)])
    yield "int16", fits.HDUList([fits.PrimaryHDU(u16.astype(np.int16))])
    yield "int32", fits.HDUList([fits.PrimaryHDU(u16.astype(np.int32))])
    yield "uint8", fits.HDUList([fits.PrimaryHDU((u16 % 256).astype(np.uint8))])
    yield "float32", fits.HDUList([fits.PrimaryHDU(u16.astype(np.float32))])
    yield "float64", fits.HDUList([fits.PrimaryHDU(u16.astype(np.float64))])
    scaled = fits.PrimaryHDU(u16.astype(np.int16) // 2)
    scaled.header.update({"BSCALE": 2.0, "BZERO": 100.0})
    yield "bscale", fits.HDUList([scaled])
    blank = fits.PrimaryHDU(np.where(u16 > 15000, -1, u16).astype(np.int16))
    blank.header["BLANK"] = -1
    yield "blank", fits.HDUList([blank])
    yield "extension", fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(u16)])
    yield "rice", fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(u16, compression_type="RICE_1")])
    tiled = fits.CompImageHDU(u16, compression_type="RICE_1", tile_shape=(4, 3))  # edge tiles 2x3, 4x1, 2x1
    yield "rice-tiles", fits.HDUList([fits.PrimaryHDU(), tiled])
    yield "rice-int16", fits.HDUList([fits.PrimaryHDU(), rice(u16.astype(np.int16))])
    yield "rice-int32", fits.HDUList([fits.PrimaryHDU(), rice(u16.astype(np.int32))])
    yield "rice-uint8", fits.HDUList([fits.PrimaryHDU(), rice((u16 % 256).astype(np.uint8))])
    yield "rice-float32", fits.HDUList([fits.PrimaryHDU(), rice(u16.astype(np.float32))])
    yield "gzip", fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(u16, compression_type="GZIP_1")])


@pytest.mark.parametrize(("name", "hdul"), list(_hdus()), ids=[n for n, _ in _hdus()])
def test_decode_matches_astropy(name, hdul):
    buf = to_bytes(hdul)
    layout = find_image(buf).layout
    assert layout.shape == SHAPE
    ours, theirs = decode(buf, layout), astropy_pixels(buf)
    np.testing.assert_array_equal(ours, theirs)
    raw = np.empty(SHAPE, np.uint16)
    read_raw(buf, layout, raw)
    if name == "blank":
        assert (raw[np.isnan(theirs)] == NODATA).all() and np.isnan(theirs).any()
    else:
        np.testing.assert_array_equal(raw, np.rint(theirs).astype(np.uint16))


def test_rice_integer_images_are_decoded_here_and_others_by_astropy():
    """RICE_1 integer images have their tiles read here (the fast path); quantized floats and other algorithms
    go to astropy. Fails when astropy's C Rice decoder moves: every .fits.fz would then decode 3x slower."""
    hdus = dict(_hdus())
    for name in ("rice", "rice-tiles", "rice-int16", "rice-int32", "rice-uint8"):
        assert find_image(to_bytes(hdus[name])).layout.tiles is not None, name
    for name in ("rice-float32", "gzip", "uint16"):
        assert find_image(to_bytes(hdus[name])).layout.tiles is None, name


@pytest.mark.skipif(shutil.which("fpack") is None, reason="fpack (Debian libcfitsio-bin) is not installed")
@pytest.mark.parametrize("dtype", ["uint16", "int16", "int32", "uint8"])
@pytest.mark.parametrize("tiles", [[], ["-t", "16,12"], ["-w"]], ids=["rows", "16x12", "whole"])
def test_files_written_by_fpack_take_the_fast_path_and_match(tmp_path, dtype, tiles):
    """CFITSIO's own writer (what archives are compressed with), not astropy's: same pixels on the fast path."""
    data = np.random.default_rng(1).integers(0, 16384, (50, 70)).astype(np.uint16).astype(dtype)
    plain = tmp_path / "frame.fits"
    fits.PrimaryHDU(data).writeto(plain)
    subprocess.run(["fpack", "-r", *tiles, "-O", f"{plain}.fz", str(plain)], check=True, capture_output=True)
    buf = (tmp_path / "frame.fits.fz").read_bytes()
    layout = find_image(buf).layout
    assert layout.tiles is not None
    np.testing.assert_array_equal(decode(buf, layout), data)
    np.testing.assert_array_equal(decode(buf, layout), astropy_pixels(buf))


def _as_q_descriptors(buf: bytes) -> bytes:
    """A one-column RICE_1 file rewritten with 64-bit ``Q`` descriptors (as for heaps past 2 GiB)."""
    layout = find_image(buf).layout
    t = layout.tiles
    header = buf[2880 : layout.data_offset].decode()
    table = np.frombuffer(buf, ">i4", 2 * t.rows, layout.data_offset).astype(">i8")
    heap = buf[layout.data_offset + t.heap : layout.end]
    out = []
    for card in (header[i : i + 80] for i in range(0, len(header), 80)):
        key = card[:8].strip()
        if key == "NAXIS1":
            card = f"{'NAXIS1':8}= {16:20d}"
        elif key == "TFORM1":
            card = f"{'TFORM1':8}= '1QB     '"
        elif key == "THEAP":
            card = f"{'THEAP':8}= {16 * t.rows:20d}"
        out.append(card.ljust(80))
    text = "".join(out).encode()
    data = table.tobytes() + heap
    return buf[:2880] + text + data + b"\0" * (-len(data) % 2880)


def test_rice_with_64_bit_descriptors_matches_astropy():
    buf = _as_q_descriptors(to_bytes(dict(_hdus())["rice-tiles"]))
    layout = find_image(buf).layout
    assert layout.tiles is not None and layout.tiles.descriptor == ">i8"
    np.testing.assert_array_equal(decode(buf, layout), astropy_pixels(buf))


def test_rice_tile_outside_the_heap_is_a_rejection():
    buf = to_bytes(dict(_hdus())["rice"])
    layout = find_image(buf).layout
    bad = bytearray(buf)
    first_offset = slice(layout.data_offset + 4, layout.data_offset + 8)
    bad[first_offset] = np.array([10**6], ">i4").tobytes()
    with pytest.raises(Rejected, match="outside the heap"):
        decode(bytes(bad), layout)


def test_header_needs_more_bytes_then_eof_error():
    hdr = fits.Header({f"KEY{i}": i for i in range(60)})  # two header blocks
    buf = to_bytes(fits.HDUList([fits.PrimaryHDU(np.zeros(SHAPE, np.uint16), header=hdr)]))
    with pytest.raises(EOFError):
        find_image(buf[:2880])
    assert find_image(buf).layout.data_offset == 2 * 2880


@pytest.mark.parametrize(
    ("buf", "reason"),
    [
        (b"", "empty file"),
        (b"GIF89a" + b"\0" * 3000, "not a FITS file"),
        (to_bytes(fits.HDUList([fits.PrimaryHDU()])), "no image data"),
    ],
)
def test_rejections(buf, reason):
    with pytest.raises(Rejected, match=reason):
        find_image(buf)


CARDS = [
    "BITPIX  =                   16 / array data type",
    "NAXIS1  =                  640",
    "BZERO   =                32768",
    "NEG     =                  -12/no space before the comment",
    "PLUS    = +7",
    "ZEROS   =                  007",
    "REAL    =                 0.03 / [s]",
    "EXP     =              1.5E-03",
    "DEXP    =              2.0D+02",
    "DOT     =                   5.",
    "LEAD    =                  .25",
    "BIGEXP  =                  1E5",
    "FLAG    =                    T",
    "NOFLAG  =                    F / logical",
    "DATE-OBS= '2026-01-05T21:00:01.327' / UTC",
    "NAME    = 'lwircam  '",
    "SPACES  = '  leading'",
    "EMPTY   = ''",
    "QUOTE   = 'it''s'",
    "COMPLEX = (1.0, 2.0)",
    "UNDEF   =",
    "HIERARCH ESO DET TEMP = 21.5",
    "exptime =                  0.5",
    "REAL    =                 9.99 / a second REAL card: the first one counts",
]


def test_card_values_equal_astropys():
    """Simple cards are read from their images, the rest by astropy; every value is astropy's."""
    long = fits.Card("LONGSTR", "x" * 100).image  # a CONTINUE card follows
    text = "".join(c.ljust(80) for c in CARDS) + long + "END".ljust(80)
    text = text.ljust(-(-len(text) // 2880) * 2880)
    header = fits.Header.fromstring(text)
    values = CardValues(text)
    assert values.get("BITPIX") == 16 and values.get("exptime") == 0.5 and values.get("MISSING") is None
    assert "header" not in vars(values)  # simple cards and missing ones never parse the header with astropy
    for key in [c.split("=")[0].strip() for c in CARDS] + ["LONGSTR", "ESO DET TEMP", "EXPTIME", "MISSING"]:
        assert values.get(key) == header.get(key), key
        assert type(values.get(key)) is type(header.get(key)), key
    assert simple_value(CARDS[0].ljust(80)) == 16 and simple_value(CARDS[18].ljust(80)) is NotImplemented


def test_missing_mandatory_card_is_a_rejection():
    buf = to_bytes(fits.HDUList([fits.PrimaryHDU(np.zeros(SHAPE, np.uint16))]))
    header = buf[:2880].replace(b"NAXIS2  =", b"NAXISZ  =")  # a 2-D image that lost its second axis
    with pytest.raises(Rejected, match="no NAXIS2 card"):
        find_image(header + buf[2880:])


def test_truncated_and_out_of_range():
    buf = to_bytes(fits.HDUList([fits.PrimaryHDU(np.zeros((100, 100), np.uint16))]))
    layout = find_image(buf[:4000]).layout
    with pytest.raises(Rejected, match="truncated"):
        decode(buf[:4000], layout)
    with pytest.raises(Rejected, match="outside"):
        to_raw(np.array([[-5.0, 3.0]]))
    with pytest.raises(Rejected, match="all pixels are NaN"):
        to_raw(np.full((2, 2), np.nan))


def test_time_and_header_values():
    h = fits.Header({"DATE-OBS": "2026-01-05", "TIME-OBS": "21:00:01.5", "EXPTIME": 0.5, "FLAG": True})
    assert observation_time(h) == np.datetime64("2026-01-05T21:00:01.500000")
    with pytest.raises(Rejected, match="not an ISO"):
        observation_time(fits.Header({"DATE-OBS": "yesterday"}))
    values = header_values(h, ["EXPTIME", "FLAG", "MISSING"])
    assert values["EXPTIME"] == 0.5 and np.isnan(values["FLAG"]) and np.isnan(values["MISSING"])
