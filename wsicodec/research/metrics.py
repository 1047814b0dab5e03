"""Image-fidelity metrics, batched, on whatever device the tensors live on.

Inputs are uint8 RGB batches ``(N, H, W, 3)`` (numpy or torch) or float tensors ``(N, 3, H, W)``
in [0, 1]. Every function returns one value per image (a float32 CPU tensor of shape ``(N,)``);
callers average.

* PSNR on RGB over 8-bit values (peak 255). Identical images would be infinite; the value is
  capped at :data:`PSNR_CAP_DB` so that averages stay finite.
* SSIM as in Wang et al. 2004: 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, the
  local statistics from the window (population variances), averaged over the "valid" region (no
  padding). Computed on each RGB channel and averaged over the three channels (``channels="rgb"``,
  the default, as skimage's ``channel_axis`` does), or on BT.601 luma (``channels="luma"``).
* LPIPS through :mod:`wsicodec.research.lpips` (AlexNet by default, the usual reporting net).
* Embedding cosine similarity through an :class:`wsicodec.research.embeddings.Embedder`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
_LUMA = (0.299, 0.587, 0.114)


def to_float(images: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (N,H,W,3) numpy/torch, or float (N,3,H,W) in [0,1] -> float32 (N,3,H,W) in [0,1]."""
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if device is not None:
        x = x.to(device)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N,H,W,3) images, got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255.0
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected float (N,3,H,W) images, got shape {tuple(x.shape)}")
    return x.float()


def _pair(a: Any, b: Any, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_float(a, device), to_float(b, device)
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y.to(x.device)


def psnr(a: Any, b: Any, device=None, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """Per-image PSNR in dB over RGB, peak 255 (values quantised to 8 bits as images are stored)."""
    x, y = _pair(a, b, device)
    # Measure on the 8-bit scale so float inputs give the same figure as their stored uint8 form.
    mse = ((x - y) * 255.0).pow(2).flatten(1).mean(1)
    floor = 255.0**2 / (10 ** (cap_db / 10))
    return (10 * torch.log10(255.0**2 / mse.clamp_min(floor))).float().cpu()


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: Any,
    b: Any,
    device=None,
    channels: str = "rgb",
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image mean SSIM (Wang et al. 2004), data range 1 on [0, 1] images."""
    x, y = _pair(a, b, device)
    if channels == "luma":
        w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x, y = (x * w).sum(1, keepdim=True), (y * w).sum(1, keepdim=True)
    elif channels != "rgb":
        raise ValueError(f"channels must be 'rgb' or 'luma', not {channels!r}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images smaller than the {window}px SSIM window")
    x, y = x.double(), y.double()  # variances are small differences of large sums
    c = x.shape[1]
    g = _gaussian_window(window, sigma, x.device, x.dtype)
    gh = g.view(1, 1, 1, window).expand(c, 1, 1, window)
    gv = g.view(1, 1, window, 1).expand(c, 1, window, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region only
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return smap.flatten(1).mean(1).float().cpu()


_LPIPS_CACHE: dict[tuple[str, str], Any] = {}


def lpips_model(net: str = "alex", device=None):
    """The LPIPS network from :mod:`wsicodec.research.lpips`, loaded once per (net, device)."""
    from wsicodec.research import lpips as _lpips

    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (net, str(dev))
    if key not in _LPIPS_CACHE:
        _LPIPS_CACHE[key] = _lpips.LPIPS(net).to(dev)
    return _LPIPS_CACHE[key]


def lpips(a: Any, b: Any, device=None, net: str = "alex", batch_size: int = 32) -> torch.Tensor:
    """Per-image LPIPS distance (lower is closer)."""
    x, y = _pair(a, b, device)
    model = lpips_model(net, x.device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            # LPIPS networks take [-1, 1]
            d = model(x[i : i + batch_size] * 2 - 1, y[i : i + batch_size] * 2 - 1)
            out.append(d.reshape(-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def cosine_similarity(ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) embedding batches."""
    return F.cosine_similarity(ea.float().flatten(1), eb.float().flatten(1), dim=1).cpu()


def embedding_similarity(embedder, a: Any, b: Any, device=None, batch_size: int = 32) -> torch.Tensor:
    """Per-image cosine similarity of ``embedder`` embeddings of the two batches."""
    x, y = _pair(a, b, device)
    return cosine_similarity(embedder.embed_batched(x, batch_size), embedder.embed_batched(y, batch_size))


def mean_finite(values: torch.Tensor) -> float:
    v = values.double()
    return float(v.mean()) if len(v) else math.nan
