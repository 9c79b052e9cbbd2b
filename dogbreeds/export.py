"""Export: a trained run becomes a self-contained bundle that serving loads with nothing from
the training process.

    bundle/
      model.keras   the Keras model (zip format): raw RGB [0, 255] at `image_size` in,
                    probabilities out
      novelty.npz   the training dogs' features the not-a-dog check compares a photo with
      bundle.json   name, version, breed names, preprocessing, metrics, configuration,
                    versions, the not-a-dog check's threshold (`novelty`), and the sha256
                    of every other file

    export_bundle("runs/cnn3v2", "bundles/cnn3v2")
    bundle = load_bundle("bundles/cnn3v2")
    bundle.predict([open("dog.jpg", "rb").read()])  # [N, 120] probabilities
    probabilities, scores = bundle.predict_with_novelty(images)  # prepared photos
    bundle.verdicts(probabilities, scores)  # ["breed" | "unsure" | "not_a_dog", ...]

A bundle is untrusted input: whoever can write it can make a Keras loader run code. So
`load_bundle` reads only the zip `.keras` format, in Keras' safe mode, after checking every
file's size and digest against bundle.json and every class the model's configuration names
against Keras' own layers; any failed check is a one-line `BundleError`. Export writes into a
temporary directory and renames it, so a reader never sees half a bundle.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import io
import json
import os
import re
import shutil
import uuid
import zipfile

import numpy as np

from dogbreeds import evaluate, models, novelty, runs

# 2: bundle.json records the sha256 of every file (`files`), checked before anything loads.
BUNDLE_FORMAT = 2
INFO_FILE = "bundle.json"
MODEL_FILE = "model.keras"
NOVELTY_FILE = "novelty.npz"
# Bounds on what a bundle may make the loader read: Xception's model.keras is ~90 MB and its
# bundle.json a few hundred KB, so these leave room and still stop a bundle meant to exhaust
# memory or disk.
MAX_INFO_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 2 * 1024**3
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # the model's config.json inside its zip
# The modules a model configuration may name classes from: Keras' public layers, initialisers
# and regularisers, and the functional model. tf_keras imports any other module a
# configuration names, safe mode or not, so anything else is refused before loading.
ALLOWED_MODULES = frozenset({
    "keras.layers", "keras.initializers", "keras.regularizers", "keras.constraints",
    "keras.activations", "keras.optimizers", "keras.metrics", "keras.losses",
    "keras.optimizers.schedules", "tf_keras.src.engine.functional", "keras.src.engine.functional",
})
# Layers that carry code instead of weights.
REFUSED_CLASSES = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__"})


class BundleError(ValueError):
    """A bundle that fails a check; the message is one line naming the bundle and the reason."""


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_bundle(run_dir: str, bundle_dir: str, name: str | None = None) -> dict:
    """Copy a run's model and write `bundle.json` beside it; returns the bundle's description.

    The bundle is written into a temporary directory beside `bundle_dir` and renamed into
    place, replacing an earlier bundle there only once the new one is complete."""
    with open(os.path.join(run_dir, runs.METRICS)) as handle:
        metrics = json.load(handle)
    with open(os.path.join(run_dir, runs.CONFIG)) as handle:
        config = json.load(handle)
    spec = models.get_model_spec(metrics["model"])
    bundle_dir = os.path.abspath(bundle_dir)
    temporary = f"{bundle_dir}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(temporary)
    try:
        shutil.copy(os.path.join(run_dir, runs.MODEL), os.path.join(temporary, MODEL_FILE))
        novelty_info = _write_novelty(temporary, config, metrics["image_size"])
        description = {
            "format": BUNDLE_FORMAT,
            "name": name or metrics["model"],
            "model": metrics["model"],
            "class_names": metrics["class_names"],
            "preprocessing": {
                "chain": models.input_chain(metrics["image_size"]),
                "image_size": metrics["image_size"],
                "input": "RGB uint8 pixels as float32 in [0, 255]; the model scales them itself",
                "scaling": spec.scaling,
                "test_time_flip": bool(config.get("data", {}).get("test_time_flip", False)),
            },
            "metrics": {key: metrics[key] for key in ("test", "validation") if key in metrics},
            "config": config,
            "novelty": novelty_info,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        files = {file: sha256_of(os.path.join(temporary, file)) for file in sorted(os.listdir(temporary))}
        # The model file's digest: two bundles with one version hold the same weights.
        description = {"version": files[MODEL_FILE][:12], **description, "files": files}
        with open(os.path.join(temporary, INFO_FILE), "w") as handle:
            json.dump(description, handle, indent=1)
        _replace_directory(temporary, bundle_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return description


def _write_novelty(directory: str, config: dict, image_size: int) -> dict | None:
    """Calibrate the not-a-dog check on the run's own splits (see `novelty.calibrate`) and
    write its reference features to NOVELTY_FILE; returns what bundle.json records. A run
    whose configuration names no data (not one `dogbreeds train` wrote) gets no check."""
    if "data" not in config:
        return None
    import tf_keras as keras

    model = keras.models.load_model(os.path.join(directory, MODEL_FILE), compile=False, safe_mode=True)
    reference, info = novelty.calibrate(model, config["data"], image_size)
    np.savez(os.path.join(directory, NOVELTY_FILE), **reference)
    return info


def _replace_directory(source: str, target: str) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first and removed
    after, so `target` is always either the old bundle or the whole new one."""
    old = None
    if os.path.lexists(target):
        old = f"{target}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(source, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: the model, its description, and the one way to prepare a photo."""

    model: object
    info: dict
    # novelty.npz's arrays (`novelty.novelty_scores`' reference); None for a bundle without.
    reference: dict | None = None

    @property
    def class_names(self) -> list[str]:
        return self.info["class_names"]

    @property
    def image_size(self) -> int:
        return self.info["preprocessing"]["image_size"]

    @functools.cached_property
    def _prepare_graph(self):
        # The bundle's op chain traced once: one graph call per photo instead of a dozen eager
        # ops (2.5 ms instead of 3.8 ms a photo at 128 px here), the same ops and numbers.
        import tensorflow as tf

        from dogbreeds import data

        ops = data.build_ops(self.info["preprocessing"]["chain"])
        return tf.function(lambda encoded, scale: ops({"image": encoded, "jpeg_scale": scale})["image"],
                           input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32)])

    def prepare(self, encoded: bytes, header: dict | None = None, scale: int | None = None) -> np.ndarray:
        """Encoded image bytes -> the model's input, by the same ops as in training; of an
        animation, its first frame only. A JPEG far larger than the input decodes at a fraction
        of its side, where training decodes whole: `scale`, an index into `data.JPEG_SCALES`
        (0: whole), by default `data.jpeg_scale`'s. `header` is `photos.read_header`'s answer,
        read here unless the caller has it (serving has)."""
        from dogbreeds import data, photos

        if header is None:
            try:
                header = photos.read_header(encoded)
            except Exception:  # noqa: BLE001 - what Pillow cannot read, the decode op judges
                header = {"format": None, "width": 0, "height": 0, "animated": False}
        if header["animated"]:
            encoded, scale = first_frame(encoded), 0  # a BMP: no JPEG to decode at a fraction
        if scale is None:
            scale = data.jpeg_scale(header["format"], min(header["width"], header["height"]), self.image_size)
        return self._prepare_graph(encoded, scale).numpy()

    @property
    def test_time_flip(self) -> bool:
        """Whether an answer is the mean of the photo's and its mirror image's, as the run's
        final evaluation and the not-a-dog check's calibration were (`DataConfig.test_time_flip`)."""
        return self.info["preprocessing"].get("test_time_flip", False)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for prepared uint8 images [N, S, S, 3], in one call."""
        return evaluate.predict_in_batches(self.model.predict_on_batch, images, self.test_time_flip,
                                           batch_size=max(len(images), 1))

    def predict(self, encoded_images: list[bytes]) -> np.ndarray:
        """Probabilities [N, classes] for encoded photos."""
        return self.predict_arrays(np.stack([self.prepare(e) for e in encoded_images]))

    @property
    def novelty_info(self) -> dict | None:
        """bundle.json's `novelty`: method, neighbours, layer, keep_quantile, threshold,
        validation_kept, ...; None for a bundle exported without the check."""
        return self.info.get("novelty")

    @functools.cached_property
    def _novelty_graph(self):
        # Probabilities and penultimate features in one traced forward pass, any batch size.
        import tensorflow as tf

        feature_model = novelty.build_feature_model(self.model, (self.novelty_info or {}).get("layer", novelty.PREDICTIONS_LAYER))
        size = self.image_size
        return tf.function(lambda images: feature_model(images, training=False),
                           input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])

    def predict_with_novelty(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, classes], novelty scores [N]) for prepared uint8 images
        [N, S, S, 3], in one forward pass; the scores are NaN for a bundle without the check."""
        probabilities, features = evaluate.predict_in_batches(self._novelty_graph, images, self.test_time_flip,
                                                              batch_size=max(len(images), 1))
        if self.reference is None:
            return probabilities, np.full(len(images), np.nan, np.float32)
        return probabilities, novelty.novelty_scores(features, self.reference)

    def verdicts(self, probabilities: np.ndarray, scores: np.ndarray,
                 confidence_threshold: float = novelty.CONFIDENCE_THRESHOLD) -> np.ndarray:
        """`breed`, `unsure` or `not_a_dog` per photo (see `novelty.verdicts`); a bundle
        without the check never says `not_a_dog`."""
        threshold = self.novelty_info["threshold"] if self.novelty_info else np.inf
        return novelty.verdicts(probabilities, scores, threshold, confidence_threshold)


