"""`wsicodec finetune`: decoder-only tuning writes a new, loadable model with its own id and hash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wsicodec.cli import app
from wsicodec.research.finetune import CKPT_DIR, CKPT_NAME, MANIFEST_NAME, FinetuneConfig, finetune
from wsicodec.models import load_model

TINY_BUILTIN = {"enc_widths": [8], "enc_blocks": [1], "dec_widths": [8, 8], "dec_blocks": [1, 1]}


def _lpips_available() -> bool:
    shared = Path(os.environ.get("WSICODEC_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return (shared / "weights" / "lpips" / "lpips_alexnet_full.safetensors").is_file()


# Feature matching needs LPIPS backbone weights (../shared); without them the FM term is off.
FM = {"fm": ["lpips-alex"], "w_fm": 1.0} if _lpips_available() else {"w_fm": 0.0}


@pytest.fixture(scope="module")
def tile_folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("ft_tiles")
    yy, xx = np.mgrid[0:256, 0:256]
    for i in range(3):
        img = np.empty((256, 256, 3), np.float32)
        img[:] = (225, 150, 195)
        for _ in range(30):
            cy, cx = rng.integers(0, 256, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (100, 50, 140)
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"t{i}.png")
    return d


@pytest.fixture()
def tiny_model_dir(tmp_path):
    from wsicodec.models.builtin import build_net, save_builtin_folder

    torch.manual_seed(0)
    d = tmp_path / "tiny"
    save_builtin_folder(build_net(TINY_BUILTIN), d, model_id="tiny-random", extra={"id": "tiny-random"})
    return d


def _cfg(model, data, out, **kw) -> FinetuneConfig:
    base = dict(model=str(model), data=[str(data)], out=str(out), steps=3, batch_size=2, crop=64, warmup=1,
                lr=1e-3, checkpoint_every=1, device="cpu", gan_start=1, **FM)
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_writes_a_new_loadable_model(tiny_model_dir, tile_folder, tmp_path):
    base = load_model(str(tiny_model_dir), "cpu")
    summary = finetune(_cfg(tiny_model_dir, tile_folder, tmp_path / "ft"), show_progress=False)
    tuned = load_model(str(tmp_path / "ft"), "cpu")
    assert tuned.info.model_id == summary["id"]
    assert tuned.info.model_id.startswith("tiny-random-ft-") and len(tuned.info.model_id) == len("tiny-random-ft-") + 8
    assert tuned.info.decoder_sha256 != base.info.decoder_sha256
    manifest = json.loads((tmp_path / "ft" / MANIFEST_NAME).read_text())
    assert manifest["base"] == "tiny-random" and manifest["finetune"]["steps"] == 3
    # the encoder is frozen: same latents before and after
    tiles = np.asarray(Image.open(next(tile_folder.glob("*.png"))).convert("RGB"))[None]
    assert torch.equal(base.encode(tiles), tuned.encode(tiles))
    assert not np.array_equal(base.decode(base.encode(tiles)), tuned.decode(tuned.encode(tiles)))


def test_resume_continues_exactly(tiny_model_dir, tile_folder, tmp_path):
    finetune(_cfg(tiny_model_dir, tile_folder, tmp_path / "straight", steps=4), show_progress=False)
    finetune(_cfg(tiny_model_dir, tile_folder, tmp_path / "split", steps=2), show_progress=False)
    ckpt = torch.load(tmp_path / "split" / CKPT_DIR / CKPT_NAME, weights_only=False)
    assert ckpt["step"] == 2
    summary = finetune(_cfg(tiny_model_dir, tile_folder, tmp_path / "split", steps=4, resume=True),
                       show_progress=False)
    ckpt = torch.load(tmp_path / "split" / CKPT_DIR / CKPT_NAME, weights_only=False)
    assert ckpt["step"] == 4 and [h["step"] for h in ckpt["history"]] == [1, 2, 3, 4]
    straight = load_model(str(tmp_path / "straight"), "cpu")
    split = load_model(str(tmp_path / "split"), "cpu")
    assert split.info.model_id == summary["id"] == straight.info.model_id
    assert split.info.decoder_sha256 == straight.info.decoder_sha256


def test_cli_finetune_and_refusals(tiny_model_dir, tile_folder, tmp_path):
    out = tmp_path / "cli-ft"
    args = ["finetune", "--model", str(tiny_model_dir), "--data", str(tile_folder), "--out", str(out),
            "--steps", "2", "--batch-size", "1", "--crop", "64", "--device", "cpu", "-q"]
    args += ["--fm", "lpips-alex"] if FM["w_fm"] else ["--fm-weight", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "tiny-random-ft-" in res.output and (out / MANIFEST_NAME).is_file()
    again = CliRunner().invoke(app, args)  # exists, no --resume / --overwrite
    assert again.exit_code != 0 and "Traceback" not in again.output
    assert [ln for ln in again.output.splitlines() if ln.startswith("error:")][0].count("exists") == 1
    missing = CliRunner().invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(tile_folder),
                                       "--out", str(tmp_path / "none"), "--resume", "-q"])
    assert missing.exit_code != 0 and "error:" in missing.output and "Traceback" not in missing.output
    bad = CliRunner().invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "x"), "-q"])
    assert bad.exit_code != 0 and "not found" in bad.output and not (tmp_path / "x").exists()


def test_finetune_taef2(taef2_dir, cmu1_path, tmp_path):
    base = load_model(str(taef2_dir), "cpu")
    cfg = _cfg(taef2_dir, cmu1_path, tmp_path / "taef2-ft", steps=2, batch_size=1, max_tiles=2, lr=5e-5)
    summary = finetune(cfg, show_progress=False)
    tuned = load_model(str(tmp_path / "taef2-ft"), "cpu")
    assert tuned.info.model_id == summary["id"] and tuned.info.model_id.startswith("taef2-ft-")
    assert tuned.info.model_class == base.info.model_class
    assert tuned.info.decoder_sha256 != base.info.decoder_sha256


def test_finetune_tiny_diffusers_kl(tile_folder, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    )
    src = tmp_path / "tiny-kl"
    vae.save_pretrained(src)
    base = load_model(str(src), "cpu")
    summary = finetune(_cfg(src, tile_folder, tmp_path / "kl-ft", steps=2, batch_size=1), show_progress=False)
    tuned = load_model(str(tmp_path / "kl-ft"), "cpu")
    assert tuned.info.model_id == summary["id"] and tuned.info.model_id.startswith("tiny-kl-ft-")
    assert tuned.info.model_class == "diffusers.AutoencoderKL"
    assert tuned.info.decoder_sha256 != base.info.decoder_sha256
    enc = {k: v for k, v in tuned.vae.state_dict().items() if k.startswith("encoder.")}
    for k, v in base.vae.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(enc[k], v)  # frozen
