"""Settings changes are explicit: prepare names the arrays a changed setting would leave stale."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from cirrus_batch.config import PrepareConfig
from cirrus_batch.errors import ConfigError
from cirrus_batch.prepare import FITTED_VARS, prepare
from cirrus_batch.provenance import differences
from cirrus_batch.store import Store, json_attr

FIT = PrepareConfig(fit_images=40)  # the settings of the `store` fixture


def test_differences_name_dotted_keys():
    old = {"mask": {"threshold": "otsu", "bin_deg": 1.0, "center": [1, 2]}, "fit_images": 40}
    new = {"mask": {"threshold": 4.0, "bin_deg": 1.0, "center": [1, 2]}, "fit_images": 60}
    assert differences(old, new) == ["fit_images: 40 -> 60", "mask.threshold: 'otsu' -> 4.0"]
    assert differences(old, old) == [] and differences({"x": float("nan")}, {"x": float("nan")}) == []


def test_changed_mask_settings_name_the_stale_arrays_until_refit(tmp_path, store, client):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(store, url)
    changed = dataclasses.replace(FIT, mask=dataclasses.replace(FIT.mask, min_sigma=FIT.mask.min_sigma + 1))
    before = Store.open(url, mode="r").group["mask"][:]
    with pytest.raises(ConfigError, match=r"the store's sky, pixel_class, residual, brightness, mask, "
                                          r"cloud_fraction, quality, .*mask_confidence, mask_flags were made with other "
                                          r"\[prepare\] settings \(prepare.mask.min_sigma: 4.5 -> 5.5\).*--refit"):  # fmt: skip
        prepare(url, client, changed, progress=False)
    group = Store.open(url, mode="r").group
    assert (group["mask"][:] == before).all() and group["cloudy"].attrs["threshold"] == FIT.cloudy_fraction
    # the cloudy threshold alone relabels the whole season: allowed
    relabel = prepare(url, client, dataclasses.replace(FIT, cloudy_fraction=0.5), progress=False)
    assert relabel.prepared_now == 0 and Store.open(url, mode="r").group["cloudy"].attrs["threshold"] == 0.5
    rebuilt = prepare(url, client, changed, refit=True, progress=False)
    assert rebuilt.fitted and rebuilt.prepared_now == rebuilt.images
    group = Store.open(url, mode="r").group
    assert all(json_attr(group[name].attrs, "settings")["mask"]["min_sigma"] == 5.5 for name in FITTED_VARS)
    assert prepare(url, client, changed, progress=False).prepared_now == 0  # now current
