"""Every CLI command: help, options derived from the configuration classes, one-line errors
before Ray starts, Ctrl-C, and the fast commands for real."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

import dogbreeds
from dogbreeds import cli, commands, models, options
from dogbreeds.config import DataConfig, ServeArgs, TrainConfig
from dogbreeds.config import SearchConfig
from tests.conftest import ROOT, SAMPLE_DIR, TINY_DIR


def _run(*argv, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dogbreeds", *argv], capture_output=True, text=True, timeout=300,
        env=env, cwd=cwd,
    )


def _our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dogbreeds")]


def _commands(parser=None, prefix=()):
    """Every (sub)command of the CLI, found from the parser itself."""
    parser = parser or options.build_parser()
    found = [prefix]
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, child in action.choices.items():
            found += _commands(child, prefix + (name,))
    return found


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "dogbreeds")
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: dogbreeds" in capsys.readouterr().out


def test_bad_options_and_paths_are_one_line_errors():
    for argv, message in [
        (["train", "cnn3v2", "--epochs", "many", "--output", "x"], "invalid int value"),
        (["train", "cnn3v2"], "required: --output"),
        (["data", "--data-dir", "/no/such/folder"], "--data-dir not found"),
        (["train", "resnet9", "--output", "x"], "unknown model 'resnet9'"),
    ]:
        result = _run(*argv)
        lines = [line for line in result.stderr.splitlines() if line.startswith("dogbreeds")]
        assert result.returncode != 0 and "Traceback" not in result.stderr, argv
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_models_lists_the_registry(capsys):
    assert cli.main(["models"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == models.list_models()


def test_data_summarises_the_sample(capsys, cache_dir):
    assert cli.main(["data", "--data-dir", str(SAMPLE_DIR), "--json", "--cache-dir", cache_dir]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_classes"] == 120 and summary["num_images"] == 301
    assert summary["skipped"] == []
    assert sum(summary["images_per_class"].values()) == 301


def test_bench_pipeline_prints_and_writes_json(tmp_path, capsys, cache_dir):
    output = tmp_path / "bench"  # --output is a directory for every command
    argv = ["bench", "pipeline", "--data-dir", str(SAMPLE_DIR), "--image-size", "96", "--output", str(output),
            "--cache-dir", cache_dir]
    assert cli.main(argv) == 0
    result = json.loads((output / "bench_pipeline.json").read_text())
    assert result["cache_dir"] == cache_dir  # --cache-dir is honoured
    assert result["num_files"] > 100 and result["skipped"] == 0
    for key in ("bare_pil_loop_images_per_s", "pipeline_decode_images_per_s", "pipeline_cached_load_images_per_s",
                "augmented_epoch_from_cache_images_per_s", "unaugmented_epoch_from_cache_images_per_s"):
        assert result[key] > 0
    augmented, plain = result["augmented_epoch_from_cache_images_per_s"], result["unaugmented_epoch_from_cache_images_per_s"]
    assert result["augmented_share_of_unaugmented"] == pytest.approx(augmented / plain, abs=1e-3)
    assert '"benchmark": "pipeline"' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Options derived from the configuration classes.


def _parse(*argv):
    args = options.build_parser().parse_args(list(argv))
    args._file = {}
    return args


@pytest.mark.parametrize("section, cls, command, left_out", [
    ("data", DataConfig, ["train", "cnn3v2", "--output", "x"], set()),
    ("train", TrainConfig, ["train", "cnn3v2", "--output", "x"], {"model", "hparams"}),  # positional; --config only
    ("search", SearchConfig, ["search", "cnn3v2", "--output", "x"], {"space"}),  # --space: its kind's default
    ("serve", ServeArgs, ["serve", "b"], {"bundle"}),  # positional
])
def test_every_field_is_an_option_with_its_reason_and_default(section, cls, command, left_out, capsys):
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(cls.model_fields)
    args = _parse(*command)
    offered = args._fields[section]
    assert set(names) - set(offered) == left_out
    with pytest.raises(SystemExit):
        cli.main([*command[:-2 if command[0] != "serve" else -1], "--help"])
    page = " ".join(capsys.readouterr().out.split())
    for name, field in offered.items():
        if name in args._shared.get(section, {}):
            continue  # `--seed` sets DataConfig's and TrainConfig's, and shows the first's help
        assert f"--{name.replace('_', '-')}" in page
        assert field.help and " ".join(field.help.split()) in page, name  # the comment above the field
        assert f"(default: {'none' if field.default is None else field.default})" in page


def test_fields_no_command_line_could_set_are_options():
    args = _parse("train", "cnn3v2", "--output", "x", "--validation-fraction", "0.2", "--rotation-factor", "0",
                  "--no-horizontal-flip", "--early-stopping-patience", "3", "--label-smoothing", "0.1",
                  "--max-failures", "0", "--weights", "none")
    assert commands._data_config(args) == DataConfig(validation_fraction=0.2, rotation_factor=0.0, horizontal_flip=False)
    assert commands._train_config(args, model="cnn3v2") == TrainConfig(
        early_stopping_patience=3, label_smoothing=0.1, max_failures=0, weights=None)
    search = _parse("search", "cnn3v2", "--output", "x", "--max-trial-failures", "0", "--no-retrain")
    assert commands._search_config(search) == SearchConfig(space="cnn3v2", max_trial_failures=0, retrain_best=False)


def test_known_flag_names_stay_as_aliases():
    train = _parse("train", "cnn3v2", "--output", "x", "--batch-size", "8", "--seed", "3")
    assert commands._train_config(train, model="cnn3v2").per_worker_batch_size == 8
    assert commands._train_config(train).seed == commands._data_config(train).seed == 3  # one --seed, both fields
    head = _parse("search", "head", "--backbone", "mobilenet_025", "--output", "x", "--views", "3")
    assert commands._data_config(head).augmented_views == 3  # --views is --augmented-views
    assert commands._data_config(_parse("search", "head", "--backbone", "mobilenet_025", "--output", "x")).augmented_views == 2
    serve = _parse("serve", "b", "--replicas", "2", "--cpus-per-replica", "0.5", "--max-upload-mb", "1",
                   "--examples", "e", "--allowed-hosts", "a", "b")
    assert options.settings(serve, "serve") == {"num_replicas": 2, "num_cpus_per_replica": 0.5, "max_upload_bytes": 1024 * 1024,
                                            "examples_dir": "e", "allowed_hosts": ("a", "b")}


@pytest.mark.parametrize("argv, message", [
    (["search", "head", "--backbone", "mobilenet_025", "--workers", "2", "--output", "x"], "unrecognized arguments: --workers"),
    (["search", "head", "--backbone", "mobilenet_025", "--no-retrain", "--output", "x"], "unrecognized arguments: --no-retrain"),
    (["train", "cnn3v2", "--image-size", "0", "--output", "x"], "image size must be"),
    (["train", "cnn3v2", "--epochs", "0", "--output", "x"], "must be at least 1"),
    (["search", "cnn3v2", "--algorithm", "grid", "--output", "x"], "choose from random, tpe"),
])
def test_flags_that_would_be_ignored_or_wrong_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_config_file_sets_fields_and_the_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  image_size: 32\n  rotation_factor: 0.0\ntrain:\n  epochs: 2\n  label_smoothing: 0.1\n"
                    "  hparams: {filters_1: 8}\n")
    args = options.build_parser().parse_args(["train", "cnn3v2", "--output", "x", "--config", str(path), "--epochs", "4"])
    options.read_config_file(args)
    assert commands._data_config(args) == DataConfig(image_size=32, rotation_factor=0.0)
    assert commands._train_config(args, model="cnn3v2") == TrainConfig(epochs=4, label_smoothing=0.1, hparams={"filters_1": 8})


def test_pipeline_applies_image_size_and_options_to_every_search():
    from dogbreeds import pipeline

    default = pipeline.resolve_stages("quick")
    assert list(default) == list(pipeline.STAGES)
    assert [stage[0].image_size for stage in default.values()] == [64, 128, 128]  # fine-tuning: the head's
    assert default["head"][0].augmented_views == 2  # the profile's views, in DataConfig
    assert default["fine_tune"][0].augmented_views == 0  # a new view every epoch
    assert default["fine_tune"][1].model == default["head"][1].model == "mobilenet_025"
    given = pipeline.resolve_stages("quick", data={"image_size": 96}, search={"trials": 1})
    assert [stage[0].image_size for stage in given.values()] == [96, 96, 96]
    assert [stage[2].trials for stage in given.values()] == [1, 1, 1]
    # Fine-tuning's own data values in a profile (the cpu profile's zoom-out) over the head's,
    # the caller's over both.
    cpu, profile = pipeline.resolve_stages("cpu"), pipeline.PROFILES["cpu"]
    assert [cpu[stage][0].zoom_out for stage in pipeline.STAGES] == [profile[stage][0]["zoom_out"] for stage in pipeline.STAGES]
    assert cpu["fine_tune"][0].zoom_out != cpu["head"][0].zoom_out
    given = pipeline.resolve_stages("cpu", data={"zoom_out": 0.2})
    assert [stage[0].zoom_out for stage in given.values()] == [0.2, 0.2, 0.2]
    given = pipeline.resolve_stages("cpu", data={"zoom_out": 0.2}, stages={"fine_tune": {"data": {"zoom_out": 0.3}}})
    assert [stage[0].zoom_out for stage in given.values()] == [0.2, 0.2, 0.3]


def test_pipeline_options_set_every_search_and_set_one():
    """`--trials` sets both searches', `--set STAGE.FIELD=VALUE` one search's (over it), `--backbone`
    the head search's model; a value is read as YAML and checked as its option's."""
    from dogbreeds import pipeline

    args = options.build_parser().parse_args([
        "pipeline", "--output", "x", "--trials", "3", "--set", "head.trials=6", "--set", "cnn3v2.image-size=32",
        "--set", "head.horizontal_flip=false", "--set", "cnn3v2.seed=7", "--backbone", "xception",
    ])
    stages = commands.stage_settings(args)
    resolved = pipeline.resolve_stages("quick", search=options.settings(args, "search"), stages=stages)
    (cnn3v2_data, cnn3v2_train, cnn3v2_search), (head_data, head_train, head_search) = list(resolved.values())[:2]
    assert (cnn3v2_search.trials, head_search.trials) == (3, 6)
    assert (cnn3v2_data.image_size, head_data.image_size) == (32, 128)
    assert head_data.horizontal_flip is False and cnn3v2_data.horizontal_flip is True
    assert (cnn3v2_data.seed, cnn3v2_train.seed, head_data.seed) == (7, 7, 0)  # --seed's two fields
    assert (cnn3v2_train.model, head_train.model) == ("cnn3v2", "xception")
    # Fine-tuning reads the head search's photos and split: the same validation photos.
    assert resolved["fine_tune"][0] == dataclasses.replace(head_data, augmented_views=0)
    for bad in ("head.trials", "tail.trials=1", "head.image_size=many"):
        with pytest.raises(ValueError, match="--set"):
            commands.stage_settings(options.build_parser().parse_args(["pipeline", "--output", "x", "--set", bad]))


def test_pipeline_compares_each_backbones_frozen_head():
    """The full profile also searches a head on ResNet50V2 (`head_resnet50v2`), with the head
    stage's settings; `--compare-backbones` names others, '' none; the head's own is not twice."""
    from dogbreeds import pipeline

    full = pipeline.resolve_stages("full", stages={"head": {"search": {"trials": 5}}})
    assert list(full) == [*pipeline.STAGES, "head_resnet50v2"]
    data, train, search = full["head_resnet50v2"]
    assert train.model == "resnet50v2" and train.epochs == full["head"][1].epochs
    assert data == full["head"][0] and search.trials == 5
    assert list(pipeline.resolve_stages("quick")) == list(pipeline.STAGES)
    for text, expected in (("", []), ("mobilenet_025,xception", ["head_xception"])):
        args = options.build_parser().parse_args(["pipeline", "--output", "x", "--compare-backbones", text])
        resolved = pipeline.resolve_stages("quick", compare_backbones=args.compare_backbones)
        assert list(resolved) == [*pipeline.STAGES, *expected]


def test_pipeline_writes_its_resolved_settings_first(tmp_path, monkeypatch):
    from dogbreeds import pipeline

    def fail(*args, **kwargs):
        raise RuntimeError("stop")

    monkeypatch.setattr(pipeline, "search_cnn3v2", fail)
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline("quick", str(tmp_path), data={"image_size": 48}, train={"epochs": 1})
    settings = json.loads((tmp_path / "pipeline.json").read_text())["settings"]
    assert settings["profile"] == "quick" and settings["overrides"]["data"] == {"image_size": 48}
    assert settings["stages"]["head"]["data"]["image_size"] == 48
    assert settings["stages"]["head"]["train"]["model"] == "mobilenet_025"
    assert settings["stages"]["cnn3v2"]["search"]["space"] == "cnn3v2"
    assert settings["ladder"] == []  # off by default in the quick profile, on in the full one
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline("full", str(tmp_path / "full"))
    assert json.loads((tmp_path / "full" / "pipeline.json").read_text())["settings"]["ladder"] == list(pipeline.LADDER)


# ---------------------------------------------------------------------------------------------
# One line on stderr, before Ray starts.

def _without_ray(tmp_path):
    """An environment where a Ray this command started would leave its session in tmp_path/ray
    (RAY_TMPDIR), and no cluster to attach to: the directory tells whether Ray started."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": str(tmp_path / "ray")}


