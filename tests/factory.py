"""Synthetic data for tests (IDX files, ImageFolder trees, hand-sized shard sets), the tiny
project the stage tests share (`build_project`; the `project` fixture in conftest.py), and
the commands they run."""

from __future__ import annotations

import gzip
import io
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def project_params(overrides: dict | None = None) -> dict:
    """A whole params file: the project's params.yaml with `overrides` (sections of keys)
    merged over it, as a test's project or a recipe writes it."""
    from pipeline.params import merge

    return merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides or {})


def data_params(**keys):
    """The project's DataParams with `keys` changed."""
    from pipeline.params import parse_params

    return parse_params(project_params({"data": keys})).data


def write_idx(
    root: Path,
    prefix: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    gz: bool = True,
    cut_images: int = 0,
    claim_images: int | None = None,
) -> None:
    """`prefix`-images-idx3-ubyte(.gz) and -labels-idx1-ubyte(.gz); `cut_images` bytes
    removed from the end of the image data (a truncated file); `claim_images`: the image
    count the header says (a lying header)."""
    root.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    img = (
        struct.pack(">IIII", 0x803, claim_images or n, rows, cols)
        + images.astype(np.uint8).tobytes()
    )
    lab = struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()
    if cut_images:
        img = img[:-cut_images]
    for kind, data in (("images-idx3", img), ("labels-idx1", lab)):
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (root / name).write_bytes(data)


def idx_dataset(
    root: Path, n_train: int = 120, n_test: int = 30, size: int = 8, seed: int = 0, **kw
) -> tuple[np.ndarray, np.ndarray]:
    """A 10-class IDX dataset of random pixels; -> the train images and labels."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8), np.arange(n_train) % 10
    write_idx(root, "train", *train, **kw)
    test = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8), np.arange(n_test) % 10
    write_idx(root, "t10k", *test)
    return train


def bands_dataset(
    root: Path,
    n_train: int = 240,
    n_test: int = 80,
    size: int = 16,
    seed: int = 0,
    shuffled: bool = False,
) -> None:
    """A 4-class IDX dataset where learning is possible: a bright square in one of four
    horizontal bands (the class; a horizontal flip keeps it) at a random column, on a
    noisy background. `shuffled`: the same images under labels drawn at random, where
    nothing is learnable."""
    rng = np.random.default_rng(seed)
    side = size // 4

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 4
        images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        for img, label in zip(images, labels, strict=True):
            x = rng.integers(0, size - side + 1)
            img[label * side : (label + 1) * side, x : x + side] = rng.integers(200, 256)
        return images, (rng.integers(0, 4, n) if shuffled else labels)

    write_idx(root, "train", *draw(n_train))
    write_idx(root, "t10k", *draw(n_test))


def image_bytes(size: tuple[int, int], mode: str, fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def imagefolder(
    root: Path,
    per_class: dict[str, int],
    *,
    modes=("RGB", "L"),
    fmts=("JPEG", "PNG"),
    sizes=((20, 16), (12, 12), (33, 25)),
) -> Path:
    """root/<class>/<i>.<ext> with a mix of modes, formats and sizes."""
    k = 0
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mode, fmt, size = modes[k % len(modes)], fmts[k % len(fmts)], sizes[k % len(sizes)]
            ext = "jpg" if fmt == "JPEG" else "png"
            (root / cls / f"{i:03d}.{ext}").write_bytes(image_bytes(size, mode, fmt, seed=k))
            k += 1
    return root


def folder_params(tmp_path: Path, root: Path, **kw):
    """DataParams for an ImageFolder at `root`, shards in `tmp_path`/shards."""
    return data_params(source="imagefolder", root=str(root), shards=str(tmp_path / "shards"), **kw)


def shard_set(folder: Path, counts: list[int], size: int = 8) -> Path:
    """Shards `train-NNNNNN.tar` (and the same as `test-`) of the given, uneven sizes,
    with keys numbered globally, and a manifest.json like the shard stage writes."""
    from webdataset import TarWriter

    from pipeline.data.tarindex import write_index

    folder.mkdir(parents=True, exist_ok=True)
    splits, key = {}, 0
    for split in ("train", "test"):
        entries = []
        for i, count in enumerate(counts):
            name = f"{split}-{i:06d}.tar"
            with TarWriter(str(folder / name), encoder=False, mtime=0) as w:
                for _ in range(count):
                    pgm = b"P5\n%d %d\n255\n" % (size, size) + bytes([key % 256]) * size * size
                    w.write({"__key__": f"{key:08d}", "pgm": pgm, "cls": b"%d" % (key % 10)})
                    key += 1
            index = write_index(folder / name, count)
            entries.append({"name": name, "count": count, "index": index})
        splits[split] = {"count": sum(counts), "shards": entries}
    manifest = {
        "channels": 1,
        "mean": [0.5],
        "std": [0.25],
        "splits": splits,
        "classes": [str(i) for i in range(10)],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def run_cmd(cmd: list[str], cwd: Path, timeout: int = 600, stdout_only: bool = False) -> str:
    """Run a command of this environment (dvc, mae-cli) and return its output; fail loudly."""
    import subprocess

    result = subprocess.run(
        cmd, cwd=cwd, env=cmd_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def cmd_env() -> dict:
    """The environment commands of this project (dvc, mae-cli) run in from a test: this
    interpreter's bin first on PATH, no tracking store a test exported."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}


