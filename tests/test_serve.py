"""Serving, for real: a bundle trained here, the Serve application on 127.0.0.1, every kind
of bad input, a bounded load, a headless Chromium, and the README's serving commands
(`dogbreeds serve`, curl, `serve deploy cluster/serve_config.yaml`, `dogbreeds bench serve`)."""

import asyncio
import contextlib
import functools
import io
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from dogbreeds import cli, photos, ui
from dogbreeds import serve as serving
from tests.conftest import (
    ARTIFACTS, NOT_DOGS_DIR, ROOT, SAMPLE_DIR, SHARED, LocalCluster, free_port, listener, run_readme_curl,
    serving_command,
)

PHOTO = SAMPLE_DIR / "Images" / "n02085620-Chihuahua" / "imagenet_sample_n02085620_Chihuahua.JPEG"
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _photos(folder) -> list[str]:
    return sorted(str(path) for path in pathlib.Path(folder).rglob("*") if path.suffix.lower() in (".jpg", ".jpeg"))


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


@functools.lru_cache
def _png_bomb(side: int = 20000) -> bytes:
    """A real, complete side x side grayscale PNG of zeros: a few hundred KB, 400M pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor, row = zlib.compressobj(9), b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# Fast checks of the pieces, no Ray.


def test_inspect_image_reads_headers_and_refuses_what_it_cannot_read():
    photo = PHOTO.read_bytes()
    args = serving.ServeArgs(bundle="b")

    def bounded(**bounds):
        return args.model_copy(update=bounds)

    assert photos.inspect_image(photo, args)["format"] == "JPEG"
    for encoded, status in [
        (b"", 400),
        (b"just some text\n", 415),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 415),
        (_encode(Image.open(PHOTO), "TIFF"), 415),
        (_png_bomb(), 422),
        (_encode(Image.new("L", (999_999, 1)), "PNG"), 422),
    ]:
        with pytest.raises(photos.ImageError) as error:
            photos.inspect_image(encoded, args)
        assert error.value.status_code == status and error.value.reason
    with pytest.raises(photos.ImageError, match="limit is 1000"):
        photos.inspect_image(photo, bounded(max_image_pixels=1000))
    with pytest.raises(photos.ImageError, match="too elongated"):
        photos.inspect_image(_encode(Image.new("RGB", (300, 100)), "PNG"), bounded(max_aspect_ratio=2.5))
    # Pixels per byte: a 4 MP photo passes; a flat 4 MP image of a few KB does not (under 2 MP it would).
    assert photos.inspect_image(_encode(Image.open(PHOTO).resize((2400, 1800)), "JPEG"), args)["width"] == 2400
    with pytest.raises(photos.ImageError, match="1 byte per 100 pixels"):
        photos.inspect_image(_encode(Image.new("RGB", (2400, 1800)), "WEBP", lossless=True), args)
    assert photos.inspect_image(_encode(Image.new("RGB", (1400, 1400)), "PNG"), args)["width"] == 1400
    # Scans: a progressive photo's 10 pass, the attack suite's 100,000 do not, nor 11 under a bound of 10.
    from dogbreeds.attack.inputs import jpeg_of_many_scans

    progressive = _encode(Image.open(PHOTO), "JPEG", progressive=True)
    assert photos.inspect_image(progressive, bounded(max_jpeg_scans=10))["format"] == "JPEG"
    for scans, bound, side in ((100_000, 100, 2048), (11, 10, 64)):
        with pytest.raises(photos.ImageError, match=f"JPEG of {scans} scans: the limit is {bound}"):
            photos.inspect_image(jpeg_of_many_scans(scans, side), bounded(max_jpeg_scans=bound))


def test_decode_slots_go_to_clients_in_turn():
    """Two slots; one client queues six photos, then another one: the second client's photo is
    decoded next, as soon as a slot is free, not after the six; a cancelled wait gives its turn
    away."""
    order = []

    async def decode(slots, client, seconds=0.01):
        async with slots.slot(client):
            order.append(client)
            await asyncio.sleep(seconds)

    async def main():
        slots = serving.FairSlots(2)
        greedy = [asyncio.ensure_future(decode(slots, "a")) for _ in range(6)]
        await asyncio.sleep(0)
        cancelled = asyncio.ensure_future(decode(slots, "c"))
        await asyncio.sleep(0)
        other = asyncio.ensure_future(decode(slots, "b"))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(*greedy, other, return_exceptions=True)
        assert slots.free == 2 and not slots.waiting and not slots.held

    asyncio.run(main())
    assert order.index("b") == 2 and order.count("a") == 6 and "c" not in order, order


def _decodings(seconds: dict):
    """A fake decoding for `FairSlots.run_in_thread`: `decode(name)` holds its thread for
    `seconds[name]` and answers `name`; `runs` logs [name, start, end] in the order they start."""
    runs = []

    def decode(name):
        run = [name, time.perf_counter(), None]
        runs.append(run)
        time.sleep(seconds[name])
        run[2] = time.perf_counter()
        return name

    return decode, runs


def test_a_cancelled_decoding_keeps_its_slot_until_its_thread_ends():
    """One slot: A decoding (a thread), B waiting, C after them; A and B cancelled. B never
    runs; C starts only once A's thread has ended (a thread cannot be stopped)."""
    decode, runs = _decodings({"A": 0.2, "B": 0.2, "C": 0.2})

    async def main():
        slots = serving.FairSlots(1)
        first = asyncio.ensure_future(slots.run_in_thread("a", decode, "A"))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(slots.run_in_thread("b", decode, "B"))
        after = asyncio.ensure_future(slots.run_in_thread("c", decode, "C"))
        await asyncio.sleep(0.01)
        first.cancel()
        waiting.cancel()
        assert await after == "C"
        await asyncio.gather(first, waiting, return_exceptions=True)
        assert first.cancelled() and waiting.cancelled() and slots.free == 1 and not slots.waiting and not slots.held

    asyncio.run(main())
    assert [name for name, _, _ in runs] == ["A", "C"]
    (_, _, first_end), (_, second_start, _) = runs
    assert first_end <= second_start


