"""Evaluate a tracked model on the test split: the evaluate stage and
`mae-cli evaluate --run-id` share this code.

The stage reads the models DVC tracks (`paths.models`/<stage>, which it depends on);
`--run-id` reads the run's MLflow artifacts, so a fresh clone that reaches the same store
and has the shards can evaluate any run. The results go back to the run, and the headline
top-1 to its parent pretrain run, so pretrain runs compare mask ratios alone.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mae import MAEConfig
from pipeline import kept, reports, tracking
from pipeline.artifacts import check_shards, load_classifier
from pipeline.data.loader import build_loader
from pipeline.data.store import shard_store
from pipeline.errors import UserError
from pipeline.params import Params, flatten
from pipeline.stages import CLASSIFIER_STAGES
from pipeline.train.eval import evaluate
from pipeline.train.runtime import resolve_runtime

log = logging.getLogger(__name__)


def evaluate_run(
    p: Params, run_id: str, folder: Path | None = None, per_image: bool = False
) -> list[dict]:
    """Evaluate a finetune, linprobe or scratch run, or a pretrain run's children and the
    scratch control it names (then `mae_gain` too). `folder`: the run's model as a stage
    wrote it, read instead of the run's artifacts. `per_image`: each result also holds
    every test image's key, label and class probabilities (`images`)."""
    tracking.connect(p.tracking)
    run = tracking.get_run(run_id)
    stage = run.data.tags.get("stage")
    if stage == "pretrain":
        runs = tracking.child_runs(run, CLASSIFIER_STAGES)
        if not runs:
            raise UserError(f"pretrain run {run_id} has no finetune or linprobe run to evaluate")
        for control in ("scratch", "pixels"):  # the controls it names
            if run_id_ := run.data.tags.get(f"{control}.run_id"):
                runs.append(tracking.get_run(run_id_))
        log.info("run %s is a pretrain run: evaluating %d run(s)", run_id, len(runs))
        _check_active(runs)
        return with_gain([_evaluate_one(p, r, None, per_image) for r in runs])
    if stage not in CLASSIFIER_STAGES:
        raise UserError(
            f"run {run_id} is a {stage or 'untagged'} run; give a "
            f"{', '.join(CLASSIFIER_STAGES)} or pretrain run"
        )
    _check_active([run])
    return [_evaluate_one(p, run, folder, per_image)]


def _check_active(runs: list) -> None:
    """The runs the results go to and their parent pretrain runs are in the store and not
    deleted (MLflow refuses to log to a deleted run): checked before any work."""
    for run in runs:
        stage = run.data.tags.get("stage")
        tracking.check_active(run, f"the {stage}")  # fetched already
        if parent := run.data.tags.get("mlflow.parentRunId"):
            tracking.active_run(parent, f"the {stage} run's parent pretrain")


def _child_step(run, parent: str) -> int:
    """The run's place (1, 2, ...) among its parent's children of its stage, by start."""
    siblings = tracking.child_runs(tracking.get_run(parent), (run.data.tags["stage"],))
    starts = sorted(r.info.start_time for r in siblings)
    return starts.index(run.info.start_time) + 1 if run.info.start_time in starts else 0


def _params_differ(p: Params, run, stage: str) -> dict[str, list[str]]:
    """The run's own section's params that params.yaml now sets otherwise:
    {key: [the run's value, params.yaml's]}."""
    section = "linprobe" if stage in ("linprobe", "pixels") else "finetune"
    now = {f"{section}.{k}": str(v) for k, v in flatten(getattr(p, section)).items()}
    ran = run.data.params
    return {k: [ran[k], v] for k, v in now.items() if k in ran and ran[k] != v}


# A result and its control: (control stage, the gain's name, the section, the section's
# keys the control does not read). A pair trained on other labels or another recipe is none.
CONTROLS = {
    "finetune": ("scratch", "mae_gain", "finetune", ("trainable_blocks",)),
    "linprobe": ("pixels", "probe_gain", "linprobe", ("pool", "augment")),
}