def first_frame(encoded: bytes) -> bytes:
    """An animated GIF or WebP (or a camera's MPO) as its first frame, a BMP, which the decode op
    reads. TensorFlow decodes every frame of a GIF before keeping the first (gigabytes for a 6 MB
    file of 500 large frames) and does not read animated WebP at all."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.seek(0)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "BMP")
            return buffer.getvalue()
    except Exception:  # noqa: BLE001 - what Pillow cannot read, the decode op judges
        return encoded


def load_bundle(bundle_dir: str) -> Bundle:
    """Load a bundle written by `export_bundle`, checking it first (see the module's
    docstring); raises `BundleError` with a one-line reason."""
    import tf_keras as keras

    info = check_bundle(bundle_dir)
    try:
        model = keras.models.load_model(os.path.join(bundle_dir, MODEL_FILE), compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - whatever Keras refuses is the bundle's fault
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BundleError(f"bundle {bundle_dir}: {MODEL_FILE} does not load: {message[:300]}") from None
    inputs, outputs = model.input_shape, model.output_shape
    if tuple(inputs[1:]) != (info["preprocessing"]["image_size"],) * 2 + (3,) or outputs[-1] != len(info["class_names"]):
        raise BundleError(
            f"bundle {bundle_dir}: the model takes {inputs} and gives {outputs}, but bundle.json "
            f"says {info['preprocessing']['image_size']} px and {len(info['class_names'])} breeds"
        )
    return Bundle(model, info, _load_reference(bundle_dir, info))


def _load_reference(bundle_dir: str, info: dict) -> dict | None:
    """novelty.npz's arrays (its digest already checked), or None for a bundle without."""
    if info.get("novelty") is None:
        return None
    if NOVELTY_FILE not in info["files"] or not isinstance(info["novelty"].get("threshold"), float):
        raise BundleError(f"bundle {bundle_dir}: novelty in {INFO_FILE} without {NOVELTY_FILE} or a threshold")
    try:
        with np.load(os.path.join(bundle_dir, NOVELTY_FILE), allow_pickle=False) as arrays:
            reference = {key: arrays[key] for key in ("features", "labels", "neighbours")}
        # float32 once here, not at every request (the file keeps float16 to stay small).
        reference["features"] = reference["features"].astype(np.float32)
    except (KeyError, ValueError, OSError) as error:
        raise BundleError(f"bundle {bundle_dir}: {NOVELTY_FILE} is not a novelty reference ({error})") from None
    if reference["features"].ndim != 2 or reference["features"].shape[1] != info["novelty"].get("feature_dim"):
        raise BundleError(f"bundle {bundle_dir}: {NOVELTY_FILE} does not hold features of the size {INFO_FILE} says")
    return reference


