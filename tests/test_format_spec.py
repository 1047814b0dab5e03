"""A written container against formats/pzarr-v1.md (format 1.1): what the spec states, the writer produces.

The attribute table, the example zarr.json documents and the example integrity manifest are read from the
spec itself, so a change to either the writer or the document without the other fails here. The spec's
decode procedure is checked against the library by tests/test_conformance.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from wsicodec import format as ct
from wsicodec.errors import ContainerError
from wsicodec.models.base import ModelInfo
from wsicodec.quant.quantizer import DEFAULT_INT8_RANGE, make_quantizer

SPEC = Path(__file__).resolve().parents[1] / "formats" / "pzarr-v1.md"
ROWS, COLS, C, F, T = 12, 9, 32, 8, 256  # CMU-1-Small-Region's grid with TAEF2's latent shape
L = T // F
GLASS = (243, 243, 245)
MARGIN = 32
# what `compress` passes the writer for a TAEF2 container (pipeline/compress.py): tile choice and decode hints
ENCODING = {"tissue_threshold": 0.001, "all_tiles": False, "decode_halo_cells": 10, "decode_blend_px": 16,
            "kept_at_full_resolution": 3}


# CRC-32C written from its definition lives with the spec-only reader; this test uses the same one
from test_conformance import crc32c  # noqa: E402


def canonical(obj) -> bytes:
    """Section 5.3's canonical JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def stored_keys(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def attribute_table() -> dict[str, str]:
    """`key` -> type column of the spec's root-attribute table."""
    rows = {}
    text = spec_text()
    section = text[text.index("## 4. Root attributes"):text.index("### 4.1")]
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z_.]+)` \| ([a-z\\|]+) \|", line)
        if m:
            rows[m.group(1)] = m.group(2).replace("\\", "")  # "integer\|null" -> "integer|null"
    return rows


def json_examples() -> list[dict]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", spec_text(), flags=re.S)]


def tissue() -> np.ndarray:
    m = np.zeros((ROWS, COLS), bool)
    m[2:10, 1:7] = True
    return m


def grid():
    d = {"tile_size": T, "width": 2220, "height": 2967, "rows": ROWS, "cols": COLS, "target_mpp": 0.5,
         "source_mpp": 0.499, "objective_power": 20.0, "level": 0, "origin_x": 0, "origin_y": 0, "scale": 1.0}
    try:
        from wsicodec.source.slide import TileGrid

        return TileGrid.from_json(d)
    except Exception:  # the slide module's TileGrid is what compress passes; a dict is accepted too
        return d


def write_container(path: Path, quant: str = "kmeans", single_file: bool = False) -> None:
    g = torch.Generator().manual_seed(0)
    info = ModelInfo(model_id="taef2", model_class="wsicodec.TAEF2", latent_channels=C, spatial_factor=F,
                     input_range=(0.0, 1.0), latent_range=(-3.0, 3.0), weights_sha256="1" * 64,
                     decoder_sha256="2" * 64, config={"width": 64}, source="weights/taef2")
    mask = tissue()
    z = torch.randn((int(mask.sum()), C, L, L), generator=g)
    q = make_quantizer(quant, latent_range=info.latent_range).fit(z)
    stored = q.quantize(z)
    with ct.ContainerWriter(
        path, grid=grid(), model=info, quantizer=q, tissue=mask, background=stored[0],
        source={"filename": "CMU-1-Small-Region.svs", "size": 1938955, "sha256": "3" * 64, "vendor": "aperio",
                "dimensions": [2220, 2967], "properties": {"openslide.vendor": "aperio", "aperio.AppMag": "20"}},
        resolution={"target_mpp": 0.5, "source_mpp": 0.499, "mpp_source": "openslide.mpp-x",
                    "objective_power": 20.0, "archived_objective_power": 20.0, "archived_mpp": 0.499},
        associated={"label": np.zeros((30, 40, 3), np.uint8) + 9, "macro": np.ones((20, 60, 3), np.uint8),
                    "thumbnail": np.full((64, 48, 3), 200, np.uint8)},
        single_file=single_file, glass=GLASS, encode_margin_px=MARGIN, encoding=ENCODING,
    ) as w:
        for (r, c), s in zip(zip(*np.nonzero(mask)), stored):
            w.write_tile(r, c, s)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "cmu.pzarr"
    write_container(path)
    return path


def test_opens_with_plain_zarr_and_has_the_specified_nodes(written):
    root = zarr.open_group(written, mode="r")  # no wsicodec needed to open it
    assert sorted(root.array_keys()) == ["background", "codebook", "integrity", "latents", "tissue_mask"]
    assert sorted(root.group_keys()) == ["associated"]
    assert sorted(root["associated"].array_keys()) == ["label", "macro", "thumbnail"]


def codec_names(codecs: list[dict]) -> list[str]:
    return [c["name"] for c in codecs]


def test_arrays_have_the_specified_dtype_shape_chunks_and_codecs(written):
    root = zarr.open_group(written, mode="r")
    lat = root["latents"]
    s = ct.SHARD_TILES
    assert lat.dtype == np.uint8 and lat.shape == (C, ROWS * L, COLS * L)
    assert lat.shards == (C, s * L, s * L) and lat.chunks == (C, L, L)
    assert lat.fill_value == 0
    meta = json.loads((written / "latents" / "zarr.json").read_text())
    (shard,) = meta["codecs"]
    assert shard["name"] == "sharding_indexed"
    cfg = shard["configuration"]
    assert codec_names(cfg["codecs"]) == ["bytes", "zstd", "crc32c"]
    assert cfg["codecs"][1]["configuration"] == {"level": ct.ZSTD_LEVEL, "checksum": False}
    assert cfg["codecs"][2] == {"name": "crc32c"}  # no configuration
    assert codec_names(cfg["index_codecs"]) == ["bytes", "crc32c"]
    assert cfg["index_codecs"][0] == {"name": "bytes", "configuration": {"endian": "little"}}
    assert cfg["index_location"] == "end"
    assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
    assert meta["dimension_names"] == ["channel", "y", "x"]

    tm = root["tissue_mask"]
    assert tm.dtype == np.uint8 and tm.shape == (ROWS, COLS) and tm.chunks == (ROWS, COLS)
    assert set(np.unique(tm[...])) == {0, 1}
    cb = root["codebook"]
    attrs = root.attrs["pzarr"]
    k = C if attrs["quantizer"]["per_channel"] else 1
    assert cb.dtype == np.float32 and cb.shape == (k, attrs["quantizer"]["levels"]) and cb.chunks == cb.shape
    assert np.all(np.diff(cb[...], axis=1) >= 0) and np.isfinite(cb[...]).all()  # rows sorted, finite
    bg = root["background"]
    assert bg.dtype == lat.dtype and bg.shape == (C, L, L) and bg.chunks == bg.shape
    for name, dims in (("tissue_mask", ["row", "col"]), ("codebook", ["channel", "level"]),
                       ("background", ["channel", "y", "x"])):
        m = json.loads((written / name / "zarr.json").read_text())
        assert codec_names(m["codecs"]) == ["bytes", "zstd", "crc32c"], name
        assert m["codecs"][1]["configuration"] == {"level": ct.ZSTD_LEVEL, "checksum": False}, name
        assert m["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}, name
        assert m["fill_value"] == 0 and m["dimension_names"] == dims, name
    # multi-byte types say little-endian, single bytes say nothing
    assert json.loads((written / "codebook" / "zarr.json").read_text())["codecs"][0] == \
        {"name": "bytes", "configuration": {"endian": "little"}}
    assert json.loads((written / "tissue_mask" / "zarr.json").read_text())["codecs"][0] == {"name": "bytes"}


def test_every_chunk_ends_with_its_crc32c(written):
    """Section 3: the crc32c codec appends the little-endian CRC-32C of the bytes before it."""
    from numcodecs.zstd import Zstd

    for key in ("tissue_mask/c/0/0", "codebook/c/0/0", "background/c/0/0/0", "integrity/c/0",
                "associated/label/c/0"):
        data = (written / key).read_bytes()
        assert int.from_bytes(data[-4:], "little") == crc32c(data[:-4]), key
    # the payload before the checksum: one zstd frame for the small arrays, the raw bytes for the others
    mask = np.frombuffer(Zstd().decode((written / "tissue_mask/c/0/0").read_bytes()[:-4]), np.uint8)
    np.testing.assert_array_equal(mask.reshape(ROWS, COLS), tissue().astype(np.uint8))
    png = (written / "associated/label/c/0").read_bytes()[:-4]
    assert png.startswith(b"\x89PNG")


def test_associated_images_are_image_files_in_byte_arrays(written):
    """Section 3.5: a 1-D uint8 array holding a PNG (label) or JPEG file; attributes say which and its size."""
    from PIL import Image

    root = zarr.open_group(written, mode="r")
    expected = {"label": ("image/png", b"\x89PNG", (30, 40)), "macro": ("image/jpeg", b"\xff\xd8", (20, 60)),
                "thumbnail": ("image/jpeg", b"\xff\xd8", (64, 48))}
    for name, (media, magic, (h, w)) in expected.items():
        a = root["associated"][name]
        assert a.dtype == np.uint8 and a.ndim == 1 and a.chunks == a.shape
        assert dict(a.attrs) == {"media_type": media, "width": w, "height": h, "lossless": media == "image/png"}
        blob = a[...].tobytes()
        assert blob.startswith(magic)
        with Image.open(io.BytesIO(blob)) as im:
            assert im.size == (w, h) and im.mode == "RGB"
        m = json.loads((written / "associated" / name / "zarr.json").read_text())
        assert codec_names(m["codecs"]) == ["bytes", "crc32c"]  # no second compression


# ------------------------------------------------------------------------------------ integrity (5.3)
def read_manifest(path: Path) -> tuple[bytes, dict]:
    raw = zarr.open_group(path, mode="r")["integrity"][...].tobytes()
    return raw, json.loads(raw.decode("ascii"))


def test_integrity_array_is_as_specified(written):
    """Section 3.6: 1-D uint8, one chunk, bytes + crc32c, media type application/json, canonical JSON."""
    root = zarr.open_group(written, mode="r")
    a = root["integrity"]
    assert a.dtype == np.uint8 and a.ndim == 1 and a.chunks == a.shape and a.fill_value == 0
    assert dict(a.attrs) == {"media_type": "application/json"}
    meta = json.loads((written / "integrity" / "zarr.json").read_text())
    assert codec_names(meta["codecs"]) == ["bytes", "crc32c"]
    assert meta["dimension_names"] == ["byte"]
    assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
    raw, manifest = read_manifest(written)
    assert raw == canonical(manifest)  # stored as canonical JSON: ASCII, sorted, no whitespace
    assert (written / "integrity" / "c" / "0").read_bytes()[:-4] == raw


def test_manifest_is_sealed_and_lists_every_other_key(written):
    raw, m = read_manifest(written)
    assert set(m) == {"format", "version", "algorithm", "write_id", "keys", "self_sha256"}
    assert m["format"] == "pzarr-integrity" and m["version"] == 1 and m["algorithm"] == "sha256"
    body = {k: v for k, v in m.items() if k != "self_sha256"}
    assert m["self_sha256"] == hashlib.sha256(canonical(body)).hexdigest()
    attrs = zarr.open_group(written, mode="r").attrs["pzarr"]
    assert attrs["integrity"] == {"array": "integrity", "algorithm": "sha256", "write_id": m["write_id"]}
    assert re.fullmatch(r"[0-9a-f]{32}", m["write_id"])
    keys = [k for k in stored_keys(written) if not k.startswith("integrity/")]
    assert sorted(m["keys"]) == keys and "zarr.json" in keys and "latents/c/0/0/0" in keys
    for key in keys:
        data = (written / key).read_bytes()
        assert m["keys"][key] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, key
    # the root document sealed is the final one: complete, with the same write_id
    root_doc = json.loads((written / "zarr.json").read_text())["attributes"]["pzarr"]
    assert root_doc["complete"] is True and root_doc["integrity"]["write_id"] == m["write_id"]


def test_manifest_example_in_the_spec_is_sealed():
    """The spec's example manifest: its seal is real, so other implementations can test their canonical JSON."""
    (example,) = [e for e in json_examples() if e.get("format") == "pzarr-integrity"]
    body = {k: v for k, v in example.items() if k != "self_sha256"}
    assert example["self_sha256"] == hashlib.sha256(canonical(body)).hexdigest()
    assert set(example) == {"format", "version", "algorithm", "write_id", "keys", "self_sha256"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tamper_root(path: Path, edit) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    edit(doc["attributes"]["pzarr"])
    (path / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("damage", ["unsealed-manifest", "other-write-id", "missing-key", "short-key",
                                    "edited-metadata", "no-integrity-array"])
def test_readers_refuse_what_the_integrity_checks_catch(written, tmp_path, damage):
    """Section 5.3's MUSTs, as wsicodec applies them at open."""
    p = _copy(written, tmp_path / "c.pzarr")
    raw, m = read_manifest(p)
    if damage == "unsealed-manifest":
        m["keys"]["zarr.json"]["size"] += 1  # a changed manifest without a new seal
        a = zarr.open_group(p, mode="r+")["integrity"]
        blob = np.frombuffer(canonical(m), np.uint8)
        zarr.open_group(p, mode="r+").create_array(
            "integrity", shape=blob.shape, dtype="uint8", chunks=blob.shape, overwrite=True,
            compressors=[zarr.codecs.Crc32cCodec()], fill_value=0, attributes=dict(a.attrs),
            dimension_names=["byte"], chunk_key_encoding=ct.spec.CHUNK_KEY_ENCODING)[...] = blob
        match = "seal"
    elif damage == "other-write-id":
        _tamper_root(p, lambda a: a["integrity"].update(write_id="0" * 32))
        match = "different writes"
    elif damage == "missing-key":
        (p / "background" / "c" / "0" / "0" / "0").unlink()
        match = "background/c/0/0/0: missing"
    elif damage == "short-key":
        data = (p / "tissue_mask" / "c" / "0" / "0").read_bytes()
        (p / "tissue_mask" / "c" / "0" / "0").write_bytes(data[:-1])
        match = "tissue_mask/c/0/0: size"
    elif damage == "edited-metadata":
        doc = (p / "latents" / "zarr.json").read_text()
        (p / "latents" / "zarr.json").write_text(doc.replace('"channel"', '"Channel"'))
        match = "latents/zarr.json: SHA-256"
    else:
        shutil.rmtree(p / "integrity")
        match = "integrity manifest is missing"
    with pytest.raises(ContainerError, match=match):
        ct.Container.open(p)


def as_format_1_0(src: Path, dst: Path) -> Path:
    """What a 1.0 writer (wsicodec 0.1) made of the same slide: every array and chunk as in ``src`` but with no
    crc32c in any codec chain, no integrity array and none of 1.1's root attributes (section 5.1)."""
    old = zarr.open_group(src, mode="r")
    a = json.loads(json.dumps(old.attrs["pzarr"]))
    a["version"] = "1.0"
    for key in ("integrity", "glass", "encoding"):
        a.pop(key)
    a["resolution"].pop("archived_mpp")
    new = zarr.open_group(dst, mode="w", zarr_format=3, attributes={"pzarr": a})

    def copy(group_old, group_new, name):
        arr = group_old[name]
        if name == "integrity":
            return
        compressors = [c for c in arr.compressors if not isinstance(c, zarr.codecs.Crc32cCodec)]
        out = group_new.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.chunks, shards=arr.shards,
                                     compressors=compressors, fill_value=0, chunk_key_encoding=ct.spec.CHUNK_KEY_ENCODING,
                                     dimension_names=arr.metadata.dimension_names, attributes=dict(arr.attrs),
                                     config={"write_empty_chunks": name != "latents"})
        out[...] = arr[...]

    for name in old.array_keys():
        copy(old, new, name)
    if "associated" in old:
        grp = new.create_group("associated")
        for name in old["associated"].array_keys():
            copy(old["associated"], grp, name)
    for doc in (json.loads(p.read_text()) for p in dst.rglob("zarr.json")):  # the shard index keeps its CRC
        chains = [doc.get("codecs") or []] + [c["configuration"]["codecs"] for c in doc.get("codecs") or []
                                               if c["name"] == "sharding_indexed"]
        assert "crc32c" not in [c["name"] for chain in chains for c in chain]
    return dst


def test_a_1_0_container_opens_with_a_warning_about_checksums(written, tmp_path):
    """Section 5.1: a 1.0 container (no integrity attribute or array, no crc32c) still opens, with a UserWarning,
    and reads the same stored values."""
    p = as_format_1_0(written, tmp_path / "old.pzarr")
    with pytest.warns(UserWarning, match="checksums"):
        c = ct.Container.open(p)
    assert c.attrs["version"] == "1.0" and not c.checksummed
    np.testing.assert_array_equal(c.read_tile(5, 3), zarr.open_group(written, mode="r")["latents"][
        :, 5 * L:6 * L, 3 * L:4 * L])
    assert c.verify() == []


def test_the_integrity_metadata_the_spec_pins_is_the_one_written(written):
    """Section 3.6's exact integrity/zarr.json, with N filled in, is what the writer writes and the reader wants."""
    block = re.search(r"```text\n(\{\"zarr_format\": 3, \"node_type\": \"array\", \"shape\": \[N\].*?)```",
                      spec_text(), flags=re.S).group(1)
    n = (written / "integrity" / "c" / "0").stat().st_size - 4
    pinned = json.loads(block.replace("[N]", f"[{n}]"))
    assert pinned == json.loads((written / "integrity" / "zarr.json").read_text())
    assert canonical(pinned) == canonical(ct.spec.integrity_array_metadata(n))


def _flip_version_bit(path: Path) -> None:
    """One bit of the root zarr.json: "1.1" -> "1.0" ('1' is 0x31, '0' is 0x30)."""
    doc = (path / "zarr.json").read_bytes()
    at = doc.index(b'"version": "1.1"') + len(b'"version": "1.')
    (path / "zarr.json").write_bytes(doc[:at] + bytes([doc[at] ^ 0x01]) + doc[at + 1:])
    assert json.loads((path / "zarr.json").read_text())["attributes"]["pzarr"]["version"] == "1.0"


@pytest.mark.parametrize("strip", [(), ("integrity",), ("integrity", "glass", "encoding")])
def test_a_1_1_container_whose_root_says_1_0_is_damage(written, tmp_path, strip):
    """Section 5.1: a single flipped bit must not turn the manifest's checks off. Whatever else the root keeps
    or loses, the integrity array and the crc32c codecs remain, and only 1.1 has them."""
    p = _copy(written, tmp_path / "c.pzarr")
    _flip_version_bit(p)
    if strip:
        _tamper_root(p, lambda a: [a.pop(k) for k in strip] + [a["resolution"].pop("archived_mpp")])
    with pytest.raises(ContainerError, match="root says format version 1.0, but it has .*only format 1.1 has"):
        ct.Container.open(p)
    if strip == ("integrity", "glass", "encoding"):
        shutil.rmtree(p / "integrity")  # no manifest either: the crc32c in the arrays' metadata still tells
        with pytest.raises(ContainerError, match=r"crc32c in \S+/zarr.json"):
            ct.Container.open(p)


@pytest.mark.parametrize("version", ["1.1.0", "1.01", " 1.1", "1.1 ", "v1.1", "1", "1.", "+1.1", "1.1\n", 1.1, None])
def test_a_version_is_exactly_major_dot_minor(written, tmp_path, version):
    """Section 5.1: "MAJOR.MINOR" as a JSON string, digits without leading zeros; anything else is refused."""
    p = _copy(written, tmp_path / "c.pzarr")
    _tamper_root(p, lambda a: a.update(version=version))
    with pytest.raises(ContainerError) as err:
        ct.Container.open(p)
    assert "unsupported .pzarr format version" in str(err.value) and '"MAJOR.MINOR"' in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", [
    ("encoding.decode_halo_cells", True), ("encoding.decode_halo_cells", 3.0), ("encoding.decode_halo_cells", 65),
    ("encoding.decode_blend_px", False), ("grid.tile_size", 256.0), ("tiles.tissue", True),
    ("model.spatial_factor", "8"), ("source.size", 1.5e6), ("layout.zero_shards", [[True, 0]]),
])
def test_integer_fields_are_json_integers(written, tmp_path, field, value):
    """Section 4: an integer field holds a JSON integer (not true, not 3.0), sealed or not."""
    from test_container import _edit_root_attrs

    p = _copy(written, tmp_path / "c.pzarr")
    group, name = field.split(".")
    _edit_root_attrs(p, lambda a: a[group].update({name: value}))  # resealed, as a buggy writer would
    with pytest.raises(ContainerError, match=f"damaged container: {re.escape(field)} is "):
        ct.Container.open(p)


