"""The MLflow store as a stage meets it: one that cannot be reached fails at once, naming
it; one lost mid-run does not stop training, and what was logged meanwhile is sent when it
answers or named in one line when it does not; a run killed before its first checkpoint
does not look alive. Real stores: SQLite, and an `mlflow server` on 127.0.0.1."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.errors import UserError
from pipeline.params import load_params
from pipeline.stages import run_training
from pipeline.stages.evaluate import evaluate_run
from pipeline.tracking import buffered
from pipeline.tracking.code import code_root, committed_digest, running_digest
from tests.factory import MAE_CLI, build_project, cmd_env, free_port, project_params, wait_for_http


def test_unreachable_tracking_server_fails_at_once_naming_the_uri(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["uri"] = "http://127.0.0.1:9"
    (project / "params.yaml").write_text(yaml.safe_dump(project_params(params)))
    start = time.monotonic()
    with pytest.raises(
        UserError,
        match=r"cannot reach the MLflow tracking store at "
        r"http://127.0.0.1:9",
    ):
        run_training("pretrain", load_params("params.yaml"))
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_training_goes_on_when_the_mlflow_server_dies_and_fails_clearly_at_the_end(tmp_path):
    """A team's `mlflow server` (started here on 127.0.0.1) killed after the first epoch:
    the stage does not stall, finishes its epochs and outputs, then fails in one line."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
        project = build_project(tmp_path / "p", pretrain={"epochs": 4, "probe_every": 0}).parent
        raw = yaml.safe_load((project / "params.yaml").read_text())
        raw["tracking"]["uri"] = f"http://127.0.0.1:{port}"
        (project / "params.yaml").write_text(yaml.safe_dump(raw))
        env = {**cmd_env(), "MAE_MLFLOW_RETRY_S": "2", "MAE_MLFLOW_FLUSH_S": "4"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [MAE_CLI, "pretrain"], env=env, cwd=project, stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "pretrain epoch 1/4" in line:
                os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        proc.wait(timeout=120)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert time.monotonic() - start < 100  # no minutes of retries
    assert proc.returncode == 1, "".join(lines)
    assert any("pretrain epoch 4/4" in line for line in lines)  # training went on
    last = lines[-1].strip()
    assert last.startswith("mae-cli: error: the MLflow store stopped answering"), last
    assert "were not sent; the stage's outputs are written" in last
    assert (project / "models/pretrain/run_id").is_file()  # the work is kept


def test_a_run_killed_before_its_first_checkpoint_is_marked_killed_and_not_compared(project):
    from pipeline.tools.compare import compare_rows

    first = run_training("pretrain", load_params("params.yaml"))
    client = mlflow.MlflowClient()
    finished = client.get_run(first)
    key = finished.data.tags["checkpoint.key"]
    # the code that ran, digested; no commit outside a git checkout, so no dirty flag
    stages = Path("dvc.yaml")
    assert finished.data.tags["code.digest"] == running_digest(code_root(), stages)
    assert "git.commit" not in finished.data.tags and "git.dirty" not in finished.data.tags
    tags = {"stage": "pretrain", "checkpoint.key": key}
    dead = client.create_run(finished.info.experiment_id, tags=tags)  # as a SIGKILL leaves it
    client.log_param(dead.info.run_id, "pretrain.mask_ratio", "0.75")
    assert client.get_run(dead.info.run_id).info.status == "RUNNING"
    second = run_training("pretrain", load_params("params.yaml"))  # the same params: a fresh start
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    rows = compare_rows(load_params("params.yaml"))
    assert {r["run_id"] for r in rows} == {first, second}


def test_artifacts_kept_in_two_outages_are_all_sent(tmp_path, monkeypatch):
    monkeypatch.setattr(buffered, "RETRY_S", 0.0)
    up, sent = {"yes": False}, []

    def upload(self, path, artifact_dir):
        if not up["yes"]:
            raise ConnectionError("connection refused")
        sent.append(Path(path).read_text())

    monkeypatch.setattr(buffered.Run, "_log_file", upload)
    run = buffered.Run("r", keep=True)
    for outage in ("first", "second"):
        for i in range(2):
            (tmp_path / "a.txt").write_text(f"{outage} {i}")
            run.log_file(tmp_path / "a.txt")  # kept: the store is down
        up["yes"] = True
        (tmp_path / "a.txt").write_text(f"{outage} back")
        run.log_file(tmp_path / "a.txt")  # the store is back: the kept ones go first
        up["yes"] = False
    up["yes"] = True
    run.close()
    expected = [f"{o} {i}" for o in ("first", "second") for i in ("0", "1", "back")]
    assert sent == expected


def test_unreachable_store_is_a_user_error(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["uri"] = "http://127.0.0.1:9"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(project_params(params)))
    with pytest.raises(UserError, match="cannot reach the MLflow tracking store at http"):
        evaluate_run(load_params(bad), "0123456789abcdef")


def test_a_port_in_use_is_named_with_a_free_one_to_take():
    import socket

    from pipeline.tracking.ui import check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use") as said:
            check_port(port)
        spare = int(str(said.value).rsplit("--port ", 1)[1])
        assert port < spare < port + 100
        check_port(spare)  # free: no error


def test_what_the_ui_deleted_is_named_with_the_command_that_restores_it(tmp_path, monkeypatch):
    """Runs and experiments a user deleted (MLflow's trash) that the pipeline would log to:
    one line naming each and its restore command, before any work; restored, all goes on."""
    from pipeline.tracking import connect

    tiny = {"epochs": 1, "batch_size": 32, "warmup_epochs": 0}
    build_project(tmp_path, stages=("shard", "pretrain", "finetune"), pretrain={"epochs": 1},
                  finetune=tiny)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    p = load_params("params.yaml")
    client = mlflow.MlflowClient(p.tracking.uri)
    pre, tuned = (Path(f"models/{s}/run_id").read_text().strip() for s in ("pretrain", "finetune"))

    client.delete_run(pre)
    said = f"the finetune run's parent pretrain run {pre} is deleted in the MLflow store at "
    restore = f"mlflow runs restore --run-id {pre}`\\) or run its stage again"
    with pytest.raises(UserError, match=f"^{said}.*{restore}$"):
        evaluate_run(p, tuned)
    assert "test/top1" not in client.get_run(tuned).data.metrics  # nothing logged
    with pytest.raises(UserError, match=said):
        run_training("finetune", p)
    runs = client.search_runs([client.get_run(tuned).info.experiment_id], "tags.stage = 'finetune'")
    assert [r.info.run_id for r in runs] == [tuned]  # no run started

    client.restore_run(pre)
    client.delete_run(tuned)
    with pytest.raises(UserError, match=f"^the finetune run {tuned} is deleted"):
        evaluate_run(p, tuned)
    client.restore_run(tuned)
    assert 0 <= evaluate_run(p, tuned)[0]["top1"] <= 1
    assert "test/top1" in client.get_run(tuned).data.metrics

    client.set_tag(tuned, "mlflow.parentRunId", "0" * 32)  # as after `mlflow gc`
    with pytest.raises(UserError, match=f"parent pretrain run {'0' * 32} is not in the MLflow"):
        evaluate_run(p, tuned)

    experiment = client.get_run(tuned).info.experiment_id
    client.delete_experiment(experiment)
    with pytest.raises(UserError, match=f"mlflow experiments restore --experiment-id {experiment}"):
        connect(p.tracking)


def test_a_run_deleted_while_its_stage_runs_fails_at_the_end_at_once_or_gets_all_if_restored(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(buffered, "FLUSH_S", 45.0)  # a deleted run must not wait for it
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("x", (tmp_path / "art").as_uri())
    for restored in (True, False):
        run_id = client.create_run(experiment).info.run_id
        run = buffered.Run(run_id, keep=True)
        run.log_metrics({"loss": 1.0}, step=1)
        client.delete_run(run_id)  # in the UI, while training goes on
        run.log_metrics({"loss": 0.5}, step=2)  # kept, not lost
        if restored:
            client.restore_run(run_id)
            run.close()
            history = client.get_metric_history(run_id, "loss")
            assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
            continue
        start = time.monotonic()
        with pytest.raises(UserError, match=f"^run {run_id} was deleted in the MLflow store"):
            run.close()
        assert time.monotonic() - start < 30


def test_uncommitted_code_edits_differ_from_the_commit_and_docs_edits_do_not(tmp_path):
    """mlflow#1912: a run of uncommitted edits read as HEAD's code. The code's digest (what
    ran) against the commit's: an edited, a new untracked module or an edited dvc.yaml is
    not the commit's code; an edited README is."""
    repo = tmp_path / "repo"
    files = {"mae/m.py": "a = 1\n", "pipeline/p.py": "b = 1\n", "dvc.yaml": "stages: {}\n",
             "README.md": "r\n", "pipeline/data.csv": "1\n"}  # fmt: skip
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    committed = committed_digest(repo, "HEAD")
    assert committed == running_digest(repo)
    for path, text in (("README.md", "edited\n"), ("pipeline/data.csv", "2\n")):
        (repo / path).write_text(text)
        assert running_digest(repo) == committed, path  # not code
    for path, text in (("pipeline/p.py", "b = 2\n"), ("pipeline/new.py", "c = 1\n"),
                       ("dvc.yaml", "stages: {x: {cmd: x}}\n")):  # fmt: skip
        before = (repo / path).read_text() if (repo / path).exists() else None
        (repo / path).write_text(text)
        assert running_digest(repo) != committed, path
        (repo / path).unlink() if before is None else (repo / path).write_text(before)
    assert running_digest(repo) == committed
    assert committed_digest(repo, "0" * 40) is None  # a commit this clone lacks: unknown
    assert committed_digest(tmp_path, "HEAD") is None  # not a checkout
