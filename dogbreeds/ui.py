"""The Gradio UI of `dogbreeds serve`: a photo in, the top 5 breeds out as bars, or an honest
"not sure" or "not a dog". A client of the classifier like any other (`serve.Classifier`),
mounted at `/` of the ingress's FastAPI app (`serve.build_http_app`), behind the guard, with
`GradioChecks` between them for what Gradio's own routes would let through or answer badly."""

import collections
import json
import os
import time
import urllib.parse

from dogbreeds import guard
from dogbreeds.config import DEFAULT_TOP_K, ServeArgs
from dogbreeds.data import photo_files  # data.py loads TensorFlow only when it decodes
from dogbreeds.photos import ImageError, inspect_image



def mount_ui(app, classifier, info: dict, args: ServeArgs):
    """`app` with the Gradio UI (`build_ui`) mounted at `/`."""
    import gradio

    ui = build_ui(classifier, info, args)
    app = gradio.mount_gradio_app(
        app, ui, path="/", max_file_size=args.max_upload_bytes, footer_links=["api"], ssr_mode=False,
        # System fonts: the default theme fetches Google Fonts, which an offline server may not reach.
        theme=gradio.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                 font_mono=["ui-monospace", "monospace"]),
    )
    # Gradio checks that a file named in an API call was uploaded only once its app counts as
    # launched, which mounting never marks: without this, any server file could be read.
    ui.has_launched = True
    app.add_middleware(GradioChecks, ui=ui, args=args)
    return app


class GradioChecks:
    """ASGI middleware (inside the guard, which has read every body whole) for what Gradio's
    routes would let through or answer badly:
    - an upload to the UI holds images only (415, 422 as for `/predict`), and the uploads a
      client, or all, made within `upload_cache_max_age_s` stay under `max_upload_cache_bytes_per_client`
      and `max_upload_cache_bytes` (429, 503): Gradio keeps them on disk that long;
    - the event stream of a session that has no events is 404 (Gradio starts the stream, then
      raises: 60 lines of traceback in the log per request);
    - a call of a function the UI does not have is 422 (a `KeyError` in Gradio, 500)."""

    def __init__(self, app, ui, args: ServeArgs):
        self.app, self.ui, self.args = app, ui, args
        self.uploads: collections.deque = collections.deque()  # (time, client, bytes), oldest first

    async def __call__(self, scope, receive, send):
        from fastapi.responses import JSONResponse

        path = guard.route(scope) if scope["type"] == "http" else ""
        try:
            if path == "/gradio_api/queue/data":
                self._check_session(scope)
            elif path in ("/gradio_api/upload", "/gradio_api/queue/join") and scope["method"] == "POST":
                message = await receive()  # the whole body: the guard has read it
                body = message.get("body", b"")
                receive = guard.replay(body, receive)
                if path.endswith("/upload"):
                    self._check_upload(scope, body)
                else:
                    self._check_function(body)
        except (ImageError, guard.Refused) as error:
            return await JSONResponse({"detail": error.reason}, status_code=error.status_code)(scope, receive, send)
        await self.app(scope, receive, send)

    def _check_session(self, scope) -> None:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("session_hash", [""])[0] not in self.ui._queue.pending_messages_per_session:
            raise guard.Refused(404, "no events for this session_hash")

    def _check_function(self, body: bytes) -> None:
        try:
            fn_index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError):
            return  # Gradio's own 422
        if fn_index is not None and fn_index not in self.ui.fns:
            raise guard.Refused(422, f"no function {fn_index!r} in this UI")

    def _check_upload(self, scope, body: bytes) -> None:
        files = multipart_parts(body, dict(scope["headers"]).get(b"content-type", b"").decode("latin-1"))
        for content in files:
            inspect_image(content, self.args)
        client, now = guard.client_key((scope.get("client") or ("unknown", 0))[0]), time.monotonic()
        while self.uploads and self.uploads[0][0] < now - self.args.upload_cache_max_age_s:
            self.uploads.popleft()
        size = sum(map(len, files))
        held = sum(nbytes for _, _, nbytes in self.uploads)
        if held + size > self.args.max_upload_cache_bytes:
            raise guard.Refused(503, "the upload cache is full: try again in a few minutes")
        if sum(nbytes for _, key, nbytes in self.uploads if key == client) + size > self.args.max_upload_cache_bytes_per_client:
            raise guard.Refused(429, f"more than {self.args.max_upload_cache_bytes_per_client} bytes uploaded from "
                                  f"{client} in {self.args.upload_cache_max_age_s} s: wait a few minutes")
        self.uploads.append((now, client, size))


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The contents of a multipart body's parts (the guard has checked its boundary)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, parameters = parse_options_header(content_type)
    parts: list[bytearray] = []
    parser = MultipartParser(parameters.get(b"boundary", b"-"), {
        "on_part_begin": lambda: parts.append(bytearray()),
        "on_part_data": lambda data, start, end: parts[-1].extend(data[start:end]),
    })
    try:
        parser.write(body)
        parser.finalize()
    except Exception:  # noqa: BLE001 - a malformed form is the client's error
        raise ImageError(400, "malformed multipart form") from None
    return [bytes(part) for part in parts]


