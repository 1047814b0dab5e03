"""Streaming writer for DICOM whole-slide images (VL Whole Slide Microscopy Image IOD, TILED_FULL).

    write_dicom_wsi(out_dir, strips, width, height, info, ...) -> level sizes

One folder per slide, one instance (file) per pyramid level plus LABEL / OVERVIEW instances::

    OUT/level-0.dcm  level-1.dcm ...   VOLUME, 256 px JPEG baseline tiles (the levels of the TIFF restore)
    OUT/label.dcm                        LABEL, one frame, uncompressed (barcodes and text stay lossless)
    OUT/overview.dcm                     OVERVIEW (the source's macro image), one JPEG frame

All instances share one study, series, frame of reference and pyramid UID, so OpenSlide (its ``dicom``
driver, opened on any one file) and wsidicom (opened on the folder) see one slide. The UIDs are derived
(2.25 + a UUID made from a SHA-256) from the container's integrity seal and the restore's options, so
restoring one container twice with the same options gives the same Study/Series/SOP Instance UIDs, and a
PACS sees a repeated restore as the same objects. Level 0 arrives as strips of ``tile_size`` rows; each
reduced level is downsampled (:func:`wsicodec.pipeline.tiff.downsample2`, the TIFF writer's rule) into
a raw file on disk while the level above is encoded, so pixels in memory stay a few tile rows; the
JPEG frames of the level being written are held in memory until its file is written.

Needs pydicom >= 3 (``pip install wsicodec[dicom]``). See docs/dicom.md.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from wsicodec._io import atomic_output
from wsicodec._version import __version__
from wsicodec.errors import WsicodecError
from wsicodec.pipeline.tiff import MIN_LEVEL_SIDE, _as_rgb, _RawLevel, _tiles_of, downsample2, level_dimensions

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Basic Offset Table entries are 32-bit: a level past this many bytes of frames gets an Extended Offset Table
_BOT_LIMIT = 2**32 - 2**20


def _pydicom():
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise WsicodecError("--format dicom needs pydicom >= 3: pip install 'wsicodec[dicom]'") from None
    import pydicom

    if int(pydicom.__version__.split(".")[0]) < 3:
        raise WsicodecError(f"--format dicom needs pydicom >= 3 (found {pydicom.__version__})")
    return pydicom


# patient and study attributes a restore may be given (--patient-id, --accession, --study-uid, --dicom-attrs);
# everything else in the header describes the image and is wsicodec's to write
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "OtherPatientIDsSequence", "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "StudyDescription",
    "AccessionNumber", "ReferringPhysicianName", "InstitutionName", "InstitutionalDepartmentName",
)
# the glass slide's nominal size (ISO 8037-1: 76 x 26 mm): the overview (macro) shows the whole slide, the
# label its width; neither is measured by the scanner, so their pixel spacing is this nominal estimate
SLIDE_MM = (76.0, 26.0)


@dataclass
class DicomInfo:
    """What the container tells the DICOM header."""

    mpp: float  # µm per level-0 pixel
    source_name: str | None = None
    model_id: str | None = None
    description: str = "wsicodec"  # the latent method, for DerivationDescription / ImageComments
    glass_rgb: tuple[int, int, int] = (255, 255, 255)
    extra: dict[str, str] = field(default_factory=dict)
    uid_seed: str | None = None  # the container's integrity seal (or write id): UIDs derive from it
    objective_power: float | None = None  # ObjectiveLensPower of the optical path
    created: str | None = None  # the container's creation time (ISO 8601): the study's date and time
    attrs: dict[str, str] = field(default_factory=dict)  # patient/study attributes (PATIENT_STUDY_KEYWORDS)
    quality: int | None = None  # JPEG quality: part of what the series' UIDs derive from
    icc_profile: bytes | None = None  # the source's ICC colour profile (the container's); sRGB when None


def derived_uid(seed: str, role: str) -> str:
    """A UID under 2.25 (ITU-T X.667: a UUID as one integer) made from SHA-256(seed, role): the same seed
    and role give the same UID, different ones different UIDs (at most 44 characters)."""
    import hashlib
    import uuid

    digest = hashlib.sha256(f"wsicodec-dicom|{seed}|{role}".encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"


def check_dicom_attrs(attrs: dict) -> dict[str, str]:
    """Validate patient/study attributes (keyword -> value) the way a PACS would: known keywords from
    :data:`PATIENT_STUDY_KEYWORDS`, values valid for their VR. Raises WsicodecError naming the first bad one."""
    pydicom = _pydicom()
    from pydicom.datadict import dictionary_VR
    from pydicom.valuerep import validate_value

    if not isinstance(attrs, dict):
        raise WsicodecError("--dicom-attrs must hold a JSON object of DICOM keywords and values")
    out: dict[str, str] = {}
    for key, value in attrs.items():
        if key not in PATIENT_STUDY_KEYWORDS or key == "OtherPatientIDsSequence":
            raise WsicodecError(f"--dicom-attrs: {key!r} is not a patient or study attribute wsicodec sets "
                                f"(one of {', '.join(k for k in PATIENT_STUDY_KEYWORDS if 'Sequence' not in k)})")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise WsicodecError(f"--dicom-attrs: {key} must be a string, got {type(value).__name__}")
        value = str(value)
        vr = dictionary_VR(key)
        try:
            validate_value(vr, value, pydicom.config.RAISE)
        except (ValueError, KeyError) as exc:
            raise WsicodecError(f"--dicom-attrs: {key} = {value!r} is not a valid {vr} value "
                                f"({' '.join(str(exc).split())})") from None
        if key == "StudyInstanceUID" and not pydicom.uid.UID(value).is_valid:
            raise WsicodecError(f"study UID {value!r} is not a valid DICOM UID (digits and dots, at most 64)")
        out[key] = value
    return out


def dicom_info(container) -> DicomInfo:
    """DicomInfo from an open :class:`wsicodec.format.container.Container`."""
    attrs = getattr(container, "attrs", {}) or {}
    source = attrs.get("source") or {}
    name = None
    if isinstance(source, dict):
        name = source.get("filename") or source.get("name") or source.get("file_name")
    model = getattr(container, "model", {}) or {}
    model_id = str(model.get("id")) if model.get("id") else None
    q = attrs.get("quantizer") or {}
    quant = str(q.get("kind") or "quantiser")
    if q.get("levels"):
        quant += f" {q['levels']} levels"
    ratio = None
    try:
        size = source.get("size") if isinstance(source, dict) else None
        disk = container.disk_bytes()
        if size and disk:
            ratio = float(size) / float(disk)
    except Exception:
        ratio = None
    desc = f"wsicodec {model_id or 'unknown model'}, {quant}"
    desc += f", ratio {ratio:.1f}" if ratio else ""
    resolution = attrs.get("resolution") or {}
    grid = attrs.get("grid") or {}
    power = resolution.get("archived_objective_power")
    if not power and grid.get("target_mpp"):
        power = 10.0 / float(grid["target_mpp"])  # 10 µm/px is 1x, as the TIFF restore's AppMag
    return DicomInfo(mpp=float(container.archived_mpp), source_name=str(name) if name else None,
                     model_id=model_id, description=desc,
                     glass_rgb=tuple(getattr(container, "glass_rgb", (255, 255, 255))),
                     uid_seed=_uid_seed(container), objective_power=float(power) if power else None,
                     created=attrs.get("created"), icc_profile=getattr(container, "icc_profile", None))


def _uid_seed(container) -> str:
    """What identifies this container's one write: the integrity seal (1.1), else the write id, else (1.0)
    a hash of its attributes."""
    import hashlib
    import json

    manifest = getattr(container, "manifest", None) or {}
    if manifest.get("self_sha256"):
        return str(manifest["self_sha256"])
    attrs = getattr(container, "attrs", {}) or {}
    write_id = (attrs.get("integrity") or {}).get("write_id")
    if write_id:
        return str(write_id)
    return hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()


def _parse_time(text: str | None):
    """A datetime from the container's ISO 8601 ``created`` (``2026-12-03T10:21:53Z``), or None."""
    if not text:
        return None
    try:
        return _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def _ds(v: float) -> str:
    """A DS value (at most 16 characters)."""
    s = f"{v:.10g}"
    if len(s) > 16:
        s = f"{v:.6e}"
    return s


