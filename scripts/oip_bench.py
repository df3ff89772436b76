"""The front end's cost per image through each way in: multipart REST (/predict), the Open Inference Protocol over
REST with binary tensors (/v2/models/zero-shot/infer) and over gRPC (ModelInfer), in one run against one server.

Starts `sowa serve --grpc-port` on the tests' tiny parity model (tests/data/golden/parity_tiny, 64 px: its work
per image is a fraction of the front end's) on the CPU, then for each transport and payload sends REQUESTS
single-image requests from 16 concurrent clients and reads the server's CPU time from /proc before and after, per image:
- event loop: the server's main thread, where HTTP is parsed (multipart included), gRPC messages are read and
  written and requests are mapped and answered: the front end's own work, and the one thread it cannot spread;
- whole server: every thread (the event loop, the decode threads, the model's engine and compute threads, gRPC's
  core threads). The model's work per image is the same whichever way the image came, so the differences
  between rows are the front end's, decode included;
- payloads: a 640x480 JPEG (decode included), and the same pixels undecoded (decode excluded: a binary PPM file
  for multipart, a UINT8 [1,480,640,3] tensor for the protocol, which the server wraps in a PPM header, so its
  "decode" is a copy).
It also reports images/s at 16 clients. The clients run on the same machine (asyncio: httpx, grpc.aio with
tritonclient's messages), so images/s is a floor; the CPU figures are the server's alone.

    python scripts/oip_bench.py [--requests 400] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 16
PARITY_CKPT = REPO / "tests" / "data" / "golden" / "parity_tiny" / "reference.ckpt"  # as the tests' `bundle`


def _cpu_s(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _snapshot(pid: int) -> tuple[float, float]:
    """(event loop, whole process) CPU seconds so far; the process's counts include its ended threads."""
    return _cpu_s(Path(f"/proc/{pid}/task/{pid}/stat")), _cpu_s(Path(f"/proc/{pid}/stat"))


