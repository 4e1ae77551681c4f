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
from cirrus_batch.clearsky import ClearSkyConfig
from cirrus_batch.geometry import SkyConfig
from cirrus_batch.humanmasks import HumanMaskConfig
from cirrus_batch.imagefiles import ImageFileConfig
from cirrus_batch.masks import MaskConfig
from cirrus_batch.sampling import SamplingConfig
from cirrus_batch.sources import SourceConfig


RANGE = "range"
"""Field metadata key: ``(lo, hi)`` bounds of a numeric setting, inclusive, ``None`` for an open side; checked by
:func:`from_dict` for every dataclass (``field(default=1, metadata={"range": (1, None)})``)."""
STRICT = "strict"
"""Field metadata key: ``"lo"``, ``"hi"`` or ``"both"``: those bounds of ``range`` are excluded."""
CHOICES = "choices"
"""Field metadata key: the allowed values of a setting."""


def ranged(default: Any, lo: float | None = None, hi: float | None = None, *, strict: str = "",
           choices: tuple[Any, ...] = ()) -> Any:  # fmt: skip
    """A dataclass field with a checked range and/or choices (see :data:`RANGE`)."""
    meta: dict[str, Any] = {RANGE: (lo, hi)} if (lo, hi) != (None, None) else {}
    if strict:
        meta[STRICT] = strict
    if choices:
        meta[CHOICES] = tuple(choices)
    return field(default=default, metadata=meta)


def range_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is out of the range or choices ``f`` declares (``"must be >= 1, got 0"``), or None.
    ``None`` values are not checked (the type allows them); a list is checked item by item."""
    if value is None:
        return None
    if isinstance(value, list):
        return next((p for v in value if (p := range_problem(f, v))), None)
    choices = f.metadata.get(CHOICES)
    if choices and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    lo, hi = f.metadata.get(RANGE, (None, None))
    strict = f.metadata.get(STRICT, "")
    lo_x, hi_x = strict in ("lo", "both"), strict in ("hi", "both")
    too_low = lo is not None and (value <= lo if lo_x else value < lo)
    too_high = hi is not None and (value >= hi if hi_x else value > hi)
    if not (too_low or too_high):
        return None
    if lo is not None and hi is not None:
        return f"must be in {'(' if lo_x else '['}{lo:g}, {hi:g}{')' if hi_x else ']'}, got {value!r}"
    if lo is not None:
        return f"must be {'>' if lo_x else '>='} {lo:g}, got {value!r}"
    return f"must be {'<' if hi_x else '<='} {hi:g}, got {value!r}"


def check_ranges(obj: Any) -> None:
    """Raise ``ValueError`` (``"IngestConfig.shard_size must be >= 1, got 0"``) for the first field of dataclass
    instance ``obj`` out of its declared range; the ``__post_init__`` of the dataclasses here call it."""
    for f in dataclasses.fields(obj):
        problem = range_problem(f, getattr(obj, f.name))
        if problem:
            raise ValueError(f"{type(obj).__name__}.{f.name} {problem}")


@dataclass
class IngestConfig:
    """How FITS files become the ``raw`` store."""

    shard_size: int = ranged(100, 1, 100_000)
    """Images per zarr shard (one image per chunk); 100-500 on real archives."""
    header_keys: list[str] = field(default_factory=lambda: ["EXPTIME", "AMBTEMP"])
    """Numeric FITS header keywords stored as per-image variables (lower-cased names)."""
    shape: list[int] | None = ranged(None, 1, None)
    """Expected image shape [ny, nx]; by default a new store takes the most common shape."""
    clevel: int = ranged(3, 0, 9)
    """LZ4 compression level of ``raw`` (blosc, byte-shuffled)."""
    future_margin_h: float = ranged(24.0, 0, None)
    """Files whose DATE-OBS is more than this many hours after now are rejected (a wrong camera clock)."""
    season_days: float = ranged(400.0, 0, None)
    """Files whose DATE-OBS is more than this many days from the median time of the store and the run are
    rejected (a reset camera clock); 0: no check."""
    image_files: ImageFileConfig = field(default_factory=ImageFileConfig)
    """PNG/TIFF frames (``[ingest.image_files]``): colour rule and time source (see ``imagefiles``)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    """How SOURCE is reached (``[ingest.source]``): WebDAV protocol, request timeout (see ``sources``)."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.shape is not None and len(self.shape) != 2:
            raise ValueError(f"IngestConfig.shape must be [ny, nx], got {self.shape}")


@dataclass
class PrepareConfig:
    """Sky mask, normalization, ground-truth masks and labels (``cirrus prepare``)."""

    sky: SkyConfig = field(default_factory=SkyConfig)
    clear: ClearSkyConfig = field(default_factory=ClearSkyConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    fit_images: int = ranged(60, 3, None)
    """Images spread evenly over the season for fitting the sky geometry and the normalization (about 25 MB of
    memory each at 512x640); the clear-sky model searches ``[prepare.clear] search_images``."""
    ambient_key: str = "AMBTEMP"
    """FITS keyword of the ambient temperature (deg C) used by the clear-sky model; missing: no temperature term."""
    cloudy_fraction: float = ranged(0.05, 0.0, 1.0)
    """An image is ``cloudy`` when its cloud fraction over sky pixels exceeds this."""
    labels: str | None = None
    """CSV ``source,label`` of human labels (cloudy/clear) that override the threshold."""
    low_confidence: float = ranged(0.5, 0.0, 1.0)
    """Masks whose confidence is below this are counted (and listed by reason) as low-confidence."""
    input_bin: int = ranged(4, 0, None)
    """Prepare also stores ``residual`` and ``brightness`` binned by this (``residual_bin4``, ``brightness_bin4``:
    the values binning them gives, 1/16 of the bytes): training and reprocess read those for networks of this
    ``bin`` instead of decoding and binning the full images (1.5 ms less per image on 2 cores). 0: none. Set when
    the models are fitted (``--refit`` to change it)."""
    human: HumanMaskConfig = field(default_factory=HumanMaskConfig)
    """Hand-drawn pixel masks (``[prepare.human]``, ``--masks``): imported beside the astropy masks; an image
    with one is ``cloudy`` by its human cloud fraction (``labels`` still override)."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.input_bin == 1:
            raise ValueError("prepare.input_bin = 1 would store a copy of residual and brightness: give 0 (none) or "
                             "the networks' bin (2 or more)")  # fmt: skip


