"""Loaders: every sample once per epoch on any ranks x workers, equal batches per rank."""

import itertools
from collections import Counter

import pytest
import torch

from pipeline.errors import UserError
from pipeline.loader import Augment, batches_per_epoch, build_loader, plan_epoch
from pipeline.params import DataParams
from pipeline.shard import run_shard
from tests.factory import idx_dataset, imagefolder, shard_set

UNEVEN = [5, 17, 3, 11, 8, 13, 2]  # 7 shards, 59 samples


def _planned(counts, world, workers, batch, train, epoch=0, seed=0):
    """-> {rank: [(shard, position) ...]} and batch counts, straight from the plan."""
    seen, batches = {}, {}
    for rank in range(world):
        plan = plan_epoch(
            counts,
            epoch=epoch,
            seed=seed,
            rank=rank,
            world_size=world,
            num_workers=workers,
            batch_size=batch,
            train=train,
        )
        seen[rank] = [(s, skip + i) for w in plan for s, skip, take in w for i in range(take)]
        batches[rank] = sum(-(-sum(t for _, _, t in w) // batch) for w in plan)
    return seen, batches


@pytest.mark.parametrize(
    ("world", "workers", "batch"), list(itertools.product([1, 2, 3, 4], [0, 1, 3], [1, 4, 7]))
)
def test_plan_train_uses_each_sample_at_most_once_and_gives_ranks_equal_batches(
    world, workers, batch
):
    seen, batches = _planned(UNEVEN, world, workers, batch, train=True)
    everything = [x for xs in seen.values() for x in xs]
    assert len(everything) == len(set(everything))  # nothing twice
    assert sum(UNEVEN) - len(everything) < world * batch  # little dropped
    assert len(set(batches.values())) == 1  # the same on every rank: no DDP hang
    assert all(len(xs) % batch == 0 for xs in seen.values())  # full batches only


@pytest.mark.parametrize(("world", "workers"), list(itertools.product([1, 2, 3, 5], [0, 1, 3, 8])))
def test_plan_eval_reads_every_sample_exactly_once(world, workers):
    seen, _ = _planned(UNEVEN, world, workers, batch=4, train=False)
    everything = [x for xs in seen.values() for x in xs]
    assert Counter(everything) == Counter((s, i) for s, n in enumerate(UNEVEN) for i in range(n))


def test_plan_reshuffles_each_epoch_identically_on_every_rank():
    a, _ = _planned(UNEVEN, 2, 3, 4, train=True, epoch=0)
    b, _ = _planned(UNEVEN, 2, 3, 4, train=True, epoch=1)
    assert a != b
    assert a == _planned(UNEVEN, 2, 3, 4, train=True, epoch=0)[0]  # a pure function


def _epoch(folder, split, purpose, rank, world, workers, batch, epoch):
    loader = build_loader(
        folder,
        split,
        purpose,
        batch_size=batch,
        img_size=8,
        num_workers=workers,
        seed=3,
        rank=rank,
        world_size=world,
    )
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")
def test_two_ranks_three_workers_train_each_epoch_new_order_equal_batches(tmp_path):
    folder = shard_set(tmp_path / "shards", UNEVEN)
    world, batch, orders = 2, 4, []
    for epoch in (0, 1):
        per_rank = [
            _epoch(folder, "train", "pretrain", r, world, 3, batch, epoch) for r in range(world)
        ]
        assert len(per_rank[0]) == len(per_rank[1]) > 0
        keys = [k for batches in per_rank for b in batches for k in b["key"]]
        assert all(len(b["key"]) == batch for batches in per_rank for b in batches)
        assert len(keys) == len(set(keys))  # at most once
        assert sum(UNEVEN) - len(keys) < world * batch  # at least once but for the remainder
        orders.append(keys)
    assert orders[0] != orders[1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")
def test_two_ranks_three_workers_eval_every_sample_exactly_once(tmp_path):
    folder = shard_set(tmp_path / "shards", UNEVEN)
    keys = [
        k
        for rank in range(2)
        for b in _epoch(folder, "test", "eval", rank, 2, 3, 4, 0)
        for k in b["key"]
    ]
    assert sorted(keys) == [f"{i:08d}" for i in range(sum(UNEVEN), 2 * sum(UNEVEN))]


def test_batches_have_the_configured_shape_and_normalisation(tmp_path):
    idx_dataset(tmp_path / "raw", n_train=200, size=12)
    p = DataParams(
        source="idx", root=str(tmp_path / "raw"), shards=str(tmp_path / "shards"), workers=0
    )
    manifest = run_shard(p)
    loader = build_loader(p.shards, "train", "eval", batch_size=64, img_size=12)
    images = torch.cat([b["image"] for b in loader])
    assert images.shape == (manifest["splits"]["train"]["count"], 1, 12, 12)
    # eval of the training split at native size: normalised with its own statistics
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-3)
    # same-size images: crop and flip happen on the device, one call per batch
    loader = build_loader(p.shards, "train", "pretrain", batch_size=16, img_size=8)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 1, 12, 12) and batch["label"].dtype == torch.int64
    assert loader.device_augment(batch["image"]).shape == (16, 1, 8, 8)
    # the per-image path gives the same shapes without a device step
    loader = build_loader(
        p.shards, "train", "pretrain", batch_size=16, img_size=8, batch_augment=False
    )
    assert loader.device_augment is None
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 1, 8, 8) and batch["image"].dtype == torch.float32


def test_rgb_imagefolder_of_mixed_sizes_loads_as_fixed_size_rgb(tmp_path):
    root = imagefolder(tmp_path / "imgs", {"a": 8, "b": 8})
    p = DataParams(
        source="imagefolder",
        root=str(root),
        shards=str(tmp_path / "shards"),
        val_fraction=0.25,
        test_fraction=0.25,
        workers=0,
    )
    run_shard(p)
    aug = Augment(randaugment=True, reprob=0.25)
    for purpose in ("pretrain", "finetune", "eval"):
        batch = next(
            iter(build_loader(p.shards, "train", purpose, batch_size=4, img_size=16, aug=aug))
        )
        assert batch["image"].shape == (4, 3, 16, 16)


def test_batches_per_epoch_matches_the_plan():
    assert batches_per_epoch(UNEVEN, world_size=2, num_workers=3, batch_size=4, train=True) == 7
    assert batches_per_epoch([10], world_size=1, num_workers=0, batch_size=4, train=False) == 3


def test_missing_shards_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no shards at .*manifest.json is missing"):
        build_loader(tmp_path, "train", "eval", batch_size=4, img_size=8)
    folder = shard_set(tmp_path / "shards", [3, 4])
    (folder / "train-000001.tar").unlink()
    with pytest.raises(UserError, match=r"missing: .*train-000001.tar"):
        build_loader(folder, "train", "eval", batch_size=4, img_size=8)
