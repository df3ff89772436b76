"""The service through its HTTP API: in-process (the app behind httpx's ASGI transport, tests/in_process.py) for
routes, codecs and the registry; a real server process (uvicorn on a loopback port) where the process is the
point: kill -9 and restart, and a client whose socket goes away."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model.inference import predict_files
from service.client import ApiError, SowaClient, decode_raw_heatmap
from sowa.server_process import ServerProcess
from tests.helpers import PARITY, wait_for, wait_for_async
from tests.in_process import InProcess, serve_in_process

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
# the limits the request tests probe, small enough to reach with small images
LIMITS = {"max_wait_ms": 100, "max_batch_size": 8, "max_image_pixels": 200_000, "max_request_pixels": 300_000,
          "max_request_bytes": 2 * 1024 * 1024, "max_images_per_request": 6, "max_shots_per_class": 5}


def _png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
async def svc(bundle: Path, tmp_path: Path) -> AsyncIterator[InProcess]:
    async with serve_in_process(bundle, tmp_path / "data", **LIMITS) as s:
        yield s


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.anyio
async def test_rest_equals_offline_predict(svc: InProcess, bundle: Path) -> None:
    client = svc.client
    await client.register_shots("widget", SHOTS, mode="replace")
    offline = predict_files(bundle, TESTS, SHOTS, device="cpu", batch_size=len(TESTS))
    got = await client.predict(TESTS, class_name="widget", heatmap="raw")
    maps = np.stack([decode_raw_heatmap(r.heatmap) for r in got.results])
    assert maps.dtype == np.float32 and maps.shape == (4, 64, 64)
    assert np.array_equal(maps, offline["anomaly_maps"])
    assert np.array_equal([r.score for r in got.results], offline["scores"])
    assert np.array_equal([r.text_score for r in got.results], offline["text_scores"])
    assert [r.is_anomalous for r in got.results] == offline["is_anomalous"].tolist()
    expected = np.load(PARITY / "expected.npz")
    assert np.abs(maps - expected["kshot_maps"]).max() <= 1e-4
    zero = await client.predict(TESTS, heatmap="raw")
    assert np.abs(np.stack([decode_raw_heatmap(r.heatmap) for r in zero.results]) -
                  expected["zeroshot_maps"]).max() <= 1e-4
    assert all(r.threshold == 0.5 for r in zero.results)


@pytest.mark.anyio
async def test_png_heatmap_and_regions(svc: InProcess) -> None:
    await svc.client.register_shots("widget", SHOTS, mode="replace")
    big = _png((200, 120), seed=3)  # noise, nothing like the shots; not the model size: the heatmap is 200x120
    r = (await svc.client.predict([("part.png", big)], class_name="widget", heatmap="png")).results[0]
    assert r.filename == "part.png" and r.heatmap.format == "png"
    png = Image.open(io.BytesIO(base64.b64decode(r.heatmap.data)))
    assert png.size == (200, 120) and png.mode == "L"
    assert r.is_anomalous and r.regions, "a defective image must come with its regions"
    for region in r.regions:
        x0, y0, x1, y1 = region.box
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 120 and 0 < region.area <= 1
    peaks = [region.peak for region in r.regions]
    assert peaks == sorted(peaks, reverse=True)  # strongest first


@pytest.mark.anyio
async def test_batches_form_under_concurrent_load(svc: InProcess) -> None:
    async def batch_stats() -> tuple[float, float]:
        text = await svc.client.metrics()
        return _metric(text, "sowa_batch_size_count"), _metric(text, "sowa_batch_size_sum")

    before = await batch_stats()
    await asyncio.gather(*(svc.client.predict([_png(seed=i)]) for i in range(24)))
    count, total = (a - b for a, b in zip(await batch_stats(), before, strict=True))
    assert total == 24
    assert count < 24, "no batch held more than one image"
    assert re.search(r'^sowa_requests_total\{endpoint="/predict",status="200"\} \d+', await svc.client.metrics(),
                     re.M)


@pytest.mark.parametrize(("files", "data", "status", "code"), [
    ([("images", ("x.txt", b"hello", "text/plain"))], {}, 400, "invalid_image"),
    ([("images", ("empty.png", b"", "image/png"))], {}, 400, "invalid_image"),
    ([("images", ("cut.png", _png()[:200], "image/png"))], {}, 400, "invalid_image"),
    ([("images", ("huge.png", _png((600, 600)), "image/png"))], {}, 413, "payload_too_large"),
    ([("images", ("a.png", _png(), "image/png"))], {"class_name": "nope"}, 404, "class_not_found"),
    ([("images", ("a.png", _png(), "image/png"))], {"class_name": "../etc"}, 422, "invalid_request"),
    ([("images", ("a.png", _png(), "image/png"))], {"heatmap": "jpeg"}, 422, "invalid_request"),
    ([("images", ("a.png", _png(), "image/png"))] * 7, {}, 422, "invalid_request"),
    ([], {"class_name": "widget"}, 422, "invalid_request"),
])
@pytest.mark.anyio
async def test_bad_predict_inputs(svc: InProcess, files: list, data: dict, status: int, code: str) -> None:
    r = await svc.http.post("/predict", files=files or None, data=data)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert "Traceback" not in r.text
    assert (await svc.http.get("/healthz")).status_code == 200


@pytest.mark.anyio
async def test_too_large_request_and_decompression_bomb(svc: InProcess) -> None:
    http = svc.http
    r = await http.post("/predict", files=[("images", ("big.bin", b"\0" * (3 * 1024 * 1024), "x/y"))])
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # a valid multipart body without Content-Length, counted as it streams
        yield (b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.bin"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(48):
            yield b"\0" * 65536
        yield b"\r\n--xyz--\r\n"

    r = await http.post("/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    two = [("images", (f"{i}.png", _png((400, 400), seed=i), "image/png")) for i in range(2)]  # 320 kpx > 300
    r = await http.post("/predict", files=two)
    assert r.status_code == 413 and "in all" in r.json()["error"]["message"]
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")  # tiny file, 25 Mpx once decoded
    r = await http.post("/predict", files=[("images", ("bomb.png", bomb.getvalue(), "image/png"))])
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_bad_class_requests(svc: InProcess) -> None:
    http, client = svc.http, svc.client
    for name in ("Bad", "-x", "a" * 65, "x y", "..."):
        r = await http.post(f"/classes/{name}/shots", files=[("images", ("a.png", _png(), "image/png"))])
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", name
    r = await http.post("/classes/ok/shots", files=[("images", ("a.png", _png(), "image/png"))],
                        data={"mode": "merge"})
    assert r.status_code == 422
    r = await http.post("/classes/ok/shots", files=[("images", ("a.png", _png(), "image/png"))] * 6)
    assert r.status_code == 422 and "limit of 5" in r.json()["error"]["message"]
    assert (await http.get("/classes/ghost")).status_code == 404
    assert (await http.delete("/classes/ghost")).status_code == 404
    await client.register_shots("widget", SHOTS, mode="replace")
    assert (await http.patch("/classes/widget", json={"threshold": 1.5})).status_code == 422
    assert (await http.patch("/classes/widget", json={"threshold": "high"})).status_code == 422
    r = await http.post("/classes/widget/shots", files=[("images", ("t.txt", b"text", "text/plain"))])
    assert r.status_code == 400 and (await client.get_class("widget")).shots == 3  # a bad upload changes nothing
    # a retried append (same files) adds nothing: a duplicate shot would be its own nearest neighbour
    assert (await client.register_shots("widget", SHOTS, mode="append")).shots == 3


@pytest.mark.anyio
async def test_class_lifecycle(svc: InProcess) -> None:
    client = svc.client
    info = await client.register_shots("gear", SHOTS[:2], mode="replace")
    assert info.shots == 2 and info.bank_vectors == 2 * 64 and not info.threshold_overridden
    assert (await client.register_shots("gear", SHOTS[2:], mode="append")).shots == 3
    assert (await client.register_shots("gear", SHOTS[:1], mode="replace")).shots == 1
    calibrated = (await client.get_class("gear")).calibrated_threshold
    assert (await client.set_threshold("gear", 0.8)).threshold == 0.8
    r = (await client.predict(TESTS[:1], class_name="gear", heatmap="none")).results[0]
    assert r.threshold == pytest.approx(0.8) and r.is_anomalous == (r.score > 0.8)
    restored = await client.set_threshold("gear", None)
    assert restored.threshold == calibrated and not restored.threshold_overridden
    assert "gear" in [c.name for c in await client.list_classes()]
    await client.delete_class("gear")
    with pytest.raises(ApiError) as e:
        await client.get_class("gear")
    assert e.value.status == 404


@pytest.mark.anyio
async def test_openapi_and_docs(svc: InProcess) -> None:
    spec = (await svc.http.get("/openapi.json")).json()
    assert {"/predict", "/classes/{name}/shots", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert (await svc.http.get("/docs")).status_code == 200


async def _hold_engine(s: InProcess) -> tuple[threading.Event, asyncio.Future]:
    """Occupy the engine thread until the returned event is set: what is queued then stays queued."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    holding = asyncio.ensure_future(s.app.state.runtime.engine.call(hold))
    await wait_for_async(held.is_set, 10, "the engine thread is held")
    return release, holding


