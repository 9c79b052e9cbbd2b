"""The report's page: a header of facts, one link per group of sections, and the sections."""

from __future__ import annotations

import dataclasses
import datetime
import os
from html import escape

from dogbreeds import runs
from dogbreeds.report import markup
from dogbreeds.report.photos import PHOTOS_PER_BREED, breed_photos, predict_samples, thumbnail
from dogbreeds.report.plots import (
    format_value, plot_breed_accuracy, plot_comparison, plot_hyperparameter, plot_training_curves, plot_trial_curves,
)
from dogbreeds.report.run import Run, SearchRun, TrainingRun, read_run

# Confused pairs shown, most frequent first; the long tail is in confusions.csv.
CONFUSED_PAIRS_SHOWN = 8
# Sample predictions show the photo larger: the photo is the point there.
PREDICTION_PHOTO_SIZE = 192
# Header facts whose values are long (paths, version lists): two columns wide.
WIDE_FACTS = ("data", "versions", "exported model")


@dataclasses.dataclass
class Section:
    """One card of the page. Titles like "cnn3v2 search: trials" group their sections (the
    part before ": ") in the links at the top."""

    anchor: str
    title: str
    body: str


def write_report(run_dir: str, output: str | None = None, predictions: bool = True) -> str:
    """Render `run_dir` into one self-contained HTML file (default `run_dir/report.html`) and
    return its path. `predictions=False` skips loading the model for sample predictions."""
    page = render_report(read_run(run_dir), predictions)
    path = os.path.abspath(output or os.path.join(run_dir, runs.REPORT))
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def render_report(run: Run, predictions: bool = True) -> str:
    """The HTML page of a run read by `read_run`."""
    sections = []
    if (run.pipeline or {}).get("table"):
        sections.append(_comparison_section(run.pipeline["table"]))
    if run.bundle:
        sections += _bundle_sections(run.bundle, run.searches, run.pipeline)
    if run.search:
        folder = os.path.basename(os.path.abspath(run.directory))
        sections += _search_sections(run.search, folder, predictions)
    for name, search in run.searches.items():
        sections += _search_sections(search, name, predictions)
    if run.training:
        sections += _training_sections(run.training, "run", "", predictions)
    title, kind, facts = _describe(run)
    groups = {}
    for section in sections:
        groups.setdefault(section.title.split(": ")[0], section.anchor)
    links = "".join(f'<a href="#{markup.anchor(a)}">{escape(group)}</a>' for group, a in groups.items())
    fact_list = "".join(
        f'<div{" class=wide" if key in WIDE_FACTS else ""}><dt>{escape(key)}</dt>'
        f"<dd>{escape(str(value))}</dd></div>"
        for key, value in facts
    )
    body = "\n".join(
        f'<section id="{markup.anchor(s.anchor)}"><h2>{escape(s.title)}</h2>\n{s.body}\n</section>' for s in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} - dogbreeds report</title>
