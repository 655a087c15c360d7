"""MLflow, touched from this module only.

- The store: `MLFLOW_TRACKING_URI`, else `tracking.uri`, else `sqlite:///<project>/mlflow.db`
  where <project> is `DVC_ROOT` when DVC runs us (in a `dvc exp` temp copy too), else the
  working directory. Local stores get an explicit artifact folder beside the database.
- A server that cannot be reached fails the stage at once, naming the URI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError, first_line
from pipeline.params import TrackingParams, project_root

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


@contextmanager
def _fail_fast(timeout: int = 10):
    """No retries and a short timeout for the store's answers (MLflow's default: ~4 min)."""
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def connect(p: TrackingParams) -> str:
    """Point MLflow at the store and the experiment; -> the experiment id."""
    uri = resolve_uri(p)
    follow_moved_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with _fail_fast():
        try:
            experiment = client.get_experiment_by_name(p.experiment)
        except Exception as err:
            raise UserError(
                f"cannot reach the MLflow tracking store at {uri}: {first_line(err)}"
            ) from None
        if experiment is None:
            try:
                location = _artifact_location(uri)
                return client.create_experiment(p.experiment, artifact_location=location)
            except Exception as err:  # e.g. a read-only store
                raise UserError(
                    f"cannot write to the MLflow store at {uri}: {first_line(err)}"
                ) from None
    return experiment.experiment_id


class SystemMetrics:
    """The machine's load under MLflow's own names for it (`system/...`, which its UI shows
    as system metrics), sampled at the training loop's log points and sent with the loss
    through the run's buffered logging, so that training never waits for the store and a
    sample is not lost while it is down (MLflow's monitor thread would block the end of
    the run on a lost server). CPU and memory from psutil; per GPU the memory torch holds
    and, where nvidia-ml-py is installed, the utilisation."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        psutil.cpu_percent(None)  # the first call starts the interval the next one measures

    def sample(self) -> dict[str, float]:
        import torch

        memory = self.psutil.virtual_memory()
        out = {
            "system/cpu_utilization_percentage": self.psutil.cpu_percent(None),
            "system/system_memory_usage_megabytes": memory.used / 2**20,
            "system/system_memory_usage_percentage": memory.percent,
        }
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            out[f"system/gpu_{i}_memory_usage_megabytes"] = torch.cuda.memory_reserved(i) / 2**20
            with contextlib.suppress(Exception):  # no NVML: no utilisation
                out[f"system/gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(i))
        return out


def runs_address(base: str, experiment_id: str, stage: str | None = None, charts=False) -> str:
    """The MLflow UI's page of an experiment's training runs (its table, or its chart view,
    of the runs of one `stage`). MLflow 3's UI opens an experiment on a GenAI "Overview" of
    traces (seen in Chromium with MLflow 3.17, whatever the experiment's tags)."""
    from urllib.parse import quote, urlencode

    query = {"compareRunsMode": "CHART"} if charts else {}
    query |= {"searchFilter": f"tags.stage = '{stage}'"} if stage else {}
    address = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{address}?{urlencode(query, quote_via=quote)}" if query else address


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


# while the store is down, one short try per RETRY_S seconds; at the end of a stage, wait
# up to FLUSH_S seconds for it (environment variables of the same names override)
RETRY_S = float(os.environ.get("MAE_MLFLOW_RETRY_S", 30))
FLUSH_S = float(os.environ.get("MAE_MLFLOW_FLUSH_S", 60))


class Run:
    """One MLflow run, by id; every logging call of the stages and of `evaluate` goes
    through here (on a finished run too: logging never changes a run's status).

    Training never waits on the store: each call gets a short timeout (artifacts a long
    one: a model file may take a while to upload), and while the store does not answer,
    calls are kept in order (artifacts copied aside) and sent when it answers again, one
    try per `RETRY_S`. `close` sends what is left, waiting up to
    `FLUSH_S`, then fails in one line naming what was not logged."""

    def __init__(self, run_id: str, resumed: bool = False, keep: bool = False) -> None:
        self.id = run_id
        self.resumed = resumed  # continued from a checkpoint: params are logged already
        self.keep = keep  # a training run: keep calls while the store is down (else raise)
        self.pending: list[tuple[str, Any, tuple]] = []  # (what, call, args), oldest first
        self.down_since: float | None = None
        self.error = ""  # why the store did not answer, first time
        self.spool: Path | None = None  # copies of artifacts waiting to be sent

    def log_params(self, params: dict[str, Any]) -> None:
        self._send("params", self._log_params, dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self._send("metrics", self._log_metrics, values, step)

    def set_tags(self, tags: dict[str, str | None]) -> None:
        from mlflow.entities import RunTag

        kept = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        self._send("tags", lambda tags: MlflowClient().log_batch(self.id, tags=tags), kept)

    def log_bytes(self, data: bytes, artifact_path: str) -> None:
        """Write `data` as artifact `artifact_path` (e.g. "reconstructions/epoch_002.png")."""
        import tempfile

        folder, name = os.path.split(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.log_file(path, folder or None)

    def log_file(self, path: Path, artifact_dir: str | None = None) -> None:
        self._send("artifact", self._log_file, path, artifact_dir)

    def log_dataset(self, manifest_path: Path, digest: str, name: str, context: str) -> None:
        """(The active run only: `mlflow.log_input` takes no run id.)"""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = MetaDataset(
            LocalArtifactDatasetSource(str(manifest_path.parent.resolve())),
            name=name,
            digest=digest[:36],
        )
        self._send("dataset", lambda: mlflow.log_input(dataset, context=context))

    def log_classifier(self, folder: Path, example: bytes) -> None:
        """The classifier in `folder` (model.safetensors + config.json) as this run's MLflow
        model `classifier` (see pipeline/mlflow_model.py), with `example` (an encoded
        image) as its input example. (The active run only: `log_model` takes no run id.)"""
        self._send("model", self._log_classifier, folder, example)

    # ---------------------------------------------------------------- sending
    def _log_params(self, params: dict[str, Any]) -> None:
        existing = mlflow.get_run(self.id).data.params
        fresh = {k: _param_value(v) for k, v in params.items() if k not in existing}
        mlflow.log_params(fresh, run_id=self.id)  # MLflow sends it in batches of 100

    def _log_metrics(self, values: dict[str, float], step: int | None) -> None:
        mlflow.log_metrics(values, step=step, run_id=self.id)

    def _log_file(self, path: Path, artifact_dir: str | None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_dir, run_id=self.id)

    def _log_classifier(self, folder: Path, example: bytes) -> None:
        import mlflow.pyfunc
        import pandas as pd

        import mae

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.id:
            raise RuntimeError(f"log_classifier: run {self.id} is not the active run")
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text())
        mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(Path(__file__).with_name("mlflow_model.py")),
            artifacts={"weights": str(folder / "model.safetensors"), "config": str(config_file)},
            code_paths=[str(Path(mae.__file__).parent)],  # loads where the pipeline is not
            signature=_classifier_signature(),
            input_example=pd.DataFrame({"image": [example]}),
            pip_requirements=_model_requirements(),  # inferring them takes a subprocess
            metadata={"classes": config["classes"], "stage": config["kind"]},
        )

    def _send(self, what: str, call, *args) -> None:
        if not self.keep:
            call(*args)
            return
        if self.down_since is not None and time.monotonic() - self.down_since < RETRY_S:
            self._keep(what, call, args)
            return
        try:  # a model file to a team's server may take long: a timeout to match
            with _fail_fast(timeout=120 if what in ("artifact", "model") else 5):
                self._flush()
                call(*args)
        except Exception as err:
            self._keep(what, call, args)
            self._went_down(err)
            return
        if self.down_since is not None:
            log.info("the MLflow store answers again: the kept logging calls were sent")
        self.down_since = None

    def _flush(self) -> None:
        """Send the kept calls, oldest first; each leaves the list once the store took it."""
        while self.pending:
            _, call, args = self.pending[0]
            call(*args)
            self.pending.pop(0)

    def _keep(self, what: str, call, args: tuple) -> None:
        if what in ("artifact", "model"):  # it may be gone: a temp file, a renamed folder
            import shutil
            import tempfile

            self.spool = self.spool or Path(tempfile.mkdtemp(prefix="mae-mlflow-"))
            copy = Path(tempfile.mkdtemp(dir=self.spool)) / Path(args[0]).name
            if Path(args[0]).is_dir():
                shutil.copytree(args[0], copy)
            else:
                shutil.copy2(args[0], copy)
            args = (copy, *args[1:])
        self.pending.append((what, call, args))

    def _went_down(self, err: Exception) -> None:
        if self.down_since is None or not self.error:
            self.error = first_line(err)
            log.warning(
                "the MLflow store does not answer (%s): training goes on, logging is kept "
                "and sent when it answers",
                self.error,
            )
        self.down_since = time.monotonic()

    def close(self) -> None:
        """Send what was kept, waiting up to FLUSH_S for the store; else one-line error."""
        deadline = time.monotonic() + FLUSH_S
        while self.pending:
            try:
                with _fail_fast(timeout=120):
                    self._flush()
            except Exception as err:
                self._went_down(err)
                if time.monotonic() > deadline:
                    kinds = sorted({what for what, _, _ in self.pending})
                    raise UserError(
                        f"the MLflow store stopped answering ({self.error}): "
                        f"{len(self.pending)} logging call(s) of run {self.id} "
                        f"({', '.join(kinds)}) were not sent; the stage's outputs are "
                        "written, its MLflow run is incomplete"
                    ) from None
                time.sleep(5)
        if self.spool is not None:
            import shutil

            shutil.rmtree(self.spool, ignore_errors=True)
            self.spool = None


MODEL_NAME = "classifier"  # a classifier run's MLflow model (its LoggedModel's name)


def _classifier_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "class"),
                ColSpec("double", "probability"),
                ColSpec(Array("double"), "probabilities"),
            ]
        ),
    )


