"""The .pzarr container format (formats/pzarr-v1.md): ``spec`` (constants, byte rules), ``writer``, ``container``.

    ContainerWriter(...)      write one slide's container atomically
    Container.open(path)      read one; the only reader of the layout
"""

from wsicodec.format.container import Container, open_container
from wsicodec.format.spec import FORMAT_NAME, FORMAT_VERSION, SHARD_TILES, ZSTD_LEVEL, stored_tile_bytes
from wsicodec.format.writer import ContainerWriter

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SHARD_TILES", "ZSTD_LEVEL", "Container", "ContainerWriter",
           "open_container", "stored_tile_bytes"]
