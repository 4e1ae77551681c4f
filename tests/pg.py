"""A throw-away PostgreSQL server for tests: ``postgres_server()`` starts one on a free loopback port with a
fresh data folder and an ``optuna`` database, yields its SQLAlchemy URL and removes everything afterwards.

It needs the Debian ``postgresql`` package (installed here with apt-get when missing, but only as root with
``CI=true``, as slurm/local-cluster.sh does for SLURM) and psycopg2 (the ``test`` extra). As root the server
runs as the ``postgres`` user. When it cannot start, :class:`Unavailable` says why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Unavailable(Exception):
    """No PostgreSQL server can be started here; the message says why."""


def _bin_dir() -> Path | None:
    """The folder of ``pg_ctl`` and ``initdb`` (Debian keeps them in /usr/lib/postgresql/VERSION/bin)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _install(log: Path) -> None:
    if os.geteuid() != 0 or os.environ.get("CI", "").lower() != "true" or not shutil.which("apt-get"):
        raise Unavailable("PostgreSQL is not installed (apt-get install postgresql; run as root with CI=true to "
                          "have the tests install it)")  # fmt: skip
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("w") as out:
        ok = subprocess.run(["apt-get", "update", "-q"], check=False, stdout=out, stderr=out, env=env).returncode == 0 and (
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
                           check=False, stdout=out, stderr=out, env=env).returncode == 0)  # fmt: skip
    if not ok:
        raise Unavailable(f"apt-get install postgresql failed (log: {log})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a PostgreSQL server; yield ``postgresql+psycopg2://postgres@127.0.0.1:PORT/optuna``; stop it."""
    try:
        import psycopg2
    except ImportError:
        raise Unavailable("psycopg2 is not installed (pip install -c constraints.txt psycopg2-binary)") from None
    folder = Path(tempfile.mkdtemp(prefix="cirrus-pg-"))  # not under pytest's tmp: the postgres user reads it
    try:
        bin_dir = _bin_dir()
        if bin_dir is None:
            _install(folder / "apt-get.log")
            bin_dir = _bin_dir()
        if bin_dir is None:
            raise Unavailable("pg_ctl not found after installing postgresql")
        as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and there is no postgres user to run the server") from None
            os.chown(folder, user.pw_uid, user.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        data, log, port = folder / "data", folder / "server.log", _free_port()

        def run(*cmd: str) -> None:
            done = subprocess.run([*as_user, *cmd], check=False, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise Unavailable(f"{Path(cmd[0]).name} failed: {' / '.join(tail)}"
                                  + (f" (server log {log})" if log.exists() else ""))  # fmt: skip

        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CREATE DATABASE optuna")
            conn.close()
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
        finally:
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           check=False, capture_output=True, timeout=120)  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
