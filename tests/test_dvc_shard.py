"""`dvc repro shard` in a real git + DVC repo: cached, and reproducible byte for byte."""

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from tests.factory import dvc_repo, idx_dataset, project_params, run_cmd

ROOT = Path(__file__).resolve().parents[1]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    idx_dataset(tmp_path / "raw", n_train=300, n_test=50)
    params["data"].update(source="idx", root=str(tmp_path / "raw"), shard_max_count=64)
    return dvc_repo(tmp_path, params)


def test_dvc_repro_shard_is_cached_and_reproducible(repo):
    first_run = run_cmd(["dvc", "repro", "shard"], repo)
    assert "Running stage 'shard'" in first_run
    shards = repo / "data" / "shards"
    first = _hashes(shards)
    assert "train-000000.tar" in first and "manifest.json" in first
    assert "didn't change, skipping" in run_cmd(["dvc", "repro", "shard"], repo)
    shutil.rmtree(shards)
    run_cmd(["dvc", "repro", "shard"], repo)  # DVC restores it from the cache or re-runs
    assert _hashes(shards) == first
    shutil.rmtree(shards)
    assert "Running stage 'shard'" in run_cmd(["dvc", "repro", "--force", "shard"], repo)
    assert _hashes(shards) == first  # rebuilt from scratch: the same bytes
    # data.workers never changes the shards, so it is not a dependency
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["workers"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(project_params(params)))
    assert "didn't change, skipping" in run_cmd(["dvc", "repro", "shard"], repo)
