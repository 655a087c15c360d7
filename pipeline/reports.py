"""Files DVC reads: flat JSON metrics and CSV curves (plus a PNG, since `dvc plots show`
loads its charting library from a CDN and is blank offline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    """Flat JSON, put in place by one rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: round(float(v), 6) for k, v in metrics.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def write_curve(path: Path, rows: list[dict[str, float]], fields: list[str] | None = None) -> None:
    """rows of equal keys (`fields`, default the first row's) -> CSV; the first key is the
    x axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or (list(rows[0]) if rows else ["step"]))
        writer.writeheader()
        writer.writerows(rows)


def write_predictions(path: Path, images: dict[str, list], classes: list[str]) -> None:
    """Per image: its key, true class, predicted class and probability, then every class's;
    written aside and renamed into place, so a failure never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part")
    with part.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["key", "true_class", "class", "probability", *classes])
        for key, label, probs in zip(
            images["key"], images["label"], images["probabilities"], strict=True
        ):
            best = max(range(len(classes)), key=probs.__getitem__)
            out.writerow([key, classes[label], classes[best], probs[best], *probs])
    part.replace(path)


def plot_curve(path: Path, rows: list[dict[str, float]], x: str, ys: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 3.5), squeeze=False)
    for ax, y in zip(axes[0], ys, strict=True):
        ax.plot([r[x] for r in rows], [r[y] for r in rows])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


ANNOTATED_MAX = 30  # classes: up to this, every cell of a confusion matrix is written out
HEATMAP_CELLS = 500  # classes: beyond this, neighbouring classes share a cell of the heat map


def confusion_png(confusion: list[list[int]], classes: list[str], title: str) -> bytes:
    """The confusion matrix (rows: true class) as a PNG of bounded size: every count
    written in its cell up to `ANNOTATED_MAX` classes; beyond, a heat map of each row's
    fractions on a fixed canvas, neighbouring classes summed into one cell past
    `HEATMAP_CELLS` (a 1,000-class matrix drawn cell by cell was ~60,000 px a side)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = len(classes) <= ANNOTATED_MAX
    fig = _annotated(plt, confusion, classes) if small else _heatmap(plt, confusion, len(classes))
    fig.axes[0].set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _annotated(plt, confusion: list[list[int]], classes: list[str]):
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n, 1 + 0.6 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            color = "white" if v > top / 2 else "black"
            ax.text(j, i, v, ha="center", va="center", fontsize=7, color=color)
    return fig


def _heatmap(plt, confusion: list[list[int]], n: int):
    import numpy as np

    per_cell = -(-n // HEATMAP_CELLS)  # classes summed into one cell, each way
    cells = -(-n // per_cell)
    matrix = np.zeros((cells * per_cell, cells * per_cell))
    matrix[:n, :n] = confusion
    matrix = matrix.reshape(cells, per_cell, cells, per_cell).sum(axis=(1, 3))
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(10, 9))
    shown = ax.imshow(rows, cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, label="fraction of the row")
    unit = "class index" if per_cell == 1 else f"class index / {per_cell}"
    ax.set_xlabel(f"predicted ({unit})")
    ax.set_ylabel(f"true ({unit})")
    return fig
