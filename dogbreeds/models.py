"""The model registry: the study's CNNs and the transfer models on frozen ImageNet backbones.

Every model takes raw RGB pixels in [0, 255] at its input size and does its own scaling as
its first layer, so the data pipeline, evaluation, export and serving all feed it the same
thing and cannot drift:

    model = create_model("xception", num_classes=120, image_size=299, weights="imagenet")
    list_models()  # ['cnn1', 'cnn3', 'cnn3v2', 'mobilenet_025', 'resnet50v2', 'xception']

Builders are tiny functions under `@register_model`; hyperparameters come in as a mapping
(or a `keras_tuner.HyperParameters`, as in a Keras Tuner hypermodel), with the defaults below.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import socket
import threading
from typing import Any, Callable, Mapping


class _LazyKeras:
    """tf_keras, imported on first use: the registry (`dogbreeds models`, the CLI's checks)
    is read without loading TensorFlow, which takes seconds."""

    def __getattr__(self, name):
        import tf_keras

        return getattr(tf_keras, name)


keras = _LazyKeras()

# The input sizes a model may be asked for: below 8 px the CNNs' pools leave nothing, and above
# 1024 px one photo's activations alone fill a GPU.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024

# How a model scales [0, 255] pixels. "symmetric" is what `preprocess_input` does for
# Xception, ResNet50V2 and MobileNet ("tf" mode: x / 127.5 - 1); feeding those backbones
# [0, 255] or [0, 1] instead is how the study's ResNet50V2 ended at 12%.
SCALINGS = {
    "unit": dict(scale=1 / 255.0, offset=0.0),
    "symmetric": dict(scale=1 / 127.5, offset=-1.0),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the rest of the system reads from a model: its input size and scaling."""

    name: str
    build: Callable[..., keras.Model]
    image_size: int  # the study's input size
    scaling: str  # a key of SCALINGS
    hparams: Mapping[str, Any]  # defaults of the builder's hyperparameters
    description: str
    backbone: str | None = None  # the keras.applications class of a transfer model


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name, *, image_size, scaling, hparams, description, backbone=None):
    """Register a builder `build(hparams, num_classes, image_size, weights) -> keras.Model`."""

    def decorator(build):
        _REGISTRY[name] = ModelSpec(
            name, build, image_size, scaling, dict(hparams), description, backbone
        )
        return build

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name is an error listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def resolve_hparams(name: str, hparams: Mapping[str, Any] | Any | None = None) -> dict:
    """The model's default hyperparameters updated with `hparams`; unknown keys are errors."""
    spec = get_model_spec(name)
    # A keras_tuner.HyperParameters keeps its chosen values in `.values`.
    values = dict(hparams if isinstance(hparams, Mapping) else getattr(hparams, "values", {}))
    unknown = sorted(set(values) - set(spec.hparams))
    if unknown:
        raise ValueError(
            f"unknown hyperparameters {unknown} for {name}; known: {sorted(spec.hparams)}"
        )
    return {**spec.hparams, **values}


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """What a model is fed, resolved once (timm's `resolve_data_config`): raw RGB [0, 255]
    at `image_size`, decoded and resized by the op chain `chain` (data.py's ops); `scaling`
    is done by the model's own first layer. Training, evaluation, export and serving ask here."""

    model: str
    image_size: int
    scaling: str

    @property
    def chain(self) -> str:
        return input_chain(self.image_size)


def input_chain(image_size: int) -> str:
    """The op chain that turns an encoded photo into a model's input: the only place it is spelled."""
    return f"decode|resize({image_size})"


def check_image_size(image_size: Any) -> int:
    """`image_size` if it is a whole number of pixels in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE], else
    a one-line ValueError: for commands that take a size without a model (`dogbreeds data`)."""
    size = image_size
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be a whole number of pixels in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size!r}")
    return size


def resolve_input(name: str, image_size: int | None = None) -> InputConfig:
    """A model's input: `image_size` (the command line's) over the model's own; a size out of
    [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE] is an error."""
    spec = get_model_spec(name)
    size = check_image_size(spec.image_size if image_size is None else image_size)
    return InputConfig(name, size, spec.scaling)


def create_model(
    name: str,
    num_classes: int = 120,
    image_size: int | None = None,
    weights: str | None = None,
    hparams: Mapping[str, Any] | Any | None = None,
) -> keras.Model:
    """Build a registered model taking [0, 255] RGB images of `image_size` (default: its own)."""
    image_size = resolve_input(name, image_size).image_size
    return get_model_spec(name).build(resolve_hparams(name, hparams), num_classes, image_size, weights)


def build_scaling(scaling: str) -> keras.layers.Layer:
    """The layer that maps [0, 255] pixels to what a model expects."""
    return keras.layers.Rescaling(**SCALINGS[scaling], name="scaling")


