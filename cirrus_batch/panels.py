"""PNG panels of the mask pipeline: per-frame quality panel, sky-geometry panel of ``cirrus calibrate``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cirrus_batch.geometry import AMBIENT, DARK, DEFECT, SKY, SkyGeometry
from cirrus_batch.radiometry import NODATA


def quality_panel(
    raw: np.ndarray, brightness: np.ndarray, clear: np.ndarray, mask: np.ndarray, truth: np.ndarray | None,
    geom: SkyGeometry, titles: list[str] | None, out_png: str | Path,
) -> Path:  # fmt: skip
    """PNG with one row per frame: raw, brightness, clear sky, brightness - clear sky, mask, truth (truth None ->
    5 columns). Brightness is relative to the ambient black body (1 = ambient)."""
    from cirrus_batch.plots import new_figure, save

    raw3 = np.asarray(raw).reshape(-1, *geom.shape)
    b3, c3, m3 = (np.asarray(a).reshape(raw3.shape) for a in (brightness.astype(np.float32), clear, mask))
    t3 = None if truth is None else np.asarray(truth).reshape(raw3.shape)
    cols = ["raw (ADU)", "brightness", "clear sky", "brightness - clear", "mask"] + ([] if t3 is None else ["truth"])
    n = raw3.shape[0]
    fig = new_figure(2.4 * len(cols), 2.3 * n)
    axes = fig.subplots(n, len(cols), squeeze=False)
    sky = geom.sky
    for i in range(n):
        r = raw3[i].astype(np.float32)
        ok = raw3[i] != NODATA
        lo, hi = np.percentile(r[ok], [1, 99.5]) if ok.any() else (0, 1)
        diff = np.where(sky, b3[i] - c3[i], np.nan)
        dhi = float(np.nanpercentile(np.abs(diff), 99)) if sky.any() else 1.0
        panels = [
            (np.where(ok, r, np.nan), dict(cmap="inferno", vmin=lo, vmax=hi)),
            (np.where(sky, b3[i], np.nan), dict(cmap="inferno", vmin=0, vmax=1.05)),
            (np.where(sky, c3[i], np.nan), dict(cmap="inferno", vmin=0, vmax=1.05)),
            (diff, dict(cmap="RdBu_r", vmin=-dhi, vmax=dhi)),
            (np.where(sky, 1 + m3[i], 0), dict(cmap="Blues_r", vmin=-0.5, vmax=2.2)),
        ]
        if t3 is not None:
            panels.append((np.where(sky, 1 + (t3[i] == 1), 0), dict(cmap="Blues_r", vmin=-0.5, vmax=2.2)))
        for j, (img, kw) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, **kw)
            ax.set_axis_off()
            title = cols[j] if i == 0 else ""
            if j == 0 and titles is not None and i < len(titles):
                title = (title + "\n" if title else "") + str(titles[i])
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save(fig, out_png, dpi=80)


def geometry_panel(median: np.ndarray, geom: SkyGeometry, out_png: str | Path, title: str = "") -> Path:
    """PNG: the median image with the image circle and zenith-angle contours, and the pixel classes."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Circle

    from cirrus_batch.plots import new_figure, save

    fig = new_figure(11, 5)
    ax = fig.subplots(1, 2)
    med = np.asarray(median, np.float32)
    lo, hi = np.percentile(med, [1, 99.5])
    ax[0].imshow(med, cmap="inferno", vmin=lo, vmax=hi)
    levels = [x for x in (15, 30, 45, 60, 75, 90) if x <= geom.fov_deg / 2]
    cs = ax[0].contour(geom.zenith, levels=levels, colors="cyan", linewidths=0.7)
    ax[0].clabel(cs, fmt="%d°", fontsize=7)
    ax[0].add_patch(Circle((geom.center[1], geom.center[0]), geom.radius, fill=False, color="lime", lw=1.2))
    ax[0].plot(geom.center[1], geom.center[0], "+", color="lime", ms=10)
    ax[0].set_title(f"median image, image circle and zenith angle ({geom.projection}, FOV {geom.fov_deg:g}°)",
                    fontsize=9)  # fmt: skip
    cmap = ListedColormap(["#222222", "#6fa8dc", "#e69138", "#444488", "#cc0000"])
    ax[1].imshow(geom.classes, cmap=cmap, vmin=-0.5, vmax=4.5, interpolation="nearest")
    counts = {name: int((geom.classes == code).sum()) for name, code in (("sky", SKY), ("ambient", AMBIENT),
                                                                         ("dark", DARK), ("defect", DEFECT))}  # fmt: skip
    ax[1].set_title(f"pixel classes: sky (blue) {counts['sky']}, ambient reference (orange) {counts['ambient']}, "
                    f"dark (navy) {counts['dark']}, defect (red) {counts['defect']}", fontsize=9)  # fmt: skip
    for a in ax:
        a.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, out_png, dpi=80)
