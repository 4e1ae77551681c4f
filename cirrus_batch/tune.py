"""Hyperparameter search (``cirrus tune``): one Optuna study whose trials train on the Dask workers.

The tuner (this process) asks the study for trials and keeps one in flight per worker (per GPU where workers
have GPUs): each trial is a Dask task that reopens the trial on the shared storage, trains with its parameters
(:func:`cirrus_batch.train.train`, a nested MLflow run under the study's parent run), reports every epoch's
validation metric for pruning and returns its value; the tuner tells the study the result. A trial that raises
(e.g. out of memory) is FAIL and the study goes on. The tuner writes a heartbeat for every trial it has in
flight; a RUNNING trial whose heartbeat is older than the grace period (its tuner was killed) is failed and
queued again, so running ``cirrus tune`` again continues the same study until it holds ``trials`` finished
trials. At the end the study's plots and summary go to the parent run and the best configuration is retrained
and registered (or the best trial's model registered). Design and storage choices: ``docs/tune.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
from distributed import Client, Future, get_worker, wait
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from cirrus_batch.cluster import gpu_resources
from cirrus_batch.config import ConfigError, ParamSpec, TrainConfig, TuneConfig, absolute_url, from_dict, to_dict
from cirrus_batch.data import check_store
from cirrus_batch.errors import CirrusError
from cirrus_batch.registry import promote
from cirrus_batch.tracking import resolve_tracking_uri, use_experiment
from cirrus_batch.train import REGISTERED, TASKS, TrainResult, input_spec, train

log = logging.getLogger(__name__)

HEARTBEAT = "cirrus:heartbeat"
"""Trial system attribute: the tuner's last heartbeat for a RUNNING trial (Unix time)."""
MINIMIZED = ("val_loss", "val_ece", "val_brier")
TRIAL_HEADER = ["trial", "state", "value", "epochs", "params", "worker", "note"]


@dataclass(frozen=True)
class StudySpec:
    """What a trial task needs to know about its study (sent to the workers)."""

    store: str
    task: str
    train: TrainConfig
    tune: TuneConfig
    name: str
    storage: str
    metric: str
    direction: str
    parent_run_id: str


@dataclass
class TuneResult:
    """What ``cirrus tune`` did: the study's trials, its best, and the registered model."""

    study_name: str
    task: str
    storage: str
    """The storage URL with any password hidden."""
    metric: str
    direction: str
    trials: list[FrozenTrial]
    best: FrozenTrial | None
    parent_run_id: str
    ran: int
    """Trials finished by this call (the others come from earlier runs)."""
    seconds: float
    """Time spent running trials in this call."""
    model_run_id: str | None = None
    """The MLflow run whose model was registered (the retraining, or the best trial)."""
    registered_version: str | None = None
    promotion: str = ""
    """The registered version against the champion (``registry.Promotion.summary``)."""


# -- configuration ---------------------------------------------------------------------------------------
def default_metric(task: str) -> str:
    return "val_iou" if task == "segment" else "val_f1"


def distribution(spec: ParamSpec) -> BaseDistribution:
    if spec.type == "categorical":
        return CategoricalDistribution(spec.choices)
    if spec.type == "int":
        return IntDistribution(int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
    return FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)


def trial_config(base: TrainConfig, params: dict[str, Any], **fixed: Any) -> TrainConfig:
    """``base`` with dotted-key ``params`` (``{"unet.depth": 3}``) and ``fixed`` keys set, validated."""
    data = to_dict(base)
    for dotted, value in {**params, **fixed}.items():
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                raise ConfigError(f"tune.space: {dotted!r} is not a [train] key")
        node[key] = value
    return from_dict(TrainConfig, data, "train")


OTHER_NETWORK = {"classify": ("unet", "segment"), "segment": ("classifier", "classify")}
"""Per task: the ``[train]`` table of the network it does not train, and the task that does."""


