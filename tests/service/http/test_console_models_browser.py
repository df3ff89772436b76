"""The console's Models page in headless Chromium against a real server with an API key and two model versions (the
session's bundle, and a 96 px one added to the server's repository): an admin sees both, v1 serving; shadows v2 on
every request and reads its report (the same figures as the API's, a disagreement opening its record); activates
v2, following its preparation to "serving"; rolls back to v1. An inspect key sees the versions and no button. The
audit page names the model changes; no Content-Security-Policy violation. Skipped without chromium or playwright."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from model.bundle import read_manifest
from service.core.models.open import open_repository
from sowa.server_process import ServerProcess
from tests.helpers import PARITY, wait_for
from tests.service.http.test_console_browser import snap
from tests.service.test_model_versions import make_bundle

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]

KEY = "models-browser-admin-key"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
REQUESTS = 3  # of every test image: 12 images the shadow scores


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _page(browser: object, server: ServerProcess, key: str, problems: list[str], questions: list[str],
          accept: list[bool]) -> object:
    """The console on #/models with `key`; each confirm() is noted in `questions`, and accepted while accept[0]."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', (e) => window"
                         ".__csp.push(`${e.violatedDirective} ${e.blockedURI}`));")
    # a shadow's report is 404 until its classes are prepared: the page asks again; Chromium logs each 404
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}")
            if m.type == "error" and not m.text.endswith("status of 404 (Not Found)") else None)
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}")
            if r.status >= 400 and not (r.status == 404 and r.url.endswith("/models/v2/shadow-report")) else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("dialog", lambda d: (questions.append(d.message), d.accept() if accept[0] else d.dismiss()))
    page.goto(f"{server.url}/ui/")
    page.fill("#key-input", key)
    page.click("#key-submit")
    page.wait_for_selector("main[data-page='classes'][data-loaded='true']")
    page.evaluate("location.hash = '#/models'")
    page.wait_for_selector("main[data-page='models'][data-loaded='true']")
    return page


