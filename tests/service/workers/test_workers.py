"""`sowa serve --workers N`: HTTP worker processes in front of one engine process, as real processes, since the
processes are the point: the same answers as one process, one /metrics, a killed worker replaced, a clean stop."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.inference import predict_files
from service.client import SowaClient, decode_raw_heatmap
from sowa.server_process import ServerProcess
from tests.helpers import PARITY, REPO, wait_for

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))


def _count(metrics: str, endpoint: str, status: str) -> float:
    m = re.search(rf'^sowa_requests_total\{{endpoint="{re.escape(endpoint)}",status="{status}"\}} (\S+)$', metrics,
                  re.M)
    return float(m.group(1)) if m else 0.0


def _segments(engine_pid: int) -> set[str]:
    """The shared-memory segments a server's processes have mapped (its workers' slots, the engine's queue
    counter): not the machine's, which other tests' servers (other xdist workers) add to and remove meanwhile."""
    found: set[str] = set()
    for pid in (engine_pid, *_worker_pids(engine_pid)):
        with contextlib.suppress(OSError):  # gone meanwhile
            maps = Path(f"/proc/{pid}/maps").read_text()
            found |= {line.rsplit("/", 1)[1].split()[0] for line in maps.splitlines() if "/dev/shm/psm_" in line}
    return found


def _unlinked(segments: set[str]) -> bool:
    return not any(Path("/dev/shm", name).exists() for name in segments)


def _listening_sockets(port: int) -> set[str]:
    """The sockets listening on `port`, as /proc/<pid>/fd names them."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(f"socket:[{fields[9]}]")
    return found


def _sockets_of(pid: int) -> set[str]:
    try:
        return {os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:  # gone meanwhile
        return set()


def _listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (a worker serving the service's port)."""
    return bool(_sockets_of(pid) & _listening_sockets(port))


def _all_listening(srv: ServerProcess, count: int) -> bool:
    port = int(srv.url.rsplit(":", 1)[1])
    pids = _worker_pids(srv.pid)
    return len(pids) == count and all(_listening(p, port) for p in pids)


def _worker_pids(engine_pid: int) -> list[int]:
    children = Path(f"/proc/{engine_pid}/task/{engine_pid}/children").read_text().split()
    return [int(p) for p in children if "spawn_main" in _cmdline(int(p))]  # a child reaped meanwhile: ""


@pytest.mark.slow
def test_workers_answer_as_one_process_and_stop_cleanly(bundle: Path, tmp_path: Path) -> None:
    offline = predict_files(bundle, TESTS, SHOTS, device="cpu", batch_size=len(TESTS))
    srv = ServerProcess(bundle, tmp_path / "data", tmp_path / "log", ["--workers", "2"]).start()
    try:
        with SowaClient(srv.url) as c:
            wait_for(lambda: _all_listening(srv, 2), 60, "two workers on the port")
            info = c.register_shots("widget", SHOTS)  # forwarded to the engine process
            assert info.shots == 3 and c.get_class("widget").shots == 3
            for _ in range(6):  # requests land on both workers (SO_REUSEPORT spreads connections)
                got = c.predict(TESTS, class_name="widget", heatmap="raw")
                maps = np.stack([decode_raw_heatmap(r.heatmap) for r in got.results])
                assert np.allclose(maps, offline["anomaly_maps"], atol=1e-5)
                assert np.allclose([r.score for r in got.results], offline["scores"], atol=1e-6)
            quiet = c.predict(TESTS, class_name="widget", heatmap="none")  # maps cross only where needed
            assert [r.heatmap for r in quiet.results] == [None] * len(TESTS)
            assert [r.score for r in quiet.results] == [r.score for r in got.results]
            kept = c.predict(TESTS[:1], class_name="widget", heatmap="none", keep=True)  # goes on to the engine
            assert kept.results[0].result_id
            with pytest.raises(Exception, match="class_not_found"):
                c.predict(TESTS[:1], class_name="nope")
            metrics = c.metrics()
            assert _count(metrics, "/predict", "200") == 8 and _count(metrics, "/predict", "404") == 1
            assert _count(metrics, "/classes/{name}/shots", "200") == 1  # the engine's route template
            assert re.search(r"^sowa_batch_size_count [1-9]", metrics, re.M)
            spec = httpx.get(srv.url + "/openapi.json").json()  # the engine's document: every route
            assert {"/predict", "/classes/{name}/scores", "/readyz"} <= set(spec["paths"])

            ours = _segments(srv.pid)  # two workers' slots and the queue counter
            assert len(ours) >= 3, ours
            victim, port = _worker_pids(srv.pid)[0], int(srv.url.rsplit(":", 1)[1])
            its_socket = _sockets_of(victim) & _listening_sockets(port)
            os.kill(victim, signal.SIGKILL)  # the supervisor starts another
            # until the kernel has released its socket (after the process is gone) it may still hand it
            # connections, which are then reset (docs/service.md: net.ipv4.tcp_migrate_req); none are sent before
            wait_for(lambda: not its_socket & _listening_sockets(port), 10, "the killed worker's socket released")
            # while the new one starts, every connection goes to the one still serving: it listens on the port
            # only once its app is up, so none waits on a worker still importing (a fresh connection a request)
            png, statuses = TESTS[0].read_bytes(), []
            deadline = time.monotonic() + 60
            while not (victim not in _worker_pids(srv.pid) and _all_listening(srv, 2)):
                assert time.monotonic() < deadline, "the killed worker was not replaced within 60 s"
                r = httpx.post(srv.url + "/predict", files=[("images", ("t.png", png, "image/png"))],
                               data={"class_name": "widget", "heatmap": "none"}, timeout=30)
                statuses.append(r.status_code)
            assert len(statuses) >= 4 and set(statuses) == {200}, statuses
            assert all(c.predict(TESTS[:1], class_name="widget").results for _ in range(4))  # and after it
            ours |= _segments(srv.pid)  # the new worker's slots too
        log = (tmp_path / "log").read_text()
        assert "starting it again" in log
        run = Path(re.search(r"run files in (\S+)", log).group(1))
        assert (run / "engine.sock").exists()
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)  # workers stop first, then the engine; the run's files go
        assert srv.proc.wait(timeout=90) == 0 and time.monotonic() - t0 < 60
        assert not run.exists()
        # every worker's slots and the queue counter unlinked; the killed worker's go with the resource tracker,
        # which exits just after the engine
        wait_for(lambda: _unlinked(ours), 10, "the server's shared memory unlinked")
    finally:
        srv.stop()


# kill -9 of the engine (its workers and shared memory go too): test_worker_attacks' last test, on that module's
# server, which would otherwise be stopped anyway (one server start fewer)


@pytest.mark.slow
def test_workers_go_when_the_engine_is_killed_as_they_start(bundle: Path, tmp_path: Path) -> None:
    """The engine killed while its workers are still importing, before they could ask for PR_SET_PDEATHSIG and
    long before they connect: they find their parent gone and stop rather than wait for it forever."""
    srv = ServerProcess(bundle, tmp_path / "data", tmp_path / "log", ["--workers", "2"])
    with (tmp_path / "log").open("ab") as log:
        proc = subprocess.Popen(srv.args, stdout=log, stderr=subprocess.STDOUT, env=srv.env, cwd=REPO)
    workers: list[int] = []
    try:
        wait_for(lambda: len(_worker_pids(proc.pid)) == 2, 60, "two worker processes")
        workers = _worker_pids(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() and "spawn_main" in _cmdline(p) for p in workers),
                 30, "the orphaned workers gone")
    finally:
        proc.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


