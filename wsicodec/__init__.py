"""wsicodec: archive whole-slide images as quantised autoencoder latents in a Zarr container.

    wsicodec.compress("slide.svs", "slide.pzarr")    # -> CompressSummary
    wsicodec.restore("slide.pzarr", "slide.tiff")    # pyramidal BigTIFF that OpenSlide/QuPath open
    wsicodec.open("slide.pzarr")                     # an openslide.AbstractSlide decoding on demand

The pipelines live in modules named for their stage (``archive``: slide -> container, ``decode``:
container -> pixels), not ``compress``/``restore``, so these package-level functions are never shadowed
by submodules of the same name.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .archive import compress  # noqa: E402
from .decode import restore  # noqa: E402
from .pzslide import open  # noqa: E402,A001 - mirrors openslide.open_slide's role

__all__ = ["__version__", "compress", "open", "restore"]