def test_the_models_page_shadows_activates_and_rolls_back(bundle: Path, tmp_path: Path) -> None:
    """The screenshot goes to SOWA_CONSOLE_SCREENSHOTS when set (docs/console/ holds the committed ones)."""
    shots_dir = Path(os.environ.get("SOWA_CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    shots_dir.mkdir(parents=True, exist_ok=True)
    v1 = read_manifest(bundle).fingerprint[:16]
    v2_bundle = make_bundle(tmp_path / "v2", 96, 11)
    data = tmp_path / "data"
    with ServerProcess(bundle, data, tmp_path / "server.log", env={"SOWA_API_KEY": KEY}) as server, \
            httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as api:
        repository = open_repository(str(data), data)  # the server's own (a directory one): it lists v2 at once
        try:
            repository.add(v2_bundle, "v2", "test")
        finally:
            repository.close()
        viewer = api.post("/keys", json={"name": "viewer", "role": "inspect"}).json()["key"]
        assert api.post("/classes/widget/shots", files=_files(SHOTS)).status_code == 200

        expect = playwright.expect
        problems: list[str] = []
        questions: list[str] = []
        accept = [True]
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = _page(browser, server, KEY, problems, questions, accept)
            rows = page.locator("#models tbody tr")
            expect(rows).to_have_count(2)
            row = {v: page.locator(f"#models tbody tr[data-version='{v}']") for v in (v1, "v2")}
            expect(row[v1]).to_have_attribute("data-serving", "true")
            expect(row[v1].locator(".badge.serving")).to_have_text("serving")
            expect(row["v2"]).to_have_attribute("data-serving", "false")
            expect(row["v2"]).to_contain_text("96 px")
            expect(page.locator("#rollback")).to_be_hidden()  # nothing to roll back to yet
            expect(page.locator("#no-shadow")).to_be_visible()

            # shadow v2 on every request; its report appears once its classes are prepared
            page.fill("#shadow-share", "100")
            row["v2"].locator("button.start-shadow").click()
            assert "Shadow v2: score 100.0% of the answered requests" in questions[-1]
            expect(row["v2"].locator(".badge.shadow")).to_be_visible()
            expect(page.locator("#shadow-facts")).to_be_visible(timeout=60_000)
            expect(page.locator("#shadow-preparation")).to_be_hidden()  # shown only while it runs (or failed)
            for _ in range(REQUESTS):
                r = api.post("/predict", files=_files(TESTS), data={"class_name": "widget", "heatmap": "none"})
                assert r.status_code == 200, r.text
            images = REQUESTS * len(TESTS)
            wait_for(lambda: (rep := api.get("/models/v2/shadow-report").json())["sampled"] == images
                     and rep["scored"] + rep["dropped"] + rep["failed"] == images, 60, "the shadow has scored")
            report = api.get("/models/v2/shadow-report").json()
            widget = report["classes"]["widget"]
            cls = page.locator("#shadow-classes tbody tr[data-class='widget']")
            expect(cls.locator("td").first).to_have_text(str(widget["images"]), timeout=15_000)  # the next poll
            expect(page.locator("#shadow-facts dd[data-fact='images']")).to_contain_text(
                f"{report['scored']} scored of {images} sampled")
            expect(page.locator("#shadow-facts dd[data-fact='agreement']")).to_have_text(
                f"{100 * report['agreement']:.1f}%")
            assert report["latency_s"]["samples"] >= 1
            expect(page.locator("#shadow-facts dd[data-fact='latency']")).to_contain_text("p95")
            disagreements = widget["disagreements"]
            expect(page.locator("#disagreements tbody tr")).to_have_count(len(disagreements))
            page.evaluate("document.getElementById('models').scrollIntoView()")  # the versions and the report
            snap(page, shots_dir / "models.png")
            # the random-weight v2 and the parity model disagree on most of these parts (9 of 12 here); one
            # disagreement opens its record, as History does
            assert disagreements and all(d["record_id"] for d in disagreements), report
            first = disagreements[0]["record_id"]
            page.locator(f"#disagreements tr[data-record='{first}'] button.open-record").click()
            expect(page.locator("#record-facts")).to_contain_text(first)

            # stop the shadow
            row["v2"].locator("button.stop-shadow").click()
            expect(page.locator("#no-shadow")).to_be_visible()
            assert api.get("/models").json()["shadow"] is None

            # a question answered "no" changes nothing
            accept[0] = False
            row["v2"].locator("button.activate").click()
            assert len(questions) == 3 and questions[-1].startswith(f"Serve v2 instead of {v1}?")
            page.wait_for_timeout(500)
            assert api.get("/models").json()["target"] is None
            expect(page.locator("#preparation")).to_be_hidden()
            accept[0] = True

            # activate v2: its preparation followed each second until it serves
            row["v2"].locator("button.activate").click()
            assert questions[-1].startswith(f"Serve v2 instead of {v1}?")
            expect(page.locator("#status")).to_have_text("Now serving v2.", timeout=60_000)
            expect(row["v2"]).to_have_attribute("data-serving", "true")
            expect(row[v1]).to_have_attribute("data-serving", "false")
            expect(page.locator("#preparation")).to_have_attribute("data-phase", "done")
            expect(page.locator("#prep-progress")).to_have_attribute("value", "100")
            expect(page.locator("#models-state dd[data-fact='previous']")).to_have_text(v1)
            assert api.get("/models").json()["serving"] == "v2"

            # roll back to v1
            expect(page.locator("#rollback")).to_have_text(f"Roll back to {v1}")
            page.click("#rollback")
            assert questions[-1].startswith(f"Roll back: serve {v1} again")
            expect(page.locator("#status")).to_have_text(f"Now serving {v1}.", timeout=60_000)
            expect(row[v1]).to_have_attribute("data-serving", "true")
            body = api.get("/models").json()
            assert body["serving"] == body["active"] == v1 and body["previous"] == "v2"

            # the audit page names the changes
            page.evaluate("location.hash = '#/audit'")
            page.wait_for_selector("main[data-page='audit'][data-loaded='true']")
            expect(page.locator("#audit tbody tr[data-action='model.activated']").first).to_contain_text(
                f"active model v2 → {v1}")
            expect(page.locator("#audit tbody tr[data-action='model.shadow']").first).to_contain_text(
                "shadow v2 → stopped")
            expect(page.locator("#audit tbody tr[data-action='model.shadow']").last).to_contain_text(
                "shadow (none) → v2 on 100.0% of the traffic")
            problems += page.evaluate("window.__csp")

            # an inspect key sees the versions and what serves, and no button
            page = _page(browser, server, viewer, problems, questions, accept)
            expect(page.locator("#models tbody tr")).to_have_count(2)
            expect(page.locator(f"#models tbody tr[data-version='{v1}']")).to_have_attribute("data-serving", "true")
            expect(page.locator("#models button")).to_have_count(0)
            expect(page.locator("#rollback")).to_have_count(0)
            expect(page.locator("#shadow-share")).to_have_count(0)
            expect(page.locator(".needs-role[data-needs='admin']")).to_be_visible()
            problems += page.evaluate("window.__csp")

            # a shadow being prepared, then failing to start on this replica, as GET /models would say it (too
            # quick on one class to catch for real): its progress, then its error in place of the report
            prep = {"version": "v2", "fingerprint": "0" * 64, "purpose": "shadow", "phase": "rebuilding",
                    "classes": 2, "classes_done": 1, "fitted": 1, "started": 0.0, "finished": None, "error": None,
                    "seconds": 1.5}

            def models(route: object) -> None:
                body = route.fetch().json()
                route.fulfill(json={**body, "shadow": "v2", "shadow_share": 1.0, "shadow_preparation": prep})

            page.route(f"{server.url}/models", models)
            box = page.locator("#shadow-preparation")
            expect(box).to_have_attribute("data-phase", "rebuilding", timeout=10_000)  # the next poll (5 s)
            expect(page.locator("#shadow-prep-progress")).to_have_attribute("value", "48")  # 5% + 85% of a half
            expect(page.locator("#shadow-prep-text")).to_contain_text("Preparing v2 (to shadow): rebuilding, 1 of 2")
            expect(page.locator("#shadow-waiting")).to_be_visible()  # the report's 404: not shadowing yet
            prep.update(phase="failed", finished=1.0, error="the shadow would not load")
            expect(box).to_have_attribute("data-phase", "failed")  # polled each second while it ran
            expect(page.locator("#shadow-prep-error")).to_have_text("the shadow would not load")
            expect(page.locator("#shadow-failed")).to_have_text(
                "Not shadowing on this replica: the shadow would not load")
            expect(page.locator("#shadow-prep-progress")).to_have_count(0)
            page.unroute(f"{server.url}/models")
            browser.close()
    assert not problems, problems
