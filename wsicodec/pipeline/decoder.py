"""Decoding a container's tiles: dequantise -> decode with a halo of neighbouring latents -> crop.

    dec = TileDecoder(container, model, halo=None, blend=None, cache_tiles=256, batch_size=8)  # None: the container's
    dec.tile(row, col) -> uint8 (t, t, 3)        # decoded once, then from an LRU cache
    dec.tiles(coords) -> list of uint8 tiles      # missing ones decoded in batches
    dec.strips() -> iterator of uint8 (t, width, 3) tile rows, top to bottom (for the TIFF writer)
    pyr = Pyramid(dec)                            # the same levels the TIFF has, on demand
    pyr.region(level, x, y, w, h) -> uint8 (h, w, 3) in level pixels; white outside the image
    open_container(path) / load_decoder_model(container, override, device, force)

Why a halo: a decoder's output pixel depends on latents well past its own tile, so decoding a
tile's latents alone changes the pixels near its border (visible seams). Each tile is decoded
together with ``halo`` latent cells of its neighbours on every side (the stored latents, or the
container's glass-tile encoding past the mosaic or in background tiles) and the halo's pixels are
cropped away; with a blend band b, neighbouring tiles' decodes are cross-faded over 2b px instead. ``benchmarks/bench_seams.py`` measured the seam ratio against the halo; see
docs/restore.md.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from wsicodec.errors import ContainerError, ModelError, WsicodecError
from wsicodec.pipeline.tiff import downsample2, level_dimensions
# Halo in latent cells on each side. TAEF2 on CMU-1 (benchmarks/bench_seams.py), seam ratio / PSNR:
# 0: 1.71 / 25.84 dB, 1: 1.25 / 25.35, 2: 1.105 / 24.96, 3: 1.073 / 24.75, 4: 1.056 / 24.64.
# 3 is the smallest halo with a clear margin under 1.1; each cell more costs decode time and PSNR.
HALO = 3
WHITE = 255


def container_blend(container) -> int:
    """Pixels over which neighbouring tiles' decodes are cross-faded (format 1.1 records the model's); 0 in
    containers that record none, which then restore exactly as they always did."""
    rec = ((getattr(container, "attrs", None) or {}).get("encoding") or {}).get("decode_blend_px")
    return rec if type(rec) is int and 0 <= rec <= 256 else 0  # a JSON integer: not true, not 3.0


def blend_profile(tile_size: int, blend: int) -> np.ndarray:
    """Weight of a tile's decode over its extended extent [-blend, t + blend): a linear ramp from 0 to 1
    across each border band of 2 * blend px, 1 inside. Neighbours' ramps sum to 1 across every border."""
    u = np.arange(-blend, tile_size + blend, dtype=np.float64)
    return np.clip(np.minimum(u + blend, tile_size + blend - u) / (2 * blend), 0.0, 1.0).astype(np.float32)


def container_halo(container) -> int:
    """The halo a container asks for (format 1.1 records the model's), else the 1.0 default of 3 cells,
    so containers written before the halo was recorded restore exactly as they always did."""
    rec = ((getattr(container, "attrs", None) or {}).get("encoding") or {}).get("decode_halo_cells")
    return rec if type(rec) is int and 0 <= rec <= 64 else HALO  # a JSON integer: not true, not 3.0


