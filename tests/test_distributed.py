"""Several ranks in a real process group (gloo, CPU): the loaders split the data as the
plan says, and data-parallel pretraining follows the single-process loss curve."""

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from pipeline.distributed import Dist, resolve_nproc
from tests.factory import shard_set

UNEVEN = [5, 17, 3, 11, 8, 13, 2]


def _loader_rank(rank: int, world: int, folder: str, out: str, port: int) -> None:
    import torch.distributed as dist

    from pipeline.loader import build_loader

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        seen = {}
        for purpose, split in (("pretrain", "train"), ("eval", "test")):
            # no rank arguments: the loader takes them from the process group
            loader = build_loader(folder, split, purpose, batch_size=4, img_size=8, num_workers=2)
            loader.set_epoch(1)
            seen[purpose] = [b["key"] for b in loader]
            assert len(seen[purpose]) == len(loader)
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_loaders_under_two_ranks_in_a_process_group(tmp_path):
    folder = shard_set(tmp_path / "shards", UNEVEN)
    mp.spawn(_loader_rank, args=(2, str(folder), str(tmp_path), _free_port()), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train = [ranks[r]["pretrain"] for r in range(2)]
    assert len(train[0]) == len(train[1]) == sum(UNEVEN) // 8  # equal steps: no hang
    keys = [k for r in train for b in r for k in b]
    assert len(keys) == len(set(keys)) and sum(UNEVEN) - len(keys) < 8
    # the two ranks' batches of a step are one global batch of the single-rank plan
    from pipeline.loader import build_loader

    single = build_loader(folder, "train", "pretrain", batch_size=8, img_size=8)
    single.set_epoch(1)
    for step, batch in enumerate(single):
        assert batch["key"] == train[0][step] + train[1][step]
    evaluated = [k for r in range(2) for b in ranks[r]["eval"] for k in b]
    assert sorted(evaluated) == [f"{i:08d}" for i in range(sum(UNEVEN), 2 * sum(UNEVEN))]


def test_single_process_defaults():
    d = Dist()
    assert d.main and not d.enabled and d.share(4) == slice(0, 4)
    assert d.gather("x") == ["x"] and d.broadcast(3) == 3
    assert resolve_nproc("auto", "cpu") == 1 and resolve_nproc(3, "auto") == 3
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
