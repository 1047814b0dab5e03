"""Quantisers and the container's lossless stage on real latents: error vs stored bytes per tile.

Latents: TAEF2 on the tissue tiles of CMU-1-Small-Region at 0.5 µm/px when ../shared has the weights
(or $WSICODEC_SHARED), else synthetic autoencoder-like latents. Prints, per quantiser, the latent MSE
(raw and as the TAEF2 decoder sees it, after its tanh(z/3)*3 soft clamp), index entropy, stored bytes per
tile through the container's own codec (``stored_tile_bytes``) and ratios against the int8 baseline; then
zstd levels (bytes vs time) and shard sizes (files and write time).

    .venv/bin/python benchmarks/bench_quantizers.py [--cache /tmp/cmu_taef2.pt] [--decode]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from numcodecs.zstd import Zstd  # noqa: E402

from wsicodec import format as ct  # noqa: E402
from wsicodec.quant.quantizer import make_quantizer  # noqa: E402


def shared_dir() -> Path:
    return Path(os.environ.get("WSICODEC_SHARED", ROOT.parent / "shared"))


def real_latents(cache: Path | None):
    if cache and cache.exists():
        d = torch.load(cache, weights_only=False)
        return d["latents"], d.get("white"), "cached " + str(cache)
    weights = shared_dir() / "weights" / "taef2"
    slide_path = shared_dir() / "data" / "slides" / "CMU-1-Small-Region.svs"
    if not (weights / "taef2_encoder.pth").exists() or not slide_path.exists():
        return None, None, "no TAEF2 weights or slide"
    from wsicodec.models.taesd import load_taef2_folder
    from wsicodec.source.slide import SourceSlide

    model = load_taef2_folder(weights, device="cpu")
    tiles = []
    with SourceSlide(slide_path) as slide:
        grid = slide.grid(0.5, 256)
        try:
            from wsicodec.source.tissue import tissue_tiles

            mask = tissue_tiles(slide.thumbnail(), grid)
            coords = list(zip(*np.nonzero(mask)))
            tiles = [slide.read_tile(grid, r, c) for r, c in coords]
        except Exception:  # tissue detection not available: a plain darkness rule
            for r in range(grid.rows):
                for c in range(grid.cols):
                    t = slide.read_tile(grid, r, c)
                    if (t.min(-1) < 200).mean() > 0.25:
                        tiles.append(t)
    z = torch.cat([model.encode(np.stack(tiles[i:i + 8])) for i in range(0, len(tiles), 8)])
    white = model.encode(np.full((1, 256, 256, 3), 255, np.uint8))
    if cache:
        torch.save({"latents": z, "white": white}, cache)
    return z, white, f"TAEF2 on {len(tiles)} CMU-1-Small-Region tissue tiles"


def synthetic_latents(n=48, c=32, hw=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.randn((n, c, hw + 4, hw + 4), generator=g), 5, 1)
    offs = torch.linspace(-1, 1, c).reshape(1, c, 1, 1)
    return base * torch.linspace(1, 4, c).reshape(1, c, 1, 1) + offs, None


def entropy_bits(idx: np.ndarray) -> float:
    p = np.bincount(idx.ravel(), minlength=256).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=None, help="save/load the latents here")
    ap.add_argument("--decode", action="store_true", help="also decode with TAEF2 and print PSNR vs float")
    args = ap.parse_args()

    z, white, what = real_latents(args.cache)
    if z is None:
        z, white = synthetic_latents()
        what = "synthetic latents (TAEF2 weights not found)"
    n = z.shape[0]
    print(f"latents: {what}: {tuple(z.shape)}, min {z.min():.2f} max {z.max():.2f} std {z.std():.3f}")
    fit_sample, held = z[: n // 2], z[n // 2:]  # fit on one half, measure on the other
    soft = lambda t: torch.tanh(t / 3) * 3  # noqa: E731  (what the TAEF2 decoder sees)

    # ---------------------------------------------------------------- fit speed
    big = torch.randn(10_000_000).reshape(1000, 10, 1000, 1)
    for pc in (False, True):
        q = make_quantizer("kmeans", per_channel=pc)
        t0 = time.perf_counter()
        q.fit(big)
        t1 = time.perf_counter()
        q.quantize(big)
        t2 = time.perf_counter()
        print(f"kmeans fit on 1e7 values (per_channel={pc}): {t1 - t0:.3f} s; searchsorted assignment "
              f"{t2 - t1:.3f} s")

    # ---------------------------------------------------------------- quantisers
    configs = [
        ("int8 (static, ±3)", make_quantizer("int8", latent_range=(-3.0, 3.0))),
        ("kmeans-256 shared", make_quantizer("kmeans", 256, per_channel=False)),
        ("kmeans-256 per-ch", make_quantizer("kmeans", 256, per_channel=True)),
        ("kmeans-224 per-ch", make_quantizer("kmeans", 224, per_channel=True)),  # ~ shared-256's bytes
        ("uniform-256 shared", make_quantizer("uniform", 256, per_channel=False)),
        ("uniform-256 per-ch", make_quantizer("uniform", 256, per_channel=True)),
        ("kmeans-64 per-ch", make_quantizer("kmeans", 64, per_channel=True)),
        ("uniform-64 shared", make_quantizer("uniform", 64, per_channel=False)),
        ("uniform-64 per-ch", make_quantizer("uniform", 64, per_channel=True)),
        ("none (float16)", make_quantizer("none")),
    ]
    print(f"\nfitted on {fit_sample.shape[0]} tiles, measured on the other {held.shape[0]}; "
          f"bytes = stored_tile_bytes (zstd-{ct.ZSTD_LEVEL} chunk + 16 B index) per tile; "
          f"codebook bytes are per slide")
    print(f"{'quantiser':22s} {'MSE':>10s} {'MSE(soft)':>10s} {'xint8':>6s} {'H bits':>6s} "
          f"{'B/tile':>8s} {'xint8':>6s} {'codebook B':>10s}")
    base = None
    rows = []
    for name, q in configs:
        q.fit(fit_sample)
        s = q.quantize(held)
        r = q.dequantize(s)
        mse = float(((r - held) ** 2).mean())
        mse_soft = float(((soft(r) - soft(held)) ** 2).mean())
        nbytes = float(np.mean([ct.stored_tile_bytes(t) for t in s]))
        cb = sum(a.nbytes for a in q.arrays().values())
        h = entropy_bits(s) if s.dtype == np.uint8 else float("nan")
        if base is None:
            base = (mse_soft, nbytes)
        rows.append((name, q, s))
        print(f"{name:22s} {mse:10.3e} {mse_soft:10.3e} {mse_soft / base[0]:6.3f} {h:6.2f} {nbytes:8.0f} "
              f"{nbytes / base[1]:6.3f} {cb:10d}")

    # ---------------------------------------------------------------- zstd levels
    print("\nzstd level on int8, kmeans-256 and uniform-64 indices (bytes/tile, encode ms/tile)")
    picks = [r for r in rows if r[0] in ("kmeans-256 shared", "uniform-64 shared", "int8 (static, ±3)")]
    for level in (1, 3, 6, 9, 12, 15, 19, 22):
        codec = Zstd.from_config({"level": level, "checksum": False})
        cells = []
        for name, _, s in picks:
            t0 = time.perf_counter()
            b = [len(codec.encode(np.ascontiguousarray(t).tobytes())) for t in s]
            ms = (time.perf_counter() - t0) * 1000 / len(s)
            cells.append(f"{name.split(' ')[0]:>11s} {np.mean(b):7.0f} B {ms:6.2f} ms")
        print(f"  level {level:2d}: " + " | ".join(cells))

    # ---------------------------------------------------------------- shard size
    print("\nshard size: a 40x40-tile slide, all tissue, kmeans-256 shared tiles (repeated)")
    from wsicodec.models.base import ModelInfo

    q, s = rows[1][1], rows[1][2]
    info = ModelInfo("bench", "bench", s.shape[1], 8, (0, 1), None, "0" * 64, "0" * 64)
    rows_, cols_ = 40, 40
    grid = {"tile_size": 256, "rows": rows_, "cols": cols_, "width": cols_ * 256, "height": rows_ * 256}
    tissue = np.ones((rows_, cols_), bool)
    for shard in (4, 8, 16, 32):
        tmp = Path(tempfile.mkdtemp())
        try:
            t0 = time.perf_counter()
            with ct.ContainerWriter(tmp / "b.pzarr", grid=grid, model=info, quantizer=q, tissue=tissue,
                                    shard_tiles=shard) as w:
                for i in range(rows_ * cols_):
                    w.write_tile(i // cols_, i % cols_, s[i % len(s)])
            dt = time.perf_counter() - t0
            files = sum(1 for p in (tmp / "b.pzarr").rglob("*") if p.is_file())
            c = ct.Container.open(tmp / "b.pzarr")
            t0 = time.perf_counter()
            for r in range(0, rows_, 5):
                c.read_latents(r * 32 - 4, 100, r * 32 + 36, 140)
            rd = (time.perf_counter() - t0) * 1000 / (rows_ // 5)
            print(f"  {shard:2d}x{shard:<2d} tiles/shard: {files:5d} files, write {dt:5.2f} s "
                  f"({rows_ * cols_ / dt:6.0f} tiles/s), {w.bytes_written / rows_ / cols_:7.0f} B/tile, "
                  f"halo read {rd:5.1f} ms")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if args.decode:
        from wsicodec.models.taesd import load_taef2_folder

        model = load_taef2_folder(shared_dir() / "weights" / "taef2", device="cpu")
        ref = np.concatenate([model.decode(held[i:i + 4]) for i in range(0, len(held), 4)]).astype(np.float64)
        print("\nPSNR of decoded tiles against decoding the float latents (dB)")
        for name, q, st in rows:
            out = np.concatenate([model.decode(q.dequantize(st[i:i + 4])) for i in range(0, len(st), 4)])
            err = float(((out.astype(np.float64) - ref) ** 2).mean())
            print(f"  {name:22s} {10 * np.log10(255 ** 2 / max(err, 1e-12)):6.2f}")


if __name__ == "__main__":
    main()
