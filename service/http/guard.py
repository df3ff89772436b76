"""uvicorn's httptools protocol with the limits a server facing clients directly needs (issue #14, item 5).

httptools has no header timeout or header size limit of its own, and uvicorn's `limit_concurrency` answers only
once a request's headers are complete, so connections that never finish their headers held file descriptors
forever, and a 100 MB header was parsed (and concatenated) on the event loop for seconds. `guarded_protocol`
returns a subclass that:

- gives each request `header_timeout_s` to finish its headers (measured from the connection or the request's
  first byte, not reset by trickled bytes): then 408 and close;
- closes a connection whose request body stalls for `body_timeout_s` (not counted while the server itself has
  paused reading): the app sees the client leave;
- refuses headers over `max_header_bytes` with 431 before parsing past the limit;
- answers 503 (`Retry-After`) and closes at once when more than `max_connections` are open;
- answers malformed HTTP with the service's JSON error (uvicorn's own is plain text).

Every answer is the service's JSON error body with `connection: close`. Knows no FastAPI: it works on bytes.
"""

from __future__ import annotations

import json
from asyncio import TimerHandle, Transport
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.errors import error_body

__all__ = ["GuardedHttpToolsProtocol", "guarded_protocol", "raw_error_response"]

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


def raw_error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with the service's JSON error, closing the connection."""
    body = json.dumps(error_body(code, message)).encode()
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")), b"content-type: application/json",
             b"content-length: %d" % len(body), b"connection: close",
             *(f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items())]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_header_bytes: int = 65536
    max_connections: int = 512
    LINGER_S = 2.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True  # the bytes now arriving are a request line and headers
        self._header_bytes = 0
        self._header_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None
        self._discarding = False  # answered and closing: what the client still sends is dropped unread

    # -- connections ------------------------------------------------------------------------------------------
    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("refusing a connection: %d open, the limit is %d", len(self.connections) - 1,
                                self.max_connections)
            self._answer(503, "too_many_connections", f"more than {self.max_connections} connections are open; "
                         "retry later", {"Retry-After": "1"}, linger=False)  # the point is to free the socket
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _answer(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                linger: bool = True) -> None:
        """Send the error and close. `linger`: shut the write side first and drop what the client still sends
        for up to `LINGER_S`, so it reads the answer (closing with its bytes unread would reset the connection
        and lose the answer); then close."""
        self._cancel_timers()
        if self.transport.is_closing() or self._discarding:
            return
        self.transport.write(raw_error_response(status, code, message, headers))
        if linger and self.transport.can_write_eof():
            self._discarding = True
            self.transport.write_eof()
            self.loop.call_later(self.LINGER_S, self.transport.close)
        else:
            self.transport.close()

    # -- headers: a time limit and a size limit -------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._awaiting_headers:
            self.logger.info("closing a connection: headers not complete within %g s", self.header_timeout_s)
            self._answer(408, "request_timeout", f"request headers not complete within {self.header_timeout_s:g} s")

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._awaiting_headers:
            room = self.max_header_bytes - self._header_bytes
            if len(data) > room:  # parse no further than the limit: the rest is body, or too much header
                head, data = data[:max(room, 0)], data[max(room, 0):]
                self._header_bytes += len(head)
                if head:
                    super().data_received(head)
                if self.transport.is_closing():
                    return
                if self._awaiting_headers:
                    self.logger.warning("refusing a request: headers over %d bytes", self.max_header_bytes)
                    self._answer(431, "headers_too_large", f"request line and headers over {self.max_header_bytes} "
                                 "bytes")
                    return
            else:
                self._header_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        self._arm_body_timer()

    # -- the body: an idle limit -----------------------------------------------------------------------------------
    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.flow.read_paused:  # the server is behind, not the client: wait for the app to read
            self._arm_body_timer()
            return
        self.logger.info("closing a connection: no request body bytes for %g s", self.body_timeout_s)
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        self._answer(408, "request_timeout", f"request body stalled for {self.body_timeout_s:g} s")

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm_body_timer()

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._header_bytes = 0
        self._awaiting_headers = True  # what comes next on this connection is the next request
        super().on_message_complete()

    # -- malformed HTTP ----------------------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        self._answer(400, "invalid_http", msg)


def guarded_protocol(header_timeout_s: float, body_timeout_s: float, max_header_bytes: int,
                     max_connections: int) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with these limits (uvicorn instantiates it per connection)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
        "max_header_bytes": max_header_bytes, "max_connections": max_connections})
