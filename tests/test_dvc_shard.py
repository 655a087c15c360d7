"""`dvc repro shard` in a real git + DVC repo: cached, and reproducible byte for byte."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.factory import idx_dataset

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(
        ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    idx_dataset(tmp_path / "raw", n_train=300, n_test=50)
    params["data"].update(source="idx", root=str(tmp_path / "raw"), shard_max_count=64)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "t@example.com"], repo)
    _run(["git", "config", "user.name", "test"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.analytics", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "init"], repo)
    return repo


def test_dvc_repro_shard_is_cached_and_reproducible(repo):
    first_run = _run(["dvc", "repro", "shard"], repo)
    assert "Running stage 'shard'" in first_run
    shards = repo / "data" / "shards"
    first = _hashes(shards)
    assert "train-000000.tar" in first and "manifest.json" in first
    assert "didn't change, skipping" in _run(["dvc", "repro", "shard"], repo)
    shutil.rmtree(shards)
    _run(["dvc", "repro", "shard"], repo)  # DVC restores it from the cache or re-runs
    assert _hashes(shards) == first
    shutil.rmtree(shards)
    assert "Running stage 'shard'" in _run(["dvc", "repro", "--force", "shard"], repo)
    assert _hashes(shards) == first  # rebuilt from scratch: the same bytes
    # data.workers never changes the shards, so it is not a dependency
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["workers"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "didn't change, skipping" in _run(["dvc", "repro", "shard"], repo)
