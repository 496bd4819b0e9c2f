"""The report's pictures (matplotlib, no display needed): confusion matrices, curves, the UA bar chart.

Each function draws one figure from plain numbers into one PNG and returns its path; which figures
a report holds, and the numbers in them, are `emotrain.report.write_figures`' business.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a compute node
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(confusion: np.ndarray, labels: list[str], title: str, path: Path) -> Path:
    """Two panels: counts and row-normalised (each true class sums to 1). Rows = true class."""
    plt = _pyplot()
    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), dpi=DPI)
    # Counts scale to their own maximum; proportions always to 0-1, so that every report's
    # row-normalised panels share one colour scale and compare at a glance.
    panels = ((axes[0], confusion, "counts", "{:.0f}", max(confusion.max(), 1e-9)),
              (axes[1], normalised, "row-normalised", "{:.2f}", 1.0))
    for ax, matrix, kind, fmt, top in panels:
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(kind)
        threshold = top / 2
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center",
                        color="white" if matrix[i, j] > threshold else "black", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curves_figure(series: dict[str, list[tuple[int, float]]], title: str, path: Path) -> Path:
    """Training and validation loss (left axis) and validation WA/UA (right axis) against the optimizer step."""
    plt = _pyplot()
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=DPI)
    for key, label, style in (("train/loss", "training loss", "-"), ("eval/loss", "validation loss", "o--")):
        if series.get(key):
            steps, values = zip(*series[key])
            loss_axis.plot(steps, values, style, color="tab:blue", label=label)
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss", color="tab:blue")
    metric_axis = loss_axis.twinx()
    for key, color in (("eval/ua", "tab:red"), ("eval/wa", "tab:orange")):
        if series.get(key):
            steps, values = zip(*series[key])
            metric_axis.plot(steps, values, marker="o", color=color, label=f"validation {key.split('/')[1].upper()}")
    metric_axis.set_ylim(0, 1)
    metric_axis.set_ylabel("validation")
    handles = [h for ax in (loss_axis, metric_axis) for h in ax.get_legend_handles_labels()[0]]
    labels = [lbl for ax in (loss_axis, metric_axis) for lbl in ax.get_legend_handles_labels()[1]]
    if handles:  # below the axes: inside, "best" still covers a curve when loss and UA cross the whole plot
        loss_axis.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(handles),
                         frameon=False)
    loss_axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ua_bar_figure(names: list[str], fold_values: list[dict[int, float]], path: Path) -> Path:
    """Mean test UA per experiment with ± sd error bars over folds, each fold's UA as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names) + 2), 4), dpi=DPI)
    for i, values in enumerate(fold_values):
        points = np.array(list(values.values()), dtype=np.float64)
        sd = points.std(ddof=1) if len(points) > 1 else 0.0
        ax.bar(i, points.mean(), yerr=sd, capsize=6, color=f"C{i}", alpha=0.8)
        ax.scatter(np.full(len(points), i) + np.linspace(-0.15, 0.15, len(points)), points, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test UA (mean ± sd over folds)")
    ax.set_title("UA by experiment")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
