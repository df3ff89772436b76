"""`sowa bench serve`: the service under closed-loop load, with batching on and off, beside the offline engine.

For each batching mode a real server is started (`sowa serve` on loopback) with a K-shot class registered;
`c` clients each send one image per request (a synthetic part, JPEG at the model size, heatmap none by default)
as soon as their last answer arrives, for `duration` seconds. Reported: images/s, p50/p99 latency, and the mean
device batch size read from /metrics. The offline engine's images/s (same bundle, device and precision,
batch = max batch size, preprocessed tensors) is measured in the same run, in a child process while no server
runs, before and after the load. Registering a new class of K JPEG shots over HTTP (decode, forward pass, bank,
calibration, fsynced files) is timed on the batching server before the load. With `compile`, the servers and the
offline engine run the vision pass through torch.compile in that mode; `image_decoder` is the servers' decoder.
"""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.bundle import init_bundle, load_bundle, read_manifest
from model.compiled_vision import CompiledVision
from model.device import machine_description, resolve_device, resolve_dtype
from model.inference import fit_class, predict_scored
from training.synth import make_part

from .server_process import ServerProcess

if TYPE_CHECKING:
    from service.client import SowaClient

__all__ = ["RegisterTiming", "ServeBench", "ServeRow", "bench_serve", "format_serve_table", "plot_serve",
           "write_serve_json"]


@dataclass(frozen=True)
class ServeRow:
    mode: str  # "batching" | "no batching" | "offline engine"
    concurrency: int
    images_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch: float | None
    requests: int
    loop_cpu_ms: float | None = None  # the server's event-loop thread: CPU time per request (Linux)
    workers: int = 1  # HTTP worker processes (above 1, loop_cpu_ms is the engine process's loop)


@dataclass(frozen=True)
class RegisterTiming:
    shots: int
    registrations: int
    p50_ms: float
    max_ms: float


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A synthetic part at the model size, JPEG quality 90: what a line camera sends, not incompressible noise."""
    buf = io.BytesIO()
    make_part(rng, size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _offline(bundle: Path, batch: int, shots: int, duration: float, device: str, dtype: str,
             compile_mode: str) -> ServeRow:
    dev = resolve_device(device)
    model, _ = load_bundle(bundle, dev, resolve_dtype(dtype))
    if compile_mode != "off":
        compiled = CompiledVision(model, compile_mode, [batch])
        model.set_inference_encoder(compiled)
        compiled.warm_up()
    size = model.image_size
    memory = fit_class(model, torch.randn(shots, 3, size, size, device=dev))
    x = torch.randn(batch, 3, size, size, device=dev)
    predict_scored(model, x, [memory] * batch)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration or done == 0:
        predict_scored(model, x, [memory] * batch).scores.raw.sum().item()  # .item(): waits for the device
        done += batch
    return ServeRow("offline engine", batch, done / (time.perf_counter() - start), None, None, float(batch), 0)


def _loop_cpu_s(pid: int) -> float | None:
    """CPU seconds the process's main thread (uvicorn's event loop) has used, from /proc; None off Linux.

    The event loop parses every request and answers it on one core, so this per request bounds the requests/s
    one server process can take, whatever the device does."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch_counters(metrics: str) -> tuple[float, float]:
    count = float(re.search(r"^sowa_batch_size_count (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^sowa_batch_size_sum (\S+)", metrics, re.M).group(1))
    return count, total


async def _load(url: str, images: list[bytes], concurrency: int, duration: float,
                heatmap: str) -> tuple[int, list[float]]:
    from service.client import AsyncSowaClient

    latencies: list[float] = []
    stop = time.perf_counter() + duration

    async def worker(i: int, client: AsyncSowaClient) -> None:
        n = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await client.predict([images[(i + n) % len(images)]], class_name="bench", heatmap=heatmap)
            latencies.append(time.perf_counter() - t0)
            n += 1

    async with AsyncSowaClient(url, timeout=300, max_connections=concurrency) as client:
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
    return len(latencies), latencies