def test_a_sealed_true_halo_is_refused_not_read_as_1(written, tmp_path):
    """`true` is no halo of 1 cell (Python's bool is an int) nor silently the default."""
    from test_container import _edit_root_attrs

    p = _copy(written, tmp_path / "c.pzarr")
    _edit_root_attrs(p, lambda a: a["encoding"].update(decode_halo_cells=True))
    with pytest.raises(ContainerError, match="encoding.decode_halo_cells is true, not an integer"):
        ct.Container.open(p)


@pytest.mark.parametrize("edit", ["codecs", "attributes", "shape", "fill_value", "storage_transformers",
                                  "extra-member", "whitespace"])
def test_integrity_zarr_json_is_pinned(written, tmp_path, edit):
    """Section 3.6: integrity/zarr.json is no key of the manifest; it has one exact content (as parsed JSON)."""
    p = _copy(written, tmp_path / "c.pzarr")
    meta_path = p / "integrity" / "zarr.json"
    doc = json.loads(meta_path.read_text())
    if edit == "codecs":
        doc["codecs"] = [{"name": "bytes"}]  # the CRC-32C dropped from the manifest's chunk
    elif edit == "attributes":
        doc["attributes"]["media_type"] = "text/plain"
    elif edit == "shape":
        doc["shape"] = [doc["shape"][0] + 1]
    elif edit == "fill_value":
        doc["fill_value"] = False  # equal to 0 in Python, not in JSON
    elif edit == "storage_transformers":
        doc["storage_transformers"] = [{"name": "x"}]
    elif edit == "extra-member":
        doc["attributes"]["note"] = "added"
    if edit == "whitespace":  # the same JSON value, written differently: still the prescribed content
        meta_path.write_text(json.dumps(doc, separators=(",", ":")))
        del doc["storage_transformers"]  # may be absent: Zarr reads that as []
        meta_path.write_text(json.dumps(doc))
        ct.Container.open(p).close()
        return
    meta_path.write_text(json.dumps(doc, indent=2))
    with pytest.raises(ContainerError, match="damaged container: integrity/zarr.json is not what the format prescribes"):
        ct.Container.open(p)


