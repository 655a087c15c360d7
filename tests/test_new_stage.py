"""The README's steps to add a stage, followed: the worked example in docs/development.md
("Adding a stage") applied block by block, as written, to a copy of the project in a real
git + DVC repo; the new stage then runs through `mae-cli` and `dvc repro`, is tracked in
MLflow, and `mae-cli evaluate` takes its run."""

import json
import re
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.factory import ROOT, cmd_env, dvc_repo, idx_dataset, project_params
from tests.test_dvc_deps import missing_deps

# A fenced block of the section, its first line naming the file it goes into.
BLOCK = re.compile(r"```(python|yaml)\n# ([^\n]+)\n(.*?)```", re.DOTALL)


def _example_blocks() -> dict[str, str]:
    text = (ROOT / "docs/development.md").read_text()
    section = text.split("\n## Adding a stage\n", 1)[1].split("\n## ", 1)[0]
    return {target: body for _, target, body in BLOCK.findall(section)}


def _follow(repo: Path, blocks: dict[str, str]) -> str:
    """Apply the example's blocks to `repo` as a developer would; -> the new stage's name."""
    (module,) = [t for t in blocks if t.startswith("pipeline/stages/") and "__init__" not in t]
    (repo / module).write_text(blocks[module])
    registry = repo / "pipeline/stages/__init__.py"
    text = registry.read_text()
    end = text.index("\n)\nCLASSIFIER_STAGES")  # the end of TRAINING_STAGES
    registry.write_text(
        text[:end] + "\n" + blocks["pipeline/stages/__init__.py"].rstrip() + text[end:]
    )
    dvc_yaml = repo / "dvc.yaml"
    text = dvc_yaml.read_text().rstrip() + "\n\n" + blocks["dvc.yaml"]
    scratch_dep = "      - ${paths.models}/scratch\n"
    at = text.rindex(scratch_dep) + len(scratch_dep)  # evaluate's deps end with scratch's
    dvc_yaml.write_text(text[:at] + blocks["dvc.yaml: evaluate's deps"] + text[at:])
    return Path(module).stem


def _run(cmd: list[str], repo: Path, stdout_only: bool = False) -> str:
    """A command in the copy, with the copy's code (not this checkout's) on the path."""
    import subprocess

    env = cmd_env() | {"PYTHONPATH": str(repo)}
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def test_the_worked_example_covers_each_step():
    blocks = _example_blocks()
    assert {"pipeline/stages/__init__.py", "dvc.yaml", "dvc.yaml: evaluate's deps"} <= set(blocks)
    assert len(blocks) == 4  # and the stage's module


@pytest.mark.slow
def test_a_stage_added_by_the_readme_steps_runs_through_mae_cli_and_dvc_repro(tmp_path):
    idx_dataset(tmp_path / "raw", n_train=200, n_test=40, size=16)
    params = project_params(
        {
            "data": {"source": "idx", "root": str(tmp_path / "raw"), "workers": 0},
            "model": {"name": "mae_vit_test"},
            "pretrain": {"epochs": 1, "batch_size": 32, "log_every": 2},
            "linprobe": {"epochs": 2, "batch_size": 32, "log_every": 2, "warmup_epochs": 1},
            "runtime": {"num_workers": 0, "device": "cpu"},
            "tracking": {"experiment": "new"},
        }
    )
    repo = dvc_repo(tmp_path, params)
    name = _follow(repo, _example_blocks())

    assert name in _run(["mae-cli", "--help"], repo)  # a command of its own
    out = _run(["dvc", "repro", name], repo)
    assert f"Running stage '{name}'" in out and f"{name} done: MLflow run" in out
    run_id = (repo / "models" / name / "run_id").read_text().strip()
    assert json.loads((repo / "metrics" / f"{name}.json").read_text())["val_top1"] >= 0
    config = json.loads((repo / "models" / name / "config.json").read_text())
    assert config["kind"] == "linprobe" and config["global_pool"] == "avg"  # what differs
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    run = mlflow.get_run(run_id)
    assert run.data.tags["stage"] == name and run.info.status == "FINISHED"
    assert (
        run.data.tags["mlflow.parentRunId"] == (repo / "models/pretrain/run_id").read_text().strip()
    )

    evaluated = json.loads(_run(["mae-cli", "evaluate", "--run-id", run_id, "--json"], repo, True))
    assert evaluated["stage"] == name and evaluated["count"] == 40
    dag = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert f"${{paths.models}}/{name}" in dag["evaluate"]["deps"]
    module = f"pipeline.stages.{name}"
    assert not missing_deps(name, module, dag[name]["deps"], repo)  # step 4's deps are whole
    assert f"Stage '{name}' didn't change" in _run(["dvc", "repro", name], repo)
