"""The report of real runs: the README's `dogbreeds train cnn3v2` run on the real tiny_dogs_64
photos, and a search and a pipeline assembled from the files of two real training runs (with
different hyperparameters), rendered and opened in a real headless Chromium."""

import csv
import json
import shutil

import pytest

from dogbreeds import cli, report
from tests.conftest import ARTIFACTS

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
@pytest.fixture(scope="module")
def training_run(cnn3v2_run_dir):
    """A real layout-(A) run: the README's `dogbreeds train cnn3v2` (8 epochs at 64 x 64)."""
    return cnn3v2_run_dir


@pytest.fixture(scope="module")
def second_run(readme_search_cnn3v2_dir):
    """A second real cnn3v2 run, whose learning rate (and filters) differ: the final run of the
    README's `search cnn3v2` (tests/conftest.py)."""
    return readme_search_cnn3v2_dir / "final"


def _percent(value):
    return f"{value * 100:.1f}%"


def _open_in_chromium(path, screenshot):
    """The visible text and every image's natural width of a report opened from file://."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            text = page.inner_text("body")
            widths = page.evaluate("Array.from(document.images, image => image.naturalWidth)")
            page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
        finally:
            browser.close()
    # Self-contained: the page asked for nothing but itself and its data: URIs.
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    return text, widths


@pytest.mark.slow
def test_report_command_writes_the_runs_metrics_and_images(training_run, capsys):
    assert cli.main(["report", str(training_run)]) == 0
    path = training_run / "report.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = path.read_text()
    metrics = json.loads((training_run / "metrics.json").read_text())
    test = metrics["test"]
    for value in (test["top1"], test["top5"], test["precision"], test["recall"]):
        assert _percent(value) in page
    assert f">{test['num_images']}<" in page
    assert page.count("data:image/png;base64,") >= 2  # learning curves, accuracy per breed
    assert "data:image/jpeg;base64," in page  # photos of confused breeds and predictions
    assert "http://" not in page and "https://" not in page
    with open(training_run / "confusions.csv") as handle:
        first_pair = next(csv.DictReader(handle))
    assert first_pair["true_breed"] in page and first_pair["predicted_breed"] in page
    assert "Sample predictions" in page and "Yorkshire terrier" in page


@pytest.mark.slow
def test_report_in_chromium_shows_the_numbers_and_loads_every_image(training_run):
    path = report.write_report(str(training_run))
    text, widths = _open_in_chromium(training_run / "report.html", "report.png")
    assert path == str(training_run / "report.html")
    test = json.loads((training_run / "metrics.json").read_text())["test"]
    for value in (test["top1"], test["top5"], test["precision"], test["recall"]):
        assert _percent(value) in text
    assert str(test["num_images"]) in text
    assert len(widths) > 10 and all(width > 0 for width in widths), widths


def test_a_directory_with_nothing_to_report_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "nothing to report in" in error and "Traceback" not in error
    assert cli.main(["report", str(tmp_path / "missing")]) == 1
    assert "run directory not found" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.slow
def test_any_single_file_of_a_run_renders(training_run, tmp_path):
    expected = {
        "history.json": "Learning curves",
        "metrics.json": "Accuracy per breed",
        "confusions.csv": "Most confused breeds",
        "config.json": "/tiny_dogs_64",
    }
    for name, heading in expected.items():
        directory = tmp_path / name.replace(".", "_")
        directory.mkdir()
        shutil.copy(training_run / name, directory / name)
        page = open(report.write_report(str(directory), predictions=False)).read()
        assert heading in page, name
        assert ("Test metrics" in page) == (name == "metrics.json"), name


def _assemble_search(runs, directory):
    """A search directory in the layout `dogbreeds search` writes, from real training runs:
    each run is a trial, and the best one (by validation accuracy) is also `final/`."""
    rows = []
    for trial_id, run in runs.items():
        history = json.loads((run / "history.json").read_text())
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        (directory / "trials" / trial_id).mkdir(parents=True)
        for name in ("history.json", "config.json"):
            shutil.copy(run / name, directory / "trials" / trial_id / name)
        best_epoch = max(history, key=lambda row: row["val_accuracy"])
        rows.append({
            "trial_id": trial_id, "status": "done", "seconds": metrics["train_seconds"],
            "val_accuracy": best_epoch["val_accuracy"], "val_loss": best_epoch["val_loss"],
            "epochs": len(history), "hp_learning_rate": config["train"]["learning_rate"],
            "hp_per_worker_batch_size": config["train"]["per_worker_batch_size"],
        })
    with open(directory / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = max(rows, key=lambda row: row["val_accuracy"])
    final = json.loads((runs[best["trial_id"]] / "metrics.json").read_text())
    (directory / "best.json").write_text(json.dumps({
        "search": "cnn3v2", "trial_id": best["trial_id"], "val_accuracy": best["val_accuracy"],
        "hparams": {k[3:]: v for k, v in best.items() if k.startswith("hp_")}, "trials": len(rows),
        "final": {"validation": final["validation"]["top1"], "test": final["test"]["top1"]},
    }))
    shutil.copytree(runs[best["trial_id"]], directory / "final", ignore=shutil.ignore_patterns("ray", "report.html"))
    return rows, best, final


@pytest.mark.slow
def test_search_and_pipeline_reports(training_run, second_run, tmp_path):
    from dogbreeds.export import export_bundle

    search_dir = tmp_path / "search"
    runs = {"trial_00000": training_run, "trial_00001": second_run}
    rows, best, final = _assemble_search(runs, search_dir)
    page = open(report.write_report(str(search_dir))).read()
    text, widths = _open_in_chromium(search_dir / "report.html", "report_search.png")
    assert all(width > 0 for width in widths) and len(widths) >= 6
    for heading in ("cnn3v2 search: learning curves", "accuracy by hyperparameter", "cnn3v2 search: trials",
                    "Chosen hyperparameters", "cnn3v2 final model: test metrics"):
        assert heading in text, heading
    assert "learning_rate" in text and "per_worker_batch_size" in text
    assert _percent(best["val_accuracy"]) in text and _percent(final["test"]["top1"]) in text
    table = page[page.index("<tbody>"):]
    order = sorted(rows, key=lambda row: -row["val_accuracy"])
    assert table.index(order[0]["trial_id"]) < table.index(order[1]["trial_id"])

    # A pipeline: the search in a sub-folder and its final model exported beside it.
    pipeline_dir = tmp_path / "pipeline"
    shutil.copytree(search_dir, pipeline_dir / "cnn3v2", ignore=shutil.ignore_patterns("report.html"))
    bundle = export_bundle(str(pipeline_dir / "cnn3v2" / "final"), str(pipeline_dir / "bundle"))
    page = open(report.write_report(str(pipeline_dir), predictions=False)).read()
    assert "Exported model" in page and bundle["version"] in page
    assert "the cnn3v2 search&#x27;s final model" in page and "cnn3v2 search: trials" in page
