"""A classifier run's MLflow model: logged by the stage, loaded by `mlflow.pyfunc`, served
by `mlflow models serve`, registered with a champion alias, and used by `mae-cli predict`;
each answers as `mae-cli evaluate` does for the same images. Real MLflow, real server."""

import base64
import csv
import io
import json
import os
import subprocess
import sys
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from pipeline import tracking
from pipeline.data.loader import build_loader
from pipeline.params import load_params
from pipeline.stages import run_training
from pipeline.stages.evaluate import evaluate_run
from tests.factory import (
    MAE_CLI,
    bands_dataset,
    build_project,
    free_port,
    image_bytes,
    wait_for_http,
)

CLASSES = ["top", "upper", "lower", "bottom"]  # where the bright square lies
SERVED = {
    "data": {"shard_max_count": 200, "class_names": CLASSES},
    "pretrain": {"epochs": 1, "log_every": 4},
    "finetune": {"epochs": 4, "batch_size": 32, "blr": 2e-2, "scale_min": 1.0, "log_every": 4},
    "tracking": {"experiment": "serve"},
}
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project with a finetune run on learnable 16 px images, and its MLflow store."""
    folder = tmp_path_factory.mktemp("served")
    build_project(
        folder,
        dataset=lambda raw: bands_dataset(raw, n_train=320, n_test=40),
        stages=("shard", "pretrain", "finetune"),
        **SERVED,
    )
    return folder, (folder / "models/finetune/run_id").read_text().strip()


@pytest.fixture
def project(trained, monkeypatch):
    folder, run_id = trained
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    tracking.connect(load_params("params.yaml").tracking)
    return folder, run_id


def _test_images(count: int) -> list[tuple[str, bytes]]:
    """The first `count` test images as the shards hold them (key, PNG bytes)."""
    loader = build_loader("data/shards", "test", "eval", batch_size=count, img_size=16)
    keys = loader.reader.index.key[:count].tolist()
    out = []
    for i, key in enumerate(keys):
        with Image.open(io.BytesIO(loader.reader.encoded(i))) as img:
            png = io.BytesIO()
            img.save(png, format="PNG")
        out.append((key, png.getvalue()))
    return out


def _evaluate_cli(run_id: str, folder: Path) -> dict[str, dict]:
    """`mae-cli evaluate --run-id --predictions`: per test image key, its CSV row."""
    subprocess.run(
        [MAE_CLI, "evaluate", "--run-id", run_id, "--predictions", "preds"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    with (folder / "preds" / f"{run_id}.csv").open() as f:
        return {row["key"]: row for row in csv.DictReader(f)}


def test_the_stage_logs_a_model_pyfunc_loads_that_answers_as_evaluate(project):
    folder, run_id = project
    run = mlflow.get_run(run_id)
    uri = tracking.model_uri(run)
    info = mlflow.models.get_model_info(uri)
    assert info.metadata == {"classes": CLASSES, "stage": "finetune"}
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image"]
    assert info.signature.inputs.to_dict()[0]["type"] == "binary"
    assert info.saved_input_example_info["type"] == "dataframe"
    metrics = json.loads((folder / "metrics/finetune.json").read_text())
    assert 0 < metrics["model_log_seconds"] < 10  # ~1 s when written

    (result,) = evaluate_run(load_params("params.yaml"), run_id, per_image=True)
    assert result["top1"] >= 0.5, result["confusion"]  # learned: chance is 0.25
    expected = dict(zip(result["images"]["key"], result["images"]["probabilities"], strict=True))
    import pandas as pd

    images = _test_images(6)
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"image": [png for _, png in images]}))
    for (key, _), cls, p, probs in zip(
        images, out["class"], out["probability"], out["probabilities"], strict=True
    ):
        assert probs == pytest.approx(expected[key], abs=1e-6)
        assert cls == CLASSES[max(range(4), key=expected[key].__getitem__)]
        assert p == pytest.approx(max(expected[key]), abs=1e-6)


def test_the_model_loads_without_the_pipeline_package(project, tmp_path):
    """What MLflow stored is the model whole: `pipeline` cannot be imported, `mae` comes
    from the model's own code folder."""
    _, run_id = project
    local = mlflow.artifacts.download_artifacts(tracking.model_uri(mlflow.get_run(run_id)))
    script = (
        "import sys; sys.modules['pipeline'] = None\n"
        "import mlflow.pyfunc, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({local!r})\n"
        f"out = m.predict(pd.DataFrame({{'image': [{image_bytes((40, 30), 'RGB', 'JPEG')!r}]}}))\n"
        "import mae; print(mae.__file__); print(out['class'][0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    mae_file, cls = out.stdout.split()[-2:]
    assert mae_file.startswith(local) and cls in CLASSES
    # mlflow#4340: pins a package index can resolve (torch here is 2.14.1+cu130 or +cpu)
    import yaml
    from packaging.version import Version

    pins = (Path(local) / "requirements.txt").read_text().split()
    conda = yaml.safe_load((Path(local) / "conda.yaml").read_text())
    (pip,) = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict)]
    for pin in {p for p in pins + pip if "==" in p}:
        name, version = pin.split("==")
        assert "+" not in version and version == Version(metadata.version(name)).public, pin
    assert any(p.startswith("torch==") for p in pins)


