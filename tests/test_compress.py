"""The compress pipeline end to end: real slides, real models, real zarr stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from wsicodec.cli import app
from wsicodec.pipeline.compress import compress, plan
from wsicodec.format.container import Container
from wsicodec.models import load_model
from wsicodec.source.slide import SourceSlide

runner = CliRunner()


def run_cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    # a user-facing failure is a clean exit with a message, never an escaped exception
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(out.name) or p.name.startswith("." + out.name)]


@pytest.fixture(scope="module")
def cmu_taef2(cmu1_path, taef2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmu") / "cmu.pzarr"
    result = run_cli("compress", cmu1_path, out, "--model", taef2_dir, "--quiet")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.mark.slow
def test_cmu1_with_taef2_info_reports_what_the_issue_asks(cmu_taef2):
    out, result = cmu_taef2
    assert "tissue tiles" in result.stdout and "ratio" in result.stdout
    info = json.loads(run_cli("info", out, "--json").stdout)
    text = json.dumps(info)
    assert "taef2" in text
    assert info["quantizer"]["kind"] == "kmeans"
    assert info["quantizer"]["levels"] == 256
    grid = info["grid"]
    assert grid["tile_size"] == 256 and grid["rows"] * grid["cols"] > 1
    assert info["resolution"]["target_mpp"] == pytest.approx(0.5)
    assert info["resolution"]["source_mpp"] == pytest.approx(0.499, abs=1e-3)
    assert 0 < info["tiles"]["tissue"] < info["tiles"]["total"]


def test_container_opens_with_plain_zarr_and_holds_one_chunk_per_tissue_tile(cmu_taef2):
    out, _ = cmu_taef2
    group = zarr.open_group(str(out), mode="r")
    attrs = group.attrs["pzarr"]
    assert attrs["version"].startswith("1.")
    latents = group["latents"]
    assert latents.dtype == np.uint8
    f = attrs["model"]["spatial_factor"]
    assert latents.chunks == (attrs["model"]["latent_channels"], 256 // f, 256 // f)
    tissue = np.asarray(group["tissue_mask"][:]).astype(bool)
    assert tissue.sum() == attrs["tiles"]["tissue"]
    assert group["codebook"].shape[-1] == 256
    # a handful of files, not one per tile
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) < 30
    # associated images of the source are kept
    assert {"label", "macro", "thumbnail"} <= set(Container.open(out).associated_images())


def test_source_is_recorded(cmu_taef2, cmu1_path):
    import hashlib

    out, _ = cmu_taef2
    source = Container.open(out).attrs["source"]
    assert source["sha256"] == hashlib.sha256(Path(cmu1_path).read_bytes()).hexdigest()
    assert source["size"] == Path(cmu1_path).stat().st_size
    assert source["properties"]["openslide.vendor"] == "aperio"


@pytest.mark.slow
def test_kmeans_beats_int8_on_latent_error(cmu1_path, taef2_dir):
    """The paper's point about the codebook, on real latents: K-means loses less than static 8-bit."""
    from wsicodec.pipeline.compress import choose_quantizer

    model = load_model(str(taef2_dir))
    with SourceSlide(cmu1_path) as slide:
        layout = plan(slide)
        tiles = np.stack([t for _, t in slide.read_tiles(layout.grid, layout.coords[:24])])
    z = model.encode(tiles)
    errors = {}
    for kind in ("kmeans", "int8"):
        q = choose_quantizer(model, kind, 256)
        q.fit(z)
        errors[kind] = float(((q.dequantize(q.quantize(z)) - z) ** 2).mean())
    print(f"latent MSE on CMU-1 tissue, TAEF2: kmeans {errors['kmeans']:.3e}  int8 {errors['int8']:.3e}")
    assert errors["kmeans"] < errors["int8"]


def test_no_resolution_slide_needs_source_mpp(no_mpp_slide, tiny_model_dir, tmp_path):
    out = tmp_path / "x.pzarr"
    result = run_cli("compress", no_mpp_slide, out, "--model", tiny_model_dir, "--quiet")
    assert result.exit_code != 0
    assert "--source-mpp" in error_line(result)
    assert not leftovers(out)
    result = run_cli("compress", no_mpp_slide, out, "--model", tiny_model_dir, "--source-mpp", "0.25", "--quiet")
    assert result.exit_code == 0, result.output
    info = Container.open(out).describe()
    assert info["resolution"]["source_mpp"] == pytest.approx(0.25)
    assert info["resolution"]["mpp_source"] == "--source-mpp"


@pytest.mark.slow
def test_tcga_frozen_section_without_resolution(shared_dir, tiny_model_dir, tmp_path):
    if shared_dir is None:
        pytest.skip("the TCGA frozen section lives only in ../shared (the synthetic no-mpp case runs everywhere)")
    slide = shared_dir / "data/slides/tcga-cr-7395-01a-01-ts1.svs"
    out = tmp_path / "tcga.pzarr"
    result = run_cli("compress", slide, out, "--model", tiny_model_dir, "--quiet")
    assert result.exit_code != 0 and "--source-mpp" in error_line(result)
    result = run_cli("compress", slide, out, "--model", tiny_model_dir, "--source-mpp", "0.5", "--quiet")
    assert result.exit_code == 0, result.output
    assert Container.open(out).describe()["tiles"]["tissue"] > 0


