"""The OpenAPI document describes what the server does: schemathesis (every built-in check) against the app
in-process, its lifespan run by schemathesis' ASGI transport; a few examples per operation (issue #14, item 7).

The same run against a server over HTTP, from the checkout: `schemathesis run --checks all
http://HOST:PORT/openapi.json` (it reads schemathesis.toml, as this test does).
"""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402  (after the skip: both come with schemathesis)
from schemathesis.config import SchemathesisConfig  # noqa: E402

from service.core.settings import Settings  # noqa: E402
from service.http.app import create_app  # noqa: E402
from tests.helpers import REPO, wait_for  # noqa: E402
from tests.in_process import serve_in_process  # noqa: E402

CONFIG = SchemathesisConfig.from_path(REPO / "schemathesis.toml")
# keyed, as a deployment is: /keys can add a key, which turns keys on for an open server mid-run
KEY = "contract-admin-key"


@pytest.fixture(scope="module")
def api_schema(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    work = tmp_path_factory.mktemp("contract-data")
    app = create_app(Settings(bundle=bundle, data_dir=Path(work / "data"), device="cpu", max_wait_ms=5,
                              max_image_pixels=200_000, max_request_pixels=300_000,
                              max_request_bytes=2 * 1024 * 1024, max_images_per_request=6, max_shots_per_class=5,
                              api_key=KEY, auth_failures_per_minute=10_000,
                              allowed_hosts=["testserver"]))  # the name schemathesis' ASGI transport calls it by
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG,  # starts the lifespan
                                            headers={"X-API-Key": KEY})
    wait_for(lambda: app.state.runtime.status.ready or app.state.runtime.status.error, 60, "the app is ready")
    assert app.state.runtime.status.ready, app.state.runtime.status.error
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@pytest.mark.slow
def test_the_api_does_what_its_openapi_says(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"X-API-Key": KEY})


@pytest.mark.anyio
async def test_security_head_and_malformed_multipart_are_described(bundle: Path, tmp_path: Path) -> None:
    plain = create_app(Settings(bundle=tmp_path, data_dir=tmp_path / "data"))
    keyed = create_app(Settings(bundle=tmp_path, data_dir=tmp_path / "data", api_key="k" * 16))
    doc, kdoc = plain.openapi(), keyed.openapi()
    ops = [op for item in doc["paths"].values() for op in item.values()]
    assert "securitySchemes" not in doc.get("components", {}) and not any("security" in op for op in ops)
    assert not any("401" in op["responses"] for op in ops)
    assert "APIKeyHeader" in kdoc["components"]["securitySchemes"]
    assert "401" in kdoc["paths"]["/predict"]["post"]["responses"]
    shots = doc["paths"]["/classes/{name}/shots"]["post"]
    assert shots["parameters"][0]["schema"]["pattern"] == "^[a-z0-9][a-z0-9_.-]{0,63}$"
    body = doc["components"]["schemas"][shots["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
                                        .rsplit("/", 1)[1]]
    assert body["properties"]["images"]["minItems"] == 1
    assert set(doc["paths"]["/predict"]["post"]["responses"]) >= {"400", "404", "413", "422", "429", "503", "504"}
    async with serve_in_process(bundle, tmp_path / "served") as svc:
        http = svc.http
        assert (await http.head("/healthz")).status_code == 200
        r = await http.post("/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text
        r = await http.put("/classes/widget")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"