@pytest.mark.anyio
async def test_queue_full_answers_429(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", max_batch_size=1, max_queue=2, max_wait_ms=0,
                                max_images_per_request=2) as s:
        # the device is held: the first request queued stays counted in the queue, so every later one finds it
        # full, whatever the machine's speed
        release, holding = await _hold_engine(s)
        files = [("images", (f"{i}.png", _png(seed=i), "image/png")) for i in range(2)]
        posts = [asyncio.ensure_future(s.http.post("/predict", files=files, data={"heatmap": "none"}))
                 for _ in range(40)]
        await wait_for_async(lambda: sum(p.done() for p in posts) >= len(posts) - 1, 30,
                             "every request but the queued one answered")
        release.set()
        rs = await asyncio.gather(*posts)
        await holding
        assert all(int(r.headers["Retry-After"]) >= 1 for r in rs if r.status_code == 429)
        statuses = [r.status_code for r in rs]
        assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
        assert set(statuses) <= {200, 429}
        assert (await s.http.get("/readyz")).status_code == 200


@pytest.mark.anyio
async def test_admission_is_decided_before_decoding(bundle: Path, tmp_path: Path) -> None:
    """With the queue full, a request is refused (429) before its images are decoded: overload spends no CPU on
    decoding, so an undecodable file is not even looked at."""
    async with serve_in_process(bundle, tmp_path / "data", max_batch_size=1, max_queue=1, max_wait_ms=0,
                                max_images_per_request=1) as s:
        release, holding = await _hold_engine(s)
        queued = asyncio.ensure_future(s.http.post("/predict", files=[("images", ("0.png", _png(), "image/png"))],
                                                   data={"heatmap": "none"}))
        await wait_for_async(lambda: s.app.state.runtime.batcher.queued_images == 1, 10, "one image queued")
        refused = await s.http.post("/predict", files=[("images", ("bad.png", b"not an image", "image/png"))])
        release.set()
        assert (await queued).status_code == 200
        await holding
        assert refused.status_code == 429, refused.text  # 400 invalid_image if it had been decoded first
        assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["Retry-After"]) >= 1
        bad = await s.http.post("/predict", files=[("images", ("bad.png", b"not an image", "image/png"))])
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"  # with room: decoded


