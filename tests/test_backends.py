"""CPU deployment backends (medlatent.deploy): the exported graphs run by ONNX Runtime / OpenVINO through the same
tiling engine equal torch fp32, latent files record backend and precision, bf16 is refused on CPUs without native
bf16, and the graphs are exported once per weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import medlatent.export
from conftest import randomise, run_cli, tiny_config
from medlatent.deploy import PrecisionError, backend, check_precision, cpu, for_backend
from medlatent.engine.tiled import TiledAutoencoder, TileSettings
from medlatent.latentfile import read_latent, write_latent
from medlatent.model.autoencoder import MedVAE

TOL = 1e-4  # fp32: the graphs and torch differ by float rounding only
GRAPH_BACKENDS = ["onnxruntime", "openvino"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Each test its own graph cache, and no compiled graphs carried over from another test."""
    monkeypatch.setenv("MEDLATENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backend, "_RUNNERS", {})


def _need(name: str) -> None:
    pytest.importorskip(name)
    pytest.importorskip("onnx")


@pytest.mark.parametrize("name", GRAPH_BACKENDS)
@pytest.mark.parametrize("dims", [2, 3])
def test_engine_with_graphs_equals_torch(name, dims):
    _need(name)
    net = randomise(MedVAE(tiny_config(dims)), seed=dims).eval()
    graphs = for_backend(net, name, "fp32")
    size = 24 if dims == 2 else 12
    x = torch.rand((1, 1) + (size,) * dims, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tiles = TileSettings(tile=8, overlap=2)  # several overlapping tiles: the engine's blend runs on both paths
    ref, got = TiledAutoencoder(net, tiles), TiledAutoencoder(graphs, tiles)
    z_ref, z = ref.encode(x), got.encode(x)
    assert z.shape == z_ref.shape and (z - z_ref).abs().max() <= TOL
    for gray in (False, True):
        y_ref, y = ref.decode(z_ref, grayscale=gray), got.decode(z_ref, grayscale=gray)
        assert y.shape == y_ref.shape and (y - y_ref).abs().max() <= TOL


def test_graph_model_refuses_image_wide_norm():
    _need("onnxruntime")
    net = randomise(MedVAE(tiny_config(2))).eval()
    engine = TiledAutoencoder(for_backend(net, "onnxruntime"), TileSettings(tile=8, overlap=2, norm="image"))
    with pytest.raises(RuntimeError, match="--norm image"):
        engine.encode(torch.zeros(1, 1, 16, 16))


def _png(folder, name="a.png", size=24):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / name)
    return folder


def test_latent_file_records_backend_and_precision(tmp_path, model_dirs):
    _need("onnxruntime")
    src = _png(tmp_path / "in")
    res, out = run_cli("encode", src, "-o", tmp_path / "torch", "--model", model_dirs[2], "--latent-dtype", "float32")
    assert res.exit_code == 0, out
    assert "backend torch fp32 (default" in out
    res, out = run_cli("encode", src, "-o", tmp_path / "ort", "--model", model_dirs[2], "--latent-dtype", "float32",
                       "--backend", "onnxruntime")
    assert res.exit_code == 0, out
    assert "backend onnxruntime fp32 (--backend given)" in out
    ref, lf = read_latent(tmp_path / "torch/a.latent.safetensors"), read_latent(tmp_path / "ort/a.latent.safetensors")
    assert ref.inference == {"backend": "torch", "precision": "fp32"}
    assert lf.inference == {"backend": "onnxruntime", "precision": "fp32"}
    assert (lf.z - ref.z).abs().max() <= TOL
    res, out = run_cli("info", tmp_path / "ort/a.latent.safetensors")
    assert "computed by     onnxruntime fp32" in out
    for name in ("torch", "onnxruntime"):
        res, out = run_cli("decode", tmp_path / "ort", "-o", tmp_path / f"dec_{name}", "--backend", name,
                           "--model", model_dirs[2], "--format", "npy")
        assert res.exit_code == 0, out
    assert np.abs(np.load(tmp_path / "dec_onnxruntime/a.npy").astype(np.float64)
                  - np.load(tmp_path / "dec_torch/a.npy")).max() <= 1  # uint8 units: rounding may differ by one

    # a file without the record (as written before it) still reads; the record is covered by the metadata digest
    old = write_latent(tmp_path / "old.latent.safetensors", type(lf)(z=lf.z, preprocessing=lf.preprocessing,
                                                                     model=lf.model))
    assert read_latent(old).inference is None
    raw = (tmp_path / "ort/a.latent.safetensors").read_bytes()
    assert raw.count(b"onnxruntime") == 1  # the record's value, nowhere else
    edited = raw.replace(b"onnxruntime", b"onnxruntimX")
    (tmp_path / "edited.latent.safetensors").write_bytes(edited)
    with pytest.raises(ValueError, match="checksum"):
        read_latent(tmp_path / "edited.latent.safetensors")


@pytest.mark.parametrize("flags, why", [(set(), "neither avx512_bf16 nor amx_bf16"), (None, "cannot be read")])
def test_bf16_refused_without_native_support(tmp_path, model_dirs, monkeypatch, flags, why):
    monkeypatch.setattr(cpu, "cpu_flags", lambda path=cpu.CPUINFO: flags)
    with pytest.raises(PrecisionError, match=why):
        check_precision("bf16", "torch", "cpu")
    check_precision("bf16", "torch", "cuda")  # a GPU's bf16 is not this rule's business
    res, out = run_cli("encode", _png(tmp_path / "in"), "-o", tmp_path / "out", "--model", model_dirs[2],
                       "--precision", "bf16")
    assert res.exit_code == 1 and "--precision bf16" in out and why in out, out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bf16_allowed_with_native_support_and_per_backend(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda path=cpu.CPUINFO: {"avx2", "amx_bf16"})
    check_precision("bf16", "torch", "cpu")
    check_precision("bf16", "openvino", "cpu")
    with pytest.raises(PrecisionError, match="--precision bf16 is not available with --backend onnxruntime"):
        check_precision("bf16", "onnxruntime", "cpu")
    with pytest.raises(PrecisionError, match="CPU only"):
        check_precision("fp32", "openvino", "cuda")
    with pytest.raises(PrecisionError, match="--backend 'tensorrt'"):
        check_precision("fp32", "tensorrt", "cpu")


def test_graphs_exported_once_per_weights(tmp_path, monkeypatch):
    _need("onnxruntime")
    calls = []
    real = medlatent.export.to_onnx

    def counting(model, directory, **kw):
        calls.append(directory)
        return real(model, directory, **kw)

    monkeypatch.setattr(medlatent.export, "to_onnx", counting)
    net = randomise(MedVAE(tiny_config(2))).eval()
    first = for_backend(net, "onnxruntime")
    monkeypatch.setattr(backend, "_RUNNERS", {})  # a new process: only the folder cache is left
    second = for_backend(net, "onnxruntime")
    assert len(calls) == 1 and calls[0].parent == tmp_path / "cache" / "onnx"
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(first.encode(x).mean, second.encode(x).mean)
    other = randomise(MedVAE(tiny_config(2)), seed=5).eval()  # other weights: their own graphs
    for_backend(other, "onnxruntime")
    assert len(calls) == 2 and calls[1] != calls[0]