def _input_and_scaling(name: str, image_size: int):
    inputs = keras.Input((image_size, image_size, 3), name="image")
    return inputs, build_scaling(get_model_spec(name).scaling)(inputs)


# ---------------------------------------------------------------------------------------------
# The study's CNNs, trained from scratch.


@register_model(
    "cnn1",
    image_size=299,
    scaling="unit",
    hparams={"dropout_rate": 0.25},
    description="one convolution and a dense layer: the study's first baseline (89.7M params)",
)
def build_cnn1(hparams, num_classes, image_size, weights):
    inputs, x = _input_and_scaling("cnn1", image_size)
    x = keras.layers.Conv2D(32, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Dropout(hparams["dropout_rate"])(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="cnn1")


@register_model(
    "cnn3",
    image_size=299,
    scaling="unit",
    hparams={"dropout_rate": 0.25},
    description="three convolutions and a dense layer (82.7M params)",
)
def build_cnn3(hparams, num_classes, image_size, weights):
    inputs, x = _input_and_scaling("cnn3", image_size)
    for filters, pool in ((32, True), (64, True), (128, False)):
        x = keras.layers.Conv2D(filters, 3, activation="relu")(x)
        if pool:
            x = keras.layers.MaxPooling2D(2)(x)
        x = keras.layers.Dropout(hparams["dropout_rate"])(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(hparams["dropout_rate"])(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="cnn3")


@register_model(
    "cnn3v2",
    image_size=299,
    scaling="unit",
    hparams={
        "filters_1": 16,
        "filters_2": 32,
        "filters_3": 64,
        "dropout_1": True,
        "dropout_2": True,
        "dropout_rate": 0.25,
    },
    description="three convolutions with batch norm and global pooling (47,720 params); "
    "its filters and dropouts are the cnn3v2 search's hyperparameters",
)
def build_cnn3v2(hparams, num_classes, image_size, weights):
    inputs, x = _input_and_scaling("cnn3v2", image_size)
    # Pools of 4 then 2 with "same" padding: 299 -> 75 -> 37, as in the study.
    for index, pool in ((1, 4), (2, 2), (3, None)):
        x = keras.layers.Conv2D(hparams[f"filters_{index}"], 3, padding="same")(x)
        # No scale: a ReLU follows, so gamma would be redundant (the study's 47,496 trainable).
        # momentum 0.9 (Keras: 0.99) lets the moving statistics settle within a few hundred
        # steps, so short runs evaluate well; it changes no parameter count.
        x = keras.layers.BatchNormalization(scale=False, momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
        if pool:
            x = keras.layers.MaxPooling2D(pool, padding="same")(x)
            if hparams[f"dropout_{index}"]:
                x = keras.layers.Dropout(hparams["dropout_rate"])(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="cnn3v2")


# ---------------------------------------------------------------------------------------------
# Transfer learning: a frozen ImageNet backbone and a new head.

HEAD_HPARAMS = {"dropout_rate": 0.2, "hidden_layer": False, "hidden_units": 256}


def build_head(hparams, num_classes: int, feature_dim: int) -> keras.Model:
    """The trainable head on pooled backbone features: Dropout, optional Dense, softmax."""
    features = keras.Input((feature_dim,), name="features")
    x = keras.layers.Dropout(hparams["dropout_rate"])(features)
    if hparams["hidden_layer"]:
        x = keras.layers.Dense(hparams["hidden_units"], activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(features, outputs, name="head")


# Where keras.applications downloads ImageNet weights from.
WEIGHTS_HOST, WEIGHTS_PORT = "storage.googleapis.com", 443
# A connected machine opens a TCP connection in well under a second; an offline one should
# not make a user wait longer than this to hear so.
REACHABLE_TIMEOUT_S = 3.0
# The first bytes of every HDF5 file (Keras' .h5 weights).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# MobileNet v1's width multiplier: 0.25, the smallest, so transfer fits a CPU.
MOBILENET_ALPHA = 0.25
# ...which keras.applications spells "2_5" in its weights' file names.
MOBILENET_ALPHA_TEXT = "2_5"
# MobileNet's ImageNet weights exist at these sizes; keras.applications loads 224's otherwise.
MOBILENET_WEIGHT_SIZES = (128, 160, 192, 224)


def host_reachable(host: str, port: int, timeout_s: float = REACHABLE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `host`:`port` opens within `timeout_s`, name lookup
    included (which a socket's own timeout does not bound, hence the thread)."""
    outcome = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome == [True]


def imagenet_weights_path(name: str, image_size: int | None = None) -> str:
    """Where keras.applications keeps a transfer model's no-top ImageNet weights once
    downloaded: `get_file`'s ~/.keras/models (or /tmp/.keras/models when ~/.keras is not
    writable), under the file name it downloads."""
    spec = get_model_spec(name)
    if spec.backbone is None:
        raise ValueError(f"{name} has no backbone, so no ImageNet weights")
    if spec.backbone == "MobileNet":
        size = resolve_input(name, image_size).image_size
        rows = size if size in MOBILENET_WEIGHT_SIZES else 224
        file_name = f"mobilenet_{MOBILENET_ALPHA_TEXT}_{rows}_tf_no_top.h5"
    else:  # xception_..., resnet50v2_...
        file_name = f"{spec.backbone.lower()}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    keras_home = os.path.join(os.path.expanduser("~"), ".keras")
    if not os.access(keras_home, os.W_OK):
        keras_home = os.path.join("/tmp", ".keras")
    return os.path.join(keras_home, "models", file_name)


def check_weights_file(path: str) -> None:
    """A one-line ValueError unless `path` is an existing HDF5 file."""
    if not os.path.exists(path):
        raise ValueError(f"weights file not found: {path} (pass a Keras .h5 file, imagenet or none)")
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path} is a folder, not a Keras .h5 file")
    with open(path, "rb") as handle:
        head = handle.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        raise ValueError(f"weights file {path} is not an HDF5 file (Keras .h5 weights start with {HDF5_SIGNATURE!r})")


def check_weights(model: str, weights: str | None, image_size: int | None = None) -> None:
    """Before anything starts: the weights a model will load are there or can be fetched.

    A model without a backbone ignores `weights`; None or "none" is random weights; a path
    must be an HDF5 file; "imagenet" must be in Keras' cache or its download host reachable.
    Reads no TensorFlow."""
    spec = get_model_spec(model)
    if spec.backbone is None or weights is None or str(weights).lower() == "none":
        return
    if weights != "imagenet":
        check_weights_file(weights)
        return
    path = imagenet_weights_path(model, image_size)
    if os.path.isfile(path) or host_reachable(WEIGHTS_HOST, WEIGHTS_PORT):
        return
    raise ValueError(
        f"ImageNet weights for {model} are not cached in {os.path.dirname(path)} and "
        f"{WEIGHTS_HOST} cannot be reached: pass --weights FILE.h5 or --weights none"
    )


def build_backbone(name: str, image_size: int, weights: str | None) -> keras.Model:
    """The frozen, globally pooled backbone of a transfer model, scaling included.

    `weights` is "imagenet" (Keras downloads them), a local .h5 file without the top (for
    machines with no internet), or None for random weights.
    """
    spec = get_model_spec(name)
    check_weights(name, weights, image_size)
    application = getattr(keras.applications, spec.backbone)
    options = {"alpha": MOBILENET_ALPHA} if spec.backbone == "MobileNet" else {}
    network = application(
        include_top=False,
        weights=weights,
        input_shape=(image_size, image_size, 3),
        pooling="avg",
        **options,
    )
    network.trainable = False
    inputs, x = _input_and_scaling(name, image_size)
    # training=False keeps batch norm in inference mode even when the head trains.
    return keras.Model(inputs, network(x, training=False), name=f"{name}_backbone")


def unfreeze_top(model: keras.Model, fraction: float) -> int:
    """Fine-tuning: make the top `fraction` of a transfer model's backbone layers trainable
    (0: the backbone stays frozen). BatchNormalization layers stay frozen, and the backbone
    runs in inference mode (`training=False`, see `build_backbone`), so their statistics are
    ImageNet's. Returns how many layers now train."""
    if not fraction:
        return 0
    if not 0 < fraction <= 1:
        raise ValueError(f"fine_tune_fraction must be in [0, 1], got {fraction}")
    (network,) = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "head"]
    layers = [layer for layer in network.layers if layer.weights]
    first = len(layers) - round(fraction * len(layers))
    network.trainable = True
    for position, layer in enumerate(layers):
        layer.trainable = position >= first and not isinstance(layer, keras.layers.BatchNormalization)
    return sum(layer.trainable for layer in layers)


def _build_transfer(name: str):
    def build(hparams, num_classes, image_size, weights):
        backbone = build_backbone(name, image_size, weights)
        head = build_head(hparams, num_classes, backbone.output_shape[-1])
        return keras.Model(backbone.input, head(backbone.output), name=name)

    return build


for _name, _backbone, _size, _about in (
    ("xception", "Xception", 299, "Xception on ImageNet, frozen, with a new head"),
    ("resnet50v2", "ResNet50V2", 299, "ResNet50V2 on ImageNet, frozen, with a new head"),
    (
        "mobilenet_025",
        "MobileNet",
        224,
        "MobileNet v1 (alpha 0.25) on ImageNet, frozen, with a new head: transfer on a CPU",
    ),
):
    register_model(
        _name,
        image_size=_size,
        scaling="symmetric",
        hparams=HEAD_HPARAMS,
        description=_about,
        backbone=_backbone,
    )(_build_transfer(_name))
