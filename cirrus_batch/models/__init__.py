"""Torch models for CIRRUS: ``UNet`` (segment) and ``CloudClassifier`` (classify)."""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .classifier import CloudClassifier
from .unet import MEMORY_FORMAT, UNet

__all__ = ["MEMORY_FORMAT", "CloudClassifier", "UNet", "MODELS", "autocast_dtype", "build_model", "pick_device"]

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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision (autocast) dtype of training steps and inference on ``device``: float16 on CUDA,
    bfloat16 on CPUs with native bf16 instructions (AVX512-BF16, AMX), else None (float32; emulated bf16
    would be slower)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16() else None


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None