def check_bundle(bundle_dir: str) -> dict:
    """Every check of `load_bundle` short of loading the model (no TensorFlow): bundle.json,
    the files' sizes and digests, the model's format and the classes its configuration
    names. Returns bundle.json."""
    info = read_bundle_info(bundle_dir)
    _check_archive(bundle_dir)
    return info


def read_bundle_info(bundle_dir: str) -> dict:
    """bundle.json, checked: its format, its fields, and every file's size and sha256."""
    def fail(reason: str):
        raise BundleError(f"bundle {bundle_dir}: {reason}")

    path = os.path.join(bundle_dir, INFO_FILE)
    if not os.path.isfile(path):
        fail(f"not a dogbreeds bundle (no {INFO_FILE})")
    if os.path.getsize(path) > MAX_INFO_BYTES:
        fail(f"{INFO_FILE} is over {MAX_INFO_BYTES} bytes")
    try:
        with open(path, "rb") as handle:
            info = json.loads(handle.read())
    except (ValueError, UnicodeDecodeError) as error:
        fail(f"{INFO_FILE} is not JSON ({error})")
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        fail(f"bundle format {got} is not {BUNDLE_FORMAT}: export it again with `dogbreeds export`")
    names, preprocessing = info.get("class_names"), info.get("preprocessing")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        fail("class_names is not a list of breed names")
    if not (isinstance(preprocessing, dict) and isinstance(preprocessing.get("image_size"), int)
            and models.MIN_IMAGE_SIZE <= preprocessing["image_size"] <= models.MAX_IMAGE_SIZE
            and preprocessing.get("chain") == models.input_chain(preprocessing["image_size"])):
        fail("preprocessing is not `decode|resize(S)` with S the image size")
    if not isinstance(preprocessing.get("test_time_flip", False), bool):
        fail("preprocessing's test_time_flip is not true or false")
    files = info.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        fail(f"{INFO_FILE} lists no files with their sha256")
    for name, expected in files.items():
        file_path = os.path.join(bundle_dir, str(name))
        if not re.fullmatch(r"[\w.-]+", str(name)) or name.startswith("."):
            fail(f"{name!r} is not a plain file name")
        if os.path.islink(file_path) or not os.path.isfile(file_path):
            fail(f"{name} is missing or not a regular file")
        if os.path.getsize(file_path) > MAX_FILE_BYTES:
            fail(f"{name} is over {MAX_FILE_BYTES} bytes")
        if sha256_of(file_path) != expected:
            fail(f"{name} does not match the sha256 in {INFO_FILE} (changed or incomplete)")
    return info


