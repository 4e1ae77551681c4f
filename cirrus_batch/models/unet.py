"""U-Net for per-pixel cloud segmentation: one logit per pixel, any input size."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MEMORY_FORMAT", "ConvBlock", "UNet", "flip_averaged"]

MEMORY_FORMAT = torch.channels_last
"""Layout of the models' weights and activations: channels-last convolutions are oneDNN's fast path on CPU
(measured here: training steps x1.3, inference x1.6) and the tensor-core layout on GPU."""


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by optional batch norm and ReLU, then optional 2-D dropout."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, batch_norm: bool = True):
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


FLIPS = ((), (-1,), (-2,), (-2, -1))
"""Identity, horizontal, vertical and both flips: the symmetries of an all-sky image without a north up."""


def flip_averaged(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, image_out: bool) -> torch.Tensor:
    """Mean of ``net``'s logits over the :data:`FLIPS` of ``x`` (test-time augmentation); ``image_out``: the
    logits are images, flipped back before averaging."""
    outs = [net(x.flip(d) if d else x) for d in FLIPS]
    if image_out:
        outs = [z.flip(d) if d else z for z, d in zip(outs, FLIPS)]
    return torch.stack(outs).mean(0)


def check_params(in_channels: int, base_channels: int, depth: int, dropout: float) -> None:
    """Raise ValueError for architecture parameters out of range."""
    if in_channels < 1 or base_channels < 1:
        raise ValueError(f"in_channels and base_channels must be >= 1, got {in_channels} and {base_channels}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class UNet(nn.Module):
    """U-Net with ``depth`` down/up-sampling levels; channels double per level from ``base_channels``.

    Inputs (n, in_channels, h, w) of any size are padded (replicate) to a multiple of ``2**depth`` and the
    output (n, 1, h, w) logits are cropped back.  Dropout applies in the bottleneck and decoder blocks.
    With ``flip_average``, evaluation (not training) averages the logits over the four flips of the input
    (:func:`flip_averaged`: 4x the compute, smoother boundaries). The logits are then divided by the
    ``temperature`` buffer (1 until training calibrates it).
    Weights and activations are channels-last (see :data:`MEMORY_FORMAT`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        dropout: float = 0.0,
        batch_norm: bool = True,
        flip_average: bool = False,
    ):
        super().__init__()
        check_params(in_channels, base_channels, depth, dropout)
        self.depth, self.flip_average = depth, flip_average
        chans = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            [ConvBlock(in_channels, chans[0], 0.0, batch_norm)]
            + [
                ConvBlock(chans[i], chans[i + 1], dropout if i == depth - 1 else 0.0, batch_norm)
                for i in range(depth)
            ]
        )
        self.upsample = nn.ModuleList(
            [nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))]
        )
        self.up = nn.ModuleList(
            [ConvBlock(2 * chans[i], chans[i], dropout, batch_norm) for i in reversed(range(depth))]
        )
        self.head = nn.Conv2d(chans[0], 1, 1)
        self.register_buffer("temperature", torch.ones(()))  # logits / temperature: calibration after training
        self.to(memory_format=MEMORY_FORMAT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"UNet expects (n, c, h, w), got shape {tuple(x.shape)}")
        if self.flip_average and not self.training:
            return flip_averaged(self._logits, x, image_out=True) / self.temperature
        return self._logits(x) / self.temperature

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate").contiguous(memory_format=MEMORY_FORMAT)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for upsample, block in zip(self.upsample, self.up):
            x = block(torch.cat([upsample(x), skips.pop()], dim=1))
        return self.head(x)[..., :h, :w]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel cloud probability (n, 1, h, w); uses the module's current train/eval mode."""
        return torch.sigmoid(self(x))