def _register(client: SowaClient, rng: np.random.Generator, size: int, shots: int, count: int) -> RegisterTiming:
    """`count` new classes of `shots` JPEG shots each, one at a time: wall time of each POST."""
    times = []
    for i in range(count + 1):
        images = [_jpeg(rng, size) for _ in range(shots)]
        t0 = time.perf_counter()
        client.register_shots(f"register-{i}", images)
        if i:  # the first one pays for first-call allocations at batch K
            times.append((time.perf_counter() - t0) * 1e3)
        client.delete_class(f"register-{i}")
    return RegisterTiming(shots, count, statistics.median(times), max(times))


def _serve_rows(bundle: Path, mode: str, flags: list[str], device: str, concurrencies: list[int], shots: int,
                duration: float, work: Path, heatmap: str, registrations: int,
                workers: int = 1) -> tuple[list[ServeRow], RegisterTiming | None]:
    from service.client import SowaClient

    rng = np.random.default_rng(0)
    rows = []
    with ServerProcess(bundle, work / f"data-{mode}-{workers}", work / f"{mode}-{workers}.log",
                       [*flags, "--workers", str(workers)], device=device, ready_timeout=3600) as srv, \
            SowaClient(srv.url, timeout=300) as client:
        size = read_manifest(bundle).config.backbone.image_size
        registering = _register(client, rng, size, shots, registrations) if registrations else None
        client.register_shots("bench", [_jpeg(rng, size) for _ in range(shots)])
        images = [_jpeg(rng, size) for _ in range(32)]
        for c in concurrencies:
            asyncio.run(_load(srv.url, images, c, min(duration, 5.0), heatmap))  # warm-up at this concurrency
            before, cpu_before = _batch_counters(client.metrics()), _loop_cpu_s(srv.pid)
            start = time.perf_counter()
            n, lat = asyncio.run(_load(srv.url, images, c, duration, heatmap))
            elapsed = time.perf_counter() - start
            cpu_after = _loop_cpu_s(srv.pid)
            count, total = (a - b for a, b in zip(_batch_counters(client.metrics()), before, strict=True))
            q = statistics.quantiles([x * 1000 for x in lat], n=100) if len(lat) > 1 else [lat[0] * 1000] * 99
            loop_ms = (cpu_after - cpu_before) * 1000 / n if cpu_before is not None and cpu_after is not None else None
            rows.append(ServeRow(mode, c, n / elapsed, q[49], q[98], total / count if count else None, n, loop_ms,
                                 workers))
    return rows, registering


@dataclass(frozen=True)
class ServeBench:
    rows: list[ServeRow]
    register: RegisterTiming | None
    device: str
    dtype: str
    heatmap: str
    compile: str = "off"
    image_decoder: str = "pil"


def bench_serve(arch: str, concurrencies: list[int], duration: float = 20.0, max_batch_size: int = 16,
                max_wait_ms: float = 10.0, shots: int = 4, bundle: Path | None = None, device: str = "auto",
                dtype: str = "fp32", heatmap: str = "none", registrations: int = 10, compile_mode: str = "off",
                image_decoder: str = "pil", workers: tuple[int, ...] = (1,)) -> ServeBench:
    """`workers`: HTTP worker process counts to run the batching server with (the unbatched one runs with 1)."""
    with tempfile.TemporaryDirectory(prefix="sowa-bench-") as tmp:
        work = Path(tmp)
        if bundle is None:
            bundle = work / "bundle"
            init_bundle(arch, "none", bundle)
        device = str(resolve_device(device))
        modes = {
            "batching": ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)],
            "no batching": ["--max-batch-size", "1", "--max-wait-ms", "0"],
        }
        common = ["--max-queue", "1024", "--dtype", dtype, "--compile", compile_mode, "--image-decoder",
                  image_decoder]
        rows = [_offline_in_child(bundle, max_batch_size, shots, duration, device, dtype, compile_mode)]
        register = None
        runs = [("batching", w) for w in workers] + [("no batching", 1)]
        for mode, w in runs:
            got, timing = _serve_rows(bundle, mode, [*modes[mode], *common], device, concurrencies, shots, duration,
                                      work, heatmap, registrations if register is None and mode == "batching" else 0,
                                      w)
            rows += got
            register = register or timing
        # measured again at the end: on a shared machine the spread of the two says how much to trust a ratio
        rows.append(_offline_in_child(bundle, max_batch_size, shots, duration, device, dtype, compile_mode))
    return ServeBench(rows, register, device, dtype, heatmap, compile_mode, image_decoder)


