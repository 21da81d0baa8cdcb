"""CAD evaluation (paper §4.1–4.2): classifiers, the CAD harness, the fine-feature task, efficiency, CLI.

Everything runs on real public images (pydicom's CT_small/MR_small, nibabel's anatomical.nii), tiny random
MedVAE models and the ``tiny`` classifier, in seconds.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import randomise, tiny_config
from io_fixtures import nibabel_data, sample_file, write_task_image
from medlatent import MedVAE
from medlatent.evaluation.cad import (
    CADConfig,
    CADDataError,
    InputBuilder,
    Method,
    auroc,
    default_methods,
    read_cad_csv,
    resize,
    run_cad,
    write_cad_table,
)
from medlatent.evaluation.classifiers import TinyCNN, build_classifier
from medlatent.evaluation.cli_cad import register
from medlatent.evaluation.efficiency import compare_efficiency, max_batch_size, measure_latency, write_efficiency
from medlatent.evaluation.finefeature import (
    FineFeatureSpec,
    crop,
    finding_map,
    insert_finding,
    make_finefeature_dataset,
    source_planes,
    unit,
)
from medlatent.io.image import ImageData, spacing_affine
from medlatent.io.readers import read_image
from medlatent.io.writers import write_image

pytest.importorskip("torchmetrics")

FAST = dict(classifier="tiny", epochs=4, batch_size=16, lr=1e-2)


def tiny_model(dims: int, seed: int = 0) -> MedVAE:
    return randomise(MedVAE(tiny_config(dims)), seed).eval()


# ------------------------------------------------------------------------------------------ task builders
def _halves(patch: np.ndarray, bright: bool) -> np.ndarray:
    """A real patch in [0, 1] whose last-axis upper half is set to white (label 1) or black (label 0):
    separable after per-image min–max normalisation."""
    p = unit(patch)
    p[..., p.shape[-1] // 2:] = 1.0 if bright else 0.0
    return p


def separable_task(folder: Path, dims: int, n: int = 120, size: int = 16, shuffle: bool = False,
                   patient: bool = False) -> Path:
    """``n`` real patches (CT_small/MR_small in 2D, anatomical.nii in 3D); label 1 = bright half.

    Splits: half train, a tenth val, the rest test. ``shuffle`` permutes the labels within each split, so they
    are independent of the images.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if dims == 2:
        planes = source_planes(sample_file("CT_small.dcm"), 2) + source_planes(sample_file("MR_small.dcm"), 2)
    else:
        planes = source_planes(nibabel_data("anatomical.nii"), 3)
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * (n // 2))
    n_train, n_val = n // 2, n // 10
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
    shown = labels.copy()
    if shuffle:
        for lo, hi in ((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)):
            shown[lo:hi] = rng.permutation(shown[lo:hi])
    rows = []
    for i in range(n):
        plane = planes[i % len(planes)]
        start = [int(rng.integers(0, s - size + 1)) for s in plane.shape]
        p = _halves(crop(plane, start, size), bool(labels[i]))
        name = write_task_image(folder, f"img{i:03d}" if dims == 2 else f"vol{i:03d}", p, dims)
        rows.append([name, int(shown[i]), splits[i]] + ([f"p{i}"] if patient else []))
    csv_path = folder / "task.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"] + (["patient"] if patient else []))
        w.writerows(rows)
    return csv_path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


# ------------------------------------------------------------------------------------------ classifiers
@pytest.mark.parametrize("dims", [2, 3])
def test_tiny_classifier_shapes(dims):
    net = build_classifier("tiny", dims, 2, 3).eval()
    assert isinstance(net, TinyCNN)
    assert net(torch.randn((4, 2) + (8,) * dims)).shape == (4, 3)


def test_classifier_errors_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="tiny"):
        build_classifier("tinny", 2, 1, 1)
    with pytest.raises(ValueError, match="seresnet152"):
        build_classifier("hrnet_w64", 3, 1, 1)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ImportError, match=r"needs timm.*pip install 'medlatent\[pretrained\]'"):
        build_classifier("hrnet_w64", 2, 1, 1)


