"""`wsicodec eval`: JPEG and model codecs scored on the same tiles, tables and a plot written."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsicodec.research import evaluate as ev
from wsicodec.cli import app

TINY_BUILTIN = {"enc_widths": [8], "enc_blocks": [1], "dec_widths": [8, 8], "dec_blocks": [1, 1]}


def _tissue_like(n: int, size: int, seed: int) -> np.ndarray:
    """Pink/purple H&E-like fields with nuclei-sized blobs (real enough for JPEG and tissue checks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        img = np.empty((size, size, 3), np.float32)
        img[:] = (230, 160, 200)
        for _ in range(40):
            cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(3, 9))]
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[blob] = (110, 60, 150)
        img += rng.normal(0, 8, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def tile_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    for i, t in enumerate(_tissue_like(3, 256, seed=1)):
        Image.fromarray(t).save(d / f"t{i}.png")
    return d


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch

    from wsicodec.models.builtin import build_net, save_builtin_folder

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models") / "tiny"
    save_builtin_folder(build_net(TINY_BUILTIN), d, model_id="tiny-random", extra={"id": "tiny-random"})
    return d


def test_eval_cli_jpeg_and_tiny_model_writes_every_output(tile_folder, tiny_model_dir, tmp_path):
    out = {k: tmp_path / f"r.{k}" for k in ("csv", "json", "md", "png")}
    res = CliRunner().invoke(app, [
        "eval", str(tile_folder), "--model", str(tiny_model_dir), "--quant", "none,int8,kmeans", "--baseline", "",
        "--jpeg", "75,20", "--embedder", "lpips-alex", "--csv", str(out["csv"]), "--json", str(out["json"]),
        "--markdown", str(out["md"]), "--plot", str(out["png"]), "--device", "cpu", "-q",
    ])
    assert res.exit_code == 0, res.output
    assert "Fidelity per codec" in res.output and "KB/tile" in res.output

    rows = list(csv.DictReader(out["csv"].open()))
    assert [(r["family"], r["setting"]) for r in rows] == [
        ("JPEG", "q75"), ("JPEG", "q20"), ("tiny-random", "none"), ("tiny-random", "int8"), ("tiny-random", "kmeans")]
    data = json.loads(out["json"].read_text())
    assert data["n_tiles"] == 3 and len(data["rows"]) == 5
    by = {r["codec"]: r for r in data["rows"]}
    # float16 latents cost more than uint8 indices; JPEG q75 more than q20
    assert by["tiny-random none"]["bytes_per_tile"] > by["tiny-random int8"]["bytes_per_tile"] > 0
    assert by["JPEG q75"]["bytes_per_tile"] > by["JPEG q20"]["bytes_per_tile"]
    assert by["JPEG q75"]["psnr"] > by["JPEG q20"]["psnr"]
    md = out["md"].read_text()
    assert md.startswith("| Codec | KB/tile | PSNR (dB) | SSIM | LPIPS-Alex |") and "tiny-random int8" in md
    with Image.open(out["png"]) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 400
    assert not list(tmp_path.glob(".*.tmp"))


def test_rate_distortion_curves_one_per_codec_family(tile_folder, tiny_model_dir):
    from wsicodec.models import load_model

    tiles = ev.load_eval_tiles([tile_folder])
    report = ev.evaluate(tiles, models=[load_model(str(tiny_model_dir), "cpu")], quants="int8,uniform:16",
                         jpeg=[50, 10], embedders=[], device="cpu")
    curves = report.curves("psnr")
    assert set(curves) == {"JPEG", "tiny-random"}
    assert [s for _, _, s in curves["JPEG"]] == ["q10", "q50"]  # ordered by bytes
    assert {s for _, _, s in curves["tiny-random"]} == {"int8", "uniform:16"}
    # fewer levels -> fewer stored bytes
    by = {r.setting: r for r in report.rows}
    assert by["uniform:16"].bytes_per_tile < by["int8"].bytes_per_tile


def test_jpeg_ordering_on_real_cmu1_tiles(cmu1_path):
    tiles = ev.load_eval_tiles([cmu1_path], max_tiles=6, seed=0)
    report = ev.evaluate(tiles, jpeg=[75, 50, 20, 10], embedders=[], device="cpu")
    rows = report.rows
    for hi, lo in zip(rows, rows[1:]):
        assert hi.bytes_per_tile > lo.bytes_per_tile
        assert hi.psnr > lo.psnr
        assert hi.ssim > lo.ssim
        if not np.isnan(hi.lpips):
            assert hi.lpips < lo.lpips


def test_unavailable_foundation_model_is_one_message_and_eval_continues(tile_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    warnings: list[str] = []
    tiles = ev.load_eval_tiles([tile_folder])
    report = ev.evaluate(tiles, jpeg=[50], embedders=["uni", "gigapath", "phikon-v2"], device="cpu",
                         warn=warnings.append)
    assert len(warnings) >= 3 and all("\n" not in w for w in warnings)
    assert any("UNI" in w for w in warnings)
    assert report.embedders == [] and len(report.rows) == 1


@pytest.mark.parametrize("args, needle", [
    (["/nonexistent/tiles"], "not found"),
    (["{tiles}", "--quant", "zip"], "unknown quantiser"),
    (["{tiles}", "--jpeg", "75,abc"], "--jpeg"),
    (["{tiles}", "--plot", "{tmp}/x.jpg"], "PNG"),
    (["{tiles}", "--csv", "/nonexistent/dir/x.csv"], "does not exist"),
    (["{tiles}", "--model", "no-such-model"], "unknown model"),
    (["{tiles}", "--embedder", "unii"], "unknown embedder"),
])
def test_bad_inputs_are_one_line_errors(tile_folder, tmp_path, args, needle):
    args = [a.format(tiles=tile_folder, tmp=tmp_path) for a in args]
    res = CliRunner().invoke(app, ["eval", *args, "--jpeg", "50", "-q"] if "--jpeg" not in args else ["eval", *args, "-q"])
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    err_lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and needle in err_lines[0], res.output


def test_taef2_quantisers_side_by_side(taef2_dir, cmu1_path):
    from wsicodec.models import load_model

    tiles = ev.load_eval_tiles([cmu1_path], max_tiles=2, seed=1)
    report = ev.evaluate(tiles, models=[load_model(str(taef2_dir), "cpu")], quants="none,int8,kmeans", jpeg=[],
                         embedders=[], device="cpu", batch_size=2)
    by = {r.setting: r for r in report.rows}
    assert set(by) == {"none", "int8", "kmeans"}
    assert by["none"].bytes_per_tile > by["kmeans"].bytes_per_tile
    for r in report.rows:
        assert r.psnr > 20  # TAEF2 reconstructs CMU-1 tissue at about 25 dB
    assert abs(by["kmeans"].psnr - by["none"].psnr) < 1.5
