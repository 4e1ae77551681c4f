"""The settings that produced each derived array, and what a rerun with other settings would leave stale.

A step records its settings (a JSON string) in the attribute :data:`ATTR` of each array it writes. A later run
compares them with its own: an array made with other settings would mix two recipes if the run went on (new
images with the new settings, old ones with the old), so the run stops with the arrays and keys that differ,
until the user asks for a rebuild (``cirrus prepare --refit``). Arrays recorded before this existed are not
checked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import zarr

from cirrus_batch.errors import ConfigError
from cirrus_batch.store import json_attr, set_json_attr

ATTR = "settings"


def record(group: zarr.Group, arrays: Iterable[str], settings: dict[str, Any]) -> None:
    """Record ``settings`` as what produced ``arrays`` of ``group``."""
    for name in arrays:
        set_json_attr(group[name].attrs, ATTR, settings)


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as stored in the attributes (tuples become lists)."""
    return json.loads(json.dumps(settings))


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["mask.threshold: 3.0 -> 4.0", ...]``: the dotted keys whose values differ (nested dicts walked)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))]  # fmt: skip
    same = old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new))
    return [] if same else [f"{prefix}: {old!r} -> {new!r}"]


def stale(group: zarr.Group, arrays: Iterable[str], settings: dict[str, Any]) -> dict[str, list[str]]:
    """The arrays of ``group`` recorded with other settings than ``settings``, each with its differences."""
    out = {}
    for name in arrays:
        if name in group and ATTR in group[name].attrs:
            diff = differences(json_attr(group[name].attrs, ATTR), _plain(settings))
            if diff:
                out[name] = diff
    return out


def require_current(group: zarr.Group, arrays: Iterable[str], settings: dict[str, Any], section: str,
                    rebuild: str) -> None:  # fmt: skip
    """A :class:`ConfigError` naming the stale arrays and the changed ``[section]`` keys, if any."""
    found = stale(group, arrays, settings)
    if found:
        keys = sorted({d for diff in found.values() for d in diff})
        raise ConfigError(f"the store's {', '.join(found)} were made with other [{section}] settings "
                          f"({'; '.join(f'{section}.{k}' for k in keys)}): they are stale; give {rebuild} to "
                          "rebuild them for the whole season, or restore the settings")  # fmt: skip
