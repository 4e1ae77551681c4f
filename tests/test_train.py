"""Training: both tasks end to end with MLflow (sqlite and a real server), reproducibility, resume after
kill -9, and clear errors for bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cirrus_batch.config import ConfigError, IngestConfig, TrainConfig, load_config
from cirrus_batch.data import StoreSamples
from cirrus_batch.errors import CirrusError, StoreError
from cirrus_batch.ingest import ingest
from cirrus_batch.synth import write_archive
from cirrus_batch.registry import promote
from cirrus_batch.train import fit_temperature, input_spec, train, train_on_cluster, truth_scores

SHAPE = (96, 120)
TINY = {
    "train.bin": 2, "train.batch_size": 8, "train.epochs": 2, "train.patience": 5, "train.threads": 1,
    "train.sampling.n_images": 100, "train.sampling.min_gap_min": 0.0, "train.sampling.val_fraction": 0.2,
    "train.sampling.test_fraction": 0.2,
    "train.classifier.base_channels": 4, "train.classifier.depth": 2,
    "train.unet.base_channels": 4, "train.unet.depth": 2,
}  # fmt: skip


def tiny(tmp: Path, **overrides) -> TrainConfig:
    return load_config(overrides={**TINY, "train.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                                  "train.checkpoint_dir": str(tmp / "ckpt"), **overrides}).train  # fmt: skip


def truth_of(store: str) -> str:
    return str(Path(store).parent / "archive_truth.zarr")


def test_both_tasks_log_register_and_reload(store, tmp_path):
    cfg = tiny(tmp_path)
    for task, name in (("classify", "cirrus-classifier"), ("segment", "cirrus-unet")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(store, task, cfg, progress=False, truth=truth_of(store))
        assert not [w for w in caught if "integer column" in str(w.message)]  # the split table's store positions
        assert result.epochs_run == 2 and len(result.history) == 2
        assert sum(result.split_sizes.values()) > 0 and min(result.split_sizes.values()) > 0
        client = MlflowClient(cfg.tracking_uri)
        run = client.get_run(result.run_id)
        assert run.data.params["task"] == task and run.data.params["sampling.min_gap_min"] == "0.0"
        # metric names grouped by "/" (sections in the MLflow UI)
        assert {"val/loss", "val/f1", "val/iou", "val/ece", "val/ece_adaptive", "test/accuracy", "val/roc_auc",
                "test/ece_adaptive", "test_truth/iou", "test_truth/ece_adaptive", "test_labels_truth/accuracy",
                "train/loss", "train/lr", "calibration/temperature"} <= set(run.data.metrics)  # fmt: skip
        assert not any("_" in k.split("/")[0] and k.split("/")[0] not in ("test_truth", "test_labels_truth")
                       for k in run.data.metrics if k not in ("system",) and not k.startswith("system/"))  # fmt: skip
        assert len(client.get_metric_history(result.run_id, "val/loss")) == 2
        artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
            a.path for a in client.list_artifacts(result.run_id, "report")}
        assert {"split.json", "split.csv", "train_config.json", "report/learning_curves.png",
                "report/confusion_matrix.png", "report/gallery.png", "report/reliability.png"} <= artifacts  # fmt: skip
        # tags, description and the store as a dataset
        tags = run.data.tags
        assert tags["task"] == task and tags["store"] == store and tags["camera.shape"] == "96x120"
        assert tags["code_version"].startswith("0.") and float(tags["camera.radius"]) > 0
        assert tags["store.start"].startswith("2026-01-05T") and tags["store.end"].startswith("2026-01-09T")
        assert "test against" in tags["mlflow.note.content"] and "test_truth/" in tags["mlflow.note.content"]
        assert ("of the true sky" in tags["mlflow.note.content"]) == (task == "segment")
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.name == "s.zarr" and store in dataset.dataset.source and dataset.dataset.digest
        assert {t.key: t.value for t in dataset.tags}["images"] == str(sum(result.split_sizes.values()))
        split_csv = mlflow.artifacts.load_text(f"runs:/{result.run_id}/split.csv").splitlines()
        assert split_csv[0].startswith("source,time,split") and len(split_csv) == 1 + sum(result.split_sizes.values())
        assert result.registered_version == "1"
        version = client.get_model_version(name, "1")
        assert version.run_id == result.run_id
        # the version is described and tagged, and the first one becomes the champion
        assert "test" in version.description and store in version.description and version.tags["task"] == task
        assert "first champion" in version.tags["promotion"] and "first champion" in result.promotion
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
        # the registered model is the trained one: it reproduces the logged test accuracy
        mlflow.set_tracking_uri(cfg.tracking_uri)
        model = mlflow.pytorch.load_model(f"models:/{name}/1")
        info = mlflow.models.get_model_info(f"models:/{name}/1")
        # what inference needs
        assert info.metadata == {"task": task, "bin": 2, "zenith_channel": True, "image": "residual+brightness"}
        assert float(model.temperature) == pytest.approx(run.data.metrics["calibration/temperature"])
        split = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/split.json")
        test = StoreSamples(store, np.array(split["test"]), input_spec(task, cfg))
        x, y, w = (torch.stack(t) for t in zip(*[test[i] for i in range(len(test))]))
        with torch.no_grad():
            prob = torch.sigmoid(model(x)).numpy()
        accuracy = float((((prob > 0.5) == (y.numpy() > 0.5)) * w.numpy()).sum() / w.numpy().sum())
        assert accuracy == pytest.approx(result.test["accuracy"], abs=1e-6)


def test_a_unet_is_scored_against_the_truth_where_cloud_prob_is_given(store):
    """``cloud_prob`` is NaN where the store's geometry sees no sky (the rim against the housing, dead columns):
    a network right on every sky pixel scores ECE 0 whatever it outputs elsewhere, and the coverage of the true
    sky says how much of it was scored."""
    import zarr

    from cirrus_batch.data import bin_image
    from cirrus_batch.prepare import read_images, truth_index

    dataset = StoreSamples(store, np.arange(8, 24), input_spec("segment", TrainConfig()))
    group, truth = zarr.open_group(store, mode="r"), zarr.open_group(truth_of(store), mode="r")
    index = truth_index([str(s) for s in group["source"][:][dataset.positions]], truth_of(store))
    true = bin_image(read_images(truth["mask"], index).astype(np.float32), dataset.bin)[:, None]
    sky = dataset.sky.numpy() > 0.5
    true_sky = bin_image(truth["sky"][:].astype(np.float32), dataset.bin) > 0.5
    assert (true_sky & ~sky).sum() > 0 and true[:, 0][:, true_sky & ~sky].mean() > 0.3  # cloud outside ours
    prob = np.where(sky, true, 0.0).astype(np.float32)  # right where it is asked, 0 beyond
    scores = truth_scores(store, truth_of(store), dataset, prob, (true > 0.5).astype(np.float32))
    assert scores["truth_ece_adaptive"] < 1e-6 and scores["truth_iou"] == pytest.approx(1.0)
    assert scores["truth_sky_coverage"] == pytest.approx((true_sky & sky).sum() / true_sky.sum())
    assert 0.8 < scores["truth_sky_coverage"] < 1.0


def test_fit_temperature_undoes_overconfidence():
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(4000, generator=g) * 2
    y = (torch.rand(4000, generator=g) < torch.sigmoid(logit)).float()

    class ThreeTimesTooSure(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("temperature", torch.ones(()))

        def forward(self, x):
            return 3 * x[:, 0, 0, 0] / self.temperature

    loader = DataLoader(TensorDataset(logit[:, None, None, None], y, torch.ones(4000)), batch_size=500)
    assert fit_temperature(ThreeTimesTooSure(), loader, torch.device("cpu")) == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize("scale", [0.3, 5.0])
def test_fit_temperature_never_sharpens_a_separated_set(scale):
    # the model puts every validation item on its side of 0.5 (hard targets): the cross-entropy falls for ever
    # as T -> 0, so an unconstrained fit says T = 0.05; the rule keeps T >= 1 (never sharper than trained)
    class Logit(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("temperature", torch.ones(()))

        def forward(self, x):
            return scale * x[:, 0, 0, 0] / self.temperature

    z = torch.tensor([-3.0, -1.0, -0.2, 0.4, 2.0, 6.0])
    y = (z > 0).float()
    loader = DataLoader(TensorDataset(z[:, None, None, None], y, torch.ones(6)), batch_size=4)
    assert fit_temperature(Logit(), loader, torch.device("cpu")) >= 1.0
    # one item on the wrong side: the fit is free again (the weak logits are sharpened)
    y[2] = 1.0
    assert (fit_temperature(Logit(), loader, torch.device("cpu")) < 1.0) == (scale < 1.0)


def test_soft_labels_follow_the_cloud_fraction():
    from cirrus_batch.data import soft_labels

    cf = np.array([0.0, 0.02, 0.045, 0.055, 0.08, 0.5, 0.01, np.nan])
    cloudy = np.array([0, 0, 0, 1, 1, 1, 1, 1])  # the 1 % image is cloudy by a human label
    t = soft_labels(cf, cloudy, 0.05, 0.01)
    assert np.all(np.diff(t[:6]) > 0) and 0.3 < t[2] < 0.5 < t[3] < 0.7
    assert t[0] < 0.01 and t[5] > 0.99 and t[6] == 1.0 and t[7] == 1.0
    np.testing.assert_array_equal(soft_labels(cf, cloudy, 0.05, 0.0), cloudy)


def test_a_worse_retrain_does_not_move_the_champion(store, tmp_path):
    cfg = tiny(tmp_path, **{"train.epochs": 4, "train.patience": 8})
    first = train(store, "classify", cfg, progress=False)
    assert "first champion" in first.promotion
    # the same split, a learning rate that leaves the network near its random initialization
    worse = train(store, "classify", tiny(tmp_path, **{"train.lr": 1e-7, "train.epochs": 1}), progress=False)
    assert worse.registered_version == "2" and "v2 does not beat v1 on" in worse.promotion, worse.promotion
    client = MlflowClient(cfg.tracking_uri)
    assert str(client.get_model_version_by_alias("cirrus-classifier", "champion").version) == "1"
    assert "does not beat" in client.get_model_version("cirrus-classifier", "2").tags["promotion"]
    # promote says so again, and only --force moves the champion (recorded)
    assert not promote(cfg.tracking_uri, "cirrus-classifier").promoted
    forced = promote(cfg.tracking_uri, "cirrus-classifier", "2", force=True)
    assert forced.promoted and forced.images == worse.split_sizes["test"] and "forced" in forced.summary
    assert str(client.get_model_version_by_alias("cirrus-classifier", "champion").version) == "2"
    assert client.get_model_version("cirrus-classifier", "2").tags["promoted_by_force"] == "true"


def test_reproducible_on_cpu(store, tmp_path):
    a = train(store, "segment", tiny(tmp_path / "a", **{"train.register": False}), progress=False)
    b = train(store, "segment", tiny(tmp_path / "b", **{"train.register": False}), progress=False)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.test["loss"] == b.test["loss"]


def test_epoch_callback_prunes_and_runs_nest(store, tmp_path):
    cfg = tiny(tmp_path, **{"train.epochs": 3, "train.register": False})
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name="study") as parent:
        pass
    seen = []
    result = train(store, "segment", cfg, progress=False, parent_run_id=parent.info.run_id, run_name="trial-0",
                   on_epoch=lambda epoch, row: seen.append((epoch, row["val_loss"])) or epoch == 1)  # fmt: skip
    assert result.pruned and result.epochs_run == 2 and [e for e, _ in seen] == [0, 1] and not result.test
    run = MlflowClient(cfg.tracking_uri).get_run(result.run_id)
    assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.run_name == "trial-0"
    assert "test/loss" not in run.data.metrics
    with pytest.raises(CirrusError, match="stopped after epoch 1 .*--resume"):
        train(store, "segment", cfg, progress=False, should_stop=lambda: True)


def test_on_the_cluster_sigusr1_stops_the_worker_task_with_a_checkpoint(store, tmp_path, client):
    """Training as a Dask task (SLURM path): SIGUSR1 to the driver stops it after an epoch; --resume goes on."""
    cfg = tiny(tmp_path, **{"train.epochs": 40, "train.patience": 40, "train.register": False})
    checkpoint = tmp_path / "ckpt" / "segment.pt"

    def signal_after_first_epoch():
        while not checkpoint.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=signal_after_first_epoch, daemon=True).start()
    with pytest.raises(CirrusError, match=r"stopped after epoch \d+ .*--resume"):
        train_on_cluster(client, store, "segment", cfg)
    stopped = torch.load(checkpoint, weights_only=True)
    assert stopped["epoch"] < 39
    done = train_on_cluster(client, store, "segment", tiny(tmp_path, **{"train.epochs": stopped["epoch"] + 2,
                            "train.register": False, "train.log_model": False}), resume=True)  # fmt: skip
    assert done.run_id == stopped["run_id"] and done.epochs_run == stopped["epoch"] + 2
    assert done.model_uri == "" and not MlflowClient(tiny(tmp_path).tracking_uri).get_run(done.run_id).outputs.model_outputs
    with pytest.raises(CirrusError, match="register = true needs log_model"):
        train(store, "segment", tiny(tmp_path, **{"train.log_model": False}), progress=False)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from cirrus_batch import train as T
    from cirrus_batch.config import load_config
    save = T._Checkpoint.save
    def save_then_die(self, state):
        save(self, state)
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after the first epoch's checkpoint
    T._Checkpoint.save = save_then_die
    overrides = eval(sys.argv[2])
    T.train(sys.argv[1], "segment", load_config(overrides=overrides).train, progress=False)
    """
)


