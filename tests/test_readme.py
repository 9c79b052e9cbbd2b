"""Every command in the README runs, as written, in order (output folders moved under one
temporary `runs/` for the session; the runs other tests check too, README_RUN_FIXTURES in
tests/conftest.py, run once, whichever test asks first), and every `tensorboard --logdir` it
shows serves what the run wrote."""

import csv
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import (
    ARTIFACTS, LONG_README_RUNS, README_RUN_FIXTURES, README_SETUP as SETUP, ROOT, dashboard_studies, free_port, readme_commands,
    run_readme_command,
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


def _tiered(commands: list[str]) -> list:
    """The README's commands, those of the long tier (LONG_README_RUNS) marked so."""
    return [pytest.param(c, marks=pytest.mark.long) if c.startswith(LONG_README_RUNS) else c for c in commands]


@pytest.mark.slow
@pytest.mark.parametrize("command", _tiered(readme_commands()))
def test_readme_command(command, ray_cluster, runs, request):
    shared = [fixture for prefix, fixture in README_RUN_FIXTURES.items() if command.startswith(prefix)]
    if shared:  # run as written once for the session, by the fixture other tests check it through
        request.getfixturevalue(shared[0])
    else:
        run_readme_command(command, runs)


@pytest.mark.slow
@pytest.mark.parametrize("logdir", re.findall(r"`tensorboard --logdir runs/(\S+)`", README))
def test_tensorboard_command_serves_a_run(logdir, runs):
    """Keras' curves (train and validation runs) or, under a search's tune/, Tune's HParams
    view alone: one kind of run per folder."""
    assert (runs / logdir).is_dir(), "the README command that writes it runs first"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs / logdir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        tune = logdir.endswith("/tune")
        deadline, found, plugins = time.time() + 90, [], {}
        while time.time() < deadline and not (found and (tune or any("validation" in run for run in found))):
            try:
                found = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5).read())
                plugins = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugins_listing", timeout=5).read())
            except OSError:
                time.sleep(1)
        keras = [run for run in found if run.endswith(("train", "validation"))]
        if tune:
            assert found and plugins["hparams"]["enabled"] and not keras, (found, plugins)
        else:
            assert any("train" in run for run in found) and any("validation" in run for run in found), found
            assert keras == found, found
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.long
def test_the_quick_start_prints_its_stages_trials_and_table_on_a_screen_or_two(quick_pipeline_dir):
    """What the README's main command prints (issue 25's bar: at most 150 lines, none of Ray
    Train's per-epoch reports or checkpoint paths; --verbose adds those, tests/test_cli.py)."""
    import re

    printed = (quick_pipeline_dir.parent / "quick.console").read_text()
    lines = printed.splitlines()
    assert len(lines) <= 150, printed
    assert not [line for line in lines if "TrainingReport(" in line or "Checkpoint successfully created" in line]
    assert not [line for line in lines if "INFO streaming_executor" in line], printed  # Ray Data's plans
    for stage in ("cnn3v2", "head", "fine_tune", "ladder", "export"):
        assert re.search(rf"^stage {stage}: started$", printed, re.M), stage
        assert re.search(rf"^stage {stage}: \d+ s; peak memory", printed, re.M), stage
    assert len(re.findall(r"^head trial \w+ ended: best val_accuracy", printed, re.M)) == 4
    assert re.search(r"^ladder/cnn1: epoch 3/3: loss", printed, re.M)
    assert re.search(r"^model +params", printed, re.M)  # the study's table


