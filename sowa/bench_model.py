"""`sowa bench model`: offline engine throughput (images/s) by batch size and precision, with random weights.

Each (precision, batch size) is warmed up, then timed over `iters` passes of the full inference path (backbone,
adapters, maps, Gaussian filter, k-shot scoring against a K-shot bank, online scores). The median time is
reported, with what it means against the hardware: the vision tower's arithmetic (`vision_gflops`) per second,
and that as a fraction of the device's measured matmul peak in the same precision. Registering a class (the K
shots' forward pass, bank and calibration) is timed too.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.compiled_vision import CompiledVision
from model.config import BackboneConfig
from model.device import machine_description, resolve_device, resolve_dtype
from model.factory import build_config, build_model
from model.inference import fit_class, predict_scored

__all__ = ["BenchRow", "OpenClipRatio", "bench_model", "format_table", "matmul_peak_tflops", "plot_model",
           "vision_gflops", "vs_open_clip"]


@dataclass(frozen=True)
class BenchRow:
    arch: str
    device: str
    dtype: str
    compile: str  # torch.compile mode of the vision pass, or "off"
    batch_size: int
    shots: int
    median_s: float
    images_per_s: float
    gflops_per_image: float  # the vision tower's arithmetic, vision_gflops()
    tflops: float  # gflops_per_image x images/s
    peak_tflops: float | None  # the device's measured matmul rate in this dtype
    fraction_of_peak: float | None
    register_ms: float  # median time to fit a class of `shots` shots (forward, bank, calibration)
    compile_s: float | None = None  # compiling every batch size of the row's mode, once


def vision_gflops(backbone: BackboneConfig) -> float:
    """Forward FLOPs of the CLIP vision tower per image, counted as 2 per multiply-add.

    Per block of width D over L tokens: 24·L·D² for the projections and the 4x MLP, 4·L²·D for the two attention
    products; plus the patch embedding. For ViT-L-14-336 (24 blocks, D 1024, L 577) that is 381.9 GFLOPs: the
    figure the GPU targets of docs/benchmarks.md use. The HFWA adapters, maps and k-shot matching are left
    out (at ViT-L-14-336 they add 23 + 2.0·K GFLOPs per image, 8% at K = 4: see `vs_open_clip`), so the fraction
    of peak is an underestimate by that much.
    """
    d, p, grid = backbone.width, backbone.patch_size, backbone.grid_size
    tokens = grid * grid + 1
    blocks = backbone.layers * (24 * tokens * d * d + 4 * tokens * tokens * d)
    patch_embed = 2 * grid * grid * 3 * p * p * d
    return (blocks + patch_embed) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 10) -> float:
    """What the device sustains on large square matmuls in `dtype`: the practical arithmetic ceiling."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _median_s(lambda: a @ b, device, iters, warmup=3) / 1e12


def bench_model(arch: str, device: str = "auto", dtypes: Sequence[str] = ("fp32",),
                batch_sizes: Sequence[int] = (1, 2, 4, 8), shots: int = 4, iters: int = 5, warmup: int = 2,
                threads: int | None = None, window_size: int | None = None, peak: bool = True,
                compile_modes: Sequence[str] = ("off",)) -> list[BenchRow]:
    """Rows per precision x compile mode x batch size. A compiled mode compiles each batch size (and K) once
    before timing, as the service's warm-up does: `compile_s` reports that one-off cost."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    rows = []
    for name in dtypes:
        for mode in compile_modes:
            rows += _bench_dtype(arch, dev, name, batch_sizes, shots, iters, warmup, window_size, peak, mode)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _bench_dtype(arch: str, dev: torch.device, dtype: str, batch_sizes: Sequence[int], shots: int, iters: int,
                 warmup: int, window_size: int | None, peak: bool, mode: str = "off") -> list[BenchRow]:
    dt = resolve_dtype(dtype)
    torch.manual_seed(0)
    model = build_model(build_config(arch, "none", window_size=window_size))
    model.refresh_text()
    model.drop_text_tower()
    model.to_inference(dev, dt)
    size, gflops = model.image_size, vision_gflops(model.cfg.backbone)
    peak_tf = matmul_peak_tflops(dev, dt) if peak else None
    compile_s = None
    if mode != "off":
        compiled = CompiledVision(model, mode, [*batch_sizes, max(shots, 1)])  # every size exact: no padding
        model.set_inference_encoder(compiled)
        t0 = time.perf_counter()
        compiled.warm_up()
        _sync(dev)
        compile_s = time.perf_counter() - t0
    shot_images = torch.randn(max(shots, 1), 3, size, size, device=dev)
    register_s = _median_s(lambda: fit_class(model, shot_images), dev, iters, warmup)
    memory = fit_class(model, shot_images) if shots else None
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, 3, size, size, device=dev)
        med = _median_s(lambda: predict_scored(model, x, [memory] * bs), dev, iters, warmup)  # noqa: B023
        tflops = gflops * bs / med / 1e3
        rows.append(BenchRow(arch, str(dev), dtype, mode, bs, shots, med, bs / med, gflops, tflops, peak_tf,
                             tflops / peak_tf if peak_tf else None, register_s * 1e3, compile_s))
    return rows


@dataclass(frozen=True)
class OpenClipRatio:
    """The full offline path (vision pass with taps, adapters, maps, k-shot, scores) against a bare open_clip
    vision tower with the same weights: what SOWA costs on top of CLIP."""

    arch: str
    device: str
    dtype: str
    batch_size: int
    sowa_s: list[float]  # per alternation: median seconds per batch of the full path
    open_clip_s: list[float]  # and of `clip.visual(x)`
    tower_gflops: float  # the tower's arithmetic per batch, vision_gflops() x batch size
    extra_gflops: float  # what the full path computes on top of it per batch (counted, see vs_open_clip)

    @property
    def ratios(self) -> list[float]:
        """Throughput of the full path as a fraction of the bare tower's, per alternation."""
        return [o / s for s, o in zip(self.sowa_s, self.open_clip_s, strict=True)]

    @property
    def at_tower_rate(self) -> float:
        """The ratio if the added work ran at the tower's average rate per FLOP: an estimate, not a ceiling (the
        added work is mostly matmuls, which run faster per FLOP than the tower's mix of matmuls, GELU, norms and
        softmax)."""
        return self.tower_gflops / (self.tower_gflops + self.extra_gflops)

    def line(self) -> str:
        r, med = self.ratios, statistics.median(self.ratios)
        return (f"full path / bare open_clip vision tower ({self.arch}, {self.dtype}, batch {self.batch_size}, "
                f"{self.device}): {med:.3f}x throughput (median of {len(r)} alternations, "
                f"{min(r):.3f} to {max(r):.3f}); at the tower's rate per FLOP {self.at_tower_rate:.3f}x (adapters, "
                f"maps and k-shot add {self.extra_gflops:.1f} GFLOPs to the tower's {self.tower_gflops:.1f} per "
                f"batch): measured is {med / self.at_tower_rate:.1%} of that")


