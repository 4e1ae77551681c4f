"""Where ingest reads an archive from: a path, a glob or an fsspec URL, a WebDAV share, or a bundle.

* **WebDAV** (``webdav://host/path``, read over HTTPS; or an ``http(s)://`` URL with ``[ingest.source] protocol =
  "webdav"``) through fsspec's ``webdav4`` filesystem. The login comes from the environment
  (``CIRRUS_WEBDAV_USER``, ``CIRRUS_WEBDAV_PASSWORD``) or else from the netrc file (``$NETRC`` or ``~/.netrc``,
  the entry of the host), never from the job config or the URL. The filesystem pickles to its URL only: each
  Dask worker process looks the login up again, so it travels in no task and is stored nowhere.
* **Bundles**: a ``.tar`` (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) or ``.zip`` file, local or at any
  URL above, is read member by member through fsspec's archive filesystems, never unpacked to disk; the members'
  paths inside the bundle are the images' sources, so a bundle and the folder it was packed from are the same
  archive. A bundle is checked complete when it is opened (a tar must reach its end-of-archive blocks, a gzip
  stream its end, a zip its central directory): a truncated download is one error naming it before anything is
  written. Each process opens a bundle once (its index is kept) and reads one member at a time from it; a
  ``.tar.gz`` is decompressed from its start whenever a read goes backwards, so large bundles are better as
  ``.tar`` or ``.zip``. Over HTTP(S) the server must answer range requests (file-transfer services do).

:func:`open_source` turns SOURCE into a filesystem and a path; :func:`redact` is SOURCE as it may be printed or
stored (no login, no query string: download links carry their token there).
"""

from __future__ import annotations

import functools
import netrc
import os
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.tar import TarFileSystem
from fsspec.implementations.zip import ZipFileSystem
from fsspec.utils import stringify_path

from cirrus_batch.errors import CirrusError

PROTOCOLS = ("auto", "webdav")
USER_ENV, PASSWORD_ENV = "CIRRUS_WEBDAV_USER", "CIRRUS_WEBDAV_PASSWORD"
BUNDLES = {".tar": ("tar", None), ".tar.gz": ("tar", "gzip"), ".tgz": ("tar", "gzip"),
           ".tar.bz2": ("tar", "bz2"), ".tar.xz": ("tar", "xz"), ".zip": ("zip", None)}  # fmt: skip
"""Bundle name endings: (archive filesystem, compression)."""


@dataclass
class SourceConfig:
    """How ingest reaches SOURCE (``[ingest.source]``; see :mod:`cirrus_batch.sources`). Ranges and choices are
    the field metadata :func:`cirrus_batch.config.from_dict` checks."""

    protocol: str = field(default="auto", metadata={"choices": PROTOCOLS})
    """``auto``: by the URL (``webdav://`` is WebDAV over HTTPS); ``"webdav"``: an ``http(s)://`` SOURCE is a
    WebDAV share. The login is never a setting: ``CIRRUS_WEBDAV_USER``/``CIRRUS_WEBDAV_PASSWORD`` or netrc."""
    timeout_s: float = field(default=10.0, metadata={"range": (0, 600), "strict": "lo"})
    """Seconds a WebDAV request may wait for the server (connect, read) before it is an error."""


def redact(source: Any) -> str:
    """SOURCE without a login or a query string in its URL (what is printed, logged and stored)."""
    text = stringify_path(source)
    parts = urlsplit(text)
    if not parts.scheme or len(parts.scheme) == 1:  # a path (C: on Windows)
        return text
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# -- WebDAV ---------------------------------------------------------------------------------------
def webdav_login(host: str) -> tuple[str, str] | None:
    """(user, password) for ``host``: from the environment, else the netrc file; None when neither has one."""
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user and password is not None:
        return user, password
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (netrc.NetrcParseError, OSError) as exc:
        raise CirrusError(f"cannot read the netrc file {path}: {getattr(exc, 'msg', exc)}") from None
    return (entry[0], entry[2] or "") if entry else None


@functools.cache
def _webdav_class() -> type:
    from webdav4.fsspec import WebdavFileSystem

    class Webdav(WebdavFileSystem):
        """webdav4's filesystem that pickles to its URL only (each process looks the login up itself) and is
        never shared from fsspec's instance cache (the login may change between two runs of one process)."""

        cachable = False

        def __reduce__(self) -> tuple[Any, ...]:
            return _webdav, self._where

    return Webdav


def _webdav(base_url: str, timeout_s: float) -> fsspec.AbstractFileSystem:
    fs = _webdav_class()(base_url, auth=webdav_login(urlsplit(base_url).hostname or ""), timeout=timeout_s,
                         retry=False)  # fmt: skip
    fs._where = (base_url, timeout_s)
    return fs


