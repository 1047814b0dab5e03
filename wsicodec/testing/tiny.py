"""Tiny random autoencoders for tests: real model classes with a few channels and random weights, saved as
folders that ``--model DIR`` / ``load_model(DIR)`` load like any local model.

    write_tiny_taesd(folder, *, seed=0) -> Path
        # a diffusers AutoencoderTiny (TAESD layout), 8 channels per block: 4 latent channels, 1/8 size
    write_tiny_builtin(folder, *, seed=0, model_id="tiny-test", extra=None) -> Path
        # the builtin CodecNet architecture (wsicodec.models.builtin) at 8 channels per stage
    TINY_TAESD_CONFIG, TINY_BUILTIN_CONFIG      # the configurations they build

Both are fast on a CPU, and their latents still vary from tile to tile, so quantisers, containers and
readers are exercised for real; what they decode looks nothing like the input.  Both seed torch's
global generator (``torch.manual_seed(seed)``) so that the same call writes the same weights.
torch and diffusers are imported on call, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TINY_TAESD_CONFIG: dict[str, Any] = {
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
}

TINY_BUILTIN_CONFIG: dict[str, Any] = {"enc_widths": [8], "enc_blocks": [1], "dec_widths": [8, 8], "dec_blocks": [1, 1]}


def write_tiny_taesd(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``diffusers.AutoencoderTiny`` into ``folder``; returns it as a Path."""
    import torch
    from diffusers import AutoencoderTiny

    folder = Path(folder)
    torch.manual_seed(seed)
    AutoencoderTiny(**TINY_TAESD_CONFIG).save_pretrained(folder)
    return folder


def write_tiny_builtin(folder: str | os.PathLike, *, seed: int = 0, model_id: str = "tiny-test",
                       extra: dict[str, Any] | None = None) -> Path:
    """Save a randomly initialised tiny builtin-architecture model (manifest + weights) into ``folder``."""
    import torch

    from wsicodec.models.builtin import build_net, save_builtin_folder

    folder = Path(folder)
    torch.manual_seed(seed)
    save_builtin_folder(build_net(dict(TINY_BUILTIN_CONFIG)), folder, model_id=model_id, extra=extra)
    return folder
