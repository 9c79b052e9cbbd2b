"""Stanford Dogs: find the examples, split them, decode and cache them, and feed `tf.data`.

The flow, top to bottom:
1. `load_index(config)` lists the examples of TFDS `stanford_dogs` or of a folder in the
   layout of the official images.tar, with class order identical to TFDS's, and splits them
   into train / validation / test (the official lists when present, else seeded and stratified).
   `check_source(config)` says in one line, before anything starts, why a source cannot work.
2. `load_images(split, image_size, ...)` decodes and resizes one split (or one Ray Train
   worker's share of it) once, in parallel, into a cache of uint8 arrays, logging its
   progress; files that do not decode are skipped and counted with a plain reason.
3. `make_dataset(images, labels, ...)` turns cached arrays into batches through a chain of
   small preprocessing ops (big_vision style): `flip_lr|rotate(0.1)|onehot(120)` for train,
   `onehot(120)` for evaluation. Models do their own scaling (see `models.py`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import re
import time
import zipfile
import zlib
from typing import Callable, Iterable

import numpy as np

from dogbreeds.config import DataConfig
from dogbreeds.models import check_image_size, host_reachable, input_chain


class _LazyTensorFlow:
    """tensorflow, imported on first use: listing a folder and the CLI's checks before a run
    read no TensorFlow, which takes seconds to import."""

    def __getattr__(self, name):
        import tensorflow

        return getattr(tensorflow, name)


tf = _LazyTensorFlow()
logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# What a data folder should hold, for the errors that say it is not so.
EXPECTED_LAYOUT = "expected Images/<synset>-<breed>/*.jpg, the layout of Stanford Dogs' images.tar"
TFDS_NAME = "stanford_dogs"
# The host of the archive TFDS downloads (tensorflow_datasets' stanford_dogs builder:
# http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar).
TFDS_HOST, TFDS_PORT = "vision.stanford.edu", 80
# Progress lines: one at each further tenth of a split, but not more often than this...
PROGRESS_MIN_GAP_S = 1.0
# ...and one at least this often, however slowly the tenths come.
PROGRESS_INTERVAL_S = 5.0


@dataclasses.dataclass
class Split:
    """One split: how to read each example (a file path or a TFDS record) and its label."""

    keys: list[str]
    labels: np.ndarray  # int32 class indices
    name: str = "photos"  # train, validation or test: what progress and errors call it

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, positions: Iterable[int]) -> "Split":
        positions = list(positions)
        return Split([self.keys[i] for i in positions], self.labels[positions].astype(np.int32), self.name)


@dataclasses.dataclass
class DatasetIndex:
    """The classes and splits of a dataset, and the files passed over while listing it."""

    class_names: list[str]  # readable breed names, in TFDS's class order
    class_folders: list[str]  # `n02085620-Chihuahua`, as in images.tar
    splits: dict[str, Split]  # train, validation, test
    source: str  # "tfds" or the folder
    split_origin: str  # "official lists", "tfds", or "seeded stratified split"
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def breed_name(folder: str) -> str:
    """`n02085620-Chihuahua` -> `Chihuahua`; `n02099601-golden_retriever` -> `golden retriever`."""
    name = folder.split("-", 1)[1] if re.match(r"^n\d{8}-", folder) else folder
    return name.replace("_", " ")


# ---------------------------------------------------------------------------------------------
# 1. Listing and splitting.


def load_index(config: DataConfig) -> DatasetIndex:
    """List and split the examples of the configured source."""
    if config.data_dir is None:
        index = _tfds_index(config)
    else:
        index = _folder_index(config)
    index.splits = _carve_splits(index.splits, config)
    for name, split in index.splits.items():
        split.name = name
    return index


def check_source(config: DataConfig) -> None:
    """A one-line ValueError, in seconds and without TensorFlow, if the configured source
    cannot work: a data folder that is missing or holds no photos in the images.tar layout,
    or TFDS `stanford_dogs` neither prepared nor downloadable (offline)."""
    if config.data_dir is not None:
        _, images_dir, folders = _breed_folders(config.data_dir)
        for folder in folders:
            if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in os.listdir(os.path.join(images_dir, folder))):
                return
        raise ValueError(
            f"no images in {config.data_dir}: its {len(folders)} breed folders hold no "
            f"{'/'.join(IMAGE_EXTENSIONS)} files ({EXPECTED_LAYOUT})"
        )
    tfds_dir = os.path.expanduser(config.tfds_dir or _tfds_default_dir())
    if glob.glob(os.path.join(tfds_dir, TFDS_NAME, "*", "dataset_info.json")):
        return  # prepared: TFDS reads it without a download
    if not host_reachable(TFDS_HOST, TFDS_PORT):
        raise ValueError(
            f"TFDS {TFDS_NAME} is not in {tfds_dir} and {TFDS_HOST} cannot be reached (offline?): "
            "pass --data-dir FOLDER holding images.tar's Images/ (see README)"
        )


def _tfds_default_dir() -> str:
    """TFDS's own default data dir (tensorflow_datasets' constants), read without importing it."""
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def photo_files(folder: str) -> list[str]:
    """Every photo under `folder` (any depth, by IMAGE_EXTENSIONS), sorted: folders of photos
    that are not a dataset (benchmarks, the not-a-dog measurement)."""
    if not os.path.isdir(folder):
        raise ValueError(f"photo folder not found: {folder}")
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _breed_folders(data_dir: str) -> tuple[str, str, list[str]]:
    """(root, the folder holding the breed folders, the breed folders in TFDS's order) of a
    data folder; a one-line ValueError if it is missing, a file, or holds no breed folders."""
    root = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.exists(root):
        raise ValueError(f"data folder not found: {data_dir} ({EXPECTED_LAYOUT})")
    if not os.path.isdir(root):
        raise ValueError(f"data folder {data_dir} is a file, not a folder ({EXPECTED_LAYOUT})")
    images_dir = os.path.join(root, "Images")
    if not os.path.isdir(images_dir):
        images_dir = root  # also accept the breed folders directly
    folders = sorted(
        (d for d in os.listdir(images_dir) if os.path.isdir(os.path.join(images_dir, d))),
        key=str.lower,  # TFDS's order: sorted lower-cased folder names
    )
    if not folders:
        raise ValueError(f"no images in {data_dir}: it has no breed folders ({EXPECTED_LAYOUT})")
    return root, images_dir, folders


def _folder_index(config: DataConfig) -> DatasetIndex:
    root, images_dir, folders = _breed_folders(config.data_dir)
    paths, labels, skipped = [], [], []
    for label, folder in enumerate(folders):
        for file_name in sorted(os.listdir(os.path.join(images_dir, folder))):
            path = os.path.join(images_dir, folder, file_name)
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(path)
                labels.append(label)
            elif not file_name.startswith("."):
                skipped.append((path, "not an image file extension"))
    if not paths:
        raise ValueError(f"no images in {config.data_dir}: its breed folders hold no photos ({EXPECTED_LAYOUT})")
    labels = np.asarray(labels, np.int32)
    train_list = os.path.join(root, "lists", "train_list.mat")
    test_list = os.path.join(root, "lists", "test_list.mat")
    if os.path.isfile(train_list) and os.path.isfile(test_list):
        position = {os.path.relpath(p, images_dir): i for i, p in enumerate(paths)}
        whole = Split(paths, labels)
        splits = {
            "train": whole.take(_mat_positions(train_list, position)),
            "test": whole.take(_mat_positions(test_list, position)),
        }
        origin = "official lists"
    else:
        train, test = _stratified_split(labels, config.test_fraction, config.seed)
        splits = {"train": Split(paths, labels).take(train), "test": Split(paths, labels).take(test)}
        origin = "seeded stratified split"
    return DatasetIndex(
        [breed_name(f) for f in folders], folders, splits, root, origin, skipped
    )


def _mat_positions(mat_path: str, position: dict[str, int]) -> list[int]:
    import scipy.io

    entries = scipy.io.loadmat(mat_path, squeeze_me=True)["file_list"]
    return [position[str(e)] for e in np.atleast_1d(entries) if str(e) in position]


def _tfds_index(config: DataConfig) -> DatasetIndex:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(TFDS_NAME, data_dir=config.tfds_dir)
        builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 - any download failure gets the same advice
        raise ValueError(
            f"could not download or prepare TFDS {TFDS_NAME!r} ({type(error).__name__}: "
            f"{str(error)[:200]}). On a machine without internet, pass --data-dir DIR with a "
            "folder in the layout of Stanford Dogs' images.tar (Images/<synset>-<breed>/*.jpg)."
        ) from error
    folders = builder.info.features["label"].names
    splits = {}
    for split in ("train", "test"):
        records = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        labels = np.fromiter((int(x) for x in records.map(lambda r: r["label"])), np.int32)
        splits[split] = Split([f"tfds:{split}:{i}" for i in range(len(labels))], labels)
    return DatasetIndex([breed_name(f) for f in folders], list(folders), splits, "tfds", "tfds")


def _stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """Positions of (rest, held out): `fraction` of each class held out; when `fraction` > 0,
    at least one image of each class that has two or more."""
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * fraction))
        if fraction > 0:
            count = min(max(count, 1 if len(members) > 1 else 0), len(members) - 1)
        held.extend(members[:count])
        rest.extend(members[count:])
    return sorted(rest), sorted(held)


def _carve_splits(splits: dict[str, Split], config: DataConfig) -> dict[str, Split]:
    """Subset the train split if asked, then carve validation from it."""
    train = splits["train"]
    rng = np.random.default_rng(config.seed)
    subset = config.subset_per_class is not None or config.subset_fraction is not None
    if subset:
        keep = []
        for label in np.unique(train.labels):
            members = rng.permutation(np.flatnonzero(train.labels == label))
            count = len(members)
            if config.subset_per_class is not None:
                count = min(count, config.subset_per_class)
            if config.subset_fraction is not None:
                count = max(1, int(round(count * config.subset_fraction)))
            keep.extend(members[:count])
        train = train.take(sorted(keep))
    rest, validation = _stratified_split(train.labels, config.validation_fraction, config.seed)
    if subset and config.validation_fraction > 0 and not validation:
        raise ValueError("no photo left for validation: a breed needs two training photos to give one to "
                         "validation, and none has two (subset_per_class or subset_fraction cut too deep)")
    return {"train": train.take(rest), "validation": train.take(validation), "test": splits["test"]}


# ---------------------------------------------------------------------------------------------
# 2. Preprocessing ops: small `dict -> dict` functions on one example, chained by name.

_OPS: dict[str, Callable[..., Callable[[dict], dict]]] = {}


def register_op(name: str):
    """Register a factory `get_op(*args) -> (dict -> dict)` under `name`."""

    def decorator(factory):
        _OPS[name] = factory
        return factory

    return decorator


def list_ops() -> list[str]:
    return sorted(_OPS)


def build_ops(chain: str) -> Callable[[dict], dict]:
    """`"decode|resize(64)|onehot(120)"` -> one function applying the ops in order."""
    ops = []
    for spec in filter(None, (s.strip() for s in chain.split("|"))):
        match = re.fullmatch(r"(\w+)(?:\((.*)\))?", spec)
        if not match or match.group(1) not in _OPS:
            raise ValueError(f"unknown preprocessing op {spec!r}; known: {list_ops()}")
        args = json.loads(f"[{match.group(2) or ''}]")
        ops.append(_OPS[match.group(1)](*args))

    def apply(data: dict) -> dict:
        for op in ops:
            data = op(data)
        return data

    return apply


# The scales libjpeg decodes a JPEG at directly (DCT scaling): 1/1, 1/2, 1/4, 1/8 of its side.
JPEG_SCALES = (1, 2, 4, 8)


@register_op("decode")
def get_decode():
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 RGB (grayscale, CMYK, alpha, 16-bit
    all become 8-bit RGB; an animation gives its first frame). An example's `jpeg_scale` (an
    index into `JPEG_SCALES`, see `jpeg_scale`), when it has one, decodes a JPEG at that
    fraction of its side: serving gives it for photos far larger than the model's input."""

    def full(encoded):
        return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)

    def decode(data):
        if "jpeg_scale" in data:
            branches = [lambda: full(data["image"])] + [
                lambda ratio=ratio: tf.io.decode_jpeg(data["image"], channels=3, ratio=ratio) for ratio in JPEG_SCALES[1:]]
            image = tf.switch_case(tf.cast(data["jpeg_scale"], tf.int32), branches)
        else:
            image = full(data["image"])
        image.set_shape([None, None, 3])
        return {**data, "image": image}

    return decode


