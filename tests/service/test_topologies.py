"""One predict path: the same requests through one process and through HTTP workers get the same answers.

Both servers run for real (the topology is the point), with an API key, one registered class and small limits,
and every request of the table goes to each. Status codes and error codes must agree, row by row; the rows cover
each error a request can meet on the way (the key, the body limit, routing, validation, the class check before
any decoding, decoding, pixel limits) and the kept-result round trip, whose filename must come back as sent.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from sowa.server_process import ServerProcess
from tests.helpers import PARITY

KEY = "topology-test-key"
SHOTS = sorted(PARITY.glob("shots/*.png"))
TEST = sorted(PARITY.glob("test/*.png"))[0].read_bytes()
ENV = {"SOWA_API_KEY": KEY, "SOWA_MAX_IMAGES_PER_REQUEST": "3", "SOWA_MAX_REQUEST_BYTES": str(2 * 2**20),
       "SOWA_MAX_IMAGE_PIXELS": str(1_000_000), "SOWA_MAX_SHOTS_PER_CLASS": "4"}
H = {"X-API-Key": KEY}


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


BIG = _png(1200, 1000)  # over the 1 Mpx per-image limit, small on the wire


def _img(name: str = "a.png", data: bytes = TEST) -> tuple[str, tuple[str, bytes, str]]:
    return ("images", (name, data, "image/png"))


def _as_is(c: httpx.Client, path: str) -> httpx.Response:
    """GET `path` exactly as written (httpx, like browsers, would resolve its dot segments first; curl's
    --path-as-is does not)."""
    host, port = c.base_url.host, c.base_url.port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {KEY}\r\nConnection: close\r\n\r\n"
                     .encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)


Request = Callable[[httpx.Client], httpx.Response]
# name -> a request; every row answers the same status and error code through both topologies
TABLE: dict[str, Request] = {
    "no key": lambda c: c.post("/predict", files=[_img()]),
    "wrong key": lambda c: c.get("/classes", headers={"X-API-Key": "nope"}),
    "no key, forwarded route": lambda c: c.get("/classes/widget"),
    "no key, large body": lambda c: c.post("/ui/x", content=b"x" * 2**20),
    "body over the limit": lambda c: c.post("/predict", headers=H, files=[_img(data=b"x" * (3 * 2**20))]),
    "no such path": lambda c: c.get("/nope", headers=H),
    "no such method": lambda c: c.put("/predict", headers=H),
    "post to the console": lambda c: c.post("/ui/x", headers=H, content=b"x" * 1000),
    "dot segments": lambda c: _as_is(c, "/ui/../classes"),
    "dot segments in a forwarded route": lambda c: _as_is(c, "/classes/.."),
    "no images": lambda c: c.post("/predict", headers=H, data={"heatmap": "none"}),
    "too many images": lambda c: c.post("/predict", headers=H, files=[_img(f"{i}.png") for i in range(4)]),
    "bad heatmap kind": lambda c: c.post("/predict", headers=H, files=[_img()], data={"heatmap": "jpeg"}),
    "threshold out of range": lambda c: c.post("/predict", headers=H, files=[_img()], data={"threshold": "2"}),
    "malformed class name": lambda c: c.post("/predict", headers=H, files=[_img()], data={"class_name": "Bad!"}),
    "keep without a class": lambda c: c.post("/predict", headers=H, files=[_img()], data={"keep": "true"}),
    # 404 before decoding: the undecodable file would answer 400 had it been decoded
    "unknown class, undecodable file": lambda c: c.post("/predict", headers=H, files=[_img(data=b"not an image")],
                                                         data={"class_name": "nosuch"}),
    "undecodable file": lambda c: c.post("/predict", headers=H, files=[_img(data=b"not an image")]),
    "image over the pixel limit": lambda c: c.post("/predict", headers=H, files=[_img(data=BIG)]),
    "zero-shot": lambda c: c.post("/predict", headers=H, files=[_img()], data={"heatmap": "none"}),
    "against the class": lambda c: c.post("/predict", headers=H, files=[_img()],
                                          data={"class_name": "widget", "heatmap": "raw"}),
    "unknown class": lambda c: c.get("/classes/nosuch", headers=H),
    "delete an unknown class": lambda c: c.delete("/classes/nosuch", headers=H),
    "threshold update out of range": lambda c: c.patch("/classes/widget", headers=H, json={"threshold": 5}),
    "unknown result": lambda c: c.get("/results/nosuch", headers=H),
    "unknown shot": lambda c: c.get("/classes/widget/shots/" + "0" * 64, headers=H),
    "too many results as shots": lambda c: c.post("/classes/widget/shots/from-results", headers=H,
                                                  json={"result_ids": [f"r{i}" for i in range(5)]}),
    "unknown result as a shot": lambda c: c.post("/classes/widget/shots/from-results", headers=H,
                                                 json={"result_ids": ["nosuch"]}),
    "readiness": lambda c: c.get("/readyz"),
}


def _answer(r: httpx.Response) -> tuple[int, str | None]:
    body = r.json() if r.headers.get("content-type") == "application/json" else None
    error = body.get("error") if isinstance(body, dict) else None
    return r.status_code, error.get("code") if isinstance(error, dict) else None


@pytest.fixture(scope="module")
def servers(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("topologies")
    started = {}
    try:
        for name, flags in (("one process", ["--workers", "1"]), ("workers", ["--workers", "2"])):
            srv = ServerProcess(bundle, root / name / "data", root / f"{name}.log", flags, env=ENV)
            (root / name).mkdir()
            started[name] = srv.start()
            files = [("images", (p.name, p.read_bytes(), "image/png")) for p in SHOTS[:2]]
            r = httpx.post(srv.url + "/classes/widget/shots", files=files, headers=H, timeout=60)
            assert r.status_code == 200, r.text
        yield {name: srv.url for name, srv in started.items()}
    finally:
        for srv in started.values():
            srv.stop()


@pytest.mark.slow
def test_every_request_answers_alike_through_one_process_and_workers(servers: dict[str, str]) -> None:
    answers: dict[str, dict[str, tuple[int, str | None]]] = {}
    for topology, url in servers.items():
        with httpx.Client(base_url=url, timeout=60) as c:
            answers[topology] = {row: _answer(request(c)) for row, request in TABLE.items()}
    one, workers = answers["one process"], answers["workers"]
    differ = {row: (one[row], workers[row]) for row in TABLE if one[row] != workers[row]}
    assert not differ, differ
    # and the answers are the right ones, not merely equal
    expected = {"no key": (401, "unauthorized"), "no key, large body": (405, "method_not_allowed"),
                "body over the limit": (413, "payload_too_large"), "no such path": (404, "not_found"),
                "dot segments": (404, "not_found"), "dot segments in a forwarded route": (422, "invalid_request"),
                "unknown class, undecodable file": (404, "class_not_found"),
                "undecodable file": (400, "invalid_image"), "image over the pixel limit": (413, "payload_too_large"),
                "too many results as shots": (422, "invalid_request"),
                "unknown result as a shot": (404, "result_not_found"), "zero-shot": (200, None),
                "against the class": (200, None), "readiness": (200, None)}
    assert {row: one[row] for row in expected} == expected


@pytest.mark.slow
def test_kept_results_come_back_as_sent_through_workers(servers: dict[str, str]) -> None:
    """keep=true through a worker: the kept result lives in the engine, its filename as the client sent it, its
    thumbnail made from the scoring decode, and it can become a shot by its id."""
    names = []
    for url in servers.values():
        with httpx.Client(base_url=url, timeout=60, headers=H) as c:
            r = c.post("/predict", files=[_img('a"b ü.png')], data={"class_name": "widget", "keep": "true",
                                                                    "heatmap": "none"})
            assert r.status_code == 200, r.text
            result = r.json()["results"][0]
            kept = c.get(f"/results/{result['result_id']}").json()
            assert kept["filename"] == result["filename"]  # httpx sends the quote as %22 (HTML's form encoding)
            names.append(kept["filename"])
            assert kept["score"] == result["score"] and kept["image_kept"]
            thumb = Image.open(io.BytesIO(c.get(f"/results/{result['result_id']}/thumbnail").content))
            assert thumb.format == "JPEG" and max(thumb.size) <= 128
            added = c.post("/classes/widget/shots/from-results", json={"result_ids": [result["result_id"]]})
            assert added.status_code == 200, added.text
            assert added.json()["class_info"]["shots"] == 3
    assert names == ["a%22b ü.png"] * 2  # a forwarding re-post had encoded it again: a%2522b
