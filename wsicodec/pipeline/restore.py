"""Restore: a container -> a pyramidal Aperio-layout BigTIFF (or a DICOM WSI folder), or one region as an image file.

    restore(container_path, out_path, ...) -> RestoreResult          # the pyramidal BigTIFF
    restore(container_path, out_dir, format="dicom", ...)            # a DICOM WSI folder (docs/dicom.md)
    restore_region(container_path, out_path, x, y, w, h, level=0, ...)   # one region as PNG/TIFF/...
"""

from __future__ import annotations

import errno
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsicodec._io import atomic_output, check_output_path, disk_bytes
from wsicodec._progress import progress_bar
from wsicodec.errors import OutputExistsError, WsicodecError
from wsicodec.format.spec import ZIP_MAGIC
from wsicodec.pipeline.tiff import COMPRESSIONS, AperioInfo, write_aperio_pyramid
from wsicodec.pipeline.decoder import Pyramid, TileDecoder, load_decoder_model, open_container, prefetch

RESTORE_FORMATS = ("tiff", "dicom")
# what a whole-slide TIFF restore may be named (Aperio layout: .svs names it for viewers that go by suffix)
TIFF_SUFFIXES = (".tiff", ".tif", ".svs")
# a whole slide named .png/.jpg/... is written as that image when its level 0 holds at most this many pixels
# (the RGB array, about 3 bytes a pixel, and the encoder's copy stay a few hundred MB); larger ones are refused
WHOLE_IMAGE_MAX_PIXELS = 40_000_000
# names of files, never of a DICOM folder (a folder `slide.tiff` of .dcm files would mislead everyone)
_FILE_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".btf", ".dcm",
                            ".pzarr", ".zip", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".jp2", ".j2k"})
# the most one region restore (--region) may hold as RGB: 1 GiB, about 18 900 x 18 900 px
REGION_BUDGET_BYTES = 1 << 30

def _aperio_info(container) -> AperioInfo:
    grid = container.grid
    # the archived pixels' own size (a source within 2 % of the target is archived 1:1 and keeps its size);
    # the magnification stays the nominal one asked for
    mpp = float(getattr(container, "archived_mpp", grid.target_mpp))
    extra: dict[str, str] = {}
    attrs = getattr(container, "attrs", {}) or {}
    source = attrs.get("source") or {}
    if isinstance(source, dict):
        name = source.get("name") or source.get("file_name") or source.get("filename")
        if name:
            extra["Filename"] = str(name)
        # provenance: when and on what the source was scanned, as Aperio names it (OpenSlide: aperio.Date, ...)
        props = source.get("properties") or {}
        for key in ("Date", "Time", "ScanScope ID"):
            if props.get(f"aperio.{key}"):
                extra[key] = str(props[f"aperio.{key}"])
        if props.get("openslide.vendor"):
            extra["SourceVendor"] = str(props["openslide.vendor"])
    extra["ArchivedMPP"] = f"{float(getattr(grid, 'actual_mpp', mpp)):.4f}"
    model = getattr(container, "model", {}) or {}
    if model.get("id"):
        extra["WsicodecModel"] = str(model["id"])
    # the archive's magnification follows from its resolution (10 µm/px is 1x)
    return AperioInfo(mpp=mpp, app_mag=round(10.0 / float(grid.target_mpp), 2), extra=extra)


def _is_container(path: Path) -> bool:
    """A .pzarr store, folder or zip (damaged ones included): never a restore's output."""
    if path.suffix.lower() == ".pzarr" and path.exists():
        return True
    if path.is_dir():
        return (path / "zarr.json").is_file()
    if not path.is_file():  # never open a FIFO or a device to look: that can block or have effects
        return False
    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in ZIP_MAGIC:
                return False
        with zipfile.ZipFile(path) as zf:
            return "zarr.json" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_not_input(container_path: str | os.PathLike, out_path: Path) -> None:
    """Refuse outputs that would replace or write into the container being read."""
    try:
        src, dst = Path(container_path).resolve(), out_path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11-3.12 report a symbolic link loop as RuntimeError
        loop = isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP
        raise WsicodecError(f"{_one_line(exc) if not loop else 'a symbolic link loop'}: "
                            f"{container_path} -> {out_path}") from None
    try:
        same = dst == src or (src.exists() and dst.exists() and os.path.samefile(src, dst))
    except OSError:
        same = dst == src
    if same:
        raise WsicodecError(f"output {out_path} is the input container; choose another output path")
    if src.is_dir() and dst.is_relative_to(src):
        raise WsicodecError(f"output {out_path} is inside the input container {container_path}; "
                            "choose a path outside it")


