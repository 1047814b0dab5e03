"""Is encoding read-bound? OpenSlide read rate, encoder rate alone and whole-pipeline rate, in one run.

    .venv/bin/python benchmarks/bench_encode_throughput.py [--slide SLIDE] [--device cpu|cuda|cuda:N]
        [--tiles N] [--batch-size 16] [--read-workers 2]

On whatever device is available (``--device``; default CUDA if present, else CPU) it prints:

1. the read rate: 256 px tiles at 0.5 µm/px through ``SourceSlide.read_tiles`` on ``--read-workers`` threads;
2. the encoder rate alone: ``Autoencoder.encode`` on tiles already in memory (the same 256 + 2 x margin px
   tiles the pipeline encodes), batch ``--batch-size``, after one warm-up batch, for
   - TAEF2 (``<shared>/weights/taef2``; skipped with a message when absent), and
   - a random-weight ``diffusers.AutoencoderKL`` with SD-1.5's VAE config, saved with ``save_pretrained`` to a
     temporary folder and loaded with ``wsicodec.load_model(folder)`` (no hub);
3. the pipeline rate: ``encode_batches`` (reads on threads overlapping the encoder, the default 32 px margin),
   and pipeline/read, so a reader sees whether encoding is read-bound (ratio near 1) or encoder-bound.

``--tiles N`` bounds the work (default 64 on CPU, 2048 on GPU). When N exceeds the slide's tiles at 0.5 µm/px
the coordinates repeat, and OpenSlide's tile cache then makes repeated reads cheaper than first reads: use a
large slide (``--slide``) for GPU figures. The slide defaults to ``CMU-1-Small-Region.svs`` in
``$WSICODEC_SHARED`` (else ``../shared``), or a synthetic slide when that is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import wsicodec  # noqa: E402
from wsicodec._paths import shared_dir  # noqa: E402
from wsicodec.models.base import Autoencoder, pick_device  # noqa: E402
from wsicodec.pipeline.compress import encode_batches, encode_margin_px  # noqa: E402
from wsicodec.source.slide import SourceSlide  # noqa: E402

TILE = 256
MPP = 0.5
MARGIN = 32  # the library's default encode margin (Autoencoder.encode_margin_px)

SD15_VAE = dict(  # stable-diffusion-v1-5/vae/config.json, architecture fields
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)


def default_slide(tmp: Path) -> tuple[Path, str]:
    path = shared_dir() / "data" / "slides" / "CMU-1-Small-Region.svs"
    if path.is_file():
        return path, str(path)
    from wsicodec.testing.synthetic import write_synthetic_slide

    synth = write_synthetic_slide(tmp / "synthetic.svs", 4096, 4096, mpp=0.25, tissue_fraction=0.6)
    return synth, f"synthetic 4096 x 4096 at 0.25 µm/px ({path} absent)"


def dtype_of(model: Autoencoder) -> str:
    try:
        module = next(iter(model.modules_for_training().values()))
        weights = str(next(module.parameters()).dtype).replace("torch.", "")
    except (NotImplementedError, StopIteration):
        weights = "float32"
    ctx = model._autocast()
    if isinstance(ctx, torch.autocast):
        return f"{str(ctx.fast_dtype).replace('torch.', '')} autocast ({weights} weights)"
    return weights


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_rate(slide: SourceSlide, grid, coords, workers: int) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in slide.read_tiles(grid, coords, workers=workers))
    return n / (time.perf_counter() - t0)


def encoder_rate(model: Autoencoder, tiles: np.ndarray, n: int, batch: int) -> float:
    """Tiles/s of model.encode on in-memory uint8 tiles (CPU in, CPU latents out), after a warm-up batch."""
    pool = len(tiles)
    model.encode(tiles[np.arange(batch) % pool])  # warm-up: cuDNN/oneDNN algorithm choice, allocator
    sync(model.device)
    done, t0 = 0, time.perf_counter()
    while done < n:
        k = min(batch, n - done)
        model.encode(tiles[(done + np.arange(k)) % pool])
        done += k
    sync(model.device)
    return n / (time.perf_counter() - t0)


def pipeline_rate(model: Autoencoder, slide: SourceSlide, grid, coords, batch: int, workers: int,
                  margin: int) -> float:
    # warm-up batch (not timed), as for the encoder alone
    for _ in encode_batches(model, slide, grid, coords[:batch], batch_size=batch, workers=workers, margin=margin):
        pass
    sync(model.device)
    n, t0 = 0, time.perf_counter()
    for batch_coords, _z in encode_batches(model, slide, grid, coords, batch_size=batch, workers=workers,
                                           margin=margin):
        n += len(batch_coords)
    sync(model.device)
    return n / (time.perf_counter() - t0)


def sd15_random_vae(folder: Path, device: str) -> Autoencoder:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD15_VAE).save_pretrained(folder, safe_serialization=True)
    return wsicodec.load_model(folder, device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if present, else CPU)")
    ap.add_argument("--tiles", type=int, default=None, help="tiles per measurement (default 64 CPU, 2048 GPU)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--read-workers", type=int, default=2)
    args = ap.parse_args()

    device = pick_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.tiles or (2048 if device.type == "cuda" else 64)
    bs = args.batch_size

    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmpdir:
        tmp = Path(tmpdir)
        slide_path, slide_label = (args.slide, str(args.slide)) if args.slide else default_slide(tmp)
        with SourceSlide(slide_path) as slide:
            grid = slide.grid(target_mpp=MPP, tile_size=TILE)
            all_coords = [(r, c) for r in range(grid.rows) for c in range(grid.cols)]
            coords = list(islice(cycle(all_coords), n))

            if device.type == "cuda":
                dev_name = torch.cuda.get_device_name(device)
            else:
                dev_name = f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
            print(f"slide   {slide_label}")
            print(f"grid    {grid.rows} x {grid.cols} = {len(all_coords)} tiles of {TILE} px at "
                  f"{grid.actual_mpp:.4g} µm/px (asked {MPP}); {n} tiles per measurement"
                  + (" (coordinates repeat: OpenSlide's cache helps repeated reads)" if n > len(all_coords) else ""))
            print(f"device  {device} ({dev_name}); batch {bs}; read workers {args.read_workers}")

            read_tps = read_rate(slide, grid, coords, args.read_workers)
            rows: list[tuple[str, str, str, str, str, str]] = []

            models: list[tuple[str, object]] = []
            taef2 = shared_dir() / "weights" / "taef2"
            if taef2.is_dir():
                models.append(("TAEF2", lambda: wsicodec.load_model(taef2, device=str(device))))
            else:
                print(f"skip    TAEF2: no weights at {taef2}")
            models.append(("SD-1.5 VAE (random)", lambda: sd15_random_vae(tmp / "sd15-vae", str(device))))

            for label, load in models:
                model = load()
                margin = encode_margin_px(model, MARGIN)
                side = TILE + 2 * margin
                # in-memory tiles: the slide's own (with their margins), at most one batch-worth of distinct ones
                sample = np.stack([t for _, t in slide.read_tiles(grid, all_coords[:bs], workers=args.read_workers,
                                                                   margin=margin)])
                enc_tps = encoder_rate(model, sample, n, bs)
                pipe_tps = pipeline_rate(model, slide, grid, coords, bs, args.read_workers, margin)
                rows.append((label, dtype_of(model), f"{side}", f"{enc_tps:.2f}", f"{pipe_tps:.2f}",
                             f"{pipe_tps / read_tps:.3f}"))
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    print()
    print(f"read (OpenSlide, {TILE} px, {args.read_workers} threads): {read_tps:.1f} tiles/s")
    head = ("model", "dtype", "tile px", "encoder tiles/s", "pipeline tiles/s", "pipeline/read")
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print("pipeline/read near 1: read-bound; well below 1: encoder-bound (compare encoder tiles/s with read).")


if __name__ == "__main__":
    main()
