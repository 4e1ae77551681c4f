"""The season benchmark's pure parts: the season plan, the disk check, the table and the curve."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_season = pytest.importorskip("bench_season")

MIB = 2**20


def stage(seconds: float, frames: int | None = None, rss: int = 100) -> dict:
    return {"seconds": seconds, "frames": frames, "client_rss": rss * MIB, "worker_rss": 2 * rss * MIB,
            "tree_rss": 3 * rss * MIB, "load": [1.0, 2.0]}  # fmt: skip


def entry(frames: int, scale: float) -> dict:
    nights, per = bench_season.season_plan(frames)
    season = nights * per
    return {
        "frames": frames, "shape": [64, 80], "nights": nights, "per_night": per, "season_frames": season,
        "synth_frames": season + per, "epochs": 1, "cores": 2, "date": "2026-12-02 07:00",
        "stages": {n: stage(scale * (i + 1), None if n == "train" else season) for i, n in enumerate(bench_season.SEASON)},
        "append": {"synth": {"seconds": 1.0, "frames": per, "estimated": True},
                   **{n: stage(2.0, per) for n in bench_season.APPEND}},
        "new_version": {n: stage(3.0, season + per if n == "reprocess" else None) for n in bench_season.NEW_VERSION},
        "archive_bytes": 2 * 64 * 80 * (season + per), "truth_bytes": 64 * 80 * (season + per) // 10,
        "store_bytes": 3 * 64 * 80 * season, "store_files": 40, "metadata_bytes": 4096, "root_metadata_bytes": 2048,
        "after_append": {"store_bytes": 0, "store_files": 44, "metadata_bytes": 4096, "root_metadata_bytes": 3072},
    }  # fmt: skip


def test_season_plan_makes_nights_of_at_most_12_hours():
    assert bench_season.season_plan(65000) == (91, 715)
    assert bench_season.season_plan(7200) == (10, 720)
    assert bench_season.season_plan(1000) == (5, 200)  # at least 5 nights: train splits by night


def test_disk_check_says_where_a_season_too_big_would_stop():
    per_pixel = bench_season.bytes_per_pixel({"s": entry(1000, 1.0)})
    assert per_pixel == pytest.approx({"archive": 2.0, "truth": 0.1, "store": 3.0}, rel=0.01)
    pixels = 512 * 640
    assert bench_season.disk_check(1000, (512, 640), 100 * 2**30, per_pixel) is None
    free = int(65520 * pixels * 2.1 / 0.9 * 1.1)  # the archive fits, the store does not
    message = bench_season.disk_check(65000, (512, 640), free, per_pixel)
    assert "would stop in ingest/prepare/reprocess (store)" in message
    fits = int(message.rsplit("~", 1)[1].split()[0])
    assert 0.4 * 65000 < fits < 0.5 * 65000  # 2.31 of the 5.1 bytes/pixel


def test_table_has_every_stage_and_the_totals():
    text = bench_season.summary(entry(1000, 10.0))
    lines = text.splitlines()
    assert "1000 frames of 64x80 (5 nights x 200)" in lines[0]
    ingest = next(line for line in lines if line.startswith("season") and " ingest " in line)
    assert ingest.split()[2:5] == ["1000", "20.0", "50.0"]  # frames, wall s, frames/s (no inner s)
    core = next(line for line in lines if "ingest+prepare+reprocess" in line)
    assert core.split()[3:] == ["100.0", "10.0"]  # 20 + 30 + 50 s, 1000 frames in them
    assert next(line for line in lines if line.startswith("a) +1 night") and "total" in line).split()[-1] == "7.0"
    assert "root zarr.json 2 KiB; 3 KiB after the append" in lines[-1]


def test_plot_writes_a_log_log_curve(tmp_path):
    results = {f"{n}": entry(n, n / 100) for n in (1000, 5000)}
    out = bench_season.plot(results, tmp_path / "curve.png")
    assert out.stat().st_size > 10_000


def test_an_incomplete_entry_tables_and_plots_its_finished_stages(tmp_path):
    partial = entry(1000, 1.0)
    partial["complete"] = False
    for name in ("train", "reprocess", "report"):
        del partial["stages"][name]
    for name in ("append", "new_version", "after_append", "store_bytes"):
        del partial[name]
    text = bench_season.summary(partial)
    assert "INCOMPLETE" in text.splitlines()[0]
    assert [line.split()[1] for line in text.splitlines()[3:-1]] == ["synth", "ingest", "prepare"]
    assert text.splitlines()[-1].startswith("archive ")
    assert bench_season.bytes_per_pixel({"p": partial}) == bench_season.GUESS  # no store measured yet
    assert bench_season.plot({"a": partial, "b": entry(5000, 5.0)}, tmp_path / "c.png").exists()
