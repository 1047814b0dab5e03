"""Synthetic H&E-like whole-slide images in Aperio layout, for tests and benchmarks.

    write_synthetic_slide(path, width, height, *, mpp=0.25, objective_power=40, tissue_fraction=0.35,
                          islands=3, pen=None, seed=0, tile_size=256, levels=None,
                          with_associated=True, jpeg_quality=85, workers=None) -> Path
    write_synthetic_leica(path, width, height, *, offset=(700, 500), ...) -> Path
        # a Leica SCN whose scanned area sits inside an empty collection: OpenSlide reports it
        # as openslide.bounds-*, for testing that bounds are honoured

The picture is a pure function of level-0 coordinates (deterministic from ``seed``), so every tile of
every pyramid level is painted directly at its own scale, one tile at a time: a 30000 x 30000 slide
streams through tifffile with bounded memory.  Content: a few tissue islands (pink stroma whose stain
density varies, purple nuclei, white holes) on a light-grey glass background, coloured through
Beer-Lambert optical densities of haematoxylin and eosin so that the colours stay H&E-like.  An
optional pen stroke (green, blue or red ink) crosses the background, for tissue-detection tests.

Layout (what OpenSlide's ``aperio`` backend and Bio-Formats expect): IFD 0 the tiled level 0 with an
``Aperio Image Library`` description carrying ``AppMag`` and ``MPP``; IFD 1 a stripped thumbnail;
then the reduced tiled levels (NewSubfileType 0, each with its own Aperio description); then a
stripped label (NewSubfileType 1) and macro (NewSubfileType 9).
"""

from __future__ import annotations

import math
import os
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from wsicodec._io import atomic_output

# stain optical densities per unit concentration (log10 units); haematoxylin from Ruifrok & Johnston
_OD_H = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_OD_E = np.array([0.13, 0.85, 0.48], dtype=np.float32)  # pinker than Ruifrok's (0.07, 0.99, 0.11)
_INK = {  # optical densities of common slide-marker inks (absorb what the ink is not)
    "green": np.array([0.75, 0.12, 0.55], dtype=np.float32),
    "blue": np.array([0.85, 0.45, 0.08], dtype=np.float32),
    "red": np.array([0.06, 0.95, 0.80], dtype=np.float32),
}
_GLASS = np.array([243.0, 243.0, 245.0], dtype=np.float32)
_DESC_HEAD = "Aperio Image Library v12.0.16 (wsicodec synthetic)"
_CONTENT_MPP = 0.25  # physical scale of the drawing when the slide records no mpp


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic per-lattice-point value in [0, 1) (integer hash, vectorised, wraps in uint32)."""
    h = (ix.astype(np.int64) * 0x27D4EB2D) ^ (iy.astype(np.int64) * 0x165667B1) ^ (salt * 0x9E3779B1)
    h = (h & 0xFFFFFFFF).astype(np.uint32)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h.astype(np.float32) * np.float32(1.0 / 4294967296.0)


def _lattice(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Lower lattice index (relative), smoothstep weight, base index and lattice count for samples at g."""
    i0 = np.floor(g).astype(np.int64)
    t = (g - i0).astype(np.float32)
    base = int(i0[0]) if g.size else 0
    base = min(base, int(i0.min()))
    return i0 - base, t * t * (3 - 2 * t), base, int(i0.max()) - base + 2


def _noise(xs: np.ndarray, ys: np.ndarray, cell: float, salt: int, cell_y: float | None = None) -> np.ndarray:
    """Value noise in [-1, 1] on the grid xs (columns) x ys (rows), lattice spacing ``cell``
    (``cell_y`` down the rows when it differs: stretched noise draws fibres).

    Interpolation is separable: blend lattice columns first (ny x nx -> ny x w, small), then whole
    rows (contiguous copies).  Gathers rather than BLAS: exact whatever the tile split (so tiles join
    seamlessly), and a threaded BLAS on tiny matrices spends more time waking threads than working.
    """
    ix, tx, bx, nx = _lattice(xs / cell)
    iy, ty, by, ny = _lattice(ys / (cell_y or cell))
    gx = np.arange(bx, bx + nx)
    gy = np.arange(by, by + ny)
    v = _hash01(gx[None, :], gy[:, None], salt) * 2 - 1
    cols = v[:, ix] * (1 - tx) + v[:, ix + 1] * tx
    return cols[iy] * (1 - ty)[:, None] + cols[iy + 1] * ty[:, None]


