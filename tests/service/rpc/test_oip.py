"""The Open Inference Protocol v2, driven by Triton's own clients (tritonclient, unmodified, from PyPI) against a
real server (`sowa serve --grpc-port`): health, metadata, infer over HTTP (binary tensors) and gRPC (unary and
streaming), and the protocol's errors for bad input, never a 5xx. Every number equals /predict's for the same
images.

Only tritonclient's protobuf messages are loaded in this process: the server's (service/rpc/proto) register the
same `inference.*` names and live in the server's process.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from sowa.server_process import ServerProcess, free_port
from tests.helpers import PARITY

KEY = "oip-test-key-123"
H = {"X-API-Key": KEY}  # passed as copies: tritonclient adds its own headers to the dict it is given
G = {"x-api-key": KEY}
SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
# a small queue (one request of three fills it) and one image a batch: admission is reachable, numbers exact
ENV = {"SOWA_API_KEY": KEY, "SOWA_MAX_IMAGES_PER_REQUEST": "3", "SOWA_MAX_REQUEST_BYTES": str(2**20),
       "SOWA_MAX_IMAGE_PIXELS": str(1_000_000), "SOWA_MAX_QUEUE": "3", "SOWA_MAX_BATCH_SIZE": "1",
       "SOWA_MAX_WAIT_MS": "0", "SOWA_AUTH_FAILURES_PER_MINUTE": "1000"}
SCORES = ("score", "normalized_score", "threshold", "text_score")


class Server:
    def __init__(self, proc: ServerProcess, grpc_port: int) -> None:
        self.proc, self.grpc_port = proc, grpc_port
        self.http_url = proc.url.removeprefix("http://")
        self.grpc_url = f"127.0.0.1:{grpc_port}"

    def http(self) -> th.InferenceServerClient:
        return th.InferenceServerClient(self.http_url, connection_timeout=30, network_timeout=60)

    def grpc(self) -> tg.InferenceServerClient:
        return tg.InferenceServerClient(self.grpc_url)


def _start(bundle: Path, root: Path, flags: list[str]) -> Server:
    grpc_port = free_port()
    proc = ServerProcess(bundle, root / "data", root / "server.log", [*flags, "--grpc-port", str(grpc_port)],
                         env=ENV).start()
    try:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in SHOTS[:2]]
        r = httpx.post(proc.url + "/classes/widget/shots", files=files, headers={**H}, timeout=60)
        assert r.status_code == 200, r.text
    except BaseException:
        proc.stop()  # a failed start leaves no server behind
        raise
    return Server(proc, grpc_port)


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = _start(bundle, tmp_path_factory.mktemp("oip"), ["--workers", "1"])
    try:
        yield s
    finally:
        s.proc.stop()


def _predict(s: Server, paths: list[Path], **form: str) -> list[dict]:
    r = httpx.post(s.proc.url + "/predict", headers={**H}, files=[("images", (p.name, p.read_bytes(), "image/png"))
                                                             for p in paths], data={"heatmap": "raw", **form},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _raw_map(result: dict) -> np.ndarray:
    import base64

    hm = result["heatmap"]
    return np.frombuffer(base64.b64decode(hm["data"]), dtype="<f4").reshape(hm["shape"])


def _images(mod: Any, paths: list[Path]) -> Any:
    t = mod.InferInput("images", [len(paths)], "BYTES")
    t.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=np.object_))
    return t


def _pixels(mod: Any, paths: list[Path]) -> Any:
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    t = mod.InferInput("pixels", list(arrays.shape), "UINT8")
    t.set_data_from_numpy(arrays)
    return t


def _outputs(mod: Any, names: tuple[str, ...]) -> list:
    return [mod.InferRequestedOutput(n) for n in names]


def _same(result: Any, expected: list[dict], with_map: bool = False) -> None:
    for name in SCORES:
        got = result.as_numpy(name)
        assert got.shape == (len(expected),) and got.dtype == np.float64
        np.testing.assert_allclose(got, [e[name] for e in expected], rtol=0, atol=1e-6)
    assert result.as_numpy("is_anomalous").tolist() == [e["is_anomalous"] for e in expected]
    if with_map:
        maps = result.as_numpy("anomaly_map")
        assert maps.dtype == np.float32 and maps.shape == (len(expected), 64, 64)
        for m, e in zip(maps, expected, strict=True):
            np.testing.assert_allclose(m, _raw_map(e), rtol=0, atol=1e-6)


def test_health_and_metadata_over_both_transports(server: Server) -> None:
    h, g = server.http(), server.grpc()
    assert h.is_server_live() and h.is_server_ready()  # open, as /healthz and /readyz
    assert g.is_server_live() and g.is_server_ready()
    for meta in (h.get_server_metadata(headers={**H}), g.get_server_metadata(headers={**G}, as_json=True)):
        assert meta["name"] == "sowa" and "binary_tensor_data" in meta["extensions"]
    assert h.is_model_ready("widget", headers={**H}) and g.is_model_ready("widget", headers={**G})
    assert h.is_model_ready("zero-shot", headers={**H}) and g.is_model_ready("zero-shot", headers={**G})
    assert not h.is_model_ready("nosuch", headers={**H})
    for meta in (h.get_model_metadata("widget", headers={**H}),
                 g.get_model_metadata("widget", headers={**G}, as_json=True)):
        assert meta["name"] == "widget" and meta["platform"] == "sowa"
        assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("images", "BYTES"), ("pixels", "UINT8")]
        outputs = {o["name"]: (o["datatype"], [int(d) for d in o["shape"]]) for o in meta["outputs"]}
        assert outputs["score"] == ("FP64", [-1]) and outputs["anomaly_map"] == ("FP32", [-1, 64, 64])
        assert outputs["is_anomalous"] == ("BOOL", [-1])
    index = h.get_model_repository_index(headers={**H})
    assert [(m["name"], m["state"]) for m in index] == [("zero-shot", "READY"), ("widget", "READY")]


@pytest.mark.parametrize("model", ["widget", "zero-shot"])
def test_infer_over_both_transports_equals_predict(server: Server, model: str) -> None:
    paths = TESTS[:3]
    expected = _predict(server, paths, **({"class_name": model} if model != "zero-shot" else {}))
    with_map = (*SCORES, "is_anomalous", "anomaly_map")
    for mod, client, headers in ((th, server.http(), H), (tg, server.grpc(), G)):
        # encoded images, the default outputs (HTTP: all binary)
        _same(client.infer(model, [_images(mod, paths)], headers={**headers}), expected)
        # raw pixels, the map asked for
        _same(client.infer(model, [_pixels(mod, paths)], outputs=_outputs(mod, with_map), headers={**headers}),
              expected, with_map=True)
    # HTTP with JSON outputs (binary_data=False) says the same
    plain = [th.InferRequestedOutput(n, binary_data=False) for n in SCORES]
    _same_scores = server.http().infer(model, [_images(th, paths)], outputs=plain, headers={**H})
    for name in SCORES:
        np.testing.assert_allclose(_same_scores.as_numpy(name), [e[name] for e in expected], rtol=0, atol=1e-6)


def test_the_threshold_parameter_is_predicts(server: Server) -> None:
    paths = TESTS[:2]
    expected = _predict(server, paths, class_name="widget", threshold="0.3")
    _same(server.http().infer("widget", [_images(th, paths)], parameters={"threshold": 0.3}, headers={**H}), expected)
    _same(server.grpc().infer("widget", [_images(tg, paths)], parameters={"threshold": 0.3}, headers={**G}), expected)


def test_images_of_a_class_are_recorded_with_the_protocols_parameters(server: Server) -> None:
    meta = {"part_id": "P-0042", "station": "cam-2", "tags": "oip,line-3"}
    http = server.http().infer("widget", [_images(th, TESTS[:2])], parameters=meta, headers={**H})
    over_grpc = server.grpc().infer("widget", [_images(tg, TESTS[:1])], parameters=meta, headers={**G})
    ids = [i.decode() for i in (*http.as_numpy("record_id"), *over_grpc.as_numpy("record_id"))]
    assert len(set(ids)) == 3 and all(ids)
    for record_id in ids:
        record = httpx.get(f"{server.proc.url}/records/{record_id}", headers=H, timeout=30).json()
        assert (record["class_name"], record["part_id"], record["station"]) == ("widget", "P-0042", "cam-2")
        assert record["tags"] == ["oip", "line-3"]
    # record=false, and zero-shot (no inspection): no record, so no record_id among the outputs
    assert server.grpc().infer("widget", [_images(tg, TESTS[:1])], parameters={"record": False},
                               headers={**G}).as_numpy("record_id") is None
    assert server.http().infer("zero-shot", [_images(th, TESTS[:1])], headers={**H}).as_numpy("record_id") is None
    bad = server.http()
    status, message = _http_error(lambda: bad.infer("widget", [_images(th, TESTS[:1])],
                                                    parameters={"tags": "<script>"}, headers={**H}))
    assert status == "422" and "tag" in message


def test_a_stream_answers_each_request_in_order_and_goes_on_after_an_error(server: Server) -> None:
    expected = {p.name: _predict(server, [p], class_name="widget")[0] for p in TESTS[:3]}
    answers: queue.Queue = queue.Queue()
    client = server.grpc()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers={**G})
    try:
        plan = [("widget", TESTS[0]), ("nosuch", TESTS[1]), ("widget", TESTS[1]), ("widget", TESTS[2])]
        for i, (model, path) in enumerate(plan):
            client.async_stream_infer(model, [_images(tg, [path])], request_id=str(i))
        got = [answers.get(timeout=60) for _ in plan]
    finally:
        client.stop_stream()
        client.close()
    assert got[1][0] is None and "nosuch" in got[1][1].message()
    for (model, path), (result, error) in zip(plan, got, strict=True):
        if model == "widget":
            assert error is None
            _same(result, [expected[path.name]])


def _http_error(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


def _raw_infer(s: Server, model: str, body: bytes, header_length: int | None = None,
               headers: dict | None = None) -> httpx.Response:
    extra = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return httpx.post(f"{s.proc.url}/v2/models/{model}/infer", content=body, headers={**H, **extra,
                                                                                     **(headers or {})}, timeout=60)


def _binary(inputs: list[dict], data: bytes) -> tuple[bytes, int]:
    head = json.dumps({"inputs": inputs}).encode()
    return head + data, len(head)


def _bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


PNG = TESTS[0].read_bytes()


def _png(w: int, h: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


BIG = _png(1200, 1000)  # over the 1 Mpx per-image limit, small on the wire
# name -> (body, header length), the status the service answers and a word its message holds
HTTP_PROBES: dict[str, tuple[bytes, int | None, int, str]] = {
    "not JSON": (b"{nope", None, 422, "JSON"),
    "not an object": (b"[1, 2]", None, 422, "object"),
    "no inputs": (b'{"inputs": []}', None, 422, "exactly one"),
    "two inputs": (*_binary([{"name": "images", "datatype": "BYTES", "shape": [1],
                              "parameters": {"binary_data_size": len(_bytes_tensor(PNG))}}] * 2,
                            _bytes_tensor(PNG) * 2), 422, "exactly one"),
    "header length past the body": (b'{"inputs": []}', 10_000, 422, "Inference-Header-Content-Length"),
    "header length not a number": (b'{"inputs": []}', None, 422, "Inference-Header-Content-Length"),
    "wrong datatype": (*_binary([{"name": "images", "datatype": "FP32", "shape": [1],
                                  "parameters": {"binary_data_size": 4}}], b"\0" * 4), 422, "datatype"),
    "wrong rank": (*_binary([{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2],
                              "parameters": {"binary_data_size": 12}}], b"\0" * 12), 422, "shape"),
    "four channels": (*_binary([{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 4],
                                 "parameters": {"binary_data_size": 16}}], b"\0" * 16), 422, "shape"),
    "negative shape": (*_binary([{"name": "images", "datatype": "BYTES", "shape": [-1],
                                  "parameters": {"binary_data_size": 0}}], b""), 422, "shape"),
    "huge shape, little data": (*_binary([{"name": "pixels", "datatype": "UINT8", "shape": [1, 10**9, 10**9, 3],
                                           "parameters": {"binary_data_size": 12}}], b"\0" * 12), 422, "bytes"),
    "shape and data disagree": (*_binary([{"name": "images", "datatype": "BYTES", "shape": [2],
                                           "parameters": {"binary_data_size": len(_bytes_tensor(PNG))}}],
                                         _bytes_tensor(PNG)), 422, "elements"),
    "element length past the data": (*_binary([{"name": "images", "datatype": "BYTES", "shape": [1],
                                                "parameters": {"binary_data_size": 8}}],
                                              (10**6).to_bytes(4, "little") + b"abcd"), 422, "runs past"),
    "bytes after the tensors": (*_binary([{"name": "images", "datatype": "BYTES", "shape": [1],
                                           "parameters": {"binary_data_size": len(_bytes_tensor(PNG))}}],
                                         _bytes_tensor(PNG) + b"xx"), 422, "after"),
    "too many images": (*_binary([{"name": "images", "datatype": "BYTES", "shape": [4],
                                   "parameters": {"binary_data_size": len(_bytes_tensor(PNG) * 4)}}],
                                 _bytes_tensor(PNG) * 4), 422, "limit"),
    "undecodable bytes": (*_binary([{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 16}}], _bytes_tensor(b"not an image")),
                          400, "images[0]"),
    "image over the pixel limit": (*_binary([{"name": "images", "datatype": "BYTES", "shape": [1],
                                              "parameters": {"binary_data_size": len(_bytes_tensor(BIG))}}],
                                            _bytes_tensor(BIG)), 413, "images[0]"),
    "JSON pixels out of range": (json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3],
                                                         "data": [1, 2, 300]}]}).encode(), None, 422, "0..255"),
    "unknown parameter": (json.dumps({"inputs": [], "parameters": {"thresold": 0.3}}).encode(), None, 422,
                          "thresold"),
    "unknown output": (json.dumps({"inputs": [], "outputs": [{"name": "heatmap"}]}).encode(), None, 422,
                       "unknown output"),
    "data nested too deep": (json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3],
                                                     "data": [[[[[[[[[[1]]]]]]]]]]}]}).encode(), None, 422, "deeper"),
}


def test_bad_input_over_http_answers_the_protocols_error(server: Server) -> None:
    failures = []
    for name, (body, header_length, status, word) in HTTP_PROBES.items():
        headers = {"Inference-Header-Content-Length": "x1"} if name == "header length not a number" else None
        r = _raw_infer(server, "zero-shot", body, header_length, headers)
        ok = r.status_code == status and set(r.json()) == {"error"} and word in r.json()["error"]
        if not ok:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    # the body limit, an unknown model (before the tensors are read), a model version, no key, a wrong key
    big = _raw_infer(server, "zero-shot", b"x" * (2**20 + 1))
    assert big.status_code == 413 and "larger" in big.json()["error"]
    body, n = _binary([{"name": "images", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": 16}}], _bytes_tensor(b"not an image"))
    assert _raw_infer(server, "nosuch", body, n).status_code == 404
    assert _raw_infer(server, "Bad Name!", body, n).status_code == 404
    r = httpx.post(f"{server.proc.url}/v2/models/zero-shot/versions/2/infer", content=body,
                   headers={**H, "Inference-Header-Content-Length": str(n)})
    assert r.status_code == 404 and "version" in r.json()["error"]
    for headers in ({}, {"X-API-Key": "wrong-key-123"}):
        r = httpx.post(f"{server.proc.url}/v2/models/zero-shot/infer", content=body, headers={**headers})
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong X-API-Key"}
    assert httpx.get(f"{server.proc.url}/v2", timeout=10).status_code == 401
    # Triton's client reads the protocol's error
    status, message = _http_error(lambda: server.http().infer("nosuch", [_images(th, TESTS[:1])], headers={**H}))
    assert status == "404" and "nosuch" in message
    assert server.proc.proc is not None and server.proc.proc.poll() is None


def _grpc_stub(s: Server) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(s.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _request(model: str = "zero-shot", name: str = "images", datatype: str = "BYTES", shape: tuple = (1,),
             raw: list[bytes] | None = None, **fields: Any) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    request.raw_input_contents.extend(raw if raw is not None else [_bytes_tensor(PNG)])
    return request


def test_bad_input_over_grpc_answers_status_codes(server: Server) -> None:
    channel, stub = _grpc_stub(server)
    meta = tuple(G.items())
    c = grpc.StatusCode
    probes = {
        "wrong datatype": (_request(datatype="FP32", raw=[b"\0" * 4]), c.INVALID_ARGUMENT, "datatype"),
        "wrong shape": (_request(name="pixels", datatype="UINT8", shape=(1, 2, 2), raw=[b"\0" * 12]),
                        c.INVALID_ARGUMENT, "shape"),
        "shape and data disagree": (_request(shape=(2,)), c.INVALID_ARGUMENT, "elements"),
        "raw contents for no input": (_request(raw=[b"a", b"b"]), c.INVALID_ARGUMENT, "raw_input_contents"),
        "too many images": (_request(shape=(4,), raw=[_bytes_tensor(PNG) * 4]), c.INVALID_ARGUMENT, "limit"),
        "undecodable bytes": (_request(raw=[_bytes_tensor(b"not an image")]), c.INVALID_ARGUMENT, "images[0]"),
        "image over the pixel limit": (_request(raw=[_bytes_tensor(BIG)]), c.INVALID_ARGUMENT, "images[0]"),
        "message over the limit": (_request(name="pixels", datatype="UINT8", shape=(1, 1, 400_000, 3),
                                           raw=[b"\0" * 1_200_000]), c.RESOURCE_EXHAUSTED, "larger than"),
        "unknown model": (_request(model="nosuch"), c.NOT_FOUND, "nosuch"),
        "unknown version": (_request(model_version="7"), c.NOT_FOUND, "version"),
        "unknown parameter": (_request(parameters={"thresold": service_pb2.InferParameter(double_param=0.3)}),
                              c.INVALID_ARGUMENT, "thresold"),
        "threshold out of range": (_request(parameters={"threshold": service_pb2.InferParameter(double_param=3)}),
                                   c.INVALID_ARGUMENT, "threshold"),
    }
    failures = []
    try:
        for name, (request, code, word) in probes.items():
            try:
                stub.ModelInfer(request, metadata=meta, timeout=60)
                failures.append(f"{name}: answered")
            except grpc.RpcError as e:
                if e.code() != code or word not in (e.details() or ""):
                    failures.append(f"{name}: {e.code()} {e.details()}")
        for metadata, code in (((), c.UNAUTHENTICATED), ((("x-api-key", "wrong-key-123"),), c.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(_request(), metadata=metadata, timeout=60)
            assert e.value.code() == code
        ok = stub.ModelInfer(_request(), metadata=meta, timeout=60)
        assert [o.name for o in ok.outputs][:2] == ["score", "normalized_score"]
    finally:
        channel.close()
    assert not failures, "\n".join(failures)
    status, message = _http_error(lambda: server.grpc().infer("nosuch", [_images(tg, TESTS[:1])], headers={**G}))
    assert status == "StatusCode.NOT_FOUND" and "nosuch" in message
    assert server.proc.proc is not None and server.proc.proc.poll() is None


def test_a_full_queue_answers_resource_exhausted_and_429(server: Server) -> None:
    """One request of three images fills the queue (max_queue 3): of many at once, some are refused."""
    paths = TESTS[:3]

    def over_grpc(_: int) -> str:
        try:
            server.grpc().infer("zero-shot", [_images(tg, paths)], headers={**G})
            return "ok"
        except InferenceServerException as e:
            return e.status()

    def over_http(_: int) -> tuple[int, str | None]:
        body, n = _binary([{"name": "images", "datatype": "BYTES", "shape": [3],
                            "parameters": {"binary_data_size": len(_bytes_tensor(*(p.read_bytes() for p in paths)))}}],
                          _bytes_tensor(*(p.read_bytes() for p in paths)))
        r = _raw_infer(server, "zero-shot", body, n)
        return r.status_code, r.headers.get("Retry-After")

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(over_grpc, range(32)))
        answers = list(pool.map(over_http, range(32)))
    assert set(statuses) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"} and "StatusCode.RESOURCE_EXHAUSTED" in statuses
    assert {s for s, _ in answers} <= {200, 429} and any(s == 429 for s, _ in answers)
    assert all(int(retry) >= 1 for s, retry in answers if s == 429)


def test_requests_are_counted_in_the_metrics(server: Server) -> None:
    server.grpc().infer("zero-shot", [_images(tg, TESTS[:1])], headers={**G})
    text = httpx.get(server.proc.url + "/metrics", headers={**H}, timeout=30).text
    assert 'sowa_requests_total{endpoint="grpc:ModelInfer",status="200"}' in text
    assert 'endpoint="/v2/models/{model_name}/infer"' in text


@pytest.mark.slow
def test_with_http_workers_each_worker_speaks_v2_and_grpc_feeds_the_engine(
        bundle: Path, tmp_path: Path) -> None:
    s = _start(bundle, tmp_path, ["--workers", "2"])
    try:
        paths = TESTS[:2]
        expected = _predict(s, paths, class_name="widget")
        for _ in range(3):  # whichever worker answers
            _same(s.http().infer("widget", [_images(th, paths)], headers={**H}), expected)
        _same(s.grpc().infer("widget", [_images(tg, paths)], headers={**G}), expected)
        assert [m["name"] for m in s.http().get_model_repository_index(headers={**H})] == ["zero-shot", "widget"]
        r = _raw_infer(s, "zero-shot", b"{nope")
        assert r.status_code == 422 and set(r.json()) == {"error"}
    finally:
        s.proc.stop()
