"""reprocess: predictions of a tiny season written back to the store, equal to a direct model call;
resume after kill -9, increments (new night, new model version), provenance, clear errors, the CLI."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from mlflow.tracking import MlflowClient

from cirrus_batch.normalization import Normalization, normalize
from cirrus_batch.config import IngestConfig, PrepareConfig, ReprocessConfig, load_config
from cirrus_batch.data import InputSpec, store_zenith
from cirrus_batch.errors import StoreError
from cirrus_batch.ingest import ingest
from cirrus_batch.prepare import UNPREPARED, prepare
from cirrus_batch.registry import promote
from cirrus_batch.reprocess import (
    NOT_COMPUTED,
    PROB_SCALE,
    UNPROCESSED,
    ModelError,
    models_by_task,
    reprocess,  # fmt: skip
    resolve_model,
    segment,
)
from cirrus_batch.store import json_attr, open_dataset, set_json_attr
from cirrus_batch.synth import write_archive
from cirrus_batch.train import train

SHAPE = (96, 120)
SHARD = 4
TINY = {
    "train.bin": 2, "train.batch_size": 8, "train.epochs": 2, "train.threads": 1,
    "train.sampling.n_images": 100, "train.sampling.min_gap_min": 0.0, "train.sampling.val_fraction": 0.25,
    "train.sampling.test_fraction": 0.25,
    "train.classifier.base_channels": 4, "train.classifier.depth": 2,
    "train.unet.base_channels": 4, "train.unet.depth": 2,
}  # fmt: skip
CLASSIFIER, UNET = "models:/cirrus-classifier/latest", "models:/cirrus-unet/latest"
OUTPUTS = ("p_cloudy", "cloudy_pred", "cloud_prob", "cloud_fraction_pred", "pred_model")


@dataclass(frozen=True)
class Trained:
    """A prepared 4-night store (8 images a night, shards of 4) and both models trained on it."""

    root: Path
    threshold: float

    @property
    def store(self) -> Path:
        return self.root / "s.zarr"

    @property
    def tracking(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    def copy(self, dest: Path) -> str:
        """A fresh copy of the store (the models stay shared)."""
        shutil.copytree(self.store, dest / "s.zarr")
        return str(dest / "s.zarr")

    def cfg(self, **kw) -> ReprocessConfig:
        """float32 unless ``amp`` is given: :attr:`threshold` lies in a gap between float32 outputs that is
        narrower than bfloat16's error, so on CPUs with bf16 autocast would move every image across it."""
        return ReprocessConfig(**{"threshold": self.threshold, "batch_size": 3, "amp": False, **kw})


def build_trained(tmp_path_factory, client) -> Trained:
    """The store and models (the session fixture ``trained`` of conftest.py builds them once)."""
    root = tmp_path_factory.getbasetemp() / "reprocess-trained"
    if not (root / "threshold").exists():
        root.mkdir(exist_ok=True)
        write_archive(root / "archive", nights=4, per_night=8, cadence_min=10, shape=SHAPE, seed=5, progress=False)
        ingest(str(root / "archive"), str(root / "s.zarr"), client, IngestConfig(shard_size=SHARD), progress=False)
        # the models' bin: both read prepare's residual_bin2, brightness_bin2 (a test below reads the full images)
        prepare(str(root / "s.zarr"), client, PrepareConfig(fit_images=32, input_bin=2), progress=False)
        cfg = load_config(overrides={**TINY, "train.tracking_uri": f"sqlite:///{root}/mlflow.db",
                                     "train.checkpoint_dir": str(root / "ckpt")}).train  # fmt: skip
        MlflowClient(cfg.tracking_uri).create_experiment(cfg.experiment, artifact_location=str(root / "mlruns"))
        for task in ("classify", "segment"):
            train(str(root / "s.zarr"), task, cfg, progress=False)
        p = np.sort(direct(str(root / "s.zarr"), f"sqlite:///{root}/mlflow.db")[0])
        # a tiny classifier barely separates the images: split them at the widest gap between the middle ones
        i = len(p) // 4 + int(np.argmax(np.diff(p[len(p) // 4 : 3 * len(p) // 4])))
        (root / "threshold").write_text(repr(float(p[i] + p[i + 1]) / 2))
    return Trained(root, float((root / "threshold").read_text()))