@dataclass
class AugmentConfig:
    """Ranges of the random transform; every parameter is drawn independently per sample."""

    rotate_deg: float = ranged(180.0, 0.0, 180.0)  # rotation uniform in [-r, r]
    flip: bool = True  # random horizontal and vertical flips
    shear_deg: float = ranged(10.0, 0.0, 90.0, strict="hi")  # shear angle uniform in [-s, s]
    zoom: float = ranged(0.15, 0.0, 1.0, strict="hi")  # isotropic scale uniform in [1 - z, 1 + z]
    p: float = ranged(1.0, 0.0, 1.0)  # probability of augmenting a sample (otherwise identity)

    def __post_init__(self) -> None:
        check_ranges(self)


IMAGES = ("norm", "residual", "brightness")
"""What a network can read, from prepare: ``norm`` (normalized raw), ``residual`` (clear-sky residual: thin cirrus
stands out of it) and ``brightness`` (relative to the ambient black body: decks near 1 whatever the clear sky); a
network reads one or several, joined with ``+`` (one input channel each)."""


def check_images(image: str) -> str:
    """``image`` if every ``+``-joined part is one of :data:`IMAGES` (once), else a ValueError naming them."""
    parts = image.split("+")
    if not parts or any(p not in IMAGES for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"image must be one or more of {', '.join(IMAGES)} joined with '+' (e.g. "
                         f"'residual+brightness'), got {image!r}")  # fmt: skip
    return image


MASK_SOURCES = ("human-first", "human-only", "astropy")
"""Where the U-Net's targets come from (``[train] masks``)."""


