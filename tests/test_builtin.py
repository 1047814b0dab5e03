"""The builtin model: architecture, packaged default weights, model folders written by train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsicodec.errors import ModelError
from wsicodec.models import builtin
from wsicodec.models.builtin import (
    BUILTIN_MODELS,
    DEFAULT_MODEL_ID,
    MANIFEST_NAME,
    CodecNet,
    load_builtin,
    load_builtin_folder,
    save_builtin_folder,
)

TINY = {"enc_widths": [8], "enc_blocks": [1], "dec_widths": [8, 8], "dec_blocks": [1, 1]}


def he_like_tiles(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """Synthetic H&E-like uint8 tiles: smooth eosin stroma with haematoxylin-dark nuclei and a little glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, size, size, 3), np.uint8)
    od_h = np.array([0.65, 0.70, 0.29], np.float32)
    od_e = np.array([0.13, 0.85, 0.48], np.float32)
    for i in range(n):
        eosin = 0.35 + 0.15 * np.sin(xx / rng.uniform(12, 30) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(12, 30))
        hema = np.zeros((size, size), np.float32)
        for _ in range(40):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 7)
            hema += 0.9 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        od = eosin[..., None] * od_e + np.minimum(hema, 1.2)[..., None] * od_h
        out[i] = np.clip(255 * np.power(10.0, -od), 0, 255).astype(np.uint8)
    return out


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def test_architecture_shapes_and_bounded_latents():
    net = CodecNet(dict(TINY, factor=8, latent_channels=4))
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        z = net.encoder(x * 50)  # extreme inputs still give latents inside the bound
    assert z.shape == (2, 4, 8, 12)
    assert float(z.abs().max()) <= net.config["bound"]
    assert net.decoder(z).shape == (2, 3, 64, 96)


def test_no_convolution_runs_at_full_resolution():
    net = CodecNet()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, 256, 256))
    for h in hooks:
        h.remove()
    assert seen and max(seen) <= 256 // 4


def test_other_factor_builds():
    net = CodecNet(dict(factor=16, latent_channels=16, enc_stem=16, enc_widths=[32], enc_blocks=[1],
                        dec_stem=4, dec_widths=[16, 16, 8], dec_blocks=[1, 1, 1]))
    z = net.encoder(torch.zeros(1, 3, 64, 64))
    assert z.shape == (1, 16, 4, 4)
    assert net.decoder(z).shape == (1, 3, 64, 64)


def test_bad_factor_is_a_model_error():
    with pytest.raises(ModelError):
        CodecNet(dict(TINY, factor=12))


def test_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    net = CodecNet(dict(TINY))
    save_builtin_folder(net, tmp_path / "m", model_id="local:test-m")
    manifest = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    assert manifest["architecture"] == "builtin" and manifest["id"] == "local:test-m"
    ae = load_builtin_folder(tmp_path / "m", "cpu")
    assert ae.info.model_id == "local:test-m"
    assert ae.info.latent_range == (-3.0, 3.0) and ae.info.input_range == (-1.0, 1.0)
    tiles = he_like_tiles(2, 64)
    z = ae.encode(tiles)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    out = ae.decode(z)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    # the folder reproduces the network exactly (float32 weights)
    with torch.no_grad():
        ref = net.encoder(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.allclose(z, ref, atol=1e-5)


def test_folder_loads_through_load_model(tmp_path):
    from wsicodec.models import load_model

    save_builtin_folder(CodecNet(dict(TINY)), tmp_path / "m2")
    ae = load_model(str(tmp_path / "m2"), "cpu")
    assert ae.info.model_class == builtin.MODEL_CLASS
    assert ae.decode(ae.encode(he_like_tiles(1, 32))).shape == (1, 32, 32, 3)


def test_weights_file_without_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / MANIFEST_NAME).write_text(json.dumps({"format": "wsicodec-model", "format_version": 1,
                                                            "architecture": "builtin", "id": "x"}))
    with pytest.raises(ModelError, match="wsicodec_config"):
        load_builtin_folder(tmp_path / "m")


def test_unknown_builtin_id():
    with pytest.raises(ModelError, match="unknown builtin model"):
        load_builtin("wsicodec-base-f99c1-v0")


# ------------------------------------------------------------------ the packaged default
PACKAGED = builtin.WEIGHTS_DIR / BUILTIN_MODELS[DEFAULT_MODEL_ID]


def test_packaged_weights_are_small_fp16():
    assert PACKAGED.is_file(), f"the default model's weights must ship in the package: {PACKAGED}"
    assert PACKAGED.stat().st_size <= 5 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(PACKAGED), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())


def test_packaged_default_reconstructs_he_tile_offline():
    ae = load_builtin(DEFAULT_MODEL_ID, "cpu")
    assert ae.info.model_id == DEFAULT_MODEL_ID
    assert ae.info.spatial_factor == 8 and ae.info.latent_channels == 12
    assert ae.operating_points() == ["low", "default", "high"]
    assert ae.info.config["default_quantizer"] == {"kind": "rd", "quality": "default"}
    tiles = he_like_tiles(2, 256, seed=3)
    z = ae.encode(tiles)
    assert z.shape == (2, 12, 32, 32)
    psnrs = []
    for quality in ae.operating_points():  # through each point's grid, as compress stores it
        q = ae.operating_point_quantizer(quality)
        psnrs.append(psnr_u8(tiles, ae.decode(q.dequantize(q.quantize(z)))))
    assert psnrs[1] > 24.0 and psnrs[0] < psnrs[1] < psnrs[2]


def test_packaged_v1_still_loads_and_reconstructs():
    """0.2's default keeps shipping: its containers name it and must restore as they always did."""
    ae = load_builtin(builtin.V1_MODEL_ID, "cpu")
    assert ae.info.latent_channels == 4 and ae.operating_points() == []
    assert ae.info.decoder_sha256 == "100f0e2abc6fe11573da812d7274e15679bf42699ab4dd2440dda96ed9c1158c"
    q = ae.info.config["default_quantizer"]
    assert q == {"kind": "uniform", "levels": 40}  # as packaged (model card)
    tiles = he_like_tiles(2, 256, seed=3)
    z = ae.encode(tiles)
    lo, hi = ae.info.latent_range
    step = (hi - lo) / (q["levels"] - 1)
    zq = torch.round((z - lo) / step) * step + lo
    assert psnr_u8(tiles, ae.decode(zq)) > 24.0


def test_packaged_default_is_what_load_model_gives_without_a_name():
    from wsicodec.models import load_model

    ae = load_model(None, "cpu")
    assert ae.info.model_id == DEFAULT_MODEL_ID
    assert ae.info.decoder_sha256 == load_builtin(DEFAULT_MODEL_ID, "cpu").info.decoder_sha256
