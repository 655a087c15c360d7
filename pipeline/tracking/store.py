"""The tracking store and a stage's run in it.

- The store: `MLFLOW_TRACKING_URI`, else `tracking.uri`, else `sqlite:///<project>/mlflow.db`
  where <project> is `DVC_ROOT` when DVC runs us (in a `dvc exp` temp copy too), else the
  working directory. Local stores get an explicit artifact folder beside the database, and
  a store that was moved or copied has its artifact locations follow it.
- A server that cannot be reached fails the stage at once, naming the URI.
- `start_run` starts (or continues) a stage's run and ends it FINISHED or FAILED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError, first_line
from pipeline.params import TrackingParams, project_root
from pipeline.tracking.buffered import NullRun, Run, fail_fast
from pipeline.tracking.code import code_tags
from pipeline.tracking.queries import run_is_active, search

log = logging.getLogger(__name__)

SCRATCH_TAG = "scratch.run_id"  # on a pretrain run: the run of its scratch control


def resolve_uri(p: TrackingParams) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or p.uri
    if not uri:
        return f"sqlite:///{project_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{project_root() / uri.removeprefix('sqlite:///')}"  # relative path
    return uri


def _artifact_location(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None  # a server decides where its artifacts go


# Where a SQLite store keeps the artifact locations it was given, as absolute paths.
LOCATIONS = {
    "experiments": "artifact_location",
    "runs": "artifact_uri",
    "logged_models": "artifact_location",
    "model_versions": "storage_location",
}


def follow_moved_store(uri: str) -> None:
    """A local SQLite store's artifacts live beside it (`mlartifacts/`), but MLflow stores
    their locations as absolute paths: once the project moves (or is copied), runs point
    to where it was, reads find nothing there and new runs write outside the project. If
    the store's locations name another folder than the one it lies in now, they are
    rewritten to this one, in every table that holds them (MLflow has no API for it)."""
    import sqlite3

    if not uri.startswith("sqlite:///"):
        return  # a server keeps its artifacts where it serves them
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return
    here = db.resolve().parent
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
        rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
        moved = {  # where the store was, as a URI prefix ("file:///old/project/")
            loc.removesuffix("mlartifacts")
            for (loc,) in rows
            if loc.startswith("file:///") and loc.endswith("/mlartifacts")
        } - {here.as_uri() + "/"}
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for before in moved:
            plain = unquote(before.removeprefix("file://"))  # MLflow stores both forms
            for prefix, to in ((before, here.as_uri() + "/"), (plain, f"{here}/")):
                for table, column in LOCATIONS.items():
                    if table in tables:
                        con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE substr({column}, 1, ?) = ?",
                            (to, len(prefix) + 1, len(prefix), prefix),
                        )
            log.info("MLflow store %s was in %s: its artifact locations follow it", db, plain)


def connect(p: TrackingParams, create: bool = True) -> str:
    """Point MLflow at the store and the experiment (made if missing, unless `create` is
    False: then UserError naming it); -> the experiment id."""
    uri = resolve_uri(p)
    follow_moved_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with fail_fast():
        try:
            experiment = client.get_experiment_by_name(p.experiment)
        except Exception as err:
            raise UserError(
                f"cannot reach the MLflow tracking store at {uri}: {first_line(err)}"
            ) from None
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise UserError(
                f"MLflow experiment {p.experiment!r} is deleted in {uri}: restore it "
                f"(`MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}`) or set tracking.experiment to another name"
            )
        if experiment is None and not create:
            raise UserError(f"no MLflow experiment {p.experiment!r} in {uri} (no stage ran in it)")
        if experiment is None:
            try:
                location = _artifact_location(uri)
                return client.create_experiment(p.experiment, artifact_location=location)
            except Exception as err:  # e.g. a read-only store
                raise UserError(
                    f"cannot write to the MLflow store at {uri}: {first_line(err)}"
                ) from None
    return experiment.experiment_id


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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
    key: str | None = None,
):
    """Start a stage's run, or continue `run_id` (a checkpoint's) when the store still has
    it; `run.resumed` says which. Tags: see `_run_tags`. MLflow marks the run FAILED if
    the stage raises; a killed process leaves it RUNNING, and the resumed stage continues
    it. While the store does not answer, training goes on and logging is kept (see `Run`).
    `enabled=False` (ranks other than 0) gives a `NullRun`: one run per training run."""
    if not enabled:
        yield NullRun()
        return
    run_id = _continued(run_id, experiment_id, stage, key)
    tags = _run_tags(stage, digest, parent_id, key)
    active = _start(
        {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": run_name}
    )
    run = Run(active.info.run_id, resumed=run_id is not None, keep=True)
    status = "FAILED"
    try:
        run.set_tags(tags)
        yield run
        run.close()  # what the store missed while down, or a one-line error
        status = "FINISHED"
    finally:
        try:
            with fail_fast():
                mlflow.end_run(status)
        except Exception as err:  # the store is down: the run stays RUNNING there
            log.warning("could not mark MLflow run %s %s: %s", run.id, status, err)


def _continued(run_id: str | None, experiment_id: str | None, stage: str, key: str | None):
    """The checkpoint's run to continue, or None (a fresh run: this stage's runs of the
    same key left RUNNING before any checkpoint are ended first)."""
    if run_id is not None and not run_is_active(run_id):
        log.warning(
            "run %s of the checkpoint is not in the store, or deleted: starting a new run", run_id
        )
        run_id = None
    if run_id is None and key is not None and experiment_id is not None:
        _end_stale_runs(experiment_id, stage, key)
    return run_id


def _run_tags(stage: str, digest: str, parent_id: str | None, key: str | None) -> dict:
    """A stage run's tags: the stage, what it ran on (the manifest digest, the git commit,
    and the code that ran: `code.digest`, `git.dirty` when it is not the commit's, see
    `pipeline.tracking.code`), `dvc.exp_name`, the parent run and the checkpoint key."""
    # a queued experiment is tagged with its baseline, whatever HEAD is by then
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(project_root())
    return {
        "stage": stage,
        "data.manifest_digest": digest,
        "git.commit": commit,
        **code_tags(commit, project_root() / "dvc.yaml"),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "mlflow.parentRunId": parent_id,
        "checkpoint.key": key,  # the same params and data: a later start may resume it
    }


def _start(kwargs: dict):
    """`mlflow.start_run(**kwargs)`, failing fast in one line naming the store. MLflow's own
    system-metrics monitor never starts, whatever MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says:
    `SystemMetrics` writes `system/*` at the loss's steps (tracking.system_metrics), and a
    second writer would log the same keys with its own step counter (mlflow#9712)."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("true", "1"):
        log.info(
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is ignored: tracking.system_metrics says "
            "whether system/* is logged, at the loss's steps"
        )
    try:
        with fail_fast():
            return mlflow.start_run(**kwargs, log_system_metrics=False)
    except Exception as err:  # a read-only store, a full disk under it, ...
        where = mlflow.get_tracking_uri()
        raise UserError(
            f"cannot start a run in the MLflow store at {where}: {first_line(err)}"
        ) from None


def _end_stale_runs(experiment_id: str, stage: str, key: str) -> None:
    """Runs of this stage and checkpoint key still RUNNING when a fresh one starts were
    killed before their first checkpoint: marked KILLED, so that they do not look alive."""
    stale = search(
        experiment_id,
        f"tags.stage = '{stage}' and tags.`checkpoint.key` = '{key}' "
        "and attributes.status = 'RUNNING'",
    )
    for run in stale:
        log.warning(
            "run %s never finished (killed before a checkpoint): marked KILLED", run.info.run_id
        )
        MlflowClient().set_terminated(run.info.run_id, "KILLED")
