"""Every registered model builds, predicts probabilities, and matches the study's sizes."""

import numpy as np
import pytest
import tf_keras as keras

from dogbreeds import models
from tests.conftest import MOBILENET_WEIGHTS

# The study's parameter counts at 299x299x3 with 120 classes: (total, trainable).
STUDY_PARAMETERS = {
    "cnn1": (89_735_288, 89_735_288),
    "cnn3": (82_700_600, 82_700_600),
    "cnn3v2": (47_720, 47_496),
    "xception": (21_107_360, 245_880),
    "resnet50v2": (23_810_680, 245_880),
}


def _trainable(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_predicts_probabilities(name):
    # 75 is the smallest size every backbone accepts (Xception needs 71).
    model = models.create_model(name, num_classes=120, image_size=75, weights=None)
    images = np.random.default_rng(0).uniform(0, 255, (2, 75, 75, 3)).astype("float32")
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (2, 120)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(STUDY_PARAMETERS))
def test_parameter_counts_match_the_study(name):
    model = models.create_model(name, num_classes=120, image_size=299, weights=None)
    assert (model.count_params(), _trainable(model)) == STUDY_PARAMETERS[name]


def test_cnn3v2_best_configuration_of_the_study():
    hparams = {"filters_1": 64, "filters_2": 64, "filters_3": 64}
    model = models.create_model("cnn3v2", 120, 299, hparams=hparams)
    assert (model.count_params(), _trainable(model)) == (100_024, 99_640)


def test_cnn3v2_dropouts_are_hyperparameters():
    def dropouts(**hparams):
        model = models.create_model("cnn3v2", 6, 64, hparams=hparams)
        return sum(isinstance(layer, keras.layers.Dropout) for layer in model.layers)

    assert dropouts() == 2
    assert dropouts(dropout_1=False) == 1
    assert dropouts(dropout_1=False, dropout_2=False) == 0


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known models: cnn1, cnn3, cnn3v2"):
        models.create_model("vgg16")
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        models.create_model("cnn3v2", hparams={"filters_9": 3})
    assert models.list_models("cnn*") == ["cnn1", "cnn3", "cnn3v2"]


@pytest.mark.parametrize("name", models.list_models())
def test_scaling_is_the_backbones_own_preprocess_input(name):
    """Each model scales raw pixels itself; transfer models exactly as their backbone's
    `preprocess_input` does (the study's ResNet50V2 failed for lack of it)."""
    spec = models.get_model_spec(name)
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    scaled = models.build_scaling(spec.scaling)(pixels).numpy()
    if spec.backbone:
        module = {"Xception": "xception", "ResNet50V2": "resnet_v2", "MobileNet": "mobilenet"}
        preprocess = getattr(keras.applications, module[spec.backbone]).preprocess_input
        expected = preprocess(pixels.copy())
    else:
        expected = pixels / 255.0
    np.testing.assert_allclose(scaled, expected, atol=1e-6)


def test_local_imagenet_weights_load_and_are_frozen():
    pretrained = models.build_backbone("mobilenet_025", 128, str(MOBILENET_WEIGHTS))
    random = models.build_backbone("mobilenet_025", 128, None)
    assert _trainable(pretrained) == 0
    reference = keras.applications.MobileNet(
        alpha=0.25, include_top=False, weights=str(MOBILENET_WEIGHTS), input_shape=(128, 128, 3)
    )
    np.testing.assert_array_equal(pretrained.get_weights()[0], reference.get_weights()[0])
    assert not np.array_equal(pretrained.get_weights()[0], random.get_weights()[0])


def test_fine_tuning_unfreezes_the_top_of_the_backbone_but_not_batch_norm():
    """unfreeze_top: the top fraction of the backbone's layers train, BatchNorm never does and
    stays in inference mode (a training=True call gives the same output when dropout is off)."""
    model = models.create_model("mobilenet_025", 6, 64, str(MOBILENET_WEIGHTS), {"dropout_rate": 0.0})
    frozen = len(model.trainable_weights)
    assert frozen == 2 and models.unfreeze_top(model, 0.0) == 0  # the head's kernel and bias
    (network,) = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "head"]
    layers = [layer for layer in network.layers if layer.weights]
    trained = models.unfreeze_top(model, 0.5)
    top, bottom = layers[len(layers) // 2 + 1:], layers[:len(layers) // 2 - 1]
    assert trained > 0 and not any(layer.trainable for layer in bottom)
    assert all(layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in top)
    assert trained == sum(layer.trainable for layer in layers)
    assert len(model.trainable_weights) == frozen + sum(len(layer.weights) for layer in layers if layer.trainable)
    assert models.unfreeze_top(model, 1.0) == sum(not isinstance(layer, keras.layers.BatchNormalization) for layer in layers)
    images = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(model(images, training=True).numpy(), model(images, training=False).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="between 0 and 1|in \\[0, 1\\]"):
        models.unfreeze_top(model, 1.5)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="weights file not found"):
        models.create_model("mobilenet_025", weights=str(tmp_path / "nope.h5"))


