"""The Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`), on its own port (`grpc_port`).

It runs in the process that holds the model (a single process, or the engine process behind HTTP workers) and
takes the same path as every prediction: the tensors are mapped by service/core/oip.py and scored by
`Backend.score`, so limits, admission, batching and numbers are /predict's. The same keys and roles as HTTP: the
API key in the `x-api-key` metadata, infer needs the inspect role, wrong keys are throttled per address. The
service's errors become gRPC status codes (`STATUS`); a queue full is RESOURCE_EXHAUSTED with `retry-after` in
the trailing metadata. A message over `max_request_bytes` is refused by gRPC itself before it is read whole.

ModelStreamInfer (Triton's streaming call, for cameras that send a stream) answers each request on the stream
in order; a request's error answers that request (`error_message`), and the stream goes on. A few requests of a
stream are scored at once (`STREAM_DEPTH`), so a camera's frames overlap the device's work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ..core import oip
from ..core.access.roles import ANONYMOUS, Principal, Role
from ..core.errors import (
    ClassNotFoundError,
    ForbiddenError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    SowaError,
    UnauthorizedError,
    UnprocessableError,
)
from ..core.runtime import Runtime
from .proto import open_inference_grpc_pb2 as pb
from .proto import stream_pb2

__all__ = ["SERVICE", "STATUS", "STREAM_DEPTH", "GrpcServer"]

log = logging.getLogger("sowa.grpc")

SERVICE = "inference.GRPCInferenceService"
STREAM_DEPTH = 4  # requests of one stream scored at once
# the service's HTTP statuses (service/core/errors.py) as gRPC codes
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.INVALID_ARGUMENT,
          422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
          499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE,
          504: grpc.StatusCode.DEADLINE_EXCEEDED, 507: grpc.StatusCode.RESOURCE_EXHAUSTED}


class GrpcServer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime, self.settings = runtime, runtime.settings
        self.failures = RateLimitItemPerMinute(self.settings.auth_failures_per_minute)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen on the settings' host and grpc_port; gives the port bound."""
        s = self.settings
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", s.max_request_bytes),  # the same bound as an HTTP body
            ("grpc.max_send_message_length", -1),  # answers are bounded by max_images_per_request
            ("grpc.so_reuseport", 0),
        ], maximum_concurrent_rpcs=s.max_connections)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, self._handlers()),))
        host = f"[{s.host}]" if ":" in s.host else s.host
        self.port = self.server.add_insecure_port(f"{host}:{s.grpc_port}")
        if not self.port:
            raise OSError(f"cannot listen for gRPC on {s.host}:{s.grpc_port}")
        await self.server.start()
        log.info("gRPC (Open Inference Protocol v2) on %s:%d", s.host, self.port)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        def unary(name: str, fn: Callable[..., Awaitable[Any]], request: Any, response: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                self._call(name, fn), request_deserializer=request.FromString,
                response_serializer=response.SerializeToString)

        return {
            "ServerLive": unary("ServerLive", self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary("ServerReady", self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ServerMetadata": unary("ServerMetadata", self.server_metadata, pb.ServerMetadataRequest,
                                    pb.ServerMetadataResponse),
            "ModelReady": unary("ModelReady", self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ModelMetadata": unary("ModelMetadata", self.model_metadata, pb.ModelMetadataRequest,
                                   pb.ModelMetadataResponse),
            "ModelInfer": unary("ModelInfer", self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=stream_pb2.ModelStreamInferResponse.SerializeToString),
        }

    def _call(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """`fn` with the service's errors as the call's status, counted in the request metrics."""
        endpoint = f"grpc:{name}"
        telemetry = self.runtime.telemetry

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, status = time.perf_counter(), 200
            try:
                return await fn(request, context)
            except SowaError as e:
                status = e.status
                await _abort(context, e)
            except asyncio.CancelledError:
                status = 499
                raise
            except Exception:
                if context.code() is not None:  # aborted on purpose
                    raise
                status = 500
                log.exception("unhandled error in gRPC %s", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            finally:
                telemetry.requests.labels(endpoint=endpoint, status=str(status)).inc()
                telemetry.request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - started)

        return handler

    # -- who is calling ---------------------------------------------------------------------------------------------

    def _principal(self, context: grpc.aio.ServicerContext, role: Role = Role.INSPECT) -> Principal:
        """The caller, as AuthMiddleware finds it over HTTP (service/http/auth.py)."""
        keys = self.runtime.keys
        if not keys.loaded:
            raise NotReadyError("the keys are loading", {"retry-after": "5"})
        presented = [v for k, v in (context.invocation_metadata() or ()) if k == "x-api-key"]
        if len(presented) > 1:  # a proxy and the server could each read a different one
            raise UnprocessableError("more than one x-api-key")
        principal = ANONYMOUS
        if keys.required:
            address = context.peer().rsplit(":", 1)[0]
            if not self.limiter.test(self.failures, address):
                raise QueueFullError("too many wrong API keys from this address; wait a minute",
                                     {"retry-after": "60"})
            found = keys.authenticate(str(presented[0])) if presented else None
            if found is None:
                self.limiter.hit(self.failures, address)
                raise UnauthorizedError("missing or wrong x-api-key")
            principal = found
        if not principal.may(role):
            raise ForbiddenError(f"this needs the {role.value} role; key '{principal.name}' has "
                                 f"{principal.role.value}")
        return principal

    async def _model(self, principal: Principal, model: str, version: str) -> str | None:
        if version not in ("", "1"):
            raise ClassNotFoundError(f"model '{model[:64]}' has no version '{version[:16]}'; its one version is '1'")
        name = oip.class_of(model)
        if name is not None and not principal.may_touch(name):
            raise ForbiddenError(f"key '{principal.name}' may touch classes matching '{principal.classes}' "
                                 f"only, not '{name}'")
        return name

    # -- the protocol's calls ---------------------------------------------------------------------------------------

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)  # open, as /healthz

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.runtime.status.ready)  # open, as /readyz

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        self._principal(context)
        return pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=oip.server_version(),
                                         extensions=list(oip.EXTENSIONS))

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        principal = self._principal(context)
        name = await self._model(principal, request.name, request.version)
        backend = self.runtime.backend
        if name is not None:
            await backend.check_class(name)
        return pb.ModelReadyResponse(ready=True)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        principal = self._principal(context)
        name = await self._model(principal, request.name, request.version)
        backend = self.runtime.backend
        if name is not None:
            await backend.check_class(name)
        meta = oip.model_metadata(request.name, backend.image_size)
        t = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[t(**i) for i in meta["inputs"]],
                                        outputs=[t(**o) for o in meta["outputs"]])

    async def model_infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._infer(request, self._principal(context))

    async def _infer(self, request: pb.ModelInferRequest, principal: Principal) -> pb.ModelInferResponse:
        await self._model(principal, request.model_name, request.model_version)
        s = self.settings
        parsed = _parse(request)
        scored, outputs = await oip.infer(self.runtime.backend, parsed, s.request_timeout_s, self.runtime.limits,
                                          self.runtime.decode_budget, s.max_images_per_request,
                                          int(s.results_max_image_mb * 2**20))
        self.runtime.telemetry.images.inc(len(scored.images))
        return await asyncio.to_thread(_answer, request, outputs)

    async def model_stream_infer(self, requests: AsyncIterator[pb.ModelInferRequest],
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        telemetry, endpoint = self.runtime.telemetry, "grpc:ModelStreamInfer"
        try:
            principal = self._principal(context)
        except SowaError as e:
            telemetry.requests.labels(endpoint=endpoint, status=str(e.status)).inc()
            await _abort(context, e)
            return
        pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue(maxsize=STREAM_DEPTH)

        async def read() -> None:
            try:
                async for request in requests:
                    await pending.put(asyncio.ensure_future(self._stream_one(request, principal)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # the client's stream ended cleanly
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
            telemetry.request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    async def _stream_one(self, request: pb.ModelInferRequest, principal: Principal) -> Any:
        status = 200
        try:
            return stream_pb2.ModelStreamInferResponse(infer_response=await self._infer(request, principal))
        except SowaError as e:
            status = e.status
            return stream_pb2.ModelStreamInferResponse(error_message=e.message)
        except Exception:
            status = 500
            log.exception("unhandled error in a gRPC stream's request")
            return stream_pb2.ModelStreamInferResponse(error_message="internal server error")
        finally:
            self.runtime.telemetry.requests.labels(endpoint="grpc:ModelStreamInfer", status=str(status)).inc()


async def _abort(context: grpc.aio.ServicerContext, error: SowaError) -> None:
    if error.headers:
        context.set_trailing_metadata(tuple((k.lower(), v) for k, v in error.headers.items()))
    await context.abort(STATUS.get(error.status, grpc.StatusCode.INTERNAL), error.message)


def _parameter(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _parse(request: pb.ModelInferRequest) -> oip.InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise UnprocessableError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for i, t in enumerate(request.inputs):
        if raw:
            data: Any = raw[i]
        elif t.datatype == "BYTES":
            data = list(t.contents.bytes_contents)
        else:
            if len(t.contents.uint_contents) > oip.MAX_LISTED_VALUES:  # each would become a Python int
                raise PayloadTooLargeError(f"input {t.name[:64]}: more than {oip.MAX_LISTED_VALUES} values in "
                                           "contents; send it in raw_input_contents")
            data = list(t.contents.uint_contents)
        inputs.append(oip.InputTensor(t.name, t.datatype, tuple(t.shape), data))
    parameters = {k: _parameter(v) for k, v in request.parameters.items()}
    outputs = [o.name for o in request.outputs] or None
    return oip.InferRequest(request.model_name, inputs, parameters, outputs, request.id)


def _answer(request: pb.ModelInferRequest, outputs: list[oip.OutputTensor]) -> pb.ModelInferResponse:
    """Every output in raw_output_contents, as Triton answers (its clients read them from there)."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    for t in outputs:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        response.raw_output_contents.append(t.raw())
    return response

