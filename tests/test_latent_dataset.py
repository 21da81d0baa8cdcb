"""Latents as a dataset: LatentDataset with CSV labels, DataLoader workers, the exact distributed sampler over two
gloo processes, and the MONAI dictionary transforms (load, encode, decode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.data import ExactDistributedSampler, LatentDataError, LatentDataset
from medlatent.io.image import ImageData
from medlatent.latentfile import SUFFIX, LatentFileError, read_latent, write_latent
from medlatent.pipeline import EncodeOptions, encode_image


@pytest.fixture(scope="module")
def model2d() -> MedVAE:
    return randomise(MedVAE(tiny_config(2, stage2_head=True))).eval()


def _image(seed: int, size: int = 16) -> ImageData:
    rng = np.random.default_rng(seed)
    return ImageData(rng.integers(0, 4096, (1, size, size)).astype(np.uint16), np.diag([0.5, 0.7, 1.0]),
                     modality="xray", source=f"img{seed}.png")


def _latents(model: MedVAE, root, n: int) -> list:
    """``n`` latent files, half in a subfolder (the dataset searches recursively)."""
    paths = []
    for i in range(n):
        rel = f"sub/case{i}" if i % 2 else f"case{i}"
        paths.append(write_latent(root / (rel + SUFFIX), encode_image(model, _image(i), EncodeOptions(stage2=True))))
    return paths


def test_items_labels_and_metadata(tmp_path, model2d):
    paths = _latents(model2d, tmp_path / "lat", 4)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,finding,score\n" + "".join(
        f"lat/{p.relative_to(tmp_path / 'lat')},{'malignant' if i % 2 else 'benign'},{i * 0.5}\n"
        for i, p in enumerate(paths)))
    ds = LatentDataset(tmp_path / "lat", csv_path, label_columns=["finding"])
    assert len(ds) == 4 and ds.classes == {"finding": ["benign", "malignant"]}
    by_name = {ds.names[i]: ds[i] for i in range(len(ds))}
    assert sorted(by_name) == ["case0", "case2", "sub/case1", "sub/case3"]
    item = by_name["sub/case1"]
    lf = read_latent(paths[1])
    assert torch.equal(item["z"], lf.z.float()) and item["z"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    meta = item["meta"]
    assert (meta["spatial_dims"], meta["C"], meta["downsample"], meta["f"]) == (2, 2, 2, 4.0)
    assert meta["original_shape"].tolist() == [1, 16, 16]
    assert torch.allclose(meta["affine"], torch.tensor(np.diag([0.5, 0.7, 1.0])))
    assert meta["model"] == lf.model["name"]

    both = LatentDataset(tmp_path / "lat", csv_path, tensor="stage2")  # all label columns, numeric kept
    item = both[0]
    assert torch.equal(item["stage2"], read_latent(both.paths[0]).stage2.float())
    assert item["label"].dtype == torch.float32 and item["label"].shape == (2,)

    # batches with DataLoader workers (each opens its files itself), through a transform
    def halve(item):
        return {**item, "z": item["z"][:, ::2, ::2]}

    batches = list(DataLoader(LatentDataset(tmp_path / "lat", csv_path, label_columns=["finding"], transform=halve),
                              batch_size=2, num_workers=2))
    assert sum(b["z"].shape[0] for b in batches) == 4 and batches[0]["z"].shape[1:] == (2, 4, 4)
    assert batches[0]["meta"]["affine"].shape == (2, 3, 3) and len(batches[0]["meta"]["name"]) == 2
    assert sorted(sum((b["label"].tolist() for b in batches), [])) == [0, 0, 1, 1]


def test_labels_by_name_and_problems_named(tmp_path, model2d):
    _latents(model2d, tmp_path / "lat", 3)
    by_name = tmp_path / "names.csv"
    by_name.write_text("name,label\ncase0,1\nsub/case1.latent.safetensors,0\n")
    with pytest.raises(LatentDataError, match=r"1 latent file\(s\) have no label row.*case2"):
        LatentDataset(tmp_path / "lat", by_name)
    ds = LatentDataset(tmp_path / "lat", by_name, unlabelled="skip")
    assert ds.names == ["case0", "sub/case1"] and [float(ds[i]["label"]) for i in range(2)] == [1.0, 0.0]

    typo = tmp_path / "typo.csv"
    typo.write_text("name,label\ncase9,1\n")
    with pytest.raises(LatentDataError, match=r"typo.csv, line 2: no latent file named 'case9'"):
        LatentDataset(tmp_path / "lat", typo)
    nokey = tmp_path / "nokey.csv"
    nokey.write_text("file,label\ncase0,1\n")
    with pytest.raises(LatentDataError, match="needs a 'path' or 'name' column"):
        LatentDataset(tmp_path / "lat", nokey)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentDataError, match="empty: holds no latent files"):
        LatentDataset(tmp_path / "empty")
    with pytest.raises(LatentDataError, match="does not exist"):
        LatentDataset(tmp_path / "nowhere")


def test_damaged_file_refused_on_read(tmp_path, model2d):
    [path] = _latents(model2d, tmp_path / "lat", 1)
    write_latent(tmp_path / "no_stage2" / ("x" + SUFFIX), encode_image(model2d, _image(0), EncodeOptions(stage2=False)))
    with pytest.raises(LatentFileError, match=r"x.latent.safetensors: holds no stage-2 features"):
        LatentDataset(tmp_path / "no_stage2", tensor="stage2")[0]
    ds = LatentDataset(tmp_path / "lat")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(LatentFileError, match=r"case0.latent.safetensors: tensor data do not match"):
        ds[0]


def test_exact_sampler_single_process():
    data = list(range(7))
    for epoch in range(2):
        parts = []
        for r in range(3):
            s = ExactDistributedSampler(data, num_replicas=3, rank=r, seed=1)
            s.set_epoch(epoch)
            parts.append(list(s))
            assert len(s) == len(parts[-1])
        assert sorted(sum(parts, [])) == data
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        ExactDistributedSampler(data, num_replicas=2, rank=2)


_WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    from medlatent.data import ExactDistributedSampler, LatentDataset

    dist.init_process_group("gloo")
    out, roots = sys.argv[1], sys.argv[2:]
    seen = {}
    for root in roots:
        ds = LatentDataset(root)
        samplers = {"exact": ExactDistributedSampler(ds, seed=3)}
        if len(ds) % dist.get_world_size() == 0:  # PyTorch's sampler repeats items otherwise
            samplers["torch"] = DistributedSampler(ds, seed=3)
        for kind, sampler in samplers.items():
            for epoch in range(2):
                sampler.set_epoch(epoch)
                seen[f"{root}|{kind}|{epoch}"] = [n for b in DataLoader(ds, batch_size=2, sampler=sampler,
                                                                        num_workers=1) for n in b["meta"]["name"]]
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as fh:
        json.dump(seen, fh)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_gloo_processes_cover_each_item_once(tmp_path, model2d):
    """torchrun, 2 gloo ranks, DataLoader workers: each item on exactly one rank per epoch, reshuffled per epoch,
    for an item count the world divides (both samplers) and one it does not (the exact sampler)."""
    roots = {n: tmp_path / f"lat{n}" for n in (7, 8)}
    for n, root in roots.items():
        _latents(model2d, root, n)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), *map(str, roots.values())]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for n, root in roots.items():
        names = sorted(LatentDataset(root).names)
        assert len(names) == n
        for kind in ["exact"] + (["torch"] if n % 2 == 0 else []):
            orders = []
            for epoch in (0, 1):
                a, b = (r[f"{root}|{kind}|{epoch}"] for r in ranks)
                assert a and b and set(a).isdisjoint(b)
                assert sorted(a + b) == names  # every item exactly once per epoch
                orders.append(a + b)
            assert orders[0] != orders[1]  # set_epoch reshuffles


def test_monai_transforms_round_trip(tmp_path, model2d):
    pytest.importorskip("monai")
    from monai.transforms import Compose

    from medlatent.data.monai import DecodeFromLatentd, EncodeToLatentd, LoadLatentd
    from medlatent.pipeline import decode_latent

    img = _image(5, size=16)
    encode = Compose([EncodeToLatentd("image", model2d, EncodeOptions(stage2=True), keep_record=True)])
    d = encode({"image": img, "label": 1})
    lf_direct = encode_image(model2d, img, EncodeOptions(stage2=True))
    assert torch.equal(d["image"], lf_direct.z) and d["label"] == 1
    assert d["image_meta"]["original_shape"].tolist() == [1, 16, 16]

    path = write_latent(tmp_path / ("x" + SUFFIX), d["image_latent"], dtype=torch.float32)
    loaded = LoadLatentd("z", tensor="stage2", keep_record=True)({"z": str(path)})
    assert torch.equal(loaded["z"], lf_direct.stage2)
    loaded = LoadLatentd("z", keep_record=True)({"z": str(path)})
    out = DecodeFromLatentd("z", model2d)(loaded)
    want = decode_latent(model2d, read_latent(path))
    assert out["z"].shape == (1, 16, 16) and out["z"].dtype == torch.uint16
    assert np.array_equal(out["z"].numpy(), want.array)
    assert torch.allclose(out["z_meta"]["affine"], torch.tensor(np.diag([0.5, 0.7, 1.0])))

    with pytest.raises(KeyError, match="keep_record=True"):
        DecodeFromLatentd("z", model2d)(LoadLatentd("z")({"z": str(path)}))
    with pytest.raises(TypeError, match="must be an image path or an ImageData"):
        EncodeToLatentd("image", model2d)({"image": 3})


def test_monai_is_optional():
    """``medlatent.data`` never imports MONAI; without it, the transforms module says what to install."""
    code = ("import sys; import medlatent.data; assert 'monai' not in sys.modules, 'monai imported'\n"
            "sys.modules['monai'] = None\n"
            "try:\n    import medlatent.data.monai\nexcept ImportError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "MONAI transforms needs monai.transforms" in res.stdout and "pip install" in res.stdout
