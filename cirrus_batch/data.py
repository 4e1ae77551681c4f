"""Training samples read from the zarr store image by image (never the whole archive in memory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import Dataset

from cirrus_batch.config import check_images
from cirrus_batch.errors import StoreError
from cirrus_batch.geometry import zenith_map
from cirrus_batch.humanmasks import CLOUD, UNLABELLED, human_positions
from cirrus_batch.normalization import Normalization, normalize
from cirrus_batch.masks import residual_sigmas
from cirrus_batch.softmasks import CloudGivenResidual
from cirrus_batch.store import Store, binned_var, json_attr

NEEDS = {"classify": ("cloudy", "cloud_fraction", "quality", "sky"), "segment": ("mask", "cloudy", "quality", "sky")}


def as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 (float16 converted by torch: 3.5x faster than numpy)."""
    if x.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
    return np.asarray(x, dtype=np.float32)


def bin_image(x: np.ndarray, factor: int) -> np.ndarray:
    """float32 mean over ``factor`` × ``factor`` blocks of the last two axes (the remainder rows/columns are cut).
    float16 images are averaged in float32 and the means rounded to float16, their own precision: converting
    them first costs 2.5x more (no vector conversion on this CPU)."""
    if factor == 1:
        return as_float32(x)
    keep = x.dtype in (np.float16, np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=None if keep else np.float32))
    lead, (h, w) = t.shape[:-2], t.shape[-2:]
    out = F.avg_pool2d(t.reshape(-1, 1, h, w), factor)
    return out.reshape(*lead, *out.shape[-2:]).float().numpy()


def soft_labels(cloud_fraction: np.ndarray, cloudy: np.ndarray, threshold: float, width: float) -> np.ndarray:
    """Classifier targets: ``sigmoid((cloud_fraction - threshold) / width)``, a smooth step that says an image
    at 4.5 % cloud (threshold 5 %) is almost as likely cloudy as clear; the hard ``cloudy`` label where
    ``width`` is 0, the cloud fraction is not finite, or the label disagrees with it (a human label)."""
    hard = np.asarray(cloudy, dtype=np.float32)
    cf = np.asarray(cloud_fraction, dtype=np.float64)
    if width <= 0:
        return hard
    with np.errstate(invalid="ignore", over="ignore"):
        soft = 1.0 / (1.0 + np.exp(-np.clip((cf - threshold) / width, -50, 50)))
        keep = np.isfinite(cf) & ((cf > threshold) == (hard > 0.5))
    return np.where(keep, soft, hard).astype(np.float32)


def store_zenith(group: zarr.Group) -> np.ndarray:
    """(y, x) zenith angle (deg) of the prepared store's fisheye geometry."""
    attrs = json_attr(group.attrs, "prepare")
    if not attrs:
        raise StoreError("the store is not prepared yet: run `cirrus prepare STORE` first")
    g = attrs["geometry"]
    return zenith_map(tuple(group["raw"].shape[1:]), tuple(g["center"]), float(g["radius"]),
                      g.get("projection", "equidistant"), float(g.get("fov_deg", 180.0)))  # fmt: skip


