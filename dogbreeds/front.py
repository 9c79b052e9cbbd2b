"""The front of `dogbreeds serve` and `dogbreeds dashboard`: what strangers connect to, before
any HTTP server parses a request.

    front = Front(FrontLimits(...), backend_port=proxy_port)   # Serve's proxy on 127.0.0.1
    asyncio.run(front.serve("127.0.0.1", 8000))

Serve's HTTP proxy (uvicorn) waits forever for a request's headers: a connection that sends
`GET / HTTP/1.1` and a header line every 10 s holds a file descriptor as long as it likes, and
20,000 of them took every descriptor of the proxy. The front is a TCP relay that bounds what
no ASGI middleware can see:
- connections per client (an IPv4 address, an IPv6 /64: `guard.client_key`) and in all: past
  either, 429 or 503 as soon as the connection opens;
- the time and size of a request's header block (`header_timeout_s`, `max_header_bytes`,
  `max_header_count`): 408, 431;
- its form: one request line of origin form, headers as RFC 9112 writes them with CRLF, one
  `Host` (an allowed one): anything a stricter or laxer parser might read differently is 400;
- Serve's own routes (`/-/routes`, `/-/healthz`) are 404 for strangers.
Then it passes the header block on with `X-Forwarded-For` set to the client's address (which
uvicorn trusts from 127.0.0.1: the guard counts requests per client by it), the forwarding
headers a client sent dropped, and `Connection: close`: one request per connection, so every
request's headers pass the front. The body and the answer are relayed as they come, within
`connection_timeout_s`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import re
import urllib.parse

from dogbreeds.guard import client_key, host_allowed

# A token (RFC 9110, 5.6.2): a method or a header name.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.[01]")
# A header line: a name, a colon, a value of visible bytes, spaces and tabs (and obs-text).
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\x20-\x7e\t\x80-\xff]*?)[ \t]*")
# Headers only the front sets: where the request came from, how long the proxy waits for it
# (Serve's proxy lets a client lift its own timeout), and the connection's fate.
_DROPPED = {b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"te", b"forwarded",
            b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port",
            b"x-real-ip", b"x-request-timeout-seconds"}
# Bytes relayed at a time.
_CHUNK_BYTES = 64 * 1024
# Seconds a connection's answer may take to reach its client after the request's own time.
FLUSH_S = 10.0
# Seconds a refused connection is read (and what it sends dropped) before it is closed.
LINGER_S = 1.0


@dataclasses.dataclass(frozen=True)
class FrontLimits:
    """What the front bounds: `ServeArgs` fields of the same names document each."""

    header_timeout_s: float
    max_header_bytes: int
    max_header_count: int
    max_connections: int
    max_connections_per_client: int
    connection_timeout_s: float
    allowed_hosts: tuple[str, ...]


def limits_from(args) -> FrontLimits:
    """The front's bounds from `ServeArgs` (defaults: `ServeArgs.model_construct()`): a
    connection lasts its headers, its request and `FLUSH_S` at most."""
    fields = {field.name for field in dataclasses.fields(FrontLimits)} - {"connection_timeout_s"}
    return FrontLimits(**{name: getattr(args, name) for name in fields},
                       connection_timeout_s=args.header_timeout_s + args.request_timeout_s + FLUSH_S)


async def serve_until_stopped(front: "Front", host: str, port: int, banner: str) -> None:
    """`front` on host:port, `banner` printed once it listens, until SIGINT or SIGTERM (either,
    even when the shell started this process with SIGINT ignored, as it does a background job)."""
    import signal

    started = asyncio.Event()
    serving = asyncio.ensure_future(front.serve(host, port, started))
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, serving.cancel)
    await asyncio.wait({serving, asyncio.ensure_future(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        return serving.result()  # it could not listen: its error
    print(banner, flush=True)
    try:
        await serving
    except asyncio.CancelledError:
        pass


class _Refused(Exception):
    def __init__(self, status_code: int, reason: str):
        super().__init__(reason)
        self.status_code, self.reason = status_code, reason


def read_head(head: bytes, limits: FrontLimits) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The request line and headers of a header block (without its final CRLF CRLF), checked:
    `_Refused` for what the front does not pass on."""
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise _Refused(400, "a line of the request ends without CRLF")
    if not _REQUEST_LINE.fullmatch(lines[0]):
        raise _Refused(400, "not an HTTP/1.1 request line with a path")
    if len(lines) - 1 > limits.max_header_count:
        raise _Refused(431, f"more than {limits.max_header_count} headers")
    headers = []
    for line in lines[1:]:
        match = _HEADER_LINE.fullmatch(line)
        if not match:
            raise _Refused(400, "a malformed header line")
        headers.append((match.group(1).lower(), match.group(2)))
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) != 1:
        raise _Refused(400, f"{len(hosts)} Host headers: a request has one")
    if not host_allowed(hosts[0].decode("latin-1"), limits.allowed_hosts):
        raise _Refused(400, f"host {hosts[0].decode('latin-1')!r} is not served here")
    # As the server reads the path: percent-decoded (`/%2D/routes` is `/-/routes`).
    path = urllib.parse.unquote(lines[0].split(b" ")[1].split(b"?")[0].decode("latin-1"))
    if re.sub("/+", "/", path).startswith("/-/"):
        raise _Refused(404, "not found")
    return lines[0], headers


