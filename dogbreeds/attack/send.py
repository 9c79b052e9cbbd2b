"""Sending a case to the server, and the probe after it. Each sender answers a `case_result`:
{"statuses": [judged against the case], "other_statuses": [only checked for 5xx], "bodies":
[(where, bytes)], "problem": why it fails, or None}."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from typing import Optional
from urllib.parse import quote

from dogbreeds.attack.inputs import (CLOSED, GRADIO_CALL, GRADIO_UPLOAD, PREDICT, HostileInput, http_request,
                                     large_progressive_photo, png_of_noise, upload_request)
from dogbreeds.attack.measure import named_paths

NO_ANSWER = -1  # no answer within the case's time limit
GRADIO_FILE = "/gradio_api/file="

# Bodies are read up to this much: enough to see a leaked file, bounded when a route streams
# /dev/zero forever.
MAX_BODY_BYTES = 1024 * 1024
# Bytes per write of a huge body: large enough to send 200 MB in a second over loopback.
STREAM_CHUNK_BYTES = 256 * 1024
# The side of the noise photos of an upload series: 9 MB each, under the 10 MB upload limit.
UPLOAD_SERIES_SIDE = 1750
UPLOAD_SERIES_SOURCE = "127.0.0.20"
# The client that queues large photos (`_decode_queue`); a client the probe is not, and whose
# requests it abandons after this long.
DECODE_QUEUE_SOURCE = "127.0.0.21"
ABANDON_AFTER_S = 0.5
# How long a held event stream may take to start.
STREAM_WAIT_S = 10.0
# The slow clients come from these loopback addresses (a per-client limit sees 8 clients).
SLOW_SOURCES = tuple(f"127.0.0.{host}" for host in range(2, 10))
# A slow client sends this many bytes of its body every `SLOW_DRIP_INTERVAL_S`.
SLOW_DRIP_BYTES = 2
SLOW_DRIP_INTERVAL_S = 1.0
# A slow client's next header line comes after this long.
SLOW_HEADER_INTERVAL_S = 2.0
# How long the slow clients are held before the probe is sent among them.
SLOW_SETTLE_S = 2.0
# A route that streams forever (an event stream, /dev/zero) still gives its status: its body
# is read this long at most.
BODY_READ_S = 5.0
# Paths named in a Gradio answer that are fetched back through /gradio_api/file=, at most.
MAX_FILE_FETCHES = 8


@dataclasses.dataclass
class Target:
    """The server under attack and what every case needs."""

    url: str
    host: str
    port: int
    client: object  # an httpx.AsyncClient without keep-alive: each request on a new connection
    photo: bytes
    probe_timeout_s: float


def case_result(statuses, bodies=(), other_statuses=(), problem=None, **extra) -> dict:
    """What a sender answers (see the module's docstring), `extra` kept in the case's record."""
    return {"statuses": list(statuses), "bodies": list(bodies), "other_statuses": list(other_statuses),
            "problem": problem, **extra}


async def _send_http(client, spec: dict, body_read_s: float = BODY_READ_S) -> tuple[int, bytes]:
    """One HTTP request: its status and the first `MAX_BODY_BYTES` of its body, read for
    `body_read_s` at most; `CLOSED` if the connection broke."""
    import httpx

    try:
        async with client.stream(spec["method"], spec["path"], params=spec.get("params") or None,
                                 headers=spec.get("headers") or None, content=spec.get("content") or None) as response:
            body, deadline = bytearray(), time.perf_counter() + body_read_s
            chunks = response.aiter_raw()
            while len(body) < MAX_BODY_BYTES and time.perf_counter() < deadline:
                try:
                    body += await asyncio.wait_for(chunks.__anext__(), deadline - time.perf_counter())
                except (StopAsyncIteration, asyncio.TimeoutError):
                    break
            return response.status_code, bytes(body[:MAX_BODY_BYTES])
    except httpx.TransportError:
        return CLOSED, b""


def _status_of(answer: bytes) -> int:
    """The status of a raw HTTP answer; `CLOSED` for none."""
    match = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})", answer)
    return int(match.group(1)) if match else CLOSED


async def _open(target: Target, source: Optional[str] = None):
    local = (source, 0) if source else None
    return await asyncio.open_connection(target.host, target.port, local_addr=local)


async def _read_answer(reader, received: bytearray) -> None:
    """Read into `received` until the server closes the connection (or the cap)."""
    try:
        while len(received) < MAX_BODY_BYTES:
            chunk = await reader.read(65536)
            if not chunk:
                return
            received += chunk
    except (ConnectionError, OSError):
        return


async def _send_raw(target: Target, head: bytes, body: bytes = b"", body_size: int = 0, chunked: bool = False,
                    filler: tuple[bytes, bytes] = (b"", b"")) -> tuple[int, bytes]:
    """Bytes over a socket: `head`, then `body`, or a generated body of `body_size` bytes
    (`filler`'s prefix, spaces... , suffix; chunked if asked) sent until the server answers."""
    try:
        reader, writer = await _open(target)
    except OSError:
        return CLOSED, b""
    received = bytearray()
    reading = asyncio.ensure_future(_read_answer(reader, received))
    try:
        writer.write(head + body)
        await writer.drain()
        prefix, suffix = filler
        sent, block = 0, b" " * STREAM_CHUNK_BYTES
        while sent < body_size and not received and not reading.done():
            if sent == 0:
                piece = prefix
            else:
                piece = suffix if sent + len(suffix) >= body_size else block[: body_size - sent - len(suffix)]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
            sent += len(piece)
        if chunked and not received:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        await reading
    except (ConnectionError, OSError):
        await reading  # the server stopped reading: its answer, if any, is in `received`
    finally:
        reading.cancel()
        writer.close()
    return _status_of(bytes(received)), bytes(received)


async def _gradio_call(target: Target, file_data: dict, wait_s: float) -> tuple[list, list]:
    """`classify_photo` through Gradio's API: the call, then its event stream."""
    call = http_request(GRADIO_CALL, json.dumps({"data": [file_data]}).encode(), "application/json")["http"]
    status, body = await _send_http(target.client, call)
    statuses, bodies = [status], [(GRADIO_CALL, body)]
    if status == 200:
        event_id = json.loads(body).get("event_id", "")
        events = http_request(f"{GRADIO_CALL}/{event_id}", method="GET")["http"]
        status, body = await _send_http(target.client, events, body_read_s=wait_s)
        statuses.append(status)
        bodies.append((events["path"], body))
    return statuses, bodies


async def _file_read(target: Target, spec: dict, wait_s: float) -> dict:
    """Gradio asked to classify a file of the server; then every path its answers name, and
    the original one, fetched back through /gradio_api/file=."""
    file_data = {key: spec[key] for key in ("path", "url") if key in spec} | {"meta": {"_type": "gradio.FileData"}}
    statuses, bodies = await _gradio_call(target, file_data, wait_s)
    fetched = [spec["path"]] if "path" in spec else []
    fetched += [path for path in named_paths(bodies) if path not in fetched]
    others = statuses[1:]
    for path in fetched[:MAX_FILE_FETCHES]:
        request = http_request(GRADIO_FILE + quote(path, safe=""), method="GET")["http"]
        status, body = await _send_http(target.client, request)
        others.append(status)
        bodies.append((GRADIO_FILE + path, body))
    return case_result(statuses[:1], bodies, others, fetched=fetched[:MAX_FILE_FETCHES])


async def _gradio_photo(target: Target, wait_s: float) -> dict:
    """The real photo through the UI's API: uploaded, classified, its breeds in the stream."""
    upload = upload_request([("files", "photo.jpg", target.photo)], GRADIO_UPLOAD, content_type="image/jpeg")["http"]
    status, body = await _send_http(target.client, upload)
    if status != 200:
        return case_result([status], [(GRADIO_UPLOAD, body)], problem="the upload failed")
    (uploaded,) = json.loads(body)
    statuses, bodies = await _gradio_call(target, {"path": uploaded, "meta": {"_type": "gradio.FileData"}}, wait_s)
    events = bodies[-1][1]
    problem = None if b"event: complete" in events and b"confidences" in events else (
        f"no breeds in Gradio's answer: {events[:300]!r}")
    return case_result([status], bodies, statuses, problem)


async def _send_photo(client, photo: bytes, timeout_s: float) -> tuple[int, float]:
    """`photo` uploaded to /predict: its status (`NO_ANSWER` if the client gave up after
    `timeout_s`) and seconds."""
    request = upload_request([("file", "photo.jpg", photo)], content_type="image/jpeg")["http"]
    started = time.perf_counter()
    try:
        status, _ = await asyncio.wait_for(_send_http(client, request), timeout_s)
    except asyncio.TimeoutError:
        status = NO_ANSWER
    return status, round(time.perf_counter() - started, 3)


async def send_probe(target: Target) -> tuple[int, float]:
    """The real photo to /predict: its status and seconds."""
    return await _send_photo(target.client, target.photo, target.probe_timeout_s)


async def _slow_client(target: Target, source: str, started: float, wait_s: float, head: bytes,
                       drip: bytes, interval_s: float) -> tuple[int, float]:
    """`head`, then `drip` every `interval_s`, until the server answers or closes (its status,
    seconds) or `wait_s` after `started` (`NO_ANSWER`)."""
    try:
        reader, writer = await asyncio.wait_for(_open(target, source), 10)
    except (OSError, asyncio.TimeoutError):
        return CLOSED, round(time.perf_counter() - started, 1)
    received = bytearray()
    reading = asyncio.ensure_future(_read_answer(reader, received))
    try:
        writer.write(head)
        while not received and not reading.done() and time.perf_counter() - started < wait_s:
            await asyncio.wait({reading}, timeout=interval_s)
            if not received and not reading.done():
                writer.write(drip)
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    if received or reading.done():
        await asyncio.wait({reading}, timeout=1)
        status = _status_of(bytes(received))
    else:
        status = NO_ANSWER
    reading.cancel()
    writer.close()
    return status, round(time.perf_counter() - started, 1)


async def _slow_clients(target: Target, clients: int, wait_s: float, probe_bound_s: float, head: bytes,
                        drip: bytes, interval_s: float) -> dict:
    """`clients` slow clients (`_slow_client`) from `SLOW_SOURCES`; while they are held, the
    probe from 127.0.0.1 must get 200 within `probe_bound_s`."""
    started = time.perf_counter()
    tasks = [asyncio.ensure_future(_slow_client(target, SLOW_SOURCES[i % len(SLOW_SOURCES)], started, wait_s,
                                                head, drip, interval_s))
             for i in range(clients)]
    await asyncio.sleep(SLOW_SETTLE_S)
    held = sum(not task.done() for task in tasks)
    probe_status, probe_seconds = await send_probe(target)
    outcomes = await asyncio.gather(*tasks)
    problem = None
    if probe_status != 200 or probe_seconds > probe_bound_s:
        problem = (f"a photo sent while {held} slow clients were held got {probe_status} in {probe_seconds} s "
                   f"(bound {probe_bound_s} s)")
    seconds = sorted(second for _, second in outcomes)
    return case_result([status for status, _ in outcomes], problem=problem, held_when_probed=held,
                       probe_during={"status": probe_status, "seconds": probe_seconds},
                       slowest_answer_seconds=seconds[-1] if seconds else None)


def _slow_body_client(target: Target) -> dict:
    """A multipart upload's headers, then its body 2 bytes a second."""
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            "Content-Type: multipart/form-data; boundary=slow\r\nContent-Length: 1000000\r\n\r\n--slow\r\n")
    return dict(head=head.encode(), drip=b"-" * SLOW_DRIP_BYTES, interval_s=SLOW_DRIP_INTERVAL_S)


def _slow_header_client(target: Target, drip: bool) -> dict:
    """A request's first headers and a header half written; then nothing, or a header line
    every `SLOW_HEADER_INTERVAL_S`."""
    head = f"GET /healthz HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nX-a: "
    return dict(head=head.encode(), drip=b"1\r\nX-a: " if drip else b"", interval_s=SLOW_HEADER_INTERVAL_S)


async def _flood(target: Target, requests: int, per_client_limit: int, forge: bool = False) -> dict:
    """`requests` photos at once from one address: beyond the per-client limit, 429s. `forge`:
    each claims another client address in `X-Forwarded-For`."""
    import httpx

    request = upload_request([("file", "photo.jpg", target.photo)], content_type="image/jpeg")["http"]
    forged = [{"x-forwarded-for": f"198.51.100.{i % 250 + 1}"} if forge else {} for i in range(requests)]
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=target.url, timeout=120, limits=limits) as client:
        answers = await asyncio.gather(*(_send_http(client, request | {"headers": request.get("headers", {}) | headers}) for headers in forged))
    statuses = [status for status, _ in answers]
    problem = None
    if requests > per_client_limit and 429 not in statuses:
        problem = f"{requests} requests at once from one address: none refused (per-client limit {per_client_limit})"
    return case_result(statuses, problem=problem)


