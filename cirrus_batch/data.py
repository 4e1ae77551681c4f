"""Training samples read from the zarr store image by image (never the whole archive in memory)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import Dataset

from cirrus_batch.errors import StoreError
from cirrus_batch.store import Store

NEEDS = {"classify": ("norm", "cloudy", "quality", "sky"), "segment": ("norm", "mask", "cloudy", "quality", "sky")}


def bin_image(x: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` × ``factor`` blocks of the last two axes (the remainder rows/columns are cut)."""
    if factor == 1:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    lead, (h, w) = t.shape[:-2], t.shape[-2:]
    out = F.avg_pool2d(t.reshape(-1, 1, h, w), factor)
    return out.reshape(*lead, *out.shape[-2:]).numpy()


def check_store(store_url: str, task: str) -> Store:
    """The store, with a clear error when it lacks what ``task`` trains on."""
    store = Store.open(store_url, mode="r")
    missing = [name for name in NEEDS[task] if name not in store.group]
    if missing:
        raise StoreError(
            f"{store_url} has no {', '.join(missing)}: run `cirrus prepare {store_url}` before training"
        )
    return store


class StoreSamples(Dataset):
    """``(image, target, weight)`` of the store images at ``positions``.

    image: ``norm`` binned by ``bin``, shape (1, h, w) float32. Segment: target = ``mask`` binned (majority)
    and weight = the binned sky mask, both (1, h, w). Classify: target = ``cloudy`` and weight 1, scalars.
    The zarr group opens lazily in each DataLoader worker.
    """

    def __init__(self, store_url: str, positions: np.ndarray, task: str, bin: int = 1):
        if task not in NEEDS:
            raise ValueError(f"task must be one of {sorted(NEEDS)}, got {task!r}")
        self.store_url, self.task, self.bin = store_url, task, bin
        self.positions = np.asarray(positions, dtype=np.int64)
        group = check_store(store_url, task).group
        self.cloudy = group["cloudy"][:].astype(np.float32)
        self.sky = torch.from_numpy((bin_image(group["sky"][:].astype(np.float32), bin) > 0.5).astype(np.float32))
        self._group: zarr.Group | None = None

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self.store_url, mode="r", zarr_format=3)
        return self._group

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = int(self.positions[i])
        image = torch.from_numpy(np.ascontiguousarray(bin_image(self.group["norm"][p], self.bin)))[None]
        if self.task == "classify":
            return image, torch.tensor(self.cloudy[p]), torch.tensor(1.0)
        mask = bin_image(self.group["mask"][p], self.bin) > 0.5
        return image, torch.from_numpy(mask.astype(np.float32))[None], self.sky[None]
