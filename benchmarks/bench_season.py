"""A whole season end to end, as a user runs it: every stage a ``cirrus`` command in a subprocess.

1. ``cirrus synth`` writes a season of ``--frames`` frames of ``--shape`` (one frame a minute, nights of at most
   720 frames = 12 h: 65 000 frames are 91 nights of 715; at least 5 nights, for train's split by night) plus one
   more night, held out of the archive for (a);
   ``--reuse`` keeps an archive written before with the same parameters (its synth time then is the first one's).
2. The season: ``cirrus ingest``, ``prepare`` (``jobs/default.toml``, the local Dask cluster), ``train --task
   both`` (``jobs/train.toml``: its sample of ``n_images = 1000`` frames at least 6 min apart, ``--epochs``
   epochs, in the command's own process as on the embedded default), ``reprocess`` (the champions) and
   ``report``.
3. (a) A night more: the held-out night put back into the archive, then ``ingest``, ``prepare``, ``reprocess``
   (each works on the new images only); its synth cost is the season's synth time per frame (one ``synth``
   call wrote it with the season, so that it is the same camera).
4. (b) A new model version: ``train`` again (registers version 2), ``promote --force`` (the champion), then
   ``reprocess`` (every image: the models changed).

Each command's wall time (process start, imports and cluster start included), frames/s, and the peak RSS of the
command's process (the client) and of its child processes (the Dask workers; train's DataLoader worker), sampled
with psutil every ``--interval`` s, with the largest child's peak of RSS less its file-backed and shared pages
(``(not file)``: the memory the process itself allocated); the store's size on disk, file count and metadata
bytes. Results go to ``--json`` (one entry per size, kept across runs) and a table; ``--plot PNG`` draws seconds
vs frames per stage (log-log) from every entry of ``--json`` and of ``--results`` files; ``--table-only`` runs
nothing.

The disk is checked first: the archive, its truth store and the store must fit (per-frame sizes from an earlier
entry of ``--json``, scaled by pixels, else an estimate); if they do not, it says at which frame count it
would stop and exits.

    python benchmarks/bench_season.py [--frames 65000] [--shape 512 640] [--epochs 3] [--reuse] [--clean]
        [--workdir bench-out/season] [--json bench-out/season/season.json] [--plot season.png]
    python benchmarks/bench_season.py --table-only --json a.json --results b.json --plot season.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_prepare import RssPeaks

REPO = Path(__file__).resolve().parents[1]
PER_NIGHT = 720  # one frame a minute, 12 h
MIN_NIGHTS = 5  # train splits by night: train, val and test need one each at least
MIB, GIB = 2**20, 2**30
SEASON = ("synth", "ingest", "prepare", "train", "reprocess", "report")
APPEND = ("ingest", "prepare", "reprocess")
NEW_VERSION = ("train", "promote", "reprocess")
# bytes per pixel on disk when no earlier entry measured them: uint16 FITS, truth masks, store (raw + derived)
GUESS = {"archive": 2.0, "truth": 0.1, "store": 2.5}


def season_plan(frames: int) -> tuple[int, int]:
    """(nights, frames per night): nights of at most 720 one-minute frames, at least 5 nights (shorter ones for a
    small season), about ``frames`` in all."""
    nights = max(MIN_NIGHTS, math.ceil(frames / PER_NIGHT))
    return nights, math.ceil(frames / nights)


def du(path: Path) -> tuple[int, int]:
    """Bytes and number of files under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return sum(p.stat().st_size for p in files), len(files)


def store_metadata(store: Path) -> dict[str, int]:
    """Size of the store on disk, its files, and its metadata (``zarr.json`` files, the root one alone)."""
    size, files = du(store)
    meta = list(store.rglob("zarr.json"))
    return {"store_bytes": size, "store_files": files, "metadata_bytes": sum(p.stat().st_size for p in meta),
            "root_metadata_bytes": (store / "zarr.json").stat().st_size}  # fmt: skip


