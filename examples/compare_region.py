"""Compare one region of a slide with the same region restored from its .pzarr container.

    python examples/compare_region.py SOURCE_SLIDE CONTAINER [--x X --y Y] [--size 512] [--out side_by_side.png]

The container's level 0 is at the archived resolution (0.5 µm/px by default), not the source's: a
40x slide (0.25 µm/px) is archived at half its width.  The script reads ``openslide.mpp-x`` of both
(the container's exact ``wsicodec.archived-mpp`` where present) and maps source coordinates with the
ratio, so --x/--y are the region's top-left corner in SOURCE level-0 pixels, as a viewer shows them,
and --size is its side in ARCHIVED pixels.  Without --x/--y the region is centred on the tissue.

The source region is read at level 0 and box-averaged down to the archived resolution (what the
compressor sees), then saved beside the restored one and their absolute difference amplified
(--gain, default 4x) in one PNG: source | restored | error.  Prints the mapping, PSNR and errors.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

import wsicodec


def on_white(img: Image.Image) -> Image.Image:
    """RGBA from read_region (transparent outside the slide) flattened onto white."""
    bg = Image.new("RGB", img.size, (255, 255, 255))
    bg.paste(img, mask=img.getchannel("A"))
    return bg


def mpp(props, *keys: str) -> float | None:
    for key in keys:
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            continue
        if value > 0:
            return value
    return None


def tissue_centre(src: openslide.OpenSlide) -> tuple[float, float]:
    """Level-0 (x, y) of the tissue pixel nearest the tissue's centroid, from a small thumbnail."""
    thumb = np.asarray(src.get_thumbnail((512, 512)).convert("RGB"), dtype=np.int16)
    fx, fy = src.dimensions[0] / thumb.shape[1], src.dimensions[1] / thumb.shape[0]
    # tissue: darker than glass or clearly coloured (glass is bright and grey)
    tissue = (thumb.mean(axis=2) < 215) | (thumb.max(axis=2) - thumb.min(axis=2) > 25)
    ys, xs = np.nonzero(tissue)
    if len(xs) == 0:  # no tissue found: the middle of the slide
        return src.dimensions[0] / 2, src.dimensions[1] / 2
    cx, cy = xs.mean(), ys.mean()
    i = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return (xs[i] + 0.5) * fx, (ys[i] + 0.5) * fy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="the original slide (anything OpenSlide opens)")
    ap.add_argument("container", type=Path, help="its .pzarr container")
    ap.add_argument("--x", type=int, default=None, help="left edge in source level-0 pixels (default: tissue centre)")
    ap.add_argument("--y", type=int, default=None, help="top edge in source level-0 pixels (default: tissue centre)")
    ap.add_argument("--size", type=int, default=512, help="side of the region in archived pixels (default 512)")
    ap.add_argument("--gain", type=float, default=4.0, help="amplification of the error panel (default 4)")
    ap.add_argument("--out", type=Path, default=Path("side_by_side.png"), help="the PNG (default side_by_side.png)")
    args = ap.parse_args(argv)
    if args.size < 1:
        ap.error("--size must be at least 1")

    try:
        src = openslide.OpenSlide(str(args.source))
    except (openslide.OpenSlideError, OSError) as exc:
        print(f"error: cannot open {args.source}: {exc}", file=sys.stderr)
        return 1
    try:
        arc = wsicodec.open(args.container)
    except wsicodec.WsicodecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    with src, arc:
        # scale: source level-0 pixels per archived pixel
        src_mpp = mpp(src.properties, openslide.PROPERTY_NAME_MPP_X)
        arc_mpp = mpp(arc.properties, "wsicodec.archived-mpp", openslide.PROPERTY_NAME_MPP_X)
        bx = int(src.properties.get(openslide.PROPERTY_NAME_BOUNDS_X, 0))  # the archived area's origin
        by = int(src.properties.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0))
        if src_mpp and arc_mpp:
            scale = arc_mpp / src_mpp
            how = f"source {src_mpp:g} µm/px, archived {arc_mpp:g} µm/px"
        else:  # the source records no resolution (compressed with --source-mpp): compare the widths
            bw = int(src.properties.get(openslide.PROPERTY_NAME_BOUNDS_WIDTH, src.dimensions[0]))
            scale = bw / arc.dimensions[0]
            how = "the source records no resolution: scale from the image widths"
        size = min(args.size, *arc.dimensions)
        src_size = max(1, math.ceil(size * scale))

        if args.x is None or args.y is None:
            cx, cy = tissue_centre(src)
            x = round(cx - src_size / 2) if args.x is None else args.x
            y = round(cy - src_size / 2) if args.y is None else args.y
        else:
            x, y = args.x, args.y
        # the archived pixel under (x, y), kept inside the archived image
        ax = min(max(0, round((x - bx) / scale)), arc.dimensions[0] - size)
        ay = min(max(0, round((y - by) / scale)), arc.dimensions[1] - size)
        x, y = round(bx + ax * scale), round(by + ay * scale)  # snapped back to the grid
        print(f"scale: {scale:.4f} source px per archived px ({how})")
        print(f"source   region: ({x}, {y}) {src_size} x {src_size} at level 0 of {args.source.name}")
        print(f"restored region: ({ax}, {ay}) {size} x {size} at level 0 of {args.container.name}")

        original = on_white(src.read_region((x, y), 0, (src_size, src_size)))
        if src_size != size:  # box average down to the archived resolution, exactly over the region
            original = original.resize((size, size), Image.BOX, box=(0, 0, size * scale, size * scale))
        restored = on_white(arc.read_region((ax, ay), 0, (size, size)))

    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(restored, dtype=np.float64)
    diff = np.abs(a - b)
    mse = float((diff ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
    error = Image.fromarray(np.clip(diff * args.gain, 0, 255).astype(np.uint8))

    panel = Image.new("RGB", (3 * size, size), (255, 255, 255))
    for i, img in enumerate((original, restored, error)):
        panel.paste(img, (i * size, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    panel.save(args.out)
    print(f"PSNR {psnr:.2f} dB, mean abs error {diff.mean():.2f}, max abs error {diff.max():.0f} (0-255)")
    print(f"wrote {args.out} ({panel.width} x {panel.height}: source | restored | error x{args.gain:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
