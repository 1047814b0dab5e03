"""Model registry: a name or a folder -> a ready :class:`Autoencoder`.

Resolution order for ``load_model(name)``:

1. ``None`` -> the default model of the family that provides one (the builtin model, packaged weights).
2. A registry id (``REGISTRY``) or an id a family brings (the builtin ids) -> the packaged weights, a
   folder named like the id inside one of ``$WSICODEC_MODEL_PATH``'s folders, the Hugging Face cache,
   then the hub.
3. Anything else that is a folder -> read as a model folder (manifest, diffusers folder, TAEF2 pair).

Everything that depends on the kind of model is asked of its :class:`~wsicodec.models.family.Family`;
this module only resolves names and folders. Model folders and the ``wsicodec-model.json`` manifest
are specified in docs/models.md.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from wsicodec.errors import ModelError
from wsicodec.models import family
from wsicodec.models.base import Autoencoder, pick_device
from wsicodec.models.family import Family
from wsicodec.models.manifest import MANIFEST_NAME, read_manifest
from wsicodec.models.spec import MODEL_PATH_ENV, ModelSpec, model_path_candidates, model_path_dirs

# Imported on first use, never at import time. The order is the order manifest-less folders are
# sniffed in (a diffusers config.json is checked before a TAEF2 .pth pair) and models are listed in.
FAMILY_MODULES = (
    "wsicodec.models.builtin",
    "wsicodec.models.diffusers",
    "wsicodec.models.taesd",
)

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
        ModelSpec("dc-ae-f32c32-path", "efficientvit.DCAE", 32, 32, (-1.0, 1.0),
                  "StonyBrook-CVLab/dc-ae-f32c32-path",
                  description="DC-AE f32c32 fine-tuned on pathology (the paper's); efficientvit layout",
                  licence="see the hub model card",
                  unsupported="is published in the original efficientvit layout, which wsicodec cannot load "
                              "yet; convert it to a diffusers AutoencoderDC folder (diffusers' "
                              "scripts/convert_dcae_to_diffusers.py) and pass --model DIR"),
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


# ------------------------------------------------------------------------------ families
_families_imported = False


def import_families() -> None:
    """Import every module in ``FAMILY_MODULES`` (each registers its family); idempotent."""
    global _families_imported
    if _families_imported:
        return
    _families_imported = True  # first: a lookup made while a family module imports must not re-enter
    try:
        for name in FAMILY_MODULES:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name != name:  # a family that is there but fails to import is a bug: say so
                    raise
    except BaseException:
        _families_imported = False
        raise


family.set_discovery(import_families)


def families() -> list[Family]:
    """Registered families in ``FAMILY_MODULES`` order; families registered elsewhere come last."""
    rank = {name: i for i, name in enumerate(FAMILY_MODULES)}
    return sorted(family.families(), key=lambda f: rank.get(f.module, len(rank)))


# ------------------------------------------------------------------------------ public API
def list_models() -> list[ModelSpec]:
    """Every model a name can load: those the families bring (the builtin ones) first, then the registry."""
    return [spec for fam in families() for spec in fam.specs()] + list(REGISTRY.values())


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
        default = next((f.default_model for f in families() if f.default_model), None)
        spec = _find_spec(default) if default else None
        if spec is None:
            raise ModelError("the builtin default model is not available in this installation; "
                             "pass --model NAME or --model DIR (see `wsicodec models`)")
        return _load_spec(spec, device)
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
        fam = family.family_named(manifest["architecture"])
        if fam is None:  # unregistered since read_manifest checked it
            raise ModelError(f"{folder}: no model family {manifest['architecture']!r} in this installation")
        model_id = manifest["id"]
        model = fam.load_folder(folder, device, model_id)
        model.info.model_id = model_id
        model.info.source = str(folder)
        return model
    for fam in families():
        if fam.sniff(folder):
            return fam.load_folder(folder, device, f"local:{folder.name}")
    hints = [MANIFEST_NAME] + [f.looks_for for f in families() if f.looks_for]
    expected = hints[0] if len(hints) == 1 else ", ".join(hints[:-1]) + ", or " + hints[-1]
    raise ModelError(f"{folder} holds no model wsicodec recognises (expected {expected})")


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
    for folder in model_path_candidates(_id_folder_name(model_id)) + _manifest_matches(model_id):
        if folder.is_dir():
            return load_folder(folder, device)
    hint = (f"; set {MODEL_PATH_ENV} to a folder holding a subfolder {_id_folder_name(model_id)!r}, "
            "or pass --model DIR")
    if problems:
        raise ModelError(problems[0] + hint)
    raise ModelError(f"cannot find model {model_id!r} that this container was made with"
                     + (f" (recorded at {source})" if source else "") + hint)


def _load_spec(spec: ModelSpec, device: str | None) -> Autoencoder:
    if spec.unsupported:
        raise ModelError(f"{spec.id} ({spec.hub_id}) {spec.unsupported}")
    fam = spec.family
    if fam is None:
        raise ModelError(f"model {spec.id!r} needs a {spec.builder!r} loader, which this installation lacks")
    if not fam.packaged:
        local = spec.local_folder()
        if local is not None:
            model = load_folder(local, device)
            if model.info.model_id.startswith("local:"):
                model.info.model_id = spec.id
            return model
    if fam.load_spec is None:
        raise ModelError(f"no weights for {spec.id!r} here: pass --model DIR, or set {MODEL_PATH_ENV} to a "
                         f"folder holding a {spec.id!r} subfolder")
    return fam.load_spec(spec, device)


def _find_spec(name: str) -> ModelSpec | None:
    if name in REGISTRY:
        return REGISTRY[name]
    for fam in families():
        for spec in fam.specs():
            if spec.id == name:
                return spec
    return None


def _looks_like_path(name: str) -> bool:
    return (os.sep in name or (os.altsep or os.sep) in name or name.startswith((".", "~"))
            or name.endswith(os.sep))


def _id_folder_name(model_id: str) -> str:
    return model_id.split(":", 1)[1] if model_id.startswith("local:") else model_id.replace("/", "--")


def _manifest_matches(model_id: str) -> list[Path]:
    """Subfolders of $WSICODEC_MODEL_PATH whose manifest carries ``model_id`` (folder named otherwise)."""
    found = []
    for d in model_path_dirs():
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
