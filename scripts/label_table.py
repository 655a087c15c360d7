"""The label table from `mae-cli compare --by data.labels --json`: per `data.labels` value,
finetune, scratch, linprobe, pixels, `mae_gain` and `probe_gain` as mean ± sd over the
subset draws (`data.labels_seed`), with the test set's standard error of the top-1.

    mae-cli compare --by data.labels --json --out plots/labels.png > rows.json
    python scripts/label_table.py rows.json --test-count 10000 > table.md

Rows of other pretrain runs than the newest one are left out (one encoder per table).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict

COLUMNS = {
    "finetune": "finetune/test_top1",
    "scratch": "scratch/test_top1",
    "linprobe": "linprobe/test_top1",
    "pixels": "pixels/test_top1",
    "mae_gain": "mae_gain",
    "probe_gain": "probe_gain",
}


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def table(rows: list[dict], test_count: int) -> str:
    newest = max(rows, key=lambda r: r["start_time"])["run_id"]
    points: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["run_id"] == newest:
            points[r["value"] if r["value"] not in ("", "None") else "every label"].append(r)
    lines = [
        "| data.labels | draws | " + " | ".join(COLUMNS) + " | test s.e. (finetune) |",
        "| --- " * (len(COLUMNS) + 3) + "|",
    ]
    for value, group in points.items():
        cells = [_cell([r[c] for r in group]) for c in COLUMNS.values()]
        p = statistics.fmean(r["finetune/test_top1"] for r in group)
        se = 100 * math.sqrt(p * (1 - p) / test_count)
        lines.append(f"| {value} | {len(group)} | " + " | ".join(cells) + f" | {se:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows")
    parser.add_argument("--test-count", type=int, default=10_000)
    args = parser.parse_args()
    with open(args.rows) as f:
        print(table(json.load(f), args.test_count))


if __name__ == "__main__":
    main()
