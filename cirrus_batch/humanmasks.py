"""Hand-drawn pixel masks: imported into the store beside the astropy masks (``cirrus prepare --masks``).

One mask file per image (PNG, TIFF, NPY or FITS, recognised by content), matched to the store's images by file
stem (the name without its extensions: ``cam_0042.png`` -> ``cam_0042.fits``) or listed in a CSV
``source,mask_path`` (paths relative to the CSV). Its values map to cloud, clear or unlabelled by
``[prepare.human]``; WSISEG's annotations, for instance, are ``cloud = [255]``, ``clear = [100]``,
``unlabelled = [0]`` (horizon and sun blocker).

Stored as ``human_mask`` (time, y, x) uint8: :data:`CLEAR` 0, :data:`CLOUD` 1, :data:`UNLABELLED` 255 (also
every pixel of an image without a human mask), ``human_mask_source`` (time): the mask file ("" = none), and
``human_cloud_fraction`` (time): cloud pixels / labelled pixels. Every mask is checked (shape, values, image in
the store) before anything is written; a block's masks are written before its ``human_mask_source``, so a
killed import leaves no image with a half-written mask, and importing again rewrites the same values.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr
import zarr.errors
from astropy.io import fits

from cirrus_batch.errors import CirrusError
from cirrus_batch.imagefiles import is_picture
from cirrus_batch.store import Store, set_json_attr, write_images

log = logging.getLogger(__name__)

CLEAR, CLOUD, UNLABELLED = 0, 1, 255
SUFFIXES = {".fits", ".fit", ".fts", ".fz", ".gz", ".png", ".tif", ".tiff", ".npy", ".jpg", ".jpeg"}
ARRAYS = {"human_mask": ("uint8", UNLABELLED)}
VECTORS = {"human_mask_source": (str, ""), "human_cloud_fraction": ("float32", np.nan)}
MAX_LISTED = 5


@dataclass
class HumanMaskConfig:
    """Hand-drawn masks (``[prepare.human]``): where they are and what their values mean."""

    source: str | None = None
    """Directory, glob or CSV ``source,mask_path`` of the masks (``cirrus prepare --masks``)."""
    cloud: list[int] = field(default_factory=lambda: [1, 255])
    """Mask values that mean cloud (WSISEG: [255])."""
    clear: list[int] = field(default_factory=lambda: [0])
    """Mask values that mean clear sky (WSISEG: [100])."""
    unlabelled: list[int] = field(default_factory=list)
    """Mask values that mean not labelled: horizon, sun blocker, unsure (WSISEG: [0]); excluded from losses
    and scores."""

    def __post_init__(self) -> None:
        groups = (self.cloud, self.clear, self.unlabelled)
        values = [v for g in groups for v in g]
        if len(values) != len(set(values)):
            raise ValueError(f"a mask value is in more than one of cloud {self.cloud}, clear {self.clear}, "
                             f"unlabelled {self.unlabelled}")  # fmt: skip

    def lookup(self) -> dict[int, int]:
        return {**{v: CLOUD for v in self.cloud}, **{v: CLEAR for v in self.clear},
                **{v: UNLABELLED for v in self.unlabelled}}  # fmt: skip


@dataclass
class ImportReport:
    """What one import did."""

    masks: int = 0
    images_with_masks: int = 0
    cloudy: int = 0


def stem(name: str) -> str:
    """File name without directory and known extensions (``a/cam_1.fits.fz`` -> ``cam_1``)."""
    p = PurePosixPath(name)
    while p.suffix.lower() in SUFFIXES:
        p = p.with_suffix("")
    return p.name


def read_mask_file(data: bytes, where: str) -> np.ndarray:
    """The 2-D integer array of a PNG/TIFF, NPY or FITS mask file (a grey image; colour only with equal
    channels)."""
    try:
        if is_picture(data):
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                array = np.asarray(im)
        elif data.startswith(b"\x93NUMPY"):
            array = np.load(io.BytesIO(data), allow_pickle=False)
        elif data.startswith(b"SIMPLE  ="):
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                array = next(np.asarray(h.data) for h in hdul if h.data is not None)
        else:
            raise CirrusError(f"mask {where} is not a PNG, TIFF, NPY or FITS file")
    except CirrusError:
        raise
    except Exception as exc:  # Pillow, numpy and astropy raise several types for a damaged file
        raise CirrusError(f"cannot read mask {where}: {exc}") from None
    if array.ndim == 3 and all((array[..., c] == array[..., 0]).all() for c in range(1, min(3, array.shape[2]))):
        array = array[..., 0]
    if array.ndim != 2:
        raise CirrusError(f"mask {where} has shape {array.shape}: expected one 2-D grey image")
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise CirrusError(f"mask {where} has non-integer values")
        array = array.astype(np.int64)
    if array.dtype.kind not in "iub":
        raise CirrusError(f"mask {where} has values of type {array.dtype}, expected integers")
    return array


def convert(array: np.ndarray, cfg: HumanMaskConfig, where: str) -> np.ndarray:
    """Mask values mapped to :data:`CLEAR`, :data:`CLOUD` and :data:`UNLABELLED` (uint8); a clear error for a
    value the mapping does not know."""
    lookup = cfg.lookup()
    values = np.unique(array)
    unknown = [int(v) for v in values if int(v) not in lookup]
    if unknown:
        raise CirrusError(f"mask {where} has values {unknown[:MAX_LISTED]} that are none of cloud {cfg.cloud}, "
                          f"clear {cfg.clear}, unlabelled {cfg.unlabelled} ([prepare.human])")  # fmt: skip
    out = np.empty(array.shape, np.uint8)
    for v in values:
        out[array == v] = lookup[int(v)]
    return out


def _listing(fs_source: str) -> list[tuple[str, str]]:
    """``(path, name)`` of the mask files of a directory, glob or file (via the ingest's discovery)."""
    from cirrus_batch.ingest import discover

    fs, entries = discover(fs_source)
    return [(fs.unstrip_protocol(e.path), e.source) for e in entries]


def match(sources: list[str], source: str) -> dict[int, str]:
    """Store position -> mask path, from a CSV ``source,mask_path`` or by file stem; a clear error for masks of
    images not in the store and for stems shared by several images."""
    if source.lower().endswith(".csv") and Path(source).is_file():
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"source", "mask_path"} <= set(rows[0]):
            raise CirrusError(f"mask list {source} needs the columns source,mask_path")
        position = {s: i for i, s in enumerate(sources)}
        base = Path(source).parent
        pairs = [(row["source"].strip(), str(base / row["mask_path"].strip())) for row in rows]
        missing = [s for s, _ in pairs if s not in position]
        found = {position[s]: path for s, path in pairs if s in position}
    else:
        by_stem: dict[str, list[int]] = {}
        for i, s in enumerate(sources):
            by_stem.setdefault(stem(s), []).append(i)
        files = _listing(source)
        if not files:
            raise CirrusError(f"no mask file in {source}")
        ambiguous = [name for _, name in files if len(by_stem.get(stem(name), ())) > 1]
        if ambiguous:
            raise CirrusError(f"masks {ambiguous[:MAX_LISTED]} match several images by name: list them in a CSV "
                              "source,mask_path")  # fmt: skip
        missing = [name for _, name in files if stem(name) not in by_stem]
        found = {by_stem[stem(name)][0]: path for path, name in files if stem(name) in by_stem}
    if missing:
        raise CirrusError(f"{len(missing)} masks are for images not in the store, e.g. {missing[:MAX_LISTED]}: "
                          "ingest those images first or remove the masks")  # fmt: skip
    return found


