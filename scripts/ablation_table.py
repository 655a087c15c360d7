"""The ablation sweeps' tables (issue 24) from the MLflow runs that `scripts/ablation_sweeps.sh`
made: each row's finetune / linprobe / k-NN top-1, gain, minutes per stage and pretrain
img/s, beside the paper's numbers (ViT-L, 800 epochs), as JSON and Markdown.

    python scripts/ablation_table.py results/ablations-2026-12-01 ablations-2026-12-01
"""

import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.params import load_params
from pipeline.tools.compare import compare_rows

# The paper's Table 1f / Figure 6 (fine-tune / linear), Figure 9 (fine-tune by blocks
# trained), Table 1a (decoder depth: fine-tune / linear); ViT-L, 800 epochs.
PAPER = {
    "pretrain.mask_type": {
        ("random", 0.75): (84.9, 73.5),
        ("block", 0.5): (83.9, 72.3),
        ("block", 0.75): (82.8, 63.9),
        ("grid", 0.75): (84.0, 66.0),
    },
    "finetune.trainable_blocks": {"0": (73.5, None), "1": (81.0, None), "None": (84.9, None)},
    "model.decoder_depth": {"1": (84.8, 65.5), "2": (84.9, 70.0), "4": (84.9, 71.9)},
}
KEYS = {"pretrain.mask_type": "mask type", "finetune.trainable_blocks": "trainable blocks",
        "model.decoder_depth": "decoder depth"}  # fmt: skip


def _default_elsewhere(key: str, r: dict) -> bool:
    """Whether row `r` of a table of `key` has every other ablation key at its default."""
    settings = {"pretrain.mask_type": "random", "finetune.trainable_blocks": "None",
                "model.decoder_depth": "2"}  # fmt: skip
    return all(r["differs"].get(k, v) == v for k, v in settings.items() if k != key)


def _metric(run_id: str, key: str) -> float | None:
    if not run_id:
        return None
    return mlflow.get_run(run_id).data.metrics.get(key)


def _row(key: str, r: dict) -> dict:
    value = r["value"]
    paper = PAPER[key].get((value, r["mask_ratio"]) if key == "pretrain.mask_type" else value)
    return {
        key: value,
        "mask_ratio": r["mask_ratio"],
        "finetune": r["finetune/test_top1"],
        "linprobe": r["linprobe/test_top1"],
        "knn": r["pretrain/knn_top1"],
        "scratch": r["scratch/test_top1"],
        "gain": r["mae_gain"],
        "pretrain_minutes": _metric(r["run_id"], "pretrain/minutes"),
        "pretrain_img_per_s": _metric(r["run_id"], "pretrain/img_per_s"),
        "finetune_minutes": _metric(r["finetune_run_id"], "finetune/minutes"),
        "paper_finetune": paper[0] if paper else None,
        "paper_linprobe": paper[1] if paper else None,
        "pretrain_run_id": r["run_id"],
        "finetune_run_id": r["finetune_run_id"],
    }


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}"


def _markdown(key: str, rows: list[dict]) -> str:
    head = f"| {KEYS[key]} | mask | finetune | linprobe | k-NN | gain | pretrain min | "
    head += "pretrain img/s | finetune min | paper fine-tune / linear |\n"
    head += "| --- " * 10 + "|\n"
    lines = []
    for r in rows:
        paper = "-" if r["paper_finetune"] is None else f"{r['paper_finetune']}"
        paper += f" / {r['paper_linprobe']}" if r["paper_linprobe"] is not None else ""
        minutes = [f"{m:.2f}" if m else "-" for m in (r["pretrain_minutes"], r["finetune_minutes"])]
        img_s = f"{r['pretrain_img_per_s']:.0f}" if r["pretrain_img_per_s"] else "-"
        gain = "-" if r["gain"] != r["gain"] else f"{100 * r['gain']:+.2f}"
        lines.append(
            f"| {r[key]} | {r['mask_ratio']} | {_pct(r['finetune'])} | {_pct(r['linprobe'])} | "
            f"{_pct(r['knn'])} | {gain} | {minutes[0]} | {img_s} | {minutes[1]} | {paper} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    out, experiment = Path(sys.argv[1]), sys.argv[2]
    p = load_params("params.yaml")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    tables = {}
    for key in KEYS:
        rows = [
            _row(key, r) for r in compare_rows(p, key, experiment) if _default_elsewhere(key, r)
        ]
        if key != "pretrain.mask_type":  # the default mask ratio
            rows = [r for r in rows if r["mask_ratio"] == 0.75]
        tables[key] = rows
        (out / f"table-{key.split('.')[-1]}.md").write_text(_markdown(key, rows))
    previous = out / "ablations.json"  # what was said of the runs by hand stays
    kept = json.loads(previous.read_text()) if previous.is_file() else {}
    sweeps = out / "sweeps.jsonl"
    meta = {
        "command": "scripts/ablation_sweeps.sh results/ablations-2026-12-01; "
        f"python scripts/ablation_table.py {out} {experiment}",
        "date": date.today().isoformat(),
        "commit": commit.strip(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 cores, no GPU",
        "params": "params.yaml defaults, with the swept key (and SET) of each sweep",
        "experiment": experiment,
        **{k: kept[k] for k in ("machine", "code_commit", "notes") if k in kept},
        "sweeps": [json.loads(x) for x in sweeps.read_text().splitlines()]
        if sweeps.exists()
        else [],
        "tables": tables,
    }
    (out / "ablations.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("\n\n".join((out / f"table-{k.split('.')[-1]}.md").read_text() for k in KEYS))


if __name__ == "__main__":
    main()
