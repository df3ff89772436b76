"""`sowa bench model`: offline engine throughput (images/s) by batch size, with random weights.

Each batch size is warmed up, then timed over `iters` forward passes of the full inference path (backbone,
adapters, maps, Gaussian filter, k-shot scoring against a K-shot bank). The median time is reported.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.device import resolve_device, resolve_dtype
from model.inference import fit_class, predict_scored
from model.sowa import SowaModel

from .offline import build_config

__all__ = ["BenchRow", "bench_model", "format_table"]


@dataclass(frozen=True)
class BenchRow:
    arch: str
    device: str
    dtype: str
    batch_size: int
    shots: int
    median_s: float
    images_per_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(arch: str, device: str = "auto", dtype: str = "fp32", batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
                shots: int = 4, iters: int = 5, warmup: int = 2, threads: int | None = None,
                window_size: int | None = None) -> list[BenchRow]:
    if threads:
        torch.set_num_threads(threads)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    torch.manual_seed(0)
    model = SowaModel(build_config(arch, "none", window_size=window_size))
    model.refresh_text()
    model.drop_text_tower()
    model.to_inference(dev, dt)
    size = model.image_size
    memory = fit_class(model, torch.randn(shots, 3, size, size, device=dev)) if shots else None
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, 3, size, size, device=dev)
        times = []
        for i in range(warmup + iters):
            _sync(dev)
            t0 = time.perf_counter()
            predict_scored(model, x, [memory] * bs)
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append(BenchRow(arch, str(dev), dtype, bs, shots, med, bs / med))
    return rows


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def format_table(rows: list[BenchRow]) -> str:
    lines = ["| arch | device | dtype | batch | K | median s/batch | images/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.arch} | {r.device} | {r.dtype} | {r.batch_size} | {r.shots} | {r.median_s:.4f} | "
              f"{r.images_per_s:.2f} |" for r in rows]
    return "\n".join(lines)


def write_json(rows: list[BenchRow], path: Path) -> None:
    payload = {"machine": machine_description(rows[0].device) if rows else None,
               "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
