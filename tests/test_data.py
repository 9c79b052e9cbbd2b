"""The data stage on real files: listing, splitting, every preprocessing op (eagerly and inside
tf.data), odd image formats, corrupt files, the cache and the batches."""

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest
import scipy.io
import tensorflow as tf
from PIL import Image

from dogbreeds import data
from dogbreeds.config import DataConfig
from tests.conftest import ROOT, SAMPLE_DIR, TINY_DIR


def _example(size=48):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
    return {"image": tf.constant(image), "label": tf.constant(3), "seed": tf.constant([7, 11], tf.int64)}


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# Arguments for every registered op, and an input it accepts.
OP_CASES = {
    "decode": ("decode", lambda: {"image": tf.constant(_encoded(Image.new("RGB", (30, 20), (200, 10, 10)), "JPEG"))}),
    "resize": ("resize(16)", _example),
    "flip_lr": ("flip_lr", _example),
    "rotate": ("rotate(0.1)", _example),
    "zoom_out": ("zoom_out(0.5)", _example),
    "onehot": ("onehot(5)", _example),
}


def test_every_op_has_a_case():
    assert sorted(OP_CASES) == data.list_ops()


@pytest.mark.parametrize("name", data.list_ops())
def test_op_is_the_same_eagerly_and_inside_tf_data(name):
    chain, make_input = OP_CASES[name]
    op = data.build_ops(chain)
    eager = op(make_input())
    dataset = tf.data.Dataset.from_tensors(make_input()).map(op)
    graph = next(iter(dataset))
    for key in eager:
        np.testing.assert_array_equal(eager[key].numpy(), graph[key].numpy())


def test_ops_do_what_they_say():
    example = _example()
    image = example["image"].numpy()
    assert data.build_ops("resize(16)")(example)["image"].shape == (16, 16, 3)
    flipped = [data.build_ops("flip_lr")({**example, "seed": tf.constant([s, 0], tf.int64)})["image"].numpy() for s in range(8)]
    assert any(np.array_equal(f, image[:, ::-1]) for f in flipped)
    assert any(np.array_equal(f, image) for f in flipped)
    rotated = data.build_ops("rotate(0.25)")(example)["image"].numpy()
    assert rotated.shape == image.shape and not np.array_equal(rotated, image)
    assert np.array_equal(data.build_ops("rotate(0.0)")(example)["image"].numpy(), image)
    onehot = data.build_ops("onehot(5)")(example)["label"].numpy()
    np.testing.assert_array_equal(onehot, [0, 0, 0, 1, 0])
    with pytest.raises(ValueError, match="unknown preprocessing op"):
        data.build_ops("decode|sharpen(2)")


def test_a_large_jpeg_decodes_at_a_fraction_of_its_side():
    """`jpeg_scale` picks the smallest of libjpeg's scales that keeps the short side at twice the
    model's input size; the decode op decodes at it, eagerly and in tf.data alike, close to the
    whole photo once resized; other formats and small photos decode whole."""
    photo = Image.open(next(SAMPLE_DIR.glob("Images/n02085620-Chihuahua/*"))).convert("RGB").resize((1000, 800))
    jpeg, png = _encoded(photo, "JPEG", quality=95), _encoded(photo, "PNG")
    assert [data.jpeg_scale("JPEG", 800, size) for size in (50, 51, 101, 201)] == [3, 2, 1, 0]
    assert data.jpeg_scale("PNG", 800, 100) == 0 and data.jpeg_scale(None, 0, 100) == 0
    op = data.build_ops("decode|resize(96)")
    example = {"image": tf.constant(jpeg), "jpeg_scale": tf.constant(3)}
    assert data.build_ops("decode")(example)["image"].shape == (100, 125, 3)
    scaled = op(example)["image"].numpy()
    np.testing.assert_array_equal(scaled, next(iter(tf.data.Dataset.from_tensors(example).map(op)))["image"].numpy())
    whole = op({"image": tf.constant(jpeg)})["image"].numpy()
    assert 0 < np.abs(scaled.astype(int) - whole.astype(int)).mean() < 3
    np.testing.assert_array_equal(op({"image": tf.constant(png), "jpeg_scale": tf.constant(0)})["image"].numpy(),
                                  op({"image": tf.constant(png)})["image"].numpy())


