"""Autoencoders behind one interface (:class:`~wsicodec.models.base.Autoencoder`).

    load_model(name_or_path: str | None = None, device: str | None = None) -> Autoencoder
        None -> the default builtin model. A registry name, or a local folder (TAEF2 .pth pair,
        a diffusers save_pretrained folder, or a model folder with a wsicodec-model.json manifest
        written by train/finetune; see docs/models.md).
    list_models() -> list[ModelSpec];  models_table() -> rows for `wsicodec models`
    resolve_model(record, override=None, device=None, verify=True) -> Autoencoder   (for restore)
"""

from wsicodec.models.base import Autoencoder, ModelInfo, pick_device, sha256_of_state_dict
from wsicodec.models.registry import (
    MANIFEST_NAME,
    REGISTRY,
    ModelSpec,
    list_models,
    load_folder,
    load_model,
    models_table,
    read_manifest,
    resolve_model,
    write_manifest,
)

__all__ = [
    "Autoencoder",
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
    "resolve_model",
    "sha256_of_state_dict",
    "write_manifest",
]