def test_pad_to_multiple_replicates_edges_up_to_the_stride():
    from medlatent.evaluation.classifiers import PadToMultiple

    net = PadToMultiple(torch.nn.Identity(), 32)  # returns what the wrapped network receives
    x = torch.arange(20 * 13, dtype=torch.float32).reshape(1, 1, 20, 13)
    y = net(x)
    assert y.shape == (1, 1, 32, 32) and torch.equal(y[..., :20, :13], x)
    assert torch.equal(y[..., 31, :13], x[..., 19, :]) and torch.equal(y[..., :20, 31], x[..., :, 12])
    assert net(torch.zeros(1, 1, 64, 32)).shape == (1, 1, 64, 32)  # already a multiple: untouched


def test_hrnet_w64_takes_small_latents_through_the_harness(tmp_path):
    """timm's HRNet-w64 (the paper's 2D classifier) on 8² inputs (16² patches at f=16); skipped without timm."""
    pytest.importorskip("timm")
    csv_path = separable_task(tmp_path / "data", 2, n=24, size=16)
    cfg = CADConfig(size=16, classifier="hrnet_w64", epochs=1, batch_size=8, lr=1e-3, seeds=(0,))
    res = run_cad(csv_path, default_methods(tiny_model(2), kinds=("image", "interp")), config=cfg,
                  cache_dir=tmp_path / "cache")
    assert [r.input_shape for r in res.rows] == [[1, 16, 16], [1, 8, 8]]
    assert all(0.0 <= a <= 1.0 for r in res.rows for a in r.aurocs)


def test_seresnet152_is_monais():
    pytest.importorskip("monai")
    from monai.networks.nets import SEResNet152

    net = build_classifier("seresnet152", 3, 1, 1)
    assert isinstance(net, SEResNet152)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, 1)


# ------------------------------------------------------------------------------------------ metric, resize, CSV
def _pairwise_auroc(scores: list[float], positive: list[bool]) -> float:
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def test_auroc_binary_and_macro_one_vs_rest():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), 2) == pytest.approx(0.75)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.3, 0.6, 0.1],
                           [0.1, 0.8, 0.1], [0.4, 0.2, 0.4], [0.5, 0.1, 0.4]])
    # one-vs-rest by hand: class 0: (4 + 1)/8, class 1: 8/8, class 2: (3 + 3)/8
    per_class = [_pairwise_auroc(scores[:, k].tolist(), (labels == k).tolist()) for k in range(3)]
    assert per_class == pytest.approx([0.625, 1.0, 0.75])
    assert auroc(scores, labels, 3) == pytest.approx(sum(per_class) / 3)