def test_zoom_out_shrinks_the_photo_to_a_random_place_with_mirrored_margins():
    """A box crop made to look like a whole photo: the photo, shrunk to between 1 - factor and
    all of its side, sits whole somewhere in the frame; around it, its own edges mirrored."""
    photo = next(SAMPLE_DIR.glob("Images/n02085620-Chihuahua/*")).read_bytes()
    image = data.decode_and_resize(photo, 64)
    shrunk = data.zoom_out_image(image, 0.5, 1.0, 0.0)  # half the side, top right
    expected = cv2.resize(image, (32, 32), interpolation=cv2.INTER_LINEAR)
    difference = {corner: np.abs(shrunk[rows, columns].astype(int) - expected).mean() for corner, (rows, columns) in
                  {"top right": (slice(0, 32), slice(32, 64)), "bottom left": (slice(32, 64), slice(0, 32))}.items()}
    assert difference["top right"] < 12 < 2 * 12 < difference["bottom left"], difference  # sampled apart, not moved
    margin, mirror = shrunk[:32, 31 - np.arange(8)].astype(int), shrunk[:32, 32 + np.arange(8)].astype(int)
    assert np.abs(margin - mirror).mean() < 12 < np.abs(margin - margin.mean()).mean()  # mirrored, not flat
    assert np.array_equal(data.zoom_out_image(image, 1.0, 0.3, 0.7), image)
    example = {**_example(), "image": tf.constant(image)}
    zoomed = [data.build_ops("zoom_out(0.4)")({**example, "seed": tf.constant([seed, 0], tf.int64)})["image"].numpy()
              for seed in range(4)]
    assert all(z.shape == image.shape and not np.array_equal(z, image) for z in zoomed)
    assert len({z.tobytes() for z in zoomed}) == 4  # each seed its own scale and place
    assert np.array_equal(data.build_ops("zoom_out(0.0)")(example)["image"].numpy(), image)
    with pytest.raises(ValueError, match="zoom_out must be in"):
        data.build_ops("zoom_out(1.0)")
    assert data.augment_chain(DataConfig(zoom_out=0.4)) == "flip_lr|rotate(0.1)|zoom_out(0.4)"


@pytest.mark.parametrize("angle", [0.0, 0.3, -1.2, 2.5])
def test_rotation_maps_pixels_as_tensorflows_own_transform(angle):
    """OpenCV's rotation (fast, outside the GIL) against TensorFlow's ImageProjectiveTransformV3
    with Keras RandomRotation's mapping, on a real photo: the same image up to interpolation
    rounding (a wrong sign, centre or edge mode is off by tens of levels)."""
    photo = next(SAMPLE_DIR.glob("Images/n02085620-Chihuahua/*")).read_bytes()
    image = data.decode_and_resize(photo, 96)[:, :80]  # not square: width and height not swapped
    height, width = image.shape[:2]
    cos, sin = np.cos(angle), np.sin(angle)
    transform = tf.constant([[cos, -sin, ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2,
                              sin, cos, ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2, 0, 0]],
                            tf.float32)
    expected = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform, output_shape=[height, width],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")[0].numpy()
    difference = np.abs(data.rotate_image(image, angle).astype(np.float32) - expected)
    assert difference.mean() < 1.0 and np.percentile(difference, 99) < 8, (difference.mean(), difference.max())


