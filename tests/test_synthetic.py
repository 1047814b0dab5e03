"""Synthetic Aperio slides: what OpenSlide sees, determinism, per-level drawing, atomic writes."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from wsicodec.testing.synthetic import _Painter, write_synthetic_slide


def test_opens_as_aperio_with_resolution_and_levels(synthetic_slide):
    with openslide.OpenSlide(str(synthetic_slide)) as s:
        p = s.properties
        assert p["openslide.vendor"] == "aperio"
        assert float(p["openslide.mpp-x"]) == 0.25 and float(p["openslide.mpp-y"]) == 0.25
        assert float(p["openslide.objective-power"]) == 40
        assert s.level_dimensions == ((3000, 2400), (750, 600))
        assert s.level_downsamples == pytest.approx((1.0, 4.0))
        assert set(s.associated_images) == {"label", "macro", "thumbnail"}
        assert p["openslide.level[0].tile-width"] == "256"


def test_associated_images_decode(synthetic_slide):
    from wsicodec.source.slide import SourceSlide

    with SourceSlide(synthetic_slide) as s:
        assoc = s.associated_images()
    assert assoc["thumbnail"].shape == (819, 1024, 3)  # 3000 x 2400 with the long side 1024
    assert assoc["label"].shape == (400, 380, 3) and assoc["macro"].shape == (431, 1280, 3)
    assert (assoc["label"] < 50).any()  # the barcode is there
    thumb = assoc["thumbnail"].astype(int)
    assert ((thumb[..., 0] - thumb[..., 1]) > 30).mean() > 0.1  # pink tissue in the thumbnail


def test_tiff_layout_matches_aperio_conventions(synthetic_slide):
    with tifffile.TiffFile(synthetic_slide) as t:
        pages = t.pages
        kinds = [(pg.is_tiled, int(pg.tags["NewSubfileType"].value)) for pg in pages]
        # level 0 tiled, stripped thumbnail, tiled level 1 (NewSubfileType 0), label (1), macro (9)
        assert kinds == [(True, 0), (False, 0), (True, 0), (False, 1), (False, 9)]
        assert all(pg.description.startswith("Aperio Image Library") for pg in pages)
        assert "|AppMag = 40|MPP = 0.25" in pages[0].description
        assert "label" in pages[3].description and "macro" in pages[4].description


def test_no_resolution_when_asked(no_mpp_slide):
    with openslide.OpenSlide(str(no_mpp_slide)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert "openslide.mpp-x" not in s.properties
        assert "openslide.objective-power" not in s.properties


def test_deterministic_per_seed_and_tile_independent():
    a = _Painter(4000, 3000, mpp=0.25, tissue_fraction=0.5, islands=2, pen=None, seed=5)
    b = _Painter(4000, 3000, mpp=0.25, tissue_fraction=0.5, islands=2, pen=None, seed=5)
    c = _Painter(4000, 3000, mpp=0.25, tissue_fraction=0.5, islands=2, pen=None, seed=6)
    big = a.render(1000, 1000, 512, 512, 1)
    np.testing.assert_array_equal(big, b.render(1000, 1000, 512, 512, 1))
    # painting a sub-tile gives exactly the same pixels: tiles join seamlessly
    np.testing.assert_array_equal(big[256:, 256:], a.render(1256, 1256, 256, 256, 1))
    assert not np.array_equal(big, c.render(1000, 1000, 512, 512, 1))


def test_content_looks_like_h_and_e(synthetic_slide):
    with openslide.OpenSlide(str(synthetic_slide)) as s:
        rgb = np.asarray(s.read_region((0, 0), 1, (750, 600)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    glass = (np.abs(r - 243) <= 3) & (np.abs(g - 243) <= 3)
    stained = ~glass
    assert 0.15 < stained.mean() < 0.7  # islands on glass
    # H&E: green is absorbed most, so G < R and G < B wherever there is stain
    assert (g[stained] <= r[stained] + 2).mean() > 0.98
    assert (g[stained] < b[stained]).mean() > 0.9
    # purple nuclei (dark, blue-ish) and pink stroma are both there
    assert ((b > r) & (r < 150))[stained].mean() > 0.02
    assert ((r > 200) & (g < 200))[stained].mean() > 0.3


def test_reduced_level_matches_level_zero_on_average(synthetic_slide):
    with openslide.OpenSlide(str(synthetic_slide)) as s:
        l0 = np.asarray(s.read_region((0, 0), 0, (3000, 2400)).convert("RGB")).astype(np.float64)
        l1 = np.asarray(s.read_region((0, 0), 1, (750, 600)).convert("RGB")).astype(np.float64)
    blocks0 = l0.reshape(60, 40, 75, 40, 3).mean(axis=(1, 3))
    blocks1 = l1.reshape(60, 10, 75, 10, 3).mean(axis=(1, 3))
    assert np.abs(blocks0 - blocks1).mean() < 2.0


def test_empty_and_full_layouts(tmp_path):
    empty = write_synthetic_slide(tmp_path / "empty.svs", 600, 500, tissue_fraction=0.0, levels=[1],
                                  with_associated=False)
    full = write_synthetic_slide(tmp_path / "full.svs", 600, 500, tissue_fraction=1.0, levels=[1],
                                 with_associated=False)
    with openslide.OpenSlide(str(empty)) as s:
        e = np.asarray(s.read_region((0, 0), 0, (600, 500)).convert("RGB"))
        assert not s.associated_images
    with openslide.OpenSlide(str(full)) as s:
        f = np.asarray(s.read_region((0, 0), 0, (600, 500)).convert("RGB")).astype(int)
    assert np.abs(e.astype(int) - (243, 243, 245)).max() <= 2
    assert (f[..., 1] < 225).mean() > 0.5


def test_pen_stroke_is_drawn(tmp_path):
    p = write_synthetic_slide(tmp_path / "pen.svs", 800, 800, tissue_fraction=0.0, pen="green", levels=[1])
    with openslide.OpenSlide(str(p)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, (800, 800)).convert("RGB")).astype(int)
    assert ((rgb[..., 1] > rgb[..., 0] + 40)).mean() > 0.05


def test_written_atomically(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_slide(tmp_path / "bad.svs", 500, 400, pen="purple")
    assert list(tmp_path.iterdir()) == []
    write_synthetic_slide(tmp_path / "ok.svs", 500, 400, levels=[1])
    assert [p.name for p in tmp_path.iterdir()] == ["ok.svs"]
