"""wsicodec: archive whole-slide images as quantised autoencoder latents in a Zarr container.

    wsicodec.compress("slide.svs", "slide.pzarr")    # -> CompressSummary
    wsicodec.restore("slide.pzarr", "slide.tiff")    # pyramidal BigTIFF that OpenSlide/QuPath open
    wsicodec.open("slide.pzarr")                     # an openslide.AbstractSlide decoding on demand
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "compress", "open", "restore"]


def compress(slide_path, out_path, **options):
    """Compress one slide; see :func:`wsicodec.compress.compress` for the options."""
    from .compress import compress as _compress

    return _compress(slide_path, out_path, **options)


def restore(container_path, out_path, **options):
    """Restore a viewable TIFF; see :func:`wsicodec.restore.restore` for the options."""
    from .restore import restore as _restore

    return _restore(container_path, out_path, **options)


def open(path):  # noqa: A001 - mirrors openslide.open_slide's role
    """Open a .pzarr container as an :class:`openslide.AbstractSlide` (decodes tiles on demand)."""
    from .pzslide import open as _open

    return _open(path)