def test_odd_formats_decode_to_rgb():
    """Grayscale, CMYK, alpha, 16-bit, palette GIF (first frame), WebP: all 8-bit RGB."""
    colours = np.zeros((40, 50, 3), np.uint8)
    colours[:, :25] = (200, 30, 40)
    colours[:, 25:] = (20, 180, 60)
    rgb = Image.fromarray(colours)
    frames = [rgb, Image.fromarray(255 - colours)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    cases = {
        "cmyk": _encoded(rgb.convert("CMYK"), "JPEG", quality=95),
        "rgba": _encoded(rgb.convert("RGBA"), "PNG"),
        "png": _encoded(rgb, "PNG"),
        "webp": _encoded(rgb, "WEBP", lossless=True),
        "gif": gif.getvalue(),
    }
    for name, encoded in cases.items():
        decoded = data.decode_and_resize(encoded, 40)
        assert decoded.shape == (40, 40, 3) and decoded.dtype == np.uint8, name
        # The left half stays red, the right half green (resizing 50 -> 40 wide).
        assert abs(int(decoded[20, 5, 0]) - 200) < 12 and decoded[20, 35, 1] > 160, name
    gray = data.decode_and_resize(_encoded(rgb.convert("L"), "JPEG"), 40)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    wide = Image.fromarray((np.linspace(0, 65535, 40 * 50).reshape(40, 50)).astype(np.uint16))
    sixteen = data.decode_and_resize(_encoded(wide, "PNG"), 40)
    assert sixteen.dtype == np.uint8 and sixteen.max() > 200 and sixteen.min() < 40


def test_sample_folder_has_all_breeds_and_every_image(cache_dir):
    config = DataConfig(data_dir=str(SAMPLE_DIR), cache_dir=cache_dir)
    index = data.load_index(config)
    assert index.num_classes == 120
    assert sum(len(s) for s in index.splits.values()) == 301
    assert index.class_names[0] == "Chihuahua" and index.class_folders[0] == "n02085620-Chihuahua"
    assert "golden retriever" in index.class_names and "Shih-Tzu" in index.class_names
    breeds = json.loads((SAMPLE_DIR / "breeds.json").read_text())
    # TFDS's class order: sorted lower-cased folder names.
    assert index.class_folders == sorted((b["folder"] for b in breeds), key=str.lower)
    keys = [set(s.keys) for s in index.splits.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    decoded = 0
    for split in index.splits.values():
        images, labels, skipped = data.load_images(split, 32, config)
        assert skipped == [] and images.shape[1:] == (32, 32, 3)
        decoded += len(images)
    assert decoded == 301


def test_the_grayscale_photo_is_decoded(cache_dir):
    manifest = json.loads((SAMPLE_DIR / "manifest.json").read_text())
    grayscale = [m["path"] for m in manifest if Image.open(SAMPLE_DIR / m["path"]).mode == "L"]
    assert len(grayscale) == 1
    image = data.decode_and_resize((SAMPLE_DIR / grayscale[0]).read_bytes(), 64)
    assert image.shape == (64, 64, 3) and image.std() > 10


def _small_folder(tmp_path, per_breed=6):
    """A copy of a few tiny_dogs_64 breeds, for damaging without touching ../shared."""
    root = tmp_path / "dogs"
    for folder in sorted(os.listdir(TINY_DIR / "Images"))[:3]:
        (root / "Images" / folder).mkdir(parents=True)
        for name in sorted(os.listdir(TINY_DIR / "Images" / folder))[:per_breed]:
            shutil.copy(TINY_DIR / "Images" / folder / name, root / "Images" / folder / name)
    return root


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    root = _small_folder(tmp_path)
    breed = root / "Images" / sorted(os.listdir(root / "Images"))[0]
    good = sorted(breed.iterdir())[0].read_bytes()
    (breed / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (breed / "garbage.JPEG").write_bytes(os.urandom(500))
    (breed / "empty.png").write_bytes(b"")
    (breed / "notes.txt").write_text("not a photo")
    config = DataConfig(data_dir=str(root), cache_dir=str(tmp_path / "cache"), test_fraction=0.0, validation_fraction=0.0)
    index = data.load_index(config)
    assert [os.path.basename(k) for k, _ in index.skipped] == ["notes.txt"]
    images, labels, skipped = data.load_images(index.splits["train"], 32, config)
    names = sorted(os.path.basename(key) for key, _ in skipped)
    assert names == ["empty.png", "garbage.JPEG", "truncated.jpg"]
    # Plain reasons, not TensorFlow's text ("{{function_node __wrapped__DecodeImage...").
    assert {os.path.basename(key): reason for key, reason in skipped} == {
        "empty.png": "empty file",
        "garbage.JPEG": "not a JPEG/PNG/GIF/BMP/WebP image",
        "truncated.jpg": "truncated JPEG image",
    }
    assert len(images) == len(labels) == 18
    again = data.load_images(index.splits["train"], 32, config)  # from the cache
    assert np.array_equal(again[0], images) and sorted(os.path.basename(k) for k, _ in again[2]) == names


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="data folder not found"):
        data.load_index(DataConfig(data_dir=str(tmp_path / "nope")))
    (tmp_path / "Images" / "n02085620-Chihuahua").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in"):
        data.load_index(DataConfig(data_dir=str(tmp_path)))


def test_official_lists_give_the_split(tmp_path):
    root = _small_folder(tmp_path)
    files = sorted(str(p.relative_to(root / "Images")) for p in (root / "Images").rglob("*.jpg"))
    (root / "lists").mkdir()
    scipy.io.savemat(root / "lists" / "train_list.mat", {"file_list": np.array(files[::2], dtype=object)})
    scipy.io.savemat(root / "lists" / "test_list.mat", {"file_list": np.array(files[1::2], dtype=object)})
    index = data.load_index(DataConfig(data_dir=str(root)))
    assert index.split_origin == "official lists"
    test = sorted(os.path.relpath(k, root / "Images") for k in index.splits["test"].keys)
    assert test == files[1::2]
    assert len(index.splits["train"]) + len(index.splits["validation"]) == len(files[::2])


def test_splits_are_stratified_seeded_and_subsettable(cache_dir):
    config = DataConfig(data_dir=str(TINY_DIR), cache_dir=cache_dir)
    index = data.load_index(config)
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 2160, "validation": 240, "test": 600}
    for split in index.splits.values():  # every breed in the same share
        counts = np.bincount(split.labels, minlength=6)
        assert counts.max() - counts.min() == 0
    assert data.load_index(config).splits["test"].keys == index.splits["test"].keys
    other = data.load_index(DataConfig(data_dir=str(TINY_DIR), seed=1))
    assert other.splits["test"].keys != index.splits["test"].keys
    subset = data.load_index(DataConfig(data_dir=str(TINY_DIR), subset_per_class=50))
    assert len(subset.splits["train"]) + len(subset.splits["validation"]) == 300
    assert subset.splits["test"].keys == index.splits["test"].keys  # test is never subset
    fraction = data.load_index(DataConfig(data_dir=str(TINY_DIR), subset_fraction=0.5))
    assert len(fraction.splits["train"]) + len(fraction.splits["validation"]) == 1200
    with pytest.raises(ValueError, match="no photo left for validation"):  # one a breed: none to spare
        data.load_index(DataConfig(data_dir=str(TINY_DIR), subset_per_class=1))


def test_small_classes_still_hold_out_one_image():
    labels = np.array([0, 0, 1] + [2] * 10)  # two images, one image, ten images
    rest, held = data._stratified_split(labels, 0.1, seed=0)
    assert sorted(rest + held) == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=3).tolist() == [1, 0, 1]  # never the only one
    assert data._stratified_split(labels, 0.0, seed=0) == (list(range(len(labels))), [])


