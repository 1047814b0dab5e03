"""Streaming writer for Aperio-layout pyramidal BigTIFF files.

Layout (what OpenSlide's ``aperio`` driver and Bio-Formats' SVS reader both expect):

    IFD 0   level 0, tiled, Aperio ImageDescription ``...|AppMag = 20|MPP = 0.5``; the source's ICC
            profile (tag 34675, InterColorProfile), where it had one: OpenSlide reads it from IFD 0
    IFD 1   thumbnail, stripped
    IFD 2.. reduced levels (each halving the previous one), tiled, own Aperio description,
            NewSubfileType 0 (Bio-Formats takes any IFD with NewSubfileType != 0 for label/macro)
    then    label (stripped, NewSubfileType 1) and macro (stripped, NewSubfileType 9)

Memory stays bounded by one strip (``tile_size`` rows) of the widest level: level 0 arrives as an
iterator of strips; each level is downsampled into a raw temporary file on disk while it is written,
and the next level is streamed back from that file, so no level is ever held in RAM.

Each reduced pixel is ``(a + b + c + d + 2) // 4`` of the 2x2 block above it (level sizes are
floored), the same rule :func:`downsample2` applies for :class:`wsicodec.reader.PzarrSlide`, so a
lossless TIFF and the on-demand reader agree pixel for pixel.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tifffile

from wsicodec._io import atomic_output, partial_name, remove_path, remove_stale_partials
from wsicodec._version import __version__

COMPRESSIONS = ("jpeg", "deflate", "lzw", "zstd")
# what tifffile calls them; all are TIFF codecs that OpenSlide's libtiff decodes
_TIFFFILE_CODEC = {"jpeg": "jpeg", "deflate": "adobe_deflate", "lzw": "lzw", "zstd": "zstd"}
# stop halving once the long side is at most this (Aperio's smallest level is about this size)
MIN_LEVEL_SIDE = 1000
THUMBNAIL_SIDE = 1024
WHITE = 255
_WORKERS = max(1, min(4, os.cpu_count() or 1))


def level_dimensions(width: int, height: int, min_side: int = MIN_LEVEL_SIDE) -> list[tuple[int, int]]:
    """(w, h) per pyramid level: level 0, then floored halvings until the long side is <= min_side."""
    dims = [(int(width), int(height))]
    while max(dims[-1]) > min_side and min(dims[-1]) >= 2:
        w, h = dims[-1]
        dims.append((w // 2, h // 2))
    return dims


def downsample2(block: np.ndarray) -> np.ndarray:
    """Halve a uint8 (h, w, 3) block by rounded 2x2 averaging; an odd last row/column is dropped."""
    h, w = block.shape[0] // 2 * 2, block.shape[1] // 2 * 2
    b = block[:h, :w]
    # in place on one quarter-size uint16 array: a strip of a wide slide stays cheap
    s = b[0::2, 0::2].astype(np.uint16)
    s += b[1::2, 0::2]
    s += b[0::2, 1::2]
    s += b[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


@dataclass
class AperioInfo:
    """What goes into the Aperio descriptions."""

    mpp: float
    app_mag: float | None = None
    extra: dict[str, str] | None = None  # further ``key = value`` pairs for level 0's description

    def fields(self) -> str:
        parts = []
        if self.app_mag:
            parts.append(f"AppMag = {self.app_mag:g}")
        parts.append(f"MPP = {self.mpp:.4g}")
        for key, value in (self.extra or {}).items():
            # '|' and '=' separate Aperio fields; keep values from breaking the syntax
            value = str(value).replace("|", "/").replace("\r", " ").replace("\n", " ")
            parts.append(f"{key} = {value}")
        return "|".join(parts)


class _ThumbAccumulator:
    """Builds a small overview (block means of F x F pixels) from the strips of level 0."""

    def __init__(self, width: int, height: int, side: int = THUMBNAIL_SIDE):
        factor = 1
        while max(width, height) / factor > side:
            factor *= 2
        self.factor = factor
        self.out_w = max(1, width // factor)
        self.out_h = max(1, height // factor)
        self._acc = np.zeros((self.out_w, 3), np.uint64)
        self._rows_in_acc = 0
        self.rows: list[np.ndarray] = []

    def add(self, strip: np.ndarray) -> None:
        f = self.factor
        w = self.out_w * f
        cols = strip[:, :w].reshape(strip.shape[0], self.out_w, f, 3).sum(axis=2, dtype=np.uint32)
        for row in cols:  # at most tile_size rows per strip, cheap at thumbnail width
            if len(self.rows) >= self.out_h:
                return
            self._acc += row
            self._rows_in_acc += 1
            if self._rows_in_acc == f:
                self.rows.append(((self._acc + (f * f) // 2) // (f * f)).astype(np.uint8))
                self._acc[:] = 0
                self._rows_in_acc = 0

    def image(self) -> np.ndarray:
        rows = list(self.rows)
        while len(rows) < self.out_h:
            rows.append(np.full((self.out_w, 3), WHITE, np.uint8))
        return np.stack(rows[: self.out_h])


class _RawLevel:
    """A level kept as raw row-major RGB bytes on disk: appended strip by strip, read back strip by strip."""

    def __init__(self, path: Path, width: int, height: int):
        self.path, self.width, self.height = path, width, height
        self._fh = open(path, "wb")
        self.rows_written = 0

    def append(self, rows: np.ndarray) -> None:
        rows = rows[: self.height - self.rows_written, : self.width]
        self._fh.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
        self.rows_written += rows.shape[0]

    def finish(self) -> None:
        if self.rows_written < self.height:  # can only happen if level 0 ended early
            pad = np.full((self.height - self.rows_written, self.width, 3), WHITE, np.uint8)
            self._fh.write(pad.tobytes())
            self.rows_written = self.height
        self._fh.close()

    def strips(self, strip_rows: int) -> Iterator[np.ndarray]:
        row_bytes = self.width * 3
        with open(self.path, "rb") as fh:
            for y in range(0, self.height, strip_rows):
                n = min(strip_rows, self.height - y)
                buf = fh.read(n * row_bytes)
                yield np.frombuffer(buf, np.uint8).reshape(n, self.width, 3)
        self.path.unlink(missing_ok=True)


def _tiles_of(
    strips: Iterable[np.ndarray],
    width: int,
    height: int,
    tile: int,
    sinks: list[Callable[[np.ndarray], None]],
) -> Iterator[np.ndarray]:
    """Row-major (tile, tile, 3) tiles from strips of ``tile`` rows; every strip also goes to ``sinks``."""
    y = 0
    for strip in strips:
        if y >= height:
            break
        strip = strip[: height - y, :width]
        for sink in sinks:
            sink(strip)
        for x in range(0, width, tile):
            t = strip[:, x : x + tile]
            if t.shape[0] != tile or t.shape[1] != tile:
                padded = np.full((tile, tile, 3), WHITE, np.uint8)
                padded[: t.shape[0], : t.shape[1]] = t
                t = padded
            yield t
        y += strip.shape[0]
    if y < height:
        raise RuntimeError(f"level ended after {y} of {height} rows")


def _codec_args(compression: str, quality: int) -> dict:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if compression == "jpeg":
        # fresh dict each call: tifffile mutates compressionargs
        return {"compression": "jpeg", "compressionargs": {"level": int(quality)}, "photometric": "rgb"}
    args = {"compression": _TIFFFILE_CODEC[compression], "photometric": "rgb", "predictor": True}
    return args


@contextmanager
def _levels_folder(out_path: Path) -> Iterator[Path]:
    """A folder beside the output for the raw reduced levels, named as a partial so that a killed
    run's folder is removed by the next run, like its partial TIFF."""
    remove_stale_partials(out_path, "levels")
    folder = partial_name(out_path, "levels")
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        remove_path(folder)


