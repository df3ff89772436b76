"""Model versions across a crash: kill -9 while a new version's banks are being rebuilt, then restart. The model that
was active serves at once, nothing half-prepared is served, and the pending activation resumes from the banks
already stored (fewer are fitted than there are classes)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model.bundle import read_manifest
from service.client import SowaClient
from service.core.models.open import open_repository
from sowa.server_process import ServerProcess
from tests.helpers import PARITY, wait_for
from tests.service.test_model_versions import make_bundle

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
CLASSES = 30


@pytest.mark.slow
def test_kill_9_during_a_rebuild_serves_the_active_model_and_resumes(bundle: Path, tmp_path: Path) -> None:
    v1 = read_manifest(bundle).fingerprint[:16]
    big = make_bundle(tmp_path / "v2", 160, 5)  # a larger input: each class's rebuild takes a while
    data = tmp_path / "data"
    srv = ServerProcess(bundle, data, tmp_path / "a.log").start()
    try:
        with SowaClient(srv.url) as c:
            for i in range(CLASSES):
                c.register_shots(f"part-{i}", SHOTS)
        repository = open_repository(str(data), data)
        try:
            repository.add(big, "v2", "test")
        finally:
            repository.close()
        assert httpx.post(srv.url + "/models/v2/activate").status_code == 202

        def rebuilding() -> int:
            prep = httpx.get(srv.url + "/readyz").json()["model"]["preparing"]
            return prep is not None and prep["phase"] == "rebuilding" and prep["classes_done"] >= 3

        wait_for(rebuilding, 60, "the rebuild is under way")
        srv.kill()
    except BaseException:
        srv.stop()
        raise
    srv = ServerProcess(bundle, data, tmp_path / "b.log").start()
    try:
        models = httpx.get(srv.url + "/models").json()
        assert models["active"] == models["serving"] == v1 and models["target"] == "v2"
        r = httpx.post(srv.url + "/predict", files=[("images", (TESTS[0].name, TESTS[0].read_bytes()))],
                       data={"class_name": "part-0"})
        assert r.status_code == 200 and r.json()["model"]["version"] == v1  # the old model, whole

        def switched() -> bool:
            return httpx.get(srv.url + "/models").json()["serving"] == "v2"

        wait_for(switched, 120, "the resumed activation switches")
        prep = httpx.get(srv.url + "/models").json()["preparation"]
        assert prep["phase"] == "done" and prep["classes"] == CLASSES
        assert prep["fitted"] < CLASSES - 2  # what the killed run stored was read, not fitted again
        r = httpx.post(srv.url + "/predict", files=[("images", (TESTS[0].name, TESTS[0].read_bytes()))],
                       data={"class_name": "part-0"})
        assert r.status_code == 200 and r.json()["model"]["version"] == "v2"
    finally:
        srv.stop()


@pytest.mark.slow
def test_with_http_workers_a_shadow_and_a_switch_to_another_input_size(bundle: Path, tmp_path: Path) -> None:
    """The engine process does the work; its workers sample for the shadow (sending the uploads: the shadow takes
    another input size) and, after the switch, stage at the new size."""
    v1 = read_manifest(bundle).fingerprint[:16]
    data = tmp_path / "data"
    srv = ServerProcess(bundle, data, tmp_path / "w.log", flags=["--workers", "2"]).start()
    try:
        with SowaClient(srv.url) as c:
            c.register_shots("widget", SHOTS)
        repository = open_repository(str(data), data)
        try:
            repository.add(make_bundle(tmp_path / "v2", 96, 11), "v2", "test")
        finally:
            repository.close()
        r = httpx.post(srv.url + "/models/v2/shadow", json={"share": 1.0}, params={"wait": "true"}, timeout=60)
        assert r.status_code == 200, r.text

        def predict() -> dict:
            r = httpx.post(srv.url + "/predict", files=[("images", (TESTS[0].name, TESTS[0].read_bytes()))],
                           data={"class_name": "widget", "heatmap": "raw"}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        for _ in range(6):
            assert predict()["model"]["version"] == v1

        def shadowed() -> bool:
            return httpx.get(srv.url + "/models/v2/shadow-report").json()["scored"] >= 6

        wait_for(shadowed, 30, "the shadow scored what the workers sent")
        assert httpx.post(srv.url + "/models/v2/activate", params={"wait": "true"}, timeout=120).status_code == 200
        answers = [predict() for _ in range(8)]
        # the engine tells its workers the new input size as it switches; a request a worker staged before the news
        # arrived finishes on v1 (at most one per worker, in a race that a quiet machine never shows)
        versions = [a["model"]["version"] for a in answers]
        assert versions.count(v1) <= 2 and versions[-4:] == ["v2"] * 4, versions
        assert all(a["results"][0]["heatmap"]["shape"] == [a["model"]["image_size"]] * 2 for a in answers)
    finally:
        srv.stop()
