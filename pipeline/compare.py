"""Mask ratio against downstream accuracy across the tracked pretrain runs (the shape of
the paper's Figure 5): a table and a PNG."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline import tracking
from pipeline.params import Params

COLUMNS = ("finetune/test_top1", "linprobe/test_top1", "pretrain/loss")


def compare_rows(p: Params) -> list[dict]:
    experiment_id = tracking.connect(p.tracking)
    rows = []
    for run in tracking.stage_runs(experiment_id, "pretrain"):
        ratio = run.data.params.get("pretrain.mask_ratio")
        if ratio is None:
            continue
        rows.append(
            {
                "mask_ratio": float(ratio),
                "run_id": run.info.run_id,
                "status": run.info.status,
                "dvc_exp": run.data.tags.get("dvc.exp_name", ""),
                **{c: run.data.metrics.get(c, math.nan) for c in COLUMNS},
            }
        )
    return sorted(rows, key=lambda r: (r["mask_ratio"], r["run_id"]))


def format_rows(rows: list[dict]) -> str:
    lines = [
        f"{'mask':>5}  {'finetune top-1':>14}  {'linprobe top-1':>14}  {'pretrain loss':>13}"
        f"  {'run':<32}  {'dvc exp'}"
    ]
    for r in rows:
        cells = [f"{r[c]:.4f}" if not math.isnan(r[c]) else "-" for c in COLUMNS]
        lines.append(
            f"{r['mask_ratio']:>5.2f}  {cells[0]:>14}  {cells[1]:>14}  {cells[2]:>13}"
            f"  {r['run_id']:<32}  {r['dvc_exp']}"
        )
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in ((COLUMNS[0], "fine-tuning"), (COLUMNS[1], "linear probing")):
        points = sorted((r["mask_ratio"], r[column]) for r in rows if not math.isnan(r[column]))
        if points:
            ax.plot([x for x, _ in points], [100 * y for _, y in points], "o-", label=label)
    ax.set_xlabel("masking ratio")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Masking ratio vs downstream accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