def bytes_per_pixel(results: dict[str, Any]) -> dict[str, float]:
    """Disk bytes per frame pixel of the archive, its truth store and the store, from the largest entry measured."""
    done = [r for r in results.values() if "store_bytes" in r]
    if not done:
        return dict(GUESS)
    r = max(done, key=lambda r: r["season_frames"] * r["shape"][0] * r["shape"][1])
    pixels = r["shape"][0] * r["shape"][1]
    return {"archive": r["archive_bytes"] / (r["synth_frames"] * pixels),
            "truth": r["truth_bytes"] / (r["synth_frames"] * pixels),
            "store": r["store_bytes"] / (r["season_frames"] * pixels)}  # fmt: skip


def disk_check(frames: int, shape: tuple[int, int], free: int, per_pixel: dict[str, float],
               margin: float = 0.9) -> str | None:  # fmt: skip
    """None when a season of ``frames`` fits in ``margin`` of ``free`` bytes, else where it would stop."""
    pixels = shape[0] * shape[1]
    nights, per = season_plan(frames)
    synth = (nights + 1) * per
    need = {"synth (archive + truth)": synth * pixels * (per_pixel["archive"] + per_pixel["truth"]),
            "ingest/prepare/reprocess (store)": synth * pixels * per_pixel["store"]}  # fmt: skip
    total, budget, used = sum(need.values()), margin * free, 0.0
    for stage, nbytes in need.items():
        if used + nbytes > budget:
            fits = int(budget / (synth * pixels * sum(per_pixel.values())) * frames)
            return (f"{frames} frames of {shape[0]}x{shape[1]} need ~{total / GIB:.0f} GiB (archive "
                    f"{per_pixel['archive']:.2f}, truth {per_pixel['truth']:.2f}, store {per_pixel['store']:.2f} "
                    f"bytes/pixel) and {free / GIB:.0f} GiB are free: the run would stop in {stage} after "
                    f"~{max(0, (budget - used) / nbytes):.0%} of it; at most ~{fits} frames fit")  # fmt: skip
        used += nbytes
    return None


class Runner:
    """Runs ``cirrus`` commands in subprocesses in ``cwd``, timing them and sampling their process tree's RSS."""

    def __init__(self, cwd: Path, interval: float) -> None:
        self.cwd, self.interval, self.count = cwd, interval, 0
        (cwd / "logs").mkdir(parents=True, exist_ok=True)
        path = os.environ.get("PYTHONPATH")
        self.env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}

    def __call__(self, name: str, *argv: str, frames: int | None = None) -> dict[str, Any]:
        self.count += 1
        log = self.cwd / "logs" / f"{self.count:02d}-{name}.log"
        load = os.getloadavg()[0]
        with open(log, "w") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "cirrus_batch.cli", name, *argv], cwd=self.cwd,
                                    stdout=out, stderr=subprocess.STDOUT, env=self.env)  # fmt: skip
            with RssPeaks(interval=self.interval, pid=proc.pid) as peaks:
                rc = proc.wait()
            seconds = time.perf_counter() - t0
        text = log.read_text()
        if rc:
            sys.exit(f"cirrus {name} failed (exit {rc}); its output: {log}\n{text[-2000:]}")
        inner = re.findall(r" in ([0-9.]+) s\b", text)
        row = {"seconds": seconds, "frames": frames, "client_rss": peaks.client,
               "worker_rss": max(peaks.per_pid.values(), default=0), "children": len(peaks.per_pid),
               "worker_anon": max(peaks.anon.values(), default=0),
               "tree_rss": peaks.total, "load": [load, os.getloadavg()[0]], "log": str(log)}  # fmt: skip
        if inner:  # the command's own timing of its work (no process start, imports or cluster start)
            row["inner_seconds"] = float(inner[-1])
        print(f"  {name:10s} {seconds:8.1f} s" + (f" ({frames / seconds:.1f} frames/s)" if frames else "")
              + f"  client {peaks.client / MIB:.0f} MiB, max child {row['worker_rss'] / MIB:.0f} MiB"
              + f" ({row['worker_anon'] / MIB:.0f} not file-backed)", flush=True)
        return row


