"""The model registry: described versions and a ``champion`` alias that only moves for a better model.

Every version ``cirrus train`` registers gets a description (test figures, store, split) and tags
(:func:`describe_version`). :func:`promote` then scores the candidate version and the current champion on the
same images — the candidate's test images that neither model trained or validated on — against the store's
labels (classifier) or masks (U-Net), and moves the alias ``champion`` to the candidate only when it wins:
higher F1 (classifier) or IoU (U-Net), the lower Brier score breaking a tie. The first version of a model
becomes champion; ``force`` moves the alias whatever the scores (recorded in the version's tags).
``cirrus reprocess`` uses ``models:/NAME@champion`` by default.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import torch
import zarr
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from cirrus_batch.data import InputSpec, StoreSamples
from cirrus_batch.errors import CirrusError
from cirrus_batch.metrics import MetricAccumulator
from cirrus_batch.tracking import require_tracking_store

log = logging.getLogger(__name__)

CHAMPION = "champion"
PRIMARY = {"classify": "f1", "segment": "iou"}
"""The metric a candidate must beat the champion on (the lower Brier score breaks a tie)."""


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


@dataclass
class Promotion:
    """The outcome of :func:`promote`."""

    name: str
    version: str
    previous: str | None
    """The champion version before (None: there was none)."""
    promoted: bool
    forced: bool = False
    images: int = 0
    """Test images both models were scored on."""
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """One line: what happened and why."""
        task_metric = next((m for m in PRIMARY.values() if m in self.candidate), "")

        def fig(scores: dict[str, float]) -> str:
            return f"{task_metric} {scores[task_metric]:.4f}, Brier {scores['brier']:.4f}" if scores else "-"

        if self.previous is None:
            return f"{self.name} v{self.version} is the first champion"
        if self.previous == self.version:
            return f"{self.name} v{self.version} is already the champion"
        verdict = ("forced: champion" if self.forced else "beats") if self.promoted else "does not beat"
        return (f"{self.name} v{self.version} {verdict} v{self.previous} on {self.images} test images "
                f"({fig(self.candidate)} vs {fig(self.champion)}); champion: "
                f"v{self.version if self.promoted else self.previous}")  # fmt: skip


def code_version() -> str:
    """``cirrus_batch`` version and, from a git checkout, the commit (``0.1.0+g1a2b3c4``, ``-dirty`` if so)."""
    import subprocess
    from pathlib import Path

    import cirrus_batch

    root = Path(cirrus_batch.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=10"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return cirrus_batch.__version__
    return f"{cirrus_batch.__version__}+g{out}" if out else cirrus_batch.__version__


def describe_version(client: MlflowClient, name: str, version: str, description: str, tags: dict[str, Any]) -> None:
    """Description and tags of a registered version."""
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def current_champion(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def _split(client: MlflowClient, run_id: str) -> dict[str, Any]:
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/split.json")
    except (MlflowException, OSError) as exc:
        raise CirrusError(f"run {run_id} has no split.json artifact: {str(exc).splitlines()[0]}") from None


def _sources(split: dict[str, Any], names: tuple[str, ...]) -> set[str]:
    sources = split.get("sources") or {}
    return {s for name in names for s in sources.get(name, [])}


def score(model_uri: str, store_url: str, positions: np.ndarray) -> dict[str, float]:
    """Metrics of the model at ``model_uri`` on store images ``positions`` against the store's hard labels or
    masks (the current MLflow tracking URI)."""
    info = mlflow.models.get_model_info(model_uri)
    spec = InputSpec.from_metadata(info.metadata)
    model = mlflow.pytorch.load_model(model_uri)  # exported in inference mode
    acc = MetricAccumulator()
    with torch.inference_mode():
        for x, y, w in DataLoader(StoreSamples(store_url, positions, spec), batch_size=16):
            acc.update(torch.sigmoid(model(x).float()).numpy(), y.numpy(), w.numpy())
    return acc.compute()


def beats(task: str, candidate: dict[str, float], champion: dict[str, float]) -> bool:
    """Whether ``candidate`` wins: higher primary metric (:data:`PRIMARY`), or equal and lower Brier."""
    key = PRIMARY[task]
    c, h = (np.nan_to_num(s[key], nan=-1.0) for s in (candidate, champion))
    return bool(c > h or (c == h and candidate["brier"] < champion["brier"]))


def promote(tracking_uri: str, name: str, version: str | None = None, store_url: str | None = None,
            force: bool = False) -> Promotion:  # fmt: skip
    """Make ``name`` ``version`` (default: the newest) the champion if it beats the current one (see the module
    docstring); ``store_url`` defaults to the store the version was trained on."""
    require_tracking_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise CirrusError(f"cannot read the registered model {name!r} in {tracking_uri}: {exc}") from None
    if not versions:
        raise CirrusError(f"the registered model {name!r} has no version in {tracking_uri}")
    version = version or str(max(int(v.version) for v in versions))
    by_version = {str(v.version): v for v in versions}
    if version not in by_version:
        raise CirrusError(f"{name} has no version {version} in {tracking_uri} (versions: "
                          f"{', '.join(sorted(by_version, key=int))})")  # fmt: skip
    candidate = by_version[version]
    previous = current_champion(client, name)
    result = Promotion(name, version, previous, promoted=previous is None, forced=force)
    if previous == version:
        return result
    if previous is not None:
        run = client.get_run(candidate.run_id)
        task = run.data.tags.get("task") or run.data.params.get("task")
        store = store_url or run.data.tags.get("store") or run.data.params.get("store")
        if task not in PRIMARY or not store:
            raise CirrusError(f"{name} v{version}: its run {candidate.run_id} has no task/store tag")
        own, theirs = _split(client, candidate.run_id), _split(client, by_version[previous].run_id)
        seen = _sources(theirs, ("train", "val")) | _sources(own, ("train", "val"))
        group = zarr.open_group(store, mode="r")
        all_sources = np.asarray(group["source"][: int(group.attrs["committed"])], dtype=object)
        test = _sources(own, ("test",)) - seen
        positions = np.flatnonzero(np.isin(all_sources, list(test)))
        result.images = len(positions)
        if len(positions) == 0 and not force:
            raise CirrusError(f"{name} v{version} and v{previous} share no test image that neither trained on "
                              f"(store {store}): compare them on a common test set, or --force")  # fmt: skip
        if len(positions):
            result.candidate = score(f"models:/{name}/{version}", store, positions)
            result.champion = score(f"models:/{name}/{previous}", store, positions)
            result.promoted = beats(task, result.candidate, result.champion)
        result.promoted = result.promoted or force
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    client.set_model_version_tag(name, version, "promotion", f"{stamp} {result.summary}")
    if result.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        if force:
            client.set_model_version_tag(name, version, "promoted_by_force", "true")
    log.info("%s", result.summary)
    return result