# =========================================================================== tile decoding
class TileDecoder:
    """Decodes a container's output tiles (grid tiles at the archive resolution) on demand."""

    def __init__(self, container, model, *, halo: int | None = None, cache_tiles: int = 256, batch_size: int = 8,
                 blend: int | None = None):
        self.container = container
        self.model = model
        self.grid = container.grid
        self.tile_size = int(self.grid.tile_size)
        self.factor = int(model.info.spatial_factor)
        if self.tile_size % self.factor:
            raise ContainerError(
                f"tile size {self.tile_size} is not a multiple of the model's spatial factor {self.factor}"
            )
        self.cells = self.tile_size // self.factor  # latent cells per tile side
        self.halo = int(halo) if halo is not None else container_halo(container)
        # decodes of neighbouring tiles overlap by 2 * blend px and are cross-faded there, so a model whose
        # output depends on its whole window (GroupNorm) shows no step at tile borders
        self.blend = int(blend) if blend is not None else container_blend(container)
        if not 0 <= self.blend <= self.halo * self.factor or 2 * self.blend > self.tile_size:
            raise ContainerError(f"blend of {self.blend} px needs a halo of at least {self.blend} px and at most "
                                 f"half a tile (halo {self.halo * self.factor} px, tile {self.tile_size} px)")
        self._profile = blend_profile(self.tile_size, self.blend) if self.blend else None
        self._raw_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.batch_size = max(1, int(batch_size))
        self.tissue = np.asarray(container.tissue, dtype=bool)
        self.quantizer = container.quantizer
        self.cache_tiles = max(0, int(cache_tiles))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.RLock()
        self.decoded = 0  # tiles run through the decoder (cache misses), for stats and tests
        self._white = np.full((self.tile_size, self.tile_size, 3), WHITE, np.uint8)
        self._white.setflags(write=False)
        # background tiles inside the image come back as the slide's glass (white in 1.0 containers);
        # past the image's edge stays white, as the TIFF writer pads
        self.glass = tuple(getattr(container, "glass_paint_rgb", None) or getattr(container, "glass_rgb", (WHITE,) * 3))
        self._glass = np.empty((self.tile_size, self.tile_size, 3), np.uint8)
        self._glass[:] = np.asarray(self.glass, np.uint8)
        self._glass.setflags(write=False)

    # ------------------------------------------------------------------ what is where
    @property
    def rows(self) -> int:
        return int(self.grid.rows)

    @property
    def cols(self) -> int:
        return int(self.grid.cols)

    def blank(self, row: int, col: int) -> np.ndarray:
        """What a background tile shows: glass inside the image, white past its edge."""
        return self._glass if (0 <= row < self.rows and 0 <= col < self.cols) else self._white

    def is_background(self, row: int, col: int) -> bool:
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            return True
        return not bool(self.tissue[row, col])

    # ------------------------------------------------------------------ decoding
    def _decode_latents(self, stored: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Stored (C, n+2H, n+2H) blocks -> decoded tiles (t+2b, t+2b, 3), halo cropped to the blend band b."""
        out: list[np.ndarray] = []
        crop = self.halo * self.factor - self.blend
        t = self.tile_size + 2 * self.blend
        for i in range(0, len(stored), self.batch_size):
            batch = np.stack(stored[i : i + self.batch_size])
            z = self.quantizer.dequantize(batch)
            px = self.model.decode(z)  # (N, (n+2H)*f, (n+2H)*f, 3) uint8
            for tile in px:
                out.append(np.ascontiguousarray(tile[crop : crop + t, crop : crop + t]))
        return out

    def _read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        try:
            return self.container.read_latents(r0, c0, r1, c1)
        except WsicodecError:
            raise
        except Exception as exc:  # a truncated or corrupt shard surfaces only when read
            msg = " ".join(str(exc).split()) or type(exc).__name__
            raise ContainerError(f"damaged container: cannot read latents {r0}:{r1}, {c0}:{c1} ({msg})") from None

    def _latents_for(self, row: int, col: int) -> np.ndarray:
        n, h = self.cells, self.halo
        return self._read(row * n - h, col * n - h, (row + 1) * n + h, (col + 1) * n + h)

    def _raw(self, coords: Sequence[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """Each tissue tile's own decode (extended by the blend band), from the raw cache or decoded now."""
        out: dict[tuple[int, int], np.ndarray] = {}
        missing = []
        for rc in dict.fromkeys(coords):
            if self.is_background(*rc):
                continue
            if rc in self._raw_cache:
                self._raw_cache.move_to_end(rc)
                out[rc] = self._raw_cache[rc]
            else:
                missing.append(rc)
        if missing:
            for rc, tile in zip(missing, self._decode_latents([self._latents_for(*rc) for rc in missing])):
                out[rc] = tile
                if self.cache_tiles:
                    self._raw_cache[rc] = tile
            while len(self._raw_cache) > max(self.cache_tiles, 0) * 2:
                self._raw_cache.popitem(last=False)
            self.decoded += len(missing)
        return out

    def _compose(self, row: int, col: int, raw: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
        """Tile (row, col) from its own decode and, within the blend band, its tissue neighbours' decodes."""
        t, b = self.tile_size, self.blend
        own = raw[(row, col)]
        if not b:
            return own
        prof = self._profile
        acc = np.zeros((t, t, 3), np.float32)
        wsum = np.zeros((t, t, 1), np.float32)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                ext = raw.get((row + dr, col + dc))
                if ext is None:  # glass or past the edge: the tile's own decode stands alone there
                    continue
                # our pixel y maps to index y - dr*t + b of the neighbour's extended decode
                y0, y1 = max(0, dr * t - b), min(t, dr * t + t + b)
                x0, x1 = max(0, dc * t - b), min(t, dc * t + t + b)
                if y1 <= y0 or x1 <= x0:
                    continue
                ey, ex = slice(y0 - dr * t + b, y1 - dr * t + b), slice(x0 - dc * t + b, x1 - dc * t + b)
                w = prof[ey][:, None, None] * prof[ex][None, :, None]
                acc[y0:y1, x0:x1] += w * ext[ey, ex]
                wsum[y0:y1, x0:x1] += w
        return np.clip(np.rint(acc / np.maximum(wsum, 1e-12)), 0, 255).astype(np.uint8)

    def _neighbourhood(self, coords: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        if not self.blend:
            return list(coords)
        return [(r + dr, c + dc) for r, c in coords for dr in (-1, 0, 1) for dc in (-1, 0, 1)]

    def decode(self, coords: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Decode tiles (background tiles come back as glass); neighbours are decoded as blending needs."""
        tissue = [rc for rc in coords if not self.is_background(*rc)]
        raw = self._raw(self._neighbourhood(tissue)) if tissue else {}
        return [self.blank(*rc) if self.is_background(*rc) else self._compose(*rc, raw) for rc in coords]

    def tiles(self, coords: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Tiles at ``coords`` (row, col), from the cache where possible; misses decoded in batches."""
        coords = [(int(r), int(c)) for r, c in coords]
        with self._lock:
            result: dict[tuple[int, int], np.ndarray] = {}
            missing = []
            for rc in dict.fromkeys(coords):
                if self.is_background(*rc):
                    result[rc] = self.blank(*rc)
                elif rc in self._cache:
                    self._cache.move_to_end(rc)
                    result[rc] = self._cache[rc]
                else:
                    missing.append(rc)
            for rc, tile in zip(missing, self.decode(missing)):
                tile.setflags(write=False)
                result[rc] = tile
                if self.cache_tiles:
                    self._cache[rc] = tile
                    while len(self._cache) > self.cache_tiles:
                        self._cache.popitem(last=False)
            return [result[rc] for rc in coords]

    def tile(self, row: int, col: int) -> np.ndarray:
        return self.tiles([(row, col)])[0]

    def _raw_row(self, row: int) -> dict[tuple[int, int], np.ndarray]:
        """Own decodes of one row's tissue tiles; one read_latents call for the row and its halo."""
        if not 0 <= row < self.rows:
            return {}
        n, h = self.cells, self.halo
        cols = [c for c in range(self.cols) if not self.is_background(row, c)]
        out: dict[tuple[int, int], np.ndarray] = {}
        if not cols:
            return out
        c0, c1 = cols[0], cols[-1] + 1
        band = self._read(row * n - h, c0 * n - h, (row + 1) * n + h, c1 * n + h)
        for i in range(0, len(cols), self.batch_size):
            chunk = cols[i : i + self.batch_size]
            stored = [band[:, :, (c - c0) * n : (c - c0 + 1) * n + 2 * h] for c in chunk]
            out.update(zip([(row, c) for c in chunk], self._decode_latents(stored)))
        self.decoded += len(cols)
        return out

    def strips(self, on_tiles: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        """Level 0 as tile rows (t, width, 3), top to bottom; the cache is bypassed.

        Each tile row is decoded once; with blending, a row is composed once the next one is decoded too.
        ``on_tiles(n)`` is called as tiles finish (for a progress bar).
        """
        t = self.tile_size
        width, height = int(self.grid.width), int(self.grid.height)
        above: dict[tuple[int, int], np.ndarray] = {}
        here = self._raw_row(0)
        for row in range(self.rows):
            below = self._raw_row(row + 1) if self.blend else {}
            raw = {**above, **here, **below}
            strip = np.empty((min(t, height - row * t), width, 3), np.uint8)
            strip[:] = np.asarray(self.glass, np.uint8)
            for (_, c) in here:
                x0 = c * t
                w = min(t, width - x0)
                strip[:, x0 : x0 + w] = self._compose(row, c, raw)[: strip.shape[0], :w]
            if on_tiles:
                on_tiles(self.cols)
            yield strip
            above, here = (here if self.blend else {}), (below if self.blend else self._raw_row(row + 1))


def prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """Run ``items`` in a background thread, ``depth`` items ahead: decoding (torch, GPU) then overlaps
    with the TIFF's tile compression (imagecodecs), both of which release the GIL."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as exc:  # handed to the consumer, raised there
            put((exc, None))

    thread = threading.Thread(target=work, name="wsicodec-decode", daemon=True)
    thread.start()
    try:
        while True:
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


# =========================================================================== pyramid on demand
class Pyramid:
    """The TIFF's pyramid levels, computed on demand from decoded tiles (same pixels as the TIFF).

    A level-k tile (t x t in level-k pixels) is the rounded 2x2 average of four level-(k-1) tiles;
    reduced tiles are kept in their own LRU cache.
    """

    def __init__(self, decoder: TileDecoder, cache_tiles: int = 256):
        self.decoder = decoder
        self.tile_size = decoder.tile_size
        self.dimensions = level_dimensions(int(decoder.grid.width), int(decoder.grid.height))
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self.cache_tiles = cache_tiles
        self._lock = threading.RLock()

    @property
    def level_count(self) -> int:
        return len(self.dimensions)

    def _inside(self, level: int, i: int, j: int) -> bool:
        """Whether level tile (i, j) lies wholly inside the image: then a blank one is plain glass."""
        lw, lh = self.dimensions[level]
        t = self.tile_size
        return (i + 1) * t <= lh and (j + 1) * t <= lw

    def _outside(self, level: int, i: int, j: int) -> bool:
        lw, lh = self.dimensions[level]
        t = self.tile_size
        return i * t >= lh or j * t >= lw

    def _all_background(self, level: int, i: int, j: int) -> bool:
        span = 1 << level
        block = self.decoder.tissue[i * span : (i + 1) * span, j * span : (j + 1) * span]
        return not block.any()

    def level_tiles(self, level: int, coords: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        if level == 0:
            return self.decoder.tiles(coords)
        t = self.tile_size
        with self._lock:
            out: dict[tuple[int, int], np.ndarray] = {}
            need = []
            for rc in dict.fromkeys(coords):
                key = (level, *rc)
                if self._outside(level, *rc):
                    out[rc] = self.decoder._white
                elif self._all_background(level, *rc) and self._inside(level, *rc):
                    out[rc] = self.decoder._glass
                elif key in self._cache:
                    self._cache.move_to_end(key)
                    out[rc] = self._cache[key]
                else:
                    need.append(rc)
            if need:
                children = sorted({(2 * i + di, 2 * j + dj) for i, j in need for di in (0, 1) for dj in (0, 1)})
                got = dict(zip(children, self.level_tiles(level - 1, children)))
                for i, j in need:
                    block = np.empty((2 * t, 2 * t, 3), np.uint8)
                    for di in (0, 1):
                        for dj in (0, 1):
                            block[di * t : (di + 1) * t, dj * t : (dj + 1) * t] = got[(2 * i + di, 2 * j + dj)]
                    tile = downsample2(block)
                    tile.setflags(write=False)
                    out[(i, j)] = tile
                    self._cache[(level, i, j)] = tile
                    while len(self._cache) > self.cache_tiles:
                        self._cache.popitem(last=False)
            return [out[rc] for rc in coords]

    def region(self, level: int, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (h, w, 3) of ``level`` at level coordinates (x, y) and a bool mask of those inside the image."""
        if not (0 <= level < self.level_count):
            raise WsicodecError(f"level {level} does not exist (the pyramid has levels 0..{self.level_count - 1})")
        lw, lh = self.dimensions[level]
        t = self.tile_size
        out = np.full((h, w, 3), WHITE, np.uint8)
        inside = np.zeros((h, w), bool)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out, inside
        inside[y0 - y : y1 - y, x0 - x : x1 - x] = True
        coords = [(i, j) for i in range(y0 // t, (y1 - 1) // t + 1) for j in range(x0 // t, (x1 - 1) // t + 1)]
        for (i, j), tile in zip(coords, self.level_tiles(level, coords)):
            ty0, tx0 = i * t, j * t
            a0, a1 = max(y0, ty0), min(y1, ty0 + t)
            b0, b1 = max(x0, tx0), min(x1, tx0 + t)
            out[a0 - y : a1 - y, b0 - x : b1 - x] = tile[a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0]
        return out, inside


# =========================================================================== opening
def open_container(path):
    """Container.open with every failure turned into one ContainerError line."""
    from wsicodec.format.container import Container

    p = Path(path)
    if not p.exists():
        raise ContainerError(f"container not found: {p}")
    try:
        return Container.open(p)
    except WsicodecError:
        raise
    except Exception as exc:  # zarr/json/zip errors of a foreign or damaged file
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ContainerError(f"{p.name}: not a readable .pzarr container ({msg})") from None


def load_decoder_model(container, override: str | None = None, device: str | None = None, force: bool = False):
    """The model that decodes ``container``, its decoder weights checked against the container's record."""
    from wsicodec import models

    record = dict(container.model)
    resolve = getattr(models, "resolve_model", None)
    if resolve is not None:
        return resolve(record, override, device=device, verify=not force)
    # fallback while models.resolve_model does not exist: load and compare the decoder hash here
    where = override or record.get("source") or record.get("id")
    try:
        model = models.load_model(where, device=device)
    except WsicodecError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load model {where!r}: {' '.join(str(exc).split())}") from None
    want = record.get("decoder_sha256")
    if want and model.info.decoder_sha256 != want and not force:
        raise ModelError(
            f"decoder weights of {where!r} (sha256 {model.info.decoder_sha256[:12]}…) differ from the ones "
            f"that made this container ({want[:12]}…); pass --force to restore with them anyway"
        )
    return model
