"""SqliteRecordStore: records in one SQLite database (WAL mode) in the records directory, and their images as
content-addressed files beside it (`images/ab/<sha256>`).

A batch is written images first (each file to a temporary name, renamed), then every row in one transaction
(synchronous=FULL): a crash leaves the old rows or all the new ones, never part of a batch, and at most image files
no row names yet (the spool replays the batch, naming them). Image files are not fsync'd one by one (two syncs per
flagged part cost the drainer more than the rows): a process crash loses none (the page cache holds them), a power
cut may lose the latest images, never a record; an image lost so reads as not kept (its hash is checked on read).
A full disk is an OSError or SQLite's "database or disk is full": the transaction rolls back and the spool keeps
the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import InsufficientStorageError
from ..sqlite_schema import migrate
from .figures import PassedPart, ReviewedPart
from .record import COLUMNS, NAMES, Draft, Record
from .store import RecordQuery, Retention, SweepResult, iter_pages

__all__ = ["SqliteRecordStore"]

MIGRATIONS = {
    1: """
        CREATE TABLE records (
            id TEXT PRIMARY KEY, time REAL NOT NULL, class_name TEXT NOT NULL, revision TEXT NOT NULL,
            model TEXT NOT NULL, threshold REAL NOT NULL, threshold_per_request INTEGER NOT NULL,
            score REAL NOT NULL, normalized_score REAL NOT NULL, text_score REAL NOT NULL,
            is_anomalous INTEGER NOT NULL, filename TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
            regions TEXT NOT NULL, part_id TEXT, station TEXT, tags TEXT NOT NULL, image_sha256 TEXT,
            thumbnail_sha256 TEXT, image_bytes INTEGER NOT NULL, review TEXT, review_note TEXT, reviewed_by TEXT,
            reviewed_at REAL
        ) WITHOUT ROWID;
        CREATE INDEX records_class ON records (class_name, id);
        CREATE INDEX records_part ON records (part_id) WHERE part_id IS NOT NULL;
        CREATE INDEX records_time ON records (time);
        CREATE INDEX records_images ON records (id) WHERE image_sha256 IS NOT NULL;
        CREATE INDEX records_image ON records (image_sha256) WHERE image_sha256 IS NOT NULL;
        CREATE INDEX records_thumb ON records (thumbnail_sha256) WHERE thumbnail_sha256 IS NOT NULL;
        CREATE INDEX records_reviewed ON records (class_name, id) WHERE review IS NOT NULL;
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)
_SWEEP_STEP = 2000  # rows a sweep transaction touches at most: writers wait no longer than that


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _disk_full(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, OSError) and e.errno in (28, 122, 27)) or "full" in text or "disk I/O" in text


