"""Model registry: a name or a folder -> a ready :class:`Autoencoder`.

Resolution order for ``load_model(name)``:

1. ``None`` -> the builtin default model (packaged weights).
2. A registry id (``REGISTRY``) or a builtin id -> the packaged weights, a folder named like the id
   inside one of ``$WSICODEC_MODEL_PATH``'s folders, the Hugging Face cache, then the hub.
3. Anything else that is a folder -> read as a model folder (manifest, diffusers folder, TAEF2 pair).

Model folders and the ``wsicodec-model.json`` manifest are specified in docs/models.md.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from wsicodec._paths import shared_dir
from wsicodec.errors import ModelError
from wsicodec.models.base import Autoencoder, pick_device

MANIFEST_NAME = "wsicodec-model.json"
MANIFEST_FORMAT = "wsicodec-model"
MANIFEST_VERSION = 1
ARCHITECTURES = ("taef2", "diffusers", "builtin")
MODEL_PATH_ENV = "WSICODEC_MODEL_PATH"

# decoder_sha256 of the published TAEF2 weights (madebyollin/taesd flux_2 variant), used to give a
# manifest-less folder holding them the registry id "taef2" rather than "local:<folder>".
TAEF2_PUBLISHED_DECODER_SHA256 = "ab2aa476174661ac7a8e6d0044c66b5f9a5d01c9bd83f0e5da9834942d675f34"


@dataclass(frozen=True)
class ModelSpec:
    """One named model: how to build it and where its weights live."""

    id: str
    builder: str  # "diffusers.AutoencoderKL" | "diffusers.AutoencoderDC" | "diffusers.AutoencoderTiny"
    #               | "taef2" | "builtin" | "efficientvit-dcae" (not loadable yet)
    latent_channels: int
    spatial_factor: int
    input_range: tuple[float, float]
    hub_id: str | None = None
    subfolder: str | None = None
    description: str = ""
    licence: str = ""
    gated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_class(self) -> str:
        return {
            "taef2": "wsicodec.TAEF2",
            "builtin": "wsicodec.BuiltinCodec",
            "efficientvit-dcae": "efficientvit.DCAE",
        }.get(self.builder, self.builder)

    @property
    def source(self) -> str:
        if self.hub_id:
            return _hub_source(self.hub_id, self.subfolder)
        if self.builder == "builtin":
            return "package"
        return "local folder"

    def local_folder(self) -> Path | None:
        """A folder on this machine that holds this model's weights, if any."""
        for folder in _model_path_candidates(self.id):
            if _folder_has_weights(folder):
                return folder
        if self.builder == "taef2":
            shared = shared_dir() / "weights" / "taef2"
            if _folder_has_weights(shared):
                return shared
        if _folder_has_weights(Path(self.id)):  # a copy in the current directory, named like the id
            return Path(self.id).resolve()
        return None

    def available_offline(self) -> bool:
        """Whether loading needs no network: packaged, in a local folder, or in the HF cache."""
        if self.builder == "builtin":
            try:
                from wsicodec.models import builtin

                return (builtin.WEIGHTS_DIR / builtin.BUILTIN_MODELS[self.id]).is_file()
            except (ImportError, AttributeError, KeyError):
                return False
        if self.local_folder() is not None:
            return True
        if self.hub_id and self.builder.startswith("diffusers."):
            return _in_hf_cache(self.hub_id, self.subfolder)
        return False


_KL, _DC, _TINY = "diffusers.AutoencoderKL", "diffusers.AutoencoderDC", "diffusers.AutoencoderTiny"

