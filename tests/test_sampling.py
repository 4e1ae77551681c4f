"""Tests for cirrus_batch.sampling: gaps, leak-free night blocks, eligibility, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cirrus_batch.sampling import (
    SamplingConfig,
    Split,
    block_keys,
    choose_non_consecutive,
    make_split,
    split_by_block,
)


def dense_times(nights: int = 10, per_night_h: int = 10) -> np.ndarray:
    """1-min cadence from 19:00 to 05:00 local, over several nights."""
    start = np.datetime64("2024-01-01T19:00", "ns")
    per = per_night_h * 60
    return np.concatenate(
        [start + np.timedelta64(d, "D") + np.arange(per) * np.timedelta64(1, "m") for d in range(nights)]
    )


def min_gap(times: np.ndarray, positions: np.ndarray) -> np.timedelta64:
    return np.diff(np.sort(times[positions])).min()


def test_gaps_and_n_respected() -> None:
    times = dense_times()
    eligible = np.ones(times.size, dtype=bool)
    gap = np.timedelta64(30, "m")
    pos = choose_non_consecutive(times, eligible, 100, gap, np.random.default_rng(0))
    assert pos.size == 100 and np.all(np.diff(pos) > 0)
    assert min_gap(times, pos) >= gap


def test_maximal_when_n_unreachable() -> None:
    times = dense_times(nights=2)  # 2 x 10 h -> at most 2 x 21 images at a 30-min gap
    gap = np.timedelta64(30, "m")
    pos = choose_non_consecutive(times, np.ones(times.size, bool), 10_000, gap, np.random.default_rng(1))
    assert min_gap(times, pos) >= gap
    t = times[pos]
    gaps_to_chosen = np.abs(times[:, None] - t[None, :]).min(axis=1)
    assert np.all(gaps_to_chosen < gap)  # maximal: nothing more fits
    assert 21 <= pos.size <= 42


def test_choose_deterministic_and_unsorted_times() -> None:
    times = dense_times(nights=3)
    rng_perm = np.random.default_rng(5).permutation(times.size)
    shuffled = times[rng_perm]
    elig = np.ones(times.size, bool)
    gap = np.timedelta64(45, "m")
    a = choose_non_consecutive(shuffled, elig, 20, gap, np.random.default_rng(3))
    b = choose_non_consecutive(shuffled, elig, 20, gap, np.random.default_rng(3))
    c = choose_non_consecutive(shuffled, elig, 20, gap, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert min_gap(shuffled, a) >= gap


def test_ineligible_and_nat_never_chosen() -> None:
    times = dense_times(nights=3)
    times[::7] = np.datetime64("NaT")
    elig = np.arange(times.size) % 2 == 0
    pos = choose_non_consecutive(times, elig, 1000, np.timedelta64(0, "m"), np.random.default_rng(0))
    assert elig[pos].all() and not np.isnat(times[pos]).any()
    assert pos.size == int((elig & ~np.isnat(times)).sum())


def test_night_blocks() -> None:
    t = np.array(["2024-01-01T23:00", "2024-01-02T04:00", "2024-01-02T13:00"], dtype="datetime64[ns]")
    assert list(block_keys(t, "night").astype(str)) == ["2024-01-01", "2024-01-01", "2024-01-02"]
    assert list(block_keys(t, "day").astype(str)) == ["2024-01-01", "2024-01-02", "2024-01-02"]


def test_split_no_night_shared_and_fractions() -> None:
    times = dense_times(nights=20)
    cfg = SamplingConfig(n_images=300, seed=2)
    pos = choose_non_consecutive(times, np.ones(times.size, bool), 300, cfg.min_gap, np.random.default_rng(0))
    split = split_by_block(pos, times, cfg)
    parts = [split.train, split.val, split.test]
    assert all(p.size > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), pos)
    nights = [set(block_keys(times[p], "night").tolist()) for p in parts]
    assert not (nights[0] & nights[1] or nights[0] & nights[2] or nights[1] & nights[2])
    assert abs(split.test.size / pos.size - 0.15) < 0.1 and abs(split.val.size / pos.size - 0.15) < 0.1


def test_split_three_nights_all_nonempty() -> None:
    times = dense_times(nights=3)
    pos = np.arange(0, times.size, 60)
    split = split_by_block(pos, times, SamplingConfig())
    assert split.train.size and split.val.size and split.test.size


def make_labels(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    quality = (rng.random(times.size) < 0.2).astype(np.uint8)
    labels = rng.random(times.size) < 0.5
    return quality, labels


def test_make_split_segment_only_cloudy_and_quality() -> None:
    times = dense_times(nights=8)
    quality, labels = make_labels(times)
    split = make_split(times, quality, labels, SamplingConfig(n_images=80, min_gap_min=20), "segment")
    allpos = np.concatenate([split.train, split.val, split.test])
    assert allpos.size == 80 and labels[allpos].all() and (quality[allpos] == 0).all()
    assert split.task == "segment"


def test_make_split_classify_skips_unlabelled() -> None:
    times = dense_times(nights=8)
    quality, labels = make_labels(times)
    lab = labels.astype(float)
    lab[::3] = np.nan
    split = make_split(times, quality, lab, SamplingConfig(n_images=80, min_gap_min=20), "classify")
    allpos = np.concatenate([split.train, split.val, split.test])
    assert np.isfinite(lab[allpos]).all() and (quality[allpos] == 0).all()
    assert 0 < lab[allpos].mean() < 1  # both classes kept


def test_make_split_deterministic() -> None:
    times = dense_times(nights=8)
    quality, labels = make_labels(times)
    cfg = SamplingConfig(n_images=50, seed=3)
    a = make_split(times, quality, labels, cfg, "classify")
    b = make_split(times, quality, labels, cfg, "classify")
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "val", "test"))


def test_errors() -> None:
    times = dense_times(nights=3)
    quality = np.ones(times.size, dtype=np.uint8)  # everything flagged
    labels = np.ones(times.size, dtype=bool)
    with pytest.raises(ValueError, match="eligible"):
        make_split(times, quality, labels, SamplingConfig(), "segment")
    with pytest.raises(ValueError, match="eligible"):
        make_split(times[:0], quality[:0], labels[:0], SamplingConfig(), "classify")
    with pytest.raises(ValueError, match="task must be"):
        make_split(times, quality, labels, SamplingConfig(), "detect")
    with pytest.raises(ValueError, match="equal length"):
        make_split(times, quality[:-1], labels, SamplingConfig(), "classify")
    one_night = dense_times(nights=1)
    with pytest.raises(ValueError, match="at least 3"):
        n = one_night.size
        make_split(one_night, np.zeros(n), np.ones(n, bool), SamplingConfig(), "segment")
    with pytest.raises(ValueError, match="sum to < 1"):
        SamplingConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="block must be"):
        SamplingConfig(block="week")


def test_json_round_trip() -> None:
    times = dense_times(nights=6)
    quality, labels = make_labels(times)
    sources = np.array([f"img_{i:05d}.fits" for i in range(times.size)])
    split = make_split(times, quality, labels, SamplingConfig(n_images=40), "classify", sources=sources)
    data = json.loads(json.dumps(split.to_json()))
    back = Split.from_json(data)
    for k in ("train", "val", "test"):
        assert np.array_equal(getattr(back, k), getattr(split, k))
        assert np.array_equal(back.times[k], times[getattr(split, k)])
        assert list(back.sources[k]) == list(sources[getattr(split, k)])
    assert back.config == split.config and back.task == "classify"
    with pytest.raises(ValueError, match="lacks"):
        Split.from_json({"train": []})


def test_stratified_split_puts_clear_and_cloudy_nights_in_test_and_val():
    # 20 nights, every 4th clear; a random split often leaves test or val without a clear night
    times = np.array([np.datetime64("2026-01-01T20:00") + np.timedelta64(d, "D") + np.timedelta64(m, "m")
                      for d in range(20) for m in range(0, 300, 30)])  # fmt: skip
    night = np.repeat(np.arange(20), 10)
    cloudy = night % 4 != 0
    for seed in range(10):
        cfg = SamplingConfig(n_images=200, min_gap_min=30, val_fraction=0.2, test_fraction=0.2, seed=seed)
        split = make_split(times, np.zeros(200), cloudy, cfg, "classify", score=cloudy.astype(float))
        for part in (split.val, split.test):
            assert cloudy[part].any() and (~cloudy[part]).any()
        assert not set(night[split.test]) & set(night[split.train])


def test_forced_test_split_and_eligibility_restriction() -> None:
    times = dense_times(nights=8)
    quality, labels = make_labels(times)
    nights = block_keys(times, "night")
    human = np.isin(nights, np.unique(nights)[[1, 2, 5, 6]]) & (np.arange(times.size) % 7 == 0)
    cfg = SamplingConfig(n_images=60, min_gap_min=20)
    split = make_split(times, quality, labels, cfg, "segment", test=human)
    eligible = (quality == 0) & labels & human
    assert np.array_equal(split.test, np.flatnonzero(eligible))  # every eligible marked image, no gap applied
    rest = np.concatenate([split.train, split.val])
    assert len(split.train) and len(split.val) and not np.isin(nights[rest], nights[split.test]).any()
    only = make_split(times, quality, labels, cfg, "segment", only=human)
    assert human[np.concatenate([only.train, only.val, only.test])].all()
    with pytest.raises(ValueError, match="no eligible image"):
        make_split(times, quality, labels, cfg, "segment", test=np.zeros(times.size, bool))