def night_dirs(archive: Path) -> list[Path]:
    """The archive's night folders (``YYYY/YYYYMMDD``), in date order."""
    return sorted((d for d in archive.glob("*/*") if d.is_dir()), key=lambda d: d.name)


def hold_out(archive: Path, held: Path) -> None:
    """Move the archive's last night into ``held`` (same relative path)."""
    last = night_dirs(archive)[-1]
    (held / last.relative_to(archive)).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(last, held / last.relative_to(archive))


def put_back(archive: Path, held: Path) -> None:
    """Move the nights in ``held`` back into the archive."""
    for night in night_dirs(held):
        (archive / night.relative_to(held)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(night, archive / night.relative_to(held))


def synth_archive(run: Runner, work: Path, frames: int, shape: tuple[int, int], reuse: bool) -> dict[str, Any]:
    """The season's archive plus one more night (reused when ``reuse`` and written with these parameters)."""
    nights, per = season_plan(frames)
    archive, stamp = work / "archive", work / "synth.json"
    put_back(archive, work / "held")  # an interrupted run held the night out
    params = {"nights": nights + 1, "per_night": per, "shape": list(shape), "seed": 1}
    if reuse and stamp.exists() and json.loads(stamp.read_text())["params"] == params:
        row = json.loads(stamp.read_text())["synth"]
        print(f"  synth      reused {archive} ({row['seconds']:.1f} s when written)", flush=True)
        return row
    for path in (archive, work / "archive_truth.zarr", stamp):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    row = run("synth", str(archive), "--nights", str(nights + 1), "--per-night", str(per), "--cadence-min", "1",
              "--shape", *map(str, shape), "--seed", "1", "--cluster", "local", "--no-progress",
              frames=(nights + 1) * per)  # fmt: skip
    stamp.write_text(json.dumps({"params": params, "synth": row}))
    return row


def run_season(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every stage on a season of ``args.frames`` frames; the result entry, handed to ``save`` after each stage
    (``complete`` false until the last)."""
    shape = (args.shape[0], args.shape[1])
    nights, per = season_plan(args.frames)
    work = (args.workdir / f"season-{args.frames}-{shape[0]}x{shape[1]}").absolute()
    work.mkdir(parents=True, exist_ok=True)
    for path in ("season.zarr", "season-report", "mlflow.db", "mlruns", "checkpoints", "logs"):
        p = work / path
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    run = Runner(work, args.interval)
    default, train_cfg = str(REPO / "jobs/default.toml"), str(REPO / "jobs/train.toml")
    store, archive, held = str(work / "season.zarr"), work / "archive", work / "held"
    cluster = ["--config", default, "--no-progress"]
    train = ["train", store, "--task", "both", "--config", train_cfg, "--epochs", str(args.epochs), "--no-progress"]
    season = nights * per
    print(f"season: {nights} nights x {per} frames = {season} frames of {shape[0]}x{shape[1]}, plus one night of "
          f"{per} held out for the append; {os.cpu_count()} cores; {work}", flush=True)  # fmt: skip
    stages: dict[str, Any] = {"synth": synth_archive(run, work, args.frames, shape, args.reuse)}
    result = {"frames": args.frames, "shape": list(shape), "nights": nights, "per_night": per,
              "season_frames": season, "synth_frames": (nights + 1) * per, "epochs": args.epochs,
              "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"), "complete": False, "stages": stages,
              "archive_bytes": du(archive)[0], "truth_bytes": du(work / "archive_truth.zarr")[0]}  # fmt: skip
    save(result)

    def step(part: dict[str, Any], name: str, *argv: str, frames: int | None = None) -> None:
        part[name] = run(*argv, frames=frames)
        save(result)

    hold_out(archive, held)
    try:
        step(stages, "ingest", "ingest", str(archive), store, *cluster, frames=season)
        step(stages, "prepare", "prepare", store, *cluster, frames=season)
        step(stages, "train", *train)
        step(stages, "reprocess", "reprocess", store, *cluster, frames=season)
        step(stages, "report", "report", store, "--config", train_cfg, frames=season)
    finally:
        put_back(archive, held)
    result |= store_metadata(work / "season.zarr")
    save(result)
    print("(a) one night more", flush=True)
    synth_rate = stages["synth"]["seconds"] / stages["synth"]["frames"]
    result["append"] = {"synth": {"seconds": synth_rate * per, "frames": per, "estimated": True}}
    for name in APPEND:
        step(result["append"], name, name, *((str(archive),) if name == "ingest" else ()), store, *cluster, frames=per)
    result["after_append"] = store_metadata(work / "season.zarr")
    save(result)
    print("(b) a new model version", flush=True)
    result["new_version"] = {}
    step(result["new_version"], "train", *train)
    step(result["new_version"], "promote", "promote", store, "--force", "--config", train_cfg)
    step(result["new_version"], "reprocess", "reprocess", store, *cluster, frames=season + per)
    result["complete"] = True
    save(result)
    if args.clean:
        for path in (archive, work / "archive_truth.zarr", work / "season.zarr", work / "synth.json"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return result


def key(result: dict[str, Any]) -> str:
    return f"{result['frames']}@{result['shape'][0]}x{result['shape'][1]}"


def load_results(paths: list[Path]) -> dict[str, Any]:
    """Entries of every results file (later files win on the same size)."""
    results: dict[str, Any] = {}
    for path in paths:
        if path.exists():
            results |= json.loads(path.read_text())
    return results


def rows(result: dict[str, Any]) -> list[list[str]]:
    """Table rows of one entry: the season's stages, then (a) and (b) with their totals."""

    def line(section: str, name: str, r: dict[str, Any]) -> list[str]:
        frames = r.get("frames")
        inner = r.get("inner_seconds")
        mib = (lambda k: f"{r[k] / MIB:.0f}" if k in r else "")
        return [section, name + (" (est.)" if r.get("estimated") else ""), str(frames or ""), f"{r['seconds']:.1f}",
                f"{inner:.1f}" if inner is not None else "", f"{frames / r['seconds']:.1f}" if frames else "",
                mib("client_rss"), mib("worker_rss"), mib("worker_anon"), mib("tree_rss")]  # fmt: skip

    stages = result["stages"]
    out = [line("season", n, stages[n]) for n in SEASON if n in stages]
    if all(n in stages for n in ("ingest", "prepare", "reprocess")):
        core = sum(stages[n]["seconds"] for n in ("ingest", "prepare", "reprocess"))
        out.append(["season", "ingest+prepare+reprocess", str(result["season_frames"]), f"{core:.1f}", "",
                    f"{result['season_frames'] / core:.1f}", "", "", "", ""])  # fmt: skip
    for section, name in (("a) +1 night", "append"), ("b) new model", "new_version")):
        part = result.get(name, {})
        out += [line(section, n, r) for n, r in part.items()]
        if part:
            out.append([section, "total", "", f"{sum(r['seconds'] for r in part.values()):.1f}", *[""] * 6])
    return out


HEADER = ["", "stage", "frames", "wall s", "inner s", "frames/s", "client MiB", "max child MiB", "(not file)",
          "tree MiB"]


def table(result: dict[str, Any]) -> str:
    cells = [HEADER] + rows(result)
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADER))]
    text = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def summary(result: dict[str, Any]) -> str:
    """The table under a line naming the size, with the disk figures below."""
    gib = (lambda b: f"{b / GIB:.2f} GiB")
    loads = [x for r in result["stages"].values() for x in r.get("load", [])]
    head = (f"{result['season_frames']} frames of {result['shape'][0]}x{result['shape'][1]} ({result['nights']} "
            f"nights x {result['per_night']}), train {result['epochs']} epochs, {result['cores']} cores, "
            f"{result['date']}, 1-min load {min(loads, default=0):.1f}-{max(loads, default=0):.1f}")  # fmt: skip
    disk = f"archive {gib(result['archive_bytes'])}, truth {gib(result['truth_bytes'])} (with the extra night)"
    if "store_bytes" in result:
        disk = (f"store {gib(result['store_bytes'])} in {result['store_files']} files, metadata "
                f"{result['metadata_bytes'] / 1024:.0f} KiB (root zarr.json {result['root_metadata_bytes'] / 1024:.0f} "
                f"KiB" + (f"; {result['after_append']['root_metadata_bytes'] / 1024:.0f} KiB after the append"
                          if "after_append" in result else "") + f"); {disk}")  # fmt: skip
    if not result.get("complete", True):
        head += " -- INCOMPLETE (stopped or still running)"
    return f"{head}\n{table(result)}\n{disk}"