def direct(store: str, tracking: str, uris: tuple[str, str] = (CLASSIFIER, UNET)) -> tuple[np.ndarray, np.ndarray]:
    """p_cloudy and the full-resolution U-Net probability of every image: the mlflow-loaded models called
    in memory on ``spec.inputs(images, zenith)`` (normalize(raw) or the prepared residual and brightness), the U-Net
    output upsampled bilinearly."""
    mlflow.set_tracking_uri(tracking)
    group = zarr.open_group(store, mode="r")
    images = {"norm": normalize(group["raw"][:],
                                      Normalization.from_attrs(json_attr(group.attrs, "prepare")["normalization"])),
              "residual": group["residual"][:], "brightness": group["brightness"][:]}  # fmt: skip
    zenith = store_zenith(group)
    out = []
    for uri in uris:
        model = mlflow.pytorch.load_model(uri)
        spec = InputSpec.from_metadata(mlflow.models.get_model_info(uri).metadata)
        with torch.no_grad():
            x = spec.inputs(np.stack([images[k] for k in spec.images], axis=1), zenith)
            out.append(torch.sigmoid(model(torch.from_numpy(x))))
    prob = F.interpolate(out[1], scale_factor=spec.bin, mode="bilinear", align_corners=False)[:, 0]
    return out[0].numpy(), prob.numpy()


def outputs(store: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(store, mode="r")
    return {name: group[name][:] for name in OUTPUTS}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in OUTPUTS:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)


def test_reprocess_writes_the_schema_and_matches_a_direct_model_call(trained, tmp_path, client, one_torch_thread):
    store = trained.copy(tmp_path)
    report = reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=trained.tracking)
    assert (report.images, report.processed, report.skipped, report.model_index) == (32, 32, 0, 0)
    assert report.classifier.label == "cirrus-classifier v1 (@champion)"  # reprocess takes the champions
    assert report.unet.label == "cirrus-unet v1 (@champion)"
    ds = open_dataset(store)
    dtypes = {"p_cloudy": np.float32, "cloudy_pred": bool, "cloud_prob": np.uint8, "cloud_fraction_pred": np.float32,
              "pred_model": np.int16}  # fmt: skip
    for name, dtype in dtypes.items():  # cloud_prob: stored as uint8, decoded to a float probability
        assert ds[name].encoding["dtype"] == dtype and ds[name].dims[0] == "time", name
    assert ds["cloud_prob"].dims == ("time", "y", "x") and ds["cloud_prob"].encoding["chunks"] == (1, *SHAPE)
    assert ds["cloud_prob"].encoding["shards"] == (SHARD, *SHAPE)
    assert (ds["pred_model"].values == 0).all()
    (entry,) = json_attr(ds["pred_model"].attrs, "models")
    assert entry["classifier"]["name"] == "cirrus-classifier" and entry["unet"]["version"] == "1"
    assert entry["unet"]["run_id"] and entry["unet"]["uri"] == "models:/cirrus-unet@champion"
    assert entry["threshold"] == trained.threshold
    assert {k: entry["unet"][k] for k in ("task", "bin", "zenith", "image")} == {  # the layout of docs/store.md
        "task": "segment", "bin": 2, "zenith": True, "image": "residual+brightness"}
    assert set(entry["classifier"]) == {"uri", "task", "run_id", "model_id", "source", "bin", "zenith", "image",
                                        "name", "version"}  # fmt: skip

    p, prob = direct(store, trained.tracking)
    np.testing.assert_allclose(ds["p_cloudy"].values, p, rtol=1e-5)
    cloudy = ds["cloudy_pred"].values
    assert report.cloudy == cloudy.sum() and 0 < cloudy.sum() < 32
    np.testing.assert_array_equal(cloudy, p >= trained.threshold)
    sky = ds["sky"].values.astype(bool)
    q = ds["cloud_prob"].values  # decoded by xarray (CF scale_factor, _FillValue)
    assert ds["cloud_prob"].dtype == np.float64 and np.nanmin(q) >= 0 and np.nanmax(q) <= 1
    assert np.isnan(q[~cloudy]).all() and np.isnan(q[:, ~sky]).all()
    np.testing.assert_array_equal(np.isnan(q), zarr.open_group(store, mode="r")["cloud_prob"][:] == NOT_COMPUTED)
    assert (ds["cloud_fraction_pred"].values[~cloudy] == 0).all()
    got = q[cloudy][:, sky]
    np.testing.assert_allclose(got, prob[cloudy][:, sky], atol=1.5 / PROB_SCALE + 1e-5)  # quantized, then upsampled
    np.testing.assert_array_equal(ds["cloud_fraction_pred"].values[cloudy], (got > 0.5).mean(axis=1, dtype=np.float32))
    fraction = (prob[cloudy][:, sky] > 0.5).mean(axis=1)
    np.testing.assert_allclose(ds["cloud_fraction_pred"].values[cloudy], fraction, atol=5e-3)


