"""Tissue detection on thumbnails: stained tissue in, glass / marker ink / dark artefacts out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from wsicodec.source.slide import SourceSlide, TileGrid
from wsicodec.source.tissue import ink_pixels, tile_fractions, tissue_pixels, tissue_tiles

GLASS = (243, 243, 245)


def _grid(width=3000, height=2000, tile=256) -> TileGrid:
    return TileGrid(tile_size=tile, width=width, height=height, rows=-(-height // tile),
                    cols=-(-width // tile), target_mpp=0.5, source_mpp=0.25, objective_power=40.0,
                    level=0, origin_x=0, origin_y=0, scale=2.0)


def _glass(h=200, w=300, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float64)
    img[:] = GLASS
    return np.clip(img + rng.normal(0, 1.5, img.shape), 0, 255)


def _he_texture(h, w, seed=0) -> np.ndarray:
    """Pink stroma with purple nuclei-ish speckle (H&E colours)."""
    rng = np.random.default_rng(seed)
    pink = np.array([232, 160, 200], np.float64)
    purple = np.array([110, 70, 150], np.float64)
    mix = (rng.random((h, w)) < 0.2)[..., None]
    return np.where(mix, purple, pink) + rng.normal(0, 6, (h, w, 3))


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _stroke(h, w, width=8, slope=0.3, offset=40):
    yy, xx = np.mgrid[:h, :w]
    return np.abs(yy - (offset + slope * xx)) <= width / 2


def test_tissue_blob_on_glass_selects_its_tiles():
    g = _grid()  # 8 x 12 tiles; the 300 x 200 thumbnail is 1/10 scale
    img = _glass()
    blob = _disc(200, 300, 100, 150, 50)
    img[blob] = _he_texture(200, 300)[blob]
    mask = tissue_tiles(img.astype(np.uint8), g)
    assert mask.shape == (8, 12) and mask.dtype == bool
    expected = tile_fractions(blob, g) >= 0.05
    assert mask[4, 6] and not mask[0, 0] and not mask[7, 11]
    assert (mask != expected).sum() <= 2  # only boundary tiles may differ
    assert 0.1 < mask.mean() < 0.5


@pytest.mark.parametrize("ink", [(40, 150, 80), (50, 90, 170), (200, 30, 45), (25, 25, 30)],
                         ids=["green", "blue", "red", "black"])
def test_pen_stroke_alone_is_not_tissue(ink):
    img = _glass()
    stroke = _stroke(200, 300)
    img[stroke] = ink
    img = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)))  # soft edges
    assert not tissue_tiles(img, _grid()).any()
    assert ink_pixels(img)[_stroke(200, 300, width=4)].all()


def test_pen_over_tissue_keeps_the_tissue():
    img = _glass()
    blob = _disc(200, 300, 100, 150, 60)
    img[blob] = _he_texture(200, 300, seed=1)[blob]
    img[_stroke(200, 300, width=10, slope=0.0, offset=20)] = (40, 150, 80)  # green line across the top
    mask = tissue_pixels(img.astype(np.uint8))
    assert mask[blob].mean() > 0.9
    assert not mask[10:30].any()


def test_blank_glass_and_a_dark_edge_are_not_tissue():
    img = _glass()
    img[:, :6] = 30  # the dark edge of a coverslip
    img[150:153, 40:43] = 60  # dust
    assert not tissue_tiles(img.astype(np.uint8), _grid()).any()


def test_pale_tissue_on_an_all_tissue_thumbnail():
    # no glass at all: Otsu would split pale from dark stain; the clamp keeps pale stroma in
    img = _he_texture(200, 300, seed=2)
    img[:, :150] = img[:, :150] * 0.3 + 255 * 0.7  # very pale left half (sat ~0.1)
    assert tissue_tiles(np.clip(img, 0, 255).astype(np.uint8), _grid()).mean() > 0.95


def test_tile_fractions_map_the_thumbnail_onto_the_grid():
    g = _grid(width=1000, height=600, tile=256)  # 3 x 4 tiles, the last column 232 px, last row 88 px
    mask = np.zeros((60, 100), bool)  # 1/10 scale
    mask[:, :52] = True  # 520 archived px: tiles 0, 1 fully, tile 2 a little (512-520)
    f = tile_fractions(mask, g)
    assert f.shape == (3, 4)
    np.testing.assert_allclose(f[:, :2], 1.0)
    assert (f[:, 3] == 0).all()
    assert 0 < f[0, 2] < 0.1


def test_cmu1_has_some_but_not_all_tissue_tiles(cmu1_path):
    with SourceSlide(cmu1_path) as s:
        g = s.grid(0.5, 256)
        mask = tissue_tiles(s.thumbnail(), g)
    assert mask.shape == (g.rows, g.cols)
    assert 0 < mask.sum() < mask.size
    assert 0.3 < mask.mean() < 0.8  # CMU-1-Small-Region: skin with white margins


def test_synthetic_pen_only_slide_has_no_tissue(synthetic_slide_factory):
    with SourceSlide(synthetic_slide_factory(2000, 1600, tissue_fraction=0.0, pen="green",
                                             levels=[1, 4], seed=4)) as s:
        thumb = s.thumbnail()
        assert ink_pixels(thumb).mean() > 0.02  # the pen is there
        assert not tissue_tiles(thumb, s.grid(0.5)).any()
    with SourceSlide(synthetic_slide_factory(2000, 1600, tissue_fraction=0.3, pen="green",
                                             levels=[1, 4], seed=4)) as s:
        mask = tissue_tiles(s.thumbnail(), s.grid(0.5))
        assert 0 < mask.sum() < mask.size


# -- real H&E tiles and edge cases (histolab fixtures in ../shared) -------------------------------------

def _histolab(shared_dir, name) -> np.ndarray:
    d = shared_dir / "data" / "tiles" / "histolab" if shared_dir else None
    if d is None or not (d / name).is_file():
        pytest.skip("needs ../shared/data/tiles/histolab")
    return np.asarray(Image.open(d / name).convert("RGBA"))


@pytest.mark.parametrize("name", ["no-tissue.png", "no-tissue2.png", "no-tissue-line.png",
                                  "no-tissue-green-pen.png", "almost-white-1.png"])
def test_histolab_empty_fields(shared_dir, name):
    assert tissue_pixels(_histolab(shared_dir, name)).mean() < 0.01


@pytest.mark.parametrize("name", ["tissue-level0-7352-11762-7864-12274.png", "tissue-level2-4640-4649-8736-8746.png",
                                  "tcga-lung.png", "medium-nuclei-score-level1-2.png", "low-nuclei-score-level0.png"])
def test_histolab_tissue_fields(shared_dir, name):
    img = _histolab(shared_dir, name)
    assert tissue_pixels(img).mean() > 0.1
    g = _grid(width=img.shape[1] * 4, height=img.shape[0] * 4)
    assert tissue_tiles(img, g).mean() > 0.5


def test_histolab_green_pen_over_tissue(shared_dir):
    img = _histolab(shared_dir, "medium-nuclei-score-green-pen-level1.png")
    rgb = img[..., :3].astype(int)
    green = (rgb[..., 1] > rgb[..., 0] + 30)  # plainly green ink
    mask = tissue_pixels(img)
    assert green.mean() > 0.1 and not mask[green].any()
    assert mask[~green].mean() > 0.5