@pytest.mark.parametrize("quick_pixels", [16_000_000, 0])
def test_a_small_photo_never_waits_for_a_large_one(quick_pixels):
    """One shared decode slot, held by a large photo (a 0.3 s thread): a small photo from
    another client decodes at once in the quick slot; without it (0), after the large one."""
    decode, runs = _decodings({"large": 0.3, "small": 0.01})

    async def main():
        slots = serving.DecodeSlots(1, quick_pixels)
        large = asyncio.ensure_future(slots.run_in_thread("a", {"width": 7000, "height": 7000}, decode, "large"))
        await asyncio.sleep(0.05)
        await slots.run_in_thread("b", {"width": 500, "height": 375}, decode, "small")
        await large

    asyncio.run(main())
    (_, _, large_end), (_, _, small_end) = runs
    assert (small_end < large_end) == bool(quick_pixels), runs


def test_serve_arguments_are_checked(tiny_bundle_dir, capsys):
    with pytest.raises(ValueError, match="max_batch_size"):
        serving.parse_serve_args(bundle="x", max_batch_size=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        serving.parse_serve_args(bundle="x", batch_size=8)
    with pytest.raises(ValueError, match="not a dogbreeds bundle"):
        serving.build_app(serving.ServeArgs(bundle=str(SAMPLE_DIR)))
    assert cli.main(["serve", "/no/such/bundle"]) == 1
    # HAProxy mode is how Ray starts: a running cluster cannot be switched to it from here.
    assert cli.main(["serve", str(tiny_bundle_dir), "--haproxy", "--address", "auto"]) == 1
    assert "HAProxy mode is set when Ray starts" in capsys.readouterr().err


def test_examples_are_one_photo_per_folder_first():
    examples = ui.find_examples(str(SAMPLE_DIR))
    assert len(examples) == 6 and len({os.path.dirname(path) for path in examples}) == 6
    assert len(ui.find_examples(str(NOT_DOGS_DIR), 20)) == 10


# ---------------------------------------------------------------------------------------------
# A real bundle and a real Serve application.


@pytest.fixture(scope="module")
def bundle_dir(ray_cluster, mobilenet_bundle_dir):
    """The README's mobilenet_025 run exported by the README's command (tests/conftest.py)."""
    return mobilenet_bundle_dir


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    """The same bundle loaded here: `model.predict` without Serve, to compare against."""
    from dogbreeds.export import load_bundle

    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def server(ray_cluster, bundle_dir):
    """The application on this session's Ray, on a free port of 127.0.0.1."""
    from ray import serve

    port = free_port()
    serving.start_serve("127.0.0.1", port)
    args = serving.ServeArgs(bundle=bundle_dir, max_batch_size=16, examples_dir=str(SAMPLE_DIR))
    serve.run(serving.build_app(args), name="dogbreeds", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "args": args}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server["url"], timeout=120) as http:
        yield http


