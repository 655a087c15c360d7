"""`mae-cli compare`'s rows (`compare.compare_rows`) as a person reads them: a table and
a plot of top-1 against the compared key."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.tools.compare import COLUMNS, DEFAULT_BY, HEADERS, TAGS, order, to_number


def _cell(value: float, column: str) -> str:
    if math.isnan(value):
        return "-"
    if column in ("mae_gain", "probe_gain"):
        return f"{100 * value:+.2f}"
    return f"{value:.4f}" if column == "pretrain/loss" else f"{100 * value:.2f}"


def format_rows(rows: list[dict]) -> str:
    """The table (accuracies in %, gain in points), then what sets each series apart."""
    by = rows[0]["by"] if rows else DEFAULT_BY
    label = by.split(".")[-1]
    width = max([len(label), *(len(r["value"]) for r in rows)])
    lines = [
        f"{'series':<6}  {label:>{width}}  "
        + "  ".join(f"{h:>8}" for h in HEADERS)
        + f"  {'status':<8}  {'run':<32}  dvc exp"
    ]
    for r in rows:
        cells = "  ".join(f"{_cell(r[c], c):>8}" for c in COLUMNS)
        lines.append(
            f"{r['series']:<6}  {r['value']:>{width}}  {cells}  {r['status']:<8}"
            f"  {r['run_id']:<32}  {r['dvc_exp']}"
        )
    names = sorted({r["series"] for r in rows})
    lines.append("")
    if len(names) == 1:
        lines.append(f"series {names[0]}: every run shares all settings but {by}")
    else:
        lines.append(f"series differ in more than {by}; each is compared on its own:")
        for name in names:
            differs = next(r["differs"] for r in rows if r["series"] == name)
            text = ", ".join(f"{k}={_short(k, v)}" for k, v in differs.items())
            lines.append(f"  {name}: {text}")
    return "\n".join(lines)


def _short(key: str, value: str) -> str:
    return value[:10] if key in TAGS else value


def plot_rows(rows: list[dict], path: Path) -> None:
    """Fine-tuning (solid), linear probing (dashed), test top-1, the k-NN probe's val top-1
    (dash-dot) and scratch (dotted) against the compared key, one colour per series: on a
    number line for numbers, side by side for names (mask types); a value run again shows
    its newest run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = rows[0]["by"] if rows else DEFAULT_BY
    values = sorted({r["value"] for r in rows}, key=order)
    numeric = all(to_number(v) is not None for v in values)
    x_of = (lambda v: to_number(v)) if numeric else values.index
    counted = by == "data.labels" and any(r["train_labels"] > 0 for r in rows)
    if counted:  # a label sweep: its points where they lie, per class or a fraction alike
        # (runs from before the label key have no count: left out of the plot)
        rows = [{**r, "value": str(r["train_labels"])} for r in rows if r["train_labels"] > 0]
        values, numeric, x_of = sorted({r["value"] for r in rows}, key=order), True, to_number
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ((COLUMNS[0], "o-", "fine-tuning"), (COLUMNS[1], "s--", "linear probing"))
    styles += ((COLUMNS[6], "^-.", "k-NN (pretraining)"), (COLUMNS[2], ":", "scratch"))
    styles += ((COLUMNS[4], "x:", "pixels (probe's control)"),)
    for i, name in enumerate(sorted({r["series"] for r in rows})):
        newest = {r["value"]: r for r in rows if r["series"] == name}  # rows sorted by time
        for column, style, label in styles:
            points = sorted(
                (x_of(v), r[column]) for v, r in newest.items() if not math.isnan(r[column])
            )
            if points:
                ax.plot(
                    [x for x, _ in points],
                    [100 * y for _, y in points],
                    style,
                    color=f"C{i}",
                    label=f"{label} [{name}]",
                )
    if not numeric:
        ax.set_xticks(range(len(values)), values)
    elif len(values) > 1 and 0 < min(map(x_of, values)) <= max(map(x_of, values)) / 10:
        ax.set_xscale("log")  # values across a decade or more (a label sweep)
    ax.set_xlabel("train images with labels (data.labels)" if counted else by)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{by} vs downstream accuracy")
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7, loc="best", ncol=2 if len(styles) * len({r["series"] for r in rows}) > 10 else 1
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
