"""Serving: an exported bundle on Ray Serve, with a JSON API and a Gradio UI.

    dogbreeds serve bundles/best                     # http://127.0.0.1:8000/
    serve deploy cluster/serve_config.yaml           # the same application on a cluster

`build_app(ServeArgs)` binds two deployments:
- `Classifier` loads the bundle once per replica, checks each photo, prepares it with the
  bundle's own preprocessing (never re-implemented here) and batches the model calls with
  `@serve.batch`; each answer carries the bundle's verdict (`breed`, `unsure`, `not_a_dog`);
- `Ingress` answers HTTP: `POST /predict` (a multipart upload or the raw image bytes),
  `GET /healthz`, `GET /labels`, `GET /model`, the OpenAPI description at `/docs`, and the
  Gradio UI at `/` (`dogbreeds.ui`), mounted on the same FastAPI app (Ray's `GradioServer`
  fails with Gradio 6), all behind `dogbreeds.guard`. The UI only calls the classifier, like
  any other client.
`run_server` (`dogbreeds serve`) starts Serve's HTTP proxy on loopback behind `dogbreeds.front`.

The service faces strangers (README, Security): every bound on what they send is a
`ServeArgs` field with a safe default. A photo the service cannot read is a 4xx answer
`{"detail": reason}`, never a 500: the checks run before anything is decoded, and a bad photo
never joins a batch.
"""

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import re
from typing import Literal, Optional

import numpy as np
import pydantic
from ray import serve

from dogbreeds import guard
from dogbreeds.config import DEFAULT_TOP_K, ServeArgs
from dogbreeds.photos import ImageError, inspect_image

# The environment variable that holds the API token when no `api_token_file` is given.
TOKEN_VARIABLE = "DOGBREEDS_API_TOKEN"


def parse_serve_args(**values) -> ServeArgs:
    """`ServeArgs` from keyword values; a bad value is a one-line `ValueError`."""
    try:
        return ServeArgs(**values)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in error.errors()
        )
        raise ValueError(problems) from None


# ---------------------------------------------------------------------------------------------
# The classifier: photos checked from their header (`dogbreeds.photos`), then prepared and
# predicted in batches.


class FairSlots:
    """`slots` held at once; a slot given back goes to the waiting client that holds fewest
    (ties in turn, round robin), not in order of arrival: a client with 16 slow photos queued
    delays another's photo by one decoding at most, not 16."""

    def __init__(self, slots: int):
        self.free = slots
        self.held: collections.Counter = collections.Counter()  # client -> slots held
        self.waiting: collections.OrderedDict = collections.OrderedDict()  # client -> deque of futures

    @contextlib.asynccontextmanager
    async def slot(self, client: str):
        if self.free > 0 and not self.waiting:
            self.free -= 1
            self.held[client] += 1
        else:
            granted = asyncio.get_running_loop().create_future()
            self.waiting.setdefault(client, collections.deque()).append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release(client)  # granted as it was cancelled: pass it on
                else:
                    self._forget(client, granted)
                raise
        try:
            yield
        finally:
            self._release(client)

    async def run_in_thread(self, client: str, function, *args):
        """`function(*args)` in a thread, in a slot. Cancelled while waiting, it never runs;
        cancelled while running (a thread cannot be stopped), it keeps its slot to the end."""
        async with self.slot(client):
            running = asyncio.ensure_future(asyncio.to_thread(function, *args))
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                await asyncio.gather(running, return_exceptions=True)
                raise

    def _release(self, client: str) -> None:
        self.held[client] -= 1
        if not self.held[client]:
            del self.held[client]
        while self.waiting:
            client = min(self.waiting, key=self.held.__getitem__)  # the first of the least served
            queue = self.waiting[client]
            granted = queue.popleft()
            if queue:
                self.waiting.move_to_end(client)
            else:
                del self.waiting[client]
            if not granted.done():  # not cancelled meanwhile
                granted.set_result(None)
                self.held[client] += 1
                return
        self.free += 1

    def _forget(self, client: str, granted) -> None:
        queue = self.waiting.get(client)
        if queue is not None and granted in queue:
            queue.remove(granted)
            if not queue:
                del self.waiting[client]


