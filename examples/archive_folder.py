"""Archive every slide in a folder as .pzarr containers and print what it saved.

    python examples/archive_folder.py SLIDES_DIR OUT_DIR [--model M] [--overwrite]

Each slide OpenSlide opens (.svs .tif .tiff .ndpi .mrxs .scn .vms .vmu .svslide .bif .czi) directly in
SLIDES_DIR becomes OUT_DIR/<stem>.pzarr.  Containers already in OUT_DIR are skipped (so an interrupted
run can simply be started again) unless --overwrite is given.  A slide that fails is reported and the
others still run; the exit status is 1 if any failed.

Prints one row per slide (source bytes, container bytes, ratio, tissue tiles, seconds) and the totals.
MIRAX (.mrxs) source sizes include the slide's companion data folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import wsicodec
from wsicodec.source.slide import SLIDE_SUFFIXES  # what `wsicodec stats` also counts as a slide


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def source_bytes(slide: Path, reported: int) -> int:
    """The slide's size on disk; a MIRAX .mrxs is only an index, its pixels are in the folder beside it."""
    companion = slide.with_suffix("")
    if slide.suffix.lower() == ".mrxs" and companion.is_dir():
        return reported + sum(p.stat().st_size for p in companion.rglob("*") if p.is_file())
    return reported


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slides_dir", type=Path, help="folder holding the slides (not searched recursively)")
    ap.add_argument("out_dir", type=Path, help="where the .pzarr containers go (created if missing)")
    ap.add_argument("--model", default=None,
                    help="model id or folder (default: the builtin CPU-fast model; see `wsicodec models`)")
    ap.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    ap.add_argument("--overwrite", action="store_true", help="replace containers that already exist")
    args = ap.parse_args(argv)

    if not args.slides_dir.is_dir():
        print(f"error: {args.slides_dir} is not a folder", file=sys.stderr)
        return 2
    slides = sorted(p for p in args.slides_dir.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    if not slides:
        print(f"error: no slides ({' '.join(sorted(SLIDE_SUFFIXES))}) in {args.slides_dir}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)

    header = f"{'slide':<32} {'source':>10} {'container':>10} {'ratio':>7} {'tissue tiles':>13} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    total_src = total_out = done = skipped = 0
    failed: list[str] = []
    used: dict[str, Path] = {}
    started = time.perf_counter()
    for slide in slides:
        out = args.out_dir / f"{slide.stem}.pzarr"
        name = slide.name if len(slide.name) <= 32 else slide.name[:29] + "..."
        if slide.stem in used:  # a.svs and a.tif would both be a.pzarr
            print(f"{name:<32} error: same name as {used[slide.stem].name}; rename one of them")
            failed.append(slide.name)
            continue
        used[slide.stem] = slide
        if out.exists() and not args.overwrite:
            print(f"{name:<32} skipped: {out} exists (--overwrite replaces it)")
            skipped += 1
            continue
        try:
            r = wsicodec.compress(slide, out, model=args.model, device=args.device, overwrite=args.overwrite,
                                  progress=sys.stderr.isatty())
        except wsicodec.WsicodecError as exc:
            print(f"{name:<32} error: {exc}")
            failed.append(slide.name)
            continue
        src = source_bytes(slide, r.source_bytes)
        ratio = src / max(r.container_bytes, 1)
        print(f"{name:<32} {human(src):>10} {human(r.container_bytes):>10} {ratio:>6.1f}x "
              f"{f'{r.tissue_tiles}/{r.tiles_total}':>13} {r.seconds:>8.1f}", flush=True)
        total_src += src
        total_out += r.container_bytes
        done += 1

    print("-" * len(header))
    if done:
        saved = total_src - total_out
        print(f"total: {done} slide(s) archived in {time.perf_counter() - started:.1f} s: "
              f"{human(total_src)} -> {human(total_out)}, ratio {total_src / max(total_out, 1):.1f}x, "
              f"saved {human(saved)} ({100.0 * saved / max(total_src, 1):.1f} %)")
    else:
        print("total: nothing archived")
    if skipped:
        print(f"skipped {skipped} slide(s) already archived in {args.out_dir}")
    if failed:
        print(f"failed: {len(failed)} slide(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
