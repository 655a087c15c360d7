"""One setting against downstream accuracy across the tracked pretrain runs: the mask
ratio by default (the shape of the paper's Figure 5), or any key a sweep varied
(`--by pretrain.mask_type`, `finetune.trainable_blocks`, `model.decoder_depth`, ...),
numbers or names: a table, JSON and a PNG.

Like is compared with like: runs that differ in anything but that key (epochs, model,
recipe, data digest, code) fall into separate series, and the table names what differs
between them. Two commits are the same code when git shows no change under `mae/`,
`pipeline/` and in `dvc.yaml` between them; a run of uncommitted edits (tag `git.dirty`)
is its commit plus those edits, a series of its own per code digest
(`pipeline.tracking.code`).
"""

from __future__ import annotations

import math
import string
import subprocess

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.params import Params, project_root
from pipeline.settings import NOT_A_SETTING
from pipeline.tracking.code import CODE_DIRS, STAGES_FILE

COLUMNS = (
    "finetune/test_top1",
    "linprobe/test_top1",
    "scratch/test_top1",
    "mae_gain",
    "pixels/test_top1",
    "probe_gain",
    "pretrain/knn_top1",
    "pretrain/loss",
)
HEADERS = ("finetune", "linprobe", "scratch", "gain", "pixels", "p-gain", "k-NN", "loss")
FROM_PRETRAIN = ("pretrain/knn_top1", "pretrain/loss")  # the rest: from the runs paired
LABEL_KEYS = ("data.labels", "data.labels_seed")  # the children's: pretraining reads none
DEFAULT_BY = "pretrain.mask_ratio"
TAGS = ("data.manifest_digest", "git.commit", "git.dirty", "code.digest")
# what a run computes with, besides its params and data
CODE = (*CODE_DIRS, STAGES_FILE)


def _setting(run, finetune=None, linprobe=None) -> dict[str, str]:
    """What a row computed with: the pretrain run's params (and tags), its `finetune.*` and
    `linprobe.*` replaced by those of the runs that produced its results."""
    params = {k: v for k, v in run.data.params.items() if not k.startswith(NOT_A_SETTING)}
    for section, child in (("finetune", finetune), ("linprobe", linprobe)):
        if child is not None:
            params = {k: v for k, v in params.items() if not k.startswith(f"{section}.")}
            params |= _downstream_setting(child, section)
    child = finetune or linprobe  # the label key the row's results were trained with
    if child is not None:
        params |= {k: child.data.params[k] for k in LABEL_KEYS if k in child.data.params}
    return params | {t: run.data.tags.get(t, "") for t in TAGS}


