"""Runtime: one process's serving state, typed, and its life: start in the background, then close in order.

`LocalRuntime` is a process that holds the model: it loads the bundle, restores the classes, warms up, and owns
the engine, registry, store, batcher, kept results and the backend whose `score` predictions take. HTTP worker
processes have a runtime of their own (service/workers/runtime.py) whose backend is the engine process's. The
HTTP layer keeps one runtime per app and reaches it only through its dependencies (service/http/deps.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.bundle import read_manifest

from .access.audit import AuditSink
from .access.keys import KeyRing
from .access.store import AccessStore, open_access
from .backend import Backend, LocalBackend
from .batcher import DynamicBatcher
from .engine import Engine
from .errors import ClassDamagedError, ClassNotFoundError, ModelNotFoundError, NotReadyError, SowaError
from .models.activation import ModelManager
from .models.open import open_repository
from .models.repository import ModelRepository
from .records.drift import DriftMonitor
from .records.figures import refresh_drift, scored_with
from .records.open import open_recorder
from .records.record import Sampler
from .records.recorder import Recorder
from .records.store import RecordQuery
from .registry import ClassRegistry
from .settings import Settings
from .store import ClassStore, open_store
from .store.open import is_postgres_url
from .telemetry import Telemetry
from .uploads import DecodeBudget, PixelLimits, limit_malloc_arenas

__all__ = ["LocalRuntime", "Runtime", "ServiceStatus"]

log = logging.getLogger("sowa.service")


@dataclass
class ServiceStatus:
    """Where start-up and shutdown stand; /readyz and every route's readiness check read it."""

    model_loaded: bool = False
    classes_restored: bool = False
    warmed_up: bool = False
    accepting: bool = False
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.model_loaded and self.classes_restored and self.warmed_up and self.accepting


def _not_ready() -> NotReadyError:
    return NotReadyError("the model is loading or the server is shutting down; see /readyz",
                         headers={"Retry-After": "5"})


