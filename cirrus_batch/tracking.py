"""One MLflow tracking store wherever a command is run from.

Rule: a relative ``sqlite:///PATH`` tracking URI (the default ``sqlite:///mlflow.db``) is a path **relative to
the folder that holds the store**: ``cirrus train demo/season.zarr`` and ``cirrus reprocess season.zarr`` run
inside ``demo/`` both use ``demo/mlflow.db``. Every command resolves it once (:func:`resolve_tracking_uri`)
and prints the absolute URI it uses. For a store given as a remote URL (``s3://…``) the current directory
stands in for its folder. Absolute paths (``sqlite:////abs/mlflow.db``), servers (``http://…``) and other
schemes are used as given.

Commands that only read the tracking store (``reprocess``, ``report``, ``promote``) never create one:
:func:`require_tracking_store` fails with an error naming the file where it is missing.

An ``http(s)://`` tracking server that does not accept connections is one clear error at once
(:func:`require_server`), and MLflow's own HTTP retries are shortened (:func:`limit_retries`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
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


SQLITE = "sqlite:///"


def store_folder(store_url: str) -> Path:
    """The folder holding a local store (``file://`` URLs too); the current directory for remote URLs."""
    path = store_url.removeprefix("file://")
    if "://" in path:
        return Path.cwd()
    return Path(os.path.abspath(path.rstrip("/"))).parent


def resolve_tracking_uri(uri: str, store_url: str) -> str:
    """``uri`` with a relative sqlite path made absolute against :func:`store_folder` (see the module rule)."""
    if not uri.startswith(SQLITE) or uri.startswith(SQLITE + "/") or ":memory:" in uri:
        return uri
    return SQLITE + str(store_folder(store_url) / uri.removeprefix(SQLITE))


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute ``sqlite:////…`` URI; None for other stores."""
    if uri.startswith(SQLITE + "/"):
        return Path(uri.removeprefix(SQLITE).split("?", 1)[0])
    return None


def use_experiment(name: str) -> str:
    """Make ``name`` MLflow's active experiment in the current tracking store and return its id. A new one
    created in an sqlite store keeps its artifacts (models, figures) in ``mlartifacts/`` beside the database,
    not in ``./mlruns`` of whatever directory the command runs from."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is None:
        db = sqlite_path(mlflow.get_tracking_uri())
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException as err:  # another process created it meanwhile
            if mlflow.get_experiment_by_name(name) is None:
                raise err
    return mlflow.set_experiment(name).experiment_id


def require_tracking_store(uri: str) -> None:
    """A clear error when ``uri`` is an sqlite file that does not exist (MLflow would create an empty one)."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise CirrusError(f"no MLflow tracking store at {path} (tracking URI {uri}): train there first "
                          "(`cirrus train STORE`; a relative sqlite path is relative to the store's folder) "
                          "or give --tracking-uri")  # fmt: skip
