"""Which tiles hold tissue, decided on a low-resolution thumbnail.

Interface:

    tissue_tiles(thumbnail: np.ndarray, grid: TileGrid, min_fraction: float = 0.05) -> np.ndarray[bool] (rows, cols)
    tissue_pixels(thumbnail) -> np.ndarray[bool] (h, w)        # the per-pixel mask behind it

Per pixel, tissue is what is *stained*: HSV saturation (smoothed 3x3) above an Otsu threshold, or
clearly darker than the glass (45 grey levels below its 98th-percentile brightness) while still
somewhat coloured.  The Otsu threshold is clamped to [0.08, 0.2] so that a blank slide's glass noise
cannot pull it down and an all-tissue thumbnail cannot push it up between pale and dark stain; if
the class below it is itself stained (no glass to speak of), it falls to 0.08.

Then a colour rule removes what H&E does not produce, before the thresholds are computed:

* green and blue marker ink: green brighter than red by 8+ (both H&E stains absorb green more than
  red, so stained tissue has G < R).  A strongly blue-shifted scanner could trip this on
  haematoxylin; ``--all-tiles`` is the escape hatch;
* red marker ink: saturated red with green and blue both low and about equal (eosin is pink: its
  blue stays well above its green).  Fresh blood can look like this; it is rarely a whole tile;
* black ink, coverslip and glass edges, dust, folds seen edge-on: near-black with little colour.

Ink is dilated by two pixels so its anti-aliased rim does not read as faint tissue, and a 2x2
opening plus 3x3 closing remove isolated specks and join ragged edges.  Tissue under ink is lost
(it is usually the pathologist's outline, not the tissue).  Not caught: ink overlaps that come out
dark purple (red over black reads as haematoxylin, histolab's ``no-tissue-red-pen.png``).

A tile holds tissue when at least ``min_fraction`` of its footprint on the thumbnail is tissue.  The
thumbnail should give a tile a few pixels: ``slide.thumbnail(max(1024, 8 * max(grid.rows, grid.cols)))``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from wsicodec.source.slide import TileGrid

# Saturation (max - min) / max: glass is ~0.0-0.03, pale stroma and fat membranes from ~0.07.
_SAT_MIN, _SAT_MAX = 0.08, 0.2


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.5
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB(A) image, got shape {a.shape}")
    if a.shape[2] == 4:  # composite on white
        alpha = a[..., 3:4].astype(np.float32) / 255
        a = a[..., :3].astype(np.float32) * alpha + 255 * (1 - alpha)
    return a[..., :3].astype(np.float32)


def ink_pixels(image: np.ndarray) -> np.ndarray:
    """Pixels that are marker ink or dark artefacts rather than H&E tissue (bool (h, w))."""
    a = _rgb(image)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mx = a.max(axis=2)
    sat = (mx - a.min(axis=2)) / np.maximum(mx, 1)
    green_blue = (g > r + 8) & (sat > 0.1)
    red = (r > 140) & (g < 90) & (b < 110) & (np.abs(b - g) < 30) & (r - g > 90)
    black = (mx < 90) & (sat < 0.3)
    return green_blue | red | black


def tissue_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel tissue mask (bool (h, w)) of an RGB(A) thumbnail."""
    a = _rgb(image)
    mx = a.max(axis=2)
    sat = (mx - a.min(axis=2)) / np.maximum(mx, 1)
    # a 3x3 mean keeps thin stained structures (fat membranes) but sinks isolated JPEG/glass noise
    sat = ndimage.uniform_filter(sat, 3)
    grey = a.mean(axis=2)
    ink = ink_pixels(a)
    if ink.any():
        ink = ndimage.binary_dilation(ink, iterations=2)
    # ink must not steer the thresholds: a slide half covered in marker is still glass + tissue
    clean = ~ink
    t = _otsu(sat[clean]) if clean.any() else _SAT_MAX
    low = sat[clean & (sat <= t)]
    if low.size and float(low.mean()) > 0.05:
        # the low class is itself stained (a thumbnail with hardly any glass): Otsu split pale
        # from dark tissue, so fall back to the glass-noise bound
        t = _SAT_MIN
    t = float(np.clip(t, _SAT_MIN, _SAT_MAX))
    # glass brightness: the bright end of the image (a whole-tissue thumbnail still has some glass,
    # and if it has none the bound keeps "darker than glass" meaningful)
    glass = max(float(np.percentile(grey[clean], 98)) if clean.any() else 255.0, 200.0)
    stained = sat > t
    darker = (grey < glass - 45) & (sat > _SAT_MIN / 2)
    mask = (stained | darker) & clean
    mask = ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool))
    return mask & clean