def test_binned_inputs_give_the_predictions_of_the_full_images(trained, tmp_path, client, one_torch_thread):
    """prepare's residual_bin2, brightness_bin2 (what reprocess reads for these bin-2 models) hold exactly what
    binning the full images gives: a store without them (prepared before them) gets the same predictions."""
    binned = trained.copy(tmp_path)
    assert InputSpec("segment", bin=2, image="residual+brightness").binned(zarr.open_group(binned)) == (
        "residual", "brightness")  # fmt: skip
    reprocess(binned, client, cfg=trained.cfg(threshold=1e-6), progress=False, tracking_uri=trained.tracking)
    (tmp_path / "full").mkdir()
    full = trained.copy(tmp_path / "full")
    group = zarr.open_group(full, mode="r+")
    attrs = json_attr(group.attrs, "prepare")
    del attrs["input_bin"]
    set_json_attr(group.attrs, "prepare", attrs)
    for name in ("residual_bin2", "brightness_bin2"):
        del group[name]
    reprocess(full, client, cfg=trained.cfg(threshold=1e-6), progress=False, tracking_uri=trained.tracking)
    got, expect = outputs(binned), outputs(full)
    assert got["cloudy_pred"].all()  # every image segmented
    assert_same(got, expect)


@pytest.mark.parametrize("bin", [1, 2, 4])
def test_segment_quantizes_upsamples_and_counts_sky_pixels(bin, monkeypatch):
    torch.manual_seed(0)
    shape = (37, 50)  # a remainder that binning cut off
    logits = torch.randn(3, 1, shape[0] // bin, shape[1] // bin) * 4
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    sky = torch.from_numpy((yy - 18) ** 2 + (xx - 25) ** 2 < 17**2)
    q, fraction = segment(torch.nn.Identity(), logits.numpy(), sky, bin)
    assert q.dtype == np.uint8 and q.shape == (3, *shape) and fraction.dtype == np.float32
    inside = sky.numpy()
    assert (q[:, ~inside] == NOT_COMPUTED).all() and q[:, inside].max() <= PROB_SCALE
    reference = torch.sigmoid(logits)
    if bin > 1:
        reference = F.interpolate(reference, scale_factor=bin, mode="bilinear", align_corners=False)
    reference = F.pad(reference, (0, shape[1] - reference.shape[-1], 0, shape[0] - reference.shape[-2]),
                      mode="replicate")[:, 0].numpy() * PROB_SCALE  # fmt: skip
    assert np.abs(q[:, inside] - reference[:, inside]).max() <= 1.5 + 1e-4  # codes: quantized, then upsampled
    np.testing.assert_array_equal(fraction, (q[:, inside] > PROB_SCALE // 2).mean(axis=1, dtype=np.float32))
    assert 0.05 < fraction.min() and fraction.max() < 0.95
    monkeypatch.setattr("cirrus_batch.reprocess.UPSAMPLE_DTYPE", {})  # the float path of devices without uint8
    q_float, fraction_float = segment(torch.nn.Identity(), logits.numpy(), sky, bin)
    assert np.abs(q_float.astype(int) - q).max() <= 1 and (q_float[:, ~inside] == NOT_COMPUTED).all()
    assert np.abs(q_float[:, inside] - reference[:, inside]).max() <= 1.0 + 1e-4  # rounded twice, no more
    np.testing.assert_allclose(fraction_float, fraction, atol=0.02)


def test_mixed_precision_is_recorded_and_close_to_float32(trained, tmp_path, client, one_torch_thread):
    store = trained.copy(tmp_path)
    every = {"threshold": 1e-6, "batch_size": 3}  # every image segmented in both precisions
    exact = reprocess(store, client, cfg=ReprocessConfig(amp=False, **every), progress=False,
                      tracking_uri=trained.tracking)  # fmt: skip
    fp32 = outputs(store)
    amp = reprocess(store, client, cfg=ReprocessConfig(**every), progress=False, tracking_uri=trained.tracking)
    assert (exact.model_index, amp.model_index, amp.processed) == (0, 1, 32)  # another precision: redone
    assert [e["amp"] for e in json_attr(zarr.open_group(store, mode="r")["pred_model"].attrs, "models")] == [False, True]
    got = outputs(store)
    np.testing.assert_allclose(got["p_cloudy"], fp32["p_cloudy"], atol=0.01)
    # the tiny classifier's threshold sits in a narrow gap: decisions must agree wherever float32 is clear of it
    clear_cut = np.abs(fp32["p_cloudy"] - trained.threshold) > 0.01
    np.testing.assert_array_equal(got["p_cloudy"][clear_cut] >= trained.threshold,
                                  fp32["p_cloudy"][clear_cut] >= trained.threshold)  # fmt: skip
    assert got["cloudy_pred"].all() and fp32["cloudy_pred"].all()
    steps = np.abs(got["cloud_prob"].astype(int) - fp32["cloud_prob"])
    assert np.percentile(steps, 99) <= 2 and steps.max() <= 6  # in 1/250 probability steps


def test_second_run_does_nothing_force_and_a_new_version_redo_all(trained, tmp_path, client):
    store = trained.copy(tmp_path)
    shutil.copy(trained.root / "mlflow.db", tmp_path / "mlflow.db")  # a private registry to add a version to
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=tracking)
    first = outputs(store)
    again = reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=tracking)
    assert (again.processed, again.skipped) == (0, 32)
    pinned = reprocess(store, client, "models:/cirrus-classifier/1", "models:/cirrus-unet/1", trained.cfg(),
                       progress=False, tracking_uri=tracking)  # fmt: skip
    assert pinned.processed == 0 and pinned.model_index == 0  # the same models asked for by version
    forced = reprocess(store, client, cfg=trained.cfg(), force=True, progress=False, tracking_uri=tracking)
    assert forced.processed == 32 and forced.model_index == 0
    assert_same(outputs(store), first)

    mlflow.set_tracking_uri(tracking)
    mlflow.register_model(f"runs:/{forced.unet.run_id}/model", "cirrus-unet")  # version 2, same weights
    assert reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=tracking).processed == 0
    # the same weights do not beat the champion: only forced does version 2 become it (and that is recorded)
    assert not promote(tracking, "cirrus-unet", "2").promoted
    assert promote(tracking, "cirrus-unet", "2", force=True).promoted
    assert MlflowClient(tracking).get_model_version("cirrus-unet", "2").tags["promoted_by_force"] == "true"
    newer = reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=tracking)
    assert newer.processed == 32 and newer.model_index == 1 and newer.unet.label == "cirrus-unet v2 (@champion)"
    now = outputs(store)
    assert (now["pred_model"] == 1).all()
    assert [e["unet"]["version"] for e in json_attr(zarr.open_group(store)["pred_model"].attrs, "models")] == ["1", "2"]
    assert_same({**now, "pred_model": first["pred_model"]}, first)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from distributed import Client, LocalCluster
    from cirrus_batch.config import ReprocessConfig
    from cirrus_batch.reprocess import reprocess

    def die(done):
        os.killpg(0, signal.SIGKILL)  # kill -9 of client and workers after the first finished block

    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as c, Client(c) as client:
            reprocess(sys.argv[1], client, cfg=ReprocessConfig(threshold=float(sys.argv[3]), batch_size=3, amp=False),
                      progress=False, tracking_uri=sys.argv[2], on_block=die)
    """
)


def test_kill_9_then_rerun_completes_and_matches(trained, tmp_path, client):
    store = trained.copy(tmp_path)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.Popen([sys.executable, str(script), store, trained.tracking, repr(trained.threshold)],
                            start_new_session=True)  # fmt: skip
    assert proc.wait(timeout=300) == -signal.SIGKILL
    marker = zarr.open_group(store, mode="r")["pred_model"][:]
    done = int((marker == 0).sum())
    assert SHARD <= done < 32 and set(np.unique(marker)) == {UNPROCESSED, 0}
    report = reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=trained.tracking)
    assert (report.processed, report.skipped) == (32 - done, done)
    resumed = outputs(store)
    assert (resumed["pred_model"] == 0).all() and np.isfinite(resumed["p_cloudy"]).all()
    reprocess(store, client, cfg=trained.cfg(), force=True, progress=False, tracking_uri=trained.tracking)
    assert_same(resumed, outputs(store))  # the same as one uninterrupted run


def test_new_night_processes_only_its_images(trained, tmp_path, client):
    store = trained.copy(tmp_path)
    reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=trained.tracking)
    before = outputs(store)
    write_archive(tmp_path / "new", nights=1, per_night=5, cadence_min=10, shape=SHAPE, seed=9, start="2026-01-20",
                  progress=False)  # fmt: skip
    ingest(str(tmp_path / "new"), store, client, IngestConfig(shard_size=SHARD), progress=False)  # not prepared
    marker = zarr.open_group(store, mode="r")["pred_model"][:]
    assert len(marker) == 37 and (marker[32:] == UNPROCESSED).all()
    with pytest.raises(StoreError, match="5 images .* not prepared"):  # the models read their residual
        reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=trained.tracking)
    prepare(store, client, PrepareConfig(fit_images=32, input_bin=2), progress=False)  # the new night only
    report = reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=trained.tracking)
    assert (report.images, report.processed, report.skipped) == (37, 5, 32)
    after = outputs(store)
    assert_same({k: v[:32] for k, v in after.items()}, before)
    assert (after["pred_model"] == 0).all() and np.isfinite(after["p_cloudy"]).all()


def test_runs_uris_and_models_by_task(trained, tmp_path, client):
    store = trained.copy(tmp_path)
    by_version = {task: resolve_model(uri, trained.tracking) for task, uri in (("c", CLASSIFIER), ("u", UNET))}
    runs = {k: f"runs:/{m.run_id}/model" for k, m in by_version.items()}
    assert models_by_task([runs["u"], runs["c"]], trained.tracking) == {"classify": runs["c"], "segment": runs["u"]}
    report = reprocess(store, client, runs["c"], runs["u"], trained.cfg(), progress=False,
                       tracking_uri=trained.tracking)  # fmt: skip
    assert report.processed == 32 and report.unet.name is None and report.unet.label == runs["u"]
    assert report.unet.model_id == by_version["u"].model_id and report.unet.source == by_version["u"].source


def test_a_classifier_reading_norm_beside_the_residual_unet(trained, tmp_path, client, one_torch_thread):
    """Models that read different images (older classifiers read ``norm``): reprocess builds each one's inputs."""
    store = trained.copy(tmp_path)
    cfg = load_config(overrides={**TINY, "train.image": "norm", "train.register": False,
                                 "train.tracking_uri": trained.tracking,
                                 "train.checkpoint_dir": str(tmp_path / "ckpt")}).train  # fmt: skip
    norm = train(store, "classify", cfg, progress=False).model_uri
    assert resolve_model(norm, trained.tracking).spec.image == "norm"
    assert resolve_model(UNET, trained.tracking).spec.images == ("residual", "brightness")
    p, prob = direct(store, trained.tracking, (norm, UNET))
    threshold = float(np.mean(np.sort(p)[15:17]))  # half the images cloudy
    reprocess(store, client, norm, UNET, ReprocessConfig(threshold=threshold, batch_size=3, amp=False),
              progress=False, tracking_uri=trained.tracking)  # fmt: skip
    got = outputs(store)
    np.testing.assert_allclose(got["p_cloudy"], p, rtol=1e-5)
    cloudy = got["cloudy_pred"]
    np.testing.assert_array_equal(cloudy, p >= threshold)
    sky = zarr.open_group(store, mode="r")["sky"][:].astype(bool)
    np.testing.assert_allclose(got["cloud_prob"][cloudy][:, sky] / PROB_SCALE, prob[cloudy][:, sky],
                               atol=1.5 / PROB_SCALE + 1e-5)  # fmt: skip