def test_a_bundle_prepares_photos_as_training_does():
    """Exactly as training does, but for a JPEG of at least four times the input's side, which
    serving decodes at a fraction of its side (`data.jpeg_scale`): close to it."""
    from dogbreeds import photos
    from dogbreeds.export import Bundle

    bundle = Bundle(model=None, info={"preprocessing": {"chain": "decode|resize(64)", "image_size": 64}})
    grayscale = SAMPLE_DIR / "Images" / "n02096051-Airedale" / "imagenet_sample_n02096051_Airedale.JPEG"
    scaled = 0
    for path in sorted(SAMPLE_DIR.rglob("*.JPEG"))[::10] + [grayscale]:
        encoded = path.read_bytes()
        served, trained = bundle.prepare(encoded), data.decode_and_resize(encoded, 64)
        header = photos.read_header(encoded)
        if data.jpeg_scale(header["format"], min(header["width"], header["height"]), 64):
            scaled += 1
            assert 0 < np.abs(served.astype(int) - trained.astype(int)).mean() < 4  # 1.3 on average, 3.4 at most
            np.testing.assert_array_equal(bundle.prepare(encoded, scale=0), trained)
        else:
            np.testing.assert_array_equal(served, trained)
    assert 0 < scaled < 32
    with pytest.raises(tf.errors.InvalidArgumentError):
        bundle.prepare(b"not an image")


def test_workers_read_disjoint_shares(cache_dir):
    config = DataConfig(data_dir=str(TINY_DIR), cache_dir=cache_dir)
    split = data.load_index(config).splits["validation"]
    shares = [data.load_images(split, 16, config, rank, 2) for rank in range(2)]
    whole = data.load_images(split, 16, config)
    assert len(shares[0][0]) + len(shares[1][0]) == len(whole[0])
    np.testing.assert_array_equal(shares[1][0], whole[0][1::2])


