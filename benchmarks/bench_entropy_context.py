"""Would a spatial context model pay? Bytes per tile of a rate-distortion model's stored indices, four ways.

    .venv/bin/python benchmarks/bench_entropy_context.py [--model ID_OR_DIR] [--quality default]
        [--tiles DIR_OR_NPY] [--images-mpp 0.25] [--max-tiles 64]

On the same tiles, in one run: zstd chunks (what a container stores), the model's own per-channel tables
(what an arithmetic coder with the model's probabilities pays), the empirical order-0 entropy per channel
(a table fitted to these tiles), and the empirical entropy conditioned on the neighbours already coded
(left, and left + above, each bucketed to -2..2), which bounds what a causal spatial context model could
save. Each figure is also printed as a ratio to zstd. Tables are not counted (they are a few hundred bytes
per slide); conditional entropies fitted on the very tiles they measure are optimistic, more so with
few tiles.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _entropy_bits(sym: np.ndarray, ctx: np.ndarray | None) -> float:
    """Total bits of ``sym`` under its empirical distribution, per context value when given."""
    if ctx is None:
        counts = np.bincount(sym, minlength=256).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(counts[counts > 0] * np.log2(p)).sum())
    joint = np.bincount(ctx * 256 + sym).astype(np.float64)
    total = 0.0
    for c in np.unique(ctx):
        row = joint[c * 256:(c + 1) * 256]
        row = row[row > 0]
        total += float(-(row * np.log2(row / row.sum())).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--quality", default=None)
    shared = Path(os.environ.get("WSICODEC_SHARED", REPO.parent / "shared"))
    ap.add_argument("--tiles", default=str(shared / "data" / "tiles" / "monuseg_40x"))
    ap.add_argument("--images-mpp", type=float, default=0.25)
    ap.add_argument("--max-tiles", type=int, default=64)
    a = ap.parse_args()

    from wsicodec.models import load_model
    from wsicodec.research.data import load_tiles
    from wsicodec.research.evaluate import byte_report, encode_tiles

    model = load_model(a.model, "cpu")
    if not callable(getattr(model, "operating_points", None)) or not model.operating_points():
        raise SystemExit(f"{model.info.model_id} is not rate-distortion trained (no operating points)")
    tiles = (np.load(a.tiles) if a.tiles.endswith(".npy")
             else load_tiles([a.tiles], images_mpp=a.images_mpp, max_tiles=a.max_tiles))
    q = model.operating_point_quantizer(a.quality)
    stored = q.quantize(encode_tiles(model, tiles, 16))
    by = byte_report(stored, model, q.quality)
    n, c = stored.shape[:2]
    s = stored.astype(np.int64) - 128
    left = np.clip(np.pad(s, ((0, 0), (0, 0), (0, 0), (1, 0)))[..., :-1], -2, 2) + 2
    up = np.clip(np.pad(s, ((0, 0), (0, 0), (1, 0), (0, 0)))[..., :-1, :], -2, 2) + 2
    bits_left = sum(_entropy_bits(stored[:, ch].ravel(), left[:, ch].ravel()) for ch in range(c))
    bits_lu = sum(_entropy_bits(stored[:, ch].ravel(), (left[:, ch] * 5 + up[:, ch]).ravel()) for ch in range(c))
    rows = [("zstd chunks (stored today)", by["zstd"]), ("model's own tables", by["model"]),
            ("order-0 per channel, fitted", by["order0"]), ("context: left neighbour", bits_left / 8 / n),
            ("context: left + above", bits_lu / 8 / n)]
    print(f"{model.info.model_id}, quality {q.quality}, {n} tiles of {tiles.shape[1]} px, {c} channels")
    for label, b in rows:
        print(f"  {label:30s} {b:8.0f} B/tile   {b / by['zstd']:.3f}x zstd")


if __name__ == "__main__":
    main()
