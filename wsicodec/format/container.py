"""The .pzarr container: the only module that knows its layout (formats/pzarr-v1.md specifies it).

Interface:

    with ContainerWriter(out_path, grid=..., model=ModelInfo, quantizer=Quantizer, tissue=bool (rows,cols),
                         background=stored (C,t/f,t/f), source=dict, resolution=dict,
                         associated=dict[str, np.ndarray], overwrite=False, single_file=False) as writer:
        writer.write_tile(row, col, stored)       # stored: (C, t/f, t/f) of quantizer dtype; buffered per shard
    # on clean exit: shards flushed, attributes written, temp name renamed to out_path; on exception: temp removed
    writer.bytes_written                          # bytes of the finished container on disk

    c = Container.open(path)                      # ContainerError for missing/truncated/foreign/unknown major version
    c.attrs (the "pzarr" attribute dict), c.grid (TileGrid), c.model (dict), c.quantizer (Quantizer),
    c.tissue (bool (rows, cols)), c.background (C, t/f, t/f), c.associated_images() -> dict[str, np.ndarray],
    c.read_latents(r0, c0, r1, c1) -> np.ndarray (C, r1-r0, c1-c0) stored values; r*, c* are *latent-cell*
         coordinates (tile (row, col) starts at cell (row*t/f, col*t/f)); cells outside the mosaic or in
         background tiles come back as the container's background (the stored encoding of a white tile)
    c.read_tile(row, col) -> (C, t/f, t/f) stored values;  c.describe() -> dict;  c.disk_bytes() -> int
    c.verify() -> int                             # reads every tissue shard; ContainerError if one is damaged
    stored_tile_bytes(stored: np.ndarray) -> int   # bytes one tile costs in a container (same codec + shard index)
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs.zstd import Zstd
from zarr.codecs import ZstdCodec

from wsicodec.errors import ContainerError, OutputExistsError
from wsicodec.quant.quantizer import Quantizer

FORMAT_NAME = "pzarr"
FORMAT_VERSION = "1.0"
READ_MAJOR = 1

# Measured on TAEF2 latents of CMU-1 (benchmarks/bench_quantizers.py): see formats/pzarr-v1.md.
ZSTD_LEVEL = 3
SHARD_TILES = 16  # a shard holds up to SHARD_TILES x SHARD_TILES tiles
SHARD_INDEX_ENTRY_BYTES = 16  # (offset, nbytes) as two little-endian uint64 per inner chunk
SHARD_INDEX_CHECKSUM_BYTES = 4  # crc32c over the index
CHUNK_KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}
ASSOCIATED_NAMES = ("thumbnail", "label", "macro")
# How associated images are stored (measured on CMU-1-Small-Region: label + macro + thumbnail took 1.61 MB
# as zstd'd RGB arrays, more than the source file; PNG label + JPEG-90 macro and thumbnail take 0.46 MB).
ASSOCIATED_ENCODING = {
    "label": ("PNG", "image/png", {"compress_level": 9}),
    "*": ("JPEG", "image/jpeg", {"quality": 90}),
}
# keys every container has (null where unknown); callers' extra keys are kept
SOURCE_KEYS = ("filename", "size", "sha256", "vendor", "properties")
RESOLUTION_KEYS = ("target_mpp", "source_mpp", "mpp_source", "objective_power", "archived_objective_power")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

_chunk_zstd = Zstd.from_config({"level": ZSTD_LEVEL, "checksum": False})


def stored_tile_bytes(stored: np.ndarray) -> int:
    """Bytes one tile costs inside a shard: its zstd-compressed chunk plus its 16-byte index entry.

    Uses the same codec (numcodecs' zstd, which zarr's ZstdCodec wraps) with the same level and byte
    order as the writer, so summing this over a slide's tissue tiles predicts the shards' size.
    """
    a = np.ascontiguousarray(stored)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if not a.any():  # an all-fill chunk is not stored at all, only its index entry
        return SHARD_INDEX_ENTRY_BYTES
    return len(_chunk_zstd.encode(a.tobytes())) + SHARD_INDEX_ENTRY_BYTES


# ------------------------------------------------------------------------------ helpers
def _to_json(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if hasattr(obj, "to_json"):
        return obj.to_json()
    return dict(obj)


def _plain(x: Any) -> Any:
    """Make a value plain JSON (numpy scalars and tuples from callers' dicts)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _tool_version() -> str:
    try:
        from wsicodec._version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _fsync(path: Path) -> None:
    """Flush one file or directory entry to disk; best effort (some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        _fsync(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Delete leftovers of this output's earlier writers that were killed before they could clean up."""
    prefix = f".{out.name}.partial-"
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].split(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove(p)


def _fsync_dir(path: Path) -> None:
    _fsync(path)


def _pack_zip(src_dir: Path, zip_path: Path) -> None:
    """Pack a finished directory store into one uncompressed zip (its chunks are already zstd)."""
    files = sorted(p for p in src_dir.rglob("*") if p.is_file())
    # metadata first, so a reader streaming the zip meets zarr.json documents before chunk data
    files.sort(key=lambda p: (p.name != "zarr.json", p.relative_to(src_dir).as_posix()))
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for p in files:
            zf.write(p, p.relative_to(src_dir).as_posix())


def _as_rgb(name: str, img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8; grey is repeated, RGBA is composited on white as OpenSlide's users expect."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"associated image {name!r} must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.round(a[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"associated image {name!r} must be (H, W, 3), got {a.shape}")
    return np.ascontiguousarray(a)


def _encode_image(name: str, rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """An associated image as the bytes of a PNG (label: text and barcodes stay exact) or JPEG file."""
    from PIL import Image

    fmt, media, opts = ASSOCIATED_ENCODING.get(name, ASSOCIATED_ENCODING["*"])
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, fmt, **opts)
    attrs = {"media_type": media, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
             "lossless": fmt == "PNG"}
    return np.frombuffer(buf.getvalue(), dtype=np.uint8), attrs


def _decode_image(blob: np.ndarray) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(np.ascontiguousarray(blob, dtype=np.uint8).tobytes())) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------ writer
class ContainerWriter:
    """Write one slide's container under a temporary sibling name; rename it into place when complete."""

    def __init__(self, out_path: str | os.PathLike, *, grid: Any, model: Any, quantizer: Quantizer,
                 tissue: np.ndarray, background: np.ndarray | None = None, source: dict | None = None,
                 resolution: dict | None = None, associated: dict[str, np.ndarray] | None = None,
                 overwrite: bool = False, single_file: bool = False, tool_version: str | None = None,
                 shard_tiles: int = SHARD_TILES):
        self.out_path = Path(out_path)
        self.overwrite = overwrite
        self.single_file = single_file
        if (self.out_path.exists() or self.out_path.is_symlink()) and not overwrite:
            raise OutputExistsError(f"{self.out_path} already exists (use --overwrite to replace it)")
        if self.out_path.exists() and overwrite:
            # --overwrite replaces containers, never a folder or file that merely has the output's name
            try:
                Container.open(self.out_path).close()
            except ContainerError:
                raise OutputExistsError(f"{self.out_path} exists and is not a .pzarr container; "
                                        "refusing to replace it even with --overwrite") from None
        if not self.out_path.parent.is_dir():
            raise ContainerError(f"output folder {self.out_path.parent} does not exist")

        self.grid_json = _plain(_to_json(grid))
        self.model_json = _plain(_to_json(model))
        self.quantizer = quantizer
        if not quantizer.is_fitted:
            raise ValueError("the quantiser must be fitted before the container is written")
        self.rows, self.cols = int(self.grid_json["rows"]), int(self.grid_json["cols"])
        tile = int(self.grid_json["tile_size"])
        factor = int(self.model_json["spatial_factor"])
        if tile % factor:
            raise ValueError(f"tile size {tile} is not a multiple of the model's spatial factor {factor}")
        self.tl = tile // factor  # latent cells per tile side
        self.channels = int(self.model_json["latent_channels"])
        self.dtype = quantizer.dtype
        self.tissue = np.asarray(tissue, dtype=bool)
        if self.tissue.shape != (self.rows, self.cols):
            raise ValueError(f"tissue mask shape {self.tissue.shape} != grid ({self.rows}, {self.cols})")
        tshape = (self.channels, self.tl, self.tl)
        if background is None:
            # a neutral default for callers that have no encoder at hand: the encoding of zero latents
            import torch

            background = quantizer.quantize(torch.zeros((1, *tshape)))[0]
        background = np.asarray(background)
        if background.shape != tshape:
            raise ValueError(f"background shape {background.shape} != {tshape}")
        self.background = background.astype(self.dtype, copy=False)
        self.source = _plain(source or {})
        self.resolution = _plain(resolution or {})
        self.associated = {k: np.asarray(v) for k, v in (associated or {}).items() if v is not None}
        self.tool_version = tool_version or _tool_version()
        self.created = _utc_now()
        self.shard_tiles = int(shard_tiles)

        # shards: which tissue tiles each still waits for; buffers hold only tissue tiles
        s = self.shard_tiles
        self.shard_rows, self.shard_cols = -(-self.rows // s), -(-self.cols // s)
        self._pending = np.zeros((self.shard_rows, self.shard_cols), dtype=np.int64)
        rr, cc = np.nonzero(self.tissue)
        np.add.at(self._pending, (rr // s, cc // s), 1)
        self._buffers: dict[tuple[int, int], dict[tuple[int, int], np.ndarray]] = {}
        self._written = np.zeros_like(self.tissue)
        self._zero_shards: list[list[int]] = []
        self.bytes_written = 0
        self.closed = False

        name = self.out_path.name
        self._tmp = self.out_path.parent / f".{name}.partial-{os.getpid()}"
        self._tmp_dir = self._tmp.with_name(self._tmp.name + ".dir") if single_file else self._tmp
        _remove_stale_partials(self.out_path)
        for p in (self._tmp, self._tmp_dir):
            _remove(p)
        try:
            self._create()
        except Exception:
            self.abort()
            raise

    # -------------------------------------------------------------------------- layout
    def _create(self) -> None:
        store = zarr.storage.LocalStore(self._tmp_dir)
        self._root = zarr.open_group(store, mode="w", zarr_format=3,
                                     attributes={FORMAT_NAME: self._attrs(complete=False)})
        c, tl, s = self.channels, self.tl, self.shard_tiles
        zstd = ZstdCodec(level=ZSTD_LEVEL)
        self._latents = self._root.create_array(
            "latents", shape=(c, self.rows * tl, self.cols * tl), dtype=self.dtype,
            chunks=(c, tl, tl), shards=(c, s * tl, s * tl), compressors=zstd, fill_value=0,
            chunk_key_encoding=CHUNK_KEY_ENCODING, dimension_names=["channel", "y", "x"],
            config={"write_empty_chunks": False},
        )
        self._small_array("tissue_mask", self.tissue.astype(np.uint8), ["row", "col"])
        for name, arr in self.quantizer.arrays().items():
            self._small_array(name, np.asarray(arr, dtype=np.float32), ["channel", "level"])
        self._small_array("background", self.background, ["channel", "y", "x"])
        if self.associated:
            grp = self._root.create_group("associated")
            for name, img in self.associated.items():
                blob, attrs = _encode_image(name, _as_rgb(name, img))
                # already compressed by its image codec: stored as it is, one chunk
                a = grp.create_array(name, shape=blob.shape, dtype="uint8", chunks=blob.shape,
                                     compressors=None, fill_value=0, chunk_key_encoding=CHUNK_KEY_ENCODING,
                                     dimension_names=["byte"], attributes=attrs,
                                     config={"write_empty_chunks": True})
                a[...] = blob

    def _small_array(self, name: str, data: np.ndarray, dims: list[str]) -> None:
        a = self._root.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape,
                                    compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0,
                                    chunk_key_encoding=CHUNK_KEY_ENCODING, dimension_names=dims,
                                    config={"write_empty_chunks": True})
        a[...] = data

    def _attrs(self, complete: bool) -> dict[str, Any]:
        return _plain({
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "complete": complete,
            "tool": {"name": "wsicodec", "version": self.tool_version},
            "created": self.created,
            "source": {**{k: None for k in SOURCE_KEYS}, "properties": {}, **self.source},
            "resolution": {**{k: None for k in RESOLUTION_KEYS}, **self.resolution},
            "grid": self.grid_json,
            "model": self.model_json,
            "quantizer": self.quantizer.to_json(),
            "layout": {
                "channels": self.channels,
                "tile_cells": self.tl,
                "shard_tiles": self.shard_tiles,
                "zstd_level": ZSTD_LEVEL,
                "zero_shards": self._zero_shards,
            },
            "tiles": {"tissue": int(self.tissue.sum()), "total": self.rows * self.cols},
        })

    # -------------------------------------------------------------------------- writing
    def write_tile(self, row: int, col: int, stored: np.ndarray) -> None:
        """Hand over one tissue tile's stored values (C, t/f, t/f); written when its shard is complete."""
        if self.closed:
            raise RuntimeError("write_tile after close()")
        row, col = int(row), int(col)
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) outside the {self.rows}x{self.cols} grid")
        if not self.tissue[row, col]:
            raise ValueError(f"tile ({row}, {col}) is not a tissue tile in the mask")
        if self._written[row, col]:
            raise ValueError(f"tile ({row}, {col}) written twice")
        a = np.asarray(stored)
        if a.shape != (self.channels, self.tl, self.tl):
            raise ValueError(f"tile shape {a.shape} != {(self.channels, self.tl, self.tl)}")
        if a.dtype != self.dtype:
            raise ValueError(f"tile dtype {a.dtype} != quantiser dtype {self.dtype}")
        s = self.shard_tiles
        key = (row // s, col // s)
        self._buffers.setdefault(key, {})[(row, col)] = np.array(a, copy=True)
        self._written[row, col] = True
        self._pending[key] -= 1
        if self._pending[key] == 0:
            self._flush_shard(key)

    def _flush_shard(self, key: tuple[int, int]) -> None:
        tiles = self._buffers.pop(key, {})
        if not tiles:
            return
        s, tl = self.shard_tiles, self.tl
        r0, c0 = key[0] * s, key[1] * s
        r1, c1 = min(r0 + s, self.rows), min(c0 + s, self.cols)
        block = np.zeros((self.channels, (r1 - r0) * tl, (c1 - c0) * tl), dtype=self.dtype)
        nonzero = False
        for (r, c), a in tiles.items():
            block[:, (r - r0) * tl:(r - r0 + 1) * tl, (c - c0) * tl:(c - c0 + 1) * tl] = a
            nonzero = nonzero or bool(a.any())
        if not nonzero:  # zarr stores no object for an all-fill shard: say so, or it reads as truncated
            self._zero_shards.append([key[0], key[1]])
        # one aligned write of the whole shard: zarr encodes it once, without reading anything back
        self._latents[:, r0 * tl:r1 * tl, c0 * tl:c1 * tl] = block

    def close(self) -> int:
        """Flush, mark complete, move into place. Returns the container's bytes on disk."""
        if self.closed:
            return self.bytes_written
        try:
            missing = int(self.tissue.sum() - self._written.sum())
            if missing:
                raise ValueError(f"{missing} tissue tiles were never written; container not finished")
            for key in sorted(self._buffers):
                self._flush_shard(key)
            # "complete": true goes in last: a store without it was interrupted
            self._root.attrs.put({FORMAT_NAME: self._attrs(complete=True)})
            if self.single_file:
                _pack_zip(self._tmp_dir, self._tmp)
                shutil.rmtree(self._tmp_dir)
            _fsync_tree(self._tmp)
            self._move_into_place()
            _fsync_dir(self.out_path.parent)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self.bytes_written = _disk_bytes(self.out_path)
        return self.bytes_written

    def _move_into_place(self) -> None:
        out = self.out_path
        if out.exists() or out.is_symlink():
            if not self.overwrite:
                raise OutputExistsError(f"{out} already exists (use --overwrite to replace it)")
            if out.is_file() and self._tmp.is_file():
                os.replace(self._tmp, out)  # atomic for a single file
                return
            # a directory cannot be replaced atomically: move the old one aside, the new one in, then
            # delete the old one, so a complete container is at (or next to) out_path at every moment
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(out, old)
            try:
                os.replace(self._tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _remove(old)
        else:
            os.replace(self._tmp, out)

    def abort(self) -> None:
        """Remove everything written so far; out_path is left as it was."""
        self.closed = True
        self._buffers.clear()
        for p in {self._tmp, self._tmp_dir}:
            _remove(p)

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


# ------------------------------------------------------------------------------ reader
def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _ZIP_MAGIC
    except OSError:
        return False


class Container:
    """Read-only view of a finished .pzarr container."""

    def __init__(self, path: Path, root: zarr.Group, store: Any, attrs: dict[str, Any]):
        self.path = path
        self._root = root
        self._store = store
        self.attrs = attrs
        lat = attrs.get("layout", {})
        self._latents = root["latents"]
        self.channels = int(self._latents.shape[0])
        self.tile_cells = int(lat.get("tile_cells") or self._latents.chunks[1])
        self._tissue: np.ndarray | None = None
        self._background: np.ndarray | None = None
        self._quantizer: Quantizer | None = None

    # -------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Container":
        p = Path(path)
        if not p.exists():
            raise ContainerError(f"no such container: {p}")
        if p.is_file():
            if not _is_zip(p):
                raise ContainerError(f"not a .pzarr container (not a Zarr store): {p}")
            try:  # a zip's directory sits at its end: a cut-short file fails here
                with zipfile.ZipFile(p) as zf:
                    has_root = "zarr.json" in zf.namelist()
                store = zarr.storage.ZipStore(p, mode="r")
            except Exception as exc:
                raise ContainerError(f"truncated or incomplete .pzarr container (damaged zip: {exc}): {p}") \
                    from None
            if not has_root:
                raise ContainerError(f"not a .pzarr container (a zip without zarr.json): {p}")
        elif p.is_dir():
            if not (p / "zarr.json").is_file():
                if (p / "latents").exists():
                    raise ContainerError(f"truncated or incomplete .pzarr container (no zarr.json): {p}")
                raise ContainerError(f"not a .pzarr container (not a Zarr store): {p}")
            store = zarr.storage.LocalStore(p, read_only=True)
        else:
            raise ContainerError(f"not a .pzarr container: {p}")
        try:
            root = zarr.open_group(store, mode="r", zarr_format=3)
            attrs_all = root.attrs.asdict()
        except Exception as exc:
            raise ContainerError(f"not a .pzarr container (unreadable Zarr metadata: {type(exc).__name__}): {p}") \
                from None
        attrs = attrs_all.get(FORMAT_NAME)
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise ContainerError(f"not a .pzarr container (a Zarr store without pzarr attributes): {p}")
        version = str(attrs.get("version", ""))
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise ContainerError(f"not a .pzarr container (bad format version {version!r}): {p}") from None
        if major != READ_MAJOR:
            raise ContainerError(f"unsupported .pzarr format version {version} "
                                 f"(this wsicodec reads {READ_MAJOR}.x); upgrade wsicodec")
        if attrs.get("complete") is not True:
            raise ContainerError(f"truncated or incomplete .pzarr container (not marked complete): {p}")
        try:
            for name in ("latents", "tissue_mask", "background"):
                root[name]
            c = cls(p, root, store, attrs)
            c._check_shards()
        except ContainerError:
            raise
        except Exception as exc:
            raise ContainerError(f"truncated or incomplete .pzarr container ({type(exc).__name__}: {exc}): {p}") \
                from None
        return c

    def _shard_keys_present(self) -> set[tuple[int, int]]:
        prefix = "latents/c/0/"
        if self.path.is_dir():
            base = self.path / "latents" / "c" / "0"
            found = set()
            if base.is_dir():
                for d in base.iterdir():
                    for f in d.iterdir():
                        if f.name.isdigit() and d.name.isdigit() and f.stat().st_size >= self._min_shard_bytes():
                            found.add((int(d.name), int(f.name)))
            return found
        found = set()
        with zipfile.ZipFile(self.path) as zf:
            for info in zf.infolist():
                if info.filename.startswith(prefix):
                    parts = info.filename[len(prefix):].split("/")
                    if len(parts) == 2 and all(x.isdigit() for x in parts) \
                            and info.file_size >= self._min_shard_bytes():
                        found.add((int(parts[0]), int(parts[1])))
        return found

    def _min_shard_bytes(self) -> int:
        s = int(self.attrs.get("layout", {}).get("shard_tiles") or SHARD_TILES)
        return s * s * SHARD_INDEX_ENTRY_BYTES + SHARD_INDEX_CHECKSUM_BYTES

    def _check_shards(self) -> None:
        """Every shard holding a tissue tile must exist (unless recorded as all-fill) and hold an index."""
        s = int(self.attrs.get("layout", {}).get("shard_tiles") or SHARD_TILES)
        rr, cc = np.nonzero(self.tissue)
        expected = set(zip((rr // s).tolist(), (cc // s).tolist()))
        expected -= {tuple(k) for k in self.attrs.get("layout", {}).get("zero_shards", [])}
        missing = expected - self._shard_keys_present()
        if missing:
            raise ContainerError(f"truncated or incomplete .pzarr container ({len(missing)} latent shard(s) "
                                 f"missing or cut short): {self.path}")

    def close(self) -> None:
        try:
            self._store.close()
        except Exception:
            pass

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------- properties
    @property
    def grid(self) -> Any:
        g = self.attrs["grid"]
        try:
            from wsicodec.source.slide import TileGrid

            return TileGrid.from_json(g)
        except Exception:
            return dict(g)

    @property
    def model(self) -> dict[str, Any]:
        return self.attrs["model"]

    @property
    def quantizer(self) -> Quantizer:
        if self._quantizer is None:
            arrays = {"codebook": self._root["codebook"][...]} if "codebook" in self._root else {}
            try:
                self._quantizer = Quantizer.from_json(self.attrs["quantizer"], arrays)
            except (KeyError, ValueError) as exc:
                raise ContainerError(f"bad quantiser record in {self.path}: {exc}") from None
        return self._quantizer

    @property
    def tissue(self) -> np.ndarray:
        if self._tissue is None:
            self._tissue = self._root["tissue_mask"][...].astype(bool)
        return self._tissue

    @property
    def background(self) -> np.ndarray:
        if self._background is None:
            self._background = self._root["background"][...]
        return self._background

    @property
    def rows(self) -> int:
        return int(self.tissue.shape[0])

    @property
    def cols(self) -> int:
        return int(self.tissue.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self._latents.dtype

    # -------------------------------------------------------------------------- reading
    def _background_cells(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        tl = self.tile_cells
        ys = np.arange(r0, r1) % tl
        xs = np.arange(c0, c1) % tl
        return self.background[:, ys[:, None], xs[None, :]]

    def read_latents(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """Stored values of latent cells [r0, r1) x [c0, c1) -> (C, r1-r0, c1-c0).

        The window may extend past the mosaic; cells outside it or in background tiles get the
        background tile's values at the same position within a tile.
        """
        r0, c0, r1, c1 = int(r0), int(c0), int(r1), int(c1)
        if r1 < r0 or c1 < c0:
            raise ValueError(f"empty or inverted window ({r0}, {c0}, {r1}, {c1})")
        out = np.array(self._background_cells(r0, c0, r1, c1))
        tl = self.tile_cells
        h, w = self._latents.shape[1], self._latents.shape[2]
        y0, y1, x0, x1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
        if y1 <= y0 or x1 <= x0:
            return out
        tis = self.tissue[y0 // tl:(y1 - 1) // tl + 1, x0 // tl:(x1 - 1) // tl + 1]
        if not tis.any():
            return out
        try:
            data = self._latents[:, y0:y1, x0:x1]
        except Exception as exc:
            raise ContainerError(f"corrupt latent shard in {self.path} ({type(exc).__name__}: {exc})") from None
        # which cells of the window belong to tissue tiles
        ty = (np.arange(y0, y1) // tl) - y0 // tl
        tx = (np.arange(x0, x1) // tl) - x0 // tl
        cell_tissue = tis[ty[:, None], tx[None, :]]
        view = out[:, y0 - r0:y1 - r0, x0 - c0:x1 - c0]
        np.copyto(view, data, where=cell_tissue[None])
        return out

    def read_tile(self, row: int, col: int) -> np.ndarray:
        """Stored values of one tile (C, t/f, t/f); a background tile gives the background values."""
        tl = self.tile_cells
        return self.read_latents(row * tl, col * tl, (row + 1) * tl, (col + 1) * tl)

    def verify(self) -> int:
        """Read every shard that holds tissue (checking each index's CRC-32C and each chunk's zstd frame).

        Returns the number of tissue tiles read; raises ContainerError at the first damaged shard.
        """
        s = int(self.attrs.get("layout", {}).get("shard_tiles") or SHARD_TILES)
        tl = self.tile_cells
        rr, cc = np.nonzero(self.tissue)
        for i, j in sorted(set(zip((rr // s).tolist(), (cc // s).tolist()))):
            try:
                self._latents[:, i * s * tl:(i + 1) * s * tl, j * s * tl:(j + 1) * s * tl]
            except Exception as exc:
                raise ContainerError(f"corrupt latent shard ({i}, {j}) in {self.path} "
                                     f"({type(exc).__name__}: {exc})") from None
        return int(len(rr))

    def associated_images(self) -> dict[str, np.ndarray]:
        """The source's associated images ("label", "macro", "thumbnail") as uint8 (H, W, 3)."""
        if "associated" not in self._root:
            return {}
        grp = self._root["associated"]
        out = {}
        for name in sorted(grp.array_keys()):
            try:
                out[name] = _decode_image(grp[name][...])
            except Exception as exc:
                raise ContainerError(f"damaged associated image {name!r} in {self.path} "
                                     f"({type(exc).__name__}: {exc})") from None
        return out

    # -------------------------------------------------------------------------- reporting
    def disk_bytes(self) -> int:
        return _disk_bytes(self.path)

    def latents_bytes(self) -> int:
        """Bytes of the latent shards alone (what stored_tile_bytes predicts)."""
        if self.path.is_dir():
            base = self.path / "latents" / "c"
            return sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) if base.exists() else 0
        with zipfile.ZipFile(self.path) as zf:
            return sum(i.file_size for i in zf.infolist() if i.filename.startswith("latents/c/"))

    def describe(self) -> dict[str, Any]:
        a = self.attrs
        q = a.get("quantizer", {})
        tiles = a.get("tiles", {})
        tissue = int(tiles.get("tissue", int(self.tissue.sum())))
        disk = self.disk_bytes()
        src = a.get("source", {})
        cb = self._root["codebook"] if "codebook" in self._root else None
        return {
            "path": str(self.path),
            "format": a.get("format"),
            "format_version": a.get("version"),
            "layout": "zip" if self.path.is_file() else "directory",
            "created": a.get("created"),
            "tool": a.get("tool"),
            "model": {k: a.get("model", {}).get(k) for k in
                      ("id", "class", "latent_channels", "spatial_factor", "latent_range", "weights_sha256",
                       "decoder_sha256", "source")},
            "quantizer": {
                "kind": q.get("kind"),
                "levels": q.get("levels"),
                "per_channel": q.get("per_channel"),
                "dtype": str(self.dtype),
                "codebook_size": int(cb.shape[-1]) if cb is not None else 0,
                "codebook_shape": list(cb.shape) if cb is not None else None,
                "range": q.get("range"),
            },
            "grid": a.get("grid"),
            "resolution": a.get("resolution"),
            "tiles": {"tissue": tissue, "total": int(tiles.get("total", self.rows * self.cols)),
                      "rows": self.rows, "cols": self.cols},
            "latent_shape": list(self._latents.shape),
            "source": {**{k: src.get(k) for k in ("filename", "size", "sha256", "vendor")},
                       "property_count": len(src.get("properties") or {})},
            "container_bytes": disk,
            "latents_bytes": self.latents_bytes(),
            "bytes_per_tissue_tile": (disk / tissue) if tissue else None,
            "ratio": (src["size"] / disk) if src.get("size") and disk else None,
            "associated_images": sorted(self._root["associated"].array_keys())
            if "associated" in self._root else [],
        }


def open_container(path: str | os.PathLike) -> Container:
    return Container.open(path)
