"""Readers on real files: pixel values and geometry checked against pydicom / nibabel / SimpleITK."""

import numpy as np
import pytest

from io_fixtures import make_series, nibabel_data, sample_file
from medlatent.io.image import ImageReadError
from medlatent.io.readers import read_image

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")
PIL = pytest.importorskip("PIL.Image")


def _sitk_ras(img):
    """SimpleITK image → (X×Y×Z array, RAS affine) for comparison."""
    from medlatent.io.readers import itk_to_ras_affine

    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    return arr, itk_to_ras_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection(), 3)


def test_ct_slice_in_hounsfield_units():
    import pydicom
    from pydicom.pixels import apply_modality_lut

    path = sample_file("CT_small.dcm")
    img = read_image(path)
    ds = pydicom.dcmread(path)
    assert img.array.shape == (1, 128, 128) and img.modality == "ct"
    np.testing.assert_array_equal(img.array[0], apply_modality_lut(ds.pixel_array, ds))
    assert img.spacing == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert img.array.min() < -800  # air in HU, not raw stored values


def test_monochrome1_radiograph_is_inverted():
    import pydicom

    path = sample_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = read_image(path)
    raw = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(img.array[0], raw.max() + raw.min() - raw)
    assert img.modality == "xray"


@pytest.mark.parametrize("compressed",
                         ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_dicom_equals_uncompressed(compressed):
    pytest.importorskip("pylibjpeg")
    ref = read_image(sample_file("MR_small.dcm"))
    img = read_image(sample_file(compressed))
    np.testing.assert_array_equal(img.array, ref.array)


def test_rgb_dicom_is_channel_first():
    img = read_image(sample_file("US1_UNCR.dcm"))
    assert img.array.shape == (3, 480, 640)


def test_enhanced_multiframe_ct_geometry_and_rescale():
    import pydicom

    path = sample_file("eCT_Supplemental.dcm")
    img = read_image(path)
    assert img.array.shape == (512, 512, 2)
    assert img.array.min() == -1024  # intercept from the shared functional groups
    ds = pydicom.dcmread(path)
    pos = [np.array([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
           for f in ds.PerFrameFunctionalGroupsSequence]
    # voxel (0,0,k) lands on the frame positions (LPS → RAS)
    for k in range(2):
        world = img.affine @ np.array([0, 0, k, 1.0])
        assert any(np.allclose(world[:3] * [-1, -1, 1], p) for p in pos)
    assert img.spacing == pytest.approx((0.388672, 0.388672, 10.0))


def test_dicom_series_matches_simpleitk(tmp_path):
    folder = make_series(tmp_path / "series", n=6, spacing=2.5, orientation=(0.8, 0.6, 0, -0.6, 0.8, 0))
    img = read_image(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref_arr, ref_aff = _sitk_ras(reader.Execute())
    assert img.array.shape == ref_arr.shape == (128, 128, 6)
    np.testing.assert_allclose(img.array, ref_arr)
    np.testing.assert_allclose(img.affine, ref_aff, atol=1e-4)
    assert img.modality == "ct"


def test_series_with_missing_slice_is_refused_or_resampled(tmp_path):
    folder = make_series(tmp_path / "gap", n=6, spacing=2.0, skip=(3,))
    with pytest.raises(ImageReadError, match=r"gap: uneven slice spacing.*missing slices\?.*--uneven resample"):
        read_image(folder)
    img = read_image(folder, uneven="resample")
    assert img.array.shape[-1] == 6 and img.spacing[2] == pytest.approx(2.0)
    # the interpolated slice lies halfway between its neighbours
    np.testing.assert_allclose(img.array[..., 3], (img.array[..., 2] + img.array[..., 4]) / 2, atol=1e-3)


def test_real_series_problems_are_detected():

    base = sample_file("CT_small.dcm").parent / "dicomdirtests"
    if not base.exists():
        pytest.skip("pydicom dicomdir test files missing")
    with pytest.raises(ImageReadError, match="different orientations"):
        read_image(base / "98892003" / "MR700")  # a localizer series: slices in three planes
    with pytest.raises(ImageReadError, match="uneven slice spacing"):
        read_image(base / "77654033" / "CT2")


def test_nifti_matches_nibabel_and_simpleitk():
    path = nibabel_data("anatomical.nii")
    img = read_image(path)
    ref = nib.load(str(path))
    np.testing.assert_allclose(img.array, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(img.affine, ref.affine)
    s_arr, s_aff = _sitk_ras(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(img.affine, s_aff, atol=1e-3)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_round_geometry(tmp_path, suffix):
    src = nibabel_data("anatomical.nii")
    out = tmp_path / f"vol{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(src)), str(out))
    a, b = read_image(src), read_image(out)
    np.testing.assert_allclose(b.array, a.array)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-3)


@pytest.mark.parametrize("mode, dtype", [("L", np.uint8), ("I;16", np.uint16), ("RGB", np.uint8)])
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_raster_bit_depths(tmp_path, mode, dtype, fmt):
    mr = read_image(sample_file("MR_small.dcm")).array[0].astype(np.float64)
    scaled = (mr - mr.min()) / (mr.max() - mr.min()) * np.iinfo(dtype).max
    arr = np.round(scaled).astype(dtype)
    im = PIL.fromarray(np.stack([arr, arr[::-1], arr.T], -1) if mode == "RGB" else arr)
    path = tmp_path / f"img.{fmt}"
    im.save(path)
    img = read_image(path)
    expect = np.moveaxis(np.array(im), -1, 0) if mode == "RGB" else arr[None]
    np.testing.assert_array_equal(img.array, expect)
    assert img.array.dtype == dtype


def test_rgba_png_drops_alpha(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 200, 10
    PIL.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.array.shape == (3, 8, 8) and img.array[0].max() == 200
