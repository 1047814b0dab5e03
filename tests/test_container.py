"""The .pzarr container: round trip, no bytes for background, atomic writes, refusing bad containers."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from wsicodec.format import Container, ContainerWriter, stored_tile_bytes
from wsicodec.errors import ContainerError, OutputExistsError
from wsicodec.models.base import ModelInfo
from wsicodec.quant.quantizer import make_quantizer

C, F, T = 4, 8, 64  # channels, spatial factor, tile size -> 8x8 latent cells per tile
TL = T // F
ROWS, COLS = 5, 7
SHARD = 4  # 4x4 tiles per shard -> 2x2 shards on this grid


def model_info() -> ModelInfo:
    return ModelInfo(model_id="test-f8c4", model_class="tests.Tiny", latent_channels=C, spatial_factor=F,
                     input_range=(0.0, 1.0), latent_range=(-3.0, 3.0), weights_sha256="a" * 64,
                     decoder_sha256="b" * 64, config={"note": "test"}, source="tests")


def grid_json() -> dict:
    return {"tile_size": T, "width": COLS * T - 10, "height": ROWS * T - 20, "rows": ROWS, "cols": COLS,
            "target_mpp": 0.5, "source_mpp": 0.25, "objective_power": 40.0, "level": 0,
            "origin_x": 0, "origin_y": 0, "scale": 2.0}


def tissue_mask() -> np.ndarray:
    m = np.ones((ROWS, COLS), dtype=bool)
    m[0, :3] = False  # background cells inside the first shard
    m[4, 6] = False
    m[:, 4:][:4] = False  # shard (0, 1) holds no tissue at all
    return m


@pytest.fixture(scope="module")
def quantizer():
    g = torch.Generator().manual_seed(0)
    return make_quantizer("kmeans").fit(torch.randn((6, C, TL, TL), generator=g))


def make_tiles(q, tissue, seed=1) -> dict[tuple[int, int], np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    coords = list(zip(*np.nonzero(tissue)))
    z = torch.randn((len(coords), C, TL, TL), generator=g)
    return {(int(r), int(c)): s for (r, c), s in zip(coords, q.quantize(z))}


def write(path, q, tiles, tissue=None, order_seed=0, **kw) -> ContainerWriter:
    tissue = tissue_mask() if tissue is None else tissue
    kw.setdefault("background", np.full((C, TL, TL), 7, dtype=np.uint8))
    kw.setdefault("associated", {"label": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
                                 "thumbnail": np.full((5, 7, 3), 200, np.uint8)})
    w = ContainerWriter(path, grid=grid_json(), model=model_info(), quantizer=q, tissue=tissue,
                        source={"filename": "s.svs", "size": 12345, "sha256": "c" * 64, "vendor": "aperio",
                                "properties": {"openslide.vendor": "aperio"}},
                        resolution={"target_mpp": 0.5, "source_mpp": 0.25, "mpp_source": "openslide.mpp-x",
                                    "objective_power": 40.0, "archived_objective_power": 20.0},
                        shard_tiles=SHARD, **kw)
    keys = list(tiles)
    np.random.default_rng(order_seed).shuffle(keys)  # tiles may arrive in any order
    with w:
        for k in keys:
            w.write_tile(*k, tiles[k])
    return w


@pytest.fixture()
def written(tmp_path, quantizer):
    tiles = make_tiles(quantizer, tissue_mask())
    path = tmp_path / "slide.pzarr"
    write(path, quantizer, tiles)
    return path, tiles


def shard_index(path: Path, i: int, j: int) -> np.ndarray:
    """(offset, nbytes) per inner chunk of one shard, read straight from the file's trailing index."""
    data = (path / "latents" / "c" / "0" / str(i) / str(j)).read_bytes()
    n = SHARD * SHARD
    idx = np.frombuffer(data[-(16 * n + 4):-4], dtype="<u8").reshape(SHARD, SHARD, 2)
    return idx


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_tiles_background_and_metadata(written, quantizer):
    path, tiles = written
    c = Container.open(path)
    np.testing.assert_array_equal(c.tissue, tissue_mask())
    for (r, col), s in tiles.items():
        np.testing.assert_array_equal(c.read_tile(r, col), s)
    np.testing.assert_array_equal(c.read_tile(0, 0), c.background)
    assert (c.background == 7).all()
    q = c.quantizer
    np.testing.assert_array_equal(q.codebook, quantizer.codebook)
    assert torch.equal(q.dequantize(tiles[(1, 1)]), quantizer.dequantize(tiles[(1, 1)]))
    assert c.model["id"] == "test-f8c4" and c.model["latent_channels"] == C
    assert c.attrs["tiles"] == {"tissue": int(tissue_mask().sum()), "total": ROWS * COLS}
    assert c.attrs["source"]["sha256"] == "c" * 64
    assert c.attrs["resolution"]["archived_objective_power"] == 20.0
    imgs = c.associated_images()
    assert sorted(imgs) == ["label", "thumbnail"]
    np.testing.assert_array_equal(imgs["label"], np.arange(18, dtype=np.uint8).reshape(2, 3, 3))  # lossless
    assert imgs["thumbnail"].shape == (5, 7, 3) and np.abs(imgs["thumbnail"].astype(int) - 200).max() <= 2
    g = c.grid
    assert (g["rows"] if isinstance(g, dict) else g.rows) == ROWS


