"""Web protections (service/http/protections.py): the Host names served, state changes refused from other sites'
pages whatever the key setting, and the strict headers on every answer; in-process, and through HTTP workers (a
real server: the workers check, the engine behind them only adds the headers). The attack from a real browser
page on another origin is tests/service/http/test_console_csrf_browser.py."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.core.settings import Settings
from service.http.protections import CONTENT_SECURITY_POLICY, host_allowed
from sowa.server_process import ServerProcess
from tests.helpers import PARITY
from tests.in_process import InProcess, serve_in_process

SHOTS = sorted(PARITY.glob("shots/*.png"))


def _shots(n: int = 2) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in SHOTS[:n]]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def svc(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcess]:
    """The default: no key at all, the open service the cross-site attack was made on."""
    async with serve_in_process(bundle, tmp_path_factory.mktemp("protections"), warmup=False,
                                sync_interval_s=0) as s:
        yield s


def test_host_names() -> None:
    allowed = Settings(bundle=Path("b")).allowed_hosts
    assert allowed == ["localhost", "127.0.0.1", "::1"]  # the default: loopback names only
    for host in ("localhost", "localhost:8000", "LOCALHOST", "127.0.0.1:9", "[::1]:8000", "10.1.2.3:8000",
                 "[fe80::1]"):
        assert host_allowed(host, allowed), host  # IP addresses always: DNS rebinding needs a name
    for host in ("", "evil.example", "evil.example:8000", "localhost.evil.example", "localhost.", "sowa.test"):
        assert not host_allowed(host, allowed), host
    patterns = ["sowa.example.com", "*.corp.example"]
    assert host_allowed("a.b.corp.example:443", patterns) and not host_allowed("corp.example", patterns)
    assert not host_allowed("evilcorp.example", patterns) and host_allowed("anything", ["*"])


def test_allowed_hosts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOWA_ALLOWED_HOSTS", "Sowa.Example.com, *.corp.example,[::1]")
    assert Settings(bundle=Path("b")).allowed_hosts == ["sowa.example.com", "*.corp.example", "::1"]
    monkeypatch.setenv("SOWA_ALLOWED_HOSTS", " , ")
    with pytest.raises(ValueError, match="at least one name"):
        Settings(bundle=Path("b"))


@pytest.mark.anyio
async def test_other_host_names_are_refused(svc: InProcess) -> None:
    assert (await svc.http.get("/readyz")).status_code == 200  # sowa.test: allowed in tests/in_process.py
    for host in ("rebound.example", "rebound.example:8000", "localhost.rebound.example"):
        r = await svc.http.get("/classes", headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", host
        assert "SOWA_ALLOWED_HOSTS" in r.json()["error"]["message"]
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY  # refusals carry the headers too
    for host in ("10.0.0.7:8000", "[fd00::7]:8000"):  # a probe or a scraper on the pod's address
        assert (await svc.http.get("/healthz", headers={"Host": host})).status_code == 200


@pytest.mark.anyio
async def test_state_changes_from_other_sites_are_refused(svc: InProcess) -> None:
    http = svc.http
    # the console's own requests (same-origin) and clients that are no browser (neither header) change state
    r = await http.post("/classes/mine/shots", files=_shots(), headers={"Sec-Fetch-Site": "same-origin",
                                                                        "Origin": "http://sowa.test"})
    assert r.status_code == 200, r.text
    assert (await http.post("/classes/client/shots", files=_shots())).status_code == 200
    assert (await http.post("/classes/legacy/shots", files=_shots(1),  # an older browser: Origin only
                            headers={"Origin": "http://sowa.test"})).status_code == 200
    before = (await http.get("/classes/mine")).json()
    cross = [{"Sec-Fetch-Site": "cross-site", "Origin": "http://attacker.example"},
             {"Sec-Fetch-Site": "same-site", "Origin": "http://sowa.test:9999"},  # another port of the same host
             {"Origin": "http://attacker.example"}, {"Origin": "null"},  # no Sec-Fetch-Site: Origin decides
             {"Origin": "http://sowa.test:9999"}]
    for headers in cross:
        for method, path, kwargs in (("POST", "/classes/mine/shots", {"files": _shots(1), "data": {"mode": "replace"}}),
                                     ("POST", "/classes/attacker-made/shots", {"files": _shots(1)}),
                                     ("PATCH", "/classes/mine", {"json": {"threshold": 0.9}}),
                                     ("DELETE", "/classes/mine", {})):
            r = await http.request(method, path, headers=headers, **kwargs)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (headers, method, path)
            assert "another site" in r.json()["error"]["message"]
    assert (await http.get("/classes/mine")).json() == before  # not replaced, no threshold, not deleted
    assert (await http.get("/classes/attacker-made")).status_code == 404
    # reading is no state change: a cross-site GET is answered (no CORS header: the page cannot read it)
    r = await http.get("/classes", headers={"Sec-Fetch-Site": "cross-site", "Origin": "http://attacker.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.anyio
async def test_every_answer_carries_the_headers(svc: InProcess) -> None:
    http = svc.http
    for path, cache in (("/ui/", "no-cache"), ("/ui/app.js", "no-cache"), ("/ui/config.json", "no-store"),
                        ("/classes", "no-store"), ("/classes/nothing-here", "no-store"), ("/healthz", "no-store"),
                        ("/openapi.json", "no-store"), ("/no/such/path", "no-store")):
        r = await http.get(path)
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "unsafe-inline" not in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["referrer-policy"] == "no-referrer" and r.headers["cache-control"] == cache, path
        assert len(r.headers.get_list("content-security-policy")) == 1


@pytest.mark.anyio
async def test_api_docs_come_from_the_service_itself(svc: InProcess) -> None:
    http = svc.http
    page = (await http.get("/docs")).text
    assert "ui/vendor/swagger-ui-bundle.js" in page and "ui/docs.js" in page
    assert "http" not in page.replace('lang="en"', "")  # no script or style from another site
    assert "<script>" not in page and "<style" not in page and " style=" not in page  # nothing inline
    for asset in ("/ui/vendor/swagger-ui-bundle.js", "/ui/vendor/swagger-ui.css", "/ui/docs.js"):
        assert (await http.get(asset)).status_code == 200, asset
    assert (await http.get("/redoc")).status_code == 404


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    return raw


@pytest.mark.slow
def test_through_http_workers(bundle: Path, tmp_path: Path) -> None:
    """Workers run the same app factory: they refuse other Hosts and cross-site posts before forwarding, and the
    engine behind them (Host `engine`, on its Unix socket) answers what they forward, with the headers once."""
    with ServerProcess(bundle, tmp_path / "data", tmp_path / "server.log", ["--workers", "2"]) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/classes/widget/shots", files=_shots())  # forwarded to the engine
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store" and len(r.headers.get_list("x-frame-options")) == 1
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        r = c.post("/classes/widget/shots", files=_shots(1), data={"mode": "replace"},
                   headers={"Sec-Fetch-Site": "cross-site", "Origin": "http://attacker.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert c.get("/classes/widget").json()["shots"] == 2
        assert c.get("/classes", headers={"Host": "rebound.example"}).status_code == 400
        assert _raw(srv.port, b"GET /classes HTTP/1.1\r\nHost: localhost\r\nHost: rebound.example\r\n"
                    b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 400")  # two Host headers
        assert c.get("/classes", headers={"Host": f"localhost:{srv.port}"}).status_code == 200