def _space(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def _error_cases(tmp_path):
    hp = "hyperparameters:\n  filters_1: {type: Int, min_value: 8, max_value: 16}\n"
    empty = tmp_path / "empty" / "Images" / "n0-breed"
    empty.mkdir(parents=True)
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("train:\n  epochz: 3\n")
    bad_section = tmp_path / "section.yaml"
    bad_section.write_text("trian:\n  epochs: 3\n")
    not_a_bundle = tmp_path / "not_a_bundle"
    not_a_bundle.mkdir()
    search = ["search", "cnn3v2", "--data-dir", str(TINY_DIR), "--output", str(tmp_path / "out"), "--space"]
    return {
        "yaml syntax": ([*search, _space(tmp_path, "syntax", "search: cnn3v2\nhyperparameters:\n  a: {type: Int\n")], "syntax.yaml"),
        "unknown key": ([*search, _space(tmp_path, "minimum", "search: cnn3v2\nmodel: cnn3v2\nhyperparameters:\n"
                                         "  filters_1: {type: Int, minimum: 8, max_value: 16}\n")], "minimum"),
        "no type": ([*search, _space(tmp_path, "notype", "search: cnn3v2\nmodel: cnn3v2\nhyperparameters:\n"
                                     "  filters_1: {min_value: 8, max_value: 16}\n")], "type"),
        "no hyperparameters": ([*search, _space(tmp_path, "nohp", "search: cnn3v2\nmodel: cnn3v2\n")], "hyperparameters"),
        "misspelled name": ([*search, _space(tmp_path, "typo", "search: cnn3v2\nmodel: cnn3v2\n" + hp.replace("filters_1", "filterz_1"))], "filterz_1"),
        "wrong kind": ([*search, "transfer_head"], "transfer_head"),
        "negative size": (["data", "--data-dir", str(TINY_DIR), "--image-size", "-5"], "image size must be"),
        "empty data folder": (["train", "cnn3v2", "--data-dir", str(tmp_path / "empty"), "--output", str(tmp_path / "out")], "no images"),
        "missing weights": (["train", "mobilenet_025", "--data-dir", str(TINY_DIR), "--weights", str(tmp_path / "w.h5"),
                             "--output", str(tmp_path / "out")], "weights file not found"),
        "config key": (["train", "cnn3v2", "--config", str(bad_config), "--output", str(tmp_path / "out")], "train.epochz"),
        "config section": (["train", "cnn3v2", "--config", str(bad_section), "--output", str(tmp_path / "out")], "trian"),
        "config syntax": (["train", "cnn3v2", "--config", _space(tmp_path, "cfg", "train: {epochs: 3\n"), "--output", "x"], "cfg.yaml"),
        "set field": (["pipeline", "--set", "head.trails=6", "--output", str(tmp_path / "out")], "unknown field 'trails'"),
        "set value": (["pipeline", "--set", "cnn3v2.trials=0", "--output", str(tmp_path / "out")], "at least 1"),
        "compared backbone": (["pipeline", "--compare-backbones", "cnn3", "--data-dir", str(TINY_DIR), "--weights", "none",
                               "--output", str(tmp_path / "out")], "cnn3 is not a transfer model"),
        "missing bundle": (["bench", "serve", str(tmp_path / "no_bundle"), "--data-dir", str(TINY_DIR)], "bundle not found"),
        "not a bundle": (["bench", "serve", str(not_a_bundle), "--data-dir", str(TINY_DIR)], "bundle"),
    }


@pytest.mark.parametrize("case", ["yaml syntax", "unknown key", "no type", "no hyperparameters", "misspelled name",
                                  "wrong kind", "negative size", "empty data folder", "missing weights", "config key",
                                  "config section", "config syntax", "set field", "set value", "compared backbone", "missing bundle",
                                  "not a bundle"])
def test_bad_inputs_are_one_line_before_ray_starts(case, tmp_path):
    argv, message = _error_cases(tmp_path)[case]
    start = time.monotonic()
    result = _run(*argv, env=_without_ray(tmp_path))
    print(f"{case}: {time.monotonic() - start:.1f} s: {result.stderr.strip()}")
    lines = _our_lines(result.stderr)
    assert result.returncode not in (0, 130) and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "ray").exists(), "Ray started"
    assert not (tmp_path / "out").exists()  # nothing created for a run that cannot start