class _Painter:
    """The slide as a function of level-0 pixel coordinates."""

    def __init__(self, width, height, *, mpp, tissue_fraction, islands, pen, seed):
        self.width, self.height = width, height
        self.um = float(mpp or _CONTENT_MPP)  # µm per level-0 pixel
        self.seed = int(seed)
        self.tissue_fraction = float(tissue_fraction)
        rng = np.random.default_rng(self.seed)
        n = max(1, int(islands))
        # island ellipses (level-0 px); radii sized so their area is about the requested fraction
        area = self.tissue_fraction * width * height / 0.55 / n  # ~55 % of an ellipse survives the threshold
        self.islands = []
        for _ in range(n):
            aspect = rng.uniform(0.6, 1.6)
            rx = math.sqrt(area * aspect / math.pi)
            ry = math.sqrt(area / aspect / math.pi)
            cx = rng.uniform(0.2, 0.8) * width
            cy = rng.uniform(0.2, 0.8) * height
            self.islands.append((cx, cy, rx, ry))
        self.pen = pen
        if pen is not None and pen not in _INK:
            raise ValueError(f"pen must be one of {sorted(_INK)} or None, got {pen!r}")
        self.pen_y = 0.93 * height
        self.pen_amp = 0.02 * height
        self.pen_halfwidth = 40.0 / self.um  # an 80 µm marker line

    def _tissue_possible(self, x0, y0, x1, y1) -> bool:
        if self.tissue_fraction >= 0.999:
            return True
        if self.tissue_fraction <= 0:
            return False
        for cx, cy, rx, ry in self.islands:
            dx = max(x0 - cx, 0.0, cx - x1) / rx
            dy = max(y0 - cy, 0.0, cy - y1) / ry
            if 1 - dx * dx - dy * dy + 0.45 > 0.25:  # envelope + max noise can cross the threshold
                return True
        return False

    def _pen_possible(self, y0, y1) -> bool:
        if self.pen is None:
            return False
        reach = self.pen_amp + 2 * self.pen_halfwidth
        return y1 >= self.pen_y - reach and y0 <= self.pen_y + reach

    def render(self, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        """RGB uint8 (h, w, 3) sampling level-0 points x0 + (i + 0.5) * ds, y0 + (j + 0.5) * ds."""
        x_end, y_end = x0 + w * ds, y0 + h * ds
        tissue = self._tissue_possible(x0, y0, x_end, y_end)
        pen = self._pen_possible(y0, y_end)
        if not tissue and not pen:
            out = np.empty((h, w, 3), dtype=np.uint8)
            out[:] = _GLASS.astype(np.uint8)
            return out
        xs = (x0 + (np.arange(w, dtype=np.float64) + 0.5) * ds)
        ys = (y0 + (np.arange(h, dtype=np.float64) + 0.5) * ds)
        um = self.um
        xu, yu = xs * um, ys * um  # µm
        pix = ds * um  # µm per output pixel

        def noise(cell_um, salt, cell_y=None):
            # features much smaller than a pixel average out to their mean (0)
            if min(cell_um, cell_y or cell_um) < 1.5 * pix:
                return np.zeros((h, w), dtype=np.float32)
            return _noise(xu, yu, cell_um, self.seed * 101 + salt, cell_y)

        zero = np.zeros((h, w), dtype=np.float32)
        a_e = a_h = ink = zero
        if tissue:
            if self.tissue_fraction >= 0.999:
                env = np.ones((h, w), dtype=np.float32)
            else:
                env = np.full((h, w), -10.0, dtype=np.float32)
                for cx, cy, rx, ry in self.islands:
                    dx = ((xs - cx) / rx).astype(np.float32)
                    dy = ((ys - cy) / ry).astype(np.float32)
                    np.maximum(env, 1 - dy[:, None] ** 2 - dx[None, :] ** 2, out=env)
            shape = env + 0.3 * noise(400.0, 1) + 0.15 * noise(90.0, 2)
            edge = max(0.02, 0.02 * pix)
            alpha = np.clip((shape - 0.25) / edge, 0, 1)
            holes = noise(70.0, 3) + 0.3 * noise(20.0, 4)
            alpha *= 1 - np.clip((holes - 0.55) / 0.08, 0, 1)
            # eosin: stroma density varies over tens of µm; collagen fibres are long and thin
            # (stretched noise; which way they run changes from patch to patch)
            way = np.clip(0.5 + 2.0 * noise(120.0, 13), 0, 1)
            fibres = way * noise(1.6, 6, cell_y=16.0) + (1 - way) * noise(16.0, 10, cell_y=1.6)
            c_e = 0.22 + 0.07 * noise(35.0, 5) + 0.07 * fibres + 0.025 * noise(2.0, 7)
            c_h = 0.05 + 0.025 * noise(25.0, 8)
            density = np.clip(0.45 + 0.5 * noise(150.0, 9), 0.05, 1)
            nuclei = self._nuclei(xu, yu, pix, density)
            nuclei *= 1 + 0.35 * noise(0.9, 11)  # chromatin
            c_h += nuclei
            a_e, a_h = alpha * c_e, alpha * c_h
            if ds < 2:  # grain of the stained section, per pixel (level 0 and close to it only)
                col = np.floor(xs / ds).astype(np.int64)
                row = np.floor(ys / ds).astype(np.int64)
                grain = (_hash01(col[None, :], row[:, None], self.seed * 101 + 12) - 0.5) * 0.04
                a_e = a_e + alpha * grain
        if pen:
            wave = self.pen_y + self.pen_amp * np.sin(xs / self.width * 2 * math.pi * 1.5 + self.seed)
            d = np.abs(ys[:, None] - wave[None, :]) / self.pen_halfwidth
            ink = np.clip((1 - d) / max(0.05, ds / self.pen_halfwidth), 0, 1).astype(np.float32)
        out = np.empty((h, w, 3), dtype=np.uint8)
        ink_od = _INK[self.pen] if pen else np.zeros(3, dtype=np.float32)
        for k in range(3):  # Beer-Lambert per channel: I = glass * 10^-(OD)
            od = a_e * _OD_E[k] + a_h * _OD_H[k] + ink * ink_od[k]
            ch = np.exp(od * np.float32(-math.log(10)))
            ch *= _GLASS[k]
            ch += 0.5
            out[..., k] = np.minimum(ch, 255)
        return out

    def _nuclei(self, xu, yu, pix, density) -> np.ndarray:
        """Haematoxylin concentration of nuclei: one jittered nucleus per 10 µm cell, or its mean."""
        s = 10.0
        mean_cover = math.pi * 3.0 ** 2 / s ** 2
        c_nuc = 0.75
        if pix >= s / 2:  # nuclei smaller than pixels: their average stain
            return (density * mean_cover * c_nuc).astype(np.float32)
        salt = self.seed * 101 + 50
        cx = np.floor(xu / s).astype(np.int64)
        cy = np.floor(yu / s).astype(np.int64)
        fx = (xu - cx * s).astype(np.float32)
        fy = (yu - cy * s).astype(np.float32)
        ux = np.arange(cx[0], cx[-1] + 1)
        uy = np.arange(cy[0], cy[-1] + 1)
        gx, gy = ux[None, :], uy[:, None]
        params = np.stack([
            s / 2 + (_hash01(gx, gy, salt) - 0.5) * 4.0,  # centre x in the cell
            s / 2 + (_hash01(gx, gy, salt + 1) - 0.5) * 4.0,  # centre y
            2.2 + 1.3 * _hash01(gx, gy, salt + 2),  # radius
            _hash01(gx, gy, salt + 3),  # present where below the local density
            0.55 + 0.45 * _hash01(gx, gy, salt + 4),  # how dark
        ])
        # per-pixel parameters of the pixel's cell: gather rows, then columns (cheap two-stage gather)
        jx, jy, r, pick, dark = params[:, cy - uy[0]][:, :, cx - ux[0]]
        dx = fx[None, :] - jx
        dy = (fy[:, None] - jy) * 1.25  # slightly oval
        dist = np.sqrt(dx * dx + dy * dy)
        soft = max(0.6, pix)
        a = np.clip((r - dist) * (1 / soft) + 0.5, 0, 1)
        a *= dark * (c_nuc * 1.4)
        a[pick >= density] = 0
        return a


def _description(width, height, tile, quality, mpp, objective_power, extra="") -> str:
    parts = [f"{_DESC_HEAD}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}){extra} JPEG/RGB Q={quality}"]
    if objective_power is not None:
        parts.append(f"AppMag = {objective_power:g}")
    if mpp is not None:
        parts.append(f"MPP = {mpp:.6g}")
    parts.append("Filename = synthetic")
    parts.append("ScanScope ID = WSICODEC-SYNTHETIC")
    return "|".join(parts)


def _auto_levels(width, height, tile) -> list[int]:
    """Downsamples 1, 4, 16, ... until the level fits in about one tile-row's worth (like scanners do)."""
    ds = [1]
    while max(width, height) / (ds[-1] * 4) >= max(tile, 512):
        ds.append(ds[-1] * 4)
    return ds


def _label_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 7)
    img = np.full((400, 380, 3), 250, dtype=np.uint8)
    x = 30
    while x < 350:  # a barcode-ish strip
        bw = int(rng.integers(2, 8))
        img[40:160, x:x + bw] = 20
        x += bw + int(rng.integers(2, 7))
    img[220:260, 40:340] = (40, 60, 160)  # a printed text block
    img[290:320, 40:260] = (40, 40, 40)
    return img


