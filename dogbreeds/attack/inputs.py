"""The hostile inputs: the attacks of issue 11 as named cases (`hostile_inputs`), the hostile
files they carry (bombs, corrupt and polyglot files, `multipart` bodies) and the requests that
carry them (`http_request`, `upload_request`), as `send.send_case` reads them."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import secrets
import struct
import tempfile
import zlib
from typing import Optional

CLOSED = 0  # the server closed the connection without an answer
ANY_4XX = frozenset(range(400, 500))
PHOTO_OR_4XX = ANY_4XX | {200}  # a file that is a photo plus something: read it or refuse it
REFUSED_OR_CLOSED = ANY_4XX | {CLOSED}  # what the HTTP layer may do with a malformed request

PREDICT = "/predict"
GRADIO_CALL = "/gradio_api/call/classify_photo"
GRADIO_JOIN = "/gradio_api/queue/join"
GRADIO_UPLOAD = "/gradio_api/upload"
# After the server's request timeout, how long a slow client waits for its answer.
SLOW_GRACE_S = 10.0


@dataclasses.dataclass(frozen=True)
class HostileInput:
    """One attack: its `name`, `kind`, the `request` to send (see `send_case`) and the
    statuses a hardened server may answer."""

    name: str
    kind: str  # predict, gradio, routes, headers or slow
    request: dict
    acceptable: frozenset
    detail_string: bool = False  # the answer must be JSON {"detail": "<a string>"}
    no_absolute_paths: bool = False  # the answer must name no absolute filesystem path
    must_not_create: Optional[str] = None  # a file the request must not write
    must_not_echo: Optional[bytes] = None  # what the request sent that no answer may repeat


# ---------------------------------------------------------------------------------------------
# Hostile bytes.


def _encode(image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_of_zeros(width: int, height: int) -> bytes:
    """A real, complete grayscale PNG of zeros, built row by row: 20000 x 20000 (400M pixels)
    is a few hundred KB, 999,999 x 1 about 1 KB."""
    compressor, row = zlib.compressobj(9), b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _gif_blocks_end(encoded: bytes, position: int) -> int:
    """The position after the data sub-blocks starting at `position` (and their terminator)."""
    while encoded[position]:
        position += encoded[position] + 1
    return position + 1


@functools.lru_cache(maxsize=2)
def animated_gif_bomb(frames: int = 500, side: int = 4000) -> bytes:
    """A GIF of `frames` frames of side x side: ONE frame is encoded, then its image
    descriptor and LZW data are spliced in `frames` times (~13 KB a frame at 4000 x 4000)."""
    from PIL import Image

    single = _encode(Image.new("P", (side, side), 0), "GIF")
    position = 13 + (3 << ((single[10] & 7) + 1) if single[10] & 0x80 else 0)  # after the palette
    while single[position] == 0x21:  # extensions before the image: label, then sub-blocks
        position = _gif_blocks_end(single, position + 2)
    assert single[position] == 0x2C, "Pillow's GIF has no image descriptor where expected"
    start, flags = position, single[position + 9]
    position += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # local palette, LZW size
    frame = single[start:_gif_blocks_end(single, position)]
    netscape_loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # "animated, loop forever"
    return single[:start] + netscape_loop + frame * frames + b"\x3b"


def jpeg_claiming_size(photo: bytes, width: int, height: int) -> bytes:
    """The photo with its frame header (SOF) patched to claim width x height: a header-only
    decompression bomb."""
    position = 2
    while position < len(photo) - 9:
        marker, length = photo[position + 1], struct.unpack(">H", photo[position + 2:position + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            patched = struct.pack(">HH", height, width)
            return photo[:position + 5] + patched + photo[position + 9:]
        position += 2 + length
    raise ValueError("no frame header in the photo")


def jpeg_of_many_scans(scans: int, side: int = 2048) -> bytes:
    """A progressive JPEG of `scans` scans: a plain photo's smallest scan (12 bytes) repeated
    before its end. Every scan is a pass over all side x side pixels: 100,000 (1.6 MB) kept the
    classifier's decoding busy for 172 s, though the file is small and its pixels few."""
    from PIL import Image

    encoded = _encode(Image.new("RGB", (side, side), (120, 100, 80)), "JPEG", progressive=True)
    starts = [index for index in range(len(encoded) - 1) if encoded[index:index + 2] == b"\xff\xda"]
    ends = starts[1:] + [encoded.rindex(b"\xff\xd9")]
    start, end = min(zip(starts, ends), key=lambda scan: scan[1] - scan[0])
    return encoded[:ends[-1]] + encoded[start:end] * (scans - len(starts)) + encoded[ends[-1]:]


