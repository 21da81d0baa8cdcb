"""DICOM out: a decoded image as a derived DICOM series that a PACS and any DICOM reader take back.

A 3D volume becomes a folder with one file per slice, a 2D image one file. Every write gets new Study, Series,
SOP Instance and Frame of Reference UIDs (``pydicom.uid.generate_uid``), ``ImageType`` ``DERIVED\\SECONDARY``
and a ``DerivationDescription`` naming medlatent, the model and its weights' SHA-256.

Geometry comes from the recorded affine: 3D affines are RAS (NIfTI convention), DICOM patient coordinates LPS,
so x and y change sign; ``ImagePositionPatient`` of slice k is the world position of voxel ``(0, 0, k)``. Values
are stored as 16-bit integers with ``RescaleSlope``/``RescaleIntercept`` chosen so that the stored value times the
slope plus the intercept gives the decoded value back to within half a slope step (integer images that fit 16 bits
are stored exactly; CT in HU, ``RescaleType HU``).

Identifiers: the latent file holds none, so without a template the output holds none either (patient and study
attributes DICOM requires are present and empty). With a template (the source DICOM), patient and study
attributes are copied from it and the source image is referenced; its StudyInstanceUID only on request
(``keep_study``), so a derived series does not join the original study by accident. A derived 2D image
references its source image (``SourceImageSequence``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlatent.io.atomic import current_umask, temporary_path
from medlatent.io.image import ImageData, ImageReadError

logger = logging.getLogger(__name__)

# Patient and study attributes copied from a template (none is written without one).
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress",
    "EthnicGroup", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "BodyPartExamined", "PatientPosition",
)
# Empty (type 2) when there is no template: required by the IODs, and holding nothing.
_TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                "AccessionNumber", "ReferringPhysicianName", "PositionReferenceIndicator")
_ORTHOGONAL = 1e-4  # |cos| between row, column and slice directions accepted as perpendicular
_SOP_CLASS = {"ct": "1.2.840.10008.5.1.4.1.1.2", "mri": "1.2.840.10008.5.1.4.1.1.4"}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_DICOM_MODALITY = {"ct": "CT", "mri": "MR", "xray": "OT", "other": "OT"}
_STEPS = 65000  # uint16 steps used for the value range (headroom below 65535 for the decimal rounding of DS)


class DicomWriteError(ValueError):
    """A decoded image cannot be written as DICOM; the message names the output and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class Derivation:
    """Where the pixels came from, written into every file."""

    model: str
    weights_sha256: str
    software_version: str = ""

    @property
    def description(self) -> str:
        return (f"Reconstructed by medlatent {self.software_version} from a latent representation: model "
                f"{self.model}, weights SHA-256 {self.weights_sha256 or 'unknown'}")[:1024]


def dicom_output_path(output: Path, name: str, spatial_dims: int) -> Path:
    """``NAME.dcm`` for a 2D image, the folder ``NAME`` (one file per slice) for a volume."""
    return output / (name + ".dcm") if spatial_dims == 2 else output / name


