"""A written container against formats/pzarr-v1.md: what the spec states, the writer produces.

The attribute table and the example zarr.json documents are read from the spec itself, so a change to
either the writer or the document without the other fails here.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from wsicodec import format as ct
from wsicodec.models.base import ModelInfo
from wsicodec.quant.quantizer import DEFAULT_INT8_RANGE, make_quantizer

SPEC = Path(__file__).resolve().parents[1] / "formats" / "pzarr-v1.md"
ROWS, COLS, C, F, T = 12, 9, 32, 8, 256  # CMU-1-Small-Region's grid with TAEF2's latent shape
L = T // F


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
                    "objective_power": 20.0, "archived_objective_power": 20.0},
        associated={"label": np.zeros((30, 40, 3), np.uint8) + 9, "macro": np.ones((20, 60, 3), np.uint8),
                    "thumbnail": np.full((64, 48, 3), 200, np.uint8)},
        single_file=single_file,
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
    assert sorted(root.array_keys()) == ["background", "codebook", "latents", "tissue_mask"]
    assert sorted(root.group_keys()) == ["associated"]
    assert sorted(root["associated"].array_keys()) == ["label", "macro", "thumbnail"]


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
    assert [c["name"] for c in cfg["codecs"]] == ["bytes", "zstd"]
    assert cfg["codecs"][1]["configuration"]["checksum"] is False
    assert [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
    assert cfg["index_location"] == "end"
    assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
    assert meta["dimension_names"] == ["channel", "y", "x"]

    tm = root["tissue_mask"]
    assert tm.dtype == np.uint8 and tm.shape == (ROWS, COLS) and tm.chunks == (ROWS, COLS)
    assert set(np.unique(tm[...])) == {0, 1}
    cb = root["codebook"]
    attrs = root.attrs["pzarr"]
    k = C if attrs["quantizer"]["per_channel"] else 1
    assert cb.dtype == np.float32 and cb.shape == (k, attrs["quantizer"]["levels"])
    assert np.all(np.diff(cb[...], axis=1) >= 0)  # each row sorted ascending
    bg = root["background"]
    assert bg.dtype == lat.dtype and bg.shape == (C, L, L)
    for name in ("tissue_mask", "codebook", "background"):
        m = json.loads((written / name / "zarr.json").read_text())
        assert [c["name"] for c in m["codecs"]] == ["bytes", "zstd"], name
        assert m["chunk_key_encoding"]["configuration"]["separator"] == "/"


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
        assert [c["name"] for c in m["codecs"]] == ["bytes"]  # no second compression


_TYPES = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "object": dict,
          "array": list, "null": type(None)}


def test_every_attribute_in_the_spec_table_is_present_with_its_type(written):
    table = attribute_table()
    assert len(table) > 50  # the table was found and parsed
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


def test_attribute_values_follow_the_spec(written):
    attrs = zarr.open_group(written, mode="r").attrs["pzarr"]
    assert attrs["format"] == "pzarr" and attrs["version"] == ct.FORMAT_VERSION == "1.0"
    assert attrs["complete"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", attrs["created"])
    assert attrs["tiles"] == {"tissue": int(tissue().sum()), "total": ROWS * COLS}
    assert attrs["layout"]["tile_cells"] == attrs["grid"]["tile_size"] // attrs["model"]["spatial_factor"]
    assert attrs["layout"]["channels"] == attrs["model"]["latent_channels"]
    assert attrs["layout"]["shard_tiles"] == ct.SHARD_TILES
    assert attrs["quantizer"]["dtype"] == "uint8"
    assert attrs["source"]["properties"]["aperio.AppMag"] == "20"
    assert attrs["resolution"]["archived_objective_power"] == 20.0


def test_root_example_in_the_spec_has_the_table_keys():
    example = json_examples()[0]["attributes"]["pzarr"]
    table = attribute_table()
    for key in table:
        node = example
        for part in key.split("."):
            assert part in node, f"spec example lacks pzarr.{key}"
            node = node[part]


def test_latents_example_in_the_spec_is_what_the_writer_writes(written):
    example = json_examples()[1]
    actual = json.loads((written / "latents" / "zarr.json").read_text())
    level = actual["codecs"][0]["configuration"]["codecs"][1]["configuration"]["level"]
    assert level == ct.ZSTD_LEVEL
    assert actual == example


def test_spec_states_the_writers_constants():
    text = spec_text()
    assert f"**zstd level {ct.ZSTD_LEVEL}.**" in text
    assert f"**Shards of {ct.SHARD_TILES} × {ct.SHARD_TILES} tiles.**" in text
    assert "unsupported .pzarr format version X (this wsicodec reads 1.x); upgrade wsicodec" in text
    assert ".<name>.partial-<pid>" in text
    lo, hi = DEFAULT_INT8_RANGE
    assert f"else `[{lo:g}, {hi:g}]`" in text


def test_reading_a_tile_by_hand_as_the_spec_describes(written):
    """Section 3.1.1: key, trailing index, entry number, one zstd frame, C order."""
    from numcodecs.zstd import Zstd

    root = zarr.open_group(written, mode="r")
    s = root.attrs["pzarr"]["layout"]["shard_tiles"]
    row, col = 5, 3
    data = (written / "latents" / "c" / "0" / str(row // s) / str(col // s)).read_bytes()
    index = np.frombuffer(data[-(16 * s * s + 4):-4], dtype="<u8").reshape(-1, 2)
    offset, nbytes = index[(row % s) * s + (col % s)]
    tile = np.frombuffer(Zstd().decode(data[offset:offset + nbytes]), dtype=np.uint8).reshape(C, L, L)
    np.testing.assert_array_equal(tile, root["latents"][:, row * L:(row + 1) * L, col * L:(col + 1) * L])
    # dequantisation: value = codebook[channel or 0][index]
    cb = root["codebook"][...]
    ch = np.arange(C)[:, None, None] if cb.shape[0] > 1 else 0
    q = ct.Container.open(written).quantizer
    np.testing.assert_array_equal(cb[ch, tile], q.dequantize(tile).numpy())
    # a background tile has the "no chunk" marker
    empty = index[0]  # tile (0, 0) is background
    assert tuple(empty) == (2**64 - 1, 2**64 - 1)


def test_zip_variant_has_the_same_keys_stored_uncompressed(tmp_path, written):
    path = tmp_path / "cmu.pzarr"
    write_container(path, single_file=True)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    dir_keys = sorted(p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file())
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == dir_keys
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    root = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    assert root.attrs["pzarr"]["complete"] is True


def test_none_quantizer_stores_float16_and_no_codebook(tmp_path):
    path = tmp_path / "f16.pzarr"
    write_container(path, quant="none")
    root = zarr.open_group(path, mode="r")
    assert root["latents"].dtype == np.float16 and root["background"].dtype == np.float16
    assert "codebook" not in root
    meta = json.loads((path / "latents" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"][0]
    assert inner == {"name": "bytes", "configuration": {"endian": "little"}}
    attrs = root.attrs["pzarr"]
    assert attrs["quantizer"]["kind"] == "none" and attrs["quantizer"]["dtype"] == "float16"
    assert attrs["quantizer"]["levels"] == 0


def test_container_from_the_compress_pipeline_follows_the_spec(synthetic_slide, tmp_path):
    """Not only the writer on its own: what `compress` records meets the attribute table too."""
    from diffusers import AutoencoderTiny

    from wsicodec.pipeline.compress import compress

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(model_dir)
    out = tmp_path / "synthetic.pzarr"
    compress(synthetic_slide, out, model=str(model_dir))
    attrs = zarr.open_group(out, mode="r").attrs["pzarr"]
    check_attributes(attrs)
    assert attrs["source"]["sha256"] and len(attrs["source"]["sha256"]) == 64
    assert attrs["complete"] is True