def _expected(bundle, encoded: bytes, k: int = 5) -> list[tuple[str, float]]:
    probabilities = bundle.predict([encoded])[0]
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [(bundle.class_names[i], float(probabilities[i])) for i in best]


def _expected_verdict(bundle, encoded: bytes, confidence_threshold: float = 0.5) -> tuple[str, float]:
    """The verdict and novelty score the bundle itself gives, without Serve."""
    probabilities, scores = bundle.predict_with_novelty(bundle.prepare(encoded)[None])
    return str(bundle.verdicts(probabilities, scores, confidence_threshold)[0]), float(scores[0])


def _assert_consistent(answer: dict, expected: list[tuple[str, float]], bundle) -> None:
    got = [(p["breed"], p["probability"]) for p in answer["predictions"]]
    assert len(got) == len(expected)
    np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], atol=1e-4)
    for (breed, probability), (expected_breed, _) in zip(got, expected):
        # Equal probabilities may come in either order; otherwise the breeds match.
        assert breed == expected_breed or abs(probability - dict(expected)[breed]) < 1e-4
    assert answer["model"] == bundle.info["name"] and answer["version"] == bundle.info["version"]


@pytest.mark.slow
def test_real_photos_get_the_breeds_model_predict_gives(client, bundle):
    from concurrent.futures import ThreadPoolExecutor

    photos = _photos(str(SAMPLE_DIR))
    assert len(photos) == 301

    def ask(path):
        with open(path, "rb") as handle:
            return client.post("/predict", files={"file": (os.path.basename(path), handle)})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, photos))
    assert [answer.status_code for answer in answers] == [200] * len(photos)
    for path, answer in list(zip(photos, answers))[::10]:  # every 10th against model.predict
        with open(path, "rb") as handle:
            _assert_consistent(answer.json(), _expected(bundle, handle.read()), bundle)
    raw = client.post("/predict?k=3", content=PHOTO.read_bytes(), headers={"content-type": "image/jpeg"})
    _assert_consistent(raw.json(), _expected(bundle, PHOTO.read_bytes(), 3), bundle)
    everything = client.post(f"/predict?k={len(bundle.class_names)}", content=PHOTO.read_bytes())
    assert sum(p["probability"] for p in everything.json()["predictions"]) == pytest.approx(1, abs=1e-4)


@pytest.mark.slow
def test_every_answer_has_the_verdict_the_bundle_gives(client, bundle):
    """Photos of dogs, of other breeds and of things that are not dogs: each answer's verdict
    and novelty score are the bundle's own, and some of the not-dogs are called so."""
    not_dogs = _photos(str(NOT_DOGS_DIR)) + _photos(str(SHARED / "data" / "not_dogs_64"))[::8]
    verdicts = {}
    for path in not_dogs + _photos(str(SHARED / "data" / "other_dogs")) + _photos(str(SAMPLE_DIR))[::30]:
        encoded = pathlib.Path(path).read_bytes()
        answer = client.post("/predict", files={"file": (os.path.basename(path), encoded)})
        assert answer.status_code == 200, (path, answer.text)
        _assert_consistent(answer.json(), _expected(bundle, encoded), bundle)
        top = answer.json()["predictions"][0]["probability"]
        assert answer.json()["confident"] == (top >= 0.5)
        verdict, score = _expected_verdict(bundle, encoded)
        assert answer.json()["verdict"] == verdict and answer.json()["novelty"] == pytest.approx(score, abs=1e-3)
        verdicts[path] = verdict
    assert set(verdicts.values()) <= {"breed", "unsure", "not_a_dog"}
    # A frozen MobileNet 0.25 flags about two in three of these (the bundle's threshold keeps 95%
    # of its validation dogs; tests/test_novelty.py measures the rates).
    assert sum(verdicts[path] == "not_a_dog" for path in not_dogs) >= len(not_dogs) / 3