@dataclass
class NetConfig:
    """Architecture of one network (U-Net or CNN classifier)."""

    base_channels: int = ranged(16, 1, None)
    depth: int = ranged(4, 1, None)
    dropout: float = ranged(0.1, 0.0, 1.0, strict="hi")
    batch_norm: bool = True
    flip_average: bool = False
    """Test-time augmentation: evaluation and inference average the logits over the 4 flips of the input
    (4x the inference compute; U-Net IoU against the true masks +0.002 on a 3000-image season)."""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class TrainConfig:
    """Training of the classifier and the U-Net (``cirrus train``)."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    classifier: NetConfig = field(default_factory=NetConfig)
    unet: NetConfig = field(default_factory=lambda: NetConfig(dropout=0.0, flip_average=True))
    bin: int = ranged(4, 1, None)
    """Images are averaged over bin x bin pixel blocks (512x640 -> 128x160 with 4)."""
    zenith_channel: bool = True
    """Give the networks the zenith angle as a second input channel (see ``data.InputSpec``)."""
    image: str = "residual+brightness"
    """What both networks read (:data:`IMAGES`, joined with ``+``): by default the clear-sky residual (thin
    cirrus) and the brightness relative to ambient (decks); reprocess reads them once for both networks."""
    min_mask_confidence: float = ranged(0.0, 0.0, 1.0)
    """Images whose mask confidence (``mask_confidence`` from prepare) is below this are left out of training,
    validation and test; 0 keeps them all."""
    batch_size: int = ranged(16, 1, None)
    lr: float = ranged(1e-3, 0.0, None, strict="lo")
    """Adam learning rate."""
    lr_patience: int = ranged(2, 0, None)
    """Halve the learning rate after this many epochs without a lower validation loss."""
    weight_decay: float = ranged(0.0, 0.0, None)
    pos_weight: float = ranged(1.0, 0.0, None, strict="lo")
    """Weight of the cloudy class in the binary cross-entropy (loss weighting)."""
    ema: float = ranged(0.98, 0.0, 1.0, strict="hi")
    """Decay of the exponential moving average of the weights (updated every step), which is what is validated,
    kept and logged; 0 = the plain weights."""
    calibrate: bool = True
    """After training, fit the temperature of the logits on the validation set (temperature scaling)."""
    epochs: int = ranged(20, 1, None)
    patience: int = ranged(4, 1, None)
    """Early stopping: epochs without a lower validation loss."""
    num_workers: int = ranged(0, 0, None)
    """DataLoader worker processes (0 = load in the training process)."""
    cache_mb: float = ranged(1024.0, 0.0, None)
    """Training and validation samples (binned) kept in memory after their first read, up to this many MiB
    per set and loading process; 0 = read the store every epoch."""
    threads: int = ranged(0, 0, None)
    """torch CPU threads; 0 = the cores this process may use."""
    soft_targets: bool = True
    """Segment: train on the cloud fraction of each binned pixel of ``mask`` instead of its majority (metrics
    still score the majority); measured on a 3000-image season: IoU against the true masks 0.935 vs 0.932,
    ECE 0.017 vs 0.024. Classify: train on ``data.soft_labels`` of each image's cloud fraction (``label_width``)."""
    residual_targets: bool = True
    """Segment with ``soft_targets``, astropy masks: where the mask says clear, a pixel's target is the probability
    that its clear-sky residual is cloud (:mod:`cirrus_batch.softmasks`: the mirror local false-discovery rate of
    the training images' residuals) instead of 0, so thin cirrus under the mask's threshold is not learned as
    surely clear. 3000-image season: U-Net test ECE against the true masks 0.032 -> 0.011, IoU 0.955 -> 0.969
    (where ``cloud_prob`` is given)."""
    label_width: float = 0.01
    """Classify with ``soft_targets``: width of the smooth step of the target around the cloudy threshold
    (``sigmoid((cloud_fraction - threshold) / label_width)``: 0.05 at 2 %, 0.95 at 8 % cloud with threshold 5 %);
    borderline images then get probabilities near 0.5 instead of 1e-25 or 1. 0 = hard labels."""
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
    """MLflow tracking URI; a relative sqlite path is relative to the store's folder (``cirrus_batch.tracking``)."""
    experiment: str = "cirrus"
    """MLflow experiment of the trainings and studies; season reports go to ``<experiment>-reports``."""
    log_model: bool = True
    """Log the trained model to MLflow (with an input example); needed to register it."""
    register: bool = True
    """Register the model as ``cirrus-classifier`` / ``cirrus-unet`` in the MLflow model registry."""
    promote: bool = True
    """After registering, move the alias ``champion`` (what ``reprocess`` uses) to the new version if it beats
    the current champion on the same test images (``cirrus_batch.registry``); else ``cirrus promote`` later."""

    def __post_init__(self) -> None:
        check_ranges(self)
        check_images(self.image)
        if self.masks not in MASK_SOURCES:
            raise ValueError(f"masks must be one of {', '.join(MASK_SOURCES)}, got {self.masks!r}")
        if self.masks == "human-only" and self.human_test:
            raise ValueError('masks = "human-only" with human_test = true leaves nothing to train on')


