"""Remote SOURCEs against real servers on loopback, started here: bundles (.tar, .tar.gz, .zip) on disk and over
Python's HTTP server, a WebDAV share (wsgidav, with a login); each gives the store the local folder gives, a
rerun adds nothing, and a truncated bundle, a wrong password or an unreachable server is one clear error that
leaves the store as it was. The test password appears in no output and no store file."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import make_archive
from distributed import Client, LocalCluster
from servers import http_server, webdav_server

from cirrus_batch.config import IngestConfig
from cirrus_batch.errors import CirrusError
from cirrus_batch.ingest import ingest
from cirrus_batch.sources import PASSWORD_ENV, USER_ENV, SourceConfig, redact
from cirrus_batch.store import Store, open_dataset

CFG = IngestConfig(shard_size=4)
USER, PASSWORD = "ana", "s3cret-Pa55-for-tests"


def run(source, store, client, cfg: IngestConfig = CFG):
    return ingest(str(source), str(store), client, cfg, progress=False)


def same_store(store: Path, reference: Path) -> None:
    """``store`` holds what ``reference`` holds: values, times, sources, header values."""
    a, b = open_dataset(str(store)).load(), open_dataset(str(reference)).load()
    assert a["source"].values.tolist() == b["source"].values.tolist()
    for name in ("time", "raw", "exptime", "ambtemp", "digest"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def pack(root: Path, bundle: Path, nights: list[str] | None = None) -> Path:
    """``root``'s files (or only those of ``nights``, e.g. ``["20260105"]``) as a bundle, paths relative to it."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and (not nights or p.parent.name in nights))
    if bundle.suffix == ".zip":
        with zipfile.ZipFile(bundle, "w") as z:
            for p in files:
                z.write(p, p.relative_to(root).as_posix())
    else:
        with tarfile.open(bundle, "w:gz" if bundle.name.endswith(".gz") else "w") as t:
            for p in files:
                t.add(p, p.relative_to(root).as_posix())
    return bundle


@pytest.fixture
def folder_store(tmp_path, client) -> tuple[Path, Path]:
    """A 2-night archive (10 images) and the store ingested from its folder."""
    root = tmp_path / "archive"
    make_archive(root)
    run(root, tmp_path / "folder.zarr", client)
    return root, tmp_path / "folder.zarr"


@pytest.fixture
def http_dir(tmp_path) -> Iterator[tuple[Path, str]]:
    (tmp_path / "www").mkdir()
    with http_server(tmp_path / "www") as url:
        yield tmp_path / "www", url


# -- bundles ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["season.tar", "season.tar.gz", "season.zip"])
def test_bundle_on_disk_and_over_http_is_the_folder_store(tmp_path, folder_store, http_dir, client, name):
    root, reference = folder_store
    www, url = http_dir
    bundle = pack(root, www / name)
    for i, source in enumerate([bundle, f"{url}/{name}"]):
        store = tmp_path / f"s{i}.zarr"
        report = run(source, store, client)
        assert report.ingested == 10 and not report.rejected
        same_store(store, reference)
        assert run(source, store, client).ingested == 0  # a rerun adds nothing
        assert run(root, store, client).already == 10  # the folder is the same archive


def test_next_nights_bundle_appends_and_the_same_one_again_adds_nothing(tmp_path, folder_store, http_dir, client):
    root, reference = folder_store
    www, url = http_dir
    store = tmp_path / "s.zarr"
    assert run(f"{url}/{pack(root, www / 'n1.tar', ['20260105']).name}", store, client).ingested == 5
    pack(root, www / "n2.zip", ["20260106"])
    assert run(f"{url}/n2.zip", store, client).ingested == 5
    assert run(f"{url}/n2.zip", store, client).ingested == 0
    same_store(store, reference)


