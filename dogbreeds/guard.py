"""The ASGI middleware between strangers and the serving app: every request passes it first.

    app = Guard(fastapi_app, limits, token="...")   # what `serve.build_http_app` returns

In order, it answers
- 404 for Gradio's development routes (`/gradio_api/dev/...`: endless event streams);
- 431 for headers (names, values and the query string) over `max_header_bytes`;
- 400 for a `Host` header outside `allowed_hosts`, or more than one (DNS rebinding, cache
  poisoning);
- 403 for a browser's request from a page of another origin (`Origin` is not this host): no
  other site's script reads the UI's answers or posts to it with the user's cookie;
- 401 without the API token, when one is set (`Authorization: Bearer TOKEN`, or the cookie a
  browser gets by opening `/?token=TOKEN` once, which redirects to `/`; `/healthz` stays open
  for load balancers);
- 429 past `max_requests_per_client` requests in flight from one client (`client_key`: an
  address, or an IPv6 /64);
- 503 past `max_open_streams` of Gradio's event streams open in all (each is held up to
  `request_timeout_s`), so that streams never take the room photos need;
- 413 for a body over its route's limit (uploads: `max_upload_bytes`, anything else, whatever
  its method: `max_request_bytes`) or an upload of more than `max_files_per_request` files;
- 408 for a body that does not arrive within `body_timeout_s`;
and ends any request still running after `request_timeout_s` (504, or the connection closed
when the answer has started). Bodies are read here, whole and bounded, before the app sees
them, so no route of FastAPI's or Gradio's ever reads an unbounded body. `X-Forwarded-Host`
is dropped (Gradio would name that host in its pages), and every answer says `nosniff` and
may not be framed by another site.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import ipaddress
import json
import time
import urllib.parse

TOKEN_COOKIE = "dogbreeds_token"
# Paths where a photo is uploaded: the JSON API and Gradio's upload route.
UPLOAD_PATHS = ("/predict", "/gradio_api/upload")
# Gradio's event streams (GET): each held open until its events end.
STREAM_PATHS = ("/gradio_api/heartbeat/", "/gradio_api/queue/data", "/gradio_api/call/")
# Routes that must answer without the token: a load balancer's health check.
OPEN_PATHS = ("/healthz",)
# Multipart boundaries and part headers around the files of an upload.
MULTIPART_SLACK_BYTES = 64 * 1024
# Headers on every answer: a browser never guesses a type other than the one declared (an
# uploaded text read as HTML), and no other site frames the UI (clickjacking).
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"SAMEORIGIN"),
                    (b"content-security-policy", b"frame-ancestors 'self'")]
# Headers the app never sees: Gradio builds its pages' URLs from X-Forwarded-Host.
DROPPED_HEADERS = (b"x-forwarded-host",)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The bounds the guard enforces: the `serve.ServeArgs` fields of the same names, which
    document each and its default."""

    max_upload_bytes: int
    max_request_bytes: int
    max_header_bytes: int
    max_files_per_request: int
    max_requests_per_client: int
    max_open_streams: int
    body_timeout_s: float
    request_timeout_s: float
    allowed_hosts: tuple[str, ...]


class Refused(Exception):
    """A request the guard answers itself, with this status and reason."""

    def __init__(self, status_code: int, reason: str):
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason


def route(scope) -> str:
    """The request's path inside the app (Serve may mount it under a route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def client_key(address: str) -> str:
    """Who a request comes from, for the bounds per client: an IPv4 address, or the /64 of an
    IPv6 one (a single subscriber gets a whole /64: endless addresses)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a browser's `Origin` header names the host the request was sent to."""
    parts = urllib.parse.urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.strip().lower()


