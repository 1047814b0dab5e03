"""Bit-flip detection table for both container layouts.

    python benchmarks/fuzz_containers.py [--flips 1200] [--seed 0] [--slide S] [--model M]

Writes a container of a slide (default: a synthetic 2048 px slide, builtin model) as a directory and as a
zip, flips ``--flips`` random bits in each (one per copy, spread over every kind of stored file), and prints
per kind: flips, refused by ``verify``, refused by a full restore, accepted but harmless (restored pixels,
associated images and attributes identical), and silent damage (accepted and changed; the target is 0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flips", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    import wsicodec
    from wsicodec.models import load_model
    from wsicodec.testing.fuzz import detection_table, fuzz_container
    from wsicodec.testing.synthetic import write_synthetic_slide

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        slide = args.slide or write_synthetic_slide(Path(tmp) / "s.svs", 2048, 2048)
        for single in (False, True):
            out = Path(tmp) / ("zip.pzarr" if single else "dir.pzarr")
            wsicodec.compress(slide, out, model=model, single_file=single)
            t0 = time.perf_counter()
            results = fuzz_container(out, flips=args.flips, seed=args.seed, model=model)
            silent = sum(r.silent for r in results)
            changed = sum(1 for r in results if r.changed is not False)
            print(f"\n{'zip' if single else 'directory'} layout: {len(results)} flips in "
                  f"{time.perf_counter() - t0:.0f} s; silent damage {silent}")
            print(detection_table(results))
            print(f"detection rate over flips that change anything: "
                  f"{100.0 * (changed - silent) / max(changed, 1):.1f} % ({changed - silent}/{changed})")


if __name__ == "__main__":
    main()
