"""Adapters for diffusers' AutoencoderKL, AutoencoderDC and AutoencoderTiny.

All three take images in [-1, 1]. Latents are stored raw (no scaling factor or shift applied): the
codec never hands them to a diffusion model, and the quantiser fits whatever range they have.
The config's scaling/shift factors are still recorded so a reader can map them to diffusion space.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsicodec._io import atomic_output
from wsicodec.errors import ModelError
from wsicodec.models.base import Autoencoder, ModelInfo, pick_device, sha256_of_state_dict
from wsicodec.models.family import Family, register_family
from wsicodec.models.hub import hub_reachable, hub_source, in_hf_cache
from wsicodec.models.manifest import write_manifest
from wsicodec.models.spec import ModelSpec

SUPPORTED = ("AutoencoderKL", "AutoencoderDC", "AutoencoderTiny")
# AutoencoderTiny's decoder starts with tanh(z/3)*3 (hard-coded in diffusers' DecoderTiny), so it
# can only tell apart latents inside (-3, 3); the TAESD family's encoders are trained to stay there
# (TAEF2, same family, measured: 0.06 % of values beyond +-3 on CMU-1 tissue, clipping them costs 0.015 dB).
TINY_LATENT_RANGE = (-3.0, 3.0)


def _plain(value: Any) -> Any:
    """diffusers' FrozenDict config -> plain JSON types (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _spatial_factor(kind: str, cfg: dict[str, Any]) -> int:
    if kind == "AutoencoderKL":
        return 2 ** (len(cfg["block_out_channels"]) - 1)
    if kind == "AutoencoderDC":
        return 2 ** (len(cfg["encoder_block_out_channels"]) - 1)
    # AutoencoderTiny: every encoder block after the first halves the size
    return 2 ** (len(cfg["encoder_block_out_channels"]) - 1)


class DiffusersAutoencoder(Autoencoder):
    """One adapter for the three diffusers autoencoder classes. ``.vae`` is the diffusers model;
    ``.encoder``/``.decoder`` its halves (for KL the decoder path also runs ``post_quant_conv``)."""

    def __init__(self, vae: nn.Module, *, model_id: str, source: str = "",
                 device: str | torch.device | None = None):
        kind = type(vae).__name__
        if kind not in SUPPORTED:
            raise ModelError(f"unsupported diffusers autoencoder class {kind} (supported: {', '.join(SUPPORTED)})")
        self.kind = kind
        self.vae = vae.float().eval().requires_grad_(False)
        for attr in ("disable_tiling", "disable_slicing"):
            if hasattr(self.vae, attr):  # whole 256 px tiles; halo/tiling is restore's job
                getattr(self.vae, attr)()
        cfg = _plain(dict(vae.config))
        cfg["_class_name"] = kind
        self.info = ModelInfo(
            model_id=model_id,
            model_class=f"diffusers.{kind}",
            latent_channels=int(cfg["latent_channels"]),
            spatial_factor=_spatial_factor(kind, cfg),
            input_range=(-1.0, 1.0),
            latent_range=TINY_LATENT_RANGE if kind == "AutoencoderTiny" else None,
            weights_sha256="",
            decoder_sha256="",
            config=cfg,
            source=source,
        )
        self.refresh_hashes()
        self.device = pick_device(device)
        self.vae.to(self.device)

    def refresh_hashes(self) -> None:
        """Recompute info's weight hashes (after training changed the model in place)."""
        state = self.vae.state_dict()
        decoder_state = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
        self.info.weights_sha256 = sha256_of_state_dict(state)
        self.info.decoder_sha256 = sha256_of_state_dict(decoder_state)

    @property
    def encoder(self) -> nn.Module:
        return self.vae.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.vae.decoder

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(x)
        if self.kind == "AutoencoderKL":
            return out.latent_dist.mode()  # deterministic: the posterior's mean
        if self.kind == "AutoencoderDC":
            return out.latent
        return out.latents

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def modules_for_training(self) -> dict[str, nn.Module]:
        mods = {"encoder": self.vae.encoder, "decoder": self.vae.decoder}
        for name in ("quant_conv", "post_quant_conv"):
            mod = getattr(self.vae, name, None)
            if mod is not None:
                mods[name] = mod
        return mods

    def save(self, folder: str | Path, *, model_id: str, description: str = "", base: str | None = None,
             extra: dict[str, Any] | None = None) -> Path:
        """save_pretrained + ``wsicodec-model.json``; ``load_model(folder)`` reads it back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".save-") as tmp:
            self.vae.save_pretrained(tmp, safe_serialization=True)
            for item in Path(tmp).iterdir():
                with atomic_output(folder / item.name) as part:  # fsync'd, and replaces any older copy
                    os.replace(item, part)
        base = base if base is not None else self.info.model_id
        write_manifest(folder, model_id=model_id, architecture="diffusers", base=base,
                       description=description, extra=extra)
        self.refresh_hashes()
        self.info.model_id, self.info.source = model_id, str(folder.resolve())
        return folder


def _class_for(kind: str):
    import diffusers

    if kind not in SUPPORTED:
        raise ModelError(f"unsupported diffusers class {kind!r} (supported: {', '.join(SUPPORTED)})")
    return getattr(diffusers, kind)


@contextmanager
def _quiet():
    """from_pretrained chatters (progress bars, deprecation notes); the CLI wants one line or none."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    loggers = [logging.getLogger(n) for n in ("diffusers", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    bars_were_disabled = are_progress_bars_disabled()
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)  # failures become one ModelError line instead
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if not bars_were_disabled:
            enable_progress_bars()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_diffusers_folder(folder: str | Path, device: str | torch.device | None = None,
                          model_id: str | None = None) -> DiffusersAutoencoder:
    """A ``save_pretrained`` folder: ``config.json`` (``_class_name``) plus its weights."""
    folder = Path(folder).expanduser().resolve()
    cfg_path = folder / "config.json"
    try:
        kind = json.loads(cfg_path.read_text()).get("_class_name")
    except FileNotFoundError:
        raise ModelError(f"{folder} has no config.json; not a diffusers model folder") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {cfg_path}: {_one_line(exc)}") from None
    cls = _class_for(kind)
    try:
        with _quiet():
            vae = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # missing/corrupt/truncated file, shape mismatch: all "weights don't load"
        raise ModelError(f"cannot load {kind} weights from {folder}: {_one_line(exc)}") from None
    return DiffusersAutoencoder(vae, model_id=model_id or f"local:{folder.name}", source=str(folder),
                                device=device)