# ------------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class Stored:
    """16-bit pixels and the rescale that maps them back: ``value = pixels × slope + intercept``."""

    pixels: np.ndarray
    slope: str  # decimal strings exactly as written (DS), so the quantisation uses the values readers see
    intercept: str
    signed: bool


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def quantise(values: np.ndarray) -> Stored:
    """``values`` as int16/uint16 with a rescale: integers that fit are stored exactly, anything else on
    ``_STEPS`` steps of the value range (error at most half a step)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    if np.array_equal(v, np.rint(v)):
        for dt, signed in ((np.uint16, False), (np.int16, True)):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return Stored(v.astype(dt), "1", "0", signed)
    intercept = _ds(lo)
    slope = _ds((hi - lo) / _STEPS if hi > lo else 1.0)
    q = np.rint((v - float(intercept)) / float(slope))
    return Stored(np.clip(q, 0, 65535).astype(np.uint16), slope, intercept, False)


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Plane:
    """Geometry of one written frame, in DICOM terms (LPS mm)."""

    position: np.ndarray | None  # ImagePositionPatient
    orientation: np.ndarray | None  # ImageOrientationPatient (row direction, column direction)
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)


def volume_planes(affine: np.ndarray, n_slices: int, where: Path) -> tuple[list[Plane], float]:
    """One plane per slice ``k`` of an ``X×Y×Z`` volume with a RAS affine, and the slice spacing.

    Columns of the frame run along ``i`` (X), rows along ``j`` (Y), as the reader stacks them.
    """
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3]
    cols = [lps[:, a] for a in range(3)]
    sizes = [float(np.linalg.norm(c)) for c in cols]
    if min(sizes) <= 0:
        raise DicomWriteError(where, f"the affine has a zero-length axis (voxel sizes {sizes}); cannot place slices")
    unit = [c / s for c, s in zip(cols, sizes)]
    for a, b, what in ((0, 1, "rows and columns"), (0, 2, "the slice axis and the rows"),
                       (1, 2, "the slice axis and the columns")):
        if abs(float(unit[a] @ unit[b])) > _ORTHOGONAL:
            raise DicomWriteError(where, f"the affine is sheared: {what} are not perpendicular, which DICOM "
                                         "slices cannot express; write NIfTI instead (--format nifti)")
    orientation = np.concatenate([unit[0], unit[1]])
    planes = [Plane(lps[:, 3] + k * cols[2], orientation, (sizes[1], sizes[0])) for k in range(n_slices)]
    return planes, sizes[2]



# ------------------------------------------------------------------------------------------ templates
def read_template(path: Path):
    """The template's header (no pixels), refused with the reason when it is not a readable DICOM file."""
    from medlatent.io.dicom import read_dataset

    try:
        return read_dataset(path, header_only=True)
    except ImageReadError as e:
        raise DicomWriteError(path, f"template is not usable: {e.problem}") from e
    except Exception as e:
        raise DicomWriteError(path, f"template is not a readable DICOM file ({type(e).__name__}: {e})") from e


def find_template(source: Path, name: str) -> Path:
    """The template file for the latent ``name`` under ``source`` (the folder given to ``medlatent encode``).

    ``source`` a file: itself. A folder: the file the latent was named after (``NAME`` or ``NAME.<ext>``); for
    ``…/series`` and ``…/series-N`` names, a file of that series in its folder (grouped as encoding grouped
    them); else, when ``source`` is itself the folder of one series, its first file. Never a guess between
    several sources: a wrong template would copy another patient's identifiers.
    """
    if source.is_file():
        return source
    rel = Path(name)
    parent = source / rel.parent
    if (source / rel).is_file():
        return source / rel
    named = [p for p in _files(parent) if p.name.startswith(rel.name + ".")]
    if len(named) == 1:
        return named[0]
    if rel.name == "series" or rel.name.startswith("series-"):
        series = _series(parent)
        number = rel.name.removeprefix("series-")
        index = 0 if rel.name == "series" else int(number) - 1 if number.isdigit() else -1
        if 0 <= index < len(series):
            return series[index]
    series = _series(source)
    if len(series) == 1:
        return series[0]
    raise DicomWriteError(source, f"holds no template for {name!r} (expected {source / name}, {name}.dcm or the "
                                  "series it was encoded from)")


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _series(folder: Path) -> list[Path]:
    """The first file of each DICOM series directly in ``folder``, in the order encoding numbers them."""
    from medlatent.io.dicom import scan_dicom_headers

    groups, _bad = scan_dicom_headers(_files(folder))
    return [min(f.path for f in files) for _uid, files in sorted(groups.items())]


# ------------------------------------------------------------------------------------------ datasets
@dataclass(frozen=True)
class SeriesIds:
    study: str
    series: str
    frame_of_reference: str


