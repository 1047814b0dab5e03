"""End-to-end compress throughput and memory, against OpenSlide's own read rate in the same run.

    python benchmarks/bench_compress.py [SLIDE] [--model M] [--synthetic 20000]

Prints: OpenSlide read rate of 256 px tiles (the baseline), compress tiles/s and its ratio to the baseline,
container bytes per tissue tile, compression ratio, and peak RSS (with --synthetic, a generated slide of that
many pixels a side, to show memory does not grow with the slide).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsicodec.pipeline.compress import compress, plan  # noqa: E402
from wsicodec.source.slide import SourceSlide  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def openslide_read_rate(path: Path, n: int = 400) -> float:
    import openslide

    with openslide.OpenSlide(str(path)) as osr:
        w, h = osr.dimensions
        xs = np.random.default_rng(0).integers(0, max(w - 256, 1), n)
        ys = np.random.default_rng(1).integers(0, max(h - 256, 1), n)
        t = time.perf_counter()
        for x, y in zip(xs, ys):
            osr.read_region((int(x), int(y)), 0, (256, 256))
        return n / (time.perf_counter() - t)


def main() -> None:
    shared = Path(os.environ.get("WSICODEC_SHARED", REPO.parent / "shared"))
    parser = argparse.ArgumentParser()
    parser.add_argument("slide", nargs="?", default=str(shared / "data/slides/CMU-1-Small-Region.svs"))
    parser.add_argument("--model", default=None, help="default: the builtin model")
    parser.add_argument("--quant", default=None)
    parser.add_argument("--synthetic", type=int, default=0, help="also compress a synthetic N x N px slide")
    args = parser.parse_args()

    slides = [Path(args.slide)]
    tmp = Path(tempfile.mkdtemp(prefix="wsicodec-bench-"))
    if args.synthetic:
        from wsicodec.testing.synthetic import write_synthetic_slide

        synthetic = tmp / "synthetic.svs"
        write_synthetic_slide(synthetic, args.synthetic, args.synthetic, mpp=0.5, objective_power=20)
        slides.append(synthetic)

    rss_before = peak_rss_mib()
    for slide in slides:
        baseline = openslide_read_rate(slide)
        with SourceSlide(slide) as src:
            n_tissue = len(plan(src).coords)
        summary = compress(slide, tmp / (slide.stem + ".pzarr"), model=args.model, quant=args.quant)
        rate = summary.tiles_per_second
        print(f"{slide.name}: {n_tissue} tissue tiles of {summary.tiles_total}")
        print(f"  OpenSlide read (baseline)  {baseline:8.1f} tiles/s")
        print(f"  compress end to end        {rate:8.1f} tiles/s  ({rate / baseline:.3f}x the read rate)")
        print(f"  model {summary.model_id}, quantiser {summary.quantizer.get('kind')}-{summary.quantizer.get('levels')}")
        print(f"  container {summary.container_bytes / 1e3:.1f} KB = "
              f"{summary.container_bytes / max(n_tissue, 1) / 1e3:.2f} KB per tissue tile; "
              f"source {summary.source_bytes / 1e6:.1f} MB; ratio {summary.ratio:.1f}x")
        print(f"  peak RSS so far {peak_rss_mib():.0f} MiB (after imports: {rss_before:.0f} MiB)")


if __name__ == "__main__":
    main()
