"""MLflow tracking server checks: one clear error at once instead of minutes of retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from cirrus_batch.errors import CirrusError

RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
"""MLflow's HTTP retries for this process (unless set already): ~7 s of back-off when a server stops answering
in the middle of a run, instead of MLflow's 7 retries with a factor of 2 (~256 s)."""


def limit_retries() -> None:
    """Set :data:`RETRIES` in the environment of this process (and of the Dask workers it starts)."""
    for key, value in RETRIES.items():
        os.environ.setdefault(key, value)


def require_server(uri: str, timeout: float = 5.0) -> None:
    """A :class:`CirrusError` within ``timeout`` seconds when an ``http(s)://`` tracking server does not accept
    connections; other URIs (``sqlite:///``, ``file:``, ``databricks``) are not checked."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "localhost", port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise CirrusError(f"the MLflow tracking server {uri} does not answer ({reason}): start it, or give "
                          "another --tracking-uri") from None  # fmt: skip