def test_batches_for_training_and_evaluation(cache_dir):
    config = DataConfig(data_dir=str(TINY_DIR), cache_dir=cache_dir, augmented_views=3)
    index = data.load_index(config)
    images, labels, _ = data.load_images(index.splits["validation"], 32, config)
    evaluation = list(data.make_dataset(images, labels, 6, 64, config))
    x, y = evaluation[0]
    assert x.dtype == tf.float32 and x.shape == (64, 32, 32, 3) and y.shape == (64, 6)
    np.testing.assert_array_equal(x.numpy(), images[:64].astype("float32"))  # no augmentation
    assert sum(len(b[0]) for b in evaluation) == len(images)
    dataset = data.make_dataset(images, labels, 6, 64, config, training=True)
    training = list(dataset)
    assert sum(len(b[0]) for b in training) == 3 * len(images)  # the study's fixed views
    again = list(dataset)  # the next epoch
    # Fixed views: the same augmented images each epoch, in another order.
    assert np.isclose(sum(float(b[0].numpy().sum()) for b in training), sum(float(b[0].numpy().sum()) for b in again), rtol=1e-6)
    assert not np.array_equal(training[0][0].numpy(), again[0][0].numpy())
    # On the fly (no fixed views): each pass draws new views of the same images, reproducibly.
    on_the_fly = dataclasses.replace(config, augmented_views=0)

    def pixel_sums(dataset):
        return sorted(float(image.sum()) for batch in dataset for image in batch[0].numpy())

    first, second = data.make_dataset(images, labels, 6, 64, on_the_fly, training=True), None
    passes = [pixel_sums(first), pixel_sums(first)]
    second = pixel_sums(data.make_dataset(images, labels, 6, 64, on_the_fly, training=True))
    assert len(passes[0]) == len(images) and passes[0] != passes[1] and second == passes[0]


