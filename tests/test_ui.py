"""`mae-cli ui`: the real MLflow UI on 127.0.0.1 for a store with a run, the address of the
experiment's training runs it prints, and (where Debian's `chromium` is installed) what a
browser shows there."""

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.params import parse_params
from pipeline.tracking import connect
from tests.factory import free_port, project_params, wait_for_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`mae-cli ui` on a store holding an experiment with one run; -> (the printed runs
    address, the experiment id, the params); stopped after the module's tests."""
    tmp_path = tmp_path_factory.mktemp("ui")
    params = project_params({"tracking": {"experiment": "ui", "uri": f"sqlite:///{tmp_path}/m.db"}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    client = mlflow.MlflowClient(params["tracking"]["uri"])
    experiment_id = client.create_experiment("ui", (tmp_path / "art").as_uri())
    run = client.create_run(experiment_id, run_name="pretrain mask=0.75")
    client.log_metric(run.info.run_id, "finetune/test_top1", 0.84)
    client.set_terminated(run.info.run_id)
    port = free_port()
    cli = Path(sys.executable).with_name("mae-cli")
    proc = subprocess.Popen(
        [str(cli), "ui", "--params", "params.yaml", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # the UI's server processes are stopped with it
    )
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        address = re.search(r"training runs: (\S+)", lines[1])[1]
        charts = re.search(r"in charts: (\S+)", lines[2])[1]
        assert (
            charts
            == f"{address}?compareRunsMode=CHART&searchFilter=tags.stage%20%3D%20%27pretrain%27"
        )
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        yield address, experiment_id, params
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_ui_prints_the_address_of_the_experiments_training_runs(ui):
    address, experiment_id, params = ui
    port = address.split(":")[2].split("/")[0]
    assert address == f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
    assert connect(parse_params(params).tracking) == experiment_id  # the existing one
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
        assert page.status == 200 and b"<html" in page.read().lower()


def test_a_second_ui_on_a_port_in_use_fails_in_one_line_and_prints_no_address(ui):
    """`mlflow ui` alone logs "Address already in use" and exits 0, after mae-cli had
    printed addresses where the other server answers."""
    address, _, params = ui
    port = int(address.split(":")[2].split("/")[0])
    folder = Path(params["tracking"]["uri"].removeprefix("sqlite:///")).parent
    cli = Path(sys.executable).with_name("mae-cli")
    done = subprocess.run([str(cli), "ui", "--port", str(port)], cwd=folder,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"mae-cli: error: port {port} on 127.0.0.1 is in use"), line
    assert "--port" in line and "Traceback" not in done.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_a_browser_at_the_printed_address_sees_the_runs_table(ui, tmp_path):
    address, _, _ = ui
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    cmd += ["--virtual-time-budget=20000", f"--user-data-dir={tmp_path / 'chromium'}"]
    shot = tmp_path / "runs.png"
    subprocess.run([*cmd, f"--screenshot={shot}", "--window-size=1400,900", address],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    dom = subprocess.run([*cmd, "--dump-dom", address], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert shot.stat().st_size > 10_000
    assert "Training runs" in dom  # the runs view, not the GenAI overview
    assert "pretrain mask=0.75" in dom  # the run's row in its table
