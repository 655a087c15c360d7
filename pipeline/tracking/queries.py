"""Runs that exist: one by id, a stage's, a run's children; and the names metrics take."""

from __future__ import annotations

import mlflow

from pipeline.errors import UserError


def search(experiment_id: str, filter_string: str) -> list:
    """The experiment's runs that `filter_string` (MLflow's search syntax) selects."""
    return mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", filter_string=filter_string
    )


def run_is_active(run_id: str) -> bool:
    """The store has the run and it is not deleted (in MLflow's trash)."""
    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def get_run(run_id: str):
    """The run, or UserError naming the id and the store."""
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"no MLflow run {run_id} in {mlflow.get_tracking_uri()}") from None


def active_run(run_id: str, role: str):
    """The run, to be logged to; UserError naming it (`role`: what it is to the caller, e.g.
    "the finetune run's parent pretrain") if the store lacks it or it is deleted: MLflow
    refuses to log to a deleted run, and the UI's delete keeps it in a trash for restoring
    (until `mlflow gc`)."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(
            f"{role} run {run_id} is not in the MLflow store at {mlflow.get_tracking_uri()} "
            "(deleted for good by `mlflow gc`, or another store): run its stage again"
        ) from None
    return check_active(run, role)


def check_active(run, role: str):
    """`run` (an MLflow run already fetched) if it is not deleted; else UserError naming it
    and the command that restores it."""
    if run.info.lifecycle_stage == "deleted":
        raise UserError(
            f"{role} run {run.info.run_id} is deleted in the MLflow store at "
            f"{mlflow.get_tracking_uri()}: restore it ({restore_command(run.info.run_id)}) "
            "or run its stage again"
        )
    return run


def restore_command(run_id: str) -> str:
    """The command that takes a deleted run out of MLflow's trash, for this store."""
    return (
        f"`MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()} mlflow runs restore --run-id {run_id}`"
    )


def child_runs(run, stages: tuple[str, ...]) -> list:
    """The children of `run` (an MLflow run) of the given stages."""
    children = search(run.info.experiment_id, f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    return [c for c in children if c.data.tags.get("stage") in stages]


def stage_runs(experiment_id: str, stage: str) -> list:
    return search(experiment_id, f"tags.stage = '{stage}'")


def metric_name(name: str) -> str:
    """MLflow metric keys allow letters, digits, '_', '-', '.', ' ' and '/'."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)


def class_keys(classes: list[str]) -> list[str]:
    """Metric key parts for the classes of manifest.json, in its order: the class's index
    there, then its name as MLflow can hold it (cut at 100 characters). The index keeps
    names that MLflow cannot hold as they are distinct: `cat (wild)` and `cat [wild]`
    become `0_cat _wild_` and `1_cat _wild_`."""
    width = len(str(max(len(classes) - 1, 0)))
    return [f"{i:0{width}d}_{metric_name(c)[:100]}" for i, c in enumerate(classes)]