def _code_unchanged(a: str, b: str) -> bool:
    """Whether git (in this project) shows no change under `CODE` between commits a and b;
    False when it cannot tell (e.g. a commit this clone does not have)."""
    try:
        diff = subprocess.run(
            ["git", "diff", "--quiet", a, b, "--", *CODE],
            cwd=project_root(),
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


def _code_label(commit: str, dirty: str, digest: str) -> str:
    """The code a run ran, as compare shows it: its commit, or its commit plus uncommitted
    edits named by their digest (runs of other edits on one commit are other code)."""
    return f"{commit} + uncommitted edits {digest[:12]}" if dirty == "true" else commit


def compare_rows(p: Params, by: str | None = None, experiment: str | None = None) -> list[dict]:
    """One row per pretrain run and fine-tuning setting: its finetune, linprobe and scratch
    test top-1, gain and k-NN, each read from the run that produced it (a finetune child,
    the scratch run of the same `finetune.*` params, the newest linprobe child), whose
    params join the row's setting: a second fine-tune of one pretrain run with other
    params is a row of its own. `by`: the key compared (the row's `value`); default: the
    mask ratio, or the one key that varies when the mask ratio does not. `series` groups
    the rows that share every other setting, `differs` says what sets each series apart.
    `experiment`: another MLflow experiment than `tracking.experiment` (a sweep's own).
    UserError for an experiment that does not exist or has no pretrain run, and for a
    `by` that no run has."""
    name = experiment or p.tracking.experiment
    store = p.tracking.model_copy(update={"experiment": name})
    pairs = _pairs(tracking.connect(store, create=False))  # a typo makes no experiment
    if not pairs:
        raise UserError(f"no pretrain runs in experiment {name!r} (run `dvc repro`)")
    settings = [_setting(run, finetune, linprobe) for run, finetune, linprobe, *_ in pairs]
    code = _same_code([s["git.commit"] for s in settings])
    for s in settings:
        s["git.commit"] = _code_label(
            code[s["git.commit"]], s.pop("git.dirty"), s.pop("code.digest")
        )
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    by = _check_by(by, keys, varying) if by else _default_by(varying)
    series: dict[tuple, str] = {}
    rows = []
    for (run, *results), setting in zip(pairs, settings, strict=True):
        differs = {k: setting.get(k, "") for k in varying if k != by}
        name = series.setdefault(tuple(differs.items()), string.ascii_uppercase[len(series) % 26])
        row = _row(run, *results)
        rows.append({"series": name, "by": by, "value": setting.get(by, ""), **row})
        rows[-1]["differs"] = differs
    return sorted(rows, key=lambda r: (r["series"], order(r["value"]), r["start_time"]))


def _pairs(experiment_id: str) -> list[tuple]:
    """(pretrain, finetune, linprobe, scratch, pixels) runs, one per pretrain run and
    fine-tuning setting, oldest pretrain run first; finished or running runs only."""
    done = ("FINISHED", "RUNNING")  # a FAILED or KILLED run compares nothing
    runs = [
        r
        for r in tracking.stage_runs(experiment_id, "pretrain")
        if "pretrain.mask_ratio" in r.data.params and r.info.status in done
    ]
    runs.sort(key=lambda r: r.info.start_time)
    downstream = [
        r
        for stage in ("finetune", "linprobe", "scratch", "pixels")
        for r in tracking.stage_runs(experiment_id, stage)
        if r.info.status in done
    ]
    downstream.sort(key=lambda r: r.info.start_time)  # newest last
    return [(run, *results) for run in runs for results in _results(run, downstream)]


def _default_by(varying: list[str]) -> str:
    params = [k for k in varying if k not in TAGS]
    return params[0] if len(params) == 1 else DEFAULT_BY


def _check_by(by: str, keys: list[str], varying: list[str]) -> str:
    if by not in keys:
        shown = ", ".join(k for k in varying if k not in TAGS) or "none"
        raise UserError(f"compare --by {by}: no run has that param (keys that vary: {shown})")
    return by


def _row(run, finetune, linprobe, scratch, pixels) -> dict:
    runs = (("finetune", finetune), ("linprobe", linprobe), ("scratch", scratch))
    runs += (("pixels", pixels),)
    top1 = {f"{s}/test_top1": _top1(r) for s, r in runs}
    return {
        "mask_ratio": float(run.data.params["pretrain.mask_ratio"]),
        "run_id": run.info.run_id,
        **{f"{s}_run_id": r.info.run_id if r else "" for s, r in runs},
        "status": run.info.status,
        "start_time": run.info.start_time,
        "dvc_exp": run.data.tags.get("dvc.exp_name", ""),
        **top1,
        "mae_gain": top1["finetune/test_top1"] - top1["scratch/test_top1"],
        "probe_gain": top1["linprobe/test_top1"] - top1["pixels/test_top1"],
        "train_labels": _train_labels(finetune or linprobe),
        **{c: run.data.metrics.get(c, math.nan) for c in FROM_PRETRAIN},
    }


def to_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def order(value: str) -> tuple:
    """Numbers in numeric order before names (e.g. trainable_blocks 0, 1, 2, then None)."""
    number = to_number(value)
    return (0, number, "") if number is not None else (1, 0.0, value)


def _downstream_setting(run, section: str) -> dict[str, str]:
    return {
        k: v
        for k, v in run.data.params.items()
        if k.startswith(f"{section}.") and not k.startswith(NOT_A_SETTING)
    }


def _results(pretrain, downstream: list) -> list[tuple]:
    """(finetune, linprobe, scratch, pixels) runs of a pretrain run, one tuple per
    fine-tuning setting among its finetune children (the newest of each); each result
    beside the newest linprobe child and the controls trained on its labels with its
    recipe; None where there is none."""
    parent = pretrain.info.run_id
    children = [r for r in downstream if r.data.tags.get("mlflow.parentRunId") == parent]
    linprobes = {_labels(r): r for r in children if r.data.tags.get("stage") == "linprobe"}
    newest: dict[tuple, object] = {}
    for r in (r for r in children if r.data.tags.get("stage") == "finetune"):
        newest[_finetune_key(r)] = r
    scratches = [r for r in downstream if r.data.tags.get("stage") == "scratch"]
    pixels = [r for r in downstream if r.data.tags.get("stage") == "pixels"]
    if not newest:
        return [(None, *_probe_pair(list(linprobes.values())[-1:] or [None], pixels), None)]
    out = []
    for finetune in newest.values():
        control = _finetune_key(finetune, control=True)
        same = [r for r in scratches if _finetune_key(r, control=True) == control]
        linprobe, control_px = _probe_pair([linprobes.get(_labels(finetune))], pixels)
        out.append((finetune, linprobe, same[-1] if same else None, control_px))
    return out


def _probe_pair(linprobe: list, pixels: list) -> tuple:
    """(linprobe, the newest pixels run of its labels and recipe) from [linprobe or None]."""
    probe = linprobe[0]
    if probe is None:
        return None, None
    same = [r for r in pixels if _probe_key(r) == _probe_key(probe)]
    return probe, (same[-1] if same else None)


def _train_labels(run) -> float:
    """The train images the run's labels kept (`labels.train_count`): where a label sweep's
    points lie, whether given per class or as a fraction; NaN for older runs."""
    count = run.data.params.get("labels.train_count") if run is not None else None
    return float(count) if count is not None else math.nan


def _labels(run) -> str:
    """The run's label subset (its digest; "all" for every label and for older runs)."""
    return run.data.params.get("labels.digest", "all")


def _probe_key(run) -> tuple:
    """What a linear probe and its pixels control share: the labels and `linprobe.*` but
    `pool` and `augment` (pixels logs the section as `pixels.*`)."""
    from pipeline.sections import LinprobeParams

    prefix = run.data.tags.get("stage", "linprobe") + "."
    keys = [k for k in LinprobeParams.model_fields if k not in ("pool", "augment")]
    return (_labels(run), *(run.data.params.get(prefix + k) for k in keys))


def _finetune_key(run, control: bool = False) -> tuple:
    """The fine-tuning params of a finetune run or a scratch run (which logs its section,
    `finetune`, as `scratch.*`); the lr and the effective batch follow from them.
    `control`: those its scratch control shares (not `trainable_blocks`: the control
    trains every block, one control for every setting of it)."""
    prefix = "scratch." if run.data.tags.get("stage") == "scratch" else "finetune."
    params = {
        f"finetune.{k.removeprefix(prefix)}": v
        for k, v in run.data.params.items()
        if k.startswith(prefix)
    }
    derived = ("finetune.lr", "finetune.effective_batch", "finetune.trainable_parameters")
    derived += ("finetune.trainable_blocks",) if control else ()
    kept = sorted(
        (k, v) for k, v in params.items() if not k.startswith(NOT_A_SETTING) and k not in derived
    )
    return (("labels", _labels(run)), *kept)


def _top1(run) -> float:
    return run.data.metrics.get("test/top1", math.nan) if run is not None else math.nan
