"""Issue #14: bounded memory per upload, a full disk is a clean error, crashed registrations leave nothing behind,
refused classes can be repaired or deleted, slow or huge headers cannot stall the server."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model.preprocess import decode_image
from service.core.errors import InvalidImageError
from service.core.store import DirectoryStore
from service.core.uploads import DECODE_BYTES_PER_PIXEL, DecodeBudget, decode_upload
from sowa.server_process import ServerProcess
from tests.helpers import PARITY, REPO
from tests.in_process import serve_in_process
from tests.service.core.test_store import _record, _shots

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _grey16_png(side: int) -> bytes:
    ramp = (np.arange(side, dtype=np.uint32)[None, :] * 65535 // side).astype(np.uint16).repeat(side, 0)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    return buf.getvalue()


# -- 1. memory per upload ---------------------------------------------------------------------------------------
def test_a_jpeg_too_short_for_its_header_size_is_refused_as_truncated() -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).resize((3000, 3000)).save(buf, "JPEG")
    data = buf.getvalue()
    assert decode_image(data).size == (3000, 3000)
    with pytest.raises(InvalidImageError, match="truncated"):  # libjpeg would pad it with grey
        decode_upload(data[:9000] + b"\xff\xd9", "bomb.jpg", 40_000_000)
    solid = io.BytesIO()  # the smallest honest JPEGs of that size still pass
    Image.new("L", (3000, 3000), 128).save(solid, "JPEG", progressive=True, optimize=True)
    assert decode_image(solid.getvalue()).size == (3000, 3000)


def test_high_depth_conversion_is_sliced_and_unchanged() -> None:
    a = (np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) * 7 % 65536).astype(np.uint16)
    want = np.clip(np.rint(a.astype(np.float64) / 65535.0 * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    got = np.asarray(decode_image(buf.getvalue()))
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)


def test_the_decode_budget_bounds_decodes_in_flight() -> None:
    budget = DecodeBudget(3 * 1000 * DECODE_BYTES_PER_PIXEL)
    peak, lock = [0], threading.Lock()

    def decode(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                peak[0] = max(peak[0], budget.used)
            time.sleep(0.02)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [1000] * 12 + [10**9]))  # the huge one takes the whole budget, and still runs
    assert peak[0] <= budget.limit and budget.used == 0 and budget.in_flight == 0


@pytest.mark.slow
def test_peak_memory_per_upload_is_bounded_in_a_real_server(bundle: Path, tmp_path: Path) -> None:
    """VmHWM of the server process: a 16-bit PNG costs at most DECODE_BYTES_PER_PIXEL per pixel (it took ~27.6
    through float64), four at once stay within the decode budget, and the memory goes back afterwards."""
    side = 4000
    data, px = _grey16_png(side), side * side
    budget_mb = 300  # one such decode at a time (16 Mpx x 16 B = 256 MiB)
    env = {"SOWA_DECODE_MEMORY_MB": str(budget_mb)}
    with ServerProcess(bundle, tmp_path / "data", tmp_path / "server.log", env=env) as srv:
        def post() -> int:
            return httpx.post(srv.url + "/predict", files={"images": ("g16.png", data)}, data={"heatmap": "none"},
                              timeout=120).status_code

        assert post() == 200  # first request: whatever is allocated once is allocated now
        srv.reset_peak_memory()
        base = srv.memory_kib()
        assert post() == 200
        one = (srv.memory_kib("VmHWM") - base) * 1024
        assert one <= px * DECODE_BYTES_PER_PIXEL, f"{one / px:.1f} bytes per pixel"
        srv.reset_peak_memory()
        base = srv.memory_kib()
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda _: post(), range(4))) == [200] * 4
        four = (srv.memory_kib("VmHWM") - base) * 1024
        assert four <= budget_mb * 2**20 + 64 * 2**20, f"4 at once: {four / 2**20:.0f} MiB"
        held = (srv.memory_kib() - base) * 1024
        assert held <= 64 * 2**20, f"{held / 2**20:.0f} MiB still held"


# -- 2. a full disk -----------------------------------------------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only): writes past it fail with ENOSPC, as on a full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _noise_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.anyio
async def test_a_full_disk_answers_507_and_leaves_nothing_behind(bundle: Path, small_disk: Path) -> None:
    data = small_disk / "data"
    async with serve_in_process(bundle, data) as svc:
        await svc.client.register_shots("widget", SHOTS, mode="replace")
        classes = data / "classes"
        before = _snapshot(classes)
        filler = _fill(small_disk)
        extra = [("images", ("new.png", _noise_png(1), "image/png"))]
        attempts = [("post", "/classes/fresh/shots", {"files": _files(SHOTS[:2])}),
                    ("post", "/classes/widget/shots", {"files": extra}),
                    ("post", "/classes/widget/shots", {"files": extra, "data": {"mode": "replace"}}),
                    ("patch", "/classes/widget", {"json": {"threshold": 0.9}})]
        for method, path, kw in attempts:
            r = await svc.http.request(method.upper(), path, **kw)
            assert r.status_code == 507, (path, r.text)
            assert r.json()["error"]["code"] == "insufficient_storage" and int(r.headers["retry-after"]) > 0
            assert "nothing changed" in r.json()["error"]["message"]
            assert _snapshot(classes) == before, path  # what the failed operation wrote is gone, the old is intact
        assert not (classes / "fresh").exists()
        info = await svc.client.get_class("widget")
        assert info.shots == len(SHOTS) and not info.threshold_overridden
        assert (await svc.client.predict(TESTS[:1], class_name="widget")).results[0].score > 0
        filler.unlink()
        assert (await svc.client.register_shots("fresh", SHOTS[:2])).shots == 2  # space back: it works again


# -- 3. refused (damaged) classes ------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_refused_class_answers_409_naming_the_way_out_and_can_be_deleted(bundle: Path,
                                                                                  tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve_in_process(bundle, data) as svc:
        for name in ("broken", "mended"):
            await svc.client.register_shots(name, SHOTS)
    for name in ("broken", "mended"):
        shot = next((data / "classes" / name / "shots").glob("*.png"))
        shot.write_bytes(shot.read_bytes()[:-10])
        for bank in (data / "classes" / name / "banks").iterdir():  # so the restore reads the shots
            bank.unlink()
    async with serve_in_process(bundle, data) as svc:
        ready = await svc.client.ready()
        assert set(ready.refused_classes) == {"broken", "mended"}
        for method, path, kw in [("POST", "/classes/broken/shots", {"files": _files(SHOTS[:1])}),
                                 ("PATCH", "/classes/broken", {"json": {"threshold": 0.9}}),
                                 ("GET", "/classes/broken", {}),
                                 ("POST", "/predict", {"files": _files(TESTS[:1]), "data": {"class_name": "broken"}})]:
            r = await svc.http.request(method, path, **kw)
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert err["code"] == "class_damaged" and "hash" in err["message"]
            assert "mode=replace" in err["message"] and "DELETE /classes/broken" in err["message"]
        r = await svc.http.delete("/classes/broken")
        assert r.status_code == 200 and r.json() == {"deleted": "broken"}
        assert not (data / "classes" / "broken").exists()
        r = await svc.http.post("/classes/mended/shots", files=_files(SHOTS), data={"mode": "replace"})
        assert r.status_code == 200, r.text
        assert (await svc.client.ready()).refused_classes == {}
        assert (await svc.http.delete("/classes/broken")).status_code == 404


# -- 4. crashes in the middle of a write -----------------------------------------------------------------------------
_CRASH = """
import os, signal, sys, tempfile
from pathlib import Path
import service.core.store.directory as d
from tests.service.core.test_store import _record, _shots

