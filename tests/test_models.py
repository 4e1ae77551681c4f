"""Tests for cirrus_batch.models: shapes for odd sizes, parameter scaling, learning a trivial task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cirrus_batch.models import MEMORY_FORMAT, CloudClassifier, UNet, autocast_dtype, build_model, pick_device


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 1, 37, 45), (2, 1, 64, 80), (1, 1, 5, 3)])
def test_unet_output_shape(shape: tuple[int, ...]) -> None:
    model = UNet(base_channels=4, depth=3).eval()
    out = model(torch.rand(shape))
    assert out.shape == (shape[0], 1, *shape[2:])
    p = model.predict_proba(torch.rand(shape))
    assert p.shape == out.shape and bool(((p >= 0) & (p <= 1)).all())


@pytest.mark.parametrize("shape", [(1, 1, 37, 45), (2, 1, 64, 80), (3, 2, 4, 4)])
def test_classifier_output_shape(shape: tuple[int, ...]) -> None:
    model = CloudClassifier(in_channels=shape[1], base_channels=4, depth=4).eval()
    assert model(torch.rand(shape)).shape == (shape[0],)
    assert model.predict_proba(torch.rand(shape)).shape == (shape[0],)


@pytest.mark.parametrize("cls", [UNet, CloudClassifier])
def test_params_grow_with_depth_and_width(cls: type[nn.Module]) -> None:
    assert n_params(cls(base_channels=4, depth=2)) < n_params(cls(base_channels=4, depth=3))
    assert n_params(cls(base_channels=4, depth=2)) < n_params(cls(base_channels=8, depth=2))
    with_bn = cls(base_channels=4, depth=2, batch_norm=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    no_bn = cls(base_channels=4, depth=2, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())


@pytest.mark.parametrize("cls", [UNet, CloudClassifier])
def test_eval_mode_deterministic(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls(base_channels=4, depth=2, dropout=0.5).eval()
    x = torch.rand(2, 1, 21, 19)
    assert torch.equal(model(x), model(x))


def square_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, 24, 28, generator=gen) * 0.3
    y = torch.zeros(n, 1, 24, 28)
    for i in range(n):
        r, c = torch.randint(0, 16, (2,), generator=gen).tolist()
        y[i, 0, r : r + 8, c : c + 8] = 1
    return x + 0.7 * y, y


def train(model: nn.Module, batch, steps: int) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    model.train()
    for _ in range(steps):
        x, y = batch()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3


def test_unet_learns_bright_square() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    first, last = train(UNet(base_channels=4, depth=2), lambda: square_batch(4, gen), 60)
    assert last < 0.6 * first


def test_classifier_learns_bright_vs_dark() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.rand(8, generator=gen) < 0.5).float()
        x = torch.rand(8, 1, 16, 20, generator=gen) * 0.5 + 0.5 * y[:, None, None, None]
        return x, y

    model = CloudClassifier(base_channels=4, depth=2, dropout=0.0)
    first, last = train(model, batch, 40)
    assert last < 0.6 * first
    x, y = batch()
    model.eval()
    assert ((model.predict_proba(x) > 0.5).float() == y).float().mean() >= 0.75


def test_build_model_and_errors() -> None:
    assert isinstance(build_model("segment", base_channels=4, depth=2), UNet)
    assert isinstance(build_model("classify"), CloudClassifier)
    with pytest.raises(ValueError, match="valid tasks"):
        build_model("detect")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['width'\].*base_channels"):
        build_model("segment", width=3)
    with pytest.raises(ValueError, match="depth must be"):
        build_model("classify", depth=0)
    with pytest.raises(ValueError, match="dropout must be"):
        UNet(dropout=1.0)
    with pytest.raises(ValueError, match="expects"):
        UNet(base_channels=2, depth=1)(torch.rand(1, 8, 8))


def test_pick_device() -> None:
    device = pick_device()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    model = UNet(base_channels=2, depth=1).to(device)
    assert model(torch.rand(1, 1, 9, 7, device=device)).device.type == device.type


@pytest.mark.parametrize("cls", [UNet, CloudClassifier])
def test_channels_last_layout_gives_the_same_outputs(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls(in_channels=2, base_channels=4, depth=2).eval()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=MEMORY_FORMAT) and not conv.weight.is_contiguous()
    x = torch.rand(3, 2, 20, 24)
    with torch.no_grad():
        got = model(x)
        model.to(memory_format=torch.contiguous_format)
        assert conv.weight.is_contiguous()
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)


def test_autocast_dtype() -> None:
    assert autocast_dtype(torch.device("cuda")) == torch.float16
    assert autocast_dtype(torch.device("cpu")) in (torch.bfloat16, None)
    assert autocast_dtype(torch.device("meta")) is None


@pytest.mark.parametrize("cls", [UNet, CloudClassifier])
def test_flip_average_is_flip_equivariant_in_eval_only(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls(in_channels=2, base_channels=4, depth=2, flip_average=True).eval()
    x = torch.rand(3, 2, 20, 24)
    with torch.no_grad():
        z = model(x)
        single = model._logits(x)
        for dims in ([-1], [-2], [-2, -1]):
            flipped = model(x.flip(dims))
            torch.testing.assert_close(flipped.flip(dims) if cls is UNet else flipped, z, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(z, single, rtol=0, atol=1e-7)  # the average of 4 passes, not one
        model.temperature.fill_(2.0)
        torch.testing.assert_close(model(x), z / 2)
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        assert torch.equal(a, model._logits(x) / 2)  # training: one pass
