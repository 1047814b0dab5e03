"""Fidelity against JPEG, the paper's way (Table 1 and a rate-distortion figure).

    tiles = load_eval_tiles(inputs, images_mpp=..., max_tiles=...)
    report = evaluate(tiles, models=[...], quants=["none", "int8", "kmeans"], jpeg=[75, 50, 20, 10],
                      embedders=["uni", "lpips-vgg"], device=None, batch_size=16)
    report.rich_table(); report.to_csv(path); report.to_json(); report.to_markdown(); report.plot(path)

Each codec compresses the same tissue tiles and is scored on what it costs as stored and how close
its reconstruction is:

* JPEG (Pillow, default settings: 4:2:0 chroma, no ``optimize``): bytes = the JPEG file's bytes.
* each model x quantiser: the quantiser is fitted on the evaluated tiles' latents (as compress fits
  it on a slide's latents); bytes = :func:`wsicodec.format.container.stored_tile_bytes` of the stored tile,
  the bytes a container (and ``stats``) spend on it, lossless chunk compression included.

Metrics are averaged over tiles; see :mod:`wsicodec.research.metrics` for their definitions.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from wsicodec.research import metrics as M
from wsicodec._io import atomic_output
from wsicodec.errors import WsicodecError

DEFAULT_JPEG = (75, 50, 20, 10)
DEFAULT_QUANTS = ("default", "none", "int8", "kmeans")  # default: what compress uses
DEFAULT_EMBEDDERS = ("uni", "lpips-vgg")
SSIM_CHANNELS = "rgb"


# ---------------------------------------------------------------- parsing helpers
def parse_jpeg_qualities(text: str | Iterable[int] | None) -> list[int]:
    if text is None:
        return list(DEFAULT_JPEG)
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if item == "" or item is None:
            continue
        if isinstance(item, bool):
            raise WsicodecError(f"JPEG quality must be an integer, not {item!r}")
        try:
            q = int(item)
        except ValueError:
            raise WsicodecError(f"--jpeg takes comma-separated qualities 1-95, not {item!r}") from None
        if not 1 <= q <= 100:
            raise WsicodecError(f"JPEG quality {q} is outside 1-100")
        out.append(q)
    return out


def parse_quants(text: str | Iterable[str] | None) -> list[tuple[str, int | None]]:
    """"none,int8,kmeans,uniform:64" -> [(kind, levels or None), ...]."""
    from wsicodec.quant.quantizer import KINDS, MAX_LEVELS, QUANT_KINDS

    if text is None:
        text = ",".join(DEFAULT_QUANTS)
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    out: list[tuple[str, int | None]] = []
    for item in items:
        if isinstance(item, tuple):  # already parsed
            item = quant_label(*item)
        if not item:
            continue
        kind, _, lv = item.partition(":")
        kind = kind.strip().lower()
        if kind == "default" and not lv:  # the quantiser compress would use with this model
            out.append((kind, None))
            continue
        if kind not in KINDS:
            raise WsicodecError(f"unknown quantiser {kind!r}: choose from {', '.join(KINDS)} (levels as kmeans:128)")
        levels = None
        if lv:
            try:
                levels = int(lv)
            except ValueError:
                raise WsicodecError(f"quantiser levels must be an integer, not {lv!r}") from None
            if not QUANT_KINDS[kind].takes_levels:
                raise WsicodecError(f"--quant {kind} takes no level count")
            if not 2 <= levels <= MAX_LEVELS:
                raise WsicodecError(f"quantiser levels must be 2-{MAX_LEVELS}, not {levels}")
        out.append((kind, levels))
    return out


def quant_label(kind: str, levels: int | None) -> str:
    """The inverse of :func:`parse_quants` for one item: 'kmeans:128', 'int8'."""
    return f"{kind}:{levels}" if levels else kind


# ---------------------------------------------------------------- codecs
def jpeg_roundtrip(tiles: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """Each tile through a Pillow JPEG file: (decoded uint8 tiles, file bytes per tile)."""
    from PIL import Image

    out = np.empty_like(tiles)
    sizes = np.empty(len(tiles), dtype=np.int64)
    for i, tile in enumerate(tiles):
        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, format="JPEG", quality=int(quality))
        sizes[i] = buf.tell()
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out, sizes


# Image codecs a storage team would pick instead, each coding every tile alone (imagecodecs builds of
# libavif, libjxl and libwebp). ``level`` is each library's quality knob, 0-100, more is larger.
BASELINES: dict[str, dict[str, Any]] = {
    "avif": {"label": "AVIF", "encode": lambda t, q: __import__("imagecodecs").avif_encode(t, level=q, speed=4),
             "decode": lambda b: __import__("imagecodecs").avif_decode(b)},
    "jpegxl": {"label": "JPEG-XL", "encode": lambda t, q: __import__("imagecodecs").jpegxl_encode(t, level=q),
               "decode": lambda b: __import__("imagecodecs").jpegxl_decode(b)},
    "webp": {"label": "WebP", "encode": lambda t, q: __import__("imagecodecs").webp_encode(t, level=q, lossless=False),
             "decode": lambda b: __import__("imagecodecs").webp_decode(b)},
}
DEFAULT_BASELINES = ("avif", "jpegxl", "webp")


def parse_baselines(text: str | Iterable[str] | None) -> list[str]:
    if text is None:
        return list(DEFAULT_BASELINES)
    items = [s.strip().lower() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [i for i in items if i]
    bad = [i for i in items if i not in BASELINES]
    if bad:
        raise WsicodecError(f"unknown baseline codec {bad[0]!r}; choose from {', '.join(BASELINES)}")
    return items


def baseline_roundtrip(name: str, tiles: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Each tile through one baseline codec at one quality level: (decoded uint8 tiles, bytes per tile).
    Tiles are coded on a few threads (the codecs release the GIL), each alone."""
    from concurrent.futures import ThreadPoolExecutor

    codec = BASELINES[name]

    def one(tile: np.ndarray) -> tuple[np.ndarray, int]:
        data = codec["encode"](np.ascontiguousarray(tile), int(level))
        return np.asarray(codec["decode"](data))[..., :3], len(data)

    out = np.empty_like(tiles)
    sizes = np.empty(len(tiles), dtype=np.int64)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for i, (img, n) in enumerate(pool.map(one, tiles)):
            out[i], sizes[i] = img, n
    return out, sizes