def jpeg_scale(image_format: str, short_side: int, image_size: int) -> int:
    """For the decode op's `jpeg_scale`: the index into `JPEG_SCALES` of the smallest decoding
    of a JPEG whose short side still holds twice `image_size` (0 for any other format, or a JPEG
    too small to shrink). The margin keeps the resize's antialiasing, and so the result, close to
    the whole decoding; the gain is in large photos: a 12 MP photo for a 224 px model decodes at 1/4."""
    if image_format not in ("JPEG", "MPO"):
        return 0
    return max(index for index, ratio in enumerate(JPEG_SCALES) if short_side // ratio >= 2 * image_size or index == 0)


@register_op("resize")
def get_resize(size: int):
    """Any image -> `size` x `size` uint8, bilinear with antialiasing (no aspect crop)."""

    def resize(data):
        image = tf.image.resize(data["image"], [size, size], antialias=True)
        return {**data, "image": tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)}

    return resize


@register_op("flip_lr")
def get_flip_lr():
    """Mirror half of the images, decided by the example's `seed`."""

    def flip_lr(data):
        image = tf.image.stateless_random_flip_left_right(data["image"], data["seed"])
        return {**data, "image": image}

    return flip_lr


@register_op("rotate")
def get_rotate(factor: float):
    """Rotate by a random angle in +-`factor` of a full turn, decided by the example's `seed`
    (bilinear, reflecting the edges, like Keras' RandomRotation)."""

    def rotate(data):
        image = data["image"]
        angle = factor * 2 * math.pi * tf.random.stateless_uniform([], data["seed"], -1.0, 1.0)
        rotated = tf.numpy_function(rotate_image, [image, angle], image.dtype, stateful=False)
        rotated.set_shape(image.shape)
        return {**data, "image": rotated}

    return rotate


