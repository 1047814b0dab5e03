"""`wsicodec restore X.pzarr OUT --format dicom`: a DICOM WSI folder (docs/dicom.md).

Read back with wsidicom and OpenSlide 4, checked attribute by attribute against the VL Whole Slide Microscopy
Image IOD's required modules (pydicom), compressed again from the DICOM output, and the CLI's refusals.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

import wsicodec
from wsicodec.cli import app
from wsicodec.pipeline.restore import restore
from wsicodec.pipeline.tiff import level_dimensions

pydicom = pytest.importorskip("pydicom", minversion="3.0")

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


@pytest.fixture(scope="module")
def case(tmp_path_factory, synthetic_slide, tiny_model_dir):
    """The synthetic slide (3000 x 2400 at 0.25 µm/px, label + macro) compressed at 0.5 µm/px with the tiny
    model, restored to a TIFF and to DICOM."""
    d = tmp_path_factory.mktemp("dicom")
    container = d / "s.pzarr"
    wsicodec.compress(synthetic_slide, container, model=str(tiny_model_dir), device="cpu")
    tiff = d / "s.tiff"
    restore(container, tiff, device="cpu", progress=False)
    out = d / "s-dicom"
    result = restore(container, out, format="dicom", device="cpu", progress=False)
    with tifffile.TiffFile(tiff) as tf:
        levels = [p.asarray() for p in tf.pages if p.is_tiled]
    return {"dir": d, "container": container, "tiff": tiff, "out": out, "result": result, "levels": levels,
            "model": tiny_model_dir}


def _instances(folder: Path) -> dict[str, "pydicom.Dataset"]:
    return {p.name: pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))}


def test_folder_layout(case):
    out, result = case["out"], case["result"]
    dims = level_dimensions(1500, 1200)
    assert result.levels == tuple(dims)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"level-{i}.dcm" for i in range(len(dims))] + ["label.dcm", "overview.dcm"])
    # written under a partial name and renamed: nothing left beside it
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_wsidicom_reads_it(case):
    wsidicom = pytest.importorskip("wsidicom")
    from wsicodec.format.container import open_container

    mpp = open_container(case["container"]).archived_mpp
    levels = case["levels"]
    with wsidicom.WsiDicom.open(case["out"]) as wsi:
        assert [(lv.size.width, lv.size.height) for lv in wsi.levels] == level_dimensions(1500, 1200)
        assert wsi.mpp.width == pytest.approx(mpp) and wsi.mpp.height == pytest.approx(mpp)
        for i, ref in enumerate(levels):
            h, w = ref.shape[:2]
            got = np.asarray(wsi.read_region((0, 0), i, (w, h)).convert("RGB"))
            diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
            # both are JPEG q90 of the same pixels (the same encoder: identical in practice)
            assert diff.mean() < 3 and diff.max() <= 48, (i, diff.mean(), diff.max())
        label = wsi.read_label()
        overview = wsi.read_overview()
    assoc = open_container(case["container"]).associated_images()
    assert label.size == (assoc["label"].shape[1], assoc["label"].shape[0])
    assert overview.size == (assoc["macro"].shape[1], assoc["macro"].shape[0]) == (1280, 431)
    # the label is stored uncompressed: exactly the archived one
    np.testing.assert_array_equal(np.asarray(label.convert("RGB")), assoc["label"][..., :3])


def test_pixels_match_the_decoder_within_jpeg_tolerance(case):
    """Level 0 against the exact decoded pixels (restore_region), not just against the TIFF's JPEG."""
    wsidicom = pytest.importorskip("wsidicom")
    from wsicodec.pipeline.restore import restore_region

    exact = restore_region(case["container"], None, 200, 300, 512, 384, model=str(case["model"]), device="cpu")
    with wsidicom.WsiDicom.open(case["out"]) as wsi:
        got = np.asarray(wsi.read_region((200, 300), 0, (512, 384)).convert("RGB"))
    diff = np.abs(got.astype(np.int16) - exact.astype(np.int16))
    assert diff.mean() < 3 and diff.max() <= 64, (diff.mean(), diff.max())