def _lo(text: str, n: int = 64) -> str:
    """LO/SH-safe text: no backslash (the value separator), at most ``n`` characters."""
    return str(text).replace("\\", "/").replace("\r", " ").replace("\n", " ")[:n]


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _srgb_icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# ColorSpace (0028,2002) defined terms, by the words a profile's description names its colour space with
_COLOR_SPACES = (("srgb", "SRGB"), ("adobe rgb", "ADOBERGB"), ("romm", "ROMMRGB"))


def _color_space(icc: bytes) -> str | None:
    """The DICOM ColorSpace a profile's description names (``sRGB IEC61966-2.1`` -> SRGB), or None: a scanner's
    own calibrated profile is no standard colour space, and ColorSpace (type 3) is then left out."""
    from PIL import ImageCms

    try:
        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).lower()
    except Exception:
        return None
    return next((term for words, term in _COLOR_SPACES if words in desc), None)


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG (YCbCr 4:2:0, JFIF) of an RGB tile."""
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(tile), level=int(quality)))


class _Series:
    """The UIDs and modules every instance of one slide shares."""

    def __init__(self, info: DicomInfo, width: int, height: int):
        import json

        from pydicom.uid import generate_uid

        self.info = info
        self.width, self.height = width, height
        # study: the container and the patient/study attributes; series and instances: every option too
        study_key = json.dumps(info.attrs, sort_keys=True)
        series_key = json.dumps([info.attrs, info.quality], sort_keys=True)
        self._uid = ((lambda key, role: derived_uid(f"{info.uid_seed}|{key}", role)) if info.uid_seed
                     else (lambda key, role: generate_uid()))
        self.study_uid = info.attrs.get("StudyInstanceUID") or self._uid(study_key, "study")
        self._series_key = series_key
        self.series_uid = self._uid(series_key, "series")
        self.frame_of_reference_uid = self._uid(series_key, "frame-of-reference")
        self.pyramid_uid = self._uid(series_key, "pyramid")
        self.dimension_uid = self._uid(series_key, "dimension-organization")
        self.specimen_uid = self._uid(study_key, "specimen")
        now = _dt.datetime.now()
        self.date, self.time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        # the study is the archive's: dated when the container was written (the same on every restore)
        created = _parse_time(info.created) or now
        self.study_date, self.study_time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
        # the source's profile travels on; a source without one is taken to be sRGB, as viewers assume
        self.icc = info.icc_profile or _srgb_icc()
        self.color_space = _color_space(self.icc)
        self.instance = 0
        stem = Path(info.source_name).stem if info.source_name else "wsicodec"
        self.container_id = _lo(stem) or "wsicodec"

    def dataset(self, kind: str, w: int, h: int, tile_w: int, tile_h: int, frames: int, *, lossy: bool,
                resampled: bool = False, ratio: float | None = None, mm_per_px: tuple[float, float] | None = None):
        """The full header of one instance (everything but PixelData). ``kind``: VOLUME, LABEL, OVERVIEW."""
        pydicom = _pydicom()
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.sequence import Sequence
        from pydicom.uid import UID

        info = self.info
        self.instance += 1
        sop_uid = self._uid(self._series_key, f"instance-{self.instance}")
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(WSI_SOP_CLASS)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = UID(JPEG_BASELINE if lossy else EXPLICIT_LE)
        ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = _lo(f"WSICODEC_{__version__}", 16)

        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: file names may carry any character
        ds.SOPClassUID = WSI_SOP_CLASS
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate, ds.InstanceCreationTime = self.date, self.time
        # Patient (type 2: present, empty; a restored archive carries no patient data)
        ds.PatientName = ""
        ds.PatientID = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        # General Study
        ds.StudyInstanceUID = self.study_uid
        ds.StudyDate, ds.StudyTime = self.study_date, self.study_time
        ds.ReferringPhysicianName = ""
        ds.StudyID = ""
        ds.AccessionNumber = ""
        ds.StudyDescription = "wsicodec restore"
        for key, value in info.attrs.items():  # --patient-id, --accession, --dicom-attrs: the PACS's own
            setattr(ds, key, value)
        # General Series + Whole Slide Microscopy Series
        ds.Modality = "SM"
        ds.SeriesInstanceUID = self.series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = _lo(info.source_name or "wsicodec restore")
        # Frame of Reference
        ds.FrameOfReferenceUID = self.frame_of_reference_uid
        ds.PositionReferenceIndicator = "SLIDE_CORNER"
        # General / Enhanced General Equipment
        ds.Manufacturer = "wsicodec"
        ds.ManufacturerModelName = "wsicodec restore"
        ds.DeviceSerialNumber = "0"
        ds.SoftwareVersions = _lo(__version__)
        # General Image / Acquisition
        ds.InstanceNumber = self.instance
        ds.ContentDate, ds.ContentTime = self.date, self.time
        ds.AcquisitionDateTime = self.date + self.time
        ds.PyramidUID = self.pyramid_uid
        ds.PyramidLabel = _lo(self.container_id)
        ds.ContainerIdentifier = self.container_id
        ds.IssuerOfTheContainerIdentifierSequence = Sequence()
        ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
        specimen = Dataset()
        specimen.SpecimenIdentifier = self.container_id
        specimen.SpecimenUID = self.specimen_uid
        specimen.IssuerOfTheSpecimenIdentifierSequence = Sequence()
        specimen.SpecimenPreparationSequence = Sequence()
        ds.SpecimenDescriptionSequence = Sequence([specimen])
        ds.AcquisitionContextSequence = Sequence()

        # Whole Slide Microscopy Image
        image_type = ["DERIVED", "PRIMARY", kind, "RESAMPLED" if resampled else "NONE"]
        ds.ImageType = image_type
        ds.DerivationDescription = _lo(f"Restored from a wsicodec archive ({info.description})", 1024)
        ds.ImageComments = _lo(info.description + (f"; source {info.source_name}" if info.source_name else ""), 10240)
        if kind == "VOLUME":
            # the slide's extent at level 0, in mm
            ds.ImagedVolumeWidth = float(self.width * info.mpp / 1000)  # FL
            ds.ImagedVolumeHeight = float(self.height * info.mpp / 1000)
        elif mm_per_px is not None:  # label / overview: the nominal extent their pixel spacing implies
            ds.ImagedVolumeWidth = float(w * mm_per_px[0])
            ds.ImagedVolumeHeight = float(h * mm_per_px[1])
        ds.ImagedVolumeDepth = 0.001
        ds.TotalPixelMatrixColumns = w
        ds.TotalPixelMatrixRows = h
        ds.TotalPixelMatrixFocalPlanes = 1
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = _ds(0.0)
        origin.YOffsetInSlideCoordinateSystem = _ds(0.0)
        ds.TotalPixelMatrixOriginSequence = Sequence([origin])
        ds.ImageOrientationSlide = ["0", "-1", "0", "-1", "0", "0"]
        ds.VolumetricProperties = "VOLUME"
        # a label or an overview shows the slide's label, whose text may identify the patient
        ds.SpecimenLabelInImage = "YES" if kind in ("LABEL", "OVERVIEW") else "NO"
        ds.BurnedInAnnotation = ds.SpecimenLabelInImage
        if kind == "LABEL":  # Slide Label module: type 2, present even when unknown
            ds.LabelText = ""
            ds.BarcodeValue = ""
        ds.FocusMethod = "AUTO"
        ds.ExtendedDepthOfField = "NO"
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.NumberOfFrames = frames
        ds.Rows, ds.Columns = tile_h, tile_w
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422" if lossy else "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        # every restored pyramid pixel went through the latent codec: lossy, whatever the transfer syntax;
        # the label is the source's own image, kept losslessly
        ds.LossyImageCompression = "01" if (lossy or kind != "LABEL") else "00"
        if lossy:
            ds.LossyImageCompressionMethod = ["ISO_10918_1"]
            if ratio:
                ds.LossyImageCompressionRatio = [_ds(round(ratio, 2))]

        # Multi-frame Functional Groups (shared only: TILED_FULL needs no per-frame groups)
        shared = Dataset()
        # the Pixel Measures macro is required for every image type; a label's or overview's pixel size is the
        # nominal one of SLIDE_MM (readers such as highdicom's and wsidicom's want a PixelSpacing on each)
        measures = Dataset()
        if mm_per_px is not None:
            measures.PixelSpacing = [_ds(mm_per_px[1]), _ds(mm_per_px[0])]  # row spacing (y), column spacing (x)
        measures.SliceThickness = _ds(0.001)
        measures.SpacingBetweenSlices = _ds(0.001)
        shared.PixelMeasuresSequence = Sequence([measures])
        frame_type = Dataset()
        frame_type.FrameType = image_type
        shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
        path_id = Dataset()
        path_id.OpticalPathIdentifier = "1"
        shared.OpticalPathIdentificationSequence = Sequence([path_id])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        # Multi-frame Dimension: tiles indexed by their position in the total pixel matrix
        org = Dataset()
        org.DimensionOrganizationUID = self.dimension_uid
        ds.DimensionOrganizationSequence = Sequence([org])
        index = []
        for pointer, label in ((0x0048021E, "Column Position"), (0x0048021F, "Row Position")):
            item = Dataset()
            item.DimensionOrganizationUID = self.dimension_uid
            item.DimensionIndexPointer = pointer
            item.FunctionalGroupPointer = 0x0048021A  # Plane Position (Slide) Sequence
            item.DimensionDescriptionLabel = label
            index.append(item)
        ds.DimensionIndexSequence = Sequence(index)
        # Optical Path: brightfield, full spectrum, the source's colour profile (else sRGB)
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        path.OpticalPathDescription = "Brightfield, as restored by wsicodec"
        path.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
        path.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
        path.ICCProfile = self.icc
        if self.color_space:
            path.ColorSpace = self.color_space
        if info.objective_power:
            path.ObjectiveLensPower = _ds(round(float(info.objective_power), 3))
        ds.NumberOfOpticalPaths = 1
        ds.OpticalPathSequence = Sequence([path])
        return ds


def _write(ds, frames: list[bytes] | None, native: np.ndarray | None, path: Path) -> None:
    """Write one instance: JPEG ``frames`` encapsulated (offset table: basic, or extended past 4 GiB),
    or a ``native`` RGB image uncompressed."""
    from pydicom.encaps import encapsulate_buffer, encapsulate_extended_buffer

    if frames is not None:
        buffers = [io.BytesIO(f) for f in frames]
        if sum(len(f) + 8 for f in frames) < _BOT_LIMIT:
            ds.PixelData = encapsulate_buffer(buffers, has_bot=True)
        else:
            data, offsets, lengths = encapsulate_extended_buffer(buffers)
            ds.PixelData = data
            ds.ExtendedOffsetTable = offsets
            ds.ExtendedOffsetTableLengths = lengths
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = np.ascontiguousarray(native).tobytes()
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def _rechunk(strips: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Strips of any height -> strips of exactly ``rows`` rows (the last may be shorter)."""
    pending: list[np.ndarray] = []
    have = 0
    for strip in strips:
        if not pending and strip.shape[0] == rows:
            yield strip
            continue
        pending.append(strip)
        have += strip.shape[0]
        while have >= rows:
            block = np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]
            yield block[:rows]
            rest = block[rows:]
            pending, have = ([rest] if rest.shape[0] else []), rest.shape[0]
    if have:
        yield np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]