def find_examples(folder: str, count: int = 6) -> list[str]:
    """Up to `count` photos of `folder` for the UI, one per sub-folder first."""
    if not os.path.isdir(folder):
        raise ValueError(f"examples folder not found: {folder}")
    by_folder: dict[str, list[str]] = {}
    for photo in photo_files(folder):
        by_folder.setdefault(os.path.dirname(photo), []).append(photo)
    folders = [photos for _, photos in sorted(by_folder.items())]
    chosen = [photos[0] for photos in folders[:count]]
    rest = [photo for photos in folders for photo in photos if photo not in chosen]
    return chosen + rest[: count - len(chosen)]


def verdict_text(result: dict, num_classes: int) -> str:
    """What the UI says of a photo, in words, from its verdict."""
    breed, probability = result["predictions"][0]["breed"], result["predictions"][0]["probability"]
    if result["verdict"] == "not_a_dog":
        return ("### This does not look like a dog\nIt is unlike every dog this model was trained on "
                f"(were it one, its best guess would be {breed}, {probability:.0%}).")
    if result["verdict"] == "unsure":
        return (f"### Not sure which breed\nA dog, it seems, but maybe of a breed outside the {num_classes} "
                f"this model knows: its best guess, {breed}, has only {probability:.0%}.")
    return f"### {breed}\n{probability:.0%} sure."


def build_ui(classifier, info: dict, args: ServeArgs):
    """The Gradio page: a photo in, the top 5 breeds out as bars, or an honest "not sure"."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a server
    import gradio as gr

    num_classes = len(info["class_names"])
    test = info.get("metrics", {}).get("test", {})
    accuracy = f", test top-1 {test['top1']:.0%}" if "top1" in test else ""

    async def classify_photo(path, request: gr.Request):
        if not path:
            return "", None
        with open(path, "rb") as handle:  # a path Gradio checked it received as an upload
            encoded = handle.read(args.max_upload_bytes + 1)
        try:
            client = guard.client_key(request.client.host if request and request.client else "")
            result = await classifier.classify.remote(encoded, DEFAULT_TOP_K, client)
        except ImageError as error:
            return f"### Cannot read this photo\n{error.reason}", None
        return verdict_text(result, num_classes), {p["breed"]: p["probability"] for p in result["predictions"]}

    # Uploads are deleted once older than upload_cache_max_age_s, checked every minute (or sooner).
    delete_cache = (min(60, args.upload_cache_max_age_s), args.upload_cache_max_age_s)
    with gr.Blocks(title="dogbreeds", delete_cache=delete_cache) as ui:
        gr.Markdown(
            f"# Which dog breed is this?\nUpload or paste a photo. Model {info['name']} "
            f"(version {info['version']}), {num_classes} breeds{accuracy}."
        )
        with gr.Row():
            photo = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             label="Photo", height=360)
            with gr.Column():
                verdict = gr.Markdown(elem_id="verdict")
                bars = gr.Label(num_top_classes=DEFAULT_TOP_K, label="Top 5", show_heading=False, elem_id="top5")
        if args.examples_dir:
            gr.Examples(find_examples(args.examples_dir), inputs=photo, label="Example photos")
        photo.change(classify_photo, photo, [verdict, bars])
    # UI photos batch like API ones; a full queue tells the page the service is busy.
    ui.queue(default_concurrency_limit=args.max_batch_size, max_size=args.ui_queue_size)
    return ui
