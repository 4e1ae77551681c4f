"""Orientation and line-of-sight figures of issue 19 on a synthetic season with the Moon (known truth).

    python benchmarks/bench_sightline.py OUT [--shape 256 320] [--nights 12] [--per-night 16] [--mirror]
                                             [--north-deg -40] [--tilt 1.0 60] [--pointings 1000]

Renders a season at La Palma from 2026-01-22 (waxing Moon in the evening) with a known north, mirror and tilt,
ingests and prepares it, fits the orientation (``orient_store``) and prints: north, mirror and tilt against the
truth, the residual of the sightings, the angle between the fitted and the true direction of every sky pixel,
what the forced wrong mirror says; then the sightline verdicts of random pointings against the renderer's truth,
(a) on the true masks with the true camera (the geometry of ``sightline`` alone) and (b) on prepare's masks with
the fitted orientation (the whole chain), on the pointings whose true state is unambiguous; and the alt/az of
two stars against astropy. Writes OUT/orientation.png and OUT/track.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from skycase import SITE_CFG, camera_of, true_state, truth_dataset, write_season  # noqa: E402
from test_sightline import _random_pointings  # noqa: E402

from cirrus_batch import synth  # noqa: E402
from cirrus_batch.config import IngestConfig, OrientConfig, PrepareConfig, SightlineConfig  # noqa: E402
from cirrus_batch.ingest import ingest  # noqa: E402
from cirrus_batch.orientation import fit_orientation, search, separation_deg  # noqa: E402
from cirrus_batch.orientation import orient_store, sky_coords  # noqa: E402
from cirrus_batch.sightline import sightline, track_plot  # noqa: E402
from cirrus_batch.store import open_dataset  # noqa: E402


def _accuracy(res, masks: np.ndarray, cam, frames) -> tuple[float, int, Counter]:
    """Share of right verdicts among the unambiguous pointings, their number, and the wrong ones by
    (true state, verdict, altitude band)."""
    ok = {"clear": {"clear"}, "cloudy": {"cloudy"}, "hidden": {"below horizon", "behind obstacle"}}
    right = total = 0
    wrong: Counter = Counter()
    for k, i in enumerate(frames):
        f = res.frames[res.frames["pointing"] == k].iloc[0]
        state = true_state(cam, masks[i], f["alt_deg"], f["az_deg"], res.config.radius_deg)
        if state != "ambiguous":
            total += 1
            verdict = res.table["verdict"].iloc[k]
            right += verdict in ok[state]
            if verdict not in ok[state]:
                wrong[(state, verdict, "alt < 20" if f["alt_deg"] < 20 else "alt >= 20")] += 1
    return right / max(total, 1), total, wrong


def _wrong(wrong: Counter) -> str:
    return "; ".join(f"true {s} -> {v} ({a}): {n}" for (s, v, a), n in wrong.most_common()) or "none"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shape", type=int, nargs=2, default=(256, 320))
    p.add_argument("--nights", type=int, default=12)
    p.add_argument("--per-night", type=int, default=16)
    p.add_argument("--north-deg", type=float, default=-40.0)
    p.add_argument("--mirror", action="store_true")
    p.add_argument("--tilt", type=float, nargs=2, default=(1.0, 60.0))
    p.add_argument("--pointings", type=int, default=1000)
    args = p.parse_args()
    from distributed import Client, LocalCluster

    shutil.rmtree(args.out, ignore_errors=True)
    pointing = synth.Pointing(args.north_deg, args.mirror, *args.tilt)
    t0 = time.time()
    summary = write_season(args.out / "archive", pointing, shape=tuple(args.shape), nights=args.nights,
                           per_night=args.per_night)  # fmt: skip
    url = str(args.out / "season.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as c:
        ingest(str(summary.archive), url, c, IngestConfig(shard_size=32), progress=False)
        prepare_cfg = PrepareConfig(fit_images=80)
        from cirrus_batch.prepare import prepare

        prepare(url, c, prepare_cfg, progress=False)
    print(f"season: {args.nights} nights x {args.per_night} frames {tuple(args.shape)}, {time.time() - t0:.0f} s")
    t0 = time.time()
    fit = orient_store(url, SITE_CFG, OrientConfig(), panel=args.out / "orientation.png")
    print(f"orient: {time.time() - t0:.1f} s; {fit.summary()}")
    truth = truth_dataset(summary)
    a = truth.attrs["orientation"]
    o = fit.orientation
    tv = lambda t, az: t * np.array([np.sin(np.radians(az)), np.cos(np.radians(az))])  # noqa: E731
    print(f"truth: north {a['north_deg']:.2f}, mirror {a['mirror']}, tilt {a['tilt_deg']:.2f} towards "
          f"{a['tilt_azimuth_deg']:.0f}")  # fmt: skip
    print(f"errors: north {(o.north_deg - a['north_deg'] + 180) % 360 - 180:+.3f} deg, mirror "
          f"{'right' if o.mirror == a['mirror'] else 'WRONG'}, tilt vector "
          f"{np.hypot(*(tv(o.tilt_deg, o.tilt_azimuth_deg) - tv(a['tilt_deg'], a['tilt_azimuth_deg']))):.3f} deg "
          f"(against the optical axis of the renderer)")  # fmt: skip
    ds = open_dataset(url)
    cam = camera_of(summary, pointing)
    zen, az = sky_coords(ds)
    alt = 90 - zen
    from scipy import ndimage

    sky = ndimage.binary_erosion(cam.sky, iterations=2)
    d = separation_deg(alt.values[sky], az.values[sky], 90 - cam.theta[sky], np.degrees(cam.az[sky]))
    deg_px = 90.0 / (fit.lens.radius * fit.orientation.scale)  # equidistant housing camera
    print(f"every sky pixel, fitted vs true direction: median {np.median(d):.3f} deg, 95 % {np.percentile(d, 95):.3f}"
          f" deg, max {d.max():.3f} deg (1 px = {deg_px:.2f} deg)")  # fmt: skip
    found = search(ds["raw"].values[~ds["cloudy"].values], ds["time"].values[~ds["cloudy"].values],
                   ds["pixel_class"].values == 1, SITE_CFG, OrientConfig())  # fmt: skip
    lens = fit.lens
    wrong = fit_orientation(found, lens, OrientConfig(mirror="yes" if not o.mirror else "no"))
    print(f"forced wrong mirror: {wrong.warning or 'NO WARNING'}")
    targets, frames = _random_pointings(truth, args.pointings, seed=7)
    res = sightline(truth, targets, SightlineConfig())
    acc, n, wrong = _accuracy(res, truth["mask"].values, cam, frames)
    print(f"sightline, true masks + true camera: {acc:.2%} right of {n} unambiguous pointings ({len(targets)} drawn)"
          f"; wrong: {_wrong(wrong)}")  # fmt: skip
    t0 = time.time()
    res = sightline(ds, targets, SightlineConfig())
    acc, n, wrong = _accuracy(res, truth["mask"].values, cam, frames)
    print(f"sightline, prepare's masks + fitted orientation: {acc:.2%} right of {n} unambiguous pointings "
          f"({time.time() - t0:.1f} s for {len(targets)}); wrong: {_wrong(wrong)}")  # fmt: skip
    track_plot(ds, res, args.out / "track.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