<style>{markup.CSS}</style></head>
<body><main>
<header class="hero"><div class="kind">{escape(kind)}</div><h1>{escape(title)}</h1>
<dl class="facts">{fact_list}</dl></header>
<nav>{links}</nav>
{body}
<footer>dogbreeds report of {escape(os.path.abspath(run.directory))}</footer>
</main></body></html>
"""


def _describe(run: Run) -> tuple[str, str, list[tuple[str, object]]]:
    """The page's title, the kind of run, and the facts of its header."""
    searches = ([run.search] if run.search else []) + list(run.searches.values())
    exported_from = run.bundle and _exported_from(run.bundle, run.searches, run.pipeline)
    if exported_from:  # a pipeline's header describes the model it exported
        searches.insert(0, run.searches[exported_from])
    # What was trained, and on what: the run itself, else a search's final model or a trial.
    source = run.training or next((s.final for s in searches if s.final), None)
    config = (source and source.config) or next(
        (s.trial_config for s in searches if s.trial_config), None
    ) or (run.bundle or {}).get("config") or {}
    metrics = (source and source.metrics) or {}
    data_config, train_config = config.get("data") or {}, config.get("train") or {}
    model = metrics.get("model") or train_config.get("model")
    facts = []
    if run.searches:
        kind = "pipeline run"
        title = "Pipeline: " + " and ".join(f"{name} search" for name in run.searches)
    elif run.search:
        folder = os.path.basename(os.path.abspath(run.directory))
        kind, title = "hyperparameter search", f"{_search_name(run.search, folder)} search"
        facts.append(("trials", len(run.search.results) or len(run.search.trial_histories)))
    elif run.training:
        kind, title = "training run", model or "training run"
    else:
        kind, title = "exported model", str(run.bundle.get("name"))
    if run.bundle:
        facts.append(("exported model", f"{run.bundle.get('name')} version {run.bundle.get('version')}"))
    if model:
        facts.append(("model", model))
    if data_config:
        facts.append(("data", data_config.get("data_dir") or "TFDS stanford_dogs"))
    image_size = metrics.get("image_size") or data_config.get("image_size")
    if image_size:
        facts.append(("image size", f"{image_size} × {image_size} px"))
    if metrics.get("num_train_images"):
        facts.append(("train images", f"{metrics['num_train_images']:,}"))
    if run.training and metrics.get("epochs_run") is not None:
        facts.append(("epochs", f"{metrics['epochs_run']} of {train_config.get('epochs', '?')}"))
    if run.training and metrics.get("train_seconds") is not None:
        workers = metrics.get("workers", 1)
        facts.append(("training time", markup.duration(metrics["train_seconds"])
                      + markup.plural(workers, " on {} worker", " on {} workers")))
    finished = datetime.datetime.fromtimestamp(run.modified).strftime("%Y-%m-%d %H:%M")
    facts.append(("finished", finished))
    versions = config.get("versions") or {}
    if versions:
        facts.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    return title, kind, facts


def _training_sections(training: TrainingRun, anchor: str, prefix: str, predictions: bool):
    """Headline metrics, curves, accuracy per breed, confused pairs and sample predictions."""
    metrics = training.metrics or {}
    split = "test" if "test" in metrics else "validation"  # search trials are never tested
    split_metrics = metrics.get(split) or {}
    config = training.config or {}
    data_dir = (config.get("data") or {}).get("data_dir")
    sections = []
    if split_metrics:
        body = _metric_cards(split_metrics, split)
        validation = metrics.get("validation") or {}
        if split == "test" and validation:
            body += markup.note(f"On the validation split: top-1 {markup.percent(validation.get('top1'))}, "
                          f"top-5 {markup.percent(validation.get('top5'))}.")
        title = markup.title(prefix, f"{split.capitalize()} metrics")
        sections.append(Section(f"{anchor}-metrics", title, body))
    if training.history:
        train_config = config.get("train") or {}
        settings = {
            "epochs run": len(training.history),
            "batch per worker": train_config.get("per_worker_batch_size"),
            "learning rate": train_config.get("learning_rate"),
            "workers": train_config.get("workers"),
            **(train_config.get("hparams") or {}),
        }
        body = markup.chips(settings) + markup.image(plot_training_curves(training.history), "learning curves")
        sections.append(Section(f"{anchor}-curves", markup.title(prefix, "Learning curves"), body))
    if split_metrics.get("per_breed_accuracy"):
        chart = plot_breed_accuracy(split_metrics["per_breed_accuracy"], split_metrics.get("top1"))
        body = markup.note(f"The share of each breed's {split} photos classified right.")
        sections.append(Section(f"{anchor}-breeds", markup.title(prefix, "Accuracy per breed"),
                                body + markup.image(chart, "accuracy per breed")))
    if training.confusions:
        sections.append(Section(f"{anchor}-confusions", markup.title(prefix, "Most confused breeds"),
                                _confusions_html(training.confusions, data_dir, split)))
    has_model = os.path.isfile(os.path.join(training.directory, runs.MODEL))
    if predictions and has_model and split == "test" and config:
        sections.append(Section(f"{anchor}-predictions", markup.title(prefix, "Sample predictions"),
                                _predictions_html(training, data_dir)))
    return sections