def _frame() -> np.ndarray:
    """A 640x480 RGB frame with the texture of a part under a camera: gradients, edges and sensor noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([(x * 0.3 + y * 0.1) % 256, (y * 0.4) % 256, ((x - y) * 0.2) % 256], axis=-1)
    base[180:300, 220:420] = 40
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _ppm(a: np.ndarray) -> bytes:
    return b"P6\n%d %d\n255\n" % (a.shape[1], a.shape[0]) + a.tobytes()


def _bytes_tensor(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def _oip_body(kind: str, frame: np.ndarray, jpeg: bytes) -> tuple[bytes, dict[str, str]]:
    if kind == "jpeg":
        data = _bytes_tensor(jpeg)
        tensor = {"name": "images", "datatype": "BYTES", "shape": [1]}
    else:
        data = frame.tobytes()
        tensor = {"name": "pixels", "datatype": "UINT8", "shape": [1, *frame.shape]}
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}],
                       "outputs": [{"name": n, "parameters": {"binary_data": True}}
                                   for n in ("score", "is_anomalous")]}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def _grpc_request(kind: str, frame: np.ndarray, jpeg: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="zero-shot")
    if kind == "jpeg":
        request.inputs.add(name="images", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(_bytes_tensor(jpeg))
    else:
        request.inputs.add(name="pixels", datatype="UINT8", shape=[1, *frame.shape])
        request.raw_input_contents.append(frame.tobytes())
    for n in ("score", "is_anomalous"):
        request.outputs.add(name=n)
    return request


async def _drive(send: Callable[[], Awaitable[None]], n: int) -> float:
    """`n` requests from CLIENTS concurrent clients; gives the wall time."""
    queue = iter(range(n))

    async def client() -> None:
        for _ in queue:
            await send()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return time.perf_counter() - started


async def _senders(url: str, grpc_url: str, frame: np.ndarray, jpeg: bytes) -> dict:
    http = httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=CLIENTS))
    channel = grpc.aio.insecure_channel(grpc_url, options=[("grpc.max_receive_message_length", 64 * 2**20)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    senders = {}
    for kind in ("jpeg", "pixels"):
        name, payload = ("a.jpg", jpeg) if kind == "jpeg" else ("a.ppm", _ppm(frame))

        async def multipart(name: str = name, payload: bytes = payload) -> None:
            r = await http.post("/predict", files=[("images", (name, payload, "application/octet-stream"))],
                                data={"heatmap": "none"})
            r.raise_for_status()

        body, headers = _oip_body(kind, frame, jpeg)

        async def oip_rest(body: bytes = body, headers: dict = headers) -> None:
            r = await http.post("/v2/models/zero-shot/infer", content=body, headers=headers)
            r.raise_for_status()

        request = _grpc_request(kind, frame, jpeg)

        async def oip_grpc(request: service_pb2.ModelInferRequest = request) -> None:
            await stub.ModelInfer(request, timeout=300)

        senders[kind] = {"multipart REST": multipart, "OIP REST binary": oip_rest, "OIP gRPC": oip_grpc}
    return {"senders": senders, "close": (http, channel)}


async def _measure(pid: int, url: str, grpc_url: str, requests: int, rounds: int) -> list[dict]:
    frame = _frame()
    jpeg = _jpeg(frame)
    made = await _senders(url, grpc_url, frame, jpeg)
    rows = []
    try:
        for kind in ("pixels", "jpeg"):
            for send in made["senders"][kind].values():  # warm-up: connections, every batch size
                await _drive(send, 64)
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for _ in range(rounds):  # interleaved, so a slow moment of the shared machine falls on every row alike
            for kind in ("pixels", "jpeg"):
                for transport, send in made["senders"][kind].items():
                    loop0, all0 = _snapshot(pid)
                    wall = await _drive(send, requests)
                    loop1, all1 = _snapshot(pid)
                    results.setdefault((transport, kind), []).append((loop1 - loop0, all1 - all0, wall))
        for (transport, kind), runs in results.items():
            images = requests * len(runs)
            rows.append({"transport": transport, "payload": kind,
                         "loop_ms": sum(r[0] for r in runs) * 1000 / images,
                         "server_ms": sum(r[1] for r in runs) * 1000 / images,
                         "images_per_s": images / sum(r[2] for r in runs), "jpeg_bytes": len(jpeg)})
    finally:
        http, channel = made["close"]
        await http.aclose()
        await channel.close()
    return rows


def _serve(bundle: Path, work: Path, port: int, grpc_port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "sowa", "serve", "--bundle", str(bundle), "--data-dir", str(work / "data"),
            "--port", str(port), "--grpc-port", str(grpc_port), "--device", "cpu", "--workers", "1",
            "--max-batch-size", "16", "--max-wait-ms", "5", "--max-queue", "256", "--log-level", "warning"]
    log = (work / "server.log").open("ab")
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400, help="requests per transport and payload, per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=8771)
    p.add_argument("--grpc-port", type=int, default=8772)
    p.add_argument("--json", type=Path, help="write the rows here too")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sowa-oip-") as tmp:
        work = Path(tmp)
        bundle = work / "bundle"
        sys.path.insert(0, str(REPO))
        from model.checkpoint_import import import_to_bundle

        import_to_bundle(PARITY_CKPT, bundle, taps=None, text_heads=None, temperature=0.07)
        proc = _serve(bundle, work, a.port, a.grpc_port)
        try:
            rows = asyncio.run(_measure(proc.pid, f"http://127.0.0.1:{a.port}", f"127.0.0.1:{a.grpc_port}",
                                        a.requests, a.rounds))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"{_cpu_name()}, {os.cpu_count()} cores; the tiny parity model on the CPU; {a.rounds} x {a.requests} "
          f"single-image requests per row from {CLIENTS} clients; 640x480 frame, JPEG {rows[0]['jpeg_bytes']} bytes")
    base = {r["payload"]: r for r in rows if r["transport"] == "multipart REST"}
    print("ms CPU per image: the event loop's, the whole server's; each also as a ratio to multipart's")
    print(f"{'transport':<16} {'payload':<25} {'event loop':>10} {'ratio':>6} {'server':>8} {'ratio':>6} "
          f"{'images/s':>9}")
    for r in rows:
        payload = "JPEG (decode included)" if r["payload"] == "jpeg" else "pixels (decode excluded)"
        b = base[r["payload"]]
        print(f"{r['transport']:<16} {payload:<25} {r['loop_ms']:>10.2f} {r['loop_ms'] / b['loop_ms']:>6.2f} "
              f"{r['server_ms']:>8.2f} {r['server_ms'] / b['server_ms']:>6.2f} {r['images_per_s']:>9.0f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