def rotate_image(image: np.ndarray, angle: float) -> np.ndarray:
    """`image` rotated by `angle` radians about its centre, by OpenCV: it releases the GIL, so
    tf.data's parallel calls run at once, and on these CPUs it is 5-6x TensorFlow's
    ImageProjectiveTransformV3 on one image (same mapping: output to input coordinates,
    bilinear, edges reflected as "d c b a | a b c d")."""
    import cv2

    height, width = image.shape[:2]
    cos, sin = math.cos(angle), math.sin(angle)
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    matrix = np.array([[cos, -sin, x_offset], [sin, cos, y_offset]])
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


@register_op("zoom_out")
def get_zoom_out(factor: float):
    """Shrink the image to a random `1 - factor` to all of its side and put it at a random
    place, the rest filled with its edges mirrored (as `rotate` fills its corners), decided by
    the example's `seed`: a dog that filled a box crop becomes a smaller dog off centre, as in
    a whole photo."""
    if not 0 <= factor < 1:
        raise ValueError(f"zoom_out must be in [0, 1), got {factor}")

    def zoom_out(data):
        image = data["image"]
        scale, x, y = tf.unstack(tf.random.stateless_uniform([3], data["seed"] + 1, 0.0, 1.0))
        scale = 1.0 - factor * scale
        shrunk = tf.numpy_function(zoom_out_image, [image, scale, x, y], image.dtype, stateful=False)
        shrunk.set_shape(image.shape)
        return {**data, "image": shrunk}

    return zoom_out