def _model_requirements() -> list[str]:
    """What pipeline/mlflow_model.py and the bundled `mae` import, pinned as installed."""
    from importlib.metadata import version

    packages = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas")
    return [f"{name}=={version(name)}" for name in packages]


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
    key: str | None = None,
):
    """Start a stage's run, or continue `run_id` (a checkpoint's) when the store still has
    it; `run.resumed` says which. Tags: the stage, the manifest digest, the git commit and
    `dvc.exp_name`. MLflow marks the run FAILED if the stage raises; a killed process leaves
    it RUNNING, and the resumed stage continues it. While the store does not answer,
    training goes on and logging is kept (see `Run`). `enabled=False` (ranks other than 0)
    gives a `NullRun`: one run per training run."""
    if not enabled:
        yield NullRun()
        return
    if run_id is not None and not run_exists(run_id):
        log.warning("run %s of the checkpoint is not in the store; starting a new run", run_id)
        run_id = None
    if run_id is None and key is not None and experiment_id is not None:
        _end_stale_runs(experiment_id, stage, key)
    tags = {
        "stage": stage,
        "data.manifest_digest": digest,
        # a queued experiment runs its baseline's code, whatever HEAD is by then
        "git.commit": os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(project_root()),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "mlflow.parentRunId": parent_id,
        "checkpoint.key": key,  # the same params and data: a later start may resume it
    }
    kwargs = (
        {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": run_name}
    )
    try:
        with _fail_fast():
            active = mlflow.start_run(**kwargs)
    except Exception as err:  # a read-only store, a full disk under it, ...
        where = mlflow.get_tracking_uri()
        raise UserError(
            f"cannot start a run in the MLflow store at {where}: {first_line(err)}"
        ) from None
    run = Run(active.info.run_id, resumed=run_id is not None, keep=True)
    status = "FAILED"
    try:
        run.set_tags(tags)
        yield run
        run.close()  # what the store missed while down, or a one-line error
        status = "FINISHED"
    finally:
        try:
            with _fail_fast():
                mlflow.end_run(status)
        except Exception as err:  # the store is down: the run stays RUNNING there
            log.warning("could not mark MLflow run %s %s: %s", run.id, status, err)


def _end_stale_runs(experiment_id: str, stage: str, key: str) -> None:
    """Runs of this stage and checkpoint key still RUNNING when a fresh one starts were
    killed before their first checkpoint: marked KILLED, so that they do not look alive."""
    stale = mlflow.search_runs(
        experiment_ids=[experiment_id],
        output_format="list",
        filter_string=(
            f"tags.stage = '{stage}' and tags.`checkpoint.key` = '{key}' "
            "and attributes.status = 'RUNNING'"
        ),
    )
    for run in stale:
        log.warning(
            "run %s never finished (killed before a checkpoint): marked KILLED", run.info.run_id
        )
        MlflowClient().set_terminated(run.info.run_id, "KILLED")


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
        where = MlflowClient().get_run(run_id).info.artifact_uri
        raise UserError(f"run {run_id} has no model: nothing at {where}/model") from None
    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"run {run_id} has no model (model/ lacks config.json or weights)")
    return folder