class DecodeSlots:
    """`slots` shared by every photo (`FairSlots`), and one more for photos of at most
    `quick_pixels`, so that a queue of large photos never holds a small one back."""

    def __init__(self, slots: int, quick_pixels: int):
        self.shared, self.quick, self.quick_pixels = FairSlots(slots), FairSlots(1), quick_pixels

    async def run_in_thread(self, client: str, photo: dict, function, *args):
        """`function(*args)` for `photo` (`inspect_image`'s answer), in its slot."""
        slots = self.quick if photo["width"] * photo["height"] <= self.quick_pixels else self.shared
        return await slots.run_in_thread(client, function, *args)


@serve.deployment
class Classifier:
    """The model, loaded once per replica; photos are checked one by one and predicted in
    batches."""

    def __init__(self, args: ServeArgs):
        import tensorflow as tf

        from dogbreeds.export import load_bundle

        reserved = max(1, math.ceil(args.num_cpus_per_replica))
        threads = args.tensorflow_threads or reserved
        if threads > reserved:
            logging.getLogger("ray.serve").warning(
                "tensorflow_threads %d > the replica's %d CPUs: its threads will contend with "
                "the other replicas'", threads, reserved,
            )
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)

        self.args = args
        self.decodes = DecodeSlots(args.max_concurrent_decodes or reserved, args.quick_decode_pixels)
        self.bundle = load_bundle(args.bundle)
        self.info = self.bundle.info | {"tensorflow_threads": tf.config.threading.get_intra_op_parallelism_threads()}
        self.predict_batch.set_max_batch_size(args.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(args.batch_wait_ms / 1000)
        size = self.bundle.image_size
        # The first call traces the graph: pay it here, not in the first request.
        self.bundle.predict_with_novelty(np.zeros((1, size, size, 3), np.uint8))

    def describe(self) -> dict:
        """The bundle's description (name, version, breeds, metrics, configuration) and the
        TensorFlow threads the replica runs with."""
        return self.info

    async def classify(self, encoded: bytes, top_k: int = DEFAULT_TOP_K, client: str = "") -> dict:
        """The `top_k` breeds of one encoded photo, its verdict (`breed`, `unsure` or
        `not_a_dog`) and novelty score, with the model's name and version. Photos are decoded
        a few at a time (each may hold hundreds of MB), `client` by `client` in turn; a
        cancelled request (timed out, or its client left) leaves the queue."""
        photo = inspect_image(encoded, self.args)
        image = await self.decodes.run_in_thread(client, photo, self._prepare, encoded, photo)
        probabilities, score = await self.predict_batch(image)
        names = self.bundle.class_names
        best = np.argsort(-probabilities, kind="stable")[:top_k]
        predictions = [{"breed": names[i], "probability": float(probabilities[i])} for i in best]
        (verdict,) = self.bundle.verdicts(probabilities[None], np.array([score]), self.args.confidence_threshold)
        return {
            "predictions": predictions,
            "verdict": str(verdict),
            "novelty": None if np.isnan(score) else round(float(score), 4),
            "confident": predictions[0]["probability"] >= self.args.confidence_threshold,
            "model": self.bundle.info["name"],
            "version": self.bundle.info["version"],
        }

    def _prepare(self, encoded: bytes, photo: dict) -> np.ndarray:
        import tensorflow as tf

        try:
            return self.bundle.prepare(encoded, photo)
        except tf.errors.OpError as error:
            detail = str(error).strip().splitlines()[0].split("}}")[-1].strip()
            raise ImageError(422, f"the image could not be decoded (corrupt or truncated?): {detail}") from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # set from ServeArgs in __init__
    async def predict_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """(probabilities, novelty score) for a batch of prepared photos, in one model call."""
        # In a thread, so the next batch gathers while this one runs.
        probabilities, scores = await asyncio.to_thread(self.bundle.predict_with_novelty, np.stack(images))
        return list(zip(probabilities, scores))


# ---------------------------------------------------------------------------------------------
# The HTTP API: FastAPI routes around the classifier, errors as `{"detail": reason}`.


class Breed(pydantic.BaseModel):
    """One breed and its probability."""

    breed: str
    probability: float


class Prediction(pydantic.BaseModel):
    """The answer of `POST /predict`."""

    predictions: list[Breed]  # the top k, most probable first
    # not_a_dog: unlike every training dog (novelty over the bundle's threshold); else breed
    # when the top probability reaches the confidence threshold, else unsure.
    verdict: Literal["breed", "unsure", "not_a_dog"]
    novelty: Optional[float]  # distance to the training dogs' features; None: no check in the bundle
    confident: bool  # the top probability reaches the confidence threshold
    model: str
    version: str


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_ERRORS = {
    status: {"description": description}
    for status, description in (
        (400, "no image in the request, or a Host header this service does not answer"),
        (401, "no API token, or a wrong one (when the service has one)"),
        (408, "the body did not arrive in time"),
        (413, "upload over the size limit"),
        (415, "not multipart or an image content type, or not a supported image"),
        (422, "an image that does not decode, too many pixels, too elongated, or a bad k"),
        (429, "too many requests in flight from this client"),
    )
}


async def read_upload(request, max_upload_bytes: int) -> bytes:
    """The photo of a `POST /predict`: a multipart form's `file`, or the raw body (the guard
    has already read the body, bounded in size and time).

    Raises `ImageError` 413 past the size limit, 415 for other content types, 400 without
    a file."""
    from starlette.datastructures import UploadFile

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = content_type == "multipart/form-data"
    if not (multipart or content_type in ("", "application/octet-stream") or content_type.startswith("image/")):
        raise ImageError(
            415,
            f"content type {content_type!r}: send multipart/form-data with a 'file' field, or "
            "the image itself as image/* or application/octet-stream",
        )
    too_large = ImageError(413, f"upload over the limit of {max_upload_bytes} bytes")
    if not multipart:
        body = await request.body()
        if not body:
            raise ImageError(400, "no image: send the photo as the request body or as a multipart 'file'")
        if len(body) > max_upload_bytes:
            raise too_large
        return body
    try:
        form = await request.form(max_files=4, max_fields=16)
    except Exception as error:  # noqa: BLE001 - a malformed form is the client's error
        raise ImageError(400, f"malformed multipart form: {error}") from None
    files = [value for value in form.values() if isinstance(value, UploadFile)]
    upload = form.get("file") if isinstance(form.get("file"), UploadFile) else (files or [None])[0]
    if upload is None:
        raise ImageError(400, "no file in the form: send the photo as the 'file' field")
    encoded = await upload.read(max_upload_bytes + 1)
    if len(encoded) > max_upload_bytes:
        raise too_large
    return encoded


def public_values(value):
    """`value` with every absolute path cut to its last part: what /model shows strangers."""
    if isinstance(value, dict):
        return {key: public_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_values(item) for item in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return os.path.basename(value.rstrip("/")) or "/"
    return value


def read_api_token(args: ServeArgs) -> Optional[str]:
    """The API token: `api_token_file`'s content, else $DOGBREEDS_API_TOKEN, else None."""
    if args.api_token_file:
        try:
            with open(args.api_token_file) as handle:
                token = handle.read(4096).strip()
        except OSError as error:
            raise ValueError(f"API token file {args.api_token_file}: {error.strerror}") from None
    else:
        token = os.environ.get(TOKEN_VARIABLE, "").strip()
        if not token:
            return None
    if not re.fullmatch(r"[A-Za-z0-9._~+/=-]{16,512}", token):
        raise ValueError("the API token must be 16 to 512 letters, digits or ._~+/=- "
                         "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def build_http_app(classifier, info: dict, args: ServeArgs):
    """The ingress's FastAPI app: the JSON API, then the Gradio UI mounted at `/`, all behind
    the guard (`dogbreeds.guard`: hosts, token, body and time limits, requests per client)."""
    token = read_api_token(args)
    app = _api_app(info)
    _add_predict_route(app, classifier, args, len(info["class_names"]))
    _add_description_routes(app, classifier, info, args, token)
    from dogbreeds import ui

    app = ui.mount_ui(app, classifier, info, args)  # after the API: the UI's `/` takes every other path
    limits = guard.Limits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(guard.Limits)})
    app.add_middleware(guard.Guard, limits=limits, token=token)
    return app


def _api_app(info: dict):
    """A FastAPI app named after the bundle, whose every error is `{"detail": "<one string>"}`."""
    import fastapi
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = fastapi.FastAPI(
        title="dogbreeds",
        version=info["version"],
        description=f"Dog breeds of photos: {info['name']} ({len(info['class_names'])} breeds). "
        "The Gradio UI is at /.",
    )

    @app.exception_handler(ImageError)
    async def image_error(request, error: ImageError):
        return JSONResponse({"detail": error.reason}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error: RequestValidationError):
        # One string like every other error, not FastAPI's list of objects.
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'][1:] or e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse({"detail": reasons}, status_code=422)

    return app


def _add_predict_route(app, classifier, args: ServeArgs, num_classes: int) -> None:
    """`POST /predict`: a photo's top k breeds, from the classifier."""
    import fastapi

    @app.post("/predict", response_model=Prediction, responses=_ERRORS, openapi_extra={"requestBody": _UPLOAD_BODY})
    async def predict(
        request: fastapi.Request,
        k: int = fastapi.Query(DEFAULT_TOP_K, ge=1, le=num_classes, description="how many breeds"),
    ):
        """The top k breeds of a photo: a multipart upload (`file`) or the raw image bytes."""
        encoded = await read_upload(request, args.max_upload_bytes)
        return await classifier.classify.remote(encoded, k, guard.client_key(request.client.host if request.client else ""))


def _add_description_routes(app, classifier, info: dict, args: ServeArgs, token: Optional[str]) -> None:
    """`GET /healthz`, `/labels` and `/model`: whether the service answers, and what it serves."""
    num_classes = len(info["class_names"])

    @app.get("/healthz")
    async def healthz():
        """Answers when the classifier answers."""
        described = await classifier.describe.remote()
        return {"status": "ok", "model": described["name"], "version": described["version"]}

    @app.get("/labels")
    def labels():
        """The breeds the model knows, in the order of its outputs."""
        return {"num_classes": num_classes, "labels": info["class_names"]}

    @app.get("/model")
    def model():
        """The model's metrics and provenance (configuration, versions, preprocessing), and
        how it is served."""
        hidden = ("class_names", "tensorflow_threads", "files")
        described = {key: value for key, value in info.items() if key not in hidden}
        serving = args.model_dump(exclude={"bundle", "examples_dir", "api_token_file"})
        serving |= {"tensorflow_threads": info["tensorflow_threads"], "api_token": token is not None}
        return public_values(described | {"serving": serving})


# ---------------------------------------------------------------------------------------------
# The application: the ingress and the typed builder that binds both deployments.


@serve.deployment
@serve.ingress()
class Ingress:
    """HTTP in front of the classifier: the JSON API and the Gradio UI, on one FastAPI app."""

    def __init__(self, classifier, args: ServeArgs):
        self.classifier = classifier
        self.args = args

    async def __serve_build_asgi_app__(self):
        # Built in the replica, after the constructor: the routes and the UI hold the handle.
        info = await self.classifier.describe.remote()
        return build_http_app(self.classifier, info, self.args)


# A stopping replica checks this often whether its requests in flight are done. Serve's
# default, 2 s, is also the least a stop takes: `dogbreeds serve` took 8 s from Ctrl-C to its
# exit with it, 3 s with this.
DRAIN_POLL_S = 0.25


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application for a bundle (a typed app builder: `serve run`, `serve deploy`
    and `dogbreeds serve` all call it)."""
    if isinstance(args, dict):  # called directly rather than by Serve
        args = ServeArgs.model_validate(args)
    from dogbreeds.export import check_bundle

    if args.examples_dir and not os.path.isdir(args.examples_dir):
        raise ValueError(f"examples folder not found: {args.examples_dir}")
    check_bundle(args.bundle)  # digests, format and classes checked before Ray starts
    read_api_token(args)
    args = args.model_copy(update={"bundle": os.path.abspath(args.bundle)})
    if args.max_replicas is not None:
        scaling = dict(
            autoscaling_config={
                "min_replicas": args.num_replicas,
                "max_replicas": max(args.max_replicas, args.num_replicas),
                # Enough requests in flight per replica to fill a batch and gather the next.
                "target_ongoing_requests": args.max_batch_size,
            }
        )
    else:
        scaling = dict(num_replicas=args.num_replicas)
    classifier = Classifier.options(
        **scaling,
        # One batch running and one gathering, and never fewer than 32: Serve's router backs
        # off (hundreds of ms) when every replica is full, which an unbatched one soon is.
        max_ongoing_requests=max(2 * args.max_batch_size, 32),
        ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica},
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    ).bind(args)
    # No CPU reserved: the ingress only parses HTTP and waits on the classifier, and one
    # replica keeps Gradio's queue and its event streams in one process.
    return Ingress.options(
        num_replicas=1, max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    ).bind(classifier, args)


# ---------------------------------------------------------------------------------------------
# Starting Serve: `dogbreeds serve`.


# Ray Serve's high-throughput mode (Ray 2.55+): HAProxy (ray[serve] installs it) in place of
# Serve's Python HTTP proxy, straight to the ingress replica, and gRPC between the deployments.
# Every Ray process reads these, so they are set before Ray starts. Opt-in (`--haproxy`): HAProxy
# also opens its stats (8404) and metrics (9101) ports on every interface. A replica drains
# 2 s, not 30: on one machine HAProxy hears of a stopped replica at once.
HAPROXY_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


# Whether a Ray that `dogbreeds serve` starts exports metrics (default: no).
RAY_METRICS_VARIABLE = "RAY_enable_metrics_collection"


# Serve's own log lines from the proxy and the replicas: warnings and errors (a replica that
# fails, a request that raises) reach the console of `dogbreeds serve`; the access log, a line
# per request, would drown them.
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


def start_serve(host: str, port: int, ray_address: str | None = None, haproxy: bool = False,
                request_timeout_s: float | None = None) -> None:
    """Connect to Ray (`ray_address`, or a new local Ray) and start Serve's HTTP proxy on
    host:port, unless this process already runs them; `haproxy`: in Serve's HAProxy mode;
    `request_timeout_s`: the proxy ends longer requests."""
    import ray

    if haproxy:
        if ray_address or (ray.is_initialized() and any(os.environ.get(k) != v for k, v in HAPROXY_ENV.items())):
            raise ValueError(f"HAProxy mode is set when Ray starts: start it with {HAPROXY_ENV}")
        os.environ.update(HAPROXY_ENV)
    if not ray.is_initialized():
        if not ray_address:
            # Ray's Prometheus endpoint answers anyone on every interface, without a token (node
            # address, session, routes, counts); its gRPC ports need Ray's token. Set the
            # variable to 1 to export metrics all the same.
            os.environ.setdefault(RAY_METRICS_VARIABLE, "0")
        # "local": a new Ray of our own, never a cluster that `ray start` left running. The
        # replicas' output reaches this console (their errors and warnings: SERVE_LOGGING).
        ray.init(address=ray_address or "local", include_dashboard=False)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s},
                logging_config=SERVE_LOGGING)


def run_server(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
               haproxy: bool = False) -> None:
    """`dogbreeds serve`: deploy the app behind the front (`dogbreeds.front`) on host:port, print
    its URL and serve until SIGINT or SIGTERM."""
    import ray

    from dogbreeds.front import Front, limits_from, serve_until_stopped

    if haproxy and "max_requests_per_client" not in args.model_fields_set:
        # Ray's HAProxy does not forward client addresses: every request comes from HAProxy,
        # so a bound per client would bound them all together.
        args = args.model_copy(update={"max_requests_per_client": args.max_ongoing_requests})
    application = build_app(args)  # bad arguments fail before Ray starts
    # Serve's proxy on loopback, for the front only; its own timeout a little after the guard's,
    # for what never reaches the ingress.
    proxy_port = _free_loopback_port()
    start_serve("127.0.0.1", proxy_port, ray_address, haproxy, args.request_timeout_s + 5)
    try:
        serve.run(application, name="dogbreeds", route_prefix="/", logging_config=SERVE_LOGGING)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        banner = (f"dogbreeds serve: {url}/  (JSON API: POST {url}/predict, docs: {url}/docs; "
                  f"Serve's proxy behind it: 127.0.0.1:{proxy_port})")
        asyncio.run(serve_until_stopped(Front(limits_from(args), proxy_port), host, port, banner))
    except KeyboardInterrupt:  # before the front took over the signals
        pass
    finally:
        print("dogbreeds serve: stopping", flush=True)
        serve.shutdown()
        ray.shutdown()


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

