"""Fixtures every test module may use: the tiny project, CUDA skips, seeds, no shared store;
under pytest-xdist, each worker its share of the threads and the long test files first."""

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.factory import build_project

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores: their share of threads each, here and in the commands a
    # test starts (mae-cli, dvc, the ranks of a launch), not every worker's torch taking all.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `--dist loadfile --no-loadscope-reorder` hands out the files in this order: the
        # files with a slow test first, so that the short ones fill in around them at the end.
        slow_files = {item.path for item in items if "slow" in item.keywords}
        items.sort(key=lambda item: item.path not in slow_files)  # stable: same order within
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_shared_tracking_store(monkeypatch):
    """Tests never log to the developer's MLflow server, and a store one test sets
    (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI) does not leak into the next."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # records the original for teardown
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A tiny project with its shards in `tmp_path`, the working directory."""
    build_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def mae_cli_main(monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """`mae-cli ARGS` through the console script's entry point, `pipeline.cli.main`, in this
    process and the working directory: what a user sees, without the ~5 s a fresh interpreter
    spends importing torch (the console script itself: tests/test_cli.py);
    -> a function of the arguments giving (exit code, stdout, stderr)."""
    from pipeline.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["mae-cli", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:  # click ends every command with one
            main()
        said = capsys.readouterr()
        return done.value.code or 0, said.out, said.err

    return run
