"""The bad-input matrix: each mistake a user or a failing disk makes, through `mae-cli`'s
own entry point (`pipeline.cli.main`, what the console script calls; run here in this
process, which spares each case the ~5 s of a fresh interpreter importing torch: the
console script itself is tested in tests/test_cli.py), gives one line that names the
file, key or run, a non-zero exit, no traceback, and leaves the previous outputs (shards,
models, metrics, plots) byte-identical."""

import gzip
import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from tests.factory import build_project, mae_cli


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A project with shards and a pretrained model, copied for each case."""
    folder = build_project(tmp_path_factory.mktemp("base") / "p", pretrain={"epochs": 1}).parent
    mae_cli(["pretrain"], folder, check=True)
    return folder


def _outputs(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for sub in ("data/shards", "models", "metrics", "plots")
        for path in sorted((folder / sub).rglob("*"))
        if path.is_file()
    }


def _params(folder: Path, section: str, **keys) -> None:
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw[section] = {**raw[section], **keys}
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))


def _manifest_without(folder: Path, key: str) -> None:
    path = folder / "data/shards/manifest.json"
    manifest = json.loads(path.read_text())
    del manifest[key]
    path.write_text(json.dumps(manifest))


def _zero_rows(folder: Path) -> None:
    images = folder / "raw/train-images-idx3-ubyte.gz"
    data = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(data[:8] + struct.pack(">I", 0) + data[12:]))  # rows: 0


# (name, mutation of the copied project, command, exit code, what the one line says)
CASES = [
    ("unknown key", lambda f: _params(f, "pretrain", epoch=3), ["pretrain"], 1,
     "pretrain.epoch: unknown key; allowed: epochs"),
    ("bad value", lambda f: _params(f, "pretrain", mask_ratio=1.5), ["pretrain"], 1,
     "pretrain.mask_ratio: Input should be less than 1, got 1.5"),
    ("mask ratio the model cannot take", lambda f: _params(f, "pretrain", mask_ratio=0.99),
     ["pretrain"], 1, "leaves no visible patch out of 16 of model mae_vit_test"),
    ("nothing masked", lambda f: _params(f, "pretrain", mask_ratio=0.0), ["pretrain"], 1,
     "pretrain.mask_ratio: 0.0 masks none of the 16 patches of model mae_vit_test"),
    ("odd batch for mixup", lambda f: _params(f, "finetune", mixup=0.8, batch_size=33),
     ["finetune"], 1, "finetune.batch_size: 33 is odd, but mixup/cutmix"),
    ("k-NN k above the split", lambda f: _params(f, "pretrain", knn_bank=None, knn_k=500),
     ["pretrain"], 1, "pretrain.knn_k: 500 neighbours, but the k-NN bank holds 180 images"),
    ("negative seed", lambda f: _params(f, "runtime", seed=-5), ["pretrain"], 1,
     "runtime.seed: Input should be greater than or equal to 0, got -5"),
    ("missing key", lambda f: (f / "params.yaml").write_text("data: {}\n"), ["pretrain"], 1,
     "data.source: missing"),
    ("empty params file", lambda f: (f / "params.yaml").write_text(""), ["pretrain"], 1,
     "expected sections of keys"),
    ("params is a folder", lambda f: None, ["pretrain", "--params", "data"], 1,
     "data: not a params file"),
    ("params is binary", lambda f: (f / "p.bin").write_bytes(bytes(range(256))),
     ["pretrain", "--params", "p.bin"], 1, "p.bin: not a params file"),
    ("zero-byte shard", lambda f: (f / "data/shards/train-000000.tar").write_bytes(b""),
     ["pretrain"], 1, "train-000000.tar: 0 bytes, the manifest says"),
    ("random-bytes shard", lambda f: (f / "data/shards/train-000001.tar").write_bytes(
        bytes(reversed((f / "data/shards/train-000001.tar").read_bytes()))),
     ["pretrain"], 1, "train-000001.tar: its sha256"),
    ("manifest not JSON", lambda f: (f / "data/shards/manifest.json").write_text("{cut"),
     ["pretrain"], 1, "manifest.json: not a manifest the shard stage wrote"),
    ("manifest lacks a key", lambda f: _manifest_without(f, "mean"), ["pretrain"], 1,
     "not a manifest the shard stage wrote (no 'mean')"),
    ("no pretrained model", lambda f: shutil.rmtree(f / "models/pretrain"), ["finetune"], 1,
     "no pretrained model: models/pretrain/config.json is missing (run `dvc repro pretrain`)"),
    ("model config not JSON", lambda f: (f / "models/pretrain/config.json").write_text("{"),
     ["finetune"], 1, "models/pretrain: not a model this pipeline wrote"),
    ("garbage weights", lambda f: (f / "models/pretrain/model.safetensors").write_bytes(b"x" * 99),
     ["finetune"], 1, "models/pretrain: not a model this pipeline wrote"),
    ("unknown run id", lambda f: None, ["evaluate", "--run-id", "0123456789abcdef"], 1,
     "no MLflow run 0123456789abcdef"),
    ("IDX rows 0", _zero_rows, ["shard"], 1,
     "train-images-idx3-ubyte.gz: IDX header gives a record size of 0"),
    ("bench batch above the split", lambda f: None,
     ["bench", "data", "--workers", "0", "--batch-size", "100000"], 2,
     "is larger than the train split"),
    ("port out of range", lambda f: None, ["ui", "--port", "99999"], 2,
     "Invalid value for '--port'"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mutate", "args", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_a_non_zero_exit_and_nothing_lost(
    base, tmp_path, mutate, args, code, message, monkeypatch, mae_cli_main
):
    folder = tmp_path / "p"
    shutil.copytree(base, folder)
    mutate(folder)
    before = _outputs(folder)
    monkeypatch.chdir(folder)
    exit_code, _, stderr = mae_cli_main(*args)
    error = [line for line in stderr.splitlines() if "rror" in line]
    assert exit_code == code, stderr
    assert "Traceback" not in stderr, stderr
    assert len(error) == 1 and message in error[0], stderr
    assert _outputs(folder) == before  # the previous outputs, byte for byte
