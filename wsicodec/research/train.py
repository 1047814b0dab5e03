"""`wsicodec train`: train the builtin autoencoder architecture on your own tissue tiles.

    cfg = TrainConfig(data=[...], out=Path("my-model"), steps=20000, ...)
    train(cfg, progress=True) -> Path      # the model folder; `--model DIR` loads it

The recipe: tissue tiles at the archive resolution (wsicodec.research.data), random crops with flips,
90-degree rotations and mild colour/stain jitter; loss = L1 + w_mse * MSE + w_lpips * LPIPS-Alex
(+ w_gan * PatchGAN hinge after ``gan_after`` steps); during training the bounded latents get
uniform noise one quantiser step wide (``levels_noise`` levels over the bound), so the decoder
tolerates uniform quantisation at that many levels or more. AdamW, linear warm-up then cosine
decay. ``out/checkpoint.pt`` holds model, optimisers, step and RNG states and is rewritten every
``ckpt_every`` steps, on SIGTERM/Ctrl-C and at the end; ``resume`` continues from it. The folder
is also a loadable model folder at every checkpoint (``wsicodec-model.json`` + weights).
"""

from __future__ import annotations

import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from wsicodec._io import atomic_output
from wsicodec._progress import progress_bar
from wsicodec.research import metrics
from wsicodec.errors import WsicodecError
from wsicodec.models.base import pick_device
from wsicodec.models.builtin import DEFAULT_CONFIG, CodecNet, param_count, save_builtin_folder

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    data: list[str]
    out: Path
    steps: int = 20000
    batch_size: int = 16
    crop: int = 128  # training crop size (the net is fully convolutional; tiles are larger)
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 1e-4
    latent_channels: int = 4
    factor: int = 8
    arch: dict[str, Any] = field(default_factory=dict)  # overrides of DEFAULT_CONFIG
    levels_noise: int = 64  # 0 disables quantisation noise
    lpips_weight: float = 0.5
    lpips_fraction: float = 0.5  # share of each batch the LPIPS term sees (it costs as much as the codec)
    mse_weight: float = 1.0
    gan_weight: float = 0.1
    gan_after: int = 0  # 0: no GAN
    tile_size: int = 256
    target_mpp: float = 0.5
    images_mpp: float | None = None
    slide_mpp: float | None = None
    max_tiles: int | None = None
    holdout: int = 16  # tiles held out for the progress bar's PSNR
    ckpt_every: int = 500
    eval_every: int = 250
    time_limit_min: float | None = None
    stop_at: int | None = None  # stop with a checkpoint at this step, as an interruption would
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    resume: bool = False
    model_id: str | None = None
    # rate-distortion training: operating points, each with its target bits per pixel (model entropy);
    # the Lagrange weight of each is adapted every step so the rate settles at its target
    rd_qualities: list[str] | None = None
    rd_target_bpp: list[float] | None = None
    rd_sample_weights: list[float] | None = None  # how often each operating point is drawn
    rd_beta_init: float = 0.02
    rd_beta_rate: float = 0.02  # log-step of the Lagrange weight's controller

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ------------------------------------------------------------------------------- data
def load_training_tiles(cfg: TrainConfig) -> np.ndarray:
    """uint8 (N,t,t,3). ``.npy`` inputs are taken as ready tile caches (N,t,t,3)."""
    from wsicodec.research.data import load_tiles

    arrays, others = [], []
    for item in cfg.data:
        if str(item).endswith(".npy"):
            a = np.load(item, mmap_mode="r")
            if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
                raise WsicodecError(f"{item}: a tile cache must be uint8 (N,H,W,3), got {a.dtype} {a.shape}")
            arrays.append(np.asarray(a))
        else:
            others.append(item)
    if others:
        arrays.append(load_tiles(others, tile_size=cfg.tile_size, target_mpp=cfg.target_mpp,
                                 images_mpp=cfg.images_mpp, slide_mpp=cfg.slide_mpp,
                                 max_tiles=cfg.max_tiles, seed=cfg.seed))
    if not arrays:
        raise WsicodecError("no training data given")
    sizes = {a.shape[1:3] for a in arrays}
    if len(sizes) != 1:
        raise WsicodecError(f"tile caches and inputs disagree on tile size: {sorted(sizes)}")
    tiles = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if min(tiles.shape[1:3]) < cfg.crop:
        raise WsicodecError(f"tiles of {tiles.shape[1]} px are smaller than the training crop {cfg.crop}")
    return tiles


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(N,3,h,w) float in [0,1]: flips, 90-degree rotations, mild stain and brightness jitter."""
    n = batch.shape[0]
    out = []
    ops = torch.randint(0, 8, (n,), generator=gen)
    for i in range(n):
        x = batch[i]
        k = int(ops[i])
        if k & 4:
            x = x.flip(-1)
        out.append(torch.rot90(x, k & 3, dims=(-2, -1)))
    x = torch.stack(out)
    # stain jitter in optical density: scale and shift each channel's absorbance a little
    od = -torch.log(x.clamp_min(1.0 / 255))
    scale = 1 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.1
    shift = (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.04
    x = torch.exp(-(od * scale + shift))
    bright = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.06
    return (x * bright).clamp(0, 1)


def quant_noise(z: torch.Tensor, bound: float, levels: int) -> torch.Tensor:
    """Add uniform noise one quantiser step wide (uniform levels spanning [-bound, bound])."""
    if levels <= 1:
        return z
    step = 2 * bound / (levels - 1)
    return z + (torch.rand_like(z) - 0.5) * step


def quantize_uniform(z: torch.Tensor, bound: float, levels: int) -> torch.Tensor:
    """Round to the uniform grid (what a uniform quantiser with ``levels`` does)."""
    step = 2 * bound / (levels - 1)
    return ((z.clamp(-bound, bound) + bound) / step).round() * step - bound


# ------------------------------------------------------------------------------- loop
class _Stop:
    def __init__(self):
        self.requested = False

    def __call__(self, *_):
        self.requested = True


def _lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Warm-up, then cosine to 5 % over the steps or the time limit, whichever runs out first."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_limit_min:
        t = max(t, elapsed_s / (cfg.time_limit_min * 60))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def train(cfg: TrainConfig, progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    from rich.console import Console

    console = Console(stderr=True)
    say = log or (lambda msg: console.print(msg, highlight=False))
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise WsicodecError(f"{out} exists and is not empty: pass --resume to continue, or choose another --out")
    if cfg.resume and not ckpt_path.is_file():
        raise WsicodecError(f"--resume: no {CHECKPOINT_NAME} in {out}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if cfg.resume else None
    if ckpt is not None:
        # the run's identity (data, architecture) comes from the checkpoint; the schedule may be extended
        saved = ckpt["train_config"]
        for key in ("latent_channels", "factor", "arch", "levels_noise", "crop", "rd_qualities"):
            setattr(cfg, key, saved[key])
        arch = ckpt["net_config"]
    else:
        arch = dict(DEFAULT_CONFIG)
        arch.update(cfg.arch)
        arch["latent_channels"] = cfg.latent_channels
        arch["factor"] = cfg.factor
        if cfg.factor != DEFAULT_CONFIG["factor"] and not cfg.arch:
            # keep the default's shape: unshuffle straight to the latent grid, decode back to 1/4
            arch["enc_stem"] = cfg.factor
            levels = int(round(math.log2(cfg.factor / 4))) + 1
            arch["dec_widths"] = [DEFAULT_CONFIG["dec_widths"][0]] * (levels - 1) + [DEFAULT_CONFIG["dec_widths"][-1]]
            arch["dec_blocks"] = [1] * levels
        arch["default_quantizer"] = {"kind": "uniform", "levels": cfg.levels_noise or 256}
        if cfg.rd_qualities:
            arch["rd"] = {"qualities": list(cfg.rd_qualities), "default": _default_quality(cfg.rd_qualities)}
            arch["default_quantizer"] = {"kind": "rd", "quality": arch["rd"]["default"]}
            arch["bound"] = 127.0  # the entropy model's symbols clip at +-127; tanh is a safety net only

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    tiles = load_training_tiles(cfg)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(tiles))
    n_hold = min(cfg.holdout, max(0, len(tiles) // 10))
    hold_idx, train_idx = order[:n_hold], order[n_hold:]
    if len(train_idx) == 0:
        raise WsicodecError("not enough tissue tiles to train on")
    train_tiles = torch.from_numpy(np.ascontiguousarray(tiles[np.sort(train_idx)]))
    hold_tiles = torch.from_numpy(np.ascontiguousarray(tiles[np.sort(hold_idx)])) if n_hold else None

    net = CodecNet(arch).to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)  # oneDNN's fast path on CPU
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    from wsicodec.research.lpips import LPIPS

    lp = LPIPS("alex").to(device) if cfg.lpips_weight > 0 else None
    disc = d_opt = None
    if cfg.gan_after > 0:
        from wsicodec.research.gan import PatchDiscriminator

        disc = PatchDiscriminator(32, 3).to(device)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr * 0.5, betas=(0.5, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    elapsed_before = 0.0
    history: list[dict[str, float]] = []
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if disc is not None and ckpt.get("disc") is not None:
            disc.load_state_dict(ckpt["disc"])
            d_opt.load_state_dict(ckpt["disc_optimizer"])
        step = int(ckpt["step"])
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        gen.set_state(ckpt["gen_state"])
        _set_rng_state(ckpt["rng"])
        history = ckpt.get("history", [])
        say(f"resumed from {ckpt_path} at step {step}")
    bound = float(arch["bound"])
    rd = bool(arch.get("rd"))
    n_q = len(arch["rd"]["qualities"]) if rd else 0
    if rd:
        targets = torch.tensor(cfg.rd_target_bpp or [0.27] * n_q, dtype=torch.float64)
        if len(targets) != n_q:
            raise WsicodecError(f"--rd-target-bpp needs {n_q} values, one per operating point")
        q_weights = torch.tensor(cfg.rd_sample_weights or [1.0] * n_q, dtype=torch.float64)
        default_q = arch["rd"]["qualities"].index(arch["rd"]["default"])
        log_beta = (ckpt or {}).get("rd_log_beta", torch.full((n_q,), math.log(cfg.rd_beta_init),
                                                               dtype=torch.float64))
    out.mkdir(parents=True, exist_ok=True)
    say(f"training {param_count(net) / 1e6:.2f} M parameters (f{arch['factor']}c{arch['latent_channels']}) on "
        f"{len(train_idx)} tiles ({n_hold} held out), device {device}, {torch.get_num_threads()} threads")

    def evaluate() -> float:
        if hold_tiles is None:
            return float("nan")
        net.eval()
        with torch.inference_mode():
            x = hold_tiles.to(device).permute(0, 3, 1, 2).float() / 255
            z = net.encoder(x * 2 - 1)
            bpp = float("nan")
            if rd:
                q = torch.full((len(x),), default_q, dtype=torch.long)
                g = net.rate.gain(q)
                sym = (z * g).clamp(-127, 127).round()
                bpp = float(net.rate.bits_hard(sym, q).mean()) / (x.shape[2] * x.shape[3])
                z = sym / g
            elif cfg.levels_noise:
                z = quantize_uniform(z, bound, cfg.levels_noise)
            y = ((net.decoder(z) + 1) / 2).clamp(0, 1)
            y = (y * 255).round() / 255
        net.train()
        evaluate.bpp = bpp
        return float(metrics.psnr(y, x).mean())

    evaluate.bpp = float("nan")  # type: ignore[attr-defined]

    def save(final: bool = False) -> None:
        state = {
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "disc": disc.state_dict() if disc is not None else None,
            "disc_optimizer": d_opt.state_dict() if d_opt is not None else None,
            "step": step,
            "gen_state": gen.get_state(),
            "rng": _rng_state(),
            "train_config": cfg.to_json(),
            "net_config": arch,
            "history": history,
            "rd_log_beta": log_beta if rd else None,
            "elapsed_s": elapsed_before + time.monotonic() - started,
        }
        with atomic_output(ckpt_path) as tmp:
            torch.save(state, tmp)
        save_builtin_folder(net.cpu(), out, model_id=cfg.model_id,
                            extra={"training": {"step": step, "final": final, "history": history[-1:],
                                                "config": cfg.to_json()}})
        net.to(device)

    stop = _Stop()
    old_handler = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    started = time.monotonic()
    net.train()
    t_size = train_tiles.shape[1]
    last_loss = float("nan")
    held = evaluate() if step == 0 else (history[-1]["psnr"] if history else float("nan"))
    interactive = progress and console.is_terminal
    bar = progress_bar(interactive, unit="steps")
    ema = None
    t_last, s_last = time.monotonic(), step
    try:
        with bar:
            task = bar.add_task("train", total=cfg.steps, completed=step, start=step, note="")
            while step < cfg.steps and not stop.requested and (cfg.stop_at is None or step < cfg.stop_at):
                elapsed = elapsed_before + time.monotonic() - started
                lr = _lr_at(step, cfg, elapsed)
                for g in opt.param_groups:
                    g["lr"] = lr
                idx = torch.randint(0, len(train_tiles), (cfg.batch_size,), generator=gen)
                oy = torch.randint(0, t_size - cfg.crop + 1, (cfg.batch_size,), generator=gen)
                ox = torch.randint(0, t_size - cfg.crop + 1, (cfg.batch_size,), generator=gen)
                crops = torch.stack([train_tiles[i, y : y + cfg.crop, x : x + cfg.crop]
                                     for i, y, x in zip(idx.tolist(), oy.tolist(), ox.tolist())])
                x = augment(crops.permute(0, 3, 1, 2).float() / 255, gen).to(device) * 2 - 1
                if device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                z = net.encoder(x)
                if rd:
                    q = torch.multinomial(q_weights, cfg.batch_size, replacement=True, generator=gen)
                    g = net.rate.gain(q)
                    s_ = (z * g).clamp(-127, 127)
                    noise = torch.rand(s_.shape, generator=gen) - 0.5
                    bpp_i = net.rate.bits_noisy(s_ + noise.to(device), q) / (cfg.crop * cfg.crop)
                    # the decoder sees what it will be given: rounded symbols, dequantised (straight-through)
                    z = (s_ + (s_.round() - s_).detach()) / g
                elif cfg.levels_noise:
                    z = quant_noise(z, bound, cfg.levels_noise)
                y = net.decoder(z)
                loss = F.l1_loss(y, x)
                if cfg.mse_weight:
                    loss = loss + cfg.mse_weight * F.mse_loss(y, x)
                if lp is not None:
                    k = max(1, round(cfg.batch_size * cfg.lpips_fraction))
                    loss = loss + cfg.lpips_weight * lp(y[:k].clamp(-1, 1), x[:k]).mean()
                if rd:
                    beta = log_beta.exp().float().to(device)[q]
                    loss = loss + (beta * bpp_i).mean()
                    with torch.no_grad():  # the controller: raise a point's weight while it spends too much
                        for j in range(n_q):
                            sel = q == j
                            if bool(sel.any()):
                                ratio = float(bpp_i[sel].mean()) / float(targets[j])
                                log_beta[j] += cfg.rd_beta_rate * max(-1.0, min(1.0, ratio - 1))
                use_gan = disc is not None and step >= cfg.gan_after
                if use_gan:
                    from wsicodec.research.gan import d_loss, g_loss

                    loss = loss + cfg.gan_weight * g_loss(disc(y))
                opt.zero_grad(set_to_none=True)
                loss_value = float(loss.detach())
                # a batch whose loss is not finite or far above the running mean is skipped, not learned
                # from: one such step can undo hours on a small CPU run (seen as rare spikes of 100x)
                spike = not math.isfinite(loss_value) or (ema is not None and step > 100 and loss_value > 20 * ema)
                if spike:
                    say(f"step {step}: loss {loss_value:.4g} skipped (running mean {ema:.4g})")
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                    opt.step()
                if use_gan:
                    d_opt.zero_grad(set_to_none=True)
                    d_loss(disc(x), disc(y.detach())).backward()
                    d_opt.step()
                step += 1
                if not spike:
                    last_loss = loss_value
                    ema = last_loss if ema is None else 0.98 * ema + 0.02 * last_loss
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    held = evaluate()
                    now = time.monotonic()
                    rate = (step - s_last) / max(1e-9, now - t_last)
                    t_last, s_last = now, step
                    entry = {"step": step, "loss": round(ema, 5), "psnr": round(held, 3), "lr": lr}
                    rd_note = ""
                    if rd:
                        entry["bpp"] = round(evaluate.bpp, 4)
                        entry["beta"] = [round(float(b), 5) for b in log_beta.exp()]
                        rd_note = f" {evaluate.bpp:.3f} bpp beta {'/'.join(f'{b:.3g}' for b in entry['beta'])}"
                    history.append(entry)
                    if not interactive:
                        say(f"step {step}/{cfg.steps} loss {ema:.4f} held-out PSNR {held:.2f} dB{rd_note} "
                            f"lr {lr:.2e} {rate:.2f} steps/s")
                bar.update(task, completed=step, note=f"loss {ema:.4f}  held-out PSNR {held:.2f} dB")
                if step % cfg.ckpt_every == 0:
                    save()
                if cfg.time_limit_min and elapsed_before + time.monotonic() - started > cfg.time_limit_min * 60:
                    say(f"time limit of {cfg.time_limit_min} min reached at step {step}")
                    break
    except KeyboardInterrupt:
        stop.requested = True
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    if not history or history[-1]["step"] != step:
        held = evaluate()
        history.append({"step": step, "loss": round(ema if ema is not None else last_loss, 5),
                        "psnr": round(held, 3),
                        "lr": _lr_at(max(0, step - 1), cfg, elapsed_before + time.monotonic() - started)})
    save(final=step >= cfg.steps)
    say(f"saved step {step} to {out} (held-out PSNR {held:.2f} dB){' — stopped early' if stop.requested else ''}")
    return out


def parse_rate_points(text: str) -> tuple[list[str], list[float]]:
    """"low:0.16,default:0.27" -> (["low", "default"], [0.16, 0.27]): operating points and target bpp."""
    names, bpps = [], []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition(":")
        try:
            bpp = float(value)
        except ValueError:
            bpp = float("nan")
        if not sep or not name.strip() or not bpp > 0 or not math.isfinite(bpp):
            raise WsicodecError(f"--rate takes NAME:BPP pairs with positive bits per pixel, not {item!r}")
        if name.strip() in names:
            raise WsicodecError(f"--rate names {name.strip()!r} twice")
        names.append(name.strip())
        bpps.append(bpp)
    if not names:
        raise WsicodecError("--rate needs at least one NAME:BPP pair")
    return names, bpps


def _default_quality(qualities: list[str]) -> str:
    return "default" if "default" in qualities else qualities[len(qualities) // 2]


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
