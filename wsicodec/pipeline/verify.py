"""Verify a container: structure, completeness, every checksum; optionally decode every tile and re-hash
the source slide.

    report = verify_container(path, decode=False, source=None)   # -> VerifyReport
    report.ok, report.problems (list of Problem: where, what): damage to the container itself
    report.source_problems: with ``source``, why that slide is not the one the container records (an intact
    container whose source differs is not damaged; ``ok`` is false all the same)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsicodec.errors import WsicodecError
from wsicodec.format.container import Container, UnverifiedContainerWarning
from wsicodec.format.integrity import Problem


@dataclass(frozen=True)
class VerifyReport:
    path: str
    problems: list[Problem] = field(default_factory=list)
    checksummed: bool = False  # format 1.1+: every byte was checked against a hash
    tiles_decoded: int = 0
    source_problems: list[Problem] = field(default_factory=list)
    source_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.source_problems

    @property
    def intact(self) -> bool:
        """The container itself is undamaged (whatever a --source check said)."""
        return not self.problems

    def to_json(self) -> dict:
        return {"path": self.path, "ok": self.ok, "intact": self.intact, "checksummed": self.checksummed,
                "tiles_decoded": self.tiles_decoded,
                "source_matches": (not self.source_problems) if self.source_checked else None,
                "problems": [{"where": p.where, "what": p.what} for p in self.problems + self.source_problems]}


def verify_container(path: str | os.PathLike, *, decode: bool = False, source: str | os.PathLike | None = None,
                     device: str | None = None, model: str | None = None, batch_size: int = 8) -> VerifyReport:
    path = Path(path)
    problems: list[Problem] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedContainerWarning)
        try:
            container = Container.open(path)
        except WsicodecError as exc:
            return VerifyReport(str(path), [Problem("container", str(exc))])
    with container:
        problems += container.verify()
        decoded = 0
        if decode and not problems:
            decoded = _decode_all(container, problems, device=device, model=model, batch_size=batch_size)
        source_problems = _check_source(container, Path(source)) if source is not None else []
        # a 1.0 container has no checksums: only its structure and readability were checked
        return VerifyReport(str(path), problems, container.checksummed, decoded, source_problems,
                            source is not None)


def _decode_all(container: Container, problems: list[Problem], *, device: str | None, model: str | None,
                batch_size: int) -> int:
    from wsicodec.pipeline.decoder import TileDecoder, load_decoder_model

    try:
        net = load_decoder_model(container, model, device)
    except WsicodecError as exc:
        problems.append(Problem("model", f"cannot decode: {exc}"))
        return 0
    dec = TileDecoder(container, net, cache_tiles=0, batch_size=batch_size)
    coords = [(int(r), int(c)) for r, c in zip(*np.nonzero(container.tissue))]
    done = 0
    for i in range(0, len(coords), 64):
        chunk = coords[i:i + 64]
        try:
            dec.decode(chunk)
            done += len(chunk)
        except Exception as exc:  # one damaged window: say which tiles, go on with the rest
            r, c = chunk[0]
            problems.append(Problem(f"tiles from ({r}, {c})", f"cannot decode ({exc})"))
    return done


def _check_source(container: Container, source: Path) -> list[Problem]:
    from wsicodec.pipeline.compress import file_sha256

    recorded = (container.attrs.get("source") or {}).get("sha256")
    if not source.is_file():
        return [Problem("source", f"{source} is not a file")]
    if not recorded:
        return [Problem("source", "the container records no source SHA-256")]
    if file_sha256(source) != recorded:
        return [Problem("source differs", f"{source.name} is not the slide this container was made from (its SHA-256 "
                                  f"differs from the recorded {recorded[:12]}...)")]
    return []
