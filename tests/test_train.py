"""`wsicodec train`: the loop learns, checkpoints resume exactly, the result is a loadable model folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wsicodec.cli import app
from wsicodec.research.data import image_crops, load_tiles, resample_area
from wsicodec.errors import WsicodecError
from wsicodec.models.builtin import MANIFEST_NAME
from wsicodec.research.train import CHECKPOINT_NAME, TrainConfig, augment, quant_noise, quantize_uniform, train

from test_builtin import he_like_tiles

TINY = {"enc_widths": [8], "enc_blocks": [1], "dec_widths": [8, 8], "dec_blocks": [1, 1]}


@pytest.fixture(scope="module")
def tile_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiles") / "tiles.npy"
    np.save(path, he_like_tiles(24, 64, seed=7))
    return path


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=[str(data)], out=out, steps=8, batch_size=4, crop=32, lr=5e-3, warmup=2, arch=dict(TINY),
                lpips_weight=0.0, holdout=4, eval_every=4, ckpt_every=4, threads=1, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_and_folder_loads(tile_cache, tmp_path):
    out = train(_cfg(tile_cache, tmp_path / "m", steps=60, eval_every=20, ckpt_every=60), progress=False,
                log=lambda m: None)
    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    hist = ckpt["history"]
    assert [h["step"] for h in hist] == [20, 40, 60]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["psnr"] > hist[0]["psnr"]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["architecture"] == "builtin"
    from wsicodec.models import load_model

    ae = load_model(str(out), "cpu")
    tiles = he_like_tiles(2, 64, seed=99)
    assert ae.decode(ae.encode(tiles)).shape == tiles.shape


def test_resume_continues_exactly(tile_cache, tmp_path):
    log = lambda m: None  # noqa: E731
    train(_cfg(tile_cache, tmp_path / "straight", steps=8), progress=False, log=log)
    train(_cfg(tile_cache, tmp_path / "split", steps=8, stop_at=4), progress=False, log=log)
    assert torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=False)["step"] == 4
    train(_cfg(tile_cache, tmp_path / "split", steps=8, resume=True), progress=False, log=log)
    a = torch.load(tmp_path / "straight" / CHECKPOINT_NAME, weights_only=False)
    b = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=False)
    assert b["step"] == 8
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6), k


def test_existing_output_needs_resume(tile_cache, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "something").write_text("x")
    with pytest.raises(WsicodecError, match="--resume"):
        train(_cfg(tile_cache, tmp_path / "m"), progress=False, log=lambda m: None)
    with pytest.raises(WsicodecError, match="no checkpoint"):
        train(_cfg(tile_cache, tmp_path / "empty", resume=True), progress=False, log=lambda m: None)


def test_quantisation_noise_is_one_step_wide():
    z = torch.zeros(10000)
    n = quant_noise(z, 3.0, 64)
    step = 6.0 / 63
    assert float(n.abs().max()) <= step / 2 + 1e-6 and float(n.std()) > step / 4
    q = quantize_uniform(torch.linspace(-3, 3, 1000), 3.0, 64)
    assert len(torch.unique(q)) == 64


def test_augment_keeps_range_and_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    y = augment(x, g)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert not torch.equal(x, y)


def test_cli_train_then_resume(tile_cache, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-model"
    args = ["train", "--data", str(tile_cache), "--out", str(out), "--steps", "3", "--batch-size", "2",
            "--crop", "32", "--lpips-weight", "0", "--threads", "1", "--eval-every", "3", "--checkpoint-every", "3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / MANIFEST_NAME).is_file()
    r = runner.invoke(app, args)
    assert r.exit_code != 0 and "--resume" in r.output
    r = runner.invoke(app, args[:6] + ["5"] + args[7:] + ["--resume"])
    assert r.exit_code == 0, r.output
    assert torch.load(out / CHECKPOINT_NAME, weights_only=False)["step"] == 5


def test_cli_missing_data_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0
    assert "input not found" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------ data
def test_image_folder_tiles_cover_edges_and_skip_glass(tmp_path):
    tissue = he_like_tiles(1, 300, seed=2)[0]
    rgba = np.dstack([tissue, np.full(tissue.shape[:2], 255, np.uint8)])
    rgba[:, 180:, 3] = 0  # transparent right part -> composited on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((256, 256, 3), 245, np.uint8)).save(tmp_path / "glass.png")
    tiles = load_tiles([tmp_path], tile_size=128)
    # a.png: 300 px -> crops at 0, 128, 172 per axis = 9; the right column (8 of 128 px tissue) and glass.png go
    assert tiles.shape[1:] == (128, 128, 3)
    assert len(tiles) == 6
    assert all((t < 200).any() for t in tiles)


def test_images_are_resampled_with_area_averaging():
    img = np.zeros((4, 4, 3), np.uint8)
    img[::2, ::2] = 200
    out = resample_area(img, 0.5)
    assert out.shape == (2, 2, 3) and (out == 50).all()


def test_crop_grid_aligns_last_row_to_edge():
    img = he_like_tiles(1, 100, seed=4)[0]
    crops = list(image_crops(img, 64, min_tissue=0))
    assert len(crops) == 4
    assert np.array_equal(crops[-1], img[36:, 36:])


def test_slide_tissue_tiles(cmu1_path):
    tiles = load_tiles([cmu1_path], max_tiles=5, seed=0)
    assert tiles.shape == (5, 256, 256, 3) and tiles.dtype == np.uint8
    assert all(float((t.astype(int).max(2) - t.astype(int).min(2) > 20).mean()) > 0.05 for t in tiles)


def test_gan_phase_trains_discriminator_and_resumes(tile_cache, tmp_path):
    from wsicodec.research.gan import PatchDiscriminator, d_loss, g_loss

    out = train(_cfg(tile_cache, tmp_path / "g", steps=4, gan_after=2, stop_at=3), progress=False, log=lambda m: None)
    ck = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    assert ck["step"] == 3 and ck["disc"] is not None
    d0 = PatchDiscriminator(32, 3)
    d0.load_state_dict(ck["disc"])
    train(_cfg(tile_cache, out, steps=4, gan_after=2, resume=True), progress=False, log=lambda m: None)
    assert torch.load(out / CHECKPOINT_NAME, weights_only=False)["step"] == 4
    logits = d0(torch.zeros(2, 3, 64, 64))
    assert logits.shape[0] == 2 and logits.shape[1] == 1
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert float(d_loss(real, fake)) == 0.0 and float(d_loss(fake, real)) > 0  # hinge: confident and right costs 0
    assert float(g_loss(fake)) > float(g_loss(real))
    assert float(d_loss(real.new_ones(4), real.new_zeros(4), "ls")) == 0.0


@pytest.mark.skipif(not (__import__("wsicodec.research.lpips", fromlist=["x"]).lpips_weights_dir()
                         / "lpips_alexnet_full.safetensors").is_file(), reason="LPIPS weights absent (../shared)")
def test_training_with_lpips_term(tile_cache, tmp_path):
    out = train(_cfg(tile_cache, tmp_path / "l", steps=3, lpips_weight=0.5), progress=False, log=lambda m: None)
    assert torch.load(out / CHECKPOINT_NAME, weights_only=False)["step"] == 3
