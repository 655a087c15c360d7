"""The default MLflow store works wherever the project lies: moved or copied with its
mlflow.db and mlartifacts/, a project's runs keep their models, new artifacts land in the
project, and a model that is really missing is named with where it was looked for."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.factory import build_project, mae_cli


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_moved_or_copied_project_keeps_its_runs_and_writes_inside_itself(tmp_path):
    first = build_project(tmp_path / "first", pretrain={"epochs": 1}).parent
    raw = yaml.safe_load((first / "params.yaml").read_text())
    raw["tracking"]["uri"] = None  # the default store: <project>/mlflow.db
    raw["finetune"].update(epochs=1, batch_size=32, warmup_epochs=0)
    (first / "params.yaml").write_text(yaml.safe_dump(raw))
    for stage in ("pretrain", "finetune"):
        assert mae_cli([stage], first).returncode == 0
    run_id = (first / "models/finetune/run_id").read_text().strip()

    moved = tmp_path / "moved here"  # a space: the locations are URIs
    shutil.move(first, moved)
    done = mae_cli(["evaluate", "--run-id", run_id, "--json"], moved)
    assert done.returncode == 0, done.stderr
    assert 0 <= json.loads(done.stdout)["top1"] <= 1
    assert not first.exists()  # nothing written where the project was

    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    before = _files(moved)
    assert mae_cli(["evaluate", "--run-id", run_id], copy).returncode == 0
    assert _files(moved) == before  # the copy logs into itself, not into the original
    assert any("confusion_matrix.png" in f for f in _files(copy / "mlartifacts"))

    for model in (copy / "mlartifacts").rglob("model"):
        if model.is_dir() and (model / "config.json").is_file():
            shutil.rmtree(model)
    done = mae_cli(["evaluate", "--run-id", run_id], copy)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"run {run_id} has no model: nothing at {copy.as_uri()}/mlartifacts/" in done.stderr