def _read(path: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CirrusError(f"cannot read mask {path}: {exc}") from None


def load(path: str, shape: tuple[int, int], cfg: HumanMaskConfig) -> np.ndarray:
    """One mask file, checked against the store's image ``shape`` and converted (:func:`convert`)."""
    array = read_mask_file(_read(path), path)
    if array.shape != shape:
        raise CirrusError(f"mask {path} has shape {array.shape}, the store's images {shape}")
    return convert(array, cfg, path)


def cloud_fraction(human: np.ndarray) -> np.ndarray:
    """Cloud pixels / labelled pixels of masks (..., y, x) (NaN where nothing is labelled)."""
    cloud = (human == CLOUD).sum(axis=(-2, -1))
    labelled = (human != UNLABELLED).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(labelled > 0, cloud / np.maximum(labelled, 1), np.nan).astype(np.float32)


def import_masks(store: Store, cfg: HumanMaskConfig) -> ImportReport:
    """Check every mask of ``cfg.source``, then write them into the store (see the module docstring)."""
    if not cfg.source:
        raise CirrusError("no mask source: give --masks SOURCE or [prepare.human] source")
    n, shape, shard = store.require_images(), store.image_shape, store.shard_size
    group = store.group
    chosen = match(group["source"][:n].tolist(), cfg.source)
    for path in chosen.values():  # everything is checked before anything is written
        load(path, shape, cfg)
    store.add_time_arrays(n, ARRAYS, VECTORS)
    group["human_mask"].attrs.update({
        "long_name": "hand-drawn cloud mask", "flag_values": [CLEAR, CLOUD, UNLABELLED],
        "flag_meanings": "clear cloud unlabelled", "comment": "255 everywhere on images without a human mask",
    })  # fmt: skip
    group["human_mask_source"].attrs.update({"long_name": "mask file of human_mask ('' = none)"})
    group["human_cloud_fraction"].attrs.update({"long_name": "human cloud fraction", "units": "1",
                                                "standard_name": "cloud_area_fraction",
                                                "comment": "human_mask cloud / labelled pixels"})  # fmt: skip
    set_json_attr(group.attrs, "human_masks", {"source": str(cfg.source), "cloud": cfg.cloud, "clear": cfg.clear,
                                               "unlabelled": cfg.unlabelled})  # fmt: skip
    positions = np.array(sorted(chosen), dtype=np.int64)
    for start in range(0, n, shard):
        mine = positions[(positions >= start) & (positions < start + shard)]
        if not len(mine):
            continue
        stop = min(start + shard, n)
        region = slice(start, stop)
        block = group["human_mask"][region]
        for p in mine:
            block[p - start] = load(chosen[int(p)], shape, cfg)
        write_images(group["human_mask"], region, block)
        fraction = group["human_cloud_fraction"][region]
        fraction[mine - start] = cloud_fraction(block[mine - start])
        group["human_cloud_fraction"][region] = fraction
        names = np.asarray(group["human_mask_source"][region], dtype=object)
        names[mine - start] = [chosen[int(p)] for p in mine]
        group["human_mask_source"][region] = names  # written last: the block's masks are complete
    has = human_positions(group, n)
    log.info("imported %d human masks from %s", len(chosen), cfg.source)
    return ImportReport(len(chosen), int(has.sum()))


def human_positions(group: zarr.Group, n: int | None = None) -> np.ndarray:
    """(n,) bool: which images have a human mask (all False in a store without any)."""
    n = int(group.attrs["committed"]) if n is None else n
    if "human_mask_source" not in group:
        return np.zeros(n, bool)
    return np.asarray(group["human_mask_source"][:n], dtype=object) != ""


def human_cloudy(group: zarr.Group, cloudy: np.ndarray, threshold: float) -> np.ndarray:
    """``cloudy`` with the images that have a human mask judged on it (cloud fraction over labelled pixels
    above ``threshold``)."""
    has = human_positions(group, len(cloudy))
    if not has.any():
        return cloudy
    fraction = np.asarray(group["human_cloud_fraction"][: len(cloudy)])
    return np.where(has, np.nan_to_num(fraction) > threshold, cloudy)


# -- scores against human masks (unlabelled pixels excluded) -------------------------------------------------
def confusion(pred: np.ndarray, human: np.ndarray, threshold: float = 0.05) -> dict[str, Any]:
    """Additive counts of masks ``pred`` (n, y, x; cloud > 0.5) against human masks on labelled pixels:
    ``tp fp fn tn`` pixels, ``frames``, ``labels_correct`` (cloud fraction above ``threshold`` in both or
    neither), ``clear_frames`` (no human cloud) and ``clear_cloud_px``/``clear_px`` on them."""
    labelled = human != UNLABELLED
    truth, mine = human == CLOUD, (pred > 0.5) & labelled
    axes = (-2, -1)
    tp, fp = (mine & truth).sum(axes), (mine & ~truth).sum(axes)
    fn, tn = (~mine & truth & labelled).sum(axes), (~mine & ~truth & labelled).sum(axes)
    total = np.maximum(labelled.sum(axes), 1)
    clear = (tp + fn) == 0
    return {"tp": int(tp.sum()), "fp": int(fp.sum()), "fn": int(fn.sum()), "tn": int(tn.sum()),
            "frames": len(pred), "labels_correct": int((((tp + fp) / total > threshold)
                                                        == ((tp + fn) / total > threshold)).sum()),
            "clear_frames": int(clear.sum()), "clear_cloud_px": int((tp + fp)[clear].sum()),
            "clear_px": int(labelled.sum(axes)[clear].sum())}  # fmt: skip


def add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in b} if a else dict(b)


