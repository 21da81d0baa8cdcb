"""Reader-study creation and the API: tokens, isolation between readers, traversal, validation, restarts."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from medlatent.cli import app as cli  # noqa: E402
from medlatent.readerstudy.app import create_app  # noqa: E402
from medlatent.readerstudy.db import StudyError, answer_records  # noqa: E402
from medlatent.readerstudy.study import MethodSource, create_study, pairs_from_csv, pairs_from_folders  # noqa: E402
from readerstudy_fixtures import make_inputs, make_study  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return make_study(tmp_path_factory.mktemp("rs"))


@pytest.fixture()
def study(built, tmp_path) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the module's study (answers do not leak between tests)."""
    import shutil

    dest = tmp_path / "study"
    shutil.copytree(built[0], dest)
    return dest, built[1]


def client(study: Path, token: str | None) -> TestClient:
    c = TestClient(create_app(study))
    if token:
        c.headers["Authorization"] = f"Bearer {token}"
    return c


def scores(f=1, g=0, a=-1) -> dict:
    return {"fidelity": f, "features": g, "artifacts": a}


def pair_at(c: TestClient, pos: int) -> dict:
    r = c.get(f"/api/items/{pos}")
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------ creation
def test_created_study_is_blinded_and_orders_are_seeded_permutations(study):
    root, tokens = study
    conn = sqlite3.connect(root / "study.sqlite")
    pairs = conn.execute("SELECT id, method, factor FROM pairs").fetchall()
    assert len(pairs) == 4 and {(m, f) for _, m, f in pairs} == {("bicubic", "16"), ("nearest", "16")}
    for rid, _ in enumerate(tokens, start=1):
        order = [p for (p,) in conn.execute("SELECT pair_id FROM assignments WHERE reader_id=? ORDER BY position",
                                            (rid,))]
        assert sorted(order) == sorted(p for p, _, _ in pairs)
    # tokens are stored only as digests; the links file is private
    stored = " ".join(r[0] for r in conn.execute("SELECT token_sha256 FROM readers"))
    assert not any(t in stored for t in tokens.values())
    assert (root / "readers.csv").stat().st_mode & 0o077 == 0
    with (root / "readers.csv").open() as fh:
        assert {r["reader"]: r["token"] for r in csv.DictReader(fh)} == tokens
    # what a reader receives never names the method, the factor or the source files
    c = client(root, tokens["alice"])
    for pos in range(1, 5):
        text = c.get(f"/api/items/{pos}").text.lower()
        assert not any(w in text for w in ("bicubic", "nearest", "ct_small", "mr_small", '"16"'))


def test_display_images_share_the_original_intensity_map(study):
    root, tokens = study
    c = client(root, tokens["bob"])
    item = pair_at(c, 1)
    left = c.get(f"/api/images/{item['left']['image_id']}")
    right = c.get(f"/api/images/{item['right']['image_id']}")
    assert left.headers["content-type"] == "application/octet-stream"
    a = np.frombuffer(left.content, "<u2").reshape(item["rows"], item["cols"])
    b = np.frombuffer(right.content, "<u2").reshape(item["rows"], item["cols"])
    lo, hi = item["range"]
    assert a.min() == 0 and a.max() == 65535  # the original spans the full 16 bits
    # values map back to original units linearly; the window is a number, not burnt in
    assert lo < item["window"]["center"] < hi and 0 < item["window"]["width"] <= hi - lo
    assert 0.7 < np.corrcoef(a.ravel(), b.ravel())[0, 1] < 1.0  # a real (4× shrunk) reconstruction of it


def test_same_seed_same_orders_other_seed_other_orders(tmp_path):
    originals, folders = make_inputs(tmp_path / "in")
    specs = pairs_from_folders(originals, [MethodSource(m, d, "16") for m, d in folders.items()])

    def orders(name: str, seed: int) -> list[list[str]]:
        create_study(tmp_path / name, specs, ["a", "b", "c"], seed=seed)
        conn = sqlite3.connect(tmp_path / name / "study.sqlite")
        rows = conn.execute("""SELECT s.reader_id, c.source || p.method FROM assignments s JOIN pairs p
                               ON p.id = s.pair_id JOIN cases c ON c.id = p.case_id ORDER BY s.reader_id, s.position""")
        out: dict[int, list[str]] = {}
        for rid, key in rows:
            out.setdefault(rid, []).append(key)
        return list(out.values())

    first = orders("s1", 3)
    assert orders("s2", 3) == first and len({tuple(o) for o in first}) > 1
    assert any(orders(f"s{k}", k) != first for k in (4, 5, 6))


