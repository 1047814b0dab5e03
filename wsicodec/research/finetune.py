"""Decoder-only fine-tuning for pathology, the paper's recipe.

    finetune(FinetuneConfig(model="taef2-folder", data=[...], out="ft-model"))

The encoder stays frozen, so the latents of the training tiles are computed once (and cached in
the output folder's ``checkpoints/``). They are passed through the quantiser a container would
use (fitted on them, as compress fits it on a slide) so that the decoder is tuned for what
containers actually store; optional extra uniform noise widens that.

Loss = w_l1 * L1(x, y) + w_gan * PatchGAN(y) + w_fm * mean|FM(x) - FM(y)|, where x is the tile,
y the decoded tile (both in [0, 1]) and FM a frozen embedding network: UNI when it is available,
else the configured offline embedding (LPIPS-VGG pooled features by default). AdamW at lr 5e-5
with a linear warm-up; the PatchGAN discriminator (wsicodec.research.gan, hinge loss) trains alongside.

The decoder sees whole tiles by default. ``crop`` > 0 trains on random latent crops to save
compute, but a crop's zero-padded edges are not where a whole tile's are: measured on TAEF2, 30
crop steps lowered the L1 on 128 px crops (0.0412 -> 0.0377) while raising it on the same tiles
decoded whole (0.0283 -> 0.0300).

Output: a model folder that ``load_model(out)`` loads (manifest ``wsicodec-model.json`` written
last), with its own id ``<base>-ft-<first 8 hex of the new decoder's hash>``, so containers record
which decoder they need. ``checkpoints/last.pt`` lets ``resume=True`` continue an interrupted run
(or extend a finished one to more steps).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from wsicodec._io import atomic_output
from wsicodec._progress import progress_bar
from wsicodec.errors import OutputExistsError, WsicodecError
from wsicodec.models.manifest import MANIFEST_NAME

CKPT_DIR = "checkpoints"
CKPT_NAME = "last.pt"
DATA_CACHE = "data.pt"


@dataclass
class FinetuneConfig:
    model: str | None
    data: list[str]
    out: str
    steps: int = 500
    batch_size: int = 4
    lr: float = 5e-5
    warmup: int = 50
    w_l1: float = 1.0
    w_gan: float = 0.5
    w_fm: float = 1.0
    fm: list[str] = field(default_factory=lambda: ["uni", "lpips-vgg"])
    gan_start: int = 200  # discriminator warm-up: step at which its loss reaches the decoder
    d_lr: float = 1e-4
    quant: str = "kmeans"  # what the decoder is tuned for: kmeans | uniform:N | int8 | none
    latent_noise: float = 0.0  # extra uniform noise, in units of the quantiser's mean level spacing
    crop: int = 0  # output pixels per training crop; 0 = whole tiles (crops teach zero-padded borders, see docs)
    tile_size: int = 256
    target_mpp: float = 0.5
    images_mpp: float | None = None
    slide_mpp: float | None = None
    max_tiles: int | None = 512
    seed: int = 0
    checkpoint_every: int = 50
    resume: bool = False
    overwrite: bool = False
    device: str | None = None


def _dataset_key(cfg: FinetuneConfig) -> str:
    keys = ("data", "tile_size", "target_mpp", "images_mpp", "slide_mpp", "max_tiles", "seed", "quant", "model")
    blob = json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _decoder_of(model) -> torch.nn.ModuleDict:
    """The decoder-side modules that get trained (the decoder, plus a KL model's post_quant_conv)."""
    try:
        mods = model.modules_for_training()
    except (AttributeError, NotImplementedError):
        mods = {}
    mods = mods if isinstance(mods, dict) else {}
    dec = mods.get("decoder")
    if dec is None:
        dec = getattr(model, "decoder", None)
    if dec is None and isinstance(getattr(model, "net", None), torch.nn.Module):  # builtin CodecNet
        dec = getattr(model.net, "decoder", None)
    if not isinstance(dec, torch.nn.Module):
        raise WsicodecError(f"model {model.info.model_id} does not expose its decoder for fine-tuning")
    parts = {"decoder": dec}
    if isinstance(mods.get("post_quant_conv"), torch.nn.Module):
        parts["post_quant_conv"] = mods["post_quant_conv"]
    return torch.nn.ModuleDict(parts)


def _base_id(model_id: str) -> str:
    base = model_id.split(":", 1)[1] if model_id.startswith("local:") else model_id
    base = re.sub(r"-ft-[0-9a-f]{8}$", "", base)  # fine-tuning a fine-tune: keep ids short
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


def new_model_id(base_id: str, decoder: torch.nn.Module) -> str:
    from wsicodec.models.base import sha256_of_state_dict

    return f"{_base_id(base_id)}-ft-{sha256_of_state_dict(decoder.state_dict())[:8]}"


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr


def _check_config(cfg: FinetuneConfig) -> None:
    if cfg.steps < 1:
        raise WsicodecError("--steps must be at least 1")
    if cfg.batch_size < 1:
        raise WsicodecError("--batch-size must be at least 1")
    if not cfg.lr > 0:
        raise WsicodecError("--lr must be positive")
    if min(cfg.w_l1, cfg.w_gan, cfg.w_fm) < 0 or cfg.w_l1 + cfg.w_gan + cfg.w_fm == 0:
        raise WsicodecError("loss weights must be non-negative and not all zero")
    if not cfg.data:
        raise WsicodecError("--data needs at least one slide, image or folder")
    from wsicodec.research.embeddings import SPECS

    unknown = [e for e in cfg.fm if e not in SPECS]
    if cfg.w_fm > 0 and (unknown or not cfg.fm):
        raise WsicodecError(f"unknown --fm embedder {(unknown or [''])[0]!r}; choose from {', '.join(SPECS)}")


def _prepare_out(cfg: FinetuneConfig) -> tuple[Path, Path]:
    out = Path(cfg.out)
    ckpt_dir = out / CKPT_DIR
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output exists and is not a folder: {out}")
    if out.exists() and cfg.resume:
        if not (ckpt_dir / CKPT_NAME).is_file():
            raise WsicodecError(f"--resume: no checkpoint at {ckpt_dir / CKPT_NAME}")
    elif out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise OutputExistsError(f"output folder exists: {out} (use --resume to continue, --overwrite to replace)")
    elif cfg.resume:
        raise WsicodecError(f"--resume: {out} does not exist")
    if not out.parent.exists():
        raise WsicodecError(f"parent folder does not exist: {out.parent}")
    return out, ckpt_dir


def _create_out(cfg: FinetuneConfig, out: Path, ckpt_dir: Path) -> None:
    """Only once inputs and model have been checked: a failed start leaves nothing behind."""
    if not cfg.resume and out.exists() and any(out.iterdir()) and cfg.overwrite:
        # keep the encoded-tile cache: it is keyed by model and data, and costs minutes on CPU
        for item in out.iterdir():
            if item.name != CKPT_DIR:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        for item in ckpt_dir.iterdir() if ckpt_dir.is_dir() else ():
            if item.name != DATA_CACHE:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    ckpt_dir.mkdir(parents=True, exist_ok=True)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _load_training_data(cfg: FinetuneConfig, model, ckpt_dir: Path, say: Callable[[str], None]):
    """(tiles uint8 (N,t,t,3), stored-then-dequantised latents float32, quantiser json) — cached."""
    from wsicodec.research.evaluate import encode_tiles, parse_quants
    from wsicodec.quant.quantizer import make_quantizer

    key = _dataset_key(cfg)
    cache = ckpt_dir / DATA_CACHE
    if cache.is_file():
        blob = torch.load(cache, map_location="cpu", weights_only=False)
        if blob.get("key") == key:
            say(f"training data from cache: {len(blob['tiles'])} tiles")
            return blob["tiles"].numpy(), blob["latents"], blob["quant"], blob["step_size"]
    from wsicodec.research.data import load_tiles

    tiles = load_tiles(cfg.data, tile_size=cfg.tile_size, target_mpp=cfg.target_mpp, images_mpp=cfg.images_mpp,
                       slide_mpp=cfg.slide_mpp, max_tiles=cfg.max_tiles, seed=cfg.seed)
    if len(tiles) == 0:
        raise WsicodecError("no tissue tiles found in --data")
    say(f"encoding {len(tiles)} training tiles (encoder frozen, done once)")
    latents = encode_tiles(model, tiles, max(1, cfg.batch_size * 2))
    (kind, levels), *rest = parse_quants(cfg.quant)
    if rest:
        raise WsicodecError("--quant takes one quantiser for fine-tuning")
    q = make_quantizer(kind, model_info=model.info, **({"levels": levels} if levels else {}))
    q.fit(latents)
    deq = q.dequantize(q.quantize(latents)).float()
    arrays = q.arrays() if hasattr(q, "arrays") else {}
    step = _mean_level_spacing(arrays.get("codebook"), latents)
    qjson = q.to_json()
    _atomic_torch_save({"key": key, "tiles": torch.from_numpy(np.ascontiguousarray(tiles)), "latents": deq,
                        "quant": qjson, "step_size": step}, cache)
    return tiles, deq, qjson, step


def _mean_level_spacing(codebook, latents: torch.Tensor) -> float:
    if codebook is not None and np.asarray(codebook).shape[-1] > 1:
        cb = np.sort(np.asarray(codebook, dtype=np.float64), axis=-1)
        return float(np.diff(cb, axis=-1).mean())
    return float(latents.std()) / 128  # float16 latents: tiny noise only


def _crops(tiles: np.ndarray, latents: torch.Tensor, idx: np.ndarray, crop: int, f: int, rng: np.random.Generator):
    x = torch.from_numpy(tiles[idx]).permute(0, 3, 1, 2).float() / 255.0
    z = latents[torch.from_numpy(idx)]
    if crop and crop < tiles.shape[1]:
        cz = crop // f
        h = z.shape[-1]
        xs, zs = [], []
        for i in range(len(idx)):
            r, c = (int(v) for v in rng.integers(0, h - cz + 1, size=2))
            zs.append(z[i, :, r : r + cz, c : c + cz])
            xs.append(x[i, :, r * f : (r + cz) * f, c * f : (c + cz) * f])
        x, z = torch.stack(xs), torch.stack(zs)
    return x, z


def finetune(cfg: FinetuneConfig, say: Callable[[str], None] | None = None, show_progress: bool = True) -> dict:
    """Run (or resume) a decoder fine-tune; returns a summary dict (id, folder, losses, steps)."""
    from wsicodec.research.embeddings import load_first_available
    from wsicodec.research.gan import PatchDiscriminator, d_loss, g_loss
    from wsicodec.models import load_model
    from wsicodec.models.base import pick_device

    say = say or (lambda msg: None)
    _check_config(cfg)
    if cfg.crop and cfg.crop > cfg.tile_size:
        raise WsicodecError("--crop cannot exceed the tile size")
    out, ckpt_dir = _prepare_out(cfg)
    if not cfg.resume:  # absolute paths, so that --resume works from any working directory
        cfg.data = [str(Path(d).resolve()) if Path(d).exists() else str(d) for d in cfg.data]
        if cfg.model and Path(cfg.model).expanduser().is_dir():
            cfg.model = str(Path(cfg.model).expanduser().resolve())
    ckpt_path = ckpt_dir / CKPT_NAME
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if cfg.resume else None
    if ckpt is not None:
        # The model and data are those of the run being resumed; steps, weights and lr may change.
        saved = ckpt["config"]
        for k in ("model", "data", "quant", "tile_size", "target_mpp", "images_mpp", "max_tiles", "seed"):
            setattr(cfg, k, saved[k])
    from wsicodec.research.data import expand_inputs

    expand_inputs(cfg.data)  # missing inputs fail before anything is written
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device=str(dev))
    base_id, base_info = model.info.model_id, model.info.to_json()
    f = int(model.info.spatial_factor)
    if cfg.crop and cfg.crop % f:
        raise WsicodecError(f"--crop must be a multiple of the model's spatial factor {f}")
    lo, hi = model.info.input_range
    decoder = _decoder_of(model)
    _create_out(cfg, out, ckpt_dir)

    tiles, latents, qjson, step_size = _load_training_data(cfg, model, ckpt_dir, say)

    fm = None
    if cfg.w_fm > 0:
        fm = load_first_available(cfg.fm, dev, warn=lambda m: say(f"feature matching: {m}"))
        say(f"feature matching with {fm.label}")
    disc = PatchDiscriminator().to(dev) if cfg.w_gan > 0 else None

    decoder.train().requires_grad_(True)
    opt_g = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.9)) if disc is not None else None
    start = 0
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, float]] = []
    if ckpt is not None:
        decoder.load_state_dict(ckpt["decoder"])
        opt_g.load_state_dict(ckpt["opt_g"])
        if disc is not None and ckpt.get("disc") is not None:
            disc.load_state_dict(ckpt["disc"])
            opt_d.load_state_dict(ckpt["opt_d"])
        start = int(ckpt["step"])
        rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        history = ckpt.get("history", [])
        say(f"resuming at step {start} of {cfg.steps}")

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save({
            "step": step, "config": asdict(cfg), "decoder": decoder.state_dict(), "opt_g": opt_g.state_dict(),
            "disc": disc.state_dict() if disc is not None else None,
            "opt_d": opt_d.state_dict() if opt_d is not None else None,
            "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "history": history,
        }, ckpt_path)

    n = len(tiles)
    t0 = time.time()
    step = start
    avg: dict[str, float] = {}
    progress = progress_bar(show_progress, unit="steps")
    try:
        with progress:
            task = progress.add_task("fine-tuning decoder", total=cfg.steps, completed=start, start=start, note="")
            for step in range(start, cfg.steps):
                idx = rng.choice(n, size=min(cfg.batch_size, n), replace=n < cfg.batch_size)
                x, z = _crops(tiles, latents, idx, cfg.crop, f, rng)
                x, z = x.to(dev), z.to(dev)
                if cfg.latent_noise > 0:
                    z = z + (torch.rand_like(z) - 0.5) * (cfg.latent_noise * step_size)
                for group in opt_g.param_groups:
                    group["lr"] = _lr_at(step, cfg)
                y = ((model._decode(z).float() - lo) / (hi - lo)).clamp(0, 1)
                losses: dict[str, torch.Tensor] = {"l1": F.l1_loss(y, x)}
                total = cfg.w_l1 * losses["l1"]
                if fm is not None:
                    with torch.no_grad():
                        fx = fm.embed(x)
                    losses["fm"] = (fm.embed(y) - fx).abs().mean()
                    total = total + cfg.w_fm * losses["fm"]
                # the discriminator learns from step 0; its verdict reaches the decoder from gan_start on
                # (an untrained discriminator's gradient is an arbitrary, image-independent push)
                gan_on = disc is not None and step >= cfg.gan_start
                if gan_on:
                    disc.requires_grad_(False)
                    losses["gan"] = g_loss(disc(y * 2 - 1))
                    total = total + cfg.w_gan * losses["gan"]
                opt_g.zero_grad(set_to_none=True)
                total.backward()
                opt_g.step()
                if disc is not None:
                    disc.requires_grad_(True)
                    opt_d.zero_grad(set_to_none=True)
                    ld = d_loss(disc(x * 2 - 1), disc(y.detach() * 2 - 1))
                    ld.backward()
                    opt_d.step()
                    losses["disc"] = ld
                vals = {k: float(v.detach()) for k, v in losses.items()}
                vals["total"] = float(total.detach())
                for k, v in vals.items():  # smoothed for display
                    avg[k] = v if k not in avg else 0.9 * avg[k] + 0.1 * v
                history.append({"step": step + 1, **vals})
                progress.update(task, advance=1, note=" ".join(f"{k} {v:.4f}" for k, v in avg.items()))
                if (step + 1) % cfg.checkpoint_every == 0:
                    save_checkpoint(step + 1)
            step = cfg.steps
    except KeyboardInterrupt:
        save_checkpoint(step)
        raise WsicodecError(f"interrupted at step {step}; continue with --resume") from None
    save_checkpoint(step)

    decoder.eval().requires_grad_(False)
    model_id = new_model_id(base_id, decoder)
    description = (f"{base_id} with its decoder fine-tuned (L1 {cfg.w_l1:g} + PatchGAN {cfg.w_gan:g} + FM "
                   f"{cfg.w_fm:g} [{fm.label if fm else 'off'}]) for {cfg.steps} steps on {n} tiles")
    extra = {"finetune": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup": cfg.warmup,
                          "w_l1": cfg.w_l1, "w_gan": cfg.w_gan, "w_fm": cfg.w_fm,
                          "fm": fm.name if fm else None, "fm_standin": bool(fm and fm.standin),
                          "quant": qjson.get("kind", cfg.quant) if isinstance(qjson, dict) else cfg.quant,
                          "latent_noise": cfg.latent_noise, "crop": cfg.crop, "tiles": n,
                          "data": [str(d) for d in cfg.data], "base_model": base_info}}
    _write_model(model, out, model_id=model_id, base=base_id, description=description, extra=extra)
    last = history[-1] if history else {}
    return {"id": model_id, "folder": str(out), "steps": cfg.steps, "tiles": n, "seconds": time.time() - t0,
            "fm": fm.label if fm else None, "last_losses": last}


def _write_model(model, out: Path, *, model_id: str, base: str, description: str, extra: dict) -> None:
    """Weights first, manifest last (the loader only trusts folders with a manifest)."""
    manifest = out / MANIFEST_NAME
    manifest.unlink(missing_ok=True)  # a resumed run rewrites the model: never pair old manifest, new weights
    from wsicodec.models import builtin

    if not isinstance(model, builtin.BuiltinAutoencoder):
        try:
            model.save(out, model_id=model_id, description=description, base=base, extra=extra)
            return
        except (AttributeError, NotImplementedError):
            pass

    if isinstance(model, builtin.BuiltinAutoencoder):
        from datetime import datetime, timezone

        meta = {"id": model_id, "model_id": model_id, "base": base, "description": description,
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        builtin.save_builtin_folder(model.net, out, model_id=model_id, extra={**meta, **extra})
        return
    raise WsicodecError(f"model class {model.info.model_class} cannot save a fine-tuned copy")



def describe_losses(history: list[dict[str, float]], last: int = 20) -> dict[str, float]:
    tail = history[-last:]
    keys = {k for h in tail for k in h if k != "step"}
    return {k: float(np.mean([h[k] for h in tail if k in h])) for k in sorted(keys)} if tail else {}
