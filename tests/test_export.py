"""The store in the ecosystem: CF decoding with xarray, the night coordinate, JSON attributes, `cirrus export`
to NetCDF (read back equal, CF-checked) and CSV, `cirrus info` as a status table and JSON."""

from __future__ import annotations

import json
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from matplotlib import pyplot as plt

from cirrus_batch import cli
from cirrus_batch.errors import CirrusError
from cirrus_batch.export import export, select, to_netcdf
from cirrus_batch.reprocess import NOT_COMPUTED, reprocess
from cirrus_batch.sampling import block_keys
from cirrus_batch.store import json_attr, open_dataset


@pytest.fixture(scope="module")
def season(trained, tmp_path_factory, client) -> str:
    """A reprocessed copy of the store."""
    store = trained.copy(tmp_path_factory.mktemp("export"))
    reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=trained.tracking)
    return store


def test_xarray_decodes_the_store_with_cf_attributes(season, tmp_path):
    ds = open_dataset(season)
    assert ds.attrs["Conventions"] == "CF-1.10"
    q = zarr.open_group(season, mode="r")["cloud_prob"][:]
    prob = ds["cloud_prob"].values
    assert prob.dtype == np.float64 and np.nanmin(prob) >= 0 and np.nanmax(prob) <= 1
    np.testing.assert_array_equal(np.isnan(prob), q == NOT_COMPUTED)
    np.testing.assert_allclose(prob[q != NOT_COMPUTED], q[q != NOT_COMPUTED] / 250)
    assert ds["raw"].dtype == np.uint16  # no _FillValue: the counts stay integers
    assert ds["cloud_fraction"].attrs["standard_name"] == "cloud_area_fraction"
    assert ds["cloud_fraction_pred"].attrs["standard_name"] == "cloud_area_fraction"
    assert (ds["exptime"].attrs["units"], ds["ambtemp"].attrs["units"]) == ("s", "degC")
    np.testing.assert_array_equal(ds["night"].values.astype("datetime64[D]"), block_keys(ds["time"].values, "night"))
    assert len(np.unique(ds["night"].values)) == 4
    assert "clear_sky" in json_attr(ds.attrs, "prepare") and json_attr(ds["pred_model"].attrs, "models")[0]["unet"]
    assert "min_sigma" in json_attr(ds["mask"].attrs, "settings")["mask"]
    ds[["cloud_fraction_pred", "p_cloudy"]].to_netcdf(tmp_path / "two.nc")  # the example: plain xarray
    with xr.open_dataset(tmp_path / "two.nc") as nc:
        np.testing.assert_array_equal(nc["p_cloudy"].values, ds["p_cloudy"].values)
        assert json_attr(nc["p_cloudy"].attrs, "settings") is None and nc.attrs["Conventions"] == "CF-1.10"
    ds.drop_vars("raw").to_netcdf(tmp_path / "all.nc")  # the whole store, float16 arrays included, plain xarray
    with xr.open_dataset(tmp_path / "all.nc") as nc:
        for name in ("residual", "brightness", "cloud_prob", "mask", "cloud_fraction_pred"):
            np.testing.assert_array_equal(nc[name].values, ds[name].values.astype(nc[name].dtype), err_msg=name)


def test_cloud_prob_plots_as_a_probability_with_the_non_sky_blank(season, tmp_path):
    ds = open_dataset(season)
    i = int(np.flatnonzero(ds["cloudy_pred"].values)[0])
    mesh = ds["cloud_prob"].isel(time=i).plot()
    shown = np.ma.getmaskarray(mesh.get_array()).ravel()
    sky = ds["sky"].values.astype(bool).ravel()
    assert 0 <= mesh.norm.vmin and mesh.norm.vmax <= 1
    assert shown[~sky].all() and not shown[sky].any()
    plt.close("all")


