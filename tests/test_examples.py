"""The scripts in examples/ run as a user would run them (a subprocess each) on a small synthetic slide.

One 1024 x 1024 slide at 0.25 µm/px (archived at 0.5 µm/px: 512 x 512, 4 tiles) is archived once with the
builtin default model by examples/archive_folder.py; the other examples read that container.
"""

from __future__ import annotations

import ast
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import wsicodec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPTS = ["archive_folder.py", "serve_deepzoom.py", "compare_region.py"]


def run_example(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # the scripts import the same wsicodec as this test run, installed or not
    package_root = str(Path(wsicodec.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def archived(tmp_path_factory, synthetic_slide_factory):
    """(work folder, slide, container, archive_folder.py's stdout): the synthetic slide archived by the example."""
    root = tmp_path_factory.mktemp("examples")
    slides = root / "slides"
    slides.mkdir()
    slide = slides / "case-001.svs"
    shutil.copy(synthetic_slide_factory(1024, 1024, mpp=0.25, levels=[1, 4], seed=0), slide)
    (slides / "notes.txt").write_text("not a slide: ignored")
    stdout = ok(run_example("archive_folder.py", slides, root / "archive", cwd=root))
    return root, slide, root / "archive" / "case-001.pzarr", stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_example_says_how_to_run_it(script):
    doc = ast.get_docstring(ast.parse((EXAMPLES / script).read_text(encoding="utf-8")))
    assert doc and f"python examples/{script}" in doc


def test_archive_folder_prints_a_table_and_the_savings(archived):
    _, slide, container, stdout = archived
    assert container.exists()
    with wsicodec.open(container) as restored:
        assert restored.dimensions == (512, 512)  # 1024 px at 0.25 µm/px archived at 0.5 µm/px
    assert "ratio" in stdout and "notes.txt" not in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("case-001.svs"))
    assert re.search(r"\s\d+\.\dx\s", row) and "/4" in row  # ratio, tissue tiles of 4
    total = re.search(r"total: 1 slide\(s\) archived .*ratio (\d+\.\d)x, saved .*\((-?\d+\.\d) %\)", stdout)
    assert total, stdout
    on_disk = sum(p.stat().st_size for p in container.rglob("*") if p.is_file())
    assert float(total.group(1)) == pytest.approx(slide.stat().st_size / on_disk, abs=0.06)


def test_archive_folder_skips_what_exists_and_reports_what_fails(archived):
    root, slide, container, _ = archived
    again = root / "again"
    again.mkdir()
    shutil.copy(slide, again / slide.name)
    (again / "broken.svs").write_bytes(b"not a slide at all")
    before = container.stat().st_mtime_ns
    proc = run_example("archive_folder.py", again, container.parent, cwd=root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^broken\.svs\s+error: ", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^case-001\.svs\s+skipped: ", proc.stdout, re.MULTILINE), proc.stdout
    assert "broken.svs" in proc.stderr
    assert container.stat().st_mtime_ns == before and not (container.parent / "broken.pzarr").exists()


def test_serve_deepzoom_writes_tiles_and_descriptor(archived):
    root, _, container, _ = archived
    out = root / "deepzoom"
    stdout = ok(run_example("serve_deepzoom.py", container, "--out", out, cwd=root))
    assert re.search(r"DeepZoom: 10 levels", stdout), stdout  # 512 px: levels 1 px ... 512 px
    assert "level  9:     512 x 512" in stdout
    assert 'Width="512"' in (out / "case-001.dzi").read_text()
    written = [Path(p) for p in re.findall(r"^wrote (\S+\.jpeg)", stdout, re.MULTILINE)]
    assert len(written) == 3, stdout
    levels = set()
    for path in written:
        path = path if path.is_absolute() else root / path
        assert path.parent.parent == out / "case-001_files"
        levels.add(int(path.parent.name))
        with Image.open(path) as tile:
            assert tile.format == "JPEG" and tile.mode == "RGB"
            assert 16 <= max(tile.size) <= 254 + 2  # never a sliver: the tile holding each level's centre
    assert 9 in levels and len(levels) == 3


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_compare_region_on_the_tissue_by_default(archived):
    root, slide, container, _ = archived
    out = root / "compare" / "side_by_side.png"
    stdout = ok(run_example("compare_region.py", slide, container, "--size", "256", "--out", out, cwd=root))
    assert "scale: 2.0000 source px per archived px" in stdout, stdout
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (3 * 256, 256)
        panel = np.asarray(png.convert("RGB"))
    source, restored = panel[:, :256], panel[:, 256:512]
    assert (source.mean(axis=2) < 215).mean() > 0.2  # the default region is on tissue, not on glass
    printed = float(re.search(r"PSNR (\S+) dB", stdout).group(1))
    assert printed == pytest.approx(_psnr(source, restored), abs=0.01)
    # the two panels show the same place: shifting either one by a few pixels makes them differ more
    for dy, dx in ((0, 3), (3, 0)):
        assert printed > _psnr(source[dy:, dx:], restored[:256 - dy, :256 - dx]) + 0.5
        assert printed > _psnr(source[:256 - dy, :256 - dx], restored[dy:, dx:]) + 0.5


def test_compare_region_maps_source_coordinates_to_the_archive(archived):
    root, slide, container, _ = archived
    stdout = ok(run_example("compare_region.py", slide, container, "--x", "400", "--y", "200",
                            "--size", "128", "--out", "cmp.png", cwd=root))
    assert "source   region: (400, 200) 256 x 256" in stdout, stdout  # 128 archived px = 256 source px
    assert "restored region: (200, 100) 128 x 128" in stdout, stdout
    with Image.open(root / "cmp.png") as png:
        assert png.size == (3 * 128, 128)