def _series_ids(template, keep_study: bool) -> SeriesIds:
    from pydicom.uid import generate_uid

    study = str(template.StudyInstanceUID) if keep_study else generate_uid()
    # the derived image lies in the source's patient coordinates: same frame of reference as the template
    frame = str(template.get("FrameOfReferenceUID") or "") if template is not None else ""
    return SeriesIds(study, generate_uid(), frame or generate_uid())


def _base_dataset(img: ImageData, derivation: Derivation, template, ids: SeriesIds):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # template values, decoded with the template's set, written as UTF-8
    if template is not None:
        for kw in PATIENT_STUDY_KEYWORDS:
            if kw in template:
                ds[kw] = template[kw]
        if img.spatial_dims == 2 and "SOPInstanceUID" in template and "SOPClassUID" in template:
            ref = Dataset()
            ref.ReferencedSOPClassUID = template.SOPClassUID
            ref.ReferencedSOPInstanceUID = template.SOPInstanceUID
            ds.SourceImageSequence = [ref]
    for kw in _TYPE2_EMPTY:
        if kw not in ds:
            setattr(ds, kw, "")
    ds.Modality = str(template.get("Modality") or "") if template is not None else ""
    ds.Modality = ds.Modality or _DICOM_MODALITY.get(img.modality or "", "OT")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = derivation.description
    ds.SeriesDescription = f"medlatent {derivation.model}"[:64]
    ds.Manufacturer = "medlatent"
    ds.SoftwareVersions = derivation.software_version or "unknown"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ids.study, ids.series
    ds.FrameOfReferenceUID = ids.frame_of_reference
    ds.SeriesNumber = ""
    ds.BurnedInAnnotation = "NO"
    return ds


def _sop_class(img: ImageData, plane: Plane) -> str:
    """CT or MR Image Storage when the modality and the plane's geometry allow it, else Secondary Capture."""
    placed = plane.position is not None and plane.orientation is not None
    return _SOP_CLASS.get(img.modality or "", _SECONDARY_CAPTURE) if placed else _SECONDARY_CAPTURE


