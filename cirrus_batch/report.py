"""The season report of a reprocessed store, written to a folder and logged to MLflow.

Files: ``cloud_fraction.png`` (predicted cloud fraction through every night, with the astropy-mask fraction of
``cirrus prepare`` for comparison), ``clear_hours.csv`` (hours classified clear per night), ``examples.png``
(cloudy and clear frames with the U-Net probability overlaid), ``rejected.csv`` and ``flagged.csv`` (the
rejection log and the images ``cirrus prepare`` flagged), ``observer_nights.csv`` for an oriented store (``cirrus
orient``: hours with a clear line of sight above air mass 2 per night), and ``report.md`` that shows and lists them. A night is
the date of ``time − 12 h``. An image counts for the clear hours when it is classified clear and not flagged,
for the time to the next image of its night (capped at twice the night's median cadence, so gaps do not
count; the last image gets the median cadence).
"""

from __future__ import annotations

import csv
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import zarr
from matplotlib import colormaps

from cirrus_batch import plots
from cirrus_batch.normalization import normalize
from cirrus_batch.errors import StoreError
from cirrus_batch.prepare import QUALITY_BITS, UNPREPARED, Models, read_images
from cirrus_batch.sampling import block_keys
from cirrus_batch.store import NOT_COMPUTED, PROB_SCALE, UNPROCESSED, Store, json_attr
from cirrus_batch.tracking import require_tracking_store, resolve_tracking_uri, use_experiment

PANEL_COLUMNS = 4


@dataclass
class NightRow:
    """One row of ``clear_hours.csv``."""

    night: str
    images: int
    clear_images: int
    clear_hours: float
    observed_hours: float
    mean_cloud_fraction: float


@dataclass
class SeasonReport:
    """What :func:`report` wrote."""

    out_dir: Path
    images: int
    processed: int
    nights: list[NightRow]
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None
    tracking_uri: str = ""

    @property
    def clear_hours(self) -> float:
        return float(sum(row.clear_hours for row in self.nights))


@dataclass
class Season:
    """The per-image vectors the report needs (never the images)."""

    times: np.ndarray
    sources: np.ndarray
    nights: np.ndarray
    processed: np.ndarray
    p_cloudy: np.ndarray
    cloudy: np.ndarray
    fraction: np.ndarray
    mask_fraction: np.ndarray | None
    quality: np.ndarray | None
    models: list[dict[str, Any]]
    pred_model: np.ndarray

    @property
    def flagged(self) -> np.ndarray:
        """Images prepare found unusable (any quality flag)."""
        if self.quality is None:
            return np.zeros(len(self.times), bool)
        return (self.quality != 0) & (self.quality != UNPREPARED)

    @property
    def clear(self) -> np.ndarray:
        return self.processed & ~self.cloudy & ~self.flagged


def load_season(group: zarr.Group, store_url: str) -> Season:
    """The season's vectors; a clear error when it was never reprocessed."""
    n = int(group.attrs["committed"])
    if "pred_model" not in group or not (group["pred_model"][:n] != UNPROCESSED).any():
        raise StoreError(f"{store_url} has no predictions yet: run `cirrus reprocess {store_url}` first")
    times = np.asarray(group["time"][:n], "int64").astype("datetime64[us]")
    pred_model = group["pred_model"][:n]
    return Season(
        times, np.asarray(group["source"][:n], dtype=object), block_keys(times, "night"), pred_model != UNPROCESSED,
        group["p_cloudy"][:n], group["cloudy_pred"][:n], group["cloud_fraction_pred"][:n],
        group["cloud_fraction"][:n] if "cloud_fraction" in group else None,
        group["quality"][:n] if "quality" in group else None,
        list(json_attr(group["pred_model"].attrs, "models", [])), pred_model,
    )  # fmt: skip


def image_hours(times: np.ndarray, nights: np.ndarray) -> np.ndarray:
    """Hours each image stands for: the time to the next image of its night, at most twice the night's median
    cadence; the last image of a night (or a night of one image: the season's median cadence) gets the median."""
    seconds = np.asarray(times, "datetime64[us]").astype(np.int64) / 1e6
    order = np.argsort(seconds, kind="stable")
    same = nights[order][1:] == nights[order][:-1]
    steps = np.diff(seconds[order])[same]
    season = float(np.median(steps)) if len(steps) else 0.0
    hours = np.zeros(len(seconds))
    for night in np.unique(nights):
        idx = np.flatnonzero(nights == night)
        idx = idx[np.argsort(seconds[idx], kind="stable")]  # store order is arrival order (late images)
        dt = np.diff(seconds[idx])
        cadence = float(np.median(dt)) if len(dt) else season
        hours[idx] = np.append(np.minimum(dt, 2 * cadence), cadence) / 3600
    return hours