def _offline_in_child(bundle: Path, batch: int, shots: int, duration: float, device: str, dtype: str,
                      compile_mode: str) -> ServeRow:
    # in a child process: torch's worker threads would otherwise linger here and steal the 2 cores from the
    # server (measured: p50 280 ms instead of 54 ms for the tiny config at 1 client); on a GPU, the server
    # process must not share the device with a live engine either
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_offline, (bundle, batch, shots, duration, device, dtype, compile_mode))


def format_serve_table(bench: ServeBench) -> str:
    """Markdown table; "vs offline" divides by the mean of the offline runs (before and after the load)."""
    rows = bench.rows
    runs = [r.images_per_s for r in rows if r.mode == "offline engine"]
    offline = statistics.mean(runs)
    lines = [f"{bench.device}, {bench.dtype}, heatmap={bench.heatmap}, compile={bench.compile}, "
             f"image decoder={bench.image_decoder}", "",
             f"offline engine: {' / '.join(f'{v:.2f}' for v in runs)} images/s (start / end), mean {offline:.2f}"]
    if bench.register:
        r = bench.register
        lines.append(f"registering a new class of {r.shots} JPEG shots over HTTP: p50 {r.p50_ms:.0f} ms, max "
                     f"{r.max_ms:.0f} ms ({r.registrations} classes)")
    lines += ["", "| mode | workers | clients | images/s | vs offline | p50 ms | p99 ms | mean batch | "
              "event loop CPU ms/request |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p50 = f"{r.p50_ms:.0f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.0f}" if r.p99_ms is not None else "-"
        mb = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        loop = f"{r.loop_cpu_ms:.2f}" if r.loop_cpu_ms is not None else "-"
        offline_row = r.mode == "offline engine"
        lines.append(f"| {r.mode} | {'-' if offline_row else r.workers} | {'-' if offline_row else r.concurrency} | "
                     f"{r.images_per_s:.2f} | {r.images_per_s / offline:.0%} | {p50} | {p99} | {mb} | {loop} |")
    return "\n".join(lines)


def write_serve_json(bench: ServeBench, path: Path, arch: str) -> None:
    payload = {"machine": machine_description(bench.device), "arch": arch, "torch": torch.__version__,
               "device": bench.device, "dtype": bench.dtype, "heatmap": bench.heatmap, "compile": bench.compile,
               "image_decoder": bench.image_decoder,
               "register": asdict(bench.register) if bench.register else None,
               "rows": [asdict(r) for r in bench.rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot_serve(bench: ServeBench, out: Path, title: str) -> None:
    """Two panels against clients: images/s (the offline engine as a band) and p50/p99 latency (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    rate, latency = fig.subplots(1, 2)
    offline = [r.images_per_s for r in bench.rows if r.mode == "offline engine"]
    rate.axhspan(min(offline), max(offline), color="grey", alpha=0.25, label="offline engine (start..end)")
    for mode, workers in sorted({(r.mode, r.workers) for r in bench.rows if r.mode != "offline engine"}):
        mine = [r for r in bench.rows if (r.mode, r.workers) == (mode, workers)]
        name = mode if workers == 1 else f"{mode}, {workers} workers"
        clients = [r.concurrency for r in mine]
        rate.plot(clients, [r.images_per_s for r in mine], marker="o", label=name)
        latency.plot(clients, [r.p50_ms for r in mine], marker="o", label=f"{name}, p50")
        latency.plot(clients, [r.p99_ms for r in mine], marker="^", linestyle="--", label=f"{name}, p99")
    ticks = sorted({r.concurrency for r in bench.rows if r.mode != "offline engine"})
    for ax, label in ((rate, "images/s"), (latency, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
