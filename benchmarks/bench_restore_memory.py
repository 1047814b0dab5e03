"""Peak memory of `restore` on a large slide: it must stay bounded by the tiles in flight.

    python benchmarks/bench_restore_memory.py [--side 30000] [--small 8000] [--workdir DIR]

For each slide size one child process writes a container directly with ContainerWriter (a tissue
mask of a few blobs covering about 40 % of the tiles, every tissue tile filled with smooth,
plausible indices); another loads a tiny random builtin-architecture model (the decoder's speed is not
what is measured here), records its RSS as the baseline, restores a JPEG pyramid and reports
the peak RSS (resource.getrusage). Running two sizes shows the peak does not grow with the slide.
The 30000 x 30000 restore must peak under 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def make_container(side: int, workdir: Path) -> None:
    import numpy as np
    import torch

    from wsicodec.format import ContainerWriter
    from wsicodec.models import load_model
    from wsicodec.models.builtin import build_net, save_builtin_folder
    from wsicodec.quant.quantizer import make_quantizer
    from wsicodec.source.slide import TileGrid

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model_dir = workdir / "tiny-model"
    if not model_dir.exists():
        save_builtin_folder(build_net({"enc_widths": [8], "enc_blocks": [1], "dec_widths": [8, 8],
                                       "dec_blocks": [1, 1]}), model_dir, model_id="bench-tiny")
    model = load_model(str(model_dir), device="cpu")
    t = 256
    n = t // model.info.spatial_factor
    rows = cols = -(-side // t)
    grid = TileGrid(tile_size=t, width=side, height=side, rows=rows, cols=cols, target_mpp=0.5, source_mpp=0.5,
                    objective_power=20.0, level=0, origin_x=0, origin_y=0, scale=1.0)
    yy, xx = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    tissue = np.zeros((rows, cols), bool)
    for cy, cx, r in ((0.3, 0.3, 0.22), (0.65, 0.6, 0.3), (0.25, 0.75, 0.12)):
        tissue |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    q = make_quantizer("uniform", 256, latent_range=model.info.latent_range)
    q.fit(torch.linspace(-3, 3, 4096).reshape(1, 1, 64, 64).repeat(1, model.info.latent_channels, 1, 1))
    rng = np.random.default_rng(0)
    container = workdir / f"bench-{side}.pzarr"
    ch = model.info.latent_channels
    cy, cx = np.mgrid[0:n, 0:n]
    with ContainerWriter(container, grid=grid, model=model.info, quantizer=q, tissue=tissue,
                         background=np.full((ch, n, n), 128, np.uint8), overwrite=True) as w:
        for r, c in zip(*np.nonzero(tissue)):
            phase = rng.random((ch, 1, 1)) * 6.28
            tile = 128 + 60 * np.sin(cy[None] / 3.0 + phase) * np.cos(cx[None] / 4.0 + phase)
            w.write_tile(r, c, np.clip(tile + rng.normal(0, 8, tile.shape), 0, 255).astype(np.uint8))


def restore_child(side: int, workdir: Path) -> dict:
    """In its own process, so that the peak RSS is the restore's alone."""
    import numpy as np
    import torch

    from wsicodec.format.container import Container
    from wsicodec.models import load_model
    from wsicodec.pipeline.restore import restore

    torch.set_num_threads(2)
    model = load_model(str(workdir / "tiny-model"), device="cpu")
    container = workdir / f"bench-{side}.pzarr"
    tissue = np.asarray(Container.open(container).tissue)
    rows, cols = tissue.shape
    baseline = _rss_now()
    peak_before = _peak_rss()
    out = workdir / f"bench-{side}.tiff"
    t0 = time.perf_counter()
    summary = restore(container, out, compression="jpeg", quality=90, device="cpu", batch_size=8, progress=False,
                      overwrite=True, _model_obj=model)
    seconds = time.perf_counter() - t0
    result = {"side": side, "tiles": rows * cols, "tissue_tiles": int(tissue.sum()),
              "baseline_rss": baseline, "peak_rss_before_restore": peak_before, "peak_rss": _peak_rss(),
              "seconds": seconds, "tiff_bytes": out.stat().st_size, "levels": summary["levels"]}
    out.unlink()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=30000)
    ap.add_argument("--small", type=int, default=8000, help="a smaller slide for comparison (0: skip)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--make", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make is not None:
        make_container(args.make, args.workdir)
        return
    if args.child is not None:
        print(json.dumps(restore_child(args.child, args.workdir)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = []
        for side in [s for s in (args.small, args.side) if s]:
            for step in ("--make", "--child"):
                proc = subprocess.run([sys.executable, __file__, step, str(side), "--workdir", tmp],
                                      capture_output=True, text=True, check=False)
                if proc.returncode:
                    sys.exit(f"{step} for {side} px failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'slide':>14} {'tiles':>7} {'tissue':>7} {'baseline':>10} {'peak':>10} {'peak-base':>10} "
          f"{'peak/base':>9} {'time':>8}")
    for r in results:
        print(f"{r['side']:>6}x{r['side']:<7} {r['tiles']:>7} {r['tissue_tiles']:>7} "
              f"{r['baseline_rss'] / 2**20:>8.0f}Mi {r['peak_rss'] / 2**20:>8.0f}Mi "
              f"{(r['peak_rss'] - r['baseline_rss']) / 2**20:>8.0f}Mi {r['peak_rss'] / r['baseline_rss']:>9.2f} "
              f"{r['seconds']:>7.0f}s")
    big = results[-1]
    verdict = "OK" if big["peak_rss"] < 2 * GIB else "OVER"
    print(f"{big['side']}x{big['side']} restore peak RSS {big['peak_rss'] / GIB:.2f} GiB (limit 2 GiB): {verdict}")
    if len(results) == 2:
        small = results[0]
        growth = (big["peak_rss"] - big["baseline_rss"]) / max(small["peak_rss"] - small["baseline_rss"], 1)
        print(f"pixels x{(big['side'] / small['side']) ** 2:.1f}, restore memory above baseline x{growth:.2f}")
    if verdict != "OK":
        sys.exit(1)


if __name__ == "__main__":
    main()
