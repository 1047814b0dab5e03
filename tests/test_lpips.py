"""LPIPS (wsicodec.research.lpips) from the full local weights: a metric that orders distortions sensibly."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from wsicodec.errors import WsicodecError
from wsicodec.research.lpips import LPIPS, lpips_weights_dir

HAVE_WEIGHTS = (lpips_weights_dir() / "lpips_alexnet_full.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"LPIPS weights not in {lpips_weights_dir()} (../shared absent)")


def _he_like(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth pink/purple texture in [-1, 1]: blobs of haematoxylin on eosin."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 2, size // 8, size // 8, generator=g)
    conc = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    od_h = torch.tensor([0.65, 0.70, 0.29]).view(1, 3, 1, 1)
    od_e = torch.tensor([0.13, 0.85, 0.48]).view(1, 3, 1, 1)
    rgb = torch.pow(10.0, -(conc[:, :1] * od_h * 1.2 + conc[:, 1:] * od_e * 0.6))
    return rgb * 2 - 1


@needs_weights
@pytest.mark.parametrize("net", ["alex"])
def test_identical_images_have_zero_distance(net):
    m = LPIPS(net)
    x = _he_like(2)
    assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-6)


@needs_weights
def test_blur_is_farther_than_slight_noise():
    m = LPIPS("alex")
    x = _he_like(3, 96, seed=1)
    g = torch.Generator().manual_seed(2)
    noisy = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), 7, 1)
    d_noise, d_blur = m(x, noisy), m(x, blurred)
    assert (d_blur > d_noise).all(), (d_blur, d_noise)
    assert (d_noise > 0).all()


@needs_weights
def test_gradients_reach_the_input_and_weights_stay_frozen():
    m = LPIPS("alex")
    x = _he_like(1).requires_grad_(True)
    y = _he_like(1, seed=5)
    m(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in m.parameters())


@needs_weights
def test_pooled_features_shape_and_identity():
    m = LPIPS("alex")
    x = _he_like(2)
    f = m.pooled_features(x)
    assert f.shape == (2, 64 + 192 + 384 + 256 + 256)
    assert torch.allclose(f, m.pooled_features(x.clone()))


@pytest.mark.skipif(not (lpips_weights_dir() / "lpips_vgg16_full.safetensors").is_file(), reason="LPIPS-VGG weights absent")
def test_vgg_variant_loads_and_orders():
    m = LPIPS("vgg")
    x = _he_like(1, 64)
    blurred = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1)
    assert float(m(x, blurred)) > float(m(x, x)) == 0.0


def test_missing_weights_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WSICODEC_LPIPS_WEIGHTS", str(tmp_path))
    with pytest.raises(WsicodecError) as info:
        LPIPS("alex")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg and "WSICODEC_LPIPS_WEIGHTS" in msg


def test_unknown_net_is_refused():
    with pytest.raises(WsicodecError):
        LPIPS("resnet")
