"""End to end in a real headless browser (Debian's chromium driven by Playwright): a reader opens their link,
zooms/pans/windows, scores pairs with the mouse and with keyboard shortcuts, reloads, resumes, revises, finishes;
then the database and the analysis are checked.

CI installs chromium (``.ci/run``) and sets ``MEDLATENT_REQUIRE_BROWSER=1``, so there a missing browser fails
instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time

import pytest

from readerstudy_fixtures import make_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("MEDLATENT_REQUIRE_BROWSER") == "1"
# waits poll through Playwright's expect(): page.wait_for_function evaluates strings in the page, which the
# app's Content-Security-Policy (no 'unsafe-eval') rightly forbids
WAIT_MS = 30_000


def _need(ok: bool, why: str) -> None:
    if not ok:
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    """The study app under uvicorn in a thread, on a free loopback port."""
    uvicorn = pytest.importorskip("uvicorn")
    from medlatent.readerstudy.app import create_app

    root, tokens = make_study(tmp_path, readers=("alice", "bob"))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root, tokens
    srv.should_exit = True
    th.join(timeout=10)


@pytest.fixture()
def page():
    _need(CHROMIUM is not None, "chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        # the page must work under the app's Content-Security-Policy: anything it blocks is an error
        pg.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        yield pg
        browser.close()
        assert not errors, errors


def view(pg, testid: str) -> dict:
    """The canvas's view state (zoom, centre, window) as the page publishes it."""
    return pg.get_by_test_id(testid).evaluate("c => { const {testid, ...v} = c.dataset; return v; }")