def vs_open_clip(arch: str, device: str = "auto", dtype: str = "fp32", batch_size: int = 4, shots: int = 4,
                 rounds: int = 3, iters: int = 3, window_size: int | None = None) -> OpenClipRatio:
    """Time the full path and the bare tower in turn, `rounds` times in one process, so drifts of a shared
    machine hit both alike."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    torch.manual_seed(0)
    model = build_model(build_config(arch, "none", window_size=window_size))
    model.refresh_text()
    model.drop_text_tower()
    model.to_inference(dev, dt)
    size = model.image_size
    memory = fit_class(model, torch.randn(max(shots, 1), 3, size, size, device=dev)) if shots else None
    x = torch.randn(batch_size, 3, size, size, device=dev)
    visual = model.clip.visual
    full, tower = (lambda: predict_scored(model, x, [memory] * batch_size)), (lambda: visual(x.to(dt)))
    # FlopCounterMode counts nothing inside PyTorch's fused attention (`_native_multi_head_attention`), which both
    # passes run alike over the same blocks, so the difference is what the full path adds (adapters, projections,
    # maps, k-shot, Gaussian filter). It also counts nothing for a CPU `scaled_dot_product_attention` with a 4-D
    # mask: with shifted adapter windows (depth >= 2) their attention would be left out on a CPU.
    extra = _counted_gflops(full) - _counted_gflops(tower)
    sowa_s, clip_s = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            sowa_s.append(_median_s(full, dev, iters, 1))
            clip_s.append(_median_s(tower, dev, iters, 1))
    return OpenClipRatio(arch, str(dev), dtype, batch_size, sowa_s, clip_s,
                         vision_gflops(model.cfg.backbone) * batch_size, extra)


def _counted_gflops(fn: Callable[[], object]) -> float:
    """FLOPs of one call as torch's FlopCounterMode counts them (matmuls and convolutions, 2 per multiply-add)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def format_table(rows: list[BenchRow]) -> str:
    lines = ["| arch | device | dtype | compile | batch | K | median s/batch | images/s | TFLOP/s | of peak | "
             "register ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        of_peak = f"{r.fraction_of_peak:.1%} of {r.peak_tflops:.3g}" if r.fraction_of_peak is not None else "-"
        mode = r.compile if r.compile_s is None else f"{r.compile} ({r.compile_s:.0f} s)"
        lines.append(f"| {r.arch} | {r.device} | {r.dtype} | {mode} | {r.batch_size} | {r.shots} | "
                     f"{r.median_s:.4f} | {r.images_per_s:.2f} | {r.tflops:.3g} | {of_peak} | {r.register_ms:.1f} |")
    return "\n".join(lines)


def write_json(rows: list[BenchRow], path: Path) -> None:
    payload = {"machine": machine_description(rows[0].device) if rows else None,
               "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot_model(rows: list[BenchRow], out: Path, title: str) -> None:
    """images/s against batch size, one line per precision and compile mode (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for dtype, mode in dict.fromkeys((r.dtype, r.compile) for r in rows):
        mine = [r for r in rows if (r.dtype, r.compile) == (dtype, mode)]
        label = dtype if mode == "off" else f"{dtype}, compile {mode}"
        ax.plot([r.batch_size for r in mine], [r.images_per_s for r in mine], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.batch_size for r in rows}), labels=[str(b) for b in sorted({r.batch_size for r in rows})])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
