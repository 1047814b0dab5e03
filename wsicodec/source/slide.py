"""Source slides: anything OpenSlide opens, read at the archive resolution.

Interface (the pipeline relies on it):

    grid = TileGrid(...)                          # frozen dataclass, JSON round-trip
    slide = SourceSlide(path, source_mpp=None)    # raises SlideError with one-line messages
    slide.grid(target_mpp=0.5, tile_size=256) -> TileGrid
    slide.read_tile(grid, row, col) -> np.uint8 (tile, tile, 3)   # thread-safe; white past edges
    slide.read_tiles(grid, coords, workers=2) -> iterator of ((row, col), tile), in order
    slide.thumbnail(max_size=1024) -> np.uint8 (h, w, 3)          # covers exactly the grid's area
    slide.associated_images() -> dict[str, np.ndarray]            # "label", "macro", "thumbnail"
    slide.properties -> dict[str, str]; slide.mpp; slide.objective_power; slide.mpp_source
    slide.icc_profile -> bytes | None                            # the slide's ICC colour profile, verbatim
    slide.dimensions; slide.bounds (level-0 x, y, w, h archived); slide.path; slide.close(); `with`

Resolution and resampling rules
-------------------------------
* Source µm/px: ``openslide.mpp-x/y`` (their mean), else ``10 / openslide.objective-power``, else the
  ``source_mpp`` argument (the CLI's ``--source-mpp``); an explicit ``source_mpp`` always wins.
* ``grid(target_mpp)`` reads from the coarsest pyramid level that is still at least as fine as the
  target (within ``MPP_TOLERANCE``).  When that level's µm/px matches the target within the tolerance
  (CMU-1's 0.499 for 0.5) its pixels are archived 1:1, untouched; ``grid.scale`` is then the level's
  downsample and the archived pixels are really ``source_mpp * scale`` µm wide (``grid.actual_mpp``).
  Otherwise the region is area-averaged to the target: PIL's ``reduce`` for an aligned integer
  factor (40x read at 20x: the exact 2x2 mean), else its BOX filter over a fractional box.  A target
  finer than the slide is interpolated (bilinear); it is allowed, not useful.
* The archived area is ``openslide.bounds-x/y/width/height`` when the slide records them, else the
  whole level 0.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import openslide
from PIL import Image

from wsicodec.errors import SlideError

MPP_TOLERANCE = 0.02

# What a folder search treats as a slide: the suffixes OpenSlide opens. DICOM is left out on purpose: a
# DICOM slide is many .dcm files, and counting each of them as a slide would be wrong; pass one of its
# files instead. Plain .tif/.tiff may be a slide or a picture: callers that care check for a pyramid.
SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi",
})
# Largest region (level pixels per side) read in one go when building a thumbnail.
_THUMB_READ_SIDE = 2048


@dataclass(frozen=True)
class TileGrid:
    """The archived image and its tiling.

    ``width``/``height`` are the archived image's size in archived pixels (at ``target_mpp``);
    ``origin_x``/``origin_y`` are the level-0 coordinates of its top-left corner and ``scale`` is
    level-0 pixels per archived pixel.  ``level`` is the pyramid level the pixels are read from.
    """

    tile_size: int
    width: int
    height: int
    rows: int
    cols: int
    target_mpp: float
    source_mpp: float
    objective_power: float | None
    level: int
    origin_x: int
    origin_y: int
    scale: float

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def actual_mpp(self) -> float:
        """µm per archived pixel as read (differs from target_mpp by < 2 % when read 1:1)."""
        return self.source_mpp * self.scale

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of a tile in archived pixels, clipped to the image."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) outside a {self.rows}x{self.cols} grid")
        x = col * self.tile_size
        y = row * self.tile_size
        return x, y, min(self.tile_size, self.width - x), min(self.tile_size, self.height - y)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("tile_size", "width", "height", "rows", "cols", "level", "origin_x", "origin_y"):
            d[k] = int(d[k])
        for k in ("target_mpp", "source_mpp", "scale"):
            d[k] = float(d[k])
        if d["objective_power"] is not None:
            d["objective_power"] = float(d["objective_power"])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TileGrid":
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"tile grid lacks {', '.join(sorted(missing))}")
        return cls(**{k: d[k] for k in names})


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return msg or type(err).__name__


def _positive_float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _on_white(img: Image.Image) -> Image.Image:
    """RGB image composited on white (alpha 0 = outside the slide or a missing tile). Stays in PIL:
    numpy round trips of a 512 px RGBA region cost more than OpenSlide's own decoding."""
    if img.mode == "RGB":
        return img
    if img.mode != "RGBA":
        img = img.convert("RGBA")
    if img.getchannel("A").getextrema()[0] == 255:
        return img.convert("RGB")
    # OpenSlide returns non-premultiplied RGBA, which is what alpha_composite expects
    return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")