def pairing(run, stage: str) -> str:
    """What a result and its control must share, from the run's own params: its label
    subset (`labels.digest`) and its section's keys (a control's own prefix is its stage's
    name: scratch logs `scratch.epochs` for `finetune.epochs`)."""
    from pipeline.sections import FinetuneParams, LinprobeParams

    section = "linprobe" if stage in ("linprobe", "pixels") else "finetune"
    fields = (LinprobeParams if section == "linprobe" else FinetuneParams).model_fields
    skip = next(c[3] for c in CONTROLS.values() if c[2] == section)
    ran = run.data.params
    recipe = {k: ran.get(f"{stage}.{k}") for k in fields if k not in skip}
    return repr([ran.get("labels.digest", "all"), sorted(recipe.items())])


def with_gain(results: list[dict]) -> list[dict]:
    """Each finetune result with `mae_gain` (its test top-1 minus that of the scratch run
    trained on the same labels with the same recipe), each linprobe result with
    `probe_gain` (minus the pixels run's), logged to its pretrain run, which then names
    its controls. A result without such a control gets no gain (said at info)."""
    for tuned in results:
        if tuned["stage"] not in CONTROLS:
            continue
        control_stage, gain_name, _, _ = CONTROLS[tuned["stage"]]
        controls = [
            r for r in results if r["stage"] == control_stage and r["pairing"] == tuned["pairing"]
        ]
        if not controls:
            log.info("%s run %s: no %s control on its labels and recipe", tuned["stage"],
                     tuned["run_id"], control_stage)  # fmt: skip
            continue
        control = controls[-1]
        tuned[gain_name] = tuned["top1"] - control["top1"]
        tuned[f"{control_stage}_run_id"] = control["run_id"]
        if tuned["parent_run_id"]:
            parent = tracking.Run(tuned["parent_run_id"])
            gain = {f"{control_stage}/test_top1": control["top1"], gain_name: tuned[gain_name]}
            parent.log_metrics(gain, step=tuned["parent_step"])  # beside its result
            parent.set_tags({f"{control_stage}.run_id": control["run_id"]})
    return results


def _evaluate_one(p: Params, run, folder: Path | None = None, per_image: bool = False) -> dict:
    run_id, stage = run.info.run_id, run.data.tags["stage"]
    shards = shard_store(p.data)
    if folder is not None:
        model, config = load_classifier(folder)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model, config = load_classifier(tracking.download_model(run_id, Path(tmp)))
    check_shards(config, shards, f"run {run_id}")
    rt = resolve_runtime(p.runtime)
    img_size = MAEConfig.from_dict(config["model"]).image_hw[0]
    loader = build_loader(
        shards,
        "test",
        "eval",
        batch_size=512,
        img_size=img_size,
        num_workers=p.runtime.num_workers,
        in_memory=p.data.in_memory,
        device=rt.device,
    )
    result = evaluate(
        model.to(rt.device),
        loader,
        rt.device,
        config["num_classes"],
        rt.autocast,
        per_image=per_image,
    )
    classes = config["classes"]
    parent, step, registered = _log_result(p, run, result, classes)
    return {
        "run_id": run_id,
        "stage": stage,
        "parent_run_id": parent,
        "parent_step": step,
        "params_differ": _params_differ(p, run, stage),
        "pairing": pairing(run, stage),
        "classes": classes,
        **result,
        "per_class": dict(zip(classes, result["per_class"], strict=True)),
        **registered,
    }


def _log_result(p: Params, run, result: dict, classes: list[str]) -> tuple:
    """Test metrics and the confusion matrix to the run, its top-1/top-5 to its parent run
    (if any), and a finetune run's model to the registry (`tracking.register`); -> the
    parent's id, the step logged there, and what was registered."""
    run_id, stage = run.info.run_id, run.data.tags["stage"]
    metrics = {"test/top1": result["top1"], "test/top5": result["top5"]}
    metrics |= {
        f"test/acc/{key}": a
        for key, a in zip(tracking.class_keys(classes), result["per_class"], strict=True)
    }
    tracking.Run(run_id).log_metrics(metrics, step=0)
    png = reports.confusion_png(result["confusion"], classes, f"{stage} {run_id[:8]}")
    tracking.Run(run_id).log_bytes(png, "evaluation/confusion_matrix.png")
    parent = run.data.tags.get("mlflow.parentRunId")
    step = 0
    if parent:  # one step per child: a second fine-tune adds to the history, and the tag
        step = _child_step(run, parent)  # names the run behind the value shown
        top = {f"{stage}/test_top1": result["top1"], f"{stage}/test_top5": result["top5"]}
        tracking.Run(parent).log_metrics(top, step=step)
        tracking.Run(parent).set_tags({f"{stage}.run_id": run_id})
    registered = {}
    if p.tracking.register and stage == "finetune":
        registered = {
            "registered": tracking.register_champion(p.tracking.register, run, result["top1"])
        }
    return parent, step, registered