def test_openslide_reads_it(case):
    openslide = pytest.importorskip("openslide")
    if "dicom" not in (openslide.OpenSlide.detect_format(str(case["out"] / "level-0.dcm")) or ""):
        pytest.skip(f"this OpenSlide ({openslide.__library_version__}) has no DICOM driver")
    from wsicodec.format.container import open_container

    mpp = open_container(case["container"]).archived_mpp
    with openslide.OpenSlide(str(case["out"] / "level-0.dcm")) as s:
        assert s.dimensions == (1500, 1200)
        assert s.level_dimensions == tuple(level_dimensions(1500, 1200))
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)
        assert {"label", "macro"} <= set(s.associated_images)
        got = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    ref = case["levels"][0]
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() < 3 and diff.max() <= 48, (diff.mean(), diff.max())


# ------------------------------------------------------------------ the IOD's required attributes
# dicom-validator needs the DICOM standard's docbook XML, which it downloads from dicom.nema.org: not
# reachable offline. Instead: the VL Whole Slide Microscopy Image IOD's mandatory modules, attribute by
# attribute (PS3.3 A.32.8), type 1 (present, non-empty) and type 2 (present).
_TYPE1 = [
    # SOP Common
    "SOPClassUID", "SOPInstanceUID",
    # General Study / Series / Frame of Reference
    "StudyInstanceUID", "Modality", "SeriesInstanceUID", "FrameOfReferenceUID",
    # Enhanced General Equipment
    "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions",
    # Image Pixel
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "PlanarConfiguration", "PixelData",
    # Multi-frame Functional Groups / Multi-frame Dimension
    "SharedFunctionalGroupsSequence", "InstanceNumber", "ContentDate", "ContentTime", "NumberOfFrames",
    "DimensionOrganizationSequence", "DimensionIndexSequence",
    # Specimen
    "ContainerIdentifier", "SpecimenDescriptionSequence",
    # Whole Slide Microscopy Image
    "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "TotalPixelMatrixOriginSequence",
    "ImageOrientationSlide", "AcquisitionDateTime", "VolumetricProperties", "SpecimenLabelInImage",
    "BurnedInAnnotation", "FocusMethod", "ExtendedDepthOfField", "LossyImageCompression",
    "DimensionOrganizationType", "TotalPixelMatrixFocalPlanes",
    # Optical Path
    "NumberOfOpticalPaths", "OpticalPathSequence",
]
_TYPE2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "PositionReferenceIndicator",
          "IssuerOfTheContainerIdentifierSequence", "ContainerTypeCodeSequence", "AcquisitionContextSequence"]


def test_dicom_validator_when_the_standard_is_at_hand(case):
    """dicom-validator (validate_iods) on the folder, when $WSICODEC_DICOM_STANDARD names a folder holding the
    standard's docbook/JSON (what ``validate_iods`` downloads into ~/dicom-validator when online)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("dicom_validator", reason="dicom-validator is not installed (pip install dicom-validator)")
    standard = os.environ.get("WSICODEC_DICOM_STANDARD")
    if not standard or not Path(standard).is_dir():
        pytest.skip("set WSICODEC_DICOM_STANDARD to a dicom-validator standard folder (it cannot download "
                    "the DICOM standard offline)")
    proc = subprocess.run([sys.executable, "-m", "dicom_validator.validate_iods", "--standard-path", standard,
                           "--edition", "local", str(case["out"])], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_dciodvfy_finds_no_errors(case):
    """David Clunie's IOD verifier (Debian's dicom3tools; CI installs it) on every instance: no errors.
    Its only warnings are the empty patient and study ids, which a DICOMDIR would need and we don't know."""
    import shutil
    import subprocess

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    files = sorted(Path(case["out"]).glob("*.dcm"))
    assert len(files) >= 3
    for f in files:
        proc = subprocess.run([tool, "-new", str(f)], capture_output=True, text=True, timeout=120)
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, (f.name, errors)
        assert "VLWholeSlideMicroscopyImage" in lines, (f.name, lines[:5])  # it checked the WSI IOD


