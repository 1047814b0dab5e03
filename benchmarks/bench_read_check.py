"""What hashing every latent shard at its first read costs a restore.

    python benchmarks/bench_read_check.py [--side 4096] [--repeats 3] [--single-file] [--workdir DIR]

Writes a synthetic slide (wsicodec.testing.synthetic), compresses it with a tiny random builtin-architecture
model (wsicodec.testing.tiny; the decoder's speed is not what is measured, and a small decoder makes the
check's share look as large as it can), then restores the whole pyramid to a JPEG TIFF alternately with the
read check (as shipped) and without it (``Container.check_latent_shards`` replaced by a no-op, in this process
only), ``--repeats`` times each, and prints the median times and their ratio. Also prints how many shard bytes
were hashed and the SHA-256 rate, so the check's cost on a real model can be worked out from its decode rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=4096, help="slide width and height in px at 0.5 µm/px")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--single-file", action="store_true", help="a zip container instead of a directory")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    import hashlib

    import torch

    import wsicodec
    from wsicodec.format.container import Container
    from wsicodec.pipeline.restore import restore
    from wsicodec.testing.synthetic import write_synthetic_slide
    from wsicodec.testing.tiny import write_tiny_builtin

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        d = Path(tmp)
        slide = write_synthetic_slide(d / "s.svs", args.side, args.side, mpp=0.5, objective_power=20, levels=[1])
        model = wsicodec.load_model(str(write_tiny_builtin(d / "m")), device="cpu")
        c = d / "c.pzarr"
        wsicodec.compress(slide, c, model=model, device="cpu", single_file=args.single_file, progress=False)
        with Container.open(c) as opened:
            shard_keys = [k for k in opened.manifest["keys"] if k.startswith("latents/c/")]
            shard_bytes = sum(opened.manifest["keys"][k]["size"] for k in shard_keys)
            tiles = int(opened.tissue.sum())
        data = b"\0" * (1 << 24)
        t0 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        sha_rate = len(data) / (time.perf_counter() - t0)

        shipped = Container.check_latent_shards
        times: dict[str, list[float]] = {"with check": [], "without": []}
        for i in range(args.repeats):
            for name in times:
                Container.check_latent_shards = shipped if name == "with check" else (lambda self, *a: None)
                out = d / f"o-{i}-{name[:4]}.tiff"
                t0 = time.perf_counter()
                restore(c, out, model=None, device="cpu", progress=False, _model_obj=model)
                times[name].append(time.perf_counter() - t0)
                out.unlink()
        Container.check_latent_shards = shipped

    med = {k: statistics.median(v) for k, v in times.items()}
    layout = "zip" if args.single_file else "directory"
    print(f"slide {args.side}x{args.side} px, {tiles} tissue tiles, {len(shard_keys)} shards, "
          f"{shard_bytes / 2**20:.2f} MiB of shards ({layout}); SHA-256 {sha_rate / 2**20:.0f} MiB/s")
    for k, v in times.items():
        print(f"restore {k:10s}: median {med[k]:.3f} s  ({', '.join(f'{x:.3f}' for x in v)})")
    print(f"ratio with/without: {med['with check'] / med['without']:.3f} "
          f"(hashing the shards alone: {shard_bytes / sha_rate * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