real = d.atomic_write

def dying(path, write, mode=0o644):
    if Path(path).name == "class.json":  # the temporary file is written, then the process dies
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".class.json.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, write, mode)

d.atomic_write = dying


def write(name, shot):
    store = d.DirectoryStore(Path(sys.argv[1]))
    rec = _record(name, _shots(shot.encode()))
    rec = rec.__class__(**{**rec.__dict__, "memory": rec.memory.__class__(
        rec.memory.bank.__class__(rec.memory.bank.features + 1, rec.memory.bank.shots), rec.memory.calibration)})
    with store.lock(name):
        store.write(rec, _shots(shot.encode()))


# one write per forked child, one after the other: each process dies as the original did, and the imports
# (torch, open_clip: ~5 s) are paid once
for name, shot in zip(sys.argv[2::2], sys.argv[3::2]):
    pid = os.fork()
    if pid == 0:
        try:
            write(name, shot)
        finally:
            os._exit(3)  # not reached: the write kills the child
    _, status = os.waitpid(pid, 0)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        sys.exit(f"the write of {name} ended with status {status}, not SIGKILL")
"""


def _crash_writing(data: Path, *writes: tuple[str, str]) -> None:
    """Each (class name, shot) write killed with SIGKILL in the middle, in turn, in a process of its own."""
    args = [part for write in writes for part in write]
    r = subprocess.run([os.sys.executable, "-c", _CRASH, str(data), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_start_up_removes_what_crashed_writes_left(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = DirectoryStore(tmp_path)
    store.recover()
    shots = _shots(b"shot-a")
    with store.lock("widget"):
        store.write(_record("widget", shots), shots)
    widget = tmp_path / "classes" / "widget"
    manifest = json.loads((widget / "class.json").read_text())
    before = _snapshot(widget)
    # an append (new shot, new bank file, then death before class.json), and a first registration (shots/ and
    # bank, no class.json)
    _crash_writing(tmp_path, ("widget", "shot-b"), ("half", "shot-c"))
    assert (tmp_path / "classes" / "half" / "shots").is_dir()
    banks = sorted(p.name for p in (widget / "banks").iterdir())
    assert list(widget.glob(".*.tmp")) and len(banks) == 2  # the new bank was written, class.json was not

    with caplog.at_level("WARNING", logger="sowa.registry"):
        refused = DirectoryStore(tmp_path).recover()
    assert refused == {}
    assert not (tmp_path / "classes" / "half").exists()
    assert not [p for p in (tmp_path / "classes").rglob("*") if p.name.endswith((".tmp", ".kept"))]
    assert json.loads((widget / "class.json").read_text()) == manifest
    after = _snapshot(widget)
    assert {k: v for k, v in after.items() if k.startswith("banks/")} == {  # the bank the manifest names, alone
        k: v for k, v in before.items() if k.startswith("banks/")}
    assert set(after) - set(before) <= {f"shots/{next(iter(_shots(b'shot-b')))}.png"}  # unreferenced: goes on write
    assert "half" in caplog.text and "interrupted" in caplog.text
    again = DirectoryStore(tmp_path)
    again.recover()
    assert again.read("widget", "fp-1").memory is not None  # intact, bank included


# -- 5. slow, huge and too many connections (a real server: the protocol is the point) ---------------------------------
def _exchange(port: int, payload: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send `payload` (no more), read until the server closes; what came back and how long it took."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(payload)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - start


def _error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def _probe_ms(url: str) -> float:
    start = time.monotonic()
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    return (time.monotonic() - start) * 1000


@pytest.mark.slow
def test_slow_huge_and_too_many_connections_are_refused_cleanly(bundle: Path, tmp_path: Path) -> None:
    env = {"SOWA_HEADER_TIMEOUT_S": "1", "SOWA_BODY_TIMEOUT_S": "1", "SOWA_MAX_CONNECTIONS": "50",
           "SOWA_MAX_HEADER_BYTES": "65536"}
    with ServerProcess(bundle, tmp_path / "data", tmp_path / "server.log", env=env) as srv:
        # headers that never finish: 408 after the header timeout, and the socket is closed
        response, took = _exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert _error(response) == (408, {"code": "request_timeout",
                                          "message": "request headers not complete within 1 s"})
        assert took < 4
        response, took = _exchange(srv.port, b"")  # a connection that sends nothing at all
        assert _error(response)[0] == 408 and took < 4
        # a body that stalls: the connection is closed
        response, took = _exchange(srv.port, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Content-Type: multipart/form-data; boundary=b\r\n"
                                   b"Content-Length: 100000\r\n\r\n--b\r\n")
        assert _error(response)[0] == 408 and took < 5
        # a huge header: 431 once the limit is passed, while the event loop keeps answering
        result: list[tuple[bytes, float]] = []
        huge = threading.Thread(target=lambda: result.append(_exchange(
            srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (100 * 2**20) + b"\r\n\r\n")))
        huge.start()
        probes = [_probe_ms(srv.url) for _ in range(10)]
        huge.join(30)
        assert _error(result[0][0])[:1] == (431,) and _error(result[0][0])[1]["code"] == "headers_too_large"
        assert max(probes) < 500, probes
        # malformed HTTP: the service's JSON error, not plain text
        status, err = _error(_exchange(srv.port, b"NOT HTTP AT ALL\r\n\r\n")[0])
        assert status == 400 and err["code"] == "invalid_http"
        # more connections than the cap: the extra ones get 503 at once and are closed; the rest time out
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(80)]
        try:
            refused = 0
            for s in idle[50:]:
                s.settimeout(5)
                data = s.recv(65536)
                refused += data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
            assert refused == 30
        finally:
            for s in idle:
                s.close()
        assert _probe_ms(srv.url) < 2000  # and the server is fine afterwards


def test_uvicorn_options_come_from_one_place(tmp_path: Path) -> None:
    from service.core.settings import Settings
    from service.http.guard import GuardedHttpToolsProtocol
    from service.http.server_config import uvicorn_config

    cfg = uvicorn_config(Settings(bundle=tmp_path, header_timeout_s=3, body_timeout_s=4, keep_alive_timeout_s=2,
                                  max_header_bytes=4096, max_connections=100))
    proto = cfg["http"]
    assert issubclass(proto, GuardedHttpToolsProtocol) and cfg["timeout_keep_alive"] == 2
    assert (proto.header_timeout_s, proto.body_timeout_s, proto.max_header_bytes) == (3, 4, 4096)
    assert proto.max_connections <= 100


@pytest.mark.slow
def test_a_full_disk_keeps_the_connection_and_the_server_serving(bundle: Path, small_disk: Path) -> None:
    """A real server on the full disk: two 507s on one keep-alive connection (a 500 used to close it)."""
    with ServerProcess(bundle, small_disk / "data", small_disk.parent / "server.log") as srv:
        assert httpx.post(srv.url + "/classes/widget/shots", files=_files(SHOTS), timeout=60).status_code == 200
        filler = _fill(small_disk)
        req = httpx.Request("POST", srv.url + "/classes/fresh/shots", files=_files(SHOTS[:2]))
        raw = (f"POST /classes/fresh/shots HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"content-type: {req.headers['content-type']}\r\n"
               f"content-length: {len(req.read())}\r\n\r\n").encode() + req.read()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
            f = s.makefile("rb")
            for _ in range(2):
                s.sendall(raw)
                status = f.readline()
                headers = {}
                while (line := f.readline()) not in (b"\r\n", b""):
                    k, _, v = line.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = json.loads(f.read(int(headers["content-length"])))
                assert status.split()[1] == b"507" and body["error"]["code"] == "insufficient_storage"
                assert headers.get("connection") != "close" and "retry-after" in headers
        assert not (small_disk / "data" / "classes" / "fresh").exists()
        r = httpx.post(srv.url + "/predict", files=_files(TESTS[:1]), data={"class_name": "widget"}, timeout=60)
        assert r.status_code == 200
        filler.unlink()


@pytest.mark.slow
def test_the_sync_sweep_removes_crash_leftovers_of_classes_nobody_is_writing(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.recover()
    _crash_writing(tmp_path, ("half", "shot-a"), ("busy", "shot-b"))
    held, release = threading.Event(), threading.Event()

    def writer() -> None:  # another replica, in the middle of writing "busy"
        with DirectoryStore(tmp_path).lock("busy"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert held.wait(10)
        assert store.sweep() == 1
        assert not (tmp_path / "classes" / "half").exists()
        assert (tmp_path / "classes" / "busy").exists()  # its lock is held: its files are work in progress
    finally:
        release.set()
        t.join()
    assert store.sweep() == 1 and not (tmp_path / "classes" / "busy").exists()
    assert store.sweep() == 0
