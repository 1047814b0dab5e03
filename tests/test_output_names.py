"""What a user names is what they get: output suffixes are honoured or refused in one line, progress bars
stay on stderr (and off in the Python API unless asked), and `verify --source` tells a different slide
from a damaged container. Real compress/restore on a small synthetic slide with a tiny random model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsicodec.cli import app
from wsicodec.pipeline.restore import restore, restore_region

from test_restore import out_files, tiny_container, tiny_model_dir  # noqa: F401


def run(*args: str, env: dict | None = None):
    # stdout and stderr apart: a progress bar on stdout would corrupt `wsicodec ... > file`
    return CliRunner().invoke(app, list(args), env=env)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------ restore: the output's suffix
def test_whole_slide_png_is_a_png_of_level_0(tiny_container, tmp_path):
    out = tmp_path / "whole.png"
    r = run("restore", str(tiny_container), str(out), "--device", "cpu")
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1500, 1200)
        pixels = np.asarray(im.convert("RGB"))
    # the same pixels as the region restore of the whole slide
    region = restore_region(tiny_container, None, 0, 0, 1500, 1200, device="cpu")
    assert np.array_equal(pixels, region)
    assert out_files(tmp_path) == ["whole.png"]


def test_whole_slide_too_large_for_one_image_is_refused(tiny_container, tmp_path, monkeypatch):
    import wsicodec.pipeline.restore as rs

    monkeypatch.setattr(rs, "WHOLE_IMAGE_MAX_PIXELS", 1000 * 1000)
    r = run("restore", str(tiny_container), str(tmp_path / "out.jpg"), "--device", "cpu")
    assert r.exit_code != 0
    line = one_error_line(r)
    assert ".tif/.tiff" in line and "--region" in line and "1500x1200" in line
    assert out_files(tmp_path) == []


@pytest.mark.parametrize("name", ["out.pzarr2", "out", "out.txt"])
def test_whole_slide_to_a_name_no_image_has_is_refused(tiny_container, tmp_path, name):
    r = run("restore", str(tiny_container), str(tmp_path / name), "--device", "cpu")
    assert r.exit_code != 0
    assert ".tif/.tiff" in one_error_line(r)
    assert out_files(tmp_path) == []


def test_dicom_folder_named_like_a_file_is_refused(tiny_container, tmp_path):
    pytest.importorskip("pydicom")
    for name in ("d.tiff", "d.svs", "d.png"):
        r = run("restore", str(tiny_container), str(tmp_path / name), "--format", "dicom", "--device", "cpu")
        assert r.exit_code != 0
        assert "folder" in one_error_line(r)
    assert out_files(tmp_path) == []


# ------------------------------------------------------------------ compress: the container's suffix
@pytest.mark.parametrize("name,extra", [("x.tiff", []), ("x", []), ("x.pzarr.zip", []), ("x.zip", ["--single-file"])])
def test_compress_refuses_a_name_that_is_not_a_container_name(synthetic_slide, tiny_model_dir, tmp_path, name, extra):
    r = run("compress", str(synthetic_slide), str(tmp_path / name), "--model", str(tiny_model_dir), *extra)
    assert r.exit_code != 0
    line = one_error_line(r)
    assert "--force-name" in line and ".pzarr" in line
    assert out_files(tmp_path) == []


def test_compress_force_name_and_the_single_file_suffix(synthetic_slide, tiny_model_dir, tmp_path):
    r = run("compress", str(synthetic_slide), str(tmp_path / "x.tiff"), "--model", str(tiny_model_dir),
            "--device", "cpu", "--force-name", "-q")
    assert r.exit_code == 0, r.output
    r = run("compress", str(synthetic_slide), str(tmp_path / "y.pzarr.zip"), "--model", str(tiny_model_dir),
            "--device", "cpu", "--single-file", "-q")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "y.pzarr.zip", "rb") as fh:
        assert fh.read(2) == b"PK"


# ------------------------------------------------------------------ progress: stderr only; API silent
def test_progress_goes_to_stderr_and_never_stdout(tiny_container, tmp_path):
    # TTY_COMPATIBLE makes rich draw the bar although CliRunner's streams are not terminals
    r = run("restore", str(tiny_container), str(tmp_path / "a.tiff"), "--device", "cpu",
            env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"})
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("wrote ") and len(r.stdout.splitlines()) == 1, r.stdout
    assert "restoring level 0" in r.stderr or "wrote level" in r.stderr


def test_python_api_shows_no_progress_unless_asked(tiny_container, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    restore(tiny_container, tmp_path / "a.tiff", device="cpu")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    restore(tiny_container, tmp_path / "b.tiff", device="cpu", progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "level" in err


# ------------------------------------------------------------------ verify --source
def test_verify_source_that_differs_is_not_called_damage(tiny_container, synthetic_slide, tmp_path, cmu1_path):
    r = run("verify", str(tiny_container), "--source", str(synthetic_slide))
    assert r.exit_code == 0 and r.stdout.startswith("ok: "), r.output
    r = run("verify", str(tiny_container), "--source", str(cmu1_path))
    assert r.exit_code == 1
    assert "damaged" not in r.stdout
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"intact: {tiny_container}")
    assert lines[1].startswith(f"source differs: {tiny_container}: {cmu1_path.name} is not the slide")
    doc = json.loads(run("verify", str(tiny_container), "--source", str(cmu1_path), "--json").stdout)
    assert doc[0]["ok"] is False and doc[0]["intact"] is True and doc[0]["source_matches"] is False
    # a damaged container is still called damaged
    bad = tmp_path / "bad.pzarr"
    shutil.copytree(tiny_container, bad)
    victim = next(p for p in sorted(bad.rglob("*")) if p.is_file() and "latents" in p.parts and p.stat().st_size > 64)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = run("verify", str(bad), "--source", str(synthetic_slide))
    assert r.exit_code == 1 and "damaged: " in r.stdout and "source differs" not in r.stdout