def baseline_at_bytes(name: str, tiles: np.ndarray, target_bytes: float,
                      cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """The highest quality level whose mean bytes per tile stay within ``target_bytes`` (one setting for
    all tiles, as a user would choose it): (level, decoded tiles, bytes per tile). Falls back to the
    lowest level when even that costs more (the row then shows the larger size). ``cache`` (level ->
    result) may be shared between calls for the same codec and tiles, so several targets cost less."""
    cache = {} if cache is None else cache

    def run(level: int):
        if level not in cache:
            cache[level] = baseline_roundtrip(name, tiles, level)
        return cache[level]

    lo, hi = 0, 100
    if run(lo)[1].mean() > target_bytes:
        return lo, *run(lo)
    while hi - lo > 1:  # bytes grow with the level: bisect on the largest level within budget
        mid = (lo + hi) // 2
        if run(mid)[1].mean() <= target_bytes:
            lo = mid
        else:
            hi = mid
    if run(hi)[1].mean() <= target_bytes:
        lo = hi
    return lo, *run(lo)


def encode_tiles(model, tiles: np.ndarray, batch_size: int) -> torch.Tensor:
    return torch.cat([model.encode(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)])


def decode_latents(model, latents: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate([model.decode(latents[i : i + batch_size]) for i in range(0, len(latents), batch_size)])


def byte_report(stored: np.ndarray, model=None, quality: str | None = None) -> dict[str, float]:
    """Mean bytes per tile of stored uint8 indices (N,C,h,w), three ways: as zstd chunks (what the
    container stores today), at their order-0 entropy (one histogram per channel, measured on these
    tiles, table not counted), and under the model's own entropy model (what an arithmetic coder with
    the model's probabilities pays, within a few bytes), where the model has one."""
    from wsicodec.format import stored_tile_bytes

    n, c = stored.shape[:2]
    out = {"zstd": float(np.mean([stored_tile_bytes(stored[i]) for i in range(n)]))}
    bits0 = 0.0
    for ch in range(c):
        counts = np.bincount(stored[:, ch].reshape(-1), minlength=256).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        bits0 += float(-(counts[counts > 0] * np.log2(p)).sum())
    out["order0"] = bits0 / 8 / n
    rate = getattr(getattr(model, "net", None), "rate", None)
    if rate is not None and quality is not None:
        probs = rate.symbol_probs(quality).numpy()  # (C, 256)
        idx = stored.astype(np.int64).transpose(1, 0, 2, 3).reshape(c, -1)
        bits = -np.log2(np.take_along_axis(probs, idx, axis=1).clip(1e-300)).sum()
        out["model"] = float(bits) / 8 / n
    return out


def model_roundtrip(model, latents: torch.Tensor, kind: str, levels: int | None, batch_size: int):
    """Quantise as a container would: (reconstructed uint8 tiles, stored bytes per tile, quantiser).
    ``kind`` "default" is the quantiser compress uses with this model unless told otherwise."""
    from wsicodec.format import stored_tile_bytes
    from wsicodec.quant.quantizer import make_quantizer

    if kind == "default":
        from wsicodec.pipeline.compress import choose_quantizer

        q = choose_quantizer(model, None, None)
    else:
        kwargs: dict[str, Any] = {"model_info": model.info}
        if levels:
            kwargs["levels"] = levels
        q = make_quantizer(kind, **kwargs)
    q.fit(latents)
    stored = q.quantize(latents)
    sizes = np.array([stored_tile_bytes(stored[i]) for i in range(len(stored))], dtype=np.int64)
    recon = decode_latents(model, q.dequantize(stored), batch_size)
    return recon, sizes, q


# ---------------------------------------------------------------- the report
@dataclass
class CodecRow:
    family: str  # "JPEG" or the model id: one rate-distortion curve each
    setting: str  # "q75", "kmeans", "uniform:64"
    bytes_per_tile: float
    psnr: float
    ssim: float
    lpips: float
    embedding: dict[str, float] = field(default_factory=dict)  # embedder name -> mean cosine sim.
    bytes_by: dict[str, float] = field(default_factory=dict)  # model rows: zstd / order0 / model coding

    @property
    def codec(self) -> str:
        return f"{self.family} {self.setting}"

    @property
    def kb_per_tile(self) -> float:
        return self.bytes_per_tile / 1000.0


@dataclass
class EvalReport:
    rows: list[CodecRow]
    n_tiles: int
    tile_size: int
    embedders: list[dict[str, Any]]  # {"name", "label", "standin"}
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- columns shared by every output
    def columns(self) -> list[tuple[str, str]]:
        cols = [("codec", "Codec"), ("kb_per_tile", "KB/tile"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
                ("lpips", "LPIPS-Alex")]
        for e in self.embedders:
            cols.append((f"emb_{e['name']}", f"{e['label']} sim."))
        return cols

    def _value(self, row: CodecRow, key: str):
        if key == "codec":
            return row.codec
        if key.startswith("emb_"):
            return row.embedding.get(key[4:], math.nan)
        return getattr(row, key)

    @staticmethod
    def _fmt(key: str, v) -> str:
        if isinstance(v, str):
            return v
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if key == "kb_per_tile":
            return f"{v:.2f}"
        if key == "psnr":
            return f"{v:.2f}"
        return f"{v:.4f}"

    def table_rows(self) -> list[list[str]]:
        return [[self._fmt(k, self._value(r, k)) for k, _ in self.columns()] for r in self.rows]

    def caption(self) -> str:
        text = (f"{self.n_tiles} tiles of {self.tile_size} px; KB = 1000 bytes as stored; "
                f"SSIM on {SSIM_CHANNELS.upper()} (Gaussian 11x11, sigma 1.5)")
        standins = [e["label"] for e in self.embedders if e["standin"]]
        if standins:
            text += ("; † stand-in embedding (" + ", ".join(standins) + "): globally pooled features of the LPIPS "
                     "backbone, not a pathology foundation model")
        return text

    def rich_table(self):
        from rich.table import Table

        table = Table(title="Fidelity per codec (rows) — shaped like the paper's Table 1", caption=self.caption())
        for key, head in self.columns():
            table.add_column(head, justify="left" if key == "codec" else "right")
        for cells in self.table_rows():
            table.add_row(*cells)
        return table

    def to_markdown(self) -> str:
        heads = [h for _, h in self.columns()]
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in self.table_rows()]
        lines += ["", self.caption() + "."]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        emb = [e["name"] for e in self.embedders]
        w.writerow(["family", "setting", "bytes_per_tile", "kb_per_tile", "psnr_db", "ssim", "lpips_alex"]
                   + [f"embedding_sim_{n}" + ("_standin" if e["standin"] else "") for n, e in zip(emb, self.embedders)])
        for r in self.rows:
            w.writerow([r.family, r.setting, f"{r.bytes_per_tile:.1f}", f"{r.kb_per_tile:.4f}", f"{r.psnr:.4f}",
                        f"{r.ssim:.6f}", f"{r.lpips:.6f}"]
                       + [f"{r.embedding[n]:.6f}" if n in r.embedding else "" for n in emb])
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        return {
            "n_tiles": self.n_tiles,
            "tile_size": self.tile_size,
            "metrics": {
                "bytes_per_tile": "mean bytes of one stored tile (JPEG file; container chunk incl. lossless codec)",
                "psnr": f"dB over RGB, peak 255, per tile then averaged (capped at {M.PSNR_CAP_DB:g})",
                "ssim": f"Wang et al. 2004, Gaussian 11x11 sigma 1.5, on {SSIM_CHANNELS}",
                "lpips": "LPIPS v0.1 AlexNet",
                "embedding": "cosine similarity of original and reconstruction embeddings",
            },
            "embedders": self.embedders,
            "notes": self.notes,
            "meta": self.meta,
            "rows": [
                {"codec": r.codec, "family": r.family, "setting": r.setting, "bytes_per_tile": r.bytes_per_tile,
                 "kb_per_tile": r.kb_per_tile, "psnr": r.psnr, "ssim": r.ssim, "lpips": r.lpips,
                 "embedding": r.embedding, "bytes_by": r.bytes_by}
                for r in self.rows
            ],
        }

    def curves(self, key: str) -> dict[str, list[tuple[float, float, str]]]:
        """{family: [(KB/tile, metric, setting), ...] ordered by bytes}: one rate-distortion curve each."""
        out: dict[str, list[tuple[float, float, str]]] = {}
        for fam in dict.fromkeys(r.family for r in self.rows):
            pts = sorted((r.kb_per_tile, float(self._value(r, key)), r.setting) for r in self.rows if r.family == fam)
            pts = [p for p in pts if not math.isnan(p[1])]
            if pts:
                out[fam] = pts
        return out

    def plot(self, path: str | Path) -> None:
        """Rate-distortion: KB/tile against each metric, one curve per codec family."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        panels = [("psnr", "PSNR (dB) ↑"), ("ssim", "SSIM ↑"), ("lpips", "LPIPS-Alex ↓")]
        panels += [(f"emb_{e['name']}", f"{e['label']} cos. sim. ↑") for e in self.embedders]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            for fam, pts in self.curves(key).items():
                xs, ys, labels = zip(*pts)
                ax.plot(xs, ys, marker="o" if fam == "JPEG" else "s", label=fam)
                for j, (x, y, lab) in enumerate(zip(xs, ys, labels)):  # alternate sides: close points stay legible
                    ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3 if j % 2 == 0 else -9), textcoords="offset points")
            ax.set_xlabel("KB per 256 px tile (as stored)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Rate-distortion on {self.n_tiles} tiles", fontsize=11)
        fig.tight_layout()
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
        plt.close(fig)


def _atomic_write(path: str | Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write to a temporary name beside ``path`` and rename, so no half-written file looks finished."""
    path = Path(path)
    if path.is_dir():
        raise WsicodecError(f"output path is a folder: {path}")
    if not path.parent.exists():
        raise WsicodecError(f"output folder does not exist: {path.parent}")
    with atomic_output(path) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)


def write_report(report: EvalReport, csv_path=None, json_path=None, markdown_path=None, plot_path=None) -> None:
    if csv_path:
        _atomic_write(csv_path, lambda f: f.write(report.to_csv()))
    if json_path:
        _atomic_write(json_path, lambda f: json.dump(report.to_json(), f, indent=2))
    if markdown_path:
        _atomic_write(markdown_path, lambda f: f.write(report.to_markdown()))
    if plot_path:
        report.plot(plot_path)


# ---------------------------------------------------------------- the evaluation
def load_eval_tiles(inputs, *, tile_size=256, target_mpp=0.5, images_mpp=None, slide_mpp=None, max_tiles=None,
                    seed=0) -> np.ndarray:
    from wsicodec.research.data import load_tiles

    tiles = load_tiles(inputs, tile_size=tile_size, target_mpp=target_mpp, images_mpp=images_mpp,
                       slide_mpp=slide_mpp, max_tiles=max_tiles, seed=seed)
    if len(tiles) == 0:
        raise WsicodecError("no tissue tiles found in the inputs")
    return tiles


class _Scorer:
    """Scores reconstructions against the fixed originals (original embeddings computed once)."""

    def __init__(self, originals: np.ndarray, embedders: list, device: torch.device, batch_size: int,
                 with_lpips: bool = True):
        self.with_lpips = with_lpips
        self.orig = originals
        self.embedders = embedders
        self.device = device
        self.bs = batch_size
        self.orig_emb = {e.name: self._embed(e, originals) for e in embedders}

    def _chunks(self, tiles: np.ndarray):
        for i in range(0, len(tiles), self.bs):
            yield M.to_float(tiles[i : i + self.bs], self.device)

    def _embed(self, embedder, tiles: np.ndarray) -> torch.Tensor:
        return torch.cat([embedder.embed_batched(x, self.bs) for x in self._chunks(tiles)])

    def score(self, family: str, setting: str, recon: np.ndarray, sizes: np.ndarray) -> CodecRow:
        ps, ss, lp = [], [], []
        for i in range(0, len(recon), self.bs):
            a = M.to_float(self.orig[i : i + self.bs], self.device)
            b = M.to_float(recon[i : i + self.bs], self.device)
            ps.append(M.psnr(a, b))
            ss.append(M.ssim(a, b, channels=SSIM_CHANNELS))
            if self.with_lpips:
                lp.append(M.lpips(a, b, net="alex", batch_size=self.bs))
        emb = {e.name: float(M.cosine_similarity(self.orig_emb[e.name], self._embed(e, recon)).double().mean())
               for e in self.embedders}
        return CodecRow(family, setting, float(sizes.mean()), M.mean_finite(torch.cat(ps)),
                        M.mean_finite(torch.cat(ss)), M.mean_finite(torch.cat(lp)) if lp else math.nan, emb)


def evaluate(
    tiles: np.ndarray,
    *,
    models: Iterable[Any] = (),
    quants: Iterable[tuple[str, int | None]] | str | None = None,
    jpeg: Iterable[int] | str | None = None,
    baselines: Iterable[str] | str | None = (),
    embedders: Iterable[str] = DEFAULT_EMBEDDERS,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Score JPEG at each quality and each model x quantiser on ``tiles`` (uint8 (N,t,t,3)).

    ``models`` holds Autoencoder objects or names/paths for :func:`wsicodec.models.load_model`.
    An embedder that is unavailable is reported through ``warn`` and left out.
    """
    from wsicodec.research.embeddings import EmbedderUnavailable, load_embedder
    from wsicodec.models.base import pick_device

    warn = warn or (lambda msg: None)
    progress = progress or (lambda msg: None)
    tiles = np.ascontiguousarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3 or len(tiles) == 0:
        raise WsicodecError(f"expected uint8 (N,H,W,3) tiles, got {tiles.dtype} {tiles.shape}")
    if batch_size < 1:
        raise WsicodecError("--batch-size must be at least 1")
    dev = pick_device(str(device) if device else None)
    quant_list = parse_quants(quants)
    jpeg_list = parse_jpeg_qualities(jpeg)
    baseline_list = parse_baselines(baselines)

    from wsicodec.research.embeddings import SPECS

    embedders = list(embedders)
    unknown = [e for e in embedders if e not in SPECS]
    if unknown:  # a typo is an error, unlike a model that is merely unavailable here
        raise WsicodecError(f"unknown embedder {unknown[0]!r}; choose from {', '.join(SPECS)}")
    notes: list[str] = []
    loaded = []
    for name in dict.fromkeys(embedders):
        try:
            loaded.append(load_embedder(name, dev))
        except EmbedderUnavailable as exc:
            warn(str(exc))
            notes.append(f"embedding column left out: {exc}")
    with_lpips = True
    try:
        M.lpips_model("alex", dev)
    except WsicodecError as exc:  # weights missing: the other columns still mean something
        with_lpips = False
        warn(f"LPIPS column left out: {exc}")
        notes.append(f"LPIPS column left out: {exc}")
    progress(f"embedding {len(tiles)} original tiles")
    scorer = _Scorer(tiles, loaded, dev, batch_size, with_lpips)

    rows: list[CodecRow] = []
    for q in jpeg_list:
        progress(f"JPEG q{q}")
        recon, sizes = jpeg_roundtrip(tiles, q)
        rows.append(scorer.score("JPEG", f"q{q}", recon, sizes))

    model_meta = []
    for m in models:
        model = m
        if isinstance(m, (str, Path)) or m is None:
            from wsicodec.models import load_model

            model = load_model(None if m is None else str(m), device=str(dev))
        mid = model.info.model_id
        progress(f"{mid}: encoding {len(tiles)} tiles")
        latents = encode_tiles(model, tiles, batch_size)
        model_meta.append({"id": mid, "class": model.info.model_class, "weights_sha256": model.info.weights_sha256,
                           "decoder_sha256": model.info.decoder_sha256, "latent_shape": list(latents.shape[1:])})
        points = list(model.operating_points()) if callable(getattr(model, "operating_points", None)) else []
        for quality in points:  # a rate-distortion-trained model: its own grids, one row per operating point
            progress(f"{mid} quality {quality}")
            q = model.operating_point_quantizer(quality)
            stored = q.quantize(latents)
            by = byte_report(stored, model, quality)
            recon = decode_latents(model, q.dequantize(stored), batch_size)
            row = scorer.score(mid, f"quality {quality}", recon, np.array([by["zstd"]]))
            row.bytes_by = by
            rows.append(row)
        for kind, levels in quant_list:
            if kind == "default" and points:
                continue  # its default operating point is a row already
            progress(f"{mid} {quant_label(kind, levels)}")
            recon, sizes, q = model_roundtrip(model, latents, kind, levels, batch_size)
            setting = quant_label(kind, levels) if kind != "default" else f"{quant_label(q.kind, q.levels)} (default)"
            row = scorer.score(mid, setting, recon, sizes)
            if q.kind != "none":
                row.bytes_by = byte_report(q.quantize(latents))
            rows.append(row)

    # baselines at equal bytes: each model row's stored size, matched by one quality setting per codec
    targets = sorted({r.bytes_per_tile for r in rows if r.family != "JPEG" and r.bytes_per_tile > 0})
    for name in baseline_list:
        label = BASELINES[name]["label"]
        done: set[int] = set()
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for target in targets:
            progress(f"{label} at {target / 1000:.2f} KB/tile")
            level, recon, sizes = baseline_at_bytes(name, tiles, target, cache)
            if level in done:
                continue
            done.add(level)
            rows.append(scorer.score(label, f"q{level}", recon, sizes))

    meta = {"device": str(dev), "models": model_meta, "jpeg": {"library": "Pillow", "settings": "default (4:2:0)"},
            "baselines": {BASELINES[b]["label"]: "imagecodecs, every tile coded alone; the highest quality level "
                          "whose mean bytes per tile fit each model row's" for b in baseline_list}}
    return EvalReport(rows, len(tiles), int(tiles.shape[1]),
                      [{"name": e.name, "label": e.label, "standin": e.standin} for e in loaded], notes, meta)
