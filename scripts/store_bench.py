"""Class store benchmark: directory store vs PostgreSQL, two replicas (real `sowa serve` processes on loopback).

For each backend and each store size N (default 1, 100, 1000 classes already registered): replica A and replica
B start on the store (B's start-up time, bundle to /readyz with N classes restored, is recorded), then `--regs`
new classes of `--shots` small PNG shots are registered on A, one at a time. Reported per registration: the
latency of the POST on A (2xx = durable), and the propagation delay: from A's 2xx until B serves the class
(B polled every 5 ms). The N classes are filled in directly through the store API with a bank fitted by the
service for this bundle, so nothing is rebuilt at start-up.

    python3 scripts/store_bench.py --out store_bench.json           # starts its own PostgreSQL (as tests do)
    python3 scripts/store_bench.py --pg-url postgresql://... --sizes 1 100

The directory replicas follow each other by scanning every class.json once a second (sync_interval_s 1.0);
PostgreSQL replicas are woken by LISTEN/NOTIFY.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.bundle import init_bundle, read_manifest  # noqa: E402
from model.device import machine_description  # noqa: E402
from service.core.store import open_store  # noqa: E402
from sowa.server_process import ServerProcess  # noqa: E402


def _png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _files(seed: int, shots: int) -> list:
    return [("images", (f"s{i}.png", _png(seed * 100 + i), "image/png")) for i in range(shots)]


def _fill(url: str, template: str, n: int) -> None:
    """Copy the class `template` to names c00000.. until the store holds n classes (the template included)."""
    store = open_store(url)
    try:
        store.recover()
        head = store.read(template, None)
        record = store.read(template, head.bundle_fingerprint)
        shots = {h: store.read_shot(template, h) for h in record.shots}
        from dataclasses import replace

        for i in range(n - 1):
            store.write(replace(record, name=f"c{i:05d}"), shots)
    finally:
        getattr(store, "close", lambda: None)()


def _wait_served(url: str, name: str, timeout: float = 30.0) -> float:
    t0 = time.perf_counter()
    with httpx.Client(timeout=5) as c:
        while time.perf_counter() - t0 < timeout:
            if c.get(f"{url}/classes/{name}").status_code == 200:
                return time.perf_counter() - t0
            time.sleep(0.005)
    raise RuntimeError(f"{name} not served by {url} within {timeout} s")


def run_one(kind: str, url: str, data_dir: Path, bundle: Path, n: int, regs: int, shots: int,
            logs: Path, drop_banks: bool = False) -> dict:
    env = {"SOWA_STORE": url} if kind == "postgresql" else {}
    a = ServerProcess(bundle, data_dir, logs / f"{kind}-{n}-a.log", env=env, ready_timeout=600).start()
    try:
        with httpx.Client(timeout=120) as c:
            c.post(f"{a.url}/classes/template/shots", files=_files(0, shots)).raise_for_status()
        _fill(url, "template", n)
        if drop_banks:  # as if the store held shots only: B rebuilds (and writes back) every bank at start-up
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE sowa_classes SET bank = NULL")
        t0 = time.perf_counter()
        b = ServerProcess(bundle, data_dir, logs / f"{kind}-{n}-b.log", env=env, ready_timeout=600).start()
        start_s = time.perf_counter() - t0
        try:
            with httpx.Client(timeout=120) as c:
                assert len(c.get(f"{b.url}/classes").json()["classes"]) == n
            latency, propagation = [], []
            with httpx.Client(timeout=120) as c:
                for i in range(regs):
                    t = time.perf_counter()
                    c.post(f"{a.url}/classes/new{i:03d}/shots", files=_files(i + 1, shots)).raise_for_status()
                    latency.append(time.perf_counter() - t)
                    propagation.append(_wait_served(b.url, f"new{i:03d}"))
        finally:
            b.stop()
    finally:
        a.stop()
    return {"store": kind + (" (no banks)" if drop_banks else ""), "classes": n, "replica_start_s": round(start_s, 2),
            "register_ms_median": round(1000 * statistics.median(latency), 1),
            "register_ms_max": round(1000 * max(latency), 1),
            "propagation_ms_median": round(1000 * statistics.median(propagation), 1),
            "propagation_ms_max": round(1000 * max(propagation), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000])
    p.add_argument("--regs", type=int, default=5, help="registrations timed per size")
    p.add_argument("--shots", type=int, default=2, help="shots per registered class")
    p.add_argument("--stores", nargs="+", default=["directory", "postgresql"])
    p.add_argument("--pg-url", help="an empty database to use (default: start a PostgreSQL like the tests)")
    p.add_argument("--drop-banks", action="store_true", help="PostgreSQL: clear the stored banks before B starts "
                   "(what storing shots only would cost)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sowa-store-bench-"))
    bundle = work / "bundle"
    init_bundle("sowa-tiny", "none", bundle, seed=0)
    server = None
    if "postgresql" in args.stores and args.pg_url is None:
        from tests.postgres_server import PostgresServer

        server = PostgresServer().start()
    rows = []
    try:
        for kind in args.stores:
            for n in args.sizes:
                data_dir = work / f"data-{kind}-{n}"
                if kind == "postgresql":
                    url = args.pg_url if server is None else server.create_database(f"bench_{n}")
                else:
                    url = str(data_dir)
                row = run_one(kind, url, data_dir, bundle, n, args.regs, args.shots, work,
                              args.drop_banks and kind == "postgresql")
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        if server is not None:
            server.cleanup()
    report = {"machine": machine_description("cpu"), "bundle": f"sowa-tiny ({read_manifest(bundle).fingerprint})",
              "shots_per_class": args.shots, "registrations_per_size": args.regs, "rows": rows}
    print("| store | classes | register ms (median / max) | propagation to B ms (median / max) | B start s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['store']} | {r['classes']} | {r['register_ms_median']} / {r['register_ms_max']} | "
              f"{r['propagation_ms_median']} / {r['propagation_ms_max']} | {r['replica_start_s']} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
