"""The report's plots: matplotlib figures (Agg, no pyplot state) embedded as base64 PNG."""

from __future__ import annotations

import base64
import dataclasses
import io

# Charts list every breed up to twice this many; beyond, the worst and the best this many
# (120 bars in one chart are a wall, not a picture).
BREEDS_PER_END = 20
# Figure resolution: sharp on high-density screens without bloating the file.
DPI = 150
# One colour per role in every plot and in the page's CSS.
COLORS = {"train": "#2563eb", "validation": "#e4572e", "best": "#e4572e", "other": "#9aa5b1"}


def _new_figure(width: float, height: float, columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    for ax in axes:
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.grid(True, color="#e4e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=8, color="#9aa5b1")
    return figure, axes


@dataclasses.dataclass(frozen=True)
class Plot:
    """A figure as a PNG data URI, and its width on the page (its size in inches at the
    browser's 96 px per inch, so every plot's text comes out the same size)."""

    data_uri: str
    width: int


def _to_plot(figure) -> Plot:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return Plot(data_uri, round(figure.get_figwidth() * 96))


def _percent_axis(axis) -> None:
    """Fractions as percentages, with a decimal only when the axis spans less than 10%."""
    from matplotlib.ticker import PercentFormatter

    low, high = axis.get_view_interval()
    axis.set_major_formatter(PercentFormatter(1.0, decimals=0 if abs(high - low) >= 0.1 else 1))


def plot_training_curves(history: list[dict]) -> Plot:
    """Accuracy and loss per epoch, on train and validation."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _new_figure(9, 3, columns=2)
    epochs = [row["epoch"] for row in history]
    for ax, metric, title in ((axes[0], "accuracy", "accuracy"), (axes[1], "loss", "loss")):
        for prefix, split in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + metric) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", markersize=3, linewidth=2,
                        color=COLORS[split], label=split)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, frameon=False)
    _percent_axis(axes[0].yaxis)
    return _to_plot(figure)


def plot_trial_curves(histories: dict[str, list[dict]], best_trial_id: str | None) -> Plot:
    """Validation accuracy per epoch, one line per trial, the best one highlighted."""
    from matplotlib.ticker import MaxNLocator

    figure, (ax,) = _new_figure(9, 3.4)
    others_labelled = False
    for trial_id, history in histories.items():
        if trial_id == best_trial_id:
            continue
        rows = [row for row in history if row.get("val_accuracy") is not None]
        ax.plot([row["epoch"] for row in rows], [row["val_accuracy"] for row in rows],
                color=COLORS["other"], linewidth=1.2, alpha=0.8, marker="o", markersize=2.5,
                label=None if others_labelled else "other trials")
        others_labelled = True
    if best_trial_id in histories:
        rows = [row for row in histories[best_trial_id] if row.get("val_accuracy") is not None]
        ax.plot([row["epoch"] for row in rows], [row["val_accuracy"] for row in rows],
                color=COLORS["best"], linewidth=2.8, marker="o", markersize=4,
                label=f"best: {best_trial_id}", zorder=3)
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylabel("validation accuracy", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _percent_axis(ax.yaxis)
    ax.legend(fontsize=8, frameon=False)
    return _to_plot(figure)


def plot_hyperparameter(
    name: str, values: list, accuracies: list[float], best_position: int | None
) -> Plot:
    """Validation accuracy against one hyperparameter: a scatter for continuous numbers (log
    scale when they span a decade or more), a strip with jitter for choices (booleans, names,
    a few integers like filter counts); the best trial a star."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    figure, (ax,) = _new_figure(3.4, 2.5)
    present = [v for v in values if v is not None]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    few_integers = all(isinstance(v, int) for v in present) and len(set(present)) <= 6
    if numbers and not few_integers:
        x = [np.nan if v is None else v for v in values]  # an inactive value is not drawn
        if present and min(present) > 0 and max(present) >= 10 * min(present):
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(4))
    else:
        order = sorted(set(present), key=lambda v: (not numbers, str(v) if not numbers else v))
        categories = [format_value(v) for v in order] + (["inactive"] if None in values else [])
        labels = ["inactive" if v is None else format_value(v) for v in values]
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(labels))
        x = [categories.index(label) + offset for label, offset in zip(labels, jitter)]
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.scatter(x, accuracies, s=28, color=COLORS["train"], alpha=0.75, edgecolors="white",
               linewidths=0.5)
    if best_position is not None:
        ax.scatter([x[best_position]], [accuracies[best_position]], s=160, marker="*",
                   color=COLORS["best"], edgecolors="white", linewidths=0.8, zorder=3)
    ax.margins(0.12, 0.15)  # room for the star at the edges
    ax.set_title(name, fontsize=10, loc="left")
    _percent_axis(ax.yaxis)
    return _to_plot(figure)


