"""`wsicodec stats --estimate` against the real thing: projected vs written container size, and time.

For each slide: run the estimate, then compress with the same model and settings, and print
    estimate (95 % interval), real container size, error %, whether the interval holds it,
    estimate time, compress time, and compress time / estimate time (the speed-up; must be >= 5x
    on a slide with >= 2 000 tissue tiles).
The model is loaded once and shared by both, so neither time includes loading it.

Slides: a synthetic 20x slide with >= 2 000 tissue tiles (wsicodec.testing.synthetic, written once into
--workdir) and the slides in ../shared/data/slides (WSICODEC_SHARED overrides ../shared; the TCGA slide
records no resolution and is run with --source-mpp 0.5, as compress would need).

    python benchmarks/bench_stats_estimate.py [--model M] [--sample 32] [--side 16384] [--json out.json]

Default model: the builtin one when it loads, else TAEF2 from ../shared/weights/taef2.
`--model random-builtin`: the builtin architecture with seeded random weights (CPU-fast; for when
neither the packaged weights nor the CPU time for TAEF2 on 2 000 tiles are at hand).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from wsicodec.stats import report as st
from wsicodec.pipeline.compress import compress
from wsicodec.models import load_model
from wsicodec.testing.synthetic import write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSICODEC_SHARED", REPO.parent / "shared"))


def pick_model(name: str | None, workdir: Path):
    if name == "random-builtin":
        # the builtin architecture with seeded random weights: CPU-fast, so a 2 000-tile compress fits in
        # minutes; it measures the estimator (sizes, time), not fidelity
        from wsicodec.models.builtin import build_net, save_builtin_folder

        torch.manual_seed(0)
        folder = workdir / "random-builtin"
        if not folder.exists():
            save_builtin_folder(build_net(), folder, model_id="random-builtin")
        return load_model(str(folder), device="cpu")
    if name:
        return load_model(name, device="cpu")
    try:
        return load_model(None, device="cpu")
    except Exception as exc:  # the builtin model may not be packaged yet
        print(f"builtin model unavailable ({exc}); using TAEF2", file=sys.stderr)
        return load_model(str(SHARED / "weights" / "taef2"), device="cpu")


def run_one(path: Path, model, *, sample: int, source_mpp: float | None, workdir: Path, label: str) -> dict:
    t0 = time.perf_counter()
    report = st.estimate([path], model=model, sample=sample, source_mpp=source_mpp)
    t_est = time.perf_counter() - t0
    if report.skipped:
        return {"slide": label, "skipped": report.skipped[0].reason}
    row = report.rows[0]
    out = workdir / f"{path.stem}.pzarr"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    real = compress(path, out, model=model, source_mpp=source_mpp, overwrite=True)
    t_cmp = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {
        "slide": label, "tissue_tiles": row.tissue_tiles, "sampled": row.sampled_tiles,
        "estimate": row.projected_bytes, "low": row.projected_low, "high": row.projected_high,
        "real": real.container_bytes, "error_pct": 100 * (row.projected_bytes / real.container_bytes - 1),
        "in_interval": row.projected_low <= real.container_bytes <= row.projected_high,
        "overhead": row.overhead_bytes, "estimate_s": t_est, "compress_s": t_cmp, "speedup": t_cmp / t_est,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sample", type=int, default=st.DEFAULT_SAMPLE)
    ap.add_argument("--side", type=int, default=16384, help="synthetic slide side in px at 0.5 µm/px")
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic slide is kept between runs")
    ap.add_argument("--no-shared", action="store_true")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-stats-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = pick_model(args.model, workdir)
    print(f"model {model.info.model_id}, sample {args.sample} tiles, torch threads {torch.get_num_threads()}")

    synth = workdir / f"synthetic-{args.side}.svs"
    jobs = []
    if args.no_synthetic:
        pass
    elif not synth.exists():
        t0 = time.perf_counter()
        write_synthetic_slide(synth, args.side, args.side, mpp=0.5, objective_power=20, tissue_fraction=0.6,
                              islands=4, seed=7)
        print(f"wrote {synth.name} ({synth.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    if not args.no_synthetic:
        jobs.append((synth, None, synth.name))
    if not args.no_shared:
        slides = SHARED / "data" / "slides"
        for path in sorted(slides.glob("*.svs")):
            # the TCGA slide records no resolution: the user must say it, as with compress
            jobs.append((path, 0.5 if "tcga" in path.name else None, path.name))

    results = []
    header = (f"{'slide':34} {'tissue':>6} {'n':>3} {'estimate MB (95%)':>24} {'real MB':>9} {'error':>7} "
              f"{'in CI':>5} {'est s':>6} {'cmp s':>7} {'speed-up':>8}")
    print(header)
    for path, source_mpp, label in jobs:
        r = run_one(path, model, sample=args.sample, source_mpp=source_mpp, workdir=workdir, label=label)
        results.append(r)
        if "skipped" in r:
            print(f"{label:34} skipped: {r['skipped']}")
            continue
        print(f"{label:34} {r['tissue_tiles']:>6} {r['sampled']:>3} "
              f"{r['estimate'] / 1e6:>8.3f} ({r['low'] / 1e6:.3f}-{r['high'] / 1e6:.3f}) {r['real'] / 1e6:>9.3f} "
              f"{r['error_pct']:>+6.1f}% {str(r['in_interval']):>5} {r['estimate_s']:>6.1f} {r['compress_s']:>7.1f} "
              f"{r['speedup']:>7.1f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": model.info.model_id, "sample": args.sample, "results": results},
                                        indent=2))
    big = [r for r in results if "skipped" not in r and r["tissue_tiles"] >= 2000]
    ok = all(abs(r["error_pct"]) <= 15 and r["speedup"] >= 5 for r in big) and all(
        abs(r["error_pct"]) <= 15 for r in results if "skipped" not in r)
    print("PASS" if ok else "FAIL", "(|error| <= 15 % everywhere; speed-up >= 5x on slides with >= 2000 tissue tiles)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