@dataclass(frozen=True)
class InputSpec:
    """What a network reads: the prepared ``image`` (``norm`` or ``residual``) binned by ``bin`` and, with
    ``zenith``, the zenith angle / 90° as a second channel (the clear sky brightens towards the horizon; a small
    network cannot see where it is).

    Saved with the model (MLflow model metadata), so inference builds exactly the training inputs.
    """

    task: str
    bin: int = 4
    zenith: bool = True
    image: str = "norm"

    def __post_init__(self) -> None:
        check_images(self.image)

    @property
    def images(self) -> tuple[str, ...]:
        """The prepared images read, one input channel each (``image`` split at ``+``)."""
        return tuple(self.image.split("+"))

    @property
    def in_channels(self) -> int:
        return len(self.images) + int(self.zenith)

    def inputs_like(self, other: InputSpec) -> bool:
        """Whether ``other`` builds the same inputs from the same images."""
        return (self.bin, self.zenith, self.image) == (other.bin, other.zenith, other.image)

    def to_metadata(self) -> dict[str, Any]:
        return {"task": self.task, "bin": self.bin, "zenith_channel": self.zenith, "image": self.image}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> InputSpec:
        if not metadata or "task" not in metadata:
            raise ValueError("the model has no cirrus input metadata (task, bin, zenith_channel): "
                             "was it logged by `cirrus train`?")  # fmt: skip
        return cls(str(metadata["task"]), int(metadata["bin"]), bool(metadata["zenith_channel"]),
                   str(metadata.get("image", "norm")))  # fmt: skip

    def zenith_input(self, zenith: np.ndarray) -> np.ndarray:
        """(h, w) zenith channel of a zenith map (deg, :func:`store_zenith`): zenith / 90° up to 1.25, binned."""
        return bin_image(np.clip(zenith / 90.0, 0.0, 1.25).astype(np.float32), self.bin)

    def binned(self, group: zarr.Group) -> tuple[str, ...]:
        """The :attr:`images` that prepare stored binned by this ``bin`` in ``group`` (``residual_bin4``, ...:
        the values binning the full images gives, 1/bin² of the bytes to read and decode)."""
        if json_attr(group.attrs, "prepare", {}).get("input_bin") != self.bin:
            return ()
        return tuple(name for name in self.images if binned_var(name, self.bin) in group)

    def source(self, name: str, binned: Sequence[str] = ()) -> str:
        """The store array image ``name`` is read from: ``raw`` for ``norm`` (normalized where it is read),
        prepare's binned copy for those in ``binned`` (:meth:`binned`), else ``name``."""
        return "raw" if name == "norm" else binned_var(name, self.bin) if name in binned else name

    def inputs(self, images: np.ndarray | Sequence[np.ndarray], zenith: np.ndarray | None = None, *,
               zenith_input: np.ndarray | None = None, binned: Sequence[str] = ()) -> np.ndarray:  # fmt: skip
        """(n, c, h, w) float32 network input of n images' :attr:`images`: an (n, k, y, x) array (or (n, y, x)
        for one), or a sequence of the k as (n, y, x) arrays, those named in ``binned`` already binned by ``bin``
        (:meth:`binned`); ``zenith``: :func:`store_zenith`, or ``zenith_input``: its :meth:`zenith_input`,
        computed once for many calls."""
        if isinstance(images, np.ndarray):
            images = images[:, None] if images.ndim == 3 else images
            images = [images[:, i] for i in range(images.shape[1])]
        if len(images) != len(self.images):
            raise ValueError(f"this input reads {len(self.images)} images ({self.image}), got {len(images)}")
        x = np.stack([as_float32(a) if name in binned else bin_image(a, self.bin)
                      for name, a in zip(self.images, images)], axis=1)  # fmt: skip
        if not self.zenith:
            return x
        if zenith_input is None:
            if zenith is None:
                raise ValueError("this input has a zenith-angle channel: pass the store's zenith map")
            zenith_input = self.zenith_input(zenith)
        return np.concatenate([x, np.broadcast_to(zenith_input, (x.shape[0], 1, *x.shape[2:]))], axis=1)


def check_store(store_url: str, spec: InputSpec) -> Store:
    """The store, with a clear error when it lacks what a network of ``spec`` trains on."""
    store = Store.open(store_url, mode="r")
    stored = (spec.source(name) for name in spec.images)
    missing = [name for name in dict.fromkeys((*stored, *NEEDS[spec.task])) if name not in store.group]
    if "norm" in spec.images and "normalization" not in json_attr(store.group.attrs, "prepare", {}):
        missing.append("normalization (prepare attribute)")
    if missing:
        raise StoreError(
            f"{store_url} has no {', '.join(missing)}: run `cirrus prepare {store_url}` before training"
        )
    return store


