"""The console in a real browser: headless Chromium (Debian's, driven by Playwright) against the real server with an
API key, a synthetic product registered, inspected and its threshold moved through the page, all under the service's
Content-Security-Policy (service/http/protections.py) with no violation reported.

Needs `chromium` (apt) and `playwright` (pip, the dev extra); skipped where either is missing. Screenshots of each
page go to a temporary folder, or to `SOWA_CONSOLE_SCREENSHOTS` (docs/console/ holds the committed ones):
`SOWA_CONSOLE_SCREENSHOTS=docs/console python3 -m pytest tests/service/http/test_console_browser.py`.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model.bundle import init_bundle
from sowa.demo import ARCH
from sowa.server_process import ServerProcess
from tests.helpers import wait_for
from training.synth import DEFECT_KINDS, make_part, with_defect

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]

KEY = "browser-test-key-123"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Eight good shots and six parts to inspect (three good, one of each defect), as PNG files."""
    d = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {"shots": [], "inspect": []}
    for i in range(8):
        make_part(rng, jitter=0.1).save(p := d / f"shot-{i}.png")
        out["shots"].append(p)
    for i in range(3):
        make_part(rng, jitter=0.1).save(p := d / f"good-{i}.png")
        out["inspect"].append(p)
    for kind in DEFECT_KINDS:
        with_defect(make_part(rng, jitter=0.1), rng, kind).image.save(p := d / f"defect-{kind}.png")
        out["inspect"].append(p)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("console-browser")
    init_bundle(ARCH, "none", tmp / "bundle", seed=0, force=True)  # what `sowa demo` serves
    with ServerProcess(tmp / "bundle", tmp / "data", tmp / "server.log", env={"SOWA_API_KEY": KEY}) as srv:
        yield srv


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("SOWA_CONSOLE_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def snap(page: object, path: Path) -> None:
    """A 1280x800 screenshot, RGB (no alpha), PNG compressed as far as it goes (a 256-colour palette would halve
    the bytes but bands the heatmaps and their legend)."""
    Image.open(io.BytesIO(page.screenshot())).convert("RGB").save(path, optimize=True)


def test_console_end_to_end(server: ServerProcess, parts: dict[str, list[Path]], shots_dir: Path) -> None:
    api = httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30)
    problems: list[str] = []
    requests: list[str] = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        # the policy's violation reports, from the first script on (each is a console error too)
        page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', (e) => window"
                             ".__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`));")
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
        expect = playwright.expect

        def predicts() -> int:
            return sum(r.startswith("POST ") and r.endswith("/predict") for r in requests)

        def goto(hash_: str) -> None:
            page.evaluate(f"location.hash = {hash_!r}")
            page.wait_for_selector(f"main[data-page='{hash_.split('/')[1]}'][data-loaded='true']")

        # the key, asked for once, before any API call
        page.goto(f"{server.url}/ui/")
        expect(page.locator("#key-dialog")).to_be_visible()
        page.fill("#key-input", KEY)
        page.click("#key-submit")
        page.wait_for_selector("main[data-page='classes'][data-loaded='true']")

        # a class: register shots through the file picker
        page.fill("#new-class", "part")
        page.press("#new-class", "Enter")
        page.wait_for_selector("main[data-page='class'][data-loaded='true']")
        page.set_input_files("#shot-files", [str(p) for p in parts["shots"]])
        page.click("#register")
        expect(page.locator("[data-fact='shots']")).to_have_text("8", timeout=60_000)
        info = api.get("/classes/part").json()
        assert info["shots"] == 8
        # delete a shot: untick it, and the others are registered again as the set
        expect(page.locator("figure.shot")).to_have_count(8)
        hashes = api.get("/classes/part/shots").json()["shots"]
        page.locator("figure.shot").nth(7).locator("input").uncheck()
        snap(page, shots_dir / "class.png")
        page.click("#delete-shots")
        expect(page.locator("[data-fact='shots']")).to_have_text("7", timeout=60_000)
        expect(page.locator("figure.shot")).to_have_count(7)
        assert api.get("/classes/part/shots").json()["shots"] == hashes[:7]  # the same shots, the same hashes

        # inspect: three good parts and three defective ones, kept
        goto("#/inspect/part")
        page.set_input_files("#inspect-files", [str(p) for p in parts["inspect"]])
        expect(page.locator(".card")).to_have_count(6, timeout=60_000)
        verdicts = {page.locator(".card h3").nth(i).inner_text(): page.locator(".card").nth(i).get_attribute(
            "data-anomalous") for i in range(6)}
        assert verdicts == {p.name: str(p.name.startswith("defect")).lower() for p in parts["inspect"]}
        page.fill("#opacity", "70")
        assert page.evaluate("getComputedStyle(document.querySelector('.heat')).opacity") == "0.7"
        assert page.locator(".boxes rect").count() >= 1  # the defects' regions are boxed
        snap(page, shots_dir / "inspect.png")

        # "this one is good": a kept good part becomes a shot, the calibration moves
        good = page.locator(".card[data-filename='good-0.png']")
        good.locator(".mark-good").click()
        expect(good.locator(".note")).to_contain_text("Shots 7 → 8", timeout=60_000)
        assert api.get("/classes/part").json()["shots"] == 8

        # threshold: dragging re-labels the kept results at once, with no model call
        goto("#/threshold/part")
        before = predicts()
        kept = page.locator(".kept")
        expect(kept).to_have_count(6)
        box = page.locator("#chart").bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + 2, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.3, y, steps=5)
        page.mouse.move(box["x"] + 3, y, steps=5)
        page.mouse.up()
        expect(page.locator(".kept[data-anomalous='true']")).to_have_count(6)  # below every score: all flagged
        page.mouse.move(box["x"] + 2, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] - 2, y, steps=8)
        page.mouse.up()
        expect(page.locator(".kept[data-anomalous='true']")).to_have_count(0)  # above every score: none
        page.focus(".handle")
        page.keyboard.press("Home")
        expect(page.locator(".kept[data-anomalous='true']")).to_have_count(6)
        # between the good and the defective parts' scores: the page labels them as the model did
        scores = api.get("/classes/part/scores").json()
        recent = {r["id"]: r["score"] for r in scores["recent"]}
        results = api.get("/classes/part/results").json()["results"]
        bad = [recent[r["id"]] for r in results if r["filename"].startswith("defect")]
        fine = [recent[r["id"]] for r in results if r["filename"].startswith("good")]
        assert max(fine) < min(bad)
        target = (max(fine) + min(bad)) / 2
        edges = scores["histogram"]["edges"]
        frac = (target - edges[0]) / (edges[-1] - edges[0])
        left, width = page.evaluate("""() => { const c = document.querySelector('#chart');
            const m = c.getScreenCTM(); const vb = c.viewBox.baseVal;
            return [m.e + 48 * m.a, (vb.width - 48 - 16) * m.a]; }""")
        page.mouse.move(box["x"] + box["width"] / 2, y)
        page.mouse.down()
        page.mouse.move(left + frac * width, y, steps=6)
        page.mouse.up()
        expect(page.locator(".kept[data-anomalous='true']")).to_have_count(3)
        assert predicts() == before, "dragging the threshold called the model"
        snap(page, shots_dir / "threshold.png")
        shown = float(page.get_attribute("#chart", "data-threshold"))
        page.click("#save")
        expect(page.locator("#status")).to_contain_text("Saved")
        saved = api.get("/classes/part").json()
        assert saved["threshold_overridden"] and saved["threshold"] == pytest.approx(shown, abs=1e-9)
        page.click("#reset")
        expect(page.locator("#status")).to_contain_text("Reset")
        reset = api.get("/classes/part").json()
        assert not reset["threshold_overridden"] and reset["threshold"] == reset["calibrated_threshold"]
        assert predicts() == before

        # the classes page: shots, thresholds, bank, the last kept results
        goto("#/classes")
        row = page.locator("tr[data-class='part']")
        expect(row.locator(".shots")).to_have_text("8")
        expect(row.locator(".shot-thumb")).to_have_count(1)
        expect(row.locator(".thumbs img")).to_have_count(4)
        snap(page, shots_dir / "classes.png")

        # health, from /readyz and /metrics every 2 s: requests per second over the last interval
        goto("#/health")
        expect(page.locator("[data-fact='ready']")).to_have_text("yes")
        rate = page.locator("[data-fact='requests-s']")
        expect(rate).not_to_have_text("—", timeout=10_000)
        idle = float(rate.inner_text())
        assert 0 < idle <= 1.0, idle  # only the page's own /readyz, one a poll (/metrics is not counted): ~0.5/s
        for _ in range(40):  # 40 requests at once: over one or two intervals of ~2 s
            api.get("/readyz")
        shown: list[float] = []
        wait_for(lambda: shown.append(float(rate.inner_text())) or shown[-1] >= 6, 15, "the burst in requests/s")
        assert max(shown) <= 30, shown  # 42 requests at most in an interval of at least ~1.5 s
        snap(page, shots_dir / "health.png")

        # a class name from the address is checked: this one would have saved a threshold on class 'bat'
        page.evaluate("location.hash = '#/threshold/xss%2F..%2Fbat'")
        expect(page.locator("#bad-route")).to_be_visible()
        expect(page.locator("#save")).to_have_count(0)
        assert not [r for r in requests if "bat" in r], "a request for a name the address smuggled in"

        # keyboard: every control of a page is reachable with Tab
        goto("#/threshold/part")
        reached = set()
        for _ in range(25):
            page.keyboard.press("Tab")
            reached.add(page.evaluate("document.activeElement.id || document.activeElement.className.baseVal "
                                      "|| document.activeElement.className"))
        assert {"class-select", "threshold-input", "save", "reset", "handle"} <= reached, reached
        problems += page.evaluate("window.__csp")
        browser.close()
    assert not problems, problems
    assert not [r for r in requests if KEY in r], "the API key went into a URL"
    local = (server.url, f"blob:{server.url}", "data:")  # blob: the dropped files; data: thumbnails, heatmaps
    assert not [r for r in requests if not r.split(" ", 1)[1].startswith(local)], "a request left the service"
