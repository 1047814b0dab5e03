"""Integrity of a container (format 1.1): a sealed manifest of every stored key's size and SHA-256.

Chunk data is also covered by Zarr's own ``crc32c`` codec, which every Zarr v3 reader checks on read; the
manifest covers what no codec does: the ``zarr.json`` documents (the root attributes among them), missing or
cut-short keys, and whole files, so ``verify`` can check every byte.

    manifest = build_manifest(KeyStore.for_path(tmp_dir), write_id)    # every key but the manifest's own
    manifest_bytes(manifest) -> bytes                                  # what the "integrity" array holds
    parse_manifest(raw) -> dict                                        # ContainerError if not sealed right
    check_keys(store, manifest, full=False) -> list[Problem]           # sizes (and, with full, hashes)

The seal is ``self_sha256``: SHA-256 of the manifest's canonical JSON without that key (keys sorted, no
whitespace, ASCII; the manifest holds only strings and integers, so every language writes it the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from wsicodec.errors import ContainerError

INTEGRITY_ARRAY = "integrity"
MANIFEST_FORMAT = "pzarr-integrity"
MANIFEST_VERSION = 1
_HASH_BLOCK = 1 << 22


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a container: where (array, key or tile) and what."""

    where: str
    what: str

    def line(self) -> str:
        return f"{self.where}: {self.what}"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


class KeyStore:
    """Raw bytes of a container's keys, for a directory or a zip, without going through Zarr."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_file():
            self._zip = zipfile.ZipFile(self.path)

    @classmethod
    def for_path(cls, path: str | os.PathLike) -> "KeyStore":
        return cls(Path(path))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def keys(self) -> Iterator[str]:
        if self._zip is not None:
            for info in self._zip.infolist():
                if not info.is_dir():
                    yield info.filename
            return
        for p in sorted(self.path.rglob("*")):
            if p.is_file():
                yield p.relative_to(self.path).as_posix()

    def size(self, key: str) -> int | None:
        try:
            if self._zip is not None:
                return self._zip.getinfo(key).file_size
            return (self.path / key).stat().st_size
        except (KeyError, OSError):
            return None

    def read(self, key: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(key)  # zipfile checks the member's CRC-32 too
        return (self.path / key).read_bytes()

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        if self._zip is not None:
            with self._zip.open(key) as f:
                for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                    h.update(block)
        else:
            with open(self.path / key, "rb") as f:
                for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                    h.update(block)
        return h.hexdigest()


def _is_manifest_key(key: str) -> bool:
    return key == INTEGRITY_ARRAY or key.startswith(INTEGRITY_ARRAY + "/")


def build_manifest(store: KeyStore, write_id: str) -> dict[str, Any]:
    keys = {k: {"size": int(store.size(k) or 0), "sha256": store.sha256(k)}
            for k in store.keys() if not _is_manifest_key(k)}
    body = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "algorithm": "sha256",
            "write_id": write_id, "keys": dict(sorted(keys.items()))}
    return {**body, "self_sha256": hashlib.sha256(canonical(body)).hexdigest()}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return canonical(manifest)


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """The manifest, checked against its own seal; ContainerError when it is damaged."""
    try:
        m = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ContainerError("damaged container: integrity manifest is not valid JSON") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("keys"), dict):
        raise ContainerError("damaged container: integrity manifest has the wrong shape")
    body = {k: v for k, v in m.items() if k != "self_sha256"}
    try:
        digest = hashlib.sha256(canonical(body)).hexdigest()
    except (TypeError, ValueError):
        raise ContainerError("damaged container: integrity manifest holds values it may not") from None
    if digest != m.get("self_sha256"):
        raise ContainerError("damaged container: integrity manifest does not match its seal")
    return m


def check_keys(store: KeyStore, manifest: dict[str, Any], *, full: bool = False,
               hash_keys: frozenset[str] | None = None) -> list[Problem]:
    """Every manifest key present with its size; hashes of ``hash_keys`` (all keys with ``full``)."""
    problems: list[Problem] = []
    for key, rec in manifest["keys"].items():
        size = store.size(key)
        if size is None:
            problems.append(Problem(key, "missing"))
            continue
        if size != rec.get("size"):
            problems.append(Problem(key, f"size {size} bytes, manifest says {rec.get('size')}"))
            continue
        if full or (hash_keys is not None and key in hash_keys):
            try:
                digest = store.sha256(key)
            except (OSError, zipfile.BadZipFile, ValueError) as exc:
                problems.append(Problem(key, f"unreadable ({exc})"))
                continue
            if digest != rec.get("sha256"):
                problems.append(Problem(key, "SHA-256 does not match the manifest"))
    if full:
        for key in store.keys():
            if not _is_manifest_key(key) and key not in manifest["keys"]:
                problems.append(Problem(key, "not in the manifest (added after writing)"))
    return problems