def test_creation_errors_name_the_problem_and_leave_nothing(tmp_path):
    originals, folders = make_inputs(tmp_path / "in")
    (tmp_path / "in" / "short").mkdir()
    with pytest.raises(StudyError, match="no readable images"):
        pairs_from_folders(originals, [MethodSource("x", tmp_path / "in" / "short")])
    (folders["nearest"] / "MR_small.nii.gz").unlink()
    with pytest.raises(StudyError, match=r"no reconstruction for 1 original.*MR_small"):
        pairs_from_folders(originals, [MethodSource(m, d) for m, d in folders.items()])
    with pytest.raises(StudyError, match="NAME=DIR"):
        MethodSource.parse("just-a-name")
    assert MethodSource.parse("medvae:64=out/f64") == MethodSource("medvae", Path("out/f64"), "64")
    # a reconstruction of the wrong size, listed by CSV: refused, naming the file; no study folder remains
    bad = tmp_path / "in" / "bad.png"
    from PIL import Image

    Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad)
    (tmp_path / "pairs.csv").write_text("original,reconstruction,method\n"
                                        "in/originals/CT_small.nii.gz,in/bicubic/CT_small.nii.gz,bicubic\n"
                                        "in/originals/CT_small.nii.gz,in/bad.png,broken\n")
    with pytest.raises(StudyError, match=r"bad.png: shape \(10, 12\) differs"):
        create_study(tmp_path / "study", pairs_from_csv(tmp_path / "pairs.csv"), ["r1"])
    assert not (tmp_path / "study").exists() and not list(tmp_path.glob(".study-*"))
    (tmp_path / "unreadable.png").write_bytes(b"not a png")
    (tmp_path / "p2.csv").write_text("original,reconstruction,method\nin/originals/CT_small.nii.gz,unreadable.png,x\n")
    with pytest.raises(StudyError, match="unreadable.png"):
        create_study(tmp_path / "study", pairs_from_csv(tmp_path / "p2.csv"), ["r1"])
    with pytest.raises(StudyError, match="distinct"):
        create_study(tmp_path / "study", pairs_from_csv(tmp_path / "pairs.csv")[:1], ["r1", "r1"])


def test_3d_files_give_chosen_axial_slices(tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(0).normal(size=(20, 16, 12)).astype(np.float32)
    vol[3, 2, 5] = 50.0  # a marker: voxel (x=3, y=2) of slice 5
    for d in ("orig", "m"):
        (tmp_path / d).mkdir()
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / d / "v.nii.gz")
    specs = pairs_from_folders(tmp_path / "orig", [MethodSource("m", tmp_path / "m", "64")])
    create_study(tmp_path / "s", specs, ["r"], slices=[5, -1])
    conn = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    assert sorted(r[0] for r in conn.execute("SELECT slice FROM cases")) == ["z=11", "z=5"]
    (file, rows, cols), = conn.execute(
        "SELECT i.file, i.rows, i.cols FROM images i JOIN cases c ON c.id = i.case_id WHERE c.slice = 'z=5' LIMIT 1")
    img = np.load(tmp_path / "s" / "images" / file)
    assert (rows, cols) == (16, 20)  # rows: y (anterior up), columns: x (patient's right on the left)
    assert np.unravel_index(img.argmax(), img.shape) == (16 - 1 - 2, 20 - 1 - 3)
    with pytest.raises(StudyError, match="slice 40 is outside"):
        create_study(tmp_path / "s2", specs, ["r"], slices=[40])


# ------------------------------------------------------------------------------------------ API safety
def test_token_is_required_and_checked(study):
    root, tokens = study
    anon = client(root, None)
    for method, url in (("get", "/api/me"), ("get", "/api/items/1"), ("get", "/api/answers"),
                        ("post", "/api/finish")):
        assert getattr(anon, method)(url).status_code == 401
    assert anon.post("/api/answers", json={"pair_id": "0" * 16, **scores()}).status_code == 401
    assert client(root, "not-a-token").get("/api/me").status_code == 401
    assert anon.get("/r/not-a-token").status_code == 404
    page = anon.get(f"/r/{tokens['alice']}")
    assert page.status_code == 200 and "reader.js" in page.text
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"
    me = client(root, tokens["alice"]).get("/api/me").json()
    assert me["reader"] == "alice" and me["total"] == 4 and me["answered"] == 0 and me["next_position"] == 1


