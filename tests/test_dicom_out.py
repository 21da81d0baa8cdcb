"""DICOM out: `medlatent decode --format dicom [--template SOURCE] [--keep-study]` writes a derived series that
pydicom, SimpleITK and medlatent's own reader take back with the source's geometry and the decoded values; no
identifier without a template; no partial series on failure."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.cli import app
from medlatent.io.dicom import read_dicom_series
from medlatent.io.dicom_out import Derivation, DicomWriteError, quantise, write_dicom
from medlatent.io.image import ImageData
from medlatent.io.readers import read_image
from medlatent.latentfile import read_latent
from medlatent.pipeline import decode_latent

pydicom = pytest.importorskip("pydicom")
sitk = pytest.importorskip("SimpleITK")

IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "ReferringPhysicianName", "OtherPatientIDsSequence", "PatientAddress", "StudyID", "StudyDate")
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-48151623", "PatientBirthDate": "19700101",
           "AccessionNumber": "ACC-42", "InstitutionName": "Example General Hospital", "StudyDate": "20240229"}
runner = CliRunner()


def _ct_series(folder, shape=(12, 10, 6), spacing=(0.8, 0.7), gap=2.5, origin=(-10.0, 20.0, 30.0), degrees=10.0):
    """A small CT series (X×Y×Z = columns × rows × slices) written slice by slice with pydicom, rotated in-plane
    so that the LPS/RAS signs matter, int16 with intercept -1024 as scanners store HU."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    a = math.radians(degrees)
    row, col = np.array([math.cos(a), math.sin(a), 0.0]), np.array([-math.sin(a), math.cos(a), 0.0])
    normal = np.cross(row, col)
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    hu = (-800 + 60 * x + 45 * y + 100 * z).astype(np.int16)  # smooth, so a tiny model decodes it recognisably
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for kw, v in PATIENT.items():
            setattr(ds, kw, v)
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array(origin) + k * gap * normal]
        ds.PixelSpacing = [str(spacing[0]), str(spacing[1])]
        ds.SliceThickness = str(gap)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelData = np.ascontiguousarray((hu[:, :, k] + 1024).T).astype(np.int16).tobytes()
        ds.save_as(folder / f"ct{(k * 7) % nz:03d}.dcm", enforce_file_format=True)  # names not in slice order
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for dims in (2, 3):
        out[dims] = root / f"tiny{dims}d"
        randomise(MedVAE(tiny_config(dims)), seed=dims).save_pretrained(out[dims], name=f"tiny{dims}d")
    return out


def _cli(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    return res, (res.stdout or "") + (res.stderr or "")


def _encode(src, out, model_dir):
    res, text = _cli("encode", src, "-o", out, "--model", model_dir)
    assert res.exit_code == 0, text


def _sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _no_identifiers(path):
    ds = pydicom.dcmread(path)
    for kw in IDENTIFIERS:
        assert kw not in ds or not str(ds[kw].value), f"{path.name}: {kw} = {ds[kw].value!r}"
    raw = path.read_bytes()
    for value in PATIENT.values():
        assert value.encode() not in raw, f"{path.name} holds {value!r}"


def test_ct_series_round_trip(tmp_path, models):
    src = _ct_series(tmp_path / "ct")
    _encode(src, tmp_path / "lat", models[3])
    latent = tmp_path / "lat" / "series.latent.safetensors"
    lf = read_latent(latent)
    decoded = decode_latent(MedVAE.from_pretrained(str(models[3])).eval(), lf).array  # float HU, X×Y×Z
    source = read_dicom_series(src)
    source_sitk = _sitk_series(src)

    for variant, extra in (("plain", []), ("template", ["--template", src]),
                           ("kept", ["--template", src, "--keep-study"])):
        out = tmp_path / variant
        res, text = _cli("decode", tmp_path / "lat", "-o", out, "--format", "dicom", "--model", models[3], *extra)
        assert res.exit_code == 0, text
        files = sorted((out / "series").glob("*.dcm"))
        assert len(files) == 6 and not list(out.glob(".tmp-*"))

        back = read_dicom_series(out / "series")  # medlatent's reader: LPS → RAS, sorted along the normal
        assert np.abs(back.affine - source.affine).max() <= 1e-3
        slope = float(pydicom.dcmread(files[0]).RescaleSlope)
        assert slope < 0.05 and np.abs(back.array - decoded).max() <= slope / 2 + 1e-6

        img = _sitk_series(out / "series")  # an independent reader: same geometry as the source
        assert np.allclose(img.GetOrigin(), source_sitk.GetOrigin(), atol=1e-3)
        assert np.allclose(img.GetSpacing(), source_sitk.GetSpacing(), atol=1e-3)
        assert np.allclose(img.GetDirection(), source_sitk.GetDirection(), atol=1e-6)
        values = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))  # z,y,x → X×Y×Z
        assert np.abs(values - decoded).max() <= slope / 2 + 1e-3

        if variant == "plain":  # a complete series is skipped on a re-run, not written again
            res, text = _cli("decode", tmp_path / "lat", "-o", out, "--format", "dicom", "--model", models[3])
            assert res.exit_code == 0 and "0 written, 1 already complete" in text, text
            assert sorted((out / "series").glob("*.dcm")) == files

        first, src_first = pydicom.dcmread(files[0]), pydicom.dcmread(next(src.glob("*.dcm")))
        assert list(first.ImageType) == ["DERIVED", "SECONDARY"] and first.Modality == "CT"
        assert first.RescaleType == "HU" and first.SOPClassUID == src_first.SOPClassUID
        assert "medlatent" in first.DerivationDescription and "tiny3d" in first.DerivationDescription
        assert lf.model["weights_sha256"] in first.DerivationDescription
        assert first.SeriesInstanceUID != src_first.SeriesInstanceUID
        assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == 6
        if variant == "plain":
            for f in files:
                _no_identifiers(f)
            assert first.StudyInstanceUID != src_first.StudyInstanceUID
        else:
            for kw, v in PATIENT.items():
                assert str(first[kw].value) == v
            assert first.FrameOfReferenceUID == src_first.FrameOfReferenceUID
            kept = first.StudyInstanceUID == src_first.StudyInstanceUID
            assert kept == (variant == "kept")