def _rgba_to_rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(_on_white(img), dtype=np.uint8)


def bounds_from_properties(props: dict, dimensions: tuple[int, int]) -> tuple[int, int, int, int]:
    """Level-0 (x, y, w, h) of the non-empty area from ``openslide.bounds-*``, else the whole slide."""
    w0, h0 = dimensions

    def prop(name):
        v = _positive_float(props.get(name))
        return int(round(v)) if v is not None else None

    bx = min(prop(openslide.PROPERTY_NAME_BOUNDS_X) or 0, w0 - 1)
    by = min(prop(openslide.PROPERTY_NAME_BOUNDS_Y) or 0, h0 - 1)
    bw = prop(openslide.PROPERTY_NAME_BOUNDS_WIDTH)
    bh = prop(openslide.PROPERTY_NAME_BOUNDS_HEIGHT)
    bw = min(bw, w0 - bx) if bw else w0 - bx
    bh = min(bh, h0 - by) if bh else h0 - by
    return bx, by, bw, bh


def _icc_profile(osr: openslide.OpenSlide) -> bytes | None:
    """The slide's ICC colour profile as stored in it (Aperio: TIFF tag 34675 of level 0), or None.

    OpenSlide (>= 4.0) reads the bytes verbatim; openslide-python keeps them in ``_profile`` and hands out only a
    parsed copy (``color_profile``), whose re-serialisation need not be byte-identical, so the raw bytes come
    first. A profile that is not an ICC profile (no ``acsp`` header) is dropped: no output should carry it."""
    from wsicodec.format.spec import is_icc_profile

    raw = getattr(osr, "_profile", None)
    if not isinstance(raw, bytes):
        try:
            profile = osr.color_profile
        except Exception:  # OpenSlide could not parse it: nothing a viewer could use either
            return None
        raw = profile.tobytes() if profile is not None else None
    return raw if is_icc_profile(raw) else None