def test_readers_cannot_see_or_change_each_others_answers(study):
    root, tokens = study
    alice, bob = client(root, tokens["alice"]), client(root, tokens["bob"])
    pid = pair_at(alice, 1)["pair_id"]
    assert alice.post("/api/answers", json={"pair_id": pid, **scores(2, 2, 2)}).status_code == 201
    # bob sees none of alice's answers, and the same pair is unanswered for him
    assert bob.get("/api/answers").json() == []
    bob_pos = next(p for p in range(1, 5) if pair_at(bob, p)["pair_id"] == pid)
    assert pair_at(bob, bob_pos)["answer"] is None
    # bob's revision of "that pair" can only touch his own (absent) answer
    assert bob.put(f"/api/answers/{pid}", json=scores(-2, -2, -2)).status_code == 404
    assert bob.post("/api/answers", json={"pair_id": pid, **scores(-1, -1, -1)}).status_code == 201
    assert [a["fidelity"] for a in alice.get("/api/answers").json()] == [2]
    assert [a["fidelity"] for a in bob.get("/api/answers").json()] == [-1]


def test_image_requests_cannot_escape_the_study(study):
    root, tokens = study
    c = client(root, tokens["alice"])
    (root.parent / "secret.npy").write_bytes(b"secret")
    for bad in ("../study.sqlite", "..%2Fstudy.sqlite", "%2e%2e%2f%2e%2e%2fsecret.npy", "....//readers.csv",
                "0123456789abcdef", "../../../../etc/passwd", "abc"):
        r = c.get(f"/api/images/{bad}")
        assert r.status_code == 404, (bad, r.status_code)
        assert b"secret" not in r.content and b"SQLite" not in r.content
    # a real image id whose file was swapped for a link out of the study is refused too
    item = pair_at(c, 1)
    target = root / "images" / f"{item['left']['image_id']}.npy"
    target.unlink()
    target.symlink_to(root.parent / "secret.npy")
    assert c.get(f"/api/images/{item['left']['image_id']}").status_code == 404
    assert c.get("/static/../study.sqlite").status_code == 404


def test_invalid_answers_are_refused(study):
    root, tokens = study
    c = client(root, tokens["alice"])
    pid = pair_at(c, 1)["pair_id"]
    for body in ({"pair_id": pid, **scores(3)}, {"pair_id": pid, **scores(-3)}, {"pair_id": pid, **scores(1.5)},
                 {"pair_id": pid, **scores("1")}, {"pair_id": pid, "fidelity": 1, "features": 1},
                 {"pair_id": pid, **scores(), "extra": 1}, {"pair_id": "zz", **scores()}):
        assert c.post("/api/answers", json=body).status_code == 422, body
    assert c.post("/api/answers", json={"pair_id": "f" * 16, **scores()}).status_code == 404
    assert c.get("/api/items/0").status_code == 404 and c.get("/api/items/5").status_code == 404
    assert c.get("/api/answers").json() == []


def test_no_double_answers_revision_until_finished_and_restart_keeps_everything(study):
    root, tokens = study
    c = client(root, tokens["alice"])
    ids = [pair_at(c, p)["pair_id"] for p in range(1, 5)]
    r = c.post("/api/answers", json={"pair_id": ids[0], **scores(1, 1, 1), "seconds": 4.2})
    assert r.status_code == 201 and r.json()["next_position"] == 2
    assert c.post("/api/answers", json={"pair_id": ids[0], **scores(0, 0, 0)}).status_code == 409
    assert c.post("/api/finish").status_code == 409  # three pairs still open
    assert c.put(f"/api/answers/{ids[0]}", json=scores(2, 1, 0)).json()["answer"]["revisions"] == 1
    # a "restart": a new app on the same folder sees every saved answer
    c2 = client(root, tokens["alice"])
    assert pair_at(c2, 1)["answer"] == {"fidelity": 2, "features": 1, "artifacts": 0, "revisions": 1}
    assert c2.get("/api/me").json()["next_position"] == 2
    for pid in ids[1:]:
        assert c2.post("/api/answers", json={"pair_id": pid, **scores()}).status_code == 201
    assert c2.post("/api/finish").json() == {"locked": True, "answered": 4, "total": 4}
    assert c2.put(f"/api/answers/{ids[0]}", json=scores(-2, -2, -2)).status_code == 423
    assert c2.post("/api/answers", json={"pair_id": ids[0], **scores()}).status_code == 423
    assert c2.get("/api/me").json()["locked"] is True
    recs = answer_records(sqlite3.connect(root / "study.sqlite"))
    assert len(recs) == 4 and recs[0]["reader"] == "alice"


