"""The reader web app (FastAPI): a reader opens their link, scores pairs, and every answer is saved at once.

Every API request carries the reader's token (``Authorization: Bearer …``); the reader is looked up by the
token's digest and can read and write only their own order and answers. Method and factor never leave the server:
the client sees opaque pair and image ids. Image files are served only by id, from the study's image folder, and
only for pairs assigned to the reader.

    GET  /r/{token}              the reader page (static HTML + JS)
    GET  /api/me                 reader name, progress, questions, whether revision is allowed
    GET  /api/items/{position}   the pair at a 1-based position of the reader's order (+ the saved answer)
    GET  /api/images/{image_id}  16-bit display image (raw little-endian uint16, X-Rows/X-Cols headers)
    POST /api/answers            first answer to a pair (409 if it is answered already)
    PUT  /api/answers/{pair_id}  revise an answer (only before the reader finishes, and if the study allows it)
    GET  /api/answers            the reader's own answers
    POST /api/finish             lock the reader's answers once every pair is answered

Every write checks that the reader has not finished inside its own ``BEGIN IMMEDIATE`` transaction, so a Finish
pressed in another tab while a revision is in flight can never be followed by that revision. Bad client input
always gets a 4xx with a JSON ``detail``; request bodies over :data:`MAX_BODY_BYTES` get 413 unread. Every
response carries a Content-Security-Policy that allows only the page's own script, style and API calls.
"""

# no ``from __future__ import annotations``: FastAPI must resolve the dependency aliases defined in create_app
import json
import re
import sqlite3
from pathlib import Path
from typing import Annotated, Iterator, Optional

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medlatent.readerstudy.db import DB_NAME, IMAGES_DIR, connect, meta, now, open_study, token_digest, transaction
from medlatent.readerstudy.questions import LABELS, PROMPTS, QUESTIONS, SCORES, SHORT

STATIC = Path(__file__).parent / "static"
_IMAGE_ID = re.compile(r"^[0-9a-f]{16}$")  # fullmatch in Python: "$" alone also matches before a final newline
_PAIR_ID = _IMAGE_ID
_MAX_POSITION = 2**63 - 1  # SQLite's largest INTEGER; a larger Python int cannot even be bound as a parameter
MAX_BODY_BYTES = 64 * 1024  # an answer is ~150 bytes of JSON
# the page loads its own script and style and calls its own API; nothing inline, nothing from elsewhere
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the link's token must not leak to other sites
    "X-Frame-Options": "DENY",
}

Score = Annotated[int, Field(ge=-2, le=2, strict=True)]


class Answer(BaseModel):
    """Scores for the three questions (−2..2) and, optionally, the seconds spent on the pair."""

    model_config = ConfigDict(extra="forbid")
    fidelity: Score
    features: Score
    artifacts: Score
    seconds: Optional[float] = Field(default=None, ge=0, le=86400, allow_inf_nan=False)


class NewAnswer(Answer):
    pair_id: str = Field(pattern=_PAIR_ID.pattern)