def test_a_training_dataset_holds_one_copy_of_its_photos():
    """Fine-tuning's photos (8,640 at 288 px: 2 GB) lived in each trial's worker four times: the
    caller's array, which the dataset's function kept alive, two in the tensor made from it,
    and one more each iterator. The dataset takes one copy, the caller's array and it are the
    peak, and once the caller lets go the dataset holds one copy."""
    code = textwrap.dedent("""
        import gc, sys
        import numpy as np
        from dogbreeds import data
        from dogbreeds.config import DataConfig
        def resident_mb(key="VmRSS"):
            return int(dict(line.split(":", 1) for line in open("/proc/self/status"))[key].split()[0]) / 1024
        def twenty_batches(photos):
            images = np.ones((photos, 224, 224, 3), np.uint8)
            dataset = data.make_dataset(images, np.zeros(photos, int), 4, 32, DataConfig(zoom_out=0.5), training=True)
            del images
            gc.collect()
            batches = iter(dataset)
            for _ in range(20):
                next(batches)
            return resident_mb()
        twenty_batches(640)  # TensorFlow's own start
        before = resident_mb()
        print(twenty_batches(int(sys.argv[1])) - before, resident_mb("VmHWM") - before)
    """)
    photos = 3000
    done = subprocess.run([sys.executable, "-c", code, str(photos)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb, peak_mb = map(float, done.stdout.split()[-2:])
    copy_mb = photos * 224 * 224 * 3 / 2**20
    assert grown_mb < 1.5 * copy_mb and peak_mb < 2.5 * copy_mb, (grown_mb, peak_mb, copy_mb)


def test_tfds_source_reads_stanford_dogs_records(tmp_path):
    """The TFDS path (no download is possible here): TFDS's own mocking serves records of
    real JPEGs from the sample in stanford_dogs' format; listing, splitting and decoding are
    ours, unmocked."""
    import tensorflow_datasets as tfds

    files = sorted(SAMPLE_DIR.glob("Images/*/*"))[:20]

    asked = []

    def as_dataset(self, split, decoders=None, **options):
        asked.append(split)
        name, first, stop = re.fullmatch(r"(\w+)(?:\[(\d+):(\d+)\])?", split).groups()
        records = (files[:12] if name == "train" else files[12:])[int(first or 0):int(stop or 99)]
        return tf.data.Dataset.from_tensor_slices(
            {"image": [f.read_bytes() for f in records], "label": list(range(len(records)))}
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        config = DataConfig(cache_dir=str(tmp_path), validation_fraction=0.25)
        index = data.load_index(config)
        assert index.source == "tfds" and index.num_classes == 120
        assert len(index.splits["train"]) + len(index.splits["validation"]) == 12
        images, labels, skipped = data.load_images(index.splits["test"], 24, config)
        assert images.shape == (8, 24, 24, 3) and skipped == []
        np.testing.assert_array_equal(labels, index.splits["test"].labels)
        expected = data.decode_and_resize(files[12 + 5].read_bytes(), 24)
        np.testing.assert_array_equal(images[5], expected)
        shard = data.load_images(index.splits["test"], 24, config, 1, 2)[0]
        np.testing.assert_array_equal(shard, images[1::2])
        # A block of a split reads its span of records, not the whole split.
        block, _, _ = data.decode_photos(index.splits["test"].take(range(3, 6)), 24, None)
        np.testing.assert_array_equal(block, images[3:6])
        assert asked[-1] == "test[3:6]"


def test_plain_reasons_for_every_format(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8))
    for fmt, name in (("PNG", "PNG"), ("GIF", "GIF"), ("BMP", "BMP"), ("WEBP", "WebP"), ("JPEG", "JPEG")):
        whole = tmp_path / f"whole.{fmt.lower()}"
        whole.write_bytes(_encoded(rgb, fmt))
        assert data.image_format(whole.read_bytes()) == name
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
        assert data.why_undecodable(str(cut)) == f"truncated {name} image"
        assert data.why_undecodable(str(whole)) == f"damaged {name} image"  # (if it had failed)
    assert data.why_undecodable(str(tmp_path / "gone.jpg")).startswith("cannot be read")


def test_a_split_where_no_photo_decodes_is_a_one_line_error(tmp_path):
    root = tmp_path / "dogs" / "Images" / "n02085620-Chihuahua"
    root.mkdir(parents=True)
    for number in range(3):
        (root / f"bad{number}.jpg").write_bytes(os.urandom(300))
    (root / "empty.jpg").write_bytes(b"")
    config = DataConfig(data_dir=str(tmp_path / "dogs"), cache_dir=str(tmp_path / "cache"), test_fraction=0.0, validation_fraction=0.0)
    index = data.load_index(config)
    with pytest.raises(ValueError) as raised:
        data.load_images(index.splits["train"], 16, config)
    message = str(raised.value)
    assert "\n" not in message and "function_node" not in message
    assert message.startswith("no photo of train decodes: 3 not a JPEG/PNG/GIF/BMP/WebP image, 1 empty file; first: ")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.npz"))  # nothing cached


def test_concurrent_loads_of_a_split_decode_it_once(tmp_path, monkeypatch):
    """Two trials (here two threads) that ask for the same split at the same size at once:
    one decodes, the other waits for its cache and reads it."""
    import threading

    root = _small_folder(tmp_path, per_breed=4)
    config = DataConfig(data_dir=str(root), cache_dir=str(tmp_path / "cache"), test_fraction=0.0, validation_fraction=0.0)
    split = data.load_index(config).splits["train"]
    decode, calls, both_asked = data.decode_photos, [], threading.Barrier(2)

    def slow_decode(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(1.0)  # the other thread asks while this one decodes
        return decode(*args, **kwargs)

    monkeypatch.setattr(data, "decode_photos", slow_decode)
    results = {}

    def load(name):
        both_asked.wait()
        results[name] = data.load_images(split, 16, config)

    threads = [threading.Thread(target=load, args=(name,), name=name) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1 and sorted(results) == ["first", "second"]
    np.testing.assert_array_equal(results["first"][0], results["second"][0])


@pytest.mark.parametrize("damage", ["truncate", "random_bytes", "wrong_arrays"])
def test_a_corrupt_cache_file_is_discarded_and_rebuilt(tmp_path, caplog, damage):
    root = _small_folder(tmp_path, per_breed=4)
    config = DataConfig(data_dir=str(root), cache_dir=str(tmp_path / "cache"), test_fraction=0.0, validation_fraction=0.0)
    split = data.load_index(config).splits["train"]
    images, labels, skipped = data.load_images(split, 16, config)
    path = data.cache_file(split, 16, config.cache_dir)
    assert sorted(os.listdir(config.cache_dir)) == [os.path.basename(path), os.path.basename(path) + ".lock"]  # no temporary file
    whole = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(whole[: len(whole) // 2])
    elif damage == "random_bytes":
        open(path, "wb").write(os.urandom(len(whole)))
    else:  # a valid .npz of the wrong shape, as another version might have written
        np.savez(path, images=images[:, :8, :8], labels=labels, skipped="[]")
    with caplog.at_level("WARNING", logger="dogbreeds.data"):
        again = data.load_images(split, 16, config)
    assert any("is unreadable" in r.getMessage() and path in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again[0], images)
    np.testing.assert_array_equal(again[1], labels)
    assert again[2] == skipped
    caplog.clear()
    with caplog.at_level("WARNING", logger="dogbreeds.data"):
        third = data.load_images(split, 16, config)  # the rebuilt file is a clean hit
    assert not caplog.records
    np.testing.assert_array_equal(third[0], images)


def test_the_cache_keeps_what_was_used_last_within_its_bound(tmp_path, caplog):
    """`--cache-max-gb`: once a split is decoded, the cache files used least recently go until
    the cache fits, a read counting as a use, and never the file just written; 0 keeps all."""
    root = _small_folder(tmp_path, per_breed=4)
    base = dict(data_dir=str(root), test_fraction=0.0, validation_fraction=0.0)
    split = data.load_index(DataConfig(**base)).splits["train"]
    cache = str(tmp_path / "cache")
    unbounded = DataConfig(**base, cache_dir=cache, cache_max_gb=0)
    path = {size: data.cache_file(split, size, cache) for size in (16, 24, 32, 40, 48)}
    for age, size in enumerate((16, 24, 32)):
        data.load_images(split, size, unbounded)
        os.utime(path[size], (1e9 + age, 1e9 + age))  # 16 written first, 32 last
    data.load_images(split, 16, unbounded)  # read: 16 is now the one used last
    elsewhere = DataConfig(**base, cache_dir=str(tmp_path / "elsewhere"))
    data.load_images(split, 40, elsewhere)
    size = {s: os.path.getsize(p) for s, p in path.items() if os.path.exists(p)}
    size[40] = os.path.getsize(data.cache_file(split, 40, elsewhere.cache_dir))
    room = size[16] + size[40] + min(size[24], size[32]) / 2  # 16 and 40 fit; 24 or 32 beside them does not
    with caplog.at_level("INFO", logger="dogbreeds.data"):
        data.load_images(split, 40, DataConfig(**base, cache_dir=cache, cache_max_gb=room / 2**30))
    assert [s for s in (16, 24, 32, 40) if os.path.exists(path[s])] == [16, 40]
    assert any("deleted the 2 files used least recently" in r.getMessage() and "--cache-max-gb" in r.getMessage()
               for r in caplog.records)
    images, _, _ = data.load_images(split, 48, DataConfig(**base, cache_dir=cache, cache_max_gb=1e-9))
    assert [s for s in path if os.path.exists(path[s])] == [48] and images.shape[1:] == (48, 48, 3)


def test_decoding_a_split_logs_progress_and_a_final_count(cache_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(data, "PROGRESS_MIN_GAP_S", 0.0)  # a line at each tenth, however fast
    monkeypatch.setattr(data, "PROGRESS_INTERVAL_S", 1e9)  # and only then, however slow
    config = DataConfig(data_dir=str(TINY_DIR), cache_dir=str(tmp_path / "cache"))
    split = data.load_index(config).splits["validation"]
    with caplog.at_level("INFO", logger="dogbreeds.data"):
        data.load_images(split, 8, config)
    messages = [r.getMessage() for r in caplog.records]
    progress = [m for m in messages if m.startswith("decoding validation: ")]
    assert len(progress) == 10 and progress[-1].startswith("decoding validation: 240/240 photos, 100%, ")
    assert "decoding validation: 24/240 photos, 10%, " in progress[0]
    assert messages[-1].startswith("decoded validation: 240 photos at 8 px in ") and messages[-1].endswith(" s, 0 skipped")
    caplog.clear()
    with caplog.at_level("INFO", logger="dogbreeds.data"):
        data.load_images(split, 8, config)  # a cache hit says nothing at INFO
    assert not caplog.records


def test_progress_lines_are_rate_limited(caplog, monkeypatch):
    clock = iter([0.0, 0.1, 0.2, 0.3, 6.0, 6.1])
    monkeypatch.setattr(data.time, "perf_counter", lambda: next(clock))
    with caplog.at_level("INFO", logger="dogbreeds.data"):
        progress = data.Progress("decoding train", 2000)
        for _ in range(5):
            progress.advance(400)  # a tenth or more each time, but under PROGRESS_MIN_GAP_S apart
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["decoding train: 1,600/2,000 photos, 80%, 6.0 s"]  # only PROGRESS_INTERVAL_S passed


def test_check_source_names_the_folder_and_what_is_missing(tmp_path):
    def error(data_dir):
        with pytest.raises(ValueError) as raised:
            data.check_source(DataConfig(data_dir=str(data_dir)))
        message = str(raised.value)
        assert "\n" not in message and str(data_dir) in message and "Images/<synset>-<breed>" in message
        return message

    assert error(tmp_path / "nope").startswith("data folder not found: ")
    (tmp_path / "file.txt").write_text("x")
    assert " is a file, not a folder" in error(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    assert "no breed folders" in error(tmp_path / "empty")
    breed = tmp_path / "photoless" / "Images" / "n02085620-Chihuahua"
    breed.mkdir(parents=True)
    (breed / "notes.txt").write_text("not a photo")
    assert "breed folders hold no .jpg/.jpeg" in error(tmp_path / "photoless")
    data.check_source(DataConfig(data_dir=str(TINY_DIR)))  # fine
    data.check_source(DataConfig(data_dir=str(TINY_DIR / "Images")))  # the breed folders directly


def test_check_source_without_a_folder_answers_offline_in_seconds(tmp_path):
    """This machine cannot reach vision.stanford.edu: no TFDS retries for minutes, one line
    in seconds, and without importing TensorFlow."""
    import subprocess
    import sys
    import time

    code = (
        "import sys, time\n"
        "from dogbreeds import data\n"
        "from dogbreeds.config import DataConfig\n"
        "started = time.perf_counter()\n"
        "try:\n"
        f"    data.check_source(DataConfig(tfds_dir={str(tmp_path / 'tfds')!r}))\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "print('tensorflow' in sys.modules, round(time.perf_counter() - started, 2))\n"
    )
    started = time.perf_counter()
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert time.perf_counter() - started < 30
    assert lines[0] == (
        f"TFDS stanford_dogs is not in {tmp_path / 'tfds'} and vision.stanford.edu cannot be reached (offline?): "
        "pass --data-dir FOLDER holding images.tar's Images/ (see README)"
    )
    imported, seconds = lines[1].split()
    assert imported == "False" and float(seconds) < 5
    # Prepared: TFDS reads it without a download, so nothing to check online.
    (tmp_path / "tfds" / "stanford_dogs" / "0.2.0").mkdir(parents=True)
    (tmp_path / "tfds" / "stanford_dogs" / "0.2.0" / "dataset_info.json").write_text("{}")
    data.check_source(DataConfig(tfds_dir=str(tmp_path / "tfds")))


def test_bench_pipeline_caches_in_the_users_cache_dir(tmp_path):
    from dogbreeds import bench

    root = _small_folder(tmp_path, per_breed=4)
    config = DataConfig(data_dir=str(root), cache_dir=str(tmp_path / "user_cache"))
    result = bench.bench_pipeline(config, 16)
    assert result["cache_dir"] == str(tmp_path / "user_cache") and result["num_files"] == 12
    everything = data.load_index(config).splits
    split = data.Split([k for s in everything.values() for k in s.keys], np.concatenate([s.labels for s in everything.values()]))
    assert os.listdir(config.cache_dir) == [os.path.basename(data.cache_file(split, 16, config.cache_dir))]


def test_bad_image_sizes_are_one_line_errors_before_tensorflow_runs(tmp_path):
    config = DataConfig(data_dir=str(TINY_DIR), cache_dir=str(tmp_path))
    split = data.load_index(config).splits["validation"]
    for size in (-5, 0, 2000):
        with pytest.raises(ValueError, match=r"^image size must be a whole number of pixels in \[8, 1024\], got "):
            data.load_images(split, size, config)
    with pytest.raises(ValueError, match="image size must be"):
        data.decode_and_resize(b"", -5)


def test_feature_caching_checks_the_weights_before_any_work(tmp_path):
    from dogbreeds.features import cache_features

    config = DataConfig(data_dir=str(TINY_DIR), cache_dir=str(tmp_path / "cache"))
    index = data.load_index(config)
    with pytest.raises(ValueError, match="weights file not found"):
        cache_features(index, "mobilenet_025", str(tmp_path / "nope.h5"), 64, 1, config, str(tmp_path / "features"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "features").exists()
