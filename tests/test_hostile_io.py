"""Hostile inputs for the readers: singleton-axis NIfTI, truncated and malformed headers, slice-spacing jitter.

Each case is checked at the reader and through the real CLI: a clear error naming the file and the actual
problem, exit code 1, no traceback, no numpy warning, no output — or, for valid inputs, the right geometry.
Fixtures are small files written here with pydicom/nibabel, mostly from pydicom's bundled CT_small/MR_small.
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from io_fixtures import sample_file
from medlatent.io.image import ImageReadError
from medlatent.io.readers import read_image

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

OBLIQUE = np.array([[0.0, -2.0, 0.0, 10.0], [3.0, 0.0, 0.0, 20.0], [0.0, 0.0, 4.0, 30.0], [0.0, 0.0, 0.0, 1.0]])





_cli = run_cli


def _read_quietly(path, **kw):
    """read_image, failing the test on any RuntimeWarning (numpy overflow/invalid) that escapes the reader."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return read_image(path, **kw)
        finally:
            leaked = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            assert not leaked, f"numpy warnings leaked: {leaked}"


# ------------------------------------------------------------------------------------------ fixtures
def _dicom(path: Path, source: str = "CT_small.dcm", **changes) -> Path:
    """A copy of a bundled DICOM file with header values changed (``None`` deletes the element)."""
    ds = pydicom.dcmread(sample_file(source))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom objects to the hostile values being set
        for key, value in changes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=False)
    return path


def _replace_bytes(path: Path, old: bytes, new: bytes) -> Path:
    """Write a value pydicom refuses to set (e.g. non-numeric text in a DS element) into a saved file."""
    raw = path.read_bytes()
    assert len(old) == len(new) and raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    return path


def _element_end(ds, keyword: str) -> int:
    raw = ds.get_item(keyword)
    return raw.value_tell + raw.length


def _deeply_nested(path: Path, depth: int = 3000) -> Path:
    """CT_small with a self-nested sequence of undefined length (parsing it recurses ``depth`` levels)."""
    import sys

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        outer["ContentSequence"].is_undefined_length = True
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    ds["ContentSequence"].is_undefined_length = True
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50 * depth)  # writing recurses as deep as reading
    try:
        ds.save_as(path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def _nifti(path: Path, arr: np.ndarray, affine=OBLIQUE, *, sform=None, **header) -> Path:
    """An uncompressed NIfTI-1 file; ``sform`` (rows written raw, with only the sform in use) and ``header``
    patch stored fields byte by byte after saving: nibabel refuses to write a singular or NaN affine and repairs
    or resets scl_slope, pixdim and the form codes, so hostile values must be written raw."""
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    offsets = {"pixdim1": (80, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"), "dim1": (42, "<h"),
               "qform_code": (252, "<h"), "sform_code": (254, "<h")}
    raw = bytearray(path.read_bytes())
    if sform is not None:
        struct.pack_into("<12f", raw, 280, *np.asarray(sform, dtype=np.float32)[:3].ravel())
        header = {"qform_code": 0, "sform_code": 1, **header}
    for key, value in header.items():
        offset, fmt = offsets[key]
        struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))
    return path


