"""Batch compress and restore: many slides into one folder, resumable, on N worker processes or on Ray.

    slides = discover_slides(inputs, out_dir)             # files, folders (recursive), manifests -> [SlideJob]
    result = compress_batch(inputs, out_dir, CompressOptions(...), jobs=None, retries=0, ray=None)
    result = restore_batch(containers, out_dir, RestoreOptions(...), jobs=None, retries=0, ray=None)
    result.records (one final record per slide), result.counts(), result.failed, result.exit_code
    print_summary(result)                                 # the rich table of totals

The rules (docs/batch.md has them for users):

* Each slide becomes ``OUT_DIR/<name>.pzarr`` (``<name>``: the file's stem, a DICOM folder's name, or a
  manifest's output column); two slides with one name are refused before anything runs.
* A rerun skips a slide whose container exists, passes :func:`verify_container` (every checksum, no decode)
  and records the same source SHA-256 and settings (model id, quantiser kind and levels, target µm/px,
  tile size, encode margin, tissue threshold, all-tiles, single-file, and ``--source-mpp`` when given);
  anything else is redone, replacing the old container only once the new one is complete. Outputs are
  atomic, so a run killed at any moment and run again ends with the same set of containers.
* Every attempt appends one JSON line to ``OUT_DIR/wsicodec-runs.jsonl`` with one ``write`` on a file
  opened ``O_APPEND``, so concurrent workers never interleave lines.
* A slide's input error (any :class:`WsicodecError`) fails that slide alone and is not retried; other
  failures, a worker process that died included, are retried ``retries`` times. A :class:`ModelError`
  stops the run: every slide would fail the same way.
* ``jobs`` worker processes (spawned), each loading its model once (a per-process cache) and reusing it
  for all its slides; with CUDA the default is one worker per GPU, pinned to ``cuda:i``. ``ray="local"``
  or an address runs each slide as a Ray task instead; Ray is imported only then.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import signal
import socket
import sys
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from wsicodec.errors import ModelError, SlideError, WsicodecError
from wsicodec.source.slide import SLIDE_SUFFIXES

RUN_LOG_NAME = "wsicodec-runs.jsonl"
MANIFEST_SUFFIXES = (".csv", ".txt")
DICOM_SUFFIX = ".dcm"
CONTAINER_SUFFIXES = (".pzarr.zip", ".pzarr")
DONE_SUFFIX = ".done"
_IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
RAY_MISSING = 'Ray is not installed; --ray needs it: pip install "wsicodec[ray]"'
# Test hook: "NAME=MARKER" makes the worker that picks up slide NAME exit abruptly (os._exit) the first time,
# i.e. when MARKER does not exist yet (it is created then), so tests can kill a worker mid-run.
CRASH_ENV = "WSICODEC_TEST_CRASH_ONCE"
_DEFAULT_TISSUE_THRESHOLD = 0.001  # compress's default (source/tissue.py), kept here to avoid importing scipy
_HOST = socket.gethostname()


# ===================================================================================== inputs
@dataclass(frozen=True)
class SlideJob:
    """One slide to compress: what the user named, the output's stem, and what OpenSlide opens."""

    slide: str  # a slide file, or a DICOM folder
    name: str  # OUT_DIR/<name>.pzarr
    open_path: str  # the file OpenSlide opens (a DICOM folder's first .dcm file)
    source_mpp: float | None = None  # from a manifest's source_mpp column


def _is_container(p: Path) -> bool:
    return p.name.lower().endswith(CONTAINER_SUFFIXES) or (p.is_dir() and (p / "zarr.json").is_file())


def _resolved(p: Path) -> Path:
    """``p.resolve()``, or one WsicodecError line for a symbolic link loop or an unreadable link."""
    try:
        return p.resolve()
    except RuntimeError:  # Python 3.11-3.12 name a loop this way
        raise WsicodecError(f"{p}: a symbolic link loop") from None
    except OSError as exc:
        what = "a symbolic link loop" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise WsicodecError(f"{p}: {what}") from None


def _stem(p: Path) -> str:
    name = p.name
    for suffix in CONTAINER_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem if p.suffix else name


def _dicom_files(folder: Path) -> list[Path]:
    try:
        return sorted(f for f in folder.iterdir() if f.suffix.lower() == DICOM_SUFFIX and f.is_file())
    except OSError:
        return []


def _slide_job(p: Path, name: str | None = None, source_mpp: float | None = None) -> SlideJob:
    """A file is opened as it is; a DICOM folder (OpenSlide opens one of its files and finds the rest of the
    series beside it, it cannot open the folder itself) through its first .dcm file, by name."""
    open_path = p
    if p.is_dir():
        files = _dicom_files(p)
        if files:
            open_path = files[0]
    return SlideJob(str(p), name or _stem(p), str(open_path), source_mpp)


