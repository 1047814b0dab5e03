"""The TAESD-family architecture, with the TAEF2 weights layout.

TAEF2 ("flux_2" tiny autoencoder) ships as two plain state dicts of an ``nn.Sequential`` each:
``taef2_encoder.pth`` and ``taef2_decoder.pth``. The modules below reproduce that layout so the
state dicts load with ``strict=True`` (layout described in ../shared/README.md).

Input is RGB in [0, 1]; latents have 32 channels at 1/8 resolution. The decoder begins with a soft
clamp ``tanh(z/3)*3``, so whatever the encoder emits, the decoder only distinguishes values inside
(-3, 3), and resolves them worse the closer they get to the edge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsicodec._io import atomic_output
from wsicodec._paths import shared_dir
from wsicodec.errors import ModelError
from wsicodec.models.base import Autoencoder, ModelInfo, pick_device, sha256_of_state_dict
from wsicodec.models.family import Family, register_family
from wsicodec.models.manifest import write_manifest
from wsicodec.models.spec import MODEL_PATH_ENV, ModelSpec

ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"
# decoder_sha256 of the published TAEF2 weights (madebyollin/taesd flux_2 variant), used to give a
# manifest-less folder holding them the registry id "taef2" rather than "local:<folder>".
TAEF2_PUBLISHED_DECODER_SHA256 = "ab2aa476174661ac7a8e6d0044c66b5f9a5d01c9bd83f0e5da9834942d675f34"

WIDTH = 64
LATENT_CHANNELS = 32
SPATIAL_FACTOR = 8
SOFT_CLAMP = 3.0
# Chosen from the encoder's measured output on CMU-1-Small-Region tissue tiles at 20x
# (docs/models.md gives the figures): a bound the quantiser can clip to without losing anything
# the decoder can still resolve.
LATENT_RANGE = (-3.0, 3.0)


def _conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """tanh(x/3)*3: keeps latents inside (-3, 3) while staying differentiable."""

    def __init__(self, bound: float = SOFT_CLAMP):
        super().__init__()
        self.bound = bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.bound) * self.bound


class Block(nn.Module):
    """Residual 3-conv block; the deepest blocks also carry a 1x1 'pool' bottleneck branch."""

    def __init__(self, width: int = WIDTH, with_pool: bool = False):
        super().__init__()
        if with_pool:
            self.pool = nn.Sequential(
                nn.Conv2d(width, 4 * width, 1, bias=False),
                nn.GroupNorm(4, 4 * width),
                nn.ReLU(),
                nn.Conv2d(4 * width, width, 1, bias=False),
            )
        else:
            self.pool = None
        self.conv = nn.Sequential(
            _conv(width, width), nn.ReLU(), _conv(width, width), nn.ReLU(), _conv(width, width)
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.relu(self.conv(x) + x)


def build_encoder(latent_channels: int = LATENT_CHANNELS, width: int = WIDTH) -> nn.Sequential:
    """Image in [0, 1] (N,3,H,W) -> latents (N,C,H/8,W/8)."""
    return nn.Sequential(
        _conv(3, width),
        Block(width),
        _conv(width, width, stride=2, bias=False),
        Block(width), Block(width), Block(width),
        _conv(width, width, stride=2, bias=False),
        Block(width), Block(width), Block(width),
        _conv(width, width, stride=2, bias=False),
        Block(width, True), Block(width, True), Block(width, True),
        _conv(width, latent_channels),
    )


def build_decoder(latent_channels: int = LATENT_CHANNELS, width: int = WIDTH) -> nn.Sequential:
    """Latents (N,C,h,w) -> image (N,3,8h,8w), roughly in [0, 1] (not clamped)."""
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
    return nn.Sequential(
        SoftClamp(),
        _conv(latent_channels, width),
        nn.ReLU(),
        Block(width, True), Block(width, True), Block(width, True),
        up(),
        _conv(width, width, bias=False),
        Block(width), Block(width), Block(width),
        up(),
        _conv(width, width, bias=False),
        Block(width), Block(width), Block(width),
        up(),
        _conv(width, width, bias=False),
        Block(width),
        _conv(width, 3),
    )


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"missing weights file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors vary by torch version; all mean "unreadable"
        # torch's own text advises weights_only=False, which is exactly what not to do with a bad file
        raise ModelError(f"cannot read weights file {path}: corrupt, truncated, or not a plain tensor "
                         f"state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} does not hold a plain state dict")
    return state


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError:
        missing = [k for k in module.state_dict() if k not in state]
        unexpected = [k for k in state if k not in module.state_dict()]
        if missing or unexpected:
            detail = f"{len(missing)} missing keys, {len(unexpected)} unexpected keys"
        else:
            detail = "tensor shapes do not match the TAEF2 layout"
        raise ModelError(f"weights in {path} do not fit TAEF2 ({detail})") from None


class TAEF2(Autoencoder):
    """TAEF2 weights in the TAESD-family architecture. ``.encoder``/``.decoder`` are the nn.Modules."""

    # GroupNorm in the deepest blocks makes every output depend on the whole window, so no finite context
    # equals whole-image coding; on CMU-1 (benchmarks/bench_faithful.py) the decoder halo matters, the
    # encoder margin past 32 px does not: halo 3 / 6 / 10 cells gave edge/interior error 1.22 / 1.15 / 1.13;
    # cross-fading neighbours' decodes over 2 x 16 px then gives 1.08 (whole-image coding: 1.04)
    decode_halo_cells = 10
    decode_blend_px = 16

    def __init__(
        self,
        encoder: nn.Sequential,
        decoder: nn.Sequential,
        *,
        model_id: str = "taef2",
        source: str = "",
        device: str | torch.device | None = None,
        extra_config: dict[str, Any] | None = None,
    ):
        self.encoder = encoder.float().eval()
        self.decoder = decoder.float().eval()
        config = {
            "architecture": "taesd",
            "variant": "flux_2",
            "latent_channels": LATENT_CHANNELS,
            "width": WIDTH,
            "decoder_soft_clamp": SOFT_CLAMP,
        }
        config.update(extra_config or {})
        self.info = ModelInfo(
            model_id=model_id,
            model_class="wsicodec.TAEF2",
            latent_channels=LATENT_CHANNELS,
            spatial_factor=SPATIAL_FACTOR,
            input_range=(0.0, 1.0),
            latent_range=LATENT_RANGE,
            weights_sha256="",
            decoder_sha256="",
            config=config,
            source=source,
        )
        self.refresh_hashes()
        self.device = pick_device(device)
        self.encoder.to(self.device).requires_grad_(False)
        self.decoder.to(self.device).requires_grad_(False)
        # channels-last convolutions measured 20-25 % faster on CPU (oneDNN); a layout change only
        self._channels_last = self.device.type == "cpu"
        if self._channels_last:
            self.encoder.to(memory_format=torch.channels_last)
            self.decoder.to(memory_format=torch.channels_last)

    def refresh_hashes(self) -> None:
        """Recompute info's weight hashes (after training changed the modules in place)."""
        # Hashed in float32 as held in memory, so a re-saved copy (fp16 or fp32 file) hashes alike
        # as long as the values are the same.
        dec = {k: v.float() for k, v in self.decoder.state_dict().items()}
        full = {f"encoder.{k}": v.float() for k, v in self.encoder.state_dict().items()}
        full.update({f"decoder.{k}": v for k, v in dec.items()})
        self.info.weights_sha256 = sha256_of_state_dict(full)
        self.info.decoder_sha256 = sha256_of_state_dict(dec)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._layout(x)).contiguous()  # callers get plain NCHW latents

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._layout(z))

    def modules_for_training(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def save(self, folder: str | Path, *, model_id: str, description: str = "", base: str | None = None,
             extra: dict[str, Any] | None = None) -> Path:
        """Write the .pth pair and a ``wsicodec-model.json`` manifest; ``load_model(folder)`` reads it back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in ((ENCODER_FILE, self.encoder), (DECODER_FILE, self.decoder)):
            state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}
            with atomic_output(folder / name) as tmp:
                torch.save(state, tmp)
        base = base if base is not None else self.info.model_id
        write_manifest(folder, model_id=model_id, architecture="taef2", base=base,
                       description=description, extra=extra)
        self.refresh_hashes()
        self.info.model_id, self.info.source = model_id, str(folder.resolve())
        return folder


def is_taef2_folder(folder: Path) -> bool:
    return (folder / ENCODER_FILE).exists() or (folder / DECODER_FILE).exists()


def load_taef2_folder(folder: str | Path, device: str | torch.device | None = None,
                      model_id: str = "taef2", extra_config: dict[str, Any] | None = None) -> TAEF2:
    """Build TAEF2 from a folder holding ``taef2_encoder.pth`` and ``taef2_decoder.pth``."""
    folder = Path(folder).expanduser().resolve()
    encoder, decoder = build_encoder(), build_decoder()
    for module, name in ((encoder, ENCODER_FILE), (decoder, DECODER_FILE)):
        path = folder / name
        _load_into(module, _load_state(path), path)
    return TAEF2(encoder, decoder, model_id=model_id, source=str(folder), device=device,
                 extra_config=extra_config)


# ------------------------------------------------------------------------------- the family
def _load_folder(folder: Path, device: str | None, model_id: str) -> TAEF2:
    model = load_taef2_folder(folder, device, model_id=model_id)
    if model_id.startswith("local:") and model.info.decoder_sha256 == TAEF2_PUBLISHED_DECODER_SHA256:
        model.info.model_id = "taef2"
    return model


def _no_local_weights(spec: ModelSpec, device: str | None) -> TAEF2:
    raise ModelError(
        "TAEF2 is loaded from a local folder: put taef2_encoder.pth and taef2_decoder.pth in a folder "
        f"and pass --model DIR (or set {MODEL_PATH_ENV} to a folder holding a 'taef2' subfolder)"
    )


def _has_weights(folder: Path) -> bool:
    return (folder / ENCODER_FILE).is_file() and (folder / DECODER_FILE).is_file()


FAMILY = register_family(Family(
    name="taef2",
    sniff=is_taef2_folder,  # one file is enough: loading then names the missing one
    load_folder=_load_folder,
    load_spec=_no_local_weights,
    save=lambda model, folder, **kw: model.save(folder, **kw),
    builders={"taef2": "wsicodec.TAEF2"},
    has_weights=_has_weights,
    search_folders=lambda spec: [shared_dir() / "weights" / "taef2"],
    looks_for=f"{ENCODER_FILE} + {DECODER_FILE}",
))
