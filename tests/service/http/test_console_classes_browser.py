"""The console's class table with many classes, in a real browser (headless Chromium via Playwright, as
test_console_browser.py): a page of rows costs one request, however many classes there are, and "Show more" walks
the rest. Before, the table asked for each class's kept results, shot list and first shot: 1 + 3 requests a class.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from model.bundle import init_bundle
from sowa.demo import ARCH
from sowa.server_process import ServerProcess

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLASSES = 120  # pages of 50 rows: 50, 100, 120


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("console-classes")
    init_bundle(ARCH, "none", tmp / "bundle", seed=0, force=True)
    with ServerProcess(tmp / "bundle", tmp / "data", tmp / "server.log") as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as api:
            for i in range(CLASSES):
                r = api.post(f"/classes/part-{i:03d}/shots", files=[("images", ("s.png", _png(i), "image/png"))])
                assert r.status_code == 200, r.text
            r = api.post("/predict", data={"class_name": "part-001", "keep": "true"},
                         files=[("images", ("p.png", _png(999), "image/png"))])
            assert r.status_code == 200, r.text
        yield srv


def test_the_class_table_costs_one_request_a_page(server: ServerProcess) -> None:
    problems: list[str] = []
    requests: list[str] = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        page.on("request", lambda r: requests.append(r.url.removeprefix(server.url)))
        expect = playwright.expect
        page.goto(f"{server.url}/ui/#/classes")
        page.wait_for_selector("main[data-page='classes'][data-loaded='true']")
        rows = page.locator("table.classes tbody tr")
        expect(rows).to_have_count(50)
        expect(page.locator("#classes-count")).to_have_text(f"50 of {CLASSES} shown")
        expect(page.locator("tr[data-class='part-000'] .shot-thumb")).to_have_count(1)
        expect(page.locator("tr[data-class='part-001'] .thumbs img")).to_have_count(1)  # its kept result
        for shown in (100, CLASSES):
            page.click("#more-classes")
            expect(rows).to_have_count(shown)
        expect(page.locator("#more-classes")).to_be_hidden()
        assert page.locator("tbody tr th span").all_inner_texts() == [f"part-{i:03d}" for i in range(CLASSES)]
        api_calls = [u for u in requests if u.startswith("/classes")]
        assert len(api_calls) == 3, api_calls  # one a page; none per class
        assert all(u.startswith("/classes?limit=50&recent=4&thumbnails=true") for u in api_calls)
        browser.close()
    assert not problems, problems
