"""`mae-cli compare` compares like with like, on runs in a real MLflow store."""

import math

import mlflow
import pytest

from pipeline.params import parse_params
from pipeline.tools.compare import compare_rows
from pipeline.tools.compare_report import format_rows, plot_rows
from tests.factory import project_params


def _pretrain_run(
    client, experiment, ratio, epochs, finetune, commit="c0ffee", code=None, **params
):
    """A finished pretrain run with a finetune child of `finetune` test top-1 (2 epochs)
    and a scratch control of those fine-tuning params at 0.8; `code`: the digest of
    uncommitted code it ran (tag `git.dirty`)."""
    tags = {"stage": "pretrain", "git.commit": commit, "data.manifest_digest": "d1"}
    if code:
        tags |= {"git.dirty": "true", "code.digest": code}
    run = client.create_run(experiment, tags=tags)
    rid = run.info.run_id
    for k, v in {
        "pretrain.mask_ratio": ratio,
        "pretrain.patches_kept": int(16 * (1 - ratio)),
        "pretrain.epochs": epochs,
        "model.name": "mae_vit_test",
        "runtime.num_workers": 1,
        **params,
    }.items():
        client.log_param(rid, k, str(v))
    _downstream(client, experiment, "finetune", finetune, 2, parent=rid)
    _downstream(client, experiment, "scratch", 0.8, 2)
    client.set_terminated(rid)
    return rid


def _downstream(client, experiment, stage, top1, finetune_epochs, parent=None, **params):
    tags = {"stage": stage} | ({"mlflow.parentRunId": parent} if parent else {})
    rid = client.create_run(experiment, tags=tags).info.run_id
    section = "scratch" if stage == "scratch" else "finetune"  # as the stages log them
    for k, v in {"epochs": finetune_epochs, "log_every": 7, **params}.items():
        client.log_param(rid, f"{section}.{k}", str(v))
    client.log_metric(rid, "test/top1", top1)
    client.set_terminated(rid)
    return rid


