"""Screenshots of the MLflow UI pages a person comparing models opens, in a real (headless) browser.

    pip install -e '.[docs]'   # Playwright, the Python package only: it drives the system Chromium
    python docs/mlflow_screenshots.py demo/mlflow.db [--out /tmp/mlflow-shots] [--chromium /usr/bin/chromium]

Starts ``mlflow ui`` on 127.0.0.1 (a free port) over the tracking database, then drives headless Chromium
(Debian: ``apt-get install -y chromium``; no ``playwright install``) with Playwright through: the training
experiment's runs table; the newest classifier and U-Net runs (overview with the whole description, the "Model
metrics" tab, the artifacts with the learning curves open); the registered models; each champion version; the
season-report experiment and its newest run (tagged with the model versions used). The metric charts are drawn
only when they scroll into view, so the metrics page is drawn in a window as tall as its content and shot only
once every chart is a plot and no spinner is left (otherwise it stops, naming the page and its PNG).
Writes one PNG per page to ``--out`` and lists them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient
from playwright.sync_api import Page, sync_playwright

SPINNER = ".du-bois-light-spin-dot"  # MLflow's loading indicator (a chart not drawn yet, a table loading)
CHART = ".js-plotly-plot"  # one drawn metric chart


@dataclass(frozen=True)
class Shot:
    name: str  # PNG file name without suffix
    fragment: str  # URL fragment of the page
    kind: str = "page"  # "page", "runs" (a runs table), "overview" (a run's), "metrics" (a run's charts)


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


def shots(tracking: str) -> list[Shot]:
    """Every page to draw, in order."""
    client = MlflowClient(tracking)
    out: list[Shot] = []
    train = client.get_experiment_by_name("cirrus")
    if train is not None:
        eid = train.experiment_id
        out.append(Shot("01-runs-table", f"#/experiments/{eid}/runs", "runs"))
        for task in ("classify", "segment"):
            runs = client.search_runs([eid], f"tags.task = '{task}' and attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
            if runs:
                run = f"#/experiments/{eid}/runs/{runs[0].info.run_id}"
                out += [
                    Shot(f"02-{task}-run-overview", run, "overview"),
                    Shot(f"03-{task}-run-metrics", f"{run}/model-metrics", "metrics"),
                    Shot(f"04-{task}-run-artifacts", f"{run}/artifacts/report/learning_curves.png"),
                ]
    out.append(Shot("05-registered-models", "#/models"))
    for name in ("cirrus-classifier", "cirrus-unet"):
        try:
            version = client.get_model_version_by_alias(name, "champion").version
        except Exception:  # noqa: BLE001  (no champion yet: nothing to draw)
            continue
        out.append(Shot(f"06-{name}-champion", f"#/models/{name}/versions/{version}"))
    reports = client.get_experiment_by_name("cirrus-reports")
    if reports is not None:
        rid = reports.experiment_id
        out.append(Shot("07-report-runs", f"#/experiments/{rid}/runs", "runs"))
        runs = client.search_runs([rid], order_by=["attributes.start_time DESC"], max_results=1)
        if runs:  # its tags name the model versions the report used
            out.append(Shot("08-report-run-overview", f"#/experiments/{rid}/runs/{runs[0].info.run_id}"))
    return out


def settle(page: Page, seconds: float) -> None:
    """Wait for the network to go quiet (the UI polls, so at most a few seconds) and no spinner to be left."""
    try:
        page.wait_for_load_state("networkidle", timeout=5_000)
    except Exception:  # noqa: BLE001  (auto-refresh keeps the network busy: the spinner test below decides)
        pass
    page.wait_for_function(f"document.querySelectorAll('{SPINNER}').length === 0", timeout=seconds * 1000)


def dismiss(page: Page) -> None:
    """Close what covers the page: a "new UI" dialog, the MLflow Assistant panel (a third of the window)."""
    page.wait_for_timeout(1000)
    if page.locator("[role='dialog']").filter(visible=True).count():
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)
    close = page.locator("button[aria-label='Close']").filter(visible=True)
    if close.count():
        close.first.click(timeout=5_000)
        page.wait_for_timeout(500)


def draw_metrics(page: Page, width: int, seconds: float) -> None:
    """Grow the window to the height of the metrics list, so every lazily drawn chart is in view and drawn."""
    page.wait_for_selector(CHART, timeout=seconds * 1000)
    extra = page.evaluate("""() => Math.max(0, ...Array.from(document.querySelectorAll('div'))
        .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))
        .map(e => e.scrollHeight - e.clientHeight))""")
    page.set_viewport_size({"width": width, "height": page.viewport_size["height"] + int(extra) + 40})
    page.wait_for_function(f"document.querySelectorAll('{SPINNER}').length === 0", timeout=seconds * 1000)
    page.wait_for_timeout(1000)  # the last plots' transitions


def take(page: Page, base: str, shot: Shot, png: Path, size: tuple[int, int], seconds: float) -> None:
    page.set_viewport_size({"width": size[0], "height": size[1]})
    page.goto(base + shot.fragment)
    if shot.kind == "runs":
        page.wait_for_selector("[role='row'], .ag-row", timeout=seconds * 1000)
    dismiss(page)
    if shot.kind == "overview":
        page.get_by_text("Show more", exact=True).click(timeout=seconds * 1000)  # the whole description
    try:
        if shot.kind == "metrics":
            draw_metrics(page, size[0], seconds)
        settle(page, seconds)
    except Exception as err:  # noqa: BLE001
        page.screenshot(path=str(png))
        raise SystemExit(f"{shot.name}: not drawn within {seconds:.0f} s ({png} shows it): {err}") from err
    page.screenshot(path=str(png))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path, help="the MLflow sqlite database (e.g. demo/mlflow.db)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlflow-shots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--size", default="1600,1100", help="window width,height")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a page may take to draw")
    args = parser.parse_args()
    if not args.db.is_file():
        raise SystemExit(f"no MLflow database at {args.db}")
    size = tuple(int(v) for v in args.size.split(","))
    tracking = f"sqlite:///{args.db.resolve()}"
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    args.out.mkdir(parents=True, exist_ok=True)
    # its own process group (the UI's worker processes go with it); no job runner (7 idle consumer processes)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking, "--host", "127.0.0.1",
         "--port", str(port)],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(base)
        with sync_playwright() as pw:
            flags = ["--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=flags)
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(base)
            page.get_by_text("Model training", exact=True).click(timeout=args.timeout * 1000)  # its sidebar
            for shot in shots(tracking):
                png = args.out / f"{shot.name}.png"
                take(page, base, shot, png, size, args.timeout)
                print(png)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
