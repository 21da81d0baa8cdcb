"""A demonstration reader study on the offline sample images, and the README's screenshots.

    python scripts/reader_study_demo.py --out /tmp/rs-demo [--screenshots docs/images]

1. Gathers the 2D sample images (`medlatent samples`) as originals.
2. Reconstructs them with two methods at f=16, in the originals' units: the bundled 2D default model (C=1, the
   posterior mean stored as float16, decoded) and bicubic shrink-and-enlarge, which stores as many values.
3. Creates a study with three readers.
4. Fills in **simulated** answers, so the analysis has something to show. Each simulated reader's score is the
   pair's PSNR mapped onto −2..2 ((PSNR − 30 dB) / 4), plus a reader bias and Gaussian noise. These are not
   radiologists' opinions; the chart only illustrates the output format.
5. Runs the analysis and, with --screenshots, takes a picture of the reader screen in headless chromium and
   copies the analysis chart.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import torch

from medlatent import MedVAE
from medlatent.evaluation.baselines import roundtrip
from medlatent.io.image import ImageData
from medlatent.io.readers import read_image
from medlatent.io.writers import write_image
from medlatent.preprocessing import preprocess, restore
from medlatent.registry import DEFAULT_MODEL
from medlatent.samples import gather


@torch.inference_mode()
def reconstruct(originals: Path, out: Path) -> dict[str, Path]:
    """``{method: folder}`` of NIfTI reconstructions named like the originals, in the originals' units."""
    model = MedVAE.from_pretrained(DEFAULT_MODEL).eval()
    s = model.downsample_per_axis
    folders = {"medlatent": out / "medlatent", "bicubic": out / "bicubic"}
    for f in sorted(originals.iterdir()):
        img = read_image(f)
        stem = f.name.split(".")[0]
        x, rec = preprocess(img, spatial_dims=2, in_channels=1, downsample=s)
        z = model.encode(torch.from_numpy(x)[None]).mean.half().float()
        y = restore(model.decode(z)[0].numpy(), rec, "float32")
        write_image(ImageData(y, img.affine), folders["medlatent"] / f"{stem}.nii.gz", "nifti")
        raw = torch.from_numpy(img.array.astype(np.float32))[None]
        h, w = raw.shape[2:]
        pad = torch.nn.functional.pad(raw, (0, (-w) % s, 0, (-h) % s), mode="replicate")
        b = roundtrip(pad, s, "bicubic")[0, :, :h, :w].numpy()
        write_image(ImageData(b, img.affine), folders["bicubic"] / f"{stem}.nii.gz", "nifti")
    return folders


def simulate_answers(study: Path, tokens: dict[str, str], seed: int = 0) -> None:
    """Simulated readers (see the module docstring), entered through the API like a browser would."""
    from fastapi.testclient import TestClient

    from medlatent.readerstudy.app import create_app
    from medlatent.readerstudy.questions import QUESTIONS

    conn = sqlite3.connect(study / "study.sqlite")
    files = {pid: (o, r) for pid, o, r in conn.execute(
        "SELECT p.id, io.file, ir.file FROM pairs p JOIN images io ON io.id = p.original_image "
        "JOIN images ir ON ir.id = p.recon_image")}
    rng = np.random.default_rng(seed)
    app = create_app(study)
    for k, (name, token) in enumerate(tokens.items()):
        c = TestClient(app, headers={"Authorization": f"Bearer {token}"})
        total = c.get("/api/me").json()["total"]
        for pos in range(1, total + 1):
            item = c.get(f"/api/items/{pos}").json()
            o, r = (np.load(study / "images" / f).astype(np.float64) / 65535 for f in files[item["pair_id"]])
            psnr = 10 * np.log10(1 / max(np.mean((o - r) ** 2), 1e-12))
            base = (psnr - 30) / 4 + (k - 1) * 0.3
            s = {q: int(np.clip(np.rint(base + rng.normal(0, 0.6)), -2, 2)) for q in QUESTIONS}
            c.post("/api/answers", json={"pair_id": item["pair_id"], **s, "seconds": float(rng.uniform(8, 40))})
        c.post("/api/finish")


def screenshot(study: Path, token: str, path: Path) -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from medlatent.readerstudy.app import create_app

    srv = uvicorn.Server(uvicorn.Config(create_app(study), host="127.0.0.1", port=8791, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            pg = browser.new_page(viewport={"width": 1400, "height": 860})
            pg.goto(f"http://127.0.0.1:8791/r/{token}")
            # a CSS selector, not a JS predicate: the page's Content-Security-Policy forbids eval
            pg.wait_for_selector("#left[data-zoom]", state="attached")
            box = pg.get_by_test_id("left").bounding_box()
            pg.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.4)
            pg.mouse.wheel(0, -300)  # zoomed in: both sides follow
            pg.get_by_test_id("score-fidelity-1").click()
            pg.get_by_test_id("score-features-1").click()
            pg.wait_for_timeout(300)
            pg.screenshot(path=str(path))
            browser.close()
    finally:
        srv.should_exit = True
        th.join(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--screenshots", type=Path)
    args = ap.parse_args()
    from medlatent.readerstudy.analysis import analyze
    from medlatent.readerstudy.db import answer_records, open_study
    from medlatent.readerstudy.study import MethodSource, create_study, pairs_from_folders

    shutil.rmtree(args.out, ignore_errors=True)
    samples = gather(args.out / "samples", max_size_2d=512, max_size_3d=0)
    originals = args.out / "samples" / "2d"
    for f in originals.iterdir():
        if "ultrasound" in f.name:  # colour ultrasound: not what the paper's readers scored
            f.unlink()
    print(f"{len(samples.written)} samples")
    folders = reconstruct(originals, args.out / "recon")
    specs = pairs_from_folders(originals, [MethodSource(m, d, "16") for m, d in folders.items()])
    tokens = dict(create_study(args.out / "study", specs, ["reader1", "reader2", "reader3"],
                               title="Demo: medlatent default model vs bicubic at equal values (f=16, C=1)"))
    if args.screenshots:  # before the simulated answers: the first reader's first pair
        args.screenshots.mkdir(parents=True, exist_ok=True)
        screenshot(args.out / "study", tokens["reader1"], args.screenshots / "reader-study.png")
    simulate_answers(args.out / "study", tokens)
    result = analyze(answer_records(open_study(args.out / "study")), args.out / "study" / "analysis",
                     compare=("medlatent", "bicubic"))
    print(f"report: {result['paths']['report']}")
    if args.screenshots:
        shutil.copy(result["paths"]["figure"], args.screenshots / "reader-study-scores.png")


if __name__ == "__main__":
    main()
