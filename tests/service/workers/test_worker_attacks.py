"""What a hostile client, or a worker's death, could do to the worker mode, against real processes.

A worker answers what it can itself and streams what it forwards, so large bodies for paths it refuses cost it
nothing and those it forwards pass through without being held whole; a worker killed with kill -9 leaves no
shared memory behind while the server runs on; the engine killed with kill -9 takes its workers and its shared
memory along (last: it ends the module's server).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sowa.server_process import ServerProcess
from tests.helpers import PARITY, wait_for
from tests.service.workers.test_workers import _all_listening, _cmdline, _segments, _unlinked, _worker_pids

KEY = "attack-test-key"
BODY = 60 * 2**20  # under the 64 MiB default body limit: what the attack sent


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _segments_of(pid: int) -> set[str]:
    """The shared-memory segments process `pid` has mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.rsplit("/", 1)[1].split()[0] for line in maps.splitlines() if "/dev/shm/psm_" in line}


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("attacks")
    srv = ServerProcess(bundle, root / "data", root / "log", ["--workers", "2"], env={"SOWA_API_KEY": KEY}).start()
    try:
        wait_for(lambda: _all_listening(srv, 2), 60, "two workers on the port")
        shots = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(PARITY.glob("shots/*.png"))]
        assert httpx.post(srv.url + "/classes/widget/shots", files=shots, headers={"X-API-Key": KEY},
                          timeout=60).status_code == 200
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_large_bodies_cost_a_worker_nothing(server: ServerProcess) -> None:
    """8 requests of 60 MiB each: to a path the worker refuses (its own 405), to a forwarded route without the key
    (401 in the worker, before anything is read or forwarded), and to a forwarded route with the key (streamed on
    to the engine, which refuses the body). Buffering them had cost the workers hundreds of MiB."""
    workers = _worker_pids(server.pid)
    before = sum(_rss_mib(p) for p in workers)
    junk = b"x" * BODY
    cases = [("/ui/x", {}, 405), ("/classes/widget/shots", {}, 401),
             ("/classes/widget/shots", {"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=b"}, 400)]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for i in range(8):
            path, headers, status = cases[i % len(cases)]
            r = c.post(path, content=junk, headers=headers)
            assert r.status_code == status, (path, r.status_code, r.text[:200])
            assert r.json()["error"]["code"]
    grown = sum(_rss_mib(p) for p in workers) - before
    assert grown < 48, f"the workers grew by {grown:.0f} MiB"  # 2 x 60 MiB had they held one body each


@pytest.mark.slow
def test_a_killed_worker_leaves_no_shared_memory(server: ServerProcess) -> None:
    victim, other = _worker_pids(server.pid)
    ours = _segments_of(victim) - _segments_of(other)  # its slots: the queue counter is mapped by both
    assert len(ours) == 1 and Path("/dev/shm", *ours).exists()
    os.kill(victim, signal.SIGKILL)
    # the engine sees the connection drop and removes the segment, while the server runs on
    wait_for(lambda: not Path("/dev/shm", *ours).exists(), 10, "the killed worker's slots removed")
    wait_for(lambda: victim not in _worker_pids(server.pid) and _all_listening(server, 2), 60, "a new worker")
    r = httpx.post(server.url + "/predict", headers={"X-API-Key": KEY}, timeout=60,
                   files=[("images", ("t.png", next(PARITY.glob("test/*.png")).read_bytes(), "image/png"))])
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_workers_go_when_the_engine_is_killed(server: ServerProcess) -> None:
    """kill -9 of the engine process leaves no worker holding the port (a new server gets every connection), and
    no shared memory behind: the resource tracker the engine and its workers share unlinks it once they are gone.
    The module's last test: it ends the module's server (run alone, it gets a server of its own)."""
    wait_for(lambda: len(_worker_pids(server.pid)) == 2, 30, "two workers")
    workers = _worker_pids(server.pid)
    # two workers' slots and the engine's queue counter (a worker makes its slots once it is up)
    wait_for(lambda: len(_segments(server.pid)) >= 3, 60, "the workers' shared memory")
    ours = _segments(server.pid)
    server.kill()
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() and "spawn_main" in _cmdline(p) for p in workers),
             30, "the orphaned workers gone")
    wait_for(lambda: _unlinked(ours), 30, "the killed server's shared memory unlinked")