def test_a_model_without_an_input_example_logs_and_answers(project):
    """What a run logs when no example can be made (see tests/test_images.py)."""
    import pandas as pd

    folder, _ = project
    with mlflow.start_run() as run:
        tracking.models.log_classifier(run.info.run_id, folder / "models/finetune", None)
    model = mlflow.pyfunc.load_model(tracking.model_uri(mlflow.get_run(run.info.run_id)))
    out = model.predict(pd.DataFrame({"image": [png for _, png in _test_images(2)]}))
    assert list(out["class"]) and set(out["class"]) <= set(CLASSES)


def test_model_requirements_drop_local_version_labels(monkeypatch):
    from pipeline.tracking import models

    real = metadata.version
    labelled = {"torch": "2.14.1+cu128", "numpy": "2.3.0+local.build.7"}
    monkeypatch.setattr(metadata, "version", lambda name: labelled.get(name) or real(name))
    pins = dict(pin.split("==") for pin in models._model_requirements())
    assert pins["torch"] == "2.14.1" and pins["numpy"] == "2.3.0"


def test_mlflow_models_serve_answers_as_mae_cli_evaluate(project):
    folder, run_id = project
    expected = _evaluate_cli(run_id, folder)
    images = _test_images(2)
    port = free_port()
    uri = tracking.model_uri(mlflow.get_run(run_id))
    command = [MLFLOW, "models", "serve", "-m", uri, "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # it starts `uvicorn` by name: the environment's bin folder must be on PATH
        env=os.environ | {"PATH": f"{Path(MLFLOW).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(png).decode()] for _, png in images],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(answer) == 2
    for (key, _), got in zip(images, answer, strict=True):
        row = expected[key]
        assert got["class"] == row["class"]
        assert got["probability"] == pytest.approx(float(row["probability"]), abs=1e-6)
        assert got["probabilities"] == pytest.approx([float(row[c]) for c in CLASSES], abs=1e-6)


def test_predict_classifies_images_of_any_size_and_mode(project, tmp_path, mae_cli_main):
    _, run_id = project
    key, png = _test_images(1)[0]
    (tmp_path / "shots").mkdir()
    (tmp_path / "shots/test.png").write_bytes(png)
    (tmp_path / "shots/photo.jpg").write_bytes(image_bytes((60, 40), "RGB", "JPEG"))
    rgba = Image.new("RGBA", (25, 31), (200, 10, 10, 128))
    rgba.save(tmp_path / "shots/alpha.png")
    (tmp_path / "shots/notes.txt").write_text("not an image, not a candidate")
    code, out, err = mae_cli_main(
        "predict", "--run-id", run_id, "--top-k", "2", "--json", str(tmp_path / "shots")
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [Path(r["path"]).name for r in rows] == ["alpha.png", "photo.jpg", "test.png"]
    assert all(
        len(r["top"]) == 2 and r["top"][0]["probability"] >= r["top"][1]["probability"]
        for r in rows
    )
    (result,) = evaluate_run(load_params("params.yaml"), run_id, per_image=True)
    probs = result["images"]["probabilities"][result["images"]["key"].index(key)]
    assert rows[2]["top"][0]["class"] == CLASSES[max(range(4), key=probs.__getitem__)]
    assert rows[2]["top"][0]["probability"] == pytest.approx(max(probs), abs=1e-6)

    _, out, _ = mae_cli_main("predict", "--run-id", run_id, str(tmp_path / "shots/test.png"))
    assert out.splitlines() == [
        f"{tmp_path / 'shots/test.png'}  {rows[2]['top'][0]['class']} "
        f"{rows[2]['top'][0]['probability']:.4f}"
    ]


def _png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header (8-bit gray) with no pixels: what Pillow reads to learn
    an image's size, and where it stops a decompression bomb."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + b"\xaeB`\x82"


def test_predict_mistakes_are_one_line(project, tmp_path, mae_cli_main):
    folder, run_id = project
    pretrain_id = (folder / "models/pretrain/run_id").read_text().strip()
    (tmp_path / "notes.png").write_text("hello")
    (tmp_path / "empty").mkdir()
    good = str(tmp_path / "ok.png")
    Path(good).write_bytes(image_bytes((16, 16), "L", "PNG"))
    (tmp_path / "huge.png").write_bytes(_png_header(20_000, 10_000))  # 200 megapixels
    Image.new("F", (8, 8), 200.0).save(tmp_path / "depth.tif")  # floats beyond [0, 1]
    cases = [
        (["--run-id", run_id, str(tmp_path / "huge.png")], "huge.png: too large to decode safely"),
        (["--run-id", run_id, str(tmp_path / "depth.tif")], "depth.tif: float (mode F) pixels"),
        (["--run-id", run_id, str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--run-id", run_id, str(tmp_path / "notes.png")], "notes.png: not an image"),
        (["--run-id", run_id, str(tmp_path / "empty")], "empty: a folder without images"),
        (["--run-id", "0123abcd", good], "no MLflow run 0123abcd"),
        (["--run-id", pretrain_id, good], f"run {pretrain_id} (pretrain) has no MLflow model"),
        (["--model-uri", "models:/nothing@champion", good], "cannot load the model"),
    ]
    for args, message in cases:
        code, out, err = mae_cli_main("predict", *args)
        assert code == 1, (args, out)
        assert err.strip().splitlines()[-1].startswith("mae-cli: error: "), err
        assert message in err and "Traceback" not in err, err


def test_register_points_champion_at_the_best_test_top1(project, tmp_path):
    """evaluate registers the finetune model it evaluates (once per run); the alias follows
    the best test top-1, and `predict --model-uri models:/<name>@champion` uses it. Any
    name MLflow takes works: a quote broke MLflow's filter strings (`O'Neil lab`), and a
    name that a LIKE pattern also matches (`O_Neil lab`) keeps its own versions."""
    _, run_id = project
    p = load_params("params.yaml")
    name = "O'Neil lab"
    registered = p.model_copy(update={"tracking": p.tracking.model_copy(update={"register": name})})
    (result,) = evaluate_run(registered, run_id)
    assert result["registered"] == {"name": name, "version": 1, "champion": 1}
    second = run_training("finetune", p)  # the same recipe again: a second run, a second version
    run = mlflow.get_run(second)
    decoy = tracking.register_champion("O_Neil lab", run, 1.0)
    assert decoy == {"name": "O_Neil lab", "version": 1, "champion": 1}
    worse = tracking.register_champion(name, run, result["top1"] - 0.1)
    assert worse == {"name": name, "version": 2, "champion": 1}
    better = tracking.register_champion(name, run, result["top1"] + 0.1)  # re-evaluated
    assert better == {"name": name, "version": 2, "champion": 2}
    quoted = 'say "hi" 100%'
    assert tracking.register_champion(quoted, run, 0.5) == {
        "name": quoted,
        "version": 1,
        "champion": 1,
    }
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions("name LIKE 'O_Neil lab'")) == 3  # both names
    assert client.get_model_version_by_alias(name, "champion").run_id == second

    image = tmp_path / "one.png"
    image.write_bytes(_test_images(1)[0][1])
    out = subprocess.run(  # the console script, as a user runs it
        [MAE_CLI, "predict", "--model-uri", f"models:/{name}@champion", str(image)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.split()[1] in CLASSES, out.stderr