async def _held_stream(target: Target, source: str) -> tuple[int, object]:
    """One of Gradio's event streams from `source`: its status once the answer starts (or
    `NO_ANSWER` after `STREAM_WAIT_S`), and its writer, to close when told."""
    try:
        reader, writer = await asyncio.wait_for(_open(target, source), STREAM_WAIT_S)
        writer.write(f"GET /gradio_api/heartbeat/{source} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n\r\n".encode())
        first = await asyncio.wait_for(reader.read(64), STREAM_WAIT_S)
    except (OSError, asyncio.TimeoutError):
        return NO_ANSWER, None
    return _status_of(first), writer


async def _streams(target: Target, sources: int, per_source: int, probe_bound_s: float) -> dict:
    """`per_source` event streams held from each of `sources` loopback addresses; while they
    are open, the probe must get 200 within `probe_bound_s`."""
    held = await asyncio.gather(*(_held_stream(target, f"127.0.1.{i // per_source + 1}")
                                  for i in range(sources * per_source)))
    probe_status, probe_seconds = await send_probe(target)
    for _, writer in held:
        if writer is not None:
            writer.close()
    problem = None
    if probe_status != 200 or probe_seconds > probe_bound_s:
        problem = (f"a photo sent while {sum(status == 200 for status, _ in held)} streams were open got "
                   f"{probe_status} in {probe_seconds} s (bound {probe_bound_s} s)")
    return case_result([status for status, _ in held], problem=problem,
                       probe_during={"status": probe_status, "seconds": probe_seconds})


