"""Autoencoders behind one interface (:class:`~wsicodec.models.base.Autoencoder`).

    load_model(name_or_path: str | None = None, device: str | None = None) -> Autoencoder
        None -> the default builtin model. A registry name, or a local folder (TAEF2 .pth pair,
        a diffusers save_pretrained folder, or a builtin-model folder written by train/finetune).
    list_models() -> list[ModelSpec]
"""
