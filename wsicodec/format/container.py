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
    c.icc_profile -> bytes | None                 # the source's ICC colour profile, verbatim (optional array)
    c.read_latents(r0, c0, r1, c1) -> np.ndarray (C, r1-r0, c1-c0) stored values; r*, c* are *latent-cell*
         coordinates (tile (row, col) starts at cell (row*t/f, col*t/f)); cells outside the mosaic or in
         background tiles come back as the container's background (the stored encoding of a glass tile; a white one in 1.0)
    c.read_tile(row, col) -> (C, t/f, t/f) stored values;  c.describe() -> dict;  c.disk_bytes() -> int
    c.verify() -> list[Problem]                   # every key against the manifest, every chunk read; [] if intact
    c.check_latent_shards(y0, x0, y1, x1)         # (read_latents does it) each shard hashed at its first read
    stored_tile_bytes(stored: np.ndarray) -> int   # bytes one tile costs in a container (same codec + shard index)
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsicodec._io import disk_bytes
from wsicodec.errors import ContainerError
from wsicodec.format.spec import (FEATURES_1_1, FORMAT_NAME, READ_MAJOR, SHARD_INDEX_CHECKSUM_BYTES, SHARD_INDEX_ENTRY_BYTES, SHARD_TILES, ZIP_MAGIC)
from wsicodec.format.integrity import INTEGRITY_ARRAY, KeyStore, Problem, canonical, check_keys, parse_manifest
from wsicodec.format.spec import decode_image, integer_problems, integrity_array_metadata, parse_version
from wsicodec.format.spec import ICC_PROFILE_ARRAY, is_icc_profile
from wsicodec.quant.quantizer import Quantizer

def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in ZIP_MAGIC
    except OSError:
        return False


def _codec_names(doc: Any) -> set[str]:
    """Names of the codecs an array's chunks pass through, the chunks inside shards included (not the shard
    index's own chain, which ends in crc32c in every version)."""
    names: set[str] = set()
    if isinstance(doc, dict):
        for codec in doc.get("codecs") or []:
            if isinstance(codec, dict):
                names.add(str(codec.get("name")))
                names |= _codec_names(codec.get("configuration"))
    return names