def test_2d_file_with_and_without_template(tmp_path, models):
    from pydicom.data import get_testdata_file

    src = tmp_path / "src"
    src.mkdir()
    ct = src / "CT_small.dcm"
    ct.write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    _encode(src, tmp_path / "lat", models[2])
    decoded = decode_latent(MedVAE.from_pretrained(str(models[2])).eval(),
                            read_latent(tmp_path / "lat" / "CT_small.latent.safetensors")).array[0]
    source = pydicom.dcmread(ct)

    for variant, extra in (("plain", []), ("template", ["--template", src])):
        out = tmp_path / variant
        res, text = _cli("decode", tmp_path / "lat", "-o", out, "--format", "dicom", "--model", models[2], *extra)
        assert res.exit_code == 0, text
        path = out / "CT_small.dcm"
        ds = pydicom.dcmread(path)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert values.shape == (128, 128) and np.abs(values - decoded).max() <= float(ds.RescaleSlope) / 2 + 1e-6
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([float(v) for v in source.PixelSpacing])
        assert read_image(path).spacing == pytest.approx(read_image(ct).spacing)  # medlatent's reader
        img = sitk.ReadImage(str(path))
        assert img.GetSpacing()[:2] == pytest.approx([float(v) for v in source.PixelSpacing])
        assert np.abs(sitk.GetArrayFromImage(img).reshape(128, 128) - decoded).max() <= float(ds.RescaleSlope) / 2 \
            + 1e-3
        if variant == "plain":
            _no_identifiers(path)
            assert "CompressedSamples" not in path.read_bytes().decode("latin-1")
            assert "ImagePositionPatient" not in ds  # a 2D latent records spacing, not a position
        else:
            assert str(ds.PatientName) == str(source.PatientName) and ds.InstitutionName == source.InstitutionName
            assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(
                [float(v) for v in source.ImagePositionPatient], abs=1e-3)
            assert ds.StudyInstanceUID != source.StudyInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_bad_options_and_templates_fail_cleanly(tmp_path, models):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (16, 16)).astype(np.uint8)).save(src / "img.png")
    _encode(src, tmp_path / "lat", models[2])
    out = tmp_path / "out"
    res, text = _cli("decode", tmp_path / "lat", "-o", out, "--format", "dicom", "--keep-study")
    assert res.exit_code == 1 and "--keep-study" in text and "--template" in text and not out.exists()
    res, text = _cli("decode", tmp_path / "lat", "-o", out, "--format", "dicom", "--template", tmp_path / "nope")
    assert res.exit_code == 1 and "nope: no such file or folder" in text and not out.exists()
    res, text = _cli("decode", tmp_path / "lat", "-o", out, "--template", src)
    assert res.exit_code == 1 and "apply to --format dicom" in text
    res, text = _cli("decode", tmp_path / "lat", "-o", out, "--format", "dicom", "--template", src / "img.png",
                     "--model", models[2])
    assert res.exit_code == 1 and "img.png: template is not" in text and "Traceback" not in text
    assert not list(out.glob("*.dcm")) and not list(out.glob(".tmp-*"))

    from pydicom.data import get_testdata_file  # a folder of other sources: never a guess between them

    others = tmp_path / "others"
    others.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (others / name).write_bytes(open(get_testdata_file(name), "rb").read())
    res, text = _cli("decode", tmp_path / "lat", "-o", out, "--format", "dicom", "--template", others,
                     "--model", models[2])
    assert res.exit_code == 1 and "holds no template for 'img'" in text and not list(out.glob("*.dcm"))


