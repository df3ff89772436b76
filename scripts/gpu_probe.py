"""Measurements the one-shot GPU check (scripts/gpu_check.sh) takes beside the benches, each printing one JSON
object: `env` (machine, driver, versions), `syncs` (host synchronisations in one served batch), `nvjpeg`
(device JPEG decoding: throughput and error against the PIL reference path).

    python scripts/gpu_probe.py env
    python scripts/gpu_probe.py syncs --arch ViT-L-14-336 --device cuda --dtype bf16 --batch 32
    python scripts/gpu_probe.py nvjpeg --device cuda --size 336 --source-size 1024 --count 256

On a CPU every probe runs the same code (the plumbing is what `--cpu` checks); sync counts are then null, since
the CPU has nothing to wait for.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a plain checkout too (the GPU machine has no editable install)


def env(_: argparse.Namespace) -> dict:
    import open_clip
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__, "cuda_available": torch.cuda.is_available(),
            "cpu_count": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version()}
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                                                 "power.limit", "--format=csv,noheader"], capture_output=True,
                                                text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    return info


def syncs(a: argparse.Namespace) -> dict:
    """Host synchronisations while the engine scores one batch against a class: torch reports each one as a
    warning in sync-debug mode. The answer needs one (the packed device-to-host copy of the results)."""
    from model.bundle import init_bundle
    from service.core.engine import Engine

    with tempfile.TemporaryDirectory(prefix="sowa-syncs-") as tmp:
        bundle = Path(tmp) / "bundle"
        init_bundle(a.arch, "none", bundle)
        engine = Engine(bundle, a.device, a.dtype, max_batch_size=a.batch)
        try:
            rng = np.random.default_rng(0)
            size = engine.image_size
            shots = [_part(rng, size) for _ in range(4)]
            memory = engine.call_blocking(engine.fit, shots)
            images = torch.from_numpy(rng.integers(0, 256, (a.batch, 3, size, size), dtype=np.uint8))
            if engine.device.type == "cuda":
                images = images.to(engine.device)
            engine.call_blocking(engine.run, [images], [memory] * a.batch)  # warm-up: first-call allocations sync
            counted = engine.call_blocking(_count_syncs, engine, images, [memory] * a.batch)
        finally:
            engine.close()
    return {"arch": a.arch, "device": str(engine.device), "dtype": a.dtype, "batch": a.batch, **counted}


def _count_syncs(engine: object, images: torch.Tensor, memories: list) -> dict:
    if not torch.cuda.is_available() or images.device.type != "cuda":
        engine.run([images], memories)
        return {"syncs": None, "where": [], "note": "CPU: nothing to synchronise with"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.run([images], memories)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncs": len(found), "where": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in found})}


def _part(rng: np.random.Generator, size: int) -> object:
    from training.synth import make_part

    return make_part(rng, size)


def nvjpeg(a: argparse.Namespace) -> dict:
    """Decode + resize JPEGs with the device decoder (nvJPEG on a GPU) against the PIL reference path."""
    from model.device import resolve_device
    from model.preprocess import decode_image, resize_uint8
    from service.core.staging import ImageStager, jpeg_size

    device = resolve_device(a.device)
    stager = ImageStager(device, a.size, "torchvision")
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(min(a.count, 32)):  # distinct images, repeated up to `count`
        buf = io.BytesIO()
        _part(rng, a.source_size).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    payloads = [(d, a.source_size * a.source_size) for d in jpegs]
    assert all(jpeg_size(d) is not None for d in jpegs)
    stager.decode_jpegs(payloads[:4])  # warm-up: decoder handles, kernels
    reps = max(1, a.count // len(jpegs))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = stager.decode_jpegs(payloads)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    device_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = [resize_uint8(decode_image(d), a.size) for d in jpegs]
    pil_s = (time.perf_counter() - t0) * reps
    diffs = np.concatenate([(o.cpu().int() - r.int()).abs().flatten().numpy() for o, r in zip(out, reference,
                                                                                              strict=True)])
    return {"device": str(device), "source": f"{a.source_size}x{a.source_size} JPEG q90", "size": a.size,
            "images": reps * len(jpegs), "device_images_per_s": round(reps * len(jpegs) / device_s, 1),
            "pil_images_per_s_one_thread": round(reps * len(jpegs) / pil_s, 1),
            "grey_levels": {"max": int(diffs.max()), "mean": round(float(diffs.mean()), 4),
                            "p99": float(np.percentile(diffs, 99)), "p999": float(np.percentile(diffs, 99.9)),
                            "share_differing": round(float((diffs > 0).mean()), 5)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="probe", required=True)
    sub.add_parser("env")
    s = sub.add_parser("syncs")
    s.add_argument("--arch", default="sowa-tiny")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="bf16")
    s.add_argument("--batch", type=int, default=8)
    n = sub.add_parser("nvjpeg")
    n.add_argument("--device", default="auto")
    n.add_argument("--size", type=int, default=336)
    n.add_argument("--source-size", type=int, default=1024)
    n.add_argument("--count", type=int, default=256)
    a = p.parse_args()
    print(json.dumps({"probe": a.probe, **{"env": env, "syncs": syncs, "nvjpeg": nvjpeg}[a.probe](a)}))


if __name__ == "__main__":
    main()