@pytest.mark.slow
def test_health_labels_model_and_openapi(client, bundle):
    assert client.get("/healthz").json() == {
        "status": "ok", "model": bundle.info["name"], "version": bundle.info["version"]
    }
    assert client.get("/labels").json() == {"num_classes": 6, "labels": bundle.class_names}
    model = client.get("/model").json()
    assert model["metrics"]["test"]["top1"] == bundle.info["metrics"]["test"]["top1"]
    assert model["config"]["train"]["model"] == "mobilenet_025" and "versions" in model["config"]
    assert model["preprocessing"]["chain"] == "decode|resize(128)"
    assert model["novelty"]["threshold"] == bundle.novelty_info["threshold"] and model["novelty"]["validation_kept"] >= 0.95
    assert model["serving"]["max_batch_size"] == 16
    # The replica's TensorFlow runs on the one CPU Ray reserved for it, not on every core.
    assert model["serving"]["tensorflow_threads"] == 1
    # Strangers see no path of the server's: data, cache and weights by their last part only.
    assert model["config"]["data"]["data_dir"] == "tiny_dogs_64"
    assert not re.search(r'"(/|~)[^"]*"', json.dumps(model)), "an absolute path in /model"
    assert model["serving"]["api_token"] is False and "api_token_file" not in model["serving"]
    openapi = client.get("/openapi.json").json()
    assert {"/predict", "/healthz", "/labels", "/model"} <= set(openapi["paths"])
    assert "multipart/form-data" in openapi["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert "gradio" in page.text.lower()
    # No answer is read as another type than it says, or framed by another site.
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "SAMEORIGIN"


@functools.lru_cache
def _gif_bomb(frames: int = 500, side: int = 4000) -> bytes:
    """One side x side GIF frame, its image block repeated `frames` times: ~13 KB a frame."""
    one = _encode(Image.new("P", (side, side)), "GIF")
    block = one[one.index(b"\x2c\x00\x00\x00\x00"):-1]  # image descriptor + LZW data
    return one[:-1] + block * (frames - 1) + b"\x3b"


@functools.lru_cache
def _odd_but_valid_images() -> dict[str, bytes]:
    """Real photos in the forms a browser or a phone may send."""
    rgb = Image.open(PHOTO).convert("RGB")
    gray16 = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    assert gray16.mode == "I;16"
    return {
        "png_with_alpha": _encode(rgb.convert("RGBA"), "PNG"),
        "grayscale_jpeg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk_jpeg": _encode(rgb.convert("CMYK"), "JPEG"),
        "png_16_bit": _encode(gray16, "PNG"),
        "animated_gif": _encode(rgb, "GIF", save_all=True, append_images=[rgb.rotate(90)], duration=100, loop=0),
        "webp": _encode(rgb, "WEBP"),
        "animated_webp": _encode(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(90)], duration=100),
        "bmp": _encode(rgb, "BMP"),
        # 500 frames of 4000x4000 in 6.5 MB: only the first frame is ever decoded.
        "gif_of_500_large_frames": _gif_bomb(),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["png_with_alpha", "grayscale_jpeg", "cmyk_jpeg", "png_16_bit", "animated_gif", "webp",
                                  "animated_webp", "bmp", "gif_of_500_large_frames"])
def test_odd_but_valid_images_get_predictions(client, bundle, name):
    encoded = _odd_but_valid_images()[name]
    answer = client.post("/predict", files={"file": (f"photo.{name}", encoded)})
    assert answer.status_code == 200, answer.text
    # An animated GIF: its first frame, exactly as the bundle's own preprocessing reads it.
    _assert_consistent(answer.json(), _expected(bundle, encoded), bundle)


