"""Shards read by URL: a real HTTP server on 127.0.0.1 (started and stopped here), fsspec's
memory filesystem and `pipe:` commands give what local files give; a cut or dead server
is retried or named, never read short."""

import contextlib
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.data import fetch as fetch_module
from pipeline.data.loader import build_loader
from pipeline.data.shard import run_shard
from pipeline.data.store import ShardStore
from pipeline.errors import UserError
from pipeline.params import load_params
from pipeline.stages import run_training
from tests.factory import ROOT, build_project, data_params, idx_dataset


class Server:
    """tests/fileserver.py serving `folder` on 127.0.0.1 in its own process; `gets` counts
    the GETs per file name."""

    def __init__(self, folder: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "tests.fileserver", str(folder), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"
        self._gets: Counter = Counter()
        self._lock = threading.Lock()
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self._gets[line.split()[1]] += 1

    def gets(self, until=lambda gets: True, timeout: float = 5.0) -> Counter:
        """The GETs so far, once `until(gets)` holds (the server's lines arrive a moment
        after the responses) or `timeout` has passed."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                gets = Counter(self._gets)
            if until(gets) or time.monotonic() > deadline:
                return gets
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def serve(folder: Path, *args: str):
    server = Server(folder, *args)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shards(tmp_path) -> Path:
    """An IDX dataset written as shards of 20 samples: 9 train, 2 val, 2 test shards."""
    idx_dataset(tmp_path / "raw", n_train=200, n_test=40, size=12)
    out = tmp_path / "shards"
    run_shard(data_params(source="idx", root=str(tmp_path / "raw"), shards=str(out),
                          shard_max_count=20, workers=0))  # fmt: skip
    return out


def _epoch(store, split, augmentation, workers=0, epoch=1):
    loader = build_loader(
        store, split, augmentation, batch_size=8, img_size=12, num_workers=workers, seed=5
    )
    loader.set_epoch(epoch)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    return keys, torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def _tars(gets: Counter) -> dict:
    return {name: n for name, n in gets.items() if name.endswith(".tar")}


def _same(a, b) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_http_shards_load_exactly_what_local_files_load_and_are_fetched_once(shards, tmp_path):
    cache = tmp_path / "cache"
    with serve(shards) as server:
        remote = ShardStore(server.url, cache)
        for split, augmentation, workers in (("train", "pretrain", 2), ("test", "eval", 0)):
            assert _same(
                _epoch(remote, split, augmentation, workers), _epoch(shards, split, augmentation)
            )
        gets = server.gets(lambda g: len(_tars(g)) >= 11)
        assert len(_tars(gets)) == 11 and set(_tars(gets).values()) == {1}, gets  # fetched once
        _epoch(remote, "train", "pretrain", 2, epoch=2)
        assert server.gets(timeout=0.5) == gets  # the second epoch reads the cache
    stored = sorted(p.name for p in cache.iterdir() if p.suffix in (".tar", ".idx"))
    assert len(stored) == 11 + 11 and all(len(Path(n).stem) == 64 for n in stored)  # sha256
    assert not list(cache.glob("*.part"))


def test_training_starts_before_every_shard_is_local(shards, tmp_path):
    with serve(shards) as server:
        loader = build_loader(
            ShardStore(server.url, tmp_path / "cache"), "train", "eval", batch_size=8, img_size=12
        )
        batches = iter(loader)
        next(batches)
        fetched = len(_tars(server.gets(lambda g: len(_tars(g)) >= 3)))
        assert fetched == 3 < 9  # the shard read and 2 ahead, no more
        assert len(list(batches)) == len(loader) - 1


def test_a_pretrain_stage_on_http_shards_gives_the_losses_and_weights_of_local_shards(
    tmp_path, monkeypatch
):
    params = build_project(tmp_path, pretrain={"epochs": 2, "probe_every": 1})
    monkeypatch.chdir(tmp_path)
    run_training("pretrain", load_params("params.yaml"))
    local = (
        Path("plots/pretrain/loss.csv").read_text(),
        load_file("models/pretrain/model.safetensors"),
    )
    local_knn = Path("metrics/pretrain.json").read_text()
    with serve(tmp_path / "data/shards") as server:
        p = yaml.safe_load(params.read_text())
        p["data"] |= {"shards": server.url, "cache": str(tmp_path / "cache")}
        p["paths"]["checkpoints"] = ".checkpoints-remote"  # not a resume of the local run
        params.write_text(yaml.safe_dump(p))
        run_training("pretrain", load_params("params.yaml"))
    curve, weights = (
        Path("plots/pretrain/loss.csv").read_text(),
        load_file("models/pretrain/model.safetensors"),
    )
    assert curve == local[0]
    assert all(torch.equal(weights[k], local[1][k]) for k in weights)
    knn = lambda text: yaml.safe_load(text)["knn_top1"]  # noqa: E731
    assert knn(Path("metrics/pretrain.json").read_text()) == knn(local_knn)  # an evaluation


def test_a_connection_cut_mid_shard_is_retried_and_the_epoch_is_whole(shards, tmp_path):
    with serve(shards, "--cut-once", "train-000003.tar", "train-000003.idx") as server:
        remote = ShardStore(server.url, tmp_path / "cache")
        assert _same(_epoch(remote, "train", "pretrain"), _epoch(shards, "train", "pretrain"))
        assert server.gets(lambda g: g["train-000003.tar"] == 2)["train-000003.tar"] == 2


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_server_killed_mid_fetch_stops_the_epoch_with_one_clear_line(
    shards, tmp_path, monkeypatch
):
    monkeypatch.setattr(fetch_module, "TRIES", 2)
    with serve(shards, "--die-on", "train-000004.tar") as server:
        remote = ShardStore(server.url, tmp_path / "cache")
        with pytest.raises(UserError) as err:
            _epoch(remote, "train", "pretrain", workers=1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cannot fetch {server.url}/train-000004.tar (2 tries): ")
    assert not list((tmp_path / "cache").glob("*.part"))


def test_fsspec_memory_and_pipe_stores_read_what_local_files_read(shards, tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in shards.iterdir():
        memory.pipe(f"/fm-shards/{path.name}", path.read_bytes())
    local = _epoch(shards, "val", "eval")
    assert _same(_epoch(ShardStore("memory://fm-shards", tmp_path / "c1"), "val", "eval"), local)
    piped = ShardStore(f"pipe:cat {shards}/{{name}}", tmp_path / "c2")
    assert _same(_epoch(piped, "val", "eval"), local)
    with pytest.raises(
        UserError,
        match=r"fetch pipe:cat /nowhere/manifest.json \(3 tries\): `cat /nowhere/\S+` exited 1",
    ):
        ShardStore("pipe:cat /nowhere/{name}", tmp_path / "c3").manifest()


def test_a_store_holding_other_bytes_than_its_manifest_is_named(shards, tmp_path):
    other = shards.parent / "swapped"
    other.mkdir()
    for path in shards.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    (other / "val-000000.tar").write_bytes((shards / "test-000000.tar").read_bytes())  # same size
    with (
        serve(other) as server,
        pytest.raises(UserError, match=r"val-000000.tar: its sha256 .* is not the manifest's"),
    ):
        _epoch(ShardStore(server.url, tmp_path / "cache"), "val", "eval")


def test_the_cache_stays_within_its_bound(shards, tmp_path):
    size = (shards / "train-000000.tar").stat().st_size
    with serve(shards) as server:
        remote = ShardStore(server.url, tmp_path / "cache", cache_bytes=3.5 * size)
        assert _same(_epoch(remote, "train", "pretrain"), _epoch(shards, "train", "pretrain"))
        assert set(_tars(server.gets(lambda g: len(_tars(g)) >= 9)).values()) == {1}  # no refetch
    cached = [p for p in (tmp_path / "cache").iterdir() if p.suffix in (".tar", ".idx")]
    assert sum(p.stat().st_size for p in cached) <= 3.5 * size
    with pytest.raises(UserError, match=r"a pipe: command needs \{name\}"):
        ShardStore("pipe:cat shards.tar")


def test_the_shard_stage_does_not_write_to_a_url(tmp_path):
    idx_dataset(tmp_path / "raw")
    p = data_params(source="idx", root=str(tmp_path / "raw"), shards="s3://bucket/shards")
    with pytest.raises(
        UserError,
        match=r"data.shards is a URL \(s3://bucket/shards\): the shard stage writes a local folder",
    ):
        run_shard(p)
