"""`wsicodec serve`: a local DeepZoom web viewer for .pzarr containers (docs/viewer.md).

The server (Starlette + uvicorn, the ``viewer`` extra) lives in :mod:`wsicodec.viewer.server`; importing
this package imports neither, so ``import wsicodec`` never needs them.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
OPENSEADRAGON_VERSION = "6.1.1"  # also in static/openseadragon/VERSION
