"""load -> dequantise -> decode (with halo) -> pyramidal TIFF / region.  OWNER: restore helper."""
