"""The OpenAPI document as the server behaves: every error answer with the service's error body, the class-name
pattern, the role each operation needs (`x-sowa-role`, and in its description), and API-key security only while
keys are required (a key configured or stored: the document follows the server as keys come and go;
`tests/service/http/test_contract.py` runs schemathesis against it).

FastAPI derives the document from the routes; what it cannot know (which errors a route answers, through the
service's own handlers and middleware) is added here, from one table.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from ..core.runtime import Runtime
from ..core.settings import Settings
from .auth import required_role

__all__ = ["ERRORS", "install_openapi"]

# status -> (description, response headers it carries)
ERRORS: dict[int, tuple[str, tuple[str, ...]]] = {
    400: ("invalid_image: not an image, truncated or corrupt; bad_request: malformed multipart body", ()),
    401: ("unauthorized: X-API-Key missing, wrong or revoked", ("WWW-Authenticate",)),
    403: ("forbidden: the key's role does not reach this operation, or the class is outside its pattern", ()),
    404: ("class_not_found: unknown class; result_not_found: no kept result with that id; shot_not_found: the "
          "class has no shot with that hash; record_not_found: no record with that id (or no kept image)", ()),
    409: ("class_damaged: the class is stored but damaged; replace its shots or delete it", ()),
    413: ("payload_too_large: body over max_request_bytes, or images over the pixel limits", ()),
    422: ("invalid_request: bad class name, field value, or too many images or shots", ()),
    429: ("queue_full: more images waiting than max_queue; too_many_failed_keys: this address sent too many wrong "
          "keys in the last minute", ("Retry-After",)),
    503: ("not_ready: loading or shutting down; store_unavailable: the class or record store cannot be reached; "
          "records_unavailable: the inspection could not be recorded (unrecordable=503)",
          ("Retry-After",)),
    504: ("deadline_exceeded: no result within request_timeout_s", ()),
    507: ("insufficient_storage: the disk is full; nothing was changed", ("Retry-After",)),
}
_ANY = (400, 413)  # any request with a body may be malformed or too large
# (method, path) -> the error statuses its route can answer, besides 401 (with a key) and 503 (not ready)
_ROUTES: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/predict"): (*_ANY, 404, 409, 422, 429, 504),  # 503 records_unavailable with unrecordable=503
    ("post", "/classes/{name}/shots"): (*_ANY, 409, 422, 507),
    ("get", "/classes"): (422,),
    ("get", "/classes/{name}"): (404, 409, 422),
    ("patch", "/classes/{name}"): (*_ANY, 404, 409, 422, 507),
    ("delete", "/classes/{name}"): (404, 422),
    # the console's API (service/http/routes/results.py)
    ("get", "/classes/{name}/shots"): (404, 409, 422),
    ("get", "/classes/{name}/shots/{sha256}"): (404, 409, 422),
    ("get", "/classes/{name}/results"): (404, 409, 422),
    ("get", "/classes/{name}/scores"): (404, 409, 422),
    ("get", "/classes/{name}/quality"): (404, 409, 422),
    ("post", "/classes/{name}/shots/from-results"): (*_ANY, 404, 409, 422, 507),
    ("get", "/results/{result_id}"): (404, 422),
    ("get", "/results/{result_id}/thumbnail"): (404, 422),
    # inspection records (service/http/routes/records.py)
    ("get", "/records"): (403, 422), ("get", "/records/export"): (403, 422),
    ("get", "/records/{record_id}"): (404, 422), ("get", "/records/{record_id}/image"): (404, 422),
    ("get", "/records/{record_id}/thumbnail"): (404, 422),
    ("post", "/records/{record_id}/review"): (*_ANY, 404, 422),
    ("post", "/records/{record_id}/shot"): (*_ANY, 404, 409, 422, 507),
    ("get", "/auth/me"): (),
    ("get", "/keys"): (),
    ("post", "/keys"): (*_ANY, 409, 422, 507),
    ("delete", "/keys/{key_name}"): (404, 422),
    ("get", "/audit"): (422,), ("get", "/audit/export"): (422,),
    # the Open Inference Protocol v2 (service/http/routes/v2.py): errors in the protocol's shape, V2Error
    ("get", "/v2"): (), ("get", "/v2/health/live"): (), ("get", "/v2/health/ready"): (),
    ("get", "/v2/models/{model_name}"): (404, 409, 422), ("get", "/v2/models/{model_name}/ready"): (404, 409, 422),
    ("get", "/v2/models/{model_name}/versions/{model_version}"): (404, 409, 422),
    ("get", "/v2/models/{model_name}/versions/{model_version}/ready"): (404, 409, 422),
    ("post", "/v2/models/{model_name}/infer"): (*_ANY, 404, 409, 422, 429, 504),
    ("post", "/v2/models/{model_name}/versions/{model_version}/infer"): (*_ANY, 404, 409, 422, 429, 504),
    ("post", "/v2/repository/index"): (),
    # model versions (service/http/routes/models.py)
    ("get", "/models"): (),
    ("post", "/models/{version}/activate"): (*_ANY, 404, 409, 422),
    ("post", "/models/rollback"): (*_ANY, 409, 422), ("delete", "/models/shadow"): (),
    ("post", "/models/{version}/shadow"): (*_ANY, 404, 409, 422),
    ("get", "/models/{version}/shadow-report"): (404, 422),
}
# never behind the key, never "not ready"
_OPEN = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})

_ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {"type": "object", "required": ["code", "message"], "additionalProperties": False,
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}


_V2_ERROR_SCHEMA = {"type": "object", "required": ["error"], "additionalProperties": False,
                    "properties": {"error": {"type": "string"}}}  # the protocol's error, under /v2


def _error_response(status: int, schema: str = "Error") -> dict[str, Any]:
    description, headers = ERRORS[status]
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
    if headers:
        out["headers"] = {h: {"schema": {"type": "string"}} for h in headers}
    return out


def describe(app: FastAPI, settings: Settings, keyed: bool, routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The document; `keyed`: requests need a key now (security, 401 and 403 are then part of it); `routes` as
    declared, for the role each needs."""
    with warnings.catch_warnings():  # a GET+HEAD route gives both operations one id: made unique below
        warnings.filterwarnings("ignore", message="Duplicate Operation ID")
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    roles = {(m.lower(), r.path_format): required_role(r) for r in routes if isinstance(r, APIRoute) for m in r.methods}
    open_paths = _OPEN if not settings.metrics_need_key else _OPEN - {"/metrics"}
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = _ERROR_SCHEMA
    schemas["V2Error"] = _V2_ERROR_SCHEMA
    schemas.pop("HTTPValidationError", None)  # validation errors answer the service's error body
    schemas.pop("ValidationError", None)
    if not keyed:
        components.pop("securitySchemes", None)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            if method == "head" and "operationId" in op:
                op["operationId"] += "_head"
            role = roles.get((method, path))
            if role is not None:
                op["x-sowa-role"] = role.value
                op["description"] = (op.get("description", "") + f"\n\nNeeds the `{role.value}` role.").strip()
            if not keyed:
                op.pop("security", None)
            responses = op["responses"]
            responses.pop("422", None)  # FastAPI's own validation schema: replaced below
            statuses = set(_ROUTES.get((method, path), ()))
            if path not in open_paths:
                statuses.add(503)
                if keyed:
                    statuses.update((401, 429) if role is None else (401, 403, 429))
            v2 = path == "/v2" or path.startswith("/v2/")
            for status in sorted(statuses):
                responses[str(status)] = _error_response(status, "V2Error" if v2 else "Error")
    return doc


def install_openapi(app: FastAPI, settings: Settings, runtime: Runtime, routes: Sequence[BaseRoute]) -> None:
    """Serve `describe(app, settings, keyed)` at /openapi.json, `keyed` as the runtime's keys say now (each
    variant built once)."""
    built: dict[bool, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        keyed = runtime.keys.required
        if keyed not in built:
            built[keyed] = describe(app, settings, keyed, routes)
        return built[keyed]

    app.openapi = openapi  # type: ignore[method-assign]
