"""Ingest a FITS archive (local path, glob or fsspec URL) into the zarr store, incrementally.

Two passes of Dask tasks:

1. **scan**: read the leading bytes of every new file, parse the header, check it (FITS, one 2-D image,
   complete, has DATE-OBS); meanwhile the client creates or sizes the store. It then screens the good files
   (wrong clocks, images already in the store under another name, two contents for one time), sorts them by
   time and gives each a store position after the last one: a night older than the newest image is appended
   too (readers sort, :func:`~cirrus_batch.store.open_dataset`).
2. **write**: the client writes the per-image vectors (time, source, header values) of the planned
   positions; one task per shard-aligned group of positions reads its files, decodes and checks the
   pixels, writes the group's region of ``raw`` and returns the files' content digests. A group with a bad
   file writes nothing; the run commits the groups before it, logs the bad file and plans the rest again.

``committed`` advances over the longest prefix of written groups, so a killed ingest loses nothing and
the next run (which first cuts uncommitted tails) carries on with the files still missing.

An image's identity is its DATE-OBS plus its content digest (:func:`content_digest`): a file at a path already
in the store is that image (not read again); a file with a new path whose time is already taken is read, and
is the same image (skipped) when its digest matches, or a conflict (rejected, naming both files) when not.
Callers hold the store's writer lock (:class:`~cirrus_batch.lock.StoreLock`; the CLI does).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import PurePosixPath

import fsspec
import google_crc32c
import numpy as np
import zarr
from distributed import Client, as_completed
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path
from tqdm.auto import tqdm

from cirrus_batch import imagefiles
from cirrus_batch.config import IngestConfig, check_ranges
from cirrus_batch.errors import CirrusError
from cirrus_batch.fitsio import ImageHeader, Layout, Rejected, find_image, header_values, observation_time, read_raw
from cirrus_batch.sources import SourceConfig, open_source, redact
from cirrus_batch.store import NO_DIGEST, Rejection, Store, header_var, write_images

log = logging.getLogger(__name__)

SCAN_BYTES = 4 * 2880
SCAN_TASK_FILES = 256


@dataclass(frozen=True)
class FileEntry:
    """One file of the archive: ``path`` for the filesystem, ``source`` relative to the SOURCE root.

    ``size`` is -1 where the filesystem listing does not give it (some HTTP servers), ``mtime`` NaN.
    """

    path: str
    source: str
    size: int
    mtime: float = math.nan

    def rejection(self, reason: str) -> Rejection:
        return Rejection(self.source, reason, self.size, self.mtime)


@dataclass(frozen=True)
class Scanned:
    """What the scan learned of one file: where its image is, its time and header values, or why not."""

    entry: FileEntry
    layout: Layout | None = None
    time: np.datetime64 | None = None
    values: dict[str, float] = field(default_factory=dict)
    reason: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape if self.layout else ()

    @cached_property
    def time_us(self) -> int:
        """``time`` in integer µs (screening sorts and compares them: once per file, not per use)."""
        return int(np.datetime64(self.time, "us").astype(np.int64))


@dataclass
class IngestReport:
    """What one ingest run did."""

    store: str
    found: int = 0
    already: int = 0
    copies: int = 0
    """Files with a new path that hold an image already in the store (same DATE-OBS and content)."""
    previously_rejected: int = 0
    ingested: int = 0
    dropped_uncommitted: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0
    total: int = 0


# -- discovery ------------------------------------------------------------------------------------
def discover(source: str, cfg: SourceConfig | None = None) -> tuple[fsspec.AbstractFileSystem, list[FileEntry]]:
    """List the files of SOURCE: a directory (recursive), a glob, a single file, an fsspec URL, a WebDAV share or
    a bundle (:mod:`cirrus_batch.sources`).

    Hidden files and folders (names starting with ``.``, e.g. rsync partial files) are ignored.
    """
    try:
        fs, path = open_source(source, cfg)
        if any(c in path for c in "*?["):
            root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            infos = fs.glob(path, detail=True).values()
        elif fs.isdir(path):
            root = path
            infos = fs.find(path, detail=True).values()
        elif fs.isfile(path):
            root = path.rsplit("/", 1)[0]
            infos = [fs.info(path)]
        else:
            raise CirrusError(f"SOURCE {redact(source)} does not exist (or is not readable)")
    except CirrusError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise CirrusError(f"cannot read SOURCE {redact(source)}: {exc}") from None
    root = root.rstrip("/")
    entries = []
    for info in infos:
        if info.get("type", "file") != "file":
            continue
        name = info["name"]
        rel = name[len(root):].lstrip("/") if name.startswith(root) else PurePosixPath(name).name
        if any(part.startswith(".") for part in PurePosixPath(rel).parts):
            continue
        size, mtime = info.get("size"), info.get("mtime")
        mtime = float(mtime) if isinstance(mtime, (int, float)) else math.nan
        entries.append(FileEntry(name, rel, -1 if size is None else int(size), mtime))
    entries.sort(key=lambda e: e.source)
    return fs, entries


# -- tasks ----------------------------------------------------------------------------------------
def _read_image_header(fs: fsspec.AbstractFileSystem, entry: FileEntry) -> tuple[bytes, ImageHeader | None]:
    """Leading bytes of a file and its image header (reads more while a header is incomplete); a PNG/TIFF
    frame: the whole file and None."""
    n = min(SCAN_BYTES, entry.size)
    while True:
        buf = fs.cat_file(entry.path, start=0, end=n) if n < entry.size else fs.cat_file(entry.path)
        if imagefiles.is_picture(buf):
            return (buf if n >= entry.size else fs.cat_file(entry.path)), None
        try:
            return buf, find_image(buf)
        except EOFError:
            if n >= entry.size:
                raise Rejected("truncated inside a header") from None
            n = min(8 * n, entry.size)


def _check(entry: FileEntry, image: ImageHeader, keys: list[str]) -> Scanned:
    shape = image.layout.shape
    if len(shape) != 2:
        kind = "data cube" if len(shape) == 3 else "array"
        raise Rejected(f"{len(shape)}-D {kind} {shape}, expected a 2-D image")
    if entry.size < image.layout.end:
        raise Rejected(f"truncated: {entry.size} bytes, the header needs {image.layout.end}")
    return Scanned(entry, image.layout, observation_time(image.header), header_values(image.header, keys))


# -- PNG/TIFF frames (cirrus_batch.imagefiles): where ingest dispatches on the kind of file ---------------
def _check_file(entry: FileEntry, buf: bytes, image: ImageHeader | None, keys: list[str],
                pictures: imagefiles.ImageFileConfig) -> Scanned:  # fmt: skip
    """:func:`_check` of a FITS image, or the scan of a whole PNG/TIFF frame (``image`` None)."""
    if image is not None:
        return _check(entry, image, keys)
    layout, t = imagefiles.scan(buf, entry.source, pictures)
    return Scanned(entry, layout, t, header_values({}, keys))


def _read_pixels(buf: bytes, layout: Layout | imagefiles.PictureLayout, out: np.ndarray) -> None:
    (imagefiles.read_raw if isinstance(layout, imagefiles.PictureLayout) else read_raw)(buf, layout, out)


def scan_files(fs: fsspec.AbstractFileSystem, entries: Sequence[FileEntry], keys: list[str],
               pictures: imagefiles.ImageFileConfig | None = None) -> list[Scanned]:  # fmt: skip
    """Scan task: header checks of a batch of files (equal layouts are one object, pickled once)."""
    pictures = pictures or imagefiles.ImageFileConfig()
    out, layouts = [], {}
    for entry in entries:
        try:
            if entry.size < 0:
                entry = dataclasses.replace(entry, size=int(fs.size(entry.path)))
            if entry.size == 0:
                raise Rejected("empty file")
            buf, image = _read_image_header(fs, entry)
            item = _check_file(entry, buf, image, keys, pictures)
            out.append(dataclasses.replace(item, layout=layouts.setdefault(item.layout, item.layout)))
        except Rejected as exc:
            out.append(Scanned(entry, reason=str(exc)))
        except OSError as exc:
            out.append(Scanned(entry, reason=f"unreadable: {exc}"))
    return out


def content_digest(buf: bytes) -> int:
    """A file's content digest: its size in the high 32 bits, the CRC32C of its bytes in the low 32 (hardware
    CRC32C: about 0.1 ms per 512x640 image, a fifth of compressing it). Two different files count as one image
    only with the same DATE-OBS, size and CRC (odds 2**-32 for camera files, which are not crafted to collide)."""
    return (len(buf) % 2**32) << 32 | google_crc32c.value(buf) or 1  # never NO_DIGEST


def digest_files(fs: fsspec.AbstractFileSystem, entries: Sequence[FileEntry]) -> list[int | str]:
    """Task: the content digest of each file, or why it cannot be read."""
    out: list[int | str] = []
    for entry in entries:
        try:
            out.append(content_digest(fs.cat_file(entry.path)))
        except OSError as exc:
            out.append(f"unreadable: {exc}")
    return out


def write_group(
    fs: fsspec.AbstractFileSystem, raw: zarr.Array, keys: list[str], files: Sequence[tuple[FileEntry, Layout]],
    start: int, pictures: imagefiles.ImageFileConfig | None = None,
) -> tuple[list[Rejection], dict[int, Scanned], np.ndarray]:  # fmt: skip
    """Write task: decode ``files`` (each with the layout the scan found) into ``raw`` at positions ``start...``;
    write nothing if any is bad.

    Returns the bad files' rejections, or the files checked again because their size changed since the scan
    (by position), whose vectors the client writes again, and the files' content digests.
    """
    shape = raw.shape[1:]
    block = np.empty((len(files), *shape), dtype=raw.dtype)
    digests = np.empty(len(files), dtype=np.uint64)
    changed, bad = {}, []
    for i, (entry, layout) in enumerate(files):
        try:
            buf = fs.cat_file(entry.path)
            digests[i] = content_digest(buf)
            if len(buf) != entry.size:
                entry = dataclasses.replace(entry, size=len(buf))
                image = None if imagefiles.is_picture(buf) else find_image(buf)
                changed[start + i] = _check_file(entry, buf, image, keys, pictures or imagefiles.ImageFileConfig())
                layout = changed[start + i].layout
            if layout.shape != shape:
                raise Rejected(f"shape {layout.shape} differs from the store's {shape}")
            _read_pixels(buf, layout, block[i])
        except Rejected as exc:
            bad.append(entry.rejection(str(exc)))
    if bad:
        return bad, {}, digests[:0]
    write_images(raw, slice(start, start + len(files)), block)
    return [], changed, digests


def write_vectors(group: zarr.Group, start: int, items: Sequence[Scanned]) -> None:
    """Write the per-image vectors (``time``, ``source``, header values) of ``items`` at positions ``start...``."""
    region = slice(start, start + len(items))
    group["time"][region] = np.array([item.time for item in items], dtype="datetime64[us]").astype("int64")
    group["source"][region] = np.array([item.entry.source for item in items], dtype=object)
    for key in group.attrs["header_keys"]:
        group[header_var(key)][region] = np.array([item.values[key] for item in items])


# -- screening ------------------------------------------------------------------------------------
def clock_problem(t: int, now: int, median: int | None, cfg: IngestConfig) -> str | None:
    """Why time ``t`` (µs) cannot be right: in the future beyond the margin, or far from the season's ``median``."""
    us_h = 3_600_000_000
    if t > now + cfg.future_margin_h * us_h:
        return (f"DATE-OBS {np.datetime64(t, 'us')} is in the future (now {np.datetime64(now, 's')} UTC, "
                f"[ingest] future_margin_h = {cfg.future_margin_h:g}): a wrong camera clock")  # fmt: skip
    if median is not None and cfg.season_days and abs(t - median) > cfg.season_days * 24 * us_h:
        days = abs(t - median) / (24 * us_h)
        return (f"DATE-OBS {np.datetime64(t, 'us')} is {days:.0f} days from the season's median time "
                f"{np.datetime64(median, 's')} ([ingest] season_days = {cfg.season_days:g}): a wrong camera clock")
    return None