def write_dicom_wsi(
    out_dir: str | os.PathLike,
    strips: Iterable[np.ndarray],
    width: int,
    height: int,
    info: DicomInfo,
    *,
    tile_size: int = 256,
    associated: dict[str, np.ndarray] | None = None,
    quality: int = 90,
    min_side: int = MIN_LEVEL_SIDE,
    on_level: Callable[[int, tuple[int, int]], None] | None = None,
    overwrite: bool = False,
) -> list[tuple[int, int]]:
    """Write the slide as a DICOM WSI folder ``out_dir`` (built under a temporary name, renamed at the end).

    ``strips`` yields level 0 top to bottom as uint8 (rows, >= width, 3) arrays of any height (regrouped
    into ``tile_size`` rows here). ``associated`` may hold "label" and "macro" (the latter is written as the
    OVERVIEW instance; a "thumbnail" is ignored). Returns the level sizes.
    """
    _pydicom()
    out_dir = Path(out_dir)
    if tile_size % 16:
        raise ValueError("DICOM tile size must be a multiple of 16")
    dims = level_dimensions(width, height, min_side)
    associated = associated or {}
    series = _Series(info, int(width), int(height))
    with atomic_output(out_dir, overwrite=overwrite) as tmp, ThreadPoolExecutor(_WORKERS) as pool:
        tmp.mkdir(mode=0o755)
        scratch = tmp / ".levels"  # raw reduced levels; removed before the folder is renamed into place
        scratch.mkdir()
        source: Iterable[np.ndarray] = _rechunk(strips, tile_size)
        for level, (w, h) in enumerate(dims):
            sinks: list[Callable[[np.ndarray], None]] = []
            nxt = None
            if level + 1 < len(dims):
                nw, nh = dims[level + 1]
                nxt = _RawLevel(scratch / f"level{level + 1}.raw", nw, nh)
                sinks.append(lambda s, nxt=nxt: nxt.append(downsample2(s)))
            cols = -(-w // tile_size)
            frames: list[bytes] = []
            row: list[np.ndarray] = []
            for tile in _tiles_of(source, w, h, tile_size, sinks):
                row.append(tile)
                if len(row) == cols:  # encode one row of tiles in parallel
                    frames.extend(pool.map(lambda t: _jpeg(t, quality), row))
                    row = []
            if nxt is not None:
                nxt.finish()
                source = nxt.strips(tile_size)
            raw_bytes = w * h * 3
            coded = sum(len(f) for f in frames)
            ds = series.dataset("VOLUME", w, h, tile_size, tile_size, len(frames), lossy=True, resampled=level > 0,
                                ratio=raw_bytes / coded if coded else None,
                                mm_per_px=(width * info.mpp / 1000 / w, height * info.mpp / 1000 / h))
            _write(ds, frames, None, tmp / f"level-{level}.dcm")
            del frames
            if on_level is not None:
                on_level(level, (w, h))
        for name, kind, lossy in (("label", "LABEL", False), ("macro", "OVERVIEW", True)):
            img = associated.get(name)
            if img is None:
                continue
            img = _as_rgb(img)
            ih, iw = img.shape[:2]
            # nominal: the overview spans the slide's length, the label the slide's width (SLIDE_MM)
            side = SLIDE_MM[0] / max(iw, ih) if kind == "OVERVIEW" else SLIDE_MM[1] / max(iw, ih)
            if lossy:
                data = _jpeg(img, quality)
                ds = series.dataset(kind, iw, ih, iw, ih, 1, lossy=True, ratio=iw * ih * 3 / len(data),
                                    mm_per_px=(side, side))
                _write(ds, [data], None, tmp / f"{kind.lower()}.dcm")
            else:
                ds = series.dataset(kind, iw, ih, iw, ih, 1, lossy=False, mm_per_px=(side, side))
                _write(ds, None, img, tmp / f"{kind.lower()}.dcm")
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()
    return dims
