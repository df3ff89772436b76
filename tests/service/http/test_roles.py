"""Who may do what: every operation of the OpenAPI document, called with every kind of key, answers as the key's
role allows and nothing else; a new route must join the table below (the test fails on one missing from it).

Keys: none, a wrong one, a revoked one, inspect, inspect limited to other classes, operate, admin, and the
configured SOWA_API_KEY (an admin). A call the role allows must not answer 401 or 403 (each is made so that it
changes nothing: an invalid body, an unknown name); a call it does not allow answers 403 naming the role needed,
and one without a valid key 401, before the body is read.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.core.access.audit import AuditEvent
from service.core.access.keys import new_key
from service.core.access.roles import Role
from tests.helpers import PARITY
from tests.in_process import InProcess, serve_in_process

pytestmark = pytest.mark.anyio

ADMIN_KEY = "configured-admin-key"
SHOTS = sorted(PARITY.glob("shots/*.png"))

# (method, path) -> the least role; None: open to anyone (no key needed)
EXPECTED: dict[tuple[str, str], Role | None] = {
    ("get", "/healthz"): None, ("head", "/healthz"): None, ("get", "/readyz"): None, ("get", "/metrics"): None,
    ("get", "/ui/config.json"): None,
    ("post", "/predict"): Role.INSPECT,
    ("get", "/auth/me"): Role.INSPECT,
    ("get", "/classes"): Role.INSPECT,
    ("get", "/classes/{name}"): Role.INSPECT,
    ("patch", "/classes/{name}"): Role.OPERATE,
    ("delete", "/classes/{name}"): Role.ADMIN,
    ("post", "/classes/{name}/shots"): Role.OPERATE,
    ("get", "/classes/{name}/shots"): Role.INSPECT,
    ("get", "/classes/{name}/shots/{sha256}"): Role.INSPECT,
    ("post", "/classes/{name}/shots/from-results"): Role.OPERATE,
    ("get", "/classes/{name}/scores"): Role.INSPECT,
    ("get", "/classes/{name}/quality"): Role.INSPECT,
    ("get", "/classes/{name}/results"): Role.INSPECT,
    ("get", "/results/{result_id}"): Role.INSPECT,
    ("get", "/results/{result_id}/thumbnail"): Role.INSPECT,
    ("get", "/keys"): Role.ADMIN,
    ("post", "/keys"): Role.ADMIN,
    ("delete", "/keys/{key_name}"): Role.ADMIN,
    ("get", "/audit"): Role.ADMIN,
    ("get", "/audit/export"): Role.ADMIN,
    ("get", "/records"): Role.INSPECT,
    ("get", "/records/export"): Role.INSPECT,
    ("get", "/records/{record_id}"): Role.INSPECT,
    ("get", "/records/{record_id}/image"): Role.INSPECT,
    ("get", "/records/{record_id}/thumbnail"): Role.INSPECT,
    ("post", "/records/{record_id}/review"): Role.OPERATE,
    ("post", "/records/{record_id}/shot"): Role.OPERATE,
    # the Open Inference Protocol v2 (service/http/routes/v2.py); its health is open, as /healthz and /readyz
    ("get", "/v2/health/live"): None, ("get", "/v2/health/ready"): None,
    ("get", "/v2"): Role.INSPECT,
    ("get", "/v2/models/{model_name}"): Role.INSPECT,
    ("get", "/v2/models/{model_name}/ready"): Role.INSPECT,
    ("get", "/v2/models/{model_name}/versions/{model_version}"): Role.INSPECT,
    ("get", "/v2/models/{model_name}/versions/{model_version}/ready"): Role.INSPECT,
    ("post", "/v2/models/{model_name}/infer"): Role.INSPECT,
    ("post", "/v2/models/{model_name}/versions/{model_version}/infer"): Role.INSPECT,
    ("post", "/v2/repository/index"): Role.INSPECT,
    # model versions (service/http/routes/models.py): reading for any role, changing for an admin
    ("get", "/models"): Role.INSPECT,
    ("get", "/models/{version}/shadow-report"): Role.INSPECT,
    ("post", "/models/{version}/activate"): Role.ADMIN, ("post", "/models/{version}/shadow"): Role.ADMIN,
    ("post", "/models/rollback"): Role.ADMIN, ("delete", "/models/shadow"): Role.ADMIN,
}
# what a call sends so that, allowed, it changes nothing: an invalid body, or a name that does not exist
BODIES: dict[tuple[str, str], dict] = {
    ("post", "/predict"): {"data": {"heatmap": "bogus"}},
    ("patch", "/classes/{name}"): {"json": {"threshold": 7}},
    ("post", "/classes/{name}/shots"): {"data": {"mode": "bogus"}},
    ("post", "/classes/{name}/shots/from-results"): {"json": {"result_ids": []}},
    ("post", "/keys"): {"json": {"name": "Not A Name!", "role": "inspect"}},
    ("post", "/records/{record_id}/review"): {"json": {"verdict": "bogus"}},
    ("post", "/v2/models/{model_name}/infer"): {"json": {"inputs": []}},
    ("post", "/v2/models/{model_name}/versions/{model_version}/infer"): {"json": {"inputs": []}},
}


async def _make_keys(app: InProcess) -> dict[str, str | None]:
    store = app.app.state.runtime.access
    made: dict[str, str | None] = {"none": None, "wrong": "sowa_0123456789abcdef_" + "x" * 43,
                                   "configured": ADMIN_KEY}
    for name, role, classes in (("inspect", Role.INSPECT, None), ("limited", Role.INSPECT, "other-*"),
                                ("operate", Role.OPERATE, None), ("admin", Role.ADMIN, None),
                                ("revoked", Role.ADMIN, None)):
        text, record = new_key(f"test-{name}", role, classes, "test")
        await asyncio.to_thread(store.add_key, record, AuditEvent("test", "key.added", record.name))
        made[name] = text
    await asyncio.to_thread(store.revoke_key, "test-revoked", "test", AuditEvent("test", "key.revoked", "x"))
    return made


@pytest.fixture
async def served(bundle: Path, tmp_path: Path) -> AsyncIterator[tuple[InProcess, dict[str, str | None]]]:
    async with serve_in_process(bundle, tmp_path / "data", api_key=ADMIN_KEY,
                                auth_failures_per_minute=10_000) as s:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in SHOTS[:2]]
        r = await s.http.post("/classes/widget/shots", files=files, headers={"X-API-Key": ADMIN_KEY})
        assert r.status_code == 200, r.text
        yield s, await _make_keys(s)


def _expected(key: str, role: Role | None, path: str) -> set[int] | None:
    """The statuses a call may not answer (None: no constraint beyond 'not 401/403')."""
    if role is None:
        return None
    if key in ("none", "wrong", "revoked"):
        return {401}
    held = {"inspect": Role.INSPECT, "limited": Role.INSPECT, "operate": Role.OPERATE, "admin": Role.ADMIN,
            "configured": Role.ADMIN}[key]
    if not held.includes(role) or (key == "limited" and ("{name}" in path or "{model_name}" in path)):
        return {403}
    return None


async def test_every_operation_answers_as_each_role_allows(served: tuple[InProcess, dict[str, str | None]]) -> None:
    s, keys = served
    admin = {"X-API-Key": ADMIN_KEY}
    doc = (await s.http.get("/openapi.json", headers=admin)).json()
    ops = {(m, p) for p, item in doc["paths"].items() for m in item if m in ("get", "head", "post", "put",
                                                                           "patch", "delete")}
    ops |= {("get", "/ui/config.json")} if ("get", "/ui/config.json") not in ops else set()
    missing = ops - set(EXPECTED)
    assert not missing, f"routes missing from the roles table: {sorted(missing)}"
    assert not set(EXPECTED) - ops, f"the table names routes that do not exist: {sorted(set(EXPECTED) - ops)}"
    for (method, path), role in EXPECTED.items():  # the document says the same as the table
        op = doc["paths"].get(path, {}).get(method, {})
        assert op.get("x-sowa-role") == (role.value if role else None), (method, path)

    shot = (await s.http.get("/classes/widget/shots", headers=admin)).json()["shots"][0]["sha256"]
    values = {"name": "widget", "sha256": shot, "result_id": "0" * 32, "record_id": "0" * 32, "key_name": "nosuch-key",
              "model_name": "widget", "model_version": "1", "version": "nosuch-version"}
    failures = []
    for (method, path), role in sorted(EXPECTED.items(), key=lambda kv: kv[0]):
        named = {**values, "name": "nosuch-class"} if method == "delete" else values  # allowed, it deletes nothing
        url = re.sub(r"\{(\w+)\}", lambda m, named=named: named[m.group(1)], path)
        for key, text in keys.items():
            headers = {"X-API-Key": text} if text else {}
            r = await s.http.request(method.upper(), url, headers=headers, **BODIES.get((method, path), {}))
            forbidden = _expected(key, role, path)
            if forbidden is None:
                ok = r.status_code not in (401, 403)
            else:
                ok = r.status_code in forbidden
                if ok and r.status_code == 403 and role is not None and key != "limited":
                    ok = f"needs the {role.value} role" in r.json()["error"]["message"]
            if not ok:
                failures.append(f"{method.upper()} {path} with {key}: {r.status_code} {r.text[:120]}")
    assert not failures, "\n".join(failures)
    # nothing changed: the class and its shots are as registered, no key was added
    assert (await s.http.get("/classes/widget", headers=admin)).json()["shots"] == 2
    listed = (await s.http.get("/keys", headers=admin)).json()["keys"]
    assert sorted(k["name"] for k in listed) == sorted(f"test-{k}" for k in ("inspect", "limited", "operate",
                                                                               "admin", "revoked"))


async def test_a_limited_key_sees_only_its_classes(served: tuple[InProcess, dict[str, str | None]]) -> None:
    s, keys = served
    admin = {"X-API-Key": ADMIN_KEY}
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in SHOTS[:2]]
    assert (await s.http.post("/classes/other-a/shots", files=files, headers=admin)).status_code == 200
    limited = {"X-API-Key": keys["limited"]}
    listed = (await s.http.get("/classes", headers=limited)).json()
    assert [c["name"] for c in listed["classes"]] == ["other-a"] and listed["total"] == 1
    png = SHOTS[0].read_bytes()
    scored = await s.http.post("/predict", headers=limited, data={"class_name": "widget", "keep": "true"},
                               files=[("images", ("t.png", png, "image/png"))])
    assert scored.status_code == 403
    kept = await s.http.post("/predict", headers=admin, data={"class_name": "widget", "keep": "true"},
                             files=[("images", ("t.png", png, "image/png"))])
    result_id = kept.json()["results"][0]["result_id"]
    assert (await s.http.get(f"/results/{result_id}", headers=limited)).status_code == 404  # another class's
    assert (await s.http.get(f"/results/{result_id}", headers=admin)).status_code == 200
    me = (await s.http.get("/auth/me", headers=limited)).json()
    assert me == {"name": "test-limited", "role": "inspect", "classes": "other-*", "keys_required": True,
                  "may": {"inspect": True, "operate": False, "admin": False}}


async def test_keys_over_http_and_the_guard_rails(served: tuple[InProcess, dict[str, str | None]]) -> None:
    s, keys = served
    admin = {"X-API-Key": keys["admin"]}
    made = await s.http.post("/keys", headers=admin, json={"name": "cam-7", "role": "inspect"})
    assert made.status_code == 201 and made.json()["key"].startswith("sowa_")
    cam = {"X-API-Key": made.json()["key"]}
    assert (await s.http.get("/classes/widget", headers=cam)).status_code == 200
    assert (await s.http.delete("/classes/widget", headers=cam)).json()["error"]["message"].startswith(
        "this needs the admin role; key 'cam-7' has inspect")
    assert (await s.http.post("/keys", headers=admin, json={"name": "cam-7", "role": "inspect"})).status_code == 409
    assert (await s.http.delete("/keys/cam-7", headers=admin)).status_code == 200
    assert (await s.http.get("/classes/widget", headers=cam)).status_code == 401  # revoked: at once, here
    assert (await s.http.delete("/keys/cam-7", headers=admin)).status_code == 404
    # two X-API-Key headers: refused, whichever would have been read
    twice = httpx.Headers([("X-API-Key", keys["admin"]), ("X-API-Key", "x")])
    assert (await s.http.get("/classes", headers=twice)).status_code == 400
    # no secret at rest: the store holds the secret's hash, never the key
    raw = (Path(s.app.state.runtime.settings.data_dir) / "access.sqlite3").read_bytes()
    secret = made.json()["key"].rsplit("_", 1)[1]
    assert secret.encode() not in raw and made.json()["key"].encode() not in raw


async def test_wrong_keys_are_throttled_per_address(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", api_key=ADMIN_KEY, auth_failures_per_minute=5) as s:
        statuses = [(await s.http.get("/classes", headers={"X-API-Key": f"guess-{i}"})).status_code
                    for i in range(8)]
        assert statuses == [401] * 5 + [429] * 3
        blocked = await s.http.get("/classes", headers={"X-API-Key": ADMIN_KEY})  # even the right one, for now
        assert blocked.status_code == 429 and blocked.headers["Retry-After"] == "60"
        assert (await s.http.get("/healthz")).status_code == 200  # the open paths stay open


async def test_with_no_key_anywhere_the_service_is_open_until_the_first_key(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data") as s:
        assert (await s.http.get("/classes")).status_code == 200
        me = (await s.http.get("/auth/me")).json()
        assert me["name"] == "anonymous" and me["keys_required"] is False
        made = await s.http.post("/keys", json={"name": "first-admin", "role": "admin"})
        assert made.status_code == 201, (made.text, me, s.app.state.runtime.keys.required)
        assert (await s.http.get("/classes")).status_code == 401  # keys are required from now on
        assert (await s.http.get("/ui/config.json")).json()["api_key_required"] is True
        assert (await s.http.get("/classes", headers={"X-API-Key": made.json()["key"]})).status_code == 200


async def test_revoking_the_last_key_keeps_the_service_closed(bundle: Path, tmp_path: Path) -> None:
    """Open means no key was ever stored: revoking the only key must not hand the service to anyone."""
    async with serve_in_process(bundle, tmp_path / "data") as s:
        made = await s.http.post("/keys", json={"name": "only-admin", "role": "admin"})
        key = {"X-API-Key": made.json()["key"]}
        assert (await s.http.delete("/keys/only-admin", headers=key)).status_code == 200
        assert (await s.http.get("/classes")).status_code == 401
        assert (await s.http.post("/keys", json={"name": "sneaky", "role": "admin"})).status_code == 401
        assert (await s.http.get("/ui/config.json")).json()["api_key_required"] is True


async def test_a_limited_admin_cannot_reach_beyond_its_classes(served: tuple[InProcess, dict[str, str | None]]) -> None:
    """An admin key limited to some classes cannot make itself an unlimited key, nor read the whole trail."""
    s, _ = served
    store = s.app.state.runtime.access
    text, record = new_key("line-admin", Role.ADMIN, "line1-*", "test")
    await asyncio.to_thread(store.add_key, record, AuditEvent("test", "key.added", record.name))
    limited = {"X-API-Key": text}
    for method, path, body in (("POST", "/keys", {"json": {"name": "escalated", "role": "admin"}}),
                               ("GET", "/keys", {}), ("DELETE", "/keys/test-admin", {}), ("GET", "/audit", {})):
        r = await s.http.request(method, path, headers=limited, **body)
        assert r.status_code == 403 and "for all classes" in r.json()["error"]["message"], (path, r.text)
    assert (await s.http.delete("/classes/line1-x", headers=limited)).status_code == 404  # its own: allowed
    with pytest.raises(ValueError, match="reserved"):
        new_key("anonymous", Role.INSPECT, None, "test")
