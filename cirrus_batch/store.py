"""The zarr v3 image store: schema, creation, the commit protocol, the rejection log and the history.

One store holds one camera archive (schema in ``docs/store.md``). Every array whose first dimension is
``time`` grows together. Writers first resize those arrays, write shard-aligned regions, then advance
the root attribute ``committed``; only the first ``committed`` images are valid. A writer killed in
the middle leaves arrays longer than ``committed``; :meth:`Store.repair` cuts them back.

Images are stored in the order they arrived (a night that comes late is appended at the end, so no shard is
ever rewritten for it); readers see them sorted by time: :func:`open_dataset` and :func:`time_order`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from cirrus_batch.errors import StoreError
from cirrus_batch.fitsio import NODATA
from cirrus_batch.sampling import block_keys
from cirrus_batch.shards import write_shards

SCHEMA = "cirrus-store/1"
CONVENTIONS = "CF-1.10"
TIME_UNITS = "microseconds since 1970-01-01"
_TIME_ATTRS = {"units": TIME_UNITS, "calendar": "proleptic_gregorian", "standard_name": "time", "axis": "T",
               "long_name": "DATE-OBS (UTC)"}  # fmt: skip
DIGEST_ATTRS = {"long_name": "file content digest",
                "comment": "size << 32 | CRC32C of the file's bytes; 0: ingested before digests"}  # fmt: skip
HEADER_ATTRS = {"EXPTIME": {"units": "s", "long_name": "exposure time"},
                "AMBTEMP": {"units": "degC", "standard_name": "air_temperature", "long_name": "ambient temperature"},
                "DET-TEMP": {"units": "degC", "long_name": "detector temperature"}}  # fmt: skip
"""CF attributes of the header keywords whose units are known (other keys: ``long_name`` only)."""
UNPROCESSED = -1
"""``pred_model`` fill value: the image has not been reprocessed."""
PROB_SCALE = 250
"""``cloud_prob`` = round(probability × PROB_SCALE)."""
NOT_COMPUTED = 255
"""``cloud_prob`` value of pixels without a probability: not sky, image classified clear, or not processed.
(The encodings of reprocess's outputs live here so that reading a store needs neither torch nor MLflow.)"""
REJECTIONS = "rejections"
REMOVING = "removing"
"""Group holding the kept tail of an image removal until it is applied (see :meth:`Store.remove`)."""
NO_DIGEST = 0
"""``digest`` of an image ingested before content digests were recorded."""


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
                "Conventions": CONVENTIONS,
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
                "long_name": "raw detector counts (ADU)",
                "units": "1",
                "valid_max": int(NODATA) - 1,
                "comment": f"camera counts; {int(NODATA)} (above valid_max): a NaN/BLANK pixel of the file",
            },
        )
        vectors: dict[str, tuple[Any, Any, dict[str, Any]]] = {
            "time": ("int64", 0, _TIME_ATTRS),
            "source": (str, "", {"long_name": "file path relative to the archive root"}),
            "digest": ("uint64", NO_DIGEST, DIGEST_ATTRS),
        }
        for key in header_keys:
            attrs = {"long_name": f"FITS header {key}", **HEADER_ATTRS.get(key.upper(), {}), "header_key": key}
            vectors[header_var(key)] = ("float64", np.nan, attrs)
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
                        attributes: dict[str, dict[str, Any]] | None = None, *, bin: int = 1) -> None:  # fmt: skip
        """Create the missing derived arrays of length ``n``: ``images`` (time, y, x) one image per chunk in
        shards like ``raw`` (with ``bin`` > 1: images binned by it, dimensions ``y_bin{bin}``, ``x_bin{bin}``),
        ``vectors`` (time) chunked by shard; each given as ``name: (dtype, fill value)``."""
        ny, nx = (size // bin for size in self.image_shape)
        dims = ("time", "y", "x") if bin == 1 else ("time", f"y_bin{bin}", f"x_bin{bin}")
        shard, attributes = self.shard_size, attributes or {}
        for name, (dtype, fill) in images.items():
            if name not in self.group:
                self.group.create_array(
                    name, shape=(n, ny, nx), chunks=(1, ny, nx), shards=(shard, ny, nx), dtype=dtype,
                    fill_value=fill, compressors=BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),
                    dimension_names=dims, attributes=attributes.get(name),
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
        """Finish an interrupted removal, cut arrays back to the committed length after an interrupted write;
        returns the images dropped."""
        if REMOVING in self.group:
            if self.group[REMOVING].attrs.get("complete"):
                self._apply_removal()
            else:  # killed while copying: the images are untouched
                del self.group[REMOVING]
        n = self.committed
        longest = max(a.shape[0] for a in self.time_arrays())
        self.resize(n)
        return longest - n

    # -- removal -------------------------------------------------------------------------------------
    def remove(self, positions: Iterable[int], entry: dict[str, Any], why: str = "removed") -> int:
        """Remove the committed images at ``positions`` and every value of every time array at them; the
        images after the first one move down. ``entry`` goes to the history, the files to the rejection log
        with the reason ``why``. Returns the images removed.

        Crash-safe: the kept images after the first removed one are first copied to the group
        :data:`REMOVING` (then marked complete), then copied down, the arrays cut and ``committed`` lowered;
        :meth:`repair` replays an interrupted copy-down from that snapshot. Costs a copy of the store from the
        first removed image on, twice; readers meanwhile may see moving images (writers hold the lock)."""
        n = self.committed
        gone = np.unique(np.asarray(list(positions), dtype=np.int64))
        if not len(gone):
            return 0
        if gone[0] < 0 or gone[-1] >= n:
            raise StoreError(f"positions {gone.tolist()} are not all images of {self.url} (it has {n})")
        start = int(gone[0])
        keep = np.setdiff1d(np.arange(start, n), gone)
        if REMOVING in self.group:
            del self.group[REMOVING]
        snap = self.group.create_group(REMOVING)
        for array in self.time_arrays():
            tail = snap.create_array(array.basename, shape=(len(keep), *array.shape[1:]), chunks=array.chunks,
                                     shards=array.shards, dtype=array.dtype, fill_value=array.fill_value,
                                     dimension_names=array.metadata.dimension_names)  # fmt: skip
            _copy(array, keep, tail, 0)
        sizes = (self.group["digest"].get_orthogonal_selection(gone) >> np.uint64(32)).astype(np.int64)
        names = self.group["source"].get_orthogonal_selection(gone).tolist()
        rejected = [[name, why, int(size) or -1] for name, size in zip(names, sizes)]
        snap.attrs.update({"start": start, "length": n - len(gone), "entry": entry, "rejected": rejected,
                           "complete": True})  # fmt: skip
        self._apply_removal()
        return len(gone)

    def _apply_removal(self) -> None:
        snap = self.group[REMOVING]
        start, length, entry = int(snap.attrs["start"]), int(snap.attrs["length"]), dict(snap.attrs["entry"])
        for _, tail in snap.arrays():
            _copy(tail, np.arange(tail.shape[0]), self.group[tail.basename], start)
        self.commit(length)
        self.resize(length)
        if entry not in self.history():
            self.add_rejections(Rejection(str(name), str(why), int(size)) for name, why, size in snap.attrs["rejected"])
            self.add_history(entry)
        del self.group[REMOVING]

    # -- contents ----------------------------------------------------------------------------------
    def sources(self) -> set[str]:
        n = self.committed
        return set(self.group["source"][:n].tolist()) if n else set()

    def times(self) -> np.ndarray:
        """``time`` of the committed images as int64 microseconds, in store (arrival) order."""
        return np.asarray(self.group["time"][: self.committed], dtype="int64")

    def require_digest(self) -> None:
        """Give a store written before content digests its ``digest`` array (:data:`NO_DIGEST` for old images)."""
        if "digest" not in self.group:
            self.add_time_arrays(self.group["time"].shape[0], {}, {"digest": ("uint64", NO_DIGEST)},
                                 {"digest": DIGEST_ATTRS})  # fmt: skip

    def history(self) -> list[dict[str, Any]]:
        """The store's history of operations that changed images other than by appending (``cirrus remove``)."""
        return list(json_attr(self.group.attrs, "history", []))

    def add_history(self, entry: dict[str, Any]) -> None:
        set_json_attr(self.group.attrs, "history", [*self.history(), entry])

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


def binned_var(name: str, bin: int) -> str:
    """Name of prepare's copy of image ``name`` binned by ``bin`` (``residual_bin4``)."""
    return f"{name}_bin{bin}"


def json_attr(attrs: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A nested attribute (dicts, lists: stored as a JSON string, which netCDF can hold) decoded; ``default``
    when absent. One stored as JSON itself (stores written before) is returned as it is."""
    value = attrs.get(key)
    if value is None:
        return default
    return json.loads(value) if isinstance(value, str) else value


def set_json_attr(attrs: Any, key: str, value: Any) -> None:
    """Store the nested attribute ``value`` as a JSON string (read it with :func:`json_attr`)."""
    attrs[key] = json.dumps(value)


def _copy(source: zarr.Array, index: np.ndarray, dest: zarr.Array, start: int) -> None:
    """``dest[start + i] = source[index[i]]``, block by block (images one by one, as orthogonal reads of sharded
    images decode whole shards per image)."""
    step = dest.chunks[0] if dest.ndim == 1 else (dest.shards or dest.chunks)[0]
    for a in range(0, len(index), step):
        part = index[a : a + step]
        if source.ndim == 1:
            values = source.get_orthogonal_selection(part)
        else:
            values = np.stack([source[int(i)] for i in part])
        dest[start + a : start + a + len(part)] = values


def write_images(array: zarr.Array, region: slice, values: np.ndarray) -> None:
    """Write whole images ``values`` into ``array[region]`` (a shard-aligned block). Whole shards are encoded
    by :func:`~cirrus_batch.shards.write_shards`, the rest by zarr. Every chunk is stored, even one equal to the
    fill value: zarr's per-chunk all-equal check costs more than compressing it."""
    if not write_shards(array, region, values):
        array.with_config({"write_empty_chunks": True})[region] = values


def time_order(times: np.ndarray) -> np.ndarray | slice:
    """Positions that sort ``times`` (stable: equal times keep the store order); a plain slice when the store
    is already sorted, which keeps dask reads contiguous."""
    if len(times) < 2 or bool((np.diff(times) >= 0).all()):
        return slice(0, len(times))
    return np.argsort(times, kind="stable")


NIGHT_ATTRS = {"long_name": "night of the image", "comment": "date of time - 12 h (UTC), as in sampling and report"}


def open_dataset(url: str) -> xr.Dataset:
    """The store as an xarray Dataset of its committed images sorted by time (lazy, dask-backed), with the
    coordinate ``night``. Positions in it are not store positions when a night arrived late; select by ``time``
    or ``source``. Nested attributes are JSON strings (:func:`json_attr` decodes them)."""
    store = Store.open(url, mode="r")
    ds = xr.open_zarr(url, consolidated=False, zarr_format=3)
    ds = ds.isel(time=slice(0, store.committed)).isel(time=time_order(store.times()))
    for var in ds.variables.values():
        if var.dtype == np.float16:  # written as float32 by ds.to_netcdf: netCDF has no float16
            var.encoding["dtype"] = np.dtype(np.float32)
    night = xr.Variable("time", block_keys(ds["time"].values, "night").astype("datetime64[s]"), NIGHT_ATTRS)
    return ds.assign_coords(night=night)


def open_rejections(url: str) -> xr.Dataset:
    """The rejection log: ``source``, ``reason``, ``size``, ``mtime`` along dimension ``rejection``."""
    Store.open(url, mode="r")
    return xr.open_zarr(url, group=REJECTIONS, consolidated=False, zarr_format=3).load()
