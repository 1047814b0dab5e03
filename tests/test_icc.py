"""Colour is kept: the source's ICC profile travels from the slide through the container into every output.

The real slide tcga-cr-7395 (../shared) carries an ICC profile in TIFF tag 34675 of its level 0; CMU-1 carries
none. Compressed with a tiny random model (what it decodes does not matter here, only what the outputs carry).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image
from test_conformance import SpecReader
from typer.testing import CliRunner

import wsicodec
from wsicodec.cli import app
from wsicodec.errors import ContainerError
from wsicodec.format import Container
from wsicodec.format.spec import ICC_MEDIA_TYPE, ICC_PROFILE_ARRAY, is_icc_profile
from wsicodec.pipeline.compress import compress
from wsicodec.pipeline.restore import restore, restore_region


def source_icc(path: Path) -> bytes:
    """The profile's raw bytes as the source stores them: tag 34675 (InterColorProfile) of its first IFD."""
    with tifffile.TiffFile(path) as tf:
        return bytes(tf.pages[0].tags[34675].value)


@pytest.fixture(scope="module")
def tcga(tmp_path_factory, tcga_no_mpp_path, tiny_model_dir) -> dict:
    folder = tmp_path_factory.mktemp("icc-tcga")
    container = folder / "tcga.pzarr"
    compress(tcga_no_mpp_path, container, model=str(tiny_model_dir), source_mpp=0.5, device="cpu")
    return {"container": container, "icc": source_icc(tcga_no_mpp_path), "folder": folder}


@pytest.fixture(scope="module")
def cmu1(tmp_path_factory, cmu1_path, tiny_model_dir) -> Path:
    container = tmp_path_factory.mktemp("icc-cmu1") / "cmu1.pzarr"
    compress(cmu1_path, container, model=str(tiny_model_dir), device="cpu")
    return container


def test_the_source_has_a_profile_openslide_reads(tcga_no_mpp_path, tcga):
    assert is_icc_profile(tcga["icc"]) and len(tcga["icc"]) == 3144
    assert openslide.OpenSlide(tcga_no_mpp_path).color_profile.tobytes() == tcga["icc"]