def model_uri(run) -> str:
    """The URI of `run`'s MLflow model (`models:/<model id>`); UserError if it has none."""
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        stage = run.data.tags.get("stage", "untagged")
        raise UserError(
            f"run {run.info.run_id} ({stage}) has no MLflow model; give a finetune, "
            "linprobe or scratch run"
        )
    return f"models:/{outputs[-1].model_id}"


CHAMPION = "champion"  # the alias of the registered version with the best test top-1


def register_champion(name: str, run, top1: float) -> dict:
    """Register `run`'s MLflow model under `name` (once per run), tag the version with its
    test top-1, and point alias `champion` at the version with the best. -> the version,
    the champion's version and the name."""
    client = MlflowClient()
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
        version = found[0] if found else mlflow.register_model(model_uri(run), name)
        client.set_model_version_tag(name, version.version, "test_top1", f"{top1:.6f}")
        versions = client.search_model_versions(f"name = '{name}'")
        best = max(versions, key=lambda v: (float(v.tags.get("test_top1", -1)), -int(v.version)))
        client.set_registered_model_alias(name, CHAMPION, best.version)
    except mlflow.exceptions.MlflowException as err:
        raise UserError(
            f"tracking.register: cannot register run {run.info.run_id} as {name!r}: "
            f"{first_line(err)}"
        ) from None
    return {"name": name, "version": int(version.version), "champion": int(best.version)}


def stage_runs(experiment_id: str, stage: str) -> list:
    return mlflow.search_runs(
        experiment_ids=[experiment_id],
        output_format="list",
        filter_string=f"tags.stage = '{stage}'",
    )


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
