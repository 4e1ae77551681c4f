"""Random, non-consecutive image selection and a leak-free train/val/test split by whole nights (or days).

Consecutive all-sky frames are near-duplicates; choosing images at least ``min_gap_min`` apart and keeping
each night in a single split stops a test image from having a near-twin in training.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["SamplingConfig", "Split", "block_keys", "choose_non_consecutive", "split_by_block", "make_split"]

TASKS = ("classify", "segment")
BLOCKS = ("night", "day")
SPLITS = ("train", "val", "test")


@dataclass
class SamplingConfig:
    """How many images to choose, how far apart, and how to split them."""

    n_images: int = 1000
    min_gap_min: float = 30.0  # minimum time between any two chosen images
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    block: str = "night"  # split unit: "night" (date of time - 12 h, in the store's time zone) or "day"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_images < 1:
            raise ValueError(f"SamplingConfig.n_images must be >= 1, got {self.n_images}")
        if self.min_gap_min < 0:
            raise ValueError(f"SamplingConfig.min_gap_min must be >= 0, got {self.min_gap_min}")
        if min(self.val_fraction, self.test_fraction) < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                "SamplingConfig.val_fraction and test_fraction must be >= 0 and sum to < 1, "
                f"got {self.val_fraction} and {self.test_fraction}"
            )
        if self.block not in BLOCKS:
            raise ValueError(f"SamplingConfig.block must be one of {BLOCKS}, got {self.block!r}")

    @property
    def min_gap(self) -> np.timedelta64:
        return np.timedelta64(int(round(self.min_gap_min * 60e9)), "ns")


@dataclass
class Split:
    """Sorted integer positions into the store's time axis, per split, plus optional provenance."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    config: SamplingConfig | None = None
    task: str | None = None
    times: dict[str, np.ndarray] | None = None  # split name -> datetime64 of its positions
    sources: dict[str, np.ndarray] | None = None  # split name -> source file names of its positions
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dump`` it as the split artifact)."""
        out: dict[str, Any] = {name: [int(p) for p in getattr(self, name)] for name in SPLITS}
        out["config"] = asdict(self.config) if self.config is not None else None
        out["task"] = self.task
        out["times"] = (
            {k: [str(t) for t in np.asarray(v, dtype="datetime64[ns]")] for k, v in self.times.items()}
            if self.times is not None
            else None
        )
        out["sources"] = {k: [str(s) for s in v] for k, v in self.sources.items()} if self.sources else None
        out["extra"] = self.extra
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Split:
        """Inverse of :meth:`to_json`."""
        missing = [name for name in SPLITS if name not in data]
        if missing:
            raise ValueError(f"split JSON lacks {missing}; expected keys {SPLITS}")
        times = data.get("times")
        sources = data.get("sources")
        return cls(
            *(np.asarray(data[name], dtype=np.int64) for name in SPLITS),
            config=SamplingConfig(**data["config"]) if data.get("config") else None,
            task=data.get("task"),
            times={k: np.asarray(v, dtype="datetime64[ns]") for k, v in times.items()} if times else None,
            sources={k: np.asarray(v, dtype=str) for k, v in sources.items()} if sources else None,
            extra=dict(data.get("extra") or {}),
        )


def _ns(times: np.ndarray) -> np.ndarray:
    return np.asarray(times, dtype="datetime64[ns]").astype(np.int64)


def choose_non_consecutive(
    times: np.ndarray, eligible: np.ndarray, n: int, min_gap: np.timedelta64, rng: np.random.Generator
) -> np.ndarray:
    """Sorted random positions of up to ``n`` eligible images, any two at least ``min_gap`` apart.

    Greedy over a random order of the eligible images: the result is maximal (no eligible image could be
    added), so it has fewer than ``n`` images only when the series cannot hold more at this gap.
    NaT times are never chosen.
    """
    times = np.asarray(times)
    eligible = np.asarray(eligible, dtype=bool)
    if times.shape != eligible.shape or times.ndim != 1:
        raise ValueError(
            f"times and eligible must be 1-D of equal length, got {times.shape} and {eligible.shape}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gap = int(np.timedelta64(min_gap, "ns").astype(np.int64))
    ok = eligible & ~np.isnat(np.asarray(times, dtype="datetime64[ns]"))
    t = _ns(times)
    chosen_t: list[int] = []
    chosen: list[int] = []
    for pos in rng.permutation(np.flatnonzero(ok)):
        if len(chosen) >= n:
            break
        ti = int(t[pos])
        k = bisect.bisect_left(chosen_t, ti)
        if (k > 0 and ti - chosen_t[k - 1] < gap) or (k < len(chosen_t) and chosen_t[k] - ti < gap):
            continue
        chosen_t.insert(k, ti)
        chosen.append(int(pos))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def block_keys(times: np.ndarray, block: str) -> np.ndarray:
    """Block label (datetime64[D]) of each time: its night (date of time - 12 h) or its day."""
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    t = np.asarray(times, dtype="datetime64[ns]")
    if block == "night":
        t = t - np.timedelta64(12, "h")
    return t.astype("datetime64[D]")


def _cut(cum: np.ndarray, start: int, target: float, lo: int, hi: int) -> int:
    """Block index in [lo, hi] whose cumulative count from ``start`` is closest to ``target``."""
    candidates = np.arange(lo, hi + 1)
    base = cum[start]
    return int(candidates[np.argmin(np.abs(cum[candidates] - base - target))])


def _block_order(nb: int, block_score: np.ndarray | None, n_front: int, rng: np.random.Generator) -> np.ndarray:
    """Random order of the blocks; with scores, the first ``n_front`` (test, then val) are one block drawn from
    each of ``n_front`` score strata, alternating, so test and val span the range of scores."""
    if block_score is None or n_front >= nb:
        return rng.permutation(nb)
    ranked = np.lexsort((rng.random(nb), block_score))
    strata = np.array_split(ranked, n_front)
    front = np.array([rng.choice(s) for s in strata])
    front = np.concatenate([front[0::2], front[1::2]])
    rest = rng.permutation(np.setdiff1d(np.arange(nb), front))
    return np.concatenate([front, rest])


def split_by_block(
    positions: np.ndarray, times: np.ndarray, cfg: SamplingConfig, score: np.ndarray | None = None
) -> Split:
    """Assign whole nights (or days) of ``positions`` at random to test, val and train.

    ``times`` is the full time axis that ``positions`` index.  Fractions are met by number of images as
    closely as whole blocks allow; a split with a non-zero fraction is never empty. ``score`` (one value per
    time, e.g. the cloud fraction) stratifies: test and val get blocks from across the range of mean scores
    (so a clear night and a cloudy one both land there when the season has them).
    """
    positions = np.asarray(positions, dtype=np.int64)
    times = np.asarray(times, dtype="datetime64[ns]")
    if positions.size and (positions.min() < 0 or positions.max() >= times.size):
        raise ValueError(
            f"positions must index the {times.size} times, got {positions.min()}..{positions.max()}"
        )
    keys = block_keys(times[positions], cfg.block)
    blocks, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    need_test, need_val = int(cfg.test_fraction > 0), int(cfg.val_fraction > 0)
    if len(blocks) < need_test + need_val + 1:
        raise ValueError(
            f"{len(positions)} images fall in {len(blocks)} {cfg.block}(s); "
            "a split into train/val/test needs "
            f"at least {need_test + need_val + 1}: choose more images, a longer period or block='day'"
        )
    rng = np.random.default_rng([cfg.seed, 1])
    nb, total = len(blocks), len(positions)
    block_score = None
    if score is not None:
        block_score = np.bincount(inverse, weights=np.asarray(score, dtype=float)[positions], minlength=nb) / counts
    n_front = max(need_test + need_val, round(nb * (cfg.test_fraction + cfg.val_fraction)))
    order = _block_order(nb, block_score, n_front, rng)
    cum = np.concatenate([[0], np.cumsum(counts[order])])
    i = _cut(cum, 0, cfg.test_fraction * total, need_test, nb - 1 - need_val)
    j = _cut(cum, i, cfg.val_fraction * total, i + need_val, nb - 1)
    rank = np.empty(nb, dtype=np.int64)
    rank[order] = np.arange(nb)
    r = rank[inverse]
    parts = {"test": r < i, "val": (r >= i) & (r < j), "train": r >= j}
    out = {name: np.sort(positions[sel]) for name, sel in parts.items()}
    return Split(
        **out, config=cfg, times={name: times[p] for name, p in out.items()}, extra={"n_blocks": nb}
    )


def make_split(
    times: np.ndarray,
    quality: np.ndarray,
    labels_cloudy: np.ndarray,
    cfg: SamplingConfig,
    task: str,
    sources: np.ndarray | None = None,
    score: np.ndarray | None = None,
    only: np.ndarray | None = None,
    test: np.ndarray | None = None,
) -> Split:
    """Choose non-consecutive good images for ``task`` and split them by block (stratified by ``score``).

    Eligible: ``quality == 0`` and, for "classify", a label (clear or cloudy); for "segment", cloudy only;
    and, where ``only`` (bool per time) is given, where it is True.
    ``labels_cloudy`` is bool, or numeric with 1 = cloudy, 0 = clear and anything else (NaN, -1) = unlabelled.
    ``test`` (bool per time): the test split is every eligible image where it is True (no gap, no fraction);
    train and val are chosen from the other blocks (nights or days without such an image), as above.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    times = np.asarray(times, dtype="datetime64[ns]")
    quality = np.asarray(quality)
    labels = np.asarray(labels_cloudy)
    if not (times.shape == quality.shape == labels.shape) or times.ndim != 1:
        raise ValueError(
            f"times, quality and labels_cloudy must be 1-D of equal length, got {times.shape}, "
            f"{quality.shape} and {labels.shape}"
        )
    cloudy = labels == 1
    labelled = cloudy | (labels == 0)
    eligible = (quality == 0) & (cloudy if task == "segment" else labelled)
    if only is not None:
        eligible &= np.asarray(only, dtype=bool)
    if test is not None:
        return _forced_test_split(times, eligible, np.asarray(test, dtype=bool), cfg, task, sources, score)
    n_eligible = int(eligible.sum())
    if n_eligible < 3:
        raise ValueError(
            f"only {n_eligible} eligible image(s) for task {task!r} (quality == 0"
            f"{' and cloudy' if task == 'segment' else ' and labelled'}); at least 3 are needed"
        )
    rng = np.random.default_rng([cfg.seed, 0])
    positions = choose_non_consecutive(times, eligible, cfg.n_images, cfg.min_gap, rng)
    split = split_by_block(positions, times, cfg, score)  # raises when too few blocks for non-empty splits
    split.task = task
    if sources is not None:
        sources = np.asarray(sources, dtype=str)
        split.sources = {name: sources[getattr(split, name)] for name in SPLITS}
    return split


