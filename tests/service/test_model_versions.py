"""Model versions in one process: activation under load and rollback with no failed request, answers and records
naming their model, a bundle of another input size served right (banks rebuilt from the stored shots at its own
resolution, scores as the offline model gives them), per-model threshold overrides, shadow reports, the memory
check, and the audit trail. Real processes (kill -9 mid-rebuild, two PostgreSQL replicas) are in
tests/service/test_model_versions_processes.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import read_manifest, save_bundle
from model.inference import fit_class, predict_scored
from model.preprocess import load_image, normalize, resize_uint8
from model.sowa import SowaModel
from tests.helpers import PARITY, perturb_trainables, tiny_config, wait_for_async
from tests.in_process import InProcess, serve_in_process

pytestmark = pytest.mark.anyio

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))


def make_bundle(out: Path, image_size: int, seed: int) -> Path:
    """A small real bundle of its own weights (and input size)."""
    torch.manual_seed(seed)
    model = SowaModel(tiny_config(image_size=image_size))
    perturb_trainables(model, seed)
    model.refresh_text()
    save_bundle(model, out, {"source": "test"})
    return out


@pytest.fixture(scope="module")
def bundle_96(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("v2") / "bundle", 96, 11)


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


async def _register(s: InProcess, name: str, shots: list[Path]) -> None:
    r = await s.http.post(f"/classes/{name}/shots", files=_files(shots))
    assert r.status_code == 200, r.text


def _offline_scores(bundle: Path, shots: list[Path], tests: list[Path]) -> np.ndarray:
    """What the model itself gives these parts, at its own input size, with no service in between."""
    from model.bundle import load_bundle

    model, _ = load_bundle(bundle, torch.device("cpu"))
    size = model.image_size
    batch = lambda ps: normalize(torch.stack([resize_uint8(load_image(p), size) for p in ps]))  # noqa: E731
    with torch.inference_mode():
        memory = fit_class(model, batch(shots), prompt_name="widget")
        pred = predict_scored(model, batch(tests), [memory] * len(tests))
    return pred.scores.raw.numpy()


async def test_activate_under_load_and_roll_back_without_a_failed_request(bundle: Path, bundle_96: Path,
                                                                          tmp_path: Path) -> None:
    v1 = read_manifest(bundle).fingerprint
    v2 = read_manifest(bundle_96).fingerprint
    async with serve_in_process(bundle, tmp_path / "data") as s:
        runtime = s.app.state.runtime
        for name in ("widget", "gadget", "sprocket"):
            await _register(s, name, SHOTS)
        assert (await s.http.patch("/classes/widget", json={"threshold": 0.5})).status_code == 200
        await asyncio.to_thread(runtime.repository.add, bundle_96, "v2", "test")
        listed = (await s.http.get("/models")).json()
        assert listed["serving"] == v1[:16] and listed["active"] == v1[:16]
        assert {v["version"] for v in listed["versions"]} == {v1[:16], "v2"}

        seen: list[tuple[float, str]] = []
        failures: list[str] = []
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                started = asyncio.get_running_loop().time()
                r = await s.http.post("/predict", files=_files([TESTS[i % len(TESTS)]]),
                                      data={"class_name": ("widget", "gadget")[i % 2], "heatmap": "none"})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    seen.append((started, r.json()["model"]["version"]))

        clients = [asyncio.create_task(client(i)) for i in range(4)]
        await wait_for_async(lambda: len(seen) >= 8, 60, "traffic before the switch")
        r = await s.http.post("/models/v2/activate", params={"wait": "true"})
        assert r.status_code == 200, r.text
        switched = asyncio.get_running_loop().time()
        body = r.json()
        assert body["serving"] == body["active"] == "v2" and body["previous"] == v1[:16] and body["target"] is None
        assert body["preparation"]["phase"] == "done" and body["preparation"]["classes"] == 3
        assert body["preparation"]["fitted"] == 3  # every class's bank rebuilt for v2, from its stored shots
        await wait_for_async(lambda: sum(t > switched for t, _ in seen) >= 8, 60, "traffic after the switch")
        r = await s.http.post("/models/rollback", params={"wait": "true"})
        assert r.status_code == 200 and r.json()["serving"] == v1[:16], r.text
        rolled = asyncio.get_running_loop().time()
        await wait_for_async(lambda: sum(t > rolled for t, _ in seen) >= 8, 60, "traffic after the rollback")
        stop.set()
        await asyncio.gather(*clients)

        assert not failures, failures[:5]
        assert {v for _, v in seen} == {v1[:16], "v2"}
        assert {v for t, v in seen if switched < t < rolled} == {"v2"}  # started after the switch: the new model
        assert {v for t, v in seen if t > rolled} == {v1[:16]}
        # a rollback finds v1's banks stored: nothing fitted again
        assert (await s.http.get("/models")).json()["preparation"]["fitted"] == 0

        # the threshold override was v1's: v2 scored with its calibrated threshold, v1 has it back
        assert (await s.http.get("/classes/widget")).json()["threshold"] == 0.5
        records = (await s.http.get("/records", params={"class_name": "widget", "limit": 1000})).json()["records"]
        assert {r["model"] for r in records} == {v1[:16], v2[:16]}
        assert {r["threshold"] for r in records if r["model"] == v1[:16]} == {0.5}
        assert 0.5 not in {r["threshold"] for r in records if r["model"] == v2[:16]}

        # quality figures count the serving model's reviewed parts only: another model's raw scores are no guide
        for model in (v1, v2):
            rid = next(r["id"] for r in records if r["model"] == model[:16])
            r = await s.http.post(f"/records/{rid}/review", json={"verdict": "good"})
            assert r.status_code == 200, r.text
        quality = (await s.http.get("/classes/widget/quality")).json()
        assert quality["reviewed"] == 1 and quality["other_calibration"] == 1

        events = (await s.http.get("/audit", params={"action": "model.activated"})).json()["events"]
        assert [(e["target"], e["after"]["active"]) for e in reversed(events)] == [("v2", "v2"),
                                                                                  (v1[:16], v1[:16])]


async def test_a_model_of_another_input_size_scores_as_the_model_itself(bundle: Path, bundle_96: Path,
                                                                        tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data") as s:
        await _register(s, "widget", SHOTS)
        await asyncio.to_thread(s.app.state.runtime.repository.add, bundle_96, "v2", "test")
        assert (await s.http.post("/models/v2/activate", params={"wait": "true"})).status_code == 200
        r = await s.http.post("/predict", files=_files(TESTS), data={"class_name": "widget", "heatmap": "raw"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["image_size"] == 96 and body["model"]["version"] == "v2"
        assert body["results"][0]["heatmap"]["shape"] == [96, 96]
        got = np.array([x["score"] for x in body["results"]])
    want = _offline_scores(bundle_96, SHOTS, TESTS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


async def test_shadow_scores_a_share_and_reports_how_it_compares(bundle: Path, bundle_96: Path,
                                                                 tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data") as s:
        await _register(s, "widget", SHOTS)
        await asyncio.to_thread(s.app.state.runtime.repository.add, bundle_96, "v2", "test")
        r = await s.http.post("/models/v2/shadow", json={"share": 1.0}, params={"wait": "true"})
        assert r.status_code == 200 and r.json()["shadow"] == "v2" and r.json()["shadow_share"] == 1.0, r.text
        ids = []
        for p in TESTS * 2:
            r = await s.http.post("/predict", files=_files([p]), data={"class_name": "widget", "heatmap": "none"})
            assert r.status_code == 200 and r.json()["model"]["version"] != "v2"  # the shadow never answers
            ids.append(r.json()["results"][0]["record_id"])

        async def scored() -> bool:
            return (await s.http.get("/models/v2/shadow-report")).json()["scored"] == len(ids)

        await wait_for_async(scored, 30, "the shadow scored every request")
        report = (await s.http.get("/models/v2/shadow-report")).json()
        widget = report["classes"]["widget"]
        assert widget["images"] == len(ids) and report["dropped"] == 0
        assert 0.0 <= widget["agreement"] <= 1.0 and widget["agreement"] == report["agreement"]
        assert widget["correlation"] is None or -1.0 <= widget["correlation"] <= 1.0
        assert report["latency_s"]["samples"] == len(ids)
        assert len(widget["disagreements"]) == round((1 - widget["agreement"]) * len(ids))
        assert {d["record_id"] for d in widget["disagreements"]} <= set(ids)
        assert (await s.http.delete("/models/shadow")).status_code == 200
        assert (await s.http.get("/models")).json()["shadow"] is None
        assert (await s.http.get("/models/v2/shadow-report")).status_code == 404


async def test_a_model_that_would_not_fit_is_refused_and_nothing_changes(bundle: Path, bundle_96: Path,
                                                                         tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", models_memory_mb=1) as s:
        await asyncio.to_thread(s.app.state.runtime.repository.add, bundle_96, "v2", "test")
        before = (await s.http.get("/models")).json()
        r = await s.http.post("/models/v2/activate")
        assert r.status_code == 409 and r.json()["error"]["code"] == "insufficient_memory", r.text
        assert "models_memory_mb" in r.json()["error"]["message"]
        assert (await s.http.get("/models")).json() == before
        assert (await s.http.post("/models/nosuch/activate")).status_code == 404


async def test_two_postgresql_replicas_follow_an_activation_and_fit_each_bank_once(bundle: Path, bundle_96: Path,
                                                                                   tmp_path: Path,
                                                                                   pg_url: str) -> None:
    names = [f"part-{i}" for i in range(6)]
    async with serve_in_process(bundle, tmp_path / "a", store=pg_url) as a, \
            serve_in_process(bundle, tmp_path / "b", store=pg_url) as b:
        for name in names:
            await _register(a, name, SHOTS)

        async def known() -> bool:
            return (await b.http.get("/classes")).json()["total"] == len(names)

        await wait_for_async(known, 10, "B holds A's classes")
        await asyncio.to_thread(a.app.state.runtime.repository.add, bundle_96, "v2", "test")
        r = await a.http.post("/models/v2/activate")
        assert r.status_code in (200, 202), r.text

        async def serving(s: InProcess) -> bool:
            return (await s.http.get("/models")).json()["serving"] == "v2"

        took = await wait_for_async(lambda: serving(b), 30, "B follows A's activation")
        await wait_for_async(lambda: serving(a), 30, "A switched")
        assert took < 10
        preps = [(await s.http.get("/models")).json()["preparation"] for s in (a, b)]
        assert [p["phase"] for p in preps] == ["done", "done"]
        assert sum(p["fitted"] for p in preps) == len(names)  # each class's v2 bank fitted by one replica only
        for s in (a, b):
            r = await s.http.post("/predict", files=_files(TESTS[:1]), data={"class_name": names[0]})
            assert r.status_code == 200 and r.json()["model"]["version"] == "v2"
        # one rollback call, and both follow
        assert (await b.http.post("/models/rollback")).status_code in (200, 202)
        v1 = read_manifest(bundle).fingerprint[:16]
        for s in (a, b):
            await wait_for_async(lambda s=s: _serving_is(s, v1), 30, "the rollback is followed")


async def _serving_is(s: InProcess, version: str) -> bool:
    return (await s.http.get("/models")).json()["serving"] == version
