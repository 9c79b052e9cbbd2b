"""Bundles as untrusted input: each hostile bundle is refused with one line, before any of its
code could run, and export never leaves half a bundle. Real tf_keras models, no Ray."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from dogbreeds import export
from tests.conftest import ROOT, tiny_run_dir

# A Lambda layer whose code, when deserialised, leaves this file behind.
PAYLOAD = "lambda x: (open({marker!r}, 'w').write('ran'), x)[1]"


def _lambda_model(marker: str):
    import tf_keras as keras

    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Lambda(eval(PAYLOAD.format(marker=marker)))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="predictions")(x))


@pytest.fixture
def bundle_dir(tiny_bundle_dir):
    return tiny_bundle_dir


def _info(bundle_dir) -> dict:
    return json.loads((bundle_dir / "bundle.json").read_text())


def _rewrite_info(bundle_dir, **changes):
    """bundle.json as an attacker who can write the bundle would leave it: digests agreeing."""
    info = json.loads((bundle_dir / "bundle.json").read_text())
    info.update(changes)
    info["files"] = {name: export.sha256_of(str(bundle_dir / name)) for name in info["files"]}
    (bundle_dir / "bundle.json").write_text(json.dumps(info))


def test_an_exported_bundle_loads_and_records_its_digests(bundle_dir):
    bundle = export.load_bundle(str(bundle_dir))
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["files"]["model.keras"] == export.sha256_of(str(bundle_dir / "model.keras"))
    assert info["version"] == info["files"]["model.keras"][:12]
    assert bundle.model.output_shape == (None, 2)
    # Nothing but the bundle is left beside it: no temporary or old directories.
    assert sorted(os.listdir(bundle_dir.parent)) == ["bundle", "run"]


def test_a_bundle_flips_at_test_time_as_its_run_was_evaluated(tmp_path):
    """`test_time_flip` in bundle.json's preprocessing (export copies the run's): the bundle's
    answers, with the not-a-dog check's forward pass or without, are the same for a photo and
    its mirror image: the mean of the model's two answers."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))  # tells left from right
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="predictions")(x))
    run = tiny_run_dir(tmp_path / "run", model)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    mirrored = images[:, :, ::-1]
    export.export_bundle(run, str(tmp_path / "plain"))
    plain = export.load_bundle(str(tmp_path / "plain"))
    assert plain.test_time_flip is False
    assert not np.allclose(plain.predict_arrays(images), plain.predict_arrays(mirrored), atol=1e-3)
    shutil.copytree(tmp_path / "plain", tmp_path / "flip")  # as a run with the flip exports it
    _rewrite_info(tmp_path / "flip", preprocessing={**_info(tmp_path / "flip")["preprocessing"], "test_time_flip": True})
    flip = export.load_bundle(str(tmp_path / "flip"))
    assert flip.test_time_flip is True
    np.testing.assert_allclose(flip.predict_arrays(images), flip.predict_arrays(mirrored), atol=1e-6)
    np.testing.assert_allclose(flip.predict_arrays(images),
                               (plain.predict_arrays(images) + plain.predict_arrays(mirrored)) / 2, atol=1e-6)
    probabilities, _ = flip.predict_with_novelty(images)
    np.testing.assert_allclose(probabilities, flip.predict_arrays(mirrored), atol=1e-6)


