"""Hand-drawn masks: a tiny PNG season with WSISEG-style annotations goes ingest -> prepare --masks -> train ->
evaluate; bad masks are clear errors that leave the store as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from astropy.io import fits
from PIL import Image

from cirrus_batch.config import IngestConfig, PrepareConfig, TrainConfig, load_config
from cirrus_batch.data import StoreSamples
from cirrus_batch.errors import CirrusError
from cirrus_batch.humanmasks import CLOUD, UNLABELLED, HumanMaskConfig, confusion, scores, stem
from cirrus_batch.imagefiles import ImageFileConfig
from cirrus_batch.ingest import ingest
from cirrus_batch.prepare import evaluate_store, prepare
from cirrus_batch.store import json_attr
from cirrus_batch.synth import write_archive
from cirrus_batch.train import _loss, input_spec, train

SHAPE = (96, 120)
WSISEG = HumanMaskConfig(cloud=[255], clear=[100], unlabelled=[0])
PATTERN = r"(?P<Y>\d{4})(?P<m>\d\d)(?P<d>\d\d)T(?P<H>\d\d)(?P<M>\d\d)(?P<S>\d\d)"


def annotation(truth: np.ndarray) -> np.ndarray:
    """A WSISEG-style mask of a true mask: 255 cloud, 100 sky, 0 unlabelled on the left quarter."""
    out = np.where(truth > 0, 255, 100).astype(np.uint8)
    out[:, : truth.shape[1] // 4] = 0
    return out


@pytest.fixture(scope="module")
def season(tmp_path_factory, client):
    """A synthetic LWIR season written as 16-bit PNGs (time in the name), annotations for most frames (PNG, NPY
    and FITS), the store ingested and prepared with them."""
    tmp = tmp_path_factory.mktemp("human")
    write_archive(tmp / "fits", nights=5, per_night=8, cadence_min=10, shape=SHAPE, seed=5, progress=False)
    truth = zarr.open_group(str(tmp / "fits_truth.zarr"), mode="r")
    sources = truth["source"][:].tolist()
    pngs, masks = tmp / "png", tmp / "masks"
    pngs.mkdir()
    masks.mkdir()
    for i, src in enumerate(sources):
        name = stem(src)
        Image.fromarray(fits.getdata(tmp / "fits" / src).astype(np.uint16)).save(pngs / name, format="PNG")
        if i % 8 == 7:  # one frame a night without a human mask
            continue
        ann = annotation(truth["mask"][i])
        if i % 3 == 0:
            np.save(masks / f"{name}.npy", ann)
        elif i % 3 == 1:
            Image.fromarray(ann).save(masks / f"{name}.png")
        else:
            fits.PrimaryHDU(ann).writeto(masks / f"{name}.fits")
    store = str(tmp / "s.zarr")
    icfg = IngestConfig(shard_size=8, image_files=ImageFileConfig(time_pattern=PATTERN))
    assert ingest(str(pngs), store, client, icfg, progress=False).total == len(sources)
    pcfg = PrepareConfig(fit_images=40, human=HumanMaskConfig(source=str(masks), cloud=[255], clear=[100],
                                                              unlabelled=[0]))  # fmt: skip
    report = prepare(store, client, pcfg, progress=False)
    return {"tmp": tmp, "store": store, "truth": truth, "sources": sources, "masks": masks, "report": report}


def test_masks_are_imported_with_their_source(season):
    g = zarr.open_group(season["store"], mode="r")
    truth, n = season["truth"], len(season["sources"])
    assert season["report"].human_masks == n - n // 8
    has = g["human_mask_source"][:] != ""
    assert has.sum() == n - n // 8 and not has[7::8].any()
    assert str(g["human_mask_source"][0]).endswith(".npy") and str(g["human_mask_source"][1]).endswith(".png")
    i = 2
    expect = np.where(truth["mask"][i] > 0, CLOUD, 0)
    expect[:, : SHAPE[1] // 4] = UNLABELLED
    assert np.array_equal(g["human_mask"][i], expect)
    assert (g["human_mask"][7] == UNLABELLED).all()  # no human mask: unlabelled everywhere
    fraction = (truth["mask"][i][:, SHAPE[1] // 4 :] > 0).mean()
    assert g["human_cloud_fraction"][i] == pytest.approx(fraction)
    assert g["cloudy"][i] == (fraction > 0.05)
    assert json_attr(g.attrs, "human_masks")["cloud"] == [255]


def test_import_again_changes_nothing(season, client):
    g = zarr.open_group(season["store"], mode="r")
    before = g["human_mask"][:], g["human_mask_source"][:]
    cfg = PrepareConfig(human=HumanMaskConfig(source=str(season["masks"]), cloud=[255], clear=[100],
                                              unlabelled=[0]))  # fmt: skip
    prepare(season["store"], client, cfg, progress=False)
    assert np.array_equal(g["human_mask"][:], before[0]) and (g["human_mask_source"][:] == before[1]).all()


def snapshot(store: str) -> dict:
    g = zarr.open_group(store, mode="r")
    values = {name: np.asarray(a[:]) for name, a in g.arrays()}
    return {name: v.tobytes() if v.dtype.kind in "biuf" else v.tolist() for name, v in values.items()} | {
        "attrs": str(dict(g.attrs))}


@pytest.mark.parametrize("bad", ["shape", "not_in_store", "value"])
def test_bad_masks_are_clear_errors_and_change_nothing(season, client, tmp_path, bad):
    src = season["sources"]
    folder = tmp_path / "masks"
    folder.mkdir()
    good = annotation(season["truth"]["mask"][0])
    np.save(folder / f"{stem(src[0])}.npy", good)
    if bad == "shape":
        np.save(folder / f"{stem(src[1])}.npy", good[:-1])
        message = r"has shape \(95, 120\), the store's images \(96, 120\)"
    elif bad == "not_in_store":
        np.save(folder / "cam_19990101T000000.npy", good)
        message = "1 masks are for images not in the store.*cam_19990101T000000"
    else:
        odd = good.copy()
        odd[5, 5] = 7
        Image.fromarray(odd).save(folder / f"{stem(src[1])}.png")
        message = r"has values \[7\] that are none of cloud \[255\], clear \[100\], unlabelled \[0\]"
    before = snapshot(season["store"])
    cfg = PrepareConfig(human=HumanMaskConfig(source=str(folder), cloud=[255], clear=[100], unlabelled=[0]))
    with pytest.raises(CirrusError, match=message):
        prepare(season["store"], client, cfg, progress=False)
    assert snapshot(season["store"]) == before


def test_csv_listing_and_config_errors(season, client, tmp_path):
    ann = annotation(season["truth"]["mask"][0])
    np.save(tmp_path / "anything.npy", ann)
    (tmp_path / "list.csv").write_text(f"source,mask_path\n{stem(season['sources'][0])},anything.npy\n")
    cfg = PrepareConfig(human=HumanMaskConfig(source=str(tmp_path / "list.csv"), cloud=[255], clear=[100],
                                              unlabelled=[0]))  # fmt: skip
    assert prepare(season["store"], client, cfg, progress=False).human_masks == 1
    g = zarr.open_group(season["store"], mode="r")
    assert str(g["human_mask_source"][0]).endswith("anything.npy")
    with pytest.raises(Exception, match="in more than one of"):
        load_config(overrides={"prepare.human.cloud": [1], "prepare.human.clear": [1]})


def test_confusion_ignores_unlabelled_pixels():
    human = np.array([[[CLOUD, 0, UNLABELLED, UNLABELLED]]], np.uint8)
    s = scores(confusion(np.array([[[1, 1, 1, 0]]]), human))
    assert (s["iou"], s["accuracy"], s["precision"]) == (0.5, 0.5, 0.5)


def test_end_to_end_training_uses_the_human_masks(season, tmp_path):
    store = season["store"]
    cfg = load_config(overrides={
        "train.bin": 2, "train.batch_size": 8, "train.epochs": 2, "train.threads": 1, "train.image": "norm",
        "train.sampling.n_images": 100, "train.sampling.min_gap_min": 0.0, "train.sampling.val_fraction": 0.2,
        "train.sampling.test_fraction": 0.2, "train.unet.base_channels": 4, "train.unet.depth": 2,
        "train.masks": "human-only", "train.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "train.checkpoint_dir": str(tmp_path / "ckpt"), "train.log_model": False, "train.register": False,
    }).train  # fmt: skip
    result = train(store, "segment", cfg, progress=False, truth=store)
    g = zarr.open_group(store, mode="r")
    has = g["human_mask_source"][:] != ""
    # human-only: every image of the split has a human mask
    from cirrus_batch.train import choose_split

    split = choose_split(store, "segment", cfg)
    used = np.concatenate([split.train, split.val, split.test])
    assert has[used].all() and len(split.test)
    # the test metrics count the labelled pixels of the human masks (binned by 2), not the sky
    h = np.stack([g["human_mask"][int(p)] for p in split.test])
    labelled = (h != UNLABELLED).reshape(len(h), SHAPE[0] // 2, 2, SHAPE[1] // 2, 2).mean(axis=(2, 4)) > 0.5
    assert result.test["n"] == labelled.sum()
    # against the human masks (the store itself as --truth): where cloud_prob is given, the labelled sky pixels
    sky = g["sky"][:].reshape(SHAPE[0] // 2, 2, SHAPE[1] // 2, 2).mean(axis=(1, 3)) > 0.5
    assert result.test["truth_sky_coverage"] == pytest.approx((labelled & sky).sum() / labelled.sum())
    assert 0.3 < result.test["truth_sky_coverage"] < 0.9  # these masks label the corners too
    # the loss: unlabelled pixels have weight 0 (flipping their target changes nothing), labelled ones count
    ds = StoreSamples(store, split.test[:1], input_spec("segment", cfg), soft=True, human=True)
    x, y, w = ds[0]
    assert (w[0, :, : SHAPE[1] // 8] == 0).all() and (w[0, :, SHAPE[1] // 8 :] == 1).all()
    logits = torch.randn(1, *y.shape)
    base = _loss(logits, y[None], w[None], 1.0)
    flipped = torch.where(w[None] == 0, 1 - y[None], y[None])
    assert torch.equal(_loss(logits, flipped, w[None], 1.0), base)
    assert not torch.equal(_loss(logits, 1 - y[None], w[None], 1.0), base)
    # the astropy masks still feed the images without a human mask (human-first)
    astro = StoreSamples(store, np.flatnonzero(~has)[:1], input_spec("segment", cfg), human=True)
    assert torch.equal(astro[0][2], astro.sky[None])
    assert TrainConfig().masks == "human-first"


def test_evaluate_against_the_human_masks(season, client):
    store = season["store"]
    s = evaluate_store(store, store, client, progress=False)
    g = zarr.open_group(store, mode="r")
    has = np.flatnonzero(g["human_mask_source"][:] != "")
    direct = scores(confusion(np.stack([g["mask"][int(i)] for i in has]),
                              np.stack([g["human_mask"][int(i)] for i in has])))  # fmt: skip
    assert s["n_frames"] == len(has) and s["iou"] == pytest.approx(direct["iou"])
    assert s["accuracy"] == pytest.approx(direct["accuracy"]) and 0 <= s["label_accuracy"] <= 1
    out = subprocess.run([sys.executable, "-m", "cirrus_batch.cli", "prepare", store, "--evaluate", store,
                          "--no-progress", "--cluster", "local"], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "pixel accuracy" in out.stdout and "human masks" in out.stdout
