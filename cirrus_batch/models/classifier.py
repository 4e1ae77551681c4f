"""Small CNN classifier: clear vs cloudy, one logit per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import MEMORY_FORMAT, ConvBlock, check_params, flip_averaged

__all__ = ["CloudClassifier"]


class CloudClassifier(nn.Module):
    """``depth`` conv blocks (max-pooled between), global average pooling, dropout and a linear layer.

    Takes (n, in_channels, h, w) of any size >= 1 pixel and returns logits of shape (n,), divided by the
    ``temperature`` buffer (1 until training calibrates it). ``flip_average`` and channels-last: like :class:`UNet`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        dropout: float = 0.1,
        batch_norm: bool = True,
        flip_average: bool = False,
    ):
        super().__init__()
        check_params(in_channels, base_channels, depth, dropout)
        self.flip_average = flip_average
        chans = [in_channels] + [base_channels * 2**i for i in range(depth)]
        self.blocks = nn.ModuleList(
            [ConvBlock(chans[i], chans[i + 1], 0.0, batch_norm) for i in range(depth)]
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(chans[-1], 1)
        self.register_buffer("temperature", torch.ones(()))  # logits / temperature: calibration after training
        self.to(memory_format=MEMORY_FORMAT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"CloudClassifier expects (n, c, h, w), got shape {tuple(x.shape)}")
        if self.flip_average and not self.training:
            return flip_averaged(self._logits, x, image_out=False) / self.temperature
        return self._logits(x) / self.temperature

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=MEMORY_FORMAT)
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2, ceil_mode=True))
        x = x.mean(dim=(-2, -1))
        return self.head(self.dropout(x)).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Cloudy probability per image (n,); uses the module's current train/eval mode."""
        return torch.sigmoid(self(x))