def _metric_cards(split_metrics: dict, split: str) -> str:
    names = {"top1": "top-1 accuracy", "top5": "top-5 accuracy",
             "precision": "precision (macro)", "recall": "recall (macro)"}
    cards = [(markup.percent(split_metrics[k]), label) for k, label in names.items() if k in split_metrics]
    if "num_images" in split_metrics:
        cards.append((f"{split_metrics['num_images']:,}", f"{split} images"))
    return markup.cards(cards)


def _confusions_html(confusions: list[dict], data_dir: str | None, split: str) -> str:
    body = markup.note(f"{split.capitalize()} photos of the breed on the left that the model called the "
                 f"breed on the right, most frequent first ({len(confusions)} pairs in confusions.csv).")
    photos = {}
    if data_dir and os.path.isdir(data_dir):
        photos = breed_photos(data_dir)
    elif data_dir:
        body += markup.note(f"Photos are not shown: the data folder {data_dir} is not on this machine.")
    for pair in confusions[:CONFUSED_PAIRS_SHOWN]:
        count, fraction = pair.get("count"), pair.get("fraction_of_true")
        share = f"{markup.percent(fraction)} of its {split} photos" if fraction is not None else ""
        body += (
            f'<div class="pair">{_breed_html(str(pair["true_breed"]), photos, "true")}'
            f'<div class="arrow"><div class="count">{escape(str(count))}</div>'
            f'<div>{markup.plural(count, "photo", "photos")} taken for</div><div class="sign">&rarr;</div>'
            f'<div class="share">{escape(share)}</div></div>'
            f'{_breed_html(str(pair["predicted_breed"]), photos, "predicted")}</div>'
        )
    return body


def _breed_html(breed: str, photos: dict[str, list[str]], role: str) -> str:
    thumbnails = [t for t in map(thumbnail, photos.get(breed, [])) if t][:PHOTOS_PER_BREED]
    images = "".join(f'<img src="{t}" alt="{escape(breed)}">' for t in thumbnails)
    return (f'<div class="breed {role}"><div class="name">{escape(breed)}</div>'
            f'<div class="thumbs">{images}</div></div>')


def _predictions_html(training: TrainingRun, data_dir: str | None) -> str:
    if not data_dir:
        return markup.note("Not shown: the run read TFDS, and the report reads photos from a data folder.")
    try:
        samples, predicted = predict_samples(training)
    except (ValueError, OSError) as error:
        return markup.note(f"Not shown: {error}")
    if not samples:
        return markup.note("Not shown: none of the test photos could be read.")
    cards = []
    for sample in samples:
        top = "".join(
            f'<li{" class=true" if name == sample["true_breed"] else ""}>'
            f'<span class="breed-name" title="{escape(name)}">{escape(name)}</span>'
            f'<span class="probability">{probability:.0%}</span>'
            f'<div class="bar" style="width:{probability * 100:.1f}%"></div></li>'
            for name, probability in sample["top"]
        )
        photo = thumbnail(sample["path"], PREDICTION_PHOTO_SIZE) or ""
        cards.append(
            f'<figure class="prediction {"right" if sample["correct"] else "wrong"}">'
            f'<img src="{photo}" alt="{escape(sample["true_breed"])}"><figcaption>'
            f'<div class="truth">{escape(sample["true_breed"])}</div><ol>{top}</ol></figcaption></figure>'
        )
    right = sum(sample["correct"] for sample in samples)
    note = markup.note(f"{right} right and {len(samples) - right} wrong, picked from {predicted} random "
                 "test photos; each with the model's top 3 breeds.")
    return note + '<div class="predictions">' + "".join(cards) + "</div>"