def _check_output(out_path: Path, overwrite: bool) -> None:
    check_output_path(out_path)
    if _is_container(out_path):
        raise OutputExistsError(f"{out_path} is a .pzarr container; restore never replaces one, "
                                "even with --overwrite")
    if out_path.is_dir():
        # commit() would set the folder aside and delete it: a restore only ever replaces a file
        raise OutputExistsError(f"{out_path} is a folder; restore writes a file and never replaces a folder")
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path} exists; pass --overwrite to replace it")
    if not out_path.parent.is_dir():
        raise WsicodecError(f"output folder does not exist: {out_path.parent}")


class _Progress:
    """The shared progress bar, driven by tile counts and level messages."""

    def __init__(self, enabled: bool, total: int, description: str):
        self._bar = progress_bar(enabled, unit="tiles")
        self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> "_Progress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._bar.__exit__(*exc)
        return False

    def advance(self, n: int) -> None:
        self._bar.update(self._task, advance=n)

    def describe(self, text: str) -> None:
        self._bar.update(self._task, description=text)


# =========================================================================== restore
@dataclass(frozen=True)
class RestoreResult:
    """What one restore wrote: the TIFF's level sizes, tiles decoded (background tiles are painted), time."""

    output: str
    levels: tuple[tuple[int, int], ...]
    tiles: int
    decoded_tiles: int
    seconds: float
    bytes: int

    def line(self) -> str:
        levels = " ".join(f"{w}x{h}" for w, h in self.levels)
        tiles = f"{self.decoded_tiles} tile{'' if self.decoded_tiles == 1 else 's'}"
        return (f"wrote {self.output}: levels {levels}, {tiles} decoded, "
                f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s")


def restore(
    container_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    compression: str = "jpeg",
    quality: int = 90,
    device: str | None = None,
    batch_size: int = 8,
    model: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    halo: int | None = None,
    blend: int | None = None,
    format: str = "tiff",
    dicom_attrs: dict[str, str] | None = None,
    _model_obj=None,
) -> RestoreResult:
    """Restore a pyramidal Aperio-layout BigTIFF from a .pzarr container; with ``format="dicom"`` a DICOM
    WSI folder instead (one instance per level, plus label/overview; docs/dicom.md).

    The output's name is honoured: ``.tif``/``.tiff``/``.svs`` get the pyramid; an image name (``.png``,
    ``.jpg``, ...) gets level 0 as that one image when it holds at most :data:`WHOLE_IMAGE_MAX_PIXELS`
    pixels, and is refused otherwise. ``progress=True`` shows a progress bar on stderr. ``dicom_attrs``
    (DICOM only): patient and study attributes by keyword (``PatientID``, ``AccessionNumber``,
    ``StudyInstanceUID``, ...; :data:`wsicodec.pipeline.dicom.PATIENT_STUDY_KEYWORDS`)."""
    out_path = Path(out_path)
    if format not in RESTORE_FORMATS:
        raise WsicodecError(f"unknown format {format!r}; choose one of {', '.join(RESTORE_FORMATS)}")
    if format == "dicom":
        return _restore_dicom(container_path, out_path, quality=quality, device=device, batch_size=batch_size,
                              model=model, force=force, overwrite=overwrite, progress=progress, halo=halo,
                              blend=blend, attrs=dicom_attrs or {}, _model_obj=_model_obj)
    if dicom_attrs:
        raise WsicodecError("patient and study attributes (--patient-id, --accession, --study-uid, --dicom-attrs) "
                            "go into DICOM: add --format dicom")
    if compression not in COMPRESSIONS:
        raise WsicodecError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if not 1 <= int(quality) <= 100:
        raise WsicodecError(f"--quality must be between 1 and 100, got {quality}")
    _check_not_input(container_path, out_path)
    _check_output(out_path, overwrite)
    if out_path.suffix.lower() not in TIFF_SUFFIXES:
        return _restore_whole_image(container_path, out_path, device=device, batch_size=batch_size, model=model,
                                    force=force, overwrite=overwrite, halo=halo, blend=blend,
                                    _model_obj=_model_obj)

    def write(strips, container, tile_size, associated, on_level):
        return write_aperio_pyramid(out_path, strips, int(container.grid.width), int(container.grid.height),
                                    _aperio_info(container), tile_size=tile_size, associated=associated,
                                    compression=compression, quality=quality, on_level=on_level,
                                    overwrite=overwrite, icc_profile=container.icc_profile)

    return _decode_and_write(container_path, out_path, write, device=device, batch_size=batch_size, model=model,
                             force=force, progress=progress, halo=halo, blend=blend, _model_obj=_model_obj)


def _restore_whole_image(container_path, out_path: Path, *, device, batch_size: int, model, force: bool,
                         overwrite: bool, halo, blend, _model_obj) -> RestoreResult:
    """``restore s.pzarr s.png``: the whole of level 0 as one image, if it is small enough; else refused."""
    from PIL import Image

    t0 = time.perf_counter()
    suffix = out_path.suffix.lower()
    what = f"{out_path.name}: a whole-slide restore writes a pyramidal TIFF; name it .tif/.tiff/.svs, " \
           "or give --region X Y W H for one image"
    if suffix not in Image.registered_extensions():
        raise WsicodecError(what)
    container = open_container(container_path)
    w, h = int(container.grid.width), int(container.grid.height)
    if w * h > WHOLE_IMAGE_MAX_PIXELS:
        raise WsicodecError(f"{what} (the slide is {w}x{h} px, too large for one {suffix} image)")
    restore_region(container_path, out_path, 0, 0, w, h, device=device, batch_size=batch_size, model=model,
                   force=force, overwrite=overwrite, halo=halo, blend=blend, _model_obj=_model_obj)
    rows, cols = container.tissue.shape
    return RestoreResult(output=str(out_path), levels=((w, h),), tiles=int(rows * cols),
                         decoded_tiles=int(np.count_nonzero(container.tissue)),
                         seconds=time.perf_counter() - t0, bytes=disk_bytes(out_path))


def _decode_and_write(container_path, out_path: Path, write, *, device, batch_size: int, model, force: bool,
                      progress: bool, halo, blend, _model_obj) -> RestoreResult:
    """The restore every output format shares: open, decode level 0 row by row (one row ahead, on a thread),
    and hand the rows to ``write(strips, container, tile_size, associated, on_level) -> level sizes``."""
    t0 = time.perf_counter()
    container = open_container(container_path)
    net = _model_obj if _model_obj is not None else load_decoder_model(container, model, device, force)
    decoder = TileDecoder(container, net, halo=halo, cache_tiles=0, batch_size=batch_size, blend=blend)
    # a damaged label or macro is damage like any other: refuse rather than restore without it
    associated = container.associated_images() or {}
    total = decoder.rows * decoder.cols
    with _Progress(progress, total, "restoring level 0") as bar:
        dims = write(prefetch(decoder.strips(on_tiles=bar.advance)), container, decoder.tile_size, associated,
                     lambda level, wh: bar.describe(f"wrote level {level} ({wh[0]}x{wh[1]})"))
    return RestoreResult(
        output=str(out_path),
        levels=tuple((int(w), int(h)) for w, h in dims),
        tiles=total,
        decoded_tiles=decoder.decoded,
        seconds=time.perf_counter() - t0,
        bytes=disk_bytes(out_path),
    )


def _check_dicom_output(container_path: str | os.PathLike, out_path: Path, overwrite: bool) -> None:
    """A DICOM restore writes a folder: refuse a container, an existing output without --overwrite, a file."""
    _check_not_input(container_path, out_path)
    check_output_path(out_path)
    if _is_container(out_path):
        raise OutputExistsError(f"{out_path} is a .pzarr container; restore never replaces one, "
                                "even with --overwrite")
    if out_path.suffix.lower() in _FILE_SUFFIXES:
        raise WsicodecError(f"{out_path.name}: --format dicom writes a folder of .dcm files; give it a folder "
                            f"name without a file suffix (e.g. {out_path.stem}-dicom/)")
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path} exists; pass --overwrite to replace it")
    if out_path.exists() and not out_path.is_dir():
        raise OutputExistsError(f"{out_path} is a file; a DICOM restore writes a folder and never replaces a file")
    if out_path.is_dir() and any(p.name != "DICOMDIR" and p.suffix.lower() != ".dcm" for p in out_path.iterdir()):
        # --overwrite replaces the whole folder: only ever one that holds DICOM files alone
        raise OutputExistsError(f"{out_path} holds files other than .dcm; --overwrite replaces only a DICOM folder")
    if not out_path.parent.is_dir():
        raise WsicodecError(f"output folder does not exist: {out_path.parent}")