def test_read_latents_window_past_the_edges_uses_background(written):
    path, tiles = written
    c = Container.open(path)
    # a window from one tile before the mosaic to half a tile past its end, with a halo
    r0, c0, r1, c1 = -TL - 3, -5, ROWS * TL + TL // 2, COLS * TL + 3
    win = c.read_latents(r0, c0, r1, c1)
    assert win.shape == (C, r1 - r0, c1 - c0) and win.dtype == np.uint8
    for (r, col), s in tiles.items():
        y, x = r * TL - r0, col * TL - c0
        np.testing.assert_array_equal(win[:, y:y + TL, x:x + TL], s)
    # outside cells follow the background tile's pattern at the same position within a tile
    bg = np.arange(C * TL * TL, dtype=np.uint8).reshape(C, TL, TL)
    c._background = bg
    win = c.read_latents(-TL, -TL, 0, 2)
    np.testing.assert_array_equal(win[:, :, :TL], bg)
    np.testing.assert_array_equal(win[:, :, TL:], bg[:, :, :2])
    # a window across background tiles (0, 0) and (0, 1): columns 3..8 are 3..7 of one tile, 0 of the next
    np.testing.assert_array_equal(c.read_latents(2, 3, 5, 9), bg[:, 2:5][:, :, [3, 4, 5, 6, 7, 0]])


def test_no_bytes_for_background_tiles(written):
    path, tiles = written
    shards = sorted(p.relative_to(path / "latents" / "c" / "0").as_posix()
                    for p in (path / "latents" / "c" / "0").rglob("*") if p.is_file())
    assert shards == ["0/0", "1/0", "1/1"]  # shard (0, 1) has no tissue: no object at all
    tissue = tissue_mask()
    empty = np.iinfo(np.uint64).max
    for i, j in [(0, 0), (1, 0), (1, 1)]:
        idx = shard_index(path, i, j)
        for a in range(SHARD):
            for b in range(SHARD):
                r, col = i * SHARD + a, j * SHARD + b
                is_tissue = r < ROWS and col < COLS and tissue[r, col]
                assert (idx[a, b, 0] != empty) == is_tissue, (r, col)