@pytest.mark.parametrize("size", [-5, 0, 7, 1025, 1.5, "64", True, None])
def test_image_sizes_out_of_range_are_one_line_errors(size):
    with pytest.raises(ValueError, match=r"^image size must be a whole number of pixels in \[8, 1024\], got "):
        models.check_image_size(size)


def test_image_size_is_resolved_and_checked_in_one_place():
    assert models.check_image_size(64) == 64
    assert models.resolve_input("cnn3v2").image_size == 299
    assert models.resolve_input("mobilenet_025", 96).chain == "decode|resize(96)"
    with pytest.raises(ValueError, match="image size must be"):
        models.resolve_input("cnn3v2", -5)


def test_weights_files_are_checked_before_anything_builds(tmp_path):
    with pytest.raises(ValueError, match=r"^weights file not found: .*nope\.h5"):
        models.check_weights("mobilenet_025", str(tmp_path / "nope.h5"))
    (tmp_path / "notes.h5").write_text("not weights")
    with pytest.raises(ValueError, match=r"^weights file .*notes\.h5 is not an HDF5 file"):
        models.check_weights("xception", str(tmp_path / "notes.h5"))
    with pytest.raises(ValueError, match="is a folder, not a Keras .h5 file"):
        models.check_weights("resnet50v2", str(tmp_path))
    models.check_weights("mobilenet_025", str(MOBILENET_WEIGHTS))
    models.check_weights("mobilenet_025", None)
    models.check_weights("mobilenet_025", "none")
    models.check_weights("cnn3v2", str(tmp_path / "nope.h5"))  # no backbone: weights are ignored
    with pytest.raises(ValueError, match="is not an HDF5 file"):  # build_backbone says the same
        models.build_backbone("mobilenet_025", 128, str(tmp_path / "notes.h5"))


def test_imagenet_weights_offline_are_a_clear_error_in_seconds(tmp_path, monkeypatch):
    """This machine cannot reach storage.googleapis.com and its Keras cache is empty."""
    import time

    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.keras
    (tmp_path / ".keras").mkdir()
    expected = (f"ImageNet weights for xception are not cached in {tmp_path / '.keras' / 'models'} and "
                "storage.googleapis.com cannot be reached: pass --weights FILE.h5 or --weights none")
    started = time.perf_counter()
    with pytest.raises(ValueError) as raised:
        models.check_weights("xception", "imagenet")
    assert str(raised.value) == expected
    with pytest.raises(ValueError) as raised:  # also where the search's head stage builds it
        models.build_backbone("xception", 75, "imagenet")
    assert str(raised.value) == expected
    assert time.perf_counter() - started < 15
    models.check_weights("cnn3v2", "imagenet")  # no backbone: nothing to download


def test_imagenet_weights_in_keras_cache_are_found_under_keras_own_file_name(tmp_path, monkeypatch):
    """With the shared MobileNet file in ~/.keras/models under the name we expect, Keras itself
    loads `weights="imagenet"` offline: the names agree."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / ".keras" / "models"
    cache.mkdir(parents=True)
    assert models.imagenet_weights_path("mobilenet_025", 224) == str(cache / MOBILENET_WEIGHTS.name)
    assert models.imagenet_weights_path("mobilenet_025", 96) == str(cache / MOBILENET_WEIGHTS.name)  # Keras loads 224's
    assert models.imagenet_weights_path("mobilenet_025", 128) == str(cache / "mobilenet_2_5_128_tf_no_top.h5")
    assert models.imagenet_weights_path("xception") == str(cache / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5")
    assert models.imagenet_weights_path("resnet50v2") == str(cache / "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5")
    (cache / MOBILENET_WEIGHTS.name).symlink_to(MOBILENET_WEIGHTS)
    models.check_weights("mobilenet_025", "imagenet", 224)
    backbone = models.build_backbone("mobilenet_025", 224, "imagenet")
    reference = models.build_backbone("mobilenet_025", 224, str(MOBILENET_WEIGHTS))
    np.testing.assert_array_equal(backbone.get_weights()[0], reference.get_weights()[0])


def test_the_checks_read_no_tensorflow():
    import subprocess
    import sys

    code = ("import sys\nfrom dogbreeds import models\n"
            f"models.check_weights('mobilenet_025', {str(MOBILENET_WEIGHTS)!r})\nmodels.check_image_size(64)\n"
            "print(sorted(m for m in ('tensorflow', 'tf_keras') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