@pytest.mark.slow
def test_classes_survive_kill_9_and_restart(bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = ServerProcess(bundle, data, tmp_path / "log").start()
    try:
        with SowaClient(srv.url) as c:
            c.register_shots("widget", SHOTS)
            c.set_threshold("widget", 0.9)
            before = c.predict(TESTS, class_name="widget", heatmap="raw")
    finally:
        srv.kill()
    srv = ServerProcess(bundle, data, tmp_path / "log").start()
    try:
        with SowaClient(srv.url) as c:
            assert c.get_class("widget").shots == 3 and c.get_class("widget").threshold == 0.9
            after = c.predict(TESTS, class_name="widget", heatmap="raw")
            assert [r.score for r in after.results] == [r.score for r in before.results]
            assert all(a.heatmap.data == b.heatmap.data for a, b in zip(after.results, before.results, strict=True))
    finally:
        srv.stop()


@pytest.mark.anyio
async def test_bank_of_another_bundle_is_rebuilt_and_damage_is_refused(bundle: Path, tmp_path: Path) -> None:
    from model.bundle import init_bundle

    data = tmp_path / "data"
    async with serve_in_process(bundle, data) as s:
        await s.client.register_shots("widget", SHOTS)
        await s.client.register_shots("broken", SHOTS[:2])
    other = tmp_path / "other"
    init_bundle("sowa-tiny", "none", other, seed=9)
    shot = next((data / "classes" / "broken" / "shots").glob("*.png"))
    shot.write_bytes(shot.read_bytes()[:-10])  # damage one stored shot: that class cannot be rebuilt
    async with serve_in_process(other, data) as s:
        ready = await s.client.ready()
        assert ready.ready and "broken" in ready.refused_classes and "hash" in ready.refused_classes["broken"]
        info = await s.client.get_class("widget")  # rebuilt for the new bundle (112 px, 8x8 grid -> 64 patches)
        assert info.shots == 3 and info.bank_vectors == 3 * 64
        assert (await s.client.predict(TESTS[:1], class_name="widget")).model.image_size == 112


@pytest.mark.anyio
async def test_api_key(bundle: Path, tmp_path: Path) -> None:
    key = "s3cret-key-123"
    async with serve_in_process(bundle, tmp_path / "data", api_key=key) as s:
        http = s.http  # sends no key
        files = [("images", ("a.png", _png(), "image/png"))]
        assert (await http.post("/predict", files=files)).status_code == 401
        assert (await http.post("/predict", files=files, headers={"X-API-Key": "wrong-key-000"})).status_code \
            == 401
        assert (await http.get("/classes")).json()["error"]["code"] == "unauthorized"
        assert (await http.get("/openapi.json")).status_code == 401  # every endpoint but health and metrics
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(open_path)).status_code == 200
        async with s.connect(api_key=key) as c:
            assert (await c.predict([_png()])).results[0].threshold == 0.5
            assert await c.list_classes() == []


