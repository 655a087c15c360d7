"""`mae-cli predict`: a user's own images through a tracked classifier's MLflow model (the
one `mlflow models serve` serves), from a run or from the model registry.

Every input is checked before the model loads: a missing path, a folder without images or
a file Pillow cannot read is one line naming it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import tracking
from pipeline.errors import UserError, first_line
from pipeline.params import Params


def image_files(paths: list[Path]) -> list[Path]:
    """The files given, and the image files under the folders given (sorted)."""
    from PIL import Image

    suffixes = set(Image.registered_extensions())
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
            )
            if not found:
                raise UserError(f"{path}: a folder without images")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def read_image(path: Path) -> bytes:
    """The file's bytes, once decoded whole by the model's rule (`mae.images.decode`: an
    image the served model would refuse is refused here, in one line naming it)."""
    from mae.images import decode

    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({first_line(err)})") from None
    try:
        decode(data, "L")  # the refusals do not depend on the model's mode
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return data


def load_model(p: Params, run_id: str | None, model_uri: str | None):
    """The pyfunc model of `run_id`, or at `model_uri` (e.g. models:/name@champion)."""
    import mlflow.pyfunc

    tracking.connect(p.tracking)
    uri = tracking.model_uri(tracking.get_run(run_id)) if run_id else model_uri
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as err:  # MLflow raises its own and OSError alike for a bad URI
        raise UserError(f"cannot load the model {uri}: {first_line(err)}") from None
    if "classes" not in (model.metadata.metadata or {}):
        raise UserError(f"{uri} is not a classifier of this pipeline (no classes in its metadata)")
    return model


def predict(model, files: list[Path], images: list[bytes], top_k: int) -> list[dict]:
    """-> per image its path and its `top_k` classes, most likely first."""
    import pandas as pd

    classes = model.metadata.metadata["classes"]
    out = model.predict(pd.DataFrame({"image": images}))
    rows = []
    for path, probs in zip(files, out["probabilities"], strict=True):
        ranked = sorted(range(len(classes)), key=lambda i: -probs[i])[:top_k]
        top = [{"class": classes[i], "probability": float(probs[i])} for i in ranked]
        rows.append({"path": str(path), "top": top})
    return rows


def format_row(row: dict) -> str:
    return "  ".join([row["path"], *(f"{t['class']} {t['probability']:.4f}" for t in row["top"])])
