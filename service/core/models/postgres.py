"""PostgresModelRepository: model versions as rows in the class store's database, shared by replicas on any host,
serving-state changes pushed by LISTEN/NOTIFY.

Tables (schema migration 5, service/core/store/postgres.py):

    sowa_models        one row per version: fingerprint (primary key), label (unique), added, added_by, the
                       manifest (jsonb), image_size, arch, trained, bytes (of its weight files)
    sowa_model_files   the bundle's files, sowa.json included, in 16 MiB chunks (fingerprint, name, chunk), deleted
                       with their version
    sowa_model_state   one row: the serving state (jsonb) and its revision

`add` streams the files in one transaction, hashing what it reads against the manifest as it goes: a version is
listed only with all of its files, and files that changed under it abort it. `path` writes a version's files to
<data_dir>/models-cache/<fingerprint>/ (each hash-checked, then the folder renamed into place) the first time this
host needs it. `set_state` is a read-modify-write under the state row's lock, then `pg_notify('sowa_models')` in the
same transaction; `subscribe` LISTENs on a thread of its own, which also calls back after a lost connection comes
back (a change may have been missed meanwhile).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from model.bundle import MANIFEST, BundleError, read_manifest
from model.files import fsync_dir

from ..errors import ConflictError, ModelNotFoundError, SowaError, UnprocessableError
from ..pg_pool import listen, pooled
from ..store.postgres import migrate, redact
from .repository import (
    ModelVersion,
    ServingState,
    check_bundle,
    check_label,
    check_state_changes,
    clean_leftovers,
    find_version,
    manifest_of,
    removal_conflict,
)

__all__ = ["CHUNK_BYTES", "MODELS_CHANNEL", "PostgresModelRepository"]

log = logging.getLogger("sowa.models")

MODELS_CHANNEL = "sowa_models"
CHUNK_BYTES = 16 * 2**20
_COLUMNS = "fingerprint, label, added, added_by, image_size, arch, trained, bytes"
_INCOMING = ".incoming-"


class PostgresModelRepository:
    """The `ModelRepository` of one PostgreSQL database (see the module docstring)."""

    kind = "postgresql"

    def __init__(self, url: str, data_dir: Path, timeout_s: float = 3.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.cache = Path(data_dir) / "models-cache"
        self._conninfo = make_conninfo(url, connect_timeout=max(1, int(timeout_s)), keepalives=1,
                                       keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
                                       tcp_user_timeout=10_000)
        # a copy in or out holds a connection for as long as it streams: others (the state) need their own
        self.pool = ConnectionPool(self._conninfo, min_size=1, max_size=4, timeout=timeout_s, open=True,
                                   kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
                                   name="sowa-models")
        try:
            with self._conn("opening") as conn:
                migrate(conn)
        except BaseException:
            self.pool.close()
            raise
        self._subscribers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        self._start_lock = threading.Lock()
        self._cache_lock = threading.Lock()  # one materialisation at a time in this process
        clean_leftovers(self.cache)

    def __repr__(self) -> str:
        return f"PostgresModelRepository({redact(self.url)})"

    def _conn(self, what: str) -> AbstractContextManager[psycopg.Connection]:
        return pooled(self.pool, "the model repository", what)

    # -- versions ---------------------------------------------------------------------------------------------
    def list(self) -> list[ModelVersion]:
        with self._conn("listing models") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM sowa_models ORDER BY added, fingerprint").fetchall()
        return [ModelVersion(*r) for r in rows]

    def resolve(self, version: str) -> ModelVersion:
        return find_version(self.list(), version)

    def add(self, bundle_dir: Path, label: str | None, actor: str, verify: bool = True,
            copy: bool = True) -> ModelVersion:
        """See `ModelRepository.add`. The files are always stored (`copy` is the directory's choice): replicas on
        other hosts load a version from the database."""
        check_label(label)
        bundle_dir = Path(bundle_dir)
        info = manifest_of(bundle_dir)
        fp = info.fingerprint
        with self._conn("adding a model") as conn:
            row = conn.execute("SELECT label FROM sowa_models WHERE fingerprint = %s", (fp,)).fetchone()
            if row is not None:
                return self._relabel(conn, fp, label)
            self._label_free(conn, label, fp)
        _, size = check_bundle(bundle_dir, verify)
        manifest_bytes = (bundle_dir / MANIFEST).read_bytes()
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("files") != info.files:
            raise ConflictError(f"{bundle_dir}: the bundle changed while it was added; add it again")
        v = ModelVersion.from_info(info, label, time.time(), actor, size)
        with self._conn(f"adding model {v.version}") as conn:
            try:
                with conn.transaction():
                    inserted = conn.execute(
                        f"INSERT INTO sowa_models ({_COLUMNS}, manifest) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (fingerprint) DO NOTHING RETURNING fingerprint",
                        (v.fingerprint, v.label, v.added, v.added_by, v.image_size, v.arch, v.trained, v.bytes,
                         Jsonb(manifest))).fetchone()
                    if inserted is None:  # another replica added it meanwhile
                        return self._relabel(conn, fp, label)
                    for name in sorted(info.files):
                        self._store_file(conn, fp, bundle_dir / name, name, info.files[name])
                    self._insert_chunk(conn, fp, MANIFEST, 0, manifest_bytes)  # as read and checked above
            except psycopg.errors.UniqueViolation:
                raise ConflictError(f"model label {label!r} is taken by another version") from None
        log.info("models: added %s (%s, %d px) by %s", v.version, fp[:16], v.image_size, actor)
        return v

    def _store_file(self, conn: psycopg.Connection, fp: str, path: Path, name: str,
                    meta: dict[str, Any]) -> None:
        """Stream one weight file into chunks, hashing it: what is stored is what the manifest lists."""
        h, size = hashlib.sha256(), 0
        with path.open("rb") as f:
            for chunk, data in enumerate(iter(lambda: f.read(CHUNK_BYTES), b"")):
                h.update(data)
                size += len(data)
                self._insert_chunk(conn, fp, name, chunk, data)
        if h.hexdigest() != meta["sha256"] or ("bytes" in meta and size != meta["bytes"]):
            raise UnprocessableError(f"{path}: sha256 does not match the manifest (changed while it was added)")

    @staticmethod
    def _insert_chunk(conn: psycopg.Connection, fp: str, name: str, chunk: int, data: bytes) -> None:
        conn.execute("INSERT INTO sowa_model_files (fingerprint, name, chunk, data) VALUES (%s, %s, %s, %s)",
                     (fp, name, chunk, data))

    def _relabel(self, conn: psycopg.Connection, fp: str, label: str | None) -> ModelVersion:
        """The stored version of `fp`, given `label` when one is asked for."""
        if label is not None:
            self._label_free(conn, label, fp)
            try:
                conn.execute("UPDATE sowa_models SET label = %s WHERE fingerprint = %s", (label, fp))
            except psycopg.errors.UniqueViolation:
                raise ConflictError(f"model label {label!r} is taken by another version") from None
        row = conn.execute(f"SELECT {_COLUMNS} FROM sowa_models WHERE fingerprint = %s", (fp,)).fetchone()
        if row is None:
            raise ModelNotFoundError(f"model version {fp[:16]} was removed while it was added; add it again")
        return ModelVersion(*row)

    @staticmethod
    def _label_free(conn: psycopg.Connection, label: str | None, fp: str) -> None:
        if label is None:
            return
        row = conn.execute("SELECT fingerprint FROM sowa_models WHERE label = %s AND fingerprint <> %s",
                           (label, fp)).fetchone()
        if row is not None:
            raise ConflictError(f"model label {label!r} is taken by version {row[0][:16]}")

    def remove(self, fingerprint: str) -> bool:
        with self._conn("removing a model") as conn, conn.transaction():
            state = self._locked_state(conn)
            row = conn.execute("SELECT label FROM sowa_models WHERE fingerprint = %s", (fingerprint,)).fetchone()
            if row is None:
                return False
            removal_conflict(state, fingerprint, row[0] or fingerprint[:16])
            conn.execute("DELETE FROM sowa_models WHERE fingerprint = %s", (fingerprint,))
            if state.previous == fingerprint:  # nothing to roll back to any more
                self._write_state(conn, ServingState(**{**state.to_dict(), "previous": None,
                                                        "revision": state.revision + 1}))
        shutil.rmtree(self.cache / fingerprint, ignore_errors=True)
        return True

    # -- local copies -----------------------------------------------------------------------------------------
    def path(self, fingerprint: str) -> Path:
        with self._conn("reading a model") as conn:
            row = conn.execute("SELECT manifest FROM sowa_models WHERE fingerprint = %s", (fingerprint,)).fetchone()
        if row is None:
            raise ModelNotFoundError(f"no model version {fingerprint[:16]!r}")
        folder = self.cache / fingerprint
        with self._cache_lock:
            if not _complete(folder, fingerprint):
                self._materialise(fingerprint, row[0], folder)
        return folder

    def _materialise(self, fp: str, manifest: dict[str, Any], folder: Path) -> None:
        """Write the version's files to `folder`: into an incoming folder, each hash-checked, then renamed."""
        self.cache.mkdir(parents=True, exist_ok=True)
        incoming = self.cache / f"{_INCOMING}{uuid.uuid4().hex}"
        incoming.mkdir()
        try:
            with self._conn(f"reading model {fp[:16]}") as conn:
                keys = conn.execute("SELECT name, chunk FROM sowa_model_files WHERE fingerprint = %s "
                                    "ORDER BY name, chunk", (fp,)).fetchall()
                names = sorted({name for name, _ in keys})
                for name in names:
                    h = hashlib.sha256()
                    with open(incoming / name, "wb") as f:
                        for _, chunk in (k for k in keys if k[0] == name):  # one chunk in memory at a time
                            data = conn.execute("SELECT data FROM sowa_model_files WHERE fingerprint = %s AND "
                                                "name = %s AND chunk = %s", (fp, name, chunk)).fetchone()[0]
                            h.update(data)
                            f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    meta = manifest["files"].get(name)
                    if meta is not None and h.hexdigest() != meta["sha256"]:
                        raise SowaError(f"model {fp[:16]}: the repository's {name} does not match its manifest")
            if not _complete(incoming, fp):
                raise SowaError(f"model {fp[:16]}: the repository's copy is incomplete or is another model")
            fsync_dir(incoming)
            if folder.exists():  # an incomplete copy (a crash): replaced
                shutil.rmtree(folder)
            os.replace(incoming, folder)
            fsync_dir(self.cache)
            log.info("models: %s copied from the repository to %s", fp[:16], folder)
        finally:
            if incoming.exists():
                shutil.rmtree(incoming, ignore_errors=True)

    # -- serving state ----------------------------------------------------------------------------------------
    def state(self) -> ServingState:
        with self._conn("reading the serving state") as conn:
            row = conn.execute("SELECT state, revision FROM sowa_model_state WHERE id = 1").fetchone()
        return ServingState.from_dict({**row[0], "revision": row[1]}) if row else ServingState()

    @staticmethod
    def _locked_state(conn: psycopg.Connection) -> ServingState:
        row = conn.execute("SELECT state, revision FROM sowa_model_state WHERE id = 1 FOR UPDATE").fetchone()
        return ServingState.from_dict({**row[0], "revision": row[1]})

    @staticmethod
    def _write_state(conn: psycopg.Connection, state: ServingState) -> None:
        fields = {k: v for k, v in state.to_dict().items() if k != "revision"}
        conn.execute("UPDATE sowa_model_state SET state = %s, revision = %s WHERE id = 1",
                     (Jsonb(fields), state.revision))
        conn.execute("SELECT pg_notify(%s, %s)", (MODELS_CHANNEL, str(state.revision)))

    def set_state(self, expect_revision: int | None = None, **changes: Any) -> ServingState:
        named = [fp for fp in changes.values() if isinstance(fp, str)]
        with self._conn("changing the serving state") as conn, conn.transaction():
            state = self._locked_state(conn)
            known = {r[0] for r in conn.execute("SELECT fingerprint FROM sowa_models WHERE fingerprint = ANY(%s)",
                                                (named,))}
            state = check_state_changes(state, known, expect_revision, changes)
            self._write_state(conn, state)
        return state

    def subscribe(self, callback: Callable[[], None]) -> bool:
        """Call `callback` (on the listener thread) on every state change, and when a lost connection is back."""
        self._subscribers.append(callback)
        with self._start_lock:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="sowa-models-listener", daemon=True)
                self._listener.start()
        self._listening.wait(self.timeout_s * 3)  # LISTENing before the caller's first look: nothing missed
        return True

    def _listen(self) -> None:
        listen(self._conninfo, MODELS_CHANNEL, self._stop, self._listening, self._changed,
               "models: the serving-state listener", log)

    def _changed(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:  # a subscriber's trouble (its loop closed) is not the connection's
                log.exception("models: state-change callback failed")

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self.pool.close()


def _complete(folder: Path, fingerprint: str) -> bool:
    """Whether `folder` holds the whole bundle of `fingerprint`: its manifest, and every file at the manifest's
    size (load_bundle checks the hashes)."""
    try:
        info = read_manifest(folder)
    except BundleError:
        return False
    if info.fingerprint != fingerprint:
        return False
    for name, meta in info.files.items():
        path = folder / name
        if not path.is_file() or ("bytes" in meta and path.stat().st_size != meta["bytes"]):
            return False
    return True