class StoreSamples(Dataset):
    """``(image, target, weight)`` of the store images at ``positions``.

    image: :meth:`InputSpec.inputs`, shape (c, h, w) float32. Segment: target = ``mask`` binned (its majority,
    or with ``soft`` its cloud fraction per binned pixel) and weight = the binned sky mask, both (1, h, w).
    Classify: target = ``cloudy`` (with ``label_width`` > 0: :func:`soft_labels` of the image's cloud fraction)
    and weight 1, scalars. With ``human``, a segment image that has a human mask (``prepare --masks``) takes its
    target from it instead, and its weight is its labelled pixels (binned: more than half labelled), so
    unlabelled pixels count nowhere. With ``cloud_given_residual`` an astropy mask's clear pixels take the
    probability that their ``residual`` is cloud (:mod:`cirrus_batch.softmasks`) before binning.
    The arrays open lazily in each DataLoader worker. Each process (DataLoader worker) keeps the samples it
    has built, up to ``cache_mb`` MiB (binned, ~0.25 MiB per 128x160 segment sample): later epochs then cost
    no store read, decoding or binning, which would take CPU from the training step.
    """

    def __init__(self, store_url: str, positions: np.ndarray, spec: InputSpec, soft: bool = False,
                 cache_mb: float = 0.0, label_width: float = 0.0, human: bool = False,
                 cloud_given_residual: CloudGivenResidual | None = None):  # fmt: skip
        if spec.task not in NEEDS:
            raise ValueError(f"task must be one of {sorted(NEEDS)}, got {spec.task!r}")
        self.store_url, self.spec, self.soft = store_url, spec, soft
        self.cloud_given_residual = cloud_given_residual
        self.positions = np.asarray(positions, dtype=np.int64)
        group = check_store(store_url, spec).group
        self.cloudy = soft_labels(group["cloud_fraction"][:], group["cloudy"][:],
                                  float(group["cloudy"].attrs.get("threshold", 0.05)), label_width)  # fmt: skip
        self.zenith = spec.zenith_input(store_zenith(group)) if spec.zenith else None
        self.normalization = (Normalization.from_attrs(json_attr(group.attrs, "prepare")["normalization"])
                              if "norm" in spec.images else None)  # fmt: skip
        sky = bin_image(group["sky"][:].astype(np.float32), spec.bin) > 0.5
        self.sky = torch.from_numpy(sky.astype(np.float32))
        segment_human = human and spec.task == "segment"
        self.human = human_positions(group) if segment_human else np.zeros(len(self.cloudy), bool)
        self.binned = spec.binned(group)
        self._arrays: dict[str, zarr.Array] = {}
        self.cache_mb = cache_mb
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
        self._cached_bytes = 0

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def bin(self) -> int:
        return self.spec.bin

    def __len__(self) -> int:
        return len(self.positions)

    def _array(self, name: str) -> zarr.Array:
        """``raw``, ``residual``, ``brightness``, ``mask`` or ``human_mask``, opened once per process (opening reads
        its metadata: ~0.7 ms per image)."""
        if name not in self._arrays:
            self._arrays[name] = zarr.open_group(self.store_url, mode="r", zarr_format=3)[name]
        return self._arrays[name]

    def _image(self, name: str, p: int) -> np.ndarray:
        """Prepared image ``name`` of store image ``p`` (binned where prepare stored it binned: :attr:`binned`);
        ``norm`` is ``raw`` normalized as prepare fitted it."""
        image = self._array(self.spec.source(name, self.binned))[p]
        return normalize(image, self.normalization) if name == "norm" else image  # type: ignore[arg-type]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}, "_cache": {}, "_cached_bytes": 0}

    def _read(self, p: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(network input, binned target or None, binned weight or None for the sky) of store image ``p``."""
        x = self.spec.inputs([self._image(name, p)[None] for name in self.spec.images], zenith_input=self.zenith,
                             binned=self.binned)[0]  # fmt: skip
        if self.task == "classify":
            return x, None, None
        if self.human[p]:
            h = self._array("human_mask")[p]
            labelled = bin_image((h != UNLABELLED).astype(np.float32), self.bin)
            mask = bin_image((h == CLOUD).astype(np.float32), self.bin) / np.maximum(labelled, 1e-6)
            weight = (labelled > 0.5).astype(np.float32)[None]
        else:
            mask = self._array("mask")[p]
            if self.cloud_given_residual is not None:  # where the mask says clear, the residual's evidence
                evidence = self.cloud_given_residual(residual_sigmas(self._array("residual")[p]))
                mask = np.maximum(mask.astype(np.float32), evidence)
            mask, weight = bin_image(mask, self.bin).astype(np.float32, copy=False), None
        return x, (mask if self.soft else (mask > 0.5).astype(np.float32))[None], weight

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = int(self.positions[i])
        sample = self._cache.get(p)
        if sample is None:
            sample = self._read(p)
            size = sum(a.nbytes for a in sample if a is not None)
            if self._cached_bytes + size <= self.cache_mb * 2**20:
                self._cache[p] = sample
                self._cached_bytes += size
        x, target, weight = sample
        if target is None:
            return torch.from_numpy(x), torch.tensor(self.cloudy[p]), torch.tensor(1.0)
        w = self.sky[None] if weight is None else torch.from_numpy(weight)
        return torch.from_numpy(x), torch.from_numpy(target), w