class Runtime:
    """What every serving process has, whether or not it holds the model."""

    def __init__(self, settings: Settings, telemetry: Telemetry) -> None:
        self.settings, self.telemetry = settings, telemetry
        self.status = ServiceStatus()
        self.limits = PixelLimits.of(settings)
        self.decode_budget = DecodeBudget(int(settings.decode_memory_mb * 2**20))  # this process's decodes
        limit_malloc_arenas()  # before the worker threads exist, in every process serving the app (uploads.py)
        self._backend: Backend | None = None
        # who may call: the configured key now, the stored keys once `open_access` has loaded them
        self.keys = KeyRing(settings.api_key.get_secret_value() if settings.api_key is not None else None)
        self.access: AccessStore | None = None
        if not is_postgres_url(settings.store_url):  # a local SQLite file: open at once, so keys hold from the start
            self.access = open_access(settings.store_url)
            self.keys.attach(self.access)

    async def open_access(self) -> None:
        """Open the keys' and audit trail's store beside the class store, and load the keys (PostgreSQL: during
        start-up, when the database is reached; until then only the open paths answer)."""
        backoff = 0.5
        while self.access is None:  # a database down at start-up is waited for, as the class store's is
            try:
                access = await asyncio.to_thread(open_access, self.settings.store_url)
            except SowaError as e:
                log.warning("access store unreachable (%s); retrying in %.1f s", e.message, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            await asyncio.to_thread(self.keys.attach, access)
            self.access = access

    @property
    def backend(self) -> Backend:
        """Where predictions go; 503 until start-up has made it."""
        if self._backend is None or not self.status.ready:
            raise _not_ready()
        return self._backend

    counts_requests = True  # False where HTTP workers in front count them (the engine process behind them)

    async def start(self) -> None:
        """Bring the process up; failures are recorded in `status.error`, never raised (/healthz says so)."""

    async def before_listening(self, startup: asyncio.Task) -> None:
        """Awaited before the server takes connections (`startup` is `start()` running): by default nothing,
        so /healthz and /readyz answer while the model loads."""

    async def ready_info(self) -> dict[str, Any]:
        """/readyz's body (`ready` decides its status)."""
        s = self.status
        return {"ready": s.ready, "model_loaded": s.model_loaded, "warmed_up": s.warmed_up,
                "classes_restored": s.classes_restored, "classes": 0, "error": s.error}

    async def close(self) -> None:
        """Refuse new work, finish what is queued, release everything."""
        self.status.accepting = False
        if self.access is not None:
            self.access.close()


class LocalRuntime(Runtime):
    """A process holding the model: a single server, or the engine process behind HTTP workers."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None) -> None:
        super().__init__(settings, telemetry or Telemetry())
        s = settings
        self.records: Recorder = open_recorder(s)  # inspection records: spool here, store beside the classes
        self.drift = DriftMonitor()  # score drift per class, refreshed off the request path (docs/quality.md)
        self._drift_upkeep: asyncio.Task | None = None
        self.engine: Engine | None = None
        self.store: ClassStore | None = None
        self._registry: ClassRegistry | None = None
        self.batcher: DynamicBatcher | None = None
        self.local: LocalBackend | None = None
        self.repository: ModelRepository | None = None
        self.models: ModelManager | None = None
        self._sync: asyncio.Task | None = None
        # the registry's changes go to the audit trail through this sink (a failed write waits and is retried)
        self.audit = AuditSink(self._append_audit, self.telemetry.audit_write_failures.inc)
        self._audit_upkeep: asyncio.Task | None = None

    audit_flush_s = 60.0  # how often events whose write failed are tried again
    audit_prune_s = 3600.0  # how often events beyond `audit_retention_days` are removed (and once at start)

    def _append_audit(self, events: Any) -> None:
        if self.access is None:
            raise RuntimeError("the access store is not open")
        self.access.append(events)

    def prune_audit(self) -> int:
        """Remove audit events older than the retention setting (blocking); how many."""
        if self.access is None:
            return 0
        removed = self.access.prune(time.time() - self.settings.audit_retention_days * 86400)
        if removed:
            log.info("audit trail: %d event(s) older than %g days removed", removed,
                     self.settings.audit_retention_days)
        return removed

    async def _keep_audit(self) -> None:
        """Retention, and retries of events whose write failed: once at start, then on their intervals; a
        failure is logged and tried again next time."""
        next_prune = 0.0
        while True:
            with contextlib.suppress(Exception):  # logged by the sink
                await asyncio.to_thread(self.audit.flush)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.audit_prune_s
                try:
                    await asyncio.to_thread(self.prune_audit)
                except Exception as e:
                    log.error("audit trail: pruning failed (%s); trying again in %g s", e, self.audit_prune_s)
            await asyncio.sleep(min(self.audit_flush_s, self.audit_prune_s))

    drift_refresh_s = 60.0  # how often the drift figures are recomputed from the records
    drift_scan = 5000  # the newest records whose classes count as recently active

    def refresh_drift(self) -> None:
        """Recompute the drift figures from the records (blocking): the classes of the newest records, at most
        the monitor's `max_classes`, each against its current shots."""
        registry = self._registry
        if registry is None:
            return

        def active(limit: int) -> list[str]:
            seen = dict.fromkeys(r.class_name for r in self.records.query(RecordQuery(limit=self.drift_scan)))
            return list(seen)[:limit]

        def reference(name: str) -> tuple[str, list[float], float] | None:
            try:
                entry = registry.get(name)
            except (ClassNotFoundError, ClassDamagedError):
                return None
            return (scored_with(entry.revision, registry.generation.served.fingerprint),
                    entry.memory.calibration.shot_scores(), entry.calibration.threshold)

        refresh_drift(self.drift, self.records, active, reference)

    async def _keep_drift(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh_drift)
            except Exception as e:  # the store is down, say: the last figures stay, and the next refresh retries
                log.warning("drift: refresh failed (%s); trying again in %g s", e, self.drift_refresh_s)
            await asyncio.sleep(self.drift_refresh_s)

    @property
    def registry(self) -> ClassRegistry:
        """The classes; 503 until they are restored."""
        if self._registry is None or not self.status.ready:
            raise _not_ready()
        return self._registry

    async def ready_info(self) -> dict[str, Any]:
        r, store = self._registry, self.store
        return {**await super().ready_info(), "classes": len(r) if r is not None else 0,
                "refused_classes": r.refused if r is not None else {},
                "store": store.kind if store is not None else None,
                "store_error": store.error if store is not None else None,
                "model": self.models.ready_info() if self.models is not None else None}

    def first_model(self, repository: ModelRepository) -> tuple[Path, str | None]:
        """The bundle to serve at start (blocking): the repository's active version. The configured bundle is
        added to the repository; when it is new there (a deploy by restart), or nothing is active yet, it becomes
        the active version. So a restart never undoes an activation made through the API."""
        bundle = Path(self.settings.bundle)
        fingerprint = read_manifest(bundle).fingerprint
        try:
            configured, new = repository.resolve(fingerprint), False
        except ModelNotFoundError:
            configured, new = repository.add(bundle, None, "serve", verify=False, copy=False), True
        state = repository.state()
        if new or state.active is None:
            if state.active != fingerprint:
                repository.set_state(active=fingerprint, previous=state.active,
                                     target=None if state.target == fingerprint else state.target)
                log.info("models: the configured bundle %s is the active version", configured.version)
            return bundle, configured.label
        if state.active == fingerprint:
            return bundle, configured.label
        active = repository.resolve(state.active)
        log.info("models: serving %s, the repository's active version (the configured bundle %s is not it)",
                 active.version, configured.version)
        return repository.path(active.fingerprint), active.label

    async def start(self) -> None:
        s, status = self.settings, self.status
        try:
            await self.open_access()
            self._audit_upkeep = asyncio.create_task(self._keep_audit())
            await asyncio.to_thread(self.records.start)  # takes up what the last run left in the spool
            budget = None if s.bank_device_budget_mb is None else int(s.bank_device_budget_mb * 2**20)
            repository = self.repository = await asyncio.to_thread(open_repository, s.store_url, s.data_dir)
            bundle, label = await asyncio.to_thread(self.first_model, repository)
            engine = self.engine = await asyncio.to_thread(Engine, bundle, s.device, s.dtype, budget,
                                                           s.compile_mode, s.max_batch_size, s.image_decoder, label)
            status.model_loaded = True
            store = self.store = open_store(s.store_url)
            registry = self._registry = ClassRegistry(store, engine, s.max_shots_per_class, s.max_classes,
                                                      self.audit)
            await asyncio.to_thread(registry.restore)
            status.classes_restored = True
            if s.warmup:
                await engine.call(engine.warmup)
            status.warmed_up = True
            t = self.telemetry
            t.model_info.info({k: str(v) for k, v in engine.describe().items()})
            t.track(lambda: len(registry), registry.bank_bytes, engine.device_memory_bytes)
            t.track_banks(engine.banks.stats)
            t.track_store(store)
            batcher = self.batcher = DynamicBatcher(engine.run_batch, s.max_batch_size, s.max_wait_ms, s.max_queue, t)
            t.track_records(self.records)
            t.track_drift(self.drift)
            local = self.local = self._backend = LocalBackend(engine, registry, batcher, self.records, s.records,
                                                              Sampler(s.record_sample_passed))
            batcher.start()
            models = self.models = ModelManager(repository, engine, registry, batcher, s, t, self.audit, self.limits,
                                                self.decode_budget)
            models.on_shadow = lambda scorer: setattr(local, "shadower", scorer)
            t.track_models(models.preparation_gauges)
            await models.start()
            if s.sync_interval_s > 0:
                self._sync = asyncio.create_task(registry.follow(s.sync_interval_s))
            self._drift_upkeep = asyncio.create_task(self._keep_drift())
            await self.started()
            status.accepting = True
            log.info("ready: %s, %d classes", engine.describe(), len(registry))
        except Exception as e:
            status.error = f"{type(e).__name__}: {e}"
            log.exception("start-up failed")

    async def started(self) -> None:
        """Called once everything is up, before the process says it is ready (the engine process behind HTTP
        workers opens their socket here)."""

    async def stopping(self) -> None:
        """Called first at shutdown, before the queue drains."""

    async def close(self) -> None:
        if self._audit_upkeep is not None:
            self._audit_upkeep.cancel()
        if self.audit.pending:  # a last try while the access store is open; what still fails is logged in full
            await asyncio.to_thread(self.audit.flush, True)
        await super().close()
        await self.stopping()
        if self.models is not None:
            await self.models.close()
        if self._sync is not None:
            self._sync.cancel()
        if self._drift_upkeep is not None:
            self._drift_upkeep.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        if self.engine is not None:
            self.engine.close()
        await asyncio.to_thread(self.records.close)  # after the queue drained: every answered record is spooled
        if self.store is not None:
            self.store.close()
        if self.repository is not None:
            self.repository.close()
