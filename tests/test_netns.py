"""Replicas on different hosts, as far as the network goes: PostgreSQL and two servers each in a network namespace
of their own, joined by veth pairs to a bridge in a fourth namespace (10.200.0.0/24), where the test's client
runs too. The replicas reach the database at 10.200.0.1 and are reached at 10.200.0.2/.3: nothing rides on
loopback or on shared files (each has its own data dir, left empty). Needs root and `ip netns`; namespaces and
links are the test's own and are deleted in teardown."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.helpers import PARITY, REPO
from tests.postgres_server import PostgresServer

NET = "10.200.0"
DB, A, B, CLIENT = f"{NET}.1", f"{NET}.2", f"{NET}.3", f"{NET}.254"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture()
def namespaces() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    prefix = f"sowa{os.getpid()}"
    names = {role: f"{prefix}-{role}" for role in ("lan", "db", "a", "b")}
    made: list[str] = []
    try:
        for ns in names.values():
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as e:
                pytest.skip(f"`ip netns add` does not work here: {e.stderr.strip()}")
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        lan = names["lan"]
        _ip("-n", lan, "link", "add", "br0", "type", "bridge")
        _ip("-n", lan, "addr", "add", f"{CLIENT}/24", "dev", "br0")
        _ip("-n", lan, "link", "set", "br0", "up")
        for role, addr in (("db", DB), ("a", A), ("b", B)):
            ns = names[role]
            _ip("link", "add", "veth0", "netns", ns, "type", "veth", "peer", "name", f"port-{role}", "netns", lan)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "veth0")
            _ip("-n", ns, "link", "set", "veth0", "up")
            _ip("-n", lan, "link", "set", f"port-{role}", "master", "br0", "up")
        yield names
    finally:
        for ns in reversed(made):  # a namespace's links go with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


CLIENT_SCRIPT = r"""
import json, sys, time
import httpx
from service.client import ApiError, SowaClient
a_url, b_url, shots, tests = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
deadline = time.monotonic() + 120
for url in (a_url, b_url):
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url} never ready")
        time.sleep(0.2)
with SowaClient(a_url) as a, SowaClient(b_url) as b:
    a.register_shots("widget", shots)
    t0 = time.monotonic()
    while True:
        try:
            if b.get_class("widget").shots == len(shots):
                break
        except ApiError:
            pass
        if time.monotonic() - t0 > 5:
            sys.exit("B never served the class A registered")
        time.sleep(0.01)
    seen_after = time.monotonic() - t0
    pa = a.predict(tests, class_name="widget", heatmap="none")
    pb = b.predict(tests, class_name="widget", heatmap="none")
    print(json.dumps({"propagation_s": seen_after, "a": [r.score for r in pa.results],
                      "b": [r.score for r in pb.results], "store": b.ready().store}))
"""


@pytest.mark.slow
def test_two_replicas_in_two_network_namespaces_share_classes(namespaces: dict[str, str], bundle: Path,
                                                              tmp_path: Path) -> None:
    exec_in = {role: ["ip", "netns", "exec", ns] for role, ns in namespaces.items()}
    pg = PostgresServer(hosts=(DB,), port=5432, wrap=exec_in["db"], hba=(f"{NET}.0/24",))
    servers: list[subprocess.Popen] = []
    try:
        pg.start()
        url = f"postgresql://{pg.superuser}@{DB}:5432/postgres"
        for role, addr in (("a", A), ("b", B)):
            log = (tmp_path / f"{role}.log").open("wb")
            servers.append(subprocess.Popen(
                [*exec_in[role], sys.executable, "-m", "sowa", "serve", "--bundle", str(bundle), "--host", addr,
                 "--port", "8000", "--device", "cpu", "--data-dir", str(tmp_path / role), "--store", url],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        shots = sorted(PARITY.glob("shots/*.png"))
        tests = sorted(PARITY.glob("test/*.png"))
        out = subprocess.run([*exec_in["lan"], sys.executable, "-c", CLIENT_SCRIPT, f"http://{A}:8000",
                              f"http://{B}:8000", ",".join(map(str, shots)), ",".join(map(str, tests))],
                             cwd=REPO, capture_output=True, text=True, timeout=240)
        logs = "".join((tmp_path / f"{r}.log").read_text()[-1500:] for r in ("a", "b"))
        assert out.returncode == 0, out.stderr[-2000:] + logs
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["store"] == "postgresql" and got["a"] == got["b"] and len(got["a"]) == len(tests)
        assert got["propagation_s"] < 1.0, got
        # every replica connection came over the namespaces' network, none over loopback or the socket
        sockets = f"postgresql://{pg.superuser}@/postgres?host={pg.sockets}&port=5432"
        with psycopg.connect(sockets) as conn:
            addrs = {str(r[0]) for r in conn.execute(
                "SELECT client_addr FROM pg_stat_activity WHERE application_name LIKE 'sowa-%'")}
        assert addrs == {A, B}, addrs
        # nothing of the classes, keys or records on a replica's disk: only its records' spool, which holds what
        # it answered until drained into the database (docs/records.md)
        local = [p.relative_to(tmp_path) for r in ("a", "b") for p in (tmp_path / r).rglob("*") if p.is_file()]
        assert all(p.parts[1:3] == ("records", "spool") for p in local), local
    finally:
        for srv in servers:
            srv.terminate()
        for srv in servers:
            try:
                srv.wait(timeout=30)
            except subprocess.TimeoutExpired:
                srv.kill()
        pg.cleanup()
