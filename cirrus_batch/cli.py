"""The ``cirrus`` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from cirrus_batch import __version__
from cirrus_batch.config import JobConfig, load_config
from cirrus_batch.errors import CirrusError

log = logging.getLogger("cirrus_batch")
TRACKING_HELP = ("MLflow tracking URI (default [train] tracking_uri, sqlite:///mlflow.db; a relative sqlite path is "
                 "relative to the store's folder)")  # fmt: skip


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table with aligned columns."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", help="job config (jobs/*.toml); default: the built-in defaults")
    p.add_argument(
        "--cluster",
        metavar="KIND",
        help="'local' (default), 'slurm', or a scheduler address tcp://host:port; overrides [cluster] kind",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, **overrides: Any) -> JobConfig:
    return load_config(args.config, {"cluster.kind": args.cluster, **overrides})


def _writer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, metavar="S",
                   help="seconds to wait while another command writes STORE ([lock] wait, 60)")


def _lock(args: argparse.Namespace, config: JobConfig, create: bool = False):
    """The store's writer lock for this command (waiting messages on stderr)."""
    from cirrus_batch.lock import StoreLock

    return StoreLock(args.store, args.command, config.lock, create=create,
                     on_wait=lambda message: print(f"cirrus: {message}", file=sys.stderr, flush=True))  # fmt: skip


def _tracking(config: JobConfig, store: str) -> str:
    """The tracking URI of ``store`` (a relative sqlite path is relative to the store's folder), printed; an
    unreachable tracking server is an error at once, and MLflow's HTTP retries are shortened."""
    from cirrus_batch.tracking import limit_retries, require_server, resolve_tracking_uri

    uri = resolve_tracking_uri(config.train.tracking_uri, store)
    require_server(uri)
    limit_retries()
    print(f"MLflow tracking: {uri}", flush=True)
    return uri


def _client(config: JobConfig):
    from cirrus_batch.cluster import connect

    return connect(config.cluster.kind, config.cluster)