def zoom_out_image(image: np.ndarray, scale: float, x: float, y: float) -> np.ndarray:
    """`image` shrunk by `scale`, its free margin split `x` : 1 - x horizontally and `y` : 1 - y
    vertically and filled with its edges mirrored; by OpenCV (outside the GIL, as `rotate_image`)."""
    import cv2

    height, width = image.shape[:2]
    matrix = np.array([[scale, 0.0, x * (1 - scale) * width], [0.0, scale, y * (1 - scale) * height]])
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@register_op("onehot")
def get_onehot(num_classes: int):
    """An integer `label` -> a one-hot float32 vector."""

    def onehot(data):
        return {**data, "label": tf.one_hot(data["label"], num_classes, dtype=tf.float32)}

    return onehot


def augment_chain(config: DataConfig) -> str:
    """The train-only augmentation ops the configuration asks for."""
    ops = ["flip_lr"] if config.horizontal_flip else []
    if config.rotation_factor:
        ops.append(f"rotate({config.rotation_factor})")
    if config.zoom_out:
        ops.append(f"zoom_out({config.zoom_out})")
    return "|".join(ops)


def decode_and_resize(encoded: bytes | tf.Tensor, image_size: int) -> np.ndarray:
    """One encoded image -> uint8 `image_size` x `image_size` x 3, exactly as in training.

    Serving calls this, so a served photo is prepared the same way as a training photo."""
    return _decode_resize_fn(image_size)({"image": encoded})["image"].numpy()