def test_no_partial_series_on_failure(tmp_path, monkeypatch):
    import medlatent.io.dicom_out as dicom_out

    vol = np.random.default_rng(1).normal(0, 100, (8, 6, 5))
    img = ImageData(vol, np.diag([-0.5, -0.6, 2.0, 1.0]), modality="ct")
    derivation = Derivation("m", "0" * 64, "test")
    calls = {"n": 0}
    real = dicom_out._set_plane

    def failing(ds, plane, thickness):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(ds, plane, thickness)

    monkeypatch.setattr(dicom_out, "_set_plane", failing)
    with pytest.raises(OSError):
        write_dicom(img, tmp_path / "out" / "vol", derivation)
    assert not (tmp_path / "out" / "vol").exists() and not list((tmp_path / "out").iterdir())
    monkeypatch.setattr(dicom_out, "_set_plane", real)

    write_dicom(img, tmp_path / "out" / "vol", derivation)  # the same call completes; then an overwrite swaps whole
    first = sorted(p.name for p in (tmp_path / "out" / "vol").iterdir())
    write_dicom(img, tmp_path / "out" / "vol", derivation)
    assert sorted(p.name for p in (tmp_path / "out" / "vol").iterdir()) == first and len(first) == 5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vol"]

    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    with pytest.raises(DicomWriteError, match="sheared"):
        write_dicom(ImageData(vol, sheared), tmp_path / "out" / "sheared", derivation)
    assert not (tmp_path / "out" / "sheared").exists()


def test_quantise_keeps_values():
    rng = np.random.default_rng(2)
    floats = rng.normal(-300, 400, (50, 40))
    st = quantise(floats)
    back = st.pixels * float(st.slope) + float(st.intercept)
    assert st.pixels.dtype == np.uint16 and np.abs(back - floats).max() <= float(st.slope) / 2 + 1e-9
    hu = rng.integers(-1024, 3072, (20, 20)).astype(np.float64)
    st = quantise(hu)
    assert st.signed and (st.slope, st.intercept) == ("1", "0") and np.array_equal(st.pixels, hu)
    const = quantise(np.full((4, 4), 7.25))
    assert np.allclose(const.pixels * float(const.slope) + float(const.intercept), 7.25)


def test_left_handed_affine_keeps_every_voxel_in_place(tmp_path):
    """A NIfTI-style LAS volume (slice axis against the DICOM slice normal): readers sort the slices the other way,
    yet every voxel keeps its world position and value."""
    rng = np.random.default_rng(3)
    vol = rng.integers(-1000, 2000, (7, 5, 4)).astype(np.int16)
    aff = np.array([[-0.9, 0.0, 0.0, 40.0], [0.0, 1.1, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1.0]])
    folder = write_dicom(ImageData(vol, aff, modality="ct"), tmp_path / "vol", Derivation("m", "f" * 64, "t"))
    back = read_dicom_series(folder)
    assert back.array.shape == vol.shape
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    theirs = np.rint(np.c_[world - back.affine[:3, 3]] @ np.linalg.inv(back.affine[:3, :3]).T).astype(int)
    assert np.allclose(theirs @ back.affine[:3, :3].T + back.affine[:3, 3], world, atol=1e-3)
    assert np.array_equal(back.array[tuple(theirs.T)], vol[tuple(idx.T)])  # integers that fit: stored exactly
    img = sitk.ReadImage([str(p) for p in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))])
    lps = np.diag([-1.0, -1.0, 1.0]) @ world.T
    cont = [img.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in lps.T[:: 17]]
    sitk_vals = sitk.GetArrayFromImage(img)
    for (x, y, z), i in zip(cont, idx[:: 17]):
        assert max(abs(v - round(v)) for v in (x, y, z)) < 1e-3
        assert sitk_vals[round(z), round(y), round(x)] == vol[tuple(i)]


def test_2d_anisotropic_spacing_and_rgb(tmp_path):
    arr = np.arange(6 * 9, dtype=np.float64).reshape(1, 6, 9) * 3.5 - 40.0  # rows × columns, non-integer
    path = write_dicom(ImageData(arr, np.diag([0.5, 0.7, 1.0]), modality="xray"), tmp_path / "a.dcm",
                       Derivation("m", "e" * 64, "t"))
    back = read_image(path)
    assert back.spacing == pytest.approx((0.5, 0.7)) and back.array.shape == (1, 6, 9)  # (rows, columns)
    assert np.abs(back.array - arr).max() <= float(pydicom.dcmread(path).RescaleSlope) / 2 + 1e-9
    assert sitk.ReadImage(str(path)).GetSpacing()[:2] == pytest.approx((0.7, 0.5))  # SimpleITK: x = columns
    rgb = np.random.default_rng(4).integers(0, 256, (3, 5, 4)).astype(np.uint8)
    path = write_dicom(ImageData(rgb, np.eye(3)), tmp_path / "rgb.dcm", Derivation("m", "e" * 64, "t"))
    assert np.array_equal(read_image(path).array, rgb)
    with pytest.raises(DicomWriteError, match="rgb16.dcm: a colour image is written as 8-bit RGB"):
        write_dicom(ImageData(rgb.astype(np.float32) * 300, np.eye(3)), tmp_path / "rgb16.dcm",
                    Derivation("m", "e" * 64, "t"))
    assert not (tmp_path / "rgb16.dcm").exists()
