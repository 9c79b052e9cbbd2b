"""The one typed configuration of a run: every field has a default and a reason.

A run directory keeps the resolved configuration as `config.json`, and an exported bundle
keeps it too, so every number can be traced to what produced it.

`DataConfig` and `TrainConfig` (frozen dataclasses) say what a run does, `SearchConfig` how a
search runs; `ServeArgs` (a frozen pydantic model: `serve deploy` validates a config file's
`args` with it) says how a bundle is served. The comment above each field is its reason, and
also its `--help`, so a default and its reason are written once.

Every field a user can set is a `Setting` (`settable_fields`: its type, default, reason and
checks), from which `dogbreeds.options` derives its options and `read_settings_file` reads
`--config FILE.yaml`; a value is checked the same way from either.

Light on purpose (pydantic, no TensorFlow or Ray): the CLI imports it to build its options.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import textwrap
import types
import typing
from typing import Any, Mapping, NamedTuple, Optional

import pydantic

from dogbreeds import spaces


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and augmented."""

    # None reads TFDS `stanford_dogs` (downloads on a connected machine); a path reads a
    # folder in the layout of the official images.tar (`Images/<synset>-<breed>/*`).
    data_dir: str | None = None
    # Where TFDS keeps its downloads and prepared records; None is TFDS's own default.
    tfds_dir: str | None = None
    # None uses the model's own input size (299 for the study); small sizes fit a CPU.
    image_size: int | None = None
    # Share of train carved out for early stopping and model selection (never the test split).
    validation_fraction: float = 0.1
    # Share held out as test when a folder has no official lists/*.mat split.
    test_fraction: float = 0.2
    # The study searched on part of the data: keep at most this many train images per class...
    subset_per_class: int | None = None
    # ...or this fraction of each class of the train split (applied after subset_per_class).
    subset_fraction: float | None = None
    # One seed for the splits, the subset and the augmentation order.
    seed: int = 0
    # Random rotation as a fraction of a full turn (0.1 is +-36 degrees); 0 turns it off.
    rotation_factor: float = 0.1
    # Random horizontal flip of train images; dogs look the same mirrored.
    horizontal_flip: bool = True
    # Random zoom-out of train images: the photo shrinks to between 1 - zoom_out and all of
    # its side, at a random place, the rest its own edges mirrored; 0 turns it off. Box crops
    # (the dog fills the frame) then look like whole photos (a smaller dog, off centre).
    zoom_out: float = 0.0
    # Test-time flip: a trained model's answer for a photo is the mean of its answers for the
    # photo and its mirror image, in evaluation (validation and test), the not-a-dog check and
    # the bundle (serving), for twice the inference compute. On the cpu profile's fine-tuned
    # model: test top-1 0.587 against 0.574, whole photos 0.542 against 0.528.
    test_time_flip: bool = False
    # The study's offline augmentation: this many augmented views of each train image
    # (it used 9). 0 augments on the fly instead, a fresh view every epoch.
    augmented_views: int = 0
    # Resized images are cached here as .npz, keyed by the files and the image size, so the
    # JPEG decoding happens once per machine, not once per epoch or trial.
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "dogbreeds")
    # The cache's bound in GB: after a split is decoded, the cache files used least recently
    # are deleted until the cache fits (0: no bound). The cpu profile's study decodes 3 GB into
    # it; each other image size, dataset or cut adds its own files.
    cache_max_gb: float = 20.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how, following the study's common setup."""

    # A name from the model registry (`dogbreeds models`).
    model: str = "cnn3v2"
    # The model's hyperparameters (filters, dropout rates, ...); the registry has defaults.
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Transfer backbones: "imagenet" (Keras' download), a local .h5 path, or None (random).
    weights: str | None = "imagenet"
    # The study trained for 20 epochs, with early stopping cutting most runs short.
    epochs: int = 20
    # Images per worker and step; the global batch is this times the number of workers.
    per_worker_batch_size: int = 32
    # Adam's default learning rate, the study's choice, for one worker's batch: with more
    # workers the global batch grows and the rate with it (the linear scaling rule of Goyal et
    # al., 2017), as the same epochs take fewer steps.
    learning_rate: float = 1e-3
    # Epochs over which the learning rate climbs linearly from near zero to its value, so the
    # first steps of a large or fine-tuning rate do not undo what was learned; 0 starts at it.
    warmup_epochs: float = 0.0
    # Stop after this many epochs without a better validation loss, keeping the best weights.
    early_stopping_patience: int = 8
    # The epoch whose weights the run keeps: early stopping's best validation loss (the
    # study's), or a search's metric (`val_accuracy`, ...), so that a trial's model is the epoch
    # its search scored it by.
    keep_best_by: str = "val_loss"
    # Lower the learning rate when validation loss stalls this many epochs...
    reduce_lr_patience: int = 3
    # ...multiplying it by this factor.
    reduce_lr_factor: float = 0.2
    # Label smoothing of the cross-entropy; 0 is the study's plain loss.
    label_smoothing: float = 0.0
    # Ray Train workers; each holds a full model replica (MultiWorkerMirroredStrategy).
    workers: int = 1
    # GPUs per worker; 0 trains on CPUs.
    gpus_per_worker: float = 0
    # CPUs per worker; also TensorFlow's thread count there, so workers do not fight.
    cpus_per_worker: int = 1
    # How often Ray Train restarts the workers from the last checkpoint after a failure.
    max_failures: int = 2
    # Seed of the weights' initialisation.
    seed: int = 0
    # Fine-tuning a transfer model: the top fraction of its backbone's layers that train
    # (BatchNorm stays frozen, in inference mode); 0 keeps the backbone frozen.
    fine_tune_fraction: float = 0.0
    # Fine-tuning: start from this head (a head search trial's head.weights.h5), not a new one.
    head_weights: str | None = None


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How a search runs; the data and training configurations say what each trial does."""

    # A YAML file, or the name of one in search_spaces/ (its `search:` says which search it is).
    space: str
    # How many configurations to try.
    trials: int = 8
    # Trials running at once; each takes `workers` x `cpus_per_worker` CPUs (and GPUs).
    concurrent_trials: int = 1
    # "random" (Optuna's RandomSampler) or "tpe" (its TPESampler), through Tune's OptunaSearch.
    algorithm: str = "random"
    # "asha" stops poor trials early (Keras Tuner's Hyperband idea); "none" runs all to the end.
    scheduler: str = "asha"
    # Retries of a crashed trial (it resumes from its last checkpoint).
    max_trial_failures: int = 2
    # Retrain the best configuration without the subset and evaluate it once on the test split
    # (a cnn3v2 search; a head search always joins its best head to the backbone and tests it).
    retrain_best: bool = True


# Below this top probability an answer is `unsure` instead of a breed (novelty.py's verdicts,
# the bundle's and the server's default).
CONFIDENCE_THRESHOLD = 0.5


# The number of breeds an answer names when the request does not say (`/predict?k=`).
DEFAULT_TOP_K = 5


class ServeArgs(pydantic.BaseModel):
    """The typed arguments of `serve.build_app`; `serve deploy` validates a config's `args` here."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    # The bundle directory written by `dogbreeds export` (bundle.json and model.keras).
    bundle: str
    # Largest batch of photos per model call; one call of 32 costs far less than 32 of one.
    max_batch_size: int = pydantic.Field(32, ge=1)
    # How long the first photo of a batch waits for others; 10 ms is small against a call.
    batch_wait_ms: float = pydantic.Field(10.0, ge=0)
    # Classifier replicas (each holds the model once); with max_replicas, the autoscaling floor.
    num_replicas: int = pydantic.Field(1, ge=1)
    # Set: Serve autoscales the classifier between num_replicas and this many replicas.
    max_replicas: Optional[int] = pydantic.Field(None, ge=1)
    # Logical CPUs reserved per classifier replica.
    num_cpus_per_replica: float = pydantic.Field(1.0, ge=0)
    # GPUs per classifier replica; 0 runs the model on CPUs.
    num_gpus_per_replica: float = pydantic.Field(0.0, ge=0)
    # TensorFlow's threads per replica; 0: the replica's CPUs (num_cpus_per_replica rounded up,
    # at least 1). TensorFlow's own default, every core of the node, spins threads against the
    # other replicas and the ingress: 127 instead of 176 requests/s on 2 cores (`bench serve`).
    tensorflow_threads: int = pydantic.Field(0, ge=0)
    # Largest upload accepted, in bytes (10 MB): a bigger one is answered 413.
    max_upload_bytes: int = pydantic.Field(10 * 1024 * 1024, ge=1)
    # Largest photo in pixels (Pillow refuses above 179M anyway): decompression bombs are 422.
    # Only the first frame of an animation is decoded, so this bounds every photo's decoding.
    max_image_pixels: int = pydantic.Field(50_000_000, ge=1)
    # Pixels per byte of the file, above 2 MP: a camera's JPEG holds 2 to 20; a 331 KB JPEG of
    # 7000x7000 (148) took 1.3 s to decode and a 1.9 KB WebP of it (25,000) 0.7 s.
    max_pixels_per_byte: float = pydantic.Field(100.0, gt=0)
    # Largest ratio of a photo's long side to its short one: a 999,999x1 PNG is 1 KB and costs
    # 1.2 GB to resize. Panoramas stay under 10.
    max_aspect_ratio: float = pydantic.Field(20.0, ge=1)
    # Scans in a JPEG (each is a pass over every pixel): a 9.5 MB progressive JPEG of 789,573
    # tiny scans took 70 s to decode. Encoders write 1 (baseline) to about 10 (libjpeg's
    # progressive script). Counted in the bytes before decoding (an embedded thumbnail's count too).
    max_jpeg_scans: int = pydantic.Field(100, ge=1)
    # Photos one classifier replica decodes at once (a 50 MP photo takes ~0.6 GB while it does);
    # 0: the replica's CPUs (as tensorflow_threads). More decodings than CPUs only contend: with
    # one client keeping 16 large photos in flight on 2 cores, another's photo took 1.2-2.9 s at 2
    # and 0.4-0.9 s at 1, and the large ones went through faster.
    max_concurrent_decodes: int = pydantic.Field(0, ge=0)
    # Photos of at most this many pixels (a phone's 12 MP, baseline at 1/4 scale: 12 ms) decode
    # in a slot of their own, one per replica, so they never wait for a large one (a 49 MP
    # progressive JPEG: 0.2-0.7 s); 0: every photo shares the slots above. The slowest photo
    # this slot admits within the bounds above, 16 MP of noise as a 9.6 MB progressive JPEG of
    # 100 scans, took 0.44-0.47 s of CPU here: what a small photo may wait behind it.
    quick_decode_pixels: int = pydantic.Field(16_000_000, ge=0)
    # Below this top probability the answer is `unsure` instead of a breed.
    confidence_threshold: float = pydantic.Field(CONFIDENCE_THRESHOLD, ge=0, le=1)
    # A folder of photos the UI offers as examples (up to 6, one per sub-folder); None: none.
    examples_dir: Optional[str] = None
    # Requests one ingress replica handles at once; Gradio's open event streams count too. A
    # waiting request costs the ingress little, so room for many clients at their own bound.
    max_ongoing_requests: int = pydantic.Field(512, ge=1)
    # Requests Serve's router holds for the ingress (a burst of connections waits here before
    # the ingress admits them); more get 503.
    max_queued_requests: int = pydantic.Field(1024, ge=1)
    # Requests in flight from one client address; more get 429, so one client cannot take all
    # (a browser opens at most 6 connections to a site, and one event stream). `--haproxy`
    # hides client addresses, so there the default is max_ongoing_requests.
    max_requests_per_client: int = pydantic.Field(16, ge=1)
    # Gradio's event streams open at once, from all clients (the UI holds one per page while a
    # photo is classified): more get 503, so streams leave the ingress room for photos.
    max_open_streams: int = pydantic.Field(128, ge=1)
    # Largest headers and query string of a request, in bytes (browsers send a few KB): more is 431.
    max_header_bytes: int = pydantic.Field(32 * 1024, ge=1024)
    # Seconds for a request's header block to arrive (`dogbreeds serve`'s front; browsers send
    # it at once): slower connections get 408 and are closed, so none sits on a file descriptor.
    header_timeout_s: float = pydantic.Field(10.0, gt=0)
    # Header lines of a request (browsers send about 20): more is 431.
    max_header_count: int = pydantic.Field(100, ge=8)
    # Connections `dogbreeds serve` holds at once, each one request: more get 503. Below the
    # ingress's max_ongoing_requests, so strangers cannot fill it; far below the file descriptors.
    max_connections: int = pydantic.Field(400, ge=1)
    # Connections from one client (an address, or an IPv6 /64) at once: more get 429. A
    # browser opens at most 6 to a site, and one event stream.
    max_connections_per_client: int = pydantic.Field(32, ge=1)
    # Largest body of any other request (Gradio's JSON routes carry a few KB): more is 413.
    max_request_bytes: int = pydantic.Field(1024 * 1024, ge=1024)
    # Files in one upload to the UI (the page sends one at a time): more is 413.
    max_files_per_request: int = pydantic.Field(4, ge=1)
    # Seconds for a request's body to arrive: slower clients get 408 (10 MB at ~3 Mbit/s).
    body_timeout_s: float = pydantic.Field(30.0, gt=0)
    # Seconds for a whole request, event streams included: then 504, or the stream is closed.
    request_timeout_s: float = pydantic.Field(60.0, gt=0)
    # Photos waiting in the UI's queue; past it the page says the service is busy.
    ui_queue_size: int = pydantic.Field(64, ge=1)
    # Uploads older than this many seconds are deleted from Gradio's cache (checked each minute,
    # or sooner for a shorter age).
    upload_cache_max_age_s: int = pydantic.Field(600, ge=1)
    # Bytes of UI uploads kept in Gradio's cache (each for upload_cache_max_age_s) from all
    # clients: past it an upload is 503, so strangers cannot fill the disk.
    max_upload_cache_bytes: int = pydantic.Field(1024**3, ge=1)
    # The same from one client (an address, or an IPv6 /64): past it an upload is 429.
    max_upload_cache_bytes_per_client: int = pydantic.Field(100 * 1024**2, ge=1)
    # Host headers answered ("*": any, "*.example.com": its subdomains); others get 400. On a
    # cluster, list the names clients use.
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    # A file holding the API token that /predict and the UI then require (`Authorization:
    # Bearer TOKEN`, or `/?token=TOKEN` once in a browser); DOGBREEDS_API_TOKEN in the
    # replicas' environment works too. None and no variable: no token.
    api_token_file: Optional[str] = None


def from_dict(cls: type, values: Mapping[str, Any]):
    """Build `cls` from a mapping; an unknown key is an error that lists the known ones."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def to_dict(config) -> dict[str, Any]:
    """A JSON-ready dict of a configuration."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# ---------------------------------------------------------------------------------------------
# The fields a user sets: on the command line (dogbreeds.options) or in `--config FILE.yaml`.


# The configuration classes, by their section name in `--config FILE.yaml`.
SECTIONS = {"data": DataConfig, "train": TrainConfig, "search": SearchConfig, "serve": ServeArgs}

# The values a string field accepts, where its class states them in its comment only.
CHOICES = {"search.algorithm": ("random", "tpe"), "search.scheduler": ("asha", "none"),
           "train.keep_best_by": tuple(spaces.METRICS)}

# Counts where 0 or less means nothing: refused when read, before anything starts.
# Fractions: refused outside [0, 1] when read; those that must stay below 1 (all of a photo's
# side zoomed away leaves nothing) outside [0, 1).
FRACTIONS = {"train.fine_tune_fraction", "data.zoom_out"}
BELOW_ONE = {"data.zoom_out"}

POSITIVE = {"train.epochs", "train.workers", "train.per_worker_batch_size", "train.cpus_per_worker",
            "search.trials", "search.concurrent_trials"}


def section_class(section: str) -> type:
    """The configuration class of a section (`data`, `train`, `search`, `serve`)."""
    return SECTIONS[section]


class Setting(NamedTuple):
    """A field a user can set: its type, default, and reason (the comment above it)."""

    section: str
    name: str
    kind: type  # int, float, str, bool, or tuple (of str)
    optional: bool
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return f"{self.section}.{self.name}"

    def convert(self, value):
        """A value from the command line (a string) or a config file, as this field's type and
        checked; a bad one is a ValueError."""
        if self.optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        value = self._typed(value)
        self._check(value)
        return value

    def _typed(self, value):
        if self.kind is tuple:
            return tuple(str(item) for item in (value if isinstance(value, (list, tuple)) else [value]))
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"expected true or false, got {value!r}")
        if isinstance(value, bool) or (self.kind is not str and isinstance(value, (list, dict))):
            raise ValueError(f"expected {self.kind.__name__}, got {value!r}")
        if self.kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected int, got {value!r}")
            value = int(value)
        return self.kind(value)

    def _check(self, value) -> None:
        if self.name == "image_size":
            from dogbreeds import models

            models.check_image_size(value)
        if self.dest in POSITIVE and value <= 0:
            raise ValueError(f"must be at least 1, got {value}")
        if self.dest in FRACTIONS and not 0 <= value <= 1:
            raise ValueError(f"must be between 0 and 1, got {value}")
        if self.dest in BELOW_ONE and value == 1:
            raise ValueError(f"must be below 1, got {value}")
        if self.dest in CHOICES and value not in CHOICES[self.dest]:
            raise ValueError(f"choose from {', '.join(CHOICES[self.dest])}, got {value!r}")