@dataclass
class ReprocessConfig:
    """Season reprocessing with the trained models (``cirrus reprocess``); MLflow tracking is ``[train]``'s."""

    classifier: str = "models:/cirrus-classifier@champion"
    """MLflow URI of the classifier: ``models:/NAME@ALIAS`` (default: the champion, see ``cirrus promote``),
    ``models:/NAME/VERSION``, ``models:/NAME/latest`` or ``runs:/RUN_ID/model``."""
    unet: str = "models:/cirrus-unet@champion"
    """MLflow URI of the U-Net (same forms)."""
    batch_size: int = ranged(16, 1, None)
    """Images per forward pass."""
    threshold: float = ranged(0.5, 0.0, 1.0, strict="lo")
    """An image is ``cloudy_pred`` (and segmented) when ``p_cloudy`` >= this."""
    amp: bool = True
    """Mixed-precision inference where the hardware has it: float16 on CUDA, bfloat16 on CPUs with native bf16
    (``models.autocast_dtype``); probabilities move by a few thousandths, the forward pass is ~1.7x faster."""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class SiteConfig:
    """Where the camera stands (``[site]``): stored in the store's attributes (``cirrus ingest``, ``cirrus orient``)
    and used to put the Sun, the Moon and the targets of ``cirrus sightline`` on the sky (astropy, no network)."""

    latitude_deg: float | None = ranged(None, -90.0, 90.0)
    """Geodetic latitude (deg, north positive); None: unknown."""
    longitude_deg: float | None = ranged(None, -180.0, 360.0)
    """Longitude (deg, east positive)."""
    elevation_m: float = ranged(0.0, -500.0, 9000.0)
    """Height above the WGS84 ellipsoid (m)."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if (self.latitude_deg is None) != (self.longitude_deg is None):
            raise ValueError("[site] needs both latitude_deg and longitude_deg (or neither)")


@dataclass
class OrientConfig:
    """Camera orientation fitted to the Sun and the Moon in clear frames (``cirrus orient``)."""

    mirror: str = ranged("auto", choices=("auto", "yes", "no"))
    """East-west mirror: ``auto`` fits both and keeps the better; ``yes``/``no`` forces one (and says when the other
    fits better). ``no``: the sky as seen from below, east counterclockwise of north."""
    min_altitude_deg: float = ranged(8.0, 0.0, 90.0)
    """Only frames where the body is at least this high are searched."""
    min_snr: float = ranged(8.0, 3.0, None)
    """A source is found when its peak stands this many robust sigmas above the frame's high-pass noise."""
    max_frames: int = ranged(500, 10, None)
    """At most this many frames (spread evenly) are searched; they are held in memory (330 MB at 512x640)."""
    fit_tilt: bool = True
    """Fit a tilt of the optical axis (2 parameters) about the image-circle centre of the geometry."""
    max_tilt_deg: float = ranged(10.0, 0.0, 45.0, strict="lo")
    """The fitted tilt stays below this (and the scale within 0.8-1.25, the centre within 10 % of the radius)."""
    fit_scale: bool = True
    """Fit a radial scale of the lens projection (1 = the geometry's radius)."""
    fit_center: bool = True
    """Fit the image-circle centre too (to first order the same as a tilt; the Sun's and Moon's tracks over the
    sky tell them apart, and a centre off by a pixel no longer turns into a false tilt)."""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class SightlineConfig:
    """Line-of-sight verdicts for telescope pointings (``cirrus sightline``)."""

    radius_deg: float = ranged(2.0, 0.0, 30.0, strict="lo")
    """Cloud is looked for within this angle of the target."""
    gap_min: float = ranged(10.0, 0.0, None)
    """An exposure no frame covers takes the nearest frame within this many minutes, else ``no data``."""
    clear_below: float = ranged(0.2, 0.0, 1.0)
    """A frame is clear at the target when the cloud probability within ``radius_deg`` stays below this."""
    cloudy_above: float = ranged(0.5, 0.0, 1.0)
    """... and cloudy when it reaches this somewhere within ``radius_deg``; in between: uncertain."""
    min_altitude_deg: float = ranged(0.0, -5.0, 90.0)
    """Targets below this altitude are ``below horizon``."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.clear_below > self.cloudy_above:
            raise ValueError("SightlineConfig.clear_below must not exceed cloudy_above")


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
    metric: str = ranged("", choices=("", *TUNE_METRICS))
    """Validation metric to optimize (one of ``TUNE_METRICS``); empty: ``val_iou`` (segment), ``val_f1``
    (classify). A trial's value is its best epoch's; every epoch's value is reported for pruning."""
    trials: int = ranged(20, 1, None)
    """Finished trials wanted in the study, counting those of earlier runs."""
    timeout: float = ranged(0.0, 0.0, None)
    """Seconds after which no new trial starts (running ones finish); 0: none."""
    sampler: str = ranged("tpe", choices=("tpe", "random"))
    """``"tpe"`` or ``"random"``."""
    seed: int = 0
    """Seed of the sampler."""
    pruner: str = ranged("median", choices=("median", "hyperband", "none"))
    """``"median"``, ``"hyperband"`` or ``"none"``; trials report every epoch."""
    n_startup_trials: int = ranged(2, 0, None)
    """Median pruner: no pruning before this many trials have finished."""
    n_warmup_steps: int = ranged(1, 0, None)
    """Median pruner: epochs of a trial before it can be pruned."""
    min_resource: int = ranged(1, 1, None)
    """Hyperband: epochs every trial gets (the maximum is ``[train] epochs``)."""
    reduction_factor: int = ranged(3, 2, None)
    """Hyperband: the fraction 1/reduction_factor of trials goes on at each rung."""
    heartbeat_interval: float = ranged(30.0, 0.0, None, strict="lo")
    """Seconds between the tuner's heartbeats for each trial it runs (a trial system attribute)."""
    grace_period: float = 120.0
    """A RUNNING trial without heartbeat for this long (its tuner died) is failed and retried."""
    max_retries: int = ranged(1, 0, None)
    """Times an orphaned trial is queued again with the same parameters."""
    retrain_best: bool = True
    """Retrain the best configuration (and register it); False: register the best trial's own model."""
    retrain_epochs: int = ranged(0, 0, None)
    """Epochs of that retraining; 0: ``[train] epochs``."""
    space: dict[str, Any] = field(default_factory=dict)
    """The search space: dotted ``[train]`` keys (``lr``, ``unet.depth``, ``augment.zoom``) mapped to
    ``{type, low, high, log, step, choices}`` tables (see ``ParamSpec`` and ``jobs/tune.toml``), searched for
    either task. A key of the other task's network (``unet.*`` for ``classify``, ``classifier.*`` for
    ``segment``) is an error: it cannot change the result."""
    space_classify: dict[str, Any] = field(default_factory=dict)
    """Keys searched only when tuning the classifier (``classifier.depth``, ...), added to ``space``."""
    space_segment: dict[str, Any] = field(default_factory=dict)
    """Keys searched only when tuning the U-Net (``unet.depth``, ...), added to ``space``."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"grace_period ({self.grace_period}) must exceed heartbeat_interval "
                             f"({self.heartbeat_interval})")  # fmt: skip
        self.space = _search_space(self.space)
        self.space_classify = _search_space(self.space_classify)
        self.space_segment = _search_space(self.space_segment)


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

    jobs: int = ranged(2, 1, None)
    """Worker jobs to submit."""
    queue: str | None = None
    """SLURM partition (``-p``)."""
    account: str | None = None
    cores: int | None = ranged(None, 1, None)
    """CPU cores per job."""
    memory: str | None = None
    """Memory per job, e.g. ``"16GB"``."""
    processes: int | None = ranged(None, 1, None)
    """Dask worker processes per job."""
    walltime: str | None = None
    """``HH:MM:SS``."""
    gpus_per_job: int = ranged(0, 0, None)
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
    wait_timeout: float = ranged(300.0, 0.0, None, strict="lo")
    """Seconds to wait for the first worker before giving up (jobs are cancelled)."""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class ClusterConfig:
    """Where Dask work runs: ``local`` (default), ``slurm``, or a scheduler address ``tcp://host:port``."""

    kind: str = "local"
    n_workers: int | None = ranged(None, 1, None)
    """Local workers; default: one per CPU core."""
    threads_per_worker: int = ranged(1, 1, None)
    memory_limit: str = "auto"
    dashboard_address: str = "127.0.0.1:0"
    """Where the Dask dashboard listens: this host only, on a free port (``127.0.0.1:8787`` for the usual one);
    ``:8787`` listens on every interface, which everyone on a shared login node can then reach."""
    connect_timeout: str = "30s"
    """How long to wait for a scheduler given by address."""
    worker_profile: bool = False
    """The workers' statistical profiler (the dashboard's Profile page), local and SLURM workers: it samples every
    running task's stack every 10 ms, which cost prepare 5-6 % of its time; on to profile a run."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class LockConfig:
    """The store's writer lock (``docs/store.md``): ingest, prepare, reprocess and remove hold it; readers never."""

    wait: float = ranged(60.0, 0.0, None)
    """Seconds a writer waits for the lock held by another before it gives up; 0: give up at once."""
    stale_after: float = ranged(600.0, 1.0, None)
    """A lock whose holder has not renewed it for this many seconds is stale and broken (a holder on this host
    whose process is gone is stale at once)."""
    heartbeat: float = ranged(30.0, 0.1, None)
    """Seconds between the holder's renewals of its lock."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.heartbeat >= self.stale_after:
            raise ValueError(f"LockConfig.heartbeat ({self.heartbeat}) must be less than stale_after "
                             f"({self.stale_after})")  # fmt: skip


@dataclass
class JobConfig:
    """One job configuration file (``jobs/*.toml``)."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    reprocess: ReprocessConfig = field(default_factory=ReprocessConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    orient: OrientConfig = field(default_factory=OrientConfig)
    sightline: SightlineConfig = field(default_factory=SightlineConfig)


class RangeError(ConfigError):
    """A setting out of its declared range; ``key`` is its dotted name (``ingest.shard_size``)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} {problem}")
        self.key = key


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


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


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys, wrong types and values out of a field's
    declared range or choices (:data:`RANGE`, a :class:`RangeError` naming the dotted key). A nested table
    starts from its field's default (``[train.unet]`` from the U-Net's defaults, not the classifier's)."""
    at = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{at}expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{at}unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    data = {name: {**to_dict(fields[name].default_factory()), **value}  # type: ignore[misc]
            if isinstance(value, dict) and dataclasses.is_dataclass(hints[name])
            and fields[name].default_factory is not dataclasses.MISSING else value
            for name, value in data.items()}  # fmt: skip
    kwargs = {name: _check_type(value, hints[name], _key(where, name)) for name, value in data.items()}
    for name, value in kwargs.items():
        problem = range_problem(fields[name], value)
        if problem:
            raise RangeError(_key(where, name), problem)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own cross-field checks
        raise ConfigError(f"{at}{exc}") from None


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
    unset command-line options fall through to the file and the defaults. Errors start with where the value
    came from: ``jobs/x.toml: ingest.shard_size must be >= 1, got 0`` (``command line: ...`` for an override).
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
    given = {dotted for dotted, value in (overrides or {}).items() if value is not None}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    try:
        return from_dict(JobConfig, data)
    except RangeError as exc:
        origin = "command line" if exc.key in given else str(path) if path else "config"
        raise ConfigError(f"{origin}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for logging to MLflow or printing)."""
    return dataclasses.asdict(config)