def write_aperio_pyramid(
    out_path: str | os.PathLike,
    strips: Iterable[np.ndarray],
    width: int,
    height: int,
    info: AperioInfo,
    *,
    tile_size: int = 256,
    associated: dict[str, np.ndarray] | None = None,
    compression: str = "jpeg",
    quality: int = 90,
    min_side: int = MIN_LEVEL_SIDE,
    on_level: Callable[[int, tuple[int, int]], None] | None = None,
    overwrite: bool = True,
    icc_profile: bytes | None = None,
) -> list[tuple[int, int]]:
    """Write the pyramid to ``out_path`` (via a temporary name, renamed at the end).

    ``strips`` yields level 0 top to bottom as uint8 (rows, >= width, 3) arrays of ``tile_size``
    rows (the last may be shorter). ``associated`` may hold "label" and "macro" (a "thumbnail"
    there is ignored: the thumbnail is made from the pyramid itself). ``icc_profile``: the colour profile
    of the pyramid's pixels, written into every level and the thumbnail (tag 34675; the label and macro are
    the source's own images and keep none). Returns the level sizes.
    """
    out_path = Path(out_path)
    if tile_size % 16:
        raise ValueError("TIFF tile size must be a multiple of 16")
    _codec_args(compression, quality)  # validate before creating anything
    dims = level_dimensions(width, height, min_side)
    associated = associated or {}
    head = f"Aperio Image Library wsicodec {__version__}\r\n"
    codec_name = "JPEG/RGB Q=%d" % quality if compression == "jpeg" else compression.upper() + "/RGB"

    def resolution(downsample: float) -> dict:
        px_per_cm = 1e4 / (info.mpp * downsample)
        return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}

    thumb = _ThumbAccumulator(width, height)
    with atomic_output(out_path, overwrite=overwrite) as tmp_out:
        with _levels_folder(out_path) as tmpdir:
            with tifffile.TiffWriter(tmp_out, bigtiff=True) as tw:
                source: Iterable[np.ndarray] = strips
                for level, (w, h) in enumerate(dims):
                    sinks: list[Callable[[np.ndarray], None]] = []
                    if level == 0:
                        sinks.append(thumb.add)
                    nxt = None
                    if level + 1 < len(dims):
                        nw, nh = dims[level + 1]
                        nxt = _RawLevel(Path(tmpdir) / f"level{level + 1}.raw", nw, nh)
                        sinks.append(lambda s, nxt=nxt: nxt.append(downsample2(s)))
                    if level == 0:
                        desc = (
                            f"{head}{w}x{h} [0,0 {w}x{h}] ({tile_size}x{tile_size}) {codec_name}|{info.fields()}"
                        )
                    else:
                        desc = f"{head}{width}x{height} -> {w}x{h} - |{AperioInfo(info.mpp, info.app_mag).fields()}"
                    tw.write(
                        _tiles_of(source, w, h, tile_size, sinks),
                        shape=(h, w, 3),
                        dtype=np.uint8,
                        tile=(tile_size, tile_size),
                        description=_ascii(desc),
                        subfiletype=0,
                        metadata=None,
                        software=False,
                        # tifffile buffers this many bytes of tiles to compress them in parallel
                        # (512 MiB by default): one row of tiles keeps memory independent of slide size
                        maxworkers=_WORKERS,
                        buffersize=max(8, -(-w // tile_size)) * tile_size * tile_size * 3,
                        **resolution(width / w if level else 1.0),
                        **_codec_args(compression, quality),
                        iccprofile=icc_profile,
                    )
                    if on_level is not None:
                        on_level(level, (w, h))
                    if level == 0:
                        img = thumb.image()
                        desc = f"{head}{width}x{height} -> {img.shape[1]}x{img.shape[0]} - "
                        _write_stripped(tw, img, desc, 0, compression, quality, icc_profile)
                    if nxt is not None:
                        nxt.finish()
                        source = nxt.strips(tile_size)
                for name, subtype in (("label", 1), ("macro", 9)):
                    img = associated.get(name)
                    if img is None:
                        continue
                    img = _as_rgb(img)
                    desc = f"{head}{name} {img.shape[1]}x{img.shape[0]}"
                    # labels carry barcodes and text: keep them lossless
                    _write_stripped(tw, img, desc, subtype, "lzw" if name == "label" else compression, quality)
    return dims


def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        a = img[..., 3:4].astype(np.uint16)
        img = ((img[..., :3].astype(np.uint16) * a + WHITE * (255 - a) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


def _write_stripped(tw: tifffile.TiffWriter, img: np.ndarray, desc: str, subtype: int, compression: str, quality: int,
                    icc_profile: bytes | None = None):
    tw.write(
        img,
        rowsperstrip=16,
        description=_ascii(desc),
        subfiletype=subtype,
        metadata=None,
        software=False,
        iccprofile=icc_profile,
        **_codec_args(compression, quality),
    )