def test_bad_inputs_are_clear_errors(trained, tmp_path, client):
    store = trained.copy(tmp_path)
    t = trained.tracking
    with pytest.raises(ModelError, match="no model models:/nope/1 in sqlite:///"):
        reprocess(store, client, "models:/nope/1", UNET, progress=False, tracking_uri=t)
    with pytest.raises(ModelError, match="is a U-Net .* not a classifier"):
        reprocess(store, client, UNET, UNET, progress=False, tracking_uri=t)
    with pytest.raises(ModelError, match="use a version number, 'latest' or an alias"):
        resolve_model("models:/cirrus-unet/Production", t)
    with pytest.raises(ModelError, match="takes inputs of 3x48x60 but this store's 64x64 images give 3x32x32"):
        resolve_model(UNET, t, image_shape=(64, 64))
    with pytest.raises(ModelError, match="are both U-Nets"):
        models_by_task([UNET, "models:/cirrus-unet/1"], t)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/other.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("other", artifact_location=str(tmp_path / "mlruns")))
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(torch.nn.Linear(2, 1), name="model",
                                        input_example=np.zeros((2, 2), np.float32))  # fmt: skip
    with pytest.raises(ModelError, match="is not a cirrus model: .*logged by `cirrus train`"):
        resolve_model(info.model_uri, f"sqlite:///{tmp_path}/other.db")
    group = zarr.open_group(store, mode="r+")
    group["quality"][:3] = UNPREPARED
    with pytest.raises(StoreError, match="3 images of .* not prepared .*clear-sky residual.*run `cirrus prepare"):
        reprocess(store, client, progress=False, tracking_uri=t)
    del group.attrs["prepare"]
    with pytest.raises(StoreError, match="not prepared .*run `cirrus prepare"):
        reprocess(store, client, progress=False, tracking_uri=t)
    assert "p_cloudy" not in zarr.open_group(store, mode="r")  # nothing written before the checks


