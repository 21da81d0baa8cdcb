"""The last two import cycles, removed: the model layer reaches nothing above it yet ``MedVAE.from_pretrained`` /
``save_pretrained`` still read and write model folders (through the checkpoints layer that the package root
installs); the version lives in a leaf module; the residual-identity helper is shared by the training builders
from the model layer; the reader study's t quantile comes from scipy, declared by the ``app`` extra."""

from __future__ import annotations

import ast
import json
import re
import sys

import pytest
import torch

import medlatent
from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.model import autoencoder
from test_layers import PACKAGE, _under, import_graph, reachable

ROOT = PACKAGE.parents[1]


def pyproject_line(key: str) -> str:
    """The one line of pyproject.toml that sets ``key`` (tomllib is not in Python 3.10)."""
    (line,) = re.findall(rf"^{re.escape(key)} = .*$", (ROOT / "pyproject.toml").read_text(), re.M)
    return line


def test_the_model_layer_reaches_nothing_above_it():
    g = import_graph()
    for module in [m for m in g if _under(m, ("medlatent.model",))]:
        above = sorted(m for m in reachable(g, module) | {module}
                       if m in ("medlatent", "medlatent.checkpoints", "medlatent.hub")
                       or _under(m, ("medlatent.training",)))
        assert above == [], f"{module} reaches {above}"
    assert reachable(g, "medlatent._version") == set()
    assert "medlatent" not in reachable(g, "medlatent.checkpoints")


def test_save_and_load_through_the_model_class(tmp_path):
    model = randomise(MedVAE(tiny_config(2)), seed=3).eval()
    folder = model.save_pretrained(tmp_path / "m", name="tiny")
    assert folder == tmp_path / "m"
    meta = json.loads((folder / "config.json").read_text())
    assert meta["medlatent_version"] == medlatent.__version__ and meta["model"] == "tiny"
    back = MedVAE.from_pretrained(folder)
    assert back.config == model.config and back.weights_info["model"] == "tiny" and not back.training
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_the_weight_file_layer_is_the_checkpoints_module(monkeypatch, tmp_path):
    from medlatent import checkpoints

    assert autoencoder._weight_files is checkpoints
    calls = []
    monkeypatch.setattr(checkpoints, "load_pretrained", lambda *a, **k: calls.append((a, k)) or "loaded")
    assert MedVAE.from_pretrained("x", local_files_only=True) == "loaded"
    assert calls == [(("x", None), dict(revision=None, cache_dir=None, local_files_only=True, map_location="cpu"))]
    monkeypatch.setattr(autoencoder, "_weight_files", None)
    with pytest.raises(RuntimeError, match="medlatent.checkpoints"):
        MedVAE(tiny_config(2)).save_pretrained(tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_the_version_is_a_literal_in_a_leaf_module_that_setuptools_reads():
    tree = ast.parse((PACKAGE / "_version.py").read_text())
    (assign,) = [n for n in tree.body if isinstance(n, ast.Assign)]
    assert ast.literal_eval(assign.value) == medlatent.__version__  # read without importing torch
    assert pyproject_line("version") == 'version = { attr = "medlatent._version.__version__" }'


def test_zero_init_residual_is_one_function_for_both_builders():
    from medlatent.model.layers import ResnetBlock
    from medlatent.model.residual_init import zero_init_residual
    from medlatent.training import build, codec_init

    assert build.zero_init_residual is zero_init_residual is codec_init.zero_init_residual
    model = randomise(MedVAE(tiny_config(2, mid_attention=True)))
    zero_init_residual(model)
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    assert blocks and all(not b.conv2.weight.any() and not b.conv2.bias.any() for b in blocks)
    assert not model.encoder.mid.attn_1.proj_out.weight.any()
    assert model.encoder.conv_in.weight.any()  # only the residual branches' last convs


def test_the_reader_study_extra_declares_scipy_and_its_absence_is_named(monkeypatch):
    from medlatent.optional import OptionalDependencyError
    from medlatent.readerstudy.analysis import t_quantile

    assert '"scipy>=' in pyproject_line("app")
    assert t_quantile(0.975, 5) == pytest.approx(2.570582, abs=1e-6)
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 5)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # as if scipy were not installed
    with pytest.raises(OptionalDependencyError, match=r"medlatent\[app\]"):
        t_quantile(0.975, 5)
