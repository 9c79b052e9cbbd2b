"""Every command in the README runs, as written, in order (output folders moved under one
temporary `runs/` for the session; the runs other tests check too, README_RUN_FIXTURES in
tests/conftest.py, run once, whichever test asks first), and every `tensorboard --logdir` it
shows serves what the run wrote."""

import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import (
    README_RUN_FIXTURES, README_SETUP as SETUP, ROOT, free_port, readme_commands, run_readme_command,
)

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def runs(readme_runs):
    """The README's `runs/`, shared by its commands as it is for a reader (the session's: its
    mobilenet run is the one the serving tests export)."""
    return readme_runs


def test_the_quick_start_has_two_commands_and_ci_runs_the_second():
    first, second = [block.strip() for block in BLOCKS[:2]]
    assert first.startswith(SETUP) and second.startswith(SETUP)
    assert second in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, ray_cluster, runs, request):
    shared = [fixture for prefix, fixture in README_RUN_FIXTURES.items() if command.startswith(prefix)]
    if shared:  # run as written once for the session, by the fixture other tests check it through
        request.getfixturevalue(shared[0])
    else:
        run_readme_command(command, runs)


@pytest.mark.slow
@pytest.mark.parametrize("logdir", re.findall(r"`tensorboard --logdir runs/(\S+)`", README))
def test_tensorboard_command_serves_a_run(logdir, runs):
    assert (runs / logdir).is_dir(), "the README command that writes it runs first"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs / logdir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline, found = time.time() + 90, []
        while time.time() < deadline and not any("validation" in run for run in found):
            try:
                found = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5).read())
            except OSError:
                time.sleep(1)
        assert any("train" in run for run in found) and any("validation" in run for run in found), found
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_quick_pipeline_left_every_artefact(runs):
    """The README's main command: both searches, the chosen model exported, the report."""
    import numpy as np

    from dogbreeds import data
    from dogbreeds.config import DataConfig
    from dogbreeds.export import load_bundle
    from tests.conftest import SAMPLE_DIR, TINY_DIR

    quick = runs / "quick"
    for stage in ("cnn3v2", "head"):
        for name in ("results.csv", "best.json", "final/metrics.json", "final/model.keras"):
            assert (quick / stage / name).exists(), f"{stage}/{name}"
    assert (quick / "report.html").stat().st_size > 10_000
    summary = json.loads((quick / "pipeline.json").read_text())
    other = "cnn3v2" if summary["chosen"] == "head" else "head"
    assert summary["final"][summary["chosen"]]["validation"] >= summary["final"][other]["validation"]
    # The head search trained on the profile's augmented views of every training photo.
    views = summary["settings"]["stages"]["head"]["data"]["augmented_views"]
    (train_features,) = (quick / "features").glob("*/train.npz")
    train_photos = len(data.load_index(DataConfig(data_dir=str(TINY_DIR))).splits["train"])
    assert views == 2 and np.load(train_features)["features"].shape[0] == views * train_photos
    bundle = load_bundle(str(quick / "bundle"))
    assert bundle.info["version"] == summary["bundle"]["version"] and len(bundle.class_names) == 6
    photo = next(SAMPLE_DIR.glob("Images/n02085620-Chihuahua/*")).read_bytes()
    probabilities = bundle.predict([photo])
    assert probabilities.shape == (1, 6) and abs(float(probabilities.sum()) - 1) < 1e-4