def _search(folder: Path, skip: Path | None) -> list[SlideJob]:
    """Slides under ``folder``: files with a slide suffix and folders holding .dcm files (one slide each);
    hidden names (partials), containers and the output folder are passed over; symlinked folders too."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise WsicodecError(f"cannot list {folder}: {exc.strerror or exc}") from None
    found: list[SlideJob] = []
    if any(e.suffix.lower() == DICOM_SUFFIX and e.is_file() for e in entries):
        found.append(_slide_job(folder))
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir():
            if e.is_symlink() or _is_container(e) or (skip is not None and e.resolve() == skip):
                continue
            found += _search(e, skip)
        elif e.suffix.lower() in SLIDE_SUFFIXES and e.is_file():
            found.append(_slide_job(e))
    return found


def _check_name(name: str, where: str) -> str:
    name = name.strip()
    for suffix in CONTAINER_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or os.sep in name:
        raise WsicodecError(f"{where}: output name {name!r} must be a plain file name (no folders, not hidden)")
    return name


def _positive(value: str, where: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v) or v <= 0:
        raise WsicodecError(f"{where}: source_mpp must be a positive number of µm per pixel, got {value!r}")
    return v


_PATH_COLUMNS = ("path", "slide", "file")
_NAME_COLUMNS = ("output", "name", "out")
_MPP_COLUMNS = ("source_mpp", "source-mpp", "mpp")


def read_manifest(path: str | os.PathLike, skip: Path | None = None) -> list[SlideJob]:
    """A ``.txt`` (one path per line) or ``.csv`` (path, optional output name, optional source_mpp; a header
    row naming them is optional) manifest. Relative paths are relative to the manifest's folder; blank lines
    and lines starting with # are ignored; a folder expands like a folder on the command line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise WsicodecError(f"cannot read the manifest {path}: {getattr(exc, 'strerror', None) or exc}") from None
    rows: list[tuple[int, list[str]]] = []
    if path.suffix.lower() == ".txt":
        rows = [(n, [line.strip()]) for n, line in enumerate(text.splitlines(), 1)]
    else:
        reader = csv.reader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]
    rows = [(n, [c.strip() for c in r]) for n, r in rows
            if r and any(c.strip() for c in r) and not r[0].strip().startswith("#")]
    cols = {"path": 0, "name": 1, "mpp": 2}
    if rows and path.suffix.lower() == ".csv":
        header = [c.lower() for c in rows[0][1]]
        if any(h in _PATH_COLUMNS for h in header):
            def col(names):
                return next((header.index(h) for h in names if h in header), None)
            cols = {"path": col(_PATH_COLUMNS), "name": col(_NAME_COLUMNS), "mpp": col(_MPP_COLUMNS)}
            rows = rows[1:]
    jobs: list[SlideJob] = []
    for n, row in rows:
        where = f"{path.name} line {n}"

        def cell(key):
            i = cols[key]
            return row[i] if i is not None and i < len(row) and row[i] else None

        raw = cell("path")
        if raw is None:
            raise WsicodecError(f"{where}: no slide path")
        p = Path(raw).expanduser()
        p = p if p.is_absolute() else path.parent / p
        name = _check_name(cell("name"), where) if cell("name") else None
        mpp = _positive(cell("mpp"), where) if cell("mpp") else None
        if p.is_dir() and not _dicom_files(p):
            if name or mpp:
                raise WsicodecError(f"{where}: {p} is a folder of slides; an output name or source_mpp needs "
                                    "one slide per line")
            jobs += _search(p, skip)
        else:
            jobs.append(_slide_job(p, name, mpp))
    return jobs


def _unique_names(jobs: list[SlideJob], what: str = "slides") -> list[SlideJob]:
    """Drop the same file named twice; refuse two different inputs that would share one output name."""
    seen_paths: set[str] = set()
    by_name: dict[str, Any] = {}
    kept: list[SlideJob] = []
    clashes: list[tuple[Any, Any]] = []
    for job in jobs:
        key = os.path.realpath(job.open_path)
        if key in seen_paths:
            continue
        seen_paths.add(key)
        other = by_name.setdefault(job.name.casefold(), job)
        if other is not job:
            clashes.append((other, job))
        kept.append(job)
    if clashes:
        a, b = clashes[0]
        more = f" (and {len(clashes) - 1} more clashes)" if len(clashes) > 1 else ""
        raise WsicodecError(f"two {what} would be written to the same name {b.name!r}: {a.slide} and {b.slide}"
                            f"{more}; rename one, or give output names in a .csv manifest (path,output)")
    return kept