@pytest.mark.parametrize("name", ["b.tar", "b.tar.gz", "b.zip"])
def test_truncated_bundle_is_one_error_naming_it_and_the_store_is_kept(tmp_path, folder_store, http_dir, client,
                                                                       name):  # fmt: skip
    root, _ = folder_store
    www, url = http_dir
    store = tmp_path / "s.zarr"
    run(f"{url}/{pack(root, www / 'first.tar', ['20260105']).name}", store, client)
    data = pack(root, tmp_path / name).read_bytes()
    cuts = [len(data) // 2]
    if name == "b.tar":  # cut exactly between two members: tarfile alone would end quietly there
        with tarfile.open(tmp_path / name) as t:
            cuts.append(t.getmembers()[7].offset)
    else:  # the gzip trailer, the zip's central directory
        cuts.append(len(data) - 10)
    for cut in cuts:
        (www / name).write_bytes(data[:cut])
        t0 = time.monotonic()
        with pytest.raises(CirrusError, match=rf"^bundle {url}/{name} is truncated or damaged .*nothing was read"):
            run(f"{url}/{name}", store, client)
        assert time.monotonic() - t0 < 15
        kept = Store.open(str(store), mode="r")
        assert kept.committed == 5 and kept.group["raw"].shape[0] == 5


def test_zip_on_a_server_without_range_requests_is_a_clear_error(tmp_path, folder_store, client):
    (tmp_path / "plain").mkdir()
    pack(folder_store[0], tmp_path / "plain" / "b.zip")
    with http_server(tmp_path / "plain", ranges=False) as url:
        with pytest.raises(CirrusError, match=rf"^bundle {url}/b.zip: the server does not answer range requests"):
            run(f"{url}/b.zip", tmp_path / "s.zarr", client)
    assert not (tmp_path / "s.zarr").exists()


def test_unreachable_http_server_is_a_clear_error(tmp_path, client):
    t0 = time.monotonic()
    with pytest.raises(CirrusError, match="cannot read SOURCE http://127.0.0.1:9/x.tar"):
        run("http://127.0.0.1:9/x.tar", tmp_path / "s.zarr", client)
    assert time.monotonic() - t0 < 15 and not (tmp_path / "s.zarr").exists()


def test_redact_drops_login_and_query():
    assert redact("https://ana:pw@host/d/x.tar?token=abc") == "https://host/d/x.tar"
    assert redact("/data/archive") == "/data/archive"


# -- WebDAV -------------------------------------------------------------------------------------------
@pytest.fixture
def webdav(folder_store) -> Iterator[str]:
    """The archive on a WebDAV server (wsgidav) on loopback that wants USER/PASSWORD."""
    with webdav_server(folder_store[0].parent, USER, PASSWORD) as url:
        yield f"{url}/archive"


@pytest.fixture
def login_client(monkeypatch) -> Iterator[Client]:
    """A cluster started with the login in the environment (workers look it up themselves, as under the CLI)."""
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


WEBDAV = IngestConfig(shard_size=4, source=SourceConfig(protocol="webdav"))


def test_webdav_share_is_the_folder_store(tmp_path, folder_store, webdav, login_client):
    _, reference = folder_store
    store = tmp_path / "s.zarr"
    report = run(webdav, store, login_client, WEBDAV)
    assert report.ingested == 10 and not report.rejected
    same_store(store, reference)
    assert run(webdav, store, login_client, WEBDAV).ingested == 0
    # a bundle on the share
    pack(folder_store[0], folder_store[0].parent / "season.tar.gz")
    bundled = tmp_path / "b.zarr"
    assert run(webdav.removesuffix("archive") + "season.tar.gz", bundled, login_client, WEBDAV).ingested == 10
    same_store(bundled, reference)


def test_webdav_login_from_netrc(tmp_path, folder_store, webdav, client, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    from cirrus_batch.ingest import discover

    fs, entries = discover(webdav, SourceConfig(protocol="webdav"))
    assert len(entries) == 10 and entries[0].source == "2026/20260105/cam_20260105T200000.fits"
    assert len(fs.cat_file(entries[0].path)) == entries[0].size


@pytest.mark.parametrize("login", ["wrong", "none", "in-url"])
def test_webdav_wrong_login_is_one_line_and_keeps_the_store(tmp_path, folder_store, webdav, client, monkeypatch,
                                                            login):  # fmt: skip
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    source = webdav
    if login == "wrong":
        monkeypatch.setenv(USER_ENV, USER)
        monkeypatch.setenv(PASSWORD_ENV, "not-" + PASSWORD)
    elif login == "in-url":
        source = webdav.replace("://", f"://{USER}:{PASSWORD}@")
    store = folder_store[1]
    t0 = time.monotonic()
    with pytest.raises(CirrusError) as err:
        run(source, store, client, WEBDAV)
    assert time.monotonic() - t0 < 15
    message = str(err.value)
    assert "\n" not in message and PASSWORD not in message
    expected = {"wrong": "refused the login", "none": "needs a login", "in-url": "no login in the URL"}[login]
    assert expected in message
    assert Store.open(str(store), mode="r").committed == 10


def test_unreachable_webdav_server_is_a_clear_error(tmp_path, client):
    t0 = time.monotonic()
    with pytest.raises(CirrusError, match="cannot reach the WebDAV server 127.0.0.1:9"):
        run("http://127.0.0.1:9/archive", tmp_path / "s.zarr", client, WEBDAV)
    assert time.monotonic() - t0 < 15 and not (tmp_path / "s.zarr").exists()


def test_the_password_is_in_no_output_and_no_store_file(tmp_path, webdav):
    """`cirrus ingest` of the share with the login in the environment, then a run with a wrong one and `info`:
    the password is in none of their output, the job config, the store's files or its lock."""
    store = tmp_path / "s.zarr"
    env = {**os.environ, USER_ENV: USER, PASSWORD_ENV: PASSWORD, "PYTHONUNBUFFERED": "1"}
    job = tmp_path / "job.toml"
    job.write_text('[ingest.source]\nprotocol = "webdav"\n[cluster]\nn_workers = 1\nthreads_per_worker = 1\n')
    cli = [sys.executable, "-m", "cirrus_batch.cli"]
    outputs = []
    for extra_env in ({}, {PASSWORD_ENV: "x" + PASSWORD}):
        out = subprocess.run([*cli, "-v", "ingest", webdav, str(store), "--config", str(job), "--no-progress"],
                             capture_output=True, text=True, env={**env, **extra_env}, timeout=300)  # fmt: skip
        outputs.append(out.stdout + out.stderr)
    assert "ingested now" in outputs[0] and "refused the login" in outputs[1]
    outputs.append(subprocess.run([*cli, "info", str(store)], capture_output=True, text=True, env=env,
                                  timeout=120).stdout)  # fmt: skip
    assert Store.open(str(store), mode="r").committed == 10
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "archive" not in p.parts]
    assert any(p.name == "zarr.json" for p in files)
    secrets = [PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode())]  # also as a Basic header
    for blob in [text.encode() for text in outputs] + [p.read_bytes() for p in files]:
        assert not any(secret in blob for secret in secrets)
