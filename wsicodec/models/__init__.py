"""Autoencoders behind one interface (:class:`~wsicodec.models.base.Autoencoder`).

    load_model(name_or_path: str | None = None, device: str | None = None) -> Autoencoder
        None -> the default builtin model. A registry name, or a local folder (TAEF2 .pth pair,
        a diffusers save_pretrained folder, or a model folder with a wsicodec-model.json manifest
        written by train/finetune; see docs/models.md).
    list_models() -> list[ModelSpec];  models_table() -> rows for `wsicodec models`
    resolve_model(record, override=None, device=None, verify=True) -> Autoencoder   (for restore)

Modules, lowest first: base (the interface), hub, family (the table of model families),
manifest, spec (ModelSpec), the families (builtin, diffusers, taesd), registry (names and folders).
"""

from wsicodec.models.base import Autoencoder, ModelInfo, pick_device, sha256_of_state_dict
from wsicodec.models.family import Family, register_family
from wsicodec.models.manifest import MANIFEST_NAME, read_manifest, write_manifest
from wsicodec.models.registry import REGISTRY, list_models, load_folder, load_model, models_table, resolve_model
from wsicodec.models.spec import ModelSpec

__all__ = [
    "Autoencoder",
    "Family",
    "ModelInfo",
    "ModelSpec",
    "MANIFEST_NAME",
    "REGISTRY",
    "list_models",
    "load_folder",
    "load_model",
    "models_table",
    "pick_device",
    "read_manifest",
    "register_family",
    "resolve_model",
    "sha256_of_state_dict",
    "write_manifest",
]
