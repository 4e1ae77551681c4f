"""Job configuration: TOML files in ``jobs/`` mapped onto typed dataclasses.

Precedence (highest first): command-line options > job config file > dask config (cluster only) >
the defaults below. Unknown sections or keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cirrus_batch.errors import ConfigError
from cirrus_batch.humanmasks import HumanMaskConfig
from cirrus_batch.imagefiles import ImageFileConfig
from cirrus_batch.masks import MaskConfig, SkyConfig
from cirrus_batch.sampling import SamplingConfig


@dataclass
class IngestConfig:
    """How FITS files become the ``raw`` store."""

    shard_size: int = 100
    """Images per zarr shard (one image per chunk); 100-500 on real archives."""
    header_keys: list[str] = field(default_factory=lambda: ["EXPTIME", "AMBTEMP"])
    """Numeric FITS header keywords stored as per-image variables (lower-cased names)."""
    shape: list[int] | None = None
    """Expected image shape [ny, nx]; by default a new store takes the most common shape."""
    clevel: int = 3
    """LZ4 compression level of ``raw`` (blosc, byte-shuffled)."""
    image_files: ImageFileConfig = field(default_factory=ImageFileConfig)
    """PNG/TIFF frames (``[ingest.image_files]``): colour rule and time source (see ``imagefiles``)."""


@dataclass
class PrepareConfig:
    """Sky mask, normalization, ground-truth masks and labels (``cirrus prepare``)."""

    sky: SkyConfig = field(default_factory=SkyConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    fit_images: int = 60
    """Images spread evenly over the season for fitting the sky mask, normalization and clear-sky model
    (about 25 MB of memory each at 512x640; 40 and 200 give the same masks on the synthetic seasons)."""
    ambient_key: str = "AMBTEMP"
    """FITS keyword of the ambient temperature (deg C) used by the clear-sky model; missing: no temperature term."""
    cloudy_fraction: float = 0.05
    """An image is ``cloudy`` when its cloud fraction over sky pixels exceeds this."""
    labels: str | None = None
    """CSV ``source,label`` of human labels (cloudy/clear) that override the threshold."""
    human: HumanMaskConfig = field(default_factory=HumanMaskConfig)
    """Hand-drawn pixel masks (``[prepare.human]``, ``--masks``): imported beside the astropy masks; an image
    with one is ``cloudy`` by its human cloud fraction (``labels`` still override)."""


@dataclass
class AugmentConfig:
    """Ranges of the random transform; every parameter is drawn independently per sample."""

    rotate_deg: float = 180.0  # rotation uniform in [-r, r]
    flip: bool = True  # random horizontal and vertical flips
    shear_deg: float = 10.0  # shear angle uniform in [-s, s]
    zoom: float = 0.15  # isotropic scale uniform in [1 - z, 1 + z]
    p: float = 1.0  # probability of augmenting a sample (otherwise identity)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"AugmentConfig.p must be in [0, 1], got {self.p}")
        if not 0.0 <= self.zoom < 1.0:
            raise ValueError(f"AugmentConfig.zoom must be in [0, 1), got {self.zoom}")
        if self.rotate_deg < 0 or self.shear_deg < 0:
            raise ValueError("AugmentConfig.rotate_deg and shear_deg must be >= 0")
        if self.shear_deg >= 90:
            raise ValueError(f"AugmentConfig.shear_deg must be < 90, got {self.shear_deg}")


IMAGES = ("norm", "residual")
"""What a network can read: ``norm`` (normalized raw) or ``residual`` (clear-sky residual), both from prepare."""


MASK_SOURCES = ("human-first", "human-only", "astropy")
"""Where the U-Net's targets come from (``[train] masks``)."""


@dataclass
class NetConfig:
    """Architecture of one network (U-Net or CNN classifier)."""

    base_channels: int = 16
    depth: int = 4
    dropout: float = 0.1
    batch_norm: bool = True
    flip_average: bool = False
    """Test-time augmentation: evaluation and inference average the logits over the 4 flips of the input
    (4x the inference compute; U-Net IoU against the true masks +0.002 on a 3000-image season)."""