def _bad_requests(limit: int) -> dict:
    """Each bad request (a function giving httpx.post's keyword arguments) and its status."""
    photo = PHOTO.read_bytes()
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><circle r="40"/></svg>'
    return {
        "zero_bytes": (lambda: dict(content=b"", headers={"content-type": "image/jpeg"}), 400),
        "zero_byte_file": (lambda: dict(files={"file": ("empty.jpg", b"", "image/jpeg")}), 400),
        "random_bytes": (lambda: dict(content=np.random.default_rng(0).bytes(5000)), 415),
        "truncated_jpeg": (lambda: dict(files={"file": ("cut.jpg", photo[: len(photo) // 2], "image/jpeg")}), 422),
        "text_file": (lambda: dict(files={"file": ("notes.txt", b"a dog, I promise\n" * 20, "text/plain")}), 415),
        "svg": (lambda: dict(files={"file": ("dog.svg", svg, "image/svg+xml")}), 415),
        "tiff": (lambda: dict(files={"file": ("dog.tiff", _encode(Image.open(PHOTO), "TIFF"), "image/tiff")}), 415),
        "decompression_bomb": (lambda: dict(files={"file": ("bomb.png", _png_bomb(), "image/png")}), 422),
        # 1 KB that costs 1.2 GB to resize.
        "png_of_999999x1": (lambda: dict(content=_encode(Image.new("L", (999_999, 1)), "PNG")), 422),
        "over_the_size_limit": (lambda: dict(files={"file": ("big.jpg", photo + b"\0" * limit, "image/jpeg")}), 413),
        "raw_over_the_size_limit": (
            lambda: dict(content=photo + b"\0" * limit, headers={"content-type": "image/jpeg"}), 413
        ),
        "wrong_content_type": (lambda: dict(content=photo, headers={"content-type": "application/json"}), 415),
        "text_content_type": (lambda: dict(content=photo, headers={"content-type": "text/plain"}), 415),
        "no_file_at_all": (lambda: dict(), 400),
        "form_without_a_file": (lambda: dict(files={"photo_url": (None, "http://example.com/dog.jpg")}), 400),
        "k_zero": (lambda: dict(content=photo, params={"k": 0}), 422),
        "k_past_the_breeds": (lambda: dict(content=photo, params={"k": 121}), 422),
        "k_not_a_number": (lambda: dict(content=photo, params={"k": "abc"}), 422),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_bad_requests(1)))
def test_bad_input_is_a_4xx_with_a_reason_then_the_service_still_answers(client, server, bundle, case):
    request, status = _bad_requests(server["args"].max_upload_bytes)[case]
    answer = client.post("/predict", **request())
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert isinstance(answer.json()["detail"], str) and answer.json()["detail"], answer.text  # the reason
    after = client.post("/predict", files={"file": (PHOTO.name, PHOTO.read_bytes())})
    assert after.status_code == 200
    _assert_consistent(after.json(), _expected(bundle, PHOTO.read_bytes()), bundle)


@pytest.mark.slow
def test_sixteen_clients_for_twenty_seconds_get_no_errors(server, bundle):
    """A bounded load on 127.0.0.1: every answer a 200 with the right breeds."""
    import httpx

    photos = [pathlib.Path(path).read_bytes() for path in _photos(str(SAMPLE_DIR))[:32]]
    expected = {index: _expected(bundle, photo)[0][0] for index, photo in enumerate(photos)}
    statuses, wrong = [], []

    async def client_loop(http, offset):
        deadline, index = time.perf_counter() + 20, offset
        while time.perf_counter() < deadline:
            answer = await http.post("/predict", files={"file": ("photo.jpg", photos[index % len(photos)])})
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                breeds = [p["breed"] for p in answer.json()["predictions"]]
                if expected[index % len(photos)] not in breeds[:2]:  # ties may swap the first two
                    wrong.append(index % len(photos))
            index += 16

    async def load():
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server["url"], timeout=120, limits=limits) as http:
            await asyncio.gather(*(client_loop(http, offset) for offset in range(16)))

    asyncio.run(load())
    assert len(statuses) >= 32 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert wrong == []


@pytest.mark.slow
def test_a_browser_uploads_a_photo_and_sees_breeds(server, bundle):
    """Headless Chromium on the Gradio page: upload a dog, a cat, click an example photo; read
    the verdict and the top 5 bars each time. Screenshots go to test-artifacts/."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    examples = ui.find_examples(str(SAMPLE_DIR))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(server["url"] + "/", wait_until="networkidle", timeout=60_000)
            assert "Which dog breed is this?" in page.content()
            assert page.locator("button.gallery-item").count() == len(examples) == 6
            for photo, name in (
                (PHOTO, "serve_ui_dog.png"),
                (NOT_DOGS_DIR / "cat_01.jpg", "serve_ui_not_a_dog.png"),
                (examples[1], "serve_ui_example.png"),
            ):
                before = page.locator("#top5").inner_text()
                if photo == examples[1]:
                    page.locator("button.gallery-item").nth(1).click()
                else:
                    page.locator("input[type=file]").first.set_input_files(str(photo))
                expected = _expected(bundle, pathlib.Path(photo).read_bytes())
                top_breed, top_probability = expected[0]
                page.wait_for_function(
                    "([breed, percent, before]) => { const t = document.querySelector('#top5')?.innerText || '';"
                    " return t !== before && t.includes(breed) && t.includes(percent); }",
                    arg=[top_breed, f"{top_probability:.0%}", before],
                    timeout=60_000,
                )
                top5 = page.locator("#top5").inner_text()
                assert all(breed in top5 for breed, _ in expected)
                expected_verdict, _ = _expected_verdict(bundle, pathlib.Path(photo).read_bytes())
                words = {"breed": top_breed, "unsure": "Not sure which breed",
                         "not_a_dog": "This does not look like a dog"}[expected_verdict]
                # The verdict box may still show Gradio's "processing" line a moment after the bars.
                page.wait_for_function(
                    "(words) => (document.querySelector('#verdict')?.innerText || '').trim().startsWith(words)",
                    arg=words, timeout=30_000,
                )
                verdict = page.locator("#verdict").inner_text()
                assert verdict.strip().startswith(words), verdict
                page.wait_for_timeout(1000)  # Gradio fades its outputs in
                page.screenshot(path=str(ARTIFACTS / name), full_page=True)
                assert (ARTIFACTS / name).stat().st_size > 10_000
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------
# The README's serving commands, run for real.


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def _dogbreeds_serve(argv: list[str], log, env=None):
    """`dogbreeds serve ...` as a user runs it: yields the URL it prints; stopped by SIGINT
    within a minute, after which it must exit 0."""
    with open(log, "w") as output:
        # Started as a shell starts a background job, with SIGINT ignored: Ctrl-C (or `kill
        # -INT`) must stop it all the same.
        process = subprocess.Popen([sys.executable, "-m", "dogbreeds.cli", "serve", *argv], cwd=ROOT,
                                   stdout=output, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = _wait_for(
            lambda: re.search(r"^dogbreeds serve: (http://\S+)/ ", log.read_text(), re.M) or process.poll() is not None,
            240, "the printed URL",
        )
        assert process.poll() is None, log.read_text()[-3000:]
        yield line.group(1)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_dogbreeds_serve_with_haproxy_answers_the_readme_curl(bundle_dir, tmp_path):
    """The README's `dogbreeds serve` with `--haproxy` (tests/test_attack.py runs it as written,
    behind Serve's own proxy)."""
    command = serving_command(".venv/bin/dogbreeds serve ").removeprefix(".venv/bin/dogbreeds serve ")
    port = free_port()
    argv = [arg.replace("runs/bundle", bundle_dir) for arg in shlex.split(command)] + ["--port", str(port), "--haproxy"]
    with _dogbreeds_serve(argv, tmp_path / "serve.log") as url:
        assert url == f"http://127.0.0.1:{port}"  # 127.0.0.1 unless told otherwise
        answer = run_readme_curl(port)
        assert len(answer["predictions"]) == 3 and answer["predictions"][0]["breed"]
        # HAProxy behind the front, on the port the front passes requests to.
        (proxy_port,) = re.findall(r"Serve's proxy behind it: 127\.0\.0\.1:(\d+)", (tmp_path / "serve.log").read_text())
        assert listener(int(proxy_port)) == "haproxy"
        # Behind HAProxy every client has HAProxy's address: no bound per client but the total.
        serving = json.loads(urllib.request.urlopen(f"{url}/model", timeout=60).read())["serving"]
        assert serving["max_requests_per_client"] == serving["max_ongoing_requests"]
        # The Gradio UI's own API (its event queue, streamed) answers through HAProxy.
        import gradio_client

        ui = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        verdict, bars = ui.predict(gradio_client.handle_file(str(PHOTO)), api_name="/classify_photo")
        assert verdict.startswith("###") and len(bars["confidences"]) == 5


@pytest.fixture(scope="module")
def guarded_server(bundle_dir, tmp_path_factory):
    """`dogbreeds serve` with an API token file and a 3-second life for UI uploads; and three
    TensorFlow threads on the classifier's one reserved CPU, which it warns about at start-up.
    Its console (stdout and stderr) goes to `log`."""
    folder = tmp_path_factory.mktemp("guarded")
    token = "t0ken-" + os.urandom(16).hex()
    (folder / "api_token").write_text(token + "\n")
    argv = [bundle_dir, "--port", str(free_port()), "--api-token-file", str(folder / "api_token"),
            "--upload-cache-max-age-s", "3", "--tensorflow-threads", "3", "--cpus-per-replica", "1"]
    with _dogbreeds_serve(argv, folder / "serve.log") as url:
        yield {"url": url, "token": token, "log": folder / "serve.log"}


@pytest.mark.slow
def test_replica_warnings_reach_the_console_and_requests_do_not(guarded_server):
    """`dogbreeds serve` shows what its replicas report (warnings, errors), not a line per
    request."""
    for _ in range(3):
        with urllib.request.urlopen(f"{guarded_server['url']}/healthz", timeout=30) as answer:
            assert answer.status == 200
    def warnings():  # Ray forwards a replica's lines to the console within a second or so
        return [line for line in guarded_server["log"].read_text().splitlines()
                if "tensorflow_threads 3 > the replica's 1 CPUs" in line]

    (warning, *_) = _wait_for(warnings, 60, "the classifier's warning on the console")
    assert "Classifier" in warning
    time.sleep(2)  # what the requests would log has reached the console by now
    assert "GET /healthz" not in guarded_server["log"].read_text()


@pytest.mark.slow
def test_what_dogbreeds_serve_opens_beyond_loopback_needs_rays_token(guarded_server):
    """Every port of `dogbreeds serve` and the Ray it started: the front on 127.0.0.1; on other
    interfaces only Ray's gRPC servers and agents, which want Ray's token: no HTTP answer but
    401 (Ray's Prometheus metrics answered anyone there)."""
    import psutil

    port = int(guarded_server["url"].rsplit(":", 1)[1])
    (front,) = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    processes = [psutil.Process(front), *psutil.Process(front).children(recursive=True)]
    listening = {(c.laddr.ip, c.laddr.port) for process in processes for c in process.net_connections("tcp")
                 if c.status == "LISTEN"}
    assert ("127.0.0.1", port) in listening
    exposed = [(ip, p) for ip, p in listening if not ip.startswith("127.") and ip != "::1"]
    assert exposed, "Ray's gRPC servers listen on every interface: expected some"
    for ip, exposed_port in exposed:
        address = "127.0.0.1" if ip in ("0.0.0.0", "::") else ip
        with socket.create_connection((address, exposed_port), timeout=5) as connection:
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            connection.settimeout(3)
            try:
                answer = connection.recv(200)
            except OSError:
                answer = b""
        assert not answer.startswith(b"HTTP/") or answer[9:12] == b"401", f"{ip}:{exposed_port} answered {answer!r}"


@pytest.mark.slow
def test_an_api_token_guards_the_api_and_the_ui(guarded_server):
    """/predict and the UI answer 401 without the token and work with it (a bearer header, or
    the cookie a browser gets from `/?token=`); /healthz stays open for load balancers; the
    token never shows in /model."""
    import gradio_client
    import httpx

    url, token = guarded_server["url"], guarded_server["token"]
    photo = PHOTO.read_bytes()
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200
        for path in ("/", "/model", "/labels", "/gradio_api/info", "/docs"):
            assert http.get(path).status_code == 401, path
        refused = http.post("/predict", content=photo)
        assert refused.status_code == 401 and "token" in refused.json()["detail"]
        wrong = {"Authorization": "Bearer " + token[:-1] + "x"}
        assert http.post("/predict", content=photo, headers=wrong).status_code == 401
        bearer = {"Authorization": f"Bearer {token}"}
        assert http.post("/predict", content=photo, headers=bearer).status_code == 200
        assert http.post("/predict", content=photo, headers={"Authorization": f"bearer {token}"}).status_code == 200
        # `?token=` opens a page; an API call carries it in a header, not in logged URLs.
        assert http.post(f"/predict?token={token}", content=photo).status_code == 401
        model = http.get("/model", headers=bearer)
        assert model.json()["serving"]["api_token"] is True and token not in model.text
    with httpx.Client(base_url=url, timeout=60) as browser:  # keeps cookies, like a browser
        opened = browser.get(f"/?token={token}")
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        # The token's link always leads home: not to another site, nor a 500 for a path Location cannot hold.
        for path in ("//evil.example/", "/%E2%98%83"):
            assert browser.get(f"{path}?token={token}", follow_redirects=False).headers["location"] == "/", path
        assert browser.get("/").status_code == 200 and "gradio" in browser.get("/").text.lower()
        assert browser.post("/predict", content=photo).status_code == 200
    ui = gradio_client.Client(f"{url}/", verbose=False, headers={"Authorization": f"Bearer {token}"})
    verdict, bars = ui.predict(gradio_client.handle_file(str(PHOTO)), api_name="/classify_photo")
    assert verdict.startswith("###") and len(bars["confidences"]) == 5


@pytest.mark.slow
def test_uploads_leave_gradios_cache(guarded_server):
    import httpx

    bearer = {"Authorization": f"Bearer {guarded_server['token']}"}
    with httpx.Client(base_url=guarded_server["url"], timeout=60, headers=bearer) as http:
        upload = http.post("/gradio_api/upload", files=[("files", ("dog.jpg", PHOTO.read_bytes(), "image/jpeg"))])
        assert upload.status_code == 200, upload.text
        (cached,) = upload.json()
        assert pathlib.Path(cached).read_bytes() == PHOTO.read_bytes()
        _wait_for(lambda: not pathlib.Path(cached).exists(), 30, "the upload to leave the cache")


@pytest.mark.slow
def test_serve_deploy_of_the_cluster_config_on_a_ray_started_head(bundle_dir, tmp_path):
    """`ray start --head` (token authentication, as Ray 2.60 sets up) and the README's
    `serve deploy cluster/serve_config.yaml`, with only the bundle, the token file, host and port
    changed; the README's curl for a cluster, with its token, answers."""
    import httpx
    import yaml

    config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    serve_port = free_port()
    config["http_options"].update(host="127.0.0.1", port=serve_port)
    (application,) = config["applications"]
    application["args"]["bundle"] = bundle_dir
    cluster_token_file, token_file = application["args"]["api_token_file"], tmp_path / "api_token"
    token_file.write_text(os.urandom(24).hex())
    application["args"]["api_token_file"] = str(token_file)
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    deploy = serving_command("serve deploy ").replace("cluster/serve_config.yaml", str(config_path))

    bin_dir = os.path.dirname(sys.executable)
    # One head node of two CPUs, in its own temp dir: no other ray.init on this machine finds it.
    head = LocalCluster(tmp_path, workers=0, num_cpus=2)
    try:
        head.start()
        env = {**head.env, "RAY_DASHBOARD_ADDRESS": head.dashboard}
        result = subprocess.run(f"{bin_dir}/{deploy}", shell=True, env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr

        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{serve_port}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(healthy, 240, "the deployed application")
        assert httpx.post(f"http://127.0.0.1:{serve_port}/predict", content=PHOTO.read_bytes()).status_code == 401
        curl = serving_command("curl -H ").replace("127.0.0.1:8000", f"127.0.0.1:{serve_port}")
        curl = curl.replace(cluster_token_file, str(token_file))
        result = subprocess.run(["bash", "-c", curl + " --silent --show-error --max-time 120"], cwd=ROOT,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["predictions"]) == 3, result.stdout
    finally:
        head.stop()  # the node's every process, Serve's with them


@pytest.mark.slow
def test_bench_serve_prints_and_writes_json(server, bundle_dir, tmp_path, capsys):
    command = serving_command(".venv/bin/dogbreeds bench serve ").removeprefix(".venv/bin/dogbreeds ")
    argv = [bundle_dir if arg == "runs/bundle" else arg.replace("runs/", f"{tmp_path}/") for arg in shlex.split(command)]
    # Short: this checks the command, not the numbers (README's come from the full run).
    argv += ["--concurrency", "1", "4", "--duration", "1", "--max-batch-size", "8", "--port", str(server["port"])]
    assert cli.main(argv) == 0
    output = pathlib.Path(argv[argv.index("--output") + 1]) / "bench_serve.json"  # --output is a directory
    result = json.loads(output.read_text())
    for mode in ("batched", "unbatched"):
        for concurrency in ("1", "4"):
            measured = result[mode][concurrency]
            assert measured["requests"] > 0 and measured["errors"] == 0
            assert 0 < measured["p50_ms"] <= measured["p99_ms"]
            assert all(measured["cpu_ms_per_request"][role] > 0 for role in ("ingress", "classifier", "clients"))
    assert result["num_cpus_per_replica"] == 1
    assert result["bare_model_predict_images_per_s"] > 0 and result["bare_forward_images_per_s"] > 0
    assert result["bare_forward_batched_over_one_photo"] == pytest.approx(
        result["bare_forward_images_per_s"] / result["bare_forward_one_photo_images_per_s"], abs=0.01)
    assert result["serve_at_4_over_bare_model_predict"] > 0 and result["batched_over_unbatched_at_4"] > 0
    for kind in ("baseline", "progressive"):
        assert result[f"prepare_12mp_{kind}_jpeg_scaled_over_whole"] == pytest.approx(
            result[f"prepare_12mp_{kind}_jpeg_per_s"] / result[f"prepare_12mp_{kind}_jpeg_whole_per_s"], abs=0.01)
    assert '"benchmark": "serve"' in capsys.readouterr().out
