"""A `.pzarr` reader written from formats/pzarr-v1.md alone, checked against wsicodec's own reading.

The reader — everything above the "end of the reader" line — uses numpy, zarr (and numcodecs' zstd, which
zarr brings), hashlib, json and zipfile: no wsicodec. It opens a container (directory or zip), checks the
integrity manifest's seal and every key's size and SHA-256 (section 5.3), the CRC-32C of the chunks it reads
by hand (sections 3, 3.1.1), reads the tissue mask, codebook and background (sections 3.2–3.4), builds the
halo window of every tissue tile and dequantises it (section 7, steps 1–3). The tests make containers with
wsicodec and compare: the dequantised windows must equal the library's bit for bit. More tests follow the
spec past dequantisation: the whole decode procedure with a diffusers model (section 7, steps 4–8) with the
halo and blend the container records — the defaults (H = 3, b = 0: the plain crop) and a container whose
model asks for TAEF2's halo and blend (cross-faded neighbours, step 7) — and the builtin model's decoder
rebuilt in numpy from docs/model-card-wsicodec-base.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

REPO = Path(__file__).resolve().parents[1]
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
EMPTY = 2**64 - 1
# section 4, "Integers": keys of type integer, present ones must hold JSON integers (bounded where stated)
INTEGER_KEYS = {"grid": ["tile_size", "width", "height", "rows", "cols", "level", "origin_x", "origin_y"],
                "model": ["latent_channels", "spatial_factor"], "quantizer": ["levels"],
                "layout": ["channels", "tile_cells", "shard_tiles", "zstd_level"], "tiles": ["tissue", "total"],
                "encoding": ["margin_px", "decode_halo_cells", "decode_blend_px", "kept_at_full_resolution"]}
BOUNDS = {("encoding", "decode_halo_cells"): (0, 64), ("encoding", "decode_blend_px"): (0, 256)}


class SpecError(Exception):
    """The container breaks a MUST of the spec."""


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def strip_crc32c(data: bytes, what: str) -> bytes:
    """A chunk encoded with the crc32c codec last: check its 4-byte little-endian trailer, return the rest."""
    if len(data) < 4 or int.from_bytes(data[-4:], "little") != crc32c(data[:-4]):
        raise SpecError(f"{what}: CRC-32C does not match")
    return data[:-4]


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class RawKeys:
    """The stored bytes of every key, for the directory and the zip variant (section 1)."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None

    def keys(self) -> list[str]:
        if self.zip is not None:
            return sorted(i.filename for i in self.zip.infolist() if not i.is_dir())
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def read(self, key: str) -> bytes | None:
        try:
            return self.zip.read(key) if self.zip is not None else (self.path / key).read_bytes()
        except (KeyError, FileNotFoundError):
            return None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