def large_progressive_photo(photo: bytes, side: int = 7000) -> bytes:
    """`photo` as a `side` x `side` progressive JPEG: a real photo's detail (3.4 MB at 7000 px,
    under every bound), the slowest kind to decode (0.2-0.7 s here)."""
    from PIL import Image

    return _encode(Image.open(io.BytesIO(photo)).convert("RGB").resize((side, side)), "JPEG", quality=90,
                   progressive=True)


def corrupt_jpeg(photo: bytes) -> bytes:
    """The photo with its Huffman tables overwritten: the header parses, the scan cannot."""
    corrupted, position = bytearray(photo), 2
    while position < len(photo) - 4:
        marker, length = photo[position + 1], struct.unpack(">H", photo[position + 2:position + 4])[0]
        if marker == 0xC4:  # DHT: the code counts become nonsense
            corrupted[position + 5:position + 21] = b"\xff" * 16
        if marker == 0xDA:
            break
        position += 2 + length
    return bytes(corrupted)


def corrupt_png(png: bytes) -> bytes:
    """The PNG with bytes in the middle of its compressed data flipped (its CRC now wrong)."""
    middle = len(png) // 2
    return png[:middle] + bytes(b ^ 0xFF for b in png[middle:middle + 64]) + png[middle + 64:]


def png_of_noise(side: int) -> bytes:
    """A real photo-sized PNG that does not compress: side x side RGB noise, ~3 x side² bytes."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return _encode(Image.fromarray(noise), "PNG", compress_level=0)


def zip_archive(files: dict[str, bytes]) -> bytes:
    """A ZIP archive (a JAR is one) of `files`."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def multipart(parts: list[tuple[str, Optional[str], bytes]], content_type: str = "application/octet-stream",
              boundary: str = "dogbreedsattack") -> tuple[bytes, str]:
    """A multipart/form-data body of (field, file name or None, bytes) parts, built by hand so
    that any file name goes out unescaped; returns the body and its content type."""
    body = bytearray()
    for field, filename, content in parts:
        body += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
            body += f"Content-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        else:
            body += f"Content-Disposition: {disposition}\r\n\r\n".encode()
        body += content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def _spaced_boundary(form: tuple[bytes, str]) -> tuple[bytes, str]:
    """A multipart body whose Content-Type spells `boundary =X`: parsers read it."""
    body, content_type = form
    return body, content_type.replace("boundary=", "boundary =")


def http_request(path: str, content: bytes = b"", content_type: Optional[str] = None, method: str = "POST",
          params: Optional[dict] = None, headers: Optional[dict] = None) -> dict:
    """An HTTP request for `send_case`."""
    headers = dict(headers or {})
    if content_type:
        headers["content-type"] = content_type
    return {"http": {"method": method, "path": path, "params": params or {}, "headers": headers, "content": content}}


def upload_request(parts, path: str = PREDICT, **options) -> dict:
    """A multipart upload of `parts` (see `multipart`) to `path`, for `send_case`."""
    body, content_type = multipart(parts, **options)
    return http_request(path, body, content_type)


def _raw(head: str, body: bytes = b"") -> dict:
    """Bytes sent as they are over a socket (what httpx refuses to send)."""
    return {"raw": {"head": head.encode("latin-1"), "body": body}}


# ---------------------------------------------------------------------------------------------
# The cases.


# Files that are no photo, whatever they claim to be.
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><circle r="40"/></svg>'
SVG_WITH_EXTERNAL_ENTITY = (b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                            b'<svg xmlns="http://www.w3.org/2000/svg"><text>&x;</text></svg>')
HTML = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)><script>alert(2)</script></body></html>"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
       b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def _raw_photo(content: bytes, content_type: str = "image/jpeg", **params) -> dict:
    """`content` as the body of `POST /predict`, with the query `params`."""
    return http_request(PREDICT, content, content_type, params=params)


def _as_file(content: bytes, filename: str = "photo.jpg") -> dict:
    """`content` as the `file` of a multipart `POST /predict`."""
    return upload_request([("file", filename, content)])


# Each family of /predict cases: (name, request, acceptable statuses, detail_string) rows.