def test_offline_downloads_fail_before_ray_starts(tmp_path):
    """No --data-dir (TFDS) and --weights imagenet, on a machine that cannot reach either host."""
    from dogbreeds import data

    if models.host_reachable(models.WEIGHTS_HOST, models.WEIGHTS_PORT) or models.host_reachable(data.TFDS_HOST, data.TFDS_PORT):
        pytest.skip("online: the downloads would work")
    env = {**_without_ray(tmp_path), "HOME": str(tmp_path)}  # no cached ImageNet weights
    for argv, message in [
        (["train", "cnn3v2", "--tfds-dir", str(tmp_path / "tfds"), "--output", str(tmp_path / "out")], "TFDS"),
        (["train", "mobilenet_025", "--data-dir", str(TINY_DIR), "--output", str(tmp_path / "out")], "ImageNet weights"),
        # The head stage's weights, checked before the cnn3v2 search runs.
        (["pipeline", "--data-dir", str(TINY_DIR), "--output", str(tmp_path / "out")], "ImageNet weights"),
    ]:
        result = _run(*argv, env=env)
        lines = _our_lines(result.stderr)
        assert result.returncode == 1 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
        assert message in lines[0] and not (tmp_path / "ray").exists() and not (tmp_path / "out").exists()


def test_any_other_error_is_one_line_and_verbose_shows_its_traceback(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise KeyError()

    monkeypatch.setitem(commands.COMMANDS, "models", broken)
    assert cli.main(["models"]) == 1
    assert capsys.readouterr().err == "dogbreeds models: error: KeyError\n"  # the type when no message
    assert cli.main(["models", "--verbose"]) == 1
    error = capsys.readouterr().err
    assert "Traceback" in error and error.splitlines()[-1] == "dogbreeds models: error: KeyError"


# ---------------------------------------------------------------------------------------------
# Habits: python -m, --version, speed, quiet TensorFlow, Ctrl-C.


def test_version_and_python_m():
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dogbreeds {dogbreeds.__version__}"


def test_models_answers_in_under_a_second():
    import resource

    _run("--version")  # warm the file cache, as a second call would be
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = _run("models")
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"`python -m dogbreeds models`: {seconds:.2f} s wall, {cpu:.2f} s CPU")
    assert result.returncode == 0 and "cnn3v2" in result.stdout
    # Its CPU time is what it costs (0.2 s here; importing TensorFlow alone takes 3 s); the wall
    # time (0.2 s on an idle machine) only has to stay sane on a busy CI runner.
    assert cpu < 1.0 and seconds < 10


