"""SourceSlide / TileGrid: resolution, level choice, area-averaged reads, bounds, errors."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import openslide
import pytest

from wsicodec.errors import SlideError, WsicodecError
from wsicodec.source.slide import SourceSlide, TileGrid, bounds_from_properties


def _region(path, loc, level, size) -> np.ndarray:
    """Plain OpenSlide read, composited on white (the reference the tests compare against)."""
    with openslide.OpenSlide(str(path)) as s:
        a = np.asarray(s.read_region(loc, level, size)).astype(np.float64)
    rgb = a[..., :3] * a[..., 3:4] / 255 + 255 * (1 - a[..., 3:4] / 255)
    return np.round(rgb).astype(np.uint8)


def _mean2x2(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return a[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))


# -- CMU-1: a real 20x Aperio slide at 0.499 µm/px ------------------------------------------------

def test_cmu1_resolution_and_grid_read_one_to_one(cmu1_path):
    with SourceSlide(cmu1_path) as s:
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "openslide.mpp-x/y"
        assert s.objective_power == 20.0
        assert s.properties["openslide.vendor"] == "aperio"
        g = s.grid(0.5, 256)
        # 0.499 is within 2 % of 0.5: level 0 is archived as is, no resampling
        assert (g.width, g.height, g.level, g.scale) == (2220, 2967, 0, 1.0)
        assert (g.rows, g.cols) == (12, 9)
        assert g.target_mpp == 0.5 and g.source_mpp == pytest.approx(0.499)
        assert g.actual_mpp == pytest.approx(0.499)
        tile = s.read_tile(g, 3, 4)
        assert tile.dtype == np.uint8 and tile.shape == (256, 256, 3)
        np.testing.assert_array_equal(tile, _region(cmu1_path, (4 * 256, 3 * 256), 0, (256, 256)))


def test_cmu1_coarser_target_is_area_averaged(cmu1_path):
    with SourceSlide(cmu1_path) as s:
        g = s.grid(1.0, 256)
        assert g.level == 0 and g.scale == pytest.approx(1.0 / 0.499)
        assert g.width == round(2220 * 0.499 / 1.0) and g.height == round(2967 * 0.499 / 1.0)
        tile = s.read_tile(g, 1, 1).astype(np.float64)
        # a fractional (2.004x) box average is within a couple of grey levels of the plain 2x2 mean
        ref = _mean2x2(_region(cmu1_path, (int(256 * g.scale), int(256 * g.scale)), 0, (512, 512)))
        assert np.abs(tile[:200, :200] - ref[:200, :200]).mean() < 3


def test_finer_target_than_the_slide_is_interpolated(cmu1_path):
    # archiving a 20x slide at 40x is wasteful but allowed (a user may know better): bilinear
    with SourceSlide(cmu1_path) as s:
        g = s.grid(0.25, 256)
        assert g.level == 0 and g.scale == pytest.approx(0.25 / 0.499)
        assert g.width == round(2220 * 0.499 / 0.25)
        tile = s.read_tile(g, 4, 4).astype(np.float64)
        ref = _region(cmu1_path, (int(4 * 256 * g.scale), int(4 * 256 * g.scale)), 0, (128, 128))
        assert np.abs(tile.mean(axis=(0, 1)) - ref.reshape(-1, 3).mean(axis=0)).max() < 4


def test_cmu1_edge_tiles_are_padded_white(cmu1_path):
    with SourceSlide(cmu1_path) as s:
        g = s.grid(0.5, 256)
        x, y, w, h = g.tile_box(g.rows - 1, g.cols - 1)
        assert (w, h) == (2220 - 8 * 256, 2967 - 11 * 256)
        tile = s.read_tile(g, g.rows - 1, g.cols - 1)
        assert (tile[:, w:] == 255).all() and (tile[h:, :] == 255).all()
        np.testing.assert_array_equal(tile[:h, :w], _region(cmu1_path, (x, y), 0, (w, h)))


def test_cmu1_thumbnail_and_associated_images(cmu1_path):
    with SourceSlide(cmu1_path) as s:
        th = s.thumbnail(512)
        assert th.dtype == np.uint8 and th.shape == (512, round(2220 / 2967 * 512), 3)
        assoc = s.associated_images()
        assert set(assoc) == {"label", "macro", "thumbnail"}
        assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in assoc.values())


# -- a 40x synthetic slide read at 20x -------------------------------------------------------------

def test_40x_read_at_20x_is_2x2_area_average(synthetic_slide):
    with SourceSlide(synthetic_slide) as s:
        assert s.mpp == 0.25 and s.objective_power == 40
        g = s.grid(0.5, 256)
        assert (g.level, g.scale, g.width, g.height) == (0, 2.0, 1500, 1200)
        for row, col in [(0, 0), (2, 3), (4, 5)]:
            tile = s.read_tile(g, row, col)
            x, y, w, h = g.tile_box(row, col)
            ref = _mean2x2(_region(synthetic_slide, (2 * x, 2 * y), 0, (2 * w, 2 * h)))
            assert np.abs(tile[:h, :w].astype(np.float64) - ref).max() <= 1.0


def test_level_with_matching_downsample_is_read_as_is(synthetic_slide):
    with SourceSlide(synthetic_slide) as s:
        g = s.grid(1.0, 256)  # level 1 has downsample 4 = 1.0 µm/px
        assert (g.level, g.scale, g.width, g.height) == (1, 4.0, 750, 600)
        tile = s.read_tile(g, 1, 1)
        np.testing.assert_array_equal(tile, _region(synthetic_slide, (1024, 1024), 1, (256, 256)))


def test_coarser_than_a_level_reads_that_level_and_halves(synthetic_slide):
    with SourceSlide(synthetic_slide) as s:
        g = s.grid(2.0, 128)  # nearest level above 2.0 µm/px is level 1 (1.0 µm/px)
        assert (g.level, g.scale, g.width, g.height) == (1, 8.0, 375, 300)
        tile = s.read_tile(g, 1, 1)
        ref = _mean2x2(_region(synthetic_slide, (8 * 128, 8 * 128), 1, (256, 256)))
        assert np.abs(tile.astype(np.float64) - ref).max() <= 1.0


@pytest.fixture(scope="module")
def one_level_slide(synthetic_slide_factory):
    """Level 0 only, so thumbnails are area averages of exactly the pixels level 0 holds."""
    return synthetic_slide_factory(1500, 1200, mpp=0.25, levels=[1], seed=3)


def test_thumbnail_covers_the_archived_area(one_level_slide):
    with SourceSlide(one_level_slide) as s:
        th = s.thumbnail(300)
        assert th.shape == (240, 300, 3)
        full = _region(one_level_slide, (0, 0), 0, (1500, 1200)).astype(np.float64)
        ref = full.reshape(240, 5, 300, 5, 3).mean(axis=(1, 3))
        assert np.abs(th - ref).max() <= 1.0


def test_thumbnail_from_a_reduced_level(synthetic_slide):
    with SourceSlide(synthetic_slide) as s:
        th = s.thumbnail(750)  # level 1 (downsample 4) is exactly this size: read as is
        assert th.shape == (600, 750, 3)
        np.testing.assert_array_equal(th, _region(synthetic_slide, (0, 0), 1, (750, 600)))


def test_bounds_are_honoured(leica_slide, synthetic_slide_factory):
    # same painting, once as Aperio (no bounds) and once inside an empty Leica collection
    aperio = synthetic_slide_factory(1500, 1200, levels=[1, 4], seed=0)
    with SourceSlide(leica_slide) as s, SourceSlide(aperio) as a:
        assert s.properties["openslide.vendor"] == "leica"
        assert s.dimensions == (2900, 2200)
        assert s.bounds == (700, 500, 1500, 1200)
        g = s.grid(0.5, 256)
        assert (g.origin_x, g.origin_y, g.width, g.height, g.level, g.scale) == (700, 500, 750, 600, 0, 2.0)
        ga = a.grid(0.5, 256)
        for rc in [(0, 0), (1, 1), (2, 2)]:
            np.testing.assert_array_equal(s.read_tile(g, *rc), a.read_tile(ga, *rc))
        tile = s.read_tile(g, 0, 1)
        ref = _mean2x2(_region(leica_slide, (700 + 512, 500), 0, (512, 512)))
        assert np.abs(tile.astype(np.float64) - ref).max() <= 1.0
        # edge tile: the archived image ends at the bounds, not at the collection's edge
        last = s.read_tile(g, g.rows - 1, g.cols - 1)
        x, y, w, h = g.tile_box(g.rows - 1, g.cols - 1)
        assert (w, h) == (750 - 512, 600 - 512) and (last[:, w:] == 255).all()
        th = s.thumbnail(300)
        assert th.shape == (240, 300, 3)
        assert np.abs(th.astype(int) - a.thumbnail(300).astype(int)).max() <= 1


def test_bounds_from_properties():
    props = {"openslide.bounds-x": "100", "openslide.bounds-y": "50",
             "openslide.bounds-width": "800", "openslide.bounds-height": "10000"}
    assert bounds_from_properties(props, (1000, 2000)) == (100, 50, 800, 1950)
    assert bounds_from_properties({}, (1000, 2000)) == (0, 0, 1000, 2000)


def test_read_tiles_in_order_and_bounded(synthetic_slide):
    with SourceSlide(synthetic_slide) as s:
        g = s.grid(0.5, 256)
        coords = [(r, c) for r in range(g.rows) for c in range(g.cols)]
        pulled = []

        def gen():
            for rc in coords:
                pulled.append(rc)
                yield rc

        it = s.read_tiles(g, gen(), workers=2)
        first = next(it)
        assert first[0] == coords[0]
        assert len(pulled) <= 2 * 2 + 1  # lazily consumed: at most ~2*workers tiles in flight
        rest = list(it)
        assert [rc for rc, _ in rest] == coords[1:]
        for rc, tile in [first] + rest[::7]:
            np.testing.assert_array_equal(tile, s.read_tile(g, *rc))


def test_read_tiles_stops_cleanly_when_abandoned(synthetic_slide):
    with SourceSlide(synthetic_slide) as s:
        g = s.grid(0.5, 256)
        it = s.read_tiles(g, [(r, c) for r in range(g.rows) for c in range(g.cols)], workers=2)
        next(it)
        it.close()  # the consumer failed mid-slide: pending reads are cancelled, threads joined
        assert not [t for t in threading.enumerate() if t.name.startswith("wsicodec-read")]


def test_read_tile_is_thread_safe(synthetic_slide):
    with SourceSlide(synthetic_slide) as s:
        g = s.grid(0.5, 256)
        want = {rc: s.read_tile(g, *rc) for rc in [(0, 0), (1, 2), (3, 4), (4, 1)]}
        errors = []

        def work():
            for _ in range(5):
                for rc, t in want.items():
                    if not np.array_equal(s.read_tile(g, *rc), t):
                        errors.append(rc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


def test_tile_grid_json_round_trip(synthetic_slide):
    with SourceSlide(synthetic_slide) as s:
        g = s.grid(0.5, 256)
    d = json.loads(json.dumps(g.to_json()))
    assert TileGrid.from_json(d) == g
    assert g.tile_box(0, 0) == (0, 0, 256, 256)
    assert g.tile_box(4, 5) == (1280, 1024, 220, 176)
    with pytest.raises(IndexError):
        g.tile_box(5, 0)


# -- resolution sources ------------------------------------------------------------------------------

def test_no_resolution_names_source_mpp(no_mpp_slide):
    with pytest.raises(SlideError) as e:
        SourceSlide(no_mpp_slide)
    msg = str(e.value)
    assert "--source-mpp" in msg and no_mpp_slide.name in msg and "\n" not in msg


def test_source_mpp_fills_in_and_overrides(no_mpp_slide, synthetic_slide):
    with SourceSlide(no_mpp_slide, source_mpp=0.5) as s:
        assert (s.mpp, s.mpp_source) == (0.5, "--source-mpp")
        assert s.grid(0.5).width == 1200
    with SourceSlide(synthetic_slide, source_mpp=0.5) as s:  # overrides the recorded 0.25
        assert (s.mpp, s.mpp_source) == (0.5, "--source-mpp")
        g = s.grid(0.5)
        assert (g.width, g.scale) == (3000, 1.0)
    with pytest.raises(SlideError, match="--source-mpp"):
        SourceSlide(synthetic_slide, source_mpp=-1)


def test_objective_power_fallback(synthetic_slide_factory):
    p = synthetic_slide_factory(800, 600, mpp=None, objective_power=20, levels=[1], seed=2)
    with SourceSlide(p) as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "openslide.objective-power"


def test_real_slide_without_resolution(tcga_no_mpp_path):
    with pytest.raises(SlideError, match="--source-mpp"):
        SourceSlide(tcga_no_mpp_path)
    with SourceSlide(tcga_no_mpp_path, source_mpp=0.5) as s:
        g = s.grid(0.5)
        assert (g.width, g.height) == (4443, 3567)
        assert s.read_tile(g, 0, 0).shape == (256, 256, 3)


# -- bad input -----------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(SlideError) as e:
        SourceSlide(tmp_path / "nope.svs")
    assert "not found" in str(e.value) and "nope.svs" in str(e.value) and "\n" not in str(e.value)


def test_directory_is_not_a_slide(tmp_path):
    with pytest.raises(SlideError, match="not a file"):
        SourceSlide(tmp_path)


def test_non_slide_file(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n")
    with pytest.raises(SlideError) as e:
        SourceSlide(p)
    msg = str(e.value)
    assert "notes.svs" in msg and "OpenSlide" in msg and "\n" not in msg
    assert isinstance(e.value, WsicodecError)


def test_damaged_tiles_raise_slide_error(synthetic_slide, tmp_path):
    # keep the header and the tile index but cut off the tile data: opens fine, fails on read
    p = tmp_path / "cut.svs"
    shutil.copy(synthetic_slide, p)
    with openslide.OpenSlide(str(p)) as o:
        assert o.level_count == 2
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * (size // 2))
    try:
        s = SourceSlide(p)
    except SlideError:
        return  # refusing at open is fine too
    with s:
        g = s.grid(0.5)
        with pytest.raises(SlideError) as e:
            for r in range(g.rows):
                for c in range(g.cols):
                    s.read_tile(g, r, c)
        assert "cut.svs" in str(e.value) and "\n" not in str(e.value)