def identify(
    items: Sequence[Scanned], held: dict[int, tuple[int, str]], digests: Callable[[list[FileEntry]], list[int | str]]
) -> tuple[list[Scanned], int, list[Rejection]]:  # fmt: skip
    """Split ``items`` (sorted by time, source) into new images, the number of copies of images already held,
    and conflicts. ``held`` maps the times (µs) already taken in the store that ``items`` share to their
    ``(digest, source)``. Only files whose time is taken, in the store or by another item, are read (by
    ``digests``) to compare contents; the first of equal times (by source) is the one kept."""
    counts = Counter(s.time_us for s in items)
    need = [s for s in items if s.time_us in held or counts[s.time_us] > 1]
    digest = dict(zip((s.entry.path for s in need), digests([s.entry for s in need]))) if need else {}
    owner = dict(held)
    new, copies, conflicts = [], 0, []
    for s in items:
        mine = digest.get(s.entry.path, NO_DIGEST)
        if isinstance(mine, str):
            conflicts.append(s.entry.rejection(mine))
        elif s.time_us not in owner:
            owner[s.time_us] = (mine, s.entry.source)
            new.append(s)
        elif owner[s.time_us][0] == mine:
            copies += 1
        else:
            theirs, other = owner[s.time_us]
            why = " (ingested before content digests)" if theirs == NO_DIGEST else ""
            conflicts.append(s.entry.rejection(
                f"DATE-OBS {np.datetime64(s.time_us, 'us')} is already taken by {other}{why}, with different content"))
    return new, copies, conflicts


def screen(
    store: Store, good: Sequence[Scanned], cfg: IngestConfig, digests: Callable[[list[FileEntry]], list[int | str]]
) -> tuple[list[Scanned], int, list[Rejection]]:  # fmt: skip
    """The good files to write, in time order: not of another shape, no wrong clock, not an image already in
    the store; plus the number of copies skipped and the rejections."""
    shape, times = store.image_shape, store.times()
    now = int(np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us").astype(np.int64))
    ordered = sorted(good, key=lambda s: (s.time, s.entry.source))
    every = np.concatenate([times, np.array([s.time_us for s in ordered], dtype=np.int64)])
    median = int(np.median(every)) if len(every) else None
    rejections, kept = [], []
    for s in ordered:
        problem = (f"shape {s.shape} differs from the store's {shape}" if s.shape != shape
                   else clock_problem(s.time_us, now, median, cfg))  # fmt: skip
        if problem:
            rejections.append(s.entry.rejection(problem))
        else:
            kept.append(s)
    wanted = np.array([s.time_us for s in kept], dtype=np.int64)
    taken = np.flatnonzero(np.isin(times, wanted))
    held = {}
    if len(taken):
        digest = store.group["digest"].get_orthogonal_selection(taken)
        source = store.group["source"].get_orthogonal_selection(taken)
        held = {int(times[i]): (int(d), str(src)) for i, d, src in zip(taken, digest, source)}
    new, copies, conflicts = identify(kept, held, digests)
    return new, copies, rejections + conflicts


# -- planning -------------------------------------------------------------------------------------
def plan_groups(start: int, items: Sequence[Scanned], shard: int) -> list[tuple[int, list[Scanned]]]:
    """Split positions ``start...`` into groups that each fill whole shards (first/last may be partial)."""
    groups, i, pos = [], 0, start
    while i < len(items):
        n = min(shard - pos % shard, len(items) - i)
        groups.append((pos, list(items[i : i + n])))
        i, pos = i + n, pos + n
    return groups


def _open_existing(url: str) -> Store | None:
    """The store at ``url``, or None where nothing is there yet."""
    try:
        fs, path = url_to_fs(url)
        fs.invalidate_cache(path)  # listings cached by an earlier run in this process may be stale
        if fs.exists(f"{path.rstrip('/')}/zarr.json"):
            return Store.open(url)
        if fs.exists(path) and (not fs.isdir(path) or _holds_files(fs, path)):
            raise CirrusError(f"STORE {url} exists and is not a zarr store")
    except OSError as exc:
        raise CirrusError(f"cannot read STORE {url}: {exc}") from None
    return None


def _holds_files(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the folder ``path`` holds anything; an object store's empty prefixes (SeaweedFS keeps them after a
    store is deleted, and zarr would refuse to create a store there) hold nothing."""
    if isinstance(fs, LocalFileSystem):
        return bool(fs.ls(path))
    return any(name.rstrip("/") != path.rstrip("/") for name in fs.find(path))  # not the prefix's own marker


def _bar(total: int, desc: str, unit: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True, mininterval=0.5)


# -- the run --------------------------------------------------------------------------------------
@contextmanager
def _long_lived_frozen() -> Iterator[None]:
    """Keep the garbage collector off the objects alive at the start (they go back to it at the end).

    A client holds ~160k long-lived objects (dask, zarr, astropy); the many small ones a scan brings back trigger
    full collections that walk them all, ~85 ms each, every other run of a 600-image ingest. A program that froze
    objects itself is left alone.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@_long_lived_frozen()
def ingest(
    source: str,
    store_url: str,
    client: Client,
    config: IngestConfig | None = None,
    progress: bool = True,
    on_commit: Callable[[int], None] | None = None,
) -> IngestReport:
    """Add the new files of ``source`` to the store at ``store_url`` (created on first use)."""
    cfg = config or IngestConfig()
    check_ranges(cfg)
    t0 = time.perf_counter()
    store_url = stringify_path(store_url)
    report = IngestReport(store=store_url)
    fs, entries = discover(source, cfg.source)
    report.found = len(entries)

    store = _open_existing(store_url)
    known, rejected_before = set(), {}
    if store is not None:
        report.dropped_uncommitted = store.repair()
        if report.dropped_uncommitted:
            log.warning("dropped %d images of an interrupted ingest; they are ingested again",
                        report.dropped_uncommitted)
        known = store.sources()
        rejected_before = {r.source: r for r in store.rejections()}
    before = store.committed if store else 0
    new = []
    for e in entries:
        if e.source in known:
            report.already += 1
        elif e.source in rejected_before and rejected_before[e.source].same_file(e.size, e.mtime):
            report.previously_rejected += 1
        else:
            new.append(e)
    if not new:
        report.total = store.committed if store else 0
        report.seconds = time.perf_counter() - t0
        return report

    # pass 1: scan headers
    threads = max(1, sum(client.nthreads().values()))
    n_batches = threads * math.ceil(len(new) / (SCAN_TASK_FILES * threads))  # equal batches, a multiple of threads
    bounds = np.linspace(0, len(new), n_batches + 1).round().astype(int)
    batches = [new[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    scanned: list[Scanned] = []
    created = store is None
    with _bar(len(new), "scan ", "file", progress) as bar:
        keys = store.header_keys if store else cfg.header_keys
        futures = client.map(partial(scan_files, fs, keys=keys, pictures=cfg.image_files), batches, pure=False)
        if store is None:  # created while the files are scanned, for the shape of the first good one
            guess = cfg.shape or next((s.shape for s in scan_files(fs, new[:8], keys, cfg.image_files)
                                       if not s.reason), None)
            store = _create_store(store_url, source, cfg, guess) if guess else None
        if store is not None:  # room for every new file; cut to the accepted ones later
            store.resize(store.committed + len(new))
        for _, result in as_completed(futures, with_results=True):
            scanned.extend(result)
            bar.update(len(result))
    rejections = [s.entry.rejection(s.reason) for s in scanned if s.reason]
    good = [s for s in scanned if not s.reason]
    if created and not cfg.shape:
        if not good:
            report.rejected = rejections
            raise NoImagesError(report)
        shape = Counter(s.shape for s in good).most_common(1)[0][0]
        if store is None or shape != store.image_shape:  # the first good file did not have the usual shape
            store = _create_store(store_url, source, cfg, shape, overwrite=store is not None)
    store.require_digest()
    accepted, report.copies, screened = screen(store, good, cfg, partial(_digests, client, fs))
    rejections += screened
    store.add_rejections(rejections)
    report.rejected = list(rejections)

    # pass 2: write shard-aligned groups
    with _bar(len(accepted), "write", "img", progress) as bar:
        while accepted:
            n0 = store.committed
            store.resize(n0 + len(accepted))
            raw = store.group["raw"]
            groups = plan_groups(n0, accepted, store.shard_size)
            starts = [start for start, _ in groups]
            files = [[(s.entry, s.layout) for s in items] for _, items in groups]
            task = partial(write_group, fs, raw, store.header_keys, pictures=cfg.image_files)
            futures = dict(zip(client.map(task, files, starts, pure=False, retries=1), starts))
            write_vectors(store.group, n0, accepted)  # while the workers write the images
            outcome: dict[int, list[Rejection]] = {}
            nxt = 0
            try:
                for fut in as_completed(futures):
                    start = futures[fut]
                    outcome[start], changed, digests = fut.result()
                    for position, item in changed.items():
                        write_vectors(store.group, position, [item])
                    if len(digests):
                        store.group["digest"][start : start + len(digests)] = digests
                    while nxt < len(groups) and outcome.get(groups[nxt][0]) == []:
                        store.commit(groups[nxt][0] + len(groups[nxt][1]))
                        bar.update(len(groups[nxt][1]))
                        if on_commit:
                            on_commit(store.committed)
                        nxt += 1
            except OSError as exc:
                client.cancel(list(futures))
                raise CirrusError(f"writing to STORE {store_url} failed: {exc}") from None
            bad = [r for rs in outcome.values() for r in rs]
            store.add_rejections(bad)
            report.rejected.extend(bad)
            bad_sources = {r.source for r in bad}
            accepted = [s for _, items in groups[nxt:] for s in items if s.entry.source not in bad_sources]
            bar.total -= len(bad)
            bar.refresh()
        store.resize(store.committed)
    report.total = store.committed
    report.ingested = report.total - before
    report.seconds = time.perf_counter() - t0
    return report


def _digests(client: Client, fs: fsspec.AbstractFileSystem, entries: list[FileEntry]) -> list[int | str]:
    """Content digests of ``entries``, read by the workers in batches."""
    batches = [entries[i : i + SCAN_TASK_FILES] for i in range(0, len(entries), SCAN_TASK_FILES)]
    return [d for batch in client.gather(client.map(partial(digest_files, fs), batches, pure=False)) for d in batch]


def _create_store(url: str, source: str, cfg: IngestConfig, shape: Sequence[int], overwrite: bool = False) -> Store:
    """A new store at ``url`` (where :func:`_open_existing` found nothing). On an object store it is created with
    zarr's mode ``w``: empty prefixes a deleted store left there (SeaweedFS keeps them) make zarr's ``w-`` refuse,
    and the writer lock, not ``w-``, keeps two writers apart there."""
    overwrite = overwrite or not isinstance(url_to_fs(url)[0], LocalFileSystem)
    return Store.create(url, shape=tuple(shape), shard_size=cfg.shard_size, header_keys=cfg.header_keys,
                        clevel=cfg.clevel, source_root=redact(source), overwrite=overwrite)  # fmt: skip


class NoImagesError(CirrusError):
    """No valid image was found for a new store; carries the report with the rejections."""

    def __init__(self, report: IngestReport):
        super().__init__(f"no valid image in SOURCE ({len(report.rejected)} files rejected); nothing was written")
        self.report = report