NOISE = ("cuda", "cuInit", "oneDNN", "absl::InitializeLog")


def test_tensorflows_start_up_noise_is_silenced_unless_verbose(tmp_path):
    import shutil

    for breed in sorted((TINY_DIR / "Images").iterdir())[:2]:  # a few photos: TensorFlow decodes them
        (tmp_path / "data" / "Images" / breed.name).mkdir(parents=True)
        for photo in sorted(breed.iterdir())[:5]:
            shutil.copy(photo, tmp_path / "data" / "Images" / breed.name)
    argv = ["data", "--data-dir", str(tmp_path / "data"), "--image-size", "32"]
    quiet = _run(*argv, "--cache-dir", str(tmp_path / "a"))  # a fresh cache: TensorFlow decodes
    assert quiet.returncode == 0 and not [line for line in quiet.stderr.splitlines() if any(n in line for n in NOISE)], quiet.stderr
    verbose = _run(*argv, "--cache-dir", str(tmp_path / "b"), "--verbose")
    assert verbose.returncode == 0 and any(n in verbose.stderr for n in NOISE)  # there is noise to silence


@pytest.mark.slow
@pytest.mark.long  # over a minute: the second tier
def test_a_search_prints_its_trials_and_epochs_and_verbose_adds_rays_own_logs(tmp_path, cache_dir):
    """By default a search tells of each trial (its values, progress and end) and of each epoch
    of its final run, without Ray Train's per-epoch reports and checkpoint paths or Tune's
    tables; --verbose shows those as well."""
    import shutil

    for breed in sorted((TINY_DIR / "Images").iterdir()):
        (tmp_path / "data" / "Images" / breed.name).mkdir(parents=True)
        for photo in sorted(breed.iterdir())[:20]:
            shutil.copy(photo, tmp_path / "data" / "Images" / breed.name)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # its own Ray
    argv = ["search", "cnn3v2", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--epochs", "2",
            "--concurrent-trials", "2", "--cache-dir", cache_dir]
    rays_own = ("TrainingReport(", "Checkpoint successfully created", "Trial status", "Trial name")

    quiet = _run(*argv, "--trials", "2", "--output", str(tmp_path / "quiet"), env=env, cwd=ROOT)
    output = quiet.stdout + quiet.stderr
    assert quiet.returncode == 0, output[-3000:]
    assert not [line for line in output.splitlines() if any(text in line for text in rays_own)], output
    assert len(re.findall(r"^quiet trial \w+ started: dropout_1 ", output, re.M)) == 2, output
    assert len(re.findall(r"^quiet trial \w+ ended: best val_accuracy [0-9.]+ at epoch [12]$", output, re.M)) == 2, output
    assert re.search(r"^quiet/final: epoch 2/2: loss [0-9.]+, accuracy [0-9.]+, val_loss", output, re.M), output
    assert len(output.splitlines()) <= 30, output

    # One trial is enough for Ray Train's reports and Tune's tables to show.
    verbose = _run(*argv, "--trials", "1", "--output", str(tmp_path / "verbose"), "--verbose", env=env, cwd=ROOT)
    output = verbose.stdout + verbose.stderr
    assert verbose.returncode == 0, output[-3000:]
    assert all(text in output for text in rays_own), output[-5000:]