def _painted_tiles(painter: _Painter, ds: float, lw: int, lh: int, tile: int, workers: int):
    """Tiles of one level in row-major order, painted by a few threads (numpy releases the GIL)."""
    coords = [(tx, ty) for ty in range(0, lh, tile) for tx in range(0, lw, tile)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for tx, ty in coords:
            pending.append(pool.submit(painter.render, tx * ds, ty * ds, tile, tile, ds))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _overview(painter: _Painter, max_side: int) -> np.ndarray:
    """The whole slide drawn with its longest side ``max_side`` pixels."""
    f = max(painter.width, painter.height) / max_side
    tw, th = max(1, round(painter.width / f)), max(1, round(painter.height / f))
    return painter.render(0, 0, tw, th, painter.width / tw)


@contextmanager
def _atomic_tiff(path: Path, bigtiff: bool):
    """A TiffWriter on a temporary name in the same folder, renamed to ``path`` only when complete."""
    with atomic_output(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            yield tw


def _setup(width, height, tile_size, levels, workers):
    width, height, tile_size = int(width), int(height), int(tile_size)
    workers = max(1, int(workers or min(4, os.cpu_count() or 1)))
    if levels is None:
        levels = _auto_levels(width, height, tile_size)
    levels = sorted({int(d) for d in levels} | {1})
    # classic TIFF offsets overflow at 4 GiB; JPEG tiles are far smaller than raw, so raw/8 is a safe bound
    bigtiff = width * height * 3 / 8 > 2 ** 31
    return width, height, tile_size, levels, workers, bigtiff


def write_synthetic_slide(path, width: int, height: int, *, mpp: float | None = 0.25,
                          objective_power: float | None = 40, tissue_fraction: float = 0.35,
                          islands: int = 3, pen: str | None = None, seed: int = 0, tile_size: int = 256,
                          levels: list[int] | None = None, with_associated: bool = True,
                          jpeg_quality: int = 85, workers: int | None = None) -> Path:
    """Write an Aperio-layout tiled pyramidal TIFF (OpenSlide vendor ``aperio``); returns its path.

    ``levels``: downsample factors, level 0's 1 implied (e.g. ``[1, 4]``); ``None`` picks 1, 4, 16...
    ``mpp=None`` / ``objective_power=None`` leave those fields out of the description, so OpenSlide
    records no resolution.  ``workers`` threads paint tiles (default: up to 4, one per CPU).
    Written to a temporary name and renamed when complete.
    """
    path = Path(path)
    width, height, tile_size, levels, workers, bigtiff = _setup(width, height, tile_size, levels, workers)
    painter = _Painter(width, height, mpp=mpp, tissue_fraction=tissue_fraction, islands=islands,
                       pen=pen, seed=seed)
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    jpeg = dict(photometric="rgb", compression="jpeg", metadata=None)
    desc0 = _description(width, height, tile_size, jpeg_quality, mpp, objective_power)

    with _atomic_tiff(path, bigtiff) as tw:
        tw.write(_painted_tiles(painter, 1, width, height, tile_size, workers), shape=(height, width, 3),
                 dtype="uint8", tile=(tile_size, tile_size), compressionargs={"level": jpeg_quality},
                 description=desc0, subfiletype=0, **resolution, **jpeg)
        if with_associated:
            thumb = _overview(painter, 1024)
            fields = desc0.split("|", 1)[1]
            tw.write(thumb, description=f"{_DESC_HEAD}\r\n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - |{fields}",
                     rowsperstrip=16, compressionargs={"level": 90}, subfiletype=0, **jpeg)
        for ds in levels[1:]:
            lw, lh = max(1, width // ds), max(1, height // ds)
            tw.write(_painted_tiles(painter, ds, lw, lh, tile_size, workers), shape=(lh, lw, 3), dtype="uint8",
                     tile=(tile_size, tile_size), compressionargs={"level": jpeg_quality},
                     description=_description(width, height, tile_size, jpeg_quality, mpp,
                                              objective_power, extra=f" -> {lw}x{lh}"),
                     subfiletype=0, **jpeg)
        if with_associated:
            label = _label_image(seed)
            tw.write(label, photometric="rgb", compression="lzw", metadata=None, rowsperstrip=64,
                     subfiletype=1, description=f"{_DESC_HEAD}\nlabel {label.shape[1]}x{label.shape[0]}")
            tw.write(_macro_image(painter), description=f"{_DESC_HEAD}\nmacro 1280x431", rowsperstrip=16,
                     compressionargs={"level": 90}, subfiletype=9, **jpeg)
    return path


def _macro_image(painter: _Painter) -> np.ndarray:
    ov = _overview(painter, 380)
    oh, ow = ov.shape[:2]
    macro = np.full((431, 1280, 3), 200, dtype=np.uint8)
    macro[:, :400] = 235  # frosted label end of the glass
    mx, my = 420 + (840 - ow) // 2, (431 - oh) // 2
    macro[my:my + oh, mx:mx + ow] = ov
    return macro


_LEICA_NS = "http://www.leica-microsystems.com/scn/2010/10/01"


def _leica_image_xml(name, dims, view, objective) -> str:
    vx, vy, ox, oy = view
    dim = "".join(f'<dimension sizeX="{w}" sizeY="{h}" r="{i}" ifd="{ifd}"/>' for i, (w, h, ifd) in enumerate(dims))
    return (f'<image name="{name}" uuid="urn:uuid:wsicodec-{name}">'
            "<creationDate>2026-01-01T00:00:00.00Z</creationDate>"
            '<device model="Leica SCN400;Leica SCN" version="1.5.1.10804 2012/05/10 13:29:07;1.5.1.10864"/>'
            f'<pixels sizeX="{dims[0][0]}" sizeY="{dims[0][1]}">{dim}</pixels>'
            f'<view sizeX="{vx}" sizeY="{vy}" offsetX="{ox}" offsetY="{oy}" spacingZ="0"/>'
            f"<scanSettings><objectiveSettings><objective>{objective:g}</objective></objectiveSettings>"
            "<illuminationSettings><numericalAperture>0.5</numericalAperture>"
            "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings>"
            "</image>")


def write_synthetic_leica(path, width: int, height: int, *, offset: tuple[int, int] = (700, 500),
                          mpp: float | None = 0.25, objective_power: float = 40, tissue_fraction: float = 0.35,
                          islands: int = 3, pen: str | None = None, seed: int = 0, tile_size: int = 256,
                          levels: list[int] | None = None, jpeg_quality: int = 85,
                          workers: int | None = None) -> Path:
    """A Leica SCN slide whose scanned area sits at ``offset`` inside a larger, empty collection.

    OpenSlide (vendor ``leica``) reports the scanned area as ``openslide.bounds-*``: level 0 is
    ``width + 2 * offset[0]`` by ``height + 2 * offset[1]`` and only the bounds hold pixels, the
    same pixels ``write_synthetic_slide`` paints with the same arguments.  A macro image is added.
    """
    path = Path(path)
    width, height, tile_size, levels, workers, bigtiff = _setup(width, height, tile_size, levels, workers)
    painter = _Painter(width, height, mpp=mpp, tissue_fraction=tissue_fraction, islands=islands,
                       pen=pen, seed=seed)
    cpp = round(1000 * (mpp or _CONTENT_MPP))  # Leica "clicks" are nanometres
    ox, oy = (int(v) for v in offset)
    cx, cy = (width + 2 * ox) * cpp, (height + 2 * oy) * cpp
    sizes = [(max(1, width // ds), max(1, height // ds)) for ds in levels]
    macro = _macro_image(painter)
    xml = (f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{_LEICA_NS}">'
           f'<collection name="wsicodec synthetic" uuid="urn:uuid:wsicodec" sizeX="{cx}" sizeY="{cy}">'
           "<barcode>WSICODEC-SYNTHETIC</barcode>"
           + _leica_image_xml("macro", [(macro.shape[1], macro.shape[0], len(levels))], (cx, cy, 0, 0), 1.25)
           + _leica_image_xml("main", [(w, h, i) for i, (w, h) in enumerate(sizes)],
                              (width * cpp, height * cpp, ox * cpp, oy * cpp), objective_power)
           + "</collection></scn>")
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    jpeg = dict(photometric="rgb", compression="jpeg", metadata=None)
    with _atomic_tiff(path, bigtiff) as tw:
        for i, (ds, (lw, lh)) in enumerate(zip(levels, sizes)):
            tw.write(_painted_tiles(painter, ds, lw, lh, tile_size, workers), shape=(lh, lw, 3), dtype="uint8",
                     tile=(tile_size, tile_size), compressionargs={"level": jpeg_quality},
                     description=xml if i == 0 else None, **(resolution if i == 0 else {}), **jpeg)
        tw.write(macro, rowsperstrip=16, compressionargs={"level": 90}, **jpeg)
    return path