def _present(ds, keyword: str, *, nonempty: bool) -> bool:
    if keyword not in ds:
        return False
    return not nonempty or not ds[keyword].is_empty


def test_required_attributes_of_the_wsi_iod(case):
    from pydicom.uid import UID

    instances = _instances(case["out"])
    for name, ds in instances.items():
        missing = [k for k in _TYPE1 if not _present(ds, k, nonempty=True)]
        missing += [k for k in _TYPE2 if not _present(ds, k, nonempty=False)]
        assert not missing, (name, missing)
        assert ds.SOPClassUID == WSI_SOP_CLASS and ds.file_meta.MediaStorageSOPClassUID == WSI_SOP_CLASS
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "SM" and ds.DimensionOrganizationType == "TILED_FULL"
        assert len(ds.ImageType) == 4 and ds.ImageType[2] in ("VOLUME", "LABEL", "OVERVIEW")
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID,
                    ds.PyramidUID):
            assert UID(uid).is_valid, uid
        spec = ds.SpecimenDescriptionSequence[0]
        assert spec.SpecimenIdentifier and spec.SpecimenUID
        assert "IssuerOfTheSpecimenIdentifierSequence" in spec and "SpecimenPreparationSequence" in spec
        path = ds.OpticalPathSequence[0]
        assert path.OpticalPathIdentifier and path.IlluminationTypeCodeSequence
        assert path.IlluminationColorCodeSequence and path.ICCProfile  # colour images need an ICC profile
        shared = ds.SharedFunctionalGroupsSequence[0]
        assert shared.WholeSlideMicroscopyImageFrameTypeSequence[0].FrameType == ds.ImageType
        assert shared.OpticalPathIdentificationSequence[0].OpticalPathIdentifier == path.OpticalPathIdentifier
    # one slide: every instance in the same study, series, frame of reference and pyramid
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PyramidUID"):
        assert len({getattr(ds, key) for ds in instances.values()}) == 1, key
    assert len({ds.SOPInstanceUID for ds in instances.values()}) == len(instances)


def _values(v) -> list:
    """A multi-valued element as a list (pydicom reads back a single value as a scalar)."""
    return list(v) if isinstance(v, pydicom.multival.MultiValue) else [v]


