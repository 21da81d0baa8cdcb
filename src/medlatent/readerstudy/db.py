"""The study database (SQLite): cases, display images, blinded pairs, readers, their orders and answers.

Every answer is written in its own transaction before the server replies, so a restart loses nothing. Reader
tokens are stored only as SHA-256 digests; the links themselves go to ``readers.csv`` at creation.
"""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from medlatent.readerstudy.questions import QUESTIONS

DB_NAME = "study.sqlite"
IMAGES_DIR = "images"

_SCORE = "INTEGER NOT NULL CHECK ({q} BETWEEN -2 AND 2)"
SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cases (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, slice TEXT NOT NULL DEFAULT '',
    lo REAL NOT NULL, hi REAL NOT NULL, window_center REAL NOT NULL, window_width REAL NOT NULL);
CREATE TABLE images (
    id TEXT PRIMARY KEY, case_id TEXT NOT NULL REFERENCES cases(id), file TEXT NOT NULL,
    rows INTEGER NOT NULL, cols INTEGER NOT NULL);
CREATE TABLE pairs (
    id TEXT PRIMARY KEY, case_id TEXT NOT NULL REFERENCES cases(id), method TEXT NOT NULL, factor TEXT NOT NULL,
    original_image TEXT NOT NULL REFERENCES images(id), recon_image TEXT NOT NULL REFERENCES images(id),
    recon_source TEXT NOT NULL, UNIQUE (case_id, method, factor));
CREATE TABLE readers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    seed INTEGER NOT NULL, locked_at TEXT);
CREATE TABLE assignments (
    reader_id INTEGER NOT NULL REFERENCES readers(id), position INTEGER NOT NULL,
    pair_id TEXT NOT NULL REFERENCES pairs(id), PRIMARY KEY (reader_id, position), UNIQUE (reader_id, pair_id));
CREATE TABLE answers (
    reader_id INTEGER NOT NULL REFERENCES readers(id), pair_id TEXT NOT NULL REFERENCES pairs(id),
    {", ".join(f"{q} {_SCORE.format(q=q)}" for q in QUESTIONS)},
    seconds REAL, answered_at TEXT NOT NULL, revised_at TEXT, revisions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (reader_id, pair_id));
"""


class StudyError(ValueError):
    """A study that cannot be created, opened or analysed; the message names the file and the problem."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal, foreign keys on."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")  # an acknowledged answer survives a power cut
    return conn


def open_study(study: Path) -> sqlite3.Connection:
    """Connect to an existing study folder's database, or raise :class:`StudyError`."""
    path = Path(study) / DB_NAME
    if not path.is_file():
        raise StudyError(f"{study}: not a reader study (no {DB_NAME}); create one with `medlatent reader-study create`")
    conn = connect(path)
    try:
        conn.execute("SELECT 1 FROM pairs LIMIT 1")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise StudyError(f"{path}: not a readable study database ({e})") from None
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on error): writers never interleave."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM meta")}


def answer_records(conn: sqlite3.Connection) -> list[dict]:
    """Every answer unblinded — reader, case, method, factor, the three scores, timing — for the analysis."""
    cols = ", ".join(f"a.{q}" for q in QUESTIONS)
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row  # whatever the connection's factory
    rows = cur.execute(
        f"""SELECT r.name AS reader, p.case_id AS "case", c.source AS source, c.slice AS slice, p.method, p.factor,
                   {cols}, a.seconds, a.answered_at, a.revised_at, a.revisions
            FROM answers a JOIN readers r ON r.id = a.reader_id JOIN pairs p ON p.id = a.pair_id
            JOIN cases c ON c.id = p.case_id ORDER BY r.name, p.case_id, p.method, p.factor""")
    return [dict(r) for r in rows]
