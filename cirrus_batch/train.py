"""Training of the clear/cloudy classifier and the cloud U-Net, recorded in MLflow.

One run per training: the split is chosen (non-consecutive images, whole nights per split), the network is
trained with Adam and binary cross-entropy on augmented images, validated every epoch (early stopping on the
validation loss), checkpointed every epoch (``--resume`` continues the same MLflow run after a kill), tested,
and logged with its artifacts and registered as ``cirrus-classifier`` or ``cirrus-unet``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import multiprocessing
import pickle
import signal
import socket
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn
from distributed import Client, Event
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cirrus_batch import plots
from cirrus_batch.augment import augment
from cirrus_batch.cluster import gpu_resources
from cirrus_batch.config import NetConfig, TrainConfig, to_dict
from cirrus_batch.data import InputSpec, StoreSamples, bin_image, check_store
from cirrus_batch.errors import CirrusError
from cirrus_batch.humanmasks import CLOUD, UNLABELLED, has_masks, human_positions
from cirrus_batch.masks import residual_sigmas
from cirrus_batch.metrics import MetricAccumulator, binary_metrics, confusion_matrix
from cirrus_batch.models import MEMORY_FORMAT, autocast_dtype, build_model, pick_device
from cirrus_batch.prepare import read_images, truth_index
from cirrus_batch.registry import champion_uri, code_version, describe_version, promote
from cirrus_batch.sampling import Split, make_split
from cirrus_batch.softmasks import CloudGivenResidual, fit_cloud_given_residual
from cirrus_batch.store import json_attr
from cirrus_batch.tracking import resolve_tracking_uri, use_experiment

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

REGISTERED = {"classify": "cirrus-classifier", "segment": "cirrus-unet"}
TASKS = tuple(REGISTERED)


@dataclass
class TrainResult:
    """What a training produced."""

    task: str
    run_id: str
    model_uri: str
    history: list[dict[str, float]]
    test: dict[str, float]
    epochs_run: int
    seconds: float
    registered_version: str | None = None
    split_sizes: dict[str, int] = field(default_factory=dict)
    pruned: bool = False
    temperature: float = 1.0
    promotion: str | None = None
    """What :func:`registry.promote` did with the registered version (one line)."""
    tracking_uri: str = ""


EpochCallback = Callable[[int, dict[str, float]], bool | None]

GROUPS = ("test_labels_truth", "test_truth", "test", "val", "train")


def mlflow_name(key: str) -> str:
    """The MLflow name of a metric: ``val_iou`` -> ``val/iou``, ``test_truth_ece`` -> ``test_truth/ece``,
    ``lr`` -> ``train/lr``, ``temperature`` -> ``calibration/temperature`` (the UI groups by the prefix)."""
    if key in ("lr", "temperature"):
        return f"{'train' if key == 'lr' else 'calibration'}/{key}"
    for group in GROUPS:
        if key.startswith(group + "_"):
            return f"{group}/{key.removeprefix(group + '_')}"
    return key


def _log_metrics(values: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({mlflow_name(k): float(v) for k, v in values.items() if np.isfinite(v)}, step=step)


def net_config(task: str, cfg: TrainConfig) -> NetConfig:
    return cfg.classifier if task == "classify" else cfg.unet


def input_spec(task: str, cfg: TrainConfig) -> InputSpec:
    return InputSpec(task, cfg.bin, cfg.zenith_channel, cfg.image)


def mixed_precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """The autocast dtype of the training steps (None: float32) and the gradient scaler (active for float16)."""
    dtype = autocast_dtype(device) if cfg.amp else None
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def _threads(cfg: TrainConfig) -> int:
    return cfg.threads or len(os.sched_getaffinity(0))


LOW_CONFIDENCE = 128
"""Stand-in quality flag, in the split only, of images whose mask confidence is below ``min_mask_confidence``."""


def choose_split(store_url: str, task: str, cfg: TrainConfig) -> Split:
    """The train/val/test split of good (quality 0) images for ``task`` whose masks are confident enough
    (``min_mask_confidence``); clear error when impossible."""
    group = check_store(store_url, input_spec(task, cfg)).group
    n = int(group.attrs["committed"])
    times = np.asarray(group["time"][:n], dtype="int64").astype("datetime64[us]")
    quality = group["quality"][:n].copy()
    if cfg.min_mask_confidence > 0 and "mask_confidence" in group:
        low = ~(group["mask_confidence"][:n] >= cfg.min_mask_confidence) & (quality == 0)
        quality[low] = LOW_CONFIDENCE
        log.info("%d images left out: mask confidence below %g", int(low.sum()), cfg.min_mask_confidence)
    human = human_positions(group, n)  # hand-drawn masks: [train] masks and human_test
    only = human if cfg.masks == "human-only" and task == "segment" else None
    try:
        return make_split(times, quality, group["cloudy"][:n], cfg.sampling, task,
                          np.asarray(group["source"][:n], dtype=object), score=group["cloud_fraction"][:n],
                          only=only, test=human if cfg.human_test else None)  # fmt: skip
    except ValueError as exc:
        raise CirrusError(f"cannot split {store_url} for {task}: {exc}") from None


def cloud_given_residual(store_url: str, positions: np.ndarray, cfg: TrainConfig,
                         max_images: int = 100) -> CloudGivenResidual | None:  # fmt: skip
    """``P(cloud | residual)`` (:mod:`cirrus_batch.softmasks`) fitted on the sky pixels of up to ``max_images``
    of the training images, when ``[train] residual_targets`` and ``soft_targets`` ask for it; else None."""
    if not (cfg.residual_targets and cfg.soft_targets) or cfg.masks == "human-only":
        return None
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    if "residual" not in group:
        raise CirrusError(f"{store_url} has no residual: run `cirrus prepare {store_url}` (or set [train] "
                          "residual_targets = false)")  # fmt: skip
    pick = np.asarray(positions)[np.linspace(0, len(positions) - 1, min(max_images, len(positions))).astype(int)]
    sky = group["sky"][:].astype(bool)
    z = residual_sigmas(read_images(group["residual"], np.unique(pick))[:, sky])
    try:
        return fit_cloud_given_residual(z)
    except ValueError as exc:
        log.warning("training on the masks alone: %s", exc)
        return None


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Binary cross-entropy with logits, weighted per pixel/item (0 = ignore), class-weighted by pos_weight."""
    per = F.binary_cross_entropy_with_logits(
        logits, target, reduction="none", pos_weight=torch.tensor(pos_weight, device=logits.device)
    )
    return (per * weight).sum() / weight.sum().clamp_min(1.0)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, pos_weight: float,
             keep: bool = False) -> tuple[dict[str, float], tuple[np.ndarray, ...] | None]:  # fmt: skip
    """Loss and metrics (accuracy, precision, recall, F1, IoU, ROC AUC, ECE, Brier) over a loader; with ``keep``
    also the probabilities, targets and weights of every sample (in order), from the same pass."""
    model.eval()
    acc, loss_sum, weight_sum = MetricAccumulator(), 0.0, 0.0
    kept: list[tuple[np.ndarray, ...]] = []
    with torch.no_grad():
        for x, y, w in loader:
            x, y, w = x.to(device), y.to(device), w.to(device)
            logits = model(x).float()
            loss_sum += float(_loss(logits, y, w, pos_weight)) * float(w.sum())
            weight_sum += float(w.sum())
            batch = (torch.sigmoid(logits).cpu().numpy(), y.cpu().numpy(), w.cpu().numpy())
            acc.update(*batch)
            if keep:
                kept.append(batch)
    arrays = tuple(np.concatenate(a) for a in zip(*kept)) if keep else None
    return {"loss": loss_sum / max(weight_sum, 1.0), **acc.compute()}, arrays


