"""``cirrus export``: a store, or part of it, for other tools: per-image variables to CSV, any subset to NetCDF.

The NetCDF file is NetCDF-4 (HDF5) with zlib compression, one image per HDF5 chunk, and the store's CF
attributes (``cloud_prob`` stays packed with ``scale_factor``/``_FillValue``, as int16: CF packs into signed
types; float16 arrays, which netCDF has not, become float32); nested attributes are JSON strings there as in the store, except the store's
list of removals (``history``), which becomes ``removals``: CF's ``history`` is a line of text, here the export. The CSV has one row per image (``time``, ``night`` and the chosen
``(time)`` variables), values decoded (``p_cloudy`` as a probability, NaN as an empty cell).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import xarray as xr

from cirrus_batch.errors import CirrusError
from cirrus_batch.remove import parse_time
from cirrus_batch.store import open_dataset

FORMATS = (".nc", ".csv")
COMPLEVEL = 4
"""zlib level of the NetCDF variables (level 4: about the size of level 9, at a third of its time)."""
_TYPED_ATTRS = ("valid_min", "valid_max", "valid_range", "flag_values", "flag_masks")
"""Attributes CF wants in the type of their variable's stored values (zarr keeps them as JSON numbers)."""


@dataclass(frozen=True)
class ExportReport:
    """What one export wrote."""

    path: Path
    images: int
    variables: list[str]


def select(store_url: str, variables: Sequence[str] = (), times: Sequence[str] = ()) -> xr.Dataset:
    """The store's Dataset cut to ``variables`` (default: all but prepare's binned copies of images, the networks'
    inputs) and to the images in any of ``times`` (a DATE-OBS to the precision given, or a range ``T1/T2``;
    default: all)."""
    ds = open_dataset(store_url)
    if not variables:
        variables = sorted((name for name in ds.data_vars if "bin" not in ds[name].attrs),
                           key=lambda name: (name != "source", name))  # fmt: skip
    else:
        unknown = [v for v in variables if v not in ds.data_vars]
        if unknown:
            raise CirrusError(f"{store_url} has no variable {', '.join(unknown)}; "
                              f"it has {', '.join(sorted(ds.data_vars))}")
    ds = ds[list(variables)]
    if times:
        t = ds["time"].values.astype("datetime64[us]").astype(np.int64)
        keep = np.zeros(len(t), dtype=bool)
        for text in times:
            lo, hi = parse_time(text)
            keep |= (t >= lo) & (t <= hi)
        ds = ds.isel(time=np.flatnonzero(keep))
    return ds


def per_image(ds: xr.Dataset) -> list[str]:
    """The variables of ``ds`` with one value per image (dimensions ``(time,)``)."""
    return [name for name, var in ds.data_vars.items() if var.dims == ("time",)]


def to_csv(ds: xr.Dataset, path: str | Path) -> None:
    """One row per image: ``time``, ``night`` and every per-image variable of ``ds`` (others refused)."""
    other = [name for name, var in ds.data_vars.items() if var.dims != ("time",)]
    if other:
        raise CirrusError(f"CSV holds per-image variables; {', '.join(other)} are images or maps: choose "
                          f"--vars among {', '.join(per_image(ds)) or 'none'}, or export to .nc")  # fmt: skip
    frame = ds.reset_coords().to_dataframe()
    frame.index = frame.index.strftime("%Y-%m-%dT%H:%M:%S.%f")
    frame["night"] = frame["night"].dt.strftime("%Y-%m-%d")
    frame[["night", *per_image(ds)]].to_csv(path, index_label="time")


def to_netcdf(ds: xr.Dataset, path: str | Path, complevel: int = COMPLEVEL) -> None:
    """``ds`` as a compressed NetCDF-4 file: zlib per variable, image variables chunked one image per chunk."""
    ds = ds.copy()
    encoding = {}
    for name, var in ds.variables.items():
        stored = np.dtype(var.encoding.get("dtype", var.dtype))
        if stored == np.float16:  # not a netCDF type
            stored = var.encoding["dtype"] = np.dtype(np.float32)
        elif stored.kind == "u" and "scale_factor" in var.encoding:  # CF packs into signed types only
            stored = var.encoding["dtype"] = np.dtype(f"i{2 * stored.itemsize}")
        for key in _TYPED_ATTRS:
            if key in var.attrs and stored.kind in "iuf":
                var.attrs[key] = np.asarray(var.attrs[key], dtype=stored)
        kept = {k: v for k, v in var.encoding.items() if k in ("dtype", "scale_factor", "add_offset", "_FillValue",
                                                                  "units", "calendar")}  # fmt: skip
        var.encoding = kept
        if name in ds.data_vars and var.dtype != object:
            enc = {**kept, "zlib": True, "complevel": complevel}  # replaces var.encoding
            if var.ndim == 3:
                enc["chunksizes"] = (1, *var.shape[1:])
            encoding[name] = enc
    ds.to_netcdf(path, format="NETCDF4", engine="netcdf4", encoding=encoding)


def export(store_url: str, out: str | Path, variables: Sequence[str] = (), times: Sequence[str] = ()) -> ExportReport:
    """Write the chosen part of the store to ``out``: ``.nc`` (any variables) or ``.csv`` (per-image ones; by
    default all of them)."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise CirrusError(f"cannot tell the format of {out}: name it .nc (NetCDF) or .csv (per-image table)")
    ds = select(store_url, variables, times)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    removals = ds.attrs.pop("history", None)  # the store's JSON list of removals; CF's history is lines of text
    ds.attrs.update({"history": f"{when}: cirrus export {store_url} {out} ({ds.sizes['time']} images)",
                     **({"removals": removals} if removals else {})})
    if out.suffix == ".csv":
        ds = ds if variables else ds[per_image(ds)]
        to_csv(ds, out)
    else:
        to_netcdf(ds, out)
    return ExportReport(out, ds.sizes["time"], list(ds.data_vars))
