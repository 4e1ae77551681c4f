"""Whole shards written by cirrus are the bytes zarr writes, reads give what zarr reads, and everything else is left
to zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from cirrus_batch.shards import ImageShards, read_region, write_shards
from cirrus_batch.store import write_images

SHAPE = (6, 7)


def _array(path, n: int, shard: int, dtype: str, compressors=None) -> zarr.Array:
    group = zarr.open_group(path, mode="w", zarr_format=3)  # a path, or any zarr store
    compressors = compressors or BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")
    return group.create_array("x", shape=(n, *SHAPE), chunks=(1, *SHAPE), shards=(shard, *SHAPE), dtype=dtype,
                              fill_value=0, compressors=compressors)  # fmt: skip


def _values(n: int, dtype: str) -> np.ndarray:
    values = np.random.default_rng(0).random((n, *SHAPE)) * 100
    values[1] = 0  # an image equal to the fill value is stored too
    return values.astype(dtype)


def _shard_files(array: zarr.Array) -> dict[str, bytes]:
    root = array.store_path.store.root / "x"
    return {str(p.relative_to(root)): p.read_bytes() for p in (root / "c").rglob("*") if p.is_file()}


@pytest.mark.parametrize("shuffle", ["shuffle", "bitshuffle"])
@pytest.mark.parametrize("dtype", ["uint16", "float16", "float32", "uint8", "bool"])
def test_whole_shards_are_zarrs_bytes(tmp_path, dtype, shuffle):
    n, shard = 10, 4  # two full shards and a last one holding 2 of its 4 images
    values = _values(n, dtype)
    codec = BloscCodec(cname="lz4", clevel=3, shuffle=shuffle)
    ours, theirs = (_array(tmp_path / name, n, shard, dtype, codec) for name in ("ours.zarr", "zarr.zarr"))
    for start in range(0, n, shard):
        region = slice(start, min(start + shard, n))
        assert write_shards(ours, region, values[region])
        theirs.with_config({"write_empty_chunks": True})[region] = values[region]
    assert _shard_files(ours) == _shard_files(theirs) and len(_shard_files(ours)) == 3
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "ours.zarr", path="x")[:], values)
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))


def test_other_stores_get_the_same_bytes():
    """Stores other than a local directory (here zarr's memory store) are written through the store's API."""
    values = _values(8, "uint16")
    ours, theirs = _array(MemoryStore(), 8, 4, "uint16"), _array(MemoryStore(), 8, 4, "uint16")
    assert write_shards(ours, slice(0, 8), values)
    theirs.with_config({"write_empty_chunks": True})[:] = values
    def shard(array: zarr.Array, k: int) -> bytes:
        return sync(array.store_path.store.get(f"x/c/{k}/0/0", default_buffer_prototype())).to_bytes()

    assert all(shard(ours, k) == shard(theirs, k) for k in (0, 1))
    np.testing.assert_array_equal(ours[:], values)


def test_other_regions_and_codecs_are_left_to_zarr(tmp_path):
    values = _values(10, "uint16")
    array = _array(tmp_path / "a.zarr", 10, 4, "uint16")
    assert not write_shards(array, slice(2, 4), values[2:4])  # starts inside a shard
    assert not write_shards(array, slice(4, 6), values[4:6])  # ends inside a shard that goes on
    with pytest.raises(ValueError, match="do not fit"):
        write_shards(array, slice(0, 4), values[:3])
    assert not list((tmp_path / "a.zarr").rglob("c/*"))
    zstd = _array(tmp_path / "b.zarr", 10, 4, "uint16", compressors=ZstdCodec(level=1))
    assert ImageShards.of(zstd) is None
    for array in (array, zstd):  # write_images writes them all the same
        write_images(array, slice(0, 10), values)
        write_images(array, slice(2, 4), values[2:4] + 1)
        expected = values.copy()
        expected[2:4] += 1
        np.testing.assert_array_equal(array[:], expected)


def test_shard_index_marks_images_past_the_end(tmp_path):
    array = _array(tmp_path / "a.zarr", 6, 4, "uint16")
    assert write_shards(array, slice(4, 6), _values(2, "uint16"))
    data = (tmp_path / "a.zarr" / "x" / "c" / "1" / "0" / "0").read_bytes()
    index = np.frombuffer(data[-(4 * 16 + 4) : -4], "<u8").reshape(4, 2)
    assert (index[2:] == 2**64 - 1).all() and index[0, 0] == 0 and index[1, 0] == index[0, 1]


@pytest.mark.parametrize("dtype", ["uint16", "float16", "bool"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_reads_give_what_zarr_reads(tmp_path, dtype, where):
    """Ranges across shards, chunks zarr left out (equal to the fill value), a shard never written, other codecs."""
    n = 14
    array = _array(tmp_path / "a.zarr" if where == "local" else MemoryStore(), n, 4, dtype)
    values = _values(n, dtype)
    values[5] = 0
    array[:8] = values[:8]  # zarr's own writes: image 1 and 5 are not stored, shard 2 and 3 never written
    array[12:] = values[12:]
    assert ImageShards.of(array) is not None  # read here, not by zarr
    for region in (slice(0, 14), slice(3, 9), slice(5, 6), slice(8, 12), slice(11, 13), slice(13, 14)):
        np.testing.assert_array_equal(read_region(array, region), array[region])
    assert read_region(array, slice(0, 14)).dtype == array.dtype and read_region(array, slice(4, 4)).shape[0] == 0
    zstd = _array(tmp_path / "z.zarr", n, 4, dtype, compressors=ZstdCodec(level=1))
    zstd[:] = values
    np.testing.assert_array_equal(read_region(zstd, slice(2, 9)), values[2:9])


def test_a_corrupt_shard_index_is_an_error(tmp_path):
    array = _array(tmp_path / "a.zarr", 8, 4, "uint16")
    assert write_shards(array, slice(0, 8), _values(8, "uint16"))
    path = tmp_path / "a.zarr" / "x" / "c" / "1" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(read_region(array, slice(0, 4)), _values(8, "uint16")[:4])  # shard 0 is intact
    with pytest.raises(ValueError, match="corrupt index"):
        read_region(array, slice(2, 6))