def test_stored_tile_bytes_accounts_for_every_shard_byte(written):
    """Shard bytes = sum(stored_tile_bytes) + 16-byte index entries of the background cells + crc32c."""
    path, tiles = written
    predicted = sum(stored_tile_bytes(s) for s in tiles.values())
    n_shards = 3
    overhead = 16 * (n_shards * SHARD * SHARD - len(tiles)) + 4 * n_shards
    assert Container.open(path).latents_bytes() == predicted + overhead


def test_stored_tile_bytes_within_a_few_percent_at_real_tile_size(tmp_path):
    """At TAEF2's size (32 channels x 32 x 32 cells per tile) the index overhead is a few percent at most."""
    ch, tl = 32, 32
    info = model_info()
    info.latent_channels, info.spatial_factor = ch, 8
    grid = dict(grid_json(), tile_size=256, rows=3, cols=4, width=1000, height=700)
    tissue = np.ones((3, 4), bool)
    tissue[0, 0] = False
    g = torch.Generator().manual_seed(2)
    # smooth latents, as an autoencoder gives: neighbouring cells correlate, so zstd has work to do
    z = torch.nn.functional.avg_pool2d(torch.randn((11, ch, tl + 4, tl + 4), generator=g), 5, 1) * 2
    q = make_quantizer("uniform", levels=64).fit(z)
    stored = q.quantize(z)
    path = tmp_path / "real.pzarr"
    with ContainerWriter(path, grid=grid, model=info, quantizer=q, tissue=tissue) as w:
        for (r, c), s in zip(zip(*np.nonzero(tissue)), stored):
            w.write_tile(r, c, s)
    predicted = sum(stored_tile_bytes(s) for s in stored)
    actual = Container.open(path).latents_bytes()
    assert predicted < actual < predicted * 1.03, (predicted, actual)
    assert predicted < 0.9 * stored.nbytes  # and the chunks really are compressed


def test_all_zero_tissue_shard_is_recorded_and_opens(tmp_path, quantizer):
    tissue = tissue_mask()
    tiles = make_tiles(quantizer, tissue)
    for k in tiles:
        if k[0] >= SHARD and k[1] >= SHARD:
            tiles[k] = np.zeros_like(tiles[k])  # a real tissue tile may be all index 0
    path = tmp_path / "z.pzarr"
    write(path, quantizer, tiles)
    c = Container.open(path)
    assert [1, 1] in c.attrs["layout"]["zero_shards"]
    # the tissue mask, not chunk presence, decides: these read as zeros, not as background
    np.testing.assert_array_equal(c.read_tile(4, 4), np.zeros((C, TL, TL), np.uint8))


def test_default_shard_holds_a_small_slide_in_one_file(tmp_path, quantizer):
    tissue = tissue_mask()
    tiles = make_tiles(quantizer, tissue)
    path = tmp_path / "d.pzarr"
    w = ContainerWriter(path, grid=grid_json(), model=model_info(), quantizer=quantizer, tissue=tissue,
                        background=np.zeros((C, TL, TL), np.uint8))
    with w:
        for k, s in tiles.items():
            w.write_tile(*k, s)
    files = [p for p in (path / "latents").rglob("*") if p.is_file()]
    assert len(files) == 2  # zarr.json + one shard
    assert w.bytes_written == Container.open(path).disk_bytes() > 0


def test_single_file_zip_variant_reads_the_same(tmp_path, quantizer):
    tiles = make_tiles(quantizer, tissue_mask())
    path = tmp_path / "slide.pzarr"
    write(path, quantizer, tiles, single_file=True)
    assert path.is_file() and zipfile.is_zipfile(path)
    with zipfile.ZipFile(path) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        names = zf.namelist()
        assert len(names) == len(set(names))  # every key once
    assert [p.name for p in tmp_path.iterdir()] == ["slide.pzarr"]  # no temp left behind
    c = Container.open(path)
    for k, s in tiles.items():
        np.testing.assert_array_equal(c.read_tile(*k), s)
    assert c.describe()["layout"] == "zip"
    assert c.disk_bytes() == path.stat().st_size
    c.close()


