"""Whole-image fidelity figures on uint8 pixels (numpy only): what restore, benchmarks and tests measure.

    psnr(a, b) -> dB over all pixels pooled (research.metrics.psnr is the per-image, batched one)
    seam_ratio(image, tile_size, tissue) -> tile-border vs interior neighbour differences of one image
    edge_interior_ratio(decoded, source, tile_size, tissue) -> error in tiles' outer 2 px / their inside
    error_seam_ratio(decoded, source, tile_size, tissue) -> error-image jumps at tile borders / 8-px grid
    tissue_loss(source, tissue, tile_size) -> tissue-like pixels that background tiles would drop
    glass_step(decoded, glass_mask, tile_size, tissue) -> the glass colour's jump across tissue/background borders
    clear_glass(source, distance) -> source pixels that are glass and at least ``distance`` px from anything else
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


def _tile_masks(h: int, w: int, tile_size: int, tissue: np.ndarray | None) -> np.ndarray:
    """Per-pixel bool: the pixel's tile holds tissue (all tiles when ``tissue`` is None)."""
    rows, cols = math.ceil(h / tile_size), math.ceil(w / tile_size)
    if tissue is None:
        return np.ones((h, w), bool)
    t = np.asarray(tissue, bool)[:rows, :cols]
    return np.repeat(np.repeat(t, tile_size, axis=0), tile_size, axis=1)[:h, :w]