def _decode_resize_fn(image_size: int):
    return build_ops(input_chain(check_image_size(image_size)))


# ---------------------------------------------------------------------------------------------
# 3. Decoding once into a cache of resized images.


class Progress:
    """Logs `WHAT: done/total UNIT, P%, T s` at each further tenth of the work (at most one
    line per PROGRESS_MIN_GAP_S) and at least every PROGRESS_INTERVAL_S."""

    def __init__(self, what: str, total: int, unit: str = "photos", log: logging.Logger = logger):
        self.what, self.total, self.unit, self.log = what, total, unit, log
        self.done, self.started = 0, time.perf_counter()
        self.last_line, self.last_tenth = self.started, 0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        tenth = self.done * 10 // max(self.total, 1)
        since = now - self.last_line
        if since >= PROGRESS_INTERVAL_S or (tenth > self.last_tenth and since >= PROGRESS_MIN_GAP_S):
            self.last_line, self.last_tenth = now, tenth
            self.log.info("%s: %s/%s %s, %d%%, %.1f s", self.what, f"{self.done:,}", f"{self.total:,}",
                          self.unit, 100 * self.done // max(self.total, 1), now - self.started)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def load_images(
    split: Split,
    image_size: int,
    config: DataConfig,
    shard_index: int = 0,
    num_shards: int = 1,
    tfds_dir: str | None = None,
):
    """Decode and resize a split (or shard `shard_index` of `num_shards`: every
    `num_shards`-th example) into uint8 arrays, cached on disk.

    Returns (images [N, S, S, 3] uint8, labels [N] int32, skipped [(key, reason)]). A cache
    file that cannot be read is logged, deleted and rebuilt; a split of which no photo
    decodes is a ValueError.
    """
    check_image_size(image_size)
    positions = range(shard_index, len(split), num_shards)
    part = split.take(positions)
    what = part.name if num_shards == 1 else f"{part.name} (shard {shard_index + 1}/{num_shards})"
    cache_path = cache_file(part, image_size, config.cache_dir)
    cached = _read_cache_if_sound(cache_path, len(part), image_size, what)
    if cached is not None:
        return cached
    os.makedirs(config.cache_dir, exist_ok=True)
    # One process decodes a split at a size; the others (concurrent trials, actors) wait for its
    # cache instead of decoding the same photos at the same time.
    with open(f"{cache_path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_cache_if_sound(cache_path, len(part), image_size, what)
        if cached is not None:
            return cached
        decoded = _decode_into_cache(part, image_size, tfds_dir or config.tfds_dir, cache_path, what)
    prune_cache(config.cache_dir, config.cache_max_gb, keep=cache_path)
    return decoded


def _read_cache_if_sound(cache_path: str, count: int, image_size: int, what: str):
    """What `load_images` cached at `cache_path`, or None if there is none; a cache file that
    cannot be read is logged and deleted."""
    if not os.path.exists(cache_path):
        return None
    try:
        cached = _read_cache(cache_path, count, image_size)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError, TypeError) as error:
        logger.warning("cache file %s is unreadable (%s): deleting it and decoding again",
                       cache_path, str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
        try:
            os.remove(cache_path)
        except FileNotFoundError:  # another worker removed it first
            pass
        return None
    logger.debug("%s: %d photos from the cache %s", what, count, cache_path)
    try:
        os.utime(cache_path)  # used now: `prune_cache` deletes the least recently used first
    except OSError:  # a cache others wrote, read-only here
        pass
    return cached


def _decode_into_cache(part: Split, image_size: int, tfds_dir: str | None, cache_path: str, what: str):
    progress = Progress(f"decoding {what}", len(part))
    images, kept, skipped = decode_photos(part, image_size, tfds_dir, progress)
    if len(part) and not len(kept):
        raise ValueError(f"no photo of {what} decodes: {describe_skipped(skipped)}")
    labels = part.labels[kept]
    temporary = f"{cache_path}.{os.getpid()}.tmp.npz"
    np.savez(temporary, images=images, labels=labels, skipped=json.dumps(skipped))
    os.replace(temporary, cache_path)  # atomic: concurrent workers never read half a file
    logger.info("decoded %s: %s photos at %d px in %.1f s, %d skipped%s", what, f"{len(kept):,}", image_size,
                progress.seconds, len(skipped), f" ({describe_skipped(skipped)})" if skipped else "")
    return images, labels, skipped


def prune_cache(cache_dir: str, max_gb: float, keep: str) -> None:
    """Delete the cache files of `cache_dir` used least recently (by modification time, which
    a read renews) until they fit in `max_gb` (0: no bound), never `keep`. A worker reading a
    file deleted under it still reads it whole (POSIX); one that finds it gone decodes again."""
    if max_gb <= 0:
        return
    files = []
    for path in glob.glob(os.path.join(cache_dir, "*.npz")):
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # deleted by another process meanwhile
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total, bound, deleted = sum(size for _, size, _ in files), max_gb * 2**30, []
    for _, size, path in sorted(files):
        if total <= bound:
            break
        if os.path.abspath(path) == os.path.abspath(keep):
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        total -= size
        deleted.append(size)
    if deleted:
        logger.info("decode cache: deleted the %d files used least recently (%.1f GB) to fit in %g GB "
                    "(--cache-max-gb)", len(deleted), sum(deleted) / 2**30, max_gb)


def _read_cache(path: str, count: int, image_size: int):
    """(images, labels, skipped) of a cache file; a ValueError if it is not what
    `load_images` wrote for `count` examples at `image_size`."""
    with np.load(path, allow_pickle=False) as cached:
        images, labels = cached["images"], cached["labels"]
        skipped = [tuple(item) for item in json.loads(str(cached["skipped"]))]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"images of shape {images.shape} and type {images.dtype}")
    if labels.shape != (len(images),) or len(images) + len(skipped) != count:
        raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(skipped)} skipped for {count} photos")
    if not all(len(item) == 2 for item in skipped):
        raise ValueError("skipped entries are not (file, reason) pairs")
    return images, labels.astype(np.int32), skipped


