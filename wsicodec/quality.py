"""Whole-image fidelity figures on uint8 pixels (numpy only): what restore, benchmarks and tests measure.

    psnr(a, b) -> dB over all pixels pooled (research.metrics.psnr is the per-image, batched one)
    seam_ratio(image, tile_size, tissue) -> tile-border vs interior neighbour differences of one image
"""

from __future__ import annotations

import math

import numpy as np


def seam_ratio(image: np.ndarray, tile_size: int, tissue: np.ndarray | None = None) -> float:
    """Mean |difference| of neighbouring pixels straddling tile borders over the same inside tiles.

    Only pairs of pixels whose tiles both hold tissue count (``tissue``: bool (rows, cols); None =
    all tiles): a border between tissue and white background is a real edge, not a seam.
    Both horizontal and vertical neighbours count. 1.0 means borders are invisible statistically.
    """
    img = np.asarray(image, dtype=np.int16)
    h, w = img.shape[:2]
    t = tile_size
    rows, cols = math.ceil(h / t), math.ceil(w / t)
    if tissue is None:
        tissue = np.ones((rows, cols), bool)
    tissue = np.asarray(tissue, bool)[:rows, :cols]
    # per-pixel tissue flag, expanded from the tile mask
    mask = np.repeat(np.repeat(tissue, t, axis=0), t, axis=1)[:h, :w]
    sums = {"border": 0.0, "inside": 0.0}
    counts = {"border": 0, "inside": 0}
    for axis in (0, 1):
        d = np.abs(np.diff(img, axis=axis)).mean(axis=2)  # d[k] compares pixel k and k+1
        both = mask[1:, :] & mask[:-1, :] if axis == 0 else mask[:, 1:] & mask[:, :-1]
        n = d.shape[axis]
        at_border = (np.arange(n) + 1) % t == 0
        sel = at_border[:, None] if axis == 0 else at_border[None, :]
        for name, where in (("border", both & sel), ("inside", both & ~sel)):
            sums[name] += float(d[where].sum())
            counts[name] += int(where.sum())
    if not counts["border"] or not counts["inside"] or sums["inside"] == 0:
        return float("nan")
    return (sums["border"] / counts["border"]) / (sums["inside"] / counts["inside"])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (or stacks) with all pixels pooled; inf when identical."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
