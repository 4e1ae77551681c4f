"""Screenshots of the MLflow UI pages a person comparing models opens, in a real (headless) browser.

    python docs/mlflow_screenshots.py demo/mlflow.db [--out /tmp/mlflow-shots] [--chromium /usr/bin/chromium]

Starts ``mlflow ui`` on 127.0.0.1 (a free port) over the tracking database, then draws with headless Chromium
(Debian: ``apt-get install -y chromium``): the training experiment's runs table, the newest classifier and U-Net
runs (overview with the description, metric charts, the artifacts), the registered models, each champion
version, and the season-report experiment. Writes one PNG per page to ``--out`` and lists them. Known limit:
plain ``--screenshot`` does not wait for the lazily drawn metric charts of the "Model metrics" tab (their
sections, ``train``/``val``/``test``/..., show; the charts are still spinners).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"mlflow ui did not answer at {url} within {seconds:.0f} s")


def pages(tracking: str) -> list[tuple[str, str]]:
    """(file name, URL fragment) of every page to draw."""
    client = MlflowClient(tracking)
    out: list[tuple[str, str]] = []
    train = client.get_experiment_by_name("cirrus")
    if train is not None:
        eid = train.experiment_id
        out.append(("01-runs-table", f"#/experiments/{eid}/runs"))
        for task in ("classify", "segment"):
            runs = client.search_runs([eid], f"tags.task = '{task}' and attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
            if runs:
                rid = runs[0].info.run_id
                out += [(f"02-{task}-run-overview", f"#/experiments/{eid}/runs/{rid}"),
                        (f"03-{task}-run-metrics", f"#/experiments/{eid}/runs/{rid}/model-metrics"),
                        (f"04-{task}-run-artifacts", f"#/experiments/{eid}/runs/{rid}/artifacts")]  # fmt: skip
    out.append(("05-registered-models", "#/models"))
    for name in ("cirrus-classifier", "cirrus-unet"):
        try:
            version = client.get_model_version_by_alias(name, "champion").version
        except Exception:  # noqa: BLE001  (no champion yet: nothing to draw)
            continue
        out.append((f"06-{name}-champion", f"#/models/{name}/versions/{version}"))
    reports = client.get_experiment_by_name("cirrus-reports")
    if reports is not None:
        out.append(("07-report-runs", f"#/experiments/{reports.experiment_id}/runs"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path, help="the MLflow sqlite database (e.g. demo/mlflow.db)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlflow-shots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--size", default="1600,1100", help="window width,height")
    args = parser.parse_args()
    if not args.db.is_file():
        raise SystemExit(f"no MLflow database at {args.db}")
    tracking = f"sqlite:///{args.db.resolve()}"
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    args.out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(base)
        for name, fragment in pages(tracking):
            png = args.out / f"{name}.png"
            subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={args.size}", "--virtual-time-budget=15000",
                            f"--screenshot={png}", base + fragment],
                           check=True, capture_output=True, timeout=180)  # fmt: skip
            print(png)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
