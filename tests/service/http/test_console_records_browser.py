"""The console's record pages in headless Chromium against a real server with an API key: History (filters,
thumbnails, a record with its image and heatmap), Review (flagged and borderline parts first, g / d / s from the
keyboard), Quality (the figures, the suggested threshold applied, the drift chart); a part id holding HTML is shown
as text and runs nothing; no Content-Security-Policy violation. Skipped without chromium or playwright."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.bundle import init_bundle
from sowa.demo import ARCH
from sowa.server_process import ServerProcess
from tests.service.http.test_console_browser import snap
from training.synth import DEFECT_KINDS, make_part, with_defect

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]

KEY = "records-browser-admin-key"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = '<img src=x onerror="window.__xss=1"><b>bold</b>'


def _png(img: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _predict(api: httpx.Client, images: list[bytes], **form: str) -> list[dict]:
    files = [("images", (f"p{i}.png", b, "image/png")) for i, b in enumerate(images)]
    r = api.post("/predict", files=files, data={"class_name": "widget", "heatmap": "none", **form})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_history_review_and_quality_pages(tmp_path: Path) -> None:
    """Screenshots go to SOWA_CONSOLE_SCREENSHOTS when set (docs/console/ holds the committed ones)."""
    shots_dir = Path(os.environ.get("SOWA_CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    shots_dir.mkdir(parents=True, exist_ok=True)
    init_bundle(ARCH, "none", tmp_path / "bundle", seed=0, force=True)  # what `sowa demo` serves
    rng = np.random.default_rng(0)
    shots = [_png(make_part(rng, jitter=0.1)) for _ in range(8)]
    good = [_png(make_part(rng, jitter=0.1)) for _ in range(36)]
    bad = [_png(with_defect(make_part(rng, jitter=0.1), rng, kind).image) for kind in DEFECT_KINDS]
    with ServerProcess(tmp_path / "bundle", tmp_path / "data", tmp_path / "server.log",
                       env={"SOWA_API_KEY": KEY}) as server, \
            httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as api:
        files = [("images", (f"s{i}.png", b, "image/png")) for i, b in enumerate(shots)]
        assert api.post("/classes/widget/shots", files=files).status_code == 200
        passed = _predict(api, good, station="line-1")
        flagged = _predict(api, bad, part_id=HOSTILE, station="line-2", tags="night")
        ids = {r["record_id"] for r in passed + flagged}
        assert None not in ids and len(ids) == len(good) + len(bad)
        verdicts = [r["is_anomalous"] for r in passed + flagged]
        n_flagged = sum(verdicts)
        assert sum(r["is_anomalous"] for r in flagged) >= 1 and n_flagged < len(verdicts) - 30  # room for drift

        expect = playwright.expect
        problems: list[str] = []
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', (e) => "
                                 "window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));")
            page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.goto(f"{server.url}/ui/")
            page.fill("#key-input", KEY)
            page.click("#key-submit")
            page.wait_for_selector("main[data-page='classes'][data-loaded='true']")

            def goto(hash_: str) -> None:
                page.evaluate(f"location.hash = {hash_!r}")
                page.wait_for_selector(f"main[data-page='{hash_.split('/')[1]}'][data-loaded='true']")

            # History: newest first, a page of 50 and more; a filter; the hostile part id as text
            goto("#/history")
            rows = page.locator("#history tbody tr")
            expect(rows).to_have_count(len(good) + len(bad))
            page.select_option("#history-verdict", "fail")
            page.fill("#history-station", "line-2")
            page.fill("#history-tag", "night")
            page.select_option("#history-reviewed", "false")
            page.click("#history-filters button[type='submit']")
            expect(rows).to_have_count(sum(r["is_anomalous"] for r in flagged))
            cell = rows.first.locator("td.part-id")
            assert cell.text_content() == HOSTILE
            assert cell.evaluate("(td) => td.children.length") == 0  # no <img>, no <b>: text only
            expect(rows.first.locator("img.record-thumb")).to_have_count(1)  # flagged parts keep their images
            rows.first.locator("button.open-record").click()
            expect(page.locator("#record-heatmap")).to_be_visible()
            expect(page.locator("#record-image")).to_be_visible()
            assert page.locator("#record-image").evaluate("(img) => img.naturalWidth") > 0
            expect(page.locator("#record-facts")).to_contain_text(HOSTILE)
            snap(page, shots_dir / "history.png")

            # Review: flagged parts first; g, d and s from the keyboard on the part in focus
            goto("#/review")
            items = page.locator("#review-queue li")
            expect(items).to_have_count(len(good) + len(bad))
            anomalous = items.evaluate_all("(lis) => lis.map((li) => li.dataset.anomalous)")
            assert anomalous == ["true"] * n_flagged + ["false"] * (len(verdicts) - n_flagged)
            queue = items.evaluate_all("(lis) => lis.map((li) => li.dataset.id)")
            expect(items.first).to_be_focused()
            page.keyboard.press("d")
            expect(items.nth(1)).to_be_focused()
            page.keyboard.press("s")
            expect(items.nth(2)).to_be_focused()
            page.keyboard.press("g")
            snap(page, shots_dir / "review.png")
            expect(page.locator("#review-left")).to_have_text(f"{len(good) + len(bad) - 2} parts to review.")
            assert api.get(f"/records/{queue[0]}").json()["review"] == "defective"
            assert api.get(f"/records/{queue[1]}").json()["review"] is None  # skipped
            assert api.get(f"/records/{queue[2]}").json()["review"] == "good"
            # the rest over the API: the flagged parts are defective, the passed ones good
            for record_id in queue[3:]:
                verdict = "defective" if record_id in {r["record_id"] for r in flagged} else "good"  # as made
                assert api.post(f"/records/{record_id}/review", json={"verdict": verdict}).status_code == 200

            # Quality: the figures at the threshold in force, the suggestion applied, the drift chart
            goto("#/quality/widget")
            quality = api.get("/classes/widget/quality").json()
            assert quality["reviewed"] == len(good) + len(bad) - 1
            table = page.locator("#quality-table")
            expect(table).to_contain_text("Escape rate")
            suggested = quality["suggested"]["threshold"]
            page.click("#apply")
            expect(page.locator("#status")).to_contain_text("Applied")
            assert api.get("/classes/widget").json()["threshold"] == pytest.approx(suggested)
            expect(page.locator("#drift-chart circle")).to_have_count(len(quality["drift"]["series"]))
            expect(page.locator("#drift-now")).to_contain_text("KS D")
            snap(page, shots_dir / "quality.png")

            # a good part with its upload kept becomes a shot from its record
            goto("#/history")
            page.select_option("#history-reviewed", "good")
            page.click("#history-filters button[type='submit']")
            kept = page.locator("#history tbody tr", has=page.locator("img.record-thumb"))
            expect(kept.first).to_be_visible()  # the first passed part keeps its images (1 in 100 from the first)
            kept.first.locator("button.open-record").click()
            page.click("#add-shot")
            expect(page.locator("#record-note")).to_contain_text(f"Shots {len(shots)} → {len(shots) + 1}")
            assert api.get("/classes/widget").json()["shots"] == len(shots) + 1

            assert page.evaluate("window.__xss") is None
            problems += page.evaluate("window.__csp")
            browser.close()
    assert not problems, problems