def _size_cases(photo: bytes, max_upload_bytes: int) -> list[tuple]:
    """No bytes (400), and one byte over the upload limit (413)."""
    over_limit = photo + b"\0" * (max_upload_bytes + 1 - len(photo))
    return [
        ("zero_bytes", _raw_photo(b""), {400}, True),
        ("zero_byte_file", _as_file(b""), {400}, True),
        ("over_the_size_limit_raw", _raw_photo(over_limit), {413}, True),
        ("over_the_size_limit_multipart", _as_file(over_limit), {413}, True),
    ]


def _not_a_photo_cases(photo: bytes, rgb) -> list[tuple]:
    """What is no photo of a supported format, under its own name or claiming to be one (415)."""
    return [
        ("random_bytes", _raw_photo(secrets.token_bytes(5000), "application/octet-stream"), {415}, True),
        ("text", _as_file(b"a dog, I promise\n" * 20, "notes.txt"), {415}, True),
        ("svg", _as_file(SVG, "dog.svg"), {415}, True),
        ("svg_with_external_entity", _as_file(SVG_WITH_EXTERNAL_ENTITY, "dog.svg"), {415}, True),
        ("html", _as_file(HTML, "dog.html"), {415}, True),
        ("pdf", _as_file(PDF, "dog.pdf"), {415}, True),
        ("tiff", _as_file(_encode(rgb, "TIFF"), "dog.tiff"), {415}, True),
        ("html_sent_as_image_jpeg", _raw_photo(HTML, "image/jpeg"), {415}, True),
        ("pdf_sent_as_image_png", _raw_photo(PDF, "image/png"), {415}, True),
        ("svg_sent_as_image_png", _raw_photo(SVG, "image/png"), {415}, True),
        ("photo_sent_as_application_json", _raw_photo(photo, "application/json"), {415}, True),
    ]