def discover_slides(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> list[SlideJob]:
    """Every slide the inputs name: slide files (a missing one stays, and fails on its own), folders searched
    recursively, manifests (.csv/.txt). Duplicate output names are an error."""
    skip = Path(out_dir).resolve() if out_dir is not None else None
    jobs: list[SlideJob] = []
    for raw in inputs:
        p = Path(raw)
        if p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file():
            jobs += read_manifest(p, skip)
        elif p.is_dir() and not _is_container(p) and not _dicom_files(p):
            found = _search(p, skip)
            if not found:
                raise WsicodecError(f"no slides in {p} (looked for {' '.join(sorted(SLIDE_SUFFIXES))} files and "
                                    "folders of .dcm files)")
            jobs += found
        else:
            jobs.append(_slide_job(p))
    if not jobs:
        raise WsicodecError("no slides given")
    return _unique_names(jobs)


def discover_containers(inputs: Iterable[str | os.PathLike],
                        out_dir: str | os.PathLike | None = None) -> list[SlideJob]:
    """Containers named, and those found (recursively) in folders named; ``name`` is the output's stem."""
    skip = Path(out_dir).resolve() if out_dir is not None else None
    jobs: list[SlideJob] = []

    def walk(folder: Path) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            raise WsicodecError(f"cannot list {folder}: {exc.strerror or exc}") from None
        for e in entries:
            if e.name.startswith(".") or (skip is not None and _resolved(e) == skip):
                continue
            if e.name.lower().endswith(CONTAINER_SUFFIXES):
                jobs.append(SlideJob(str(e), _stem(e), str(e)))
            elif e.is_dir() and not e.is_symlink():
                walk(e)

    for raw in inputs:
        p = Path(raw)
        if p.is_dir() and not _is_container(p):
            before = len(jobs)
            walk(p)
            if len(jobs) == before:
                raise WsicodecError(f"no .pzarr containers in {p}")
        else:
            jobs.append(SlideJob(str(p), _stem(p), str(p)))
    if not jobs:
        raise WsicodecError("no containers given")
    return _unique_names(jobs, "containers")


def is_batch(args: Sequence[str], kind: str = "compress") -> bool:
    """Does ``wsicodec compress|restore ARGS...`` mean a batch? Yes with 3+ arguments; with 2, when the last
    is an existing folder that is not a container or ends with a path separator, or when an input is a
    folder that is not a container or (compress) a manifest. ``compress slide.svs slide.pzarr`` stays single."""
    if len(args) >= 3:
        return True
    if len(args) < 2:
        return False
    *inputs, last = args
    seps = ("/", os.sep) + ((os.altsep,) if os.altsep else ())
    out = Path(last)
    if last.endswith(seps):
        return True
    # an existing folder is the batch's output folder, unless it is named like a single output (a container,
    # or for restore an image: `restore s.pzarr out.tiff` onto a folder out.tiff stays an error, not a batch)
    if out.is_dir() and not _is_container(out) and not (kind == "restore" and out.suffix.lower() in _IMAGE_SUFFIXES):
        return True
    for raw in inputs:
        p = Path(raw)
        if p.is_dir() and not _is_container(p):
            return True
        if kind == "compress" and p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file():
            return True
    return False


def _prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WsicodecError(f"{out} is a file; the last argument of a batch is the output folder")
    if _is_container(out):
        raise WsicodecError(f"{out} is a container; the last argument of a batch is the output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".wsicodec-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise WsicodecError(f"cannot write to the output folder {out}: {exc.strerror or exc}") from None
    return out


# ===================================================================================== options, tasks
@dataclass(frozen=True)
class CompressOptions:
    """What every slide of a batch is compressed with: compress()'s keyword arguments."""

    model: str | None = None
    quant: str | None = None
    levels: int | None = None
    target_mpp: float = 0.5
    source_mpp: float | None = None  # for slides that record none; a manifest's column wins
    quality: str | None = None  # the model's operating point (rate-distortion-trained models)
    tile_size: int = 256
    all_tiles: bool = False
    tissue_threshold: float = _DEFAULT_TISSUE_THRESHOLD
    encode_margin: int | None = None
    batch_size: int = 16
    device: str | None = None
    read_workers: int = 2
    single_file: bool = False
    allow_empty: bool = False
    overwrite: bool = False  # redo containers even when they are up to date


@dataclass(frozen=True)
class RestoreOptions:
    """What every container of a batch is restored with: restore()'s keyword arguments."""

    compression: str = "jpeg"
    quality: int = 90
    model: str | None = None
    device: str | None = None
    batch_size: int = 8
    force: bool = False
    overwrite: bool = False  # redo outputs even when their .done sidecar says they are current
    suffix: str = ".tiff"


@dataclass(frozen=True)
class Task:
    """One slide's work as sent to a worker (picklable)."""

    op: str  # "compress" | "restore"
    index: int
    input: str  # the slide (or DICOM folder) or container, as named
    open_path: str
    output: str
    options: Any
    source_mpp: float | None
    log: str
    run: str
    device: str | None = None
    attempt: int | None = 1  # None under Ray, which retries on its own


def append_log(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor: whole lines, even from many writers."""
    line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The run log's records, in order; lines that are not JSON objects are passed over."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _one_line(exc: BaseException | str, limit: int = 500) -> str:
    text = " ".join(str(exc).split()) if not isinstance(exc, str) else " ".join(exc.split())
    if isinstance(exc, BaseException) and not isinstance(exc, WsicodecError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:limit] if len(text) <= limit else text[: limit - 1] + "…"


def _record(task: Task, status: str, reason: str = "", *, bytes_: int | None = None, tiles: int | None = None,
            source_bytes: int | None = None, seconds: float = 0.0, error: str | None = None,
            pid: int | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "op": task.op,
        "run": task.run,
        ("slide" if task.op == "compress" else "container"): task.input,
        "output": task.output,
        "status": status,
        "reason": reason,
        "bytes": bytes_,
        "tiles": tiles,
        "seconds": round(seconds, 3),
        "attempt": task.attempt,
        "host": _HOST,
        "pid": os.getpid() if pid is None else pid,
        "device": task.device,
        # this process's peak resident memory so far (a worker's, under --jobs or Ray)
        "peak_rss_mib": _peak_rss_mib() if pid is None else None,
    }
    if task.op == "compress":
        rec["source_bytes"] = source_bytes
    if error:
        rec["error"] = error
    return rec


_INTERNAL = ("retryable", "fatal")


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # macOS: bytes; Linux: KiB


def run_task(task: Task) -> dict[str, Any]:
    """Do one slide's work in this process and log the attempt; never raises (KeyboardInterrupt aside)."""
    _crash_for_test(task)
    started = time.perf_counter()
    retryable = fatal = False
    try:
        if task.op == "compress":
            status, reason, nbytes, tiles, src = _compress_one(task)
        else:
            status, reason, nbytes, tiles, src = _restore_one(task)
        rec = _record(task, status, reason, bytes_=nbytes, tiles=tiles, source_bytes=src,
                      seconds=time.perf_counter() - started)
    except WsicodecError as exc:  # the slide's own problem (or the model's): retrying changes nothing
        fatal = isinstance(exc, ModelError)
        rec = _record(task, "failed", _one_line(exc), seconds=time.perf_counter() - started,
                      error=type(exc).__name__)
    except Exception as exc:  # anything else may be transient (memory, a flaky mount): retried
        retryable = True
        rec = _record(task, "failed", _one_line(exc), seconds=time.perf_counter() - started,
                      error=type(exc).__name__)
    append_log(task.log, rec)
    return {**rec, "retryable": retryable, "fatal": fatal}


def _crash_for_test(task: Task) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec or "=" not in spec:
        return
    name, marker = spec.split("=", 1)
    if _stem(Path(task.output)) != name:
        return
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    os._exit(17)


# ===================================================================================== compress one
_MODELS: dict[tuple[str | None, str | None], Any] = {}  # per process: each worker loads its model once
_DECODERS: dict[tuple, Any] = {}


def cached_model(name: str | None, device: str | None):
    """The autoencoder ``name`` on ``device``, loaded once per process."""
    key = (name, device)
    if key not in _MODELS:
        from wsicodec.models import load_model

        _MODELS[key] = load_model(name, device=device)
    return _MODELS[key]


def _nested(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def expected_settings(model, options: CompressOptions, source_mpp: float | None) -> dict[str, Any]:
    """What a container made now with ``options`` would record (defaults resolved with the model)."""
    from wsicodec.pipeline.compress import choose_quantizer, encode_margin_px

    q = choose_quantizer(model, options.quant, options.levels, options.quality)
    settings: dict[str, Any] = {
        "model id": model.info.model_id,
        "quantiser": q.kind,
        "levels": q.levels,
        "target µm/px": float(options.target_mpp),
        "tile size": int(options.tile_size),
        "encode margin": encode_margin_px(model, options.encode_margin),
        "tissue threshold": None if options.all_tiles else float(options.tissue_threshold),
        "all tiles": bool(options.all_tiles),
        "single file": bool(options.single_file),
    }
    if source_mpp is not None:
        settings["source µm/px"] = float(source_mpp)
    return settings


def recorded_settings(attrs: dict[str, Any], path: Path) -> dict[str, Any]:
    """The same settings as a container's root attributes record them."""
    target = _nested(attrs, "resolution", "target_mpp")
    return {
        "model id": _nested(attrs, "model", "id"),
        "quantiser": _nested(attrs, "quantizer", "kind"),
        "levels": _nested(attrs, "quantizer", "levels"),
        "target µm/px": target if target is not None else _nested(attrs, "grid", "target_mpp"),
        "tile size": _nested(attrs, "grid", "tile_size"),
        "encode margin": _nested(attrs, "encoding", "margin_px"),
        "tissue threshold": _nested(attrs, "encoding", "tissue_threshold"),
        "all tiles": _nested(attrs, "encoding", "all_tiles"),
        "single file": path.is_file(),
        "source µm/px": _nested(attrs, "resolution", "source_mpp"),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def settings_changes(expected: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    return [f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in expected.items() if not _same(recorded.get(k), v)]


def stale_reason(out: Path, source: Path, model, options: CompressOptions,
                 source_mpp: float | None) -> tuple[str, dict[str, Any]]:
    """'' when ``out`` is up to date for ``source`` (same settings, verifies, same source SHA-256), else why
    not; and the container's attributes. Cheap checks first: settings, then the container, then the source."""
    from wsicodec.format.container import Container, UnverifiedContainerWarning
    from wsicodec.pipeline.compress import file_sha256
    from wsicodec.pipeline.verify import verify_container

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedContainerWarning)
            with Container.open(out) as c:
                attrs = dict(c.attrs)
    except Exception as exc:
        return f"the existing output is not a readable container ({_one_line(exc, 200)})", {}
    changes = settings_changes(expected_settings(model, options, source_mpp), recorded_settings(attrs, out))
    if changes:
        return "settings changed: " + "; ".join(changes), attrs
    report = verify_container(out)
    if not report.ok:
        return f"container damaged: {report.problems[0].line()}", attrs
    if not source.is_file():
        raise SlideError(f"slide not found: {source} (its container {out.name} exists and verifies)")
    recorded = _nested(attrs, "source", "sha256")
    try:
        actual = file_sha256(source)
    except OSError as exc:
        raise SlideError(f"cannot read {source}: {exc.strerror or exc}") from None
    if actual != recorded:
        return "source changed: its SHA-256 differs from the container's record", attrs
    return "", attrs


def _compress_one(task: Task) -> tuple[str, str, int, int | None, int | None]:
    from wsicodec._io import disk_bytes, partial_name, remove_path, remove_stale_partials
    from wsicodec.pipeline.compress import compress

    opts: CompressOptions = task.options
    out = Path(task.output)
    model = cached_model(opts.model, task.device)
    redo = ""
    if out.exists() or out.is_symlink():
        if opts.overwrite:
            redo = "--overwrite"
        else:
            redo, attrs = stale_reason(out, Path(task.open_path), model, opts, task.source_mpp)
            if not redo:
                return ("skipped", "up to date: verified, same source SHA-256 and settings", disk_bytes(out),
                        _nested(attrs, "tiles", "tissue"), _nested(attrs, "source", "size"))
    # a folder container cannot be renamed onto a file (an old single-file container, or junk): set the old
    # one aside under a hidden name, put it back if compressing fails, remove it once the new one is in place
    aside = None
    if redo and not opts.single_file and (out.is_file() or out.is_symlink()):
        aside = partial_name(out, "old")
        os.replace(out, aside)
    try:
        res = compress(task.open_path, out, model=model, quant=opts.quant, levels=opts.levels, quality=opts.quality,
                       target_mpp=opts.target_mpp, source_mpp=task.source_mpp, tile_size=opts.tile_size,
                       all_tiles=opts.all_tiles, batch_size=opts.batch_size, read_workers=opts.read_workers,
                       overwrite=bool(redo), single_file=opts.single_file, tissue_threshold=opts.tissue_threshold,
                       encode_margin=opts.encode_margin, allow_empty=opts.allow_empty, progress=False)
    except BaseException:
        if aside is not None and not (out.exists() or out.is_symlink()):
            os.replace(aside, out)
        raise
    if aside is not None:
        remove_path(aside)
    remove_stale_partials(out, "old")  # what a writer killed in between left aside
    return "ok", f"redone: {redo}" if redo else "", res.container_bytes, res.tissue_tiles, res.source_bytes


# ===================================================================================== restore one
def done_path(output: str | os.PathLike) -> Path:
    """The sidecar that says ``output`` was restored completely from a container with a given write_id."""
    out = Path(output)
    return out.with_name(out.name + DONE_SUFFIX)


def _restore_one(task: Task) -> tuple[str, str, int, int | None, None]:
    from wsicodec._io import atomic_write_text
    from wsicodec.format.container import Container, UnverifiedContainerWarning
    from wsicodec.pipeline.decoder import load_decoder_model
    from wsicodec.pipeline.restore import restore

    opts: RestoreOptions = task.options
    out, done = Path(task.output), done_path(task.output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedContainerWarning)
        with Container.open(task.input) as c:
            write_id = _nested(c.attrs, "integrity", "write_id")
            record = dict(c.model)
            key = (record.get("id"), record.get("decoder_sha256"), record.get("source"), opts.model, task.device,
                   opts.force)
            if out.exists() and done.is_file() and write_id and not opts.overwrite:
                try:
                    sidecar = json.loads(done.read_text())
                except (OSError, ValueError):
                    sidecar = {}
                if isinstance(sidecar, dict) and sidecar.get("write_id") == write_id:
                    return ("skipped", "up to date: its .done records this container's write_id",
                            out.stat().st_size, sidecar.get("tiles"), None)
            if key not in _DECODERS:
                _DECODERS[key] = load_decoder_model(c, opts.model, task.device, opts.force)
    redo = out.exists()
    res = restore(task.input, out, compression=opts.compression, quality=opts.quality, device=task.device,
                  batch_size=opts.batch_size, model=opts.model, force=opts.force, overwrite=redo, progress=False,
                  _model_obj=_DECODERS[key])
    atomic_write_text(done, json.dumps({
        "container": str(Path(task.input).resolve()), "write_id": write_id, "output": out.name,
        "bytes": res.bytes, "tiles": res.decoded_tiles,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1) + "\n")
    return "ok", "redone: no current .done sidecar" if redo else "", res.bytes, res.decoded_tiles, None


# ===================================================================================== results
@dataclass(frozen=True)
class BatchResult:
    """One batch run: the final record of every slide (as in the run log), and where it all is."""

    op: str
    out_dir: str
    log: str
    run: str
    records: tuple[dict[str, Any], ...]
    seconds: float
    workers: int
    backend: str  # "inline" | "processes" | "ray"
    not_run: int = 0  # slides left when the run stopped (a model error)

    def counts(self) -> dict[str, int]:
        c = {"ok": 0, "skipped": 0, "failed": 0}
        for r in self.records:
            c[r["status"]] = c.get(r["status"], 0) + 1
        return c

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.not_run else 0

    def totals(self) -> dict[str, Any]:
        done = [r for r in self.records if r["status"] != "failed"]
        src = sum(r.get("source_bytes") or 0 for r in done)
        out = sum(r.get("bytes") or 0 for r in done)
        return {
            "slides": len(self.records) + self.not_run, **self.counts(), "not_run": self.not_run,
            "source_bytes": src if self.op == "compress" else None, "bytes": out,
            "ratio": (src / out if out and src else None) if self.op == "compress" else None,
            "tiles": sum(r.get("tiles") or 0 for r in done),
            "seconds": round(self.seconds, 3),
            "slides_per_second": len(self.records) / self.seconds if self.seconds > 0 else None,
            "workers": self.workers, "backend": self.backend,
        }

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "out_dir": self.out_dir, "log": self.log, "run": self.run,
                "totals": self.totals(),
                "records": [{k: v for k, v in r.items() if k not in _INTERNAL} for r in self.records]}


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def print_summary(result: BatchResult, console=None, max_failures: int = 20) -> None:
    """The totals of a batch (rich), then the failed slides with their reasons."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    t = result.totals()
    compress = result.op == "compress"
    rate = t["slides_per_second"]
    cells = {
        "slides" if compress else "containers": str(t["slides"]), "ok": str(t["ok"]), "skipped": str(t["skipped"]),
        "failed": f"[red]{t['failed']}[/red]" if t["failed"] else "0",
        "containers" if compress else "output": _human(t["bytes"]),
    }
    if compress:
        cells.update({"source": _human(t["source_bytes"]), "ratio": f"{t['ratio']:.1f}×" if t["ratio"] else "-"})
    cells.update({"tiles": str(t["tiles"]), "seconds": f"{t['seconds']:.1f}",
                  "slides/s" if compress else "per s": f"{rate:.2f}" if rate else "-",
                  "workers": f"{t['workers'] or '-'} ({t['backend']})"})
    table = Table(title=f"wsicodec {result.op}: {result.out_dir}", header_style="bold")
    for name in cells:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row(*cells.values())
    console.print(table)
    failed = result.failed
    for r in failed[:max_failures]:
        console.print(f"[red]failed[/red] {r.get('slide') or r.get('container')}: {r['reason']}", highlight=False,
                      soft_wrap=True)
    if len(failed) > max_failures:
        console.print(f"... and {len(failed) - max_failures} more failed; see {result.log}", highlight=False)
    if result.not_run:
        console.print(f"[red]{result.not_run} slide{'' if result.not_run == 1 else 's'} not run[/red]: the run stopped (see the error)")
    console.print(f"run log: {result.log} (run {result.run})", highlight=False, style="dim")


# ===================================================================================== running
OnFinal = Callable[[Task, dict], None]


def plan_workers(jobs: int | None, device: str | None) -> list[str | None]:
    """One device per worker. With CUDA and no device named (or plain "cuda"): one worker per GPU by default,
    worker i pinned to cuda:(i mod GPUs); otherwise ``jobs`` workers (default 1) on ``device``."""
    if jobs is not None and jobs < 1:
        raise WsicodecError(f"--jobs must be at least 1, got {jobs}")
    if device in (None, "cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n:
            return [f"cuda:{i % n}" for i in range(jobs or n)]
    return [device] * (jobs or 1)


def _should_retry(rec: dict, task: Task, retries: int) -> bool:
    return rec["status"] == "failed" and rec.get("retryable", False) and (task.attempt or 1) <= retries


def _run_inline(tasks: Sequence[Task], retries: int, on_final: OnFinal) -> None:
    for task in tasks:
        while True:
            rec = run_task(task)
            if not _should_retry(rec, task, retries):
                break
            task = replace(task, attempt=(task.attempt or 1) + 1)
        on_final(task, rec)
        if rec.get("fatal"):
            return


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt()


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when the driver dies, even by kill -9 (so no orphan goes on
    writing into OUT_DIR beside a rerun); elsewhere the closed pipe ends the worker after its slide."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - best effort
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_main(conn, parent_pid: int, threads: int | None) -> None:
    _die_with_parent(parent_pid)
    # SIGTERM from the driver: unwind like Ctrl-C so the slide in hand removes its partial output
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            rec = run_task(task)
            try:
                conn.send(rec)
            except OSError:
                return
    except KeyboardInterrupt:
        return


@dataclass
class _Slot:
    index: int
    device: str | None
    proc: Any = None
    conn: Any = None
    task: Task | None = None


class _Pool:
    """Worker processes (spawned), each fed one task at a time through its own pipe, so the driver always
    knows which slide a worker that died was on."""

    def __init__(self, devices: Sequence[str | None], threads: int | None):
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.threads = threads
        self.slots = [_Slot(i, d) for i, d in enumerate(devices)]
        for slot in self.slots:
            self.start(slot)

    def start(self, slot: _Slot) -> None:
        parent, child = self.ctx.Pipe()
        slot.proc = self.ctx.Process(target=_worker_main, args=(child, os.getpid(), self.threads),
                                     name=f"wsicodec-worker-{slot.index}", daemon=True)
        slot.proc.start()
        child.close()
        slot.conn, slot.task = parent, None

    def restart(self, slot: _Slot) -> None:
        try:
            slot.conn.close()
        except OSError:
            pass
        if slot.proc.is_alive():
            slot.proc.kill()
        slot.proc.join(5)
        self.start(slot)

    def close(self, graceful: bool) -> None:
        for slot in self.slots:
            if graceful:
                try:
                    slot.conn.send(None)
                except OSError:
                    pass
            elif slot.proc.is_alive():
                slot.proc.terminate()  # SIGTERM: the worker unwinds and removes its partial
        deadline = time.monotonic() + (30 if graceful else 10)
        for slot in self.slots:
            slot.proc.join(max(0.1, deadline - time.monotonic()))
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join(5)
            try:
                slot.conn.close()
            except OSError:
                pass


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the worker process died ({name})"
    return f"the worker process died (exit code {exitcode})"


def _run_pool(tasks: Sequence[Task], devices: Sequence[str | None], retries: int, on_final: OnFinal) -> None:
    from multiprocessing.connection import wait

    cpus = os.cpu_count() or 1
    threads = max(1, cpus // len(devices))
    pending = deque(tasks)
    pool = _Pool(devices, threads)
    stop = False
    graceful = False
    try:
        while True:
            for slot in pool.slots:
                while slot.task is None and pending and not stop:
                    task = replace(pending.popleft(), device=slot.device)
                    try:
                        slot.conn.send(task)
                        slot.task = task
                    except OSError:  # it died while idle: a fresh one, and the task again
                        pending.appendleft(task)
                        pool.restart(slot)
            busy = [s for s in pool.slots if s.task is not None]
            if not busy:
                break
            ready = set(wait([s.conn for s in busy] + [s.proc.sentinel for s in busy]))
            for slot in busy:
                if slot.conn not in ready and slot.proc.sentinel not in ready:
                    continue
                task, slot.task = slot.task, None
                rec = None
                try:
                    if slot.conn.poll():
                        rec = slot.conn.recv()
                except (EOFError, OSError):
                    rec = None
                if rec is None:  # died with the slide in hand: the driver logs the attempt
                    slot.proc.join(5)
                    rec = {**_record(task, "failed", _death_reason(slot.proc.exitcode), pid=slot.proc.pid,
                                     error="WorkerDied"), "retryable": True, "fatal": False}
                    append_log(task.log, {k: v for k, v in rec.items() if k not in _INTERNAL})
                if not slot.proc.is_alive():
                    pool.restart(slot)
                if _should_retry(rec, task, retries):
                    pending.appendleft(replace(task, attempt=(task.attempt or 1) + 1))
                    continue
                on_final(task, rec)
                if rec.get("fatal"):
                    stop = True
        graceful = True
    finally:
        pool.close(graceful)


class RetryableFailure(Exception):
    """Raised by a Ray task whose slide failed in a way worth retrying; carries the attempt's record."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(record)
        self.record = record

    def __str__(self) -> str:
        return str(self.record.get("reason", ""))


def _ray_task(task: Task) -> dict[str, Any]:
    """A Ray task: one slide in a Ray worker (whose model cache lives as long as the worker)."""
    rec = run_task(task)
    if rec["status"] == "failed" and rec.get("retryable"):
        raise RetryableFailure(rec)
    return rec


def import_ray():
    try:
        import ray
    except ImportError:
        raise WsicodecError(RAY_MISSING) from None
    return ray


def _ray_init(ray, address: str, cpus: int) -> bool:
    """Connect to Ray; True when this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    if address == "local":
        # a private single-node cluster bound to the loopback interface, without dashboard or usage stats
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="ERROR", log_to_driver=False)
    else:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as exc:
            raise WsicodecError(f"cannot connect to the Ray cluster at {address}: {_one_line(exc)}") from None
    return True


def _run_ray(tasks: Sequence[Task], address: str, jobs: int | None, device: str | None, retries: int,
             on_final: OnFinal) -> None:
    import contextlib

    ray = import_ray()
    # Ray prints its workers' and raylets' messages (a worker that died...) on stdout: keep stdout for the
    # command's own output (--json), send them to stderr
    with contextlib.redirect_stdout(sys.stderr):
        _run_ray_tasks(ray, tasks, address, jobs, device, retries, on_final)


def _run_ray_tasks(ray, tasks: Sequence[Task], address: str, jobs: int | None, device: str | None, retries: int,
                   on_final: OnFinal) -> None:
    started = _ray_init(ray, address, jobs or 2)
    try:
        gpus = 1 if device and device.startswith("cuda") else 0
        # Ray hands a GPU task its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES)
        task_device = "cuda" if gpus else device
        remote = ray.remote(_ray_task).options(num_cpus=1, num_gpus=gpus, max_retries=retries,
                                               retry_exceptions=[RetryableFailure])
        refs = {remote.remote(replace(t, device=task_device, attempt=None)): t for t in tasks}
        stop = False
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                task = replace(refs.pop(ref), device=task_device, attempt=None)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.TaskCancelledError:
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", exc)
                    if isinstance(cause, RetryableFailure):
                        rec = cause.record  # already logged by the attempt itself
                    else:
                        rec = _record(task, "failed", _one_line(cause), error=type(cause).__name__)
                        append_log(task.log, rec)
                except ray.exceptions.RayError as exc:  # the worker or its node died on the last try
                    rec = _record(task, "failed", f"the Ray worker failed ({type(exc).__name__}): "
                                  f"{_one_line(str(exc), 200)}", error=type(exc).__name__, pid=0)
                    append_log(task.log, rec)
                on_final(task, rec)
                if rec.get("fatal") and not stop:
                    stop = True
                    for other in refs:
                        ray.cancel(other)
    finally:
        if started:
            ray.shutdown()


def _execute(tasks: list[Task], *, jobs: int | None, device: str | None, retries: int, ray: str | None,
             progress: bool, description: str, on_record: Callable[[dict], None] | None) -> tuple[list, int, str]:
    from wsicodec._progress import progress_bar

    if retries < 0:
        raise WsicodecError(f"--retries must be >= 0, got {retries}")
    final: dict[int, dict] = {}
    fatal: list[dict] = []
    bar = progress_bar(progress, unit="slides")
    with bar:
        bar_task = bar.add_task(description, total=len(tasks))

        def on_final(task: Task, rec: dict) -> None:
            final[task.index] = rec
            if rec.get("fatal"):
                fatal.append(rec)
            bar.update(bar_task, advance=1, note=f"{rec['status']} {Path(task.output).name}")
            if on_record is not None:
                on_record({k: v for k, v in rec.items() if k not in _INTERNAL})

        if ray:
            if jobs is not None and jobs < 1:
                raise WsicodecError(f"--jobs must be at least 1, got {jobs}")
            _run_ray(tasks, ray, jobs, device, retries, on_final)
            workers, backend = (jobs or 2) if ray == "local" else (jobs or 0), "ray"
        else:
            devices = plan_workers(jobs, device)[: max(1, len(tasks))]
            workers = len(devices)
            if workers == 1:
                backend = "inline"
                _run_inline([replace(t, device=devices[0]) for t in tasks], retries, on_final)
            else:
                backend = "processes"
                _run_pool(tasks, devices, retries, on_final)
    if fatal:
        raise ModelError(fatal[0]["reason"])
    return [final[i] for i in sorted(final)], workers, backend


def _check_compress_options(o: CompressOptions) -> None:
    """Fail once, up front, on what would fail every slide."""
    from wsicodec.quant.quantizer import make_quantizer

    if o.target_mpp <= 0 or (o.source_mpp is not None and o.source_mpp <= 0):
        raise WsicodecError("resolutions must be positive numbers of µm per pixel")
    if o.batch_size < 1:
        raise WsicodecError("--batch-size must be at least 1")
    if not 0 <= o.tissue_threshold < 1:
        raise WsicodecError(f"--tissue-threshold must be a fraction in [0, 1), got {o.tissue_threshold}")
    if o.encode_margin is not None and o.encode_margin < 0:
        raise WsicodecError(f"--encode-margin must be >= 0 pixels, got {o.encode_margin}")
    if o.quant is not None:
        make_quantizer(o.quant, 256 if o.levels is None else o.levels)


def compress_batch(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                   options: CompressOptions | None = None, *, jobs: int | None = None, retries: int = 0,
                   ray: str | None = None, progress: bool = False,
                   on_record: Callable[[dict], None] | None = None) -> BatchResult:
    """Compress every slide the inputs name into ``out_dir`` (see the module docstring for the rules)."""
    options = options or CompressOptions()
    if isinstance(options.model, os.PathLike):
        options = replace(options, model=os.fspath(options.model))
    _check_compress_options(options)
    if ray:
        import_ray()  # before any work: without Ray, say so in one line
    started = time.perf_counter()
    out = _prepare_out_dir(out_dir)
    slides = discover_slides(inputs, out)
    run = uuid.uuid4().hex[:12]
    log = str(out / RUN_LOG_NAME)
    tasks = [Task("compress", i, s.slide, s.open_path, str(out / f"{s.name}.pzarr"), options,
                  s.source_mpp if s.source_mpp is not None else options.source_mpp, log, run, options.device)
             for i, s in enumerate(slides)]
    records, workers, backend = _execute(tasks, jobs=jobs, device=options.device, retries=retries, ray=ray,
                                         progress=progress, description="compress", on_record=on_record)
    return BatchResult("compress", str(out), log, run, tuple(records), time.perf_counter() - started, workers,
                       backend, not_run=len(tasks) - len(records))


def restore_batch(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                  options: RestoreOptions | None = None, *, jobs: int | None = None, retries: int = 0,
                  ray: str | None = None, progress: bool = False,
                  on_record: Callable[[dict], None] | None = None) -> BatchResult:
    """Restore every container the inputs name to ``out_dir/<name><suffix>``; an output is current (skipped)
    when its ``<output>.done`` sidecar records the container's integrity write_id."""
    from wsicodec.pipeline.tiff import COMPRESSIONS

    options = options or RestoreOptions()
    if options.compression not in COMPRESSIONS:
        raise WsicodecError(f"unknown compression {options.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if not 1 <= int(options.quality) <= 100:
        raise WsicodecError(f"--quality must be between 1 and 100, got {options.quality}")
    if ray:
        import_ray()
    started = time.perf_counter()
    out = _prepare_out_dir(out_dir)
    containers = discover_containers(inputs, out)
    run = uuid.uuid4().hex[:12]
    log = str(out / RUN_LOG_NAME)
    tasks = [Task("restore", i, c.slide, c.open_path, str(out / f"{c.name}{options.suffix}"), options, None, log,
                  run, options.device) for i, c in enumerate(containers)]
    records, workers, backend = _execute(tasks, jobs=jobs, device=options.device, retries=retries, ray=ray,
                                         progress=progress, description="restore", on_record=on_record)
    return BatchResult("restore", str(out), log, run, tuple(records), time.perf_counter() - started, workers,
                       backend, not_run=len(tasks) - len(records))


__all__ = ["BatchResult", "CompressOptions", "RestoreOptions", "SlideJob", "Task", "RUN_LOG_NAME",
           "append_log", "compress_batch", "discover_containers", "discover_slides", "done_path",
           "expected_settings", "is_batch", "plan_workers", "print_summary", "read_log", "read_manifest",
           "recorded_settings", "restore_batch", "run_task", "stale_reason"]