# ------------------------------------------------------------------------------------------ atomicity
def test_exception_inside_the_writer_leaves_nothing(tmp_path, quantizer):
    tiles = make_tiles(quantizer, tissue_mask())
    path = tmp_path / "slide.pzarr"
    with pytest.raises(RuntimeError, match="boom"):
        with ContainerWriter(path, grid=grid_json(), model=model_info(), quantizer=quantizer,
                             tissue=tissue_mask(), shard_tiles=SHARD) as w:
            for k, s in list(tiles.items())[:10]:
                w.write_tile(*k, s)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_missing_tiles_at_close_fail_and_leave_nothing(tmp_path, quantizer):
    tiles = make_tiles(quantizer, tissue_mask())
    path = tmp_path / "slide.pzarr"
    with pytest.raises(ValueError, match="never written"):
        with ContainerWriter(path, grid=grid_json(), model=model_info(), quantizer=quantizer,
                             tissue=tissue_mask(), shard_tiles=SHARD) as w:
            for k, s in list(tiles.items())[:-1]:
                w.write_tile(*k, s)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path, quantizer):
    path = tmp_path / "slide.pzarr"
    path.mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        ContainerWriter(path, grid=grid_json(), model=model_info(), quantizer=quantizer, tissue=tissue_mask())
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("single_file", [False, True])
def test_overwrite_keeps_the_old_container_until_the_new_one_is_complete(tmp_path, quantizer, single_file):
    old_tiles = make_tiles(quantizer, tissue_mask(), seed=1)
    new_tiles = make_tiles(quantizer, tissue_mask(), seed=2)
    path = tmp_path / "slide.pzarr"
    write(path, quantizer, old_tiles, single_file=single_file)
    w = ContainerWriter(path, grid=grid_json(), model=model_info(), quantizer=quantizer, tissue=tissue_mask(),
                        overwrite=True, shard_tiles=SHARD, single_file=single_file)
    for k, s in new_tiles.items():
        w.write_tile(*k, s)
    # everything written, not yet closed: the old container is still there and intact
    np.testing.assert_array_equal(Container.open(path).read_tile(1, 1), old_tiles[(1, 1)])
    w.close()
    np.testing.assert_array_equal(Container.open(path).read_tile(1, 1), new_tiles[(1, 1)])
    assert [p.name for p in tmp_path.iterdir()] == ["slide.pzarr"]

    # a failed overwrite leaves the old one in place
    with pytest.raises(KeyError):
        with ContainerWriter(path, grid=grid_json(), model=model_info(), quantizer=quantizer,
                             tissue=tissue_mask(), overwrite=True, shard_tiles=SHARD):
            raise KeyError("fail")
    np.testing.assert_array_equal(Container.open(path).read_tile(1, 1), new_tiles[(1, 1)])


def test_bad_tiles_are_refused(tmp_path, quantizer):
    w = ContainerWriter(tmp_path / "x.pzarr", grid=grid_json(), model=model_info(), quantizer=quantizer,
                        tissue=tissue_mask(), shard_tiles=SHARD)
    ok = np.zeros((C, TL, TL), np.uint8)
    with pytest.raises(ValueError, match="not a tissue tile"):
        w.write_tile(0, 0, ok)
    with pytest.raises(ValueError, match="dtype"):
        w.write_tile(1, 1, ok.astype(np.float16))
    with pytest.raises(ValueError, match="shape"):
        w.write_tile(1, 1, ok[:, :4])
    w.write_tile(1, 1, ok)
    with pytest.raises(ValueError, match="twice"):
        w.write_tile(1, 1, ok)
    w.abort()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ refusing
