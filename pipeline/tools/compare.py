"""Mask ratio against downstream accuracy across the tracked pretrain runs (the shape of
the paper's Figure 5): a table, JSON and a PNG.

Like is compared with like: runs that differ in anything but the mask ratio (epochs,
model, recipe, data digest, code) fall into separate series, and the table names what
differs between them. Two commits are the same code when git shows no change under
`mae/` and `pipeline/` between them.
"""

from __future__ import annotations

import math
import string
import subprocess
from pathlib import Path

from pipeline import tracking
from pipeline.params import Params

COLUMNS = (
    "finetune/test_top1",
    "linprobe/test_top1",
    "scratch/test_top1",
    "mae_gain",
    "pretrain/knn_top1",
    "pretrain/loss",
)
HEADERS = ("finetune", "linprobe", "scratch", "gain", "k-NN", "loss")
# Params that do not change what a run computes, or that the mask ratio derives.
NOT_A_SETTING = (
    "pretrain.mask_ratio",
    "pretrain.patches_kept",
    "pretrain.log_every",
    "pretrain.recon_every",
    "pretrain.probe_every",
    "finetune.log_every",
    "linprobe.log_every",
    "data.workers",
    "data.cache",  # and data.cache_max_gb: where remote shards are kept, not what they hold
    "data.in_memory",  # and data.train_in_memory: held or streamed, the same batches
    "data.train_in_memory",
    "runtime.num_workers",
    "runtime.nproc",
    "tracking.",
    "paths.",
)
TAGS = ("data.manifest_digest", "git.commit")
CODE = ("mae", "pipeline")  # what a run computes with, besides its params and data


def _setting(run, finetune=None, linprobe=None) -> dict[str, str]:
    """What a row computed with: the pretrain run's params (and tags), its `finetune.*` and
    `linprobe.*` replaced by those of the runs that produced its results."""
    params = {k: v for k, v in run.data.params.items() if not k.startswith(NOT_A_SETTING)}
    for section, child in (("finetune", finetune), ("linprobe", linprobe)):
        if child is not None:
            params = {k: v for k, v in params.items() if not k.startswith(f"{section}.")}
            params |= _downstream_setting(child, section)
    return params | {t: run.data.tags.get(t, "") for t in TAGS}


