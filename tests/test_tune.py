"""Hyperparameter search: trials on both local workers with MLflow parent/nested runs and the best model
registered, a failing and pruned trials, resume after kill -9 of `cirrus tune`, a PostgreSQL storage, and clear
configuration errors. Every study is a handful of 2-3 epoch trials of a tiny U-Net on a 96x120 store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from pg import Unavailable, postgres_server
from test_train import TINY

from cirrus_batch.cli import main
from cirrus_batch.config import ConfigError, load_config
from cirrus_batch.tune import HEARTBEAT, counted, open_storage, task_space, tune

SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "unet.dropout": {"type": "float", "low": 0.0, "high": 0.3}}  # fmt: skip


def job(tmp: Path, **overrides):
    """TINY training, a random-sampled study of 4 trials without pruning, files under ``tmp``."""
    return load_config(overrides={
        **TINY, "train.tracking_uri": f"sqlite:///{tmp}/mlflow.db", "train.checkpoint_dir": str(tmp / "ckpt"),
        "tune.storage": f"sqlite:///{tmp}/optuna.db", "tune.trials": 4, "tune.sampler": "random",
        "tune.pruner": "none", "tune.retrain_best": False, "tune.space": SPACE, **overrides})  # fmt: skip


def runs(tracking_uri: str) -> list:
    ml = MlflowClient(tracking_uri)
    return ml.search_runs([ml.get_experiment_by_name("cirrus").experiment_id])


def test_two_workers_run_trials_recorded_in_mlflow_and_best_retrained(store, client, tmp_path):
    cfg = job(tmp_path, **{"tune.retrain_best": True})
    result = tune(store, "segment", cfg.train, cfg.tune, client, progress=False)
    assert result.ran == 4 and counted(result.trials) == 4
    assert [t.state for t in result.trials] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["worker"] for t in result.trials}) == 2  # both workers ran trials
    assert all(t.user_attrs["epochs"] == 2 and len(t.intermediate_values) == 2 for t in result.trials)

    ml = MlflowClient(cfg.train.tracking_uri)
    by_name = {r.info.run_name: r for r in runs(cfg.train.tracking_uri)}
    parent = by_name[f"study-{result.study_name}"]
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    best = result.best
    retrained = by_name[f"best-trial-{best.number}"]
    for run in [by_name[f"trial-{t.number}"] for t in result.trials] + [retrained]:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    trial = by_name[f"trial-{best.number}"]
    assert trial.info.run_id == best.user_attrs["mlflow_run_id"]
    assert float(trial.data.params["lr"]) == pytest.approx(best.params["lr"])
    assert len(ml.get_metric_history(trial.info.run_id, "val/iou")) == 2
    assert parent.data.metrics["n_complete"] == 4 and parent.data.metrics["best_value"] == pytest.approx(best.value)
    artifacts = {a.path for a in ml.list_artifacts(parent.info.run_id)} | {
        a.path for a in ml.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png", "optuna/intermediate_values.png",
            "best_params.json", "search_space.json", "trials.json"} <= artifacts  # fmt: skip
    # the best configuration retrained (full epochs) and registered, tagged with its trial
    assert result.model_run_id == retrained.info.run_id and retrained.data.tags["best_trial"] == str(best.number)
    assert float(retrained.data.params["lr"]) == pytest.approx(best.params["lr"])
    assert ml.get_model_version("cirrus-unet", result.registered_version).run_id == retrained.info.run_id
    # compared with the champion like any new version (the first one becomes it)
    assert "first champion" in result.promotion and parent.data.tags.get("promotion", "") in ("", result.promotion)

    again = tune(store, "segment", cfg.train, cfg.tune, client, progress=False)  # the study is complete
    assert again.ran == 0 and again.parent_run_id == result.parent_run_id
    assert again.registered_version == result.registered_version  # not retrained nor registered twice


def test_failing_trial_and_pruning(store, client, tmp_path):
    space = {"pos_weight": {"type": "categorical", "choices": [1.0, 50.0]},
             "sampling.n_images": {"type": "categorical", "choices": [100, 1]}}  # fmt: skip
    cfg = job(tmp_path, **{"train.epochs": 3, "tune.trials": 5, "tune.metric": "val_loss", "tune.space": space,
                           "tune.pruner": "median", "tune.n_startup_trials": 1, "tune.n_warmup_steps": 0})  # fmt: skip
    study = optuna.create_study(study_name="cirrus-segment", storage=cfg.tune.storage)
    # two good trials first (they finish together on the two workers), then two whose validation loss is far
    # worse from the first epoch (cloud pixels weigh 50x), then one that cannot split one image into three sets
    for pos_weight, n_images in ((1.0, 100), (1.0, 100), (50.0, 100), (50.0, 100), (1.0, 1)):
        study.enqueue_trial({"pos_weight": pos_weight, "sampling.n_images": n_images})
    for key, value in (("task", "segment"), ("metric", "val_loss")):
        study.set_user_attr(key, value)
    result = tune(store, "segment", cfg.train, cfg.tune, client, progress=False)
    states = [t.state for t in result.trials]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 2 + [TrialState.FAIL], states
    for t in result.trials[2:4]:  # stopped after their first epoch, not 3
        assert t.user_attrs["epochs"] == 1 and list(t.intermediate_values) == [1]
    assert "cannot split" in result.trials[4].user_attrs["error"]
    assert counted(result.trials) == 5 and result.best.number in (0, 1)
    assert result.best.value == pytest.approx(min(result.trials[0].intermediate_values.values()))
    by_name = {r.info.run_name: r for r in runs(cfg.train.tracking_uri)}
    assert by_name["trial-2"].info.status == "KILLED" and by_name["trial-2"].data.tags["pruned"] == "true"
    # --no-retrain: the best trial's own model is registered
    assert result.model_run_id == result.best.user_attrs["mlflow_run_id"]
    version = MlflowClient(cfg.train.tracking_uri).get_model_version("cirrus-unet", result.registered_version)
    assert version.run_id == result.model_run_id


TOML = """
[train]
bin = 2
batch_size = 8
epochs = 2
patience = 5
threads = 1
tracking_uri = "sqlite:///mlflow.db"
checkpoint_dir = "ckpt"
[train.sampling]
n_images = 100
min_gap_min = 0.0
val_fraction = 0.2
test_fraction = 0.2
[train.unet]
base_channels = 4
depth = 2
[tune]
storage = "journal:optuna.log"
trials = 3
sampler = "random"
pruner = "none"
heartbeat_interval = 1.0
grace_period = 3.0
retrain_best = false
[tune.space]
lr = { type = "float", low = 1e-4, high = 1e-2, log = true }
unet.dropout = { type = "float", low = 0.0, high = 0.3 }
[cluster]
n_workers = 2
"""


def test_resume_after_kill(store, tmp_path, capsys, monkeypatch):
    """`cirrus tune` killed with SIGKILL while a trial runs; run again, the study continues: the finished
    trials are kept, the orphaned ones are failed (no heartbeat) and run again, 3 trials in all."""
    monkeypatch.chdir(tmp_path)
    store = str(shutil.copytree(store, tmp_path / "s.zarr"))  # its tracking store: mlflow.db beside it
    (tmp_path / "tune.toml").write_text(TOML)
    cmd = [sys.executable, "-m", "cirrus_batch.cli", "tune", store, "--config", "tune.toml", "--no-progress"]
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    storage = open_storage("journal:" + str(tmp_path / "optuna.log"))
    deadline, before = time.monotonic() + 300, []
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if (tmp_path / "optuna.log").exists() and storage.get_all_studies():
            before = optuna.load_study(study_name="cirrus-segment", storage=storage).get_trials()
            states = {t.state for t in before}
            if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                proc.send_signal(signal.SIGKILL)
                break
    assert proc.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    finished = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}
    orphans = {t.number for t in before if t.state == TrialState.RUNNING}

    assert main(["tune", store, "--config", "tune.toml", "--no-progress"]) == 0
    out = capsys.readouterr().out
    trials = optuna.load_study(study_name="cirrus-segment", storage=storage).get_trials()
    assert counted(trials) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    assert {t.number: t.value for t in trials if t.number in finished} == finished  # nothing lost
    for n in orphans:
        assert trials[n].state == TrialState.FAIL and trials[n].user_attrs["error"].startswith("orphaned")
        (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == n]
        # same parameters (a trial killed while it was being asked has some of them only)
        assert retry.state == TrialState.COMPLETE and trials[n].params.items() <= retry.params.items()
    assert "orphaned: no heartbeat" in out and "best: trial" in out
    all_runs = runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len([r for r in all_runs if r.info.run_name == "study-cirrus-segment"]) == 1  # the same parent run
    assert not [r for r in all_runs if r.info.status == "RUNNING"]


@pytest.fixture
def postgres_url():
    try:
        with postgres_server() as url:
            yield url
    except Unavailable as exc:
        if os.geteuid() == 0 and os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL must run in CI: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")


@pytest.mark.postgres
def test_postgresql_storage_and_an_orphaned_trial(store, client, tmp_path, postgres_url):
    cfg = job(tmp_path, **{"tune.storage": postgres_url, "tune.trials": 2, "train.epochs": 1})
    study = optuna.create_study(study_name="cirrus-segment", storage=postgres_url, direction="maximize")
    for key, value in (("task", "segment"), ("metric", "val_iou")):
        study.set_user_attr(key, value)
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                        "unet.dropout": optuna.distributions.FloatDistribution(0.0, 0.3)})  # fmt: skip
    study._storage.set_trial_system_attr(orphan._trial_id, HEARTBEAT, time.time() - 600)  # its tuner died
    result = tune(store, "segment", cfg.train, cfg.tune, client, progress=False)
    trials = optuna.load_study(study_name="cirrus-segment", storage=postgres_url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    assert counted(trials) == 2 and result.ran == 2 and result.storage == postgres_url
    assert len({t.user_attrs["worker"] for t in trials[1:]}) == 2


def test_the_search_space_is_per_task(tmp_path):
    cfg = job(tmp_path, **{"tune.space": {"lr": SPACE["lr"]},
                           "tune.space_segment": {"unet.depth": {"type": "int", "low": 2, "high": 3}},
                           "tune.space_classify": {"classifier.dropout": {"type": "float", "low": 0.0, "high": 0.3}}})  # fmt: skip
    assert set(task_space(cfg.tune, "segment")) == {"lr", "unet.depth"}
    assert set(task_space(cfg.tune, "classify")) == {"lr", "classifier.dropout"}
    shipped = load_config(Path(__file__).parent.parent / "jobs" / "tune.toml").tune
    for task, other in (("segment", "classifier."), ("classify", "unet.")):  # the shipped study runs for both
        assert not any(k.startswith(other) for k in task_space(shipped, task))


def test_configuration_errors(store, client, tmp_path):
    def run(**overrides):
        cfg = job(tmp_path, **overrides)
        return tune(store, "segment", cfg.train, cfg.tune, client, progress=False)

    with pytest.raises(ConfigError, match=r"tune.space is empty"):
        run(**{"tune.space": {}})
    # a parameter of the other network is refused: it cannot change the result
    cfg = job(tmp_path)
    with pytest.raises(ConfigError, match=r"tune.space.unet.dropout: a parameter of the U-Net cannot change the "
                                          r"classifier \(--task classify\): move it to \[tune.space_segment\]"):
        tune(store, "classify", cfg.train, cfg.tune, client, progress=False)
    with pytest.raises(ConfigError, match=r"tune.space_segment.classifier.depth: a parameter of the classifier"):
        run(**{"tune.space_segment": {"classifier.depth": {"type": "int", "low": 2, "high": 3}}})
    with pytest.raises(ConfigError, match=r"tune.space.unet.width = 1: train.unet: unknown key\(s\) 'width'"):
        run(**{"tune.space": {"unet.width": {"type": "int", "low": 1, "high": 4}}})
    with pytest.raises(ConfigError, match=r"tune.space.augment.zoom = 1.5: .*zoom must be in \[0, 1\)"):
        run(**{"tune.space": {"augment.zoom": {"type": "float", "low": 0.0, "high": 1.5}}})
    with pytest.raises(ConfigError, match=r"tune.space.lr: a float parameter needs low <= high"):
        job(tmp_path, **{"tune.space": {"lr": {"type": "float", "low": 1.0, "high": 0.1}}})
    with pytest.raises(ConfigError, match=r"tune.space.lr: expected a table"):
        job(tmp_path, **{"tune.space": {"lr": 0.1}})
    with pytest.raises(ConfigError, match=r"metric must be one of"):
        job(tmp_path, **{"tune.metric": "test_iou"})
    with pytest.raises(ConfigError, match=r"in-memory database"):
        run(**{"tune.storage": "sqlite:///:memory:"})
    optuna.create_study(study_name="cirrus-segment", storage=f"sqlite:///{tmp_path}/optuna.db").set_user_attr(
        "metric", "val_loss")
    with pytest.raises(ConfigError, match=r"optimizes val_loss for None, not val_iou for segment"):
        run()
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran
