"""The reader app against hostile or unlucky clients: Finish racing a write, malformed input of every kind,
the browser security headers and the request-body limit.

Races are forced, not hoped for: the study connection is wrapped so that another request runs at the moment a
write's transaction begins, i.e. after the request looked its reader up and before it writes.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import medlatent.readerstudy.app as app_module  # noqa: E402
from medlatent.readerstudy.app import MAX_BODY_BYTES, STATIC, create_app  # noqa: E402
from readerstudy_fixtures import make_study  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return make_study(tmp_path_factory.mktemp("rs-hostile"))


@pytest.fixture()
def study(built, tmp_path) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the module's study (answers do not leak between tests)."""
    dest = tmp_path / "study"
    shutil.copytree(built[0], dest)
    return dest, built[1]


def client(study: Path, token: str | None) -> TestClient:
    """A client that sees a server error as a 500 response, as a browser would, instead of raising it."""
    c = TestClient(create_app(study), raise_server_exceptions=False)
    if token:
        c.headers["Authorization"] = f"Bearer {token}"
    return c


def scores(f=1, g=0, a=-1) -> dict:
    return {"fidelity": f, "features": g, "artifacts": a}


def pair_ids(c: TestClient) -> list[str]:
    return [c.get(f"/api/items/{p}").json()["pair_id"] for p in range(1, 5)]


def answer_all(c: TestClient) -> list[str]:
    ids = pair_ids(c)
    for pid in ids:
        assert c.post("/api/answers", json={"pair_id": pid, **scores()}).status_code == 201
    return ids


def locked_at(root: Path, reader: str) -> str | None:
    conn = sqlite3.connect(root / "study.sqlite")
    try:
        return conn.execute("SELECT locked_at FROM readers WHERE name = ?", (reader,)).fetchone()[0]
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ races
class _Interleaved:
    """A study connection that runs the next queued hook just before it begins a transaction (every write does)."""

    def __init__(self, conn: sqlite3.Connection, hooks: list[Callable[[], None]]):
        self._conn, self._hooks = conn, hooks

    def execute(self, sql: str, *args):
        if sql.lstrip().upper().startswith("BEGIN") and self._hooks:
            self._hooks.pop(0)()  # popped first: the hook's own request begins its transaction undisturbed
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


@pytest.fixture()
def interleave(monkeypatch) -> list[Callable[[], None]]:
    """Hooks to run, one per transaction begun by any request's connection, in order."""
    hooks: list[Callable[[], None]] = []
    real = app_module.connect
    monkeypatch.setattr(app_module, "connect", lambda path: _Interleaved(real(path), hooks))
    return hooks


def test_finish_committed_during_a_revision_wins(study, interleave):
    root, tokens = study
    c, tab = client(root, tokens["alice"]), client(root, tokens["alice"])  # the same reader in a second tab
    ids = answer_all(c)
    finished: list[int] = []
    interleave.append(lambda: finished.append(tab.post("/api/finish").status_code))
    r = c.put(f"/api/answers/{ids[0]}", json=scores(-2, -2, -2))
    assert finished == [200]  # Finish committed after the revision looked the reader up, before it wrote
    assert r.status_code == 423, r.text
    assert c.get("/api/items/1").json()["answer"] == {**scores(), "revisions": 0}
    assert locked_at(root, "alice") is not None


def test_finish_and_answers_interleave_consistently(study, interleave):
    root, tokens = study
    c, tab = client(root, tokens["alice"]), client(root, tokens["alice"])
    ids = pair_ids(c)
    for pid in ids[:3]:
        assert c.post("/api/answers", json={"pair_id": pid, **scores()}).status_code == 201
    # Finish just before the last answer is written: it counts 3 of 4 answered and refuses; the answer lands
    finished: list[int] = []
    interleave.append(lambda: finished.append(tab.post("/api/finish").status_code))
    assert c.post("/api/answers", json={"pair_id": ids[3], **scores()}).status_code == 201
    assert finished == [409] and locked_at(root, "alice") is None
    # Finish just before a (duplicate) answer is written: the answer meets a finished reader
    interleave.append(lambda: finished.append(tab.post("/api/finish").status_code))
    r = c.post("/api/answers", json={"pair_id": ids[0], **scores(2, 2, 2)})
    assert finished == [409, 200]
    assert r.status_code == 423 and "final" in r.json()["detail"], r.text


def test_two_finishes_lock_once(study, interleave, monkeypatch):
    root, tokens = study
    stamps = iter(f"2026-01-01T00:00:{s:02d}+00:00" for s in range(60))
    monkeypatch.setattr(app_module, "now", lambda: next(stamps))
    c, tab = client(root, tokens["alice"]), client(root, tokens["alice"])
    answer_all(c)  # stamps 00..03
    first: list[int] = []
    interleave.append(lambda: first.append(tab.post("/api/finish").status_code))  # stamp 04
    r = c.post("/api/finish")
    assert first == [200] and r.status_code == 200 and r.json()["locked"] is True
    assert locked_at(root, "alice") == "2026-01-01T00:00:04+00:00"  # the first Finish's time is kept


def test_the_same_answer_twice_at_once_is_saved_once(study, interleave):
    root, tokens = study
    c, tab = client(root, tokens["alice"]), client(root, tokens["alice"])
    pid = pair_ids(c)[0]
    inner: list[int] = []
    interleave.append(lambda: inner.append(tab.post("/api/answers", json={"pair_id": pid, **scores(2, 2, 2)})
                                           .status_code))
    r = c.post("/api/answers", json={"pair_id": pid, **scores(-2, -2, -2)})
    assert inner == [201] and r.status_code == 409
    assert c.get("/api/items/1").json()["answer"] == {**scores(2, 2, 2), "revisions": 0}


# ------------------------------------------------------------------------------------------ hostile input
PID = "@PID@"  # replaced by a real pair id of the reader
BIG = "9" * 5000  # more digits than Python converts to int from text by default


def scored(fidelity: str) -> str:
    """An answer's JSON text with ``fidelity`` as given (the other scores valid)."""
    return '{"pair_id": "' + PID + '", "fidelity": ' + fidelity + ', "features": 0, "artifacts": 0}'


def with_answer(extra: str) -> str:
    """A valid answer's JSON text with ``extra`` members added."""
    return '{"pair_id": "' + PID + '", "fidelity": 1, "features": 0, "artifacts": 0, ' + extra + "}"


JSON_BODIES = {
    "seconds-nan": with_answer('"seconds": NaN'),
    "seconds-inf": with_answer('"seconds": Infinity'),
    "seconds-neg-inf": with_answer('"seconds": -Infinity'),
    "seconds-1e999": with_answer('"seconds": 1e999'),
    "seconds-negative": with_answer('"seconds": -1'),
    "seconds-string": with_answer('"seconds": "soon"'),
    "seconds-huge-int": with_answer(f'"seconds": {2**64}'),
    "seconds-5000-digits": with_answer(f'"seconds": {BIG}'),
    "score-nan": scored("NaN"),
    "score-inf": scored("-Infinity"),
    "score-2^64": scored("18446744073709551616"),
    "score-5000-digits": scored(BIG),
    "score-nested": scored('{"a": [1, {"b": null}]}'),
    "score-bool": scored("true"),
    "pair-int": '{"pair_id": 12345, "fidelity": 1, "features": 0, "artifacts": 0}',
    "pair-newline": '{"pair_id": "0123456789abcdef\\n", "fidelity": 1, "features": 0, "artifacts": 0}',
    "pair-nul": '{"pair_id": "0123456789abcde\\u0000", "fidelity": 1, "features": 0, "artifacts": 0}',
    "pair-surrogate": '{"pair_id": "\\ud800", "fidelity": 1, "features": 0, "artifacts": 0}',
    "key-surrogate": with_answer('"\\udfff": 1'),
    "missing-scores": '{"pair_id": "@PID@"}',
    "empty-object": "{}",
    "array": "[1, 2, 3]",
    "null": "null",
    "string": '"an answer"',
    "number": "1",
    "empty": "",
    "truncated": '{"pair_id": ',
    "not-json": "fidelity=1&features=0",
    "deep-nesting": "[" * 20000 + "]" * 20000,
}
RAW_BODIES = {  # (content type, bytes)
    "invalid-utf8-json": ("application/json", b'{"pair_id": "\xff\xfe", "fidelity": 1}'),
    "utf16-bom-json": ("application/json", '{"fidelity": 1}'.encode("utf-16")),
    "text-plain-json": ("text/plain", b'{"pair_id": "0123456789abcdef", "fidelity": 1}'),
    "text-plain-invalid-utf8": ("text/plain", b"\xff\xfe\xfd not text"),
    "form": ("application/x-www-form-urlencoded", b"fidelity=1&features=0&artifacts=0"),
    "multipart": ("multipart/form-data; boundary=x",
                  b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--"),
    "octet-stream": ("application/octet-stream", bytes(range(256))),
    "bad-charset": ("application/json; charset=does-not-exist", b'{"fidelity": 1}'),
}
POSITIONS = [str(2**63), str(2**64), str(-(2**63) - 1), BIG, "-1", "0", "5", "abc", "1.5", "1e3", "NaN", "Infinity",
             "-Infinity", "0x10", "%20", "%00", "%EF%BC%91"]
IDS = ["0123456789abcdef%0A", "%00", "%FF", "%ED%A0%80", "a" * 10000, "..", "0123456789ABCDEF"]
AUTH = [b"", b"Bearer", b"Bearer ", b"Bearer x", b"Bearer " + b"a" * 100_000, b"Bearer \xff\xfe", b"Basic abc",
        b"Bearer  spaced  ", b"bearer\tabc"]


def assert_json_4xx(r, case) -> None:
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), (case, r.headers["content-type"])
    assert "detail" in r.json(), case


