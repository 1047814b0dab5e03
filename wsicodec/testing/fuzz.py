"""Bit-flip fuzzing of containers: is every flip that changes anything refused?

    results = fuzz_container(path, flips=200, seed=0, model=autoencoder)   # -> list[FlipResult]
    detection_table(results) -> str                                        # per kind of stored file

Each flip copies the container, flips one random bit in one stored file (files are picked kind by kind,
so rare kinds such as the codebook get as many flips as the big latent shards), then asks two questions:
does ``Container.open(...).verify()`` refuse it, and does a full restore (``wsicodec.restore`` to a TIFF)
refuse it? A flip neither refuses must be harmless: the restored pixels, associated images and attributes
equal the intact container's.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import warnings
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FlipResult:
    kind: str  # which kind of stored file was hit
    key: str
    bit: int
    verify_refused: bool
    restore_refused: bool
    changed: bool | None  # None when both refused (nothing to compare)

    @property
    def silent(self) -> bool:
        """The failure we hunt: accepted by verify or restore although it changed something."""
        return (not self.verify_refused or not self.restore_refused) and bool(self.changed)


def _kind(key: str) -> str:
    if key == "zarr.json":
        return "root attributes"
    if key.endswith("zarr.json"):
        return "array metadata"
    top = key.split("/")[0]
    return {"latents": "latent shard", "associated": "associated image", "integrity": "integrity manifest"}.get(
        top, top)


def _restore(path: Path, out: Path, model: Any) -> tuple[np.ndarray, dict[str, Any], dict[str, bytes]]:
    import tifffile

    from wsicodec.format.container import Container
    from wsicodec.pipeline.restore import restore

    restore(path, out, compression="zstd", progress=False, _model_obj=model)
    with tifffile.TiffFile(out) as tf:
        pixels = tf.pages[0].asarray()
        extra = {f"page{i}": p.asarray().tobytes() for i, p in enumerate(tf.pages[1:])}
    with Container.open(path) as c:
        attrs = c.attrs
    return pixels, attrs, extra


def _flip(path: Path, key: str, rng: random.Random, layout: str) -> int:
    """Flip one bit of ``key``'s stored bytes; in a zip, of the member's bytes as they lie in the file."""
    if layout == "directory":
        f = path / key
        data = bytearray(f.read_bytes())
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        f.write_bytes(bytes(data))
        return bit
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key)
    data = bytearray(path.read_bytes())
    # the member's local header and data: what a reader of that member interprets
    start = info.header_offset
    end = start + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size
    bit = rng.randrange(start * 8, end * 8)
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    return bit


def fuzz_container(path: str | Path, *, flips: int, seed: int, model: Any) -> list[FlipResult]:
    from wsicodec.format.container import Container
    from wsicodec.format.integrity import KeyStore

    path = Path(path)
    layout = "zip" if path.is_file() else "directory"
    store = KeyStore.for_path(path)
    keys = list(store.keys())
    store.close()
    by_kind: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        by_kind[_kind(k)].append(k)
    kinds = sorted(by_kind)
    rng = random.Random(seed)
    results: list[FlipResult] = []
    with tempfile.TemporaryDirectory(prefix="wsicodec-fuzz-") as tmp:
        tmp_path = Path(tmp)
        base_pixels, base_attrs, base_extra = _restore(path, tmp_path / "base.tiff", model)
        for n in range(flips):
            kind = kinds[n % len(kinds)]
            key = rng.choice(by_kind[kind])
            work = tmp_path / f"flip{path.suffix}"
            if work.exists():
                shutil.rmtree(work) if work.is_dir() else work.unlink()
            (shutil.copytree if layout == "directory" else shutil.copyfile)(path, work)
            bit = _flip(work, key, rng, layout)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    with Container.open(work) as c:
                        found = c.verify()  # a list of problems (wsicodec < 0.2 returned a tile count)
                    verify_refused = isinstance(found, list) and bool(found)
                except Exception:
                    verify_refused = True
                out = tmp_path / f"out{n}.tiff"
                try:
                    pixels, attrs, extra = _restore(work, out, model)
                    restore_refused = False
                except Exception:
                    restore_refused = True
                    pixels = attrs = extra = None
                out.unlink(missing_ok=True)
            changed = None
            if not (verify_refused and restore_refused):
                if pixels is None:  # verify passed it and restore refused: refused is safe, compare nothing
                    changed = False
                else:
                    changed = (pixels.shape != base_pixels.shape or not np.array_equal(pixels, base_pixels)
                               or attrs != base_attrs or extra != base_extra)
            results.append(FlipResult(kind, key, bit, verify_refused, restore_refused, changed))
    return results


def detection_table(results: list[FlipResult]) -> str:
    """One row per kind: flips, refused by verify, by restore, accepted but harmless, silent damage."""
    rows = defaultdict(lambda: [0, 0, 0, 0, 0])
    for r in results:
        row = rows[r.kind]
        row[0] += 1
        row[1] += r.verify_refused
        row[2] += r.restore_refused
        row[3] += (not r.verify_refused or not r.restore_refused) and not r.changed
        row[4] += r.silent
    lines = [f"{'kind':<20} {'flips':>6} {'verify':>7} {'restore':>8} {'harmless':>9} {'silent':>7}"]
    total = [0, 0, 0, 0, 0]
    for kind in sorted(rows):
        row = rows[kind]
        total = [a + b for a, b in zip(total, row)]
        lines.append(f"{kind:<20} {row[0]:>6} {row[1]:>7} {row[2]:>8} {row[3]:>9} {row[4]:>7}")
    lines.append(f"{'all':<20} {total[0]:>6} {total[1]:>7} {total[2]:>8} {total[3]:>9} {total[4]:>7}")
    return "\n".join(lines)