async def _upload_series(target: Target, total_mb: int) -> dict:
    """Photos of 9 MB uploaded to the UI one after another from one address, `total_mb` in
    all: past the upload cache's bound per client, 429s."""
    import httpx

    photo = png_of_noise(UPLOAD_SERIES_SIDE)
    request = upload_request([("files", "noise.png", photo)], GRADIO_UPLOAD, content_type="image/png")["http"]
    # From an address of its own: the uploads the bound counts are held for minutes.
    transport = httpx.AsyncHTTPTransport(local_address=UPLOAD_SERIES_SOURCE)
    async with httpx.AsyncClient(base_url=target.url, timeout=120, transport=transport) as client:
        statuses = [(await _send_http(client, request))[0] for _ in range(-(-total_mb * 2**20 // len(photo)))]
    problem = None if 429 in statuses else f"{total_mb} MB of uploads from one address: none refused"
    return case_result(statuses, problem=problem)


async def _decode_queue(target: Target, in_flight: int, seconds: float, abandoned_rounds: int,
                        probe_bound_s: float) -> dict:
    """One client keeps `in_flight` large photos (each a fraction of a second to decode) in
    flight for `seconds`; halfway, the probe (another client) must get 200 within
    `probe_bound_s`. Then it sends `abandoned_rounds` x `in_flight` of them, giving each up after
    `ABANDON_AFTER_S`, and a photo of its own: that must not wait behind the abandoned ones."""
    import httpx

    photo = large_progressive_photo(target.photo)
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=0)
    transport = httpx.AsyncHTTPTransport(local_address=DECODE_QUEUE_SOURCE, limits=limits)
    async with httpx.AsyncClient(base_url=target.url, transport=transport, timeout=None) as client:
        stop = time.perf_counter() + seconds

        async def keep_sending() -> list[int]:
            statuses = []
            while time.perf_counter() < stop:
                statuses.append((await _send_photo(client, photo, 120))[0])
            return statuses

        senders = [asyncio.ensure_future(keep_sending()) for _ in range(in_flight)]
        await asyncio.sleep(seconds / 2)
        probe_status, probe_seconds = await send_probe(target)
        statuses = [status for sender in await asyncio.gather(*senders) for status in sender]
        for _ in range(abandoned_rounds):
            await asyncio.gather(*(_send_photo(client, photo, ABANDON_AFTER_S) for _ in range(in_flight)))
        await asyncio.sleep(ABANDON_AFTER_S)  # for the guard to count the abandoned ones out
        own_status, own_seconds = await _send_photo(client, target.photo, target.probe_timeout_s)
    problems = []
    if probe_status != 200 or probe_seconds > probe_bound_s:
        problems.append(f"a photo sent while one client kept {in_flight} large photos in flight got {probe_status} "
                        f"in {probe_seconds} s (bound {probe_bound_s} s)")
    if own_status != 200 or own_seconds > probe_bound_s:
        problems.append(f"that client's own photo after {abandoned_rounds * in_flight} abandoned ones got "
                        f"{own_status} in {own_seconds} s (bound {probe_bound_s} s)")
    return case_result(statuses, problem="; ".join(problems) or None, photo_bytes=len(photo),
                       probe_during={"status": probe_status, "seconds": probe_seconds},
                       after_abandoned={"status": own_status, "seconds": own_seconds})


async def send_case(target: Target, case: HostileInput, file_read_timeout_s: float, slow_probe_bound_s: float) -> dict:
    """Send one case; see the module's docstring for the answer."""
    request = case.request
    if "http" in request:
        status, body = await _send_http(target.client, request["http"])
        return case_result([status], [(request["http"]["path"], body)])
    if "raw" in request:
        status, body = await _send_raw(target, request["raw"]["head"], request["raw"]["body"])
        return case_result([status], [("raw", body)])
    if "huge_json" in request:
        spec = request["huge_json"]
        framing = "Transfer-Encoding: chunked" if spec["chunked"] else f"Content-Length: {spec['size']}"
        head = (f"{spec['method']} {spec['path']} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                f"Content-Type: application/json\r\n{framing}\r\nConnection: close\r\n\r\n").encode()
        status, body = await _send_raw(target, head, body_size=spec["size"], chunked=spec["chunked"],
                                       filler=(b'{"data": ["', b'"], "fn_index": 0}'))
        return case_result([status], [(spec["path"], body)])
    if "file_read" in request:
        return await _file_read(target, request["file_read"], file_read_timeout_s)
    if "gradio_photo" in request:
        return await _gradio_photo(target, file_read_timeout_s)
    if "slow_bodies" in request:
        spec = request["slow_bodies"]
        return await _slow_clients(target, spec["clients"], spec["wait_s"], slow_probe_bound_s, **_slow_body_client(target))
    if "slow_headers" in request:
        spec = request["slow_headers"]
        return await _slow_clients(target, spec["clients"], spec["wait_s"], slow_probe_bound_s,
                                   **_slow_header_client(target, spec["drip"]))
    if "streams" in request:
        return await _streams(target, **request["streams"], probe_bound_s=slow_probe_bound_s)
    if "upload_series" in request:
        return await _upload_series(target, **request["upload_series"])
    if "flood" in request:
        return await _flood(target, **request["flood"])
    if "decode_queue" in request:
        return await _decode_queue(target, **request["decode_queue"], probe_bound_s=slow_probe_bound_s)
    raise ValueError(f"unknown request of case {case.name}: {sorted(request)}")