def test_a_1_1_container_opens_without_warnings(written):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ct.Container.open(written).close()


# ------------------------------------------------------------------------------------ attributes (4)
_TYPES = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "object": dict,
          "array": list, "null": type(None)}


def test_every_attribute_in_the_spec_table_is_present_with_its_type(written):
    table = attribute_table()
    assert len(table) > 60  # the table was found and parsed
    for key in ("integrity.write_id", "glass.rgb", "encoding.margin_px", "resolution.archived_mpp",
                "encoding.decode_halo_cells", "encoding.decode_blend_px", "encoding.tissue_threshold",
                "encoding.all_tiles", "encoding.kept_at_full_resolution"):
        assert key in table, key
    assert table["encoding.tissue_threshold"] == "number|null"
    check_attributes(zarr.open_group(written, mode="r").attrs["pzarr"])


def check_attributes(attrs: dict) -> None:
    for key, types in attribute_table().items():
        node = attrs
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"pzarr.{key} missing"
            node = node[part]
        allowed = tuple(t for name in types.split("|") for t in np.atleast_1d(_TYPES[name]))
        assert isinstance(node, allowed), f"pzarr.{key}: {type(node).__name__} is not {types}"
        if "integer" in types.split("|") and "number" not in types:
            assert not isinstance(node, bool), key
    # the 1.1 keys' values, as the table describes them
    assert attrs["integrity"]["array"] == "integrity" and attrs["integrity"]["algorithm"] == "sha256"
    assert re.fullmatch(r"[0-9a-f]{32}", attrs["integrity"]["write_id"])
    rgb = attrs["glass"]["rgb"]
    assert len(rgb) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)
    enc, f, t = attrs["encoding"], attrs["model"]["spatial_factor"], attrs["grid"]["tile_size"]
    margin = enc["margin_px"]
    assert margin >= 0 and margin % f == 0
    halo, blend = enc["decode_halo_cells"], enc["decode_blend_px"]
    assert 0 <= halo <= 64 and 0 <= blend <= 256
    assert blend <= halo * f and 2 * blend <= t  # section 7's requirement
    assert (enc["tissue_threshold"] is None) == enc["all_tiles"]
    assert enc["kept_at_full_resolution"] >= 0 and (enc["kept_at_full_resolution"] == 0 or not enc["all_tiles"])
    grid = attrs["grid"]
    assert attrs["resolution"]["archived_mpp"] == pytest.approx(grid["source_mpp"] * grid["scale"], rel=1e-12)


