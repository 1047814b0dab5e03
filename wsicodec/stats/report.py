"""`wsicodec stats`: what compressing saved (existing containers) or will save (`--estimate`).

Two reports share one shape (:class:`StatsReport`): one row per slide with the size before and
after, the rows that could not be read as ``skipped`` with a reason, and totals with a yearly
storage cost. docs/stats.md explains the estimate and its interval; docs/stats-schema.json is the
JSON Schema of :meth:`StatsReport.to_json`.

The estimate runs compress's own stages (plan, quantiser fit, quantise, container writer) on a
random sample of tissue tiles, so that what it measures is what compress would write.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from wsicodec._io import atomic_output, disk_bytes
from wsicodec._progress import progress_bar
from wsicodec._version import __version__
from wsicodec.errors import WsicodecError
from wsicodec.source.slide import SLIDE_SUFFIXES

SCHEMA_VERSION = 1
# AWS S3 Standard, US East (N. Virginia), first 50 TB per month: $0.023 per GB-month, the list price
# since December 2016 and the one we know for 2026 (check aws.amazon.com/s3/pricing). TB = 10^12 bytes.
DEFAULT_PRICE_PER_TB_MONTH = 23.0
PRICE_TIER = "AWS S3 Standard, us-east-1, first 50 TB/month ($0.023 per GB-month list price)"
DEFAULT_SAMPLE = 32
TILE_SIZE = 256  # compress's tile
CONFIDENCE = 0.95
SKIPPED_EXIT_CODE = 3

CONTAINER_SUFFIXES = (".pzarr", ".pzarr.zip")


# ------------------------------------------------------------------------------------- rows
@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class ContainerRow:
    """One existing container: what its source cost and what the container costs now."""

    path: str
    name: str
    source_name: str
    source_bytes: int
    container_bytes: int
    latents_bytes: int  # the tiles' shards alone
    tiles_total: int
    tissue_tiles: int
    model: str
    quantizer: dict[str, Any]
    target_mpp: float | None

    @property
    def after_bytes(self) -> int:
        return self.container_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ratio": _ratio(self.source_bytes, self.container_bytes),
            "saved_bytes": self.source_bytes - self.container_bytes,
            "tissue_fraction": _fraction(self.tissue_tiles, self.tiles_total),
            # all-in: the container's bytes (overhead included) divided by the tiles it holds
            "bytes_per_tissue_tile": self.container_bytes / self.tissue_tiles if self.tissue_tiles else None,
            # the tiles' shards alone: comparable with an estimate's bytes_per_tile_mean
            "latent_bytes_per_tissue_tile": self.latents_bytes / self.tissue_tiles if self.tissue_tiles else None,
        }


@dataclass
class EstimateRow:
    """One slide not yet compressed: its size now and the projected container size with an interval."""

    path: str
    name: str
    source_bytes: int
    tiles_total: int
    tissue_tiles: int
    sampled_tiles: int
    bytes_per_tile_mean: float
    bytes_per_tile_sd: float
    overhead_bytes: int
    projected_bytes: int
    projected_low: int
    projected_high: int
    model: str
    quantizer: dict[str, Any]
    target_mpp: float
    source_mpp: float | None
    seconds: float

    @property
    def after_bytes(self) -> int:
        return self.projected_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ratio": _ratio(self.source_bytes, self.projected_bytes),
            "saved_bytes": self.source_bytes - self.projected_bytes,
            "tissue_fraction": _fraction(self.tissue_tiles, self.tiles_total),
        }


@dataclass
class StatsReport:
    mode: str  # "containers" | "estimate"
    rows: list  # ContainerRow | EstimateRow
    skipped: list[Skipped]
    price_per_tb_month: float = DEFAULT_PRICE_PER_TB_MONTH
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    runs: dict[str, Any] | None = None  # what the folders' batch run logs say (run_log_summary), if any

    @property
    def exit_code(self) -> int:
        return SKIPPED_EXIT_CODE if self.skipped else 0

    def totals(self) -> dict[str, Any]:
        before = sum(r.source_bytes for r in self.rows)
        after = sum(r.after_bytes for r in self.rows)
        tissue = sum(r.tissue_tiles for r in self.rows)
        tiles = sum(r.tiles_total for r in self.rows)
        totals: dict[str, Any] = {
            "slides": len(self.rows),
            "skipped": len(self.skipped),
            "source_bytes": before,
            "after_bytes": after,
            "saved_bytes": before - after,
            "saved_fraction": _fraction(before - after, before),
            "ratio": _ratio(before, after),
            "tissue_tiles": tissue,
            "tiles_total": tiles,
            "cost_per_year_before": yearly_cost(before, self.price_per_tb_month),
            "cost_per_year_after": yearly_cost(after, self.price_per_tb_month),
            "cost_per_year_saved": yearly_cost(before - after, self.price_per_tb_month),
        }
        if self.mode == "estimate":
            # slides are sampled independently: half-widths add in quadrature, not linearly
            half = math.sqrt(sum(((r.projected_high - r.projected_low) / 2) ** 2 for r in self.rows))
            totals["after_low"] = max(0, int(round(after - half)))
            totals["after_high"] = int(round(after + half))
        return totals

    def to_json(self) -> dict[str, Any]:
        doc = {
            "schema": "wsicodec-stats",
            "schema_version": SCHEMA_VERSION,
            "mode": self.mode,
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "price": {"per_tb_month": self.price_per_tb_month, "currency": "USD", "tb_bytes": 10**12,
                      "tier": PRICE_TIER if self.price_per_tb_month == DEFAULT_PRICE_PER_TB_MONTH else "user"},
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "slides": [r.to_json() for r in self.rows],
            "skipped": [asdict(s) for s in self.skipped],
            "totals": self.totals(),
        }
        if self.runs is not None:
            doc["runs"] = self.runs
        return doc

    def to_csv(self) -> str:
        """One line per slide (skipped ones with their reason), then a TOTAL line."""
        if self.mode == "estimate":
            cols = ["path", "status", "reason", "source_bytes", "projected_bytes", "projected_low",
                    "projected_high", "ratio", "saved_bytes", "tissue_tiles", "tiles_total", "tissue_fraction",
                    "sampled_tiles", "bytes_per_tile_mean", "bytes_per_tile_sd", "overhead_bytes", "model",
                    "quantizer", "seconds"]
        else:
            cols = ["path", "status", "reason", "source_name", "source_bytes", "container_bytes", "ratio",
                    "saved_bytes", "tissue_tiles", "tiles_total", "tissue_fraction", "bytes_per_tissue_tile",
                    "latent_bytes_per_tissue_tile", "latents_bytes", "model", "quantizer"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            data = row.to_json()
            data["quantizer"] = _quant_label(row.quantizer)
            writer.writerow({**data, "status": "ok", "reason": ""})
        for skip in self.skipped:
            writer.writerow({"path": skip.path, "status": "skipped", "reason": skip.reason})
        t = self.totals()
        after_key = "projected_bytes" if self.mode == "estimate" else "container_bytes"
        total = {"path": "TOTAL", "status": f"{t['slides']} ok, {t['skipped']} skipped",
                 "source_bytes": t["source_bytes"], after_key: t["after_bytes"], "ratio": t["ratio"],
                 "saved_bytes": t["saved_bytes"], "tissue_tiles": t["tissue_tiles"], "tiles_total": t["tiles_total"]}
        if self.mode == "estimate":
            total.update(projected_low=t["after_low"], projected_high=t["after_high"])
        writer.writerow(total)
        return buf.getvalue()


def yearly_cost(n_bytes: float, price_per_tb_month: float) -> float:
    return round(n_bytes / 1e12 * price_per_tb_month * 12, 6)


def _ratio(before: float, after: float) -> float | None:
    return before / after if after > 0 else None


def _fraction(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _quant_label(q: dict[str, Any]) -> str:
    from wsicodec.quant.quantizer import quant_label

    return quant_label(str(q.get("kind", "?")), q.get("levels"))


# ------------------------------------------------------------------------------- discovery
def _is_container_name(p: Path) -> bool:
    return p.name.endswith(CONTAINER_SUFFIXES)


def find_containers(paths: Iterable[os.PathLike | str]) -> tuple[list[Path], list[Skipped]]:
    """Containers named on the command line, and those found (recursively) in folders named there."""
    found: list[Path] = []
    skipped: list[Skipped] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            skipped.append(Skipped(str(p), "no such file or folder"))
        elif p.is_file() or _is_container_name(p) or (p / "zarr.json").is_file():
            found.append(p)
        else:
            hits = sorted(q for q in _walk(p, _is_container_name))
            if not hits:
                skipped.append(Skipped(str(p), "no .pzarr containers in this folder"))
            found.extend(hits)
    return _unique(found), skipped


def find_slides(paths: Iterable[os.PathLike | str]) -> tuple[list[Path], list[Skipped]]:
    """Files named on the command line, and files with a slide suffix found (recursively) in folders."""
    found: list[Path] = []
    skipped: list[Skipped] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            skipped.append(Skipped(str(p), "no such file or folder"))
        elif p.is_file():
            found.append(p)
        elif _is_container_name(p):
            skipped.append(Skipped(str(p), "a .pzarr container, not a slide (run stats without --estimate)"))
        else:
            hits = sorted(q for q in _walk(p, lambda q: q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES))
            if not hits:
                skipped.append(Skipped(str(p), "no slide files in this folder"))
            found.extend(hits)
    return _unique(found), skipped


def _walk(folder: Path, match: Callable[[Path], bool]) -> Iterable[Path]:
    """Depth-first, not descending into matches (a .pzarr folder holds no other containers)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if match(entry):
            yield entry
        elif entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry, match)