def test_reader_scores_with_mouse_and_keys_reloads_resumes_revises_and_finishes(server, page):
    from playwright.sync_api import expect

    from medlatent.readerstudy.analysis import analyze
    from medlatent.readerstudy.db import answer_records, open_study

    base, root, tokens = server
    pg = page
    pg.goto(f"{base}/r/{tokens['alice']}")
    progress, position = pg.get_by_test_id("progress"), pg.get_by_test_id("position")
    expect(pg.get_by_test_id("left")).to_have_attribute("data-zoom", re.compile("."), timeout=WAIT_MS)
    assert progress.inner_text() == "0 / 4 answered" and position.inner_text() == "Pair 1 of 4"
    assert pg.get_by_test_id("reader").inner_text() == "alice"

    # synchronised zoom, pan and window/level
    left = pg.get_by_test_id("left").bounding_box()
    pg.mouse.move(left["x"] + left["width"] / 3, left["y"] + left["height"] / 3)
    pg.mouse.wheel(0, -400)
    expect(pg.get_by_test_id("left")).not_to_have_attribute("data-zoom", "1.0000", timeout=WAIT_MS)  # > 1.5 below
    right = pg.get_by_test_id("right").bounding_box()
    cx, cy = right["x"] + right["width"] / 2, right["y"] + right["height"] / 2
    pg.mouse.move(cx, cy)
    pg.mouse.down()
    pg.mouse.move(cx + 60, cy + 30, steps=4)
    pg.mouse.up()
    lv, rv = view(pg, "left"), view(pg, "right")
    assert lv == rv and float(lv["zoom"]) > 1.5
    pg.keyboard.down("Shift")  # shift-drag: window/level
    pg.mouse.move(cx, cy)
    pg.mouse.down()
    pg.mouse.move(cx + 80, cy - 40, steps=4)
    pg.mouse.up()
    pg.keyboard.up("Shift")
    lv2, rv2 = view(pg, "left"), view(pg, "right")
    assert lv2 == rv2 and lv2["ww"] != lv["ww"] and lv2["wc"] != lv["wc"] and lv2["cx"] == lv["cx"]
    pg.get_by_role("button", name="Reset view").click()
    assert float(view(pg, "right")["zoom"]) == 1.0

    # pair 1 with the mouse
    for q, s in (("fidelity", 1), ("features", 2), ("artifacts", -1)):
        pg.get_by_test_id(f"score-{q}-{s}").click()
    pg.get_by_test_id("save").click()
    expect(progress).to_have_text("1 / 4 answered", timeout=WAIT_MS)
    expect(position).to_have_text("Pair 2 of 4", timeout=WAIT_MS)

    # pair 2 with the keyboard: 4 → +1, 5 → +2, 3 → 0, Enter saves
    pg.locator("body").click(position={"x": 5, "y": 5})
    for key in ("4", "5", "3"):
        pg.keyboard.press(key)
    pg.keyboard.press("Enter")
    expect(progress).to_have_text("2 / 4 answered", timeout=WAIT_MS)
    expect(position).to_have_text("Pair 3 of 4", timeout=WAIT_MS)

    # reload: resumes at the first unanswered pair
    pg.reload()
    expect(position).to_have_text("Pair 3 of 4", timeout=WAIT_MS)
    assert progress.inner_text() == "2 / 4 answered"

    # back to pair 1: saved answer shown and locked until the reader chooses to revise
    pg.keyboard.press("ArrowLeft")
    expect(position).to_have_text("Pair 2 of 4", timeout=WAIT_MS)
    pg.keyboard.press("ArrowLeft")
    expect(position).to_have_text("Pair 1 of 4", timeout=WAIT_MS)
    assert pg.get_by_test_id("score-features-2").get_attribute("class") == "selected"
    assert pg.get_by_test_id("score-fidelity--2").is_disabled()
    pg.keyboard.press("1")  # ignored: not revising
    assert "Revise" in pg.get_by_test_id("status").inner_text()
    pg.get_by_test_id("revise").click()
    pg.get_by_test_id("score-fidelity--2").click()
    pg.get_by_test_id("save").click()
    expect(pg.get_by_test_id("status")).to_have_text("Revision saved.", timeout=WAIT_MS)

    # pairs 3 and 4 by keyboard, then finish
    pg.get_by_test_id("next").click()
    expect(position).to_have_text("Pair 2 of 4", timeout=WAIT_MS)
    pg.keyboard.press("ArrowRight")
    expect(position).to_have_text("Pair 3 of 4", timeout=WAIT_MS)
    for keys in (("1", "2", "3"), ("5", "5", "5")):
        for key in keys:
            pg.keyboard.press(key)
        pg.keyboard.press("Enter")
        if keys[0] == "1":
            expect(position).to_have_text("Pair 4 of 4", timeout=WAIT_MS)
    expect(progress).to_have_text("4 / 4 answered", timeout=WAIT_MS)
    pg.get_by_test_id("finish").click()
    pg.get_by_test_id("done").wait_for()
    pg.reload()
    pg.get_by_test_id("done").wait_for()  # a finished reader sees the thank-you page, not the pairs

    # the database holds exactly what was entered, in the reader's order
    conn = open_study(root)
    rows = conn.execute("""SELECT s.position, a.fidelity, a.features, a.artifacts, a.revisions, a.seconds
                           FROM answers a JOIN assignments s ON s.pair_id = a.pair_id AND s.reader_id = a.reader_id
                           JOIN readers r ON r.id = a.reader_id WHERE r.name = 'alice' ORDER BY s.position""")
    got = [tuple(r)[:5] for r in rows]
    assert got == [(1, -2, 2, -1, 1), (2, 1, 2, 0, 0), (3, -2, -1, 0, 0), (4, 2, 2, 2, 0)]
    assert conn.execute("SELECT locked_at IS NOT NULL FROM readers WHERE name = 'alice'").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM answers a JOIN readers r ON r.id = a.reader_id "
                        "WHERE r.name = 'bob'").fetchone()[0] == 0
    result = analyze(answer_records(conn), root / "analysis", n_boot=200)
    by = {(r["method"], r["question"]): r for r in result["summary"]}
    assert sum(r["n_answers"] for r in result["summary"]) == 4 * 3
    assert {m for m, _ in by} == {"bicubic", "nearest"} and (root / "analysis" / "scores.png").stat().st_size > 0