def _restore_dicom(container_path, out_path: Path, *, quality: int, device, batch_size: int, model, force: bool,
                   overwrite: bool, progress: bool, halo, blend, attrs: dict, _model_obj) -> RestoreResult:
    from wsicodec.pipeline.dicom import _pydicom, check_dicom_attrs, dicom_info, write_dicom_wsi

    if not 1 <= int(quality) <= 100:
        raise WsicodecError(f"--quality must be between 1 and 100, got {quality}")
    _pydicom()  # fail before decoding anything when pydicom is missing
    attrs = check_dicom_attrs(attrs)
    _check_dicom_output(container_path, out_path, overwrite)

    def write(strips, container, tile_size, associated, on_level):
        info = dicom_info(container)
        info.attrs, info.quality = attrs, int(quality)
        return write_dicom_wsi(out_path, strips, int(container.grid.width), int(container.grid.height),
                               info, tile_size=tile_size, associated=associated, quality=quality,
                               on_level=on_level, overwrite=overwrite)

    return _decode_and_write(container_path, out_path, write, device=device, batch_size=batch_size, model=model,
                             force=force, progress=progress, halo=halo, blend=blend, _model_obj=_model_obj)


def clip_region(level_size: tuple[int, int], level: int, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) in pixels of ``level``: the region (x, y level-0 pixels; w, h level pixels) clipped to the
    level's image; WsicodecError when nothing is left, or when what is left exceeds the region budget."""
    lw, lh = (int(v) for v in level_size)
    s = 1 << level
    lx, ly = x // s, y // s
    x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
    if x1 <= x0 or y1 <= y0:
        raise WsicodecError(
            f"region {x},{y} {w}x{h} at level {level} lies outside the image ({lw * s}x{lh * s} at level 0)")
    need = (x1 - x0) * (y1 - y0) * 3
    if need > REGION_BUDGET_BYTES:
        raise WsicodecError(
            f"region {x1 - x0}x{y1 - y0} px at level {level} would take {need:,} bytes as RGB, over the "
            f"{REGION_BUDGET_BYTES / 2**30:g} GiB ({REGION_BUDGET_BYTES:,} bytes) budget of a region restore; "
            "restore a smaller region, a deeper --level, or the whole slide as a pyramidal TIFF")
    return x0, y0, x1 - x0, y1 - y0