# -- commands -------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from cirrus_batch import synth

    config = _config(args)
    kinds = args.kinds.split(",") if args.kinds else None
    with _client(config) if args.cluster else nullcontext() as client:
        summary = synth.write_archive(
            args.dest,
            nights=args.nights,
            per_night=args.per_night,
            cadence_min=args.cadence_min,
            shape=tuple(args.shape),
            seed=args.seed,
            kinds=[kinds[i % len(kinds)] for i in range(args.nights)] if kinds else None,
            compress=args.compress,
            truth=args.truth,
            client=client,
            progress=not args.no_progress,
            camera_kind=args.camera,
            ambtemp=not args.no_ambtemp,
            start=args.start,
            site=synth.Site(*args.site) if args.site else None,
            pointing=synth.Pointing(args.north_deg, args.mirror, *(args.tilt or (0.0, 0.0))),
        )
    print(table(summary.nights, ["night", "kind", "images"]))
    print(f"wrote {summary.n_images} images to {summary.archive}; true masks in {summary.truth}")
    if args.montage:
        print(f"montage: {synth.montage(args.dest, args.montage, truth=summary.truth)}")
    if args.matrix:
        print(f"camera x sky matrix: {synth.matrix(args.matrix, kinds=kinds, shape=tuple(args.shape), seed=args.seed)}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from cirrus_batch.ingest import NoImagesError, ingest

    config = _config(args, **{"ingest.shard_size": args.shard_size, "lock.wait": args.wait})
    try:
        with _lock(args, config, create=True), _client(config) as client:
            report = ingest(args.source, args.store, client, config.ingest, progress=not args.no_progress)
    except NoImagesError as exc:
        _print_rejections(exc.report.rejected)
        raise
    print(
        table(
            [
                ["files found", report.found],
                ["already in the store", report.already],
                ["same image as one in the store", report.copies],
                ["rejected earlier, unchanged", report.previously_rejected],
                ["ingested now", report.ingested],
                ["rejected now", len(report.rejected)],
                ["images in the store", report.total],
            ],
            ["ingest", "count"],
        )
    )
    if report.dropped_uncommitted:
        print(f"(repaired an interrupted ingest: {report.dropped_uncommitted} uncommitted images re-ingested)")
    _print_rejections(report.rejected)
    rate = report.ingested / report.seconds if report.seconds else 0.0
    print(f"{args.store}: {report.ingested} new images in {report.seconds:.1f} s ({rate:.0f} images/s)")
    if config.site.latitude_deg is not None:
        from cirrus_batch.site import store_site

        print(f"site: {store_site(args.store, config.site)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from cirrus_batch.prepare import evaluate_store, prepare

    config = _config(args, **{"prepare.labels": args.labels, "prepare.human.source": args.masks,
                              "lock.wait": args.wait})  # fmt: skip
    with _lock(args, config), _client(config) as client:
        report = prepare(args.store, client, config.prepare, refit=args.refit, progress=not args.no_progress)
        print(
            table(
                [
                    ["images in the store", report.images],
                    ["prepared now", report.prepared_now],
                    ["models fitted now", "yes" if report.fitted else "no (kept; --refit to fit again)"],
                    *[[f"flagged {name}", count] for name, count in report.flagged.items()],
                    ["cloudy", f"{report.cloudy} ({report.cloudy / report.images:.0%})"],
                    ["judged clear", report.images - report.cloudy],
                    ["human labels applied", report.labelled],
                    ["human masks imported", report.human_masks],
                    [f"masks of low confidence (< {config.prepare.low_confidence:g})", report.low_confidence],
                    *[[f"  because {name.replace('_', ' ')}", count] for name, count in report.reasons.items() if count],
                    *[[f"clear sky: {key}", value] for key, value in report.clear_sky.items()],
                ],
                ["prepare", "count"],
            )
        )
        print(f"{args.store}: prepared {report.prepared_now} images in {report.seconds:.1f} s")
        if args.evaluate:
            scores = evaluate_store(args.store, args.evaluate, client, config.prepare,
                                    panel=args.panel, progress=not args.no_progress)  # fmt: skip
            print()
            print(format_scores(scores))
            if args.panel:
                print(f"panel: {args.panel}")
    return 0


def cmd_orient(args: argparse.Namespace) -> int:
    from cirrus_batch.orientation import orient_store

    config = load_config(args.config, {"orient.mirror": args.mirror, "lock.wait": args.wait})
    with _lock(args, config):
        fit = orient_store(args.store, config.site, config.orient, panel=args.panel)
    print(fit.summary())
    if fit.warning:
        print(f"warning: {fit.warning}")
    print(f"orientation written to {args.store}; panel: {args.panel}")
    return 0


def cmd_sightline(args: argparse.Namespace) -> int:
    from cirrus_batch.sightline import sightline_store

    config = load_config(args.config, {"sightline.radius_deg": args.radius_deg, "sightline.gap_min": args.gap_min})
    result = sightline_store(args.store, args.targets, config.sightline, site=config.site, out=args.out,
                             plot=args.plot)  # fmt: skip
    print(table(result.counts(), ["verdict", "pointings"]))
    print(f"wrote {result.csv} and {result.zarr}" + (f"; track plot {result.plot}" if result.plot else ""))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cirrus_batch.prepare import calibrate

    config = _config(args)
    with _client(config) as client:
        geom = calibrate(args.store, client, config.prepare, args.panel)
    attrs = geom.to_attrs()
    print(table([[k, v] for k, v in attrs.items()], ["geometry", "value"]))
    print(f"panel: {args.panel}")
    print("\nput this in the job config to reproduce the circle and projection:\n")
    print(geom.config_block())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = _config(args, **{"train.tracking_uri": args.tracking_uri, "train.epochs": args.epochs})
    config.train.tracking_uri = _tracking(config, args.store)
    from cirrus_batch.train import train, train_on_cluster

    tasks = ["classify", "segment"] if args.task == "both" else [args.task]
    on_cluster = config.cluster.kind != "local"  # local: train in this process (progress bars, Ctrl-C)
    rows = []
    with _client(config) if on_cluster else nullcontext() as client:
        results = [
            train_on_cluster(client, args.store, task, config.train, resume=args.resume, truth=args.truth)
            if on_cluster else train(args.store, task, config.train, resume=args.resume,
                                     progress=not args.no_progress, truth=args.truth)
            for task in tasks
        ]  # fmt: skip
    for task, result in zip(tasks, results):
        t = result.test
        rows.append([task, result.epochs_run, *(result.split_sizes[k] for k in ("train", "val", "test")),
                     *(f"{t[k]:.3f}" for k in ("accuracy", "f1", "iou", "roc_auc", "ece_adaptive")),
                     f"{result.seconds:.0f} s", result.registered_version or "-"])  # fmt: skip
        print(f"{task}: MLflow run {result.run_id}, model {result.model_uri}, temperature {result.temperature:.3f}")
        if result.promotion:
            print(f"  {result.promotion}")
        if args.truth:
            print(f"  against the true {'masks' if task == 'segment' else 'labels'}: network "
                  f"IoU {t['truth_iou']:.3f} F1 {t['truth_f1']:.3f} accuracy {t['truth_accuracy']:.3f} "
                  f"ECE (equal-mass bins) {t['truth_ece_adaptive']:.3f}; its training labels IoU "
                  f"{t['labels_truth_iou']:.3f} "
                  f"accuracy {t['labels_truth_accuracy']:.3f}"
                  + (f"; on the {t['truth_sky_coverage']:.1%} of the true sky where cloud_prob is given"
                     if "truth_sky_coverage" in t else ""))  # fmt: skip
    print(table(rows, ["task", "epochs", "train", "val", "test", "accuracy", "F1", "IoU", "AUC", "ECE (eq. mass)",
                       "time", "version"]))  # fmt: skip
    print(f"compare runs: mlflow ui --backend-store-uri {config.train.tracking_uri} --host 127.0.0.1")
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    config = _config(args, **{"train.tracking_uri": args.tracking_uri, "reprocess.classifier": args.classifier,
                              "reprocess.unet": args.unet, "lock.wait": args.wait})  # fmt: skip
    tracking = _tracking(config, args.store)
    from cirrus_batch.reprocess import models_by_task, reprocess, resolve_model

    chosen = models_by_task(args.model or [], tracking)
    for task, option in (("classify", args.classifier), ("segment", args.unet)):
        if task in chosen and option:
            flag = "--classifier" if task == "classify" else "--unet"
            raise CirrusError(f"--model {chosen[task]} and {flag} {option} both give the {flag[2:]}: give one")
    classifier = chosen.get("classify", config.reprocess.classifier)
    unet = chosen.get("segment", config.reprocess.unet)
    for uri in (classifier, unet):  # a bad URI fails before a cluster starts
        print(f"{uri} -> {resolve_model(uri, tracking).label}", flush=True)
    with _lock(args, config), _client(config) as client:
        report = reprocess(args.store, client, classifier, unet, config.reprocess, force=args.force,
                           progress=not args.no_progress, tracking_uri=tracking)  # fmt: skip
    print(
        table(
            [
                ["images in the store", report.images],
                ["processed now", report.processed],
                ["already done by these models", report.skipped],
                ["classified cloudy", f"{report.cloudy} ({report.cloudy / report.images:.0%})"],
                ["classifier", f"{report.classifier.label} (run {report.classifier.run_id})"],
                ["U-Net", f"{report.unet.label} (run {report.unet.run_id})"],
            ],
            ["reprocess", "count"],
        )
    )
    rate = report.processed / report.seconds if report.seconds else 0.0
    print(f"{args.store}: reprocessed {report.processed} images in {report.seconds:.1f} s ({rate:.1f} images/s)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from cirrus_batch.remove import remove

    config = load_config(args.config, {"lock.wait": args.wait})
    with _lock(args, config):
        report = remove(args.store, args.source or [], args.time or [], reason=args.reason or "")
    if report.removed:
        print(table(report.removed, ["removed image", "time"]))
    print(f"{args.store}: removed {len(report.removed)} images; {report.total} left")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    config = load_config(args.config, {"train.tracking_uri": args.tracking_uri})
    from cirrus_batch.report import report

    out = args.out or f"{args.store.rstrip('/').removesuffix('.zarr')}-report"
    result = report(args.store, out, tracking_uri=_tracking(config, args.store), experiment=config.train.experiment)
    rows = [[r.night, r.images, r.clear_images, f"{r.clear_hours:.2f}", f"{r.mean_cloud_fraction:.3f}"]
            for r in result.nights]  # fmt: skip
    print(table(rows, ["night", "images", "clear images", "clear hours", "mean cloud fraction"]))
    if result.processed < result.images:
        print(f"({result.images - result.processed} images not reprocessed yet: run `cirrus reprocess {args.store}`)")
    print(f"report: {result.out_dir / 'report.md'} ({len(result.files)} files); MLflow run {result.run_id} "
          f"(experiment {config.train.experiment}-reports)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import optuna

    from cirrus_batch.tune import TRIAL_HEADER, best_summary, trial_rows, tune

    optuna.logging.set_verbosity(optuna.logging.DEBUG if args.verbose else optuna.logging.WARNING)
    config = _config(args, **{"tune.trials": args.trials, "tune.study_name": args.study, "tune.storage": args.storage,
                              "tune.timeout": args.timeout, "tune.retrain_best": False if args.no_retrain else None,
                              "train.tracking_uri": args.tracking_uri})  # fmt: skip
    config.train.tracking_uri = _tracking(config, args.store)
    with _client(config) as client:
        result = tune(args.store, args.task, config.train, config.tune, client, progress=not args.no_progress)
    print(table(trial_rows(result.trials), TRIAL_HEADER))
    print(f"study {result.study_name} in {result.storage}: {result.ran} trials run now in {result.seconds:.0f} s; "
          f"{result.direction} {result.metric}")  # fmt: skip
    print(best_summary(result))
    print(f"compare runs: mlflow ui --backend-store-uri {config.train.tracking_uri} --host 127.0.0.1")
    return 0 if result.best is not None else 1


def cmd_promote(args: argparse.Namespace) -> int:
    from cirrus_batch.registry import promote
    from cirrus_batch.train import REGISTERED

    config = load_config(args.config, {"train.tracking_uri": args.tracking_uri})
    tracking = _tracking(config, args.store)
    tasks = ["classify", "segment"] if args.task == "both" else [args.task]
    if args.version and len(tasks) > 1:
        raise CirrusError("--version names one model's version: give --task classify or --task segment")
    for task in tasks:
        result = promote(tracking, REGISTERED[task], args.version, args.store, force=args.force)
        print(result.summary)
    return 0


def cmd_cluster_script(args: argparse.Namespace) -> int:
    from cirrus_batch.cluster import job_script

    config = _config(args)
    if args.cluster not in (None, "slurm"):
        raise CirrusError(f"cluster-script prints the SLURM worker job script; --cluster {args.cluster!r} has none")
    print(job_script(config.cluster, **({"scheduler": args.scheduler} if args.scheduler else {})), end="")
    return 0


def format_scores(scores: dict[str, Any]) -> str:
    """Mask-quality table: overall and per kind of night."""
    import numpy as np

    rows = [["all", scores["n_frames"], *(f"{scores[k]:.3f}" for k in ("iou", "f1", "precision", "recall"))]]
    for kind, s in scores["per_kind"].items():
        if np.isnan(s["recall"]):  # no true cloud on these frames: only false alarms count
            rows.append([kind, s["n_frames"], "(no cloud)", "", "", ""])
        else:
            rows.append([kind, s["n_frames"], *(f"{s[k]:.3f}" for k in ("iou", "f1", "precision", "recall"))])
    text = table(rows, ["night kind", "frames", "IoU", "F1", "precision", "recall"])
    if "accuracy" in scores:  # against human masks
        text += f"\npixel accuracy: {scores['accuracy']:.3f} (labelled pixels of the {scores['truth']})"
    return (
        f"{text}\nclear frames: {scores['n_clear_frames']}, sky pixels marked cloud on them: "
        f"{scores['clear_false_alarm']:.4%}\ncloudy-label accuracy: {scores['label_accuracy']:.2%}"
    )


def _print_rejections(rejected: Sequence[Any], limit: int = 30) -> None:
    if not rejected:
        return
    print()
    print(table([[r.source, r.reason] for r in rejected[:limit]], ["rejected file", "reason"]))
    if len(rejected) > limit:
        print(f"... and {len(rejected) - limit} more (full list: cirrus info STORE --rejections)")


def cmd_export(args: argparse.Namespace) -> int:
    from cirrus_batch.export import export

    result = export(args.store, args.out, args.vars or [], args.time or [])
    print(f"{result.path}: {result.images} images, {len(result.variables)} variables ({', '.join(result.variables)})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from cirrus_batch.status import status_rows, store_status
    from cirrus_batch.store import open_rejections

    status = store_status(args.store, load_config(args.config).prepare)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(table(status_rows(status), ["store", args.store]))
    rej = open_rejections(args.store)
    if args.rejections and rej.sizes["rejection"]:
        print()
        print(table(list(zip(rej["source"].values, rej["reason"].values)), ["rejected file", "reason"]))
    elif rej.sizes["rejection"]:
        print(f"(the rejected files and why: cirrus info {args.store} --rejections)")
    return 0


# -- parser ---------------------------------------------------------------------------------------
DESCRIPTION = ("CIRRUS: long-wave infrared all-sky camera archives into cloud masks, cloudy labels and per-pixel "
               "cloud probabilities (zarr store, Dask, MLflow)")
WORKFLOW = """workflow:
  cirrus synth ARCHIVE            a synthetic archive (or use your camera's)
  cirrus ingest ARCHIVE S.zarr    FITS/PNG/TIFF files into the zarr store (incremental)
  cirrus prepare S.zarr           sky geometry, clear-sky model, masks, labels
  cirrus train S.zarr             classifier and U-Net (MLflow, registered models)
  cirrus reprocess S.zarr         every image through the champion models
  cirrus report S.zarr            the season report
  cirrus info S.zarr              where the store stands, at any step
  cirrus export S.zarr OUT.nc     the store, or part of it, for NetCDF tools (OUT.csv: per-image table)

cirrus COMMAND --help: the options of a command."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's lines; appends each option's default where it has one (not for flags or unset ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _command(sub: Any, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line ``summary`` is both its line in ``cirrus --help`` and its description."""
    return sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)


def _store(p: argparse.ArgumentParser, what: str = "the zarr store (path or URL)") -> None:
    p.add_argument("store", metavar="STORE", help=what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cirrus", description=DESCRIPTION, epilog=WORKFLOW,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"cirrus {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "synth", "write a synthetic LWIR all-sky archive (FITS) with true cloud masks")
    p.add_argument("dest", metavar="ARCHIVE", help="archive root directory to create")
    p.add_argument("--nights", type=int, default=5, help="nights to render")
    p.add_argument("--per-night", type=int, default=60, help="images per night")
    p.add_argument("--cadence-min", type=float, default=2.0, help="minutes between images")
    p.add_argument("--shape", type=int, nargs=2, default=(512, 640), metavar=("H", "W"), help="image size in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same archive)")
    p.add_argument(
        "--kinds",
        help="comma-separated sky kind per night (clear-dry,broken,cirrus,overcast,mixed,clear-humid,fog,"
        "arriving); default: cycle through all",
    )
    p.add_argument(
        "--camera", default="housing", choices=("housing", "darkrim", "clipped", "ortho"), help="camera kind"
    )
    p.add_argument("--no-ambtemp", action="store_true", help="leave AMBTEMP out of the FITS headers")
    p.add_argument("--start", default="2026-01-05", help="evening date of the first night")
    p.add_argument("--site", type=float, nargs=3, metavar=("LAT", "LON", "ELEV"),
                   help="render the Sun and the Moon where they are for this site (deg, deg east, m)")
    p.add_argument("--north-deg", type=float, help="image position angle of north (deg, counterclockwise from up; "
                   "clockwise with --mirror); default: drawn from the seed")
    p.add_argument("--mirror", action="store_true", help="east-west mirrored image (east clockwise of north)")
    p.add_argument("--tilt", type=float, nargs=2, metavar=("DEG", "AZ"),
                   help="optical axis tilted by DEG from the zenith towards azimuth AZ")
    p.add_argument("--compress", action="store_true", help="write tile-compressed .fits.fz")
    p.add_argument("--truth", help="true-mask zarr store (default: ARCHIVE_truth.zarr beside the archive)")
    p.add_argument("--montage", metavar="PNG", help="also write a montage of frames (one per sky kind) and true masks")
    p.add_argument("--matrix", metavar="PNG", help="also write one frame per camera kind x sky kind (in memory)")
    _common(p)
    p.set_defaults(func=cmd_synth)

    p = _command(sub, "ingest", "add the new image files of SOURCE to the zarr STORE")
    p.add_argument("source", metavar="SOURCE", help="archive directory, glob, or fsspec URL (http://, webdav://, "
                   "s3://, ...)")  # fmt: skip
    _store(p, "zarr store path or URL (created on first ingest)")
    p.add_argument("--shard-size", type=int, help="images per shard of a new store ([ingest] shard_size, 100)")
    _writer(p)
    _common(p)
    p.set_defaults(func=cmd_ingest)

    p = _command(sub, "prepare", "sky geometry, clear-sky model, ground-truth masks and cloudy labels")
    _store(p)
    p.add_argument("--labels", metavar="CSV", help="human labels (source,label) that override the threshold")
    p.add_argument("--masks", metavar="SOURCE", help="hand-drawn masks (directory, glob or CSV source,mask_path) "
                   "to import beside the astropy masks; values mapped by [prepare.human]")
    p.add_argument("--refit", action="store_true", help="fit the models again and recompute every image")
    p.add_argument("--evaluate", metavar="TRUTH", help="score the masks against a true-mask store (cirrus synth) or "
                   "a store with human masks (this one too), on their labelled pixels")
    p.add_argument("--panel", metavar="PNG", help="with --evaluate: raw / clear sky / residual / mask / truth panel")
    _writer(p)
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = _command(sub, "orient", "fit the camera's orientation (north, mirror, tilt, radial scale) to the Sun and the "
                 "Moon in clear frames; written to the store")  # fmt: skip
    _store(p)
    p.add_argument("--mirror", choices=("auto", "yes", "no"), help="force the east-west mirror ([orient] mirror)")
    p.add_argument("--panel", metavar="PNG", default="orientation.png", help="predicted vs found positions")
    p.add_argument("--config", metavar="TOML", help="job config ([site], [orient], [lock])")
    _writer(p)
    p.set_defaults(func=cmd_orient)

    p = _command(sub, "sightline", "was the sky clear between the telescope and its targets? (CSV of pointings)")
    _store(p)
    p.add_argument("--targets", required=True, metavar="CSV",
                   help="pointings: start (UTC), exposure_s, and ra_deg,dec_deg (ICRS) or alt_deg,az_deg; name optional")
    p.add_argument("--out", metavar="PREFIX", help="output prefix (default: the targets file without .csv, plus "
                   "-sightline): PREFIX.csv, PREFIX.nc")
    p.add_argument("--plot", metavar="PNG", help="track of the first target with data over a frame's cloud map")
    p.add_argument("--radius-deg", type=float, help="look for cloud within this angle ([sightline] radius_deg, 2)")
    p.add_argument("--gap-min", type=float, help="nearest frame within this many minutes ([sightline] gap_min, 10)")
    p.add_argument("--config", metavar="TOML", help="job config ([sightline]; [site] when the store has none)")
    p.set_defaults(func=cmd_sightline)

    p = _command(sub, "calibrate", "fit the sky geometry (image circle, projection, pixel classes), write a panel and "
                 "print the [prepare.sky] block")  # fmt: skip
    _store(p)
    p.add_argument("--panel", metavar="PNG", default="geometry.png", help="the geometry panel")
    _common(p)
    p.set_defaults(func=cmd_calibrate)

    p = _command(sub, "train", "train the clear/cloudy classifier and/or the cloud U-Net (MLflow)")
    _store(p)
    p.add_argument("--task", choices=["classify", "segment", "both"], default="both", help="which network")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    p.add_argument("--epochs", type=int, help="overrides [train] epochs")
    p.add_argument("--tracking-uri", metavar="URI", help=TRACKING_HELP)
    p.add_argument("--truth", metavar="TRUTH", help="also score the test images against a true-mask store")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = _command(sub, "reprocess", "classify and segment every image with the trained models (MLflow)")
    _store(p)
    p.add_argument("--classifier", metavar="URI", help="classifier model URI (default [reprocess] classifier: "
                   "models:/cirrus-classifier@champion); also models:/NAME/VERSION, models:/NAME/latest, runs:/ID/model")
    p.add_argument("--unet", metavar="URI", help="U-Net model URI (default [reprocess] unet: "
                   "models:/cirrus-unet@champion)")
    p.add_argument("--model", metavar="URI", action="append",
                   help="a model URI used as classifier or U-Net by the task in its metadata (repeatable)")
    p.add_argument("--force", action="store_true", help="recompute every image, also those done by these models")
    p.add_argument("--tracking-uri", metavar="URI", help=TRACKING_HELP)
    _writer(p)
    _common(p)
    p.set_defaults(func=cmd_reprocess)

    p = _command(sub, "remove", "remove images (and their derived values) from STORE, recorded in its history")
    _store(p)
    p.add_argument("--source", metavar="PATTERN", action="append",
                   help="source path as stored (fnmatch pattern: '2026/20260105/*'); repeatable")
    p.add_argument("--time", metavar="T", action="append",
                   help="DATE-OBS (to the precision given: 2099-01-01 is that day) or range T1/T2; repeatable")
    p.add_argument("--reason", help="why (kept in the history and the rejection log)")
    p.add_argument("--config", metavar="TOML", help="job config ([lock])")
    _writer(p)
    p.set_defaults(func=cmd_remove)

    p = _command(sub, "report", "season report: cloud fraction per night, clear hours, example frames (MLflow)")
    _store(p)
    p.add_argument("--out", metavar="DIR", help="report folder (default: STORE without .zarr, plus -report)")
    p.add_argument("--config", metavar="TOML", help="job config ([train] tracking_uri and experiment)")
    p.add_argument("--tracking-uri", metavar="URI", help=TRACKING_HELP)
    p.set_defaults(func=cmd_report)

    p = _command(sub, "tune", "Optuna hyperparameter search on the Dask workers (MLflow), best model registered")
    _store(p)
    p.add_argument("--task", choices=["segment", "classify"], default="segment", help="which network")
    p.add_argument("--trials", type=int, help="finished trials wanted in the study, earlier runs' included ([tune] trials)")
    p.add_argument("--study", help="study name (default [tune] study_name, else cirrus-TASK); the same name continues it")
    p.add_argument("--storage", help="Optuna storage: sqlite:///optuna.db (default), postgresql+psycopg2://..., journal:PATH")
    p.add_argument("--timeout", type=float, metavar="S", help="start no new trial after S seconds")
    p.add_argument("--no-retrain", action="store_true", help="register the best trial's model instead of retraining it")
    p.add_argument("--tracking-uri", metavar="URI", help=TRACKING_HELP)
    _common(p)
    p.set_defaults(func=cmd_tune)

    p = _command(sub, "promote", "make a registered version the champion if it beats the current one")
    _store(p, "the store whose test images both models are scored on (the one trained on)")
    p.add_argument("--task", choices=["classify", "segment", "both"], default="both", help="which network")
    p.add_argument("--version", help="the candidate version (default: the newest)")
    p.add_argument("--force", action="store_true", help="make it champion whatever the scores (recorded in its tags)")
    p.add_argument("--config", metavar="TOML", help="job config ([train] tracking_uri)")
    p.add_argument("--tracking-uri", metavar="URI", help=TRACKING_HELP)
    p.set_defaults(func=cmd_promote)

    p = _command(sub, "cluster-script", "print the SLURM job script of a Dask worker (--cluster slurm)")
    p.add_argument("--config", metavar="TOML", help="job config ([cluster.slurm]); unset: jobqueue.slurm.* dask config")
    p.add_argument("--cluster", metavar="KIND", help="only 'slurm' has a job script")
    p.add_argument("--scheduler", metavar="ADDRESS", help="scheduler address to show (default: a placeholder)")
    p.set_defaults(func=cmd_cluster_script)

    p = _command(sub, "info", "where a store stands: images, nights, prepared and reprocessed images, models, stale "
                 "arrays, rejected files")  # fmt: skip
    _store(p)
    p.add_argument("--rejections", action="store_true", help="list every rejected file")
    p.add_argument("--json", action="store_true", help="the same as JSON, for scripts")
    p.add_argument("--config", metavar="TOML", help="job config whose [prepare] settings the stale arrays are judged "
                   "by (default: built-in defaults)")
    p.set_defaults(func=cmd_info)

    p = _command(sub, "export", "write per-image variables to CSV, or any variables to NetCDF")
    _store(p)
    p.add_argument("out", metavar="OUT", help="OUT.nc (NetCDF-4, compressed, CF) or OUT.csv (one row per image)")
    p.add_argument("--vars", nargs="+", metavar="VAR", help="variables to write (default: all; CSV: the per-image ones)")
    p.add_argument("--time", metavar="T", action="append",
                   help="images at DATE-OBS T (to the precision given: 2026-01-05 is that day) or in range T1/T2; "
                        "repeatable (default: all)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("distributed", "alembic", "urllib3"):  # their INFO chatter hides ours
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if args.verbose else "WARNING")  # set on mlflow import
    # distributed sets its loggers from the dask config when it is imported (later, lazily); not an environment
    # variable, which SLURM would pass on to the worker jobs
    import dask

    dask.config.set({"logging.distributed": "debug" if args.verbose else "warning"})
    try:
        return args.func(args)
    except CirrusError as exc:
        print(f"cirrus: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a read-only store, a full disk: one line naming the path
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"cirrus: error: {exc.strerror or exc}{where}; what was committed is kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cirrus: interrupted; what was committed is kept (images, blocks, checkpoints, finished trials): "
              "run again to continue", file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(main())