@dataclass
class TrainConfig:
    """Training of the classifier and the U-Net (``cirrus train``)."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    classifier: NetConfig = field(default_factory=NetConfig)
    unet: NetConfig = field(default_factory=lambda: NetConfig(dropout=0.0, flip_average=True))
    bin: int = 4
    """Images are averaged over bin x bin pixel blocks (512x640 -> 128x160 with 4)."""
    zenith_channel: bool = True
    """Give the networks the zenith angle as a second input channel (see ``data.InputSpec``)."""
    image: str = "residual"
    """What both networks read: ``residual`` (each image's clear-sky residual from prepare: faint cirrus stands
    out of it; reprocess then reads one image for both) or ``norm`` (normalized raw)."""
    batch_size: int = 16
    lr: float = 1e-3
    """Adam learning rate."""
    lr_patience: int = 2
    """Halve the learning rate after this many epochs without a lower validation loss."""
    weight_decay: float = 0.0
    pos_weight: float = 1.0
    """Weight of the cloudy class in the binary cross-entropy (loss weighting)."""
    ema: float = 0.98
    """Decay of the exponential moving average of the weights (updated every step), which is what is validated,
    kept and logged; 0 = the plain weights."""
    calibrate: bool = True
    """After training, fit the temperature of the logits on the validation set (temperature scaling)."""
    epochs: int = 20
    patience: int = 4
    """Early stopping: epochs without a lower validation loss."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    cache_mb: float = 1024.0
    """Training and validation samples (binned) kept in memory after their first read, up to this many MiB
    per set and loading process; 0 = read the store every epoch."""
    threads: int = 0
    """torch CPU threads; 0 = the cores this process may use."""
    soft_targets: bool = True
    """Segment: train on the cloud fraction of each binned pixel of ``mask`` instead of its majority (metrics
    still score the majority); measured on a 3000-image season: IoU against the true masks 0.935 vs 0.932,
    ECE 0.017 vs 0.024."""
    amp: bool = True
    """Mixed-precision training steps: float16 on CUDA, bfloat16 on CPUs with native bf16 (AVX512-BF16, AMX;
    ~1.9x faster steps), float32 elsewhere (``models.autocast_dtype``)."""
    masks: str = "human-first"
    """Segment targets: ``human-first`` (an image's human mask where it has one, ``prepare --masks``, its astropy
    mask elsewhere), ``human-only`` (only images with a human mask) or ``astropy``. Unlabelled human pixels
    count in no loss and no metric."""
    human_test: bool = False
    """The test split is every image with a human mask (train and val: the nights without any), so the model is
    judged on what people drew."""
    seed: int = 0
    checkpoint_dir: str = "checkpoints"
    """One checkpoint per task (``classify.pt``, ``segment.pt``), written every epoch; ``--resume`` reads it."""
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "cirrus"
    log_model: bool = True
    """Log the trained model to MLflow (with an input example); needed to register it."""
    register: bool = True
    """Register the model as ``cirrus-classifier`` / ``cirrus-unet`` in the MLflow model registry."""

    def __post_init__(self) -> None:
        if self.image not in IMAGES:
            raise ValueError(f"image must be one of {', '.join(IMAGES)}, got {self.image!r}")
        if self.masks not in MASK_SOURCES:
            raise ValueError(f"masks must be one of {', '.join(MASK_SOURCES)}, got {self.masks!r}")
        if self.masks == "human-only" and self.human_test:
            raise ValueError('masks = "human-only" with human_test = true leaves nothing to train on')


@dataclass
class ReprocessConfig:
    """Season reprocessing with the trained models (``cirrus reprocess``); MLflow tracking is ``[train]``'s."""

    classifier: str = "models:/cirrus-classifier/latest"
    """MLflow URI of the classifier: ``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/NAME@ALIAS``
    or ``runs:/RUN_ID/model``."""
    unet: str = "models:/cirrus-unet/latest"
    """MLflow URI of the U-Net (same forms)."""
    batch_size: int = 16
    """Images per forward pass."""
    threshold: float = 0.5
    """An image is ``cloudy_pred`` (and segmented) when ``p_cloudy`` >= this."""
    amp: bool = True
    """Mixed-precision inference where the hardware has it: float16 on CUDA, bfloat16 on CPUs with native bf16
    (``models.autocast_dtype``); probabilities move by a few thousandths, the forward pass is ~1.7x faster."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"ReprocessConfig.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"ReprocessConfig.threshold must be in (0, 1], got {self.threshold}")


@dataclass
class ParamSpec:
    """One dimension of the search space: an Optuna distribution over a ``[train]`` key."""

    type: str
    """``"float"``, ``"int"`` or ``"categorical"``."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample on a log scale (float, int)."""
    step: float | None = None
    """Grid step (float, int; not with ``log``)."""
    choices: list[Any] | None = None
    """The values of a categorical parameter."""

    def __post_init__(self) -> None:
        if self.type not in ("float", "int", "categorical"):
            raise ValueError(f"type must be 'float', 'int' or 'categorical', got {self.type!r}")
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty list of choices")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.type} parameter needs low <= high, got low={self.low} high={self.high}")
        elif self.log and (self.step is not None or self.low <= 0):
            raise ValueError("log = true needs low > 0 and no step")


