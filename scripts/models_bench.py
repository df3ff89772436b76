"""Model versions, measured: what a shadow model costs the serving throughput, and how long an activation takes.

Starts `sowa serve` on the CPU (one process, the tests' habits) on an untrained bundle of `--config` (sowa-tiny, or
ViT-B-16 geometry with random weights: accuracy is not the point, the work per image is), and adds a second bundle of
the same geometry (other seeds) to the model repository as `v2` and `v3`. Then:

1. shadow cost: 16 concurrent clients send single-image requests for one class; rounds interleave three modes so a
   slow moment of the shared machine falls on each alike: no shadow, v2 shadowing at the default share (the
   service's shadow_share), v2 shadowing 100% of the traffic. Reported: images/s per mode and each shadow mode's
   ratio to no shadow, per round (the spread) and over all rounds.
2. activation: `--classes` classes of `--shots` shots each are registered, then v3 (never shadowed, so none of its
   banks is stored yet) is activated while 2 clients keep
   predicting: the time from POST /models/v2/activate to serving v2 (banks rebuilt from the stored shots, warm-up,
   switch), the same back to v1 by a rollback (its banks are stored: nothing is fitted), and the failed requests
   during both (the claim is zero).

    python scripts/models_bench.py --config tiny [--requests 400 --rounds 3 --classes 100 --shots 8]
    python scripts/models_bench.py --config vit_b16 --requests 48 --rounds 2 --classes 100 --shots 8

Results go to stdout as a table and to --out (JSON). The load generator runs on the same machine as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from model.bundle import init_bundle
from service.core.models.open import open_repository
from service.core.settings import Settings
from sowa.server_process import ServerProcess

CONFIGS = {"tiny": "sowa-tiny", "vit_b16": "ViT-B-16"}
CLIENTS = 16


def _png(rng: np.random.Generator, size: int = 256) -> bytes:
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x * 0.5 + y * 0.2) % 256, (y * 0.7) % 256, ((x - y) * 0.3) % 256], axis=-1)
    img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


async def _drive(http: httpx.AsyncClient, images: list[bytes], requests: int, clients: int,
                 failures: list[str]) -> float:
    """`requests` single-image predictions from `clients` concurrent clients; the wall time."""
    todo = iter(range(requests))

    async def client() -> None:
        for i in todo:
            r = await http.post("/predict", files=[("images", ("p.png", images[i % len(images)], "image/png"))],
                                data={"class_name": "c-0", "heatmap": "none"})
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started


async def _shadow_cost(url: str, images: list[bytes], requests: int, rounds: int, default_share: float) -> dict:
    modes = {"none": None, f"shadow {default_share:g}": default_share, "shadow 1": 1.0}
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=CLIENTS)) as http:
        failures: list[str] = []
        await _drive(http, images, 4 * CLIENTS, CLIENTS, failures)  # warm-up: connections, batch sizes
        per_round: list[dict[str, float]] = []
        for _ in range(rounds):
            row = {}
            for mode, share in modes.items():
                if share is None:
                    (await http.delete("/models/shadow")).raise_for_status()
                else:
                    (await http.post("/models/v2/shadow", json={"share": share},
                                     params={"wait": "true"})).raise_for_status()
                await _drive(http, images, CLIENTS, CLIENTS, failures)  # settle the mode
                row[mode] = requests / await _drive(http, images, requests, CLIENTS, failures)
            per_round.append(row)
            report = (await http.get("/models/v2/shadow-report")).json()
        (await http.delete("/models/shadow")).raise_for_status()
    ratios = {m: [r[m] / r["none"] for r in per_round] for m in modes if m != "none"}
    return {"images_per_s": {m: [r[m] for r in per_round] for m in modes}, "ratio_to_none": ratios,
            "last_shadow_report": {k: report[k] for k in ("sampled", "scored", "dropped", "agreement",
                                                           "correlation", "latency_s")},
            "failed_requests": len(failures)}


async def _activation(url: str, images: list[bytes], v1: str) -> dict:
    failures: list[str] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def load() -> None:
            while not stop.is_set():
                await _drive(http, images, 2, 2, failures)

        loader = asyncio.create_task(load())
        figures = {}
        for name, call, want in (("activate v3", "/models/v3/activate", "v3"),
                                 ("rollback to v1", "/models/rollback", v1)):
            started = time.perf_counter()
            r = await http.post(call)
            assert r.status_code in (200, 202), r.text
            while (m := (await http.get("/models")).json())["serving"] != want:
                await asyncio.sleep(0.05)
            figures[name] = {"seconds": time.perf_counter() - started, "fitted": m["preparation"]["fitted"],
                             "classes": m["preparation"]["classes"]}
        stop.set()
        await loader
    figures["failed_requests"] = len(failures)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="tiny")
    p.add_argument("--requests", type=int, default=400, help="requests per mode per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--skip", choices=["shadow", "activation"], default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    images = [_png(rng) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        b1 = init_bundle(CONFIGS[a.config], "none", work / "v1", seed=1)
        b2 = init_bundle(CONFIGS[a.config], "none", work / "v2", seed=2)
        b3 = init_bundle(CONFIGS[a.config], "none", work / "v3", seed=3)  # never shadowed: no bank stored
        data = work / "data"
        srv = ServerProcess(b1.path, data, work / "server.log", flags=["--log-level", "warning"],
                            ready_timeout=600).start()
        try:
            repository = open_repository(str(data), data)
            repository.add(b2.path, "v2", "bench")
            repository.add(b3.path, "v3", "bench")
            repository.close()
            with httpx.Client(base_url=srv.url, timeout=600) as http:
                settings_share = Settings.model_fields["shadow_share"].default  # the service's default share
                for i in range(a.classes if a.skip != "activation" else 1):
                    files = [("images", (f"s{j}.png", _png(rng), "image/png")) for j in range(a.shots)]
                    http.post(f"/classes/c-{i}/shots", files=files).raise_for_status()
            out: dict = {"config": a.config, "arch": CONFIGS[a.config], "machine": platform.processor() or
                         platform.machine(), "cpus": __import__("os").cpu_count(), "clients": CLIENTS,
                         "requests": a.requests, "rounds": a.rounds, "classes": a.classes, "shots": a.shots}
            if a.skip != "shadow":
                out["shadow"] = asyncio.run(_shadow_cost(srv.url, images, a.requests, a.rounds, settings_share))
            if a.skip != "activation":
                out["activation"] = asyncio.run(_activation(srv.url, images, b1.fingerprint[:16]))
        finally:
            srv.stop()
    print(json.dumps(out, indent=1))
    if a.out is not None:
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
