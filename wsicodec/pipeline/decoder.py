"""Decoding a container's tiles: dequantise -> decode with a halo of neighbouring latents -> crop.

    dec = TileDecoder(container, model, halo=HALO, cache_tiles=256, batch_size=8)
    dec.tile(row, col) -> uint8 (t, t, 3)        # decoded once, then from an LRU cache
    dec.tiles(coords) -> list of uint8 tiles      # missing ones decoded in batches
    dec.strips() -> iterator of uint8 (t, width, 3) tile rows, top to bottom (for the TIFF writer)
    pyr = Pyramid(dec)                            # the same levels the TIFF has, on demand
    pyr.region(level, x, y, w, h) -> uint8 (h, w, 3) in level pixels; white outside the image
    open_container(path) / load_decoder_model(container, override, device, force)

Why a halo: a decoder's output pixel depends on latents well past its own tile, so decoding a
tile's latents alone changes the pixels near its border (visible seams). Each tile is decoded
together with ``halo`` latent cells of its neighbours on every side (the stored latents, or the
container's white-tile encoding past the mosaic or in background tiles) and the halo's pixels are
cropped away. ``benchmarks/bench_seams.py`` measured the seam ratio against the halo; see
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


# =========================================================================== tile decoding
class TileDecoder:
    """Decodes a container's output tiles (grid tiles at the archive resolution) on demand."""

    def __init__(self, container, model, *, halo: int = HALO, cache_tiles: int = 256, batch_size: int = 8):
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
        self.halo = int(halo)
        self.batch_size = max(1, int(batch_size))
        self.tissue = np.asarray(container.tissue, dtype=bool)
        self.quantizer = container.quantizer
        self.cache_tiles = max(0, int(cache_tiles))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.RLock()
        self.decoded = 0  # tiles run through the decoder (cache misses), for stats and tests
        self._white = np.full((self.tile_size, self.tile_size, 3), WHITE, np.uint8)
        self._white.setflags(write=False)

    # ------------------------------------------------------------------ what is where
    @property
    def rows(self) -> int:
        return int(self.grid.rows)

    @property
    def cols(self) -> int:
        return int(self.grid.cols)

    def is_background(self, row: int, col: int) -> bool:
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            return True
        return not bool(self.tissue[row, col])

    # ------------------------------------------------------------------ decoding
    def _decode_latents(self, stored: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Stored (C, n+2H, n+2H) blocks -> decoded tiles (t, t, 3), halo cropped, in batches."""
        out: list[np.ndarray] = []
        crop = self.halo * self.factor
        t = self.tile_size
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

    def decode(self, coords: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Decode tissue tiles (no cache involved); background tiles come back white."""
        todo = [(i, rc) for i, rc in enumerate(coords) if not self.is_background(*rc)]
        result: list[np.ndarray] = [self._white] * len(coords)
        if todo:
            tiles = self._decode_latents([self._latents_for(*rc) for _, rc in todo])
            for (i, _), tile in zip(todo, tiles):
                result[i] = tile
            self.decoded += len(todo)
        return result

    def tiles(self, coords: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Tiles at ``coords`` (row, col), from the cache where possible; misses decoded in batches."""
        coords = [(int(r), int(c)) for r, c in coords]
        with self._lock:
            result: dict[tuple[int, int], np.ndarray] = {}
            missing = []
            for rc in dict.fromkeys(coords):
                if self.is_background(*rc):
                    result[rc] = self._white
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

    def strips(self, on_tiles: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        """Level 0 as tile rows (t, width, 3), top to bottom; the cache is bypassed.

        One ``read_latents`` call fetches a whole row of tiles plus its halo. ``on_tiles(n)`` is
        called as tiles finish (for a progress bar).
        """
        t, n, h = self.tile_size, self.cells, self.halo
        width, height = int(self.grid.width), int(self.grid.height)
        for row in range(self.rows):
            strip = np.full((min(t, height - row * t), width, 3), WHITE, np.uint8)
            cols = [c for c in range(self.cols) if not self.is_background(row, c)]
            if cols:
                c0, c1 = cols[0], cols[-1] + 1
                band = self._read(row * n - h, c0 * n - h, (row + 1) * n + h, c1 * n + h)
                for i in range(0, len(cols), self.batch_size):
                    chunk = cols[i : i + self.batch_size]
                    stored = [band[:, :, (c - c0) * n : (c - c0 + 1) * n + 2 * h] for c in chunk]
                    for c, tile in zip(chunk, self._decode_latents(stored)):
                        x0 = c * t
                        w = min(t, width - x0)
                        strip[:, x0 : x0 + w] = tile[: strip.shape[0], :w]
                    self.decoded += len(chunk)
                    if on_tiles:
                        on_tiles(len(chunk))
            if on_tiles and len(cols) < self.cols:
                on_tiles(self.cols - len(cols))
            yield strip


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
                if self._all_background(level, *rc):
                    out[rc] = self.decoder._white
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
