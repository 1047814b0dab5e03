"""The compression pipeline, top to bottom:

    source slide -> tile grid at the archive resolution -> tissue mask -> encoder (batched)
    -> quantiser (fitted on a sample of this slide's latents) -> .pzarr container

Reading runs on threads (OpenSlide releases the GIL) and overlaps with encoding; memory is
bounded by the tiles in flight and the container's open shards, never by the slide's size.
The stages are public so that `wsicodec stats --estimate` can run the same ones on a sample.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from wsicodec._io import disk_bytes, partial_name
from wsicodec._progress import progress_bar
from wsicodec._version import __version__
from wsicodec.format import ContainerWriter
from wsicodec.errors import SlideError, WsicodecError
from wsicodec.models import load_model
from wsicodec.models.base import Autoencoder
from wsicodec.quant.quantizer import Quantizer, make_quantizer
from wsicodec.source.slide import SourceSlide, TileGrid
from wsicodec.source.tissue import (DEFAULT_TISSUE_THRESHOLD, candidate_tiles, glass_colour, tissue_like,
                                     tissue_tiles)

Coord = tuple[int, int]

DEFAULT_QUANT = "kmeans"
DEFAULT_LEVELS = 256


@dataclass
class Plan:
    """What will be archived: the grid at the target resolution and which of its tiles hold tissue."""

    grid: TileGrid
    tissue: np.ndarray  # bool (rows, cols)
    thumbnail: np.ndarray  # uint8 (h, w, 3) of the archived area
    coords: list[Coord]  # the tiles to encode, in the order the container wants them
    glass: tuple[int, int, int]  # the slide's glass colour (white when it shows none)
    kept_at_full_resolution: int = 0  # tiles the thumbnail missed that the full-resolution check kept


def plan(slide: SourceSlide, *, target_mpp: float = 0.5, tile_size: int = 256, all_tiles: bool = False,
         shard_tiles: int = 16, tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD, workers: int = 2) -> Plan:
    grid = slide.grid(target_mpp=target_mpp, tile_size=tile_size)
    # enough thumbnail pixels per tile for the tissue rule, also on very large slides
    thumbnail = slide.thumbnail(max(1024, 8 * max(grid.rows, grid.cols)))
    glass = glass_colour(thumbnail) or (255, 255, 255)
    kept = 0
    if all_tiles:
        tissue = np.ones((grid.rows, grid.cols), dtype=bool)
    else:
        tissue = tissue_tiles(thumbnail, grid)
        # the thumbnail proposes; every tile it cannot clear as glass is judged at the archived resolution,
        # so no fragment, debris or margin ink at the specimen's edge is dropped
        candidates = [(int(r), int(c)) for r, c in zip(*np.nonzero(candidate_tiles(thumbnail, grid, tissue)))]
        for (r, c), tile in slide.read_tiles(grid, candidates, workers=workers, fill=glass):
            if float(tissue_like(tile).mean()) > tissue_threshold:
                tissue[r, c] = True
                kept += 1
    coords = [(int(r), int(c)) for r, c in zip(*np.nonzero(tissue))]
    # Shard by shard, so the writer can flush each shard as soon as its last tile arrives.
    coords.sort(key=lambda rc: (rc[0] // shard_tiles, rc[1] // shard_tiles, rc[0], rc[1]))
    return Plan(grid=grid, tissue=tissue, thumbnail=thumbnail, coords=coords, glass=glass,
                kept_at_full_resolution=kept)


def encode_margin_px(model: Autoencoder, margin_px: int | None) -> int:
    """The context margin in archived pixels (the model's own by default), rounded up to whole latent cells."""
    f = int(model.info.spatial_factor)
    m = int(getattr(model, "encode_margin_px", 32)) if margin_px is None else int(margin_px)
    if m < 0:
        raise WsicodecError(f"--encode-margin must be >= 0 pixels, got {m}")
    return -(-m // f) * f


def choose_quantizer(model: Autoencoder, kind: str | None, levels: int | None,
                     quality: str | None = None) -> Quantizer:
    """The user's choice, else the model's recommended one (builtin models record it), else K-means-256.

    A rate-distortion-trained model (one with operating points) quantises on its own per-channel grid,
    picked by ``quality``; its recommended quantiser is that grid at its default operating point."""
    recommended = (model.info.config or {}).get("default_quantizer") or {}
    points = operating_points(model)
    if quality is not None and not points:
        raise WsicodecError(f"--quality: model {model.info.model_id} has no operating points; "
                            "use --quant/--levels to trade bytes for fidelity")
    if points and (kind is None or quality is not None):
        if kind is not None:
            raise WsicodecError("--quality picks the model's own quantiser; leave out --quant")
        return model.operating_point_quantizer(quality)  # type: ignore[attr-defined]
    if kind is None:
        kind = recommended.get("kind", DEFAULT_QUANT)
        if levels is None:
            levels = recommended.get("levels")
    if levels is None:
        levels = DEFAULT_LEVELS
    return make_quantizer(kind, levels=levels, latent_range=model.info.latent_range)


def operating_points(model: Autoencoder) -> list[str]:
    """The named rate/fidelity operating points a model offers (``--quality``), or [] if none."""
    fn = getattr(model, "operating_points", None)
    return list(fn()) if callable(fn) else []


def sample_coords(coords: Sequence[Coord], n: int, seed: int = 0) -> list[Coord]:
    if len(coords) <= n:
        return list(coords)
    return sorted(random.Random(seed).sample(list(coords), n))


def encode_batches(model: Autoencoder, slide: SourceSlide, grid: TileGrid, coords: Sequence[Coord], *,
                   batch_size: int = 16, workers: int = 2, margin: int = 0,
                   fill: tuple[int, int, int] = (255, 255, 255)) -> Iterator[tuple[list[Coord], torch.Tensor]]:
    """Yield (coords, latents (N,C,h,w)) batch by batch; reads run ahead on threads while the model encodes.

    Each tile is encoded with ``margin`` pixels of its neighbours around it and its latents cropped back
    to the tile: an encoder that sees zero padding at a tile's edge gives edge latents that disagree with
    the neighbour's, which shows as seams however the decoder is run."""
    def encode(tiles: list[np.ndarray]) -> torch.Tensor:
        z = model.encode(np.stack(tiles))
        if margin:
            k = margin // int(model.info.spatial_factor)
            z = z[:, :, k:z.shape[2] - k, k:z.shape[3] - k]
        return z

    batch_coords: list[Coord] = []
    batch_tiles: list[np.ndarray] = []
    for coord, tile in slide.read_tiles(grid, coords, workers=workers, margin=margin, fill=fill):
        batch_coords.append(coord)
        batch_tiles.append(tile)
        if len(batch_tiles) == batch_size:
            yield batch_coords, encode(batch_tiles)
            batch_coords, batch_tiles = [], []
    if batch_tiles:
        yield batch_coords, encode(batch_tiles)


def decoded_glass_colour(model: Autoencoder, quantizer: Quantizer, background: np.ndarray,
                         halo: int) -> tuple[int, int, int]:
    """The mean colour the model decodes a stored glass tile to, among glass neighbours (its halo), rounded:
    what background tiles are painted with, so that they meet the glass decoded inside tissue tiles without
    a step (the measured glass colour differs from it by a few grey levels, a visible box at overview)."""
    n = background.shape[-1]
    reps = 1 + 2 * -(-halo // n) if halo else 1
    window = np.tile(background, (1, reps, reps))
    z = quantizer.dequantize(window[None])
    rgb = model.decode(z)[0]
    k = (reps // 2) * n * int(model.info.spatial_factor)
    t = n * int(model.info.spatial_factor)
    centre = rgb[k:k + t, k:k + t].reshape(-1, 3).astype(np.float64)
    return tuple(int(v) for v in np.clip(np.rint(centre.mean(axis=0)), 0, 255))  # type: ignore[return-value]


def glass_tile_latents(model: Autoencoder, tile_size: int, glass: tuple[int, int, int] = (255, 255, 255),
                       margin: int = 0) -> torch.Tensor:
    """Latents of a tile of plain glass: what background tiles and the world past the slide stand for."""
    side = tile_size + 2 * margin
    tile = np.empty((1, side, side, 3), dtype=np.uint8)
    tile[:] = np.asarray(glass, dtype=np.uint8)
    z = model.encode(tile)
    if margin:
        k = margin // int(model.info.spatial_factor)
        z = z[:, :, k:z.shape[2] - k, k:z.shape[3] - k]
    return z


def fit_quantizer(quantizer: Quantizer, model: Autoencoder, slide: SourceSlide, grid: TileGrid,
                  coords: Sequence[Coord], *, sample_tiles: int = 64, seed: int = 0, batch_size: int = 16,
                  workers: int = 2, on_batch=None, margin: int = 0,
                  fill: tuple[int, int, int] = (255, 255, 255)) -> dict[Coord, torch.Tensor]:
    """Fit on the latents of a random sample of tissue tiles; returns those latents so they aren't encoded twice."""
    sample = sample_coords(coords, sample_tiles, seed)
    latents: dict[Coord, torch.Tensor] = {}
    for batch_coords, z in encode_batches(model, slide, grid, sample, batch_size=batch_size, workers=workers,
                                          margin=margin, fill=fill):
        latents.update(zip(batch_coords, z))
        if on_batch is not None:
            on_batch(len(batch_coords))
    if latents:
        quantizer.fit(torch.stack(list(latents.values())))
    else:  # a slide with no tissue: the codebook only has to represent glass
        quantizer.fit(glass_tile_latents(model, grid.tile_size, fill, margin))
    return latents


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _BackgroundHash(threading.Thread):
    """Hash the source while tiles are encoded: a multi-GB slide costs seconds of reading we can overlap."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.result, self.error = path, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = file_sha256(self.path)
        except OSError as exc:  # surfaced in .value
            self.error = exc

    @property
    def value(self) -> str:
        self.join()
        if self.error is not None:
            raise WsicodecError(f"cannot read {self.path}: {self.error.strerror or self.error}")
        return self.result


def source_record(slide: SourceSlide, sha256: str) -> dict[str, Any]:
    path = Path(slide.path)
    props = dict(slide.properties)
    return {
        "filename": path.name,
        "size": path.stat().st_size,
        "sha256": sha256,
        "vendor": props.get("openslide.vendor"),
        "dimensions": list(slide.dimensions),
        "properties": props,
    }


def resolution_record(slide: SourceSlide, grid: TileGrid) -> dict[str, Any]:
    return {
        "target_mpp": grid.target_mpp,
        "source_mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "objective_power": slide.objective_power,
        # the magnification an Aperio-style viewer should show for the archived pixels
        "archived_objective_power": round(10.0 / grid.target_mpp, 3),
        # the exact size of the archived pixels (target_mpp is what was asked; a source within 2 % of it
        # is archived 1:1, so its pixels keep their own size)
        "archived_mpp": grid.actual_mpp,
    }


@dataclass(frozen=True)
class CompressResult:
    """What one compress run wrote, cost and saved."""

    source: str
    output: str
    source_bytes: int
    container_bytes: int
    tiles_total: int
    tissue_tiles: int
    seconds: float
    model_id: str
    quantizer: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.source_bytes / max(self.container_bytes, 1)

    @property
    def tiles_per_second(self) -> float:
        return self.tissue_tiles / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (f"{self.output}: {_human(self.source_bytes)} -> {_human(self.container_bytes)} "
                f"(ratio {self.ratio:.1f}x), {self.tissue_tiles}/{self.tiles_total} tissue tiles, "
                f"{self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s), model {self.model_id}")

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "ratio": self.ratio, "tiles_per_second": self.tiles_per_second}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"



# how far the archive may be from the source's own resolution: beyond these it is a typo, not a choice
MAX_DOWNSAMPLE = 64.0
MAX_UPSAMPLE = 4.0


def _check_output_folder(out_path: Path) -> None:
    """Fail before any encoding when the container could not be written where asked."""
    folder = out_path.parent
    if not folder.is_dir():
        raise WsicodecError(f"output folder does not exist: {folder}")
    probe = partial_name(out_path, "probe")
    try:
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        # access() can say yes where a write fails (read-only mounts, ACLs, quotas): really try one
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise WsicodecError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from None


def _check_resolution(slide: SourceSlide, grid: TileGrid) -> None:
    if grid.scale > MAX_DOWNSAMPLE:
        raise WsicodecError(
            f"--mpp {grid.target_mpp:g} µm/px is {grid.scale:.4g}x coarser than the slide's {slide.mpp:.4g} µm/px; "
            f"archives may be at most {MAX_DOWNSAMPLE:g}x coarser (--mpp <= {slide.mpp * MAX_DOWNSAMPLE:.4g})")
    if grid.scale < 1 / MAX_UPSAMPLE:
        raise WsicodecError(
            f"--mpp {grid.target_mpp:g} µm/px is {1 / grid.scale:.4g}x finer than the slide's {slide.mpp:.4g} µm/px; "
            f"archives may upsample at most {MAX_UPSAMPLE:g}x (--mpp >= {slide.mpp / MAX_UPSAMPLE:.4g})")


def compress(slide_path: str | os.PathLike, out_path: str | os.PathLike, *, model: str | Autoencoder | None = None,
             quant: str | None = None, levels: int | None = None, target_mpp: float = 0.5,
             source_mpp: float | None = None, tile_size: int = 256, all_tiles: bool = False,
             batch_size: int = 16, device: str | None = None, read_workers: int = 2, sample_tiles: int = 64,
             seed: int = 0, overwrite: bool = False, single_file: bool = False,
             tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD, encode_margin: int | None = None,
             allow_empty: bool = False, progress: bool = False, quality: str | None = None) -> CompressResult:
    """Compress one slide into a .pzarr container and return what it cost and saved.

    ``quality`` picks one of the model's operating points (``wsicodec models`` lists them; the builtin
    default model offers low, default and high)."""
    started = time.perf_counter()
    slide_path, out_path = Path(slide_path), Path(out_path)
    if out_path.exists() and not overwrite:
        from wsicodec.errors import OutputExistsError
        raise OutputExistsError(f"{out_path} already exists; pass --overwrite to replace it")
    if target_mpp <= 0 or (source_mpp is not None and source_mpp <= 0):
        raise WsicodecError("resolutions must be positive numbers of µm per pixel")
    if batch_size < 1:
        raise WsicodecError("--batch-size must be at least 1")
    if not 0 <= tissue_threshold < 1:
        raise WsicodecError(f"--tissue-threshold must be a fraction in [0, 1), got {tissue_threshold}")
    _check_output_folder(out_path)

    with SourceSlide(slide_path, source_mpp=source_mpp) as slide:
        _check_resolution(slide, slide.grid(target_mpp=target_mpp, tile_size=tile_size))
        hasher = _BackgroundHash(slide_path)
        autoencoder = model if isinstance(model, Autoencoder) else load_model(model, device=device)
        if tile_size % autoencoder.info.spatial_factor:
            raise WsicodecError(f"tile size {tile_size} is not a multiple of the model's spatial factor "
                                f"{autoencoder.info.spatial_factor}")
        quantizer = choose_quantizer(autoencoder, quant, levels, quality)
        margin = encode_margin_px(autoencoder, encode_margin)
        layout = plan(slide, target_mpp=target_mpp, tile_size=tile_size, all_tiles=all_tiles,
                      tissue_threshold=tissue_threshold, workers=read_workers)
        if not layout.coords and not all_tiles and not allow_empty:
            raise SlideError(f"no tissue found in {slide_path}; pass --allow-empty to archive it anyway")
        context = {"margin": margin, "fill": layout.glass}

        prog = progress_bar(progress, unit="tiles")
        with prog:
            task = prog.add_task("compress", total=len(layout.coords))
            fitted = fit_quantizer(quantizer, autoencoder, slide, layout.grid, layout.coords,
                                   sample_tiles=sample_tiles, seed=seed, batch_size=batch_size,
                                   workers=read_workers, on_batch=lambda n: prog.advance(task, n), **context)
            background = quantizer.quantize(glass_tile_latents(autoencoder, tile_size, layout.glass, margin))[0]
            halo = int(getattr(autoencoder, "decode_halo_cells", 3))
            glass_paint = decoded_glass_colour(autoencoder, quantizer, background, halo)
            writer = ContainerWriter(
                out_path, grid=layout.grid, model=autoencoder.info, quantizer=quantizer, tissue=layout.tissue,
                background=background, source=None, resolution=resolution_record(slide, layout.grid),
                associated=slide.associated_images(), overwrite=overwrite, single_file=single_file,
                tool_version=__version__, glass=layout.glass, glass_paint=glass_paint, encode_margin_px=margin,
                icc_profile=slide.icc_profile,
                encoding={"tissue_threshold": None if all_tiles else tissue_threshold, "all_tiles": all_tiles,
                          "decode_halo_cells": int(getattr(autoencoder, "decode_halo_cells", 3)),
                          "decode_blend_px": int(getattr(autoencoder, "decode_blend_px", 0)),
                          "kept_at_full_resolution": layout.kept_at_full_resolution},
            )
            with writer:
                for coord, z in fitted.items():
                    writer.write_tile(*coord, quantizer.quantize(z[None])[0])
                remaining = [c for c in layout.coords if c not in fitted]
                for batch_coords, z in encode_batches(autoencoder, slide, layout.grid, remaining,
                                                      batch_size=batch_size, workers=read_workers, **context):
                    for coord, stored in zip(batch_coords, quantizer.quantize(z)):
                        writer.write_tile(*coord, stored)
                    prog.advance(task, len(batch_coords))
                # the source hash finishes in the background; it must be in the attributes before commit
                writer.source = source_record(slide, hasher.value)

    return CompressResult(
        source=str(slide_path), output=str(out_path), source_bytes=slide_path.stat().st_size,
        container_bytes=disk_bytes(out_path), tiles_total=layout.grid.rows * layout.grid.cols,
        tissue_tiles=len(layout.coords), seconds=time.perf_counter() - started,
        model_id=autoencoder.info.model_id, quantizer=quantizer.to_json(),
    )

