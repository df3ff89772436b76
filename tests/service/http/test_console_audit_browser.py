"""The console's Audit page in headless Chromium against a real server: an admin sees the changes newest first,
filters them, loads more a page at a time (keyset) and exports them; an inspect key is not offered the page, and
the page says which role it needs; no Content-Security-Policy violation. Skipped without chromium or playwright."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import httpx
import pytest

from sowa.server_process import ServerProcess
from tests.helpers import PARITY

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]

KEY = "audit-browser-admin-key"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
THRESHOLDS = 55  # with the class and the keys, more events than one page of the console's 50


def _page(browser: object, server: ServerProcess, key: str, problems: list[str]) -> object:
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', (e) => window"
                         ".__csp.push(`${e.violatedDirective} ${e.blockedURI}`));")
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.goto(f"{server.url}/ui/")
    page.fill("#key-input", key)
    page.click("#key-submit")
    page.wait_for_selector("main[data-page='classes'][data-loaded='true']")
    return page


def test_the_audit_page_lists_filters_pages_and_exports(bundle: Path, tmp_path: Path) -> None:
    with ServerProcess(bundle, tmp_path / "data", tmp_path / "server.log", env={"SOWA_API_KEY": KEY}) as server, \
            httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as api:
        ops = {"X-API-Key": api.post("/keys", json={"name": "ops", "role": "operate"}).json()["key"]}
        viewer = api.post("/keys", json={"name": "viewer", "role": "inspect"}).json()["key"]
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(PARITY.glob("shots/*.png"))]
        assert api.post("/classes/widget/shots", files=files, headers=ops).status_code == 200
        for i in range(THRESHOLDS):
            assert api.patch("/classes/widget", json={"threshold": 0.5 + i / 1000}, headers=ops).status_code == 200
        total = 2 + 1 + THRESHOLDS
        expect = playwright.expect
        problems: list[str] = []
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = _page(browser, server, KEY, problems)
            expect(page.locator("#audit-link")).to_be_visible()
            page.click("#audit-link")
            page.wait_for_selector("main[data-page='audit'][data-loaded='true']")
            rows = page.locator("#audit tbody tr")
            expect(rows).to_have_count(50)
            first = rows.nth(0)
            assert first.get_attribute("data-action") == "threshold.set"
            assert first.locator("td").nth(1).text_content() == "ops"
            assert "threshold 0.5530 (override) → threshold 0.5540 (override)" in first.text_content()
            page.click("#audit-more")  # the next page, after the last row's id
            expect(rows).to_have_count(total)
            expect(page.locator("#audit-more")).to_be_hidden()
            ids = [rows.nth(i).get_attribute("data-id") for i in range(total)]
            assert ids == sorted(ids, reverse=True) and len(set(ids)) == total
            assert rows.nth(total - 1).get_attribute("data-action") == "key.added"
            assert "new class: 3 shots" in rows.nth(total - 3).text_content()

            page.fill("#audit-actor", "SOWA_API_KEY")
            page.click("#audit-filters button[type='submit']")
            expect(rows).to_have_count(2)
            assert [rows.nth(i).locator("td").nth(3).text_content() for i in range(2)] == ["viewer", "ops"]
            with page.expect_download() as download:
                page.click("#audit-export-csv")
            exported = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            assert [(r["actor"], r["action"], r["target"]) for r in exported] == [
                ("SOWA_API_KEY", "key.added", "viewer"), ("SOWA_API_KEY", "key.added", "ops")]
            assert page.evaluate("window.__csp") == []

            # an inspect key: no link to the page, and the page says which role it needs
            other = _page(browser, server, viewer, problems)
            expect(other.locator("#audit-link")).to_be_hidden()
            other.evaluate("location.hash = '#/audit'")
            other.wait_for_selector("main[data-page='audit'][data-loaded='true']")
            expect(other.locator("main .needs-role")).to_have_text(
                "Reading the audit trail needs the admin role; this key has inspect.")
            assert other.locator("#audit").count() == 0
            assert other.evaluate("window.__csp") == []
            browser.close()
        assert not problems, problems
