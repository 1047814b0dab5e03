"""Writing a .pzarr container: shard-buffered, under a unique partial name, renamed into place when complete."""

from __future__ import annotations

import os
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from wsicodec._io import check_output_path, commit, disk_bytes, partial_name, remove_path, remove_stale_partials
from wsicodec.errors import ContainerError, OutputExistsError
from wsicodec.format.container import Container
from wsicodec.format.integrity import INTEGRITY_ARRAY, KeyStore, build_manifest, manifest_bytes
from wsicodec.format.spec import (CHUNK_KEY_ENCODING, FORMAT_NAME, FORMAT_VERSION, RESOLUTION_KEYS, SHARD_TILES, SOURCE_KEYS, ZSTD_LEVEL)
from wsicodec.format.spec import ICC_MEDIA_TYPE, ICC_PROFILE_ARRAY, is_icc_profile
from wsicodec.format.spec import as_rgb, encode_image, plain, to_json, current_tool_version, utc_now
from wsicodec.quant.quantizer import Quantizer

def _pack_zip(src_dir: Path, zip_path: Path) -> None:
    """Pack a finished directory store into one uncompressed zip (its chunks are already zstd)."""
    files = sorted(p for p in src_dir.rglob("*") if p.is_file())
    # metadata first, so a reader streaming the zip meets zarr.json documents before chunk data
    files.sort(key=lambda p: (p.name != "zarr.json", p.relative_to(src_dir).as_posix()))
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for p in files:
            zf.write(p, p.relative_to(src_dir).as_posix())


def write_manifest(root: zarr.Group, folder: Path, write_id: str) -> None:
    """Seal every key of the directory store ``folder`` (opened as ``root``) in its "integrity" array, replacing
    any there: the manifest, then the array's metadata exactly as formats/pzarr-v1.md section 3.6 prescribes."""
    blob = np.frombuffer(manifest_bytes(build_manifest(KeyStore.for_path(folder), write_id)), dtype=np.uint8)
    a = root.create_array(INTEGRITY_ARRAY, shape=blob.shape, dtype="uint8", chunks=blob.shape,
                          compressors=[Crc32cCodec()], fill_value=0, chunk_key_encoding=CHUNK_KEY_ENCODING,
                          dimension_names=["byte"], attributes={"media_type": "application/json"},
                          config={"write_empty_chunks": True}, overwrite=True)
    a[...] = blob


