"""The classifier as an MLflow model (`pipeline/mlflow_model.py` loads it), and the model
registry: a run's model registered under a name, alias `champion` on the best version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError, first_line

MODEL_NAME = "classifier"  # a classifier run's MLflow model (its LoggedModel's name)


def log_classifier(run_id: str, folder: Path, example: bytes | None) -> None:
    """Log the classifier in `folder` (model.safetensors + config.json) as run `run_id`'s
    MLflow model `classifier`, `example` (an encoded image, or None) its input example.
    `run_id` must be the active run: `mlflow.pyfunc.log_model` takes no run id."""
    import mlflow.pyfunc
    import pandas as pd

    import mae

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError(f"log_classifier: run {run_id} is not the active run")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(Path(__file__).parents[1] / "mlflow_model.py"),
        artifacts={"weights": str(folder / "model.safetensors"), "config": str(config_file)},
        code_paths=[str(Path(mae.__file__).parent)],  # loads where the pipeline is not
        signature=_classifier_signature(),
        input_example=None if example is None else pd.DataFrame({"image": [example]}),
        pip_requirements=_model_requirements(),  # inferring them takes a subprocess
        metadata={"classes": config["classes"], "stage": config["kind"]},
    )


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
    """What pipeline/mlflow_model.py and the bundled `mae` import, pinned as installed, at
    their public versions: a local label (torch's `2.14.1+cpu`, `+cu128`) names a wheel
    PyPI does not have, and `mlflow models serve` in a virtualenv, `build-docker` or
    another machine could not rebuild the model's environment (mlflow#4340; MLflow's own
    requirement inference strips it too)."""
    from importlib.metadata import version

    from packaging.version import Version

    packages = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas")
    return [f"{name}=={Version(version(name)).public}" for name in packages]


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
        found = _versions(client, name, run.info.run_id)
        version = found[0] if found else mlflow.register_model(model_uri(run), name)
        client.set_model_version_tag(name, version.version, "test_top1", f"{top1:.6f}")
        versions = _versions(client, name)
        best = max(versions, key=lambda v: (float(v.tags.get("test_top1", -1)), -int(v.version)))
        client.set_registered_model_alias(name, CHAMPION, best.version)
    except mlflow.exceptions.MlflowException as err:
        raise UserError(
            f"tracking.register: cannot register run {run.info.run_id} as {name!r}: "
            f"{first_line(err)}"
        ) from None
    return {"name": name, "version": int(version.version), "champion": int(best.version)}


def _versions(client: MlflowClient, name: str, run_id: str | None = None) -> list:
    """The registered versions of model `name` (of run `run_id` alone, if given).

    MLflow's filter strings cannot match a name with a quote in it (`O'Neil lab`: neither
    doubled nor escaped quotes match, mlflow's search grammar): the name goes into a LIKE
    pattern with every quote, backslash and wildcard as `_`, and the versions found are
    kept where the name is exactly `name`."""
    pattern = re.sub(r"['\"\\%_]", "_", name)
    where = f"name LIKE '{pattern}'" + (f" and run_id = '{run_id}'" if run_id else "")
    return [v for v in client.search_model_versions(where) if v.name == name]
