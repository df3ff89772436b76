"""The Open Inference Protocol v2 over HTTP (KServe v2, as Triton's clients speak it), beside the service's own API.

Health, server and model metadata, readiness and infer, with Triton's binary tensor extension (a JSON header of
`Inference-Header-Content-Length` bytes, then the tensors' bytes) and its repository index. The mapping onto the
service (models are classes, inputs, outputs) is service/core/oip.py; infer takes `Backend.score`, so limits,
admission, batching and results are /predict's, in one process or in each HTTP worker. Errors answer the
protocol's `{"error": "<message>"}` with the service's status codes (`ProtocolErrors`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...core import oip
from ...core.access.roles import Principal, Role
from ...core.errors import ClassNotFoundError, ForbiddenError, PayloadTooLargeError, UnprocessableError
from ..auth import PrincipalDep, Requires
from ..deps import RegistryDep, RuntimeDep, ServingDep
from .predict import _unless_client_leaves

__all__ = ["PREFIX", "ProtocolErrors", "health_router", "repository_router", "router"]

PREFIX = "/v2"
HEADER_LENGTH = "Inference-Header-Content-Length"
_MAX_JSON = 4 * 2**20  # bytes of a request's JSON: about a million numbers (oip.MAX_LISTED_VALUES)
_MODEL = Annotated[str, Path(max_length=128, description="a registered class, or 'zero-shot'")]
_VERSION = Annotated[str, Path(max_length=16, description="'1', the only version")]

health_router = APIRouter(prefix=PREFIX, tags=["v2"])  # open, as /healthz and /readyz
router = APIRouter(prefix=PREFIX, tags=["v2"], dependencies=[Depends(Requires(Role.INSPECT))])
repository_router = APIRouter(prefix=PREFIX, tags=["v2"], dependencies=[Depends(Requires(Role.INSPECT))])

_JSON = {"application/json": {"schema": {"type": "object"}}}
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": f"the JSON header ({HEADER_LENGTH} bytes), then the tensors"}}},
    "responses": {"200": {"description": "the outputs (binary ones after the JSON header)",
                          "content": {**_JSON, "application/octet-stream": {}}}}}


@health_router.get("/health/live", summary="Server live (OIP v2)")
async def live() -> dict:
    return {"live": True}


@health_router.get("/health/ready", summary="Server ready (OIP v2)", responses={503: {"content": _JSON}})
async def ready(runtime: RuntimeDep) -> Response:
    ok = runtime.status.ready
    return Response(json.dumps({"ready": ok}), 200 if ok else 503, media_type="application/json")


@router.get("", summary="Server metadata (OIP v2)")
async def server_metadata() -> dict:
    return {"name": oip.SERVER_NAME, "version": oip.server_version(), "extensions": list(oip.EXTENSIONS)}


async def _model(runtime: Any, principal: Principal, model: str, version: str | None) -> None:
    """404 for a model that is not served (or another version), 403 for a class outside the key's pattern."""
    _check_version(model, version)
    name = oip.class_of(model)
    if name is not None:
        _check_reach(principal, name)
        await runtime.backend.check_class(name)


def _check_version(model: str, version: str | None) -> None:
    if version is not None and version != "1":
        raise ClassNotFoundError(f"model '{model[:64]}' has no version '{version[:16]}'; its one version is '1'")


def _check_reach(principal: Principal, name: str) -> None:
    if not principal.may_touch(name):
        raise ForbiddenError(f"key '{principal.name}' may touch classes matching '{principal.classes}' only, "
                             f"not '{name}'")


@router.get("/models/{model_name}", summary="Model metadata (OIP v2)")
async def model_metadata(runtime: ServingDep, principal: PrincipalDep, model_name: _MODEL) -> dict:
    await _model(runtime, principal, model_name, None)
    return oip.model_metadata(model_name, runtime.backend.image_size)


@router.get("/models/{model_name}/versions/{model_version}", summary="Model version metadata (OIP v2)")
async def model_version_metadata(runtime: ServingDep, principal: PrincipalDep, model_name: _MODEL,
                                 model_version: _VERSION) -> dict:
    await _model(runtime, principal, model_name, model_version)
    return oip.model_metadata(model_name, runtime.backend.image_size)


@router.get("/models/{model_name}/ready", summary="Model ready (OIP v2)")
async def model_ready(runtime: ServingDep, principal: PrincipalDep, model_name: _MODEL) -> dict:
    await _model(runtime, principal, model_name, None)
    return {"name": model_name, "ready": True}


@router.get("/models/{model_name}/versions/{model_version}/ready", summary="Model version ready (OIP v2)")
async def model_version_ready(runtime: ServingDep, principal: PrincipalDep, model_name: _MODEL,
                              model_version: _VERSION) -> dict:
    await _model(runtime, principal, model_name, model_version)
    return {"name": model_name, "ready": True}


@repository_router.post("/repository/index", summary="Models served (OIP v2 repository extension)")
async def repository_index(registry: RegistryDep, principal: PrincipalDep) -> list[dict]:
    names = [oip.ZERO_SHOT, *(n for n in registry.names() if principal.may_touch(n))]
    return [{"name": n, "version": "1", "state": "READY"} for n in names]


@router.post("/models/{model_name}/infer", summary="Infer (OIP v2)", openapi_extra=_INFER_BODY)
async def infer(request: Request, runtime: ServingDep, principal: PrincipalDep, model_name: _MODEL) -> Response:
    return await _infer(request, runtime, principal, model_name)