def _search_sections(search: SearchRun, name: str, predictions: bool):
    """The best trial and its hyperparameters, every trial's curve, accuracy against each
    hyperparameter, the trials table, then the final model."""
    label = f"{_search_name(search, name)} search"
    results = sorted(search.results, key=lambda row: -markup.number_or_inf(row.get("val_accuracy")))
    best_id, best_accuracy = _best_trial(search, results)
    hp_columns = [column for column in (results[0] if results else {}) if column.startswith("hp_")]
    summary = _search_summary(search, results, best_id, best_accuracy)
    sections = [Section(f"{name}-best", f"{label}: the best trial", summary)]
    if search.trial_histories:
        body = markup.note("Validation accuracy per epoch of every trial.")
        body += markup.image(plot_trial_curves(search.trial_histories, best_id), "trial curves")
        sections.append(Section(f"{name}-curves", f"{label}: learning curves", body))
    finished = [row for row in results if row.get("val_accuracy") is not None]
    best_position = next((i for i, row in enumerate(finished) if row["trial_id"] == best_id), None)
    accuracies = [row["val_accuracy"] for row in finished]
    plots = []
    for column in hp_columns:
        values = [row.get(column) for row in finished]
        if any(value is not None for value in values):
            plot = plot_hyperparameter(column[3:], values, accuracies, best_position)
            plots.append(markup.image(plot, column[3:]))
    if plots:
        body = markup.note("Each dot is a trial (its best validation accuracy); the star is the best trial.")
        body += '<div class="plot-grid">' + "".join(plots) + "</div>"
        sections.append(Section(f"{name}-hparams", f"{label}: accuracy by hyperparameter", body))
    importance = (search.best or {}).get("importance") or {}
    if importance.get("values"):
        rows = [([escape(name), f'<span class="meter"><span style="width:{value * 100:.1f}%"></span></span>'
                  f"{value:.2f}"], False) for name, value in importance["values"].items()]
        body = markup.note(f"How much each hyperparameter mattered to the search's metric, over its "
                           f"completed trials: {importance['evaluator']}, as optuna-dashboard shows it.")
        sections.append(Section(f"{name}-importance", f"{label}: hyperparameter importance",
                                body + markup.table(["hyperparameter", "importance"], rows, 1)))
    if results:
        table = _trials_table(results, hp_columns, best_id)
        sections.append(Section(f"{name}-trials", f"{label}: trials", table))
    if search.final:
        prefix = f"{label.removesuffix(' search')} final model: "
        sections += _training_sections(search.final, f"{name}-final", prefix, predictions)
    return sections


def _search_name(search: SearchRun, folder: str) -> str:
    """best.json's name of the search, else the model its trials trained, else the folder's."""
    model = ((search.trial_config or {}).get("train") or {}).get("model")
    return (search.best or {}).get("search") or model or folder


def _best_trial(search: SearchRun, results: list[dict]) -> tuple[str | None, float | None]:
    """(trial id, validation accuracy) of the best trial: best.json's, else the top row of
    results.csv, else (a search still running) the trial with the best epoch so far."""
    best = search.best or {}
    if best.get("trial_id") is not None:
        return str(best["trial_id"]), best.get("val_accuracy")
    if results:
        return str(results[0]["trial_id"]), results[0].get("val_accuracy")
    peaks = {
        trial_id: max((row["val_accuracy"] for row in history if row.get("val_accuracy") is not None),
                      default=None)
        for trial_id, history in search.trial_histories.items()
    }
    finished = {trial_id: peak for trial_id, peak in peaks.items() if peak is not None}
    if not finished:
        return None, None
    best_id = max(finished, key=finished.get)
    return best_id, finished[best_id]


def _search_summary(search: SearchRun, results: list[dict], best_id, best_accuracy) -> str:
    best = search.best or {}
    statuses = {}
    for row in results:
        statuses[row.get("status")] = statuses.get(row.get("status"), 0) + 1
    trials = ", ".join(f"{count} {status}" for status, count in statuses.items())
    seconds = sum(row.get("seconds") or 0 for row in results)
    cards = [
        (markup.percent(best_accuracy), "best validation accuracy"),
        (best_id or "—", "best trial"),
        (trials or str(len(search.trial_histories)), "trials"),
        (markup.duration(seconds) if seconds else "—", "time in trials"),
    ]
    final = best.get("final") or {}
    if isinstance(final.get("test"), (int, float)):
        cards.append((markup.percent(final["test"]), "final model, test top-1"))
    body = markup.cards(cards, small=True)
    chosen = best.get("hparams")
    if chosen is None and results:  # no best.json: the best row of results.csv
        chosen = {k[3:]: v for k, v in results[0].items() if k.startswith("hp_") and v is not None}
    if chosen:
        body += "<h3>Chosen hyperparameters</h3>" + markup.chips(chosen)
    return body