def plot(results: dict[str, Any], out: Path) -> Path:
    """Seconds vs frames per season stage, log-log; one line style per image shape."""
    from cirrus_batch.plots import new_figure, save

    fig = new_figure(7.5, 5)
    ax = fig.add_subplot()
    shapes = sorted({tuple(r["shape"]) for r in results.values()})
    styles = ["-o", "--s", ":^", "-.v"]
    colors = dict(zip(SEASON, ["0.5", "C0", "C1", "C2", "C3", "C4"]))
    for shape, style in zip(shapes, styles):
        points = sorted((r for r in results.values() if tuple(r["shape"]) == shape), key=lambda r: r["frames"])
        for name in SEASON:
            label = f"{name} ({shape[0]}x{shape[1]})" if len(shapes) > 1 else name
            done = [r for r in points if name in r["stages"]]
            ax.plot([r["season_frames"] for r in done], [r["stages"][name]["seconds"] for r in done], style,
                    color=colors[name], label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("frames in the season")
    ax.set_ylabel("wall time of the command (s)")
    ax.set_title("cirrus commands on a synthetic season (local Dask cluster)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=65000, help="frames in the season (about: whole nights)")
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 640), metavar=("H", "W"))
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of each network (jobs/train.toml: 30)")
    parser.add_argument("--reuse", action="store_true", help="reuse the archive synthesized before for this size")
    parser.add_argument("--clean", action="store_true", help="delete the archive and the store afterwards")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/season"))
    parser.add_argument("--json", type=Path, help="results file, one entry per size (default WORKDIR/season.json)")
    parser.add_argument("--results", type=Path, nargs="*", default=[], help="more results files to table and plot")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="seconds vs frames per stage, log-log")
    parser.add_argument("--table-only", action="store_true", help="run nothing: table and plot the results files")
    args = parser.parse_args()
    args.json = args.json or args.workdir / "season.json"
    results = load_results([*args.results, args.json])
    if not args.table_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        shape = (args.shape[0], args.shape[1])
        free = shutil.disk_usage(args.workdir).free
        work = args.workdir / f"season-{args.frames}-{shape[0]}x{shape[1]}"
        reused = du(work)[0] if work.exists() else 0  # what a run of this size left there is freed or reused
        stop = disk_check(args.frames, shape, free + reused, bytes_per_pixel(results))
        if stop:
            sys.exit(stop)

        def save(result: dict[str, Any]) -> None:
            own = load_results([args.json])
            own[key(result)] = result
            args.json.write_text(json.dumps(own, indent=1))

        result = run_season(args, save)
        results[key(result)] = result
        print(summary(result))
        print(f"results: {args.json}")
    else:
        for result in sorted(results.values(), key=lambda r: (r["shape"], r["frames"])):
            print(summary(result), end="\n\n")
    if args.plot:
        print(f"curve: {plot(results, args.plot)}")


if __name__ == "__main__":
    main()
