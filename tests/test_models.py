"""Autoencoders behind one interface: registry names, local folders, manifests, errors, restore lookup.

Diffusers adapters are exercised on tiny random configs saved with save_pretrained (milliseconds to
build); TAEF2 on its real weights from ../shared (skipped where they are absent) and on random
weights in the same layout for everything that needs no pretrained fidelity.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wsicodec.errors import ModelError
from wsicodec.models import (
    MANIFEST_NAME,
    Autoencoder,
    Family,
    ModelInfo,
    ModelSpec,
    list_models,
    load_folder,
    load_model,
    models_table,
    pick_device,
    read_manifest,
    register_family,
    resolve_model,
    write_manifest,
)
from wsicodec.models import hub, registry
from wsicodec.models.family import unregister_family
from wsicodec.models.taesd import (
    DECODER_FILE,
    ENCODER_FILE,
    TAEF2_PUBLISHED_DECODER_SHA256,
    build_decoder,
    build_encoder,
)


def _tiles(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish content so decoders see something image-like
    base = rng.integers(0, 256, (n, size // 8, size // 8, 3), dtype=np.uint8)
    return np.ascontiguousarray(base.repeat(8, axis=1).repeat(8, axis=2))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg, msg
    return msg


# ------------------------------------------------------------------------------ tiny diffusers models
def _tiny_kl(channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    extra = {} if channels == 4 else {"use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        latent_channels=channels,
        **extra,
    )


def _tiny_dc():
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=4,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    )


def _tiny_tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4,
        num_encoder_blocks=(1,) * 4,
        num_decoder_blocks=(1,) * 4,
        latent_channels=4,
    )


TINY = {
    # name: (factory, class, latent channels, spatial factor, latent_range)
    "kl4": (lambda: _tiny_kl(4), "diffusers.AutoencoderKL", 4, 8, None),
    "kl16": (lambda: _tiny_kl(16), "diffusers.AutoencoderKL", 16, 8, None),
    "dc": (_tiny_dc, "diffusers.AutoencoderDC", 32, 32, None),
    "tiny": (_tiny_tiny, "diffusers.AutoencoderTiny", 4, 8, (-3.0, 3.0)),
}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-diffusers")
    out = {}
    for name, (factory, *_rest) in TINY.items():
        factory().save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_folder_loads_with_right_adapter(tiny_folders, name):
    _, cls, channels, factor, latent_range = TINY[name]
    model = load_model(str(tiny_folders[name]), device="cpu")
    info = model.info
    assert info.model_class == cls
    assert (info.latent_channels, info.spatial_factor) == (channels, factor)
    assert info.input_range == (-1.0, 1.0)
    assert info.latent_range == latent_range
    assert info.model_id == f"local:{name}"
    assert info.source == str(tiny_folders[name].resolve())
    assert info.config["_class_name"] == cls.split(".")[1]
    json.dumps(info.to_json())  # containers store it as attributes: must be plain JSON

    size = 64
    tiles = _tiles(2, size)
    z = model.encode(tiles)
    assert z.dtype == torch.float32 and z.device.type == "cpu"
    assert tuple(z.shape) == (2, channels, size // factor, size // factor)
    assert torch.equal(z, model.encode(tiles)), "encoding must be deterministic (KL: posterior mode)"
    out = model.decode(z)
    assert out.dtype == np.uint8 and out.shape == tiles.shape
    assert np.array_equal(out, model.decode(z.numpy())), "decoding must be deterministic"


def test_kl_scaling_factor_recorded_not_applied(tiny_folders):
    from diffusers import AutoencoderKL

    model = load_model(str(tiny_folders["kl4"]), device="cpu")
    assert "scaling_factor" in model.info.config
    vae = AutoencoderKL.from_pretrained(str(tiny_folders["kl4"]))
    x = torch.from_numpy(_tiles(1)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
    assert torch.allclose(model.encode(_tiles(1)), raw, atol=1e-5)


def test_decoder_hash_tracks_decoder_only(tiny_folders, tmp_path):
    from diffusers import AutoencoderKL

    base = load_model(str(tiny_folders["kl4"]), device="cpu").info
    vae = AutoencoderKL.from_pretrained(str(tiny_folders["kl4"]))
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.01)
    vae.save_pretrained(tmp_path / "enc")
    enc = load_model(str(tmp_path / "enc"), device="cpu").info
    assert enc.decoder_sha256 == base.decoder_sha256 and enc.weights_sha256 != base.weights_sha256
    with torch.no_grad():
        vae.post_quant_conv.weight.add_(0.01)
    vae.save_pretrained(tmp_path / "dec")
    dec = load_model(str(tmp_path / "dec"), device="cpu").info
    assert dec.decoder_sha256 != base.decoder_sha256


def test_diffusers_save_with_manifest_round_trips(tiny_folders, tmp_path):
    model = load_model(str(tiny_folders["tiny"]), device="cpu")
    out = model.save(tmp_path / "ft", model_id="tiny-path-ft", description="test", base="taesd")
    manifest = read_manifest(out)
    assert manifest["architecture"] == "diffusers" and manifest["base"] == "taesd"
    again = load_model(str(out), device="cpu")
    assert again.info.model_id == "tiny-path-ft"
    assert again.info.decoder_sha256 == model.info.decoder_sha256
    assert not list(out.glob(".save-*")), "no temporary folders left behind"


def test_diffusers_pipeline_folder_uses_vae_subfolder(tiny_folders, tmp_path):
    shutil.copytree(tiny_folders["kl16"], tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    model = load_model(str(tmp_path / "pipe"), device="cpu")
    assert model.info.latent_channels == 16


def test_truncated_diffusers_weights_is_one_line_error(tiny_folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_folders["kl4"], folder)
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as exc:
        load_model(str(folder), device="cpu")
    assert "broken" in _one_line(exc)


def test_missing_diffusers_weights_is_one_line_error(tiny_folders, tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(tiny_folders["kl4"] / "config.json", folder / "config.json")
    with pytest.raises(ModelError) as exc:
        load_model(str(folder), device="cpu")
    _one_line(exc)


def test_wrong_shape_diffusers_weights_is_one_line_error(tiny_folders, tmp_path):
    # a 16-channel model's weights under a 4-channel config
    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_folders["kl4"], folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    for f in tiny_folders["kl16"].glob("*.safetensors"):
        shutil.copy(f, folder / f.name)
    with pytest.raises(ModelError) as exc:
        load_model(str(folder), device="cpu")
    _one_line(exc)


# ------------------------------------------------------------------------------ hub
def test_hub_offline_is_prompt_one_line_error(monkeypatch):
    from wsicodec.models.diffusers import load_from_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = registry.ModelSpec("nowhere", "diffusers.AutoencoderKL", 4, 8, (-1.0, 1.0),
                              hub_id="wsicodec-tests/does-not-exist", subfolder="vae")
    from diffusers import AutoencoderKL  # noqa: F401  (importing diffusers is slow; not what is timed)

    start = time.monotonic()
    with pytest.raises(ModelError) as exc:
        load_from_hub(spec, device="cpu")
    assert time.monotonic() - start < 10
    msg = _one_line(exc)
    assert "wsicodec-tests/does-not-exist" in msg and "--model DIR" in msg


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    # huggingface_hub alone would retry for ~25 s; the reachability probe answers at once
    import huggingface_hub.constants as hf_constants

    from wsicodec.models.diffusers import load_from_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_HUB_REACHABLE", None)
    assert hub.hub_reachable() is False
    spec = registry.ModelSpec("nowhere", "diffusers.AutoencoderTiny", 4, 8, (-1.0, 1.0),
                              hub_id="wsicodec-tests/does-not-exist")
    from diffusers import AutoencoderTiny  # noqa: F401

    start = time.monotonic()
    with pytest.raises(ModelError) as exc:
        load_from_hub(spec, device="cpu")
    assert time.monotonic() - start < 10
    assert "offline or gated" in _one_line(exc)


def test_registry_hub_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = registry.REGISTRY["sd3.5-vae"]
    if spec.available_offline():
        pytest.skip("sd3.5-vae is in the local cache here")
    with pytest.raises(ModelError) as exc:
        load_model("sd3.5-vae", device="cpu")
    assert "stabilityai/stable-diffusion-3.5-large" in _one_line(exc)


def test_efficientvit_layout_refused_clearly():
    with pytest.raises(ModelError) as exc:
        load_model("dc-ae-f32c32-path")
    assert "efficientvit" in _one_line(exc)


# ------------------------------------------------------------------------------ names, listing
def test_unknown_name_lists_known_names():
    with pytest.raises(ModelError) as exc:
        load_model("no-such-model")
    msg = _one_line(exc)
    assert "no-such-model" in msg and "taef2" in msg and "sd-vae-ft-ema" in msg


def test_missing_folder_path_is_error(tmp_path):
    with pytest.raises(ModelError) as exc:
        load_model(str(tmp_path / "nothing-here"))
    assert "does not exist" in _one_line(exc)


def test_folder_without_weights_is_error(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelError) as exc:
        load_model(str(tmp_path))
    _one_line(exc)


def test_registry_lists_the_paper_models():
    ids = {s.id for s in list_models()}
    assert {"sd-vae-ft-ema", "sd-vae-ft-ema-path", "sd3.5-vae", "sd3.5-vae-path", "dc-ae-f32c32-in",
            "dc-ae-f32c32-path", "taesd", "taesd3", "taef2"} <= ids
    rows = {r["id"]: r for r in models_table()}
    assert rows["sd3.5-vae"]["c"] == 16 and rows["sd3.5-vae"]["gated"]
    assert rows["dc-ae-f32c32-in"]["f"] == 32
    assert rows["sd3.5-vae"]["source"] == "hf:stabilityai/stable-diffusion-3.5-large/vae"
    json.dumps(list(rows.values()))


def test_pick_device_honours_request():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in {"cpu", "cuda", "mps"}


def test_unusable_device_is_one_line_error():
    with pytest.raises(ModelError) as exc:
        pick_device("tpu")
    assert "tpu" in _one_line(exc)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError) as exc:
            load_model("taef2", device="cuda:1")
        assert "CUDA is not available" in _one_line(exc)


# ------------------------------------------------------------------------------ TAEF2 (random weights)
@pytest.fixture
def random_taef2(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "taef2-random"
    folder.mkdir()
    torch.save(build_encoder().half().state_dict(), folder / ENCODER_FILE)
    torch.save(build_decoder().half().state_dict(), folder / DECODER_FILE)
    return folder


def test_taef2_layout_shapes_and_range(random_taef2):
    model = load_model(str(random_taef2), device="cpu")
    info = model.info
    assert info.model_class == "wsicodec.TAEF2" and info.model_id == "local:taef2-random"
    assert (info.latent_channels, info.spatial_factor, info.input_range) == (32, 8, (0.0, 1.0))
    assert info.latent_range == (-3.0, 3.0)
    z = model.encode(_tiles(2, 64))
    assert tuple(z.shape) == (2, 32, 8, 8) and z.dtype == torch.float32
    out = model.decode(z)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    # the nn.Modules are exposed for decoder fine-tuning
    assert isinstance(model.decoder, torch.nn.Module) and isinstance(model.encoder, torch.nn.Module)


def test_taef2_missing_pth_is_error(random_taef2):
    (random_taef2 / DECODER_FILE).unlink()
    with pytest.raises(ModelError) as exc:
        load_model(str(random_taef2))
    assert DECODER_FILE in _one_line(exc)


def test_taef2_corrupt_pth_is_error(random_taef2):
    path = random_taef2 / ENCODER_FILE
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelError) as exc:
        load_model(str(random_taef2))
    assert ENCODER_FILE in _one_line(exc)


def test_taef2_wrong_shapes_is_error(random_taef2):
    torch.save(build_decoder(latent_channels=16).state_dict(), random_taef2 / DECODER_FILE)
    with pytest.raises(ModelError) as exc:
        load_model(str(random_taef2))
    assert "do not fit" in _one_line(exc)


def test_taef2_save_with_manifest_and_resolve(random_taef2, tmp_path, monkeypatch):
    model = load_model(str(random_taef2), device="cpu")
    with torch.no_grad():
        model.decoder[1].bias.add_(0.1)  # "fine-tuned"
    out = model.save(tmp_path / "models" / "ft-folder", model_id="taef2-ft-test", description="unit test")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["id"] == "taef2-ft-test" and manifest["architecture"] == "taef2"
    assert manifest["format_version"] == 1 and manifest["created"].endswith("Z")
    tuned = load_model(str(out), device="cpu")
    assert tuned.info.model_id == "taef2-ft-test" and tuned.info.source == str(out.resolve())
    assert tuned.info.decoder_sha256 == model.info.decoder_sha256
    record = tuned.info.to_json()

    # restore finds it at the recorded source
    assert resolve_model(record, device="cpu").info.decoder_sha256 == record["decoder_sha256"]
    # ...or, once moved, through WSICODEC_MODEL_PATH by manifest id (folder named otherwise)
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.move(str(out), moved)
    with pytest.raises(ModelError) as exc:
        resolve_model(record, device="cpu")
    assert "taef2-ft-test" in _one_line(exc)
    monkeypatch.setenv("WSICODEC_MODEL_PATH", str(tmp_path / "elsewhere"))
    found = resolve_model(record, device="cpu")
    assert found.info.source == str(moved.resolve())

    # a different decoder is refused unless verification is off (restore --force)
    with pytest.raises(ModelError) as exc:
        resolve_model(record, override=str(random_taef2), device="cpu")
    assert "--force" in _one_line(exc)
    forced = resolve_model(record, override=str(random_taef2), device="cpu", verify=False)
    assert forced.info.decoder_sha256 != record["decoder_sha256"]


def test_manifest_from_the_future_is_refused(random_taef2):
    (random_taef2 / MANIFEST_NAME).write_text(json.dumps(
        {"format": "wsicodec-model", "format_version": 2, "id": "x", "architecture": "taef2"}))
    with pytest.raises(ModelError) as exc:
        load_model(str(random_taef2))
    assert "version 2" in _one_line(exc)


def test_manifest_unknown_architecture_is_refused(random_taef2):
    (random_taef2 / MANIFEST_NAME).write_text(json.dumps({"id": "x", "architecture": "vqgan"}))
    with pytest.raises(ModelError) as exc:
        load_model(str(random_taef2))
    assert "vqgan" in _one_line(exc)


# ------------------------------------------------------------------------------ TAEF2 (real weights)
def _tissue_tiles(slide_path, n: int) -> np.ndarray:
    import openslide

    slide = openslide.OpenSlide(str(slide_path))
    w, h = slide.dimensions
    tiles = []
    for y in range(0, h - 255, 256):
        for x in range(0, w - 255, 256):
            t = np.asarray(slide.read_region((x, y), 0, (256, 256)).convert("RGB"))
            if (t.mean(axis=-1) < 200).mean() > 0.6:
                tiles.append(t)
            if len(tiles) == n:
                return np.stack(tiles)
    return np.stack(tiles)


def test_taef2_real_weights_reconstruct_cmu1(taef2_dir, cmu1_path):
    model = load_model(str(taef2_dir), device="cpu")
    # the published weights get the registry id even from a manifest-less folder
    assert model.info.model_id == "taef2"
    assert model.info.decoder_sha256 == TAEF2_PUBLISHED_DECODER_SHA256
    # CMU-1-Small-Region is native 20x (0.499 um/px): level 0 is the archive resolution
    tiles = _tissue_tiles(cmu1_path, 3)
    assert len(tiles) == 3
    z = model.encode(tiles)
    assert tuple(z.shape) == (3, 32, 32, 32)
    out = model.decode(z)
    mse = ((out.astype(np.float64) - tiles) ** 2).mean()
    psnr = 10 * np.log10(255.0**2 / mse)
    print(f"TAEF2 PSNR on {len(tiles)} CMU-1 tissue tiles: {psnr:.2f} dB")
    assert psnr > 23.5
    # clipping to the declared latent_range (what the int8 quantiser does) loses almost nothing
    lo, hi = model.info.latent_range
    clipped = model.decode(z.clamp(lo, hi))
    mse_c = ((clipped.astype(np.float64) - tiles) ** 2).mean()
    assert 10 * np.log10(255.0**2 / mse_c) > psnr - 0.1


def test_taef2_registry_name_uses_model_path(taef2_dir, tmp_path, monkeypatch):
    (tmp_path / "taef2").symlink_to(taef2_dir, target_is_directory=True)
    monkeypatch.setenv("WSICODEC_MODEL_PATH", str(tmp_path))
    model = load_model("taef2", device="cpu")
    assert model.info.model_id == "taef2"
    assert model.info.source == str(taef2_dir.resolve())


# ------------------------------------------------------------------------------ families
class ToyAutoencoder(Autoencoder):
    """Identity at factor 1: the least a family module has to provide."""

    def __init__(self, model_id: str, source: str = ""):
        self.device = pick_device("cpu")
        self.info = ModelInfo(model_id=model_id, model_class="tests.Toy", latent_channels=3, spatial_factor=1,
                              input_range=(0.0, 1.0), latent_range=(0.0, 1.0), weights_sha256="0" * 64,
                              decoder_sha256="0" * 64, source=source)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


TOY_FILE = "toy.weights"


@pytest.fixture
def toy_family():
    # what a new models/toy.py would hold (plus one line in registry.FAMILY_MODULES)
    family = register_family(Family(
        name="toy",
        sniff=lambda folder: (folder / TOY_FILE).is_file(),
        load_folder=lambda folder, device, model_id: ToyAutoencoder(model_id, str(folder)),
        load_spec=lambda spec, device: ToyAutoencoder(spec.id, "package"),
        builders={"toy": "tests.Toy"},
        specs=lambda: [ModelSpec("toy-named", "toy", 3, 1, (0.0, 1.0), description="a toy")],
        looks_for=TOY_FILE,
    ))
    yield family
    unregister_family("toy")


def test_a_registered_family_is_found_by_sniff_manifest_and_name(toy_family, tmp_path, monkeypatch):
    monkeypatch.delenv("WSICODEC_MODEL_PATH", raising=False)
    folder = tmp_path / "my-toy"
    folder.mkdir()
    (folder / TOY_FILE).write_bytes(b"")
    for model in (load_model(str(folder)), load_folder(folder)):
        assert isinstance(model, ToyAutoencoder) and model.info.model_id == "local:my-toy"
    tiles = _tiles(1, 16)
    assert np.array_equal(model.decode(model.encode(tiles)), tiles)

    # a manifest may name the new architecture
    write_manifest(folder, model_id="toy-v2", architecture="toy")
    tuned = load_model(str(folder))
    assert (tuned.info.model_id, tuned.info.source) == ("toy-v2", str(folder.resolve()))

    # names the family brings are listed and load, from a $WSICODEC_MODEL_PATH folder first
    assert {r["id"]: r for r in models_table()}["toy-named"]["class"] == "tests.Toy"
    assert load_model("toy-named").info.source == "package"
    named = tmp_path / "models" / "toy-named"
    named.mkdir(parents=True)
    (named / TOY_FILE).write_bytes(b"")
    monkeypatch.setenv("WSICODEC_MODEL_PATH", str(tmp_path / "models"))
    found = load_model("toy-named")
    assert (found.info.model_id, found.info.source) == ("toy-named", str(named.resolve()))

    # the builtin families still sniff first; an unknown folder's error names what the toy looks for
    assert [f.name for f in registry.families()][:3] == ["builtin", "diffusers", "taef2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as exc:
        load_model(str(tmp_path / "empty"))
    assert TOY_FILE in _one_line(exc)


def test_unregistered_family_is_forgotten(tmp_path):
    (tmp_path / TOY_FILE).write_bytes(b"")
    with pytest.raises(ModelError):
        load_model(str(tmp_path))
    with pytest.raises(ValueError):
        write_manifest(tmp_path, model_id="x", architecture="toy")


def test_a_family_cannot_take_another_modules_name_or_builder():
    with pytest.raises(ValueError, match="already registered"):
        register_family(Family(name="taef2", sniff=lambda f: False, load_folder=lambda f, d, i: None))
    with pytest.raises(ValueError, match="already belongs"):
        register_family(Family(name="toy2", sniff=lambda f: False, load_folder=lambda f, d, i: None,
                               builders={"taef2": "x"}))
    assert "toy2" not in {f.name for f in registry.families()}


def _imports(path: Path) -> set[str]:
    """wsicodec modules a file imports anywhere (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_registry_imports_no_family_and_no_family_imports_registry():
    models = Path(registry.__file__).parent
    assert not _imports(models / "registry.py") & set(registry.FAMILY_MODULES)
    for name in registry.FAMILY_MODULES:
        assert "wsicodec.models.registry" not in _imports(models / f"{name.rsplit('.', 1)[1]}.py"), name
    # one manifest name, everywhere
    from wsicodec.models import builtin, manifest
    from wsicodec.research import finetune

    assert builtin.MANIFEST_NAME is manifest.MANIFEST_NAME is finetune.MANIFEST_NAME is MANIFEST_NAME


def test_families_are_imported_on_first_use():
    code = ("import sys, wsicodec.models as m; "
            "print(any(n in sys.modules for n in m.registry.FAMILY_MODULES)); "
            "print(m.REGISTRY['taef2'].model_class)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "wsicodec.TAEF2"]
