"""``cirrus info``: where a store stands — images, nights, what prepare and reprocess have done, with which
models, which arrays a prepare with the given settings would call stale, and the rejected files."""

from __future__ import annotations

from typing import Any

import numpy as np

from cirrus_batch import provenance
from cirrus_batch.config import PrepareConfig
from cirrus_batch.prepare import FITTED_VARS, QUALITY_BITS, UNPREPARED, fit_settings
from cirrus_batch.sampling import block_keys
from cirrus_batch.store import REJECTIONS, UNPROCESSED, Store, json_attr, time_order


def _model_label(model: dict[str, Any]) -> str:
    return f"{model['name']} v{model['version']}" if model.get("name") else str(model["uri"])


def store_status(url: str, prepare: PrepareConfig | None = None) -> dict[str, Any]:
    """The store's state as plain JSON-able values (``cirrus info --json``); ``stale`` compares the recorded
    ``[prepare]`` settings with ``prepare`` (default: the built-in ones)."""
    store = Store.open(url, mode="r")
    group, n = store.group, store.committed
    times = store.times()
    times = times[time_order(times)].astype("datetime64[us]")
    out: dict[str, Any] = {
        "store": url,
        "images": n,
        "first": str(times[0]) if n else None,
        "last": str(times[-1]) if n else None,
        "nights": int(len(np.unique(block_keys(times, "night")))) if n else 0,
        "image_shape": list(store.image_shape),
        "shard_size": store.shard_size,
    }
    quality = group["quality"][:n] if "quality" in group else np.full(n, UNPREPARED, np.uint8)
    prepared = quality != UNPREPARED
    out["prepared"] = int(prepared.sum())
    out["flagged"] = {name: int((prepared & ((quality & bit) > 0)).sum()) for name, bit in QUALITY_BITS.items()}
    out["cloudy"] = int(group["cloudy"][:n][prepared].sum()) if "cloudy" in group else 0
    out["human_masks"] = int((group["human_mask_source"][:n] != "").sum()) if "human_mask_source" in group else 0
    used = group["pred_model"][:n] if "pred_model" in group else np.full(n, UNPROCESSED, np.int16)
    out["reprocessed"] = int((used != UNPROCESSED).sum())
    out["cloudy_pred"] = int(group["cloudy_pred"][:n][used != UNPROCESSED].sum()) if "cloudy_pred" in group else 0
    entries = json_attr(group["pred_model"].attrs, "models", []) if "pred_model" in group else []
    out["models"] = [
        {"classifier": _model_label(e["classifier"]), "unet": _model_label(e["unet"]), "threshold": e["threshold"],
         "images": int((used == i).sum())}
        for i, e in enumerate(entries) if (used == i).any()
    ]  # fmt: skip
    stale = provenance.stale(group, FITTED_VARS, fit_settings(prepare or PrepareConfig()))
    out["stale"] = stale
    out["rejections"] = int(group[REJECTIONS]["source"].shape[0])
    out["removals"] = len(store.history())
    return out


def status_rows(status: dict[str, Any]) -> list[list[Any]]:
    """``cirrus info``'s table: one ``[item, value]`` row per line."""
    n = status["images"]

    def share(count: int) -> str:
        return f"{count} ({count / n:.0%})" if n else str(count)

    rows: list[list[Any]] = [
        ["images", n],
        ["time span", f"{status['first']} .. {status['last']}" if n else "-"],
        ["nights", status["nights"]],
        ["image shape / shard", f"{status['image_shape'][0]} x {status['image_shape'][1]} / {status['shard_size']}"],
        ["prepared", share(status["prepared"])],
        *[[f"  flagged {name}", count] for name, count in status["flagged"].items() if count],
        ["  labelled cloudy", share(status["cloudy"])],
        ["  with a human mask", status["human_masks"]],
        ["reprocessed", share(status["reprocessed"])],
        ["  classified cloudy", share(status["cloudy_pred"])],
        *[[f"  models ({m['images']} images)", f"{m['classifier']} + {m['unet']}, threshold {m['threshold']:g}"]
          for m in status["models"]],
        ["stale arrays", _names(list(status["stale"])) or "none"],
        *[["  changed setting", f"prepare.{change}"] for change in sorted({d for diff in status["stale"].values()
                                                                        for d in diff})],
        ["rejected files", status["rejections"]],
        ["removals", status["removals"]],
    ]  # fmt: skip
    return rows


def _names(names: list[str], most: int = 6) -> str:
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[:most])}, ... ({len(names)} in all)"
