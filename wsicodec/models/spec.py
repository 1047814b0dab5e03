"""A named model (:class:`ModelSpec`) and where model folders are looked for on this machine.

    ModelSpec(id, builder, latent_channels, spatial_factor, input_range, hub_id=None, ...)
    MODEL_PATH_ENV;  model_path_dirs();  model_path_candidates(name);  folder_has_weights(folder)

Anything that depends on the kind of model is asked of the family owning ``spec.builder``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsicodec.models.family import Family, families, family_for_builder
from wsicodec.models.hub import hub_source
from wsicodec.models.manifest import MANIFEST_NAME

MODEL_PATH_ENV = "WSICODEC_MODEL_PATH"


@dataclass(frozen=True)
class ModelSpec:
    """One named model: how to build it and where its weights live."""

    id: str
    builder: str  # a key of some Family.builders ("taef2", "builtin", "diffusers.AutoencoderKL", ...)
    latent_channels: int
    spatial_factor: int
    input_range: tuple[float, float]
    hub_id: str | None = None
    subfolder: str | None = None
    description: str = ""
    licence: str = ""
    gated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    unsupported: str = ""  # listed but not loadable: why, completing "<id> (<hub id>) ..."

    @property
    def family(self) -> Family | None:
        return family_for_builder(self.builder)

    @property
    def model_class(self) -> str:
        fam = self.family
        return fam.builders[self.builder] if fam is not None else self.builder

    @property
    def source(self) -> str:
        if self.hub_id:
            return hub_source(self.hub_id, self.subfolder)
        fam = self.family
        if fam is not None and fam.packaged:
            return "package"
        return "local folder"

    def local_folder(self) -> Path | None:
        """A folder on this machine that holds this model's weights, if any."""
        fam = self.family
        extra = fam.search_folders(self) if fam is not None else []
        for folder in [*model_path_candidates(self.id), *extra]:
            if folder_has_weights(folder):
                return folder
        if folder_has_weights(Path(self.id)):  # a copy in the current directory, named like the id
            return Path(self.id).resolve()
        return None

    def available_offline(self) -> bool:
        """Whether loading needs no network: packaged, in a local folder, or in the HF cache."""
        fam = self.family
        if fam is not None and fam.packaged:
            return fam.offline(self)
        if self.local_folder() is not None:
            return True
        return fam is not None and fam.offline(self)


def model_path_dirs() -> list[Path]:
    """The folders listed in ``$WSICODEC_MODEL_PATH``."""
    raw = os.environ.get(MODEL_PATH_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def model_path_candidates(name: str) -> list[Path]:
    """Existing folders called ``name`` inside the ``$WSICODEC_MODEL_PATH`` folders."""
    if not name:
        return []
    return [d / name for d in model_path_dirs() if (d / name).is_dir()]


def folder_has_weights(folder: Path) -> bool:
    """A manifest, or complete weights of some family, without loading anything."""
    if not folder.is_dir():
        return False
    if (folder / MANIFEST_NAME).is_file():
        return True
    return any(f.holds_weights(folder) for f in families())