def test_resize_3d_is_separable_and_exact_on_constants():
    x = torch.randn(1, 4, 5, 6)
    up = resize(x, (8, 10, 12), "bilinear")  # upsampling: antialiasing is inactive, = trilinear
    ref = torch.nn.functional.interpolate(x[None], size=(8, 10, 12), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(up, ref, atol=1e-5, rtol=1e-5)
    const = torch.full((1, 16, 16, 16), 0.3)
    torch.testing.assert_close(resize(const, (4, 4, 4), "bicubic"), torch.full((1, 4, 4, 4), 0.3))


def test_csv_labels_and_errors_name_the_row(tmp_path):
    img = tmp_path / "a.png"
    write_image(ImageData(np.arange(64, dtype=np.uint8).reshape(1, 8, 8), spacing_affine((1.0, 1.0))), img, "png")
    rows = ["a.png,10,train", "a.png,2,train", "a.png,9,train", "a.png,10,test", "a.png,2,test", "a.png,9,test"]
    task = read_cad_csv(write_csv(tmp_path / "ok.csv", "path,label,split", rows))
    assert task.class_names == ["2", "9", "10"] and [e.label for e in task.entries] == [2, 0, 1, 2, 0, 1]
    names = read_cad_csv(write_csv(tmp_path / "s.csv", "path,label,split",
                                   ["a.png,normal,train", "a.png,benign,train", "a.png,normal,test",
                                    "a.png,benign,test"]))
    assert names.class_names == ["benign", "normal"]
    with pytest.raises(CADDataError, match=r"line 3: file .*missing\.png does not exist"):
        read_cad_csv(write_csv(tmp_path / "m.csv", "path,label,split", ["a.png,0,train", "missing.png,1,train"]))
    with pytest.raises(CADDataError, match=r"line 2: split must be one of"):
        read_cad_csv(write_csv(tmp_path / "b.csv", "path,label,split", ["a.png,0,training"]))
    with pytest.raises(CADDataError, match="missing column"):
        read_cad_csv(write_csv(tmp_path / "c.csv", "path,split", ["a.png,train"]))
    with pytest.raises(CADDataError, match=r"'test' has no rows of class"):
        read_cad_csv(write_csv(tmp_path / "d.csv", "path,label,split", ["a.png,0,train", "a.png,1,train",
                                                                        "a.png,0,test"]))


def test_patient_in_two_splits_is_an_error(tmp_path):
    img = tmp_path / "a.png"
    write_image(ImageData(np.arange(64, dtype=np.uint8).reshape(1, 8, 8), spacing_affine((1.0, 1.0))), img, "png")
    rows = ["a.png,0,train,P1", "a.png,1,train,P2", "a.png,0,test,P3", "a.png,1,test,P1"]
    with pytest.raises(CADDataError, match=r"patient 'P1' appears in split 'train' \(line 2\) and split 'test' "
                                           r"\(line 5\)"):
        read_cad_csv(write_csv(tmp_path / "leak.csv", "path,label,split,patient", rows))


def test_interpolation_rows_at_extra_factors():
    rows = default_methods(None, kinds=("image", "interp"), interp_f=(16, 64))
    assert [(m.kind, m.downsample, m.label) for m in rows] == [
        ("image", 1, "High-Resolution"), ("interp", 4, "Bicubic (f=16)"), ("interp", 8, "Bicubic (f=64)")]
    # a model's own reduction is not repeated (the tiny 2D model reduces ÷2: f=4)
    with_model = default_methods(tiny_model(2), interp_f=(4, 16))
    assert [m.downsample for m in with_model if m.kind == "interp"] == [2, 4]
    assert [m.downsample for m in default_methods(None, kinds=("interp",), interp_f=(512,), spatial_dims=3)] == [8]
    with pytest.raises(ValueError, match="f=20"):
        default_methods(None, kinds=("interp",), interp_f=(20,))


# ------------------------------------------------------------------------------------------ the harness
@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
def test_cad_end_to_end_separable(tmp_path, dims):
    n, size = (120, 16) if dims == 2 else (80, 8)
    csv_path = separable_task(tmp_path / "data", dims, n=n, size=size, patient=True)
    model = tiny_model(dims)
    methods = default_methods(model)
    assert [m.kind for m in methods] == ["image", "latent", "interp"]
    res = run_cad(csv_path, methods, config=CADConfig(size=size, **FAST), cache_dir=tmp_path / "cache")
    image, latent, interp = res.rows
    assert image.mean >= 0.95 and len(image.runs) == 3
    assert (image.f, latent.f, interp.f) == (1, 2**dims, 2**dims) and latent.C == 2
    # latents averaged over their C=2 channels (App. B.1): one input channel, in 2D and 3D
    assert latent.input_shape == [1] + [size // 2] * dims and latent.latent_channels == "mean"
    assert interp.input_shape == [1] + [size // 2] * dims
    assert all(0.0 <= a <= 1.0 for r in res.rows for a in r.aurocs)
    paths = write_cad_table(res, tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "| Method | f | C | input ch | task |" in md and "High-Resolution" in md
    lines = list(csv.DictReader(open(paths["csv"])))
    assert [r["kind"] for r in lines] == ["image", "latent", "interp"]
    assert len(lines[0]["auroc_per_seed"].split(";")) == 3
    assert json.loads(paths["json"].read_text())[0]["rows"][0]["auroc_mean"] == pytest.approx(image.mean)


def test_cad_shuffled_labels_are_near_chance(tmp_path):
    csv_path = separable_task(tmp_path / "data", 2, n=120, shuffle=True)
    res = run_cad(csv_path, [Method("High-Resolution", "image")], config=CADConfig(size=16, **FAST))
    assert abs(res.rows[0].mean - 0.5) <= 0.25


def test_latents_are_cached_between_runs(tmp_path):
    csv_path = separable_task(tmp_path / "data", 2, n=20)
    model = tiny_model(2)
    calls = []
    encode = model.encode
    model.encode = lambda x, **kw: calls.append(x.shape[0]) or encode(x, **kw)
    cfg = CADConfig(size=16, classifier="tiny", epochs=1, seeds=(0,))
    first = run_cad(csv_path, default_methods(model, kinds=("latent",)), config=cfg, cache_dir=tmp_path / "cache")
    assert sum(calls) == 20
    second = run_cad(csv_path, default_methods(model, kinds=("latent",)), config=cfg, cache_dir=tmp_path / "cache")
    assert sum(calls) == 20  # nothing encoded again
    assert first.rows[0].aurocs == second.rows[0].aurocs
    # the cached latent is what the model gives: stage-2 features, channel mean (stored as float16)
    task = read_cad_csv(csv_path)
    builder = InputBuilder(task, 2, cfg, tmp_path / "cache")
    cached = builder.build(default_methods(model, kinds=("latent",))[0])
    with torch.no_grad():
        z = encode(builder.image(task.entries[0])[None]).mean
        want = model.stage2_features(z).mean(dim=1)
    torch.testing.assert_close(cached[0], want, atol=2e-3, rtol=2e-3)
    # other weights: other cache entries
    other = tiny_model(2, seed=1)
    other_calls = []
    enc2 = other.encode
    other.encode = lambda x, **kw: other_calls.append(1) or enc2(x, **kw)
    run_cad(csv_path, default_methods(other, kinds=("latent",)), config=cfg, cache_dir=tmp_path / "cache")
    assert len(other_calls) == 20


def test_multiclass_task_reports_macro_auroc(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    planes = source_planes(sample_file("CT_small.dcm"), 2)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        k = i % 3  # class = which third of the patch is white
        p = unit(crop(planes[0], [int(rng.integers(0, 112)), int(rng.integers(0, 112))], 16))
        p[:, :] = np.minimum(p, 0.5)
        p[:, 5 * k:5 * k + 5] = 1.0
        write_task_image(folder, str(i), p, 2)
        rows.append(f"{i}.png,{['a', 'b', 'c'][k]},{'train' if i < 36 else 'test'}")
    csv_path = write_csv(folder / "three.csv", "path,label,split", rows)
    cfg = CADConfig(size=16, seeds=(0,), **{**FAST, "epochs": 6})
    res = run_cad(csv_path, [Method("High-Resolution", "image")], config=cfg)
    assert res.metric.startswith("macro AUROC") and res.class_names == ["a", "b", "c"]
    assert res.rows[0].mean >= 0.9


# ------------------------------------------------------------------------------------------ fine features
def _sources2d():
    return [sample_file("CT_small.dcm"), sample_file("MR_small.dcm")]


def test_finefeature_is_deterministic(tmp_path):
    spec = FineFeatureSpec(patch_size=24, n_patches=10, contrast=0.2, size=2.0, seed=3)
    a = make_finefeature_dataset(_sources2d(), tmp_path / "a", spec)
    b = make_finefeature_dataset(_sources2d(), tmp_path / "b", spec)
    c = make_finefeature_dataset(_sources2d(), tmp_path / "c", FineFeatureSpec(patch_size=24, n_patches=10,
                                                                                contrast=0.2, size=2.0, seed=4))
    assert a.csv_path.read_text() == b.csv_path.read_text()
    assert a.records == b.records
    for r in a.records:
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()
    assert a.records != c.records


@pytest.mark.parametrize("finding", ["calcification", "nodule"])
def test_finefeature_findings_where_recorded(tmp_path, finding):
    spec = FineFeatureSpec(patch_size=32, n_patches=12, finding=finding, contrast=0.15, size=2.0,
                           cluster_count=4, seed=0)
    ds = make_finefeature_dataset(_sources2d(), tmp_path, spec)
    labels = [r["label"] for r in ds.records]
    assert labels.count(1) == labels.count(0) == 6
    for split in ("train", "test"):
        assert {r["label"] for r in ds.records if r["split"] == split} == {0, 1}
    planes = {str(p): source_planes(p, 2) for p in _sources2d()}
    q = 1.0 / 65535  # 16-bit PNG quantisation
    for r in ds.records:
        clean = unit(crop(planes[r["source"]][r["plane"]], r["start"], 32))
        written = read_image(tmp_path / r["path"]).array[0].astype(np.float64) / 65535
        diff = written - clean
        if r["label"] == 0:
            assert not r["findings"] and np.abs(diff).max() <= q
            continue
        (f,) = r["findings"]
        assert f["kind"] == finding
        added = finding_map(clean.shape, f)
        np.testing.assert_allclose(diff, added, atol=q)  # exactly the recorded finding, nowhere else
        assert added.max() == pytest.approx(0.15) and diff.max() <= 0.15 + q
        assert written.min() == 0.0 and written.max() == 1.0  # min–max normalisation unchanged by the finding
        if finding == "calcification":
            assert len(f["pixels"]) == 4 and np.count_nonzero(added) == 4
            assert all(np.hypot(*np.subtract(p, f["center"])) <= 2.0 for p in f["pixels"])


def test_insert_finding_3d_and_headroom():
    rng = np.random.default_rng(0)
    spec = FineFeatureSpec(spatial_dims=3, patch_size=12, n_patches=6, finding="nodule", contrast=0.3, size=1.0)
    patch = np.full((12, 12, 12), 0.5)
    out, rec = insert_finding(patch, rng, spec)
    assert out.shape == patch.shape and out.max() == pytest.approx(0.8)
    assert tuple(np.unravel_index(np.argmax(out), out.shape)) == tuple(rec["center"])
    assert insert_finding(np.ones((12, 12, 12)), rng, spec) is None  # no headroom anywhere: no finding


def test_finefeature_3d_volumes(tmp_path):
    spec = FineFeatureSpec(spatial_dims=3, patch_size=12, n_patches=6, finding="mixed", contrast=0.2, size=1.0,
                           cluster_count=3)
    ds = make_finefeature_dataset(nibabel_data("anatomical.nii"), tmp_path, spec)
    r = next(r for r in ds.records if r["label"] == 1)
    vol = read_image(tmp_path / r["path"]).array
    assert vol.shape == (12, 12, 12) and r["path"].endswith(".nii.gz")
    task = read_cad_csv(ds.csv_path)
    assert len(task.entries) == 6 and task.class_names == ["0", "1"]


# ------------------------------------------------------------------------------------------ efficiency
class _OOMAbove(torch.nn.Module):
    """Fails like a full GPU for batches larger than ``limit``; records every batch size it is called with."""

    def __init__(self, limit: int, error: type[Exception] = torch.OutOfMemoryError) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.limit, self.error, self.calls = limit, error, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.lin(x)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_max_batch_search_stops_at_first_failure(error):
    model = _OOMAbove(8, error)
    res = max_batch_size(model, (4,), limit=1 << 20, max_memory_gb=100)
    assert res.max_batch_size == 8
    assert model.calls == [1, 2, 4, 8, 16]  # nothing larger is tried after the first failure
    assert [t.ok for t in res.tries] == [True, True, True, True, False] and "out of memory" in res.tries[-1].reason
    assert not res.limit_reached
    ok = _OOMAbove(1 << 30)
    res = max_batch_size(ok, (4,), limit=32, max_memory_gb=100)
    assert res.max_batch_size == 32 and res.limit_reached and ok.calls == [1, 2, 4, 8, 16, 32]


def test_max_batch_search_other_errors_propagate():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        max_batch_size(Broken(), (4,), max_memory_gb=100)


def test_max_batch_search_respects_a_cpu_memory_cap():
    class Hungry(torch.nn.Module):
        """~16 MB of output per sample (kept alive while memory is sampled)."""

        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, x):
            self.calls.append(x.shape[0])
            return torch.ones(x.shape[0], 4 << 20)

    model = Hungry()
    res = max_batch_size(model, (1,), limit=1 << 12, max_memory_gb=0.1)
    assert 1 <= res.max_batch_size <= 4
    assert not res.tries[-1].ok and "GB" in res.tries[-1].reason
    assert max(model.calls) <= 8 and model.calls == sorted(model.calls)


def test_latency_and_comparison_rows(tmp_path):
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(TinyCNN(2, 1, 1), (1, 8, 8), 2, repeats=2)
    lat = measure_latency(TinyCNN(2, 1, 1), (1, 8, 8), 2, repeats=3, warmup=1)
    assert len(lat.times_ms) == 3 and lat.throughput == pytest.approx(2 / (lat.latency_ms / 1000))
    rows = compare_efficiency("tiny", 2, 32, [4, 16], batch_size=2, repeats=3, warmup=1, limit=8)
    assert [r.input for r in rows] == ["image", "latent f=4", "latent f=16"]
    assert [r.shape for r in rows] == [[1, 32, 32], [1, 16, 16], [1, 8, 8]]
    for r in rows:
        assert r.latency_ms > 0 and r.throughput > 0 and r.max_batch_size == 8 and r.max_batch_limit_reached
        assert r.throughput_ratio == pytest.approx(r.throughput / rows[0].throughput)
    assert rows[0].latency_speedup == rows[0].throughput_ratio == rows[0].max_batch_ratio == 1.0
    rows3 = compare_efficiency("tiny", 3, 8, [8], batch_size=1, repeats=3, warmup=0, limit=2)
    assert [r.shape for r in rows3] == [[1, 8, 8, 8], [1, 4, 4, 4]]
    with pytest.raises(ValueError, match="not a 2-th power"):
        compare_efficiency("tiny", 2, 32, [8])
    paths = write_efficiency(rows, tmp_path)
    assert "latent f=16" in paths["markdown"].read_text() and len(list(csv.DictReader(open(paths["csv"])))) == 3


# ------------------------------------------------------------------------------------------ CLI
runner = CliRunner()


@pytest.fixture()
def cli_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_cad_writes_tables(tmp_path, cli_app):
    csv_path = separable_task(tmp_path / "data", 2, n=30)
    tiny_model(2).save_pretrained(tmp_path / "vae")
    out = tmp_path / "out"
    res = runner.invoke(cli_app, ["cad", str(csv_path), "-o", str(out), "-m", str(tmp_path / "vae"),
                                  "--classifier", "tiny", "--size", "16", "--epochs", "1", "--seeds", "0",
                                  "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"cad.md", "cad.csv", "cad.json", "report.md", "cache"}
    assert [r["kind"] for r in csv.DictReader(open(out / "cad.csv"))] == ["image", "latent", "interp"]


def test_cli_cad_bad_csv_names_the_row(tmp_path, cli_app):
    csv_path = separable_task(tmp_path / "data", 2, n=10)
    lines = csv_path.read_text().splitlines()
    lines[3] = "nope.png,1,train"
    csv_path.write_text("\n".join(lines) + "\n")
    res = runner.invoke(cli_app, ["cad", str(csv_path), "-o", str(tmp_path / "out"), "--classifier", "tiny",
                                  "--size", "16", "--epochs", "1", "--seeds", "0"])
    assert res.exit_code != 0 and "line 4" in res.output and "nope.png" in res.output


def test_cli_finefeature_and_efficiency(tmp_path, cli_app):
    tiny_model(2).save_pretrained(tmp_path / "vae")
    out = tmp_path / "ff"
    res = runner.invoke(cli_app, ["finefeature", str(sample_file("CT_small.dcm")), "-o", str(out), "-m",
                                  str(tmp_path / "vae"), "--patch-size", "16", "--n", "12", "--finding", "nodule",
                                  "--finding-size", "1.5", "--classifier", "tiny", "--epochs", "1", "--seeds", "0",
                                  "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert (out / "data" / "finefeature.csv").is_file() and (out / "finefeature.md").is_file()
    assert "Bicubic (f=4)" in (out / "finefeature.md").read_text()
    # 12 patches leave a handful for testing: flagged in the tables and on the console
    assert "## Warnings" in (out / "finefeature.md").read_text() and "warning: " in res.output
    res = runner.invoke(cli_app, ["efficiency", "-o", str(tmp_path / "eff"), "--classifier", "tiny", "--size", "16",
                                  "-f", "4", "--batch-size", "2", "--repeats", "3", "--warmup", "0", "--limit", "4"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "eff" / "efficiency.json").read_text())
    assert [r["input"] for r in data["rows"]] == ["image", "latent f=4"] and data["meta"]["classifier"] == "tiny"
    res = runner.invoke(cli_app, ["efficiency", "-o", str(tmp_path / "eff2"), "--classifier", "tiny", "--size", "16",
                                  "-f", "8"])
    assert res.exit_code != 0 and "f=8" in res.output