def test_attribute_values_follow_the_spec(written):
    attrs = zarr.open_group(written, mode="r").attrs["pzarr"]
    assert attrs["format"] == "pzarr" and attrs["version"] == ct.FORMAT_VERSION == "1.1"
    assert attrs["complete"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", attrs["created"])
    assert attrs["tiles"] == {"tissue": int(tissue().sum()), "total": ROWS * COLS}
    assert attrs["layout"]["tile_cells"] == attrs["grid"]["tile_size"] // attrs["model"]["spatial_factor"]
    assert attrs["layout"]["channels"] == attrs["model"]["latent_channels"]
    assert attrs["layout"]["shard_tiles"] == ct.SHARD_TILES
    assert attrs["quantizer"]["dtype"] == "uint8"
    assert attrs["source"]["properties"]["aperio.AppMag"] == "20"
    assert attrs["resolution"]["archived_objective_power"] == 20.0
    assert attrs["glass"] == {"rgb": list(GLASS)} and attrs["encoding"] == {**ENCODING, "margin_px": MARGIN}
    assert ct.Container.open(written).glass_rgb == GLASS


def test_root_example_in_the_spec_has_the_table_keys():
    example = json_examples()[0]["attributes"]["pzarr"]
    assert example["version"] == ct.FORMAT_VERSION
    table = attribute_table()
    for key in table:
        node = example
        for part in key.split("."):
            assert part in node, f"spec example lacks pzarr.{key}"
            node = node[part]


def test_root_example_model_config_is_what_taef2_records():
    from wsicodec.models.taesd import TAEF2, build_decoder, build_encoder

    example = json_examples()[0]["attributes"]["pzarr"]["model"]
    info = TAEF2(build_encoder(), build_decoder(), device="cpu").info.to_json()
    for key in ("class", "latent_channels", "spatial_factor", "input_range", "latent_range", "config"):
        assert example[key] == info[key], key


def test_latents_example_in_the_spec_is_what_the_writer_writes(written):
    example = json_examples()[1]
    actual = json.loads((written / "latents" / "zarr.json").read_text())
    level = actual["codecs"][0]["configuration"]["codecs"][1]["configuration"]["level"]
    assert level == ct.ZSTD_LEVEL
    assert actual == example


def test_spec_states_the_writers_constants():
    from wsicodec.models.base import Autoencoder
    from wsicodec.pipeline.decoder import HALO
    from wsicodec.source import tissue as tissue_rules

    text = " ".join(spec_text().split())  # line breaks in the document do not matter
    assert f"Status: version **{ct.FORMAT_VERSION}**." in text
    assert f"**zstd level {ct.ZSTD_LEVEL}.**" in text
    assert f"**Shards of {ct.SHARD_TILES} × {ct.SHARD_TILES} tiles.**" in text
    assert "unsupported .pzarr format version X (this wsicodec reads 1.x); upgrade wsicodec" in text
    assert ".<name>.partial-<host>-<pid>-<random>" in text
    lo, hi = DEFAULT_INT8_RANGE
    assert f"else `[{lo:g}, {hi:g}]`" in text
    assert "`H = 3` and `b = 0` (wsicodec's `HALO`)" in text and HALO == 3
    assert "The margin is by default the model's `encode_margin_px`" in text
    assert f"{Autoencoder.encode_margin_px} archived pixels for the builtin, TAEF2 and diffusers models" in text
    assert f"`--tissue-threshold` (default {tissue_rules.DEFAULT_TISSUE_THRESHOLD:g})" in text
    assert (f"max − min over R, G, B > {tissue_rules.TISSUE_LIKE_SPREAD}, or mean of R, G, B < "
            f"{tissue_rules.TISSUE_LIKE_DARK}") in text


def _row(key: str) -> str:
    """The meaning column of the attribute table's row for ``key``."""
    text = spec_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| `{key}` |")]
    return line


def test_spec_states_the_models_decode_halo_blend_and_margin():
    """Section 4's table and section 7 name the defaults and the models' values the code has."""
    from wsicodec.models.base import Autoencoder
    from wsicodec.models.builtin import BuiltinAutoencoder
    from wsicodec.models.diffusers import DiffusersAutoencoder
    from wsicodec.models.taesd import TAEF2
    from wsicodec.pipeline.decoder import container_blend, container_halo

    text = " ".join(spec_text().split())
    h0, b0 = Autoencoder.decode_halo_cells, Autoencoder.decode_blend_px
    # the builtin and diffusers models keep the base class's values, TAEF2 has its own
    for cls in (BuiltinAutoencoder, DiffusersAutoencoder):
        assert (cls.decode_halo_cells, cls.decode_blend_px, cls.encode_margin_px) == \
            (h0, b0, Autoencoder.encode_margin_px), cls
    assert TAEF2.encode_margin_px == Autoencoder.encode_margin_px
    th, tb = TAEF2.decode_halo_cells, TAEF2.decode_blend_px
    # the table's defaults when absent, and the models' values
    halo_row, blend_row = _row("encoding.decode_halo_cells"), _row("encoding.decode_blend_px")
    assert f"default when absent: {h0}; a value that is not an integer in 0–64 is damage |" in halo_row
    assert f"({h0} for the builtin and diffusers models, {th} for TAEF2)" in halo_row
    assert f"default when absent: {b0}; a value that is not an integer in 0–256 is damage |" in blend_row
    assert f"({b0} for the builtin and diffusers models, {tb} for TAEF2)" in blend_row
    # section 7 says the same
    assert f"`H = {h0}` and `b = {b0}` (wsicodec's `HALO`)" in text
    assert f"the builtin `H = {h0}`, `b = {b0}`; TAEF2 `H = {th}`, `b = {tb}`; the diffusers models " \
           f"`H = {h0}`, `b = {b0}`" in text
    # the example is a TAEF2 container and records TAEF2's values
    example = json_examples()[0]["attributes"]["pzarr"]["encoding"]
    assert (example["decode_halo_cells"], example["decode_blend_px"], example["margin_px"]) == \
        (th, tb, TAEF2.encode_margin_px)
    # the decoder falls back to the defaults for absent values (and for bad ones, which Container.open refuses first)
    class Attrs:
        def __init__(self, enc):
            self.attrs = {} if enc is None else {"encoding": enc}

    for enc in (None, {}, {"margin_px": 32}, {"decode_halo_cells": 65, "decode_blend_px": 257},
                {"decode_halo_cells": -1, "decode_blend_px": -1}, {"decode_halo_cells": 3.0, "decode_blend_px": "8"}):
        assert (container_halo(Attrs(enc)), container_blend(Attrs(enc))) == (h0, b0), enc
    for h, b in ((0, 0), (64, 256), (th, tb)):
        enc = {"decode_halo_cells": h, "decode_blend_px": b}
        assert (container_halo(Attrs(enc)), container_blend(Attrs(enc))) == (h, b)


def test_decoder_refuses_a_blend_the_spec_forbids(written):
    """Section 7: b <= H*f and 2b <= T, or wsicodec refuses to decode."""
    from wsicodec.pipeline.decoder import TileDecoder

    class Model:
        class info:
            spatial_factor = F

    with ct.Container.open(written) as c:
        dec = TileDecoder(c, Model())  # H and b from the container
        assert (dec.halo, dec.blend) == (ENCODING["decode_halo_cells"], ENCODING["decode_blend_px"])
        TileDecoder(c, Model(), halo=2, blend=2 * F)  # b = H*f is allowed
        for halo, blend in ((2, 2 * F + 1), (64, T // 2 + 1)):
            with pytest.raises(ContainerError, match="blend of"):
                TileDecoder(c, Model(), halo=halo, blend=blend)


def test_reading_a_tile_by_hand_as_the_spec_describes(written):
    """Section 3.1.1: key, trailing index and its CRC-32C, entry number, chunk CRC-32C, one zstd frame, C order."""
    from numcodecs.zstd import Zstd

    root = zarr.open_group(written, mode="r")
    s = root.attrs["pzarr"]["layout"]["shard_tiles"]
    row, col = 5, 3
    data = (written / "latents" / "c" / "0" / str(row // s) / str(col // s)).read_bytes()
    index_bytes = data[-(16 * s * s + 4):-4]
    assert int.from_bytes(data[-4:], "little") == crc32c(index_bytes)
    index = np.frombuffer(index_bytes, dtype="<u8").reshape(-1, 2)
    offset, nbytes = (int(v) for v in index[(row % s) * s + (col % s)])
    chunk = data[offset:offset + nbytes]
    assert int.from_bytes(chunk[-4:], "little") == crc32c(chunk[:-4])
    tile = np.frombuffer(Zstd().decode(chunk[:-4]), dtype=np.uint8).reshape(C, L, L)
    np.testing.assert_array_equal(tile, root["latents"][:, row * L:(row + 1) * L, col * L:(col + 1) * L])
    # dequantisation: value = codebook[channel or 0][index]
    cb = root["codebook"][...]
    ch = np.arange(C)[:, None, None] if cb.shape[0] > 1 else 0
    q = ct.Container.open(written).quantizer
    np.testing.assert_array_equal(cb[ch, tile], q.dequantize(tile).numpy())
    # a background tile has the "no chunk" marker
    empty = index[0]  # tile (0, 0) is background
    assert tuple(int(v) for v in empty) == (2**64 - 1, 2**64 - 1)


def test_zip_variant_has_the_same_keys_stored_uncompressed(tmp_path, written):
    path = tmp_path / "cmu.pzarr"
    write_container(path, single_file=True)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == stored_keys(written)
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        names = zf.namelist()
        metadata = [n for n in names if n.endswith("zarr.json")]
        assert names[:len(metadata)] == metadata  # zarr.json documents first
        # the manifest holds for the members' bytes
        manifest = json.loads(zf.read("integrity/c/0")[:-4])
        assert sorted(manifest["keys"]) == [n for n in sorted(names) if not n.startswith("integrity/")]
        for key, rec in manifest["keys"].items():
            blob = zf.read(key)
            assert rec == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}, key
    root = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    assert root.attrs["pzarr"]["complete"] is True
    ct.Container.open(path).close()


def test_none_quantizer_stores_float16_and_no_codebook(tmp_path):
    path = tmp_path / "f16.pzarr"
    write_container(path, quant="none")
    root = zarr.open_group(path, mode="r")
    assert root["latents"].dtype == np.float16 and root["background"].dtype == np.float16
    assert "codebook" not in root
    meta = json.loads((path / "latents" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert inner[0] == {"name": "bytes", "configuration": {"endian": "little"}}
    assert codec_names(inner) == ["bytes", "zstd", "crc32c"]
    bg = json.loads((path / "background" / "zarr.json").read_text())["codecs"]
    assert bg[0] == {"name": "bytes", "configuration": {"endian": "little"}}
    attrs = root.attrs["pzarr"]
    assert attrs["quantizer"]["kind"] == "none" and attrs["quantizer"]["dtype"] == "float16"
    assert attrs["quantizer"]["levels"] == 0


# ------------------------------------------------------------------------------------ models (8)
def spec_state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Section 8.1's recipe, written from the text."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode("utf-8"))
        h.update(str(t.dtype).encode("ascii"))
        dims = [str(int(d)) for d in t.shape]
        shape = "()" if not dims else "(" + dims[0] + ",)" if len(dims) == 1 else "(" + ", ".join(dims) + ")"
        h.update(shape.encode("ascii"))
        h.update(t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes(order="C") if t.numel() else b"")
    return h.hexdigest()


def test_weight_hash_recipe_is_what_the_code_computes():
    from wsicodec.models.base import sha256_of_state_dict

    g = torch.Generator().manual_seed(0)
    state = {"b.weight": torch.randn((3, 2, 3, 3), generator=g), "a.bias": torch.randn((5,), generator=g),
             "c.scale": torch.tensor(1.5), "d.empty": torch.zeros((0, 4)), "e.half": torch.ones(2, dtype=torch.float16),
             "é": torch.arange(4, dtype=torch.int64)}
    assert spec_state_dict_sha256(state) == sha256_of_state_dict(state)


def test_each_family_hashes_the_tensors_the_spec_names(tiny_model_dir):
    """Section 8.1's table: which state dict, which names, float32."""
    from safetensors.numpy import load_file

    from wsicodec.models import load_model
    from wsicodec.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL_ID, WEIGHTS_DIR, load_builtin
    from wsicodec.models.taesd import TAEF2, TAEF2_PUBLISHED_DECODER_SHA256, build_decoder, build_encoder

    text = " ".join(spec_text().split())
    # builtin: the packaged file's tensors as float32; decoder = names starting "decoder."
    packaged = load_file(WEIGHTS_DIR / BUILTIN_MODELS[DEFAULT_MODEL_ID])
    file_state = {k: torch.from_numpy(v).float() for k, v in packaged.items()}
    info = load_builtin(device="cpu").info
    assert info.model_class == "wsicodec.BuiltinCodec"
    assert info.weights_sha256 == spec_state_dict_sha256(file_state)
    decoder_state = {k: v for k, v in file_state.items() if k.startswith("decoder.")}
    assert info.decoder_sha256 == spec_state_dict_sha256(decoder_state)
    assert f"`weights_sha256` `{info.weights_sha256}`" in text and f"`decoder_sha256` `{info.decoder_sha256}`" in text
    # TAEF2: prefixed names for the whole, the decoder's own names for the decoder
    torch.manual_seed(0)
    enc, dec = build_encoder(), build_decoder()
    info = TAEF2(enc, dec, device="cpu").info
    full = {f"encoder.{k}": v.float() for k, v in enc.state_dict().items()}
    full.update({f"decoder.{k}": v.float() for k, v in dec.state_dict().items()})
    assert info.weights_sha256 == spec_state_dict_sha256(full)
    assert info.decoder_sha256 == spec_state_dict_sha256({k: v.float() for k, v in dec.state_dict().items()})
    assert f"`{TAEF2_PUBLISHED_DECODER_SHA256}`" in text
    # diffusers: the whole state dict; the decoder = decoder.* and post_quant_conv.*
    model = load_model(str(tiny_model_dir), device="cpu")
    state = {k: v.float() for k, v in model.vae.state_dict().items()}
    assert model.info.weights_sha256 == spec_state_dict_sha256(state)
    assert model.info.decoder_sha256 == spec_state_dict_sha256(
        {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))})


def test_spec_names_every_model_class_and_its_ranges():
    from wsicodec.models.family import families

    text = spec_text()
    for fam in families():
        for cls in fam.builders.values():
            assert f"**`{cls}`" in text or f"`{cls}`**" in text or f"`{cls}`," in text, cls
    from wsicodec.models.builtin import DEFAULT_CONFIG
    for key in DEFAULT_CONFIG:
        assert f"`{key}`" in text, key


def test_container_from_the_compress_pipeline_follows_the_spec(synthetic_slide, tiny_model_dir, tmp_path):
    """Not only the writer on its own: what `compress` records meets the attribute table too, and its
    `background` is the encoding of a glass tile with the recorded margin (section 3.4)."""
    from wsicodec.models import load_model
    from wsicodec.pipeline.compress import compress, glass_tile_latents

    out = tmp_path / "synthetic.pzarr"
    compress(synthetic_slide, out, model=str(tiny_model_dir))
    root = zarr.open_group(out, mode="r")
    attrs = root.attrs["pzarr"]
    check_attributes(attrs)
    assert attrs["source"]["sha256"] and len(attrs["source"]["sha256"]) == 64
    assert attrs["complete"] is True and attrs["version"] == "1.1"
    c = ct.Container.open(out)
    model = load_model(str(tiny_model_dir), device="cpu")
    glass, margin = tuple(attrs["glass"]["rgb"]), attrs["encoding"]["margin_px"]
    from wsicodec.source.tissue import DEFAULT_TISSUE_THRESHOLD

    enc = attrs["encoding"]
    assert margin == model.encode_margin_px  # the model's margin by default
    assert (enc["decode_halo_cells"], enc["decode_blend_px"]) == (model.decode_halo_cells, model.decode_blend_px)
    assert enc["tissue_threshold"] == DEFAULT_TISSUE_THRESHOLD and enc["all_tiles"] is False
    assert type(enc["kept_at_full_resolution"]) is int
    expected = c.quantizer.quantize(glass_tile_latents(model, attrs["grid"]["tile_size"], glass, margin))[0]
    np.testing.assert_array_equal(root["background"][...], expected)
    assert c.verify() == []
