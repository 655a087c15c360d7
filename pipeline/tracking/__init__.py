"""MLflow, touched from this package only; one job per module:

- `store`: which store (`MLFLOW_TRACKING_URI`, else `tracking.uri`, else
  `sqlite:///<project>/mlflow.db`), connecting to it, and starting and ending a stage's run.
- `buffered`: `Run`, the run every logging call goes through: training never waits on a
  lost store and nothing logged is dropped silently; the system metrics sent with it.
- `models`: the classifier as an MLflow model, and the model registry.
- `queries`: finding runs that exist (by id, by stage, children of a run) and the names
  their metrics take.
- `ui`: `mae-cli ui`, the MLflow UI on a free port and the addresses of its pages.

Callers import this package (`from pipeline import tracking`) and use the names below.
"""

from pipeline.tracking.buffered import NullRun, Run, SystemMetrics
from pipeline.tracking.models import (
    CHAMPION,
    MODEL_NAME,
    download_model,
    model_uri,
    register_champion,
)
from pipeline.tracking.queries import (
    active_run,
    check_active,
    child_runs,
    class_keys,
    get_run,
    metric_name,
    stage_runs,
)
from pipeline.tracking.store import SCRATCH_TAG, connect, resolve_uri, start_run
from pipeline.tracking.ui import runs_address, ui_command

__all__ = [
    "CHAMPION",
    "MODEL_NAME",
    "SCRATCH_TAG",
    "NullRun",
    "Run",
    "SystemMetrics",
    "active_run",
    "check_active",
    "child_runs",
    "class_keys",
    "connect",
    "download_model",
    "get_run",
    "metric_name",
    "model_uri",
    "register_champion",
    "resolve_uri",
    "runs_address",
    "stage_runs",
    "start_run",
    "ui_command",
]