def _edit_root_attrs(path: Path, edit, reseal: bool = True) -> None:
    """Edit the root attributes; ``reseal`` re-signs the integrity manifest as a writer would."""
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"]["pzarr"])
    (path / "zarr.json").write_text(json.dumps(meta))
    if reseal and "integrity" in meta["attributes"]["pzarr"]:
        from wsicodec.format.writer import write_manifest

        write_manifest(zarr.open_group(path, mode="r+"), path, meta["attributes"]["pzarr"]["integrity"]["write_id"])


def test_an_unsealed_edit_of_the_attributes_is_refused(written):
    path, _ = written
    _edit_root_attrs(path, lambda a: a["grid"].update(width=a["grid"]["width"] - 100), reseal=False)
    with pytest.raises(ContainerError, match="damaged container: zarr.json"):
        Container.open(path)


def test_missing_and_foreign_paths_are_refused(tmp_path):
    with pytest.raises(ContainerError, match="no such container"):
        Container.open(tmp_path / "nope.pzarr")
    junk = tmp_path / "junk.pzarr"
    junk.write_bytes(b"not a zarr store at all")
    with pytest.raises(ContainerError, match="not a .pzarr container"):
        Container.open(junk)
    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w").create_array("x", shape=(2,), dtype="uint8")
    with pytest.raises(ContainerError, match="not a .pzarr container"):
        Container.open(plain)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ContainerError, match="not a .pzarr container"):
        Container.open(empty)


def test_deleted_shard_is_missing(written):
    path, _ = written
    (path / "latents" / "c" / "0" / "1" / "0").unlink()
    with pytest.raises(ContainerError, match="damaged container: latents/c/0/1/0: missing"):
        Container.open(path)


def test_cut_short_shard_is_refused(written):
    path, _ = written
    shard = path / "latents" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ContainerError, match=r"damaged container: latents/c/0/0/0: size 100 bytes"):
        Container.open(path)


def test_corrupt_shard_is_reported_on_read(written):
    path, _ = written
    shard = path / "latents" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of the index: its crc32c no longer matches
    shard.write_bytes(bytes(data))
    c = Container.open(path)  # shards are checked when read, not at open
    with pytest.raises(ContainerError, match="damaged container: latents"):
        c.read_tile(1, 1)
    lines = [p.line() for p in c.verify()]
    assert "latents/c/0/0/0: SHA-256 does not match the manifest" in lines
    assert any(line.startswith("latents/c/0/0/0: shard unreadable") for line in lines)


def test_verify_passes_an_intact_container(written):
    path, tiles = written
    assert Container.open(path).verify() == []


def test_missing_root_metadata_is_truncated(written):
    path, _ = written
    (path / "zarr.json").unlink()
    with pytest.raises(ContainerError, match="truncated or incomplete"):
        Container.open(path)


def test_incomplete_flag_is_refused(written):
    path, _ = written
    _edit_root_attrs(path, lambda a: a.update(complete=False))
    with pytest.raises(ContainerError, match="truncated or incomplete"):
        Container.open(path)
    _edit_root_attrs(path, lambda a: a.pop("complete"))
    with pytest.raises(ContainerError, match="truncated or incomplete"):
        Container.open(path)


def test_unknown_major_version_is_refused_minor_is_accepted(written):
    path, _ = written
    _edit_root_attrs(path, lambda a: a.update(version="1.7"))
    Container.open(path)  # a newer minor version of 1.x stays readable
    _edit_root_attrs(path, lambda a: a.update(version="2.0"))
    with pytest.raises(ContainerError) as err:
        Container.open(path)
    assert str(err.value) == "unsupported .pzarr format version 2.0 (this wsicodec reads 1.x); upgrade wsicodec"


def test_truncated_zip_is_refused(tmp_path, quantizer):
    tiles = make_tiles(quantizer, tissue_mask())
    path = tmp_path / "slide.pzarr"
    write(path, quantizer, tiles, single_file=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ContainerError, match="truncated or incomplete"):
        Container.open(path)


