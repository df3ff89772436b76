"""PostgresStore: classes as rows in PostgreSQL, shared by replicas on any host, changes pushed by LISTEN/NOTIFY.

Schema (created and migrated by the service on start, see `MIGRATIONS`; version 2 adds the keys and the audit
trail, service/core/access/postgres.py; version 3 the inspection records, service/core/records/; version 4 the banks
per model; version 5 the model repository, service/core/models/postgres.py):

    sowa_meta(key, value)          'schema_version' -> the version the tables are at
    sowa_classes                   name (primary key), shots (sha256 array, registration order), created, updated,
                                   revision
    sowa_class_models              per (class_name, fingerprint): the bank (safetensors bytes) that bundle fitted on
                                   the class's shots, bank_shots, calibration (jsonb), and that model's threshold
                                   override; a row may hold only an override (its bank went with older shots)
    sowa_shots(class_name, digest) each shot's PNG bytes, content-addressed per class (deleted with it)

A write is one transaction (shots, the class row and its model's row, then `pg_notify`): a 2xx means committed,
and a crash or a lost connection at any point leaves the old class or the new one. Replicas take turns on a class
with a session advisory lock (`pg_advisory_lock`), so there are no file locks; the lock's connection is the one the
writes under it use, so a write never commits after its lock went with a dead session.

Changes: every write bumps `revision` (a sequence) and notifies channel `sowa_classes` with the class name and the
writing store's origin. A listener thread per store LISTENs on its own connection and wakes the registry
(`wait_for_changes`); `changes()` then diffs (name, revision) against what this store last reported or wrote,
so a replica that lost its connection catches up on reconnect by the same diff: nothing is polled, and no
notification missed while it was away is lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from model.calibration import Calibration
from model.inference import ClassMemory
from model.memory_bank import MemoryBank

from ..class_names import is_class_name
from ..errors import SowaError, StoreUnavailableError
from .base import ClassRecord, StoreChanges, checked_shot
from .seen import SeenVersions

__all__ = ["CHANNEL", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStore", "SchemaError", "migrate", "redact"]

log = logging.getLogger("sowa.registry")

CHANNEL = "sowa_classes"
_MIGRATE_LOCK = 0x50_57_41_00  # advisory lock key: one replica migrates at a time
# version -> the statements that bring the schema from version-1 to it; append, never edit a released one
MIGRATIONS: dict[int, str] = {
    1: """
        CREATE SEQUENCE sowa_revision;
        CREATE TABLE sowa_classes (
            name text PRIMARY KEY,
            shots text[] NOT NULL,
            bundle_fingerprint text NOT NULL,
            calibration jsonb NOT NULL,
            bank bytea,
            bank_shots integer NOT NULL,
            threshold_override double precision,
            created double precision NOT NULL,
            updated double precision NOT NULL,
            revision bigint NOT NULL DEFAULT nextval('sowa_revision')
        );
        CREATE TABLE sowa_shots (
            class_name text NOT NULL REFERENCES sowa_classes(name) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
            digest text NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (class_name, digest)
        );
    """,
    # keys and the audit trail (service/core/access/postgres.py), beside the classes
    2: """
        CREATE TABLE sowa_keys (
            name text PRIMARY KEY, key_id text NOT NULL UNIQUE, secret_sha256 text NOT NULL, role text NOT NULL,
            classes text, created double precision NOT NULL, created_by text NOT NULL,
            revoked double precision, revoked_by text
        );
        CREATE TABLE sowa_audit (
            id text PRIMARY KEY, time double precision NOT NULL, actor text NOT NULL, action text NOT NULL,
            target text NOT NULL, before jsonb, after jsonb
        );
        CREATE INDEX sowa_audit_time ON sowa_audit (time);
    """,
    # inspection records (service/core/records/postgres.py): numbers per row, images content-addressed
    3: """
        CREATE TABLE sowa_records (
            id text PRIMARY KEY, time double precision NOT NULL, class_name text NOT NULL, revision text NOT NULL,
            model text NOT NULL, threshold double precision NOT NULL, threshold_per_request boolean NOT NULL,
            score double precision NOT NULL, normalized_score double precision NOT NULL,
            text_score double precision NOT NULL, is_anomalous boolean NOT NULL, filename text NOT NULL,
            width integer NOT NULL, height integer NOT NULL, regions text NOT NULL, part_id text, station text,
            tags text NOT NULL, image_sha256 text, thumbnail_sha256 text, image_bytes bigint NOT NULL,
            review text, review_note text, reviewed_by text, reviewed_at double precision
        );
        CREATE INDEX sowa_records_class ON sowa_records (class_name, id);
        CREATE INDEX sowa_records_part ON sowa_records (part_id) WHERE part_id IS NOT NULL;
        CREATE INDEX sowa_records_time ON sowa_records (time);
        CREATE INDEX sowa_records_images ON sowa_records (id) WHERE image_sha256 IS NOT NULL;
        CREATE INDEX sowa_records_image ON sowa_records (image_sha256) WHERE image_sha256 IS NOT NULL;
        CREATE INDEX sowa_records_thumb ON sowa_records (thumbnail_sha256) WHERE thumbnail_sha256 IS NOT NULL;
        CREATE INDEX sowa_records_reviewed ON sowa_records (class_name, id) WHERE review IS NOT NULL;
        CREATE TABLE sowa_record_blobs (digest text PRIMARY KEY, data bytea NOT NULL);
    """,
    # model versions: a bank and a threshold override per (class, model), instead of one per class
    4: """
        CREATE TABLE sowa_class_models (
            class_name text NOT NULL REFERENCES sowa_classes(name) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
            fingerprint text NOT NULL,
            bank bytea, bank_shots integer, calibration jsonb, threshold_override double precision,
            PRIMARY KEY (class_name, fingerprint)
        );
        INSERT INTO sowa_class_models (class_name, fingerprint, bank, bank_shots, calibration, threshold_override)
            SELECT name, bundle_fingerprint, bank, bank_shots, calibration, threshold_override FROM sowa_classes;
        ALTER TABLE sowa_classes DROP COLUMN bundle_fingerprint, DROP COLUMN calibration, DROP COLUMN bank,
            DROP COLUMN bank_shots, DROP COLUMN threshold_override;
    """,
    # the model repository (service/core/models/postgres.py): versions, their files in chunks, the serving state
    5: """
        CREATE TABLE sowa_models (
            fingerprint text PRIMARY KEY, label text UNIQUE, added double precision NOT NULL,
            added_by text NOT NULL, manifest jsonb NOT NULL, image_size integer NOT NULL, arch text NOT NULL,
            trained boolean NOT NULL, bytes bigint NOT NULL
        );
        CREATE TABLE sowa_model_files (
            fingerprint text NOT NULL REFERENCES sowa_models (fingerprint) ON DELETE CASCADE,
            name text NOT NULL, chunk integer NOT NULL, data bytea NOT NULL,
            PRIMARY KEY (fingerprint, name, chunk)
        );
        CREATE TABLE sowa_model_state (
            id integer PRIMARY KEY CHECK (id = 1), state jsonb NOT NULL, revision bigint NOT NULL
        );
        INSERT INTO sowa_model_state VALUES (1, '{}', 0);
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
RETRY_AFTER_S = 5
LOCK_TIMEOUT_S = 30