def _forced_test_split(times: np.ndarray, eligible: np.ndarray, test: np.ndarray, cfg: SamplingConfig, task: str,
                       sources: np.ndarray | None, score: np.ndarray | None) -> Split:  # fmt: skip
    """:func:`make_split` with the test split given: every eligible image where ``test``; train and val by block
    from the blocks that hold none of them (so no test image has a near-twin in training)."""
    chosen_test = np.flatnonzero(eligible & test)
    if not len(chosen_test):
        raise ValueError(f"no eligible image for task {task!r} is marked for the test split")
    keys = block_keys(times, cfg.block)
    rest = eligible & ~np.isin(keys, keys[chosen_test])
    if int(rest.sum()) < 2:
        raise ValueError(f"only {int(rest.sum())} eligible image(s) outside the {cfg.block}s of the {len(chosen_test)} "
                         "test images; at least 2 are needed for train and val")  # fmt: skip
    rng = np.random.default_rng([cfg.seed, 0])
    positions = choose_non_consecutive(times, rest, cfg.n_images, cfg.min_gap, rng)
    val_fraction = cfg.val_fraction / (1 - cfg.test_fraction)
    split = split_by_block(positions, times, SamplingConfig(**{**asdict(cfg), "test_fraction": 0.0,
                                                                "val_fraction": val_fraction}), score)  # fmt: skip
    split.test, split.config, split.task = chosen_test, cfg, task
    split.times = {name: times[getattr(split, name)] for name in SPLITS}
    if sources is not None:
        sources = np.asarray(sources, dtype=str)
        split.sources = {name: sources[getattr(split, name)] for name in SPLITS}
    return split
