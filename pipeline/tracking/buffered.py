"""`Run`: the one door of every logging call of the stages and of `evaluate`, which keeps
training from waiting on the store and keeps what the store missed until it answers;
`SystemMetrics`, the machine's load sent through it."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError, first_line
from pipeline.tracking.models import log_classifier
from pipeline.tracking.queries import restore_command

log = logging.getLogger(__name__)


@contextmanager
def fail_fast(timeout: int = 10):
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
        self.marks: dict[str, int] | None = None  # resumed: the newest step per metric key

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

    def log_classifier(self, folder: Path, example: bytes | None) -> None:
        """The classifier in `folder` (model.safetensors + config.json) as this run's MLflow
        model `classifier` (see pipeline/mlflow_model.py), with `example` (an encoded
        image) as its input example. (The active run only: `log_model` takes no run id.)"""
        self._send("model", functools.partial(log_classifier, self.id), folder, example)

    # ---------------------------------------------------------------- sending
    def _log_params(self, params: dict[str, Any]) -> None:
        existing = mlflow.get_run(self.id).data.params
        fresh = {k: _param_value(v) for k, v in params.items() if k not in existing}
        mlflow.log_params(fresh, run_id=self.id)  # MLflow sends it in batches of 100

    def _log_metrics(self, values: dict[str, float], step: int | None) -> None:
        if self.resumed:  # the re-run epoch's points are in the store once already
            marks = self._marks()
            values = {k: v for k, v in values.items() if (step or 0) > marks.get(k, -1)}
        if values:
            mlflow.log_metrics(values, step=step, run_id=self.id)

    def _marks(self) -> dict[str, int]:
        """A resumed run's newest logged step per metric key, read from the store once, at
        the first send (mlflow#4248: a resumed run otherwise logs the points of the epoch
        it re-runs twice, at the same steps; the resumed epoch is the same computation, so
        the points kept are its values)."""
        if self.marks is None:
            client = MlflowClient()
            keys = client.get_run(self.id).data.metrics
            self.marks = {
                k: max(m.step for m in client.get_metric_history(self.id, k)) for k in keys
            }
        return self.marks

    def _log_file(self, path: Path, artifact_dir: str | None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_dir, run_id=self.id)

    def _send(self, what: str, call, *args) -> None:
        if not self.keep:
            call(*args)
            return
        if self.down_since is not None and time.monotonic() - self.down_since < RETRY_S:
            self._keep(what, call, args)
            return
        try:  # a model file to a team's server may take long: a timeout to match
            with fail_fast(timeout=120 if what in ("artifact", "model") else 5):
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
                with fail_fast(timeout=120):
                    self._flush()
            except Exception as err:
                self._went_down(err)
                kinds = sorted({what for what, _, _ in self.pending})
                if _deleted(self.id):  # not an outage: waiting will not help
                    raise UserError(
                        f"run {self.id} was deleted in the MLflow store while the stage ran: "
                        f"{len(self.pending)} logging call(s) ({', '.join(kinds)}) were not "
                        f"sent; the stage's outputs are written; {restore_command(self.id)} "
                        "brings back what it logged before"
                    ) from None
                if time.monotonic() > deadline:
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


class NullRun:
    """What ranks other than 0 log to: nothing. Same methods as `Run`."""

    id = None
    resumed = False

    def __getattr__(self, name: str):
        if not hasattr(Run, name):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _deleted(run_id: str) -> bool:
    """The store answers, at once, that the run is deleted (False if it does not answer)."""
    try:
        with fail_fast(timeout=5):
            return mlflow.get_run(run_id).info.lifecycle_stage == "deleted"
    except Exception:
        return False


def _param_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


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