def test_cli_reprocess(trained, tmp_path):
    store = trained.copy(tmp_path)
    config = tmp_path / "job.toml"
    config.write_text(f"[reprocess]\nthreshold = {trained.threshold!r}\nbatch_size = 4\n")
    cli = [sys.executable, "-m", "cirrus_batch.cli", "reprocess", store, "--tracking-uri", trained.tracking,
           "--config", str(config), "--no-progress"]  # fmt: skip
    out = subprocess.run([*cli, "--model", UNET, "--model", CLASSIFIER], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "processed now" in out.stdout and "cirrus-unet v1" in out.stdout and "32" in out.stdout
    assert (zarr.open_group(store, mode="r")["pred_model"][:] == 0).all()
    out = subprocess.run([*cli, "--unet", "models:/nope/1"], capture_output=True, text=True, timeout=300,
                         check=False)  # fmt: skip
    assert out.returncode == 1 and out.stderr.startswith("cirrus: error: no model models:/nope/1 in sqlite:")


def test_cli_from_another_directory_uses_the_tracking_store_beside_the_store(trained, tmp_path):
    """The default tracking URI sqlite:///mlflow.db is relative to the store's folder, not to where one stands;
    a folder without one is a clear error that names it, and no empty database is created."""
    season = tmp_path / "season"
    store = trained.copy(season)
    shutil.copy(trained.root / "mlflow.db", season / "mlflow.db")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tmp_path / "job.toml"
    config.write_text(f"[reprocess]\nthreshold = {trained.threshold!r}\nbatch_size = 4\n")
    cli = [sys.executable, "-m", "cirrus_batch.cli", "reprocess", "--config", str(config), "--no-progress"]
    out = subprocess.run([*cli, store], capture_output=True, text=True, timeout=300, check=False, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert f"MLflow tracking: sqlite:///{season}/mlflow.db" in out.stdout
    assert "models:/cirrus-classifier@champion -> cirrus-classifier v1 (@champion)" in out.stdout
    assert (zarr.open_group(store, mode="r")["pred_model"][:] == 0).all() and not list(elsewhere.iterdir())
    lonely = trained.copy(tmp_path / "lonely")
    out = subprocess.run([*cli, lonely], capture_output=True, text=True, timeout=300, check=False, cwd=elsewhere)
    assert out.returncode == 1
    assert out.stderr.startswith(f"cirrus: error: no MLflow tracking store at {tmp_path / 'lonely' / 'mlflow.db'}")
    assert not (tmp_path / "lonely" / "mlflow.db").exists() and not list(elsewhere.iterdir())
    # an empty registry: the error names the tracking URI searched
    empty = f"sqlite:///{tmp_path}/empty.db"
    MlflowClient(empty).search_experiments()
    with pytest.raises(ModelError, match=f"no version of 'cirrus-unet' has the alias 'champion' in {empty}"):
        resolve_model("models:/cirrus-unet@champion", empty)