class SourceSlide:
    """A slide opened with OpenSlide, with its resolution resolved."""

    def __init__(self, path, source_mpp: float | None = None):
        self.path = Path(path)
        name = self.path.name
        if not self.path.exists():
            raise SlideError(f"slide not found: {self.path}")
        if not self.path.is_file():
            raise SlideError(f"not a file: {self.path}")
        given_mpp = None
        if source_mpp is not None:
            given_mpp = _positive_float(source_mpp)
            if given_mpp is None:
                raise SlideError(f"--source-mpp must be a positive number of µm per pixel, got {source_mpp!r}")
        self._lock = threading.Lock()
        self._generation = 0
        self._osr = self._open()

        props = self._osr.properties
        self.properties: dict[str, str] = {str(k): str(v) for k, v in props.items()}
        self.dimensions: tuple[int, int] = tuple(int(v) for v in self._osr.dimensions)
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.objective_power: float | None = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

        if given_mpp is not None:
            self.mpp, self.mpp_source = given_mpp, "--source-mpp"
        else:
            mx = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
            my = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
            found = [v for v in (mx, my) if v is not None]
            if found:
                self.mpp, self.mpp_source = sum(found) / len(found), "openslide.mpp-x/y"
            elif self.objective_power is not None:
                self.mpp, self.mpp_source = 10.0 / self.objective_power, "openslide.objective-power"
            else:
                self.close()
                raise SlideError(
                    f"{name} records no resolution (no openslide.mpp-x/y, no openslide.objective-power); "
                    "pass --source-mpp MPP"
                )

        # level-0 (x, y, w, h) of the area that gets archived
        self.bounds: tuple[int, int, int, int] = bounds_from_properties(self.properties, self.dimensions)
        self.icc_profile: bytes | None = _icc_profile(self._osr)

    # -- handle management ---------------------------------------------------------------------
    def _open(self) -> openslide.OpenSlide:
        name = self.path.name
        try:
            return openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{name}: OpenSlide cannot open this file (not a slide format it knows)") from None
        except openslide.OpenSlideError as e:
            raise SlideError(f"{name}: OpenSlide failed to open it: {_one_line(e)}") from None
        except OSError as e:
            raise SlideError(f"{name}: cannot read: {_one_line(e)}") from None

    def _read_region(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """read_region that reopens a broken handle once (OpenSlide handles stay broken after an error)."""
        osr, gen = self._osr, self._generation
        if osr is None:
            raise SlideError(f"{self.path.name}: slide is closed")
        try:
            return osr.read_region(loc, level, size)
        except openslide.OpenSlideError as first:
            with self._lock:
                if self._generation == gen:  # nobody else has reopened it yet
                    try:
                        old, self._osr = self._osr, self._open()
                    except SlideError:
                        raise SlideError(
                            f"{self.path.name}: read failed at level {level} {loc}: {_one_line(first)}"
                        ) from None
                    self._generation += 1
                    # other threads may still be inside read_region on the old handle; let GC close it
                    del old
                osr = self._osr
            try:
                return osr.read_region(loc, level, size)
            except openslide.OpenSlideError as e:
                raise SlideError(f"{self.path.name}: read failed at level {level} {loc}: {_one_line(e)}") from None

    def close(self) -> None:
        osr, self._osr = getattr(self, "_osr", None), None
        if osr is not None:
            osr.close()

    def __enter__(self) -> "SourceSlide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SourceSlide({str(self.path)!r}, mpp={self.mpp:.4g} from {self.mpp_source})"

    # -- geometry ------------------------------------------------------------------------------
    def _level_for(self, level0_per_px: float) -> int:
        """Coarsest level whose pixels are at most ``level0_per_px`` level-0 pixels wide (with tolerance)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= level0_per_px * (1 + MPP_TOLERANCE) and ds >= self.level_downsamples[best]:
                best = i
        return best

    def grid(self, target_mpp: float = 0.5, tile_size: int = 256) -> TileGrid:
        target = _positive_float(target_mpp)
        if target is None:
            raise SlideError(f"--mpp must be a positive number of µm per pixel, got {target_mpp!r}")
        if int(tile_size) != tile_size or tile_size < 8:
            raise SlideError(f"tile size must be an integer >= 8, got {tile_size!r}")
        tile_size = int(tile_size)
        want = target / self.mpp  # level-0 pixels per archived pixel
        level = self._level_for(want)
        ds = self.level_downsamples[level]
        scale = ds if abs(ds / want - 1) <= MPP_TOLERANCE else want
        bx, by, bw, bh = self.bounds
        width = max(1, int(round(bw / scale)))
        height = max(1, int(round(bh / scale)))
        return TileGrid(
            tile_size=tile_size,
            width=width,
            height=height,
            rows=-(-height // tile_size),
            cols=-(-width // tile_size),
            target_mpp=target,
            source_mpp=float(self.mpp),
            objective_power=self.objective_power,
            level=level,
            origin_x=bx,
            origin_y=by,
            scale=float(scale),
        )

    # -- pixels --------------------------------------------------------------------------------
    def _read_area(self, level: int, origin: tuple[int, int], scale: float,
                   box: tuple[int, int, int, int]) -> np.ndarray:
        """RGB of archived-pixel ``box`` (x, y, w, h) of an image with ``origin`` and ``scale``, read at ``level``."""
        x, y, w, h = box
        ds = self.level_downsamples[level]
        f = scale / ds  # level pixels per output pixel
        # box in level pixels (fractional)
        lx = (origin[0] + x * scale) / ds
        ly = (origin[1] + y * scale) / ds
        if abs(f - 1.0) <= 1e-9 or abs(scale - ds) <= 1e-9:
            # 1:1: the level's own pixels, snapped to the level grid
            ix, iy = int(round(lx)), int(round(ly))
            img = self._read_region((int(round(ix * ds)), int(round(iy * ds))), level, (w, h))
            return _rgba_to_rgb(img)
        k = int(round(f))
        if k >= 2 and abs(f - k) <= 1e-9 and abs(lx - round(lx)) <= 1e-6 and abs(ly - round(ly)) <= 1e-6:
            # an aligned integer factor (40x read at 20x): PIL's reduce is the same mean, 4x faster
            ix, iy = int(round(lx)), int(round(ly))
            img = self._read_region((int(round(ix * ds)), int(round(iy * ds))), level, (w * k, h * k))
            return np.asarray(_on_white(img).reduce(k), dtype=np.uint8)
        lw, lh = w * f, h * f
        ix0, iy0 = int(math.floor(lx)), int(math.floor(ly))
        ix1, iy1 = int(math.ceil(lx + lw - 1e-9)), int(math.ceil(ly + lh - 1e-9))
        img = self._read_region((int(round(ix0 * ds)), int(round(iy0 * ds))), level, (ix1 - ix0, iy1 - iy0))
        rgb = _on_white(img)
        sub = (lx - ix0, ly - iy0, lx - ix0 + lw, ly - iy0 + lh)
        if f > 1:
            out = rgb.resize((w, h), Image.BOX, box=sub)
        else:  # finer than the slide: interpolate rather than replicate
            out = rgb.resize((w, h), Image.BILINEAR, box=sub)
        return np.asarray(out, dtype=np.uint8)

    def read_tile(self, grid: TileGrid, row: int, col: int, margin: int = 0,
                  fill: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
        """One tile as uint8 (t + 2 margin, t + 2 margin, 3). Thread-safe.

        ``margin`` archived pixels of the neighbours come with it on every side (an encoder then sees the
        tile's context); whatever lies past the archived image is ``fill`` (the slide's glass)."""
        t, m = grid.tile_size, int(margin)
        size = t + 2 * m
        x0, y0 = col * t - m, row * t - m
        cx0, cy0 = max(0, x0), max(0, y0)
        cx1, cy1 = min(grid.width, x0 + size), min(grid.height, y0 + size)
        box = (cx0, cy0, cx1 - cx0, cy1 - cy0)
        rgb = self._read_area(grid.level, (grid.origin_x, grid.origin_y), grid.scale, box)
        if box == (x0, y0, size, size):
            return rgb
        out = np.empty((size, size, 3), dtype=np.uint8)
        out[:] = np.asarray(fill, dtype=np.uint8)
        out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = rgb
        return out

    def read_tiles(self, grid: TileGrid, coords: Iterable[tuple[int, int]], workers: int = 2, margin: int = 0,
                   fill: tuple[int, int, int] = (255, 255, 255)) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """Read tiles with a thread pool, yielding ((row, col), tile) in the order of ``coords``.

        At most ``2 * workers`` tiles are in flight, so memory stays bounded however long ``coords`` is.
        """
        workers = max(1, int(workers))
        it = iter(coords)
        pending: deque = deque()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsicodec-read")
        try:
            for rc in it:
                pending.append((rc, pool.submit(self.read_tile, grid, rc[0], rc[1], margin, fill)))
                if len(pending) >= 2 * workers:
                    rc0, fut = pending.popleft()
                    yield (rc0[0], rc0[1]), fut.result()
            while pending:
                rc0, fut = pending.popleft()
                yield (rc0[0], rc0[1]), fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB uint8 of exactly the archived area (the bounds), longest side at most ``max_size``."""
        bx, by, bw, bh = self.bounds
        f = max(1.0, max(bw, bh) / float(max_size))  # level-0 px per thumbnail px
        tw, th = max(1, int(round(bw / f))), max(1, int(round(bh / f)))
        fx = bw / tw  # exact so the thumbnail spans the bounds
        level = self._level_for(fx)
        ds = self.level_downsamples[level]
        block = max(1, int(_THUMB_READ_SIDE // max(1.0, fx / ds)))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        for y in range(0, th, block):
            for x in range(0, tw, block):
                w, h = min(block, tw - x), min(block, th - y)
                out[y:y + h, x:x + w] = self._read_area(level, (bx, by), fx, (x, y, w, h))
        return out

    def associated_images(self) -> dict[str, np.ndarray]:
        """{name: RGB uint8} for "label", "macro" and "thumbnail" where the slide has them."""
        osr = self._osr
        if osr is None:
            raise SlideError(f"{self.path.name}: slide is closed")
        out = {}
        for name in ("label", "macro", "thumbnail"):
            if name in osr.associated_images:
                try:
                    out[name] = _rgba_to_rgb(osr.associated_images[name])
                except openslide.OpenSlideError:
                    continue  # a damaged associated image is not worth failing the archive over
        return out
