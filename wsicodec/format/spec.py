"""The .pzarr format's constants and byte-level rules (formats/pzarr-v1.md), shared by writer and reader."""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs.zstd import Zstd

FORMAT_NAME = "pzarr"
FORMAT_VERSION = "1.1"  # 1.1: crc32c on every chunk, a sealed integrity manifest, glass colour
READ_MAJOR = 1

# Measured on TAEF2 latents of CMU-1 (benchmarks/bench_quantizers.py): see formats/pzarr-v1.md.
ZSTD_LEVEL = 3
SHARD_TILES = 16  # a shard holds up to SHARD_TILES x SHARD_TILES tiles
SHARD_INDEX_ENTRY_BYTES = 16  # (offset, nbytes) as two little-endian uint64 per inner chunk
SHARD_INDEX_CHECKSUM_BYTES = 4  # crc32c over the index
CHUNK_CHECKSUM_BYTES = 4  # crc32c after each chunk (format 1.1)
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
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# the source's ICC colour profile, verbatim: an optional array (section 3.7 of the spec)
ICC_PROFILE_ARRAY = "icc_profile"
ICC_MEDIA_TYPE = "application/vnd.iccprofile"
ICC_HEADER_BYTES = 128  # an ICC profile begins with a 128-byte header whose bytes 36..39 are b"acsp"


def is_icc_profile(blob: bytes | None) -> bool:
    """Whether ``blob`` looks like an ICC profile: a whole header with the profile file signature."""
    return bool(blob) and len(blob) >= ICC_HEADER_BYTES and bytes(blob[36:40]) == b"acsp"

# pzarr.version: exactly "MAJOR.MINOR", decimal digits without sign, space or leading zeros ("1.1", never "1.1.0")
_VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
# root attributes that hold JSON integers (formats/pzarr-v1.md, section 4): never true/false, never 3.0
INTEGER_FIELDS: dict[str, tuple[str, ...]] = {
    "grid": ("tile_size", "width", "height", "rows", "cols", "level", "origin_x", "origin_y"),
    "model": ("latent_channels", "spatial_factor"),
    "quantizer": ("levels",),
    "layout": ("channels", "tile_cells", "shard_tiles", "zstd_level"),
    "tiles": ("tissue", "total"),
    "encoding": ("margin_px", "decode_halo_cells", "decode_blend_px", "kept_at_full_resolution"),
}
NULLABLE_INTEGER_FIELDS = {"source": ("size",)}
# (lowest, highest) allowed where section 4 bounds an integer
INTEGER_RANGES = {"encoding.decode_halo_cells": (0, 64), "encoding.decode_blend_px": (0, 256)}
# what only format 1.1 has; a root that says "1.0" with any of them is damage (a flipped bit), not an old file
FEATURES_1_1 = ("integrity", "glass", "encoding")


def parse_version(value: Any) -> tuple[int, int]:
    """(major, minor) of a ``pzarr.version``; ValueError unless it is a JSON string "MAJOR.MINOR"."""
    m = _VERSION.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"bad format version {value!r}: a version is a string \"MAJOR.MINOR\", such as \"1.1\"")
    return int(m.group(1)), int(m.group(2))


def is_json_integer(value: Any) -> bool:
    """A JSON integer as Python's json reads one: an int, not a bool (true) and not a float (3.0)."""
    return type(value) is int


def integer_problems(attrs: dict[str, Any]) -> list[str]:
    """Integer fields of the root attributes that are present but not JSON integers (or out of range)."""
    out = []
    for table, nullable in ((INTEGER_FIELDS, False), (NULLABLE_INTEGER_FIELDS, True)):
        for group, names in table.items():
            rec = attrs.get(group)
            if not isinstance(rec, dict):
                continue
            for name in names:
                if name not in rec or (nullable and rec[name] is None):
                    continue
                v, where = rec[name], f"{group}.{name}"
                lo, hi = INTEGER_RANGES.get(where, (None, None))
                if not is_json_integer(v):
                    out.append(f"{where} is {json.dumps(v)}, not an integer")
                elif lo is not None and not lo <= v <= hi:
                    out.append(f"{where} is {v}, not an integer in {lo}–{hi}")
    zero = (attrs.get("layout") or {}).get("zero_shards", [])
    if not (isinstance(zero, list) and all(isinstance(k, list) and len(k) == 2 and all(is_json_integer(i) for i in k)
                                           for k in zero)):
        out.append("layout.zero_shards is not a list of [i, j] integer pairs")
    return out


def integrity_array_metadata(nbytes: int) -> dict[str, Any]:
    """The one JSON value ``integrity/zarr.json`` may hold, for a manifest of ``nbytes`` bytes (section 3.6).
    (``storage_transformers`` may also be absent: Zarr v3 reads its absence as the empty list.)"""
    return {
        "zarr_format": 3, "node_type": "array", "shape": [nbytes], "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [nbytes]}},
        "chunk_key_encoding": CHUNK_KEY_ENCODING, "fill_value": 0,
        "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
        "attributes": {"media_type": "application/json"}, "dimension_names": ["byte"],
        "storage_transformers": [],
    }


_chunk_zstd = Zstd.from_config({"level": ZSTD_LEVEL, "checksum": False})


def stored_tile_bytes(stored: np.ndarray) -> int:
    """Bytes one tile costs inside a shard: its zstd-compressed chunk, its 4-byte CRC-32C and its 16-byte
    index entry.

    Uses the same codec (numcodecs' zstd, which zarr's ZstdCodec wraps) with the same level and byte
    order as the writer, so summing this over a slide's tissue tiles predicts the shards' size.
    """
    a = np.ascontiguousarray(stored)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if not a.any():  # an all-fill chunk is not stored at all, only its index entry
        return SHARD_INDEX_ENTRY_BYTES
    return len(_chunk_zstd.encode(a.tobytes())) + CHUNK_CHECKSUM_BYTES + SHARD_INDEX_ENTRY_BYTES


def to_json(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if hasattr(obj, "to_json"):
        return obj.to_json()
    return dict(obj)


def plain(x: Any) -> Any:
    """Make a value plain JSON (numpy scalars and tuples from callers' dicts)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def current_tool_version() -> str:
    try:
        from wsicodec._version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def as_rgb(name: str, img: np.ndarray) -> np.ndarray:
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


def encode_image(name: str, rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """An associated image as the bytes of a PNG (label: text and barcodes stay exact) or JPEG file."""
    from PIL import Image

    fmt, media, opts = ASSOCIATED_ENCODING.get(name, ASSOCIATED_ENCODING["*"])
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, fmt, **opts)
    attrs = {"media_type": media, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
             "lossless": fmt == "PNG"}
    return np.frombuffer(buf.getvalue(), dtype=np.uint8), attrs


def decode_image(blob: np.ndarray) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(np.ascontiguousarray(blob, dtype=np.uint8).tobytes())) as im:
        return np.asarray(im.convert("RGB"))