def test_export_replaces_a_bundle_whole_or_not_at_all(bundle_dir, tmp_path):
    before = (bundle_dir / "bundle.json").read_text()
    broken_run = tmp_path / "broken"
    shutil.copytree(tmp_path / "run", broken_run)
    (broken_run / "model.keras").unlink()  # export fails half-way, after starting to write
    with pytest.raises(FileNotFoundError):
        export.export_bundle(str(broken_run), str(bundle_dir))
    assert (bundle_dir / "bundle.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["broken", "bundle", "run"]
    export.export_bundle(str(tmp_path / "run"), str(bundle_dir), name="again")
    assert json.loads((bundle_dir / "bundle.json").read_text())["name"] == "again"
    assert sorted(os.listdir(tmp_path)) == ["broken", "bundle", "run"]


def test_a_changed_model_file_is_refused_before_loading(bundle_dir):
    with open(bundle_dir / "model.keras", "r+b") as handle:
        handle.seek(-64, os.SEEK_END)
        handle.write(b"tampered")
    with pytest.raises(export.BundleError, match="does not match the sha256"):
        export.load_bundle(str(bundle_dir))


@pytest.mark.parametrize("change, reason", [
    (lambda d: (d / "bundle.json").write_text("{not json"), "not JSON"),
    (lambda d: _rewrite_info(d, format=1), "format 1 is not 2"),
    (lambda d: _rewrite_info(d, class_names="abc"), "class_names"),
    (lambda d: _rewrite_info(d, preprocessing={"chain": "decode|resize(16)|rotate(0.5)", "image_size": 16}),
     "preprocessing"),
    (lambda d: _rewrite_info(d, class_names=["a", "b", "c"]), "gives .* 3 breeds"),
    (lambda d: _rewrite_info(d, preprocessing={**_info(d)["preprocessing"], "test_time_flip": "yes"}), "test_time_flip"),
    (lambda d: (d / "model.keras").unlink(), "missing"),
])
def test_an_inconsistent_bundle_is_a_one_line_error(bundle_dir, change, reason):
    change(bundle_dir)
    with pytest.raises(export.BundleError, match=reason) as error:
        export.load_bundle(str(bundle_dir))
    assert "\n" not in str(error.value) and str(bundle_dir) in str(error.value)


def test_a_hdf5_model_renamed_model_keras_never_runs(bundle_dir, tmp_path):
    """The legacy HDF5 loader deserialises a Lambda's code without safe mode: such a file is
    refused by its format, even with a bundle.json whose digests agree."""
    marker = tmp_path / "lambda-ran"
    _lambda_model(str(marker)).save(tmp_path / "evil.h5")
    assert marker.exists()  # the payload is real: building the model ran it once
    marker.unlink()
    shutil.copy(tmp_path / "evil.h5", bundle_dir / "model.keras")
    _rewrite_info(bundle_dir)
    with pytest.raises(export.BundleError, match="not in the zip .keras format"):
        export.load_bundle(str(bundle_dir))
    assert not marker.exists()


def _with_config(bundle_dir, edit):
    """Rewrite the config.json inside model.keras (digests updated, as an attacker would)."""
    path = bundle_dir / "model.keras"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    _rewrite_info(bundle_dir)


def test_a_keras_archive_naming_code_outside_keras_is_refused(bundle_dir, tmp_path):
    marker = tmp_path / "popen-ran"

    def popen_layer(config):  # tf_keras would import `subprocess` and call Popen(...)
        layer = config["config"]["layers"][1]
        layer.update(module="subprocess", class_name="Popen", registered_name=None)
        layer["config"] = {"args": ["touch", str(marker)]}

    _with_config(bundle_dir, popen_layer)
    with pytest.raises(export.BundleError, match="subprocess.Popen"):
        export.load_bundle(str(bundle_dir))
    assert not marker.exists()


def test_a_keras_archive_with_a_lambda_layer_is_refused(tmp_path):
    marker = tmp_path / "lambda-ran"
    run = tiny_run_dir(tmp_path / "run", _lambda_model(str(marker)))
    marker.unlink()
    export.export_bundle(run, str(tmp_path / "bundle"))
    with pytest.raises(export.BundleError, match="Lambda"):
        export.load_bundle(str(tmp_path / "bundle"))
    assert not marker.exists()


def test_dogbreeds_serve_refuses_a_hostile_bundle_in_one_line(bundle_dir, tmp_path):
    """The attack end to end: `dogbreeds serve` of a bundle whose model.keras is a HDF5 file
    with code in a Lambda exits 1 with one line, before Ray starts, and the code never runs."""
    marker = tmp_path / "lambda-ran"
    _lambda_model(str(marker)).save(tmp_path / "evil.h5")
    marker.unlink()
    shutil.copy(tmp_path / "evil.h5", bundle_dir / "model.keras")
    _rewrite_info(bundle_dir)
    # The Classifier replica loads the bundle; the command checks it first, so try both.
    result = subprocess.run([sys.executable, "-m", "dogbreeds.cli", "serve", str(bundle_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "not in the zip .keras format" in result.stderr
    assert "Started a local Ray" not in result.stdout + result.stderr
    assert not marker.exists()
