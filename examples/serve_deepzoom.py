"""Serve a .pzarr container as DeepZoom tiles, the way a slide viewer's tile server would.

    python examples/serve_deepzoom.py CONTAINER [--out DIR] [--tile-size 254] [--overlap 1]

``wsicodec.open`` returns an ``openslide.AbstractSlide``, so OpenSlide's own ``DeepZoomGenerator``
serves it unchanged, decoding only the tiles a request touches.  This prints the DeepZoom pyramid
(levels, dimensions, tile counts) and writes a few tiles as JPEGs, as a web server would answer
``GET /<name>_files/<level>/<col>_<row>.jpeg``: the centre tile of the deepest level, the centre
tile of a middle level and the largest level that fits in one tile (an overview), plus the .dzi
descriptor.  Default --out: ./<container name>_deepzoom.  No web server is started.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from openslide.deepzoom import DeepZoomGenerator

import wsicodec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("container", type=Path, help="a .pzarr written by `wsicodec compress`")
    ap.add_argument("--out", type=Path, default=None, help="folder for the tiles (default: ./<name>_deepzoom)")
    ap.add_argument("--tile-size", type=int, default=254, help="DeepZoom tile size (default 254, OpenSlide's)")
    ap.add_argument("--overlap", type=int, default=1, help="pixels each tile overlaps its neighbours (default 1)")
    ap.add_argument("--quality", type=int, default=80, help="JPEG quality of the written tiles (default 80)")
    args = ap.parse_args(argv)

    name = args.container.name.removesuffix(".zip").removesuffix(".pzarr")
    out = args.out or Path(f"{name}_deepzoom")
    try:
        slide = wsicodec.open(args.container)
    except wsicodec.WsicodecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with slide:
        props = slide.properties
        print(f"{args.container}: {slide.dimensions[0]} x {slide.dimensions[1]} px at "
              f"{props.get('openslide.mpp-x', '?')} µm/px, {slide.level_count} slide level(s), "
              f"model {props.get('wsicodec.model', '?')}")
        dz = DeepZoomGenerator(slide, tile_size=args.tile_size, overlap=args.overlap, limit_bounds=True)
        print(f"DeepZoom: {dz.level_count} levels, {dz.tile_count} tiles of {args.tile_size} px "
              f"(overlap {args.overlap})")
        for level, ((w, h), (cols, rows)) in enumerate(zip(dz.level_dimensions, dz.level_tiles)):
            print(f"  level {level:>2}: {w:>7} x {h:<7} {cols:>4} x {rows:<4} tiles")

        deepest = dz.level_count - 1
        overview = max(lv for lv, (c, r) in enumerate(dz.level_tiles) if c == 1 and r == 1)
        middle = (overview + deepest) // 2
        wanted = []
        for level in (deepest, middle, overview):
            w, h = dz.level_dimensions[level]
            col, row = (w // 2) // args.tile_size, (h // 2) // args.tile_size  # the tile holding the centre
            if (level, col, row) not in wanted:
                wanted.append((level, col, row))

        tiles_dir = out / f"{name}_files"
        (out / f"{name}.dzi").parent.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.dzi").write_text(dz.get_dzi("jpeg"))
        print(f"wrote {out / f'{name}.dzi'}")
        for level, col, row in wanted:
            t = time.perf_counter()
            tile = dz.get_tile(level, (col, row))  # RGB, composited on the slide's background colour
            ms = 1000 * (time.perf_counter() - t)
            path = tiles_dir / str(level) / f"{col}_{row}.jpeg"
            path.parent.mkdir(parents=True, exist_ok=True)
            tile.save(path, quality=args.quality)
            print(f"wrote {path}  ({tile.width} x {tile.height}, level {level}, {ms:.0f} ms to decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
