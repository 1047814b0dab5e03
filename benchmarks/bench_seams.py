"""Seam ratio and fidelity of the restore against the decoder's halo (in latent cells).

    python benchmarks/bench_seams.py [--slide CMU-1-Small-Region.svs] [--model ../shared/weights/taef2]
                                     [--halos 0 1 2 3 4] [--device cpu]

Compresses the slide with the model (K-means, as `wsicodec compress` does), then decodes level 0
once per halo and prints, per halo: the seam ratio (mean |difference| of neighbouring pixels that
straddle a tile border over the same figure inside tiles, tissue tiles only; 1.0 = no seam), PSNR
against the source on tissue tiles, and decode time relative to halo 0 (the baseline, same run).

The restore is compared pixel for pixel without any JPEG step; the source slide's own figure is
printed for reference (CMU-1 is JPEG-compressed in 8 x 8 blocks, and 256 px borders are block
borders, so its ratio is well above 1 at the tile grid and about 1 off it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("WSICODEC_SHARED", HERE.parent.parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, default=SHARED / "data" / "slides" / "CMU-1-Small-Region.svs")
    ap.add_argument("--model", default=str(SHARED / "weights" / "taef2"))
    ap.add_argument("--halos", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from wsicodec.pipeline.compress import compress
    from wsicodec.format.container import Container
    from wsicodec.models import load_model
    from wsicodec.pipeline.decoder import TileDecoder
    from wsicodec.quality import psnr, seam_ratio
    from wsicodec.source.slide import SourceSlide

    if not args.slide.is_file():
        sys.exit(f"slide not found: {args.slide} (set WSICODEC_SHARED or pass --slide)")
    model = load_model(args.model, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pzarr"
        compress(args.slide, path, model=model, quant="kmeans", batch_size=args.batch_size)
        c = Container.open(path)
        grid, tissue = c.grid, np.asarray(c.tissue)
        t = grid.tile_size
        with SourceSlide(args.slide) as slide:
            source = np.full((grid.rows * t, grid.cols * t, 3), 255, np.uint8)
            for r in range(grid.rows):
                for col in range(grid.cols):
                    source[r * t : (r + 1) * t, col * t : (col + 1) * t] = slide.read_tile(grid, r, col)
        source = source[: grid.height, : grid.width]
        coords = list(zip(*np.nonzero(tissue)))

        def tissue_pixels(img: np.ndarray) -> np.ndarray:
            return np.concatenate([img[r * t : (r + 1) * t, col * t : (col + 1) * t].reshape(-1, 3)
                                   for r, col in coords])

        ref = tissue_pixels(source)
        print(f"{args.slide.name}: {grid.width}x{grid.height} px, {len(coords)}/{tissue.size} tissue tiles, "
              f"model {model.info.model_id}, device {model.device}")
        print(f"source's own seam ratio: {seam_ratio(source, t, tissue):.3f} at the tile grid, "
              f"{seam_ratio(source[4:, 4:], t, tissue):.3f} shifted by 4 px (JPEG 8x8 blocks)")
        print(f"{'halo':>4} {'seam ratio':>10} {'PSNR dB':>8} {'seconds':>8} {'time/halo0':>10}")
        base = None
        for halo in args.halos:
            dec = TileDecoder(c, model, halo=halo, cache_tiles=0, batch_size=args.batch_size)
            t0 = time.perf_counter()
            img = np.concatenate(list(dec.strips()), axis=0)
            secs = time.perf_counter() - t0
            base = base or secs
            print(f"{halo:>4} {seam_ratio(img, t, tissue):>10.3f} {psnr(tissue_pixels(img), ref):>8.2f} "
                  f"{secs:>8.1f} {secs / base:>10.2f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    main()