class UnverifiedContainerWarning(UserWarning):
    """A container written before format 1.1: it has no checksums to check."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
        self._icc: bytes | None = None
        self.checksummed = False
        self.manifest: dict[str, Any] | None = None
        self._root_sha256: str | None = None
        # latent shards are hashed against the manifest once each, at their first read (format 1.1)
        self._shard_verdicts: dict[str, str | None] = {}  # key -> None when it matches, else what is wrong
        self._shard_lock = threading.Lock()
        self._shard_store: KeyStore | None = None

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
        version = attrs.get("version")
        try:
            major, minor = parse_version(version)
        except ValueError as exc:
            raise ContainerError(f"unsupported .pzarr format version ({exc}): {p}") from None
        if major != READ_MAJOR:
            raise ContainerError(f"unsupported .pzarr format version {version} "
                                 f"(this wsicodec reads {READ_MAJOR}.x); upgrade wsicodec")
        if attrs.get("complete") is not True:
            raise ContainerError(f"truncated or incomplete .pzarr container (not marked complete): {p}")
        try:
            for name in ("latents", "tissue_mask", "background"):
                root[name]
            c = cls(p, root, store, attrs)
            # only the exact string "1.0" means "no checksums"; every later 1.y is checked like 1.1
            c.checksummed = minor >= 1
            if c.checksummed:
                c._check_integrity()
            else:
                c._check_no_1_1_features()
                warnings.warn(f"{p}: a format {version} container carries no data checksums; "
                              "damage to it may go unnoticed (rewrite it with this wsicodec to add them)",
                              UnverifiedContainerWarning, stacklevel=2)
            problems = integer_problems(attrs)
            if problems:
                raise ContainerError(f"damaged container: {problems[0]}: {p}")
            c._check_shards()
            c._check_records()
        except ContainerError:
            raise
        except Exception as exc:
            raise ContainerError(f"truncated or incomplete .pzarr container ({type(exc).__name__}: {exc}): {p}") \
                from None
        return c

    def _check_integrity(self) -> None:
        """Format 1.1: the sealed manifest lists every key; metadata and the small arrays must match it."""
        rec = self.attrs.get("integrity")
        if not isinstance(rec, dict) or rec.get("array") != INTEGRITY_ARRAY or INTEGRITY_ARRAY not in self._root:
            raise ContainerError(f"damaged container: its integrity manifest is missing: {self.path}")
        store = KeyStore.for_path(self.path)
        try:
            # the manifest's own metadata is no key of it: it has one exact content (section 3.6), checked
            # before Zarr reads the manifest through it
            try:
                meta = json.loads(store.read(f"{INTEGRITY_ARRAY}/zarr.json").decode("utf-8"))
                if isinstance(meta, dict):
                    meta.setdefault("storage_transformers", [])
                nbytes = (store.size(f"{INTEGRITY_ARRAY}/c/0") or 0) - 4  # the chunk, less its CRC-32C
                same = canonical(meta) == canonical(integrity_array_metadata(nbytes))
            except (KeyError, OSError, ValueError, TypeError, zipfile.BadZipFile):
                same = False
            if not same:
                raise ContainerError(f"damaged container: {INTEGRITY_ARRAY}/zarr.json is not what the format "
                                     f"prescribes for the integrity array: {self.path}")
            try:
                raw = bytes(np.asarray(self._root[INTEGRITY_ARRAY][...], dtype=np.uint8).tobytes())
            except Exception as exc:
                raise ContainerError(f"damaged container: integrity manifest unreadable ({_one_line(exc)}): "
                                     f"{self.path}") from None
            manifest = parse_manifest(raw)
            if manifest.get("write_id") != rec.get("write_id"):
                raise ContainerError(f"damaged container: manifest and attributes come from different writes: "
                                     f"{self.path}")
            # metadata and the small arrays are hashed on every open (a few KB); latent shards at first read
            small = frozenset(k for k in manifest["keys"] if k.endswith("zarr.json") or not k.startswith("latents/"))
            problems = check_keys(store, manifest, hash_keys=small)
        finally:
            store.close()
        if problems:
            more = f" (and {len(problems) - 1} more; run wsicodec verify)" if len(problems) > 1 else ""
            raise ContainerError(f"damaged container: {problems[0].line()}{more}: {self.path}")
        self.manifest = manifest
        self._root_sha256 = manifest["keys"]["zarr.json"]["sha256"]

    def _check_no_1_1_features(self) -> None:
        """A root that says "1.0" over a container with anything only 1.1 has is damage (a bit flipped from
        "1.1"), never an old container to read unchecked."""
        found = [f"the root attribute {k!r}" for k in FEATURES_1_1 if k in self.attrs]
        if "archived_mpp" in (self.attrs.get("resolution") or {}):
            found.append("the root attribute 'resolution.archived_mpp'")
        store = KeyStore.for_path(self.path)
        try:
            for key in sorted(store.keys()):
                if key == INTEGRITY_ARRAY or key.startswith(INTEGRITY_ARRAY + "/"):
                    found.append(f"the {key} key")
                elif key.endswith("zarr.json") and key != "zarr.json":
                    try:
                        doc = json.loads(store.read(key).decode("utf-8"))
                    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                        continue  # unreadable metadata fails later, as damage
                    if _codec_names(doc) & {"crc32c"}:
                        found.append(f"crc32c in {key}")
        finally:
            store.close()
        if found:
            raise ContainerError(f"damaged container: its root says format version 1.0, but it has {found[0]}, "
                                 f"which only format 1.1 has: {self.path}")

    def _check_records(self) -> None:
        """What the attributes promise must hold: tissue count, a finite sorted codebook, a sane grid."""
        tiles = self.attrs.get("tiles") or {}
        grid = self.attrs.get("grid") or {}
        try:
            tissue = self.tissue
        except Exception as exc:
            raise ContainerError(f"damaged container: tissue_mask unreadable ({_one_line(exc)}): {self.path}") from None
        if tissue.shape != (grid.get("rows"), grid.get("cols")):
            raise ContainerError(f"damaged container: tissue_mask is {tissue.shape}, the grid "
                                 f"{grid.get('rows')}x{grid.get('cols')}: {self.path}")
        if int(tissue.sum()) != tiles.get("tissue"):
            raise ContainerError(f"damaged container: tissue_mask marks {int(tissue.sum())} tiles, the attributes "
                                 f"say {tiles.get('tissue')}: {self.path}")
        t, f = grid.get("tile_size"), (self.attrs.get("model") or {}).get("spatial_factor")
        lat = self._latents.shape
        if not (isinstance(t, int) and isinstance(f, int) and f > 0 and t % f == 0 and self.tile_cells == t // f
                and lat[1] == grid["rows"] * self.tile_cells and lat[2] == grid["cols"] * self.tile_cells
                and 0 < grid.get("width", 0) <= grid["cols"] * t and 0 < grid.get("height", 0) <= grid["rows"] * t
                and grid["width"] > (grid["cols"] - 1) * t and grid["height"] > (grid["rows"] - 1) * t):
            raise ContainerError(f"damaged container: grid, layout and latents disagree: {self.path}")
        if "codebook" in self._root:
            try:
                cb = np.asarray(self._root["codebook"][...], dtype=np.float32)
            except Exception as exc:
                raise ContainerError(f"damaged container: codebook unreadable ({_one_line(exc)}): {self.path}") \
                    from None
            if not np.isfinite(cb).all() or (cb.ndim == 2 and cb.shape[1] > 1 and (np.diff(cb, axis=1) < 0).any()):
                raise ContainerError(f"damaged container: codebook is not finite and sorted: {self.path}")
        try:
            self.background
        except Exception as exc:
            raise ContainerError(f"damaged container: background unreadable ({_one_line(exc)}): {self.path}") \
                from None

    def check_generation(self) -> None:
        """Refuse to go on if a directory container was replaced since it was opened (its root changed)."""
        if self._root_sha256 is None or not self.path.is_dir():
            return
        try:
            now = hashlib.sha256((self.path / "zarr.json").read_bytes()).hexdigest()
        except OSError:
            now = None
        if now != self._root_sha256:
            raise ContainerError(f"{self.path} was replaced or changed while open; open it again")

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
        with self._shard_lock:
            if self._shard_store is not None:
                self._shard_store.close()
                self._shard_store = None
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
    def icc_profile(self) -> bytes | None:
        """The source slide's ICC colour profile, byte for byte; None when it had none (or an older container)."""
        if ICC_PROFILE_ARRAY not in self._root:
            return None
        if self._icc is None:
            try:
                self._icc = self._read_icc()
            except ValueError as exc:
                raise ContainerError(f"damaged container: {ICC_PROFILE_ARRAY} {exc}: {self.path}") from None
        return self._icc

    def _read_icc(self) -> bytes:
        try:
            blob = bytes(np.asarray(self._root[ICC_PROFILE_ARRAY][...], dtype=np.uint8).tobytes())
        except Exception as exc:
            raise ValueError(f"unreadable ({_one_line(exc)})") from None
        if not is_icc_profile(blob):
            raise ValueError("holds no ICC profile")
        return blob

    @property
    def glass_rgb(self) -> tuple[int, int, int]:
        """The slide's glass colour as measured (white in containers that record none)."""
        return _rgb((self.attrs.get("glass") or {}).get("rgb")) or (255, 255, 255)

    @property
    def glass_paint_rgb(self) -> tuple[int, int, int]:
        """What background tiles inside the image are painted with: the model's own decode of glass
        (``glass.paint_rgb``) where the container records it, so they meet the glass decoded inside
        tissue tiles without a step; else the measured glass colour, as containers before it decode."""
        return _rgb((self.attrs.get("glass") or {}).get("paint_rgb")) or self.glass_rgb

    @property
    def archived_mpp(self) -> float:
        """µm per archived pixel as stored: the source's pixel size times the grid's scale (exact)."""
        res = self.attrs.get("resolution") or {}
        if res.get("archived_mpp"):
            return float(res["archived_mpp"])
        grid = self.attrs.get("grid") or {}
        if grid.get("source_mpp") and grid.get("scale"):
            return float(grid["source_mpp"]) * float(grid["scale"])
        return float(grid.get("target_mpp") or res.get("target_mpp"))

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
        self.check_latent_shards(y0, x0, y1, x1)
        try:
            data = self._latents[:, y0:y1, x0:x1]
        except Exception as exc:
            raise ContainerError(f"damaged container: latents {y0}:{y1}, {x0}:{x1} unreadable "
                                 f"({_one_line(exc)}): {self.path}") from None
        self.check_generation()  # the bytes just read must be this container's, not a replacement's
        # which cells of the window belong to tissue tiles
        ty = (np.arange(y0, y1) // tl) - y0 // tl
        tx = (np.arange(x0, x1) // tl) - x0 // tl
        cell_tissue = tis[ty[:, None], tx[None, :]]
        view = out[:, y0 - r0:y1 - r0, x0 - c0:x1 - c0]
        np.copyto(view, data, where=cell_tissue[None])
        return out

    def check_latent_shards(self, y0: int, x0: int, y1: int, x1: int) -> None:
        """Every latent shard a read of cells [y0, y1) x [x0, x1) touches must hash as the manifest says.

        A shard is hashed once, at its first touch, and its verdict kept for this open container: a chunk
        with a valid CRC-32C copied from another tile or another container of the same shape is refused here
        rather than decoded into wrong pixels. A key the manifest does not list must not exist. Format 1.0
        containers have no manifest: nothing to check against.
        """
        if self.manifest is None:
            return
        span = int(self.attrs.get("layout", {}).get("shard_tiles") or SHARD_TILES) * self.tile_cells
        keys = [f"latents/c/0/{i}/{j}" for i in range(y0 // span, (y1 - 1) // span + 1)
                for j in range(x0 // span, (x1 - 1) // span + 1)]
        for key in keys:
            verdict = self._shard_verdicts[key] if key in self._shard_verdicts else self._hash_shard(key)
            if verdict is not None:
                self.check_generation()  # a container replaced under us says so, not "damaged"
                raise ContainerError(f"damaged container: {key}: {verdict}: {self.path}")

    def _hash_shard(self, key: str) -> str | None:
        with self._shard_lock:
            if key in self._shard_verdicts:
                return self._shard_verdicts[key]
            if self._shard_store is None:
                self._shard_store = KeyStore.for_path(self.path)
            store, rec = self._shard_store, self.manifest["keys"].get(key)
            try:
                if rec is None:
                    verdict = None if store.size(key) is None else "not in the manifest (added after writing)"
                elif store.size(key) != rec.get("size"):
                    verdict = f"size {store.size(key)} bytes, manifest says {rec.get('size')}"
                else:
                    verdict = None if store.sha256(key) == rec.get("sha256") else "SHA-256 does not match the manifest"
            except (OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
                verdict = f"unreadable ({_one_line(exc)})"
            self._shard_verdicts[key] = verdict
            return verdict

    def read_tile(self, row: int, col: int) -> np.ndarray:
        """Stored values of one tile (C, t/f, t/f); a background tile gives the background values."""
        tl = self.tile_cells
        return self.read_latents(row * tl, col * tl, (row + 1) * tl, (col + 1) * tl)

    def verify(self) -> list[Problem]:
        """Check every stored byte: each key against the manifest (format 1.1), then every chunk through
        Zarr (crc32c, zstd) and every associated image through its decoder. [] when intact."""
        problems: list[Problem] = []
        if self.checksummed and self.manifest is not None:
            store = KeyStore.for_path(self.path)
            try:
                problems += check_keys(store, self.manifest, full=True)
            finally:
                store.close()
        s = int(self.attrs.get("layout", {}).get("shard_tiles") or SHARD_TILES)
        tl = self.tile_cells
        rr, cc = np.nonzero(self.tissue)
        for i, j in sorted(set(zip((rr // s).tolist(), (cc // s).tolist()))):
            try:
                self._latents[:, i * s * tl:(i + 1) * s * tl, j * s * tl:(j + 1) * s * tl]
            except Exception as exc:
                problems.append(Problem(f"latents/c/0/{i}/{j}", f"shard unreadable ({_one_line(exc)})"))
        if "associated" in self._root:
            grp = self._root["associated"]
            for name in sorted(grp.array_keys()):
                try:
                    decode_image(grp[name][...])
                except Exception as exc:
                    problems.append(Problem(f"associated/{name}", f"image unreadable ({_one_line(exc)})"))
        if ICC_PROFILE_ARRAY in self._root:
            try:
                self._read_icc()
            except ValueError as exc:
                problems.append(Problem(ICC_PROFILE_ARRAY, str(exc)))
        return problems

    def associated_images(self) -> dict[str, np.ndarray]:
        """The source's associated images ("label", "macro", "thumbnail") as uint8 (H, W, 3)."""
        if "associated" not in self._root:
            return {}
        grp = self._root["associated"]
        out = {}
        for name in sorted(grp.array_keys()):
            try:
                out[name] = decode_image(grp[name][...])
            except Exception as exc:
                raise ContainerError(f"damaged associated image {name!r} in {self.path} "
                                     f"({type(exc).__name__}: {exc})") from None
        return out

    # -------------------------------------------------------------------------- reporting
    def disk_bytes(self) -> int:
        return disk_bytes(self.path)

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
            "resolution": {**(a.get("resolution") or {}), "archived_mpp": self.archived_mpp},
            "glass_rgb": list(self.glass_rgb),
            "encode_margin_px": (a.get("encoding") or {}).get("margin_px", 0),
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
            "icc_profile_bytes": (int(self._root[ICC_PROFILE_ARRAY].shape[0])
                                  if ICC_PROFILE_ARRAY in self._root else 0),
        }


def open_container(path: str | os.PathLike) -> Container:
    return Container.open(path)


def _rgb(value) -> tuple[int, int, int] | None:
    """Three JSON integers 0-255 (booleans are not integers), else None."""
    if (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        return (value[0], value[1], value[2])
    return None
