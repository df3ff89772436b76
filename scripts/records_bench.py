"""What inspection records cost: /predict throughput with recording on (default durability: each record fsync'd in
the spool before its answer) against recording off, in one run on one server; and the records per second each
record store sustains, batched as the drainer writes them.

    python3 scripts/records_bench.py [--bundle B] [--seconds 20] [--rounds 2] [--store-records 50000]

/predict: `sowa serve` on the bundle (default: the tests' tiny parity model, 64 px; `sowa init --arch ViT-B-16
--pretrained none --out B` gives ViT-B-16's geometry with random weights), one class of two shots, 16 concurrent
clients each sending one 640x480 JPEG per request against the class, `heatmap=none`. Rounds alternate
`record=true` and `record=false` on the same server (the service's switch is the same code path), so both see the
same machine; the default sampling keeps the image of every flagged part and 1 in 100 passed.
Stores: N records (numbers, no images) written in batches of 1000 (the drainer's batch) into SQLite in a temp
directory and into PostgreSQL (a throwaway server from tests/postgres_server.py, fsync on as a real one runs).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.core.records.record import Draft, Record  # noqa: E402
from service.core.records.store import RecordStore  # noqa: E402
from sowa.server_process import ServerProcess  # noqa: E402

CLIENTS = 16
PARITY_CKPT = REPO / "tests" / "data" / "golden" / "parity_tiny" / "reference.ckpt"
SHOTS = sorted((REPO / "tests" / "data" / "golden" / "parity_tiny" / "shots").glob("*.png"))


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    a = (128 + 60 * np.sin(x / 37.0) * np.cos(y / 23.0) + rng.normal(0, 6, (480, 640)))
    img = np.clip(np.stack([a, a * 0.9, a * 0.8], -1), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def _round(url: str, image: bytes, record: bool, seconds: float) -> float:
    """Images per second from CLIENTS clients for `seconds`."""
    done = 0
    stop = time.monotonic() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop:
            r = await c.post(url + "/predict", files=[("images", ("part.jpg", image, "image/jpeg"))],
                             data={"class_name": "widget", "heatmap": "none", "record": str(record).lower()})
            if r.status_code != 200:
                raise RuntimeError(r.text)
            done += 1

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CLIENTS)) as c:
        await asyncio.gather(*(client(c) for _ in range(CLIENTS)))
    return done / (time.monotonic() - start)


def predict_throughput(bundle: Path, work: Path, seconds: float, rounds: int) -> dict:
    with ServerProcess(bundle, work / "data", work / "server.log") as srv:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in SHOTS[:2]]
        assert httpx.post(srv.url + "/classes/widget/shots", files=files, timeout=300).status_code == 200
        image = _jpeg()
        asyncio.run(_round(srv.url, image, True, min(5.0, seconds)))  # warm up both paths
        on, off = [], []
        for _ in range(rounds):
            off.append(asyncio.run(_round(srv.url, image, False, seconds)))
            on.append(asyncio.run(_round(srv.url, image, True, seconds)))
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    written = next(float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("sowa_records_written_total "))
    return {"off_img_s": off, "on_img_s": on, "ratio": sum(on) / sum(off), "records_written": written}


def _drafts(n: int) -> list[Draft]:
    t0 = time.time()
    return [Draft(Record(id=f"{int((t0 + i / 1000) * 1000):012x}{i:020x}", time=t0 + i / 1000, class_name="widget",
                         revision="0123456789abcdef", model="fedcba9876543210", threshold=0.74,
                         threshold_per_request=False, score=0.5, normalized_score=0.4, text_score=0.1,
                         is_anomalous=i % 10 == 0, filename=f"part-{i}.jpg", width=640, height=480,
                         regions=[{"box": [10, 10, 40, 40], "peak": 3.1, "area": 0.004}] if i % 10 == 0 else [],
                         part_id=f"P-{i}", station="line1-cam2", tags=("line1", "shift:a")))
            for i in range(n)]


def store_rate(store: RecordStore, drafts: list[Draft], batch: int = 1000) -> float:
    start = time.perf_counter()
    for i in range(0, len(drafts), batch):
        store.write(drafts[i:i + batch])
    return len(drafts) / (time.perf_counter() - start)


def store_throughput(n: int, work: Path) -> dict:
    from service.core.records.postgres import PostgresRecordStore
    from service.core.records.sqlite import SqliteRecordStore
    from tests.postgres_server import PostgresServer

    out = {}
    sqlite = SqliteRecordStore(work / "sqlite")
    out["sqlite_records_s"] = store_rate(sqlite, _drafts(n))
    sqlite.close()
    pg = PostgresServer()
    pg.start()
    try:
        conf = pg.data / "postgresql.conf"
        conf.write_text(conf.read_text() + "fsync = on\nfull_page_writes = on\n")  # as a real server runs
        pg.stop()
        pg.start()
        store = PostgresRecordStore(pg.create_database("bench"))
        out["postgresql_records_s"] = store_rate(store, _drafts(n))
        store.close()
    finally:
        pg.cleanup()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="default: the tests' tiny parity model")
    p.add_argument("--seconds", type=float, default=20.0, help="per round and setting")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--store-records", type=int, default=50_000)
    p.add_argument("--skip-predict", action="store_true")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="records-bench-"))
    bundle = a.bundle
    if bundle is None:
        from model.checkpoint_import import import_to_bundle

        bundle = work / "bundle"
        import_to_bundle(PARITY_CKPT, bundle, taps=None, text_heads=None, temperature=0.07)
    result: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "bundle": str(bundle)}
    result.update(store_throughput(a.store_records, work))
    if not a.skip_predict:
        result.update(predict_throughput(bundle, work, a.seconds, a.rounds))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
