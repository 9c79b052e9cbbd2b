"""The front of `dogbreeds serve` (dogbreeds/front.py) in front of a real uvicorn server, the
HTTP server of Serve's proxy: what reaches the server, and what the front refuses or closes.
tests/test_attack.py replays the attacks against a whole `dogbreeds serve`."""

import asyncio
import json
import socket
import threading
import time

import pytest

from dogbreeds.front import Front, FrontLimits
from tests.conftest import free_port

LIMITS = FrontLimits(header_timeout_s=1.0, max_header_bytes=8192, max_header_count=20, max_connections=12,
                     max_connections_per_client=4, connection_timeout_s=5.0,
                     allowed_hosts=("127.0.0.1", "localhost"))


async def echo(scope, receive, send):
    """An ASGI app that answers what it was sent: client address, headers, body size."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = json.dumps({"client": scope["client"][0], "path": scope["path"], "body_bytes": size,
                       "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"),
                                                                    (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _in_thread(coroutine_function):
    ready = threading.Event()

    def run():
        async def main():
            await coroutine_function(ready)
        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(30)


@pytest.fixture(scope="module")
def front_port():
    import uvicorn

    server_port, port = free_port(), free_port()
    config = uvicorn.Config(echo, host="127.0.0.1", port=server_port, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)

    async def run_server(ready):
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        ready.set()
        await task

    async def run_front(ready):
        started = asyncio.Event()
        task = asyncio.ensure_future(Front(LIMITS, server_port).serve("127.0.0.1", port, started))
        await started.wait()
        ready.set()
        await task

    _in_thread(run_server)
    _in_thread(run_front)
    yield port
    server.should_exit = True


def _exchange(port: int, data: bytes, pause_s: float = 0.0, source: str = "127.0.0.1") -> bytes:
    """Send `data` (in two halves `pause_s` apart), then read until the front closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as connection:
        connection.sendall(data[: len(data) // 2])
        time.sleep(pause_s)
        try:
            connection.sendall(data[len(data) // 2:])
        except OSError:
            pass
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0


def _json(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def test_a_request_reaches_the_server_with_the_clients_address_and_nothing_forged(front_port):
    body = b"x" * 300_000
    answer = _exchange(front_port, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                                   b"X-Forwarded-For: 203.0.113.9\r\nX-Request-Timeout-Seconds: 0\r\n"
                                   b"Connection: keep-alive\r\nX-Keep: yes\r\n\r\n%s" % (len(body), body),
                       source="127.0.0.3")
    assert _status(answer) == 200, answer[:300]
    seen = _json(answer)
    assert seen["client"] == "127.0.0.3" and seen["body_bytes"] == len(body) and seen["path"] == "/predict"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.3"  # the forged one is gone
    assert seen["headers"]["connection"] == "close" and seen["headers"]["x-keep"] == "yes"
    assert "x-request-timeout-seconds" not in seen["headers"]
    # One request per connection: a second one sent behind the first never reaches the server.
    two = _exchange(front_port, b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert two.count(b"HTTP/1.1 200") == 1 and b'"/a"' in two and b'"/b"' not in two


@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\nHost: 127.0.0.1\n\n\r\n\r\n", 400),  # bare LF
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n folded\r\n\r\n", 400),  # obsolete line folding
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", 400),
    (b"GET http://127.0.0.1/-/routes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),  # absolute form
    (b"GET /-/routes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    (b"GET /%2D/routes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    (b"GET //-/healthz?x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A\x00: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: 1\r\n" * 20 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n", 431),
])
def test_what_the_front_refuses(front_port, head, status):
    answer = _exchange(front_port, head)
    assert _status(answer) == status, answer[:300]
    assert isinstance(_json(answer)["detail"], str)


def test_headers_that_do_not_arrive_in_time_are_408_and_closed(front_port):
    started = time.monotonic()
    unfinished = _exchange(front_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")
    assert _status(unfinished) == 408 and time.monotonic() - started < LIMITS.header_timeout_s + 2
    # A header line now and then does not keep a connection open either.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", front_port), timeout=10) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer = b""
        for i in range(10):
            time.sleep(0.3)
            try:
                connection.sendall(b"X-%d: v\r\n" % i)
            except OSError:
                break
        while chunk := connection.recv(65536):
            answer += chunk
    assert _status(answer) == 408 and time.monotonic() - started < LIMITS.header_timeout_s + 2


def test_connections_are_bounded_per_client_and_in_all(front_port):
    def hold(source: str) -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", front_port), timeout=10, source_address=(source, 0))
        connection.sendall(b"GET / HTTP/1.1\r\n")  # and no more: held until the header timeout
        return connection

    held = [hold("127.0.0.4") for _ in range(LIMITS.max_connections_per_client)]
    time.sleep(0.2)
    assert _status(_exchange(front_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", source="127.0.0.4")) == 429
    # Another client is still served, until the connections in all reach the bound.
    assert _status(_exchange(front_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", source="127.0.0.5")) == 200
    held += [hold(f"127.0.0.{6 + i // 4}") for i in range(LIMITS.max_connections - len(held))]
    time.sleep(0.2)
    assert _status(_exchange(front_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", source="127.0.1.1")) == 503
    for connection in held:
        connection.close()
    time.sleep(0.3)
    assert _status(_exchange(front_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", source="127.0.0.4")) == 200


def test_the_dashboard_behind_the_front(tmp_path):
    """`dogbreeds dashboard` as started in a background job (SIGINT ignored): a page of another
    host's name is refused (DNS rebinding), a static file needs no Accept-Encoding, headers that
    do not arrive are closed, and SIGINT stops it."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dogbreeds.cli", "dashboard", str(tmp_path), "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert f"http://127.0.0.1:{port}/dashboard" in server.stdout.readline()
        host = f"Host: 127.0.0.1:{port}\r\n".encode()
        assert _status(_exchange(port, b"GET /dashboard HTTP/1.1\r\n" + host + b"\r\n")) == 200
        assert _status(_exchange(port, b"GET /dashboard HTTP/1.1\r\nHost: evil.example\r\n\r\n")) == 400
        assert _status(_exchange(port, b"GET /static/bundle.js HTTP/1.1\r\n" + host + b"\r\n")) == 200
        assert _status(_exchange(port, b"DELETE /api/studies/0 HTTP/1.1\r\n" + host + b"\r\n")) == 405
        started = time.monotonic()
        assert _status(_exchange(port, b"GET /dashboard HTTP/1.1\r\n" + host)) == 408
        assert time.monotonic() - started < 15
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