@pytest.mark.long
def test_quick_pipeline_left_every_artefact(quick_pipeline_dir, runs, capsys):
    """The README's main command: the searches, fine-tuning, the ladder, the study's table, the
    chosen model exported, the report."""
    import numpy as np

    from dogbreeds import data
    from dogbreeds.config import DataConfig
    from dogbreeds.export import load_bundle
    from tests.conftest import SAMPLE_DIR, TINY_DIR

    quick = runs / "quick"
    for stage in ("cnn3v2", "head", "fine_tune"):
        for name in ("results.csv", "best.json", "final/metrics.json", "final/model.keras"):
            assert (quick / stage / name).exists(), f"{stage}/{name}"
    assert (quick / "report.html").stat().st_size > 10_000
    # The hyperparameters' importance (PED-ANOVA over the completed trials) in best.json and the report.
    report = (quick / "report.html").read_text()
    for stage in ("cnn3v2", "head", "fine_tune"):
        importance = json.loads((quick / stage / "best.json").read_text())["importance"]
        assert importance["evaluator"].startswith("PED-ANOVA")
        if importance["values"]:
            assert f"{stage} search: hyperparameter importance" in report
            assert all(0 <= value <= 1 for value in importance["values"].values())
    summary = json.loads((quick / "pipeline.json").read_text())
    validation = {stage: final["validation"] for stage, final in summary["final"].items()}
    assert sorted(validation) == ["cnn3v2", "fine_tune", "head"]
    assert validation[summary["chosen"]] == max(validation.values())
    # Issue 13's bar: fine-tuning beats the frozen head it started from, on validation.
    assert validation["fine_tune"] > validation["head"] and summary["chosen"] == "fine_tune"
    # Fine-tuning started from the head search's best head, the whole backbone or its top trained.
    fine_tune = json.loads((quick / "fine_tune" / "search.json").read_text())["train"]
    head_best = json.loads((quick / "head" / "best.json").read_text())["trial_id"]
    assert fine_tune["head_weights"] == str(quick / "head" / "trials" / head_best / "head.weights.h5")
    assert fine_tune["model"] == "mobilenet_025" and 0 < json.loads(
        (quick / "fine_tune" / "final" / "config.json").read_text())["train"]["fine_tune_fraction"] <= 1
    # The head search trained on the profile's augmented views of every training photo.
    head_data = summary["settings"]["stages"]["head"]["data"]
    views = head_data["augmented_views"]
    (train_features,) = (quick / "features").glob("*/train.npz")
    train_photos = len(data.load_index(DataConfig(**{**head_data, "data_dir": str(TINY_DIR)})).splits["train"])
    assert views == 2 and np.load(train_features)["features"].shape[0] == views * train_photos
    # The study's table: every final model, tested once, with what it cost.
    table = {row["name"]: row for row in summary["table"]}
    assert list(table) == ["cnn1 (ladder)", "cnn3 (ladder)", "cnn3v2 (ladder)", "cnn3v2", "head", "fine_tune"]
    for name, row in table.items():
        run_dir = quick / ("ladder/" + name.split()[0] if "ladder" in name else f"{name}/final")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert row["test_top1"] == metrics["test"]["top1"] and row["validation_top1"] == metrics["validation"]["top1"]
        assert 0 < row["trainable_params"] <= row["total_params"] and row["epochs"] >= 1 and row["images_per_s"] > 0
        assert row["exported"] == (name == summary["chosen"]) and name in report
    assert table["head"]["trainable_params"] < table["fine_tune"]["trainable_params"] < table["fine_tune"]["total_params"]
    assert "Comparison of the final models" in report
    from dogbreeds import commands

    commands._print_table(summary["table"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [n.split()[0] for n in table]
    bundle = load_bundle(str(quick / "bundle"))
    assert bundle.info["version"] == summary["bundle"]["version"] and len(bundle.class_names) == 6
    photo = next(SAMPLE_DIR.glob("Images/n02085620-Chihuahua/*")).read_bytes()
    probabilities = bundle.predict([photo])
    assert probabilities.shape == (1, 6) and abs(float(probabilities.sum()) - 1) < 1e-4


@pytest.mark.long
def test_full_profile_rehearsal_runs_every_stage_at_full_size(rehearsal):
    """The README's rehearsal of the full profile, in its own process on this machine's cores:
    Xception at 299 px on all 120 breeds, several views a photo, TPE with ASHA, two Ray Train workers per
    cnn3v2 trial and for fine-tuning, the ladder, and a bundle that serves. Its time and each
    process's peak memory are in test-artifacts/rehearsal_memory.json."""
    import numpy as np

    from dogbreeds import data
    from dogbreeds.config import DataConfig, from_dict
    from dogbreeds.export import check_bundle, load_bundle
    from dogbreeds.pipeline import PROFILES
    from tests.conftest import SAMPLE_DIR

    run = rehearsal["dir"]
    summary = json.loads((run / "pipeline.json").read_text())
    stages = summary["settings"]["stages"]
    for stage in ("cnn3v2", "head"):
        assert stages[stage]["data"]["image_size"] == 299
        assert stages[stage]["search"]["algorithm"] == "tpe" and stages[stage]["search"]["scheduler"] == "asha"
    assert stages["head"]["train"]["model"] == "xception"
    # The profile's nine views a photo; the README's rehearsal cuts them to three.
    assert PROFILES["full"]["head"][0]["augmented_views"] == 9 and stages["head"]["data"]["augmented_views"] == 3
    # Two Ray Train workers, in sync, trained each cnn3v2 trial and the fine-tuned model.
    for stage in ("cnn3v2", "fine_tune"):
        for metrics in (run / stage / "trials").glob("*/metrics.json"):
            assert json.loads(metrics.read_text())["replicas_in_sync"] == 2, metrics
        assert json.loads((run / stage / "final" / "metrics.json").read_text())["workers"] == 2
    # Xception's 2,048 features of three views of each of the head's training photos (one a breed, the other of two validates).
    head_data = dataclasses.replace(from_dict(DataConfig, stages["head"]["data"]), data_dir=str(SAMPLE_DIR))
    train = data.load_index(head_data).splits["train"]
    assert 0 < len(train) <= 120
    features = json.loads((run / "head" / "best.json").read_text())["features"]["train"]
    assert np.load(features)["features"].shape == (3 * len(train), 2048)
    table = {row["name"]: row for row in summary["table"]}
    assert list(table) == ["cnn1 (ladder)", "cnn3 (ladder)", "cnn3v2 (ladder)", "cnn3v2", "head", "fine_tune"]
    check_bundle(str(run / "bundle"))
    bundle = load_bundle(str(run / "bundle"))
    assert bundle.image_size == 299 and len(bundle.class_names) == 120
    photo = next(SAMPLE_DIR.glob("Images/n02085620-Chihuahua/*")).read_bytes()
    probabilities, scores = bundle.predict_with_novelty(bundle.prepare(photo)[None])
    assert probabilities.shape == (1, 120) and abs(float(probabilities.sum()) - 1) < 1e-4
    # Every process was sampled: the driver, Ray's own, the feature actor, the Train workers.
    processes = " ".join(p["process"] for p in rehearsal["peak_rss_mb"])
    assert "dogbreeds pipeline" in processes and "RayTrainWorker" in processes and "raylet" in processes


def test_the_full_profile_at_true_count_is_the_rehearsal_uncut():
    """The README's full profile on all 12,000 photos of stanford_dogs_224 (its memory, measured:
    a benchmark of hours here, not a test) is the rehearsal's command, which a test runs, on
    those photos, without the rehearsal's cuts of views and photos, and without the ladder."""
    def options(command: str) -> dict:
        words, found = shlex.split(command), {}
        for index, word in enumerate(words):
            if word.startswith("--"):
                value = words[index + 1] if index + 1 < len(words) and not words[index + 1].startswith("--") else True
                found.setdefault(word, []).append(value)
        return found

    (rehearsal,) = [c for c in readme_commands() if c.startswith("pipeline --profile full ")]
    (true_count,) = [c for c in readme_commands("sh") if c.startswith("pipeline --profile full ")]
    rehearsal, true_count = options(rehearsal), options(true_count)
    assert rehearsal.pop("--data-dir") == ["../shared/data/stanford_dogs_sample"] and "--no-ladder" not in rehearsal
    assert true_count.pop("--data-dir") == ["../shared/data/stanford_dogs_224"] and true_count.pop("--no-ladder") == [True]
    assert "--set" in rehearsal and "--set" not in true_count
    for command in (rehearsal, true_count):
        command.pop("--set", None), command.pop("--output")
    assert true_count == rehearsal


@pytest.mark.long
def test_cpu_profile_runs_every_stage_on_a_cut_of_the_120_breeds(ray_cluster, runs, tmp_path, capsys):
    """The README's cpu profile (the study on all 120 breeds of stanford_dogs_224, within an
    hour on 2 cores: a benchmark, not a test) as written, on a cut of its data: five photos of
    each breed, one epoch, one trial. Every stage runs at the profile's sizes and leaves what
    the full run leaves: the table, each stage's time and peak memory, a 120-breed bundle at
    288 px, the report's error analysis."""
    from dogbreeds import commands, pipeline
    from dogbreeds.export import load_bundle
    from tests.conftest import DOGS_224_DIR

    (command,) = [c for c in readme_commands("sh") if c.startswith("pipeline --profile cpu ")]
    cut = tmp_path / "stanford_dogs_224_cut"
    for breed in sorted((DOGS_224_DIR / "Images").iterdir()):
        (cut / "Images" / breed.name).mkdir(parents=True)
        for photo in sorted(breed.iterdir())[:5]:  # one for test, one for validation, three to train
            (cut / "Images" / breed.name / photo.name).symlink_to(photo)
    assert str(DOGS_224_DIR.relative_to(ROOT.parent)) in command
    command = command.replace(f"../{DOGS_224_DIR.relative_to(ROOT.parent)}", str(cut))
    run_readme_command(f"{command} --epochs 1 --trials 1 --concurrent-trials 1", runs)
    printed = capsys.readouterr().out

    run = runs / "cpu"
    summary = json.loads((run / "pipeline.json").read_text())
    stages = summary["settings"]["stages"]
    assert summary["profile"] == "cpu" and summary["settings"]["ladder"] == ["cnn1", "cnn3", "cnn3v2"]
    assert stages["head"]["data"]["image_size"] == stages["fine_tune"]["data"]["image_size"] == 288
    assert stages["head"]["train"]["model"] == stages["fine_tune"]["train"]["model"] == "mobilenet_025"
    profile = pipeline.PROFILES["cpu"]
    assert [stages[stage]["data"]["zoom_out"] for stage in pipeline.STAGES] == [
        profile[stage][0]["zoom_out"] for stage in pipeline.STAGES]
    assert all(stages[stage]["data"]["test_time_flip"] for stage in pipeline.STAGES)
    table = {row["name"]: row for row in summary["table"]}
    assert list(table) == ["cnn1 (ladder)", "cnn3 (ladder)", "cnn3v2 (ladder)", "cnn3v2", "head", "fine_tune"]
    assert all(row["epochs"] == 1 and 0 <= row["test_top1"] <= 1 for row in table.values())
    # Each stage's time and the peak memory of the driver and of Ray's workers, printed too.
    assert list(summary["stages_run"]) == ["cnn3v2", "head", "fine_tune", "ladder", "export"]
    for stage, timing in summary["stages_run"].items():
        assert timing["seconds"] > 0 and timing["peak_mb"]["driver"] > 100, (stage, timing)
        if stage != "export":  # trials, Ray Train workers and feature actors are Ray workers
            assert timing["peak_mb"]["largest_worker"] > 100 and timing["peak_mb"]["all"] >= timing["peak_mb"]["driver"]
        assert re.search(rf"^{stage}\s+{timing['seconds']:.0f}\s", printed, re.M), stage
    bundle = load_bundle(str(run / "bundle"))
    assert len(bundle.class_names) == 120 and bundle.image_size == 288 and bundle.test_time_flip
    assert bundle.info["config"]["data"]["data_dir"] == str(cut)
    # The error analysis of every final model, the exported one's among them: accuracy per breed
    # (the worst breeds first) and the most confused pairs with photos of both breeds.
    report = (run / "report.html").read_text()
    assert "Comparison of the final models" in report
    for stage in ("cnn3v2", "head", "fine_tune"):
        for section in ("accuracy per breed", "most confused breeds"):
            assert f"<h2>{stage} final model: {section}</h2>" in report, (stage, section)
    assert report.count('<div class="pair">') >= 3 and 'class="breed predicted"' in report
    commands._print_stages(summary["stages_run"])  # the same lines again, from pipeline.json
    assert capsys.readouterr().out.splitlines()[1].startswith("cnn3v2")


@pytest.mark.long
def test_pipeline_resume_with_more_trials_extends_one_search(quick_pipeline_extended, runs):
    """The README's `pipeline --resume --set head.trials=6` on the quick pipeline: the head
    search runs exactly 2 new trials (a second Tune experiment, on the same study) and keeps
    its 4; the cnn3v2 search runs nothing; each final/ is retrained only if its best trial
    changed, fine-tuning only if the best head did; results.csv, best.json, the report and
    pipeline.json say so."""
    from tests.conftest import assert_study_holds, finished_in_tune_state

    quick = runs / "quick"
    summary = json.loads((quick / "pipeline.json").read_text())
    assert summary["settings"]["overrides"]["stages"] == {"head": {"search": {"trials": 6}}}
    assert [summary["settings"]["stages"][stage]["search"]["trials"] for stage in ("cnn3v2", "head")] == [2, 6]
    report = (quick / "report.html").read_text()
    for stage, trials in (("cnn3v2", 2), ("head", 6)):
        earlier = quick_pipeline_extended[stage]
        with open(quick / stage / "results.csv") as handle:
            rows = {row["trial_id"]: row for row in csv.DictReader(handle)}
        assert len(rows) == trials and all(rows[row["trial_id"]] == row for row in earlier["rows"])
        assert all(trial_id in report for trial_id in rows)
        first = finished_in_tune_state(quick / stage)
        assert first == {row["trial_id"] for row in earlier["rows"]}
        assert finished_in_tune_state(quick / stage, "search-2") == set(rows) - first
        assert_study_holds(quick / stage, list(rows))
        best = json.loads((quick / stage / "best.json").read_text())
        assert best["trials"] == trials
        retrained = (quick / stage / "final" / "metrics.json").stat().st_mtime_ns != earlier["final"]
        assert retrained == (best["trial_id"] != earlier["best"]["trial_id"]), (stage, best["trial_id"])
    assert summary["final"]["head"] == json.loads((quick / "head" / "best.json").read_text())["final"]
    # Fine-tuning starts from the head search's best head: kept if that head is, redone if not.
    head_best = json.loads((quick / "head" / "best.json").read_text())["trial_id"]
    fine_tune = json.loads((quick / "fine_tune" / "best.json").read_text())
    assert fine_tune["frozen_head"]["trial_id"] == head_best
    with open(quick / "fine_tune" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    earlier = quick_pipeline_extended["fine_tune"]
    assert (rows == earlier["rows"]) == (head_best == quick_pipeline_extended["head"]["best"]["trial_id"])
    assert len(rows) == 2 and summary["final"]["fine_tune"] == fine_tune["final"]


@pytest.mark.long
def test_dashboard_command_shows_both_studies_of_the_quick_pipeline(quick_pipeline_extended, runs):
    """The README's `dogbreeds dashboard runs/quick`: optuna-dashboard lists the pipeline's two
    studies with every trial of each search (its extension's too), draws both in headless
    Chromium, and refuses writes."""
    import urllib.error
    import urllib.request

    from playwright.sync_api import sync_playwright

    from dogbreeds import options
    from tests.test_serve import BROWSER_ARGS

    (command,) = [command for command in readme_commands("sh") if command.startswith("dashboard ")]
    port = free_port()
    argv = [arg.replace("runs/", f"{runs}/") for arg in shlex.split(command)] + ["--port", str(port)]
    server = subprocess.Popen([sys.executable, "-m", "dogbreeds.cli", *argv], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"http://127.0.0.1:{port}/dashboard" in server.stdout.readline()
        api = f"http://127.0.0.1:{port}/api/studies"
        studies = dashboard_studies(port)
        assert sorted(studies) == ["cnn3v2", "fine_tune", "head"]
        for name, trials in studies.items():
            with open(runs / "quick" / name / "results.csv") as handle:
                rows = list(csv.DictReader(handle))
            ray_ids = [next(a["value"] for a in t["user_attrs"] if a["key"] == "ray_trial_id") for t in trials]
            assert sorted(ray_ids) == sorted(row["trial_id"] for row in rows)
            # The best trial carries the final model's error analysis as its note.
            best = json.loads((runs / "quick" / name / "best.json").read_text())
            notes = {ray_id: t["note"]["body"] for ray_id, t in zip(ray_ids, trials)}
            assert f"Test top-1 **{best['final']['test']:.3f}**" in notes[best["trial_id"]]
            assert "| true breed | predicted as |" in notes[best["trial_id"]]
            assert [body for ray_id, body in notes.items() if ray_id != best["trial_id"] and body] == []
            importances = json.loads(urllib.request.urlopen(f"{api}/{trials[0]['study_id']}/param_importances", timeout=60).read())
            if best["importance"]["values"]:  # the report's and the dashboard's: one evaluator
                assert {i["name"] for i in importances["param_importances"][0]} == set(best["importance"]["values"])
        with pytest.raises(urllib.error.HTTPError, match="405"):
            urllib.request.urlopen(urllib.request.Request(f"{api}/0", method="DELETE"), timeout=30)
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.goto(f"http://127.0.0.1:{port}/dashboard")
                for name in ("cnn3v2", "head", "fine_tune"):  # the study list shows "<id>. <name>"
                    page.get_by_text(re.compile(rf"^\d+\. {name}$")).wait_for(timeout=60_000)
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    # The cluster's command (README, Running on a cluster) is the same command on the run storage.
    (remote,) = re.findall(r"--port-forward 8080 '(dogbreeds dashboard [^']+)'", README)
    assert options.build_parser().parse_args(shlex.split(remote)[1:]).command == "dashboard"
