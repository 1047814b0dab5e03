"""Is the restored slide a faithful copy? Tissue kept, glass restored, tiles invisible, pixel size exact.

    python benchmarks/bench_faithful.py [--slides CMU-1-Small-Region.svs ...] [--models default taef2]
                                        [--margins 0 32] [--halos 3] [--source-mpp 0.5]

For each slide, model, encoder context margin (archived px) and decoder halo (latent cells) it compresses
with the public API, reads level 0 back through ``wsicodec.open(...).read_region`` and compares it with
the source read at the archived resolution. Printed per row:

- tissue lost: tissue-like source pixels (max-min over RGB > 25 or mean < 200) in background tiles, as a
  fraction of all tissue-like pixels, and the worst background tile's tissue-like fraction;
- glass MAE: mean |restored - source| over background tiles whose source is flat glass;
- edge/int: mean error in the outer 2 px of tissue tiles over the same >= 8 px inside;
- seam: the error-image seam ratio (tile borders vs interior 8-px grid lines);
- PSNR over tissue tiles, tiles stored, container bytes, encode seconds (relative to margin 0, same run);
- mpp: what the restored slide reports, against the source pixels' own size;
- glass step: the largest (and mean) jump of the glass colour across tissue/background tile borders, in
  grey levels, at 1:1 and at overview zoom (both sides averaged 16x16);
- with ``--whole``: edge/int, seam and PSNR of coding the whole image in one piece, the floor of tiling.

Slides without a recorded resolution take ``--source-mpp`` (tcga-cr-7395 records none).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("WSICODEC_SHARED", HERE.parent.parent / "shared"))
SLIDES = SHARED / "data" / "slides"


def measure(slide_path: Path, model, margin: int | None, halo: int | None, source_mpp: float | None,
            tmp: Path, blend: int | None = None) -> dict:
    import inspect

    import wsicodec
    from wsicodec.format.container import Container
    from wsicodec.quality import clear_glass, edge_interior_ratio, error_seam_ratio, glass_step, psnr, tissue_loss
    from wsicodec.source.slide import SourceSlide
    from wsicodec.source.tissue import tissue_like

    out = tmp / f"{slide_path.stem}-{abs(hash(str(model.info.model_id)))}-{margin}-{halo}-{blend}.pzarr"
    kwargs = {}
    if margin is not None and "encode_margin" in inspect.signature(wsicodec.compress).parameters:
        kwargs["encode_margin"] = margin
    t0 = time.perf_counter()
    res = wsicodec.compress(slide_path, out, model=model, source_mpp=source_mpp, **kwargs)
    seconds = time.perf_counter() - t0
    c = Container.open(out)
    grid, tissue = c.grid, np.asarray(c.tissue, bool)
    t = grid.tile_size
    with SourceSlide(slide_path, source_mpp=source_mpp) as src:
        source = src._read_area(grid.level, (grid.origin_x, grid.origin_y), grid.scale,
                                (0, 0, grid.width, grid.height))
    opened = wsicodec.open(out, **({"halo": halo} if halo is not None else {}),
                           **({"blend": blend} if blend is not None else {}))
    restored = np.asarray(opened.read_region((0, 0), 0, (grid.width, grid.height)))[..., :3]
    loss = tissue_loss(source, tissue, t)
    # flat-glass background tiles: not a single tissue-like source pixel
    like = tissue_like(source)
    glass_err = []
    for r, col in zip(*np.nonzero(~tissue)):
        sl = np.s_[r * t:(r + 1) * t, col * t:(col + 1) * t]
        if like[sl].size and not like[sl].any():
            glass_err.append(np.abs(restored[sl].astype(np.float32) - source[sl]).mean())
    keep = np.repeat(np.repeat(tissue, t, 0), t, 1)[:grid.height, :grid.width]
    whole = _whole_image(model, c.quantizer, source, t, tissue, keep) if WHOLE else {}
    clear = clear_glass(source, 8)  # glass at least 8 px from anything tissue-like
    step = glass_step(restored, clear, t, tissue)
    # overview zoom: both images averaged 16x16, the step measured on tiles of t/16 px
    k = 16
    hh, ww = (grid.height // k) * k, (grid.width // k) * k
    small = restored[:hh, :ww].reshape(hh // k, k, ww // k, k, 3).mean(axis=(1, 3))
    small_glass = clear[:hh, :ww].reshape(hh // k, k, ww // k, k).all(axis=(1, 3))
    step16 = glass_step(small, small_glass, t // k, tissue, band=2, min_pixels=4)
    return {
        **whole,
        "step": step["max"], "step_mean": step["mean"], "step16": step16["max"],
        "lost": loss["lost_fraction"], "worst": loss["worst_tile"],
        "glass_mae": float(np.mean(glass_err)) if glass_err else float("nan"),
        "edge": edge_interior_ratio(restored, source, t, tissue),
        "seam": error_seam_ratio(restored, source, t, tissue),
        "psnr": psnr(restored[keep], source[keep]),
        "tiles": int(tissue.sum()), "total": tissue.size, "bytes": res.container_bytes, "seconds": seconds,
        "mpp": float(opened.properties["openslide.mpp-x"]),
        "halo": opened._decoder.halo, "blend": opened._decoder.blend,
        "margin": (c.attrs.get("encoding") or {}).get("margin_px", 0), "true_mpp": grid.source_mpp * grid.scale,
    }


WHOLE = False  # --whole: also code the whole image in one piece with the same model and codebook


def _whole_image(model, quantizer, source: np.ndarray, t: int, tissue: np.ndarray, keep: np.ndarray) -> dict:
    """Edge/interior, seam and PSNR of coding the whole image at once (no tiles): the floor tiling can reach."""
    from wsicodec.quality import edge_interior_ratio, error_seam_ratio, psnr

    f = int(model.info.spatial_factor)
    h, w = source.shape[:2]
    padded = np.pad(source, ((0, -h % f), (0, -w % f), (0, 0)), mode="edge")
    z = model.encode(padded[None])
    decoded = model.decode(quantizer.dequantize(quantizer.quantize(z)))[0][:h, :w]
    return {"whole_edge": edge_interior_ratio(decoded, source, t, tissue),
            "whole_seam": error_seam_ratio(decoded, source, t, tissue),
            "whole_psnr": psnr(decoded[keep], source[keep])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=Path, nargs="+",
                    default=[SLIDES / "CMU-1-Small-Region.svs", SLIDES / "tcga-cr-7395-01a-01-ts1.svs"])
    ap.add_argument("--models", nargs="+", default=["default", str(SHARED / "weights" / "taef2")])
    ap.add_argument("--margins", type=int, nargs="+", default=[None], help="default: the model's")
    ap.add_argument("--halos", type=int, nargs="+", default=[None], help="default: the container's")
    ap.add_argument("--blends", type=int, nargs="+", default=[None], help="default: the container's")
    ap.add_argument("--source-mpp", type=float, default=0.5, help="for slides that record no resolution")
    ap.add_argument("--whole", action="store_true", help="also code each slide whole, in one piece (the floor)")
    args = ap.parse_args()
    global WHOLE
    WHOLE = args.whole

    from wsicodec.errors import SlideError
    from wsicodec.models import load_model
    from wsicodec.source.slide import SourceSlide

    for s in args.slides:
        if not s.is_file():
            sys.exit(f"slide not found: {s} (set WSICODEC_SHARED or pass --slides)")
    print(f"{'slide':<12} {'model':<8} {'margin':>6} {'halo':>4} {'blend':>5} {'lost %':>7} {'worst %':>7} "
          f"{'glass':>6} {'edge/int':>8} {'seam':>6} {'PSNR':>6} {'tiles':>7} {'KB':>7} {'enc s':>6} {'mpp':>7} "
          f"{'true':>7} {'step 1:1':>8} {'mean':>5} {'step/16':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for slide in args.slides:
            try:
                SourceSlide(slide).close()
                smpp = None
            except SlideError:
                smpp = args.source_mpp
            for name in args.models:
                model = load_model(None if name == "default" else name)
                label = "default" if name == "default" else Path(name).name
                base = None
                for margin in args.margins:
                    for halo in args.halos:
                        for blend in args.blends:
                            m = measure(slide, model, margin, halo, smpp, Path(tmp), blend)
                            base = base or m["seconds"]
                            print(f"{slide.stem[:12]:<12} {label[:8]:<8} {m['margin']!s:>6} {m['halo']!s:>4} "
                                  f"{m['blend']!s:>5} {100 * m['lost']:>7.3f} {100 * m['worst']:>7.2f} "
                                  f"{m['glass_mae']:>6.2f} {m['edge']:>8.3f} {m['seam']:>6.3f} {m['psnr']:>6.2f} "
                                  f"{m['tiles']:>3}/{m['total']:<3} {m['bytes'] / 1e3:>7.0f} "
                                  f"{m['seconds'] / base:>5.2f}x {m['mpp']:>7.4f} {m['true_mpp']:>7.4f} "
                                  f"{m['step']:>8.2f} {m['step_mean']:>5.2f} {m['step16']:>7.2f}", flush=True)
                            if "whole_edge" in m:
                                print(f"{'':<12} {'  whole image, same codebook':<38} {m['whole_edge']:>8.3f} "
                                      f"{m['whole_seam']:>6.3f} {m['whole_psnr']:>6.2f}", flush=True)

if __name__ == "__main__":
    main()