class Reader(BaseModel):
    id: int
    name: str
    locked: bool


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every response, errors and refusals included."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]
        self.names = {k for k, _ in self.headers}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.names]
                message = {**message, "headers": kept + self.headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 as soon as that is known — from its
    Content-Length, or else after the first chunk past the limit — so a huge body is never read whole."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await _refuse(send, 400, "malformed Content-Length header")
        if declared is not None and int(declared) > self.limit:
            return await _refuse(send, 413, f"request body over the limit of {self.limit} bytes")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _refuse(send, 413, f"request body over the limit of {self.limit} bytes")
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then defers to the server (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _refuse(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})  # the rest of the body stays unread: end the connection
    await send({"type": "http.response.body", "body": payload})


def _printable(part: object) -> object:
    """A location part safe to put in a JSON reply: a body key may hold a lone surrogate, or be 60 KB long."""
    return part.encode("utf-8", "replace").decode("utf-8")[:200] if isinstance(part, str) else part


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each invalid field and the problem. The offending input is not echoed: it may be NaN,
    invalid UTF-8 bytes or a lone surrogate, none of which JSON can carry, and the client has it anyway."""
    errors = [{"loc": [_printable(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "invalid")),
               "type": str(e.get("type", ""))} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def create_app(study: str | Path) -> FastAPI:
    """The app for the study folder ``study`` (its database must exist; see ``medlatent reader-study create``)."""
    root = Path(study).resolve()
    images = (root / IMAGES_DIR).resolve()
    first = open_study(root)  # fails early, naming the folder, when it is not a study
    settings = meta(first)
    first.close()
    allow_revision = settings.get("allow_revision", "1") == "1"

    def db() -> Iterator[sqlite3.Connection]:
        """One connection per request: SQLite serialises writers; a shared connection would mix transactions."""
        conn = connect(root / DB_NAME)
        try:
            yield conn
        finally:
            conn.close()

    DB = Annotated[sqlite3.Connection, Depends(db)]
    app = FastAPI(title=f"medlatent reader study: {settings.get('title', '')}", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)  # added last, so outermost: a 413 carries the headers too
    app.add_exception_handler(RequestValidationError, invalid_request)

    def reader(conn: DB, authorization: Annotated[Optional[str], Header()] = None) -> Reader:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "a reader token is required (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})
        row = conn.execute("SELECT id, name, locked_at FROM readers WHERE token_sha256 = ?",
                           (token_digest(token.strip()),)).fetchone()
        if row is None:
            raise HTTPException(401, "unknown reader token", headers={"WWW-Authenticate": "Bearer"})
        return Reader(id=row["id"], name=row["name"], locked=row["locked_at"] is not None)

    Me = Annotated[Reader, Depends(reader)]

    def counts(conn: sqlite3.Connection, r: Reader) -> tuple[int, int, int | None]:
        """(pairs assigned, pairs answered, first unanswered position or None) in one pass over the order."""
        row = conn.execute(
            """SELECT COUNT(*), COUNT(a.pair_id), MIN(CASE WHEN a.pair_id IS NULL THEN s.position END)
               FROM assignments s LEFT JOIN answers a ON a.reader_id = s.reader_id AND a.pair_id = s.pair_id
               WHERE s.reader_id = ?""", (r.id,)).fetchone()
        return row[0], row[1], row[2]

    def saved(conn: sqlite3.Connection, r: Reader, pair_id: str) -> dict | None:
        row = conn.execute(f"SELECT {', '.join(QUESTIONS)}, revisions FROM answers WHERE reader_id = ? AND pair_id = ?",
                           (r.id, pair_id)).fetchone()
        return dict(row) if row else None

    def refuse_if_finished(conn: sqlite3.Connection, r: Reader) -> None:
        """Called inside the write's transaction: a Finish may have committed since ``r`` was looked up."""
        if conn.execute("SELECT locked_at FROM readers WHERE id = ?", (r.id,)).fetchone()["locked_at"] is not None:
            raise HTTPException(423, "your answers are final (you finished the study)")

    def assigned(conn: sqlite3.Connection, r: Reader, pair_id: str) -> int:
        row = conn.execute("SELECT position FROM assignments WHERE reader_id = ? AND pair_id = ?",
                           (r.id, pair_id)).fetchone()
        if row is None:
            raise HTTPException(404, "unknown pair")
        return row["position"]

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return ("<!doctype html><title>medlatent reader study</title><p>This is a blinded reader study. "
                "Open the personal link you were given.</p>")

    @app.get("/r/{token}")
    def page(token: str, conn: DB) -> Response:
        if conn.execute("SELECT 1 FROM readers WHERE token_sha256 = ?", (token_digest(token),)).fetchone() is None:
            return HTMLResponse("<!doctype html><title>Unknown link</title><p>This reader link is not valid.</p>", 404)
        return FileResponse(STATIC / "reader.html", media_type="text/html")

    @app.get("/api/me")
    def me(r: Me, conn: DB) -> dict:
        n, done, nxt = counts(conn, r)
        return {"reader": r.name, "title": settings.get("title", ""), "total": n, "answered": done,
                "next_position": nxt, "locked": r.locked, "allow_revision": allow_revision and not r.locked,
                "questions": [{"key": q, "prompt": PROMPTS[q], "short": SHORT[q]} for q in QUESTIONS],
                "scores": [{"value": s, "label": LABELS[s]} for s in SCORES]}

    @app.get("/api/items/{position}")
    def item(position: int, r: Me, conn: DB) -> dict:
        if not 1 <= position <= _MAX_POSITION:
            raise HTTPException(404, "no item at that position")
        row = conn.execute(
            """SELECT s.position, p.id AS pair_id, p.original_image, p.recon_image, c.lo, c.hi,
                      c.window_center, c.window_width, o.rows, o.cols
               FROM assignments s JOIN pairs p ON p.id = s.pair_id JOIN cases c ON c.id = p.case_id
               JOIN images o ON o.id = p.original_image
               WHERE s.reader_id = ? AND s.position = ?""", (r.id, position)).fetchone()
        if row is None:
            raise HTTPException(404, f"no item at position {position}")
        n, _, _ = counts(conn, r)
        return {"position": position, "total": n, "pair_id": row["pair_id"],
                "left": {"image_id": row["original_image"]}, "right": {"image_id": row["recon_image"]},
                "rows": row["rows"], "cols": row["cols"], "range": [row["lo"], row["hi"]],
                "window": {"center": row["window_center"], "width": row["window_width"]},
                "answer": saved(conn, r, row["pair_id"])}

    @app.get("/api/images/{image_id}")
    def image(image_id: str, r: Me, conn: DB) -> Response:
        if not _IMAGE_ID.fullmatch(image_id):
            raise HTTPException(404, "unknown image")
        row = conn.execute(
            """SELECT i.file, i.rows, i.cols FROM images i JOIN pairs p
               ON i.id IN (p.original_image, p.recon_image) JOIN assignments s ON s.pair_id = p.id
               WHERE i.id = ? AND s.reader_id = ? LIMIT 1""", (image_id, r.id)).fetchone()
        if row is None:
            raise HTTPException(404, "unknown image")
        path = (images / row["file"]).resolve()
        if not path.is_relative_to(images) or not path.is_file():  # never serve outside the study's images
            raise HTTPException(404, "unknown image")
        data = np.load(path, allow_pickle=False)
        return Response(np.ascontiguousarray(data, dtype="<u2").tobytes(), media_type="application/octet-stream",
                        headers={"X-Rows": str(row["rows"]), "X-Cols": str(row["cols"])})

    @app.post("/api/answers", status_code=201)
    def answer(body: NewAnswer, r: Me, conn: DB) -> dict:
        position = assigned(conn, r, body.pair_id)
        scores = [getattr(body, q) for q in QUESTIONS]
        try:
            with transaction(conn):
                refuse_if_finished(conn, r)
                conn.execute(f"INSERT INTO answers (reader_id, pair_id, {', '.join(QUESTIONS)}, seconds, answered_at) "
                             f"VALUES (?, ?, ?, ?, ?, ?, ?)", (r.id, body.pair_id, *scores, body.seconds, now()))
        except sqlite3.IntegrityError:
            raise HTTPException(409, f"pair {position} is answered already; revise it explicitly") from None
        n, done, nxt = counts(conn, r)
        return {"position": position, "answered": done, "total": n, "next_position": nxt}

    @app.put("/api/answers/{pair_id}")
    def revise(pair_id: str, body: Answer, r: Me, conn: DB) -> dict:
        if not _PAIR_ID.fullmatch(pair_id):
            raise HTTPException(404, "unknown pair")
        position = assigned(conn, r, pair_id)
        if not allow_revision:
            raise HTTPException(423, "this study does not allow revising answers")
        sets = ", ".join(f"{q} = ?" for q in QUESTIONS)
        with transaction(conn):
            refuse_if_finished(conn, r)
            cur = conn.execute(f"UPDATE answers SET {sets}, revised_at = ?, revisions = revisions + 1 "
                               f"WHERE reader_id = ? AND pair_id = ?",
                               (*[getattr(body, q) for q in QUESTIONS], now(), r.id, pair_id))
        if cur.rowcount == 0:
            raise HTTPException(404, f"pair {position} has no answer to revise")
        return {"position": position, "answer": saved(conn, r, pair_id)}

    @app.get("/api/answers")
    def answers(r: Me, conn: DB) -> list[dict]:
        rows = conn.execute(
            f"""SELECT s.position, a.pair_id, {', '.join('a.' + q for q in QUESTIONS)}, a.revisions
                FROM answers a JOIN assignments s ON s.reader_id = a.reader_id AND s.pair_id = a.pair_id
                WHERE a.reader_id = ? ORDER BY s.position""", (r.id,))
        return [dict(x) for x in rows]

    @app.post("/api/finish")
    def finish(r: Me, conn: DB) -> dict:
        with transaction(conn):  # counted and locked in one step: no answer can land in between
            n, done, _ = counts(conn, r)
            if done < n:
                raise HTTPException(409, f"{n - done} pair(s) are not answered yet")
            # a second Finish (another tab) keeps the first one's time
            conn.execute("UPDATE readers SET locked_at = ? WHERE id = ? AND locked_at IS NULL", (now(), r.id))
        return {"locked": True, "answered": done, "total": n}

    @app.exception_handler(sqlite3.OperationalError)
    async def busy(request: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        return JSONResponse({"detail": f"database busy, try again ({exc})"}, status_code=503)

    return app