def _broken_photo_cases(photo: bytes, png: bytes) -> list[tuple]:
    """Truncated and corrupt photos, whose header reads but whose pixels do not (422)."""
    return [
        ("truncated_jpeg", _as_file(photo[: len(photo) // 2]), {422}, True),
        ("truncated_png", _as_file(png[: len(png) // 2], "photo.png"), {422}, True),
        ("jpeg_header_only", _as_file(photo[:600]), {422}, True),
        ("corrupt_jpeg_huffman_tables", _as_file(corrupt_jpeg(photo)), {422}, True),
        ("corrupt_png_data", _as_file(corrupt_png(png), "photo.png"), {422}, True),
    ]


def _bomb_cases(photo: bytes) -> list[tuple]:
    """Decompression bombs and extreme shapes, refused from their header (422)."""
    return [
        ("png_decompression_bomb_20000x20000", _as_file(png_of_zeros(20000, 20000), "bomb.png"), {422}, True),
        ("png_999999x1", _as_file(png_of_zeros(999_999, 1), "strip.png"), {422}, True),
        ("png_1x999999", _as_file(png_of_zeros(1, 999_999), "strip.png"), {422}, True),
        ("jpeg_claiming_65000x65000", _as_file(jpeg_claiming_size(photo, 65000, 65000)), {422}, True),
        ("jpeg_of_100000_scans", _as_file(jpeg_of_many_scans(100_000)), {422}, True),
        # Tiny files of many pixels (a second of decoding each): refused by pixels per byte.
        ("webp_lossless_6000x6000_flat", _as_file(_flat(6000, "WEBP", lossless=True), "flat.webp"), {422}, True),
        ("jpeg_progressive_6000x6000_flat", _as_file(_flat(6000, "JPEG", progressive=True, quality=5)), {422}, True),
    ]


def _flat(side: int, image_format: str, **options) -> bytes:
    """A side x side image of one grey: a large photo in a small file."""
    from PIL import Image

    return _encode(Image.new("RGB", (side, side), (120, 120, 120)), image_format, **options)


def _polyglot_cases(photo: bytes, rgb) -> list[tuple]:
    """A photo that is also something else (read it or refuse it), and an animated WebP (read)."""
    jar = zip_archive({"META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\n",
                       "Evil.class": b"\xca\xfe\xba\xbe" + bytes(64)})
    gif = _encode(rgb.resize((256, 256)), "GIF")
    animated_webp = _encode(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(90), rgb.rotate(180)], duration=100)
    return [
        ("jpeg_with_zip_appended", _as_file(photo + zip_archive({"a.txt": b"zip"})), PHOTO_OR_4XX, False),
        ("jpeg_with_html_appended", _as_file(photo + HTML), PHOTO_OR_4XX, False),
        ("gifar", _as_file(gif + jar, "dog.gif"), PHOTO_OR_4XX, False),
        ("animated_webp", _as_file(animated_webp, "dog.webp"), {200}, False),
    ]


def _bad_k_cases(photo: bytes, num_classes: int) -> list[tuple]:
    """A `k` that is no number of breeds this model has (422)."""
    values = {"abc": "abc", "minus_one": "-1", "zero": "0", "1e9": "1e9", "121": "121", "empty": "",
              "past_the_breeds": str(num_classes + 1)}
    return [(f"k_{name}", _raw_photo(photo, k=value), {422}, True) for name, value in values.items()]


def _multipart_cases(photo: bytes) -> list[tuple]:
    """Forms of many files or fields, or malformed: answered or refused, never a 5xx."""
    return [
        ("thousand_files",
         upload_request([("file", "photo.jpg", photo)] + [(f"f{i}", f"{i}.jpg", b"x") for i in range(1000)]),
         PHOTO_OR_4XX, False),
        ("ten_thousand_fields",
         upload_request([("file", "photo.jpg", photo)] + [(f"f{i}", None, b"v") for i in range(10**4)]),
         PHOTO_OR_4XX, False),
        ("multipart_without_its_end", http_request(PREDICT, multipart([("file", "photo.jpg", photo)])[0][:-40],
                                                   multipart([])[1]), ANY_4XX, False),
        ("multipart_without_boundary", http_request(PREDICT, photo, "multipart/form-data"), ANY_4XX, False),
    ]


def _file_name_cases(photo: bytes) -> list[tuple]:
    """A real photo under a hostile file name: path traversal, unicode, a NUL byte, 10,000 characters."""
    names = {
        "path_traversal": "../../../../../../etc/passwd",
        "windows_traversal": "..\\..\\..\\windows\\win.ini",
        "unicode": "pies_\U0001F415_żółw_名前_\u202egpj.exe",
        "nul_byte": "dog.jpg\x00.php",
        "10000_characters": "a" * 10_000 + ".jpg",
    }
    return [(f"filename_{name}", _as_file(photo, filename), PHOTO_OR_4XX, False) for name, filename in names.items()]


def _predict_cases(photo: bytes, num_classes: int, max_upload_bytes: int, gif_frames: int) -> list[HostileInput]:
    """Every /predict case, family by family; the animated GIF bomb last."""
    from PIL import Image

    rgb = Image.open(io.BytesIO(photo)).convert("RGB")
    png = _encode(rgb, "PNG")
    cases = (_size_cases(photo, max_upload_bytes) + _not_a_photo_cases(photo, rgb) + _broken_photo_cases(photo, png)
             + _bomb_cases(photo) + _polyglot_cases(photo, rgb) + _bad_k_cases(photo, num_classes)
             + _multipart_cases(photo) + _file_name_cases(photo))
    # Last of /predict: today every frame is decoded (~10 GB, a minute).
    cases.append((f"animated_gif_{gif_frames}_frames_of_4000x4000",
                  _as_file(animated_gif_bomb(gif_frames), "bomb.gif"), {200, 422}, False))
    return [HostileInput(name, "predict", request, frozenset(acceptable), detail)
            for name, request, acceptable, detail in cases]


def _huge_json(path: str, size: int, chunked: bool = False, method: str = "POST") -> dict:
    """A JSON body of `size` bytes to `path`, generated while it is sent (never held whole)."""
    return {"huge_json": {"path": path, "size": size, "chunked": chunked, "method": method}}


def _gradio_cases(photo: bytes, canaries: dict[str, str], bundle_dir: str, token: str,
                  huge_body_bytes: int, upload_series_mb: int) -> list[HostileInput]:
    """Gradio's routes; the file reads come last, /dev/zero (which hangs today's ingress)
    after every other case of the suite (see `hostile_inputs`)."""
    outside = os.path.join(tempfile.gettempdir(), f"dogbreeds-attack-{secrets.token_hex(8)}-written-by-upload.txt")
    # A server refusing a body it has not read may close the connection while the client still
    # sends, and the client may then never read the 413 (RFC 9112, 9.6): closed counts as refused.
    refused_body = frozenset({413, CLOSED})
    cases = [
        HostileInput("gradio_call_200mb_json", "gradio", _huge_json(GRADIO_CALL, huge_body_bytes), refused_body),
        HostileInput("gradio_join_200mb_json", "gradio", _huge_json(GRADIO_JOIN, huge_body_bytes), refused_body),
        HostileInput("gradio_call_200mb_json_chunked", "gradio", _huge_json(GRADIO_CALL, huge_body_bytes, chunked=True),
                     refused_body | {400, 411}),
        # An event stream answers at once and never reads a body: the body must be bounded anyway.
        HostileInput("gradio_heartbeat_get_with_200mb_body", "gradio",
                     _huge_json("/gradio_api/heartbeat/x", huge_body_bytes, method="GET"), refused_body),
        HostileInput("gradio_queue_data_of_no_session", "gradio",
                     http_request("/gradio_api/queue/data", method="GET", params={"session_hash": "x"}),
                     frozenset({404})),
        HostileInput("gradio_join_of_no_function", "gradio",
                     http_request(GRADIO_JOIN, json.dumps({"data": [None], "fn_index": 99999, "session_hash": "x"}).encode(),
                                  "application/json"), ANY_4XX),
        HostileInput("gradio_upload_of_random_bytes", "gradio",
                     upload_request([("files", "photo.jpg", secrets.token_bytes(100_000))], GRADIO_UPLOAD),
                     frozenset({415})),
        HostileInput(f"gradio_uploads_of_{upload_series_mb}_mb_from_one_address", "gradio",
                     {"upload_series": {"total_mb": upload_series_mb}}, frozenset({200, 429})),
        HostileInput("gradio_upload_1000_files", "gradio",
                     upload_request([("files", f"{i}.jpg", b"x") for i in range(1000)], GRADIO_UPLOAD),
                     frozenset({413})),
        HostileInput("gradio_upload_5_files", "gradio",
                     upload_request([("files", f"{i}.jpg", photo) for i in range(5)], GRADIO_UPLOAD), frozenset({413})),
        HostileInput("gradio_upload_5_files_boundary_with_a_space", "gradio",
                     http_request(GRADIO_UPLOAD, *_spaced_boundary(multipart([("files", f"{i}.jpg", photo) for i in range(5)]))),
                     frozenset({413})),
        HostileInput("gradio_upload_one_photo", "gradio",
                     upload_request([("files", "photo.jpg", photo)], GRADIO_UPLOAD), frozenset({200})),
        HostileInput("gradio_upload_traversal_name", "gradio",
                     upload_request([("files", "../" * 12 + outside.lstrip("/"), b"written outside Gradio's cache")],
                             GRADIO_UPLOAD), PHOTO_OR_4XX, must_not_create=outside),
    ]
    targets = {f"canary_{name}": path for name, path in canaries.items()} | {
        "etc_hostname": "/etc/hostname",
        "etc_passwd": "/etc/passwd",
        "proc_self_environ": "/proc/self/environ",
        "bundle_model": os.path.join(os.path.abspath(bundle_dir), "model.keras"),
        "relative_traversal": "../../../../../../../../etc/passwd",
        "tmp_gradio_traversal": "/tmp/gradio/../../etc/passwd",
        "canary_traversal": "/tmp/gradio/../.." + canaries["plain"],
    }
    cases += [HostileInput(f"gradio_file_read_{name}", "gradio", {"file_read": {"path": path}}, PHOTO_OR_4XX)
              for name, path in targets.items()]
    cases.append(HostileInput("gradio_file_url_etc_passwd", "gradio",
                              {"file_read": {"url": "file:///etc/passwd"}}, PHOTO_OR_4XX))
    return cases


def _header_and_route_cases(photo: bytes, host: str) -> list[HostileInput]:
    return [
        HostileInput("host_evil_example", "headers",
                     http_request(PREDICT, photo, "image/jpeg", headers={"host": "evil.example"}), frozenset({400})),
        HostileInput("header_of_100kb", "headers",
                     _raw(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 100_000}\r\nConnection: close\r\n\r\n"),
                     REFUSED_OR_CLOSED),
        HostileInput("five_thousand_headers", "headers",
                     _raw(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n"
                          + "".join(f"X-H{i}: v\r\n" for i in range(5000)) + "Connection: close\r\n\r\n"),
                     REFUSED_OR_CLOSED | {200}),
        HostileInput("url_of_100kb", "headers",
                     _raw(f"GET /predict?k={'9' * 100_000} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
                     REFUSED_OR_CLOSED),
        HostileInput("header_with_control_bytes", "headers",
                     _raw(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Bad: a\x00\x01\x7f\r\nConnection: close\r\n\r\n"),
                     REFUSED_OR_CLOSED),
        HostileInput("two_host_headers_the_last_allowed", "headers",
                     _raw(f"GET /healthz HTTP/1.1\r\nHost: evil.example\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
                     frozenset({400})),
        HostileInput("forwarded_host_evil_example", "headers",
                     http_request("/", method="GET", headers={"x-forwarded-host": "evil.example"}), frozenset({200}),
                     must_not_echo=b"evil.example"),
        HostileInput("page_of_another_origin_reads_config", "headers",
                     http_request("/config", method="GET", headers={"origin": "http://localhost:1"}),
                     frozenset({403})),
        HostileInput("serve_route_table", "routes", http_request("/-/routes", method="GET"), frozenset({404})),
        HostileInput("serve_route_table_percent_encoded", "routes",
                     _raw(f"GET /%2D/routes HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
                     frozenset({404})),
        HostileInput("gradio_dev_reload", "routes", http_request("/gradio_api/dev/reload", method="GET"),
                     frozenset({404})),
        HostileInput("model_without_paths", "routes", http_request("/model", method="GET"), frozenset({200}),
                     no_absolute_paths=True),
    ]


def hostile_inputs(photo: bytes, bundle_dir: str, canaries: dict[str, str], token: str, host: str,
                   num_classes: int, max_upload_bytes: int = 10 * 1024 * 1024, gif_frames: int = 500,
                   huge_body_bytes: int = 200 * 1024 * 1024, slow_clients: int = 300,
                   slow_wait_s: float = 60.0 + SLOW_GRACE_S, flood_requests: int = 100,
                   per_client_limit: int = 32, header_wait_s: float = 10.0 + SLOW_GRACE_S,
                   upload_series_mb: int = 120) -> list[HostileInput]:
    """Every attack, cheapest and least destructive first: a case that wrecks today's server
    (the 999,999 x 1 PNG, the 500-frame GIF, Gradio reading /dev/zero) runs after the others.

    `canaries` name files of the runner's temporary folder holding `token` (a plain name and a
    unicode one); `host` is the server's host name (raw requests' `Host`); the sizes and
    limits are the server's defaults."""
    predict = _predict_cases(photo, num_classes, max_upload_bytes, gif_frames)
    destructive = {"png_999999x1", "png_1x999999", predict[-1].name}
    slow = [
        HostileInput(f"slow_bodies_{slow_clients}_clients", "slow",
                     {"slow_bodies": {"clients": slow_clients, "wait_s": slow_wait_s}},
                     frozenset({408, 429, 503, CLOSED})),
        HostileInput(f"unfinished_headers_{slow_clients}_connections", "slow",
                     {"slow_headers": {"clients": slow_clients, "wait_s": header_wait_s, "drip": False}},
                     frozenset({408, 429, 503, CLOSED})),
        HostileInput(f"a_header_line_every_2_s_{slow_clients}_connections", "slow",
                     {"slow_headers": {"clients": slow_clients, "wait_s": header_wait_s, "drip": True}},
                     frozenset({408, 429, 503, CLOSED})),
        HostileInput("event_streams_16_from_each_of_36_addresses", "slow",
                     {"streams": {"sources": 36, "per_source": 16}}, frozenset({200, 429, 503})),
        HostileInput("large_photos_16_in_flight_from_one_address_then_abandoned", "slow",
                     {"decode_queue": {"in_flight": 16, "seconds": 6.0, "abandoned_rounds": 5}}, frozenset({200})),
        HostileInput(f"flood_{flood_requests}_requests_from_one_address", "slow",
                     {"flood": {"requests": flood_requests, "per_client_limit": per_client_limit}},
                     frozenset({200, 429})),
        HostileInput(f"flood_{flood_requests}_requests_forging_x_forwarded_for", "slow",
                     {"flood": {"requests": flood_requests, "per_client_limit": per_client_limit, "forge": True}},
                     frozenset({200, 429})),
    ]
    dev_zero = HostileInput("gradio_file_read_dev_zero", "gradio", {"file_read": {"path": "/dev/zero"}}, PHOTO_OR_4XX)
    gradio_photo = HostileInput("gradio_classifies_a_photo", "gradio", {"gradio_photo": {}}, frozenset({200}))
    return ([case for case in predict if case.name not in destructive]
            + _header_and_route_cases(photo, host)
            + _gradio_cases(photo, canaries, bundle_dir, token, huge_body_bytes, upload_series_mb)
            + slow + [gradio_photo]
            + [case for case in predict if case.name in destructive] + [dev_zero])
