"""``cirrus remove``: take images (and every value derived from them) out of a store.

The caller holds the store's writer lock (the CLI does). Removed files go to the rejection log with the reason
``removed …``, so that ingesting SOURCE again does not bring them back while they are unchanged.
"""

from __future__ import annotations

import fnmatch
import getpass
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from cirrus_batch.errors import CirrusError
from cirrus_batch.store import Store


@dataclass
class RemoveReport:
    """What one removal did."""

    removed: list[tuple[str, str]] = field(default_factory=list)
    """``(source, time)`` of each image removed, in store order."""
    total: int = 0


def parse_time(text: str) -> tuple[int, int]:
    """``T`` (one DATE-OBS, to the precision given: ``2099-01-01`` is that whole day) or ``T1/T2`` (inclusive)
    -> ``(first, last)`` in µs."""
    try:
        if "/" in text:
            lo, hi = text.split("/", 1)
            return int(np.datetime64(lo, "us").astype(np.int64)), int(np.datetime64(hi, "us").astype(np.int64))
        t = np.datetime64(text)
        return int(t.astype("datetime64[us]").astype(np.int64)), int((t + 1).astype("datetime64[us]").astype(np.int64)) - 1
    except ValueError:
        raise CirrusError(f"--time {text!r} is not an ISO date-time or a range T1/T2") from None


def select(store: Store, sources: Sequence[str] = (), times: Sequence[str] = ()) -> np.ndarray:
    """Store positions of the committed images whose ``source`` matches one of the ``sources`` patterns
    (fnmatch: ``2026/20260105/*``) or whose time is in one of the ``times`` (see :func:`parse_time`)."""
    n = store.committed
    chosen = np.zeros(n, dtype=bool)
    if sources:
        names = store.group["source"][:n].tolist()
        chosen |= np.array([any(fnmatch.fnmatchcase(s, p) for p in sources) for s in names], dtype=bool)
    if times:
        t = store.times()
        for text in times:
            lo, hi = parse_time(text)
            chosen |= (t >= lo) & (t <= hi)
    return np.flatnonzero(chosen)


def remove(store_url: str, sources: Sequence[str] = (), times: Sequence[str] = (), reason: str = "") -> RemoveReport:
    """Remove the images :func:`select` picks; recorded in the store's history and rejection log."""
    if not sources and not times:
        raise CirrusError("say which images to remove: --source PATTERN and/or --time T")
    store = Store.open(store_url)
    store.repair()
    store.require_digest()
    positions = select(store, sources, times)
    report = RemoveReport()
    if len(positions):
        group = store.group
        names = group["source"].get_orthogonal_selection(positions).tolist()
        stamps = [str(np.datetime64(int(t), "us")) for t in group["time"].get_orthogonal_selection(positions)]
        report.removed = list(zip(names, stamps))
        when = datetime.now(UTC).isoformat(timespec="seconds")
        entry = {"command": "remove", "time": when, "user": _user(), "sources": list(sources), "times": list(times),
                 "reason": reason, "removed": names}  # fmt: skip
        store.remove(positions, entry, f"removed by `cirrus remove` on {when}" + (f": {reason}" if reason else ""))
    report.total = store.committed
    return report


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"