def test_levels_metadata_and_frames(case):
    from pydicom.encaps import generate_frames
    from wsicodec.format.container import open_container

    c = open_container(case["container"])
    mpp = c.archived_mpp
    instances = _instances(case["out"])
    for i, (w, h) in enumerate(level_dimensions(1500, 1200)):
        ds = instances[f"level-{i}.dcm"]
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # JPEG baseline
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED" if i else "NONE"]
        assert (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (w, h)
        assert (ds.Columns, ds.Rows) == (256, 256)
        assert ds.ImagedVolumeWidth == pytest.approx(1500 * mpp / 1000, rel=1e-6)
        assert ds.ImagedVolumeHeight == pytest.approx(1200 * mpp / 1000, rel=1e-6)
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert float(spacing[0]) == pytest.approx(mpp / 1000 * 1200 / h)
        assert float(spacing[1]) == pytest.approx(mpp / 1000 * 1500 / w)
        assert ds.LossyImageCompression == "01" and _values(ds.LossyImageCompressionMethod) == ["ISO_10918_1"]
        assert float(ds.LossyImageCompressionRatio) > 1
        assert "wsicodec local:tiny" in ds.DerivationDescription and "kmeans" in ds.ImageComments
        assert "ratio" in ds.ImageComments
        assert c.attrs["source"]["filename"] in ds.ImageComments
        frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
        assert len(frames) == ds.NumberOfFrames == -(-w // 256) * -(-h // 256)
        for f in frames[:3]:
            assert f[:2] == b"\xff\xd8" and b"\xff\xc0" in f  # SOF0: baseline
            assert Image.open(io.BytesIO(f)).size == (256, 256)
    label = instances["label.dcm"]
    assert list(label.ImageType)[2] == "LABEL" and label.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert label.PhotometricInterpretation == "RGB" and label.pixel_array.shape[2] == 3
    overview = instances["overview.dcm"]
    assert list(overview.ImageType)[2] == "OVERVIEW"
    assert (overview.TotalPixelMatrixColumns, overview.TotalPixelMatrixRows) == (1280, 431)


# ------------------------------------------------------------------ round trip
@pytest.mark.slow
def test_compress_the_dicom_output_again(case):
    openslide = pytest.importorskip("openslide")
    level0 = case["out"] / "level-0.dcm"
    if "dicom" not in (openslide.OpenSlide.detect_format(str(level0)) or ""):
        pytest.skip("this OpenSlide has no DICOM driver")
    again = case["dir"] / "again.pzarr"
    wsicodec.compress(level0, again, model=str(case["model"]), device="cpu")
    from wsicodec.format.container import open_container

    c = open_container(again)
    assert (int(c.grid.width), int(c.grid.height)) == (1500, 1200)
    assert c.archived_mpp == pytest.approx(0.5)
    assert {"label", "macro"} <= set(c.associated_images())
    out = case["dir"] / "again.tiff"
    r = restore(again, out, device="cpu", progress=False)
    assert r.levels == tuple(level_dimensions(1500, 1200))


# ------------------------------------------------------------------ CLI
def _run(*args):
    return CliRunner().invoke(app, ["restore", *map(str, args)])


def _assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_refuses_region(case, tmp_path):
    r = _run(case["container"], tmp_path / "o", "--format", "dicom", "--region", "0", "0", "10", "10")
    _assert_one_line_error(r, "--region")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_existing_output(case, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.dcm").write_bytes(b"x")
    r = _run(case["container"], out, "--format", "dicom", "--device", "cpu", "--quiet")
    _assert_one_line_error(r, "exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.dcm"]
    f = tmp_path / "file"
    f.write_bytes(b"x")
    _assert_one_line_error(_run(case["container"], f, "--format", "dicom", "--quiet"), "exists")
    _assert_one_line_error(_run(case["container"], tmp_path / "x", "--format", "dicom2"), "--format")


def test_cli_writes_and_overwrites(case, tmp_path):
    out = tmp_path / "o"
    r = _run(case["container"], out, "--format", "dicom", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and (out / "level-0.dcm").is_file()
    first = pydicom.dcmread(out / "level-0.dcm").SOPInstanceUID
    r = _run(case["container"], out, "--format", "dicom", "--device", "cpu", "--quiet", "--overwrite")
    assert r.exit_code == 0, r.output
    # the same container and options: the same SOP Instance UID (a PACS sees the same object again)
    assert pydicom.dcmread(out / "level-0.dcm").SOPInstanceUID == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    # --overwrite replaces only a folder of DICOM files
    (out / "notes.txt").write_text("mine")
    r = _run(case["container"], out, "--format", "dicom", "--device", "cpu", "--quiet", "--overwrite")
    _assert_one_line_error(r, "other than .dcm")
    assert (out / "notes.txt").is_file()


# ------------------------------------------------------------------ PACS-ready: identifiers, UIDs, optics
def _uids(folder: Path) -> dict[str, tuple[str, str, str]]:
    return {name: (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            for name, ds in _instances(folder).items()}


def test_two_restores_give_the_same_uids_and_options_change_them(case, tmp_path):
    attrs = tmp_path / "attrs.json"
    attrs.write_text('{"PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "PatientSex": "F", '
                     '"StudyDescription": "skin excision", "PatientID": "overridden"}')
    args = ["--format", "dicom", "--device", "cpu", "--quiet", "--patient-id", "P-123", "--accession", "A-9",
            "--dicom-attrs", attrs]
    for name in ("a", "b"):
        r = _run(case["container"], tmp_path / name, *args)
        assert r.exit_code == 0, r.output
    first, second = _uids(tmp_path / "a"), _uids(tmp_path / "b")
    assert first == second and len(first) == len(case["result"].levels) + 2
    assert len({sop for _, _, sop in first.values()}) == len(first)
    for study, series, sop in first.values():
        for uid in (study, series, sop):
            assert uid.startswith("2.25.") and pydicom.uid.UID(uid).is_valid and len(uid) <= 64
    ds = pydicom.dcmread(tmp_path / "a" / "level-0.dcm")
    assert (ds.PatientID, ds.AccessionNumber) == ("P-123", "A-9")  # the options win over the file
    assert (str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == ("Doe^Jane", "19700101", "F")
    assert ds.StudyDescription == "skin excision"
    # other options, other series and instances (the study follows the patient/study attributes)
    r = _run(case["container"], tmp_path / "c", *args, "--quality", "80")
    assert r.exit_code == 0, r.output
    third = _uids(tmp_path / "c")
    assert {s[0] for s in third.values()} == {s[0] for s in first.values()}
    assert not {s[1] for s in third.values()} & {s[1] for s in first.values()}
    assert not {s[2] for s in third.values()} & {s[2] for s in first.values()}
    # another container (another write of the same slide): other UIDs throughout
    study_uid = "1.2.826.0.1.3680043.8.498.12345"
    r = _run(case["container"], tmp_path / "d", "--format", "dicom", "--device", "cpu", "--quiet",
             "--study-uid", study_uid)
    assert r.exit_code == 0, r.output
    assert {s[0] for s in _uids(tmp_path / "d").values()} == {study_uid}


def test_objective_power_burned_in_label_and_pixel_spacing(case):
    instances = _instances(case["out"])
    for name, ds in instances.items():
        assert float(ds.OpticalPathSequence[0].ObjectiveLensPower) == 20, name
        assert ds.BurnedInAnnotation == ds.SpecimenLabelInImage, name
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert all(float(v) > 0 for v in spacing), name
        assert ds.ImagedVolumeWidth > 0 and ds.ImagedVolumeHeight > 0, name
    assert instances["overview.dcm"].BurnedInAnnotation == "YES"
    assert instances["label.dcm"].BurnedInAnnotation == "YES"
    assert instances["level-0.dcm"].BurnedInAnnotation == "NO"
    # the overview is taken as the whole 76 mm slide
    overview = instances["overview.dcm"]
    assert overview.ImagedVolumeWidth == pytest.approx(76.0)


def test_wsidicom_reads_label_and_overview(case):
    wsidicom = pytest.importorskip("wsidicom")
    with wsidicom.WsiDicom.open(case["out"]) as slide:
        assert slide.read_label().size[0] > 0 and slide.read_overview().size[0] > 0
        mpp = slide.levels.base_level.mpp
        assert mpp.width == pytest.approx(0.5, rel=0.02)


def test_openslide_reports_the_objective_power(case):
    openslide = pytest.importorskip("openslide")
    if "dicom" not in (openslide.OpenSlide.detect_format(str(case["out"] / "level-0.dcm")) or ""):
        pytest.skip(f"this OpenSlide ({openslide.__library_version__}) has no DICOM driver")
    with openslide.OpenSlide(str(case["out"] / "level-0.dcm")) as s:
        assert float(s.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 20


@pytest.mark.parametrize("args,needle", [
    (["--study-uid", "1.2.abc"], "not a valid"),
    (["--patient-id", "x" * 80], "PatientID"),
    (["--dicom-attrs", "{bad}"], "JSON"),
    (["--dicom-attrs", '{"Rows": "3"}'], "Rows"),
])
def test_cli_refuses_bad_patient_and_study_attributes(case, tmp_path, args, needle):
    if args[0] == "--dicom-attrs":
        f = tmp_path / "attrs.json"
        f.write_text(args[1])
        args = ["--dicom-attrs", f]
    out = tmp_path / "o"
    _assert_one_line_error(_run(case["container"], out, "--format", "dicom", "--quiet", *args), needle)
    assert not out.exists()


def test_patient_options_need_dicom(case, tmp_path):
    out = tmp_path / "o.tiff"
    _assert_one_line_error(_run(case["container"], out, "--patient-id", "P1", "--quiet"), "--format dicom")
    assert not out.exists()