def _kind(annotation) -> tuple[type | None, bool]:
    """(int/float/str/bool/tuple, optional) of a field's annotation; None: not settable."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1:
            return None, optional
        annotation = members[0]
    if typing.get_origin(annotation) is tuple:
        return tuple, optional
    return (annotation if annotation in (int, float, str, bool) else None), optional


def settable_fields(section: str) -> dict[str, Setting]:
    """The fields of a section's class that are settings, in their order. Mappings
    (TrainConfig.hparams, a config file's only) and required fields are left out."""
    cls = section_class(section)
    comments = field_comments(cls)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        items = [(field.name, hints[field.name], field.default) for field in dataclasses.fields(cls)]
    else:
        items = [(name, info.annotation, dataclasses.MISSING if info.is_required() else info.default)
                 for name, info in cls.model_fields.items()]
    settings = {}
    for name, annotation, default in items:
        kind, optional = _kind(annotation)
        if kind is None or default is dataclasses.MISSING:
            continue
        settings[name] = Setting(section, name, kind, optional, default, comments.get(name, ""))
    return settings


def field_comments(cls: type) -> dict[str, str]:
    """Each field of a configuration class and the comment above it in the source, in one
    line: the field's reason, which the CLI shows as its help."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    comments = {}
    for node in ast.parse("\n".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, row = [], node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            comments[node.target.id] = " ".join(above)
    return comments


def load_config_file(path: str, sections: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`--config FILE.yaml`: {section: {field: value}} for the given sections (each maps to its
    known field names). A missing file, bad YAML, or an unknown section or key is a one-line
    `ValueError` naming the file and the key."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"--config not found: {path}")
    try:
        with open(path) as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: YAML syntax error{where}: {getattr(error, 'problem', None) or error}") from None
    content = {} if content is None else content
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected sections {sorted(sections)}, got {type(content).__name__}")
    resolved = {}
    for section, values in content.items():
        if section not in sections:
            raise ValueError(f"{path}: unknown section {section!r}; known here: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must map keys to values")
        for key in values:
            if key not in sections[section]:
                raise ValueError(f"{path}: unknown key {section}.{key}; known: {sorted(sections[section])}")
        resolved[section] = dict(values)
    return resolved


def read_settings_file(path: str, settings: Mapping[str, Mapping[str, Setting | None]]) -> dict[str, dict[str, Any]]:
    """`--config FILE.yaml` as {section: {field: value}}, each value converted and checked as
    its option's would be. `settings` are each section's known fields (None: a mapping taken as
    it is, TrainConfig.hparams). Any problem is a one-line ValueError naming the file and key."""
    loaded = load_config_file(path, settings)
    for section, values in loaded.items():
        for name, value in values.items():
            setting = settings[section][name]
            try:
                values[name] = dict(value) if setting is None else setting.convert(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}: {section}.{name}: {error}") from None
    return loaded