def test_study_without_revision(tmp_path):
    root, tokens = make_study(tmp_path, readers=("r",), allow_revision=False)
    c = client(root, tokens["r"])
    pid = pair_at(c, 1)["pair_id"]
    c.post("/api/answers", json={"pair_id": pid, **scores()})
    assert c.get("/api/me").json()["allow_revision"] is False
    assert c.put(f"/api/answers/{pid}", json=scores(2, 2, 2)).status_code == 423


# ------------------------------------------------------------------------------------------ CLI
def test_cli_create_and_analyze_a_finished_study(tmp_path):
    originals, folders = make_inputs(tmp_path / "in")
    run = CliRunner().invoke
    args = ["reader-study", "create", str(tmp_path / "st"), "--originals", str(originals), "--readers", "r1,r2,r3",
            *[a for m, d in folders.items() for a in ("--method", f"{m}:16={d}")]]
    res = run(cli, args)
    assert res.exit_code == 0, res.output
    assert res.output.count("http://127.0.0.1:8000/r/") == 3
    again = run(cli, args)
    assert again.exit_code == 1 and "exists" in again.output
    assert run(cli, ["reader-study", "analyze", str(tmp_path / "st")]).exit_code == 1  # no answers yet
    with (tmp_path / "st" / "readers.csv").open() as fh:
        tokens = {r["reader"]: r["token"] for r in csv.DictReader(fh)}
    # known answers: bicubic always scores 1 on every question, nearest −1 (reader 3 gives nearest 0)
    for name, token in tokens.items():
        c = client(tmp_path / "st", token)
        for pos in range(1, 5):
            item = pair_at(c, pos)
            m = sqlite3.connect(  # the client cannot learn the method: look it up
tmp_path / "st" / "study.sqlite").execute(
                "SELECT method FROM pairs WHERE id = ?", (item["pair_id"],)).fetchone()[0]
            s = 1 if m == "bicubic" else (0 if name == "r3" else -1)
            assert c.post("/api/answers", json={"pair_id": item["pair_id"], **scores(s, s, s)}).status_code == 201
        assert c.post("/api/finish").status_code == 200
    res = run(cli, ["reader-study", "analyze", str(tmp_path / "st"), "--compare", "bicubic,nearest", "--ci", "t"])
    assert res.exit_code == 0, res.output
    assert "every reader finished" in res.output
    assert "bicubic f=16 fidelity: +1.00 [+1.00, +1.00]" in res.output
    # nearest: case means over readers are (−1 −1 + 0)/3 for both cases → mean −0.67, sd 0 → CI of zero width
    assert "nearest f=16 fidelity: -0.67 [-0.67, -0.67]" in res.output
    out = tmp_path / "st" / "analysis"
    for f in ("answers.csv", "summary.csv", "difference.csv", "agreement.csv", "scores.png", "report.md"):
        assert (out / f).stat().st_size > 0, f
    diff = list(csv.DictReader((out / "difference.csv").open()))
    assert {round(float(r["mean_diff"]), 4) for r in diff} == {round(5 / 3, 4)}
    with (out / "answers.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 12


def test_reconstructions_must_share_the_original_units_unless_matched(tmp_path):
    """`medlatent roundtrip` PNGs (NAME.recon.png, rescaled to 0..65535) pair by name but need --match-range."""
    from PIL import Image

    originals, folders = make_inputs(tmp_path / "in")
    png = tmp_path / "png"
    png.mkdir()
    for f in folders["bicubic"].iterdir():
        a = read_nifti_2d(f)
        u16 = np.round((a - a.min()) / (a.max() - a.min()) * 65535).astype(np.uint16)
        Image.fromarray(u16).save(png / f.name.replace(".nii.gz", ".recon.png"))
    specs = pairs_from_folders(originals, [MethodSource("roundtrip", png, "16")])
    assert len(specs) == 2
    with pytest.raises(StudyError, match=r"not in the units of the original.*--match-range"):
        create_study(tmp_path / "s", specs, ["r"])
    create_study(tmp_path / "s", specs, ["r"], match_range=True)
    conn = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    assert conn.execute("SELECT value FROM meta WHERE key = 'match_range'").fetchone()[0] == "1"


def read_nifti_2d(path: Path) -> np.ndarray:
    from medlatent.io.readers import read_image

    return read_image(path).array[0].astype(np.float64)
