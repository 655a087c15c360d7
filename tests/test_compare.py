"""`mae-cli compare` compares like with like, on runs in a real MLflow store."""

import math

import mlflow

from pipeline.compare import compare_rows, format_rows, plot_rows
from pipeline.params import parse_params


def _pretrain_run(client, experiment, ratio, epochs, finetune, commit="c0ffee"):
    run = client.create_run(
        experiment, tags={"stage": "pretrain", "git.commit": commit, "data.manifest_digest": "d1"}
    )
    rid = run.info.run_id
    for k, v in {
        "pretrain.mask_ratio": ratio,
        "pretrain.patches_kept": int(16 * (1 - ratio)),
        "pretrain.epochs": epochs,
        "model.name": "mae_vit_test",
        "runtime.num_workers": 1,
    }.items():
        client.log_param(rid, k, str(v))
    client.log_metric(rid, "finetune/test_top1", finetune)
    client.log_metric(rid, "scratch/test_top1", 0.8)
    client.log_metric(rid, "mae_gain", finetune - 0.8)
    client.set_terminated(rid)
    return rid


def test_runs_that_differ_in_more_than_the_mask_ratio_are_separate_series(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = parse_params({"tracking": {"uri": uri, "experiment": "cmp"}})
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "a").as_uri())
    long_a = _pretrain_run(client, experiment, 0.75, 6, 0.86)
    long_b = _pretrain_run(client, experiment, 0.5, 6, 0.85)
    short = _pretrain_run(client, experiment, 0.75, 2, 0.83)  # another budget, same ratio
    newer = _pretrain_run(client, experiment, 0.5, 6, 0.84, commit="beef")  # other code

    rows = compare_rows(p)
    series = {r["run_id"]: r["series"] for r in rows}
    assert series[long_a] == series[long_b] == "A"
    assert len({series[long_a], series[short], series[newer]}) == 3
    by_id = {r["run_id"]: r for r in rows}
    assert by_id[short]["differs"] == {"git.commit": "c0ffee", "pretrain.epochs": "2"}
    assert math.isclose(by_id[long_a]["mae_gain"], 0.06) and math.isnan(
        by_id[short]["linprobe/test_top1"]
    )

    table = format_rows(rows)
    assert "series differ in more than the mask ratio" in table
    assert f"  {series[short]}: git.commit=c0ffee, pretrain.epochs=2" in table
    assert "+6.00" in table  # the gain, in points
    plot_rows(rows, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0

    client.delete_run(short)
    client.delete_run(newer)
    rows = compare_rows(p)
    assert [(r["series"], r["mask_ratio"]) for r in rows] == [("A", 0.5), ("A", 0.75)]
    assert "every run shares all settings but the mask ratio" in format_rows(rows)