def evaluate_stage(p: Params, per_image: bool = False) -> list[dict]:
    """The DVC stage: this workspace's finetune, linprobe and scratch models ->
    evaluate.json, with `mae_gain`."""
    results = []
    for stage in CLASSIFIER_STAGES:
        folder = Path(p.paths.models) / stage
        if not (folder / "run_id").is_file():
            raise UserError(f"{folder / 'run_id'} is missing (run `dvc repro {stage}`)")
        results += evaluate_run(p, (folder / "run_id").read_text().strip(), folder, per_image)
    results = with_gain(results)
    metrics = {f"{r['stage']}_{k}": r[k] for r in results for k in ("top1", "top5")}
    for tuned, (control, gain, _, _) in CONTROLS.items():
        paired = [r[gain] for r in results if r["stage"] == tuned and gain in r]
        if not paired:
            raise UserError(
                f"{Path(p.paths.models) / tuned} and {Path(p.paths.models) / control} were "
                "trained on other labels or recipes: `dvc repro` trains them alike"
            )
        metrics[gain] = paired[0]
    reports.write_metrics(Path(p.paths.metrics) / "evaluate.json", metrics)
    kept.keep(Path(p.paths.metrics) / "evaluate.json")  # what a failure under dvc puts back
    return results


def format_result(r: dict) -> str:
    """A table a person reads: headline, per-class accuracy, confusion matrix."""
    classes = r["classes"]
    width = max(len(c) for c in classes)
    lines = [
        f"{r['stage']} run {r['run_id']}: test top-1 {r['top1']:.4f}, "
        f"top-5 {r['top5']:.4f} on {r['count']:,} images",
    ]
    for control, gain, _, _ in CONTROLS.values():
        if gain in r:
            lines.append(
                f"{gain} {100 * r[gain]:+.2f} points over the {control} control "
                f"(run {r[f'{control}_run_id']})"
            )
    for key, (ran, now) in r.get("params_differ", {}).items():
        lines.append(f"trained with {key} {ran} (params.yaml now: {now})")
    if "registered" in r:
        reg = r["registered"]
        lines.append(
            f"registered as {reg['name']} version {reg['version']}; "
            f"@{tracking.CHAMPION} is version {reg['champion']}"
        )
    if len(classes) > reports.ANNOTATED_MAX:  # a table a person still reads; --json: all
        return "\n".join(lines + _large_result(r))
    lines += [
        "",
        f"{'class':<{width}}  accuracy",
    ]
    lines += [f"{c:<{width}}  {a:.4f}" for c, a in r["per_class"].items()]
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    lines += [
        f"{c:<{width}}  " + " ".join(f"{n:5d}" for n in row)
        for c, row in zip(classes, r["confusion"], strict=True)
    ]
    return "\n".join(lines)


def _large_result(r: dict, shown: int = 10) -> list[str]:
    """Many classes: the least and most accurate, the pairs most often confused."""
    import numpy as np

    classes, confusion = r["classes"], np.asarray(r["confusion"])
    ranked = sorted(r["per_class"].items(), key=lambda item: item[1])
    lines = ["", f"{len(classes):,} classes (every one of them: --json)", "least accurate:"]
    lines += [f"  {a:.4f}  {c}" for c, a in ranked[:shown]]
    lines += ["most accurate:"] + [f"  {a:.4f}  {c}" for c, a in ranked[-shown:][::-1]]
    np.fill_diagonal(confusion, 0)
    top = np.argsort(confusion, axis=None)[::-1][:shown]
    lines += ["most often confused (true -> predicted: images):"]
    lines += [
        f"  {classes[i]} -> {classes[j]}: {confusion[i, j]}"
        for i, j in zip(*np.unravel_index(top, confusion.shape), strict=True)
        if confusion[i, j]
    ]
    return lines