def _check_archive(bundle_dir: str) -> None:
    """model.keras must be a zip whose configuration names only Keras' own classes."""
    path = os.path.join(bundle_dir, MODEL_FILE)

    def fail(reason: str):
        raise BundleError(f"bundle {bundle_dir}: {MODEL_FILE} {reason}")

    if not zipfile.is_zipfile(path):
        fail("is not in the zip .keras format (HDF5 and SavedModel files are refused: they can run code)")
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo("config.json")
            if member.file_size > MAX_CONFIG_BYTES:
                fail(f"has a config.json over {MAX_CONFIG_BYTES} bytes")
            if sum(item.file_size for item in archive.infolist()) > MAX_FILE_BYTES:
                fail(f"unpacks to over {MAX_FILE_BYTES} bytes")
            config = json.loads(archive.read(member))
    except (KeyError, zipfile.BadZipFile, ValueError) as error:
        fail(f"is not a readable Keras archive ({error})")
    refused = _refused_classes(config)
    if refused:
        fail(f"names classes outside Keras' own layers: {', '.join(sorted(refused))}")


def _refused_classes(config) -> set[str]:
    """`module.class` of every object in a Keras configuration that is not one of Keras' own
    (ALLOWED_MODULES) or is a layer that carries code (REFUSED_CLASSES)."""
    refused, stack = set(), [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            module, class_name = item.get("module"), item.get("class_name")
            if isinstance(class_name, str) and (
                class_name in REFUSED_CLASSES or (module is not None and module not in ALLOWED_MODULES)
            ):
                refused.add(f"{module}.{class_name}")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return refused