def fit_temperature(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Temperature T minimizing the binary cross-entropy of ``logits / T`` on ``loader`` (weighted like the
    metrics, no class weighting): temperature scaling, which calibrates without changing any decision.

    Never below 1 on a set the model separates (every item on its side of 0.5): with hard targets the
    cross-entropy there falls for ever as T -> 0, so the fit only says "sharper", which such a set cannot support
    (the demo's 41 separated validation images gave T = 0.076 and p_cloudy = 2e-25). T is in [0.05, 20]."""
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for x, y, w in loader:
            z = (model(x.to(device)).float() * model.temperature).cpu()
            keep = w > 0
            parts.append((z[keep], y[keep].float(), w[keep].float()))
    if not parts or sum(len(p[0]) for p in parts) == 0:
        return 1.0
    z, y, w = (torch.cat(t) for t in zip(*parts))
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=50, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(z / log_t.exp(), y, reduction="none") * w).sum() / w.sum()
        loss.backward()
        return loss

    optimizer.step(nll)
    temperature = float(log_t.detach().exp().clamp(0.05, 20.0))
    separated = bool(torch.all((z > 0) == (y > 0.5)))
    return max(temperature, 1.0) if separated else temperature


def _ema_update(decay: float, averaged: list[torch.Tensor], current: list[torch.Tensor],
                num_averaged: torch.Tensor) -> None:  # fmt: skip
    """Exponential moving average whose decay ramps up to ``decay`` ((1 + n) / (10 + n) after n updates), so
    that short trainings are not averaged with their random initial weights."""
    d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
    for a, c in zip(averaged, current):
        if a.is_floating_point():
            a.lerp_(c, 1.0 - d)
        else:  # BatchNorm's num_batches_tracked
            a.copy_(c)


class _Checkpoint:
    """Atomic per-epoch checkpoint of everything a resumed run needs: tensors and plain types only (loaded
    with ``weights_only=True``)."""

    def __init__(self, directory: str | Path, task: str):
        self.path = Path(directory) / f"{task}.pt"

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            raise CirrusError(f"--resume: no checkpoint at {self.path}")
        try:  # tensors and plain types only: unpickling anything else could run code planted in the file
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CirrusError(f"cannot read checkpoint {self.path}: it holds objects other than tensors and plain "
                              "types, which are not loaded (they could run code); delete it or train without "
                              "--resume") from None
        except Exception as exc:
            raise CirrusError(f"cannot read checkpoint {self.path}: {exc}") from None


def _network_id(net: NetConfig, spec: InputSpec) -> dict[str, Any]:
    return {**to_dict(net), **spec.to_metadata()}


def _restore(model: nn.Module, state: dict[str, Any], task: str, network: dict[str, Any], path: Path) -> None:
    if state.get("task") != task or state.get("net") != network:
        raise CirrusError(
            f"checkpoint {path} was made for task {state.get('task')!r} with network {state.get('net')}, not "
            f"{task!r} with {network}: delete it or train without --resume"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CirrusError(f"checkpoint {path} does not fit the network: {str(exc).splitlines()[0]}") from None


def train(store_url: str, task: str, cfg: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, truth: str | None = None, *, on_epoch: EpochCallback | None = None,
          should_stop: Callable[[], bool] | None = None, parent_run_id: str | None = None,
          run_name: str | None = None) -> TrainResult:  # fmt: skip
    """Train the network for ``task`` ("classify" or "segment") on the prepared store at ``store_url``.

    ``truth``: a true-mask store (``cirrus synth``) or a store with human masks (``prepare --masks``; this one
    too); the test images are then also scored against the true masks/labels (``truth_*`` metrics; human masks:
    the test images that have one, on their labelled pixels), and so are the training labels themselves
    (``labels_truth_*``).
    ``on_epoch(epoch, row)`` sees each epoch's metrics (``val_loss``, ``val_iou``, ...); when it returns True
    training ends there (e.g. an Optuna pruner): the MLflow run ends as KILLED, nothing is tested or logged
    as a model, and the result has ``pruned=True``. ``should_stop()`` is polled after every epoch like SIGUSR1:
    the checkpoint is kept and a :class:`CirrusError` says to resume. ``parent_run_id`` nests the MLflow run.
    """
    if task not in TASKS:
        raise CirrusError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    cfg = cfg or TrainConfig()
    cfg = dataclasses.replace(cfg, tracking_uri=resolve_tracking_uri(cfg.tracking_uri, store_url))
    store_url = store_url if "://" in store_url else os.path.abspath(store_url)  # recorded: findable from anywhere
    if cfg.register and not cfg.log_model:
        raise CirrusError("[train] register = true needs log_model = true (only a logged model can be registered)")
    t0 = time.perf_counter()
    torch.set_num_threads(_threads(cfg))
    device = pick_device()
    net = net_config(task, cfg)
    checkpoint = _Checkpoint(cfg.checkpoint_dir, task)
    state = checkpoint.load() if resume else None

    split = Split.from_json(state["split"]) if state else choose_split(store_url, task, cfg)
    spec = input_spec(task, cfg)
    evidence = cloud_given_residual(store_url, split.train, cfg) if task == "segment" else None
    sets = {name: StoreSamples(store_url, getattr(split, name), spec, cfg.soft_targets,
                               cfg.cache_mb if name != "test" else 0.0,  # the test set is read once
                               label_width=cfg.label_width if cfg.soft_targets else 0.0,
                               human=cfg.masks != "astropy",
                               cloud_given_residual=evidence if name != "test" else None)  # test: prepare's masks
            for name in ("train", "val", "test")}
    sizes = {name: len(ds) for name, ds in sets.items()}
    if cfg.num_workers and multiprocessing.current_process().daemon:
        log.warning("num_workers=%d: this is a daemonic process (a Dask worker?) that cannot start DataLoader "
                    "workers; loading in the training process (DASK_DISTRIBUTED__WORKER__DAEMON=False allows them)",
                    cfg.num_workers)  # fmt: skip
        cfg = dataclasses.replace(cfg, num_workers=0)
    generator = torch.Generator().manual_seed(cfg.seed)
    loaders = {
        name: DataLoader(ds, batch_size=cfg.batch_size, shuffle=name == "train", generator=generator,
                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                         pin_memory=device.type == "cuda")  # fmt: skip
        for name, ds in sets.items()
    }
    torch.manual_seed(cfg.seed)
    model = build_model(task, in_channels=spec.in_channels, **to_dict(net)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=cfg.lr_patience)
    # validated, kept and logged: the moving average of the weights (smoother than the last step's weights)
    ema = AveragedModel(model, multi_avg_fn=partial(_ema_update, cfg.ema), use_buffers=True) if cfg.ema else None
    judged = ema.module if ema is not None else model
    amp_dtype, scaler = mixed_precision(cfg, device)
    history: list[dict[str, float]] = []
    start_epoch, best, bad_epochs, best_state, run_id = 0, float("inf"), 0, None, None
    if state:
        _restore(model, state, task, _network_id(net, spec), checkpoint.path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch, best, bad_epochs = state["history"], state["epoch"] + 1, state["best"], state["bad"]
        best_state, run_id = state["best_state"], state["run_id"]
        log.info("resuming %s from epoch %d (MLflow run %s)", task, start_epoch, run_id)

    stop = {"now": False}
    previous = _on_signal(signal.SIGUSR1, lambda *_: stop.update(now=True))
    mlflow.set_tracking_uri(cfg.tracking_uri)
    use_experiment(cfg.experiment)
    try:
        with mlflow.start_run(run_id=run_id, log_system_metrics=True, parent_run_id=None if run_id else parent_run_id,
                              run_name=None if run_id else run_name or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}",
                              ) as run:  # fmt: skip
            if not state:
                _log_setup(store_url, task, cfg, split, sizes, device)
                if evidence is not None:
                    mlflow.log_dict(evidence.to_dict(), "cloud_given_residual.json")
            log.info("MLflow run %s in %s", run.info.run_id, cfg.tracking_uri)
            augment_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
            if state:
                augment_gen.set_state(state["augment_generator"])
            for epoch in range(start_epoch, cfg.epochs):
                train_loss = _train_epoch(model, loaders["train"], optimizer, scaler, cfg, device, augment_gen,
                                          amp_dtype, f"{task} epoch {epoch + 1}/{cfg.epochs}", progress,
                                          ema)  # fmt: skip
                val, _ = evaluate(judged, loaders["val"], device, cfg.pos_weight)
                row = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                       **{f"val_{k}": v for k, v in val.items()}}  # fmt: skip
                scheduler.step(val["loss"])
                history.append(row)
                _log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                if val["loss"] < best:
                    best, bad_epochs, best_state = val["loss"], 0, copy.deepcopy(judged.state_dict())
                else:
                    bad_epochs += 1
                checkpoint.save({
                    "task": task, "net": _network_id(net, spec), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None, "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "augment_generator": augment_gen.get_state(),
                    "epoch": epoch, "history": history, "best": best, "bad": bad_epochs, "best_state": best_state,
                    "run_id": run.info.run_id, "split": split.to_json(),
                })  # fmt: skip
                log.info("%s epoch %d: train loss %.4f, val loss %.4f, val F1 %.3f, val IoU %.3f", task, epoch + 1,
                         train_loss, val["loss"], val["f1"], val["iou"])  # fmt: skip
                if stop["now"] or (should_stop is not None and should_stop()):
                    raise CirrusError(f"stopped after epoch {epoch + 1} (SIGUSR1 or a stop request); checkpoint "
                                      f"{checkpoint.path} saved: run again with --resume")  # fmt: skip
                if on_epoch is not None and on_epoch(epoch, row):
                    log.info("%s stopped after epoch %d by its epoch callback (pruned)", task, epoch + 1)
                    mlflow.set_tag("pruned", "true")
                    mlflow.end_run("KILLED")
                    return TrainResult(task, run.info.run_id, "", history, {}, len(history),
                                       time.perf_counter() - t0, None, sizes, pruned=True)  # fmt: skip
                if bad_epochs >= cfg.patience:
                    log.info("early stopping after epoch %d (no better validation loss for %d epochs)", epoch + 1,
                             bad_epochs)  # fmt: skip
                    break
            if best_state is not None:
                model.load_state_dict(best_state)
            if cfg.calibrate:
                model.temperature.fill_(fit_temperature(model, loaders["val"], device))
            temperature = float(model.temperature)
            _log_metrics({"temperature": temperature})
            test, (prob, target, weight) = evaluate(model, loaders.pop("test"), device, cfg.pos_weight, keep=True)
            loaders.clear()  # their worker processes (and the samples they cache) exit before scoring and logging
            if truth:
                test.update(truth_scores(store_url, truth, sets["test"], prob, target))
            _log_metrics({f"test_{k}": v for k, v in test.items()})
            _log_artifacts(prob, target, weight, sets["test"], history, task, store_url)
            model_uri, version = _log_model(model, sets["test"], task, cfg, device) if cfg.log_model else ("", None)
            promotion = None
            if version is not None:
                promotion = _register(task, version, run.info.run_id, store_url, cfg, test, sizes, split,
                                      temperature)  # fmt: skip
            mlflow.set_tag("mlflow.note.content", describe_run(task, store_url, sizes, test, temperature,
                                                                version, promotion))  # fmt: skip
    finally:
        if previous is not None:
            signal.signal(signal.SIGUSR1, previous)
    return TrainResult(task, run.info.run_id, model_uri, history, test, len(history), time.perf_counter() - t0,
                       version, sizes, temperature=temperature, promotion=promotion,
                       tracking_uri=cfg.tracking_uri)  # fmt: skip


def train_on_cluster(client: Client, store_url: str, task: str, cfg: TrainConfig, resume: bool = False,
                     truth: str | None = None) -> TrainResult:  # fmt: skip
    """:func:`train` as one Dask task on a GPU worker (any worker where none has a GPU), waiting for it.

    SIGUSR1 here (the driver job near its walltime) is passed on: the task stops after its epoch and keeps
    its checkpoint, as in-process training does.
    """
    cfg = dataclasses.replace(cfg, tracking_uri=resolve_tracking_uri(cfg.tracking_uri, store_url))
    store_url = store_url if "://" in store_url else os.path.abspath(store_url)  # the worker's directory differs
    stop = Event(f"cirrus-stop-{uuid.uuid4().hex}", client=client)
    previous = _on_signal(signal.SIGUSR1, lambda *_: stop.set())
    try:
        future = client.submit(train, store_url, task, cfg, resume, False, truth, should_stop=partial(_is_set, stop.name),
                               resources=gpu_resources(client), pure=False, key=f"train-{task}-{uuid.uuid4().hex[:8]}")  # fmt: skip
        log.info("training %s on the Dask cluster (task %s)", task, future.key)
        return future.result()
    finally:
        if previous is not None:
            signal.signal(signal.SIGUSR1, previous)


def _is_set(name: str) -> bool:
    return Event(name).is_set()


def _on_signal(signum: int, handler: Any) -> Any:
    """Install ``handler`` where possible (main thread of the main interpreter); returns the previous one."""
    try:
        return signal.signal(signum, handler)
    except ValueError:  # not the main thread, e.g. inside a Dask worker task
        return None


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, cfg: TrainConfig, device: torch.device, gen: torch.Generator,
                 amp_dtype: torch.dtype | None, desc: str, progress: bool,
                 ema: AveragedModel | None = None) -> float:  # fmt: skip
    model.train()
    total, count = 0.0, 0
    for x, y, w in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        x, y, w = x.to(device, non_blocking=True), y.to(device, non_blocking=True), w.to(device, non_blocking=True)
        if y.ndim == 4:  # segmentation: one transform for image, mask and weight
            x, yw, valid = augment(x, torch.cat([y, w], dim=1), cfg.augment, generator=gen)
            y, w = yw[:, :1], yw[:, 1:] * valid
        else:
            x, _, _ = augment(x, None, cfg.augment, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = _loss(model(x).float(), y, w, cfg.pos_weight)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.item() * len(x)
        count += len(x)
    return total / max(count, 1)


def split_table(store_url: str, split: Split) -> pd.DataFrame:
    """One row per image of the split: source, time, split, the store's cloud fraction and cloudy label."""
    import pandas as pd

    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    rows = []
    for name in ("train", "val", "test"):
        pos = np.asarray(getattr(split, name), dtype=np.int64)
        rows.append(pd.DataFrame({
            "source": np.asarray(group["source"].get_orthogonal_selection(pos), dtype=object).astype(str),
            "time": np.asarray(group["time"].get_orthogonal_selection(pos), dtype="int64").astype("datetime64[us]"),
            "split": name, "position": pos,
            "cloud_fraction": group["cloud_fraction"].get_orthogonal_selection(pos).astype(np.float64),
            "cloudy": group["cloudy"].get_orthogonal_selection(pos).astype(bool),
        }))  # fmt: skip
    return pd.concat(rows, ignore_index=True)


def store_tags(store_url: str) -> dict[str, str]:
    """Tags of the store: its image count, time span, image shape and the camera geometry fitted by prepare."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    n = int(group.attrs["committed"])
    times = np.asarray(group["time"][[0, n - 1]] if n else [], dtype="int64").astype("datetime64[us]").astype(
        "datetime64[s]")  # fmt: skip
    geometry = json_attr(group.attrs, "prepare", {}).get("geometry", {})
    return {"store.images": str(n), "store.start": str(times[0]) if n else "", "store.end": str(times[-1]) if n else "",
            "camera.shape": "x".join(map(str, group["raw"].shape[1:])),
            "camera.center": ", ".join(f"{c:.1f}" for c in geometry.get("center", [])),
            "camera.radius": f"{geometry['radius']:.1f}" if "radius" in geometry else ""}  # fmt: skip


def _log_setup(store_url: str, task: str, cfg: TrainConfig, split: Split, sizes: dict[str, int],
               device: torch.device) -> None:  # fmt: skip
    """Params (the full config), tags (task, store, camera, code version), the split (``split.json`` with
    positions, sources and times; ``split.csv``) and the store as an MLflow dataset (one row per image)."""
    params = {"task": task, "store": store_url, "device": str(device), **{f"n_{k}": v for k, v in sizes.items()}}
    params.update(_flatten(to_dict(cfg)))
    mlflow.log_params(params)
    tags = store_tags(store_url)
    mlflow.set_tags({"task": task, "store": store_url, "host": socket.gethostname(), "pid": os.getpid(),
                     "code_version": code_version(), "image": cfg.image, **tags,
                     **({"slurm_job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {})})  # fmt: skip
    mlflow.log_dict(split.to_json(), "split.json")
    mlflow.log_dict(to_dict(cfg), "train_config.json")
    table = split_table(store_url, split)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "split.csv", index=False)
        mlflow.log_artifact(str(Path(tmp) / "split.csv"))
    input_tags = {"images": str(len(table)), "time span": f"{table.time.min()} .. {table.time.max()}",
                  "store images": tags["store.images"], **{k: str(v) for k, v in sizes.items()}}
    # "the source can be interpreted in multiple ways" (a local path) and the schema's hint on integer columns
    # (store positions: no missing values), which is about model signatures, not a logged table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(table, source=store_url, name=Path(store_url.rstrip("/")).name,
                                          targets="cloudy" if task == "classify" else None)  # fmt: skip
        log_input(dataset, input_tags)
    mlflow.set_tag("mlflow.note.content", describe_run(task, store_url, sizes))


def log_input(dataset: mlflow.data.Dataset, tags: dict[str, str], attempts: int = 3) -> None:
    """``mlflow.log_input`` that survives a race: trials starting together insert the same dataset row, and
    the one that loses (a UNIQUE/duplicate-key error) finds the row on its next attempt."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context="training", tags=tags)
            return
        except mlflow.exceptions.MlflowException as exc:
            if attempt == attempts - 1 or not any(s in str(exc) for s in ("UNIQUE constraint", "duplicate key")):
                raise
            time.sleep(0.2 * (attempt + 1))


KEY_FIGURES = ("f1", "iou", "accuracy", "roc_auc", "ece", "ece_adaptive", "brier")


def describe_run(task: str, store_url: str, sizes: dict[str, int], test: dict[str, float] | None = None,
                 temperature: float | None = None, version: str | None = None,
                 promotion: str | None = None) -> str:  # fmt: skip
    """The run's description (Markdown, shown on its MLflow page): what, on which images, the key figures."""
    what = "clear/cloudy classifier" if task == "classify" else "cloud U-Net"
    lines = [f"**{what}** trained on `{store_url}`: {sizes.get('train', 0)} train / {sizes.get('val', 0)} val / "
             f"{sizes.get('test', 0)} test images, split by whole nights (`split.csv`, dataset tab)."]  # fmt: skip
    if test:
        def row(prefix: str) -> str:
            return " | ".join(f"{test[prefix + k]:.4f}" if np.isfinite(test.get(prefix + k, np.nan)) else "-"
                              for k in KEY_FIGURES)  # fmt: skip

        lines += ["", "| test against | " + " | ".join(KEY_FIGURES) + " |", "|---" * (len(KEY_FIGURES) + 1) + "|",
                  f"| prepare's {'labels' if task == 'classify' else 'masks'} (`test/`) | {row('')} |"]  # fmt: skip
        if "truth_iou" in test:
            lines.append(f"| true {'labels' if task == 'classify' else 'masks'} (`test_truth/`) | {row('truth_')} |")
            lines.append(f"\n`test_labels_truth/`: prepare's {'labels' if task == 'classify' else 'masks'} "
                         "themselves scored against the truth (the ceiling of learning from them).")  # fmt: skip
            if "truth_sky_coverage" in test:
                lines.append(f"Scored where `cloud_prob` is given: {test['truth_sky_coverage']:.1%} of the true sky "
                             "(`test_truth/sky_coverage`; not the rim, dead columns, hot pixels).")  # fmt: skip
        lines.append(f"\nTemperature {temperature:.3f} (fitted on validation, never < 1 on a separated set). "
                     "ECE: 15 equal-width bins; `ece_adaptive`: 15 equal-mass bins.")  # fmt: skip
    if version:
        lines.append(f"\nRegistered as **{REGISTERED[task]} v{version}**. {promotion or ''}")
    lines.append("\nMetric groups: `train/`, `val/` (every epoch), `test/`, `test_truth/`, `calibration/`.")
    return "\n".join(lines)


def _register(task: str, version: str, run_id: str, store_url: str, cfg: TrainConfig, test: dict[str, float],
              sizes: dict[str, int], split: Split, temperature: float) -> str | None:  # fmt: skip
    """Describe and tag the new registered version, then promote it when ``cfg.promote``; the promotion line."""
    name = REGISTERED[task]
    client = mlflow.MlflowClient(cfg.tracking_uri)
    figures = ", ".join(f"{k} {test[k]:.4f}" for k in KEY_FIGURES if np.isfinite(test.get(k, np.nan)))
    truth = (", ".join(f"{k} {test['truth_' + k]:.4f}" for k in ("f1", "iou", "ece_adaptive"))
             if "truth_iou" in test else "")  # fmt: skip
    times = split.times or {}
    span = (f"{min(str(np.min(t)) for t in times.values() if len(t))[:19]} .. "
            f"{max(str(np.max(t)) for t in times.values() if len(t))[:19]}" if times else "")  # fmt: skip
    description = (f"{task} trained on {store_url} (run {run_id}); split by nights: train {sizes['train']}, val "
                   f"{sizes['val']}, test {sizes['test']} images ({span}). Test against prepare's labels: "
                   f"{figures}.{' Against the truth: ' + truth + '.' if truth else ''} "
                   f"Temperature {temperature:.3f}.")  # fmt: skip
    describe_version(client, name, version, description, {
        "task": task, "store": store_url, "run_id": run_id, "code_version": code_version(), "image": cfg.image,
        "split": f"{sizes['train']}/{sizes['val']}/{sizes['test']}", "time_span": span,
        "temperature": f"{temperature:.4f}",
        **{f"test/{k}": f"{test[k]:.4f}" for k in KEY_FIGURES if np.isfinite(test.get(k, np.nan))}})  # fmt: skip
    if not cfg.promote:
        return f"Not promoted ([train] promote = false): `cirrus promote` compares it with {champion_uri(name)}."
    return promote(cfg.tracking_uri, name, version, store_url).summary + "."


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def truth_scores(store_url: str, truth_url: str, dataset: StoreSamples, prob: np.ndarray,
                 labels: np.ndarray) -> dict[str, float]:  # fmt: skip
    """Predictions and training labels of ``dataset`` scored against a true-mask store (binned alike: each binned
    pixel's cloud fraction, see :mod:`cirrus_batch.metrics`), or against the human masks of a store (this one
    too) on the test images that have one, on their labelled pixels. A U-Net is scored where ``cloud_prob`` is
    given: on the pixels that both the truth and this store's geometry call sky (not the one-pixel rim, dead
    columns or hot pixels, which ``cloud_prob`` leaves NaN); ``truth_sky_coverage`` is the fraction of the true
    sky that is."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    truth = zarr.open_group(truth_url, mode="r", zarr_format=3)
    sources = np.asarray(group["source"][:], dtype=object)[dataset.positions]
    index = truth_index(list(sources), truth_url)
    human = has_masks(truth_url)
    if human:  # only the test images with a human mask count
        has = human_positions(truth)
        keep = np.flatnonzero((index >= 0) & has[np.maximum(index, 0)])
        if not len(keep):
            raise CirrusError(f"no test image has a human mask in {truth_url}")
        index, prob, labels = index[keep], prob[keep], labels[keep]
    if (index < 0).any():
        raise CirrusError(f"{int((index < 0).sum())} test images are not in the truth store {truth_url}")
    if human:
        threshold = float(group["cloudy"].attrs.get("threshold", 0.05))
        if dataset.task == "classify":
            true = (np.nan_to_num(np.asarray(truth["human_cloud_fraction"][:])[index]) > threshold).astype(np.float32)
            weight = None
        else:
            h = read_images(truth["human_mask"], index)
            labelled = bin_image((h != UNLABELLED).astype(np.float32), dataset.bin)
            cloud = bin_image((h == CLOUD).astype(np.float32), dataset.bin)
            true, weight = (cloud / np.maximum(labelled, 1e-6))[:, None], (labelled > 0.5)[:, None]
    elif dataset.task == "classify":
        threshold = float(group["cloudy"].attrs.get("threshold", 0.05))
        true = (np.asarray(truth["cloud_fraction"][:])[index] > threshold).astype(np.float32)
        weight = None
    else:
        true = bin_image(read_images(truth["mask"], index).astype(np.float32), dataset.bin)[:, None]  # fractions
        weight = np.broadcast_to(bin_image(truth["sky"][:].astype(np.float32), dataset.bin) > 0.5, true.shape)
    scores: dict[str, float] = {}
    if dataset.task == "segment":  # scored where cloud_prob is given: the store's (binned) sky
        scored = weight & (dataset.sky.numpy() > 0.5)
        scores["truth_sky_coverage"] = float(scored.sum() / max(weight.sum(), 1))
        weight = scored
    ours = binary_metrics(prob, true, weight=weight)
    theirs = binary_metrics(labels, true, weight=weight)
    keys = ("accuracy", "precision", "recall", "f1", "iou", "roc_auc", "ece", "ece_adaptive", "brier")
    return {**scores, **{f"truth_{k}": ours[k] for k in keys}, **{f"labels_truth_{k}": theirs[k] for k in keys[:5]}}


def _log_artifacts(prob: np.ndarray, target: np.ndarray, weight: np.ndarray, dataset: StoreSamples,
                   history: list[dict[str, float]], task: str, store_url: str) -> None:  # fmt: skip
    """Learning curves, confusion matrix, reliability diagram and a gallery of test frames, under ``report/``."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    pos = dataset.positions
    times = [str(t) for t in np.asarray(group["time"].get_orthogonal_selection(pos), dtype="int64")
             .astype("datetime64[us]").astype("datetime64[s]")]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plots.learning_curves(history, tmp / "learning_curves.png")
        what = "images" if task == "classify" else "sky pixels"
        plots.confusion_matrix_plot(confusion_matrix(prob, target, weight=weight), ("clear", "cloud"),
                                    tmp / "confusion_matrix.png", title=f"{task}: test {what}")  # fmt: skip
        plots.reliability_diagram(prob, target > 0.5, tmp / "reliability.png", weight=weight,
                                  title=f"{task}: test {what} against prepare's labels")  # fmt: skip
        if task == "segment":
            k = min(len(dataset), 400)  # the gallery picks among the first 400 test frames
            images = np.stack([dataset[i][0][0].numpy() for i in range(k)])
            plots.segmentation_gallery(images, target[:k, 0], prob[:k, 0], dataset.sky.numpy().astype(bool),
                                       times[:k], tmp / "gallery.png")  # fmt: skip
        else:
            cf = group["cloud_fraction"].get_orthogonal_selection(pos).astype(np.float64)
            threshold = float(group["cloudy"].attrs.get("threshold", 0.05))
            picks = plots.classifier_picks(prob, target, cf, threshold)
            chosen = sorted({i for idx in picks.values() for i in idx})
            images = np.zeros((len(prob), *dataset[0][0].shape[1:]), np.float32)
            for i in chosen:
                images[i] = dataset[i][0][0].numpy()
            plots.classifier_gallery(images, prob, target, cf, times, tmp / "gallery.png", threshold,
                                     sky=dataset.sky.numpy().astype(bool))  # fmt: skip
        (tmp / "history.json").write_text(json.dumps(history, indent=1))
        mlflow.log_artifacts(str(tmp), "report")


def _log_model(model: nn.Module, dataset: StoreSamples, task: str, cfg: TrainConfig,
               device: torch.device) -> tuple[str, str | None]:  # fmt: skip
    # exported with contiguous weights (pt2 packaging warns about channels-last ones); the graph keeps the
    # channels-last activations and reprocess converts the weights back on loading
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    # two images: torch.export (MLflow's pt2 format) would fix a batch dimension of 1 as a constant
    example = np.stack([dataset[i % len(dataset)][0].numpy() for i in range(2)])
    info = mlflow.pytorch.log_model(
        model, name="model", input_example=example, metadata=dataset.spec.to_metadata(),
        registered_model_name=REGISTERED[task] if cfg.register else None,
    )  # fmt: skip
    model.to(device, memory_format=MEMORY_FORMAT)
    return info.model_uri, (str(info.registered_model_version) if cfg.register else None)