class SchemaError(RuntimeError):
    """The database's schema is not one this code can use (a newer version, say)."""


def migrate(conn: psycopg.Connection) -> int:
    """Create or upgrade the schema to SCHEMA_VERSION, under a lock so one replica (or store) does it at a time;
    the version it is at. SchemaError when the database is at a version this code does not know."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS sowa_meta (key text PRIMARY KEY, value text NOT NULL)")
        row = conn.execute("SELECT value FROM sowa_meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaError(f"the class store's schema is version {version}, newer than this service knows "
                              f"({SCHEMA_VERSION}): a newer release migrated it; run that release (or restore a "
                              "backup taken before the upgrade)")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[v])
            log.info("class store: schema migrated to version %d", v)
        if version != SCHEMA_VERSION:
            conn.execute("INSERT INTO sowa_meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE "
                         "SET value = EXCLUDED.value", (str(SCHEMA_VERSION),))
    return SCHEMA_VERSION


def redact(url: str) -> str:
    """The URL without its password, for logs and /readyz."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    user, host, port, db = (info.get(k, "") for k in ("user", "host", "port", "dbname"))
    return f"postgresql://{user}@{host}:{port or 5432}/{db}"


@contextmanager
def _available(what: str) -> Iterator[None]:
    """Connection trouble becomes StoreUnavailableError (503 + Retry-After): nothing was committed."""
    try:
        yield
    except psycopg.errors.LockNotAvailable:
        raise StoreUnavailableError(f"the class is being changed by another replica (gave up waiting in {what}); "
                                    "nothing was changed, try again",
                                    headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except _UNAVAILABLE as e:
        raise StoreUnavailableError(f"the class store cannot be reached ({what}: {str(e).strip()[:200]}); "
                                    "nothing was changed, try again", headers={"Retry-After": str(RETRY_AFTER_S)}
                                    ) from None


class PostgresStore:
    """The `ClassStore` of one PostgreSQL database (see the module docstring for its schema)."""

    kind = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 4, timeout_s: float = 3.0, listen: bool = True,
                 lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.url, self.timeout_s, self.listen, self.lock_timeout_s = url, timeout_s, listen, lock_timeout_s
        self.origin = uuid.uuid4().hex  # this store's writes, as its notifications name them
        # a dead peer is noticed in seconds, not at TCP's default of minutes: keepalives while idle, and
        # tcp_user_timeout while data waits unacknowledged (a host that went away mid-query)
        conninfo = {"connect_timeout": max(1, int(timeout_s)), "keepalives": 1, "keepalives_idle": 5,
                    "keepalives_interval": 2, "keepalives_count": 2, "tcp_user_timeout": 10_000,
                    "application_name": f"sowa-{self.origin[:12]}"}
        self._conninfo = make_conninfo(url, **conninfo)
        self.pool_size = pool_size
        self.pool = self._new_pool()
        self._open_lock = threading.Lock()
        self._closers: list[threading.Thread] = []  # renewed pools' close(), joined by close()
        self._local = threading.local()  # the connection holding this thread's class lock
        self._seen: SeenVersions[int] = SeenVersions()  # revisions as last reported or written
        self._wake = threading.Event()  # set by the listener: another replica changed something
        self._subscribers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        self.error: str | None = None  # why the store cannot be reached now; None while it can
        self.reconnects = 0
        self.notifications = 0

    def __repr__(self) -> str:
        return f"PostgresStore({redact(self.url)})"

    # -- connections ------------------------------------------------------------------------------------------
    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(self._conninfo, min_size=1, max_size=self.pool_size, open=False,
                              timeout=self.timeout_s, kwargs={"autocommit": True},
                              check=ConnectionPool.check_connection, configure=self._configure, name="sowa-store")

    def _renew_pool(self) -> None:
        """A fresh pool once the listener found the server back after losing it. The old one is either in
        psycopg_pool's reconnect backoff (1, 2, 4, 8 ... s between attempts, growing for as long as the outage
        lasted) or holds idle connections the outage killed, which its check loop discards one at a time with a
        1 s pause: either way it could go on refusing, or stall a catch-up, for seconds after the server is up
        (seen: a replica missing a change for over a second). Connections in use from the old pool are closed
        when returned; callers waiting on it retry on the new one (`_conn`)."""
        with self._open_lock:
            if self._stop.is_set() or self.pool.closed:
                return
            fresh = self._new_pool()
            fresh.open(wait=False)
            old, self.pool = self.pool, fresh
            closer = threading.Thread(target=old.close, name="sowa-store-old-pool", daemon=True)
            self._closers.append(closer)
        closer.start()

    def _configure(self, conn: psycopg.Connection) -> None:
        # a class lock (or a row) held longer than this by another replica answers 503 rather than hanging
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(self.lock_timeout_s * 1000)}ms")))

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        pool = self._current_pool()
        try:
            conn = pool.getconn()
        except PoolClosed:  # renewed while this call waited on the old pool: the new one is up
            if pool is self.pool:
                raise
            pool = self._current_pool()
            conn = pool.getconn()
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def _current_pool(self) -> ConnectionPool:
        with self._open_lock:
            if self._stop.is_set():  # closed: a late call (a sync finishing after shutdown) must not reopen
                raise psycopg.OperationalError("the class store is closed")
            if self.pool.closed:  # opened on first use
                self.pool.open(wait=False)
            return self.pool

    def close(self) -> None:
        with self._open_lock:
            self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self.pool.close()
        for closer in self._closers:
            closer.join(timeout=5)

    # -- start-up: schema and listener ------------------------------------------------------------------------
    def recover(self) -> dict[str, str]:
        with _available("start-up"):
            self.migrate()
            if self.listen and self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="sowa-store-listener", daemon=True)
                self._listener.start()
                if not self._listening.wait(self.timeout_s * 3):  # LISTEN before the first scan: nothing missed
                    raise psycopg.OperationalError(self.error or "the listener did not connect")
            with self._conn() as conn:
                names = [r[0] for r in conn.execute("SELECT name FROM sowa_classes")]
        return {n: "row name is not a valid class name" for n in names if not is_class_name(n)}

    def migrate(self) -> int:
        """Create or upgrade the schema to SCHEMA_VERSION (one replica at a time); the version it is at.
        SchemaError when the database is at a version this code does not know."""
        with self._conn() as conn:
            return migrate(conn)

    def _listen(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    if self.error is not None:  # back after a loss: what it missed is found by the next diff
                        log.warning("class store reachable again: catching up")
                        self.reconnects += 1
                        self._renew_pool()
                        self._woken()
                    self.error, backoff = None, 0.2
                    self._listening.set()
                    last_check = time.monotonic()
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self._notified(n.payload)
                        if time.monotonic() - last_check > 2.0:  # a quiet line can be a dead one
                            conn.execute("SELECT 1")
                            last_check = time.monotonic()
            except Exception as e:
                if self._stop.is_set():
                    return
                if self.error is None:
                    log.error("class store unreachable (%s): serving what this replica holds", str(e).strip())
                self.error = f"{type(e).__name__}: {str(e).strip()[:300]}"
                self._listening.set()  # start-up does not wait for a store that is down
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _notified(self, payload: str) -> None:
        try:
            origin = json.loads(payload).get("origin")
        except (ValueError, AttributeError):
            origin = None
        if origin != self.origin:
            self.notifications += 1
            self._woken()

    def _woken(self) -> None:
        self._wake.set()
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:  # a subscriber's trouble (its loop closed) is not the connection's
                log.exception("class store: change callback failed")

    def subscribe(self, callback: Callable[[], None]) -> bool:
        """Call `callback` (on the listener thread) whenever another replica changed something, or the
        connection came back and a catch-up is due."""
        self._subscribers.append(callback)
        return True

    def sweep(self) -> int:
        return 0  # a write is one transaction: a crash leaves nothing to clean

    def wait_for_changes(self, timeout: float) -> bool:
        """Block until another replica changed something (or the connection came back), at most `timeout` s."""
        fired = self._wake.wait(timeout)
        self._wake.clear()  # before the caller's changes(): a later notification sets it again
        return fired

    # -- change detection -------------------------------------------------------------------------------------
    def changes(self) -> StoreChanges:
        with _available("changes"), self._conn() as conn:
            present = dict(conn.execute("SELECT name, revision FROM sowa_classes").fetchall())
        return self._seen.diff({n: r for n, r in present.items() if is_class_name(n)})

    def unsee(self, names: Iterable[str]) -> None:
        self._seen.forget(names)

    # -- reads ------------------------------------------------------------------------------------------------
    @staticmethod
    def _check(name: str) -> str:
        if not is_class_name(name):  # checked again here: a name never reaches a query unchecked
            raise ValueError(f"invalid class name {name[:80]!r}")
        return name

    def read(self, name: str, fingerprint: str | None) -> ClassRecord | None:
        self._check(name)
        with _available("read"), self._conn() as conn:
            row = conn.execute("SELECT shots, created, updated FROM sowa_classes WHERE name = %s", (name,)).fetchone()
            models = conn.execute(
                "SELECT fingerprint, bank IS NOT NULL, threshold_override, bank_shots, calibration, "
                "CASE WHEN fingerprint = %s THEN bank END FROM sowa_class_models WHERE class_name = %s",
                (fingerprint, name)).fetchall() if row is not None else []
        if row is None:
            return None
        shots, created, updated = row
        memory, override = None, None
        for fp, _, fp_override, bank_shots, calibration, bank in models:
            if fp != fingerprint:
                continue
            override = fp_override
            if bank is not None:
                try:
                    features = load_tensors(bytes(bank))["features"]
                    memory = ClassMemory(MemoryBank(features, int(bank_shots)), Calibration(**calibration))
                except (SafetensorError, KeyError, TypeError, ValueError) as e:
                    log.warning("class %s: bank unreadable (%s)", name, e)
        return ClassRecord(name, tuple(shots), memory, override, float(created), float(updated),
                           fingerprint if memory is not None and fingerprint else "",
                           tuple(sorted(fp for fp, has_bank, *_ in models if has_bank)))

    def read_shot(self, name: str, digest: str) -> bytes:
        self._check(name)
        with _available("read_shot"), self._conn() as conn:
            row = conn.execute("SELECT data FROM sowa_shots WHERE class_name = %s AND digest = %s",
                               (name, digest)).fetchone()
        if row is None:
            raise ValueError(f"shot {digest[:12]} of class {name} is missing")
        return checked_shot(bytes(row[0]), digest)

    # -- writes (the caller holds `lock(name)`) ----------------------------------------------------------------
    def write(self, record: ClassRecord, shots: Mapping[str, bytes]) -> None:
        if record.memory is None:
            raise ValueError("a class is written with its memory")
        self._check(record.name)
        bank = self._bank_bytes(record.memory)
        with _available("write"), self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany("INSERT INTO sowa_shots (class_name, digest, data) VALUES (%s, %s, %s) "
                            "ON CONFLICT DO NOTHING", [(record.name, d, data) for d, data in shots.items()])
            cur.execute("DELETE FROM sowa_shots WHERE class_name = %s AND NOT (digest = ANY(%s))",
                        (record.name, list(record.shots)))
            stored = cur.execute("SELECT count(*) FROM sowa_shots WHERE class_name = %s",
                                 (record.name,)).fetchone()
            if stored is None or stored[0] != len(set(record.shots)):
                raise ValueError(f"class {record.name}: the record names shots the store does not hold")
            before = cur.execute("SELECT shots FROM sowa_classes WHERE name = %s FOR UPDATE",
                                 (record.name,)).fetchone()
            revision = cur.execute(
                "INSERT INTO sowa_classes (name, shots, created, updated) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET shots = EXCLUDED.shots, created = EXCLUDED.created, "
                "updated = EXCLUDED.updated, revision = nextval('sowa_revision') RETURNING revision",
                (record.name, list(record.shots), record.created, record.updated)).fetchone()
            if revision is None:  # an upsert RETURNING always has its row: raised inside, so nothing commits
                raise SowaError(f"class {record.name}: the store returned no revision for its row; nothing was "
                                "changed")
            if before is not None and list(before[0]) != list(record.shots):
                # other models' banks were fitted on other shots: they go; their threshold overrides stay
                cur.execute("UPDATE sowa_class_models SET bank = NULL, bank_shots = NULL, calibration = NULL "
                            "WHERE class_name = %s AND fingerprint <> %s", (record.name, record.bundle_fingerprint))
                cur.execute("DELETE FROM sowa_class_models WHERE class_name = %s AND bank IS NULL AND "
                            "threshold_override IS NULL", (record.name,))
            self._upsert_model(cur, record.name, record.bundle_fingerprint, bank, record.memory,
                               record.threshold_override, override=True)
            self._notify(cur, record.name, "write")
        self._seen.saw(record.name, int(revision[0]))  # our own write: not a change to report

    def write_bank(self, name: str, fingerprint: str, memory: ClassMemory, shots: tuple[str, ...]) -> bool:
        """Store one more model's bank (see `ClassStore.write_bank`). Not a change other replicas are told of: the
        class they serve is unchanged, and one preparing the same model reads this bank when it gets the lock."""
        self._check(name)
        bank = self._bank_bytes(memory)
        with _available("write_bank"), self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            row = cur.execute("SELECT shots FROM sowa_classes WHERE name = %s FOR UPDATE", (name,)).fetchone()
            if row is None or tuple(row[0]) != tuple(shots):
                return False
            self._upsert_model(cur, name, fingerprint, bank, memory, None, override=False)
        return True

    def drop_model(self, fingerprint: str) -> int:
        with _available("drop_model"), self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            dropped = cur.execute("UPDATE sowa_class_models SET bank = NULL, bank_shots = NULL, calibration = NULL "
                                  "WHERE fingerprint = %s AND bank IS NOT NULL", (fingerprint,)).rowcount
            cur.execute("DELETE FROM sowa_class_models WHERE fingerprint = %s AND threshold_override IS NULL",
                        (fingerprint,))
        return dropped

    @staticmethod
    def _bank_bytes(memory: ClassMemory) -> bytes:
        return save_tensors({"features": memory.bank.features.detach().to("cpu").contiguous()})

    @staticmethod
    def _upsert_model(cur: psycopg.Cursor[Any], name: str, fingerprint: str, bank: bytes, memory: ClassMemory,
                      threshold_override: float | None, override: bool) -> None:
        """One model's row of a class: its bank, and (`override`) its threshold override."""
        keep = "EXCLUDED" if override else "sowa_class_models"
        cur.execute(
            "INSERT INTO sowa_class_models (class_name, fingerprint, bank, bank_shots, calibration, "
            "threshold_override) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (class_name, fingerprint) DO UPDATE SET "
            "bank = EXCLUDED.bank, bank_shots = EXCLUDED.bank_shots, calibration = EXCLUDED.calibration, "
            f"threshold_override = {keep}.threshold_override",
            (name, fingerprint, bank, memory.bank.shots, Jsonb(asdict(memory.calibration)), threshold_override))

    def delete(self, name: str) -> bool:
        self._check(name)
        with _available("delete"), self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            gone = cur.execute("DELETE FROM sowa_classes WHERE name = %s RETURNING name", (name,)).fetchone()
            if gone is not None:
                self._notify(cur, name, "delete")
        self._seen.forget([name])
        return gone is not None

    def _notify(self, cur: psycopg.Cursor[Any], name: str, op: str) -> None:
        payload = json.dumps({"name": name, "op": op, "origin": self.origin})
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))  # delivered on commit, never before

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        self._check(name)
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("a class lock is already held by this thread")
        key = f"sowa.class:{name}"
        with _available("lock"), self._conn() as conn:
            conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None
                with suppress(*_UNAVAILABLE):  # else the session is gone, and its locks with it
                    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