def forwarded_head(request_line: bytes, headers: list[tuple[bytes, bytes]], client: str) -> bytes:
    """The header block passed to the server: the client's headers but the forwarding ones,
    then the client's address and `Connection: close`."""
    kept = [name + b": " + value for name, value in headers if name not in _DROPPED]
    ours = [b"x-forwarded-for: " + client.encode(), b"connection: close"]
    return b"\r\n".join([request_line, *kept, *ours]) + b"\r\n\r\n"


class Front:
    """The relay (see the module's docstring) to an HTTP server on 127.0.0.1:`backend_port`."""

    def __init__(self, limits: FrontLimits, backend_port: int):
        self.limits = limits
        self.backend_port = backend_port
        self.connections: collections.Counter = collections.Counter()

    async def serve(self, host: str, port: int, started: asyncio.Event | None = None) -> None:
        """Accept connections on host:port until cancelled."""
        server = await asyncio.start_server(self._connection, host, port, backlog=1024)
        async with server:
            if started is not None:
                started.set()
            await server.serve_forever()

    async def _connection(self, reader, writer) -> None:
        address = writer.get_extra_info("peername")[0]
        key = client_key(address)
        try:
            if sum(self.connections.values()) >= self.limits.max_connections:
                raise _Refused(503, f"the service holds {self.limits.max_connections} connections: try again soon")
            if self.connections[key] >= self.limits.max_connections_per_client:
                raise _Refused(429, f"more than {self.limits.max_connections_per_client} connections from {key}")
        except _Refused as refused:
            return await _answer(reader, writer, refused)
        self.connections[key] += 1
        try:
            async with asyncio.timeout(self.limits.connection_timeout_s):
                await self._relay(reader, writer, address)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self.connections[key] -= 1
            if not self.connections[key]:
                del self.connections[key]
            writer.close()

    async def _relay(self, reader, writer, address: str) -> None:
        try:
            async with asyncio.timeout(self.limits.header_timeout_s):
                head, rest = await self._read_head(reader)
            if head is None:  # the client left
                return
            request_line, headers = read_head(head, self.limits)
        except TimeoutError:
            return await _answer(reader, writer, _Refused(408, f"the headers did not arrive within "
                                                               f"{self.limits.header_timeout_s:g} s"))
        except _Refused as refused:
            return await _answer(reader, writer, refused)
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        upstream = asyncio.ensure_future(_pipe(reader, server_writer))
        try:
            server_writer.write(forwarded_head(request_line, headers, address) + rest)
            await _pipe(server_reader, writer)  # the answer: the server closes after it
        finally:
            upstream.cancel()
            server_writer.close()

    async def _read_head(self, reader) -> tuple[bytes | None, bytes]:
        """The header block (without its final CRLF CRLF) and whatever followed it; None at
        EOF before a whole block."""
        received = bytearray()
        while True:
            end = received.find(b"\r\n\r\n")
            if (end if end >= 0 else len(received)) > self.limits.max_header_bytes:
                raise _Refused(431, f"headers over the limit of {self.limits.max_header_bytes} bytes")
            if end >= 0:
                return bytes(received[:end]), bytes(received[end + 4:])
            chunk = await reader.read(_CHUNK_BYTES)
            if not chunk:
                return None, b""
            received += chunk


async def _pipe(source, destination) -> None:
    """Bytes from `source` to `destination` until `source` ends; then `destination` ends too."""
    try:
        while chunk := await source.read(_CHUNK_BYTES):
            destination.write(chunk)
            await destination.drain()
        if destination.can_write_eof():
            destination.write_eof()
    except (ConnectionError, OSError):
        destination.close()


async def _answer(reader, writer, refused: _Refused) -> None:
    """The front's own answer, `{"detail": reason}`, and the connection closed: after what the
    client still sends is read for `LINGER_S` at most, so that closing a socket with
    unread bytes does not reset the connection before the client reads the answer."""
    body = json.dumps({"detail": refused.reason}).encode()
    writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                 b"connection: close\r\n\r\n%s" % (refused.status_code, _REASONS[refused.status_code], len(body), body))
    try:
        async with asyncio.timeout(LINGER_S):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
                while await reader.read(_CHUNK_BYTES):
                    pass
    except (TimeoutError, ConnectionError, OSError):
        pass
    writer.close()


_REASONS = {400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout", 429: b"Too Many Requests",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
