"""The server's event-loop CPU time per single-image /predict, for any checkout of this repository (Linux).

Starts `sowa serve` from CHECKOUT (its own code, not this one's) on an untrained sowa-tiny bundle on the CPU,
sends warm-up requests, then N requests from 16 concurrent clients, and reads the CPU time of the server's main
thread (uvicorn's event loop) from /proc before and after. For before/after comparisons of the request path,
where `sowa bench serve` (which reports the same figure) only exists in newer checkouts.

    python scripts/event_loop_cost.py [--checkout DIR] [--requests 600] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = "sowa-tiny"


def _main_thread_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(url: str, images: list[bytes], n: int, clients: int) -> None:
    sem = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        async def one(i: int) -> None:
            async with sem:
                r = await client.post("/predict", files=[("images", ("p.jpg", images[i % len(images)], "image/jpeg"))],
                                      data={"heatmap": "none"})
                r.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(n)))


def cli_module(checkout: Path) -> str:
    """The command line's module in `checkout`: `sowa` now, `training.cli` in checkouts before the layout change."""
    return "sowa" if (checkout / "sowa" / "cli.py").is_file() else "training.cli"


def measure(checkout: Path, bundle: Path, requests: int, work: Path, port: int) -> float:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    args = [sys.executable, "-m", cli_module(checkout), "serve", "--bundle", str(bundle),
            "--data-dir", str(work / "data"),
            "--port", str(port), "--device", "cpu", "--max-batch-size", "16", "--max-wait-ms", "5",
            "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with (work / "server.log").open("ab") as log:
        proc = subprocess.Popen(args, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        asyncio.run(_load(url, images, 200, 8))  # warm-up
        before = _main_thread_cpu_s(proc.pid)
        asyncio.run(_load(url, images, requests, 16))
        return (_main_thread_cpu_s(proc.pid) - before) * 1000 / requests
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, default=REPO, help="the repository checkout whose server to measure")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--port", type=int, default=8765)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sowa-loop-") as tmp:
        work = Path(tmp)
        bundle = work / "bundle"
        subprocess.run([sys.executable, "-m", "sowa", "init", "--arch", TINY, "--pretrained", "none",
                        "--out", str(bundle)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        runs = []
        for i in range(a.runs):
            run_dir = work / f"run{i}"
            run_dir.mkdir()
            runs.append(measure(a.checkout.resolve(), bundle, a.requests, run_dir, a.port))
        print(f"{a.checkout}: event loop {' / '.join(f'{r:.2f}' for r in runs)} ms CPU per request, "
              f"median {statistics.median(runs):.2f}")


if __name__ == "__main__":
    main()
