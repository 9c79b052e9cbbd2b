"""The configuration classes: every field's reason, `--config` files, and ServeArgs' checks."""

import dataclasses
import subprocess
import sys

import pydantic
import pytest

from dogbreeds import config
from dogbreeds.config import DataConfig, ServeArgs, TrainConfig


@pytest.mark.parametrize("cls", [DataConfig, TrainConfig, ServeArgs])
def test_every_field_has_a_reason_above_it(cls):
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(cls.model_fields)
    comments = config.field_comments(cls)
    assert list(comments) == names
    assert all(len(comments[name]) > 10 for name in names), [n for n in names if len(comments[n]) <= 10]
    # Multi-line comments are joined into one line.
    assert config.field_comments(DataConfig)["augmented_views"].startswith("The study's offline augmentation: this many")
    assert "\n" not in "".join(comments.values())


def _sections():
    return {"data": {f.name for f in dataclasses.fields(DataConfig)},
            "train": {f.name for f in dataclasses.fields(TrainConfig)}}


def test_config_file_is_read_by_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  image_size: 32\ntrain:\n  epochs: 2\n")
    assert config.load_config_file(str(path), _sections()) == {"data": {"image_size": 32}, "train": {"epochs": 2}}
    (tmp_path / "empty.yaml").write_text("")
    assert config.load_config_file(str(tmp_path / "empty.yaml"), _sections()) == {}


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochz: 2\n", "run.yaml: unknown key train.epochz; known:"),
    ("serve:\n  port: 2\n", "run.yaml: unknown section 'serve'; known here: ['data', 'train']"),
    ("train: {epochs: 2\n", "run.yaml: YAML syntax error at line 2"),
    ("- epochs\n", "run.yaml: expected sections"),
    ("train: 3\n", "run.yaml: section 'train' must map keys to values"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        config.load_config_file(str(path), _sections())
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--config not found"):
        config.load_config_file(str(tmp_path / "missing.yaml"), _sections())


def test_settings_file_values_are_converted_and_checked_as_options_are(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  image_size: 32.0\n  data_dir: none\ntrain:\n  epochs: 2\n  hparams: {filters_1: 8}\n")
    settings = {"data": config.settable_fields("data"), "train": {**config.settable_fields("train"), "hparams": None}}
    assert config.read_settings_file(str(path), settings) == {"data": {"image_size": 32, "data_dir": None},
                                                               "train": {"epochs": 2, "hparams": {"filters_1": 8}}}
    for text, message in [("train:\n  epochs: 0\n", "run.yaml: train.epochs: must be at least 1, got 0"),
                          ("train:\n  epochs: 2.5\n", "run.yaml: train.epochs: expected int, got 2.5"),
                          ("data:\n  horizontal_flip: maybe\n", "run.yaml: data.horizontal_flip: expected true"),
                          ("data:\n  image_size: 4\n", "run.yaml: data.image_size: image size must be"),
                          ("data:\n  zoom_out: 1.0\n", "run.yaml: data.zoom_out: must be below 1, got 1.0"),
                          ("train:\n  hparams: 3\n", "run.yaml: train.hparams:")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            config.read_settings_file(str(path), settings)


def test_settable_fields_leave_out_mappings_and_required_fields():
    assert "hparams" not in config.settable_fields("train") and "bundle" not in config.settable_fields("serve")
    assert "space" not in config.settable_fields("search")
    setting = config.settable_fields("search")["algorithm"]
    assert setting.default == "random" and setting.help.startswith('"random" (Optuna')
    with pytest.raises(ValueError, match="choose from random, tpe"):
        setting.convert("grid")
    assert config.settable_fields("serve")["allowed_hosts"].convert(["a", "b"]) == ("a", "b")


def test_serve_args_live_in_config_and_keep_their_checks():
    args = ServeArgs(bundle="b")
    assert args.max_batch_size == 32 and args.allowed_hosts == ("127.0.0.1", "localhost", "::1")
    with pytest.raises(pydantic.ValidationError):
        ServeArgs(bundle="b", max_batch_size=0)  # ge=1
    with pytest.raises(pydantic.ValidationError):
        ServeArgs(bundle="b", batch_size=8)  # extra="forbid"
    with pytest.raises(pydantic.ValidationError):
        args.max_batch_size = 4  # frozen
    from dogbreeds import novelty

    assert args.confidence_threshold == config.CONFIDENCE_THRESHOLD == novelty.CONFIDENCE_THRESHOLD


def test_config_and_the_cli_import_no_tensorflow_or_ray():
    code = ("import sys; from dogbreeds import cli; cli.build_parser(); "
            "print(sorted(m for m in ('tensorflow', 'ray', 'tf_keras', 'keras_tuner') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
