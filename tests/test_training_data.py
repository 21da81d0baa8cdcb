"""Training data on real public images: sources, crops/patches/slices, determinism, sampler sharding, loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from io_fixtures import copy_to, make_series, nibabel_data, sample_file
from medlatent.io.image import ImageReadError
from medlatent.io.readers import read_image
from medlatent.preprocessing import preprocess
from medlatent.training.data import (
    DataConfig,
    DataError,
    Entry,
    EpochSampler,
    ImageDataset,
    build_datasets,
    make_loader,
    pick_slice,
    read_source,
)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder tree of real images: a CT slice, an MR slice (2D DICOM) and a T1 volume (NIfTI)."""
    root = tmp_path / "images"
    (root / "ct").mkdir(parents=True)
    (root / "mr").mkdir()
    (root / "vol").mkdir()
    copy_to(root / "ct", sample_file("CT_small.dcm"), "ct.dcm")
    copy_to(root / "mr", sample_file("MR_small.dcm"), "mr.dcm")
    copy_to(root / "vol", nibabel_data("anatomical.nii"), "t1.nii")
    (root / "notes.txt").write_text("not an image")
    return root


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    cols = list(rows[0])
    path.write_text("\n".join([",".join(cols)] + [",".join(r[c] for c in cols) for r in rows]) + "\n")
    return path


def dataset(entries, **kw) -> ImageDataset:
    kw.setdefault("size", 32)
    return ImageDataset([Entry(Path(p), m) for p, m in entries], **kw)