REGISTRY: dict[str, ModelSpec] = {
    s.id: s
    for s in [
        ModelSpec("sd-vae-ft-ema", _KL, 4, 8, (-1.0, 1.0), "stabilityai/sd-vae-ft-ema",
                  description="Stable Diffusion 1.x VAE, EMA fine-tune (84M params)",
                  licence="MIT"),
        ModelSpec("sd-vae-ft-ema-path", _KL, 4, 8, (-1.0, 1.0), "StonyBrook-CVLab/sd-vae-ft-ema-path",
                  description="sd-vae-ft-ema with its decoder fine-tuned on pathology (the paper's)",
                  licence="see the hub model card"),
        ModelSpec("sd3.5-vae", _KL, 16, 8, (-1.0, 1.0), "stabilityai/stable-diffusion-3.5-large", "vae",
                  description="Stable Diffusion 3.5 VAE, 16 latent channels",
                  licence="Stability AI Community License; gated: accept it on the hub, then log in",
                  gated=True),
        ModelSpec("sd3.5-vae-path", _KL, 16, 8, (-1.0, 1.0), "StonyBrook-CVLab/sd-3.5-large-vae-path",
                  description="SD-3.5 VAE with its decoder fine-tuned on pathology (the paper's)",
                  licence="Stability AI Community License (derivative); see the hub model card"),
        ModelSpec("dc-ae-f32c32-in", _DC, 32, 32, (-1.0, 1.0), "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers",
                  description="Deep Compression Autoencoder f32c32 (ImageNet)",
                  licence="see the hub model card"),
        ModelSpec("dc-ae-f32c32-path", "efficientvit-dcae", 32, 32, (-1.0, 1.0),
                  "StonyBrook-CVLab/dc-ae-f32c32-path",
                  description="DC-AE f32c32 fine-tuned on pathology (the paper's); efficientvit layout",
                  licence="see the hub model card"),
        ModelSpec("taesd", _TINY, 4, 8, (-1.0, 1.0), "madebyollin/taesd",
                  description="Tiny autoencoder for the SD-1.x latent space (2.4M params)",
                  licence="MIT"),
        ModelSpec("taesd3", _TINY, 16, 8, (-1.0, 1.0), "madebyollin/taesd3",
                  description="Tiny autoencoder for the SD-3 latent space",
                  licence="MIT"),
        ModelSpec("taef2", "taef2", 32, 8, (0.0, 1.0),
                  description="Tiny autoencoder for the FLUX.2 latent space (2x1.3M params); local .pth pair",
                  licence="MIT"),
    ]
}


# ------------------------------------------------------------------------------ public API
def list_models() -> list[ModelSpec]:
    """Every model a name can load: the builtin ones first, then the registry."""
    return _builtin_specs() + list(REGISTRY.values())


def models_table() -> list[dict[str, Any]]:
    """Rows for a `wsicodec models` listing."""
    rows = []
    for spec in list_models():
        rows.append({
            "id": spec.id,
            "class": spec.model_class,
            "f": spec.spatial_factor,
            "c": spec.latent_channels,
            "input_range": list(spec.input_range),
            "source": spec.source,
            "offline": spec.available_offline(),
            "gated": spec.gated,
            "description": spec.description,
            "licence": spec.licence,
        })
    return rows


def load_model(name_or_path: str | os.PathLike | None = None, device: str | None = None) -> Autoencoder:
    """A registry id, a builtin id, a local model folder, or None for the builtin default."""
    if device is not None:
        pick_device(device)  # a bad --device fails before any weights are read
    if name_or_path is None:
        builtin = _builtin_module()
        if builtin is None:
            raise ModelError("the builtin default model is not available in this installation; "
                             "pass --model NAME or --model DIR (see `wsicodec models`)")
        return builtin.load_builtin(builtin.DEFAULT_MODEL_ID, device)
    name = os.fspath(name_or_path)
    if not _looks_like_path(name):
        spec = _find_spec(name)
        if spec is not None:
            return _load_spec(spec, device)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return load_folder(folder, device)
    if folder.exists():
        raise ModelError(f"--model expects a model name or a folder, and {name} is a file")
    if _looks_like_path(name):
        raise ModelError(f"model folder {name} does not exist")
    known = ", ".join(s.id for s in list_models())
    raise ModelError(f"unknown model {name!r}; known names: {known}; or pass a model folder")


