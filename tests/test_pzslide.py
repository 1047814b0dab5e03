"""PzarrSlide: the OpenSlide interface over a container, checked against OpenSlide reading the restored TIFF.

The synthetic slide archives to 1500 x 1200 px, whose halving is exact, so OpenSlide reads the TIFF's
level 1 at whole-pixel positions and both must agree bit for bit (lossless TIFF, same decoder).
"""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator

import wsicodec.reader
from wsicodec.reader import PzarrSlide
from wsicodec.pipeline.restore import restore

# session fixtures and helpers of the restore tests (tiny random model, small synthetic container)
from test_restore import tiny_container, tiny_model_dir  # noqa: F401


@pytest.fixture(scope="module")
def pair(tiny_container, tmp_path_factory):
    tiff = tmp_path_factory.mktemp("pz") / "ref.tiff"
    restore(tiny_container, tiff, compression="deflate", device="cpu", progress=False)
    ref = openslide.OpenSlide(str(tiff))
    slide = wsicodec.reader.open(tiny_container, device="cpu")
    yield slide, ref
    ref.close()
    slide.close()


def test_is_an_openslide_abstract_slide_with_the_tiffs_pyramid(pair):
    slide, ref = pair
    assert isinstance(slide, openslide.AbstractSlide)
    assert slide.dimensions == ref.dimensions == (1500, 1200)
    assert slide.level_count == ref.level_count == 2
    assert slide.level_dimensions == ref.level_dimensions
    assert slide.level_downsamples == pytest.approx(ref.level_downsamples)
    for ds in (0.5, 1, 1.9, 2, 3, 64):
        assert slide.get_best_level_for_downsample(ds) == ref.get_best_level_for_downsample(ds)


def test_properties(pair):
    slide, ref = pair
    p = slide.properties
    assert p["openslide.vendor"] == "wsicodec"
    assert float(p["openslide.mpp-x"]) == float(p["openslide.mpp-y"]) == pytest.approx(0.5)
    assert float(p["openslide.objective-power"]) == 20
    assert p["openslide.level[1].width"] == "750"
    assert p["openslide.level-count"] == "2"
    # the source slide's own properties, kept under a prefix
    assert p["wsicodec.source.openslide.vendor"] == "aperio"
    assert float(p["wsicodec.source.openslide.mpp-x"]) == pytest.approx(0.25)


def test_associated_images(pair):
    slide, ref = pair
    assert {"label", "macro"} <= set(slide.associated_images)
    label = slide.associated_images["label"]
    assert label.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(label)[..., :3], np.asarray(ref.associated_images["label"])[..., :3])


@pytest.mark.parametrize(
    "location, level, size",
    [((300, 200), 0, (400, 300)), ((-50, -20), 0, (120, 90)), ((1400, 1100), 0, (300, 300)),
     ((600, 400), 1, (200, 150)), ((-100, 0), 1, (400, 700)), ((5000, 5000), 0, (10, 10))],
)
def test_read_region_is_openslides(pair, location, level, size):
    slide, ref = pair
    got = slide.read_region(location, level, size)
    want = ref.read_region(location, level, size)
    assert got.mode == want.mode == "RGBA" and got.size == want.size == size
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decodes_only_what_a_request_touches(tiny_container):
    from wsicodec.format.container import Container

    tissue = np.asarray(Container.open(tiny_container).tissue)
    r, c = map(int, np.argwhere(tissue)[0])
    with PzarrSlide(tiny_container, device="cpu", cache_tiles=8) as slide:
        slide.read_region((c * 256 + 10, r * 256 + 10), 0, (100, 100))
        assert slide.decoder.decoded == 1
        slide.read_region((c * 256 + 50, r * 256 + 50), 0, (100, 100))
        assert slide.decoder.decoded == 1  # served from the LRU cache
        br, bc = map(int, np.argwhere(~tissue)[0])
        region = np.asarray(slide.read_region((bc * 256, br * 256), 0, (256, 256)))
        # background: the slide's glass colour, and no decode
        assert slide.decoder.decoded == 1 and (region[..., :3] == slide.decoder.glass).all()


def test_deepzoom_generator_works_unchanged(pair):
    slide, ref = pair
    dz, dz_ref = DeepZoomGenerator(slide, tile_size=254, overlap=1), DeepZoomGenerator(ref, tile_size=254, overlap=1)
    assert dz.level_count == dz_ref.level_count and dz.level_tiles == dz_ref.level_tiles
    deepest = dz.level_count - 1
    for level, address in ((deepest, (1, 1)), (deepest, (5, 4)), (deepest - 1, (1, 0)), (deepest - 3, (0, 0)), (3, (0, 0))):
        a, b = dz.get_tile(level, address), dz_ref.get_tile(level, address)
        assert a.size == b.size
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_thumbnail(pair):
    slide, ref = pair
    thumb = slide.get_thumbnail((300, 300))
    assert thumb.size == ref.get_thumbnail((300, 300)).size
    np.testing.assert_allclose(np.asarray(thumb, float), np.asarray(ref.get_thumbnail((300, 300)), float), atol=1)


def test_detect_format(tiny_container, tmp_path):
    assert PzarrSlide.detect_format(tiny_container) == "wsicodec"
    other = tmp_path / "x.txt"
    other.write_text("hello")
    assert PzarrSlide.detect_format(other) is None


def test_closed_slide_refuses_reads(tiny_container):
    slide = PzarrSlide(tiny_container, device="cpu")
    slide.close()
    with pytest.raises(ValueError):
        slide.read_region((0, 0), 0, (10, 10))
