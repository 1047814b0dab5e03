"""CPU speed of the builtin model's encoder and decoder, beside OpenSlide's own tile read rate.

    .venv/bin/python benchmarks/bench_model_speed.py [--model ID_OR_DIR] [--slide CMU-1-Small-Region.svs]
        [--threads 2] [--batch 16] [--seconds 5]

Prints tiles/s (256 px tiles, batch 16) for the encoder and the decoder in float32 and under bf16
autocast (with the PSNR change bf16 causes on real tiles), and OpenSlide's read_region rate for the
same tile size from CMU-1 in the same run, so each figure is also a ratio to the read rate.
The encoder runs as compress runs it: each tile with its context margin (the model's
``encode_margin_px`` on every side); the decoder as restore runs it: each tile's latents with the
model's ``decode_halo_cells`` of neighbours on every side. ``--baseline`` (default: the v1 builtin
model) is measured the same way in the same run, for ratios.
Targets (issue 16): encoder >= 90 tiles/s with the margin, decoder >= 25 tiles/s with the halo, 2 cores, fp32.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _default_slide() -> Path:
    shared = Path(os.environ.get("WSICODEC_SHARED", REPO.parent / "shared"))
    return shared / "data" / "slides" / "CMU-1-Small-Region.svs"


def openslide_rate(path: Path, tile: int, seconds: float) -> tuple[float, np.ndarray]:
    """256 px read_region calls per second on one handle, one thread (and the tiles read)."""
    import openslide

    s = openslide.OpenSlide(str(path))
    w, h = s.dimensions
    coords = [(x, y) for y in range(0, h - tile + 1, tile) for x in range(0, w - tile + 1, tile)]
    tiles, n, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, y = coords[n % len(coords)]
        rgba = np.asarray(s.read_region((x, y), 0, (tile, tile)))
        if len(tiles) < len(coords):
            tiles.append(rgba[..., :3].copy())
        n += 1
    return n / (time.perf_counter() - t0), np.stack(tiles)


def rate(fn, n_per_call: int, seconds: float) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += n_per_call
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="builtin id or model folder (default: the packaged default)")
    ap.add_argument("--slide", type=Path, default=_default_slide())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--baseline", default="wsicodec-base-f8c4-v1", help="model measured beside it ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from wsicodec.models import load_model

    ae = load_model(args.model, "cpu")
    base = load_model(args.baseline, "cpu") if args.baseline else None
    if not args.slide.is_file():
        raise SystemExit(f"slide not found: {args.slide} (pass --slide CMU-1-Small-Region.svs)")
    read_rate, tiles = openslide_rate(args.slide, args.tile, args.seconds)
    batch = np.stack([tiles[i % len(tiles)] for i in range(args.batch)])
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.tile} px tiles, "
          f"model {ae.info.model_id}")
    print(f"openslide read_region (1 thread): {read_rate:8.1f} tiles/s   (1.00x)")
    for model in [m for m in (ae, base) if m is not None]:
        _measure(model, batch, read_rate, args)


def _measure(ae, batch: np.ndarray, read_rate: float, args) -> None:
    f = int(ae.info.spatial_factor)
    margin = -(-int(getattr(ae, "encode_margin_px", 32)) // f) * f
    halo = int(getattr(ae, "decode_halo_cells", 3))
    padded = np.pad(batch, ((0, 0), (margin, margin), (margin, margin), (0, 0)), mode="reflect")
    k = margin // f
    print(f"-- {ae.info.model_id}: encode margin {margin} px, decode halo {halo} cells")
    z_tile = ae.encode(padded)[:, :, k:-k or None, k:-k or None]
    z_halo = torch.nn.functional.pad(z_tile, (halo,) * 4, mode="replicate")
    ref = ae.decode(z_tile)
    for label, bf16 in (("fp32", False), ("bf16 autocast", True)):
        if hasattr(ae, "bf16_cpu"):
            ae.bf16_cpu = bf16
        elif bf16:
            break
        enc = rate(lambda: ae.encode(padded), args.batch, args.seconds)
        dec = rate(lambda: ae.decode(z_halo), args.batch, args.seconds)
        rec = ae.decode(z_tile)
        d = (rec.astype(np.float64) - batch) ** 2
        psnr = 10 * np.log10(255.0**2 / d.mean())
        drift = 10 * np.log10(255.0**2 / max(((rec.astype(np.float64) - ref) ** 2).mean(), 1e-10))
        print(f"encoder {label:14s}: {enc:8.1f} tiles/s   ({enc / read_rate:.2f}x openslide)   target >= 90")
        print(f"decoder {label:14s}: {dec:8.1f} tiles/s   ({dec / read_rate:.2f}x openslide)   target >= 25")
        print(f"  reconstruction PSNR {psnr:.2f} dB (unquantised latents); vs fp32 output {drift:.1f} dB")
    if hasattr(ae, "bf16_cpu"):
        ae.bf16_cpu = False


if __name__ == "__main__":
    main()
