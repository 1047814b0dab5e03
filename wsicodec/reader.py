"""PzarrSlide: an ``openslide.AbstractSlide`` over a .pzarr container, decoding on demand.

    slide = wsicodec.reader.open("slide.pzarr")      # (the package exposes it as wsicodec.open)
    slide.dimensions, slide.level_count, slide.level_dimensions, slide.level_downsamples
    slide.properties["openslide.mpp-x"], slide.associated_images["label"]
    slide.color_profile                               # the source's ICC profile (PIL ImageCmsProfile) or None
    slide.read_region((x, y), level, (w, h))          # RGBA PIL image, like OpenSlide's
    DeepZoomGenerator(slide)                          # works unchanged

The levels are those ``wsicodec restore`` writes to the TIFF (level 0 at the archived resolution,
then rounded 2x2 averages down to <= 1000 px on the long side), with the same pixels. A request
decodes only the tiles it touches; decoded and reduced tiles stay in LRU caches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsicodec.pipeline.decoder import Pyramid, TileDecoder, load_decoder_model, open_container

VENDOR = "wsicodec"
SOURCE_PREFIX = "wsicodec.source."


class PzarrSlide(openslide.AbstractSlide):
    """A restored slide, read straight from its container."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model: str | None = None,
        device: str | None = None,
        force: bool = False,
        cache_tiles: int = 256,
        batch_size: int = 8,
        halo: int | None = None,
        blend: int | None = None,
        _model_obj=None,
    ):
        super().__init__()
        self._path = Path(path)
        self._container = open_container(self._path)
        # what AbstractSlide.color_profile and get_thumbnail read: the source's ICC profile, kept in the container
        self._profile = self._container.icc_profile
        net = _model_obj if _model_obj is not None else load_decoder_model(self._container, model, device, force)
        self._decoder = TileDecoder(self._container, net, halo=halo, cache_tiles=cache_tiles, batch_size=batch_size,
                                    blend=blend)
        self._pyramid = Pyramid(self._decoder, cache_tiles=cache_tiles)
        dims = tuple(tuple(d) for d in self._pyramid.dimensions)
        self._dims = dims
        w0, h0 = dims[0]
        # OpenSlide's definition, so the numbers equal those it reports for the restored TIFF
        self._downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        self._props = self._make_properties()
        self._assoc: dict[str, Image.Image] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({str(self._path)!r})"

    # ------------------------------------------------------------------ AbstractSlide
    @classmethod
    def detect_format(cls, filename) -> str | None:
        try:
            open_container(filename)
        except Exception:
            return None
        return VENDOR

    def close(self) -> None:
        self._closed = True
        close = getattr(self._container, "close", None)
        if callable(close):
            close()

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def properties(self) -> Mapping[str, str]:
        return self._props

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        if self._assoc is None:
            assoc = {}
            for name, arr in (self._container.associated_images() or {}).items():
                img = Image.fromarray(np.asarray(arr, np.uint8))
                assoc[str(name)] = img.convert("RGBA")
            self._assoc = assoc
        return self._assoc

    def get_best_level_for_downsample(self, downsample: float) -> int:
        # OpenSlide's rule: the deepest level whose downsample does not exceed the request
        best = 0
        for level, ds in enumerate(self._downsamples):
            if ds <= downsample * (1 + 1e-9):
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA (non-premultiplied, alpha 0 outside the image), like OpenSlide's read_region.

        ``location`` is in level-0 pixels; ``size`` in pixels of ``level``.
        """
        if self._closed:
            raise ValueError("Cannot read from a closed slide")
        if not 0 <= level < self.level_count:
            raise openslide.OpenSlideError(f"Invalid level {level}")
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise openslide.OpenSlideError(f"Size {size} must be non-negative")
        if w == 0 or h == 0:
            return Image.new("RGBA", (w, h))
        ds = self._downsamples[level]
        # nearest level pixel (OpenSlide would resample at a fractional offset)
        x = math.floor(location[0] / ds + 0.5)
        y = math.floor(location[1] / ds + 0.5)
        rgb, inside = self._pyramid.region(level, x, y, w, h)
        rgba = np.empty((h, w, 4), np.uint8)
        rgba[..., :3] = rgb
        rgba[..., 3] = np.where(inside, 255, 0)
        rgba[~inside, :3] = 0  # transparent black, as OpenSlide returns outside the slide
        region = Image.fromarray(rgba, "RGBA")
        if self._profile is not None:  # as OpenSlide does: DeepZoomGenerator passes it on to its tiles
            region.info["icc_profile"] = self._profile
        return region

    # ------------------------------------------------------------------ extras
    @property
    def container(self):
        return self._container

    @property
    def decoder(self) -> TileDecoder:
        return self._decoder

    def _make_properties(self) -> dict[str, str]:
        c = self._container
        grid = c.grid
        mpp = float(getattr(c, "archived_mpp", grid.target_mpp))  # exact: what a measurement needs
        props: dict[str, str] = {}
        attrs = getattr(c, "attrs", {}) or {}
        source = attrs.get("source") if isinstance(attrs, dict) else None
        src_props = (source or {}).get("properties") if isinstance(source, dict) else None
        for key, value in (src_props or {}).items():
            props[SOURCE_PREFIX + str(key)] = str(value)
        props.update(
            {
                openslide.PROPERTY_NAME_VENDOR: VENDOR,
                openslide.PROPERTY_NAME_MPP_X: repr(mpp),
                openslide.PROPERTY_NAME_MPP_Y: repr(mpp),
                openslide.PROPERTY_NAME_OBJECTIVE_POWER: f"{round(10.0 / float(grid.target_mpp), 2):g}",
                openslide.PROPERTY_NAME_BACKGROUND_COLOR: "%02X%02X%02X" % tuple(self._decoder.glass),
                "openslide.level-count": str(len(self._dims)),
                "wsicodec.model": str((c.model or {}).get("id", "")),
                "wsicodec.quantizer": str(getattr(c.quantizer, "kind", "")),
                "wsicodec.archived-mpp": repr(float(getattr(grid, "actual_mpp", mpp))),
            }
        )
        if self._profile is not None:  # OpenSlide's own property for a slide with a profile
            props["openslide.icc-size"] = str(len(self._profile))
        t = str(self._decoder.tile_size)
        for level, ((w, h), ds) in enumerate(zip(self._dims, self._downsamples)):
            props[f"openslide.level[{level}].width"] = str(w)
            props[f"openslide.level[{level}].height"] = str(h)
            props[f"openslide.level[{level}].downsample"] = repr(ds)
            props[f"openslide.level[{level}].tile-width"] = t
            props[f"openslide.level[{level}].tile-height"] = t
        return props


def open(  # noqa: A001 - mirrors openslide.open_slide
    path: str | os.PathLike,
    *,
    model: str | None = None,
    device: str | None = None,
    force: bool = False,
    cache_tiles: int = 256,
    batch_size: int = 8,
    halo: int | None = None,
    blend: int | None = None,
) -> PzarrSlide:
    """Open a .pzarr container as an OpenSlide-like slide that decodes only what is read.

    ``model`` decodes with another model than the one the container records (``force`` skips the check that
    its decoder is the same); ``device`` picks cpu/cuda/mps; ``cache_tiles`` decoded tiles stay in an LRU
    cache; ``batch_size`` tiles are decoded at once; ``halo`` (latent cells) and ``blend`` (px) override the
    container's recorded decode settings (docs/restore.md)."""
    return PzarrSlide(path, model=model, device=device, force=force, cache_tiles=cache_tiles,
                      batch_size=batch_size, halo=halo, blend=blend)