def _name(process) -> str:
    """A process's name, or "" once it has ended (Ray's short-lived helpers come and go)."""
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.slow
@pytest.mark.long  # over a minute: the second tier
def test_ctrl_c_ends_a_training_run_cleanly(tmp_path, cache_dir):
    output = tmp_path / "run"
    argv = [sys.executable, "-m", "dogbreeds", "train", "cnn3v2", "--data-dir", str(TINY_DIR), "--image-size", "32",
            "--epochs", "50", "--output", str(output), "--cache-dir", cache_dir]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # its own Ray
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT, start_new_session=True)
    try:
        deadline, raylets = time.time() + 240, []
        while time.time() < deadline and driver.poll() is None:
            raylets = [p for p in psutil.Process(driver.pid).children(recursive=True) if _name(p) == "raylet"]
            if raylets and list((output / "ray" / "train").glob("checkpoint_*")):
                break  # Ray is up and the run has started
            time.sleep(0.5)
        assert raylets and driver.poll() is None, "the run should be under way"
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    lines = _our_lines(stderr)
    assert driver.returncode == 130, stderr[-3000:]
    assert lines == ["dogbreeds train: interrupted; `--resume` continues it"], stderr[-3000:]
    # Our own lines carry no traceback (Ray's actors' forwarded lines start with their name).
    assert not [line for line in stderr.splitlines() if "Traceback" in line and "pid=" not in line], stderr[-3000:]

    def running(process):
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 2  # the raylet may take a moment to go after the driver
    while time.time() < deadline and any(running(p) for p in raylets):
        time.sleep(0.2)
    assert not any(running(p) for p in raylets), "raylet left running"