def _unique(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def path_bytes(path: Path) -> int:
    """Bytes a file or a folder's files occupy (what object storage bills: sizes, not blocks)."""
    return disk_bytes(path)


def source_bytes(path: Path) -> int:
    """A slide's size; MIRAX keeps its pixels in a sibling folder named like the .mrxs file."""
    size = path.stat().st_size
    if path.suffix.lower() == ".mrxs" and path.with_suffix("").is_dir():
        size += path_bytes(path.with_suffix(""))
    return size


def _reason(exc: BaseException) -> str:
    """One line for the skipped list; unexpected exception types keep their name so bugs stay visible."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, WsicodecError):
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# ------------------------------------------------------------------------------ containers
def describe_container(path: Path, verify: bool = False) -> ContainerRow:
    """One row; a container damaged in what opening checks (or, with ``verify``, in any byte) raises."""
    from wsicodec.errors import ContainerError
    from wsicodec.format.container import Container

    with Container.open(path) as container:
        if verify and (problems := container.verify()):
            raise ContainerError(f"damaged: {problems[0].line()}"
                                 + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        d = container.describe()
    source = d.get("source") or {}
    tiles = d.get("tiles") or {}
    if not source.get("size"):
        raise WsicodecError(f"{path.name} does not record its source file size")
    quant = d.get("quantizer") or {}
    grid = d.get("grid") or {}
    return ContainerRow(
        path=str(path), name=path.name, source_name=str(source.get("filename") or ""),
        source_bytes=int(source["size"]), container_bytes=int(d["container_bytes"]),
        latents_bytes=int(d.get("latents_bytes") or 0),
        tiles_total=int(tiles.get("total", 0)), tissue_tiles=int(tiles.get("tissue", 0)),
        model=str((d.get("model") or {}).get("id") or "?"),
        quantizer={k: quant[k] for k in ("kind", "levels", "per_channel") if quant.get(k) is not None},
        target_mpp=float(grid["target_mpp"]) if grid.get("target_mpp") else None,
    )


def container_stats(paths: Sequence[os.PathLike | str], *, price_per_tb_month: float = DEFAULT_PRICE_PER_TB_MONTH,
                    progress: bool = False, verify: bool = False) -> StatsReport:
    started = time.perf_counter()
    found, skipped = find_containers(paths)
    if not found and not skipped:
        raise WsicodecError("no containers given")
    rows: list[ContainerRow] = []
    with progress_bar(progress, unit="slides", stderr=True, terminal_only=True, transient=True) as prog:
        task = prog.add_task("containers", total=len(found))
        for path in found:
            prog.update(task, description=path.name)
            try:
                rows.append(describe_container(path, verify=verify))
            except Exception as exc:  # one bad container must not hide the others
                skipped.append(Skipped(str(path), _reason(exc)))
            prog.advance(task)
    return StatsReport("containers", rows, skipped, price_per_tb_month=price_per_tb_month,
                       seconds=time.perf_counter() - started, runs=run_log_summary(paths))


# --------------------------------------------------------------------------- batch run logs
def run_log_summary(paths: Sequence[os.PathLike | str]) -> dict[str, Any] | None:
    """What the batch run logs of the folders named (``<folder>/wsicodec-runs.jsonl``, written by
    ``wsicodec compress INPUT... OUT_DIR``) say, or None when there are none: attempts by status, each
    slide's latest status, and the slides whose latest attempt failed with the reason."""
    from wsicodec.pipeline.batch import RUN_LOG_NAME, read_log

    logs = [Path(p) / RUN_LOG_NAME for p in paths if Path(p).is_dir() and (Path(p) / RUN_LOG_NAME).is_file()]
    if not logs:
        return None
    attempts = {"ok": 0, "skipped": 0, "failed": 0}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    runs: set[str] = set()
    for log in logs:
        for rec in read_log(log):
            status = rec.get("status")
            if rec.get("op", "compress") != "compress" or status not in attempts:
                continue
            attempts[status] += 1
            if rec.get("run"):
                runs.add(str(rec["run"]))
            # the output's name within its folder: the same slide however the run was invoked
            latest[(str(log), Path(str(rec.get("output") or rec.get("slide") or "?")).name)] = rec
    slides = {"ok": 0, "skipped": 0, "failed": 0}
    for rec in latest.values():
        slides[rec["status"]] += 1
    failed = [{"slide": str(r.get("slide") or ""), "output": str(r.get("output") or ""),
               "reason": str(r.get("reason") or ""), "time": str(r.get("time") or "")}
              for r in latest.values() if r["status"] == "failed"]
    return {"logs": [str(p) for p in logs], "runs": len(runs), "attempts": attempts, "slides": slides,
            "failed": failed}


def print_runs(runs: dict[str, Any] | None, console) -> None:
    """The run-log part of the terminal view: latest status per slide, attempts, failed slides' reasons."""
    if not runs:
        return
    from rich.table import Table

    table = Table(title=f"batch runs ({plural(runs['runs'], 'run')} in {', '.join(runs['logs'])})", header_style="bold")
    table.add_column("status")
    table.add_column("slides (latest attempt)", justify="right")
    table.add_column("attempts", justify="right")
    for status in ("ok", "skipped", "failed"):
        table.add_row(status, str(runs["slides"][status]), str(runs["attempts"][status]),
                      style="red" if status == "failed" and runs["slides"][status] else None)
    console.print(table)
    for f in runs["failed"]:
        console.print(f"[red]failed[/] {f['slide'] or f['output']}: {f['reason']}", highlight=False, soft_wrap=True)


# -------------------------------------------------------------------------------- estimate
def t_quantile(confidence: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


def extrapolate(tile_bytes: Sequence[int], n_tissue: int, overhead: int,
                confidence: float = CONFIDENCE) -> tuple[int, int, int, float, float]:
    """Container size from a simple random sample of tile sizes (without replacement).

    point = overhead + N·mean; half-width = t(n-1)·sd/√n·N·√((N-n)/(N-1)) — the finite-population
    correction makes a fully measured slide exact. Returns (point, low, high, mean, sd).
    """
    n = len(tile_bytes)
    if n == 0:
        return overhead, overhead, overhead, 0.0, 0.0
    b = np.asarray(tile_bytes, dtype=np.float64)
    mean = float(b.mean())
    sd = float(b.std(ddof=1)) if n > 1 else 0.0
    point = overhead + n_tissue * mean
    if n >= n_tissue or n < 2:
        half = 0.0 if n >= n_tissue else float("inf")
    else:
        fpc = math.sqrt((n_tissue - n) / (n_tissue - 1))
        half = t_quantile(confidence, n - 1) * sd / math.sqrt(n) * n_tissue * fpc
    if math.isinf(half):  # one tile says nothing about the spread; show no interval rather than a fake one
        half = point
    return (int(round(point)), max(0, int(round(point - half))), int(round(point + half)), mean, sd)


def estimate_slide(slide_path: Path, autoencoder, *, quant: str | None = None, levels: int | None = None,
                   sample: int = DEFAULT_SAMPLE, target_mpp: float = 0.5, source_mpp: float | None = None,
                   tile_size: int = TILE_SIZE, all_tiles: bool = False, seed: int = 0, batch_size: int = 16,
                   read_workers: int = 2, single_file: bool = False, workdir: Path | None = None) -> EstimateRow:
    """Project the container compress would write for one slide from `sample` encoded tissue tiles."""
    from wsicodec.pipeline import compress as cmp
    from wsicodec.format import ContainerWriter, stored_tile_bytes
    from wsicodec.source.slide import SourceSlide

    started = time.perf_counter()
    try:
        slide = SourceSlide(slide_path)
    except WsicodecError:
        if source_mpp is None:
            raise
        # in a batch, --source-mpp stands in only for slides that record no resolution; a file that
        # is broken for another reason fails again here, with its own message
        slide = SourceSlide(slide_path, source_mpp=source_mpp)
    with slide:
        quantizer = cmp.choose_quantizer(autoencoder, quant, levels)
        layout = cmp.plan(slide, target_mpp=target_mpp, tile_size=tile_size, all_tiles=all_tiles,
                          workers=read_workers)
        margin = cmp.encode_margin_px(autoencoder, None)
        # compress's own fit: a seeded random sample of tissue tiles, encoded, fitted on, returned
        latents = cmp.fit_quantizer(quantizer, autoencoder, slide, layout.grid, layout.coords,
                                    sample_tiles=sample, seed=seed, batch_size=batch_size, workers=read_workers,
                                    margin=margin, fill=layout.glass)
        coords = list(latents)
        stored = quantizer.quantize(_stack([latents[c] for c in coords])) if coords else []
        tile_bytes = [int(stored_tile_bytes(s)) for s in stored]
        background = quantizer.quantize(cmp.glass_tile_latents(autoencoder, tile_size, layout.glass, margin))[0]

        # Everything but the tiles (attributes, properties, associated images, codebook, background) is
        # measured by writing a real container that holds just the sampled tiles (the writer insists that
        # every tissue tile be written, so its mask marks only those).
        n_tissue = len(layout.coords)
        sample_mask = np.zeros_like(layout.tissue, dtype=bool)
        for r, c in coords:
            sample_mask[r, c] = True
        with tempfile.TemporaryDirectory(prefix="wsicodec-stats-", dir=workdir) as tmp:
            out = Path(tmp) / (slide_path.stem + (".pzarr.zip" if single_file else ".pzarr"))
            writer = ContainerWriter(
                out, grid=layout.grid, model=autoencoder.info, quantizer=quantizer, tissue=sample_mask,
                background=background, source=cmp.source_record(slide, "0" * 64),  # hash skipped: same length
                resolution=cmp.resolution_record(slide, layout.grid), associated=slide.associated_images(),
                overwrite=True, single_file=single_file, tool_version=__version__, icc_profile=slide.icc_profile,
            )
            with writer:
                for coord, s in zip(coords, stored):
                    writer.write_tile(*coord, s)
            written = writer.bytes_written
        overhead = _overhead(written, tile_bytes, coords, layout.coords)

        point, low, high, mean, sd = extrapolate(tile_bytes, n_tissue, overhead)
        grid = layout.grid
        return EstimateRow(
            path=str(slide_path), name=slide_path.name, source_bytes=source_bytes(slide_path),
            tiles_total=int(grid.rows * grid.cols), tissue_tiles=n_tissue, sampled_tiles=len(tile_bytes),
            bytes_per_tile_mean=round(mean, 1), bytes_per_tile_sd=round(sd, 1), overhead_bytes=int(overhead),
            projected_bytes=point, projected_low=low, projected_high=high,
            model=autoencoder.info.model_id,
            quantizer={k: v for k, v in quantizer.to_json().items() if k in ("kind", "levels", "per_channel")},
            target_mpp=float(target_mpp), source_mpp=float(slide.mpp) if slide.mpp else None,
            seconds=round(time.perf_counter() - started, 3),
        )


def _overhead(written: int, tile_bytes: Sequence[int], sampled: Sequence[tuple[int, int]],
              tissue: Sequence[tuple[int, int]]) -> int:
    """Bytes of the full container that are not `N x mean(stored_tile_bytes)`.

    A shard's index has a slot for every chunk position, tissue or not; stored_tile_bytes charges one
    slot per tile. So: the sample container's bytes, minus its tiles' chunks and its shards' indexes,
    plus the indexes of every shard the full container writes, minus the slots the tiles already pay for.
    """
    from wsicodec.format import spec as cont

    side = cont.SHARD_TILES
    entry = cont.SHARD_INDEX_ENTRY_BYTES
    index = side * side * entry + cont.SHARD_INDEX_CHECKSUM_BYTES
    shards_sampled = len({(r // side, c // side) for r, c in sampled})
    shards_full = len({(r // side, c // side) for r, c in tissue})
    chunks = sum(tile_bytes) - entry * len(tile_bytes)
    fixed = written - chunks - shards_sampled * index  # attributes, arrays, associated images
    return max(0, int(fixed + shards_full * index - entry * len(tissue)))


def _stack(tensors):
    import torch

    return torch.stack(tensors)


def estimate(paths: Sequence[os.PathLike | str], *, model=None, quant: str | None = None, levels: int | None = None,
             sample: int = DEFAULT_SAMPLE, target_mpp: float = 0.5, source_mpp: float | None = None,
             all_tiles: bool = False, seed: int = 0, batch_size: int = 16, device: str | None = None,
             single_file: bool = False, price_per_tb_month: float = DEFAULT_PRICE_PER_TB_MONTH,
             progress: bool = False) -> StatsReport:
    """Estimate, slide by slide, the containers compress would write; unreadable slides are skipped."""
    if sample < 2:
        raise WsicodecError("--sample must be at least 2 (one tile gives no spread for an interval)")
    if target_mpp <= 0 or (source_mpp is not None and source_mpp <= 0):
        raise WsicodecError("resolutions must be positive numbers of µm per pixel")
    if price_per_tb_month < 0:
        raise WsicodecError("--price-per-tb-month must not be negative")
    started = time.perf_counter()
    found, skipped = find_slides(paths)
    if not found and not skipped:
        raise WsicodecError("no slides given")

    from wsicodec.models import load_model
    from wsicodec.models.base import Autoencoder

    autoencoder = model if isinstance(model, Autoencoder) else load_model(model, device=device) if found else None
    if autoencoder is not None:
        from wsicodec.pipeline.compress import choose_quantizer

        try:  # a bad --quant/--levels is the user's mistake once, not a reason to skip every slide
            choose_quantizer(autoencoder, quant, levels)
        except ValueError as exc:
            raise WsicodecError(str(exc)) from None
        if TILE_SIZE % autoencoder.info.spatial_factor:
            raise WsicodecError(f"tile size {TILE_SIZE} is not a multiple of the model's spatial factor "
                                f"{autoencoder.info.spatial_factor}")
    rows: list[EstimateRow] = []
    with progress_bar(progress, unit="slides", stderr=True, terminal_only=True, transient=True) as prog:
        task = prog.add_task("estimate", total=len(found))
        for path in found:
            prog.update(task, description=path.name)
            try:
                rows.append(estimate_slide(path, autoencoder, quant=quant, levels=levels, sample=sample,
                                           target_mpp=target_mpp, source_mpp=source_mpp, all_tiles=all_tiles,
                                           seed=seed, batch_size=batch_size, single_file=single_file))
            except Exception as exc:  # an archive always holds a few bad files; report the rest
                skipped.append(Skipped(str(path), _reason(exc)))
            prog.advance(task)
    settings = {
        "model": autoencoder.info.model_id if autoencoder else model if isinstance(model, str) else None,
        "quant": quant, "levels": levels, "sample": sample, "target_mpp": target_mpp, "source_mpp": source_mpp,
        "all_tiles": all_tiles, "seed": seed, "single_file": single_file, "confidence": CONFIDENCE,
    }
    return StatsReport("estimate", rows, skipped, price_per_tb_month=price_per_tb_month, settings=settings,
                       seconds=time.perf_counter() - started)


# -------------------------------------------------------------------------------- output

def _fit_widths(headers: list[str], rows: list[list[str]], width: int,
                folding: Sequence[int] = (0,)) -> tuple[list[int], int]:
    """Column widths and the left padding (1, or 0 when space is short) for a table whose columns are
    separated by one character, ``width`` in all: each column as wide as its longest cell; while too wide,
    number columns (all but ``folding``) give way to their longest word ("190.5 KB – 259.3 KB" wraps at its
    spaces), then the ``folding`` (text) columns shrink to no less than 12 characters, folding long names.
    Nothing is dropped or cut."""
    columns = list(zip(headers, *rows))
    want = [max(len(c) for c in col) for col in columns]
    least = [max(len(w) for c in col for w in c.split(" ")) for col in columns]
    floor = [min(12, want[i]) if i in folding else least[i] for i in range(len(want))]
    pad = 1 if sum(floor) + 2 * len(headers) - 1 <= width else 0
    budget = width - (1 + pad) * len(headers) + 1
    widths = list(want)
    for i in sorted((i for i in range(len(widths)) if i not in folding), key=lambda i: least[i] - want[i]):
        if sum(widths) <= budget:
            break
        widths[i] = max(least[i], widths[i] - (sum(widths) - budget))
    for i in folding:
        if sum(widths) > budget:
            widths[i] = max(floor[i], widths[i] - (sum(widths) - budget))
    return widths, pad


def plural(n: int, word: str) -> str:
    """"1 slide", "2 slides"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1000.0
    raise AssertionError  # pragma: no cover


def _money(x: float) -> str:
    if 0 < abs(x) < 0.01:
        return "<$0.01" if x > 0 else "-<$0.01"
    return f"${x:,.2f}"


def print_table(report: StatsReport, console=None) -> None:
    """The terminal view: one row per slide, a totals row, the yearly cost, then what was skipped."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    if console is None:
        # the terminal's width, or $COLUMNS, or 80 when piped: cells wrap, no column is dropped or cut
        console = Console()
    t = report.totals()
    est = report.mode == "estimate"
    if not report.rows:
        console.print("nothing to report: no input could be read")
        for skip in report.skipped:
            console.print(f"[yellow]skipped[/] {escape(skip.path)}: {escape(skip.reason)}", highlight=False, soft_wrap=True)
        print_runs(report.runs, console)
        return
    labels = {f"{r.model} / {_quant_label(r.quantizer)}" for r in report.rows}
    shared_label = labels.pop() if len(labels) == 1 else None
    title = "wsicodec estimate: projected container sizes" if est else "wsicodec containers: measured sizes"
    headers = ["slide" if est else "container", "source", "projected" if est else "container"]
    headers += ["95% interval"] if est else []
    headers += ["ratio", "saved", "tissue tiles"] + (["sampled"] if est else []) + ["bytes/tile"]
    headers += [] if shared_label else ["model / quantiser"]

    def ratio(x):
        return f"{x:.1f}×" if x else "-"

    rows: list[list[str]] = []
    for row in report.rows:
        d = row.to_json()
        cells = [row.name, human_bytes(row.source_bytes), human_bytes(row.after_bytes)]
        if est:
            cells.append(f"{human_bytes(row.projected_low)} – {human_bytes(row.projected_high)}")
        cells += [ratio(d["ratio"]), human_bytes(d["saved_bytes"]),
                  f"{row.tissue_tiles} ({100 * (d['tissue_fraction'] or 0):.0f}%)"]
        if est:
            cells.append(str(row.sampled_tiles))
        cells.append(human_bytes(d["bytes_per_tile_mean"] if est else d["latent_bytes_per_tissue_tile"]))
        if not shared_label:
            cells.append(f"{row.model} / {_quant_label(row.quantizer)}")
        rows.append(cells)
    total = [f"total ({plural(t['slides'], 'slide')})", human_bytes(t["source_bytes"]), human_bytes(t["after_bytes"])]
    if est:
        total.append(f"{human_bytes(t['after_low'])} – {human_bytes(t['after_high'])}")
    total += [ratio(t["ratio"]), human_bytes(t["saved_bytes"]), str(t["tissue_tiles"])]
    total += [""] * (len(headers) - len(total))
    widths, pad = _fit_widths(headers, rows + [total], console.width, folding=[0] + ([] if shared_label else
                                                                                [len(headers) - 1]))
    table = Table(title=title, caption=f"model / quantiser: {shared_label}" if shared_label else None,
                  header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, pad))
    for i, (name, width) in enumerate(zip(headers, widths)):
        text_col = i == 0 or (not shared_label and i == len(headers) - 1)
        table.add_column(name, justify="left" if text_col else "right", overflow="fold", width=width)
    for cells in rows:
        table.add_row(*map(Text, cells))
    table.add_section()
    table.add_row(*map(Text, total), style="bold")
    console.print(table)
    tier = PRICE_TIER if report.price_per_tb_month == DEFAULT_PRICE_PER_TB_MONTH else "your price"
    console.print(f"storage cost per year at ${report.price_per_tb_month:g}/TB-month ({tier}): "
                  f"{_money(t['cost_per_year_before'])} now, {_money(t['cost_per_year_after'])} "
                  f"{'projected' if est else 'compressed'}, [bold green]{_money(t['cost_per_year_saved'])} saved[/]",
                  highlight=False)
    for skip in report.skipped:
        console.print(f"[yellow]skipped[/] {escape(skip.path)}: {escape(skip.reason)}", highlight=False, soft_wrap=True)
    print_runs(report.runs, console)


def plot(report: StatsReport, out_path: os.PathLike | str) -> Path:
    """Grouped bars per slide, size now vs after (with the estimate's interval), for a slide deck."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    if not report.rows:
        raise WsicodecError("nothing to plot: no slide could be read")
    est = report.mode == "estimate"
    before = np.array([r.source_bytes for r in report.rows], dtype=float)
    after = np.array([r.after_bytes for r in report.rows], dtype=float)
    peak = max(before.max(), after.max(), 1.0)
    unit, scale = next((u, s) for u, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("bytes", 1.0))
                       if peak >= s)
    x = np.arange(len(report.rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(x) + 3), 4.8), dpi=150)
    ax.bar(x - width / 2, before / scale, width, label="original slide", color="#9e9e9e")
    yerr = None
    if est:
        low = np.array([r.projected_low for r in report.rows], dtype=float)
        high = np.array([r.projected_high for r in report.rows], dtype=float)
        yerr = np.vstack([after - low, high - after]) / scale
    ax.bar(x + width / 2, after / scale, width, yerr=yerr, capsize=3,
           label="projected .pzarr (95% interval)" if est else ".pzarr container", color="#1f77b4")
    for xi, b, a in zip(x, before, after):
        if a > 0:
            ax.annotate(f"{b / a:.1f}×" if b / a < 10 else f"{b / a:.0f}×", (xi + width / 2, a / scale), ha="center", va="bottom",
                        textcoords="offset points", xytext=(0, 3), fontsize=8)
    names = [_short(r.name) for r in report.rows]
    tilt = len(x) > 3 or len(x) * max(map(len, names)) > 50  # long names would run into each other
    ax.set_xticks(x, names, rotation=25 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel(f"size on disk ({unit})")
    ax.set_xlabel("slide")
    t = report.totals()
    first = report.rows[0]
    what = f"{first.model}, {_quant_label(first.quantizer)}"
    title = (f"Slide storage before and after wsicodec ({'estimate' if est else 'measured'}; {what})\n"
             f"total {human_bytes(t['source_bytes'])} → {human_bytes(t['after_bytes'])} "
             f"({100 * (t['saved_fraction'] or 0):.0f}% saved, {_money(t['cost_per_year_saved'])}/year at "
             f"${report.price_per_tb_month:g}/TB-month)")
    ax.set_title(title.replace("$", r"\$"), fontsize=10)  # a bare $ starts matplotlib's mathtext
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(out_path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out_path


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
