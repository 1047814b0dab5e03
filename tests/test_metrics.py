"""Fidelity metrics: PSNR, SSIM (Wang et al. 2004), LPIPS and embedding similarity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsicodec.research import metrics as M


def _texture(n=3, size=64, seed=0) -> np.ndarray:
    """Smooth random colour fields: structured enough that blur changes them gradually."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, size // 8, size // 8, 3)).astype(np.float32)
    img = torch.nn.functional.interpolate(torch.from_numpy(low).permute(0, 3, 1, 2), size=(size, size),
                                          mode="bicubic", align_corners=False)
    img = img + torch.from_numpy(rng.normal(0, 12, size=(n, 3, size, size)).astype(np.float32))
    return img.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def _blur(tiles: np.ndarray, sigma: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    return np.stack([np.asarray(Image.fromarray(t).filter(ImageFilter.GaussianBlur(sigma))) for t in tiles])


def test_psnr_identical_is_capped_and_known_value():
    a = _texture()
    assert torch.allclose(M.psnr(a, a), torch.full((3,), M.PSNR_CAP_DB))
    zeros = np.zeros((2, 16, 16, 3), np.uint8)
    tens = np.full((2, 16, 16, 3), 10, np.uint8)
    # MSE 100 on the 8-bit scale: 10*log10(255^2/100)
    expected = 10 * math.log10(255**2 / 100)
    assert torch.allclose(M.psnr(zeros, tens), torch.full((2,), expected), atol=1e-4)


def test_psnr_float_and_uint8_inputs_agree_and_batching_is_per_image():
    a, b = _texture(seed=1), _texture(seed=2)
    batch = M.psnr(a, b)
    singles = torch.cat([M.psnr(a[i : i + 1], b[i : i + 1]) for i in range(len(a))])
    assert torch.allclose(batch, singles)
    assert torch.allclose(M.psnr(M.to_float(a), M.to_float(b)), batch, atol=1e-4)


def test_ssim_identical_is_one_noise_is_less():
    a = _texture()
    assert torch.allclose(M.ssim(a, a), torch.ones(3), atol=1e-6)
    rng = np.random.default_rng(3)
    noisy = np.clip(a.astype(np.int16) + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    s = M.ssim(a, noisy)
    assert (s < 0.95).all() and (s > 0).all()
    assert (M.ssim(a, noisy, channels="luma") < 1).all()


def test_ssim_matches_an_independent_gaussian_filter_computation():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    a, b = _texture(n=1, size=48, seed=4)[0], _blur(_texture(n=1, size=48, seed=4), 1.2)[0]
    x, y = a.astype(np.float64) / 255, b.astype(np.float64) / 255
    vals = []
    for c in range(3):
        # truncate=3.5 at sigma 1.5 gives the 11-tap window; keep the fully-covered ("valid") part
        g = lambda im: scipy_ndimage.gaussian_filter(im, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]  # noqa: E731
        mx, my = g(x[..., c]), g(y[..., c])
        sxx = g(x[..., c] ** 2) - mx**2
        syy = g(y[..., c] ** 2) - my**2
        sxy = g(x[..., c] * y[..., c]) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        vals.append((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())
    assert float(M.ssim(a[None], b[None])[0]) == pytest.approx(float(np.mean(vals)), abs=1e-5)


def test_metrics_order_increasing_blur():
    a = _texture(n=2, size=96, seed=5)
    blurs = [_blur(a, s) for s in (0.6, 1.2, 2.4)]
    ps = [float(M.psnr(a, b).mean()) for b in blurs]
    ss = [float(M.ssim(a, b).mean()) for b in blurs]
    assert ps[0] > ps[1] > ps[2]
    assert ss[0] > ss[1] > ss[2]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        M.psnr(np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 16, 8, 3), np.uint8))


def test_lpips_orders_blur_and_is_zero_on_identical(lpips_weights_dir):
    a = _texture(n=2, size=96, seed=6)
    assert torch.allclose(M.lpips(a, a), torch.zeros(2), atol=1e-6)
    d = [float(M.lpips(a, _blur(a, s)).mean()) for s in (0.6, 1.5, 3.0)]
    assert 0 < d[0] < d[1] < d[2]


def test_standin_embedding_similarity(lpips_weights_dir):
    from wsicodec.research.embeddings import load_embedder

    e = load_embedder("lpips-alex")
    assert e.standin and "†" in e.label
    a = _texture(n=2, size=96, seed=7)
    same = M.embedding_similarity(e, a, a)
    assert torch.allclose(same, torch.ones(2), atol=1e-5)
    near = M.embedding_similarity(e, a, _blur(a, 1.0))
    far = M.embedding_similarity(e, a, _blur(a, 4.0))
    assert (near > far).all() and (far < 1).all()