@pytest.mark.anyio
async def test_banks_beyond_the_device_budget_are_offloaded_and_served_the_same(bundle: Path, tmp_path: Path) -> None:
    # a budget below one bank: every class switch copies a bank in and evicts the previous one
    async with serve_in_process(bundle, tmp_path / "data", bank_device_budget_mb=0.001) as s:
        c = s.client
        await c.register_shots("one", SHOTS)
        await c.register_shots("two", SHOTS[:2])
        offline_one = predict_files(bundle, TESTS, SHOTS, device="cpu", batch_size=len(TESTS))
        offline_two = predict_files(bundle, TESTS, SHOTS[:2], device="cpu", batch_size=len(TESTS))
        for name, offline in [("one", offline_one), ("two", offline_two), ("one", offline_one)]:
            got = await c.predict(TESTS, class_name=name, heatmap="raw")
            assert np.array_equal(np.stack([decode_raw_heatmap(r.heatmap) for r in got.results]),
                                  offline["anomaly_maps"])
        metrics = await c.metrics()
        value = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(sowa_bank_\w+) (\S+)$", metrics, re.M)}
        assert value["sowa_bank_device_budget_bytes"] == 1048
        assert value["sowa_bank_device_resident"] == 1  # the last class used; the other waits on the host
        assert value["sowa_bank_loads_total"] >= 2 and value["sowa_bank_evictions_total"] >= 2


