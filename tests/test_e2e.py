"""The whole pipeline through the real CLI, real DVC (a temporary git repo) and the real
MLflow (SQLite) on tiny params and synthetic shards."""

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.factory import cmd_env, dvc_repo, idx_dataset, run_cmd

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"name": "mae_vit_test"},
    "pretrain": {"epochs": 2, "batch_size": 32, "log_every": 2, "recon_every": 1},
    "finetune": {"epochs": 2, "batch_size": 32, "log_every": 2, "min_steps": 0},
    "linprobe": {"epochs": 2, "batch_size": 32, "log_every": 2, "warmup_epochs": 1, "min_steps": 0},
    "runtime": {"num_workers": 0, "device": "cpu"},
    "tracking": {"experiment": "e2e"},
}


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_tracks_it_and_then_does_nothing(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    idx_dataset(tmp_path / "raw", n_train=200, n_test=60, size=16)
    params["data"].update(source="idx", root=str(tmp_path / "raw"), workers=0)
    repo = dvc_repo(tmp_path, params)

    out = run_cmd(["dvc", "repro"], repo)
    for stage in ("shard", "pretrain", "finetune", "scratch", "linprobe", "pixels", "evaluate"):
        assert f"Running stage '{stage}'" in out

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = {
        r.data.tags["stage"]: r
        for r in mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    }
    assert set(runs) == {"shard", "pretrain", "finetune", "scratch", "linprobe", "pixels"}
    assert runs["shard"].data.metrics["data/train/count"] == 180  # 200 less 10 % for val
    pretrain = runs["pretrain"]
    for run in (runs[s] for s in ("pretrain", "finetune", "scratch", "linprobe")):
        assert run.data.params["data.train_in_memory"] == "True"  # data.in_memory: auto
    for stage in ("finetune", "linprobe"):
        child = runs[stage]
        assert child.data.tags["mlflow.parentRunId"] == pretrain.info.run_id
        assert child.data.params["pretrain.mask_ratio"] == "0.75"  # inherited
        assert (repo / "models" / stage / "run_id").read_text().strip() == child.info.run_id
        assert pretrain.data.metrics[f"{stage}/test_top1"] == child.data.metrics["test/top1"]

    control = runs["scratch"]  # the control: a run of its own that the pretrain run names
    assert "mlflow.parentRunId" not in control.data.tags
    assert pretrain.data.tags["scratch.run_id"] == control.info.run_id
    assert pretrain.data.metrics["scratch/test_top1"] == control.data.metrics["test/top1"]
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    gain = evaluated["finetune_top1"] - evaluated["scratch_top1"]
    assert evaluated["mae_gain"] == pytest.approx(gain, abs=2e-6)
    assert pretrain.data.metrics["mae_gain"] == pytest.approx(gain, abs=2e-6)
    assert 0 < json.loads((repo / "metrics/pretrain.json").read_text())["knn_top1"] <= 1
    again = json.loads(
        run_cmd(
            ["mae-cli", "evaluate", "--run-id", runs["finetune"].info.run_id, "--json"],
            repo,
            stdout_only=True,
        )
    )
    assert round(again["top1"], 6) == evaluated["finetune_top1"]
    assert round(again["top5"], 6) == evaluated["finetune_top5"]
    both = json.loads(
        run_cmd(
            ["mae-cli", "evaluate", "--run-id", pretrain.info.run_id, "--json"],
            repo,
            stdout_only=True,
        )
    )
    assert {r["stage"] for r in both} == {"finetune", "linprobe", "scratch", "pixels"}
    probe = next(r for r in both if r["stage"] == "linprobe")
    assert probe["probe_gain"] == pytest.approx(evaluated["probe_gain"], abs=2e-6)
    assert pretrain.data.metrics["probe_gain"] == pytest.approx(evaluated["probe_gain"], abs=2e-6)

    assert "Data and pipelines are up to date" in run_cmd(["dvc", "repro"], repo)

    # A team shares shards and models through a DVC remote (here a local folder): push from
    # this clone, pull into another, and there `dvc repro` has nothing to do.
    run_cmd(["dvc", "remote", "add", "-d", "team", str(tmp_path / "dvc-remote")], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "a run, and the team's remote"], repo)
    run_cmd(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data/shards").exists()
    run_cmd(["dvc", "pull"], clone)
    assert "Data and pipelines are up to date" in run_cmd(["dvc", "repro"], clone)
    for folder in ("data/shards", "models/finetune"):
        files = sorted(p.relative_to(repo) for p in (repo / folder).rglob("*") if p.is_file())
        assert files and all((clone / f).read_bytes() == (repo / f).read_bytes() for f in files)

    # Another mask ratio: everything downstream of pretraining re-runs, the control does not.
    # DVC writes params.yaml back in YAML 1.2: 0.00001 becomes `1e-05`, which every stage
    # must still read as a number (data.cache_max_gb changes no result: one series below).
    set_ = ["-S", "pretrain.mask_ratio=0.5", "-S", "data.cache_max_gb=0.00001"]
    out = run_cmd(["dvc", "exp", "run", *set_], repo)
    assert "cache_max_gb: 1e-05" in (repo / "params.yaml").read_text()
    assert "Running stage 'pretrain'" in out and "Running stage 'scratch'" not in out
    assert "Running stage 'pixels'" not in out  # the probe's control is cached as well
    rows = json.loads(
        run_cmd(
            ["mae-cli", "compare", "--json", "--out", "plots/compare.png"], repo, stdout_only=True
        )
    )
    assert [(r["series"], r["mask_ratio"]) for r in rows] == [("A", 0.5), ("A", 0.75)]
    assert rows[0]["scratch/test_top1"] == rows[1]["scratch/test_top1"] is not None
    assert all(r["mae_gain"] is not None and r["pretrain/knn_top1"] is not None for r in rows)
    table = run_cmd(["mae-cli", "compare", "--out", "plots/compare.png"], repo)
    assert "every run shares all settings but pretrain.mask_ratio" in table
    assert (repo / "plots/compare.png").is_file()

    # A second fine-tune of the same pretrain run (reused from the cache) keeps the first:
    # compare shows both, each beside the scratch control of its own params.
    out = run_cmd(["dvc", "exp", "run", "-S", "finetune.epochs=3"], repo)
    assert "Running stage 'pretrain'" not in out and "Running stage 'scratch'" in out
    rows = json.loads(run_cmd(["mae-cli", "compare", "--json"], repo, stdout_only=True))
    tuned = [r for r in rows if r["mask_ratio"] == 0.5]
    assert sorted(r["differs"]["finetune.epochs"] for r in tuned) == ["2", "3"]
    assert len({r["scratch_run_id"] for r in tuned}) == 2 and len({r["series"] for r in tuned}) == 2
    parent = mlflow.get_run(tuned[0]["run_id"])
    newest = max(tuned, key=lambda r: r["differs"]["finetune.epochs"])
    assert parent.data.tags["finetune.run_id"] == newest["finetune_run_id"]
    history = mlflow.MlflowClient().get_metric_history(parent.info.run_id, "finetune/test_top1")
    assert sorted(m.step for m in history) == [1, 2]  # both results, in the order they ran
    said = run_cmd(["mae-cli", "evaluate", "--run-id", tuned[0]["finetune_run_id"]], repo)
    assert ("trained with finetune.epochs 2 (params.yaml now: 3)" in said) == (
        tuned[0]["differs"]["finetune.epochs"] == "2"
    )

    # Few labels: 5 per class re-runs the classifiers on one subset, never shard or
    # pretrain (dvc status names exactly the stages whose params list the key).
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["data"]["labels"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    changed = json.loads(run_cmd(["dvc", "status", "--json"], repo, stdout_only=True))
    assert set(changed) == {"finetune", "scratch", "linprobe", "pixels"}, changed
    out = run_cmd(["dvc", "repro"], repo)
    assert "Running stage 'pretrain'" not in out and "Running stage 'evaluate'" in out
    subsets = {s: json.loads((repo / "models" / s / "labels.json").read_text())
               for s in ("finetune", "scratch", "linprobe", "pixels")}  # fmt: skip
    assert set(subsets["finetune"]["per_class"]["train"].values()) == {5}
    assert len({json.dumps(v["keys"]) for v in subsets.values()}) == 1  # one subset for all
    few = mlflow.get_run((repo / "models/finetune/run_id").read_text().strip())
    assert few.data.params["data.labels"] == "5" and few.data.params["labels.train_count"] == "50"

    # A stage that fails under dvc repro (here on a params mistake) leaves the previous
    # outputs whole: DVC removed them before it ran, the stage puts them back.
    outputs = ["models/finetune", "metrics/finetune.json", "plots/finetune"]
    before = _tree(repo, outputs)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["finetune"]["blr"] = "fast"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    failed = subprocess.run(
        ["dvc", "repro", "finetune"], cwd=repo, capture_output=True, text=True, env=cmd_env()
    )
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "finetune.blr: Input should be a valid number" in said
    back = said.split("the outputs dvc removed before the stage ran are back: ")[1]
    assert set(back.splitlines()[0].split(", ")) == set(outputs)
    assert _tree(repo, outputs) == before and len(before) > 5


def _tree(root: Path, names: list[str]) -> dict[str, bytes]:
    files = [p for n in names for p in sorted([root / n, *(root / n).rglob("*")]) if p.is_file()]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}
