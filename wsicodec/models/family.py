"""Model families: how one kind of autoencoder is recognised, loaded and saved.

A family module (builtin.py, taesd.py, diffusers.py) builds one :class:`Family` and calls
:func:`register_family` at import time; registry.py finds folders and names and dispatches through
the table here. This module imports no family module and nothing that imports one.

    register_family(Family(name="toy", sniff=..., load_folder=...)) -> Family
    families() -> list[Family];  family_named(name);  family_for_builder(builder);  names()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsicodec.models.base import Autoencoder

# ``spec`` below is a wsicodec.models.spec.ModelSpec; typed Any because spec.py imports this module.
SpecLoader = Callable[[Any, str | None], Autoencoder]


def _no(_: Any) -> bool:
    return False


def _none(_: Any) -> list:
    return []


def _no_specs() -> list:
    return []


@dataclass(frozen=True, eq=False)  # an entry is itself, whatever its fields
class Family:
    """One kind of model; only ``name``, ``sniff`` and ``load_folder`` are required.

    name          the manifest's ``architecture`` value for folders of this family
    sniff         folder -> whether it is this family's model folder without a manifest
    load_folder   (folder, device, model_id) -> Autoencoder, for a sniffed folder or a manifest naming ``name``
    load_spec     (spec, device) -> Autoencoder, for a registry name whose weights are in no local folder
    save          (model, folder, *, model_id, description="", base=None, extra=None) -> Path
    builders      ModelSpec.builder values this family loads -> the model class name they show
    specs         () -> extra registry names this family brings (ModelSpec list)
    default_model the id ``load_model(None)`` loads, if this family provides the default
    packaged      its names load from the package only: no local folder lookup
    offline       spec -> weights are here without network, besides a local folder (package, HF cache)
    has_weights   folder -> holds complete weights (a registry name's folder lookup); default: sniff
    search_folders spec -> folders to look in besides $WSICODEC_MODEL_PATH and the current directory
    looks_for     what a manifest-less folder of this family holds, for "not a model folder" errors
    """

    name: str
    sniff: Callable[[Path], bool]
    load_folder: Callable[[Path, str | None, str], Autoencoder]
    load_spec: SpecLoader | None = None
    save: Callable[..., Path] | None = None
    builders: Mapping[str, str] = field(default_factory=dict)
    specs: Callable[[], list] = _no_specs
    default_model: str | None = None
    packaged: bool = False
    offline: Callable[[Any], bool] = _no
    has_weights: Callable[[Path], bool] | None = None
    search_folders: Callable[[Any], list[Path]] = _none
    looks_for: str = ""

    @property
    def module(self) -> str:
        """The module that defines the family (registry orders families by it)."""
        return getattr(self.load_folder, "__module__", None) or ""

    def holds_weights(self, folder: Path) -> bool:
        return (self.has_weights or self.sniff)(folder)


_FAMILIES: dict[str, Family] = {}
_discover: Callable[[], None] | None = None


def register_family(family: Family) -> Family:
    """Add ``family`` to the table; a name or builder already taken by another module's family is an error."""
    old = _FAMILIES.get(family.name)
    if old is not None and old.module != family.module:
        raise ValueError(f"model family {family.name!r} is already registered by {old.module}")
    for other in _FAMILIES.values():
        taken = set(other.builders) & set(family.builders)
        if other.name != family.name and taken:
            raise ValueError(f"builder {sorted(taken)[0]!r} already belongs to model family {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def set_discovery(discover: Callable[[], None]) -> None:
    """Install the function that imports the family modules.

    registry.py installs it when wsicodec.models is imported, so a lookup made before any family module
    was imported (a manifest read, ``REGISTRY[id].available_offline()``) still sees every family, while
    this module imports none of them."""
    global _discover
    _discover = discover


def families() -> list[Family]:
    """Every registered family, in registration order."""
    if _discover is not None:
        _discover()
    return list(_FAMILIES.values())


def names() -> list[str]:
    return [f.name for f in families()]


def family_named(name: str) -> Family | None:
    families()
    return _FAMILIES.get(name)


def family_for_builder(builder: str) -> Family | None:
    return next((f for f in families() if builder in f.builders), None)