def test_all_tiles_encodes_background_too(synthetic_slide, tiny_model_dir, tmp_path):
    tissue_only = compress(synthetic_slide, tmp_path / "a.pzarr", model=str(tiny_model_dir))
    everything = compress(synthetic_slide, tmp_path / "b.pzarr", model=str(tiny_model_dir), all_tiles=True)
    assert tissue_only.tissue_tiles < everything.tissue_tiles == everything.tiles_total
    # (bytes are no test of it: glass tiles cost almost nothing, and a codebook fitted on glass and tissue
    # can make the tissue tiles cheaper than one fitted on tissue alone)
    assert Container.open(tmp_path / "b.pzarr").tissue.all()


@pytest.mark.slow
def test_quantizer_choices_store_their_dtype(synthetic_slide, tiny_model_dir, tmp_path):
    for kind, dtype in (("int8", np.uint8), ("none", np.float16), ("uniform", np.uint8)):
        out = tmp_path / f"{kind}.pzarr"
        compress(synthetic_slide, out, model=str(tiny_model_dir), quant=kind, levels=64 if kind == "uniform" else None)
        group = zarr.open_group(str(out), mode="r")
        assert group["latents"].dtype == dtype
        assert group.attrs["pzarr"]["quantizer"]["kind"] == kind


# ------------------------------------------------------------------ bad input: one line, no output
def test_missing_slide(tmp_path, tiny_model_dir):
    out = tmp_path / "o.pzarr"
    result = run_cli("compress", tmp_path / "nope.svs", out, "--model", tiny_model_dir)
    assert result.exit_code != 0
    assert "nope.svs" in error_line(result)
    assert not leftovers(out)


def test_file_openslide_cannot_open(tmp_path, tiny_model_dir):
    junk = tmp_path / "notes.svs"
    junk.write_bytes(b"this is not a slide\n" * 100)
    out = tmp_path / "o.pzarr"
    result = run_cli("compress", junk, out, "--model", tiny_model_dir)
    assert result.exit_code != 0
    assert "notes.svs" in error_line(result)
    assert not leftovers(out)


def test_existing_output_refused_unless_overwrite(synthetic_slide, tiny_model_dir, tmp_path):
    out = tmp_path / "o.pzarr"
    first = compress(synthetic_slide, out, model=str(tiny_model_dir))
    result = run_cli("compress", synthetic_slide, out, "--model", tiny_model_dir, "--all-tiles")
    assert result.exit_code != 0 and "--overwrite" in error_line(result)
    assert Container.open(out).describe()["tiles"]["tissue"] == first.tissue_tiles  # untouched
    result = run_cli("compress", synthetic_slide, out, "--model", tiny_model_dir, "--all-tiles", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert Container.open(out).describe()["tiles"]["tissue"] == first.tiles_total
    assert not [p for p in leftovers(out) if p != out]


def test_overwrite_never_deletes_a_folder_that_is_not_a_container(synthetic_slide, tiny_model_dir, tmp_path):
    out = tmp_path / "o.pzarr"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for extra in ([], ["--overwrite"]):
        result = run_cli("compress", synthetic_slide, out, "--model", tiny_model_dir, *extra)
        assert result.exit_code != 0
        error_line(result)
    assert (out / "keep.txt").read_text() == "user data"


def test_unknown_model_name(synthetic_slide, tmp_path):
    out = tmp_path / "o.pzarr"
    result = run_cli("compress", synthetic_slide, out, "--model", "no-such-model")
    assert result.exit_code != 0 and "no-such-model" in error_line(result)
    assert not leftovers(out)


def test_weights_that_fail_to_load(synthetic_slide, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data if f.suffix == ".json" else data[: len(data) // 3])
    out = tmp_path / "o.pzarr"
    result = run_cli("compress", synthetic_slide, out, "--model", broken)
    assert result.exit_code != 0
    error_line(result)
    assert not leftovers(out)


def test_failure_midway_leaves_nothing(synthetic_slide, tiny_model_dir, tmp_path, monkeypatch):
    """An error after tiles were written (here: the source vanishes before hashing) must not leave a container."""
    from wsicodec.pipeline import compress as compress_module

    def boom(path, chunk=0):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(compress_module, "file_sha256", boom)
    out = tmp_path / "o.pzarr"
    with pytest.raises(Exception):
        compress(synthetic_slide, out, model=str(tiny_model_dir))
    assert not leftovers(out)


def test_default_builtin_model_runs_offline_without_flags(cmu1_path, tmp_path, monkeypatch):
    """`wsicodec compress slide.svs out.pzarr` on a fresh machine: packaged weights, no hub, no --model."""
    from wsicodec.models.builtin import DEFAULT_MODEL_ID

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cmu.pzarr"
    result = run_cli("compress", cmu1_path, out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "tiles/s" in result.stdout
    info = Container.open(out).describe()
    assert info["model"]["id"] == DEFAULT_MODEL_ID
    assert info["tiles"]["tissue"] > 0
