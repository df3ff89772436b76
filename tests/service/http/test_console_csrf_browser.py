"""The web attacks of issue 20 from a real browser (headless Chromium via Playwright, as test_console_browser.py),
against a real server: a page on another local origin posts multipart forms to the service (no key set, the
default) and frames the console; the API page under the Content-Security-Policy; and the console showing only what
an inspect or an operate key may do, saying why the rest is missing.
"""

from __future__ import annotations

import base64
import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.bundle import init_bundle
from sowa.demo import ARCH
from sowa.server_process import ServerProcess, free_port
from tests.helpers import PARITY

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
ADMIN = "csrf-browser-admin-key"
# collects the policy's violation reports from the first script on: the console's own code cannot hide one
WATCH_CSP = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`));")


def _files(n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in SHOTS[:n]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("csrf-bundle") / "bundle"
    init_bundle(ARCH, "none", out, seed=0, force=True)  # what `sowa demo` serves
    return out


@pytest.fixture(scope="module")
def open_server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No key configured or stored: the service's default, where the attack was made."""
    tmp = tmp_path_factory.mktemp("csrf-open")
    with ServerProcess(bundle, tmp / "data", tmp / "server.log") as srv:
        yield srv


def _attack_page(target: str) -> str:
    """What a page of another site can do without any CORS permission: multipart posts (no preflight) and a frame."""
    shot = base64.b64encode(SHOTS[0].read_bytes()).decode()
    return f"""<!doctype html><html><body><h1>Win a prize</h1>
<iframe id="framed" src="{target}/ui/" width="800" height="400"></iframe>
<script>
const png = Uint8Array.from(atob("{shot}"), (c) => c.charCodeAt(0));
async function post(path, mode) {{
  const form = new FormData();
  form.append("images", new Blob([png], {{ type: "image/png" }}), "evil.png");
  if (mode) form.append("mode", mode);
  try {{ await fetch("{target}" + path, {{ method: "POST", body: form, mode: "no-cors", credentials: "include" }}); }}
  catch (e) {{ /* the answer is opaque either way */ }}
}}
Promise.all([post("/classes/victim/shots", "replace"), post("/classes/attacker-made/shots", "")])
  .then(() => {{ document.title = "sent"; }});
</script></body></html>"""


@pytest.fixture
def attacker(tmp_path: Path, open_server: ServerProcess) -> Iterator[int]:
    """A second local web server on its own port: the attacker's site."""
    (tmp_path / "index.html").write_text(_attack_page(open_server.url))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("attacker_host", ["localhost", "127.0.0.1"])  # another site; the same site, another port
def test_another_sites_page_changes_nothing(open_server: ServerProcess, attacker: int, attacker_host: str) -> None:
    api = httpx.Client(base_url=open_server.url, timeout=60)
    assert api.post("/classes/victim/shots", files=_files(3)).status_code == 200  # a client: no browser headers
    before = api.get("/classes/victim").json()
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"http://{attacker_host}:{attacker}/index.html")
        page.wait_for_function("document.title === 'sent'", timeout=60_000)
        assert api.get("/classes/victim").json() == before  # its shots were not replaced
        assert api.get("/classes/attacker-made").status_code == 404  # no class appeared
        framed = page.frame_locator("#framed")
        # frame-ancestors 'none': the console is not shown (Chrome's own error page stands in)
        playwright.expect(framed.get_by_text("SOWA inspection console")).to_have_count(0)
        browser.close()
    api.delete("/classes/victim")


def test_api_page_works_under_the_policy(open_server: ServerProcess) -> None:
    problems: list[str] = []
    requests: list[str] = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.add_init_script(WATCH_CSP)
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"{open_server.url}/docs")
        playwright.expect(page.locator(".opblock-summary-path[data-path='/predict']")).to_have_count(1,
                                                                                                  timeout=30_000)
        problems += page.evaluate("window.__csp")
        browser.close()
    assert not problems, problems
    assert all(u.startswith((open_server.url, "data:")) for u in requests), requests  # nothing from a CDN


@pytest.fixture(scope="module")
def keyed(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """A service with keys: an admin's, and an inspect and an operate key added by it over POST /keys."""
    tmp = tmp_path_factory.mktemp("csrf-keyed")
    with ServerProcess(bundle, tmp / "data", tmp / "server.log", env={"SOWA_API_KEY": ADMIN}) as srv, \
            httpx.Client(base_url=srv.url, timeout=60, headers={"X-API-Key": ADMIN}) as api:
        assert api.post("/classes/part/shots", files=_files(3)).status_code == 200
        keys = {}
        for role in ("inspect", "operate"):
            r = api.post("/keys", json={"name": f"console-{role}", "role": role})
            assert r.status_code == 201, r.text
            keys[role] = r.json()["key"]
        yield srv, keys


@pytest.mark.parametrize("role", ["inspect", "operate"])
def test_console_shows_what_the_key_may_do(keyed: tuple[ServerProcess, dict[str, str]], role: str) -> None:
    srv, keys = keyed
    problems: list[str] = []
    operate = role == "operate"
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.add_init_script(WATCH_CSP)
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        expect = playwright.expect

        def goto(hash_: str) -> None:
            page.evaluate(f"location.hash = {hash_!r}")
            page.wait_for_selector(f"main[data-page='{hash_.split('/')[1]}'][data-loaded='true']")

        def missing(selector: str, needs: str = "operate") -> None:
            if operate:
                expect(page.locator(selector)).to_have_count(1)
            else:
                expect(page.locator(selector)).to_have_count(0)
                expect(page.locator(f".needs-role[data-needs='{needs}']").first).to_contain_text(
                    f"needs the {needs} role; this key has inspect")

        page.goto(f"{srv.url}/ui/")
        page.fill("#key-input", keys[role])
        page.click("#key-submit")
        page.wait_for_selector("main[data-page='classes'][data-loaded='true']")
        expect(page.locator("#whoami")).to_have_text(f"key console-{role}: {role}")
        missing("#new-class")
        goto("#/class/part")
        missing("#register")
        missing("#delete-shots")
        goto("#/inspect/part")
        page.set_input_files("#inspect-files", [str(TESTS[0])])
        expect(page.locator(".card")).to_have_count(1, timeout=60_000)  # inspecting is every key's
        missing(".mark-good")
        goto("#/threshold/part")
        missing("#save")
        missing("#reset")
        problems += page.evaluate("window.__csp")
        browser.close()
    assert not problems, problems