def _as_jpeg(path: Path, size: tuple[int, int] = (100, 90)) -> bytes:
    """A test image as a camera would send it: not at the model size (so it is resized), JPEG-compressed."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _big_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (500, 500), (90, 90, 90)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.anyio
async def test_compiled_server_with_the_device_jpeg_decoder(bundle: Path, tmp_path: Path) -> None:
    # bucket 1 compiles at start-up; a 4-image request is larger than every bucket and runs eagerly
    jpegs = [(f"{p.stem}.jpg", _as_jpeg(p)) for p in TESTS]
    for name, data in jpegs:
        (tmp_path / name).write_bytes(data)
    async with serve_in_process(bundle, tmp_path / "data", ready_timeout=600, compile_mode="default",
                                max_batch_size=1, max_wait_ms=0, image_decoder="torchvision",
                                max_image_pixels=200_000) as s:
        c = s.client
        await c.register_shots("widget", SHOTS)  # PNG shots: the PIL path, as always for banks
        reference = predict_files(bundle, [tmp_path / n for n, _ in jpegs], SHOTS, device="cpu", batch_size=4)
        png_ref = predict_files(bundle, TESTS, SHOTS, device="cpu", batch_size=4)
        one = [await c.predict([TESTS[i]], class_name="widget", heatmap="raw") for i in range(len(TESTS))]
        assert one[0].model.compile == "default"
        compiled_maps = np.stack([decode_raw_heatmap(r.results[0].heatmap) for r in one])
        assert np.abs(compiled_maps - png_ref["anomaly_maps"]).max() <= 1e-4  # compiled, PIL-decoded PNGs
        together = await c.predict(jpegs, class_name="widget", heatmap="raw")  # eager, device-decoded JPEGs
        maps = np.stack([decode_raw_heatmap(r.heatmap) for r in together.results])
        # measured 0.006 on maps reaching 4.6, and 4e-5 on scores (docs/service.md)
        assert np.abs(maps - reference["anomaly_maps"]).max() <= 0.02
        assert np.abs(np.array([r.score for r in together.results]) - reference["scores"]).max() <= 1e-3
        cut = await s.http.post("/predict", files=[("images", ("cut.jpg", jpegs[0][1][:300], "image/jpeg"))])
        assert cut.status_code == 400 and cut.json()["error"]["code"] == "invalid_image"
        big = await s.http.post("/predict", files=[("images", ("big.jpg", _big_jpeg(), "image/jpeg"))])
        assert big.status_code == 413 and "big.jpg: image has 500x500 = 250000 pixels" in big.json()["error"]["message"]


@pytest.mark.slow
def test_a_client_that_leaves_while_queued_never_reaches_the_device(bundle: Path, tmp_path: Path) -> None:
    # a real socket that closes: a batch waits 3 s to fill, the client gives up after 0.5 s, long before its
    # image could reach the device
    flags = ["--max-batch-size", "8", "--max-wait-ms", "3000"]
    with ServerProcess(bundle, tmp_path / "data", tmp_path / "log", flags) as srv, SowaClient(srv.url) as c:
        batches = _metric(c.metrics(), "sowa_batch_size_count")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/predict", files=[("images", ("a.png", _png(), "image/png"))], timeout=0.5)
        closed = r'^sowa_requests_total\{endpoint="/predict",status="499"\} 1\.0$'
        wait_for(lambda: re.search(closed, c.metrics(), re.M), 10, "the request counted as client-closed (499)")
        # the batcher lets go of the request (the queue empties) once its batch window closes: had it run, the
        # batch would be counted by then
        wait_for(lambda: _metric(c.metrics(), "sowa_queue_depth") == 0, 10, "the dropped request left the queue")
        assert _metric(c.metrics(), "sowa_batch_size_count") == batches
        assert _metric(c.metrics(), "sowa_images_total") == 0
        assert c.predict([_png()], heatmap="none").results[0].threshold == 0.5  # and the server carries on