def restore_region(
    container_path: str | os.PathLike,
    out_path: str | os.PathLike | None,
    x: int,
    y: int,
    w: int,
    h: int,
    *,
    level: int = 0,
    device: str | None = None,
    batch_size: int = 8,
    model: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    halo: int | None = None,
    blend: int | None = None,
    _model_obj=None,
) -> np.ndarray:
    """Restore one region: (x, y) in level-0 pixels of the archived resolution, (w, h) in pixels of ``level``
    (a 2**level downsample, the TIFF's level ``level``). The region is clipped to the image, and refused when
    the clipped region would take more than ``REGION_BUDGET_BYTES`` (1 GiB) as RGB. Writes it to ``out_path``
    (any format PIL writes) when given, with the source's ICC colour profile embedded where the format holds
    one (PNG, JPEG, TIFF, WebP); returns the RGB array, (clipped height, clipped width, 3)."""
    from PIL import Image

    if w <= 0 or h <= 0:
        raise WsicodecError(f"region size must be positive, got {w}x{h}")
    if level < 0:
        raise WsicodecError(f"--level must be >= 0, got {level}")
    if out_path is not None:
        out_path = Path(out_path)
        _check_not_input(container_path, out_path)
        _check_output(out_path, overwrite)
    container = open_container(container_path)
    net = _model_obj if _model_obj is not None else load_decoder_model(container, model, device, force)
    pyr = Pyramid(TileDecoder(container, net, halo=halo, cache_tiles=1024, batch_size=batch_size, blend=blend))
    if level >= pyr.level_count:
        raise WsicodecError(f"level {level} does not exist (the pyramid has levels 0..{pyr.level_count - 1})")
    x0, y0, cw, ch = clip_region(pyr.dimensions[level], level, x, y, w, h)
    img, _ = pyr.region(level, x0, y0, cw, ch)
    if out_path is not None:
        fmt = Image.registered_extensions().get(out_path.suffix.lower())
        if fmt is None:
            raise WsicodecError(f"cannot write {out_path.name}: unknown image suffix {out_path.suffix!r}")
        try:
            with atomic_output(out_path, overwrite=overwrite) as tmp:
                # formats without a place for a profile ignore the option
                icc = {"icc_profile": container.icc_profile} if container.icc_profile else {}
                Image.fromarray(img).save(tmp, format=fmt, **icc)
        except (ValueError, KeyError, OSError) as exc:
            raise WsicodecError(f"cannot write {out_path.name}: {exc}") from None
    return img