def describe_skipped(skipped: list[tuple[str, str]]) -> str:
    """`3 truncated JPEG image, 1 empty file; first: a.jpg (truncated JPEG image)`: one line
    about a non-empty list of skipped files."""
    counts: dict[str, int] = {}
    for _, reason in skipped:
        counts[reason] = counts.get(reason, 0) + 1
    summary = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items(), key=lambda c: -c[1]))
    return f"{summary}; first: {skipped[0][0]} ({skipped[0][1]})"


def cache_file(split: Split, image_size: int, cache_dir: str) -> str:
    """Where `load_images` caches `split` (a whole split or one shard's part) at `image_size`:
    keyed by every file's path, size and modification time, and the size."""
    return os.path.join(cache_dir, f"{_fingerprint(split, image_size)}.npz")


def _fingerprint(split: Split, image_size: int) -> str:
    digest = hashlib.sha256(f"{image_size}".encode())
    for key in split.keys:
        stat = "" if key.startswith("tfds:") else os.stat(key)
        digest.update(f"{key}:{getattr(stat, 'st_size', '')}:{getattr(stat, 'st_mtime_ns', '')}".encode())
    return digest.hexdigest()[:24]


def _read_bytes(split: Split, tfds_dir: str | None) -> tf.data.Dataset:
    """(position, encoded bytes) for every example of the split, in order."""
    if not split.keys or not split.keys[0].startswith("tfds:"):
        return tf.data.Dataset.from_tensor_slices(split.keys).map(
            tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE
        ).enumerate()
    import tensorflow_datasets as tfds

    tfds_split = split.keys[0].split(":")[1]
    record_to_position = {int(k.split(":")[2]): i for i, k in enumerate(split.keys)}
    records = tf.constant(sorted(record_to_position), tf.int64)
    positions = tf.constant([record_to_position[r] for r in sorted(record_to_position)], tf.int64)
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(records, positions), -1)
    # Only the records' span is read: a block of the feature job reads its block, not the split.
    first, last = min(record_to_position), max(record_to_position)
    dataset = tfds.load(
        TFDS_NAME, split=f"{tfds_split}[{first}:{last + 1}]", data_dir=tfds_dir, shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    return (
        dataset.enumerate(start=first)
        .map(lambda i, record: (table.lookup(i), record["image"]))
        .filter(lambda position, image: position >= 0)
    )


def decode_photos(split: Split, image_size: int, tfds_dir: str | None, progress: Progress | None = None):
    """Decode in parallel, skipping what fails; returns (images, kept positions, skipped)."""
    decode_resize = _decode_resize_fn(image_size)
    decoded = (
        _read_bytes(split, tfds_dir)
        .map(
            lambda position, encoded: (position, decode_resize({"image": encoded})["image"]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
        .ignore_errors()
        .prefetch(tf.data.AUTOTUNE)
    )
    images = np.zeros((len(split), image_size, image_size, 3), np.uint8)
    ok = np.zeros(len(split), bool)
    for position, image in decoded.as_numpy_iterator():
        images[position] = image
        ok[position] = True
        if progress is not None:
            progress.advance()
    skipped = [(split.keys[position], why_undecodable(split.keys[position])) for position in np.flatnonzero(~ok)]
    kept = np.flatnonzero(ok)
    return images[kept], kept, skipped


# The formats `decode` reads, by their first bytes (WebP: RIFF, a size, then WEBP).
IMAGE_SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
}


def image_format(encoded: bytes) -> str | None:
    """JPEG, PNG, GIF, BMP or WebP by the file's first bytes; None for anything else."""
    if encoded[:4] == b"RIFF" and encoded[8:12] == b"WEBP":
        return "WebP"
    return next((name for name, starts in IMAGE_SIGNATURES.items() if encoded.startswith(starts)), None)


def why_undecodable(key: str) -> str:
    """A short, plain reason why an example did not decode, read from its bytes (TensorFlow's
    own error text is several lines of op names)."""
    if key.startswith("tfds:"):
        return "TFDS record could not be decoded"
    try:
        with open(key, "rb") as handle:
            encoded = handle.read()
    except OSError as error:
        return f"cannot be read ({error.strerror or type(error).__name__})"
    if not encoded:
        return "empty file"
    kind = image_format(encoded)
    if kind is None:
        return "not a JPEG/PNG/GIF/BMP/WebP image"
    # Each format says where it ends: JPEG's EOI marker, PNG's IEND chunk, GIF's trailer byte,
    # the sizes in BMP's and WebP's headers.
    end = encoded.rstrip(b"\0\r\n ")
    truncated = {
        "JPEG": lambda: not end.endswith(b"\xff\xd9"),
        "PNG": lambda: b"IEND" not in encoded[-16:],
        "GIF": lambda: not end.endswith(b";"),
        "BMP": lambda: len(encoded) < 6 or int.from_bytes(encoded[2:6], "little") > len(encoded),
        "WebP": lambda: int.from_bytes(encoded[4:8], "little") + 8 > len(encoded),
    }[kind]()
    return f"truncated {kind} image" if truncated else f"damaged {kind} image"


# ---------------------------------------------------------------------------------------------
# 4. Batches for Keras.


def _one_copy(images: np.ndarray) -> tf.Variable:
    """The photos, held once by TensorFlow. A tensor made from the array held two copies of
    it and each iterator one more (fine-tuning's 8,640 photos at 288 px: 2 GB each): the
    photos are copied once into memory aligned as TensorFlow requires (64 bytes; DLPack's
    import aborts the process otherwise), taken by DLPack without a copy, and kept in a
    variable, which adopts that buffer and which iterators share rather than copy."""
    buffer = np.empty(images.nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    aligned = buffer[start:start + images.nbytes].view(images.dtype).reshape(images.shape)
    aligned[...] = images
    with tf.device("/CPU:0"):
        return tf.Variable(tf.experimental.dlpack.from_dlpack(aligned.__dlpack__()), trainable=False)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    batch_size: int,
    config: DataConfig,
    training: bool = False,
    repeat: bool = False,
) -> tf.data.Dataset:
    """Batches of (float32 images in [0, 255], one-hot labels) from cached arrays.

    Training shuffles and augments (on the fly, a new view each epoch; or the study's fixed
    `augmented_views` per image); evaluation does neither. `repeat` loops forever, for the
    equal step counts that synchronous multi-worker training needs.

    No Python runs per example: the arrays become tensors, each example is gathered by its
    number and augmented by TensorFlow ops in parallel (`map`), so input does not queue on
    the GIL. Example `i` is image `i % N`; a fixed view is seeded `(seed, i)` (the views
    `features.py` computes), an on-the-fly one by a seeded stream drawn anew each pass.
    """
    views = config.augmented_views if training else 0
    photos = len(images)
    count = photos * max(views, 1)
    pixels = _one_copy(images)  # nothing below refers to `images`: the caller's array can go
    targets = tf.convert_to_tensor(labels, tf.int32)
    items = tf.data.Dataset.range(count)
    if training:
        items = items.shuffle(count, seed=config.seed, reshuffle_each_iteration=True)
    if training and not views:
        seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(2)
        items = tf.data.Dataset.zip(items, seeds)
    else:
        items = items.map(lambda item: (item, tf.stack([tf.constant(config.seed, tf.int64), item])))
    ops = build_ops((augment_chain(config) + "|" if training else "") + f"onehot({num_classes})")

    def example(item, seed):
        index = item % photos
        result = ops({"image": tf.gather(pixels, index), "label": tf.gather(targets, index), "seed": seed})
        return result["image"], result["label"]

    dataset = items.map(example, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    # uint8 until batched: one cast per batch, and a quarter of the bytes through the map.
    dataset = dataset.map(lambda images, labels: (tf.cast(images, tf.float32), labels))
    if repeat:
        dataset = dataset.repeat()
    options = tf.data.Options()
    # Each Ray Train worker already reads only its own share (see `load_images`).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def summarize(index: DatasetIndex) -> dict:
    """Classes, images per class and split, and what was skipped: for `dogbreeds data`."""
    per_class = {name: 0 for name in index.class_names}
    for split in index.splits.values():
        for label in split.labels:
            per_class[index.class_names[label]] += 1
    return {
        "source": index.source,
        "split": index.split_origin,
        "num_classes": index.num_classes,
        "num_images": int(sum(per_class.values())),
        "splits": {name: len(split) for name, split in index.splits.items()},
        "images_per_class": per_class,
        "skipped": [{"file": key, "reason": reason} for key, reason in index.skipped],
    }
