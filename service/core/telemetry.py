"""Prometheus metrics, in a registry of the app's own (two apps in one process never share counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .bank_residency import ResidencyStats
    from .records.drift import DriftMonitor
    from .records.recorder import Recorder
    from .store import ClassStore

__all__ = ["CONTENT_TYPE_LATEST", "Telemetry"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Telemetry:
    """`http`: the request metrics, counted where HTTP is served; `engine`: batching, queue, classes, banks.

    One process serves both by default. With HTTP worker processes (service/workers/), each worker counts its
    requests in prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, set before the worker
    imports prometheus_client) and the engine process, which has the rest, adds those files up at scrape time
    (`worker_metrics_dir`): one /metrics, whichever worker a scrape reaches.
    """

    def __init__(self, http: bool = True, engine: bool = True, worker_metrics_dir: str | None = None) -> None:
        """`http` False: the workers count requests, so this process's counts stay off its /metrics (they are
        kept, unrendered, for code that counts either way); `worker_metrics_dir`: add the workers' counts."""
        self.registry = CollectorRegistry()
        r = self.registry
        if worker_metrics_dir is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(r, path=worker_metrics_dir)
        h = r if http else CollectorRegistry()
        self.requests = Counter("sowa_requests_total", "HTTP requests by route template and status",
                                ["endpoint", "status"], registry=h)
        self.request_duration = Histogram("sowa_request_duration_seconds", "HTTP request latency by route",
                                          ["endpoint"], buckets=_LATENCY_BUCKETS, registry=h)
        self.images = Counter("sowa_images_total", "images scored by /predict", registry=h)
        if not engine:
            return
        self.batch_size = Histogram("sowa_batch_size", "images per device batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("sowa_queue_depth", "images waiting for the device", registry=r)
        self.queue_wait = Histogram("sowa_queue_wait_seconds", "time from enqueue to batch start",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.classes = Gauge("sowa_classes", "registered product classes", registry=r)
        self.bank_bytes = Gauge("sowa_bank_bytes", "bytes held by class banks", registry=r)
        self.device_memory = Gauge("sowa_device_memory_bytes", "device memory in use (CUDA allocated; on CPU the "
                                   "model's weights, banks are in sowa_bank_bytes)", registry=r)
        self.model_info = Info("sowa_model", "the served bundle", registry=r)
        self.model_switches = Counter("sowa_model_switches", "times this replica switched to another model version",
                                      registry=r)
        self.shadow_scored = Counter("sowa_shadow_scored_images", "images a shadow model scored", registry=r)
        self.shadow_dropped = Counter("sowa_shadow_dropped_images", "images sampled for the shadow but not scored "
                                      "(its queue was full under load, or its class was not prepared yet)",
                                      registry=r)
        self.audit_write_failures = Counter("sowa_audit_write_failures", "audit events whose first write failed "
                                            "(the change stood; the event waits in memory and is retried)",
                                            registry=r)

    def track(self, classes: Callable[[], int], bank_bytes: Callable[[], int],
              device_memory: Callable[[], int]) -> None:
        """Gauges read at scrape time, so they are never stale."""
        self.classes.set_function(lambda: float(classes()))
        self.bank_bytes.set_function(lambda: float(bank_bytes()))
        self.device_memory.set_function(lambda: float(device_memory()))

    def shadow_images(self, scored: int, dropped: int) -> None:
        self.shadow_scored.inc(scored)
        self.shadow_dropped.inc(dropped)

    def track_models(self, preparation: Callable[[], tuple[float, float, float]]) -> None:
        """A model being prepared on this replica, read at scrape time: `preparation()` is (1 while preparing,
        classes done, classes)."""
        self.registry.register(_ModelsCollector(preparation))

    def track_banks(self, stats: Callable[[], ResidencyStats]) -> None:
        """Bank residency (`BankResidency.stats()`), read at scrape time: resident banks and bytes on the
        device, the budget, and the host-to-device loads and evictions so far."""
        self.registry.register(_BankCollector(stats))

    def track_store(self, store: ClassStore) -> None:
        """The class store's reachability, read at scrape time: sowa_store_up (0 while a replica cannot reach
        it and serves what it holds) and the reconnects and pushed changes so far (0 for a directory)."""
        self.registry.register(_StoreCollector(store))

    def track_drift(self, monitor: DriftMonitor) -> None:
        """Score drift per class (service/core/records/drift.py), as its last refresh left it: one series per class
        for at most the monitor's `max_classes` most recently active classes."""
        self.registry.register(_DriftCollector(monitor))

    def track_records(self, recorder: Recorder) -> None:
        """Inspection records (service/core/records/recorder.py), read at scrape time: written to the store, not
        kept (past the spool's bound), waiting in the spool (records and bytes), whether the store is writable."""
        self.registry.register(_RecordsCollector(recorder))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelsCollector:
    def __init__(self, preparation: Callable[[], tuple[float, float, float]]) -> None:
        self.preparation = preparation

    def collect(self) -> Iterator[Metric]:
        preparing, done, total = self.preparation()
        yield GaugeMetricFamily("sowa_model_preparing", "1 while a model version is being prepared to serve or "
                                "shadow (the serving model answers meanwhile)", value=preparing)
        yield GaugeMetricFamily("sowa_model_preparation_classes_done", "classes whose bank is ready for the model "
                                "being prepared", value=done)
        yield GaugeMetricFamily("sowa_model_preparation_classes", "classes the model being prepared needs",
                                value=total)


class _RecordsCollector:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        r = self.recorder
        yield CounterMetricFamily("sowa_records_written", "inspection records written to the record store",
                                  value=r.stats.written)
        yield CounterMetricFamily("sowa_records_not_kept", "inspection records not kept: the spool was full (the "
                                  "store unreachable) or could not be written", value=r.stats.not_kept)
        yield GaugeMetricFamily("sowa_records_spooled", "records in the local spool, not yet in the store",
                                value=r.spooled)
        yield GaugeMetricFamily("sowa_records_spool_bytes", "bytes of records in the local spool",
                                value=r.spool_bytes)
        yield GaugeMetricFamily("sowa_records_store_up", "1 while the record store can be written",
                                value=1.0 if r.error is None and r.store is not None else 0.0)


class _BankCollector:
    def __init__(self, stats: Callable[[], ResidencyStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:  # prometheus_client's collector protocol
        st = self.stats()
        yield GaugeMetricFamily("sowa_bank_device_resident", "class banks resident on the device",
                                value=st.resident_banks)
        yield GaugeMetricFamily("sowa_bank_device_bytes", "bytes of class banks resident on the device",
                                value=st.resident_bytes)
        yield GaugeMetricFamily("sowa_bank_device_budget_bytes", "device byte budget for class banks (-1: none)",
                                value=-1 if st.budget_bytes is None else st.budget_bytes)
        yield CounterMetricFamily("sowa_bank_loads", "class banks copied from host to device memory",
                                  value=st.loads)
        yield CounterMetricFamily("sowa_bank_evictions", "class banks dropped from device memory (kept on the host)",
                                  value=st.evictions)


class _StoreCollector:
    def __init__(self, store: ClassStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = self.store.error is None
        yield GaugeMetricFamily("sowa_store_up", "1 while the class store is reachable (a directory store: always)",
                                value=1.0 if up else 0.0)
        yield CounterMetricFamily("sowa_store_reconnects", "times the class store came back after a loss",
                                  value=self.store.reconnects)
        yield CounterMetricFamily("sowa_store_notifications", "changes pushed by other replicas",
                                  value=self.store.notifications)


class _DriftCollector:
    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        ks = GaugeMetricFamily("sowa_score_drift_ks", "one-sided KS statistic D+: how far a class's recent passed "
                               "scores lie above its calibration's shot scores (0 not above, 1 all above); the most "
                               "recently active classes only",
                               labels=["class_name"])
        p = GaugeMetricFamily("sowa_score_drift_pvalue", "p-value of sowa_score_drift_ks (small: not chance)",
                              labels=["class_name"])
        n = GaugeMetricFamily("sowa_score_drift_recent", "recent passed parts behind sowa_score_drift_ks",
                              labels=["class_name"])
        for f in self.monitor.figures():
            ks.add_metric([f.class_name], f.ks)
            p.add_metric([f.class_name], f.p_value)
            n.add_metric([f.class_name], float(f.recent))
        yield ks
        yield p
        yield n