def clear_hours_table(season: Season) -> list[NightRow]:
    """Per night: images, images classified clear (and not flagged), their hours, observed hours, mean
    predicted cloud fraction of the reprocessed images."""
    hours = image_hours(season.times, season.nights)
    rows = []
    for night in np.unique(season.nights):
        on = season.nights == night
        fractions = season.fraction[on & season.processed]
        rows.append(NightRow(str(night), int(on.sum()), int((on & season.clear).sum()),
                             round(float(hours[on & season.clear].sum()), 3), round(float(hours[on].sum()), 3),
                             round(float(fractions.mean()), 4) if len(fractions) else math.nan))  # fmt: skip
    return rows


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def fraction_plot(season: Season, rows: list[NightRow], out_png: Path) -> Path:
    """One panel per night: predicted cloud fraction (and p_cloudy, the astropy-mask fraction) against time."""
    ncol = min(PANEL_COLUMNS, len(rows))
    nrow = -(-len(rows) // ncol)
    fig = plots.new_figure(3.4 * ncol, 2.4 * nrow + 0.6)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False, sharey=True)).ravel()
    for ax, row in zip(axes, rows):
        on = season.nights == np.datetime64(row.night)
        hours = (season.times[on] - np.datetime64(row.night, "us") - np.timedelta64(12, "h")) / np.timedelta64(1, "h")
        done = season.processed[on]
        ax.plot(hours[done], season.fraction[on][done], ".-", color="tab:blue", ms=3, lw=1, label="U-Net")
        ax.plot(hours[done], season.p_cloudy[on][done], ":", color="tab:orange", lw=1, label="p(cloudy)")
        if season.mask_fraction is not None:
            ax.plot(hours, season.mask_fraction[on], "--", color="0.4", lw=1, label="astropy mask")
        ax.set_title(f"{row.night}: {row.clear_hours:.1f} h clear of {row.observed_hours:.1f}", fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    for ax in axes[::ncol]:
        ax.set_ylabel("cloud fraction")
    for ax in axes[:len(rows)][-ncol:]:
        ax.set_xlabel("hours after 12:00 UTC")
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return plots.save(fig, out_png)


def pick_examples(season: Season, k: int) -> tuple[list[int], list[int]]:
    """Up to ``k`` cloudy images spread over the range of predicted cloud fraction, and ``k`` clear ones
    spread over the season."""
    cloudy = np.flatnonzero(season.processed & season.cloudy)
    cloudy = cloudy[np.argsort(season.fraction[cloudy], kind="stable")]
    clear = np.flatnonzero(season.clear)

    def spread(idx: np.ndarray) -> list[int]:
        return [int(idx[i]) for i in np.unique(np.linspace(0, len(idx) - 1, min(k, len(idx))).round().astype(int))]

    return spread(cloudy), spread(clear)


def examples_plot(group: zarr.Group, season: Season, picks: list[int], out_png: Path) -> Path:
    """The normalized frames with the U-Net probability overlaid (colour where > 0.05, contour at 0.5)."""
    normalization = Models.from_store(group).normalization
    sky = group["sky"][:].astype(bool)
    norm = normalize(read_images(group["raw"], np.array(picks)), normalization)
    probs = read_images(group["cloud_prob"], np.array(picks))
    ncol = min(PANEL_COLUMNS, len(picks))
    nrow = -(-len(picks) // ncol)
    ny, nx = sky.shape
    fig = plots.new_figure(3.2 * ncol + 0.8, 3.2 * nrow * ny / nx + 0.5)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    cmap = colormaps["inferno"]
    image = None
    for ax, i, frame, q in zip(axes, picks, norm, probs):
        lo, hi = np.percentile(frame[sky], [1, 99])
        ax.imshow(np.where(sky, frame, lo), cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
        p = np.where(q == NOT_COMPUTED, np.nan, q / PROB_SCALE)
        shown = np.ma.masked_where(~(p > 0.05), p)
        image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, alpha=0.55)
        if (p > 0.5).any() and (p <= 0.5).any():
            ax.contour(np.ma.masked_invalid(p), levels=[0.5], colors="cyan", linewidths=0.7)
        state = f"cloud {season.fraction[i]:.0%}" if season.cloudy[i] else "clear"
        ax.set_title(f"{str(season.times[i])[:16]}\np(cloudy) {season.p_cloudy[i]:.2f}, {state}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(picks):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(picks)]), fraction=0.03, pad=0.02, label="U-Net cloud probability")
    return plots.save(fig, out_png)


def flag_summary(store: Store, season: Season, out_dir: Path) -> tuple[list[Path], Counter, Counter]:
    """``rejected.csv`` and ``flagged.csv``; counts per rejection reason and per quality flag."""
    rejections = store.rejections()
    files = [_write_csv(out_dir / "rejected.csv", ["source", "reason", "size"],
                        [[r.source, r.reason, r.size] for r in rejections])]  # fmt: skip
    flags = Counter(dict.fromkeys(QUALITY_BITS, 0))
    rows = []
    for i in np.flatnonzero(season.flagged):
        names = [name for name, bit in QUALITY_BITS.items() if season.quality[i] & bit]
        flags.update(names)
        rows.append([str(season.times[i]), season.sources[i], int(season.quality[i]), " ".join(names)])
    if season.quality is not None:
        flags["not prepared"] = int((season.quality == UNPREPARED).sum())
    files.append(_write_csv(out_dir / "flagged.csv", ["time", "source", "quality", "flags"], rows))
    return files, Counter(r.reason for r in rejections), flags


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _model_lines(season: Season) -> list[str]:
    lines = []
    for index, count in sorted(Counter(season.pred_model[season.processed].tolist()).items()):
        e = season.models[index]
        name = {k: f"{e[k]['name']} v{e[k]['version']}" if e[k]["name"] else e[k]["uri"]
                for k in ("classifier", "unet")}  # fmt: skip
        lines.append(f"- {count} images: classifier {name['classifier']} (run {e['classifier']['run_id']}), "
                     f"U-Net {name['unet']} (run {e['unet']['run_id']}), threshold {e['threshold']}, {e['time']}")
    return lines


def observer_nights(store_url: str, out: Path) -> tuple[Path, str] | None:
    """``observer_nights.csv`` and its report section when the store has a site and an orientation (``cirrus
    orient``): per night the hours with a clear line of sight everywhere above air mass 2 and the clear fraction
    of that sky (``sightline.night_summary``); None otherwise."""
    from cirrus_batch.sightline import AIRMASS2_ALTITUDE, night_summary
    from cirrus_batch.store import open_dataset

    ds = open_dataset(store_url)
    if "orientation" not in ds.attrs or "pixel_class" not in ds:
        return None
    times = ds["time"].values.astype("datetime64[us]")
    nights = block_keys(times, "night")
    table = night_summary(ds, nights, image_hours(times, nights))
    path = out / "observer_nights.csv"
    table.to_csv(path, index=False)
    section = (f"## Line of sight above air mass 2\n\nHours when at least 99 % of the sky above "
               f"{AIRMASS2_ALTITUDE:g}° of altitude was clear (cloud probability < 0.2: any target up there had a "
               f"clear line of sight), and the mean clear fraction of that sky. File: [{path.name}]({path.name})."
               "\n\n" + _md_table(list(table.columns), table.values.tolist()))  # fmt: skip
    return path, section


def write_markdown(out: Path, store_url: str, season: Season, rows: list[NightRow], reasons: Counter,
                   flags: Counter, figures: list[Path], extra: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """``report.md``: summary, models, clear-hours table, figures, rejected/flagged counts, file list."""
    missing = int((~season.processed).sum())
    total = NightRow("all", sum(r.images for r in rows), sum(r.clear_images for r in rows),
                     round(sum(r.clear_hours for r in rows), 3), round(sum(r.observed_hours for r in rows), 3),
                     round(float(np.nanmean(season.fraction)), 4))  # fmt: skip
    parts = [
        f"# CIRRUS season report: `{store_url}`",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. {len(season.times)} images, {len(rows)} nights, "
        f"{str(season.times[0])[:16]} to {str(season.times[-1])[:16]} UTC"
        + (f"; **{missing} images not reprocessed yet** (run `cirrus reprocess`)." if missing else "."),
        "## Models\n\n" + "\n".join(_model_lines(season)),
        "## Clear hours per night\n\nImages classified clear and not flagged, each for the time to the next image "
        "(at most twice the median cadence). File: [clear_hours.csv](clear_hours.csv).\n\n"
        + _md_table(["night", "images", "clear images", "clear hours", "observed hours", "mean cloud fraction"],
                    [list(asdict(r).values()) for r in [*rows, total]]),
        *extra,
        *(f"## {title}\n\n![{title}]({path.name})" for title, path in
          zip(("Cloud fraction per night", "Example frames"), figures)),
        "## Rejected and flagged files\n\n"
        + f"{sum(reasons.values())} files rejected at ingest ([rejected.csv](rejected.csv)); "
        + f"{int(season.flagged.sum())} images flagged by prepare ([flagged.csv](flagged.csv)).\n\n"
        + (_md_table(["rejection reason", "files"], reasons.most_common(15)) + "\n\n" if reasons else "")
        + _md_table(["quality flag", "images"], list(flags.items())),
    ]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def model_tags(season: Season) -> dict[str, str]:
    """Tags naming the model versions that produced the season's predictions (``classifier`` = ``cirrus-
    classifier v3``, ``classifier.run_id``, ...; several pairs: comma-separated, by images)."""
    used = Counter(int(i) for i in season.pred_model[season.processed])
    tags: dict[str, list[str]] = {}
    for index, _ in used.most_common():
        if index >= len(season.models):
            continue
        entry = season.models[index]
        for role in ("classifier", "unet"):
            model = entry.get(role, {})
            label = f"{model['name']} v{model['version']}" if model.get("name") else str(model.get("uri", ""))
            for key, value in ((role, label), (f"{role}.run_id", str(model.get("run_id", ""))),
                               (f"{role}.uri", str(model.get("uri", "")))):  # fmt: skip
                if value not in tags.setdefault(key, []):
                    tags[key].append(value)
    return {k: ", ".join(v) for k, v in tags.items()}


def report(store_url: str, out_dir: str | Path, tracking_uri: str | None = None, experiment: str = "cirrus",
           examples: int = 4) -> SeasonReport:  # fmt: skip
    """Write the season report of the reprocessed store to ``out_dir`` and log it to MLflow as the artifacts of
    a run ``report-YYYYMMDD-HHMMSS`` in the experiment ``<experiment>-reports`` (tags: the store and the model
    versions used). ``tracking_uri``: a relative sqlite path is relative to the store's folder; the tracking
    store must exist (the one training wrote to), it is never created here."""
    tracking = resolve_tracking_uri(tracking_uri or mlflow.get_tracking_uri(), store_url)
    require_tracking_store(tracking)
    store = Store.open(store_url, mode="r")
    season = load_season(store.group, store_url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = clear_hours_table(season)
    result = SeasonReport(out, len(season.times), int(season.processed.sum()), rows)
    table = [list(asdict(r).values()) for r in rows]
    result.files.append(_write_csv(out / "clear_hours.csv", list(asdict(rows[0])), table))
    figures = [fraction_plot(season, rows, out / "cloud_fraction.png")]
    cloudy, clear = pick_examples(season, examples)
    if cloudy or clear:
        figures.append(examples_plot(store.group, season, cloudy + clear, out / "examples.png"))
    flag_files, reasons, flags = flag_summary(store, season, out)
    observers = observer_nights(store_url, out)
    if observers is not None:
        result.files.append(observers[0])
    result.files += [*figures, *flag_files, write_markdown(out, store_url, season, rows, reasons, flags, figures,
                                                           (observers[1],) if observers else ())]  # fmt: skip
    mlflow.set_tracking_uri(tracking)
    use_experiment(f"{experiment}-reports")
    models = model_tags(season)
    with mlflow.start_run(run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.set_tags({"store": store_url, "kind": "season report", **models,
                         "mlflow.note.content": f"Season report of `{store_url}`: {result.images} images, "
                         f"{len(rows)} nights, {result.clear_hours:.2f} clear hours; predictions by "
                         f"{models.get('classifier', '-')} and {models.get('unet', '-')}."})  # fmt: skip
        mlflow.log_metrics({"images": result.images, "reprocessed": result.processed, "nights": len(rows),
                            "clear_hours": result.clear_hours, "rejected": sum(reasons.values()),
                            "flagged": int(season.flagged.sum())})  # fmt: skip
        mlflow.log_artifacts(str(out))
        result.run_id = run.info.run_id
    result.tracking_uri = tracking
    return result