def test_netcdf_of_the_whole_store_reads_back_equal_and_is_cf_compliant(season, tmp_path):
    out = tmp_path / "season.nc"
    report = export(season, out)
    ds = open_dataset(season)
    binned = {name for name in ds.data_vars if "bin" in ds[name].attrs}  # prepare's copies for the networks
    assert binned == {"residual_bin2", "brightness_bin2"}  # exported only when asked for
    ds = ds.drop_vars(binned).load()
    assert report.images == ds.sizes["time"] == 32 and set(report.variables) == set(ds.data_vars)
    with xr.open_dataset(out) as nc:
        for name in ds.variables:
            np.testing.assert_array_equal(nc[name].values, ds[name].values, err_msg=name)
            if ds[name].dtype.kind in "iub" or ds[name].dtype in (np.float32, np.float64):  # float16: float32 there
                assert nc[name].dtype == ds[name].dtype, name
        assert nc["raw"].encoding["zlib"] and nc["raw"].encoding["chunksizes"] == (1, *ds["raw"].shape[1:])
        assert nc["cloud_prob"].encoding["dtype"] == np.int16  # packed: CF wants a signed type
        assert json_attr(nc.attrs, "prepare") == json_attr(ds.attrs, "prepare")
        assert nc.attrs["history"].endswith("(32 images)")
    to_netcdf(select(season), tmp_path / "plain.nc", complevel=0)
    assert out.stat().st_size < 0.7 * (tmp_path / "plain.nc").stat().st_size  # compressed

    cc = pytest.importorskip("compliance_checker.runner")
    cc.CheckSuite.load_all_available_checkers()
    passed, errors = cc.ComplianceChecker.run_checker(str(out), ["cf:1.10"], 0, "lenient",
                                                      output_filename=str(tmp_path / "cf.txt"))  # fmt: skip
    assert passed and not errors, (tmp_path / "cf.txt").read_text()  # no error (a warning: y, x have no CF axis)


def test_csv_holds_the_per_image_variables(season, tmp_path):
    out = tmp_path / "images.csv"
    report = export(season, out, times=["2026-01-06", "2026-01-07T00:00/2026-01-07T23:59"])
    ds = open_dataset(season)
    table = pd.read_csv(out, parse_dates=["time"], keep_default_na=False, na_values=[""])
    chosen = ds.sel(time=table["time"].to_numpy().astype("datetime64[ns]"))
    assert report.images == len(table) == 16 and set(chosen["night"].values.astype("datetime64[D]").astype(str)) == {
        "2026-01-06", "2026-01-07"}  # fmt: skip
    assert list(table.columns[:3]) == ["time", "night", "source"]
    assert "raw" not in table and "cloud_prob" not in table and "p_cloudy" in table
    for name in ("source", "p_cloudy", "cloudy_pred", "cloud_fraction", "cloud_fraction_pred", "exptime", "quality"):
        np.testing.assert_allclose(table[name].to_numpy(), chosen[name].values, rtol=1e-6, err_msg=name) \
            if chosen[name].dtype.kind == "f" else np.testing.assert_array_equal(table[name], chosen[name].values)


def test_subsets_and_clear_errors(season, tmp_path, capsys):
    out = tmp_path / "part.nc"
    assert cli.main(["export", season, str(out), "--vars", "cloud_prob", "p_cloudy", "--time", "2026-01-05"]) == 0
    assert "8 images" in capsys.readouterr().out
    with xr.open_dataset(out) as nc:
        assert set(nc.data_vars) == {"cloud_prob", "p_cloudy"} and nc.sizes["time"] == 8
        assert float(nc["cloud_prob"].max()) <= 1
    with pytest.raises(CirrusError, match="has no variable nope; it has .*cloud_prob"):
        export(season, tmp_path / "x.nc", ["nope"])
    with pytest.raises(CirrusError, match="CSV holds per-image variables; raw are images or maps"):
        export(season, tmp_path / "x.csv", ["raw", "p_cloudy"])
    with pytest.raises(CirrusError, match=r"name it \.nc .* or \.csv"):
        export(season, tmp_path / "x.parquet")
    with pytest.raises(CirrusError, match="--time 'soon' is not an ISO date-time"):
        export(season, tmp_path / "x.csv", times=["soon"])


def test_info_is_a_status_table_and_json(season, tmp_path, capsys):
    assert cli.main(["info", season, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {k: status[k] for k in ("images", "nights", "prepared", "reprocessed", "rejections", "removals")} == {
        "images": 32, "nights": 4, "prepared": 32, "reprocessed": 32, "rejections": 0, "removals": 0}  # fmt: skip
    (pair,) = status["models"]
    assert (pair["classifier"], pair["unet"], pair["images"]) == ("cirrus-classifier v1", "cirrus-unet v1", 32)
    assert status["stale"] == {} and status["first"].startswith("2026-01-05T")
    config = tmp_path / "job.toml"
    config.write_text("[prepare.mask]\nmin_sigma = 5.5\n")
    assert cli.main(["info", season, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"reprocessed +32 \(100%\)", out) and re.search(r"nights +4\n", out)
    assert re.search(r"stale arrays +sky, .*mask", out) and "prepare.mask.min_sigma: 4.5 -> 5.5" in out
