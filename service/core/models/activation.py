"""ModelManager: which model serves, switching to another without downtime, and shadowing a candidate.

The model repository (service/core/models/repository.py) holds the versions and the serving state every replica
shares: `active` (serving), `previous` (what a rollback goes back to), `target` (an activation asked and not done),
`shadow` and its share. The REST API and `sowa models` only change that state; each replica's manager follows it
(pushed by PostgreSQL, looked at every `sync_interval_s` for a directory) and does the work itself:

    loading     the bundle is loaded beside the serving one (refused when memory would not hold both)
    rebuilding  every class's bank and calibration for it: read from the store, where another replica or an earlier
                attempt stored it, else fitted from the stored shots and stored (under the class's store lock, so
                no bank is fitted twice across replicas); progress in /readyz, /models and the metrics
    warming     its first batches run before traffic reaches it
    switching   under the registry's lock, classes changed meanwhile are caught up, then the engine's model and the
                classes change together, between two batches; requests already started finish on the old model

The replica that switches first records `active` (and clears `target`). A crash at any point leaves `active` as it
was: on restart that model serves, and the pending `target` is prepared again, its stored banks reused. Failures are
reported in /models and the state is left as it was; nothing half-prepared is ever served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..access.audit import AuditEvent, AuditSink
from ..batcher import DynamicBatcher
from ..engine import Engine
from ..errors import ConflictError, ModelMemoryError, ModelNotFoundError, SowaError
from ..registry import ClassRegistry, Generation
from ..served_model import ServedModel
from ..settings import Settings
from ..telemetry import Telemetry
from ..uploads import DecodeBudget, PixelLimits
from .repository import ModelRepository, ModelVersion, ServingState
from .shadow import ShadowScorer

__all__ = ["ModelManager", "Preparation"]

log = logging.getLogger("sowa.models")


@dataclass
class Preparation:
    """One model being made ready on this replica, to serve (`activate`) or to shadow."""

    fingerprint: str
    version: str
    purpose: str  # "activate" or "shadow"
    phase: str = "loading"  # loading, rebuilding, warming, switching, done, failed, cancelled
    classes: int = 0
    classes_done: int = 0
    fitted: int = 0  # banks fitted here (the rest were read from the store)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.phase not in ("done", "failed", "cancelled")

    def public(self) -> dict[str, Any]:
        return {"version": self.version, "fingerprint": self.fingerprint, "purpose": self.purpose,
                "phase": self.phase, "classes": self.classes, "classes_done": self.classes_done,
                "fitted": self.fitted, "started": self.started, "finished": self.finished, "error": self.error,
                "seconds": (self.finished or time.time()) - self.started}


def _available_memory(device: torch.device) -> int:
    """Bytes the device can still give: free CUDA memory, or the host's available memory on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class ModelManager:
    def __init__(self, repository: ModelRepository, engine: Engine, registry: ClassRegistry, batcher: DynamicBatcher,
                 settings: Settings, telemetry: Telemetry, audit: AuditSink | None, limits: PixelLimits,
                 budget: DecodeBudget) -> None:
        self.repository, self.engine, self.registry, self.batcher = repository, engine, registry, batcher
        self.settings, self.telemetry, self.audit = settings, telemetry, audit
        self.limits, self.budget = limits, budget
        self.preparation: Preparation | None = None  # the latest, running or ended
        self._task: asyncio.Task | None = None
        self.shadow: ShadowScorer | None = None
        self._shadow_prep: tuple[str, asyncio.Task] | None = None
        self.shadow_preparation: Preparation | None = None  # the latest shadow's, running or ended
        self._refits: set[str] = set()
        self._follow: asyncio.Task | None = None
        self._forget: asyncio.TimerHandle | None = None
        self.on_shadow: Any = None  # set by the runtime: called with the ShadowScorer (or None) to attach it
        self.on_switch: list[Callable[[], None]] = []  # called after each switch (the engine tells its workers)

    # -- what is served ---------------------------------------------------------------------------------------
    @property
    def serving(self) -> ServedModel:
        return self.registry.generation.served

    def overview(self) -> dict[str, Any]:
        """GET /models: every version, which serves, which shadows, and what this replica is preparing."""
        state = self.repository.state()
        versions = self.repository.list()
        by_fp = {v.fingerprint: v for v in versions}

        def name(fp: str | None) -> str | None:
            return None if fp is None else (by_fp[fp].version if fp in by_fp else fp[:16])

        return {
            "serving": self.serving.version, "active": name(state.active), "previous": name(state.previous),
            "target": name(state.target), "shadow": name(state.shadow),
            "shadow_share": state.shadow_share if state.shadow else None,
            "preparation": None if self.preparation is None else self.preparation.public(),
            "shadow_preparation": None if self.shadow_preparation is None else self.shadow_preparation.public(),
            "versions": [{**v.public(), "serving": v.fingerprint == self.serving.fingerprint,
                          "active": v.fingerprint == state.active, "shadow": v.fingerprint == state.shadow}
                         for v in versions],
        }

    def preparation_gauges(self) -> tuple[float, float, float]:
        prep = self.preparation
        if prep is None or not prep.running:
            return 0.0, 0.0, 0.0
        return 1.0, float(prep.classes_done), float(prep.classes)

    def ready_info(self) -> dict[str, Any]:
        """/readyz's `model`: the serving version, and an activation under way (the old model serves meanwhile)."""
        prep = self.preparation
        return {"version": self.serving.version, "fingerprint": self.serving.fingerprint[:16],
                "preparing": prep.public() if prep is not None and prep.running else None}

    # -- requests (REST and CLI alike go through the repository's state) --------------------------------------
    async def activate(self, version: str, actor: str, wait: bool = False) -> dict[str, Any]:
        """Ask every replica to switch to `version`; with `wait`, answer once this replica serves it."""
        v = await asyncio.to_thread(self.repository.resolve, version)
        state = await asyncio.to_thread(self.repository.state)
        if v.fingerprint == self.serving.fingerprint:  # already serving: an activation under way is called off
            if state.target is not None:
                await asyncio.to_thread(self.repository.set_state, target=None)
                self._audit(actor, "model.activated", v.version, {"active": self._version_of(state.target)},
                            {"active": v.version})
            if self._task is not None and not self._task.done():
                self._task.cancel()
            return await asyncio.to_thread(self.overview)
        self._check_memory(v)
        await asyncio.to_thread(self.repository.set_state, target=v.fingerprint)
        self._audit(actor, "model.activated", v.version, {"active": self._version_of(state.active)},
                    {"active": v.version})
        self._want(v.fingerprint, v.label)
        if wait and self._task is not None:
            await asyncio.shield(self._task)
            prep = self.preparation
            if prep is not None and prep.phase == "failed":
                raise ConflictError(f"model {v.version} was not activated: {prep.error}; the serving model is "
                                    f"{self.serving.version}, nothing changed")
        return await asyncio.to_thread(self.overview)

    async def rollback(self, actor: str, wait: bool = False) -> dict[str, Any]:
        state = await asyncio.to_thread(self.repository.state)
        if state.previous is None:
            raise ConflictError("there is no previous model to roll back to")
        return await self.activate(state.previous, actor, wait)

    async def set_shadow(self, version: str | None, share: float | None, actor: str, wait: bool = False
                         ) -> dict[str, Any]:
        """Start shadowing `version` on `share` of the traffic (None: stop)."""
        state = await asyncio.to_thread(self.repository.state)
        if version is None:
            if state.shadow is None and self.shadow is None:
                return await asyncio.to_thread(self.overview)  # nothing shadows: nothing to change, nothing to audit
            await asyncio.to_thread(self.repository.set_state, shadow=None, shadow_share=0.0)
            self._audit(actor, "model.shadow", self._version_of(state.shadow) or "-",
                        {"shadow": self._version_of(state.shadow)}, None)
            await self._apply_shadow(None, 0.0)
            return await asyncio.to_thread(self.overview)
        v = await asyncio.to_thread(self.repository.resolve, version)
        if v.fingerprint == self.serving.fingerprint:
            raise ConflictError(f"model {v.version} is the one serving: shadow another version")
        share = self.settings.shadow_share if share is None else share
        if self.shadow is None or self.shadow.generation.served.fingerprint != v.fingerprint:
            self._check_memory(v)
        await asyncio.to_thread(self.repository.set_state, shadow=v.fingerprint, shadow_share=share)
        self._audit(actor, "model.shadow", v.version, {"shadow": self._version_of(state.shadow)},
                    {"shadow": v.version, "share": share})
        await self._apply_shadow(v, share)
        if wait and self._shadow_prep is not None:
            await asyncio.shield(self._shadow_prep[1])
        return await asyncio.to_thread(self.overview)

    async def shadow_report(self, version: str) -> dict[str, Any]:
        """How the shadow `version` compares, on this replica (ModelNotFoundError when it is not shadowing)."""
        v = await asyncio.to_thread(self.repository.resolve, version)
        s = self.shadow
        if s is None or s.generation.served.fingerprint != v.fingerprint:
            preparing = self._shadow_prep is not None and self._shadow_prep[0] == v.fingerprint
            raise ModelNotFoundError(f"model {v.version} is not shadowing on this replica"
                                     + (" yet: its banks are being prepared" if preparing else ""))
        return s.report.public(self.serving.version)  # on the event loop, where the report is written

    # -- following the shared state ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Apply the state once (a pending activation resumes, a shadow restarts), then follow it."""
        await self._apply(await asyncio.to_thread(self.repository.state))
        self._follow = asyncio.create_task(self._follow_state(), name="sowa-models-follow")

    async def _follow_state(self) -> None:
        pushed = asyncio.Event()
        loop = asyncio.get_running_loop()
        pushes = self.repository.subscribe(lambda: loop.call_soon_threadsafe(pushed.set))
        interval = self.settings.sync_interval_s or 1.0
        while True:
            if pushes:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pushed.wait(), 5.0)  # and a look now and then: a missed push
                pushed.clear()
            else:
                await asyncio.sleep(interval)
            try:
                await self._apply(await asyncio.to_thread(self.repository.state))
            except Exception as e:  # the store is down, say: look again next time
                log.warning("models: could not follow the serving state (%s)", e)

    async def _apply(self, state: ServingState) -> None:
        want = state.target or state.active
        if want is not None and want != self.serving.fingerprint:
            running = self.preparation is not None and self.preparation.running
            if not (running and self.preparation is not None and self.preparation.fingerprint == want):
                try:
                    v = await asyncio.to_thread(self.repository.resolve, want)
                except SowaError as e:
                    log.error("models: the serving state names %s, which the repository cannot give (%s)",
                              want[:16], e.message)
                    return
                self._want(v.fingerprint, v.label)
        elif (want == self.serving.fingerprint and self._task is not None and not self._task.done()
              and self.preparation is not None and self.preparation.fingerprint != want):
            self._task.cancel()  # asked back to what serves (a quick rollback): stop preparing the other one
        shadow = None
        if state.shadow is not None and state.shadow != self.serving.fingerprint:
            with contextlib.suppress(SowaError):
                shadow = await asyncio.to_thread(self.repository.resolve, state.shadow)
        await self._apply_shadow(shadow, state.shadow_share)

    # -- preparing and switching ------------------------------------------------------------------------------
    def _want(self, fingerprint: str, label: str | None) -> None:
        """Prepare `fingerprint` to serve, cancelling a preparation of another one (the latest request wins)."""
        if self._task is not None and not self._task.done():
            if self.preparation is not None and self.preparation.fingerprint == fingerprint:
                return
            self._task.cancel()
        prep = self.preparation = Preparation(fingerprint, label or fingerprint[:16], "activate")
        self._task = asyncio.create_task(self._activate(prep, label), name=f"sowa-activate-{fingerprint[:12]}")

    def _check_memory(self, v: ModelVersion) -> None:
        """Refuse a model that would not fit beside the serving one (and a shadow), before anything changes."""
        s = self.settings
        bytes_per = torch.empty((), dtype=self.engine.dtype).element_size()
        need = v.bytes * bytes_per // 4 + self.registry.bank_bytes()  # weights are stored as fp32
        if s.models_memory_mb is not None:
            held = self.serving.weight_bytes + (self.shadow.generation.served.weight_bytes if self.shadow else 0)
            room = int(s.models_memory_mb * 2**20) - held
            where = f"models_memory_mb ({s.models_memory_mb:g} MiB) less the {held / 2**20:.1f} MiB loaded"
        else:
            room = _available_memory(self.engine.device)
            where = f"the {self.engine.device.type} memory available"
        if need > room:
            raise ModelMemoryError(f"model {v.version} needs about {need / 2**20:.1f} MiB beside the serving model, "
                                   f"more than {where} ({max(room, 0) / 2**20:.1f} MiB); nothing was changed. Stop "
                                   "a shadow, or switch with more room")

    async def _load(self, prep: Preparation, label: str | None) -> tuple[ServedModel, dict]:
        path = await asyncio.to_thread(self.repository.path, prep.fingerprint)
        served = await asyncio.to_thread(self.engine.load, path, label)
        if served.fingerprint != prep.fingerprint:
            raise SowaError(f"the repository's copy of {prep.version} loads as another model "
                            f"({served.fingerprint[:16]})")
        prep.phase = "rebuilding"

        def progress(done: int, total: int, fitted: int) -> None:
            prep.classes_done, prep.classes, prep.fitted = done, total, fitted

        prep.classes = len(self.registry)
        prepared = await self.registry.prepare(served, progress)
        prep.phase = "warming"
        if self.settings.warmup:
            await self.engine.call(self.engine.warmup, served)
        return served, prepared

    async def _activate(self, prep: Preparation, label: str | None) -> None:
        try:
            shadow = self.shadow
            if shadow is not None and shadow.generation.served.fingerprint == prep.fingerprint:
                # the shadow becomes the model: loaded and prepared already; classes changed since are caught up
                served, prepared = shadow.generation.served, dict(shadow.generation.classes)
                prep.classes = prep.classes_done = len(prepared)
                await self._apply_shadow(None, 0.0)
            else:
                # every replica checks its own room (the one asked checked before answering)
                self._check_memory(await asyncio.to_thread(self.repository.resolve, prep.fingerprint))
                served, prepared = await self._load(prep, label)
            prep.phase = "switching"
            old = self.serving
            await self.registry.switch(served, prepared)
            prep.phase, prep.finished = "done", time.time()
            for callback in self.on_switch:
                callback()
            self.telemetry.model_switches.inc()
            self.telemetry.model_info.info({k: str(v) for k, v in served.describe().items()})
            # the generation before the switch stays for requests still on it (a worker's staged images)
            if self._forget is not None:
                self._forget.cancel()
            self._forget = asyncio.get_running_loop().call_later(self.settings.request_timeout_s + 5,
                                                                 self.registry.forget_previous)
            state = await asyncio.to_thread(self.repository.state)
            changes: dict[str, Any] = {}
            if state.active != served.fingerprint:
                changes.update(active=served.fingerprint, previous=old.fingerprint)
            if state.target == served.fingerprint:
                changes["target"] = None
            if state.shadow == served.fingerprint:  # promoted: it shadows no more
                changes.update(shadow=None, shadow_share=0.0)
            if changes:
                try:
                    await asyncio.to_thread(self.repository.set_state, **changes)
                except Exception as e:  # serving already: the next replica to switch, or a restart, records it
                    log.warning("models: serving %s, but the shared state could not say so (%s)", served.version, e)
            log.info("models: now serving %s (was %s): %d classes, %d banks fitted, %.1f s", served.version,
                     old.version, prep.classes, prep.fitted, prep.finished - prep.started)
        except asyncio.CancelledError:
            prep.phase, prep.finished = "cancelled", time.time()
            raise
        except Exception as e:
            prep.phase, prep.finished = "failed", time.time()
            prep.error = e.message if isinstance(e, SowaError) else f"{type(e).__name__}: {e}"
            log.error("models: %s not activated: %s", prep.version, prep.error)

    async def _apply_shadow(self, v: ModelVersion | None, share: float) -> None:
        current = self.shadow.generation.served.fingerprint if self.shadow is not None else None
        if v is not None and current == v.fingerprint:
            self.shadow.share = self.shadow.report.share = share  # type: ignore[union-attr]
            return
        if v is not None and self._shadow_prep is not None and self._shadow_prep[0] == v.fingerprint:
            return  # being prepared
        if self._shadow_prep is not None:
            self._shadow_prep[1].cancel()
            self._shadow_prep = None
        if self.shadow is not None:
            old, self.shadow = self.shadow, None
            if self.on_shadow is not None:
                self.on_shadow(None)
            await old.close()
        if v is None:
            return
        task = asyncio.create_task(self._start_shadow(v, share), name=f"sowa-shadow-{v.fingerprint[:12]}")
        self._shadow_prep = (v.fingerprint, task)

    async def _start_shadow(self, v: ModelVersion, share: float) -> None:
        prep = self.shadow_preparation = Preparation(v.fingerprint, v.version, "shadow")
        try:
            served, prepared = await self._load(prep, v.label)
        except asyncio.CancelledError:
            prep.phase, prep.finished = "cancelled", time.time()
            raise
        except Exception as e:
            prep.phase, prep.error = "failed", e.message if isinstance(e, SowaError) else f"{type(e).__name__}: {e}"
            prep.finished = time.time()
            log.error("models: shadow %s not started: %s", v.version, prep.error)
            self._shadow_prep = None
            return
        scorer = ShadowScorer(self.engine, self.registry, Generation(served, prepared), share, self.batcher,
                              self.limits, self.budget, self._refit, self.telemetry.shadow_images)
        scorer.start()
        self.shadow, self._shadow_prep = scorer, None
        prep.phase, prep.finished = "done", time.time()
        if self.on_shadow is not None:
            self.on_shadow(scorer)
        log.info("models: %s shadows %s on %.0f%% of the traffic", v.version, self.serving.version, 100 * share)

    def _refit(self, name: str) -> None:
        """Prepare one class again for the shadow (its shots changed, or it is new), in the background."""
        if name in self._refits or self.shadow is None:
            return
        self._refits.add(name)
        scorer = self.shadow

        async def refit() -> None:
            try:
                loaded = await self.registry.prepare_class(name, scorer.generation.served)
                if loaded is not None:
                    scorer.generation.classes[name] = loaded[0]
            except Exception as e:
                log.warning("shadow: class %s not prepared (%s)", name, e)
            finally:
                self._refits.discard(name)

        scorer.keep(asyncio.create_task(refit()))

    # -- upkeep -----------------------------------------------------------------------------------------------
    def _version_of(self, fingerprint: str | None) -> str | None:
        """A fingerprint as the audit trail names it (a label, or its first 16 digits)."""
        if fingerprint is None:
            return None
        try:
            return self.repository.resolve(fingerprint).version
        except SowaError:
            return fingerprint[:16]

    def _audit(self, actor: str, action: str, target: str, before: dict[str, Any] | None,
               after: dict[str, Any] | None) -> None:
        if self.audit is not None:
            self.audit.record([AuditEvent(actor, action, target, before, after)])

    async def close(self) -> None:
        for task in (self._follow, self._task, self._shadow_prep[1] if self._shadow_prep else None):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._forget is not None:
            self._forget.cancel()
        if self.shadow is not None:
            await self.shadow.close()
