"""wsicodec: archive whole-slide images as quantised autoencoder latents in a Zarr container."""

__version__ = "0.1.0"
