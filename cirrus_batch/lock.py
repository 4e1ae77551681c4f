"""The store's writer lock: one writing command at a time (ingest, prepare, reprocess, remove); readers never.

The lock is a file beside the store directory, ``STORE.lock`` (``season.zarr.lock``; not inside it: zarr warns
about every file in a group's directory that is not a zarr node), created with ``O_CREAT | O_EXCL``: the
filesystem makes the create atomic (also on NFS v3+ and Lustre), so of two writers exactly one gets it. It holds
JSON naming the holder (user, host, pid, command, time); its modification time is the holder's heartbeat,
renewed every ``[lock] heartbeat`` seconds. A lock is stale, and is broken, when its holder is on this host and
its process is gone, or when its heartbeat is older than ``[lock] stale_after`` (a holder on another host that
died). Stores that are not on a filesystem path (fsspec URLs) have no lock.
"""

from __future__ import annotations

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


def read_holder(path: Path) -> Holder | None:
    """The holder of the lock at ``path``; None when there is none (or its file is still being written)."""
    try:
        heartbeat = path.stat().st_mtime
        info = json.loads(path.read_text())
        return Holder(str(info["user"]), str(info["host"]), int(info["pid"]), str(info["command"]),
                      str(info["since"]), str(info["token"]), heartbeat)  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError, TypeError):
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
        self.path = lock_path(self.url)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- acquire and release -----------------------------------------------------------------------
    def acquire(self) -> None:
        if self.path is None:
            log.info("%s is not on a filesystem path: no writer lock", self.url)
            return
        store_dir = self.path.with_suffix("")
        if self.create:
            self._mkdir()
        elif not store_dir.is_dir():
            raise StoreError(f"no zarr store at {self.url}")
        deadline, told = time.monotonic() + self.cfg.wait, False
        while not self._try_create():
            holder = read_holder(self.path)
            if holder is None:  # released meanwhile, or its holder is writing it now
                if self.path.exists() and time.time() - self._mtime() > self.cfg.stale_after:
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
                    f"(waited {self.cfg.wait:g} s, [lock] wait; the lock is {self.path})"
                )
            if not told:
                self.on_wait(f"{self.url} is being written by {holder}; waiting up to {self.cfg.wait:g} s")
                told = True
            time.sleep(min(0.5, left))
        self._beat = threading.Thread(target=self._heartbeat, name="cirrus-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        if self.path is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------------------
    def _mkdir(self) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create STORE {self.url}: {exc.strerror or exc}") from None

    def _try_create(self) -> bool:
        """Create the lock file (atomically, ``O_EXCL``) with our holder's JSON; False when it exists."""
        assert self.path is not None
        info = {"user": _user(), "host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": self.token}  # fmt: skip
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot write to STORE {self.url} (creating its lock {self.path}: "
                             f"{exc.strerror or exc}); nothing was changed") from None  # fmt: skip
        try:
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _mtime(self) -> float:
        assert self.path is not None
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return time.time()

    def _break(self, holder: Holder | None, reason: str) -> None:
        """Remove a stale lock, unless it changed hands since it was judged stale."""
        assert self.path is not None
        now = read_holder(self.path)
        if (now.token if now else None) != (holder.token if holder else None):
            return
        log.warning("breaking the stale lock of %s on %s: %s", holder or "nobody", self.url, reason)
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        assert self.path is not None
        while not self._stop.wait(self.cfg.heartbeat):
            holder = read_holder(self.path)
            if holder is None or holder.token != self.token:
                log.error("the writer lock of %s was taken from this process (%s)", self.url, holder or "removed")
                return
            try:
                os.utime(self.path)
            except OSError as exc:
                log.warning("cannot renew the writer lock %s: %s", self.path, exc)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
