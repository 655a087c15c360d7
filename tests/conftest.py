"""Fixtures every test module may use: the tiny project, CUDA skips, seeds, no shared store."""

from pathlib import Path

import pytest
import torch

from tests.factory import build_project


def pytest_collection_modifyitems(config, items):
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
