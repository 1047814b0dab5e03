"""Latent quantisers: fit a codebook, map latents to stored uint8 indices and back."""
