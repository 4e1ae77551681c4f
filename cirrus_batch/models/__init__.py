"""Torch models for CIRRUS: ``UNet`` (segment) and ``CloudClassifier`` (classify)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .classifier import CloudClassifier
from .unet import UNet

__all__ = ["CloudClassifier", "UNet", "MODELS", "build_model", "pick_device"]

MODELS: dict[str, type[nn.Module]] = {"classify": CloudClassifier, "segment": UNet}


def build_model(task: str, **params: Any) -> nn.Module:
    """Model for ``task`` ("classify" | "segment") built from its constructor ``params``."""
    if task not in MODELS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {sorted(MODELS)}")
    cls = MODELS[task]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for task {task!r}; valid: {valid}")
    return cls(**params)


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