TUNE_METRICS = tuple(f"val_{k}" for k in ("loss", "accuracy", "precision", "recall", "f1", "iou", "roc_auc", "ece",
                                          "brier"))  # fmt: skip
"""Per-epoch validation metrics a study can optimize; ``val_loss``, ``val_ece`` and ``val_brier`` are minimized."""


@dataclass
class TuneConfig:
    """Hyperparameter search (``cirrus tune``): one Optuna study whose trials train on the Dask workers."""

    study_name: str = ""
    """Name of the study in the storage; empty: ``cirrus-<task>``. Running again continues it."""
    storage: str = "sqlite:///optuna.db"
    """Optuna storage: an SQLAlchemy URL (``sqlite:///optuna.db``, ``postgresql+psycopg2://user:pw@host/db``) or
    ``journal:PATH`` (a journal file, e.g. on a cluster's shared filesystem). Workers open it themselves."""
    metric: str = ""
    """Validation metric to optimize (one of ``TUNE_METRICS``); empty: ``val_iou`` (segment), ``val_f1``
    (classify). A trial's value is its best epoch's; every epoch's value is reported for pruning."""
    trials: int = 20
    """Finished trials wanted in the study, counting those of earlier runs."""
    timeout: float = 0.0
    """Seconds after which no new trial starts (running ones finish); 0: none."""
    sampler: str = "tpe"
    """``"tpe"`` or ``"random"``."""
    seed: int = 0
    """Seed of the sampler."""
    pruner: str = "median"
    """``"median"``, ``"hyperband"`` or ``"none"``; trials report every epoch."""
    n_startup_trials: int = 2
    """Median pruner: no pruning before this many trials have finished."""
    n_warmup_steps: int = 1
    """Median pruner: epochs of a trial before it can be pruned."""
    min_resource: int = 1
    """Hyperband: epochs every trial gets (the maximum is ``[train] epochs``)."""
    reduction_factor: int = 3
    """Hyperband: the fraction 1/reduction_factor of trials goes on at each rung."""
    heartbeat_interval: float = 30.0
    """Seconds between the tuner's heartbeats for each trial it runs (a trial system attribute)."""
    grace_period: float = 120.0
    """A RUNNING trial without heartbeat for this long (its tuner died) is failed and retried."""
    max_retries: int = 1
    """Times an orphaned trial is queued again with the same parameters."""
    retrain_best: bool = True
    """Retrain the best configuration (and register it); False: register the best trial's own model."""
    retrain_epochs: int = 0
    """Epochs of that retraining; 0: ``[train] epochs``."""
    space: dict[str, Any] = field(default_factory=dict)
    """The search space: dotted ``[train]`` keys (``lr``, ``unet.depth``, ``augment.zoom``) mapped to
    ``{type, low, high, log, step, choices}`` tables (see ``ParamSpec`` and ``jobs/tune.toml``)."""

    def __post_init__(self) -> None:
        if self.metric and self.metric not in TUNE_METRICS:
            raise ValueError(f"metric must be one of {', '.join(TUNE_METRICS)}, got {self.metric!r}")
        for key, valid in (("sampler", ("tpe", "random")), ("pruner", ("median", "hyperband", "none"))):
            if getattr(self, key) not in valid:
                raise ValueError(f"{key} must be one of {', '.join(valid)}, got {getattr(self, key)!r}")
        if self.trials < 1 or self.max_retries < 0 or self.heartbeat_interval <= 0:
            raise ValueError("trials must be >= 1, max_retries >= 0 and heartbeat_interval > 0")
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"grace_period ({self.grace_period}) must exceed heartbeat_interval "
                             f"({self.heartbeat_interval})")  # fmt: skip
        self.space = _search_space(self.space)