class SqliteRecordStore:
    kind = "sqlite"

    def __init__(self, directory: Path, timeout_s: float = 10.0) -> None:
        self.directory = Path(directory)
        self.images = self.directory / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.directory / "records.sqlite3", timeout=timeout_s, check_same_thread=False,
                                   isolation_level=None)
        self._lock = threading.Lock()  # one connection, short calls: writes and reads take turns
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # PostgreSQL's strpos, which RecordQuery.where uses for tags (SQLite's instr is the same, by another name)
            self._db.create_function("strpos", 2, lambda text, part: (text or "").find(part) + 1, deterministic=True)
            migrate(self._db, MIGRATIONS, f"{self.directory}: records")


    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (a full disk)
                    db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- images ------------------------------------------------------------------------------------------------
    def _path(self, digest: str) -> Path:
        return self.images / digest[:2] / digest

    def _put(self, data: bytes) -> str:
        digest = _sha(data)
        path = self._path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:  # no fsync of its own: see the module docstring
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # nothing half-written stays (a full disk)
            raise
        return digest

    def _get(self, digest: str | None) -> bytes | None:
        if digest is None:
            return None
        try:
            data = self._path(digest).read_bytes()
        except FileNotFoundError:
            return None
        return data if _sha(data) == digest else None  # a damaged file is no image

    # -- writes ------------------------------------------------------------------------------------------------
    def write(self, drafts: Sequence[Draft]) -> None:
        try:
            for d in drafts:  # images first: a row never names a file that is not there
                if d.image is not None:
                    self._put(d.image)
                if d.thumbnail is not None:
                    self._put(d.thumbnail)
            marks = ", ".join("?" * len(NAMES))
            with self._transaction() as db:
                db.executemany(f"INSERT OR IGNORE INTO records ({COLUMNS}) VALUES ({marks})",
                               [d.record.row() for d in drafts])
        except (OSError, sqlite3.OperationalError) as e:
            if _disk_full(e):
                raise InsufficientStorageError(f"the record store is full ({e}); the spool keeps the records") \
                    from None
            raise

    def review(self, record_id: str, verdict: str, note: str | None, by: str, at: float) -> Record | None:
        with self._transaction() as db:
            db.execute("UPDATE records SET review = ?, review_note = ?, reviewed_by = ?, reviewed_at = ? "
                       "WHERE id = ?", (verdict, note, by, at, record_id))
        return self.get(record_id)

    # -- reads -------------------------------------------------------------------------------------------------
    def get(self, record_id: str) -> Record | None:
        rows = self._read(f"SELECT {COLUMNS} FROM records WHERE id = ?", (record_id,))
        return Record.from_row(rows[0]) if rows else None

    def query(self, q: RecordQuery) -> list[Record]:
        where, params = q.where("?")
        rows = self._read(f"SELECT {COLUMNS} FROM records{where} ORDER BY id DESC LIMIT ?", (*params, q.limit))
        return [Record.from_row(r) for r in rows]

    def iter_records(self, q: RecordQuery, batch: int = 1000) -> Iterator[Record]:
        return iter_pages(self.query, q, batch)

    def image(self, record_id: str) -> bytes | None:
        rows = self._read("SELECT image_sha256 FROM records WHERE id = ?", (record_id,))
        return self._get(rows[0][0]) if rows else None

    def thumbnail(self, record_id: str) -> bytes | None:
        rows = self._read("SELECT thumbnail_sha256 FROM records WHERE id = ?", (record_id,))
        return self._get(rows[0][0]) if rows else None

    def reviewed_parts(self, class_name: str, limit: int) -> list[ReviewedPart]:
        rows = self._read("SELECT score, review, revision || '/' || model FROM records "  # see scored_with
                          "WHERE class_name = ? AND review IS NOT NULL ORDER BY id DESC LIMIT ?", (class_name, limit))
        return [ReviewedPart(s, r == "defective", rev) for s, r, rev in rows]

    def passed_parts(self, class_name: str, limit: int) -> list[PassedPart]:
        rows = self._read("SELECT time, score, revision || '/' || model FROM records "  # see scored_with
                          "WHERE class_name = ? AND is_anomalous = 0 ORDER BY id DESC LIMIT ?", (class_name, limit))
        return [PassedPart(t, s, rev) for t, s, rev in reversed(rows)]

    def stats(self) -> dict[str, int]:
        (n,), = self._read("SELECT count(*) FROM records")
        (b,), = self._read("SELECT coalesce(sum(image_bytes), 0) FROM records WHERE image_sha256 IS NOT NULL")
        return {"records": int(n), "image_bytes": int(b)}

    # -- retention ---------------------------------------------------------------------------------------------
    def sweep(self, policy: Retention, now: float) -> SweepResult:
        records = images = 0
        while True:  # numbers: too old, or beyond the count (oldest first)
            (n,), = self._read("SELECT count(*) FROM records")
            excess = max(0, n - policy.max_records)
            rows = self._read("SELECT id, image_sha256, thumbnail_sha256 FROM records WHERE time < ? "
                              "ORDER BY id LIMIT ?", (now - policy.max_age_s, _SWEEP_STEP))
            if excess > len(rows):
                rows = self._read("SELECT id, image_sha256, thumbnail_sha256 FROM records ORDER BY id LIMIT ?",
                                  (min(excess, _SWEEP_STEP),))
            if not rows:
                break
            with self._transaction() as db:
                db.executemany("DELETE FROM records WHERE id = ?", [(r[0],) for r in rows])
            self._unlink_unused(rows)
            records += len(rows)
        while True:  # images: too old, or beyond the byte budget (oldest first)
            (total,), = self._read("SELECT coalesce(sum(image_bytes), 0) FROM records WHERE image_sha256 IS NOT NULL")
            rows = self._read("SELECT id, image_sha256, thumbnail_sha256, image_bytes, time FROM records "
                              "WHERE image_sha256 IS NOT NULL ORDER BY id LIMIT ?", (_SWEEP_STEP,))
            cut, freed = [], 0
            for r in rows:
                old = r[4] < now - policy.image_max_age_s
                if not old and total - freed <= policy.image_max_bytes:
                    break
                cut.append(r)
                freed += r[3]
            if not cut:
                break
            with self._transaction() as db:
                db.executemany("UPDATE records SET image_sha256 = NULL, thumbnail_sha256 = NULL, image_bytes = 0 "
                               "WHERE id = ?", [(r[0],) for r in cut])
            self._unlink_unused(cut)
            images += len(cut)
        return SweepResult(records, images)

    def _unlink_unused(self, rows: Sequence[tuple]) -> None:
        """Remove the image files of `rows` that no remaining record names (content-addressed: shared)."""
        for digest in {d for r in rows for d in r[1:3] if d}:
            used = self._read("SELECT 1 FROM records WHERE image_sha256 = ? OR thumbnail_sha256 = ? LIMIT 1",
                              (digest, digest))
            if not used:
                self._path(digest).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()