def scores(c: dict[str, Any]) -> dict[str, Any]:
    """Scores of :func:`confusion` counts, keyed like :func:`cirrus_batch.scoring.scores_from_counts` plus the
    pixel ``accuracy``."""
    nan = float("nan")
    tp, fp, fn, tn = (float(c[k]) for k in ("tp", "fp", "fn", "tn"))
    div = lambda a, b: a / b if b else nan  # noqa: E731
    return {"iou": div(tp, tp + fp + fn), "f1": div(2 * tp, 2 * tp + fp + fn), "precision": div(tp, tp + fp),
            "recall": div(tp, tp + fn), "accuracy": div(tp + tn, tp + fp + fn + tn), "n_frames": c["frames"],
            "label_accuracy": div(c["labels_correct"], c["frames"]), "n_clear_frames": c["clear_frames"],
            "clear_false_alarm": div(c["clear_cloud_px"], c["clear_px"]), "per_kind": {},
            "truth": "human masks"}  # fmt: skip


def evaluate_block(store_url: str, truth_url: str, positions: np.ndarray, index: np.ndarray,
                   threshold: float) -> dict[str, Any]:  # fmt: skip
    """Task: :func:`confusion` of the store's ``mask`` at ``positions`` against the truth store's human masks at
    ``index``."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    truth = zarr.open_group(truth_url, mode="r", zarr_format=3)
    pred = np.stack([group["mask"][int(p)] for p in positions])
    human = np.stack([truth["human_mask"][int(i)] for i in index])
    return confusion(pred, human, threshold)


def has_masks(url: str) -> bool:
    """Whether ``url`` is a store with imported human masks."""
    try:
        return "human_mask_source" in zarr.open_group(url, mode="r", zarr_format=3)
    except (OSError, ValueError, zarr.errors.BaseZarrError):
        return False


def evaluate_store(store_url: str, truth_url: str, index: np.ndarray, client: Any, threshold: float,
                   shard: int) -> dict[str, Any]:  # fmt: skip
    """Scores of the store's masks against the human masks of ``truth_url`` (the same store or another one;
    ``index``: each image's position there, -1 for none), on the images that have one."""
    has = human_positions(zarr.open_group(truth_url, mode="r", zarr_format=3))
    positions = np.flatnonzero((index >= 0) & has[np.maximum(index, 0)])
    if not len(positions):
        raise CirrusError(f"no image of {store_url} has a human mask in {truth_url}")
    futures = [client.submit(evaluate_block, store_url, truth_url, positions[a : a + shard],
                             index[positions[a : a + shard]], threshold, pure=False)
               for a in range(0, len(positions), shard)]  # fmt: skip
    total: dict[str, Any] = {}
    for fut in futures:
        total = add(total, fut.result())
    return scores(total)
