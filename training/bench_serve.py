"""`sowa bench serve`: the service under closed-loop load, with batching on and off, beside the offline engine.

For each batching mode a real server is started (`sowa serve` on loopback) with a K-shot class registered;
`c` clients each send one image per request (a synthetic part, JPEG at the model size, heatmap none) as soon
as their last answer arrives, for `duration` seconds. Reported: images/s, p50/p99 latency, and the mean device
batch size read from /metrics. The offline engine's images/s (same bundle, batch = max batch size, preprocessed
tensors) is measured in the same run, in a child process while no server runs, before and after the load.
"""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from model.bundle import load_bundle, read_manifest
from model.inference import fit_class, predict_scored

from .bench_model import machine_description
from .offline import init_bundle
from .server_process import ServerProcess
from .synth import make_part

__all__ = ["ServeRow", "bench_serve", "format_serve_table"]


@dataclass(frozen=True)
class ServeRow:
    mode: str  # "batching" | "no batching" | "offline engine"
    concurrency: int
    images_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch: float | None
    requests: int


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A synthetic part at the model size, JPEG quality 90: what a line camera sends, not incompressible noise."""
    buf = io.BytesIO()
    make_part(rng, size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _offline(bundle: Path, batch: int, shots: int, duration: float) -> ServeRow:
    model, _ = load_bundle(bundle, "cpu", torch.float32)
    size = model.image_size
    memory = fit_class(model, torch.randn(shots, 3, size, size))
    x = torch.randn(batch, 3, size, size)
    predict_scored(model, x, [memory] * batch)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration or done == 0:
        predict_scored(model, x, [memory] * batch)
        done += batch
    return ServeRow("offline engine", batch, done / (time.perf_counter() - start), None, None, float(batch), 0)


def _batch_counters(metrics: str) -> tuple[float, float]:
    count = float(re.search(r"^sowa_batch_size_count (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^sowa_batch_size_sum (\S+)", metrics, re.M).group(1))
    return count, total


async def _load(url: str, images: list[bytes], concurrency: int, duration: float) -> tuple[int, list[float]]:
    from service.client import AsyncSowaClient

    latencies: list[float] = []
    stop = time.perf_counter() + duration

    async def worker(i: int, client: AsyncSowaClient) -> None:
        n = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await client.predict([images[(i + n) % len(images)]], class_name="bench", heatmap="none")
            latencies.append(time.perf_counter() - t0)
            n += 1

    async with AsyncSowaClient(url, timeout=300, max_connections=concurrency) as client:
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
    return len(latencies), latencies


def _serve_rows(bundle: Path, mode: str, flags: list[str], concurrencies: list[int], shots: int, duration: float,
                work: Path) -> list[ServeRow]:
    from service.client import SowaClient

    rng = np.random.default_rng(0)
    rows = []
    with ServerProcess(bundle, work / f"data-{mode}", work / f"{mode}.log", flags) as srv, \
            SowaClient(srv.url, timeout=300) as client:
        size = read_manifest(bundle).config.backbone.image_size
        client.register_shots("bench", [_jpeg(rng, size) for _ in range(shots)])
        images = [_jpeg(rng, size) for _ in range(32)]
        for c in concurrencies:
            asyncio.run(_load(srv.url, images, c, min(duration, 5.0)))  # warm-up at this concurrency
            before = _batch_counters(client.metrics())
            start = time.perf_counter()
            n, lat = asyncio.run(_load(srv.url, images, c, duration))
            elapsed = time.perf_counter() - start
            count, total = (a - b for a, b in zip(_batch_counters(client.metrics()), before, strict=True))
            q = statistics.quantiles([x * 1000 for x in lat], n=100) if len(lat) > 1 else [lat[0] * 1000] * 99
            rows.append(ServeRow(mode, c, n / elapsed, q[49], q[98], total / count if count else None, n))
    return rows


def bench_serve(arch: str, concurrencies: list[int], duration: float = 20.0, max_batch_size: int = 16,
                max_wait_ms: float = 10.0, shots: int = 4, bundle: Path | None = None) -> list[ServeRow]:
    with tempfile.TemporaryDirectory(prefix="sowa-bench-") as tmp:
        work = Path(tmp)
        if bundle is None:
            bundle = work / "bundle"
            init_bundle(arch, "none", bundle)
        modes = {
            "batching": ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)],
            "no batching": ["--max-batch-size", "1", "--max-wait-ms", "0"],
        }
        rows = [_offline_in_child(bundle, max_batch_size, shots, duration)]
        for mode, flags in modes.items():
            rows += _serve_rows(bundle, mode, [*flags, "--max-queue", "1024"], concurrencies, shots, duration,
                                work)
        # measured again at the end: on a shared machine the spread of the two says how much to trust a ratio
        rows.append(_offline_in_child(bundle, max_batch_size, shots, duration))
    return rows


def _offline_in_child(bundle: Path, batch: int, shots: int, duration: float) -> ServeRow:
    # in a child process: torch's worker threads would otherwise linger here and steal the 2 cores from the
    # server (measured: p50 280 ms instead of 54 ms for the tiny config at 1 client)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_offline, (bundle, batch, shots, duration))


def format_serve_table(rows: list[ServeRow]) -> str:
    """Markdown table; "vs offline" divides by the mean of the offline runs (before and after the load)."""
    runs = [r.images_per_s for r in rows if r.mode == "offline engine"]
    offline = statistics.mean(runs)
    lines = [f"offline engine: {' / '.join(f'{v:.2f}' for v in runs)} images/s (start / end), mean {offline:.2f}",
             "", "| mode | clients | images/s | vs offline | p50 ms | p99 ms | mean batch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p50 = f"{r.p50_ms:.0f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.0f}" if r.p99_ms is not None else "-"
        mb = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        lines.append(f"| {r.mode} | {r.concurrency if r.mode != 'offline engine' else '-'} | "
                     f"{r.images_per_s:.2f} | {r.images_per_s / offline:.0%} | {p50} | {p99} | {mb} |")
    return "\n".join(lines)


def write_serve_json(rows: list[ServeRow], path: Path, arch: str) -> None:
    payload = {"machine": machine_description("cpu"), "arch": arch, "torch": torch.__version__,
               "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
