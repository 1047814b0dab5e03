"""Operating points of a rate-distortion-trained builtin model, derived after training.

    net = derive_operating_points(net, tiles, targets_bytes={"low": 1500, "high": 5000})
    python -m wsicodec.research.operating_points RUN_DIR TILES.npy OUT.safetensors --model-id ID

A model trained at one rate (one Lagrange weight) offers other rates by coarsening or refining its
quantiser grid: the per-channel step of the trained point is scaled by one factor per new point,
chosen by bisection so that the mean stored bytes per tile (zstd chunks, as a container stores them)
on the given tiles meets each target. The trained point keeps its learned symbol probabilities; a
derived point gets the symbol frequencies of its grid on the same tiles (with a small floor so that
every symbol stays codable). The decoder is the same for every point, so a derived point costs
fidelity against a point trained at that rate: the closing figures say how much.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from wsicodec.format import stored_tile_bytes
from wsicodec.models.builtin import CodecNet, RateModel, net_from_file, save_weights

_FLOOR = 1e-4  # probability mass spread over every symbol of a derived point


@torch.inference_mode()
def _latents(net: CodecNet, tiles: np.ndarray, batch: int = 16) -> torch.Tensor:
    net.eval()
    out = []
    for i in range(0, len(tiles), batch):
        x = torch.from_numpy(np.array(tiles[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(net.encoder(x))
    return torch.cat(out)


def _symbols(z: torch.Tensor, log_gain: torch.Tensor) -> np.ndarray:
    s = (z * log_gain.exp()[None, :, None, None]).round().clamp(-RateModel.OFFSET, RateModel.SYMBOLS - 1 - RateModel.OFFSET)
    return (s + RateModel.OFFSET).to(torch.uint8).numpy()


def _mean_bytes(stored: np.ndarray) -> float:
    return float(np.mean([stored_tile_bytes(stored[i]) for i in range(len(stored))]))


def _scale_for(z: torch.Tensor, base: torch.Tensor, target: float) -> float:
    """The step scale (> 1 coarser) whose mean stored bytes per tile is closest to ``target``."""
    lo, hi = math.log(0.1), math.log(10.0)  # bytes fall as the scale grows
    for _ in range(18):
        mid = (lo + hi) / 2
        if _mean_bytes(_symbols(z, base - mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def derive_operating_points(net: CodecNet, tiles: np.ndarray, targets_bytes: dict[str, float]) -> CodecNet:
    """A copy of ``net`` whose entropy model offers its trained point plus one derived point per target,
    ordered by rate (lowest first). ``net`` must be rate-distortion-trained with one operating point."""
    rd = net.config.get("rd") or {}
    if not rd or len(rd["qualities"]) != 1:
        raise ValueError("derive_operating_points needs a model trained at one operating point")
    trained = rd["qualities"][0]
    z = _latents(net, tiles)
    base = net.rate.log_gain[0].detach().clone()
    base_bytes = _mean_bytes(_symbols(z, base))
    points = {trained: (0.0, base_bytes)}
    for name, target in targets_bytes.items():
        scale = _scale_for(z, base, target)
        points[name] = (math.log(scale), _mean_bytes(_symbols(z, base - math.log(scale))))
    order = sorted(points, key=lambda n: points[n][1])
    cfg = dict(net.config)
    cfg["rd"] = {**rd, "qualities": order, "default": rd.get("default", trained),
                 "bytes_per_tile": {n: round(points[n][1], 1) for n in order},
                 "derived": {n: {"step_scale": round(math.exp(points[n][0]), 6)} for n in order if n != trained}}
    out = CodecNet(cfg)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("rate.")}
    out.load_state_dict(state, strict=False)
    with torch.no_grad():
        for i, name in enumerate(order):
            out.rate.log_gain[i] = base - points[name][0]
            if name == trained:
                out.rate.logits[i] = net.rate.logits[0]
                continue
            sym = _symbols(z, out.rate.log_gain[i])
            for c in range(sym.shape[1]):
                counts = np.bincount(sym[:, c].reshape(-1), minlength=RateModel.SYMBOLS).astype(np.float64)
                p = counts / counts.sum() * (1 - _FLOOR) + _FLOOR / RateModel.SYMBOLS
                out.rate.logits[i, c] = torch.from_numpy(np.log(p)).float()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="training folder (its model.safetensors) or a weights file")
    ap.add_argument("tiles", type=Path, help=".npy uint8 (N,256,256,3) tiles the byte targets are met on")
    ap.add_argument("out", type=Path, help="weights file to write (fp16 safetensors, the packaged form)")
    ap.add_argument("--low", type=float, default=1500.0, help="bytes per tile of the 'low' point")
    ap.add_argument("--high", type=float, default=5000.0, help="bytes per tile of the 'high' point")
    ap.add_argument("--halo", type=int, default=None, help="decode halo in latent cells to record in the config")
    ap.add_argument("--default-bytes", type=float, default=None,
                    help="rescale the trained point too, to this many bytes per tile")
    a = ap.parse_args(argv)
    weights = a.run / "model.safetensors" if a.run.is_dir() else a.run
    net = net_from_file(weights)
    tiles = np.load(a.tiles, mmap_mode="r")
    if a.default_bytes:
        z = _latents(net, tiles)
        scale = _scale_for(z, net.rate.log_gain[0].detach().clone(), a.default_bytes)
        with torch.no_grad():
            net.rate.log_gain[0] -= math.log(scale)
        print(f"trained point rescaled by {scale:.4f}")
    out = derive_operating_points(net, tiles, {"low": a.low, "high": a.high})
    if a.halo is not None:
        out.config["decode_halo_cells"] = int(a.halo)
    save_weights(out, a.out, fp16=True)
    print(f"wrote {a.out}: {out.config['rd']}")


if __name__ == "__main__":
    main()
