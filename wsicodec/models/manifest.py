"""The model folder manifest, ``wsicodec-model.json`` (format in docs/models.md): the one definition.

    MANIFEST_NAME
    read_manifest(folder) -> dict | None      # normalised: ``id`` always set
    write_manifest(folder, *, model_id, architecture, base=None, description="", extra=None) -> Path

``architecture`` must name a registered model family (wsicodec.models.family).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wsicodec._io import atomic_write_text
from wsicodec.errors import ModelError
from wsicodec.models import family

MANIFEST_NAME = "wsicodec-model.json"
MANIFEST_FORMAT = "wsicodec-model"
MANIFEST_VERSION = 1


def write_manifest(folder: str | Path, *, model_id: str, architecture: str, base: str | None = None,
                   description: str = "", extra: dict[str, Any] | None = None) -> Path:
    """Write ``wsicodec-model.json`` atomically (call it after the weights are in place)."""
    known = sorted(family.names())
    if architecture not in known:
        raise ValueError(f"architecture must be one of {tuple(known)}")
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
    path = Path(folder) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
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
    known = sorted(family.names())
    if arch not in known:
        raise ModelError(f"{path}: unknown architecture {arch!r} (expected one of {', '.join(known)})")
    model_id = manifest.get("id") or manifest.get("model_id") or f"local:{folder.resolve().name}"
    manifest["id"] = str(model_id)
    return manifest