@pytest.mark.slow
def test_workers_refuse_when_full_drop_leavers_and_drain(bundle: Path, tmp_path: Path) -> None:
    """What one process does under load holds through the workers: a full queue answers 429 before decoding, a
    client that leaves while queued never reaches the device, and SIGTERM answers what is queued before exiting.
    A batch waits 5 s to fill, so a queued request stays queued while the test looks."""
    flags = ["--workers", "2", "--max-batch-size", "4", "--max-wait-ms", "5000", "--max-queue", "4"]
    png = TESTS[0].read_bytes()
    srv = ServerProcess(bundle, tmp_path / "data", tmp_path / "log", flags,
                        env={"SOWA_MAX_IMAGES_PER_REQUEST": "2"}).start()
    try:
        with SowaClient(srv.url) as c:
            wait_for(lambda: _all_listening(srv, 2), 60, "two workers on the port")
            with pytest.raises(httpx.ReadTimeout):  # leaves after 0.5 s, long before its batch window closes
                httpx.post(srv.url + "/predict", files=[("images", ("a.png", png, "image/png"))],
                           timeout=httpx.Timeout(10, read=0.5))
            wait_for(lambda: _count(c.metrics(), "/predict", "499") == 1, 10, "the request counted as client-closed")
            wait_for(lambda: _metric(c.metrics(), "sowa_queue_depth") == 0, 10, "the dropped request left the queue")
            assert _metric(c.metrics(), "sowa_images_total") == 0  # it never reached the device

            with ThreadPoolExecutor(3) as pool:
                two = [("images", (f"{i}.png", png, "image/png")) for i in range(2)]
                queued = [pool.submit(httpx.post, srv.url + "/predict", files=files, data={"heatmap": "none"},
                                      timeout=30) for files in (two, two[:1])]
                wait_for(lambda: _metric(c.metrics(), "sowa_queue_depth") == 3, 10, "three images queued")
                for _ in range(2):  # whichever worker it reaches: the engine's queue is shared, 3 + 2 > 4
                    bad = [("images", (f"bad{i}.png", b"not an image", "image/png")) for i in range(2)]
                    full = httpx.post(srv.url + "/predict", files=bad, timeout=30)
                    assert full.status_code == 429, full.text  # 400 invalid_image had it been decoded
                    assert full.json()["error"]["code"] == "queue_full" and int(full.headers["Retry-After"]) >= 1
                assert [q.result().status_code for q in queued] == [200, 200]

                waiting = pool.submit(httpx.post, srv.url + "/predict", files=two[:1], data={"heatmap": "none"},
                                      timeout=30)
                wait_for(lambda: _metric(c.metrics(), "sowa_queue_depth") == 1, 10, "one image queued")
                srv.proc.send_signal(signal.SIGTERM)  # drains: the queued request is answered, then the exit
                drained = waiting.result()
                assert drained.status_code == 200 and len(drained.json()["results"]) == 1
        assert srv.proc.wait(timeout=60) == 0
    finally:
        srv.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""
