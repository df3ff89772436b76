"""Keys and the audit trail in PostgreSQL, with two replicas on one database: a key made on one works on the
other, and a revocation on one is enforced by the other within a second (pushed by NOTIFY, not polled)."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from tests.helpers import wait_for_async
from tests.in_process import serve_in_process

pytestmark = pytest.mark.anyio
ADMIN = {"X-API-Key": "configured-admin-key"}


async def test_a_revocation_on_one_replica_holds_on_the_other_within_a_second(bundle: Path, tmp_path: Path,
                                                                            pg_url: str) -> None:
    async with serve_in_process(bundle, tmp_path / "a", store=pg_url, api_key=ADMIN["X-API-Key"]) as a, \
            serve_in_process(bundle, tmp_path / "b", store=pg_url, api_key=ADMIN["X-API-Key"]) as b:
        made = await a.http.post("/keys", headers=ADMIN, json={"name": "line-1", "role": "inspect"})
        assert made.status_code == 201, made.text
        key = {"X-API-Key": made.json()["key"]}
        await wait_for_async(lambda: _status(b, key, 200), 1.0, "the new key works on the other replica")
        assert (await a.http.delete("/keys/line-1", headers=ADMIN)).status_code == 200
        start = time.monotonic()
        await wait_for_async(lambda: _status(b, key, 401), 1.0, "the revocation holds on the other replica")
        took = time.monotonic() - start
        assert took < 1.0
        listed = (await b.http.get("/keys", headers=ADMIN)).json()["keys"]
        assert [(k["name"], k["created_by"], k["revoked_by"]) for k in listed] == [
            ("line-1", "SOWA_API_KEY", "SOWA_API_KEY")]
    with psycopg.connect(pg_url) as conn:  # the trail is in the database, and holds no key material
        rows = conn.execute("SELECT actor, action, target, before::text, after::text FROM sowa_audit "
                            "WHERE target = 'line-1' ORDER BY id").fetchall()
        stored = conn.execute("SELECT secret_sha256 FROM sowa_keys WHERE name = 'line-1'").fetchone()[0]
    assert [r[:3] for r in rows] == [("SOWA_API_KEY", "key.added", "line-1"), ("SOWA_API_KEY", "key.revoked",
                                                                              "line-1")]
    secret = made.json()["key"].rsplit("_", 1)[1]
    assert all(secret not in str(r) and stored not in str(r) for r in rows)


async def _status(app: object, headers: dict[str, str], expected: int) -> bool:
    return (await app.http.get("/classes", headers=headers)).status_code == expected  # type: ignore[attr-defined]