def load_folder(folder: str | Path, device: str | None = None) -> Autoencoder:
    """Load a local model folder (see docs/models.md); raises ModelError when it holds no usable model."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    manifest = read_manifest(folder)
    if manifest is not None:
        arch = manifest["architecture"]
        model_id = manifest["id"]
        if arch == "builtin":
            builtin = _builtin_module()
            if builtin is None:
                raise ModelError(f"{folder} holds a builtin-architecture model, which this installation lacks")
            model = builtin.load_builtin_folder(folder, device)
        elif arch == "taef2":
            from wsicodec.models.taesd import load_taef2_folder

            model = load_taef2_folder(folder, device, model_id=model_id)
        else:
            from wsicodec.models.diffusers import load_diffusers_folder

            model = load_diffusers_folder(_diffusers_dir(folder) or folder, device, model_id=model_id)
        model.info.model_id = model_id
        model.info.source = str(folder)
        return model

    from wsicodec.models.taesd import is_taef2_folder, load_taef2_folder

    diff_dir = _diffusers_dir(folder)
    if diff_dir is not None:
        from wsicodec.models.diffusers import load_diffusers_folder

        return load_diffusers_folder(diff_dir, device, model_id=f"local:{folder.name}")
    if is_taef2_folder(folder):
        model = load_taef2_folder(folder, device, model_id=f"local:{folder.name}")
        if model.info.decoder_sha256 == TAEF2_PUBLISHED_DECODER_SHA256:
            model.info.model_id = "taef2"
        return model
    raise ModelError(
        f"{folder} holds no model wsicodec recognises (expected {MANIFEST_NAME}, a diffusers "
        "config.json, or taef2_encoder.pth + taef2_decoder.pth)"
    )


def resolve_model(record: dict[str, Any], override: str | None = None, device: str | None = None,
                  verify: bool = True) -> Autoencoder:
    """The model a container was made with (``record`` = ``ModelInfo.to_json()`` as stored).

    ``override`` (--model) wins; else the recorded source folder if it still exists; else the id
    (builtin / registry); else a folder named like the id in ``$WSICODEC_MODEL_PATH``. With
    ``verify`` the decoder's SHA-256 must match the record (restore's ``--force`` passes False).
    """
    model_id = str(record.get("id") or "")
    if override is not None:
        model = load_model(override, device)
    else:
        model = _find_recorded(record, model_id, device)
    expected = record.get("decoder_sha256")
    if verify and expected and expected != model.info.decoder_sha256:
        raise ModelError(
            f"the decoder of {model.info.source or model.info.model_id} (sha256 {model.info.decoder_sha256[:12]}) "
            f"is not the one this container was made with ({model_id}, sha256 {str(expected)[:12]}); "
            "pass the right --model, or --force to decode anyway"
        )
    return model


def write_manifest(folder: str | Path, *, model_id: str, architecture: str, base: str | None = None,
                   description: str = "", extra: dict[str, Any] | None = None) -> Path:
    """Write ``wsicodec-model.json`` atomically (call it after the weights are in place)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}")
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "id": model_id,
        "architecture": architecture,
        "base": base,
        "description": description,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    manifest.update(extra or {})
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, normalised (``id`` always set), or None when it has none."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{path} is not a wsicodec model manifest")
    version = manifest.get("format_version", MANIFEST_VERSION)
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ModelError(f"{path} has manifest format version {version}; this wsicodec reads up to "
                         f"{MANIFEST_VERSION} (upgrade wsicodec)")
    arch = manifest.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{path}: unknown architecture {arch!r} (expected one of {', '.join(ARCHITECTURES)})")
    model_id = manifest.get("id") or manifest.get("model_id") or f"local:{folder.resolve().name}"
    manifest["id"] = str(model_id)
    return manifest


# ------------------------------------------------------------------------------ internals
def _find_recorded(record: dict[str, Any], model_id: str, device: str | None) -> Autoencoder:
    source = record.get("source") or ""
    if source and not source.startswith(("hf:", "package")) and Path(source).is_dir():
        return load_folder(source, device)
    problems: list[str] = []
    spec = _find_spec(model_id) if model_id else None
    if spec is not None:
        try:
            return _load_spec(spec, device)
        except ModelError as exc:
            problems.append(str(exc))
    for folder in _model_path_candidates(_id_folder_name(model_id)) + _manifest_matches(model_id):
        if folder.is_dir():
            return load_folder(folder, device)
    hint = (f"; set {MODEL_PATH_ENV} to a folder holding a subfolder {_id_folder_name(model_id)!r}, "
            "or pass --model DIR")
    if problems:
        raise ModelError(problems[0] + hint)
    raise ModelError(f"cannot find model {model_id!r} that this container was made with"
                     + (f" (recorded at {source})" if source else "") + hint)


