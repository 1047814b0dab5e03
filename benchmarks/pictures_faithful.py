"""Pictures to judge a restore by eye: the source and the restore side by side, at overview zoom and at
full resolution where tissue meets glass.

    python benchmarks/pictures_faithful.py [--slide S] [--model M] --out DIR

Without ``--slide`` it draws a synthetic slide (tissue islands, a green pen stroke) so the pictures can be
published. Writes DIR/overview.png (source | restored, whole slide at about 1000 px) and DIR/detail.png
(source | restored | |error| x 4 over 768 x 768 px at full resolution around the first tissue tile that
borders glass). Uses only the public API, so the same script runs against older versions for "before".
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import openslide

    import wsicodec
    from wsicodec.format.container import Container

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        slide = args.slide
        if slide is None:
            from wsicodec.testing.synthetic import write_synthetic_slide

            slide = write_synthetic_slide(Path(tmp) / "synthetic.svs", 3072, 2304, mpp=0.5, objective_power=20,
                                          seed=3, pen="green")
        out = Path(tmp) / "c.pzarr"
        wsicodec.compress(slide, out, model=args.model)
        c = Container.open(out)
        tissue, t = np.asarray(c.tissue, bool), c.grid.tile_size
        restored = wsicodec.open(out)
        with openslide.OpenSlide(str(slide)) as src:
            if abs(src.dimensions[0] - restored.dimensions[0]) > 2:
                raise SystemExit("the slide was resampled; pass a slide archived 1:1 for these pictures")
            side = 1000 / max(restored.dimensions)
            size = (round(restored.dimensions[0] * side), round(restored.dimensions[1] * side))
            a = src.get_thumbnail(size).convert("RGB").resize(size)
            b = restored.get_thumbnail(size).convert("RGB").resize(size)
            pair = Image.new("RGB", (2 * size[0] + 8, size[1]), "black")
            pair.paste(a, (0, 0))
            pair.paste(b, (size[0] + 8, 0))
            pair.save(args.out / "overview.png")
            # a tissue tile with glass to its right or below: where steps and dropped fragments show
            edge = [(r, col) for r, col in zip(*np.nonzero(tissue))
                    if (col + 1 < tissue.shape[1] and not tissue[r, col + 1])
                    or (r + 1 < tissue.shape[0] and not tissue[r + 1, col])]
            r, col = edge[len(edge) // 2] if edge else (0, 0)
            x, y = max(0, col * t - t), max(0, r * t - t)
            w = min(3 * t, restored.dimensions[0] - x)
            h = min(3 * t, restored.dimensions[1] - y)
            sa = np.asarray(src.read_region((x, y), 0, (w, h)).convert("RGB"))
            sb = np.asarray(restored.read_region((x, y), 0, (w, h)).convert("RGB"))
            err = np.clip(np.abs(sa.astype(np.int16) - sb).astype(np.float32) * 4, 0, 255).astype(np.uint8)
            Image.fromarray(np.concatenate([sa, sb, err], axis=1)).save(args.out / "detail.png")
    print(f"wrote {args.out / 'overview.png'} and {args.out / 'detail.png'}")


if __name__ == "__main__":
    main()