def test_describe_is_plain_json_with_what_info_shows(written):
    path, tiles = written
    d = Container.open(path).describe()
    json.dumps(d)
    assert d["format_version"] == "1.1"
    assert d["quantizer"]["codebook_size"] == 256 and d["quantizer"]["kind"] == "kmeans"
    assert d["tiles"]["tissue"] == len(tiles) < d["tiles"]["total"]
    assert d["source"] == {"filename": "s.svs", "size": 12345, "sha256": "c" * 64, "vendor": "aperio",
                           "property_count": 1}  # the properties themselves stay in the attributes
    assert d["container_bytes"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert d["bytes_per_tissue_tile"] == pytest.approx(d["container_bytes"] / len(tiles))
    assert d["model"]["id"] == "test-f8c4"


def test_float16_none_quantizer_round_trip(tmp_path):
    q = make_quantizer("none")
    g = torch.Generator().manual_seed(5)
    tissue = tissue_mask()
    coords = list(zip(*np.nonzero(tissue)))
    stored = q.quantize(torch.randn((len(coords), C, TL, TL), generator=g))
    tiles = {(int(r), int(c)): s for (r, c), s in zip(coords, stored)}
    path = tmp_path / "f16.pzarr"
    write(path, q, tiles, background=np.zeros((C, TL, TL), np.float16))
    c = Container.open(path)
    assert c.dtype == np.float16 and "codebook" not in zarr.open_group(path, mode="r")
    for k, s in tiles.items():
        np.testing.assert_array_equal(c.read_tile(*k), s)
    assert c.quantizer.kind == "none"


def test_leftovers_of_a_killed_writer_are_cleaned_up(tmp_path, quantizer):
    from wsicodec._io import _HOST

    dead = tmp_path / f".slide.pzarr.partial-{_HOST}-999999999-abcd0123"  # this host, no such process
    (dead / "latents").mkdir(parents=True)
    foreign = tmp_path / ".slide.pzarr.partial-otherhost-999999999-abcd0123"  # another host's: maybe alive
    foreign.mkdir()
    other = tmp_path / f".other.pzarr.partial-{_HOST}-999999999-abcd0123"  # another output's: left alone
    other.mkdir()
    tiles = make_tiles(quantizer, tissue_mask())
    write(tmp_path / "slide.pzarr", quantizer, tiles)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, foreign.name, "slide.pzarr"])


def test_slide_without_tissue_and_odd_associated_images(tmp_path, quantizer):
    path = tmp_path / "blank.pzarr"
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest transparent: white
    write(path, quantizer, {}, tissue=np.zeros((ROWS, COLS), bool),
          associated={"label": rgba, "macro": np.full((3, 4), 17, np.uint8)})
    c = Container.open(path)
    assert c.attrs["tiles"]["tissue"] == 0
    assert not (path / "latents" / "c").exists()  # no shard at all
    np.testing.assert_array_equal(c.read_latents(0, 0, ROWS * TL, COLS * TL),
                                  np.tile(c.background, (1, ROWS, COLS)))
    imgs = c.associated_images()
    # the label is stored losslessly (PNG): exact; the macro as JPEG: close
    assert imgs["label"][0, 0].tolist() == [255, 0, 0] and imgs["label"][1, 1].tolist() == [255, 255, 255]
    assert imgs["macro"].shape == (3, 4, 3) and np.abs(imgs["macro"].astype(int) - 17).max() <= 2


def test_a_reader_notices_its_container_replaced_under_it(written, quantizer):
    path, tiles = written
    reader = Container.open(path)
    first = next(iter(tiles))
    np.testing.assert_array_equal(reader.read_tile(*first), tiles[first])
    write(path, quantizer, make_tiles(quantizer, tissue_mask(), seed=9), overwrite=True)  # another slide
    with pytest.raises(ContainerError, match="replaced or changed while open"):
        reader.read_tile(*first)
    fresh = Container.open(path)
    assert not np.array_equal(fresh.read_tile(*first), tiles[first])