def task_space(cfg: TuneConfig, task: str) -> dict[str, ParamSpec]:
    """The search space of ``task``: ``[tune.space]`` and ``[tune.space_<task>]``; a parameter of the other
    task's network is refused (it cannot change the result, and would make half the study noise)."""
    own = cfg.space_classify if task == "classify" else cfg.space_segment
    table, other = OTHER_NETWORK[task]
    for where, space in ((f"tune.space_{task}", own), ("tune.space", cfg.space)):
        for name in space:
            if name.split(".")[0] == table:
                raise ConfigError(f"{where}.{name}: a parameter of the {'U-Net' if table == 'unet' else 'classifier'}"
                                  f" cannot change the {'classifier' if task == 'classify' else 'U-Net'} "
                                  f"(--task {task}): move it to [tune.space_{other}]")  # fmt: skip
    return {**cfg.space, **own}


def search_space(base: TrainConfig, space: dict[str, ParamSpec]) -> dict[str, BaseDistribution]:
    """Optuna distributions of ``space``; every bound and choice is checked against ``[train]`` first."""
    if not space:
        raise ConfigError("tune.space is empty: give the search space in the job config's [tune.space] "
                          "or [tune.space_TASK] (see jobs/tune.toml)")  # fmt: skip
    dists = {}
    for name, spec in space.items():
        try:
            dists[name] = distribution(spec)
        except ValueError as exc:
            raise ConfigError(f"tune.space.{name}: {exc}") from None
        extremes = spec.choices if spec.type == "categorical" else (spec.low, spec.high)
        for value in extremes:
            value = int(value) if spec.type == "int" else value
            try:
                trial_config(base, {name: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{name} = {value!r}: {exc}") from None
    return dists


def redact(url: str) -> str:
    """The storage URL without its password."""
    if url.startswith("journal:"):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not an SQLAlchemy URL: open_storage says so)
        return url


@functools.lru_cache(maxsize=8)
def open_storage(url: str) -> BaseStorage:
    """The Optuna storage at ``url`` (``journal:PATH`` or an SQLAlchemy URL), one per process and URL."""
    if ":memory:" in url or url == "sqlite://":
        raise ConfigError("tune.storage: an in-memory database cannot be shared with the Dask workers")
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # wait out write locks
        return RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # noqa: BLE001  (any failure is the trial's or the storage's, said in one line)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CirrusError(f"cannot open the Optuna storage {redact(url)}: {first}") from None


def make_pruner(cfg: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner of ``cfg``; steps are epochs done (1, 2, ...), up to ``epochs``."""
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, max_resource=epochs,
                                              reduction_factor=cfg.reduction_factor)  # fmt: skip
    return optuna.pruners.NopPruner()


def make_sampler(cfg: TuneConfig, offset: int) -> optuna.samplers.BaseSampler:
    """The sampler, seeded with ``seed + offset`` (trials already in the study) so a resumed study does not
    draw its first parameters again."""
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed + offset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=cfg.seed + offset, constant_liar=True)  # parallel trials differ


# -- one trial, on a worker ------------------------------------------------------------------------------
def _worker_config(study: StudySpec, params: dict[str, Any], name: str, **fixed: Any) -> TrainConfig:
    """Trial config on this worker: torch threads = the worker's threads unless set, own checkpoint folder."""
    threads = study.train.threads or get_worker().state.nthreads
    folder = Path(study.train.checkpoint_dir, "tune", study.name, name)
    return trial_config(study.train, params, threads=threads, checkpoint_dir=str(folder), **fixed)


def best_value(history: list[dict[str, float]], metric: str, direction: str) -> float:
    """The best finite value of ``metric`` over the epochs (NaN when there is none)."""
    values = [row[metric] for row in history if math.isfinite(row.get(metric, math.nan))]
    if not values:
        return math.nan
    return min(values) if direction == "minimize" else max(values)


def run_trial(study: StudySpec, trial_id: int, params: dict[str, Any]) -> float | None:
    """Train trial ``trial_id`` with ``params`` (a Dask task): every epoch reported for pruning; its value,
    or None when pruned."""
    optuna_study = optuna.load_study(study_name=study.name, storage=open_storage(study.storage),
                                     sampler=optuna.samplers.RandomSampler(),
                                     pruner=make_pruner(study.tune, study.train.epochs))  # fmt: skip
    trial = optuna.Trial(optuna_study, trial_id)
    trial.set_user_attr("worker", get_worker().address)
    trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
    # the retrained best is what gets registered: trials then log no model (most of a tiny trial's time)
    cfg = _worker_config(study, params, f"trial-{trial.number}", register=False,
                         log_model=not study.tune.retrain_best)  # fmt: skip

    def on_epoch(epoch: int, row: dict[str, float]) -> bool:
        if epoch == 0:
            trial.set_user_attr("mlflow_run_id", mlflow.active_run().info.run_id)
        trial.report(row[study.metric], epoch + 1)
        return trial.should_prune()

    result = train(study.store, study.task, cfg, progress=False, on_epoch=on_epoch,
                   parent_run_id=study.parent_run_id, run_name=f"trial-{trial.number}")  # fmt: skip
    trial.set_user_attr("epochs", result.epochs_run)
    if result.model_uri:
        trial.set_user_attr("model_uri", result.model_uri)
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    return None if result.pruned else best_value(result.history, study.metric, study.direction)


def retrain(study: StudySpec, params: dict[str, Any], number: int) -> TrainResult:
    """Train the configuration of trial ``number`` for the full epochs and register it (a Dask task)."""
    epochs = study.tune.retrain_epochs or study.train.epochs
    cfg = _worker_config(study, params, f"best-trial-{number}", epochs=epochs, register=True)
    return train(study.store, study.task, cfg, progress=False, parent_run_id=study.parent_run_id,
                 run_name=f"best-trial-{number}")  # fmt: skip


# -- the study, on the tuner -----------------------------------------------------------------------------
def counted(trials: list[FrozenTrial]) -> int:
    """Finished trials (COMPLETE, PRUNED, FAIL), leaving out orphans that were queued again."""
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return sum(t.state.is_finished() and t.number not in retried for t in trials)


def _fail(optuna_study: optuna.Study, study: StudySpec, trial: FrozenTrial | optuna.Trial, reason: str) -> None:
    """Fail a RUNNING trial that lost its tuner and queue it again (up to ``max_retries``); its MLflow run
    ends as KILLED. Nothing happens when the trial finished meanwhile."""
    storage = open_storage(study.storage)
    try:
        storage.set_trial_user_attr(trial._trial_id, "error", reason)
        if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            return
    except UpdateFinishedTrialError:
        return
    log.warning("trial %d failed: %s", trial.number, reason)
    retry = trial.user_attrs.get("retry", 0)
    if retry < study.tune.max_retries:
        optuna_study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retry": retry + 1})
    ml = MlflowClient(study.train.tracking_uri)
    query = (f"tags.mlflow.parentRunId = '{study.parent_run_id}' and attributes.run_name = 'trial-{trial.number}' "
             "and attributes.status = 'RUNNING'")  # fmt: skip
    for run in ml.search_runs([ml.get_experiment_by_name(study.train.experiment).experiment_id], query):
        ml.set_terminated(run.info.run_id, "KILLED")


def _fail_stale(optuna_study: optuna.Study, study: StudySpec, trials: list[FrozenTrial], own: set[int]) -> bool:
    """Fail (and queue again) RUNNING trials of other tuners without heartbeat for ``grace_period``."""
    now, changed = time.time(), False
    for t in trials:
        if t.state != TrialState.RUNNING or t.number in own:
            continue
        last = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else now)
        if now - last > study.tune.grace_period:
            _fail(optuna_study, study, t, f"orphaned: no heartbeat for {now - last:.0f} s")
            changed = True
    return changed


def _beat(storage: BaseStorage, trials: list[optuna.Trial]) -> None:
    now = time.time()
    for trial in trials:
        storage.set_trial_system_attr(trial._trial_id, HEARTBEAT, now)


def _capacity(client: Client) -> tuple[int, dict[str, float] | None]:
    """Trials to keep in flight (one per GPU, or per worker where none has a GPU) and their resources."""
    resources = gpu_resources(client)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if resources:
        return sum(int(w.get("resources", {}).get("GPU", 0)) for w in workers), resources
    return len(workers), None


def _tell(study: optuna.Study, trial: optuna.Trial, future: Future) -> None:
    try:
        value = future.result()
    except Exception as exc:  # noqa: BLE001  (any failure is the trial's or the storage's, said in one line)
        reason = (f"{type(exc).__name__}: {exc}".strip().splitlines() or ["error"])[0][:300]
        trial.set_user_attr("error", reason)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        log.warning("trial %d failed: %s", trial.number, reason)
        return
    if value is None:
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    else:
        study.tell(trial, value, skip_if_finished=True)  # NaN: FAIL
    log.info("trial %d %s: %s", trial.number, "pruned" if value is None else "finished", value)


def _run_trials(optuna_study: optuna.Study, study: StudySpec, client: Client, dists: dict[str, BaseDistribution],
                progress: bool) -> int:  # fmt: skip
    """Ask, run and tell trials until the study holds ``trials`` counted ones; returns how many ran here."""
    cfg, storage = study.tune, open_storage(study.storage)
    inflight: dict[Future, optuna.Trial] = {}
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else math.inf
    ran = 0
    trials = optuna_study.get_trials(deepcopy=False)
    bar = tqdm(total=cfg.trials, initial=min(counted(trials), cfg.trials), desc=f"study {study.name}", unit="trial",
               disable=not progress)  # fmt: skip
    try:
        while True:
            own = {t.number for t in inflight.values()}
            if _fail_stale(optuna_study, study, trials, own):
                trials = optuna_study.get_trials(deepcopy=False)
            done, states = counted(trials), Counter(t.state for t in trials)
            bar.update(min(done, cfg.trials) - bar.n)
            slots, resources = _capacity(client)
            while len(inflight) < slots and time.monotonic() < deadline and (
                    states[TrialState.WAITING] or done + states[TrialState.RUNNING] < cfg.trials):  # fmt: skip
                states[TrialState.WAITING] -= bool(states[TrialState.WAITING])
                states[TrialState.RUNNING] += 1
                trial = optuna_study.ask(dists)
                _beat(storage, [trial])
                future = client.submit(run_trial, study, trial._trial_id, trial.params, resources=resources,
                                       pure=False, key=f"trial-{study.name}-{trial.number}-{uuid.uuid4().hex[:6]}")  # fmt: skip
                inflight[future] = trial
            if not inflight and (done >= cfg.trials or time.monotonic() >= deadline):
                break
            if inflight:
                try:
                    wait(list(inflight), timeout=cfg.heartbeat_interval, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    pass
            else:  # trials of another (or a dead) tuner decide the count, or no worker yet: wait for them
                time.sleep(cfg.heartbeat_interval)
            _beat(storage, [t for f, t in inflight.items() if not f.done()])
            for future in [f for f in inflight if f.done()]:
                _tell(optuna_study, inflight.pop(future), future)
                ran += 1
            trials = optuna_study.get_trials(deepcopy=False)
    except BaseException:  # Ctrl-C, SIGINT near the walltime, a lost scheduler: a rerun redoes these at once
        for future, trial in inflight.items():
            future.cancel()
            _fail(optuna_study, study, trial, "abandoned: the tuner stopped")
        raise
    finally:
        bar.close()
    return ran


# -- MLflow ----------------------------------------------------------------------------------------------
def _parent_run(ml: MlflowClient, study: StudySpec, label: str) -> str:
    """The study's parent run (found by its tags when the study is resumed), RUNNING."""
    mlflow.set_tracking_uri(study.train.tracking_uri)
    exp_id = use_experiment(study.train.experiment)
    query = f"tags.optuna_study = '{study.name}' and tags.optuna_storage = '{label}'"
    found = ml.search_runs([exp_id], query, max_results=1)
    if found:
        ml.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = ml.create_run(exp_id, run_name=f"study-{study.name}",
                        tags={"optuna_study": study.name, "optuna_storage": label, "task": study.task})  # fmt: skip
    tune = {k: v for k, v in to_dict(study.tune).items() if not k.startswith("space")}
    params = {"task": study.task, "store": study.store, "metric": study.metric, "direction": study.direction,
              **{f"tune.{k}": v for k, v in tune.items() if k not in ("storage", "trials", "timeout")}}  # fmt: skip
    ml.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    ml.log_dict(run.info.run_id, {k: to_dict(v) for k, v in task_space(study.tune, study.task).items()},
                "search_space.json")  # fmt: skip
    ml.log_dict(run.info.run_id, to_dict(study.train), "train_config.json")
    return run.info.run_id


def _study_plots(optuna_study: optuna.Study, folder: Path) -> None:
    """Optimization history, intermediate values and parameter importances as PNGs (those that can be drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    for name in ("optimization_history", "intermediate_values", "param_importances"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            try:
                ax = getattr(ovm, f"plot_{name}")(optuna_study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need 2 completed trials
                log.info("no %s plot: %s", name, exc)
                continue
        fig = ax.figure
        fig.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


def trial_rows(trials: list[FrozenTrial]) -> list[list[Any]]:
    """One table row per trial (see ``TRIAL_HEADER``)."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = []
    for t in trials:
        a = t.user_attrs
        note = a.get("error", f"retry of {a['retry_of']}" if "retry_of" in a else "")
        rows.append([t.number, t.state.name, "-" if t.value is None else f"{t.value:.4f}", a.get("epochs", "-"),
                     " ".join(f"{k}={fmt(v)}" for k, v in t.params.items()), a.get("host", "-"), note[:60]])  # fmt: skip
    return rows


def _summarize(ml: MlflowClient, optuna_study: optuna.Study, parent: str, trials: list[FrozenTrial],
               best: FrozenTrial | None) -> None:  # fmt: skip
    states = Counter(t.state.name.lower() for t in trials)
    metrics = {f"n_{s}": float(states[s]) for s in ("complete", "pruned", "fail")}
    metrics["n_trials"] = float(counted(trials))
    if best is not None:
        metrics["best_value"] = best.value
        ml.set_tag(parent, "best_trial", str(best.number))
        ml.log_dict(parent, {"number": best.number, "value": best.value, "params": best.params}, "best_params.json")
    for k, v in metrics.items():
        ml.log_metric(parent, k, v)
    rows = [dict(zip(TRIAL_HEADER, row)) for row in trial_rows(trials)]
    ml.log_dict(parent, rows, "trials.json")
    with tempfile.TemporaryDirectory() as tmp:
        _study_plots(optuna_study, Path(tmp))
        ml.log_artifacts(parent, tmp, "optuna")


def _register_best(ml: MlflowClient, client: Client, study: StudySpec, best: FrozenTrial) -> tuple[str, str, str]:
    """Retrain and register the best configuration, or register the best trial's model; then compare it with
    the champion like any new version (``registry.promote``, when ``[train] promote``); (run id, version,
    promotion line). Done once per best trial: a rerun with the same best trial reuses the registered version."""
    tags = ml.get_run(study.parent_run_id).data.tags
    if tags.get("registered_trial") == str(best.number):
        return tags["model_run_id"], tags["registered_version"], tags.get("promotion", "")
    name = REGISTERED[study.task]
    if study.tune.retrain_best:
        log.info("retraining the best configuration (trial %d) on the cluster", best.number)
        future = client.submit(retrain, study, best.params, best.number, resources=gpu_resources(client), pure=False,
                               key=f"retrain-{study.name}-{best.number}-{uuid.uuid4().hex[:6]}")  # fmt: skip
        result = future.result()
        run_id, version = result.run_id, str(result.registered_version)
        promotion = result.promotion or ""
    else:
        mlflow.set_tracking_uri(study.train.tracking_uri)
        model = mlflow.register_model(best.user_attrs["model_uri"], name)
        run_id, version = best.user_attrs["mlflow_run_id"], str(model.version)
        promotion = (promote(study.train.tracking_uri, name, version, study.store).summary if study.train.promote
                     else "not promoted ([train] promote = false): `cirrus promote` compares it with the champion")  # fmt: skip
    ml.set_tag(run_id, "best_trial", str(best.number))
    for key, value in (("registered_trial", best.number), ("model_run_id", run_id), ("registered_version", version),
                       ("promotion", promotion)):  # fmt: skip
        ml.set_tag(study.parent_run_id, key, str(value))
    return run_id, version, promotion


# -- entry point -----------------------------------------------------------------------------------------
def _open_study(study: StudySpec, label: str) -> optuna.Study:
    """Create the study, or load it (checking it optimizes the same metric for the same task)."""
    storage = open_storage(study.storage)
    try:
        existing = optuna.load_study(study_name=study.name, storage=storage)
    except KeyError:
        existing = None
    offset = len(existing.trials) if existing else 0
    optuna_study = optuna.create_study(study_name=study.name, storage=storage, direction=study.direction,
                                       sampler=make_sampler(study.tune, offset), load_if_exists=True)  # fmt: skip
    attrs = optuna_study.user_attrs
    if existing is None:
        for key, value in (("task", study.task), ("metric", study.metric), ("store", study.store)):
            optuna_study.set_user_attr(key, value)
    elif (attrs.get("task"), attrs.get("metric")) != (study.task, study.metric):
        raise ConfigError(f"study {study.name!r} in {label} optimizes {attrs.get('metric')} for "
                          f"{attrs.get('task')}, not {study.metric} for {study.task}: choose another --study name")  # fmt: skip
    return optuna_study


def tune(store_url: str, task: str, train_cfg: TrainConfig, tune_cfg: TuneConfig, client: Client,
         progress: bool = True) -> TuneResult:  # fmt: skip
    """Run (or continue) the study of ``task`` on the prepared store until it holds ``tune_cfg.trials``
    finished trials, on the workers of ``client``; then summarize it in MLflow and register the best model."""
    if task not in TASKS:
        raise CirrusError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    store_url = store_url if "://" in store_url else os.path.abspath(store_url)
    check_store(store_url, input_spec(task, train_cfg))
    dists = search_space(train_cfg, task_space(tune_cfg, task))
    metric = tune_cfg.metric or default_metric(task)
    train_cfg = dataclasses.replace(train_cfg, tracking_uri=resolve_tracking_uri(train_cfg.tracking_uri, store_url),
                                    checkpoint_dir=os.path.abspath(train_cfg.checkpoint_dir))  # fmt: skip
    storage_url = absolute_url(tune_cfg.storage)
    label = redact(storage_url)
    study = StudySpec(store_url, task, train_cfg, tune_cfg, tune_cfg.study_name or f"cirrus-{task}", storage_url, metric,
                  "minimize" if metric in MINIMIZED else "maximize", "")  # fmt: skip
    optuna_study = _open_study(study, label)
    ml = MlflowClient(train_cfg.tracking_uri)
    study = dataclasses.replace(study, parent_run_id=_parent_run(ml, study, label))
    log.info("study %s in %s: %s %s, MLflow parent run %s", study.name, label, study.direction, metric,
             study.parent_run_id)  # fmt: skip
    status = "KILLED"
    try:
        t0 = time.perf_counter()
        ran = _run_trials(optuna_study, study, client, dists, progress)
        seconds = time.perf_counter() - t0
        trials = optuna_study.get_trials()
        best = optuna_study.best_trial if any(t.state == TrialState.COMPLETE for t in trials) else None
        _summarize(ml, optuna_study, study.parent_run_id, trials, best)
        result = TuneResult(study.name, task, label, metric, study.direction, trials, best, study.parent_run_id, ran, seconds)
        if best is not None:
            result.model_run_id, result.registered_version, result.promotion = _register_best(ml, client, study, best)
        status = "FINISHED"
        return result
    finally:
        ml.set_terminated(study.parent_run_id, status)


def best_summary(result: TuneResult) -> str:
    """One line on the best trial and the registered model."""
    best = result.best
    if best is None:
        return f"study {result.study_name}: no trial completed (all failed or were pruned)"
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    return (f"best: trial {best.number}, {result.metric} {best.value:.4f} ({params}); registered as "
            f"{REGISTERED[result.task]} version {result.registered_version} (MLflow run {result.model_run_id}; "
            f"study parent run {result.parent_run_id})" + (f"\n{result.promotion}" if result.promotion else ""))


__all__ = ["StudySpec", "TuneResult", "best_summary", "counted", "open_storage", "run_trial",
           "search_space", "task_space", "trial_config", "trial_rows", "tune"]
