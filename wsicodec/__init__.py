"""wsicodec: archive whole-slide images as quantised autoencoder latents in a Zarr container.

    wsicodec.compress("slide.svs", "slide.pzarr")    # -> CompressResult
    wsicodec.restore("slide.pzarr", "slide.tiff")    # -> RestoreResult; a pyramidal BigTIFF OpenSlide opens
    wsicodec.restore_region("slide.pzarr", "r.png", x, y, w, h)  # one region as an image file
    wsicodec.open("slide.pzarr")                     # an openslide.AbstractSlide decoding on demand
    wsicodec.Container.open("slide.pzarr")           # the container itself (formats/pzarr-v1.md)
    wsicodec.load_model("taef2")                     # an Autoencoder by name or folder

The layout (docs/architecture.md): ``source`` (slide, tissue) -> ``models`` -> ``quant`` -> ``format``,
joined by ``pipeline`` (compress, decoder, restore, tiff); ``reader`` is the OpenSlide-compatible slide;
``stats`` and ``research`` are tools built on the core; ``testing`` holds synthetic slides and tiny models.
"""

from __future__ import annotations

from wsicodec._version import __version__
from wsicodec.errors import (
    ContainerError,
    ModelError,
    OutputExistsError,
    SlideError,
    WsicodecError,
)
from wsicodec.format.container import Container
from wsicodec.models import Autoencoder, load_model
from wsicodec.pipeline.compress import CompressResult, compress
from wsicodec.pipeline.restore import RestoreResult, restore, restore_region
from wsicodec.reader import PzarrSlide, open  # noqa: A004 - mirrors openslide.open_slide's role

__all__ = [
    "Autoencoder",
    "CompressResult",
    "Container",
    "ContainerError",
    "ModelError",
    "OutputExistsError",
    "PzarrSlide",
    "RestoreResult",
    "SlideError",
    "WsicodecError",
    "__version__",
    "compress",
    "load_model",
    "open",
    "restore",
    "restore_region",
]