def _search_space(node: dict[str, Any], prefix: str = "") -> dict[str, ParamSpec]:
    """``{"unet": {"depth": {"type": ...}}}`` or ``{"unet.depth": {...}}`` -> ``{"unet.depth": ParamSpec}``."""
    space: dict[str, ParamSpec] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, ParamSpec):
            space[name] = value
        elif isinstance(value, dict) and "type" in value:
            space[name] = from_dict(ParamSpec, value, f"tune.space.{name}")
        elif isinstance(value, dict):
            space.update(_search_space(value, f"{name}."))
        else:
            raise ConfigError(f'tune.space.{name}: expected a table like {{type = "float", low = 0.0001, high = 0.01}}, '
                              f"got {value!r}")  # fmt: skip
    return space


@dataclass
class SlurmConfig:
    """dask-jobqueue ``SLURMCluster`` settings; unset (None) keys fall back to ``jobqueue.slurm.*`` dask config."""

    jobs: int = 2
    """Worker jobs to submit."""
    queue: str | None = None
    """SLURM partition (``-p``)."""
    account: str | None = None
    cores: int | None = None
    """CPU cores per job."""
    memory: str | None = None
    """Memory per job, e.g. ``"16GB"``."""
    processes: int | None = None
    """Dask worker processes per job."""
    walltime: str | None = None
    """``HH:MM:SS``."""
    gpus_per_job: int = 0
    """Adds ``--gres=gpu:N`` and the worker resource ``GPU=N``."""
    python: str | None = None
    """Python on the compute nodes; default: this interpreter."""
    interface: str | None = None
    """Network interface of scheduler and workers, e.g. ``ib0``."""
    local_directory: str | None = None
    log_directory: str | None = None
    job_script_prologue: list[str] = field(default_factory=list)
    """Lines run before the worker starts (``module load ...``, ``source venv/bin/activate``)."""
    job_extra_directives: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` options."""
    job_directives_skip: list[str] = field(default_factory=list)
    worker_extra_args: list[str] = field(default_factory=list)
    wait_timeout: float = 300.0
    """Seconds to wait for the first worker before giving up (jobs are cancelled)."""


@dataclass
class ClusterConfig:
    """Where Dask work runs: ``local`` (default), ``slurm``, or a scheduler address ``tcp://host:port``."""

    kind: str = "local"
    n_workers: int | None = None
    """Local workers; default: one per CPU core."""
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    dashboard_address: str = ":0"
    """``:0`` picks a free port; ``:8787`` for the usual one."""
    connect_timeout: str = "30s"
    """How long to wait for a scheduler given by address."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class JobConfig:
    """One job configuration file (``jobs/*.toml``)."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    reprocess: ReprocessConfig = field(default_factory=ReprocessConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types. A nested table
    starts from its field's default (``[train.unet]`` from the U-Net's defaults, not the classifier's)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    data = {name: {**to_dict(fields[name].default_factory()), **value}  # type: ignore[misc]
            if isinstance(value, dict) and dataclasses.is_dataclass(hints[name])
            and fields[name].default_factory is not dataclasses.MISSING else value
            for name, value in data.items()}  # fmt: skip
    kwargs = {name: _check_type(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own range checks
        raise ConfigError(f"{where}: {exc}") from None


def absolute_url(url: str) -> str:
    """A relative ``sqlite:///`` or ``journal:`` path (a tracking or storage URL) made absolute: Dask workers
    may run in another directory."""
    if url.startswith("journal:"):
        return "journal:" + os.path.abspath(url.removeprefix("journal:"))
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and ":memory:" not in url:
        return "sqlite:///" + os.path.abspath(url.removeprefix("sqlite:///"))
    return url


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read a job config (or the defaults when ``path`` is None) and apply ``overrides``.

    ``overrides`` maps dotted keys (``"ingest.shard_size"``) to values; ``None`` values are skipped so
    unset command-line options fall through to the file and the defaults.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"job config {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"job config {path} is not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return from_dict(JobConfig, data, where=str(path) if path else "config")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for logging to MLflow or printing)."""
    return dataclasses.asdict(config)