def centre(x: np.ndarray, size: int) -> np.ndarray:
    starts = [(n - size) // 2 for n in x.shape[1:]]
    return x[(slice(None), *(slice(s, s + size) for s in starts))]


# ------------------------------------------------------------------------------------------ sources
def test_folder_source_skips_non_images(images: Path):
    train, val = build_datasets(DataConfig(train=str(images), size=32, val="none"), downsample=4)
    assert val is None
    assert sorted(e.path.name for e in train.entries) == ["ct.dcm", "mr.dcm", "t1.nii"]
    for i in range(len(train)):
        item = train[(i, 7)]
        x = item["image"]
        assert item["index"] == i
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_csv_manifest_relative_paths_split_and_modality(images: Path, tmp_path: Path):
    man = write_csv(images / "manifest.csv", [
        {"path": "ct/ct.dcm", "split": "train", "modality": ""},
        {"path": str(images / "mr" / "mr.dcm"), "split": "train", "modality": ""},
        {"path": "vol/t1.nii", "split": "val", "modality": "ct"},
        {"path": "ct/ct.dcm", "split": "test", "modality": ""},
    ])
    train, val = build_datasets(DataConfig(train=str(man), size=16), downsample=4)
    assert [e.path for e in train.entries] == [images / "ct" / "ct.dcm", images / "mr" / "mr.dcm"]
    assert val is not None and not val.train
    assert [(e.path, e.modality) for e in val.entries] == [(images / "vol" / "t1.nii", "ct")]

    # the modality column overrides the file: a T1 volume read "as CT" gets the HU window, not min-max
    t1 = read_image(images / "vol" / "t1.nii")
    as_ct, rec = preprocess(t1, spatial_dims=3, in_channels=1, downsample=1, modality="ct")
    assert rec.intensity["kind"] == "ct_window"
    vol3d = ImageDataset(val.entries, spatial_dims=3, size=16, train=False)
    np.testing.assert_array_equal(vol3d[0]["image"].numpy(), centre(as_ct, 16))

    # an explicit val source without a split column: all its rows
    other = write_csv(tmp_path / "val.csv", [{"path": str(images / "ct" / "ct.dcm")}])
    _, val2 = build_datasets(DataConfig(train=str(man), val=str(other), size=16), downsample=4)
    assert [e.path for e in val2.entries] == [images / "ct" / "ct.dcm"]


def test_csv_manifest_errors_name_csv_line_and_file(images: Path):
    missing = write_csv(images / "missing.csv", [{"path": "ct/ct.dcm"}, {"path": "nope/gone.dcm"}])
    with pytest.raises(DataError, match=r"missing\.csv, line 3: file .*gone\.dcm does not exist"):
        read_source(missing)
    nocol = write_csv(images / "nocol.csv", [{"file": "ct/ct.dcm"}])
    with pytest.raises(DataError, match=r"nocol\.csv: the manifest needs a 'path' column"):
        read_source(nocol)
    badsplit = write_csv(images / "badsplit.csv", [{"path": "ct/ct.dcm", "split": "training"}])
    with pytest.raises(DataError, match=r"badsplit\.csv, line 2: split must be one of"):
        read_source(badsplit, split="train")
    badmod = write_csv(images / "badmod.csv", [{"path": "ct/ct.dcm", "modality": "pet"}])
    with pytest.raises(DataError, match=r"badmod\.csv, line 2: modality"):
        read_source(badmod)
    onlyval = write_csv(images / "onlyval.csv", [{"path": "ct/ct.dcm", "split": "val"}])
    with pytest.raises(DataError, match=r"onlyval\.csv: no rows with split 'train'"):
        build_datasets(DataConfig(train=str(onlyval), size=16), downsample=4)
    with pytest.raises(DataError, match="no such file or folder"):
        read_source(images / "absent")


def test_config_validation():
    with pytest.raises(DataError, match="mode must be one of"):
        DataConfig(train="x", mode="crop")
    with pytest.raises(DataError, match="3D training always uses random cubic patches"):
        DataConfig(train="x", spatial_dims=3, mode="resize")
    with pytest.raises(DataError, match="modality"):
        DataConfig(train="x", modality="pet")
    with pytest.raises(DataError, match="mri_percentiles"):
        DataConfig(train="x", mri_percentiles=(99.0, 1.0))
    with pytest.raises(DataError, match="did you mean 'size'"):
        DataConfig.from_dict({"train": "x", "sise": 64})
    assert DataConfig.from_dict({"train": "x", "mri_percentiles": [0.5, 99.5]}).mri_percentiles == (0.5, 99.5)
    with pytest.raises(DataError, match="multiple of the model's reduction"):
        build_datasets(DataConfig(train="x", size=36), downsample=8)
    with pytest.raises(DataError, match="data.train is not set"):
        build_datasets(DataConfig(train=""), downsample=8)


# ------------------------------------------------------------------------------------------ samples
def test_samples_are_a_function_of_index_and_seed():
    ct = sample_file("CT_small.dcm")  # 128×128: a 32-crop has many positions
    ds = dataset([(ct, "auto")])
    a, b, c = ds[(0, 11)]["image"], ds[(0, 11)]["image"], ds[(0, 12)]["image"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(ds[0]["image"], ds[(0, 0)]["image"])  # an int key uses item seed 0
    # the same key from a fresh dataset (another worker, a resumed run) gives the same sample
    assert torch.equal(dataset([(ct, "auto")], cache=False)[(0, 11)]["image"], a)


def test_validation_is_a_deterministic_centre_crop():
    ct = sample_file("CT_small.dcm")
    val = dataset([(ct, "auto")], train=False)
    x = val[(0, 1)]["image"]
    assert torch.equal(x, val[(0, 2)]["image"]) and torch.equal(x, val[0]["image"])
    full, _ = preprocess(read_image(ct), spatial_dims=2, in_channels=1, downsample=1)
    np.testing.assert_array_equal(x.numpy(), centre(full, 32))


def test_2d_modes_channels_and_padding():
    us = sample_file("US1_UNCR.dcm")  # RGB 480×640
    mr = sample_file("MR_small.dcm")  # 64×64
    for mode in ("random_crop", "resize", "random_resized_crop"):
        ds = dataset([(us, "auto"), (mr, "auto")], mode=mode)
        for i in range(2):
            x = ds[(i, 3)]["image"]
            assert x.shape == (1, 32, 32)
            assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    # whole-image resize equals resizing the preprocessed image (no randomness but flips)
    full, _ = preprocess(read_image(mr), spatial_dims=2, in_channels=1, downsample=1)
    noflip = dataset([(mr, "auto")], mode="resize", flips=False)
    ref = torch.nn.functional.interpolate(torch.from_numpy(full)[None], size=(32, 32), mode="bilinear",
                                          antialias=True)[0].clamp(-1, 1)
    assert torch.allclose(noflip[(0, 5)]["image"], ref)
    # gray input to an RGB model is repeated; a small image is padded with -1 around its centre
    rgb = dataset([(mr, "auto")], in_channels=3, size=96, train=False)[0]["image"]
    assert rgb.shape == (3, 96, 96) and torch.equal(rgb[0], rgb[2])
    assert torch.all(rgb[:, :16] == -1) and torch.all(rgb[:, -16:] == -1)
    np.testing.assert_array_equal(rgb[0, 16:80, 16:80].numpy(), full[0])


def test_3d_patches_are_padded_with_minus_one(tmp_path: Path):
    series = make_series(tmp_path / "ct_series", n=6)  # a real CT slice stacked into 128×128×6
    items = read_source(tmp_path)
    assert len(items) == 1 and items[0].files is not None  # discovered as one DICOM series
    ds = ImageDataset(items, spatial_dims=3, size=16)
    for seed in range(3):
        x = ds[(0, seed)]["image"]
        assert x.shape == (1, 16, 16, 16)
        assert torch.all(x[..., :5] == -1) and torch.all(x[..., 11:] == -1)  # 6 slices centred in 16
    val = ImageDataset(items, spatial_dims=3, size=16, train=False)
    vol, rec = preprocess(read_image(series), spatial_dims=3, in_channels=1, downsample=1)
    assert rec.intensity["kind"] == "ct_window" and vol.shape[-1] == 6
    expect = np.full((1, 16, 16, 16), -1.0, np.float32)
    expect[..., 5:11] = vol[:, 56:72, 56:72, :]  # centre of 128×128, slices padded 5 | 6 | 5
    np.testing.assert_array_equal(val[0]["image"].numpy(), expect)
    with pytest.raises(DataError, match=r"ct\.dcm: a 2D image .* in a 3D training set"):
        ImageDataset([Entry(copy_to(tmp_path, sample_file("CT_small.dcm"), "ct.dcm"))], spatial_dims=3, size=16)[0]


def test_slices_from_volumes_keep_the_volume_intensity_map(tmp_path: Path):
    series = make_series(tmp_path / "ct_series", n=6)
    # validation: the middle axial slice, normalised with the CT window of the volume (HU > 1000 clip to 1)
    val = ImageDataset(read_source(series), size=32, train=False)
    vol, _ = preprocess(read_image(series), spatial_dims=3, in_channels=1, downsample=1)
    np.testing.assert_array_equal(val[0]["image"].numpy(), centre(vol[..., 3], 32))
    slice_minmax, _ = preprocess(read_image(sample_file("CT_small.dcm")), spatial_dims=2, in_channels=1,
                                 downsample=1)
    assert not np.allclose(val[0]["image"].numpy(), centre(slice_minmax, 32))  # not a per-slice min-max

    # training: random slices along all three axes of a T1 volume (33×41×25), each 1×16×16 in [-1, 1]
    t1 = nibabel_data("anatomical.nii")
    ds = dataset([(t1, "auto")], size=16)
    for seed in range(12):
        x = ds[(0, seed)]["image"]
        assert x.shape == (1, 16, 16) and -1 <= float(x.min()) and float(x.max()) <= 1
        assert float(x.std()) > 0  # not a background slice
    full, _ = preprocess(read_image(t1), spatial_dims=3, in_channels=1, downsample=1)
    assert full.min() == -1.0 and full.max() == 1.0  # min-max of the whole volume
    shapes = set()
    for seed in range(12):
        shapes.add(pick_slice(full, np.random.default_rng(seed)).shape)
    assert len(shapes) == 3

    with pytest.raises(DataError, match=r"anatomical\.nii: a 3D volume .* slices_from_volumes"):
        dataset([(t1, "auto")], slices_from_volumes=False)[0]


def test_unreadable_file_is_an_error_naming_it(tmp_path: Path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    man = write_csv(tmp_path / "m.csv", [{"path": "broken.png"}])
    train, _ = build_datasets(DataConfig(train=str(man), size=16), downsample=4)
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        train[(0, 1)]


# ------------------------------------------------------------------------------------------ sampler
def test_sampler_shards_are_disjoint_and_cover_the_global_batches():
    n, b, w = 23, 3, 2
    one = EpochSampler(n, b * w, seed=5)
    ranks = [EpochSampler(n, b, seed=5, rank=r, world_size=w) for r in range(w)]
    for s in [one, *ranks]:
        s.set_epoch(4)
    stream = list(one)
    shards = [list(s) for s in ranks]
    assert one.batches_per_epoch == ranks[0].batches_per_epoch == n // (b * w)
    assert all(len(sh) == len(s) == 3 * b for sh, s in zip(shards, ranks))
    for k in range(ranks[0].batches_per_epoch):
        gb = stream[k * b * w:(k + 1) * b * w]
        parts = [sh[k * b:(k + 1) * b] for sh in shards]
        assert sorted(parts[0] + parts[1]) == sorted(gb)  # each global batch split between the ranks
        assert not set(parts[0]) & set(parts[1])
        assert all(parts[r] == gb[r::w] for r in range(w))  # strided: rank r takes positions r, r+w, …
    idx = [i for i, _ in stream]
    assert len(set(idx)) == len(idx)  # one permutation: no repeats within an epoch
    # the global stream does not depend on the layout (world size, batch size)
    assert stream == EpochSampler(n, 2, seed=5).global_keys(4)[:len(stream)]


def test_sampler_is_deterministic_and_resumes_mid_epoch():
    s = EpochSampler(50, 4, seed=1, rank=1, world_size=2)
    s.set_epoch(2)
    full = list(s)
    again = EpochSampler(50, 4, seed=1, rank=1, world_size=2)
    again.set_epoch(2)
    assert list(again) == full
    again.set_epoch(3)
    assert list(again) != full
    s.set_epoch(2, start_batch=2)
    assert len(s) == len(full) - 2 * 4
    assert list(s) == full[2 * 4:]
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(2, start_batch=s.batches_per_epoch + 1)


def test_sampler_fills_small_datasets():
    s = EpochSampler(3, 4, seed=0, rank=0, world_size=2)
    keys = list(s)
    assert s.batches_per_epoch == 1 and len(keys) == 4
    idx = [i for i, _ in s.global_keys()]
    assert len(idx) == 8 and set(idx) == {0, 1, 2}
    assert sorted(idx[:3]) == [0, 1, 2] and sorted(idx[3:6]) == [0, 1, 2]  # whole permutations, repeated
    assert len({seed for _, seed in s.global_keys()}) == 8  # repeated images still get their own crops
    keep = EpochSampler(10, 4, seed=0, drop_last=False)
    assert keep.batches_per_epoch == 3 and len(list(keep)) == 12
    assert {i for i, _ in keep} == set(range(10))


def test_loader_batches_do_not_depend_on_workers(images: Path):
    train, _ = build_datasets(DataConfig(train=str(images), size=16, val="none"), downsample=4)
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(len(train), 2, seed=3, drop_last=False)  # 3 images → 2 batches
        sampler.set_epoch(1)
        batches[workers] = list(make_loader(train, sampler, 2, workers))
    assert len(batches[0]) == len(batches[2]) == 2
    for a, b in zip(batches[0], batches[2]):
        assert a["image"].shape == (2, 1, 16, 16)
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(train, EpochSampler(len(train), 2, seed=3), 4, 0)


def test_invert_augmentation_negates_the_sample(images: Path):
    entries = [(images / "ct" / "ct.dcm", "auto")]
    plain, inverted = dataset(entries), dataset(entries, invert=1.0)
    torch.testing.assert_close(inverted[(0, 3)]["image"], -plain[(0, 3)]["image"])
    val = dataset(entries, invert=1.0, train=False)
    torch.testing.assert_close(val[0]["image"], dataset(entries, train=False)[0]["image"])  # validation: never


def test_random_resized_crop_side_range():
    mr = sample_file("MR_small.dcm")  # 64×64: a full-side crop is the whole image
    whole = dataset([(mr, "auto")], mode="resize", flips=False)[(0, 1)]["image"]
    full_side = dataset([(mr, "auto")], mode="random_resized_crop", crop_side=(1.0, 1.0), flips=False)
    assert torch.allclose(full_side[(0, 1)]["image"], whole)
    # a native-size crop (side = size / short side) is a plain crop of the preprocessed image: no resampling
    native = dataset([(mr, "auto")], mode="random_resized_crop", crop_side=(0.5, 0.5), flips=False)[(0, 4)]["image"]
    full, _ = preprocess(read_image(mr), spatial_dims=2, in_channels=1, downsample=1)
    windows = torch.from_numpy(full[0]).unfold(0, 32, 1).unfold(1, 32, 1)
    assert any(torch.allclose(native[0], windows[i, j], atol=1e-6) for i in range(33) for j in range(33))
    for bad in ((0.0, 1.0), (0.8, 0.5), (0.5, 1.5), "wide"):
        with pytest.raises(DataError, match="crop_side"):
            DataConfig(train="x", crop_side=bad)