def edge_interior_ratio(decoded: np.ndarray, source: np.ndarray, tile_size: int,
                        tissue: np.ndarray | None = None, ring: int = 2, inner: int = 8) -> float:
    """Mean |decoded - source| in the outer ``ring`` px of each tissue tile over the same >= ``inner`` px
    inside it. 1.0: a tile's edges are coded as well as its middle. Only whole tiles count."""
    d = np.abs(np.asarray(decoded, np.float32) - np.asarray(source, np.float32)).mean(axis=2)
    h, w = d.shape
    t = tile_size
    hh, ww = (h // t) * t, (w // t) * t  # whole tiles only: a cut tile's edge is not a tile edge
    d = d[:hh, :ww]
    pos_y, pos_x = np.arange(hh) % t, np.arange(ww) % t
    dist = np.minimum.outer(np.minimum(pos_y, t - 1 - pos_y), np.minimum(pos_x, t - 1 - pos_x))
    keep = _tile_masks(hh, ww, t, tissue)
    edge, mid = keep & (dist < ring), keep & (dist >= inner)
    if not edge.any() or not mid.any():
        return float("nan")
    inside = float(d[mid].mean())
    return float(d[edge].mean()) / inside if inside > 0 else float("nan")


def error_seam_ratio(decoded: np.ndarray, source: np.ndarray, tile_size: int,
                     tissue: np.ndarray | None = None, grid: int = 8) -> float:
    """How much the error image jumps across tile borders, over how much it jumps across the interior
    lines of an 8-px grid. With e = mean over RGB of (decoded - source): mean |Δe| across tile borders /
    mean |Δe| across the other 8-px grid lines, both between tissue tiles. The source's own JPEG blocks
    sit on the same 8-px grid, so they cancel; 1.0 means the tiles are invisible in the error."""
    e = (np.asarray(decoded, np.float32) - np.asarray(source, np.float32)).mean(axis=2)
    h, w = e.shape
    t = tile_size
    keep = _tile_masks(h, w, t, tissue)
    sums = {"border": 0.0, "grid": 0.0}
    counts = {"border": 0, "grid": 0}
    for axis in (0, 1):
        d = np.abs(np.diff(e, axis=axis))  # d[k] compares k and k+1
        both = keep[1:, :] & keep[:-1, :] if axis == 0 else keep[:, 1:] & keep[:, :-1]
        k = np.arange(d.shape[axis]) + 1
        for name, line in (("border", k % t == 0), ("grid", (k % grid == 0) & (k % t != 0))):
            sel = both & (line[:, None] if axis == 0 else line[None, :])
            sums[name] += float(d[sel].sum())
            counts[name] += int(sel.sum())
    if not counts["border"] or not counts["grid"] or sums["grid"] == 0:
        return float("nan")
    return (sums["border"] / counts["border"]) / (sums["grid"] / counts["grid"])


def tissue_loss(source: np.ndarray, tissue: np.ndarray, tile_size: int) -> dict[str, float]:
    """What the background tiles would drop, measured on the source at the archived resolution.

    ``lost_fraction``: tissue-like pixels in background tiles / all tissue-like pixels;
    ``worst_tile``: the largest tissue-like fraction of one background tile (whole and cut tiles alike)."""
    from wsicodec.source.tissue import tissue_like

    like = tissue_like(source)
    h, w = like.shape
    background = ~_tile_masks(h, w, tile_size, tissue)
    total = int(like.sum())
    worst = 0.0
    for r, c in zip(*np.nonzero(~np.asarray(tissue, bool))):
        block = like[r * tile_size:(r + 1) * tile_size, c * tile_size:(c + 1) * tile_size]
        if block.size:
            worst = max(worst, float(block.mean()))
    return {"lost_fraction": float(like[background].sum()) / total if total else 0.0, "worst_tile": worst,
            "tissue_like_pixels": float(total)}


def clear_glass(source: np.ndarray, distance: int = 8) -> np.ndarray:
    """Bool (h, w): pixels at least ``distance`` px (Chebyshev) from any tissue-like source pixel.

    The glass colour is measured there: next to tissue any decoder blends a little tissue into the glass,
    which is fidelity (edge error), not the glass colour's step between tiles."""
    from wsicodec.source.tissue import tissue_like

    like = tissue_like(source).astype(np.int32)
    h, w = like.shape
    pad = np.pad(like, distance + 1)
    cs = pad.cumsum(0).cumsum(1)
    k = 2 * distance + 1
    box = cs[k:k + h, k:k + w] - cs[:h, k:k + w] - cs[k:k + h, :w] + cs[:h, :w]
    return box == 0


def glass_step(decoded: np.ndarray, glass_mask: np.ndarray, tile_size: int, tissue: np.ndarray,
               band: int = 16, min_pixels: int = 64) -> dict[str, float]:
    """How much the glass colour jumps where a tissue tile meets a background tile.

    For every such border, the mean colour of glass pixels (``glass_mask``: e.g. the source's pixels that
    are not tissue-like) within ``band`` px on the tissue tile's side is compared with the mean colour of
    the band on the background tile's side; the step is the largest of the three channels' absolute
    differences in grey levels. Borders with fewer than ``min_pixels`` glass pixels on the tissue side are
    skipped. Returns the mean and largest step and the number of borders measured."""
    img = np.asarray(decoded, np.float64)[..., :3]
    h, w = img.shape[:2]
    t = np.asarray(tissue, bool)
    steps = []
    rows, cols = t.shape
    for r in range(rows):
        for c in range(cols):
            if not t[r, c]:
                continue
            y0, x0 = r * tile_size, c * tile_size
            y1, x1 = min(y0 + tile_size, h), min(x0 + tile_size, w)
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                rr, cc = r + dr, c + dc
                if not (0 <= rr < rows and 0 <= cc < cols) or t[rr, cc]:
                    continue
                if dr == -1:
                    inner, outer = np.s_[y0:y0 + band, x0:x1], np.s_[max(0, y0 - band):y0, x0:x1]
                elif dr == 1:
                    inner, outer = np.s_[y1 - band:y1, x0:x1], np.s_[y1:min(h, y1 + band), x0:x1]
                elif dc == -1:
                    inner, outer = np.s_[y0:y1, x0:x0 + band], np.s_[y0:y1, max(0, x0 - band):x0]
                else:
                    inner, outer = np.s_[y0:y1, x1 - band:x1], np.s_[y0:y1, x1:min(w, x1 + band)]
                m = np.asarray(glass_mask, bool)[inner]
                if m.sum() < min_pixels or img[outer].size == 0:
                    continue
                a = img[inner][m].mean(axis=0)
                b = img[outer].reshape(-1, 3).mean(axis=0)
                steps.append(float(np.abs(a - b).max()))
    if not steps:
        return {"mean": math.nan, "max": math.nan, "borders": 0}
    return {"mean": float(np.mean(steps)), "max": float(np.max(steps)), "borders": len(steps)}
