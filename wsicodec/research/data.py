"""Tissue tiles for training and evaluation, from slides and from image files or folders.

    iter_tiles(inputs, *, tile_size=256, target_mpp=0.5, images_mpp=None, slide_mpp=None,
               min_tissue=0.2) -> Iterator[np.ndarray uint8 (t,t,3)]
    load_tiles(inputs, *, tile_size=256, target_mpp=0.5, images_mpp=None, slide_mpp=None,
               max_tiles=None, seed=0, min_tissue=0.2) -> np.ndarray uint8 (N,t,t,3)

Inputs are slides (anything OpenSlide opens; tissue tiles only, decided by wsicodec.source.tissue on the
slide's thumbnail, read at ``target_mpp`` by wsicodec.source.slide) and image files or folders of them
(png, tif/tiff, jpg/jpeg). Images: RGBA is composited on white; when ``images_mpp`` is given they
are resampled to ``target_mpp`` by area averaging; they are cut into a grid of tile-sized crops
covering the image, the last row and column aligned to the image's edge (images smaller than a
tile are padded with white), and crops that are mostly background are skipped. ``slide_mpp`` is
used only for slides that record no resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from wsicodec.source.slide import SLIDE_SUFFIXES
from wsicodec.errors import SlideError, WsicodecError

IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg"}
# here a .tif/.tiff is a picture unless it has a pyramid (checked per file); a .dcm names its series
WHOLE_SLIDE_SUFFIXES = (SLIDE_SUFFIXES - IMAGE_SUFFIXES) | {".dcm"}


def expand_inputs(inputs: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """Each input as ("slide" | "image", path), folders expanded (sorted, not recursive)."""
    out: list[tuple[str, Path]] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise WsicodecError(f"input not found: {p}")
        if p.is_dir():
            found = False
            for child in sorted(p.iterdir()):
                suffix = child.suffix.lower()
                if child.is_file() and suffix in IMAGE_SUFFIXES:
                    out.append(("image", child))
                    found = True
                elif child.is_file() and suffix in WHOLE_SLIDE_SUFFIXES:
                    out.append(("slide", child))
                    found = True
            if not found:
                raise WsicodecError(f"no images or slides in folder {p}")
        elif p.suffix.lower() in WHOLE_SLIDE_SUFFIXES:
            out.append(("slide", p))
        elif p.suffix.lower() in IMAGE_SUFFIXES and not _is_pyramidal_tiff(p):
            out.append(("image", p))
        else:
            out.append(("slide", p))
    return out


def _is_pyramidal_tiff(p: Path) -> bool:
    """A .tif that OpenSlide recognises as a slide (e.g. a generic tiled pyramid) goes the slide way."""
    if p.suffix.lower() not in {".tif", ".tiff"}:
        return False
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(p)) not in (None, "generic-tiff") or _tiff_levels(p) > 1
    except Exception:
        return False


def _tiff_levels(p: Path) -> int:
    try:
        import tifffile

        with tifffile.TiffFile(p) as tf:
            return len(tf.series[0].levels) if tf.series else 1
    except Exception:
        return 1


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H,W,3); alpha composited on white."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            arr = np.asarray(im.convert("RGB"))
    except Exception:
        try:
            import tifffile

            arr = tifffile.imread(path)
        except Exception as exc:
            raise WsicodecError(f"cannot read image {path}: {exc}") from None
        arr = _to_rgb(arr)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float64) * 255.0 / max(float(arr.max()), 1.0)).astype(np.uint8)
    if arr.shape[2] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * a + 255.0 * (1 - a)).round().astype(np.uint8)
    return arr[..., :3]


def resample_area(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale by ``factor`` (< 1 shrinks) with area averaging; integer shrink factors average exact blocks."""
    if abs(factor - 1.0) < 1e-6:
        return img
    from PIL import Image

    inv = 1.0 / factor
    if factor < 1 and abs(inv - round(inv)) < 1e-6:
        k = int(round(inv))
        h, w = (img.shape[0] // k) * k, (img.shape[1] // k) * k
        blocks = img[:h, :w].reshape(h // k, k, w // k, k, 3).astype(np.float32)
        return blocks.mean(axis=(1, 3)).round().astype(np.uint8)
    size = (max(1, round(img.shape[1] * factor)), max(1, round(img.shape[0] * factor)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BOX if factor < 1 else Image.BICUBIC))


def tissue_fraction(tile: np.ndarray) -> float:
    """Share of pixels that are not bright, unsaturated glass."""
    t = tile.astype(np.int16)
    sat = t.max(axis=2) - t.min(axis=2)
    gray = t.mean(axis=2)
    return float(((sat > 20) | (gray < 200)).mean())


def _starts(length: int, t: int) -> list[int]:
    if length <= t:
        return [0]
    starts = list(range(0, length - t + 1, t))
    if starts[-1] != length - t:
        starts.append(length - t)
    return starts


def image_crops(img: np.ndarray, tile_size: int, min_tissue: float = 0.2) -> Iterator[np.ndarray]:
    h, w = img.shape[:2]
    if h < tile_size or w < tile_size:
        padded = np.full((max(h, tile_size), max(w, tile_size), 3), 255, np.uint8)
        padded[:h, :w] = img
        img, h, w = padded, padded.shape[0], padded.shape[1]
    for y in _starts(h, tile_size):
        for x in _starts(w, tile_size):
            crop = img[y : y + tile_size, x : x + tile_size]
            if tissue_fraction(crop) >= min_tissue:
                yield np.ascontiguousarray(crop)


def _open_slide(path: Path, slide_mpp: float | None):
    from wsicodec.source.slide import SourceSlide

    try:
        return SourceSlide(path)
    except SlideError:
        if slide_mpp is None:
            raise
        return SourceSlide(path, source_mpp=slide_mpp)


def _slide_tiles(path: Path, tile_size: int, target_mpp: float, slide_mpp: float | None,
                 rng: np.random.Generator | None, cap: int | None) -> Iterator[np.ndarray]:
    from wsicodec.source.tissue import tissue_tiles

    slide = _open_slide(path, slide_mpp)
    grid = slide.grid(target_mpp=target_mpp, tile_size=tile_size)
    mask = np.asarray(tissue_tiles(slide.thumbnail(), grid))
    coords = np.argwhere(mask)
    if cap is not None and len(coords) > cap and rng is not None:
        coords = coords[np.sort(rng.choice(len(coords), cap, replace=False))]
    for r, c in coords:
        yield slide.read_tile(grid, int(r), int(c))


def iter_tiles(inputs: Iterable[str | Path], *, tile_size: int = 256, target_mpp: float = 0.5,
               images_mpp: float | None = None, slide_mpp: float | None = None, min_tissue: float = 0.2,
               _rng: np.random.Generator | None = None, _cap: int | None = None) -> Iterator[np.ndarray]:
    """Tissue tiles, one uint8 (t,t,3) array at a time, in input order."""
    for kind, path in expand_inputs(inputs):
        if kind == "slide":
            yield from _slide_tiles(path, tile_size, target_mpp, slide_mpp, _rng, _cap)
        else:
            img = read_image(path)
            if images_mpp:
                img = resample_area(img, images_mpp / target_mpp)
            yield from image_crops(img, tile_size, min_tissue)


def load_tiles(inputs: Iterable[str | Path], *, tile_size: int = 256, target_mpp: float = 0.5,
               images_mpp: float | None = None, slide_mpp: float | None = None, max_tiles: int | None = None,
               seed: int = 0, min_tissue: float = 0.2) -> np.ndarray:
    """All tissue tiles as uint8 (N,t,t,3); with ``max_tiles`` a seeded random subset of them."""
    rng = np.random.default_rng(seed)
    tiles = list(iter_tiles(inputs, tile_size=tile_size, target_mpp=target_mpp, images_mpp=images_mpp,
                            slide_mpp=slide_mpp, min_tissue=min_tissue, _rng=rng, _cap=max_tiles))
    if not tiles:
        raise WsicodecError("no tissue tiles found in the inputs")
    if max_tiles is not None and len(tiles) > max_tiles:
        keep = np.sort(rng.choice(len(tiles), max_tiles, replace=False))
        tiles = [tiles[i] for i in keep]
    return np.stack(tiles)