def host_allowed(host_header: str, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether a `Host` header (with or without port) names one of `allowed_hosts`; "*"
    allows any, "*.example.com" any subdomain."""
    if "*" in allowed_hosts:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    for allowed in allowed_hosts:
        allowed = allowed.lower().strip("[]")
        if host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:])):
            return True
    return False


def count_parts(body: bytes, content_type: str) -> int:
    """How many parts a multipart body holds (each file is one); 0 for other bodies. The
    boundary is read by the parser Starlette and Gradio split the body with (`boundary =X`,
    with a space, is theirs as much as `boundary=X`); a multipart body without one is 400."""
    from python_multipart.multipart import parse_options_header

    kind, parameters = parse_options_header(content_type)
    if not kind.startswith(b"multipart/"):
        return 0
    if not parameters.get(b"boundary"):
        raise Refused(400, "a multipart body needs a boundary in its Content-Type")
    return max(body.count(b"--" + parameters[b"boundary"]) - 1, 0)


class Guard:
    """The middleware (see the module's docstring); `token` None leaves the API open."""

    def __init__(self, app, limits: Limits, token: str | None = None):
        self.app = app
        self.limits = limits
        self.token = token
        self.in_flight: collections.Counter = collections.Counter()
        self.open_streams = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = {"response": False}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                started["response"] = True
                message = message | {"headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        client = client_key((scope.get("client") or ("unknown", 0))[0])
        scope = scope | {"headers": [(k, v) for k, v in scope["headers"] if k.lower() not in DROPPED_HEADERS]}
        counted = stream = False
        try:
            self._check_route_host_and_token(scope)
            if self.in_flight[client] >= self.limits.max_requests_per_client:
                raise Refused(429, f"more than {self.limits.max_requests_per_client} requests in flight from "
                                   f"{client}: wait for an answer first")
            if scope["method"] == "GET" and route(scope).startswith(STREAM_PATHS):
                if self.open_streams >= self.limits.max_open_streams:
                    raise Refused(503, f"{self.limits.max_open_streams} event streams are open: try again soon")
                self.open_streams += 1
                stream = True
            self.in_flight[client] += 1
            counted = True
            async with asyncio.timeout(self.limits.request_timeout_s):
                receive = await self._read_body(scope, receive)
                await self.app(scope, receive, tracked_send)
        except Refused as refused:
            if not started["response"]:
                await _answer(tracked_send, refused, scope)
        except TimeoutError:
            if not started["response"]:
                await _answer(tracked_send, Refused(504, f"no answer within {self.limits.request_timeout_s:g} s"), scope)
        finally:
            self.open_streams -= stream
            if counted:
                self.in_flight[client] -= 1
                if not self.in_flight[client]:
                    del self.in_flight[client]

    def _check_route_host_and_token(self, scope) -> None:
        path = route(scope)
        if "/gradio_api/dev/" in path + "/":
            raise Refused(404, "not found")
        size = len(scope.get("query_string", b"")) + sum(len(k) + len(v) for k, v in scope["headers"])
        if size > self.limits.max_header_bytes:
            raise Refused(431, f"headers and query over the limit of {self.limits.max_header_bytes} bytes")
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if sum(key.lower() == b"host" for key, _ in scope["headers"]) > 1:
            raise Refused(400, "more than one Host header")
        if not host_allowed(headers.get("host", ""), self.limits.allowed_hosts):
            raise Refused(400, f"host {headers.get('host', '')!r} is not served here (allowed hosts: "
                               f"{', '.join(self.limits.allowed_hosts)})")
        if "origin" in headers and not same_origin(headers["origin"], headers.get("host", "")):
            raise Refused(403, f"a request from a page of {headers['origin']!r}: this service answers its own pages only")
        if self.token is None or path in OPEN_PATHS:
            return
        scheme, _, offered = headers.get("authorization", "").strip().partition(" ")
        cookies = dict(
            part.strip().split("=", 1) for part in headers.get("cookie", "").split(";") if "=" in part
        )
        # `?token=` only opens a page (GET): elsewhere it would sit in logs and histories.
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1")) if scope["method"] == "GET" else {}
        bearer = offered.strip() if scheme.lower() == "bearer" else ""
        for candidate in (bearer, cookies.get(TOKEN_COOKIE, ""), *query.get("token", [])):
            if candidate and hmac.compare_digest(candidate.encode(), self.token.encode()):
                if query.get("token"):
                    raise _SetCookie(self.token)
                return
        raise Refused(401, "this service needs its API token: send `Authorization: Bearer TOKEN`, "
                           "or open /?token=TOKEN in a browser")

    async def _read_body(self, scope, receive):
        """The whole body, bounded in size, time and files, replayed to the app as one message."""
        upload = route(scope) in UPLOAD_PATHS
        limit = self.limits.max_upload_bytes + MULTIPART_SLACK_BYTES if upload else self.limits.max_request_bytes
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        too_large = Refused(413, f"request body over the limit of {limit} bytes for {route(scope)}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = await self._receive_bounded(receive, limit, too_large)
        if upload and count_parts(body, headers.get("content-type", "")) > self.limits.max_files_per_request:
            raise Refused(413, f"more than {self.limits.max_files_per_request} files in one request")
        return replay(body, receive)

    async def _receive_bounded(self, receive, limit: int, too_large: Refused) -> bytes:
        """The body's chunks joined: `too_large` past `limit` bytes, 408 past `body_timeout_s`,
        400 if the client leaves."""
        chunks, size, deadline = [], 0, time.monotonic() + self.limits.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise Refused(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s") from None
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    """A `receive` for the app: the whole `body` as one message, then the client's own
    messages (its disconnect)."""
    replayed = False

    async def receive_replayed():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_replayed


class _SetCookie(Refused):
    """A browser that opened a page with `?token=`: keep the token in a cookie, and open the
    UI (`/`, never a path the link chose: `//evil.example/` would leave the site)."""

    def __init__(self, token: str):
        super().__init__(303, "token accepted")
        self.token = token


async def _answer(send, refused: Refused, scope) -> None:
    """The guard's own answer: JSON `{"detail": reason}`, or the token cookie's redirect."""
    body = json.dumps({"detail": refused.reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(refused, _SetCookie):
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = f"{TOKEN_COOKIE}={refused.token}; Path=/; HttpOnly; SameSite=Strict{secure}"
        home = scope.get("root_path", "").rstrip("/") + "/"
        headers += [(b"location", home.encode("latin-1")), (b"set-cookie", cookie.encode("latin-1"))]
    await send({"type": "http.response.start", "status": refused.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
