"""The ASGI middleware between strangers and the serving app: every request passes it first.

    app = Guard(fastapi_app, limits, token="...")   # what `serve.build_http_app` returns

In order, it answers
- 404 for Gradio's development routes (`/gradio_api/dev/...`: endless event streams);
- 431 for headers (names, values and the query string) over `max_header_bytes`;
- 400 for a `Host` header outside `allowed_hosts` (DNS rebinding, cache poisoning);
- 401 without the API token, when one is set (`Authorization: Bearer TOKEN`, or the cookie a
  browser gets by opening `/?token=TOKEN` once; `/healthz` stays open for load balancers);
- 429 past `max_requests_per_client` requests in flight from one client address;
- 413 for a body over its route's limit (uploads: `max_upload_bytes`, anything else:
  `max_request_bytes`) or an upload of more than `max_files_per_request` files;
- 408 for a body that does not arrive within `body_timeout_s`;
and ends any request still running after `request_timeout_s` (504, or the connection closed
when the answer has started). Bodies are read here, whole and bounded, before the app sees
them, so no route of FastAPI's or Gradio's ever reads an unbounded body.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import json
import time
import urllib.parse

TOKEN_COOKIE = "dogbreeds_token"
# Paths where a photo is uploaded: the JSON API and Gradio's upload route.
UPLOAD_PATHS = ("/predict", "/gradio_api/upload")
# Routes that must answer without the token: a load balancer's health check.
OPEN_PATHS = ("/healthz",)
# Multipart boundaries and part headers around the files of an upload.
MULTIPART_SLACK_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Limits:
    """The bounds the guard enforces: the `serve.ServeArgs` fields of the same names, which
    document each and its default."""

    max_upload_bytes: int
    max_request_bytes: int
    max_header_bytes: int
    max_files_per_request: int
    max_requests_per_client: int
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

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = {"response": False}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                started["response"] = True
            await send(message)

        client = (scope.get("client") or ("unknown", 0))[0]
        counted = False
        try:
            self._check_route_host_and_token(scope)
            if self.in_flight[client] >= self.limits.max_requests_per_client:
                raise Refused(429, f"more than {self.limits.max_requests_per_client} requests in flight from "
                                   f"{client}: wait for an answer first")
            self.in_flight[client] += 1
            counted = True
            async with asyncio.timeout(self.limits.request_timeout_s):
                receive = await self._read_body(scope, receive)
                await self.app(scope, receive, tracked_send)
        except Refused as refused:
            if not started["response"]:
                await _answer(send, refused)
        except TimeoutError:
            if not started["response"]:
                await _answer(send, Refused(504, f"no answer within {self.limits.request_timeout_s:g} s"))
        finally:
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
        if not host_allowed(headers.get("host", ""), self.limits.allowed_hosts):
            raise Refused(400, f"host {headers.get('host', '')!r} is not served here (allowed hosts: "
                               f"{', '.join(self.limits.allowed_hosts)})")
        if self.token is None or path in OPEN_PATHS:
            return
        offered = headers.get("authorization", "").removeprefix("Bearer ").strip()
        cookies = dict(
            part.strip().split("=", 1) for part in headers.get("cookie", "").split(";") if "=" in part
        )
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        for candidate in (offered, cookies.get(TOKEN_COOKIE, ""), *query.get("token", [])):
            if candidate and hmac.compare_digest(candidate.encode(), self.token.encode()):
                if query.get("token") and scope["method"] == "GET":
                    raise _SetCookie(self.token, path)
                return
        raise Refused(401, "this service needs its API token: send `Authorization: Bearer TOKEN`, "
                           "or open /?token=TOKEN in a browser")

    async def _read_body(self, scope, receive):
        """The whole body, bounded in size, time and files, replayed to the app as one message."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return receive
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
        return _replay(body, receive)

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


def _replay(body: bytes, receive):
    """A `receive` for the app: the whole `body` as one message, then the client's own
    messages (its disconnect)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _SetCookie(Refused):
    """A browser that opened a page with `?token=`: keep the token in a cookie, drop it from
    the address."""

    def __init__(self, token: str, path: str):
        super().__init__(303, "token accepted")
        self.token, self.path = token, path


async def _answer(send, refused: Refused) -> None:
    """The guard's own answer: JSON `{"detail": reason}`, or the token cookie's redirect."""
    body = json.dumps({"detail": refused.reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(refused, _SetCookie):
        cookie = f"{TOKEN_COOKIE}={refused.token}; Path=/; HttpOnly; SameSite=Strict"
        headers += [(b"location", refused.path.encode("latin-1")), (b"set-cookie", cookie.encode("latin-1"))]
    await send({"type": "http.response.start", "status": refused.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
