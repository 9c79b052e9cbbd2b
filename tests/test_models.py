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


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="weights file not found"):
        models.create_model("mobilenet_025", weights=str(tmp_path / "nope.h5"))
