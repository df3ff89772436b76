"""GET /classes a page at a time, what it carries for the console's class table, and the cap on classes: the
service in-process (tests/in_process.py) with the tiny bundle, classes registered through the API."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.client import ApiError
from service.core.settings import Settings
from tests.in_process import InProcess, serve_in_process


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


async def _register(svc: InProcess, names: list[str]) -> None:
    for i, name in enumerate(names):
        await svc.client.register_shots(name, [(f"{name}.png", _png(i))])


@pytest.mark.anyio
async def test_pages_walk_every_class_once_in_name_order(bundle: Path, tmp_path: Path) -> None:
    names = [f"part-{i:02d}" for i in (7, 3, 11, 0, 5, 9, 1)]
    async with serve_in_process(bundle, tmp_path / "data", warmup=False) as svc:
        await _register(svc, names)
        seen, after, pages = [], None, 0
        while True:
            params = {"limit": 3} if after is None else {"limit": 3, "after": after}
            body = (await svc.http.get("/classes", params=params)).json()
            assert body["total"] == 7 and len(body["classes"]) <= 3
            seen += [c["name"] for c in body["classes"]]
            pages, after = pages + 1, body["next"]
            if after is None:
                break
        assert seen == sorted(names) and pages == 3
        assert [c.name for c in await svc.client.list_classes()] == sorted(names)  # the client walks the pages

        # a class deleted between two pages moves no other: the cursor is a name, not an offset
        first = (await svc.http.get("/classes", params={"limit": 3})).json()
        await svc.client.delete_class(first["classes"][0]["name"])
        rest = (await svc.http.get("/classes", params={"limit": 10, "after": first["next"]})).json()
        assert [c["name"] for c in rest["classes"]] == sorted(names)[3:] and rest["total"] == 6
        assert rest["next"] is None

        default = (await svc.http.get("/classes")).json()  # no parameters: the first 100, as before
        assert [c["name"] for c in default["classes"]] == sorted(names)[1:] and default["next"] is None
        for bad in ({"limit": 0}, {"limit": 1001}, {"after": "x" * 65}, {"recent": 9}):
            r = await svc.http.get("/classes", params=bad)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad


@pytest.mark.anyio
async def test_the_list_carries_what_the_class_table_shows(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", warmup=False) as svc:
        await _register(svc, ["belt", "gear"])
        await svc.client.predict([("a.png", _png(5)), ("b.png", _png(6))], class_name="gear", keep=True)
        plain = (await svc.http.get("/classes")).json()["classes"]
        gear_info = (await svc.http.get("/classes/gear")).json()
        assert {k: plain[1][k] for k in gear_info} == gear_info  # every field of GET /classes/{name}
        shots = (await svc.http.get("/classes/gear/shots")).json()["shots"]
        assert plain[1]["first_shot"] == shots[0]["sha256"]
        assert plain[1]["first_shot_thumbnail"] is None and plain[1]["recent_results"] is None

        full = (await svc.http.get("/classes", params={"recent": 4, "thumbnails": "true"})).json()["classes"]
        belt, gear = full
        assert belt["recent_results"] == [] and len(gear["recent_results"]) == 2
        kept = (await svc.http.get("/classes/gear/results", params={"limit": 4, "thumbnails": "true"})).json()
        assert gear["recent_results"] == kept["results"]  # what the console fetched per class before
        thumb = (await svc.http.get(f"/classes/gear/shots/{shots[0]['sha256']}",
                                    params={"thumbnail": "true"})).content
        assert gear["first_shot_thumbnail"] == base64.b64encode(thumb).decode("ascii")


@pytest.mark.anyio
async def test_a_class_beyond_max_classes_is_refused_and_nothing_changes(bundle: Path, tmp_path: Path) -> None:
    assert Settings(bundle=bundle, max_classes=2).max_classes == 2
    async with serve_in_process(bundle, tmp_path / "data", warmup=False) as svc:
        svc.app.state.runtime.registry.max_classes = 2  # what SOWA_MAX_CLASSES sets
        await _register(svc, ["belt", "gear"])
        before = sorted(p.name for p in (tmp_path / "data" / "classes").iterdir())
        marker = (tmp_path / "data" / "classes" / ".generation").read_bytes()
        with pytest.raises(ApiError) as refused:
            await svc.client.register_shots("third", [("t.png", _png(9))])
        assert refused.value.status == 409 and refused.value.code == "too_many_classes"
        assert "max_classes" in refused.value.message
        assert sorted(p.name for p in (tmp_path / "data" / "classes").iterdir()) == before
        assert (tmp_path / "data" / "classes" / ".generation").read_bytes() == marker  # nothing written
        assert not (tmp_path / "data" / "locks" / "third.lock").exists()
        assert [c.name for c in await svc.client.list_classes()] == ["belt", "gear"]

        info = await svc.client.register_shots("gear", [("g2.png", _png(10))])  # a class held can still change
        assert info.shots == 2
        await svc.client.delete_class("belt")  # room again
        assert (await svc.client.register_shots("third", [("t.png", _png(9))])).shots == 1
        assert not (tmp_path / "data" / "locks" / "belt.lock").exists()  # the lock file went with its class
        assert json.loads((tmp_path / "data" / "classes" / "third" / "class.json").read_text())["name"] == "third"


@pytest.mark.anyio
async def test_registrations_at_once_do_not_pass_the_cap(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", warmup=False) as svc:
        svc.app.state.runtime.registry.max_classes = 3
        results = await asyncio.gather(*(svc.client.register_shots(f"c{i}", [("s.png", _png(i))])
                                         for i in range(6)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, ApiError)]
        assert len(refused) == 3 and all(r.code == "too_many_classes" for r in refused)
        assert len(await svc.client.list_classes()) == 3