def webdav_fs(url: str, timeout_s: float = 10.0) -> tuple[fsspec.AbstractFileSystem, str]:
    """The WebDAV filesystem of the server of ``url`` and the path on it, after one request that checks the
    server answers and takes the login (a :class:`CirrusError` in one line otherwise)."""
    import httpx
    from webdav4.client import ClientError, HTTPError

    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise CirrusError(f"SOURCE {redact(url)}: no login in the URL; give it in {USER_ENV}/{PASSWORD_ENV} "
                          "or the netrc file")  # fmt: skip
    scheme = "https" if parts.scheme in ("webdav", "dav") else parts.scheme
    fs, path, host = _webdav(f"{scheme}://{parts.netloc}", timeout_s), parts.path.strip("/"), parts.hostname
    try:
        fs.info(path)
    except FileNotFoundError:
        pass  # said by the caller
    except HTTPError as exc:
        if exc.status_code in (401, 403):
            why = "refused the login" if fs.client.http.auth is not None else "needs a login"
            raise CirrusError(f"WebDAV server {parts.netloc} {why} ({exc}): set {USER_ENV} and {PASSWORD_ENV}, "
                              f"or a netrc entry for {host}") from None  # fmt: skip
        raise CirrusError(f"WebDAV server {parts.netloc}: {exc} for {redact(url)}") from None
    except (httpx.HTTPError, ClientError, OSError) as exc:
        raise CirrusError(f"cannot reach the WebDAV server {parts.netloc} ({type(exc).__name__}: {exc}; "
                          f"[ingest.source] timeout_s = {timeout_s:g})") from None  # fmt: skip
    return fs, path


# -- bundles ------------------------------------------------------------------------------------------
def bundle_kind(path: str) -> tuple[str, str | None] | None:
    """(archive filesystem, compression) of a bundle's name, None for any other name."""
    name = path.rstrip("/").lower()
    return next((BUNDLES[end] for end in sorted(BUNDLES, key=len, reverse=True) if name.endswith(end)), None)


class _Bundle:
    """What the two archive filesystems get here: one reader at a time (a member read seeks the bundle's one
    file object, and a worker's threads share the instance), and pickling to where the bundle is."""

    _bundle: tuple[Any, ...]
    _reads: threading.Lock

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        with self._reads:
            return super().cat_file(path, start, end, **kwargs)  # type: ignore[misc]

    def __reduce__(self) -> tuple[Any, ...]:
        return bundle_fs, self._bundle


class _Tar(_Bundle, TarFileSystem):
    pass


class _Zip(_Bundle, ZipFileSystem):
    pass


_opened: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}
_opening = threading.Lock()


def bundle_fs(target: fsspec.AbstractFileSystem, path: str, stamp: tuple[Any, ...] | None = None
              ) -> fsspec.AbstractFileSystem:  # fmt: skip
    """The archive filesystem of the bundle at ``path`` of ``target``, opened once per process and version
    ``stamp`` (size and modification time or ETag; looked up when not given), so that its index is read once.
    A :class:`CirrusError` naming the bundle when it is truncated."""
    if stamp is None:
        info = target.info(path)
        stamp = tuple(str(info.get(k)) for k in ("size", "mtime", "modified", "ETag", "etag", "last_modified"))
    key = (type(target).__name__, getattr(target, "_where", None), target.unstrip_protocol(path), stamp)
    with _opening:
        if key not in _opened:
            while len(_opened) >= 2:
                _opened.pop(next(iter(_opened)))
            _opened[key] = _open_bundle(target, path)
            _opened[key]._bundle = (target, path, stamp)  # type: ignore[attr-defined]
            _opened[key]._reads = threading.Lock()  # type: ignore[attr-defined]
        return _opened[key]


def _open_bundle(target: fsspec.AbstractFileSystem, path: str) -> fsspec.AbstractFileSystem:
    kind, compression = bundle_kind(path) or ("tar", None)
    name = path if isinstance(target, LocalFileSystem) else target.unstrip_protocol(path)
    try:
        f = target.open(path, "rb")
        if kind == "zip":
            fs: Any = _Zip(fo=f)
        else:
            fs = _Tar(fo=f, compression=compression)
            _check_tar_end(fs.tar)
    except CirrusError:
        raise
    except ValueError as exc:
        if "range requests" not in str(exc):
            raise
        raise CirrusError(f"bundle {redact(name)}: the server does not answer range requests, which reading a "
                          "bundle in place needs; download it and give the file") from None  # fmt: skip
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise CirrusError(f"bundle {redact(name)} is truncated or damaged ({type(exc).__name__}: {exc}); "
                          "nothing was read from it") from None  # fmt: skip
    return fs


def _check_tar_end(tar: tarfile.TarFile) -> None:
    """A tar ends with a zero block after its last member, and a compressed one with its stream's trailer; a
    download cut short does not (tarfile stops silently at a missing header; the padding after the end block is
    read to the end so that the decompressor checks its trailer)."""
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
        raise EOFError(f"no end-of-archive block at byte {tar.offset}: the bundle ends early")
    while tar.fileobj.read(1 << 20):
        pass


# -- the entry point ----------------------------------------------------------------------------------
def open_source(source: Any, cfg: SourceConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of SOURCE and the path on it (``""``: the whole of a bundle)."""
    cfg = cfg or SourceConfig()
    text = stringify_path(source)
    scheme = urlsplit(text).scheme
    if scheme in ("webdav", "dav") or (cfg.protocol == "webdav" and scheme in ("http", "https")):
        fs, path = webdav_fs(text, cfg.timeout_s)
    elif cfg.protocol == "webdav":
        raise CirrusError(f"[ingest.source] protocol = \"webdav\" needs an http(s):// or webdav:// SOURCE, "
                          f"got {redact(text)}")  # fmt: skip
    else:
        fs, path = url_to_fs(text)
    if bundle_kind(urlsplit(path).path if "://" in path else path) and "::" not in text and fs.isfile(path):
        return bundle_fs(fs, path), ""
    return fs, path
