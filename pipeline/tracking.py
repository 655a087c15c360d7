"""MLflow, touched from this module only.

- The store: `MLFLOW_TRACKING_URI`, else `tracking.uri`, else `sqlite:///<project>/mlflow.db`
  where <project> is `DVC_ROOT` when DVC runs us (in a `dvc exp` temp copy too), else the
  working directory. Local stores get an explicit artifact folder beside the database.
- A server that cannot be reached fails the stage at once, naming the URI.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.params import TrackingParams

log = logging.getLogger(__name__)
SCRATCH_TAG = "scratch.run_id"  # on a pretrain run: the run of its scratch control


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def resolve_uri(p: TrackingParams) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or p.uri
    if not uri:
        return f"sqlite:///{project_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{project_root() / uri.removeprefix('sqlite:///')}"  # relative path
    return uri


def _artifact_location(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a server decides where its artifacts go


@contextmanager
def _fail_fast():
    """Short retries and timeout while checking that the store answers (default ~4 min)."""
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(p: TrackingParams) -> str:
    """Point MLflow at the store and the experiment; -> the experiment id."""
    uri = resolve_uri(p)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with _fail_fast():
        try:
            experiment = client.get_experiment_by_name(p.experiment)
        except Exception as err:
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise UserError(f"cannot reach the MLflow tracking store at {uri}: {reason}") from None
        if experiment is None:
            return client.create_experiment(p.experiment, artifact_location=_artifact_location(uri))
    return experiment.experiment_id


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_exists(run_id: str) -> bool:
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


class Run:
    """One MLflow run, by id; every logging call of the stages and of `evaluate` goes
    through here (on a finished run too: logging never changes a run's status)."""

    def __init__(self, run_id: str, resumed: bool = False) -> None:
        self.id = run_id
        self.resumed = resumed  # continued from a checkpoint: params are logged already

    def log_params(self, params: dict[str, Any]) -> None:
        existing = mlflow.get_run(self.id).data.params
        fresh = {k: _param_value(v) for k, v in params.items() if k not in existing}
        mlflow.log_params(fresh, run_id=self.id)  # MLflow sends it in batches of 100

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=self.id)

    def set_tags(self, tags: dict[str, str | None]) -> None:
        from mlflow.entities import RunTag

        kept = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        MlflowClient().log_batch(self.id, tags=kept)

    def log_bytes(self, data: bytes, artifact_path: str) -> None:
        """Write `data` as artifact `artifact_path` (e.g. "reconstructions/epoch_002.png")."""
        import tempfile

        folder, name = os.path.split(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.log_file(path, folder or None)

    def log_file(self, path: Path, artifact_dir: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_dir, run_id=self.id)

    def log_dataset(self, manifest_path: Path, digest: str, name: str, context: str) -> None:
        """(The active run only: `mlflow.log_input` takes no run id.)"""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = MetaDataset(
            LocalArtifactDatasetSource(str(manifest_path.parent.resolve())),
            name=name,
            digest=digest[:36],
        )
        mlflow.log_input(dataset, context=context)


class NullRun:
    """What ranks other than 0 log to: nothing. Same methods as `Run`."""

    id = None
    resumed = False

    def __getattr__(self, name: str):
        if not hasattr(Run, name):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _param_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


@contextmanager
def start_run(
    experiment_id: str | None,
    *,
    stage: str,
    digest: str,
    run_name: str,
    run_id: str | None = None,
    parent_id: str | None = None,
    enabled: bool = True,
):
    """Start a stage's run, or continue `run_id` (a checkpoint's) when the store still has
    it; `run.resumed` says which. Tags: the stage, the manifest digest, the git commit and
    `dvc.exp_name`. MLflow marks the run FAILED if the stage raises; a killed process leaves
    it RUNNING, and the resumed stage continues it. `enabled=False` (ranks other than 0)
    gives a `NullRun`: one run per training run."""
    if not enabled:
        yield NullRun()
        return
    if run_id is not None and not run_exists(run_id):
        log.warning("run %s of the checkpoint is not in the store; starting a new run", run_id)
        run_id = None
    tags = {
        "stage": stage,
        "data.manifest_digest": digest,
        # a queued experiment runs its baseline's code, whatever HEAD is by then
        "git.commit": os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(project_root()),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "mlflow.parentRunId": parent_id,
    }
    kwargs = (
        {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": run_name}
    )
    with mlflow.start_run(**kwargs) as active:
        run = Run(active.info.run_id, resumed=run_id is not None)
        run.set_tags(tags)
        yield run


# ------------------------------------------------------------------ existing runs
def get_run(run_id: str):
    """The run, or UserError naming the id and the store."""
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"no MLflow run {run_id} in {mlflow.get_tracking_uri()}") from None


def child_runs(run, stages: tuple[str, ...]) -> list:
    """The children of `run` (an MLflow run) of the given stages."""
    children = mlflow.search_runs(
        experiment_ids=[run.info.experiment_id],
        output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
    )
    return [c for c in children if c.data.tags.get("stage") in stages]


def download_model(run_id: str, dst: Path) -> Path:
    """The run's `model/` artifacts in `dst`; UserError if it has none."""
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model", dst_path=str(dst)
        )
    except Exception:
        raise UserError(f"run {run_id} has no model (no model/ artifacts)") from None
    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"run {run_id} has no model (model/ lacks config.json or weights)")
    return folder


def stage_runs(experiment_id: str, stage: str) -> list:
    return mlflow.search_runs(
        experiment_ids=[experiment_id],
        output_format="list",
        filter_string=f"tags.stage = '{stage}'",
    )


def metric_name(name: str) -> str:
    """MLflow metric keys allow letters, digits, '_', '-', '.', ' ' and '/'."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)