def _load_spec(spec: ModelSpec, device: str | None) -> Autoencoder:
    if spec.builder == "builtin":
        builtin = _builtin_module()
        if builtin is None:
            raise ModelError(f"builtin model {spec.id!r} is not available in this installation")
        return builtin.load_builtin(spec.id, device)
    if spec.builder == "efficientvit-dcae":
        raise ModelError(
            f"{spec.id} ({spec.hub_id}) is published in the original efficientvit layout, which wsicodec "
            "cannot load yet; convert it to a diffusers AutoencoderDC folder (diffusers' "
            "scripts/convert_dcae_to_diffusers.py) and pass --model DIR"
        )
    local = spec.local_folder()
    if local is not None:
        model = load_folder(local, device)
        if model.info.model_id.startswith("local:"):
            model.info.model_id = spec.id
        return model
    if spec.builder == "taef2":
        raise ModelError(
            "TAEF2 is loaded from a local folder: put taef2_encoder.pth and taef2_decoder.pth in a folder "
            f"and pass --model DIR (or set {MODEL_PATH_ENV} to a folder holding a 'taef2' subfolder)"
        )
    from wsicodec.models.diffusers import load_from_hub

    return load_from_hub(spec, device)


def _find_spec(name: str) -> ModelSpec | None:
    if name in REGISTRY:
        return REGISTRY[name]
    for spec in _builtin_specs():
        if spec.id == name:
            return spec
    return None


def _builtin_module():
    try:
        from wsicodec.models import builtin
    except ImportError:
        return None
    if not all(hasattr(builtin, a) for a in ("load_builtin", "DEFAULT_MODEL_ID", "BUILTIN_MODELS")):
        return None
    return builtin


def _builtin_specs() -> list[ModelSpec]:
    builtin = _builtin_module()
    if builtin is None:
        return []
    specs = []
    for model_id in builtin.BUILTIN_MODELS:
        cfg = getattr(builtin, "DEFAULT_CONFIG", {}) if model_id == builtin.DEFAULT_MODEL_ID else {}
        specs.append(ModelSpec(
            model_id, "builtin", int(cfg.get("latent_channels", 0)), int(cfg.get("factor", 0)), (-1.0, 1.0),
            description="wsicodec's own model (default)" if model_id == builtin.DEFAULT_MODEL_ID
            else "wsicodec's own model",
            licence="Apache-2.0 (trained on permissively licensed data)",
        ))
    return specs


def _looks_like_path(name: str) -> bool:
    return (os.sep in name or (os.altsep or os.sep) in name or name.startswith((".", "~"))
            or name.endswith(os.sep))


def _folder_has_weights(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if (folder / MANIFEST_NAME).is_file() or _diffusers_dir(folder) is not None:
        return True
    from wsicodec.models.taesd import DECODER_FILE, ENCODER_FILE

    return (folder / ENCODER_FILE).is_file() and (folder / DECODER_FILE).is_file()


def _diffusers_dir(folder: Path) -> Path | None:
    """The folder (or its ``vae/`` subfolder, for a whole pipeline) holding an autoencoder config.json."""
    for candidate in (folder, folder / "vae"):
        cfg = candidate / "config.json"
        if cfg.is_file():
            try:
                if "_class_name" in json.loads(cfg.read_text()):
                    return candidate
            except (OSError, ValueError):
                continue
    return None


def _id_folder_name(model_id: str) -> str:
    return model_id.split(":", 1)[1] if model_id.startswith("local:") else model_id.replace("/", "--")


def _model_path_dirs() -> list[Path]:
    raw = os.environ.get(MODEL_PATH_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def _model_path_candidates(name: str) -> list[Path]:
    if not name:
        return []
    return [d / name for d in _model_path_dirs() if (d / name).is_dir()]


def _manifest_matches(model_id: str) -> list[Path]:
    """Subfolders of $WSICODEC_MODEL_PATH whose manifest carries ``model_id`` (folder named otherwise)."""
    found = []
    for d in _model_path_dirs():
        if not d.is_dir():
            continue
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            try:
                manifest = read_manifest(sub)
            except ModelError:
                continue
            if manifest is not None and manifest["id"] == model_id:
                found.append(sub)
    return found


def _hub_source(hub_id: str, subfolder: str | None) -> str:
    return f"hf:{hub_id}" + (f"/{subfolder}" if subfolder else "")


def _in_hf_cache(hub_id: str, subfolder: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    name = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        return isinstance(try_to_load_from_cache(hub_id, name), str)
    except Exception:
        return False


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect quickly (cached per process).

    huggingface_hub retries unreachable hosts for ~25 s before failing; probing first keeps an
    offline `--model sd-vae-ft-ema` down to one prompt error line.
    """
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if _HUB_REACHABLE is None:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except Exception:  # pragma: no cover
            endpoint = "https://huggingface.co"
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
                _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE
