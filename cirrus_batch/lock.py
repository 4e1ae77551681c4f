"""The store's writer lock: one writing command at a time (ingest, prepare, reprocess, remove); readers never.

The lock is a file beside the store directory, ``STORE.lock`` (``season.zarr.lock``; not inside it: zarr warns
about every file in a group's directory that is not a zarr node), created with ``O_CREAT | O_EXCL``: the
filesystem makes the create atomic (also on NFS v3+ and Lustre), so of two writers exactly one gets it. It holds
JSON naming the holder (user, host, pid, command, time); its modification time is the holder's heartbeat,
renewed every ``[lock] heartbeat`` seconds. A lock is stale, and is broken, when its holder is on this host and
its process is gone, or when its heartbeat is older than ``[lock] stale_after`` (a holder on another host that
died). A store on S3-compatible object storage has the object ``STORE.lock`` instead, created by a conditional
PUT (:class:`LockObject`); stores at other fsspec URLs have no lock.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path

from cirrus_batch.config import LockConfig
from cirrus_batch.errors import StoreError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
"""The lock of ``season.zarr`` is ``season.zarr.lock``."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock and did not release it in time."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock (the JSON in the lock file) and its last heartbeat (the file's modification time)."""

    user: str
    host: str
    pid: int
    command: str
    since: str
    token: str
    heartbeat: float

    def __str__(self) -> str:
        return f"`{self.command}` of {self.user}@{self.host} (pid {self.pid}, since {self.since})"

    def stale(self, stale_after: float, now: float | None = None) -> str | None:
        """Why this lock is stale, or None while its holder may still be alive."""
        age = (time.time() if now is None else now) - self.heartbeat
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"process {self.pid} is gone"
        if age > stale_after:
            return f"no heartbeat for {age:.0f} s (more than [lock] stale_after = {stale_after:g} s)"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def lock_path(store_url: str) -> Path | None:
    """The lock file of the store at ``store_url``; None when the store is not on a filesystem path."""
    fs, path = url_to_fs(stringify_path(store_url))
    return Path(path.rstrip("/") + LOCK_SUFFIX) if isinstance(fs, LocalFileSystem) else None


class LockFile:
    """The lock of a store on a filesystem: ``STORE.lock``, created with ``O_CREAT | O_EXCL``; its modification
    time is the heartbeat."""

    def __init__(self, path: Path):
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def store_exists(self) -> bool:
        return self.path.with_suffix("").is_dir()

    def prepare(self, create: bool) -> None:
        """Make the lock possible: the folder a new store (``create``) will be in exists."""
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def create(self, data: bytes) -> bool:
        """Create the lock holding ``data``, atomically; False when it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def read(self) -> tuple[bytes, float] | None:
        """The lock's content and heartbeat (POSIX seconds); None when there is none."""
        try:
            return self.path.read_bytes(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def renew(self, data: bytes) -> None:
        os.utime(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class LockObject:
    """The lock of a store on S3-compatible object storage: the object ``STORE.lock``, created with a
    conditional PUT (``If-None-Match: *``: of two writers the store accepts one); its ``LastModified`` is the
    heartbeat, renewed by writing it again. The methods are those of :class:`LockFile`."""

    _checked: set[str] = set()
    """Buckets whose store was seen to refuse a second conditional PUT (in this process)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, key: str):
        self.fs, self.key = fs, key

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.key)

    def store_exists(self) -> bool:
        return self.fs.exists(self.key.removesuffix(LOCK_SUFFIX) + "/zarr.json")

    def prepare(self, create: bool) -> None:
        """Check once per bucket that the store refuses a second conditional PUT of one key (a throw-away key):
        one that ignores the condition would let two writers in."""
        bucket = self.key.split("/", 1)[0]
        if bucket in self._checked:
            return
        probe = f"{self.key}.probe-{uuid.uuid4().hex}"
        try:
            if not (self.create(b"probe", probe) and not self.create(b"probe", probe)):
                raise StoreError(f"the object store of {self} does not refuse a second conditional PUT "
                                 "(If-None-Match: *) of one key: it cannot hold a writer lock")  # fmt: skip
        finally:
            if self.fs.exists(probe):
                self.fs.rm_file(probe)
        self._checked.add(bucket)

    def create(self, data: bytes, key: str | None = None) -> bool:
        try:
            self.fs.pipe_file(key or self.key, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno == errno.EINVAL or "onflict" in str(exc):  # 412 PreconditionFailed, 409 a concurrent PUT
                return False
            raise
        return True

    def read(self) -> tuple[bytes, float] | None:
        try:
            self.fs.invalidate_cache(self.key)
            info = self.fs.info(self.key)
            data = self.fs.cat_file(self.key)
        except FileNotFoundError:
            return None
        modified = info.get("LastModified") or info.get("mtime")
        return data, modified.timestamp() if isinstance(modified, datetime) else float(modified or time.time())

    def renew(self, data: bytes) -> None:
        self.fs.pipe_file(self.key, data)

    def remove(self) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            pass


def lock_object(store_url: str) -> LockFile | LockObject | None:
    """The lock of the store at ``store_url``: a file beside a store on a filesystem, an object beside one on
    S3-compatible storage; None for other fsspec URLs (no lock)."""
    fs, path = url_to_fs(stringify_path(store_url))
    if isinstance(fs, LocalFileSystem):
        return LockFile(Path(path.rstrip("/") + LOCK_SUFFIX))
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return LockObject(fs, path.rstrip("/") + LOCK_SUFFIX)
    return None


def read_holder(lock: Path | LockFile | LockObject) -> Holder | None:
    """The holder of the lock ``lock`` (a lock file's path, or a lock); None when there is none (or its file is
    still being written)."""
    found = (LockFile(lock) if isinstance(lock, Path) else lock).read()
    if found is None:
        return None
    data, heartbeat = found
    try:
        info = json.loads(data)
        return Holder(str(info["user"]), str(info["host"]), int(info["pid"]), str(info["command"]),
                      str(info["since"]), str(info["token"]), heartbeat)  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None


class StoreLock:
    """``with StoreLock(url, "ingest", cfg): ...``: hold the store's writer lock, waiting up to ``cfg.wait``
    seconds for another holder (``on_wait`` is told once, with a message naming it), then
    :class:`StoreLockedError`. ``create``: the store may not exist yet (ingest); otherwise a missing store is an
    error before any lock is taken."""

    def __init__(self, store_url: str, command: str, cfg: LockConfig | None = None, *,
                 create: bool = False, on_wait: Callable[[str], None] | None = None):  # fmt: skip
        self.url = stringify_path(store_url)
        self.command = command
        self.cfg = cfg or LockConfig()
        self.create = create
        self.on_wait = on_wait or log.warning
        self.lock = lock_object(self.url)
        self.token = uuid.uuid4().hex
        self.info = b""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- acquire and release -----------------------------------------------------------------------
    def acquire(self) -> None:
        if self.lock is None:
            log.info("%s is neither on a filesystem path nor on S3: no writer lock", self.url)
            return
        try:
            if not self.create and not self.lock.store_exists():
                raise StoreError(f"no zarr store at {self.url}")
            self.lock.prepare(self.create)
        except OSError as exc:
            raise StoreError(f"cannot create STORE {self.url}: {exc.strerror or exc}") from None
        deadline, told = time.monotonic() + self.cfg.wait, False
        while not self._try_create():
            holder = read_holder(self.lock)
            if holder is None:  # released meanwhile, or its holder is writing it now
                found = self.lock.read()
                if found is not None and time.time() - found[1] > self.cfg.stale_after:
                    self._break(None, "an empty lock file")
                time.sleep(0.05)
                continue
            reason = holder.stale(self.cfg.stale_after)
            if reason:
                self._break(holder, reason)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreLockedError(
                    f"{self.url} is being written by {holder}; {self.command} changed nothing "
                    f"(waited {self.cfg.wait:g} s, [lock] wait; the lock is {self.lock})"
                )
            if not told:
                self.on_wait(f"{self.url} is being written by {holder}; waiting up to {self.cfg.wait:g} s")
                told = True
            time.sleep(min(0.5, left))
        self._beat = threading.Thread(target=self._heartbeat, name="cirrus-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        if self.lock is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = read_holder(self.lock)
        if holder is not None and holder.token == self.token:
            self.lock.remove()

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------------------
    def _try_create(self) -> bool:
        """Create the lock (atomically) with our holder's JSON; False when it exists."""
        assert self.lock is not None
        info = {"user": _user(), "host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": self.token}  # fmt: skip
        self.info = json.dumps(info).encode()
        try:
            return self.lock.create(self.info)
        except OSError as exc:
            raise StoreError(f"cannot write to STORE {self.url} (creating its lock {self.lock}: "
                             f"{exc.strerror or exc}); nothing was changed") from None  # fmt: skip

    def _break(self, holder: Holder | None, reason: str) -> None:
        """Remove a stale lock, unless it changed hands since it was judged stale."""
        assert self.lock is not None
        now = read_holder(self.lock)
        if (now.token if now else None) != (holder.token if holder else None):
            return
        log.warning("breaking the stale lock of %s on %s: %s", holder or "nobody", self.url, reason)
        self.lock.remove()

    def _heartbeat(self) -> None:
        assert self.lock is not None
        while not self._stop.wait(self.cfg.heartbeat):
            holder = read_holder(self.lock)
            if holder is None or holder.token != self.token:
                log.error("the writer lock of %s was taken from this process (%s)", self.url, holder or "removed")
                return
            try:
                self.lock.renew(self.info)
            except OSError as exc:
                log.warning("cannot renew the writer lock %s: %s", self.lock, exc)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
