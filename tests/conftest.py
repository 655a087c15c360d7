import pytest
import torch


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