def test_the_container_stores_the_profile_verbatim_as_specified(tcga):
    path = tcga["container"]
    with Container.open(path) as c:
        assert c.icc_profile == tcga["icc"]
        assert c.describe()["icc_profile_bytes"] == len(tcga["icc"])
        assert {f"{ICC_PROFILE_ARRAY}/zarr.json", f"{ICC_PROFILE_ARRAY}/c/0"} <= set(c.manifest["keys"])
        assert c.verify() == []
    # section 3.7: a one-dimensional uint8 array, one chunk, codecs bytes + crc32c, media type attribute
    a = zarr.open_group(path, mode="r")[ICC_PROFILE_ARRAY]
    assert a.dtype == np.uint8 and a.ndim == 1 and a.chunks == a.shape and a[...].tobytes() == tcga["icc"]
    assert dict(a.attrs) == {"media_type": ICC_MEDIA_TYPE}
    meta = json.loads((path / ICC_PROFILE_ARRAY / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "crc32c"] and meta["dimension_names"] == ["byte"]
    # the reader written from the spec alone checks every key, the profile's among them
    r = SpecReader(path)
    try:
        assert f"{ICC_PROFILE_ARRAY}/c/0" in r.manifest["keys"]
    finally:
        r.close()


def test_the_restored_tiff_carries_the_profile_for_openslide(tcga):
    out = tcga["folder"] / "restored.tiff"
    restore(tcga["container"], out, device="cpu")
    with tifffile.TiffFile(out) as tf:
        assert tf.pages[0].iccprofile == tcga["icc"]  # level 0: where OpenSlide looks
        assert all(p.iccprofile == tcga["icc"] for p in tf.pages if p.subfiletype == 0)  # levels, thumbnail
    slide = openslide.OpenSlide(out)
    assert slide.color_profile is not None and slide.color_profile.tobytes() == tcga["icc"]
    assert slide.properties["openslide.icc-size"] == str(len(tcga["icc"]))
    assert slide.read_region((0, 0), 0, (16, 16)).info["icc_profile"] == tcga["icc"]


def test_the_dicom_output_carries_the_profile(tcga):
    pydicom = pytest.importorskip("pydicom")
    out = tcga["folder"] / "restored-dicom"
    restore(tcga["container"], out, format="dicom", device="cpu")
    files = sorted(out.glob("*.dcm"))
    assert files
    for f in files:
        ds = pydicom.dcmread(f)
        (path,) = ds.OpticalPathSequence
        assert path.ICCProfile == tcga["icc"], f.name
        assert path.ColorSpace == "SRGB"  # the profile is "sRGB IEC61966-2.1"
    # OpenSlide's DICOM driver reads the profile from the optical path, like its TIFF one from tag 34675
    slide = openslide.OpenSlide(out / "level-0.dcm")
    assert slide.color_profile is not None and slide.color_profile.tobytes() == tcga["icc"]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_region_images_embed_the_profile(tcga, suffix):
    out = tcga["folder"] / f"region{suffix}"
    restore_region(tcga["container"], out, 256, 256, 64, 48, device="cpu", overwrite=True)
    with Image.open(out) as im:
        assert im.size == (64, 48) and im.info.get("icc_profile") == tcga["icc"]


def test_a_format_without_a_place_for_it_still_writes(tcga):
    out = tcga["folder"] / "region.bmp"
    restore_region(tcga["container"], out, 0, 0, 32, 32, device="cpu", overwrite=True)
    with Image.open(out) as im:
        assert im.size == (32, 32)


def test_the_pzarr_slide_exposes_the_profile(tcga):
    with wsicodec.open(tcga["container"], device="cpu") as slide:
        assert slide.color_profile is not None and slide.color_profile.tobytes() == tcga["icc"]
        assert slide.properties["openslide.icc-size"] == str(len(tcga["icc"]))
        assert slide.read_region((100, 100), 0, (32, 32)).info["icc_profile"] == tcga["icc"]
        assert slide.get_thumbnail((64, 64)).info["icc_profile"] == tcga["icc"]
        from openslide.deepzoom import DeepZoomGenerator

        dz = DeepZoomGenerator(slide, tile_size=254, overlap=1)
        assert dz.get_tile(dz.level_count - 1, (0, 0)).info["icc_profile"] == tcga["icc"]


def test_a_slide_without_a_profile_stores_none_and_restores_as_before(cmu1, tmp_path):
    assert ICC_PROFILE_ARRAY not in zarr.open_group(cmu1, mode="r")
    with Container.open(cmu1) as c:
        assert c.icc_profile is None and c.describe()["icc_profile_bytes"] == 0
        assert not any(k.startswith(ICC_PROFILE_ARRAY) for k in c.manifest["keys"])
        assert c.verify() == []
    out = tmp_path / "cmu1.tiff"
    restore(cmu1, out, device="cpu")
    with tifffile.TiffFile(out) as tf:
        assert all(p.iccprofile is None for p in tf.pages)
    slide = openslide.OpenSlide(out)
    assert slide.color_profile is None and slide.properties["openslide.vendor"] == "aperio"
    with wsicodec.open(cmu1, device="cpu") as pz:
        assert pz.color_profile is None and "openslide.icc-size" not in pz.properties
        assert "icc_profile" not in pz.read_region((0, 0), 0, (8, 8)).info
    region = tmp_path / "cmu1.png"
    restore_region(cmu1, region, 0, 0, 16, 16, device="cpu")
    with Image.open(region) as im:
        assert "icc_profile" not in im.info


def test_a_slide_without_a_profile_gets_srgb_in_dicom(cmu1, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from PIL import ImageCms

    out = tmp_path / "cmu1-dicom"
    restore(cmu1, out, format="dicom", device="cpu")
    (path,) = pydicom.dcmread(out / "level-0.dcm").OpticalPathSequence
    profile = ImageCms.ImageCmsProfile(io.BytesIO(path.ICCProfile))  # lcms's own sRGB, as before
    assert ImageCms.getProfileDescription(profile).strip() == "sRGB built-in" and path.ColorSpace == "SRGB"


def _flip_profile_byte(container: Path, dest: Path) -> Path:
    shutil.copytree(container, dest)
    chunk = dest / ICC_PROFILE_ARRAY / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[200] ^= 0x01  # inside the profile, past its header: still looks like a profile
    chunk.write_bytes(bytes(data))
    return dest


def test_a_flipped_profile_byte_fails_verify(tcga, tmp_path):
    damaged = _flip_profile_byte(tcga["container"], tmp_path / "damaged.pzarr")
    result = CliRunner().invoke(app, ["verify", str(damaged)])
    assert result.exit_code != 0
    assert f"{ICC_PROFILE_ARRAY}/c/0" in result.output and "damaged" in result.output, result.output
    with pytest.raises(ContainerError, match=ICC_PROFILE_ARRAY):
        Container.open(damaged)
    # and the intact one verifies
    assert CliRunner().invoke(app, ["verify", str(tcga["container"])]).exit_code == 0


def test_only_an_icc_profile_is_accepted():
    assert not is_icc_profile(None) and not is_icc_profile(b"") and not is_icc_profile(b"x" * 200)
    header = bytearray(128)
    header[36:40] = b"acsp"
    assert is_icc_profile(bytes(header))
