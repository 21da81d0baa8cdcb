"""The package's layers: who imports whom (read from the source with ``ast``, imports inside functions included),
and the default model chosen per input dimensionality by the runs layer."""

from __future__ import annotations

import ast
import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import medlatent
from conftest import run_cli
from io_fixtures import nibabel_data, sample_file

PACKAGE = Path(medlatent.__file__).parent

# Cycles the package had when this test was written, each the set of modules of one strongly connected component.
# None is left (the last two went with the reorganisation of the layers), so any cycle fails.
KNOWN_CYCLES: set[frozenset[str]] = set()

# The modules of the reorganisation of the command line: none of them may be part of any cycle.
NO_CYCLES = ("medlatent.runs", "medlatent.cli", "medlatent.evaluation.cli", "medlatent.readerstudy")

# What the runs layer (between the model/engine layers and the applications) must not reach, even indirectly.
ABOVE_RUNS = ("medlatent.cli", "medlatent.evaluation", "medlatent.readerstudy", "medlatent.training")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def import_graph() -> dict[str, set[str]]:
    """``module → medlatent modules it imports`` for every module of the package (``from a.b import c`` counts as
    importing ``a.b.c`` when that is a module, else ``a.b``)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import medlatent.io.readers` names a module; trim to one that is
                    t = t.rpartition(".")[0]
                if t.startswith("medlatent") and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.add(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# ------------------------------------------------------------------------------------------ the graph itself
def test_graph_reader_resolves_every_kind_of_import():
    g = import_graph()
    assert "medlatent.runs.models" in g["medlatent.runs.common"]  # from medlatent.runs.models import RunError
    assert "medlatent.runs" in g["medlatent.cli"]  # inside functions: from medlatent.runs import load_model
    assert "medlatent.evaluation.cli" in g["medlatent.cli"]  # from medlatent.evaluation.cli import app
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_nothing_imports_the_command_line():
    importers = sorted(m for m, deps in import_graph().items() if "medlatent.cli" in deps)
    assert importers == []


def test_no_new_import_cycles():
    found = set(cycles(import_graph()))
    touched = [c for c in found if any(_under(m, NO_CYCLES) for m in c)]
    assert touched == [], f"import cycles through the command line or runs layer: {touched}"
    assert found - KNOWN_CYCLES == set(), f"new import cycles: {sorted(map(sorted, found - KNOWN_CYCLES))}"


def test_runs_layer_stays_below_the_applications():
    g = import_graph()
    runs = [m for m in g if _under(m, ("medlatent.runs",))]
    assert len(runs) >= 2
    for module in runs:
        above = sorted(m for m in reachable(g, module) if _under(m, ABOVE_RUNS))
        assert above == [], f"{module} reaches {above}"


# ------------------------------------------------------------------------------------------ default model per input
def _mixed_folder(root: Path) -> Path:
    """A real CT slice (2D) and a real MR volume (3D) in one folder."""
    src = root / "in"
    src.mkdir()
    shutil.copy(sample_file("CT_small.dcm"), src / "ct.dcm")
    shutil.copy(nibabel_data("anatomical.nii"), src / "vol.nii")
    return src


def _manifest(out: Path) -> dict[str, dict]:
    return {r["item"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def test_default_models_by_dimensionality():
    from medlatent.registry import DEFAULT_3D_MODEL, DEFAULT_MODEL, DEFAULT_MODELS, default_model

    assert default_model(2) == DEFAULT_MODEL == DEFAULT_MODELS[2]
    assert default_model(3) == DEFAULT_3D_MODEL == DEFAULT_MODELS[3] and default_model(4) is None


@pytest.fixture
def no_3d_default(monkeypatch):
    """A registry without a 3D default (as before one was bundled; also what a trimmed install looks like)."""
    from medlatent import registry

    monkeypatch.setitem(registry.DEFAULT_MODELS, 3, None)


def test_encode_without_model_uses_the_2d_default_and_fails_3d_inputs_by_name(tmp_path, no_3d_default):
    from medlatent.latentfile import read_latent_header
    from medlatent.registry import DEFAULT_MODEL

    src = _mixed_folder(tmp_path)
    out = tmp_path / "out"
    res, text = run_cli("encode", src, "-o", out)
    assert res.exit_code == 1, text
    assert f"model {DEFAULT_MODEL} (default for 2D inputs)" in text
    assert "1 written, 0 already complete, 1 failed" in " ".join(text.split()), text
    rows = _manifest(out)
    assert rows["ct"]["status"] == "ok" and rows["vol"]["status"] == "failed"
    assert rows["vol"]["reason"] == f"{src / 'vol.nii'}: no bundled 3D default model: pass --model (e.g. medvae_4_1_3d)"
    assert read_latent_header(out / "ct.latent.safetensors")[1]["name"] == DEFAULT_MODEL
    assert sorted(p.name for p in out.iterdir()) == ["ct.latent.safetensors", "manifest.jsonl"]


def test_only_3d_inputs_load_no_model_at_all(tmp_path, monkeypatch, no_3d_default):
    import medlatent.runs.models as models

    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a))
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(nibabel_data("anatomical.nii"), src / "a.nii")
    shutil.copy(nibabel_data("anatomical.nii"), src / "b.nii")
    res, text = run_cli("roundtrip", src, "-o", tmp_path / "out")
    assert res.exit_code == 1 and "0 written" in text and "2 failed" in text, text
    assert "no bundled 3D default model: pass --model (e.g. medvae_4_1_3d)" in text
    assert loads == [] and not [line for line in text.splitlines() if line.startswith("model ")], text


def test_each_default_loads_once_per_run_and_matches_its_input(tmp_path, monkeypatch, model_dirs):
    """With a 3D default too, a mixed folder goes through two models, each loaded once; the outputs of each input
    are those of its dimensionality (a PNG reconstruction in 2D, NIfTI in 3D)."""
    import medlatent.runs.models as models
    from medlatent import registry
    from medlatent.latentfile import read_latent_header
    from medlatent.runs import RunListener, roundtrip_files

    monkeypatch.setitem(registry.DEFAULT_MODELS, 3, str(model_dirs[3]))
    real, loads = models.load_model, []
    monkeypatch.setattr(models, "load_model", lambda name, *a, **k: loads.append(str(name)) or real(name, *a, **k))
    src = _mixed_folder(tmp_path)
    for i in range(2):  # more inputs of each kind than models (a DICOM file per folder: not one series)
        (src / f"s{i}").mkdir()
        shutil.copy(src / "ct.dcm", src / f"s{i}" / "ct.dcm")
        shutil.copy(src / "vol.nii", src / f"vol{i}.nii")

    class Seen(RunListener):
        def __init__(self) -> None:
            self.models: list[tuple[str, str]] = []
            self.items: list[str] = []

        def model_loaded(self, name: str, note: str) -> None:
            self.models.append((name, note))

        def item_done(self, result) -> None:
            self.items.append(result.status)

    seen = Seen()
    out = tmp_path / "out"
    result = roundtrip_files([src], out, listener=seen)
    assert result.ok and seen.items == ["ok"] * 6, result.failures
    assert sorted(loads) == sorted([registry.DEFAULT_MODEL, str(model_dirs[3])])
    assert sorted(seen.models) == [(registry.DEFAULT_MODEL, "default for 2D inputs"),
                                   ("tiny_3d", "default for 3D inputs")]
    for stem, model, recon in (("ct", registry.DEFAULT_MODEL, ".recon.png"), ("vol", "tiny_3d", ".recon.nii.gz")):
        assert read_latent_header(out / f"{stem}.latent.safetensors")[1]["name"] == model
        assert (out / f"{stem}{recon}").is_file() and (out / f"{stem}.compare.png").is_file()
    assert {r["item"] for r in result.rows} == {"ct", "s0/ct", "s1/ct", "vol", "vol0", "vol1"}
    # a second run finds every output of each input complete, including the 3D reconstructions
    again = roundtrip_files([src], out)
    assert again.report.counts() == {"skipped": 6}


def test_given_model_wins_over_the_defaults(tmp_path, model_dirs):
    src = _mixed_folder(tmp_path)
    out = tmp_path / "out"
    res, text = run_cli("encode", src, "-o", out, "--model", model_dirs[3])
    assert res.exit_code == 1 and "model tiny_3d" in text and "(default for" not in text.split("done:")[0], text
    rows = _manifest(out)
    assert rows["vol"]["status"] == "ok"
    assert rows["ct"]["status"] == "failed" and "2D image" in rows["ct"]["reason"]  # the 3D model's own refusal


# ------------------------------------------------------------------------------------------ roundtrip options
def _pngs(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24)).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_roundtrip_shards_and_batches_like_encode(tmp_path, model_dirs):
    from medlatent.runs.roundtrip import merge_tables

    src = _pngs(tmp_path / "in", 5)
    whole = tmp_path / "whole"
    res, text = run_cli("roundtrip", src, "-o", whole, "--model", model_dirs[2])
    assert res.exit_code == 0, text
    out = tmp_path / "sharded"
    for rank in (0, 1):
        res, text = run_cli("roundtrip", src, "-o", out, "--model", model_dirs[2], "--shard", f"{rank}/2",
                            "--batch", "3")
        assert res.exit_code == 0 and f"roundtrip (shard {rank + 1}/2)" in text, text
    items = [{r["item"] for r in json.loads((out / f"summary.rank{r}.json").read_text())} for r in (0, 1)]
    assert items == [{"img0", "img2", "img4"}, {"img1", "img3"}]
    assert not (out / "metrics.csv").exists()  # not launched by torchrun: each shard keeps its own tables
    rows = merge_tables(out, 2)
    assert sorted(p.name for p in out.glob("*.json")) == ["summary.json"]
    assert sorted(p.name for p in out.glob("*.csv")) == ["metrics.csv"]
    expected = {r["item"]: r for r in json.loads((whole / "summary.json").read_text())}
    assert sorted(r["item"] for r in rows) == sorted(expected)
    for r in rows:  # batched in threes or one at a time: the same numbers (up to float rounding)
        assert r["psnr"] == pytest.approx(expected[r["item"]]["psnr"], rel=1e-4)
        assert r["latent_file_bytes"] == expected[r["item"]]["latent_file_bytes"]


def test_runs_raise_one_line_errors_instead_of_printing(tmp_path, capsys):
    from medlatent.runs import NothingToDo, RunError, encode_files, load_model

    with pytest.raises(NothingToDo, match="nothing to encode") as e:
        encode_files([tmp_path / "missing"], tmp_path / "out")
    assert e.value.failed == [(tmp_path / "missing", "no such file or folder")]
    with pytest.raises(RunError, match="unknown model 'medvae_4_1_9d'"):
        load_model("medvae_4_1_9d")
    assert capsys.readouterr() == ("", "")
    assert not (tmp_path / "out").exists()