def test_resume_after_kill_continues_the_same_run(store, tmp_path):
    overrides = {**TINY, "train.epochs": 3, "train.register": False,
                 "train.tracking_uri": f"sqlite:///{tmp_path}/k/mlflow.db", "train.checkpoint_dir": str(tmp_path / "k")}
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), store, repr(overrides)], timeout=300)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "k" / "segment.pt", weights_only=True)
    assert state["epoch"] == 0
    resumed = train(store, "segment", load_config(overrides=overrides).train, resume=True, progress=False)
    assert resumed.run_id == state["run_id"] and resumed.epochs_run == 3
    straight = train(store, "segment", tiny(tmp_path / "s", **{"train.epochs": 3, "train.register": False}),
                     progress=False)  # fmt: skip
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in straight.history])


def test_bad_inputs_are_clear_errors(store, tmp_path, client):
    write_archive(tmp_path / "a", nights=1, per_night=3, shape=SHAPE, progress=False)
    ingest(str(tmp_path / "a"), str(tmp_path / "raw.zarr"), client, IngestConfig(), progress=False)
    with pytest.raises(StoreError, match="run `cirrus prepare"):
        train(str(tmp_path / "raw.zarr"), "segment", tiny(tmp_path), progress=False)
    with pytest.raises(CirrusError, match="cannot split"):
        train(store, "segment", tiny(tmp_path, **{"train.sampling.min_gap_min": 100000.0}), progress=False)
    with pytest.raises(CirrusError, match="unknown task"):
        train(store, "detect", tiny(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(overrides={"train.learning_rate": 0.1})
    cfg = tiny(tmp_path, **{"train.epochs": 1, "train.register": False})
    train(store, "segment", cfg, progress=False)
    other = tiny(tmp_path, **{"train.unet.base_channels": 8, "train.register": False})
    with pytest.raises(CirrusError, match="made for task 'segment' with network"):
        train(store, "segment", other, resume=True, progress=False)
    with pytest.raises(CirrusError, match="no checkpoint"):
        train(store, "classify", cfg, resume=True, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback with a SQLite backend and a local artifact store."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield url
    finally:
        import os

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_against_a_real_mlflow_server(store, tmp_path, mlflow_server):
    cfg = tiny(tmp_path, **{"train.tracking_uri": mlflow_server})
    result = train(store, "segment", cfg, progress=False)
    mlflow.set_tracking_uri(mlflow_server)
    (version,) = MlflowClient().search_model_versions("name='cirrus-unet'")
    assert version.run_id == result.run_id
    model = mlflow.pyfunc.load_model(f"models:/cirrus-unet/{version.version}")
    image = StoreSamples(store, np.array([0, 1]), input_spec("segment", cfg))[0][0][None].numpy()
    logits = np.asarray(model.predict(image))
    assert logits.shape == (1, 1, *image.shape[-2:]) and np.isfinite(logits).all()


def test_low_confidence_masks_are_left_out_of_the_split(store, tmp_path):
    import shutil

    import zarr

    from cirrus_batch.train import choose_split

    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    usable = np.flatnonzero(group["cloudy"][:] & (group["quality"][:] == 0))
    low = usable[::2]
    confidence = group["mask_confidence"][:]
    confidence[low] = 0.3
    group["mask_confidence"][:] = confidence
    cfg = load_config(overrides={"train.sampling.min_gap_min": 0.0, "train.sampling.n_images": 10_000}).train
    every = choose_split(str(copy), "segment", cfg)
    cfg.min_mask_confidence = 0.5
    kept = choose_split(str(copy), "segment", cfg)
    chosen = {int(i) for part in (kept.train, kept.val, kept.test) for i in part}
    before = {int(i) for part in (every.train, every.val, every.test) for i in part}
    assert set(low.tolist()) <= before and not chosen & set(low.tolist()) and chosen < before


def test_a_dataset_inserted_by_a_concurrent_trial_is_found_on_retry(tmp_path, monkeypatch):
    """Two trials starting together insert the same dataset row; the loser's UNIQUE error is retried."""
    import pandas as pd

    from cirrus_batch import train as train_module

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("race")  # not the experiment an earlier test left active, which this store lacks
    dataset = mlflow.data.from_pandas(pd.DataFrame({"x": [1, 2]}), source=str(tmp_path), name="s.zarr")
    real, calls = mlflow.log_input, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # what the sqlite store raises when another process inserted the row first
            raise mlflow.exceptions.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run() as run:
        train_module.log_input(dataset, {"images": "2"})
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert len(calls) == 2 and [i.dataset.name for i in inputs] == ["s.zarr"]
    monkeypatch.setattr(mlflow, "log_input", lambda *a, **k: (_ for _ in ()).throw(
        mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST")))
    with mlflow.start_run(), pytest.raises(mlflow.exceptions.MlflowException, match="RESOURCE"):
        train_module.log_input(dataset, {})  # any other error is not retried


class _RunsCode:
    """A pickle that runs code when loaded (what a writable checkpoint folder would let anyone plant)."""

    def __reduce__(self):
        return (os.system, ("touch ran-code",))


def test_resume_loads_only_tensors_and_plain_types(tmp_path, monkeypatch):
    from cirrus_batch.train import _Checkpoint

    monkeypatch.chdir(tmp_path)
    checkpoint = _Checkpoint(tmp_path, "segment")
    checkpoint.save({"epoch": 3, "model": {"w": torch.ones(2)}, "history": [{"val_loss": 0.5}], "split": None})
    state = checkpoint.load()
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    torch.save({"epoch": 3, "payload": _RunsCode()}, checkpoint.path)
    with pytest.raises(CirrusError, match="cannot read checkpoint .*segment.pt: it holds objects other than tensors"):
        checkpoint.load()
    assert not (tmp_path / "ran-code").exists()


def test_artifacts_live_beside_the_tracking_database_wherever_the_command_runs(tmp_path, monkeypatch) -> None:
    from cirrus_batch.tracking import use_experiment

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    try:
        exp_id = use_experiment("artifact-home")
        assert use_experiment("artifact-home") == exp_id  # found, not created twice
        with mlflow.start_run():
            mlflow.log_text("hello", "note.txt")
    finally:
        mlflow.set_tracking_uri(None)
    assert list(project.glob("mlartifacts/*/artifacts/note.txt")) and not (elsewhere / "mlruns").exists()


def test_loader_workers_exit_before_the_model_is_logged(store, tmp_path, monkeypatch):
    """The DataLoader worker processes (each holding its cached samples) are gone once training and testing are
    done: scoring, figures and MLflow logging run without them."""
    import multiprocessing

    import cirrus_batch.train as T

    seen = {}
    log_model = T._log_model
    before = {p.pid for p in multiprocessing.active_children()}  # e.g. the Dask workers of other tests

    def spy(*args, **kwargs):
        seen["children"] = [p.name for p in multiprocessing.active_children() if p.pid not in before]
        return log_model(*args, **kwargs)

    monkeypatch.setattr(T, "_log_model", spy)
    result = train(store, "classify", tiny(tmp_path, **{"train.num_workers": 1, "train.register": False}),
                   progress=False)  # fmt: skip
    assert result.epochs_run == 2 and seen["children"] == [], seen