class SpecReader:
    def __init__(self, path: str | Path):
        p = Path(path)
        if p.is_dir() and (p / "zarr.json").is_file():
            store = zarr.storage.LocalStore(p, read_only=True)
        elif p.is_file() and p.read_bytes()[:4] in ZIP_MAGIC:
            store = zarr.storage.ZipStore(p, mode="r")
        else:
            raise SpecError(f"not a .pzarr container: {p}")
        self.store = store
        self.raw = RawKeys(p)
        root_doc = self.raw.read("zarr.json")
        if root_doc is None:
            raise SpecError("no zarr.json")
        a = json.loads(root_doc)["attributes"].get("pzarr")
        if not isinstance(a, dict) or a.get("format") != "pzarr":
            raise SpecError("a Zarr store without pzarr attributes")
        version = a.get("version")  # 5.1: exactly "MAJOR.MINOR"
        m = re.fullmatch(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)", version) if isinstance(version, str) else None
        if m is None:
            raise SpecError(f"bad version {version!r}")
        major, minor = int(m.group(1)), int(m.group(2))
        if major != 1:
            raise SpecError(f"unknown major version {a['version']}")
        if a.get("complete") is not True:
            raise SpecError("not marked complete")
        self.attrs = a
        self.root = zarr.open_group(store, mode="r", zarr_format=3)
        if minor == 0:
            self.check_nothing_of_1_1()
        self.manifest = self.check_integrity() if minor >= 1 else None
        self.check_integers()

        g, m, q, lay = a["grid"], a["model"], a["quantizer"], a["layout"]
        self.C, self.f, self.T = m["latent_channels"], m["spatial_factor"], g["tile_size"]
        self.L, self.S = self.T // self.f, lay["shard_tiles"]
        self.rows, self.cols = g["rows"], g["cols"]
        assert self.L == lay["tile_cells"] and self.T % self.f == 0
        # 3.2: the tissue mask
        self.tissue = np.asarray(self.root["tissue_mask"][...])
        if self.tissue.shape != (self.rows, self.cols) or int(self.tissue.sum()) != a["tiles"]["tissue"]:
            raise SpecError("tissue_mask disagrees with grid or tiles.tissue")
        self.latents = self.root["latents"]
        assert self.latents.shape == (self.C, self.rows * self.L, self.cols * self.L)
        # 3.3: the codebook, finite and sorted
        self.kind, self.per_channel = q["kind"], q["per_channel"]
        if self.kind == "none":
            assert "codebook" not in self.root and self.latents.dtype == np.float16
            self.codebook = None
        else:
            cb = np.asarray(self.root["codebook"][...])
            if cb.dtype != np.float32 or cb.shape != (self.C if self.per_channel else 1, q["levels"]):
                raise SpecError(f"codebook {cb.dtype} {cb.shape}")
            if not np.isfinite(cb).all() or (np.diff(cb, axis=1) < 0).any():
                raise SpecError("codebook is not finite and sorted")
            self.codebook = cb
        # 3.4: the background, same dtype as the latents
        self.background = np.asarray(self.root["background"][...])
        if self.background.shape != (self.C, self.L, self.L) or self.background.dtype != self.latents.dtype:
            raise SpecError("background has the wrong shape or dtype")
        def colour(value):
            ok = isinstance(value, list) and len(value) == 3 and all(type(v) is int and 0 <= v <= 255 for v in value)
            return tuple(value) if ok else None

        # section 7: background tiles decode to glass.paint_rgb when valid, else glass.rgb, else white
        glass = a.get("glass") or {}
        self.glass = colour(glass.get("paint_rgb")) or colour(glass.get("rgb")) or (255, 255, 255)
        self.input_range = tuple(m["input_range"])

    # ------------------------------------------------------------------------ 4, "Integers"
    def check_integers(self) -> None:
        for group, names in INTEGER_KEYS.items():
            rec = self.attrs.get(group) or {}
            for name in (n for n in names if n in rec):
                v = rec[name]
                lo, hi = BOUNDS.get((group, name), (-math.inf, math.inf))
                if type(v) is not int or not lo <= v <= hi:  # json: true is a bool, 3.0 a float
                    raise SpecError(f"{group}.{name} = {v!r} is not an integer in range")
        size = (self.attrs.get("source") or {}).get("size")
        pairs = self.attrs["layout"].get("zero_shards", [])
        if (size is not None and type(size) is not int) or \
                not all(len(k) == 2 and all(type(i) is int for i in k) for k in pairs):
            raise SpecError("source.size or layout.zero_shards is not made of integers")

    # ------------------------------------------------------------------------ 5.1
    def check_nothing_of_1_1(self) -> None:
        """A root saying "1.0" over a container with anything only 1.1 has is damage."""
        a = self.attrs
        if {"integrity", "glass", "encoding"} & set(a) or "archived_mpp" in (a.get("resolution") or {}):
            raise SpecError("1.0 root with 1.1 attributes")
        for key in self.raw.keys():
            if key.startswith("integrity/"):
                raise SpecError("1.0 root with an integrity array")
            if key.endswith("zarr.json") and key != "zarr.json":
                codecs = json.loads(self.raw.read(key)).get("codecs", [])
                inner = [c for s in codecs if s["name"] == "sharding_indexed" for c in s["configuration"]["codecs"]]
                if "crc32c" in [c["name"] for c in codecs + inner]:  # not the shard index's own chain
                    raise SpecError(f"1.0 root with crc32c in {key}")

    # ------------------------------------------------------------------------ 5.3
    def check_integrity(self) -> dict:
        rec = self.attrs.get("integrity")
        if not isinstance(rec, dict) or rec.get("array") != "integrity":
            raise SpecError("no integrity attribute")
        meta = self.raw.read("integrity/zarr.json")
        chunk = self.raw.read("integrity/c/0")
        if meta is None or chunk is None:
            raise SpecError("no integrity array")
        n = len(chunk) - 4  # 3.6: the one content integrity/zarr.json may have
        want = {"zarr_format": 3, "node_type": "array", "shape": [n], "data_type": "uint8",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [n]}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}}, "fill_value": 0,
                "codecs": [{"name": "bytes"}, {"name": "crc32c"}], "attributes": {"media_type": "application/json"},
                "dimension_names": ["byte"], "storage_transformers": []}
        doc = json.loads(meta)
        if canonical({"storage_transformers": [], **doc}) != canonical(want):  # canonical: false is not 0
            raise SpecError("integrity/zarr.json is not the prescribed one")
        raw = strip_crc32c(chunk, "integrity/c/0")
        if raw != np.asarray(self.root["integrity"][...]).tobytes():  # Zarr reads the same bytes
            raise SpecError("integrity array reads differently through Zarr")
        m = json.loads(raw.decode("ascii"))
        if m.get("format") != "pzarr-integrity" or not isinstance(m.get("keys"), dict):
            raise SpecError("not an integrity manifest")
        if m.get("self_sha256") != hashlib.sha256(canonical({k: v for k, v in m.items()
                                                             if k != "self_sha256"})).hexdigest():
            raise SpecError("manifest seal broken")
        if raw != canonical(m):
            raise SpecError("manifest not stored as canonical JSON")
        if m.get("write_id") != rec.get("write_id"):
            raise SpecError("manifest and attributes come from different writes")
        for key, want in m["keys"].items():  # a full check: every key's size and hash
            data = self.raw.read(key)
            if data is None:
                raise SpecError(f"{key}: missing")
            if len(data) != want["size"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
                raise SpecError(f"{key}: does not match the manifest")
        extra = {k for k in self.raw.keys() if not k.startswith("integrity/")} - set(m["keys"])
        if extra:
            raise SpecError(f"keys not in the manifest: {sorted(extra)}")
        return m

    # ------------------------------------------------------------------------ 3.1.1
    def tile_by_hand(self, row: int, col: int) -> np.ndarray:
        """Stored values of a tissue tile, read from its shard's bytes without Zarr."""
        from numcodecs.zstd import Zstd

        s, shape = self.S, (self.C, self.L, self.L)
        shard = self.raw.read(f"latents/c/0/{row // s}/{col // s}")
        if shard is None:
            if [row // s, col // s] not in self.attrs["layout"]["zero_shards"]:
                raise SpecError("a shard that must exist is missing")
            return np.zeros(shape, self.latents.dtype)
        index = np.frombuffer(strip_crc32c(shard[-(16 * s * s + 4):], "shard index"), "<u8").reshape(-1, 2)
        offset, nbytes = (int(v) for v in index[(row % s) * s + (col % s)])
        if (offset, nbytes) == (EMPTY, EMPTY):
            return np.zeros(shape, self.latents.dtype)
        frame = strip_crc32c(shard[offset:offset + nbytes], "latent chunk")
        return np.frombuffer(Zstd().decode(frame), self.latents.dtype.newbyteorder("<")).reshape(shape)

    # ------------------------------------------------------------------------ 7, steps 2 and 3
    def window(self, row: int, col: int, halo: int) -> np.ndarray:
        """Stored values of the (C, L+2H, L+2H) window around tile (row, col)."""
        L = self.L
        ys = np.arange(row * L - halo, (row + 1) * L + halo)
        xs = np.arange(col * L - halo, (col + 1) * L + halo)
        w = self.background[:, (ys % L)[:, None], (xs % L)[None, :]]  # numpy's % is non-negative here
        inside_y = np.nonzero((ys >= 0) & (ys < self.rows * L))[0]  # window rows inside the mosaic
        inside_x = np.nonzero((xs >= 0) & (xs < self.cols * L))[0]
        if inside_y.size and inside_x.size:
            a0, a1, b0, b1 = inside_y[0], inside_y[-1] + 1, inside_x[0], inside_x[-1] + 1
            y0, y1, x0, x1 = ys[a0], ys[a1 - 1] + 1, xs[b0], xs[b1 - 1] + 1
            stored = np.asarray(self.latents[:, y0:y1, x0:x1])  # 0 where a chunk is absent
            tissue = self.tissue[(np.arange(y0, y1) // L)[:, None], (np.arange(x0, x1) // L)[None, :]] == 1
            np.copyto(w[:, a0:a1, b0:b1], stored, where=tissue[None])
        return w

    def dequantise(self, stored: np.ndarray) -> np.ndarray:
        if self.codebook is None:
            return stored.astype(np.float32)
        if stored.max(initial=0) >= self.codebook.shape[1]:
            raise SpecError("stored index past the codebook")
        ch = np.arange(self.C)[:, None, None] if self.per_channel else 0
        return self.codebook[ch, stored]

    # ------------------------------------------------------------------------ 7, parameters
    def decode_parameters(self) -> tuple[int, int]:
        """(H, b): encoding.decode_halo_cells and decode_blend_px, else 3 and 0 (absent); anything else is damage."""
        enc = self.attrs.get("encoding") or {}
        h, b = enc.get("decode_halo_cells"), enc.get("decode_blend_px")
        if (h is not None and not (type(h) is int and 0 <= h <= 64)) or \
                (b is not None and not (type(b) is int and 0 <= b <= 256)):
            raise SpecError(f"decode halo {h!r} or blend {b!r} is not an integer in range")  # 4, "Integers"
        return (3 if h is None else h), (0 if b is None else b)

    # ------------------------------------------------------------------------ 7, steps 1 and 4-8
    def to_uint8(self, p: np.ndarray) -> np.ndarray:
        lo, hi = self.input_range
        v = (p.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        return np.rint(np.clip(v, 0, 255)).astype(np.uint8)  # rint: ties to even

    def extended(self, row: int, col: int, decode, halo: int, blend: int) -> np.ndarray:
        """Steps 2-6: the tile's decode cropped to [-b, T + b) around its origin, (T + 2b, T + 2b, 3)."""
        z = self.dequantise(self.window(row, col, halo))[None]
        px = self.to_uint8(decode(z))[0].transpose(1, 2, 0)
        k, n = halo * self.f - blend, self.T + 2 * blend
        return px[k:k + n, k:k + n]

    @staticmethod
    def ramp(tile: int, blend: int) -> np.ndarray:
        """w(u) = clip(min(u + b, T + b - u) / (2b), 0, 1) over u in [-b, T + b), as float32."""
        u = np.arange(-blend, tile + blend, dtype=np.float64)
        return np.clip(np.minimum(u + blend, tile + blend - u) / (2 * blend), 0, 1).astype(np.float32)

    def blended(self, row: int, col: int, ext: dict, blend: int) -> np.ndarray:
        """Step 7: the weighted mean over the tile and its tissue neighbours whose extended decode covers p."""
        T, b = self.T, blend
        w = self.ramp(T, b)
        acc = np.zeros((T, T, 3), np.float32)
        wsum = np.zeros((T, T, 1), np.float32)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                e = ext.get((row + dr, col + dc))  # only tissue tiles of the grid have one
                if e is None:
                    continue
                uy, ux = np.arange(T) - dr * T, np.arange(T) - dc * T  # p relative to the neighbour's origin
                in_y, in_x = (uy >= -b) & (uy < T + b), (ux >= -b) & (ux < T + b)
                iy, ix = np.clip(uy + b, 0, T + 2 * b - 1), np.clip(ux + b, 0, T + 2 * b - 1)
                wy = np.where(in_y, w[iy], np.float32(0))
                wx = np.where(in_x, w[ix], np.float32(0))
                weight = (wy[:, None] * wx[None, :])[..., None]  # 0 where the neighbour does not cover p
                acc += weight * e[iy[:, None], ix[None, :]]
                wsum += weight
        assert wsum.min() > 0  # the tile itself always covers its pixels
        return np.clip(np.rint(acc / wsum), 0, 255).astype(np.uint8)

    def image(self, decode, halo: int | None = None, blend: int | None = None) -> np.ndarray:
        """The archived image; ``decode`` maps float32 (1, C, N, N) to float32 (1, 3, N*f, N*f).
        H and b are the container's (section 7) unless given."""
        T = self.T
        h0, b0 = self.decode_parameters()
        halo, blend = (h0 if halo is None else halo), (b0 if blend is None else blend)
        if not (blend <= halo * self.f and 2 * blend <= T):
            raise SpecError(f"blend {blend} px with halo {halo} cells breaks b <= H*f, 2b <= T")
        tiles = [(int(r), int(c)) for r, c in zip(*np.nonzero(self.tissue))]
        ext = {rc: self.extended(*rc, decode, halo, blend) for rc in tiles}  # each tile decoded once
        out = np.empty((self.rows * T, self.cols * T, 3), np.uint8)
        out[:] = np.asarray(self.glass, np.uint8)  # step 1: background tiles
        for row, col in tiles:
            tile = ext[(row, col)] if blend == 0 else self.blended(row, col, ext, blend)
            out[row * T:(row + 1) * T, col * T:(col + 1) * T] = tile
        g = self.attrs["grid"]
        return out[:g["height"], :g["width"]]

    def close(self) -> None:
        self.raw.close()
        self.store.close()


def state_dict_sha256(state) -> str:
    """Section 8.1: name, dtype name, shape as Python writes a tuple, raw little-endian bytes; sorted names."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(name.encode("utf-8"))
        h.update(str(t.dtype).encode("ascii"))
        h.update(str(tuple(int(d) for d in a.shape)).encode("ascii"))
        h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------- end of the reader


@pytest.fixture(scope="module")
def compressed(synthetic_slide, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The same slide compressed by wsicodec into a directory and a zip container."""
    from wsicodec import compress

    d = tmp_path_factory.mktemp("conformance")
    out = {"directory": d / "slide.pzarr", "zip": d / "slide-zip.pzarr"}
    compress(synthetic_slide, out["directory"], model=str(tiny_model_dir))
    compress(synthetic_slide, out["zip"], model=str(tiny_model_dir), single_file=True)
    return out


@pytest.fixture(scope="module")
def blended(synthetic_slide, tiny_model_dir, tmp_path_factory) -> Path:
    """The same slide compressed with the tiny model asking for TAEF2's halo and blend (H = 10, b = 16)."""
    from wsicodec import compress
    from wsicodec.models import load_model
    from wsicodec.models.taesd import TAEF2

    model = load_model(str(tiny_model_dir), device="cpu")
    model.decode_halo_cells, model.decode_blend_px = TAEF2.decode_halo_cells, TAEF2.decode_blend_px
    out = tmp_path_factory.mktemp("conformance-blend") / "blend.pzarr"
    compress(synthetic_slide, out, model=model)
    return out


@pytest.fixture(scope="module")
def per_channel(tmp_path_factory) -> Path:
    """Written by wsicodec's writer: a per-channel uniform codebook, an all-zero tissue tile in a stored shard
    and a shard whose tissue tiles are all zero (so it is not stored: layout.zero_shards)."""
    import torch

    from wsicodec.format import ContainerWriter
    from wsicodec.models.base import ModelInfo
    from wsicodec.quant.quantizer import make_quantizer

    c, f, t, rows, cols = 3, 8, 64, 3, 14
    L = t // f
    tissue = np.zeros((rows, cols), bool)
    tissue[0:2, 1:4] = tissue[2, 0] = tissue[1, 8:10] = tissue[2, 12:14] = True
    g = torch.Generator().manual_seed(3)
    coords = [(int(r), int(k)) for r, k in zip(*np.nonzero(tissue))]
    z = torch.randn((len(coords), c, L, L), generator=g) * torch.tensor([0.5, 1.0, 2.0])[None, :, None, None]
    q = make_quantizer("uniform", levels=16, per_channel=True).fit(z)
    stored = dict(zip(coords, q.quantize(z)))
    stored[(1, 2)] = np.zeros((c, L, L), np.uint8)  # a tissue tile whose values are all index 0
    for rc in [(1, 8), (1, 9)]:  # shard (0, 2) with S = 4: nothing stored at all
        stored[rc] = np.zeros((c, L, L), np.uint8)
    info = ModelInfo(model_id="test", model_class="tests.None", latent_channels=c, spatial_factor=f,
                     input_range=(-1.0, 1.0), latent_range=None, weights_sha256="0" * 64, decoder_sha256="0" * 64)
    grid = {"tile_size": t, "width": cols * t - 5, "height": rows * t - 40, "rows": rows, "cols": cols,
            "target_mpp": 0.5, "source_mpp": 0.25, "objective_power": 40.0, "level": 0, "origin_x": 0,
            "origin_y": 0, "scale": 2.0}
    path = tmp_path_factory.mktemp("conformance-pc") / "pc.pzarr"
    background = q.quantize(torch.full((1, c, L, L), 0.7))[0]
    with ContainerWriter(path, grid=grid, model=info, quantizer=q, tissue=tissue, background=background,
                         shard_tiles=4, glass=(240, 238, 241), encode_margin_px=8,
                         resolution={"target_mpp": 0.5, "source_mpp": 0.25, "archived_mpp": 0.5}) as w:
        for rc, s in stored.items():
            w.write_tile(*rc, s)
    assert zarr.open_group(path, mode="r").attrs["pzarr"]["layout"]["zero_shards"] == [[0, 2]]
    return path


def library(path: Path):
    from wsicodec.format import Container

    return Container.open(path)


def library_window(c, row: int, col: int, halo: int) -> np.ndarray:
    """wsicodec's side: Container.quantizer.dequantize(Container.read_latents(window))."""
    L = c.tile_cells
    stored = c.read_latents(row * L - halo, col * L - halo, (row + 1) * L + halo, (col + 1) * L + halo)
    return c.quantizer.dequantize(stored).numpy()


def test_the_reader_uses_no_wsicodec():
    source = Path(__file__).read_text(encoding="utf-8")
    reader = source[:source.index("# " + "-" * 74 + " end of the reader")]
    body = reader.split('"""', 2)[2]  # past the module docstring
    assert "import wsicodec" not in body and "from wsicodec" not in body


@pytest.mark.parametrize("variant", ["directory", "zip"])
def test_reader_opens_and_checks_every_key(compressed, variant):
    r = SpecReader(compressed[variant])
    try:
        assert r.attrs["version"] == "1.1" and r.manifest is not None
        assert "zarr.json" in r.manifest["keys"] and "latents/c/0/0/0" in r.manifest["keys"]
        assert r.tissue.any() and not r.tissue.all()
        assert r.codebook is not None and r.codebook.shape == (1, 256)
        glass = r.attrs["glass"]
        assert r.glass == tuple(glass.get("paint_rgb", glass["rgb"]))  # section 7: the paint colour when recorded
    finally:
        r.close()


def test_zip_and_directory_hold_the_same_arrays(compressed):
    a, b = SpecReader(compressed["directory"]), SpecReader(compressed["zip"])
    try:
        np.testing.assert_array_equal(a.tissue, b.tissue)
        np.testing.assert_array_equal(a.codebook, b.codebook)
        np.testing.assert_array_equal(a.background, b.background)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("variant", ["directory", "zip"])
def test_dequantised_halo_windows_equal_the_library_bit_for_bit(compressed, variant):
    path = compressed[variant]
    r, lib = SpecReader(path), library(path)
    try:
        tiles = list(zip(*np.nonzero(r.tissue)))
        assert len(tiles) > 5
        for row, col in tiles:
            ours = r.dequantise(r.window(row, col, 3))
            theirs = library_window(lib, row, col, 3)
            assert ours.dtype == theirs.dtype == np.float32 and ours.shape == (r.C, r.L + 6, r.L + 6)
            np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg=f"{row},{col}")
            # section 3.1.1 by hand gives what Zarr gives
            np.testing.assert_array_equal(r.tile_by_hand(row, col),
                                          r.latents[:, row * r.L:(row + 1) * r.L, col * r.L:(col + 1) * r.L])
        # halos reaching past the neighbours and the mosaic, and none at all
        for row, col in [tiles[0], tiles[-1], (0, 0)]:
            for halo in (0, r.L + 5):
                np.testing.assert_array_equal(r.dequantise(r.window(row, col, halo)),
                                              library_window(lib, row, col, halo))
    finally:
        r.close()
        lib.close()


def test_per_channel_codebook_zero_tiles_and_zero_shards(per_channel):
    r, lib = SpecReader(per_channel), library(per_channel)
    try:
        assert r.per_channel and r.codebook.shape == (3, 16)
        assert r.raw.read("latents/c/0/0/2") is None  # the zero shard is not stored
        assert not r.tile_by_hand(1, 2).any() and not r.tile_by_hand(1, 8).any()
        for row in range(-1, r.rows + 1):
            for col in range(-1, r.cols + 1):
                for halo in (2, 9):
                    np.testing.assert_array_equal(r.dequantise(r.window(row, col, halo)),
                                                  library_window(lib, row, col, halo),
                                                  err_msg=f"{row},{col},{halo}")
        # a tissue tile stored as all-0 is index 0 of each channel's codebook, not the background
        w = r.dequantise(r.window(1, 2, 0))
        np.testing.assert_array_equal(w, np.broadcast_to(r.codebook[:, :1, None], w.shape))
        assert r.glass == (240, 238, 241)
    finally:
        r.close()
        lib.close()


def test_reader_refuses_damage(compressed, tmp_path):
    import shutil

    p = tmp_path / "damaged.pzarr"
    shutil.copytree(compressed["directory"], p)
    shard = p / "latents" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(SpecError, match="latents/c/0/0/0: does not match the manifest"):
        SpecReader(p)
    (p / "stray").write_bytes(b"x")
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(SpecError, match="latents/c/0/0/0"):
        SpecReader(p)


@pytest.mark.parametrize("damage", ["version-bit", "true-halo", "integrity-metadata", "version-1.1.0"])
def test_reader_and_library_refuse_the_same_rule_breaks(compressed, tmp_path, damage):
    """Sections 3.6, 4 and 5.1: both refuse a 1.1 container saying "1.0", a sealed `true` halo, an edited
    integrity/zarr.json and a version with three parts."""
    import shutil

    from test_container import _edit_root_attrs

    from wsicodec.errors import ContainerError
    from wsicodec.format import Container

    p = Path(shutil.copytree(compressed["directory"], tmp_path / "c.pzarr"))
    if damage == "version-bit":
        doc = (p / "zarr.json").read_bytes()
        at = doc.index(b'"version": "1.1"') + len(b'"version": "1.')
        (p / "zarr.json").write_bytes(doc[:at] + bytes([doc[at] ^ 1]) + doc[at + 1:])
    elif damage == "true-halo":
        _edit_root_attrs(p, lambda a: a["encoding"].update(decode_halo_cells=True))
    elif damage == "integrity-metadata":
        meta = json.loads((p / "integrity" / "zarr.json").read_text())
        meta["attributes"]["media_type"] = "application/octet-stream"
        (p / "integrity" / "zarr.json").write_text(json.dumps(meta))
    else:
        _edit_root_attrs(p, lambda a: a.update(version="1.1.0"))
    with pytest.raises(SpecError):
        SpecReader(p)
    with pytest.raises(ContainerError):
        Container.open(p)


def spec_decoder(r: SpecReader):
    """The container's diffusers model, rebuilt as section 8 says and checked by its hashes (section 8.1)."""
    import torch
    from diffusers import AutoencoderTiny

    model = r.attrs["model"]
    assert model["class"] == "diffusers.AutoencoderTiny" and model["config"]["_class_name"] == "AutoencoderTiny"
    vae = AutoencoderTiny.from_pretrained(model["source"]).float().eval()
    state = vae.state_dict()
    assert state_dict_sha256({k: v.float() for k, v in state.items()}) == model["weights_sha256"]
    assert state_dict_sha256({k: v.float() for k, v in state.items()
                              if k.startswith(("decoder.", "post_quant_conv."))}) == model["decoder_sha256"]

    def decode(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return vae.decode(torch.from_numpy(z)).sample.numpy()

    return decode


def spec_and_library_images(path: Path, tiny_model_dir: Path, halo: int | None = None, blend: int | None = None):
    """Section 7 by the reader above and wsicodec's TileDecoder, each with the container's H and b (or the
    reader's own choice, section 7's MAY)."""
    from wsicodec.format import Container
    from wsicodec.models import load_model
    from wsicodec.pipeline.decoder import TileDecoder

    r = SpecReader(path)
    try:
        h0, b0 = r.decode_parameters()
        halo, blend = (h0 if halo is None else halo), (b0 if blend is None else blend)
        ours = r.image(spec_decoder(r), halo=halo, blend=blend)
        g = r.attrs["grid"]
        assert ours.shape == (g["height"], g["width"], 3)
    finally:
        r.close()
    with Container.open(path) as c:
        dec = TileDecoder(c, load_model(str(tiny_model_dir), device="cpu"),  # None: H and b of the container
                          halo=None if halo == h0 else halo, blend=None if blend == b0 else blend)
        assert (dec.halo, dec.blend) == (halo, blend)
        theirs = np.concatenate(list(dec.strips()), axis=0)
    return r, halo, blend, ours, theirs


def assert_same_pixels(ours: np.ndarray, theirs: np.ndarray) -> None:
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    # float32 on the same CPU: equal here (measured: no pixel differs); a tolerance of one level for the
    # odd value that another CPU's convolution kernels, chosen per batch size, might round the other way
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, (diff.max(), (diff > 0).mean())


def test_decode_procedure_gives_the_library_image(compressed, tiny_model_dir):
    """Section 7 end to end with the container's diffusers model, rebuilt as section 8 says; the model
    records H = 3, b = 0, so each tile is the plain crop of its own decode."""
    from wsicodec.pipeline.decoder import HALO

    r, halo, blend, ours, theirs = spec_and_library_images(compressed["directory"], tiny_model_dir)
    assert (halo, blend) == (HALO, 0) == (r.attrs["encoding"]["decode_halo_cells"],
                                          r.attrs["encoding"]["decode_blend_px"])
    assert_same_pixels(ours, theirs)
    T = r.T
    bg_row, bg_col = (int(v[0]) for v in np.nonzero(r.tissue == 0))
    np.testing.assert_array_equal(theirs[bg_row * T:(bg_row + 1) * T, bg_col * T:(bg_col + 1) * T][:4, :4],
                                  np.broadcast_to(np.asarray(r.glass, np.uint8), (4, 4, 3)))


def test_decode_procedure_blends_neighbours_as_the_spec_says(blended, tiny_model_dir):
    """Section 7 with b > 0: extended decodes cropped to [-b, T + b), cross-faded with the tissue neighbours."""
    r, halo, blend, ours, theirs = spec_and_library_images(blended, tiny_model_dir)
    assert (halo, blend) == (10, 16) and blend <= halo * r.f and 2 * blend <= r.T
    assert_same_pixels(ours, theirs)
    # The tiny model sees only a few cells around a pixel, so with H = 10 its neighbouring decodes agree and
    # the cross-fade changes nothing. With a halo too small for it (H = 2, b = 16 = H*f) they disagree near
    # the borders, and the spec's blend still gives the library's pixels.
    r, halo, blend, ours, theirs = spec_and_library_images(blended, tiny_model_dir, halo=2, blend=16)
    assert_same_pixels(ours, theirs)
    *_, plain, plain_lib = spec_and_library_images(blended, tiny_model_dir, halo=2, blend=0)
    assert_same_pixels(plain, plain_lib)
    T, b = r.T, blend
    changed = np.abs(plain.astype(np.int16) - ours.astype(np.int16)).max(axis=2) > 0
    near = np.zeros(changed.shape, bool)  # within b px of a border between two tiles
    for k in range(1, max(r.rows, r.cols)):
        near[max(k * T - b, 0):k * T + b, :] = True
        near[:, max(k * T - b, 0):k * T + b] = True
    assert changed.any() and not (changed & ~near).any()
    # a tile's interior, b px or more from its borders, is its own decode; next to glass too
    for row, col in zip(*np.nonzero(r.tissue)):
        y0, x0 = row * T + b, col * T + b
        np.testing.assert_array_equal(ours[y0:y0 + T - 2 * b, x0:x0 + T - 2 * b],
                                      plain[y0:y0 + T - 2 * b, x0:x0 + T - 2 * b])
    h, w = changed.shape
    for row, col in zip(*np.nonzero(r.tissue)):
        if row + 1 < r.rows and not r.tissue[row + 1, col] and (row + 1) * T < h:
            # the border with a background tile below: nothing blends into the tile's bottom rows
            y1, x0 = (row + 1) * T, col * T + b
            np.testing.assert_array_equal(ours[y1 - b:y1, x0:x0 + T - 2 * b], plain[y1 - b:y1, x0:x0 + T - 2 * b])
            break
    else:
        pytest.fail("no tissue tile above a background tile")


def test_weights_of_the_blend_sum_to_one_across_borders():
    """Section 7, step 7: w rises from 0 to 1 across the 2b band, and two neighbours' ramps sum to 1 there."""
    T, b = 256, 16
    w = SpecReader.ramp(T, b).astype(np.float64)
    assert w.shape == (T + 2 * b,) and w[0] == 0 and w[2 * b] == 1 and (w[2 * b:T] == 1).all()
    # position p = T + d (d in [-b, b)) of tile 0 is p' = d of tile 1: u = T + d and u' = d
    d = np.arange(-b, b)
    np.testing.assert_allclose(w[T + d + b] + w[d + b], 1.0, atol=1e-7)
    assert SpecReader.ramp(T, b).min() >= 0 and w[b] == 0.5  # the tile's own border pixel: weight 1/2


# -------------------------------------------------------------------------- the builtin model's card
def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2-D cross-correlation, stride 1, zero padding k // 2, with bias (float64)."""
    k = w.shape[2]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    h, wd = x.shape[1], x.shape[2]
    out = np.zeros((w.shape[0], h, wd))
    for i in range(k):
        for j in range(k):
            out += np.einsum("oc,chw->ohw", w[:, :, i, j], xp[:, i:i + h, j:j + wd], optimize=True)
    return out + b[:, None, None]


def _shuffle(x: np.ndarray, r: int) -> np.ndarray:
    """out[c, y*r + i, x*r + j] = in[c*r*r + i*r + j, y, x]."""
    c, h, w = x.shape[0] // (r * r), x.shape[1], x.shape[2]
    return x.reshape(c, r, r, h, w).transpose(0, 3, 1, 4, 2).reshape(c, h * r, w * r)


def card_decoder(z: np.ndarray, tensors: dict[str, np.ndarray], cfg: dict) -> np.ndarray:
    """The decoder as docs/model-card-wsicodec-base.md ("Decoder, layer by layer") writes it down."""
    s, widths, blocks = cfg["dec_stem"], cfg["dec_widths"], cfg["dec_blocks"]
    n = int(round(math.log2(cfg["factor"] / s))) + 1
    assert len(widths) == len(blocks) == n
    i = 0

    def p(name: str) -> np.ndarray:
        return tensors[f"decoder.net.{i}.{name}"].astype(np.float64)

    x = _conv(z.astype(np.float64), p("weight"), p("bias"))
    i += 1
    for stage in range(n):
        if stage:
            x = _conv(x, p("weight"), p("bias"))
            x = _shuffle(x, 2)
            i += 2
        for _ in range(blocks[stage]):
            x = x + _conv(np.maximum(_conv(x, p("conv1.weight"), p("conv1.bias")), 0), p("conv2.weight"),
                          p("conv2.bias"))
            i += 1
    x = np.maximum(x, 0)
    i += 1
    x = _conv(x, p("weight"), p("bias"))
    return _shuffle(x, s)


@pytest.mark.parametrize("model_id, card_name", [("wsicodec-base-f8c4-v1", "model-card-wsicodec-base.md"),
                                                  ("wsicodec-base-f8c12-v2", "model-card-wsicodec-base-v2.md")])
def test_builtin_decoder_rebuilt_from_the_model_card(model_id, card_name):
    import torch
    from safetensors import safe_open

    from wsicodec.models.builtin import BUILTIN_MODELS, load_builtin

    path = REPO / "wsicodec" / "models" / "weights" / BUILTIN_MODELS[model_id]
    with safe_open(str(path), framework="np") as fh:
        cfg = json.loads(fh.metadata()["wsicodec_config"])
        tensors = {k: fh.get_tensor(k).astype(np.float32) for k in fh.keys()}
    rng = np.random.default_rng(0)
    span = min(float(cfg["bound"]), 3.0)  # v2's bound is a safety net; its latents live within a few units
    z = rng.uniform(-span, span, (cfg["latent_channels"], 14, 14)).astype(np.float32)
    ours = card_decoder(z, tensors, cfg)
    lib = load_builtin(model_id, device="cpu")
    with torch.no_grad():
        theirs = lib.net.decoder(torch.from_numpy(z)[None])[0].double().numpy()
    assert ours.shape == theirs.shape == (3, 14 * cfg["factor"], 14 * cfg["factor"])
    assert np.abs(ours - theirs).max() < 1e-4
    # section 7 step 5 on the card's output gives the library's pixels (but for exact .5 ties in float32)
    v = np.rint(np.clip((ours.astype(np.float32) + 1) * np.float32(127.5), 0, 255)).astype(np.uint8)
    px = lib.decode(torch.from_numpy(z)[None])[0].transpose(2, 0, 1)
    assert np.abs(v.astype(int) - px.astype(int)).max() <= 1 and (v != px).mean() < 1e-3
    # the card's hash and the container's record
    assert state_dict_sha256({k: torch.from_numpy(t) for k, t in tensors.items()
                              if k.startswith("decoder.")}) == lib.info.decoder_sha256
    card = (REPO / "docs" / card_name).read_text(encoding="utf-8")
    assert "### Decoder, layer by layer" in card and lib.info.decoder_sha256 in card