@pytest.fixture(scope="module")
def hostile(built, tmp_path_factory) -> tuple[TestClient, str]:
    """A client of alice's on a copy of the study (no request here can write: every one is refused)."""
    dest = tmp_path_factory.mktemp("rs-hostile-inputs") / "study"
    shutil.copytree(built[0], dest)
    c = client(dest, built[1]["alice"])
    return c, c.get("/api/items/1").json()["pair_id"]


@pytest.mark.parametrize("name", sorted(JSON_BODIES))
def test_malformed_json_answers_get_a_json_4xx(hostile, name):
    c, pid = hostile
    body = JSON_BODIES[name].replace(PID, pid).encode()
    for method, url in (("POST", "/api/answers"), ("PUT", f"/api/answers/{pid}")):
        assert_json_4xx(c.request(method, url, content=body, headers={"Content-Type": "application/json"}),
                        (method, name))
    assert c.get("/api/answers").json() == []


def test_validation_errors_name_the_field_and_do_not_echo_the_input(hostile):
    c, pid = hostile
    for body, loc, msg in ((with_answer('"seconds": NaN'), ["body", "seconds"], "finite"),
                           (with_answer('"\\udfff": 1'), ["body"], "unicode"),
                           (with_answer(f'"{"k" * 10000}": 1'), ["body", "k" * 200], "not permitted"),
                           (scored("Infinity"), ["body", "fidelity"], "integer")):
        r = c.post("/api/answers", content=body.replace(PID, pid), headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["loc"] == loc and msg in error["msg"] and "input" not in error, error


@pytest.mark.parametrize("name", sorted(RAW_BODIES))
def test_bodies_of_the_wrong_type_or_encoding_get_a_json_4xx(hostile, name):
    c, pid = hostile
    ctype, body = RAW_BODIES[name]
    for method, url in (("POST", "/api/answers"), ("PUT", f"/api/answers/{pid}")):
        assert_json_4xx(c.request(method, url, content=body, headers={"Content-Type": ctype}), (method, name))


@pytest.mark.parametrize("position", POSITIONS)
def test_odd_item_positions_get_a_json_4xx(hostile, position):
    c, _ = hostile
    assert_json_4xx(c.get(f"/api/items/{position}"), position)


@pytest.mark.parametrize("ident", IDS, ids=lambda s: s[:20])
def test_odd_image_and_pair_ids_get_a_json_4xx(hostile, ident):
    c, _ = hostile
    assert_json_4xx(c.get(f"/api/images/{ident}"), ident)
    assert_json_4xx(c.put(f"/api/answers/{ident}", json=scores()), ident)


@pytest.mark.parametrize("auth", AUTH, ids=lambda b: repr(b[:16]))
def test_odd_authorization_headers_get_a_json_401(hostile, auth):
    c, pid = hostile
    anon = TestClient(c.app, raise_server_exceptions=False)
    for method, url, body in (("GET", "/api/me", None), ("GET", "/api/items/1", None),
                              ("POST", "/api/answers", {"pair_id": pid, **scores()}), ("POST", "/api/finish", None)):
        r = anon.request(method, url, json=body, headers={"Authorization": auth})
        assert r.status_code == 401, (auth[:20], url, r.status_code)
        assert_json_4xx(r, url)


@pytest.mark.parametrize("token", ["%FF", "%00", "%ED%A0%80", "a" * 5000, "x%2Fy", "%2E%2E"], ids=lambda s: s[:12])
def test_odd_reader_links_are_not_found(hostile, token):
    c, _ = hostile
    r = TestClient(c.app, raise_server_exceptions=False).get(f"/r/{token}")
    assert r.status_code == 404, (token[:20], r.status_code)


# ------------------------------------------------------------------------------------------ headers and body size
EXPECTED_CSP = {
    "default-src": ["'none'"], "script-src": ["'self'"], "style-src": ["'self'"], "img-src": ["'self'"],
    "connect-src": ["'self'"], "base-uri": ["'none'"], "form-action": ["'none'"], "frame-ancestors": ["'none'"],
}


def csp(header: str) -> dict[str, list[str]]:
    parts = [p.split() for p in header.split(";") if p.strip()]
    return {p[0]: p[1:] for p in parts}


def test_every_response_carries_the_security_headers(study):
    root, tokens = study
    c, anon = client(root, tokens["alice"]), client(root, None)
    responses = {"page": anon.get(f"/r/{tokens['alice']}"), "home": anon.get("/"), "js": anon.get("/static/reader.js"),
                 "css": anon.get("/static/reader.css"), "me": c.get("/api/me"), "401": anon.get("/api/me"),
                 "404": c.get("/api/items/99"), "422": c.post("/api/answers", json={}),
                 "unknown link": anon.get("/r/nope"),
                 "413": c.post("/api/answers", content=b" " * (MAX_BODY_BYTES + 1),
                               headers={"Content-Type": "application/json"})}
    assert responses["413"].status_code == 413
    for name, r in responses.items():
        assert csp(r.headers.get("content-security-policy", "")) == EXPECTED_CSP, name
        assert r.headers["x-content-type-options"] == "nosniff", name
        assert r.headers["referrer-policy"] == "no-referrer", name
        assert r.headers["x-frame-options"] == "DENY", name


class _Page(HTMLParser):
    """Everything in the reader page that a strict CSP would block or that loads from elsewhere."""

    def __init__(self):
        super().__init__()
        self.blocked: list[str] = []
        self.loads: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.blocked += [f"{tag}[{k}]" for k in a if k == "style" or k.startswith("on")]
        if tag == "style" or (tag == "script" and "src" not in a):
            self.blocked.append(f"inline <{tag}>")
        self.loads += [a[k] for k in ("src", "href") if k in a and tag in ("script", "link", "img")]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.blocked.append("inline script text")


def test_reader_page_needs_nothing_the_policy_forbids():
    page = _Page()
    page.feed((STATIC / "reader.html").read_text())
    assert page.blocked == [] and page.loads and all(u.startswith("/static/") for u in page.loads), page.__dict__
    js = (STATIC / "reader.js").read_text()
    for needs_more in ("eval(", "new Function", "createObjectURL", "setAttribute(\"style\"", "http://", "https://",
                       "<script", "<style"):
        assert needs_more not in js, needs_more
    assert not re.search(r"[\"'`](blob|data):", js)  # no blob: or data: URLs
    css = (STATIC / "reader.css").read_text()
    assert "url(" not in css and "@import" not in css


def test_body_at_the_limit_is_read_and_a_larger_one_refused(study):
    root, tokens = study
    c = client(root, tokens["alice"])
    pid = pair_ids(c)[0]
    answer = json.dumps({"pair_id": pid, **scores()}).encode()
    padded = answer + b" " * (MAX_BODY_BYTES - len(answer))  # JSON allows trailing whitespace
    r = c.post("/api/answers", content=padded + b" ", headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"], r.text
    assert c.post("/api/answers", content=padded, headers={"Content-Type": "application/json"}).status_code == 201


def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: int, size: int) -> tuple[int, int]:
    """POST ``chunks`` body chunks of ``size`` bytes straight into the ASGI app: (status, chunks it asked for)."""
    asked = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal asked
        asked += 1
        if asked > chunks:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b" " * size, "more_body": asked < chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/answers", "raw_path": b"/api/answers", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), asked


def test_large_bodies_are_refused_without_being_read_whole(study):
    root, tokens = study
    app = create_app(root)
    auth = (b"authorization", f"Bearer {tokens['alice']}".encode())
    # declared too large: refused before a byte of it is read
    status, asked = _asgi_post(app, [auth, (b"content-length", str(10 * 2**30).encode())], chunks=2, size=2**16)
    assert (status, asked) == (413, 0)
    # streamed without a length (chunked): reading stops at the first chunk past the limit
    chunk = 2**14
    status, asked = _asgi_post(app, [auth], chunks=1024, size=chunk)  # 16 MiB offered
    assert status == 413 and asked == MAX_BODY_BYTES // chunk + 1
    # a malformed length is the client's error too
    status, asked = _asgi_post(app, [auth, (b"content-length", b"lots")], chunks=1, size=10)
    assert (status, asked) == (400, 0)