def _code_unchanged(a: str, b: str) -> bool:
    """Whether git (in this project) shows no change under `CODE` between commits a and b;
    False when it cannot tell (e.g. a commit this clone does not have)."""
    try:
        diff = subprocess.run(
            ["git", "diff", "--quiet", a, b, "--", *CODE],
            cwd=tracking.project_root(),
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return diff.returncode == 0


def _same_code(commits: list[str]) -> dict[str, str]:
    """Each commit -> the first of `commits` with the same code: a commit that changed only
    results, docs or dvc.lock does not start a new series."""
    canonical: dict[str, str] = {}
    for commit in commits:
        if commit not in canonical:
            same = (c for c in dict.fromkeys(canonical.values()) if _code_unchanged(c, commit))
            canonical[commit] = next(same, commit) if commit else commit
    return canonical


def compare_rows(p: Params) -> list[dict]:
    """One row per pretrain run and fine-tuning setting: its finetune, linprobe and scratch
    test top-1, gain and k-NN, each read from the run that produced it (a finetune child,
    the scratch run of the same `finetune.*` params, the newest linprobe child), whose
    params join the row's setting: a second fine-tune of one pretrain run with other
    params is a row of its own. `series` groups the rows that share every setting but
    the mask ratio, `differs` says what sets each series apart."""
    experiment_id = tracking.connect(p.tracking)
    done = ("FINISHED", "RUNNING")  # a FAILED or KILLED run compares nothing
    runs = [
        r
        for r in tracking.stage_runs(experiment_id, "pretrain")
        if "pretrain.mask_ratio" in r.data.params and r.info.status in done
    ]
    runs.sort(key=lambda r: r.info.start_time)
    downstream = [
        r
        for stage in ("finetune", "linprobe", "scratch")
        for r in tracking.stage_runs(experiment_id, stage)
        if r.info.status in done
    ]
    downstream.sort(key=lambda r: r.info.start_time)  # newest last
    pairs = [(run, *results) for run in runs for results in _results(run, downstream)]
    settings = [_setting(run, finetune, linprobe) for run, finetune, linprobe, _ in pairs]
    code = _same_code([s["git.commit"] for s in settings])
    for s in settings:
        s["git.commit"] = code[s["git.commit"]]
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    series: dict[tuple, str] = {}
    rows = []
    for (run, finetune, linprobe, scratch), setting in zip(pairs, settings, strict=True):
        differs = {k: setting.get(k, "") for k in varying}
        name = series.setdefault(tuple(differs.items()), string.ascii_uppercase[len(series) % 26])
        top1 = {
            "finetune/test_top1": _top1(finetune),
            "linprobe/test_top1": _top1(linprobe),
            "scratch/test_top1": _top1(scratch),
        }
        rows.append(
            {
                "series": name,
                "mask_ratio": float(run.data.params["pretrain.mask_ratio"]),
                "run_id": run.info.run_id,
                **{
                    f"{s}_run_id": r.info.run_id if r else ""
                    for s, r in (
                        ("finetune", finetune),
                        ("linprobe", linprobe),
                        ("scratch", scratch),
                    )
                },
                "status": run.info.status,
                "start_time": run.info.start_time,
                "dvc_exp": run.data.tags.get("dvc.exp_name", ""),
                **top1,
                "mae_gain": top1["finetune/test_top1"] - top1["scratch/test_top1"],
                **{c: run.data.metrics.get(c, math.nan) for c in COLUMNS[4:]},
                "differs": differs,
            }
        )
    return sorted(rows, key=lambda r: (r["series"], r["mask_ratio"], r["start_time"]))


def _downstream_setting(run, section: str) -> dict[str, str]:
    return {
        k: v
        for k, v in run.data.params.items()
        if k.startswith(f"{section}.") and not k.startswith(NOT_A_SETTING)
    }


def _results(pretrain, downstream: list) -> list[tuple]:
    """(finetune, linprobe, scratch) runs of a pretrain run, one tuple per fine-tuning
    setting among its finetune children (the newest of each); None where there is none."""
    parent = pretrain.info.run_id
    children = [r for r in downstream if r.data.tags.get("mlflow.parentRunId") == parent]
    linprobes = [r for r in children if r.data.tags.get("stage") == "linprobe"]
    linprobe = linprobes[-1] if linprobes else None
    newest: dict[tuple, object] = {}
    for r in (r for r in children if r.data.tags.get("stage") == "finetune"):
        newest[_finetune_key(r)] = r
    if not newest:
        return [(None, linprobe, None)]
    scratches = [r for r in downstream if r.data.tags.get("stage") == "scratch"]
    out = []
    for setting, finetune in newest.items():
        same = [r for r in scratches if _finetune_key(r) == setting]
        out.append((finetune, linprobe, same[-1] if same else None))
    return out


def _finetune_key(run) -> tuple:
    """The fine-tuning params of a finetune run or a scratch run (which logs its section,
    `finetune`, as `scratch.*`); the lr and the effective batch follow from them."""
    prefix = "scratch." if run.data.tags.get("stage") == "scratch" else "finetune."
    params = {
        f"finetune.{k.removeprefix(prefix)}": v
        for k, v in run.data.params.items()
        if k.startswith(prefix)
    }
    derived = ("finetune.lr", "finetune.effective_batch")
    return tuple(
        sorted(
            (k, v)
            for k, v in params.items()
            if not k.startswith(NOT_A_SETTING) and k not in derived
        )
    )


def _top1(run) -> float:
    return run.data.metrics.get("test/top1", math.nan) if run is not None else math.nan


def _cell(value: float, column: str) -> str:
    if math.isnan(value):
        return "-"
    if column == "mae_gain":
        return f"{100 * value:+.2f}"
    return f"{value:.4f}" if column == "pretrain/loss" else f"{100 * value:.2f}"


def format_rows(rows: list[dict]) -> str:
    """The table (accuracies in %, gain in points), then what sets each series apart."""
    lines = [
        f"{'series':<6}  {'mask':>5}  "
        + "  ".join(f"{h:>8}" for h in HEADERS)
        + f"  {'status':<8}  {'run':<32}  dvc exp"
    ]
    for r in rows:
        cells = "  ".join(f"{_cell(r[c], c):>8}" for c in COLUMNS)
        lines.append(
            f"{r['series']:<6}  {r['mask_ratio']:>5.2f}  {cells}  {r['status']:<8}"
            f"  {r['run_id']:<32}  {r['dvc_exp']}"
        )
    names = sorted({r["series"] for r in rows})
    lines.append("")
    if len(names) == 1:
        lines.append(f"series {names[0]}: every run shares all settings but the mask ratio")
    else:
        lines.append("series differ in more than the mask ratio; each is compared on its own:")
        for name in names:
            differs = next(r["differs"] for r in rows if r["series"] == name)
            text = ", ".join(f"{k}={_short(k, v)}" for k, v in differs.items())
            lines.append(f"  {name}: {text}")
    return "\n".join(lines)


def _short(key: str, value: str) -> str:
    return value[:10] if key in TAGS else value


def plot_rows(rows: list[dict], path: Path) -> None:
    """Fine-tuning (solid), linear probing (dashed), test top-1, the k-NN probe's val top-1
    (dash-dot) and scratch (dotted) against the mask ratio, one colour per series; a re-run
    ratio shows its newest run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ((COLUMNS[0], "o-", "fine-tuning"), (COLUMNS[1], "s--", "linear probing"))
    styles += ((COLUMNS[4], "^-.", "k-NN (pretraining)"), (COLUMNS[2], ":", "scratch"))
    for i, name in enumerate(sorted({r["series"] for r in rows})):
        newest = {r["mask_ratio"]: r for r in rows if r["series"] == name}  # rows sorted by time
        for column, style, label in styles:
            points = sorted((x, r[column]) for x, r in newest.items() if not math.isnan(r[column]))
            if points:
                ax.plot(
                    [x for x, _ in points],
                    [100 * y for _, y in points],
                    style,
                    color=f"C{i}",
                    label=f"{label} [{name}]",
                )
    ax.set_xlabel("masking ratio")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Masking ratio vs downstream accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