def tile_fractions(mask: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Fraction of each tile's in-image footprint that is True in ``mask`` (which spans the grid's area)."""
    h, w = mask.shape
    sx, sy = w / grid.width, h / grid.height  # mask px per archived px

    def edges(n_tiles, size, s, limit):
        e = np.minimum(np.arange(n_tiles + 1) * grid.tile_size, size) * s
        # nearest mask-pixel edges: unbiased, and a tile never borrows a whole neighbouring pixel
        lo = np.round(e[:-1]).astype(np.int64)
        hi = np.round(e[1:]).astype(np.int64)
        hi = np.clip(np.maximum(hi, lo + 1), 1, limit)
        lo = np.clip(np.minimum(lo, hi - 1), 0, limit - 1)
        return lo, hi

    x0, x1 = edges(grid.cols, grid.width, sx, w)
    y0, y1 = edges(grid.rows, grid.height, sy, h)
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    Y0, Y1 = y0[:, None], y1[:, None]
    X0, X1 = x0[None, :], x1[None, :]
    count = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    area = (Y1 - Y0) * (X1 - X0)
    return count / area


def tissue_tiles(thumbnail: np.ndarray, grid: TileGrid, min_fraction: float = 0.05) -> np.ndarray:
    """Bool (rows, cols): tiles whose thumbnail footprint is at least ``min_fraction`` tissue."""
    mask = tissue_pixels(thumbnail)
    return tile_fractions(mask, grid) >= min_fraction


# ---------------------------------------------------------------------------- keeping every fragment
# The archive's promise is that nothing of the specimen is dropped, so the thumbnail rule above only
# proposes; the final word is the simple rule below, applied at the archived resolution to every tile
# the thumbnail cannot clear. Stained tissue is coloured (max - min over RGB well above glass's ~3) or
# dark; glass is neither. Pen on glass also passes: it costs bytes, not information.
TISSUE_LIKE_SPREAD = 25  # max - min over RGB
TISSUE_LIKE_DARK = 200  # mean over RGB
# A tile is background when at most this fraction of its pixels is tissue-like: a few stray pixels
# (0.1 % of a 256 px tile is 65 px). --tissue-threshold changes it; docs/compress.md gives its cost.
DEFAULT_TISSUE_THRESHOLD = 0.001
# Candidates are found on the thumbnail with a looser rule (averaging dilutes a small fragment)
_CANDIDATE_SPREAD, _CANDIDATE_DARK, _CANDIDATE_DILATE = 12, 225, 2


def tissue_like(image: np.ndarray, spread: float = TISSUE_LIKE_SPREAD, dark: float = TISSUE_LIKE_DARK) -> np.ndarray:
    """Bool (h, w): pixels that may be specimen (tissue, debris, ink on tissue) rather than glass."""
    a = _rgb(image)
    return (a.max(axis=2) - a.min(axis=2) > spread) | (a.mean(axis=2) < dark)


def candidate_tiles(thumbnail: np.ndarray, grid: TileGrid, tissue: np.ndarray) -> np.ndarray:
    """Bool (rows, cols): tiles not in ``tissue`` whose thumbnail footprint may hold anything but glass.

    These are read at the archived resolution and judged by :func:`tissue_like`."""
    loose = tissue_like(thumbnail, _CANDIDATE_SPREAD, _CANDIDATE_DARK)
    if loose.any():
        loose = ndimage.binary_dilation(loose, iterations=_CANDIDATE_DILATE)
    return (tile_fractions(loose, grid) > 0) & ~np.asarray(tissue, bool)


def glass_colour(thumbnail: np.ndarray, min_pixels: int = 64) -> tuple[int, int, int] | None:
    """The slide's glass as RGB: the median of thumbnail pixels far from anything tissue-like.

    None when the thumbnail shows (almost) no glass; callers then keep white."""
    a = _rgb(thumbnail)
    near = tissue_like(a, _CANDIDATE_SPREAD, _CANDIDATE_DARK)
    if near.any():
        near = ndimage.binary_dilation(near, iterations=3)
    glass = a[~near]
    if len(glass) < min_pixels:
        return None
    return tuple(int(round(float(v))) for v in np.median(glass, axis=0))  # type: ignore[return-value]