# ------------------------------------------------------------------------------ writer
class ContainerWriter:
    """Write one slide's container under a temporary sibling name; rename it into place when complete."""

    def __init__(self, out_path: str | os.PathLike, *, grid: Any, model: Any, quantizer: Quantizer,
                 tissue: np.ndarray, background: np.ndarray | None = None, source: dict | None = None,
                 resolution: dict | None = None, associated: dict[str, np.ndarray] | None = None,
                 overwrite: bool = False, single_file: bool = False, tool_version: str | None = None,
                 shard_tiles: int = SHARD_TILES, glass: tuple[int, int, int] | None = None,
                 glass_paint: tuple[int, int, int] | None = None,
                 encode_margin_px: int | None = None, encoding: dict[str, Any] | None = None,
                 icc_profile: bytes | None = None):
        self.out_path = Path(out_path)
        self.overwrite = overwrite
        self.single_file = single_file
        check_output_path(self.out_path)  # no device, FIFO or socket, not inside another container
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

        self.grid_json = plain(to_json(grid))
        self.model_json = plain(to_json(model))
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
        self.source = plain(source or {})
        self.resolution = plain(resolution or {})
        self.associated = {k: np.asarray(v) for k, v in (associated or {}).items() if v is not None}
        if icc_profile is not None and not is_icc_profile(icc_profile):
            raise ValueError("icc_profile is not an ICC profile (no 128-byte header with the 'acsp' signature)")
        self.icc_profile = bytes(icc_profile) if icc_profile else None
        self.tool_version = tool_version or current_tool_version()
        self.created = utc_now()
        self.shard_tiles = int(shard_tiles)
        self.glass = None if glass is None else [int(v) for v in glass]
        self.glass_paint = None if glass_paint is None else [int(v) for v in glass_paint]
        # how the tiles were chosen and encoded (informative; batch runs compare it to skip finished slides)
        self.encoding = plain({**(encoding or {}),
                               **({"margin_px": int(encode_margin_px)} if encode_margin_px is not None else {})})
        # a reader that holds a container open checks this to notice the container being replaced under it
        self.write_id = secrets.token_hex(16)

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

        remove_stale_partials(self.out_path)
        self._tmp = partial_name(self.out_path)
        self._tmp_dir = partial_name(self.out_path, "partial") if single_file else self._tmp
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
        # crc32c last in every chain: any Zarr v3 reader then checks each chunk it reads
        self._latents = self._root.create_array(
            "latents", shape=(c, self.rows * tl, self.cols * tl), dtype=self.dtype,
            chunks=(c, tl, tl), shards=(c, s * tl, s * tl),
            compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()], fill_value=0,
            chunk_key_encoding=CHUNK_KEY_ENCODING, dimension_names=["channel", "y", "x"],
            config={"write_empty_chunks": False},
        )
        self._small_array("tissue_mask", self.tissue.astype(np.uint8), ["row", "col"])
        for name, arr in self.quantizer.arrays().items():
            self._small_array(name, np.asarray(arr, dtype=np.float32), ["channel", "level"])
        self._small_array("background", self.background, ["channel", "y", "x"])
        if self.icc_profile is not None:
            # the source's colour profile, verbatim: the restored TIFF, DICOM and images carry it again
            self._byte_array(self._root, ICC_PROFILE_ARRAY, np.frombuffer(self.icc_profile, dtype=np.uint8),
                             {"media_type": ICC_MEDIA_TYPE})
        if self.associated:
            grp = self._root.create_group("associated")
            for name, img in self.associated.items():
                blob, attrs = encode_image(name, as_rgb(name, img))
                # already compressed by its image codec: stored as it is, one chunk
                self._byte_array(grp, name, blob, attrs)

    @staticmethod
    def _byte_array(group: zarr.Group, name: str, blob: np.ndarray, attrs: dict[str, Any]) -> None:
        """A one-dimensional uint8 array of bytes stored as they are (codecs bytes, crc32c), one chunk."""
        a = group.create_array(name, shape=blob.shape, dtype="uint8", chunks=blob.shape,
                               compressors=[Crc32cCodec()], fill_value=0, chunk_key_encoding=CHUNK_KEY_ENCODING,
                               dimension_names=["byte"], attributes=attrs, config={"write_empty_chunks": True})
        a[...] = blob

    def _small_array(self, name: str, data: np.ndarray, dims: list[str]) -> None:
        a = self._root.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape,
                                    compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()], fill_value=0,
                                    chunk_key_encoding=CHUNK_KEY_ENCODING, dimension_names=dims,
                                    config={"write_empty_chunks": True})
        a[...] = data

    def _attrs(self, complete: bool) -> dict[str, Any]:
        return plain({
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
            "integrity": {"array": INTEGRITY_ARRAY, "algorithm": "sha256", "write_id": self.write_id},
            **({"glass": {"rgb": self.glass, **({"paint_rgb": self.glass_paint} if self.glass_paint else {})}}
               if self.glass is not None else {}),
            **({"encoding": self.encoding} if self.encoding else {}),
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
            self._write_manifest()
            if self.single_file:
                _pack_zip(self._tmp_dir, self._tmp)
                shutil.rmtree(self._tmp_dir)
            # read back what landed on disk before it may take the output's name
            with Container.open(self._tmp) as written:
                problems = written.verify()
            if problems:
                raise ContainerError(f"the container just written does not verify ({problems[0].line()}); "
                                     "nothing was written")
            commit(self._tmp, self.out_path, overwrite=self.overwrite)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self.bytes_written = disk_bytes(self.out_path)
        return self.bytes_written

    def _write_manifest(self) -> None:
        """Seal every key written so far (root attributes included) in the "integrity" array."""
        write_manifest(self._root, self._tmp_dir, self.write_id)

    def abort(self) -> None:
        """Remove everything written so far; out_path is left as it was."""
        self.closed = True
        self._buffers.clear()
        for p in {self._tmp, self._tmp_dir}:
            remove_path(p)

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
