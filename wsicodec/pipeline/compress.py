"""The compression pipeline, top to bottom:

    source slide -> tile grid at the archive resolution -> tissue mask -> encoder (batched)
    -> quantiser (fitted on a sample of this slide's latents) -> .pzarr container

Reading runs on threads (OpenSlide releases the GIL) and overlaps with encoding; memory is
bounded by the tiles in flight and the container's open shards, never by the slide's size.
The stages are public so that `wsicodec stats --estimate` can run the same ones on a sample.
"""

from __future__ import annotations

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

from wsicodec._io import disk_bytes
from wsicodec._progress import progress_bar
from wsicodec._version import __version__
from wsicodec.format import ContainerWriter
from wsicodec.errors import WsicodecError
from wsicodec.models import load_model
from wsicodec.models.base import Autoencoder
from wsicodec.quant.quantizer import Quantizer, make_quantizer
from wsicodec.source.slide import SourceSlide, TileGrid
from wsicodec.source.tissue import tissue_tiles

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


def plan(slide: SourceSlide, *, target_mpp: float = 0.5, tile_size: int = 256,
         all_tiles: bool = False, shard_tiles: int = 16) -> Plan:
    grid = slide.grid(target_mpp=target_mpp, tile_size=tile_size)
    # enough thumbnail pixels per tile for the tissue rule, also on very large slides
    thumbnail = slide.thumbnail(max(1024, 8 * max(grid.rows, grid.cols)))
    tissue = tissue_tiles(thumbnail, grid)
    if all_tiles:
        tissue = np.ones((grid.rows, grid.cols), dtype=bool)
    coords = [(int(r), int(c)) for r, c in zip(*np.nonzero(tissue))]
    # Shard by shard, so the writer can flush each shard as soon as its last tile arrives.
    coords.sort(key=lambda rc: (rc[0] // shard_tiles, rc[1] // shard_tiles, rc[0], rc[1]))
    return Plan(grid=grid, tissue=tissue, thumbnail=thumbnail, coords=coords)


def choose_quantizer(model: Autoencoder, kind: str | None, levels: int | None) -> Quantizer:
    """The user's choice, else the model's recommended one (builtin models record it), else K-means-256."""
    recommended = (model.info.config or {}).get("default_quantizer") or {}
    if kind is None:
        kind = recommended.get("kind", DEFAULT_QUANT)
        if levels is None:
            levels = recommended.get("levels")
    if levels is None:
        levels = DEFAULT_LEVELS
    return make_quantizer(kind, levels=levels, latent_range=model.info.latent_range)


def sample_coords(coords: Sequence[Coord], n: int, seed: int = 0) -> list[Coord]:
    if len(coords) <= n:
        return list(coords)
    return sorted(random.Random(seed).sample(list(coords), n))


def encode_batches(model: Autoencoder, slide: SourceSlide, grid: TileGrid, coords: Sequence[Coord], *,
                   batch_size: int = 16, workers: int = 2) -> Iterator[tuple[list[Coord], torch.Tensor]]:
    """Yield (coords, latents (N,C,h,w)) batch by batch; reads run ahead on threads while the model encodes."""
    batch_coords: list[Coord] = []
    batch_tiles: list[np.ndarray] = []
    for coord, tile in slide.read_tiles(grid, coords, workers=workers):
        batch_coords.append(coord)
        batch_tiles.append(tile)
        if len(batch_tiles) == batch_size:
            yield batch_coords, model.encode(np.stack(batch_tiles))
            batch_coords, batch_tiles = [], []
    if batch_tiles:
        yield batch_coords, model.encode(np.stack(batch_tiles))


def white_tile_latents(model: Autoencoder, tile_size: int) -> torch.Tensor:
    return model.encode(np.full((1, tile_size, tile_size, 3), 255, dtype=np.uint8))


def fit_quantizer(quantizer: Quantizer, model: Autoencoder, slide: SourceSlide, grid: TileGrid,
                  coords: Sequence[Coord], *, sample_tiles: int = 64, seed: int = 0, batch_size: int = 16,
                  workers: int = 2, on_batch=None) -> dict[Coord, torch.Tensor]:
    """Fit on the latents of a random sample of tissue tiles; returns those latents so they aren't encoded twice."""
    sample = sample_coords(coords, sample_tiles, seed)
    latents: dict[Coord, torch.Tensor] = {}
    for batch_coords, z in encode_batches(model, slide, grid, sample, batch_size=batch_size, workers=workers):
        latents.update(zip(batch_coords, z))
        if on_batch is not None:
            on_batch(len(batch_coords))
    if latents:
        quantizer.fit(torch.stack(list(latents.values())))
    else:  # a slide with no tissue: the codebook only has to represent glass
        quantizer.fit(white_tile_latents(model, grid.tile_size))
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



def compress(slide_path: str | os.PathLike, out_path: str | os.PathLike, *, model: str | Autoencoder | None = None,
             quant: str | None = None, levels: int | None = None, target_mpp: float = 0.5,
             source_mpp: float | None = None, tile_size: int = 256, all_tiles: bool = False,
             batch_size: int = 16, device: str | None = None, read_workers: int = 2, sample_tiles: int = 64,
             seed: int = 0, overwrite: bool = False, single_file: bool = False,
             progress: bool = False) -> CompressResult:
    """Compress one slide into a .pzarr container and return what it cost and saved."""
    started = time.perf_counter()
    slide_path, out_path = Path(slide_path), Path(out_path)
    if out_path.exists() and not overwrite:
        from wsicodec.errors import OutputExistsError
        raise OutputExistsError(f"{out_path} already exists; pass --overwrite to replace it")
    if target_mpp <= 0 or (source_mpp is not None and source_mpp <= 0):
        raise WsicodecError("resolutions must be positive numbers of µm per pixel")
    if batch_size < 1:
        raise WsicodecError("--batch-size must be at least 1")

    with SourceSlide(slide_path, source_mpp=source_mpp) as slide:
        hasher = _BackgroundHash(slide_path)
        autoencoder = model if isinstance(model, Autoencoder) else load_model(model, device=device)
        if tile_size % autoencoder.info.spatial_factor:
            raise WsicodecError(f"tile size {tile_size} is not a multiple of the model's spatial factor "
                                f"{autoencoder.info.spatial_factor}")
        quantizer = choose_quantizer(autoencoder, quant, levels)
        layout = plan(slide, target_mpp=target_mpp, tile_size=tile_size, all_tiles=all_tiles)

        prog = progress_bar(progress, unit="tiles")
        with prog:
            task = prog.add_task("compress", total=len(layout.coords))
            fitted = fit_quantizer(quantizer, autoencoder, slide, layout.grid, layout.coords,
                                   sample_tiles=sample_tiles, seed=seed, batch_size=batch_size,
                                   workers=read_workers, on_batch=lambda n: prog.advance(task, n))
            background = quantizer.quantize(white_tile_latents(autoencoder, tile_size))[0]
            writer = ContainerWriter(
                out_path, grid=layout.grid, model=autoencoder.info, quantizer=quantizer, tissue=layout.tissue,
                background=background, source=None, resolution=resolution_record(slide, layout.grid),
                associated=slide.associated_images(), overwrite=overwrite, single_file=single_file,
                tool_version=__version__,
            )
            with writer:
                for coord, z in fitted.items():
                    writer.write_tile(*coord, quantizer.quantize(z[None])[0])
                remaining = [c for c in layout.coords if c not in fitted]
                for batch_coords, z in encode_batches(autoencoder, slide, layout.grid, remaining,
                                                      batch_size=batch_size, workers=read_workers):
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

