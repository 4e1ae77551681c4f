"""The zarr v3 image store: schema, creation, the commit protocol and the rejection log.

One store holds one camera archive (schema in ``docs/store.md``). Every array whose first dimension is
``time`` grows together. Writers first resize those arrays, write shard-aligned regions, then advance
the root attribute ``committed``; only the first ``committed`` images are valid. A writer killed in
the middle leaves arrays longer than ``committed``; :meth:`Store.repair` cuts them back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from cirrus_batch.errors import StoreError
from cirrus_batch.fitsio import NODATA
from cirrus_batch.shards import write_shards

SCHEMA = "cirrus-store/1"
TIME_UNITS = "microseconds since 1970-01-01"
_TIME_ATTRS = {"units": TIME_UNITS, "calendar": "proleptic_gregorian", "long_name": "DATE-OBS (UTC)"}
REJECTIONS = "rejections"


def header_var(key: str) -> str:
    """Store variable name of a FITS header keyword (``DET-TEMP`` -> ``det_temp``)."""
    return key.lower().replace("-", "_")


@dataclass(frozen=True)
class Rejection:
    """One file that was not ingested."""

    source: str
    reason: str
    size: int
    mtime: float = math.nan

    def same_file(self, size: int, mtime: float) -> bool:
        """True when a file of this size and modification time is the one rejected (NaN: unknown)."""
        return size == self.size and (math.isnan(mtime) or math.isnan(self.mtime) or mtime == self.mtime)


class Store:
    """Client-side handle on a cirrus zarr store (metadata operations, no pixel data)."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url
        self.group = group

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, mode: str = "r+") -> Store:
        """Open an existing store; a clear :class:`StoreError` if it is missing or not a cirrus store."""
        try:
            group = zarr.open_group(url, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreError(f"no zarr store at {url}") from None
        except (OSError, ValueError, TypeError, zarr.errors.BaseZarrError) as exc:
            raise StoreError(f"cannot open store {url}: {exc}") from None
        if group.attrs.get("schema") != SCHEMA:
            raise StoreError(f"{url} is a zarr group but not a cirrus store (no schema {SCHEMA!r})")
        return cls(url, group)

    @classmethod
    def create(
        cls,
        url: str,
        *,
        shape: tuple[int, int],
        shard_size: int,
        header_keys: list[str],
        clevel: int = 3,
        source_root: str = "",
        overwrite: bool = False,
    ) -> Store:
        """Create an empty store for images of ``shape`` (``overwrite``: replacing the one at ``url``)."""
        try:
            group = zarr.open_group(url, mode="w" if overwrite else "w-", zarr_format=3)
        except (OSError, ValueError, zarr.errors.BaseZarrError) as exc:
            raise StoreError(f"cannot create store {url}: {exc}") from None
        ny, nx = shape
        group.attrs.update(
            {
                "schema": SCHEMA,
                "committed": 0,
                "shard_size": shard_size,
                "header_keys": list(header_keys),
                "source_root": source_root,
                "title": "CIRRUS LWIR all-sky camera archive",
            }
        )
        group.create_array(
            "raw",
            shape=(0, ny, nx),
            chunks=(1, ny, nx),
            shards=(shard_size, ny, nx),
            dtype="uint16",
            fill_value=0,
            compressors=BloscCodec(cname="lz4", clevel=clevel, shuffle="shuffle"),
            dimension_names=("time", "y", "x"),
            attributes={
                "long_name": "raw detector counts",
                "units": "ADU",
                "nodata": int(NODATA),
                "comment": "14-bit camera counts; nodata marks NaN/BLANK pixels of the file",
            },
        )
        vectors: dict[str, tuple[Any, Any, dict[str, Any]]] = {
            "time": ("int64", 0, _TIME_ATTRS),
            "source": (str, "", {"long_name": "file path relative to the archive root"}),
        }
        for key in header_keys:
            vectors[header_var(key)] = ("float64", np.nan, {"long_name": f"FITS header {key}", "header_key": key})
        for name, (dtype, fill, attrs) in vectors.items():
            group.create_array(
                name,
                shape=(0,),
                chunks=(shard_size,),
                dtype=dtype,
                fill_value=fill,
                dimension_names=("time",),
                attributes=attrs,
            )
        rej = group.create_group(REJECTIONS)
        columns = (("source", str, ""), ("reason", str, ""), ("size", "int64", -1), ("mtime", "float64", np.nan))
        for name, dtype, fill in columns:
            rej.create_array(name, shape=(0,), chunks=(1000,), dtype=dtype, fill_value=fill,
                             dimension_names=("rejection",))
        return cls(url, group)

    # -- attributes --------------------------------------------------------------------------------
    @property
    def committed(self) -> int:
        return int(self.group.attrs["committed"])

    @property
    def shard_size(self) -> int:
        return int(self.group.attrs["shard_size"])

    @property
    def header_keys(self) -> list[str]:
        return list(self.group.attrs["header_keys"])

    @property
    def image_shape(self) -> tuple[int, int]:
        _, ny, nx = self.group["raw"].shape
        return int(ny), int(nx)

    def time_arrays(self) -> list[zarr.Array]:
        """Every array in the root group whose first dimension is ``time``."""
        return [
            a for _, a in self.group.arrays() if (a.metadata.dimension_names or (None,))[0] == "time"
        ]

    def require_images(self) -> int:
        """The number of committed images; a clear error when there is none yet."""
        if not self.committed:
            raise StoreError(f"{self.url} holds no image yet: run `cirrus ingest SOURCE {self.url}` first")
        return self.committed

    def add_time_arrays(self, n: int, images: dict[str, tuple[str, Any]], vectors: dict[str, tuple[str, Any]],
                        attributes: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
        """Create the missing derived arrays of length ``n``: ``images`` (time, y, x) one image per chunk in
        shards like ``raw``, ``vectors`` (time) chunked by shard; each given as ``name: (dtype, fill value)``."""
        ny, nx = self.image_shape
        shard, attributes = self.shard_size, attributes or {}
        for name, (dtype, fill) in images.items():
            if name not in self.group:
                self.group.create_array(
                    name, shape=(n, ny, nx), chunks=(1, ny, nx), shards=(shard, ny, nx), dtype=dtype,
                    fill_value=fill, compressors=BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),
                    dimension_names=("time", "y", "x"), attributes=attributes.get(name),
                )  # fmt: skip
        for name, (dtype, fill) in vectors.items():
            if name not in self.group:
                self.group.create_array(name, shape=(n,), chunks=(shard,), dtype=dtype, fill_value=fill,
                                        dimension_names=("time",), attributes=attributes.get(name))  # fmt: skip

    # -- commit protocol ---------------------------------------------------------------------------
    def resize(self, n: int) -> None:
        """Give every time array length ``n`` (new positions hold fill values until written)."""
        for array in self.time_arrays():
            if array.shape[0] != n:
                array.resize((n, *array.shape[1:]))

    def commit(self, n: int) -> None:
        """Declare the first ``n`` images valid."""
        self.group.attrs["committed"] = int(n)

    def repair(self) -> int:
        """Cut arrays back to the committed length after an interrupted write; returns images dropped."""
        n = self.committed
        longest = max(a.shape[0] for a in self.time_arrays())
        self.resize(n)
        return longest - n

    # -- contents ----------------------------------------------------------------------------------
    def sources(self) -> set[str]:
        n = self.committed
        return set(self.group["source"][:n].tolist()) if n else set()

    def last_time(self) -> np.datetime64 | None:
        n = self.committed
        if not n:
            return None
        return np.datetime64(int(self.group["time"][n - 1]), "us")

    def rejections(self) -> list[Rejection]:
        rej = self.group[REJECTIONS]
        columns = [rej[name][:].tolist() for name in ("source", "reason", "size", "mtime")]
        return [Rejection(s, r, int(z), float(m)) for s, r, z, m in zip(*columns)]

    def add_rejections(self, items: Iterable[Rejection]) -> None:
        items = list(items)
        if not items:
            return
        rej = self.group[REJECTIONS]
        n0 = rej["source"].shape[0]
        columns = {
            "source": np.array([r.source for r in items], dtype=object),
            "reason": np.array([r.reason for r in items], dtype=object),
            "size": np.array([r.size for r in items], dtype="int64"),
            "mtime": np.array([r.mtime for r in items], dtype="float64"),
        }
        for name, values in columns.items():
            rej[name].resize((n0 + len(items),))
            rej[name][n0:] = values


def write_images(array: zarr.Array, region: slice, values: np.ndarray) -> None:
    """Write whole images ``values`` into ``array[region]`` (a shard-aligned block). Whole shards are encoded
    by :func:`~cirrus_batch.shards.write_shards`, the rest by zarr. Every chunk is stored, even one equal to the
    fill value: zarr's per-chunk all-equal check costs more than compressing it."""
    if not write_shards(array, region, values):
        array.with_config({"write_empty_chunks": True})[region] = values


def open_dataset(url: str) -> xr.Dataset:
    """The store as an xarray Dataset of its committed images (lazy, dask-backed)."""
    store = Store.open(url, mode="r")
    ds = xr.open_zarr(url, consolidated=False, zarr_format=3)
    return ds.isel(time=slice(0, store.committed))


def open_rejections(url: str) -> xr.Dataset:
    """The rejection log: ``source``, ``reason``, ``size``, ``mtime`` along dimension ``rejection``."""
    Store.open(url, mode="r")
    return xr.open_zarr(url, group=REJECTIONS, consolidated=False, zarr_format=3).load()