def plot_breed_accuracy(per_breed_accuracy: dict[str, float], overall: float | None) -> Plot:
    """Accuracy per breed as horizontal bars, best at the top; with many breeds, the worst
    and the best `BREEDS_PER_END` side by side."""
    from matplotlib.colors import LinearSegmentedColormap

    # Worst first; ties read alphabetically from the top of the chart down.
    by_name = sorted(per_breed_accuracy.items(), key=lambda item: item[0].lower(), reverse=True)
    ranked = sorted(by_name, key=lambda item: item[1])
    if len(ranked) <= 2 * BREEDS_PER_END:
        panels = [(f"all {len(ranked)} breeds", ranked)]
    else:
        panels = [(f"worst {BREEDS_PER_END} of {len(ranked)}", ranked[:BREEDS_PER_END]),
                  (f"best {BREEDS_PER_END} of {len(ranked)}", ranked[-BREEDS_PER_END:])]
    bars = max(len(items) for _, items in panels)
    figure, axes = _new_figure(4.6 * len(panels), 0.8 + 0.24 * bars, columns=len(panels))
    colormap = LinearSegmentedColormap.from_list("accuracy", ["#d1495b", "#f4a259", "#2a9d8f"])
    for ax, (title, items) in zip(axes, panels):
        names = [name for name, _ in items]
        accuracies = [accuracy for _, accuracy in items]
        ax.barh(names, accuracies, height=0.72, color=[colormap(a) for a in accuracies])
        for position, accuracy in enumerate(accuracies):
            ax.text(accuracy + 0.01, position, f"{accuracy:.0%}", va="center", fontsize=7,
                    color="#52606d")
        if overall is not None:
            ax.axvline(overall, color="#1f2933", linestyle="--", linewidth=1,
                       label=f"overall {overall:.1%}")
            ax.legend(fontsize=7, frameon=False, loc="lower right")
        ax.set_xlim(0, 1.12)
        ax.set_ylim(-0.6, len(items) - 0.4)
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", labelsize=8, length=0)
        ax.set_title(title, fontsize=10, loc="left")
        _percent_axis(ax.xaxis)
    return _to_plot(figure)


def plot_comparison(rows: list[dict]) -> Plot:
    """The pipeline's final models side by side: test top-1 (dark) and top-5 (light) per model,
    in the table's order, the exported one in the `best` colour."""
    names = [row["name"] for row in rows][::-1]
    figure, (ax,) = _new_figure(6.4, 0.8 + 0.34 * len(rows))
    for position, row in enumerate(rows[::-1]):
        colour = COLORS["best"] if row["exported"] else COLORS["train"]
        ax.barh(position, row["test_top5"], height=0.72, color=colour, alpha=0.25)
        ax.barh(position, row["test_top1"], height=0.72, color=colour)
        ax.text(row["test_top1"] + 0.01, position, f"{row['test_top1']:.1%}", va="center", fontsize=7, color="#1f2933")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, 1.05)
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="y", labelsize=8, length=0)
    ax.set_xlabel("test accuracy: top-1 (dark), top-5 (light)", fontsize=8)
    _percent_axis(ax.xaxis)
    return _to_plot(figure)


def format_value(value) -> str:
    """A hyperparameter or metric as people read it."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