def _series(folder: Path, offsets, source: str = "MR_small.dcm") -> Path:
    """A series from a bundled slice: one file per offset (mm along the normal), distinct pixels, shuffled."""
    src = pydicom.dcmread(sample_file(source))
    folder.mkdir(parents=True, exist_ok=True)
    uid = pydicom.uid.generate_uid()
    ori = np.array([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(ori[:3], ori[3:])
    origin = np.array([float(v) for v in src.ImagePositionPatient])
    px = src.pixel_array
    for k in np.random.default_rng(0).permutation(len(offsets)):
        ds = src.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + offsets[k] * normal]
        ds.PixelData = np.roll(px, int(k) * 3, axis=1).astype(px.dtype).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm")
    return folder


def _lps_to_ras(p) -> np.ndarray:
    return np.asarray(p, dtype=np.float64) * [-1, -1, 1]


# ------------------------------------------------------------------------------------------ item 7: X×Y×1 NIfTI
@pytest.mark.parametrize("shape, plane", [((16, 12, 1), (0, 1)), ((16, 12, 1, 1), (0, 1)), ((1, 16, 12), (1, 2)),
                                          ((16, 1, 12), (0, 2))])
def test_singleton_axis_nifti_is_a_2d_image_with_its_geometry(tmp_path, shape, plane):
    arr = np.random.default_rng(0).random(shape).astype(np.float32)
    img = _read_quietly(_nifti(tmp_path / "slice.nii", arr))
    assert img.spatial_dims == 2 and img.array.shape == (1, 16, 12)
    np.testing.assert_array_equal(img.array[0], arr.reshape(16, 12))
    assert img.spacing == pytest.approx([np.linalg.norm(OBLIQUE[:3, a]) for a in plane])
    assert img.meta["file_geometry"]["shape"] == list(shape)
    np.testing.assert_allclose(img.meta["file_geometry"]["affine"], OBLIQUE)


def test_nifti_with_two_singleton_axes_is_refused_as_too_small(tmp_path):
    with pytest.raises(ImageReadError, match=r"line\.nii: image of shape \(16, 1, 1\) is too small"):
        _read_quietly(_nifti(tmp_path / "line.nii", np.ones((16, 1, 1), np.float32)))


@pytest.mark.parametrize("shape", [(16, 12, 1), (16, 12, 1, 1), (1, 16, 12)])
def test_singleton_axis_nifti_roundtrips_through_the_cli(tmp_path, model_dirs, shape):
    """encode with a 2D model, decode (NIfTI by default for NIfTI sources): the file's shape and affine return."""
    (tmp_path / "in").mkdir()
    src = _nifti(tmp_path / "in" / "slice.nii", np.random.default_rng(1).random(shape).astype(np.float32))
    res, out = _cli("encode", src, "-o", tmp_path / "lat", "--model", model_dirs[2])
    assert res.exit_code == 0, out
    res, out = _cli("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model_dirs[2])
    assert res.exit_code == 0, out
    dec = nib.load(str(tmp_path / "dec" / "slice.nii.gz"))
    assert dec.shape == shape
    np.testing.assert_allclose(dec.affine, OBLIQUE, atol=1e-5)


# ------------------------------------------------------------------------------------------ item 10: messages
def _truncated_inside_element(d: Path) -> Path:
    ct = sample_file("CT_small.dcm")
    cut = _element_end(pydicom.dcmread(ct), "PatientName") - 2
    (d / "cut_in_header.dcm").write_bytes(ct.read_bytes()[:cut])
    return d / "cut_in_header.dcm"


def _truncated_between_elements(d: Path) -> Path:
    ct = sample_file("CT_small.dcm")
    cut = _element_end(pydicom.dcmread(ct), "StudyDate")  # the file ends cleanly after an element
    (d / "cut_after_element.dcm").write_bytes(ct.read_bytes()[:cut])
    return d / "cut_after_element.dcm"


def _dicom_cases(d: Path) -> list[tuple[str, Path, str]]:
    """(case, file, expected message fragment) for single DICOM files."""
    nan_spacing = _dicom(d / "spacing_text.dcm", PixelSpacing=["9.9", "9.9"])
    _replace_bytes(nan_spacing, b"9.9\\9.9 ", b"abc\\xyz ")
    return [
        ("truncated inside an element", _truncated_inside_element(d), "truncated DICOM header: the file ends at byte"),
        ("truncated between elements", _truncated_between_elements(d), "truncated DICOM header"),
        ("huge slope", _dicom(d / "slope_huge.dcm", RescaleSlope="1e38"),
         "RescaleSlope 1e+38 and RescaleIntercept -1024 make intensities overflow float32"),
        ("nan slope", _dicom(d / "slope_nan.dcm", RescaleSlope="NaN"), "RescaleSlope nan is not finite"),
        ("infinite intercept", _dicom(d / "intercept_inf.dcm", RescaleIntercept="-inf"),
         "RescaleIntercept -inf is not finite"),
        ("zero slope", _dicom(d / "slope_zero.dcm", RescaleSlope="0"), "RescaleSlope 0 maps every pixel"),
        ("nan spacing", _dicom(d / "spacing_nan.dcm", PixelSpacing=["nan", "nan"]), "PixelSpacing [nan, nan] is not "
                                                                                    "finite"),
        ("negative spacing", _dicom(d / "spacing_neg.dcm", PixelSpacing=["-0.5", "0.5"]),
         "PixelSpacing [-0.5, 0.5] is not positive"),
        ("one spacing value", _dicom(d / "spacing_one.dcm", PixelSpacing="0.5"), "PixelSpacing has 1 value(s)"),
        ("text spacing", nan_spacing, "PixelSpacing 'abc\\\\xyz' is not a number"),
        ("rows too few", _dicom(d / "rows_small.dcm", Rows=64), "pixel data holds 32768 bytes, but Rows × Columns"),
        ("rows too many", _dicom(d / "rows_big.dcm", Rows=200), "the header does not match the pixel data"),
        ("zero rows", _dicom(d / "rows_zero.dcm", Rows=0), "Rows 0 is invalid"),
        ("12-bit allocation", _dicom(d / "bits12.dcm", BitsAllocated=12), "BitsAllocated 12 is invalid"),
        ("odd bit allocation", _dicom(d / "bits7.dcm", BitsAllocated=7), "BitsAllocated 7 is invalid"),
        ("bits stored too many", _dicom(d / "bits8.dcm", BitsAllocated=8), "BitsStored 16 exceeds BitsAllocated 8"),
        ("zero frames", _dicom(d / "frames0.dcm", NumberOfFrames=0), "NumberOfFrames 0 is invalid"),
        ("nested too deeply", _deeply_nested(d / "nested.dcm"), "sequences are nested too deeply"),
    ]


def _nifti_cases(d: Path) -> list[tuple[str, Path, str]]:
    vol = np.random.default_rng(2).random((8, 8, 8)).astype(np.float32)
    i16 = (vol * 1000).astype(np.int16)
    collinear = np.eye(4)
    collinear[:3, 1] = collinear[:3, 0]
    return [
        ("zero affine", _nifti(d / "zero_affine.nii", vol, sform=np.diag([0.0, 0.0, 0.0, 1.0])),
         "affine is singular (zero scale along axis 0, 1, 2): cannot determine orientation"),
        ("nan affine", _nifti(d / "nan_affine.nii", vol, sform=np.diag([np.nan, 1.0, 1.0, 1.0])),
         "affine contains NaN or infinite values"),
        ("collinear affine", _nifti(d / "collinear.nii", vol, sform=collinear),
         "affine is singular (its axes are not independent)"),
        ("zero pixdim", _nifti(d / "pixdim0.nii", vol, qform_code=0, sform_code=0, pixdim1=0.0),
         "pixdim[1] = 0 is not a positive voxel size"),
        ("negative pixdim", _nifti(d / "pixdim_neg.nii", vol, qform_code=0, sform_code=0, pixdim1=-2.0),
         "pixdim[1] = -2 is not a positive voxel size"),
        ("nan pixdim", _nifti(d / "pixdim_nan.nii", vol, qform_code=0, sform_code=0, pixdim1=np.nan),
         "pixdim[1] = nan is not a positive voxel size"),
        ("huge scl_slope", _nifti(d / "scl_huge.nii", i16, scl_slope=1e38, scl_inter=0.0),
         "scl_slope 1e+38 and scl_inter 0 make intensities overflow float32"),
        ("infinite scl_inter", _nifti(d / "scl_inter_inf.nii", i16, scl_slope=2.0, scl_inter=np.inf),
         "scl_inter inf is not a finite number"),
        ("negative size", _nifti(d / "dim_neg.nii", vol, dim1=-8), "header dim [-8, 8, 8] has a size below 1"),
    ]


def _all_cases(d: Path) -> list[tuple[str, Path, str]]:
    d.mkdir(parents=True, exist_ok=True)
    return _dicom_cases(d) + _nifti_cases(d)


@pytest.fixture(scope="module")
def hostile_cases(tmp_path_factory) -> list[tuple[str, Path, str]]:
    """Built once: the deeply nested DICOM alone takes about a minute to write."""
    return _all_cases(tmp_path_factory.mktemp("hostile") / "bad")


def test_each_hostile_file_is_refused_naming_file_and_problem(hostile_cases):
    for case, path, fragment in hostile_cases:
        with pytest.raises(ImageReadError) as err:
            _read_quietly(path)
        text = str(err.value)
        assert text.startswith(str(path)) and fragment in text, f"{case}: {text}"


def test_hostile_files_through_the_cli(tmp_path, model_dirs, hostile_cases):
    """Every case: exit 1, the file and the problem in the output, no traceback or numpy warning, nothing written."""
    for case, path, fragment in hostile_cases:
        dims = 3 if path.suffix == ".nii" else 2
        out = tmp_path / "out" / path.stem
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res, text = _cli("encode", path, "-o", out, "--model", model_dirs[dims])
        assert res.exit_code == 1, f"{case}: exit {res.exit_code}\n{text}"
        flat = " ".join(text.split())  # the console wraps long lines
        assert path.name in flat and " ".join(fragment.split()) in flat, f"{case}: {text}"
        assert "Traceback" not in text and "RuntimeWarning" not in text, f"{case}: {text}"
        assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], case
        assert not list(out.rglob("*.safetensors")) if out.exists() else True, case


def test_monochrome1_near_the_top_of_uint16_does_not_wrap(tmp_path):
    """max + min − value computed without uint16 wrap-around (the sum exceeds 65535)."""
    px = np.linspace(100, 65500, 128 * 128).reshape(128, 128).astype(np.uint16)
    path = _dicom(tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1", PixelRepresentation=0,
                  RescaleSlope=None, RescaleIntercept=None, PixelData=px.tobytes())
    img = _read_quietly(path)
    np.testing.assert_array_equal(img.array[0], (65600 - px.astype(np.int64)).astype(np.uint16))


def test_malformed_slice_geometry_names_the_slice(tmp_path):
    folder = _series(tmp_path / "series", [0.0, 3.0, 6.0, 9.0])
    ds = pydicom.dcmread(folder / "slice002.dcm")
    ds.ImageOrientationPatient = [0, 0, 0, 0, 1, 0]
    ds.save_as(folder / "slice002.dcm")
    with pytest.raises(ImageReadError, match=r"slice002\.dcm: ImageOrientationPatient \[0, 0, 0, 0, 1, 0\] has a "
                                             r"zero direction vector"):
        _read_quietly(folder)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = ["1.0", "2.0"]
    ds.save_as(folder / "slice002.dcm")
    with pytest.raises(ImageReadError, match=r"slice002\.dcm: ImagePositionPatient has 2 value\(s\) \[1, 2\]; it "
                                             r"needs 3"):
        _read_quietly(folder)


def test_truncated_slice_in_a_series_is_named_with_the_gap_it_leaves(tmp_path, model_dirs):
    folder = _series(tmp_path / "series", [0.0, 3.0, 6.0, 9.0, 12.0])
    raw = (folder / "slice002.dcm").read_bytes()
    (folder / "slice002.dcm").write_bytes(raw[:600])
    res, text = _cli("encode", folder, "-o", tmp_path / "out", "--model", model_dirs[3])
    flat = " ".join(text.split())
    assert res.exit_code == 1 and "missing slices?" in flat and "slice002.dcm: truncated DICOM header" in flat, text


# ------------------------------------------------------------------------------------------ item 11: jitter
def _jittered(n: int = 20, gap: float = 3.0, jitter: float = 0.016) -> np.ndarray:
    """Positions whose gaps alternate between gap·(1 ± jitter) with a few in between (≈1.6 % variation)."""
    pattern = np.array([1.0, -1.0, 0.5, -0.25, 0.75])
    gaps = gap * (1 + jitter * pattern[np.arange(n - 1) % len(pattern)])
    return np.concatenate([[0.0], np.cumsum(gaps)])


def test_series_with_small_gap_jitter_is_accepted_on_its_mean_spacing(tmp_path, caplog):
    offsets = _jittered()
    gaps = np.diff(offsets)
    assert 0.01 < (gaps.max() - gaps.min()) / np.median(gaps) < 0.05  # the case from the issue: ~1.6 % each way
    folder = _series(tmp_path / "mr", offsets)
    with caplog.at_level(logging.WARNING, logger="medlatent.io.dicom"):
        img = _read_quietly(folder)
    assert img.array.shape == (64, 64, 20)
    mean = (offsets[-1] - offsets[0]) / 19
    assert img.spacing[2] == pytest.approx(mean, abs=1e-6)
    # no interpolation: slice k is file k's pixels
    src = pydicom.dcmread(sample_file("MR_small.dcm")).pixel_array
    for k in (0, 7, 19):
        np.testing.assert_array_equal(img.array[..., k], np.roll(src, 3 * k, axis=1).T)
    # first and last voxel planes sit on the first and last slice positions
    first = pydicom.dcmread(folder / "slice000.dcm").ImagePositionPatient
    last = pydicom.dcmread(folder / "slice019.dcm").ImagePositionPatient
    np.testing.assert_allclose((img.affine @ [0, 0, 0, 1])[:3], _lps_to_ras(first), atol=1e-3)
    np.testing.assert_allclose((img.affine @ [0, 0, 19, 1])[:3], _lps_to_ras(last), atol=1e-3)
    assert "within the 5% tolerance" in caplog.text and "without interpolation" in caplog.text


def test_jittered_series_encodes_through_the_cli(tmp_path, model_dirs):
    _series(tmp_path / "in" / "mr", _jittered())
    res, out = _cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", model_dirs[3])
    assert res.exit_code == 0, out
    assert (tmp_path / "lat" / "mr" / "series.latent.safetensors").is_file()


def _gap_offsets() -> np.ndarray:
    """20 slices, one missing (a 4 mm gap among 2.0/2.04 mm gaps): the median gap (2.04) does not divide the
    extent, so a grid stepped by the median would miss the last slice."""
    gaps = [2.0] * 8 + [4.0] + [2.04] * 10
    return np.concatenate([[0.0], np.cumsum(gaps)])


def test_missing_slice_is_refused_naming_folder_and_gap(tmp_path, model_dirs):
    folder = _series(tmp_path / "in" / "gappy", _gap_offsets())
    with pytest.raises(ImageReadError, match=r"gappy: uneven slice spacing: .*the gap of 4\.000 mm between slices 9 "
                                             r"and 10 of 20.*beyond the 5% tolerance — missing slices\?"):
        _read_quietly(folder)
    res, text = _cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", model_dirs[3])
    flat = " ".join(text.split())
    assert res.exit_code == 1 and "gappy" in flat and "gap of 4.000 mm" in flat and "--uneven resample" in flat
    assert not list((tmp_path / "lat").rglob("*.safetensors")) if (tmp_path / "lat").exists() else True


def test_resampled_series_keeps_first_and_last_slice_positions(tmp_path, model_dirs):
    offsets = _gap_offsets()
    folder = _series(tmp_path / "in" / "gappy", offsets)
    img = _read_quietly(folder, uneven="resample")
    n = img.array.shape[-1]
    assert n == 21 and img.spacing[2] == pytest.approx((offsets[-1] - offsets[0]) / 20, abs=1e-6)
    first = _lps_to_ras(pydicom.dcmread(folder / "slice000.dcm").ImagePositionPatient)
    last = _lps_to_ras(pydicom.dcmread(folder / "slice019.dcm").ImagePositionPatient)
    np.testing.assert_allclose((img.affine @ [0, 0, 0, 1])[:3], first, atol=1e-3)
    np.testing.assert_allclose((img.affine @ [0, 0, n - 1, 1])[:3], last, atol=1e-3)
    src = pydicom.dcmread(sample_file("MR_small.dcm")).pixel_array
    np.testing.assert_array_equal(img.array[..., 0], src.T)  # end slices are the files' own pixels
    np.testing.assert_array_equal(img.array[..., -1], np.roll(src, 3 * 19, axis=1).T)
    res, out = _cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", model_dirs[3], "--uneven", "resample")
    assert res.exit_code == 0, out
    from medlatent.latentfile import read_latent

    rec = read_latent(tmp_path / "lat" / "gappy" / "series.latent.safetensors").preprocessing
    aff = np.array(rec.original_affine)
    assert rec.original_shape[-1] == 21
    np.testing.assert_allclose((aff @ [0, 0, 20, 1])[:3], last, atol=1e-3)
