"""Every read path checks what it reads: a latent shard is hashed against the integrity manifest at its first
read, so a shard with valid CRC-32Cs copied from another tile position, or from another container of the
same shape, is refused by restore, by ``wsicodec.open(...).read_region``, by the viewer and by verify,
never decoded into wrong pixels.

The containers here are written by wsicodec's own writer with the tiny model, one tile per shard and every
tile a constant of its own, so that all shards have the same size (the manifest's size check, made at open,
cannot tell them apart) while their bytes, and the pixels they decode to, differ.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_safety import zip_container
from typer.testing import CliRunner

import wsicodec
from wsicodec.cli import app
from wsicodec.errors import ContainerError
from wsicodec.format import Container, ContainerWriter


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture(scope="module")
def base(tmp_path_factory, synthetic_slide_factory, tiny_model_dir) -> Path:
    """A real compressed slide: its model, quantiser, grid and background are reused below."""
    src = synthetic_slide_factory(1200, 1000, mpp=0.5, objective_power=20, levels=[1], seed=3)
    out = tmp_path_factory.mktemp("readcheck") / "base.pzarr"
    wsicodec.compress(src, out, model=str(tiny_model_dir), device="cpu")
    return out


def _rewrite(base: Path, out: Path, offset: int) -> Path:
    """``base`` rewritten one tile per shard, tile k holding the constant 1 + (k + offset) % (levels - 1)."""
    with Container.open(base) as c:
        a = c.attrs
        tissue = np.ones_like(c.tissue)
        levels = int(a["quantizer"]["levels"])
        shape = c.background.shape
        w = ContainerWriter(out, grid=a["grid"], model=a["model"], quantizer=c.quantizer, tissue=tissue,
                            background=c.background, source=a["source"], resolution=a["resolution"],
                            shard_tiles=1, glass=c.glass_rgb, encoding=a.get("encoding"))
        with w:
            for k, (r, col) in enumerate(zip(*np.nonzero(tissue))):
                w.write_tile(r, col, np.full(shape, 1 + (k + offset) % (levels - 1), c.dtype))
    return out


@pytest.fixture(scope="module")
def pair(base, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    return _rewrite(base, d / "a.pzarr", 0), _rewrite(base, d / "b.pzarr", 97)


def _shard(path: Path, row: int, col: int) -> Path:
    return path / "latents" / "c" / "0" / str(row) / str(col)


@pytest.fixture(params=["within", "other-container"])
def damaged(request, pair, tmp_path) -> Path:
    """A copy of container a with the shard of tile (1, 2) replaced by a same-size one that is valid Zarr."""
    a, b = pair
    out = Path(shutil.copytree(a, tmp_path / "damaged.pzarr"))
    donor = _shard(a, 0, 0) if request.param == "within" else _shard(b, 1, 2)
    assert donor.stat().st_size == _shard(out, 1, 2).stat().st_size
    assert donor.read_bytes() != _shard(out, 1, 2).read_bytes()
    shutil.copyfile(donor, _shard(out, 1, 2))
    return out


@pytest.fixture(params=["directory", "zip"])
def damaged_any(request, damaged, tmp_path) -> Path:
    return damaged if request.param == "directory" else zip_container(damaged, tmp_path / "damaged-zip.pzarr")


def test_the_damaged_shard_is_valid_zarr_and_decodes_otherwise(damaged, pair):
    """The premise: Zarr reads the copied shard without complaint, to values that differ."""
    import zarr

    got = zarr.open_group(damaged, mode="r")["latents"]
    want = zarr.open_group(pair[0], mode="r")["latents"]
    tl = got.chunks[1]
    assert not np.array_equal(got[:, tl:2 * tl, 2 * tl:3 * tl], want[:, tl:2 * tl, 2 * tl:3 * tl])
    Container.open(damaged).close()  # sizes all match: the open check cannot see it


def test_read_region_refuses_the_shard(damaged_any):
    slide = wsicodec.open(damaged_any, device="cpu")
    t = slide.decoder.tile_size
    slide.read_region((0, t * 2), 0, (t, t))  # tile (2, 0): its shard and its neighbours' are intact
    with pytest.raises(ContainerError, match=r"damaged container: latents/c/0/1/2: SHA-256 does not match"):
        slide.read_region((2 * t, t), 0, (t, t))
    with pytest.raises(ContainerError, match="latents/c/0/1/2"):  # the verdict is kept
        slide.read_region((2 * t + 5, t + 5), 0, (8, 8))


def test_restore_refuses_the_shard(damaged_any, tmp_path):
    for out, extra in ((tmp_path / "o.tiff", []), (tmp_path / "r.png", ["--region", "0", "0", "2000", "2000"])):
        r = run_cli("restore", damaged_any, out, "--device", "cpu", "-q", *extra)
        assert r.exit_code != 0, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: damaged container: latents/c/0/1/2"), r.output
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"damaged.pzarr", damaged_any.name})  # no partials


def test_verify_refuses_the_shard(damaged_any):
    lines = [p.line() for p in Container.open(damaged_any).verify()]
    assert "latents/c/0/1/2: SHA-256 does not match the manifest" in lines
    r = run_cli("verify", damaged_any)
    assert r.exit_code == 1 and "latents/c/0/1/2: SHA-256 does not match the manifest" in r.output


def test_viewer_answers_409_never_wrong_pixels(damaged):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from wsicodec.viewer.server import build_app, load_slides

    with TestClient(build_app(load_slides([damaged], device="cpu"), workers=1),
                    raise_server_exceptions=False) as client:
        dz = client.app.state.entries["damaged"].dz
        deepest = dz.level_count - 1
        r = client.get(f"/slides/damaged_files/{deepest}/0_0.jpeg")  # tiles (0..1, 0..1): intact shards
        assert r.status_code == 200
        bad = [(c, r_) for c, r_ in np.ndindex(*dz.level_tiles[deepest])
               if c * 254 <= 3 * 256 and (c + 1) * 254 >= 2 * 256 and r_ * 254 <= 2 * 256 and (r_ + 1) * 254 >= 256]
        col, row = bad[0]
        r = client.get(f"/slides/damaged_files/{deepest}/{col}_{row}.jpeg")
        assert r.status_code == 409, r.status_code
        assert r.text.startswith("error: damaged container: latents/c/0/1/2"), r.text


def test_an_extra_shard_the_manifest_does_not_list_is_refused(pair, tmp_path):
    """A shard where the writer stored none (all-zero tissue recorded in zero_shards) must stay absent."""
    a, _ = pair
    out = Path(shutil.copytree(a, tmp_path / "c.pzarr"))
    c = Container.open(out)
    c.manifest["keys"].pop("latents/c/0/1/2")  # as if the writer had stored nothing there
    with pytest.raises(ContainerError, match="latents/c/0/1/2: not in the manifest"):
        c.read_tile(1, 2)


def test_intact_containers_read_as_before(pair):
    a, _ = pair
    with Container.open(a) as c:
        tile = c.read_tile(1, 2)
        assert len(set(tile.ravel().tolist())) == 1
        assert set(c._shard_verdicts.values()) == {None}
        assert Container.open(a).verify() == []
