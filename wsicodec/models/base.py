"""The one interface every autoencoder in wsicodec offers.

The pipeline only ever sees :class:`Autoencoder`: uint8 RGB tiles in, float latents out, and back.
Range conversion, device placement, autocast and batching to the device live here so that
adapters for diffusers, TAESD-family and the builtin model stay small.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsicodec.errors import ModelError


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """CUDA, then MPS, then CPU; ``requested`` ("cpu", "cuda", "cuda:1", "mps") overrides.

    A device that does not exist here is a one-line :class:`ModelError`, not a later CUDA crash."""
    if isinstance(requested, torch.device):
        return requested
    if requested:
        try:
            device = torch.device(requested)
        except (RuntimeError, ValueError):
            raise ModelError(f"unknown --device {requested!r} (use cpu, cuda, cuda:N or mps)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ModelError(f"--device {requested}: CUDA is not available on this machine")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ModelError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
        elif device.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise ModelError(f"--device {requested}: MPS is not available on this machine")
        elif device.type != "cpu":
            raise ModelError(f"unsupported --device {requested!r} (use cpu, cuda, cuda:N or mps)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sha256_of_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the weights as tensors (names, dtypes, shapes, bytes), independent of file format."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # reshape(-1): size-1 dims of channels_last weights keep odd strides that view() rejects
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class ModelInfo:
    """What a container records about the model that made it (see formats/pzarr-v1.md)."""

    model_id: str  # registry name ("taef2", "sd-vae-ft-ema", ...) or "local:<folder name>"
    model_class: str  # e.g. "diffusers.AutoencoderKL", "wsicodec.TAEF2"
    latent_channels: int
    spatial_factor: int  # pixels per latent cell along each axis
    input_range: tuple[float, float]  # what the network expects: (0, 1) or (-1, 1)
    latent_range: tuple[float, float] | None  # hard bound of latents if the model has one (tanh)
    weights_sha256: str  # of the decoder+encoder weights, see sha256_of_state_dict
    decoder_sha256: str  # of the decoder weights alone: restore checks this one
    config: dict[str, Any] = field(default_factory=dict)  # JSON-plain
    source: str = ""  # where the weights came from (hub id, folder), informative only

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "class": self.model_class,
            "latent_channels": self.latent_channels,
            "spatial_factor": self.spatial_factor,
            "input_range": list(self.input_range),
            "latent_range": list(self.latent_range) if self.latent_range else None,
            "weights_sha256": self.weights_sha256,
            "decoder_sha256": self.decoder_sha256,
            "config": self.config,
            "source": self.source,
        }


class Autoencoder(ABC):
    """Encode uint8 RGB tiles to latents and decode latents to uint8 RGB tiles.

    Subclasses implement :meth:`_encode` / :meth:`_decode` on float tensors already on
    ``self.device`` and in ``self.info.input_range``. Public methods take and return CPU data.
    """

    info: ModelInfo
    device: torch.device
    # How much context tiled coding needs to equal whole-image coding: pixels of neighbours each tile is
    # encoded with, and latent cells of neighbours each tile is decoded with. A family with a wider
    # receptive field sets larger values (measured: benchmarks/bench_faithful.py, docs/restore.md).
    encode_margin_px: int = 32
    decode_halo_cells: int = 3
    decode_blend_px: int = 0  # cross-fade neighbouring tiles' decodes over 2x this many px (0: crop exactly)

    # --- what subclasses provide -------------------------------------------------------
    @abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) in input_range on device -> (N,C,H/f,W/f) latents."""

    @abstractmethod
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N,C,h,w) latents on device -> (N,3,h*f,w*f) in input_range (may overshoot)."""

    # --- optional: training and saving (TAEF2 and diffusers adapters implement them) ----------
    def modules_for_training(self) -> dict[str, "torch.nn.Module"]:
        """The nn.Modules by role ("encoder", "decoder", ...), for decoder fine-tuning.

        ``_encode``/``_decode`` are differentiable (no inference mode): call them with grad enabled."""
        raise NotImplementedError(f"{self.info.model_class} does not expose its modules")

    def refresh_hashes(self) -> None:
        """Recompute ``info.weights_sha256``/``decoder_sha256`` after weights changed in place."""
        raise NotImplementedError(f"{self.info.model_class} cannot recompute its hashes")

    def save(self, folder: Any, *, model_id: str, description: str = "", base: str | None = None,
             extra: dict[str, Any] | None = None) -> Any:
        """Write a model folder (weights + ``wsicodec-model.json``, docs/models.md) that
        ``load_model(folder)`` reads back with ``model_id``; updates ``info`` to match."""
        raise NotImplementedError(f"{self.info.model_class} cannot be saved as a model folder")

    # --- what the pipeline uses ---------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def encode(self, tiles: np.ndarray) -> torch.Tensor:
        """uint8 (N,H,W,3) -> float32 CPU tensor (N,C,H/f,W/f)."""
        lo, hi = self.info.input_range
        # torch wants a writable buffer; read-only arrays (e.g. from zarr or np.broadcast_to) are copied
        x = torch.from_numpy(np.require(tiles, requirements=("C", "W"))).to(self.device)
        x = x.permute(0, 3, 1, 2).float() * ((hi - lo) / 255.0) + lo
        with self._autocast():
            z = self._encode(x)
        return z.float().cpu()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor | np.ndarray) -> np.ndarray:
        """float (N,C,h,w) -> uint8 (N,h*f,w*f,3), clamped and rounded."""
        lo, hi = self.info.input_range
        z = torch.as_tensor(latents, dtype=torch.float32).to(self.device)
        with self._autocast():
            x = self._decode(z)
        x = (x.float() - lo) * (255.0 / (hi - lo))
        x = x.clamp_(0, 255).round_().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()