def test_runs_that_differ_in_more_than_the_mask_ratio_are_separate_series(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = parse_params(project_params({"tracking": {"uri": uri, "experiment": "cmp"}}))
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
    assert "series differ in more than pretrain.mask_ratio" in table
    assert f"  {series[short]}: git.commit=c0ffee, pretrain.epochs=2" in table
    assert "+6.00" in table  # the gain, in points
    plot_rows(rows, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0

    client.delete_run(short)
    client.delete_run(newer)
    rows = compare_rows(p)
    assert [(r["series"], r["mask_ratio"]) for r in rows] == [("A", 0.5), ("A", 0.75)]
    assert "every run shares all settings but pretrain.mask_ratio" in format_rows(rows)


def test_commits_that_change_no_code_stay_in_one_series(tmp_path, monkeypatch):
    """A commit of results or docs only (git shows no change under mae/ and pipeline/)
    keeps the series; a change of code starts another."""
    import subprocess

    repo = tmp_path / "repo"
    (repo / "pipeline").mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git[:5], "init", "-q", str(repo)], check=True)
    commits = []
    for path, text in (
        ("pipeline/a.py", "x = 1\n"),
        ("README.md", "r\n"),
        ("pipeline/a.py", "x = 2\n"),
    ):
        (repo / path).write_text(text)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", path], check=True)
        commits.append(
            subprocess.run(
                [*git, "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        )
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_ROOT", raising=False)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "a").as_uri())
    ids = [
        _pretrain_run(client, experiment, r, 6, 0.85, commit=c)
        for r, c in zip((0.5, 0.75, 0.9), commits, strict=True)
    ]
    rows = compare_rows(
        parse_params(project_params({"tracking": {"uri": uri, "experiment": "cmp"}}))
    )
    series = {r["run_id"]: r["series"] for r in rows}
    assert series[ids[0]] == series[ids[1]] != series[ids[2]]
    assert {r["differs"]["git.commit"] for r in rows} == {commits[0], commits[2]}


def test_a_second_fine_tune_of_one_pretrain_run_is_a_row_of_its_own(tmp_path):
    """dvc repro, then dvc exp run -S finetune.epochs=3 (pretrain reused from the cache):
    both results stay, each beside the scratch control of its own fine-tuning params."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = parse_params(project_params({"tracking": {"uri": uri, "experiment": "cmp"}}))
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "a").as_uri())
    pretrain = _pretrain_run(client, experiment, 0.75, 6, 0.86)
    again = _downstream(client, experiment, "finetune", 0.9, 3, parent=pretrain)
    control = _downstream(client, experiment, "scratch", 0.85, 3)
    rows = compare_rows(p)  # the one key that varies is the one compared
    assert [r["run_id"] for r in rows] == [pretrain, pretrain]
    assert [(r["by"], r["value"], r["series"]) for r in rows] == [
        ("finetune.epochs", "2", "A"),
        ("finetune.epochs", "3", "A"),
    ]
    by_finetune = {r["finetune_run_id"]: r for r in rows}
    assert by_finetune[again]["scratch_run_id"] == control
    assert math.isclose(by_finetune[again]["mae_gain"], 0.05)
    first = next(r for r in rows if r["finetune_run_id"] != again)
    assert math.isclose(first["mae_gain"], 0.06)
    assert "every run shares all settings but finetune.epochs" in format_rows(rows)
    rows = compare_rows(p, by="pretrain.mask_ratio")  # or by another: then it sets them apart
    by_finetune = {r["finetune_run_id"]: r for r in rows}
    assert by_finetune[again]["differs"] == {"finetune.epochs": "3"}
    assert "finetune.epochs=3" in format_rows(rows)


def test_mask_types_compare_as_names_side_by_side(tmp_path):
    """A sweep of a categorical key (pretrain.mask_type): the key that varies is compared,
    its values are names in a table and side by side in the plot; an unknown --by is
    named with the keys that do vary."""
    from pipeline.errors import UserError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = parse_params(project_params({"tracking": {"uri": uri, "experiment": "cmp"}}))
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "a").as_uri())
    for kind, top1 in (("random", 0.86), ("grid", 0.84), ("block", 0.85)):
        _pretrain_run(client, experiment, 0.75, 6, top1, **{"pretrain.mask_type": kind})
    rows = compare_rows(p)
    assert [(r["by"], r["value"], r["series"]) for r in rows] == [
        ("pretrain.mask_type", kind, "A") for kind in ("block", "grid", "random")
    ]
    assert [round(r["mae_gain"], 2) for r in rows] == [0.05, 0.04, 0.06]
    table = format_rows(rows)
    assert table.splitlines()[0].split()[:2] == ["series", "mask_type"]
    assert "every run shares all settings but pretrain.mask_type" in table
    plot_rows(rows, tmp_path / "types.png")
    assert (tmp_path / "types.png").stat().st_size > 0
    with pytest.raises(UserError, match=r"compare --by model.depth: no run has that param \(keys "
                       r"that vary: pretrain.mask_type\)"):  # fmt: skip
        compare_rows(p, by="model.depth")
    missing = p.model_copy(
        update={"tracking": p.tracking.model_copy(update={"experiment": "typo"})}
    )
    with pytest.raises(UserError, match="no MLflow experiment 'typo' in sqlite:///"):
        compare_rows(missing)  # and none made by asking
    assert mlflow.MlflowClient(uri).get_experiment_by_name("typo") is None


def test_partial_fine_tunes_of_one_pretrain_run_are_rows_beside_one_control(tmp_path):
    """finetune.trainable_blocks 0 and 1 and all (None) on one pretrain run: three rows,
    each gain against the one scratch control, which trains every block."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = parse_params(project_params({"tracking": {"uri": uri, "experiment": "cmp"}}))
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "a").as_uri())
    pretrain = _pretrain_run(client, experiment, 0.75, 6, 0.86)  # its finetune: 2 epochs
    for blocks, top1 in (("0", 0.72), ("1", 0.8)):
        _downstream(client, experiment, "finetune", top1, 2, parent=pretrain,
                    trainable_blocks=blocks)  # fmt: skip
    rows = compare_rows(p, by="finetune.trainable_blocks")
    assert [(r["value"], round(r["mae_gain"], 2)) for r in rows] == [
        ("0", -0.08), ("1", 0.0), ("", 0.06)  # "": logged before the key existed
    ]  # fmt: skip
    assert len({r["scratch_run_id"] for r in rows}) == 1 and {r["series"] for r in rows} == {"A"}


def test_runs_of_uncommitted_edits_on_one_commit_are_series_of_their_own(tmp_path):
    """mlflow#1912: three runs tagged with one commit, two of them with uncommitted edits
    (other edits each); the commit's code and each edit's code are separate series, named
    as such. Two runs of the same edits share theirs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "a").as_uri())
    clean = _pretrain_run(client, experiment, 0.75, 6, 0.85)
    edit_a = _pretrain_run(client, experiment, 0.5, 6, 0.84, code="a" * 64)
    edit_a2 = _pretrain_run(client, experiment, 0.75, 6, 0.83, code="a" * 64)
    edit_b = _pretrain_run(client, experiment, 0.9, 6, 0.82, code="b" * 64)
    rows = compare_rows(
        parse_params(project_params({"tracking": {"uri": uri, "experiment": "cmp"}}))
    )
    series = {r["run_id"]: r["series"] for r in rows}
    assert series[edit_a] == series[edit_a2]
    assert len({series[clean], series[edit_a], series[edit_b]}) == 3
    code = {r["run_id"]: r["differs"]["git.commit"] for r in rows}
    assert code[clean] == "c0ffee"
    assert code[edit_a] == "c0ffee + uncommitted edits aaaaaaaaaaaa"
    assert "git.dirty" not in rows[0]["differs"] and "code.digest" not in rows[0]["differs"]


def test_a_label_sweep_pairs_each_result_with_the_controls_of_its_labels(tmp_path):
    """`dvc exp run -S data.labels=...` reuses one pretrain run: each point's fine-tune and
    probe sit beside the scratch and pixels runs trained on its labels (not the newest
    control, not the parent's data.* keys, which hold no label key), and `--by
    data.labels` compares them in one series."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = parse_params(project_params({"tracking": {"uri": uri, "experiment": "cmp"}}))
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "a").as_uri())
    pretrain = _pretrain_run(client, experiment, 0.75, 6, 0.86)  # every label: scratch 0.8
    points = {"10": (0.60, 0.50, 0.55, 0.50), "100": (0.75, 0.70, 0.72, 0.71)}
    for labels, (tuned, scratch, probe, pixels) in points.items():
        _labelled(client, experiment, "finetune", tuned, labels, parent=pretrain, epochs=2)
        _labelled(client, experiment, "scratch", scratch, labels, epochs=2)
        _labelled(client, experiment, "linprobe", probe, labels, parent=pretrain, pool="avg")
        _labelled(client, experiment, "pixels", pixels, labels)
    _labelled(client, experiment, "linprobe", 0.83, None, parent=pretrain, pool="avg")
    _labelled(client, experiment, "pixels", 0.84, None)  # every label: the probe loses
    rows = compare_rows(p, by="data.labels")
    assert {r["series"] for r in rows} == {"A"}
    got = {r["value"]: (round(r["mae_gain"], 2), round(r["probe_gain"], 2)) for r in rows}
    assert got == {"10": (0.10, 0.05), "100": (0.05, 0.01), "": (0.06, -0.01)}
    assert "p-gain" in format_rows(rows).splitlines()[0]
    assert sorted(r["train_labels"] for r in rows)[:2] == [40.0, 400.0]  # the plot's x
    plot_rows(rows, tmp_path / "labels.png")
    assert (tmp_path / "labels.png").stat().st_size > 0


def _labelled(client, experiment, stage, top1, labels, parent=None, **params):
    """A classifier run trained on the label subset `labels` (None: every label), its
    section logged under its own stage's name as the stages log it."""
    tags = {"stage": stage} | ({"mlflow.parentRunId": parent} if parent else {})
    rid = client.create_run(experiment, tags=tags).info.run_id
    logged = {"labels.digest": f"digest-{labels}" if labels else "all"}
    logged |= {f"{stage}.{k}": v for k, v in params.items()}
    if labels:
        logged |= {"data.labels": labels, "labels.train_count": 4 * int(labels)}
    for k, v in logged.items():
        client.log_param(rid, k, str(v))
    client.log_metric(rid, "test/top1", top1)
    client.set_terminated(rid)
    return rid
