"""Web protections, one pure ASGI middleware: which Host names are served, no state change from another site, and
the headers that keep a browser strict with every answer.

- Host: the name the client used (port aside) must be in `allowed_hosts` (`*.example.com`, `*` for any), or be an
  IP address. A DNS-rebinding page reaches a loopback service under its own name, which is refused (400); an IP
  address cannot be rebound, and is what Kubernetes probes and Prometheus send.
- Cross-site requests: POST, PUT, PATCH and DELETE from a browser page of another origin are refused (403), with
  or without keys (a multipart form needs no CORS preflight). Browsers say where a request comes from in
  `Sec-Fetch-Site` (only `same-origin` and `none`, a typed URL, pass; `same-site` is another port or subdomain)
  or, older ones, in `Origin`, which must name the Host. Clients that are no browser send neither and pass.
- Headers: a Content-Security-Policy with no inline script or style and no framing (the console follows it:
  service/http/console/app.js), nosniff, no referrer, and `Cache-Control: no-store` on everything but the
  console's files (revalidated instead), so no answer holding data stays in a cache.

Behind HTTP workers the engine process (reached on a Unix socket, Host `engine`) only adds the headers: its
workers have checked the request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .middleware import send_error

__all__ = ["CONTENT_SECURITY_POLICY", "ProtectionsMiddleware", "host_allowed"]

# data: and blob: images: thumbnails and heatmaps arrive as base64, dropped files are shown from blob: URLs
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAME_ORIGIN = frozenset({b"same-origin", b"none"})  # none: the user's own navigation (typed, bookmarked)


def _host_name(host: str) -> str:
    """The name of a Host header, without its port: `[::1]:8000` -> `::1`, `Example.com:80` -> `example.com`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    name = _host_name(host)
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return any(p == "*" or p == name or (p.startswith("*.") and name.endswith(p[1:])) for p in allowed)


def _cross_site(headers: dict[bytes, bytes]) -> str | None:
    """Why a state-changing request comes from another site's page, or None when it does not."""
    site = headers.get(b"sec-fetch-site")
    if site is not None:
        return None if site in SAME_ORIGIN else f"Sec-Fetch-Site: {site.decode('latin-1')[:32]}"
    origin = headers.get(b"origin")
    if origin is None:
        return None  # no browser, or one that sends neither on a same-origin request
    # the scheme is left aside: behind a TLS proxy the page is https:// while the service sees http
    netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
    if not netloc or netloc != headers.get(b"host", b"").decode("latin-1").lower():
        return f"Origin: {origin.decode('latin-1')[:100]}"
    return None


class ProtectionsMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], check_requests: bool = True) -> None:
        """`check_requests`: refuse other Hosts and cross-site requests (False: the engine behind workers)."""
        self.app, self.allowed_hosts, self.check_requests = app, list(allowed_hosts), check_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        static = path.startswith("/ui/") and path != "/ui/config.json"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS:
                    headers.setdefault(name.decode(), value.decode())
                headers.setdefault("cache-control", "no-cache" if static else "no-store")
            await send(message)

        if self.check_requests:
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1")
            hosts = sum(k == b"host" for k, _ in scope["headers"])
            if hosts != 1 or not host_allowed(host, self.allowed_hosts):
                await send_error(send_with_headers, 400, "bad_request",
                                 f"Host '{host[:100]}' is not served here: add the name to SOWA_ALLOWED_HOSTS")
                return
            if scope["method"] in UNSAFE_METHODS and (why := _cross_site(headers)) is not None:
                await send_error(send_with_headers, 403, "forbidden",
                                 f"a request from another site's page is refused ({why})")
                return
        await self.app(scope, receive, send_with_headers)