def dvc_repo(tmp_path: Path, params: dict) -> Path:
    """A git + DVC repo holding this project's code, dvc.yaml and the given params."""
    import shutil

    root = ROOT
    repo = tmp_path / "repo"
    repo.mkdir()
    for folder in ("mae", "pipeline"):
        shutil.copytree(root / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "dvc.yaml", repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(project_params(params)))
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/.checkpoints/\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "test"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        run_cmd(cmd, repo)
    return repo


def wait_for_http(url: str, proc, timeout: float = 90) -> None:
    """Until `url` answers (a server `proc` started); fails if `proc` ends or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, f"no answer at {url}"
            time.sleep(0.5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The tiny project the stage tests share: synthetic 16 px images, the test model, CPU,
# a few epochs; each test changes only the keys it is about.
TINY = {
    "data": {"source": "idx", "root": "raw", "shard_max_count": 100, "workers": 0},
    "model": {"name": "mae_vit_test"},
    "pretrain": {
        "epochs": 3,
        "batch_size": 32,
        "log_every": 2,
        "recon_every": 1,
        "probe_every": 2,
        "warmup_epochs": 1,
        "blr": 1e-3,
    },
    "finetune": {"min_steps": 0},  # each test sets the schedule it needs
    "linprobe": {"min_steps": 0},
    "runtime": {"num_workers": 0, "device": "cpu"},
    "tracking": {"experiment": "test"},
}


def _random_images(raw: Path) -> None:
    idx_dataset(raw, n_train=200, n_test=40, size=16)


def build_project(
    folder: Path,
    *,
    dataset: Callable[[Path], object] = _random_images,
    stages: tuple[str, ...] = ("shard",),
    **sections: dict,
) -> Path:
    """A tiny project in `folder`: `dataset(folder / "raw")` writes its images (default:
    200 + 40 random 16 px IDX images), params.yaml is the project's with TINY and then
    `sections` merged over it and a SQLite store in `folder`, and `stages` run in order,
    here; -> the params.yaml path."""
    from pipeline.data.shard import run_shard
    from pipeline.params import load_params, merge
    from pipeline.stages import run_training

    folder.mkdir(parents=True, exist_ok=True)
    dataset(folder / "raw")
    params = merge(TINY, sections)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    params["tracking"] = {**params["tracking"], "uri": uri}
    (folder / "params.yaml").write_text(yaml.safe_dump(project_params(params)))
    import pytest

    with pytest.MonkeyPatch.context() as mp:  # a store a test exported must not leak in
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for stage in stages:
            p = load_params("params.yaml")
            run_shard(p.data) if stage == "shard" else run_training(stage, p)
    return folder / "params.yaml"


MAE_CLI = str(Path(sys.executable).with_name("mae-cli"))  # this environment's


def mae_cli(args: list[str], cwd: Path, check: bool = False, timeout: int = 300):
    """`mae-cli ARGS` run in `cwd` as a user runs it; -> the CompletedProcess (text)."""
    import subprocess

    result = subprocess.run(
        [MAE_CLI, *args], cwd=cwd, env=cmd_env(), capture_output=True, text=True, timeout=timeout
    )
    assert not check or result.returncode == 0, result.stderr
    return result