def _trials_table(results: list[dict], hp_columns: list[str], best_id: str | None) -> str:
    rows = []
    for row in results:
        accuracy = row.get("val_accuracy")
        meter = "" if accuracy is None else (
            f'<span class="meter"><span style="width:{accuracy * 100:.1f}%"></span></span>'
        )
        seconds = row.get("seconds")
        cells = [
            escape(str(row.get("trial_id"))), escape(format_value(row.get("status"))),
            meter + markup.percent(accuracy), format_value(row.get("val_loss")), format_value(row.get("epochs")),
            "—" if seconds is None else markup.duration(seconds),
            *(escape(format_value(row.get(column))) for column in hp_columns),
        ]
        rows.append((cells, str(row.get("trial_id")) == best_id))
    head = ["trial", "status", "val accuracy", "val loss", "epochs", "time"]
    head += [column[3:] for column in hp_columns]
    note = markup.note("Sorted by validation accuracy; the best trial is highlighted.")
    return note + markup.table(head, rows, 2)


def _comparison_section(table: list[dict]) -> Section:
    """The study's table: every final model of the pipeline (the ladder's too, if trained)."""
    def number(value, pattern="{:,}"):
        return "—" if value is None else pattern.format(value)

    rows = [([escape(row["name"]), escape(row["how"]), number(row["total_params"]), number(row["trainable_params"]),
              number(row["epochs"]), markup.duration(row["train_seconds"]) if row["train_seconds"] else "—",
              number(row["images_per_s"], "{:,.0f}"), markup.percent(row["validation_top1"]),
              *(markup.percent(row[f"test_{key}"]) for key in ("top1", "top5", "precision", "recall"))],
             row["exported"]) for row in table]
    head = ["model", "how", "parameters", "trainable", "epochs", "training", "images/s", "val top-1",
            "test top-1", "test top-5", "precision", "recall"]
    body = markup.note("Each final model once on the test split; the exported one (highlighted) was chosen by "
                       "validation accuracy. Training time and images/s are the final model's own training "
                       "(a frozen head's: on cached features); precision and recall are macro averages.")
    body += markup.table(head, rows, 2) + markup.image(plot_comparison(table), "test accuracy per model")
    return Section("comparison", "Comparison of the final models", body)


def _bundle_sections(bundle: dict, searches: dict[str, SearchRun], pipeline: dict | None):
    """The exported model, and the searches' final models it was chosen from."""
    test = (bundle.get("metrics") or {}).get("test") or {}
    finals = {name: s.final.metrics for name, s in searches.items() if s.final and s.final.metrics}
    chosen = _exported_from(bundle, searches, pipeline)
    details = {
        "name": bundle.get("name"), "version": bundle.get("version"), "model": bundle.get("model"),
        "image size": (bundle.get("preprocessing") or {}).get("image_size"),
        "breeds": len(bundle.get("class_names") or []) or None, "exported": bundle.get("exported_at"),
        "from": f"the {chosen} search's final model" if chosen else None,
    }
    body = markup.chips(details) + (_metric_cards(test, "test") if test else "")
    if finals:
        rows = [([escape(name), escape(str(metrics.get("model", "—"))),
                  markup.percent((metrics.get("validation") or {}).get("top1")),
                  markup.percent((metrics.get("test") or {}).get("top1")),
                  "exported" if name == chosen else ""], name == chosen)
                for name, metrics in finals.items()]
        rule = " Chosen by validation accuracy: the test split picks nothing." if pipeline else ""
        body += "<h3>The searches' final models</h3>"
        body += markup.note(f"Top-1 accuracy of each search's best configuration, retrained.{rule}")
        body += markup.table(["search", "model", "validation top-1", "test top-1", ""], rows, 2, 4)
    return [Section("bundle", "Exported model", body)]


def _exported_from(bundle: dict, searches: dict[str, SearchRun], pipeline: dict | None):
    """The search whose final model is in the bundle: pipeline.json says which; without it,
    the final model with the bundle's test metrics."""
    chosen = (pipeline or {}).get("chosen")
    if chosen in searches:
        return chosen
    test = (bundle.get("metrics") or {}).get("test")
    return next((name for name, search in searches.items() if test and search.final
                 and (search.final.metrics or {}).get("test") == test), None)
