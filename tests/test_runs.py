"""The run-directory layout (`dogbreeds.runs`): its writers, the placement-group handshake
between a training run and its search, the file names spelled nowhere else; and the wheel,
which carries the search spaces."""

import csv
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

from dogbreeds import runs
from tests.conftest import ROOT


def _confusions():
    return [{"true_breed": "a", "predicted_breed": "b", "count": 3, "fraction_of_true": 0.3}]


def test_the_final_run_writer_writes_a_training_runs_files(tmp_path):
    saved = tmp_path / "elsewhere.keras"
    saved.write_bytes(b"a model")
    final = tmp_path / "final"
    runs.write_final_run(str(final), model=str(saved), metrics={"model": "cnn1"}, history=[{"epoch": 1}],
                         confusions=_confusions(), config={"train": {"model": "cnn1"}})
    assert sorted(os.listdir(final)) == sorted([runs.CONFIG, *runs.RUN_FILES])
    assert (final / runs.MODEL).read_bytes() == b"a model"
    assert json.loads((final / runs.METRICS).read_text()) == {"model": "cnn1"}
    assert json.loads((final / runs.HISTORY).read_text()) == [{"epoch": 1}]
    with open(final / runs.CONFUSIONS, newline="") as handle:
        assert next(csv.DictReader(handle))["true_breed"] == "a"
    # A training run's checkpoint holds the model already; the driver copies the files over.
    runs.write_final_run(str(final), model=str(final / runs.MODEL), metrics={"model": "cnn1"},
                         history=[], confusions=[])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.copy_run_files(str(final), str(run_dir))
    assert sorted(os.listdir(run_dir)) == sorted(runs.RUN_FILES)


def test_a_model_object_is_saved(tmp_path):
    class Model:
        def save(self, path):
            with open(path, "w") as handle:
                handle.write("saved")

    runs.write_final_run(str(tmp_path), model=Model(), metrics={}, history=[], confusions=[])
    assert (tmp_path / runs.MODEL).read_text() == "saved"


def test_the_placement_group_handshake(tmp_path):
    class Group:  # what `ray.util.get_current_placement_group()` returns, as far as it is read
        class id:
            @staticmethod
            def hex():
                return "ab12"

    assert runs.recorded_placement_group(str(tmp_path)) is None
    runs.record_placement_group(str(tmp_path), Group())
    assert runs.recorded_placement_group(str(tmp_path)) == "ab12"
    assert (tmp_path / runs.RAY / runs.PLACEMENT_GROUP).is_file()


RUN_FILE_NAMES = [runs.CONFIG, runs.MODEL, runs.METRICS, runs.HISTORY, runs.CONFUSIONS, runs.BEST,
                  runs.RESULTS, runs.PIPELINE, runs.REPORT, runs.PLACEMENT_GROUP, runs.HEAD_WEIGHTS,
                  runs.SEARCH_CONFIG, runs.CHECKPOINT_STATE, runs.CHECKPOINT_WEIGHTS]


@pytest.mark.parametrize("module", ["train.py", "search/registry.py", "search/tuning.py", "search/train_trials.py",
                                    "search/final.py", "search/cnn3v2.py", "search/head.py", "search/fine_tune.py",
                                    "spaces.py", "report/run.py", "report/page.py", "report/photos.py"])
def test_run_file_names_are_spelled_only_in_runs(module):
    text = (ROOT / "dogbreeds" / module).read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    code = re.sub(r'""".*?"""', "", code, flags=re.S)  # docstrings may name the files
    found = [name for name in RUN_FILE_NAMES if f'"{name}"' in code or f"'{name}'" in code]
    assert not found, f"{module} spells {found}: use dogbreeds.runs"


def test_the_setuptools_packages_are_every_package():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        os.path.relpath(directory, ROOT).replace(os.sep, ".")
        for directory, _, names in os.walk(ROOT / "dogbreeds") if "__init__.py" in names
    }
    assert set(settings["packages"]) == found | {"dogbreeds.search_spaces"}
    assert settings["package-dir"]["dogbreeds.search_spaces"] == "search_spaces"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree (building leaves build/ behind)."""
    import shutil

    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dogbreeds", "search_spaces"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (path,) = out.glob("dogbreeds-*.whl")
    return path


def test_the_wheel_carries_the_search_spaces(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    spaces = sorted(name for name in names if name.endswith(".yaml"))
    shipped = sorted(f"dogbreeds/search_spaces/{p.name}" for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert spaces == shipped and shipped
    assert "dogbreeds/runs.py" in names and "dogbreeds/report/page.py" in names


def test_an_installed_copy_reads_its_search_spaces(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    script = (
        "import dogbreeds, dogbreeds.search as s, dogbreeds.spaces as sp; "
        "print(dogbreeds.__file__); print(sp.resolve_space_path('cnn3v2')[0]); "
        "print(s.check_space('cnn3v2').model, sp.known_spaces())"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    package, space_file, loaded = result.stdout.splitlines()
    assert package.startswith(str(target))
    assert space_file == str(target / "dogbreeds" / "search_spaces" / "cnn3v2.yaml")
    assert loaded == "cnn3v2 ['cnn3v2', 'fine_tune', 'transfer_head']"