def load_from_hub(spec: ModelSpec, device: str | torch.device | None = None) -> DiffusersAutoencoder:
    """From the Hugging Face cache if it is there, else from the hub; one-line ModelError otherwise."""
    kind = spec.builder.split(".", 1)[1]
    cls = _class_for(kind)
    kwargs: dict[str, Any] = {"subfolder": spec.subfolder} if spec.subfolder else {}
    where = spec.hub_id + (f" (subfolder {spec.subfolder})" if spec.subfolder else "")
    vae = None
    with _quiet():
        try:
            vae = cls.from_pretrained(spec.hub_id, local_files_only=True, **kwargs)
        except Exception:
            vae = None
        if vae is None:
            failure = "offline or gated?"
            if hub_reachable():
                try:
                    vae = cls.from_pretrained(spec.hub_id, **kwargs)
                except Exception as exc:
                    name = type(exc).__name__
                    failure = ("gated: accept its licence on the hub and log in with `hf auth login`"
                               if "Gated" in name or "401" in str(exc) or "403" in str(exc)
                               else _one_line(exc))
            if vae is None:
                raise ModelError(
                    f"cannot fetch {where} from the Hugging Face hub ({failure}); "
                    "download it where you can and pass --model DIR"
                )
    return DiffusersAutoencoder(vae, model_id=spec.id, source=hub_source(spec.hub_id, spec.subfolder),
                                device=device)


# ------------------------------------------------------------------------------- the family
def diffusers_dir(folder: Path) -> Path | None:
    """The folder (or its ``vae/`` subfolder, for a whole pipeline) holding an autoencoder config.json."""
    for candidate in (folder, folder / "vae"):
        cfg = candidate / "config.json"
        if cfg.is_file():
            try:
                if "_class_name" in json.loads(cfg.read_text()):
                    return candidate
            except (OSError, ValueError):
                continue
    return None


def _load_folder(folder: Path, device: str | None, model_id: str) -> DiffusersAutoencoder:
    return load_diffusers_folder(diffusers_dir(folder) or folder, device, model_id=model_id)


FAMILY = register_family(Family(
    name="diffusers",
    sniff=lambda folder: diffusers_dir(folder) is not None,
    load_folder=_load_folder,
    load_spec=load_from_hub,
    save=lambda model, folder, **kw: model.save(folder, **kw),
    builders={f"diffusers.{kind}": f"diffusers.{kind}" for kind in SUPPORTED},
    offline=lambda spec: bool(spec.hub_id) and in_hf_cache(spec.hub_id, spec.subfolder),
    looks_for="a diffusers config.json",
))