@router.post("/models/{model_name}/versions/{model_version}/infer", summary="Infer a version (OIP v2)",
             openapi_extra=_INFER_BODY)
async def infer_version(request: Request, runtime: ServingDep, principal: PrincipalDep, model_name: _MODEL,
                        model_version: _VERSION) -> Response:
    _check_version(model_name, model_version)
    return await _infer(request, runtime, principal, model_name)


async def _infer(request: Request, runtime: Any, principal: Principal, model_name: str) -> Response:
    name = oip.class_of(model_name)  # whether it exists Backend.score asks, before the tensors are read
    if name is not None:
        _check_reach(principal, name)
    body = await request.body()  # within max_request_bytes (BodyLimitMiddleware)
    parsed, binary_out = _parse(body, request.headers.get(HEADER_LENGTH), model_name)
    s = runtime.settings
    scored, outputs = await _unless_client_leaves(request, oip.infer(
        runtime.backend, parsed, s.request_timeout_s, runtime.limits, runtime.decode_budget,
        s.max_images_per_request, int(s.results_max_image_mb * 2**20)))
    runtime.telemetry.images.inc(len(scored.images))
    return await asyncio.to_thread(_answer, parsed, outputs, binary_out)


def _fail(message: str) -> UnprocessableError:
    return UnprocessableError(message)


def _parse(body: bytes, header_length: str | None, model: str) -> tuple[oip.InferRequest, set[str] | bool]:
    """The request's JSON header and binary tensors; gives which outputs answer in binary (True: all)."""
    view = memoryview(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _fail(f"{HEADER_LENGTH}: a byte count within the body ({len(body)} bytes)")
        header, binary = view[:int(header_length)], view[int(header_length):]
    else:
        header, binary = view, view[len(view):]
    if len(header) > _MAX_JSON:  # parsed into Python objects: bounded apart from the body (binary tensors are not)
        raise PayloadTooLargeError(f"a JSON request header over {_MAX_JSON} bytes; send images as binary tensors "
                                   f"({HEADER_LENGTH})")
    try:
        doc = json.loads(bytes(header))
    except (ValueError, UnicodeDecodeError):
        raise _fail("the request's JSON header is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise _fail("the request is a JSON object with an 'inputs' list")
    parameters = doc.get("parameters") or {}
    request_id = doc.get("id", "")
    if not isinstance(parameters, dict) or not isinstance(request_id, str):
        raise _fail("'parameters' is an object and 'id' a string")
    inputs, at = [], 0
    for t in doc["inputs"]:
        tensor, used = _input(t, binary[at:])
        inputs.append(tensor)
        at += used
    if at != len(binary):
        raise _fail(f"{len(binary) - at} bytes after the tensors' binary data")
    outputs, binary_out = _outputs(doc.get("outputs"), parameters.get("binary_data_output") is True)
    return oip.InferRequest(model, inputs, parameters, outputs, request_id), binary_out


def _input(t: Any, rest: memoryview) -> tuple[oip.InputTensor, int]:
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str) \
            or not isinstance(t.get("shape"), list) \
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in t["shape"]) or len(t["shape"]) > 8:
        raise _fail("each input has a name, a datatype and a shape (a list of at most 8 integers)")
    name, shape = t["name"][:64], tuple(t["shape"])
    size = (t.get("parameters") or {}).get("binary_data_size") if isinstance(t.get("parameters"), dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(rest):
            raise _fail(f"input {name}: binary_data_size beyond the body's binary data")
        return oip.InputTensor(name, t["datatype"], shape, rest[:size]), size
    data = t.get("data")
    if not isinstance(data, list):
        raise _fail(f"input {name}: no 'data' and no binary_data_size")
    return oip.InputTensor(name, t["datatype"], shape, _flatten(data, name)), 0


def _flatten(data: list, name: str) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        if len(out) > oip.MAX_LISTED_VALUES:
            raise PayloadTooLargeError(f"input {name}: more than {oip.MAX_LISTED_VALUES} values as JSON; send it as "
                                       "a binary tensor")
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 8:
                    raise _fail(f"input {name}: data nested deeper than its shape")
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _outputs(asked: Any, all_binary: bool) -> tuple[list[str] | None, set[str] | bool]:
    if asked is None:
        return None, all_binary
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise _fail("'outputs' is a list of objects with a name")
    binary = {o["name"] for o in asked
              if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data") is True}
    return [o["name"] for o in asked], binary


def _answer(request: oip.InferRequest, outputs: list[oip.OutputTensor], binary: set[str] | bool) -> Response:
    described, chunks = [], []
    for t in outputs:
        d: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary is True or (binary and t.name in binary):
            raw = t.raw()
            d["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif t.datatype == "BYTES":
            d["data"] = [b.decode("utf-8", "replace") for b in t.array.reshape(-1)]
        else:
            d["data"] = t.array.reshape(-1).tolist()
        described.append(d)
    head = json.dumps({"model_name": request.model, "model_version": "1", "id": request.id,
                       "outputs": described}).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *chunks]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})


class ProtocolErrors:
    """Under /v2, an error answers the protocol's `{"error": "<message>"}`: the service's error bodies, from
    whichever handler or middleware answered, keep their status and headers and lose only their code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] == PREFIX or scope["path"].startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        parts: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = _protocol_error(b"".join(parts))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)


def _protocol_error(body: bytes) -> bytes:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return json.dumps({"error": error["message"]}).encode()
    return body