def _set_pixels(ds, frame: np.ndarray, stored: Stored, img: ImageData) -> None:
    ds.Rows, ds.Columns = int(frame.shape[0]), int(frame.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if stored.signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = stored.slope, stored.intercept
    ds.RescaleType = "HU" if img.modality == "ct" else "US"
    ds.PixelData = np.ascontiguousarray(frame).tobytes()


def _set_rgb(ds, rgb: np.ndarray) -> None:
    ds.Rows, ds.Columns = int(rgb.shape[1]), int(rgb.shape[2])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(np.moveaxis(rgb, 0, -1)).tobytes()


def _set_plane(ds, plane: Plane, thickness: float | None) -> None:
    ds.PixelSpacing = [_ds(plane.spacing[0]), _ds(plane.spacing[1])]
    if plane.orientation is not None and plane.position is not None:
        ds.ImageOrientationPatient = [_ds(v) for v in plane.orientation]
        ds.ImagePositionPatient = [_ds(v) for v in plane.position]
        normal = np.cross(plane.orientation[:3], plane.orientation[3:])
        ds.SliceLocation = _ds(float(plane.position @ normal))
    if thickness is not None:
        ds.SliceThickness = _ds(thickness)
        ds.SpacingBetweenSlices = _ds(thickness)


def _finish(ds, sop_class: str, number: int):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ds.SOPClassUID = sop_class
    if sop_class == _SOP_CLASS["ct"]:  # type 2 attributes of the CT Image module: present, empty
        for kw in ("KVP", "AcquisitionNumber"):
            if kw not in ds:
                setattr(ds, kw, "")
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _window(ds, lo: float, hi: float) -> None:
    ds.WindowCenter = _ds((lo + hi) / 2)
    ds.WindowWidth = _ds(max(hi - lo, 1.0))


# ------------------------------------------------------------------------------------------ writing
def write_dicom(img: ImageData, path: str | Path, derivation: Derivation, *, template: Path | None = None,
                keep_study: bool = False) -> Path:
    """Write ``img`` as a derived DICOM file (2D) or series folder (3D, one file per slice), atomically.

    Args:
        img: a decoded image: 2D ``C×H×W`` (``C`` = 1, or 3 for 8-bit RGB), 3D ``X×Y×Z`` with a RAS affine.
        path: the file (2D) or folder (3D), as :func:`dicom_output_path` names them.
        template: a DICOM file of the source: patient and study attributes are copied from it.
        keep_study: keep the template's StudyInstanceUID (the derived series joins the source study).

    Raises:
        DicomWriteError: an unusable template, ``keep_study`` without one, or geometry DICOM cannot express.
    """
    path = Path(path)
    if keep_study and template is None:
        raise DicomWriteError(path, "keeping the source study needs a template (the source DICOM)")
    header = read_template(template) if template is not None else None
    if keep_study and header is not None and not header.get("StudyInstanceUID"):
        raise DicomWriteError(template, "template has no StudyInstanceUID to keep")  # type: ignore[arg-type]
    ids = _series_ids(header, keep_study)
    if img.spatial_dims == 2:
        ds = _image_2d(img, derivation, header, ids, path)
        _write_atomic_file(ds, path)
    else:
        _write_series(img, derivation, header, ids, path)
    return path


def _image_2d(img: ImageData, derivation: Derivation, header, ids: SeriesIds, where: Path):
    ds = _base_dataset(img, derivation, header, ids)
    arr = np.asarray(img.array)
    sp = tuple(float(v) for v in np.linalg.norm(np.asarray(img.affine)[:2, :2], axis=0))
    # a 2D affine holds spacing only; the source's plane (position, orientation) comes with a template
    plane = Plane(None, None, (sp[0], sp[1]))
    if header is not None and "ImagePositionPatient" in header and "ImageOrientationPatient" in header:
        plane = Plane(np.array([float(v) for v in header.ImagePositionPatient]),
                      np.array([float(v) for v in header.ImageOrientationPatient]), plane.spacing)
    if arr.shape[0] == 3:
        if arr.min() < 0 or arr.max() > 255:
            raise DicomWriteError(where, f"a colour image is written as 8-bit RGB, but its values span "
                                         f"{arr.min():g}..{arr.max():g}; write it as --format png or tiff")
        _set_rgb(ds, np.rint(arr).astype(np.uint8))
    else:
        stored = quantise(arr[0])
        _set_pixels(ds, stored.pixels, stored, img)
        _window(ds, float(arr.min()), float(arr.max()))
    _set_plane(ds, plane, None)
    return _finish(ds, _sop_class(img, plane), 1)


def _write_series(img: ImageData, derivation: Derivation, header, ids: SeriesIds, folder: Path) -> None:
    vol = np.asarray(img.array)
    planes, step = volume_planes(img.affine, vol.shape[2], folder)
    stored = quantise(vol)  # one rescale for the whole series: a viewer's window means the same on every slice
    width = max(4, len(str(vol.shape[2])))
    sop_class = _sop_class(img, planes[0])
    tmp = _fresh_temporary(folder)
    try:
        for k, plane in enumerate(planes):
            ds = _base_dataset(img, derivation, header, ids)
            _set_pixels(ds, stored.pixels[:, :, k].T, stored, img)  # frame rows run along j (Y), columns along i
            _window(ds, float(vol.min()), float(vol.max()))
            _set_plane(ds, plane, step)
            _finish(ds, sop_class, k + 1).save_as(tmp / f"slice_{k + 1:0{width}d}.dcm", enforce_file_format=True)
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_atomic_file(ds, path: Path) -> None:
    from medlatent.io.atomic import atomic_write

    with atomic_write(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def _fresh_temporary(folder: Path) -> Path:
    tmp = temporary_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Put the finished series in place; a previous series there is swapped out whole, never mixed."""
    for stale in folder.parent.glob(f".old-*-{folder.name}"):  # a swap that a killed run left half done
        shutil.rmtree(stale, ignore_errors=True)
    if folder.exists():
        old = folder.with_name(f".old-{os.getpid()}-{folder.name}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
