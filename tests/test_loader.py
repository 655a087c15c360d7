"""Loaders: every sample once per epoch on any ranks x workers, equal batches per rank, and
the same global batches whatever the number of ranks and workers."""

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.loader import Augment, build_loader
from pipeline.data.plan import batches_per_epoch, rank_batches
from pipeline.data.shard import run_shard
from pipeline.data.tarindex import pgm, read_index, write_index
from pipeline.errors import UserError
from tests.factory import data_params, folder_params, idx_dataset, imagefolder, shard_set

UNEVEN = [5, 17, 3, 11, 8, 13, 2]  # 7 shards, 59 samples


def _planned(counts, world, batch, train, epoch=0, seed=0, window=16):
    """-> {rank: [sample id per batch ...]} straight from the plan."""
    return {
        rank: rank_batches(
            counts,
            epoch=epoch,
            seed=seed,
            rank=rank,
            world_size=world,
            batch_size=batch,
            train=train,
            window=window,
        )
        for rank in range(world)
    }


@pytest.mark.parametrize(("world", "batch"), list(itertools.product([1, 2, 3, 4], [1, 4, 7])))
def test_plan_train_uses_each_sample_at_most_once_and_gives_ranks_equal_batches(world, batch):
    plan = _planned(UNEVEN, world, batch, train=True)
    everything = [int(i) for batches in plan.values() for b in batches for i in b]
    assert len(everything) == len(set(everything))  # nothing twice
    assert sum(UNEVEN) - len(everything) < world * batch  # little dropped
    assert len({len(batches) for batches in plan.values()}) == 1  # no DDP hang
    assert all(len(b) == batch for batches in plan.values() for b in batches)  # full batches
    assert len(plan[0]) == batches_per_epoch(UNEVEN, world_size=world, batch_size=batch, train=True)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_plan_eval_reads_every_sample_exactly_once(world):
    plan = _planned(UNEVEN, world, batch=4, train=False)
    everything = [int(i) for batches in plan.values() for b in batches for i in b]
    assert Counter(everything) == Counter(range(sum(UNEVEN)))
    for rank, batches in plan.items():
        assert len(batches) == batches_per_epoch(
            UNEVEN, world_size=world, batch_size=4, train=False, rank=rank
        )


def test_plan_reshuffles_each_epoch_identically_on_every_rank():
    a = _planned(UNEVEN, 2, 4, train=True, epoch=0)
    b = _planned(UNEVEN, 2, 4, train=True, epoch=1)
    flat = lambda plan: [int(i) for bs in plan.values() for x in bs for i in x]  # noqa: E731
    assert flat(a) != flat(b)
    assert flat(a) == flat(_planned(UNEVEN, 2, 4, train=True, epoch=0))  # a pure function


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_see_the_global_batches_of_one_rank(world):
    """One rank at batch 8 and `world` ranks at 8 / world: the same samples in every step."""
    one = _planned(UNEVEN, 1, 8, train=True)[0]
    many = _planned(UNEVEN, world, 8 // world, train=True)
    for step, batch in enumerate(one):
        together = np.concatenate([many[r][step] for r in range(world)])
        assert together.tolist() == batch.tolist()


def test_the_shard_stage_index_matches_webdataset_reading(tmp_path):
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    folder = shard_set(tmp_path / "shards", [3, 5])
    paths = [folder / f"train-{i:06d}.tar" for i in range(2)]
    index = read_index([p.with_suffix(".idx") for p in paths], [3, 5])
    samples = []
    for path in paths:
        with open(path, "rb") as f:
            samples += list(group_by_keys({**m, "__url__": path} for m in tar_file_iterator(f)))
    assert index.key.tolist() == [s["__key__"] for s in samples]
    assert index.label.tolist() == [int(s["cls"]) for s in samples]
    for i, s in enumerate(samples):
        data = paths[index.shard[i]].read_bytes()
        assert data[index.offset[i] : index.offset[i] + index.size[i]] == s["pgm"]
    with pytest.raises(UserError, match=r"train-000001.tar holds 5 samples, the manifest says 4"):
        write_index(paths[1], 4)
    with pytest.raises(UserError, match=r"train-000001.idx lists 5 samples, the manifest says 4"):
        read_index([p.with_suffix(".idx") for p in paths], [3, 4])
    paths[0].with_suffix(".idx").write_bytes(b"not an index")
    with pytest.raises(UserError, match=r"train-000000.idx: not a shard index"):
        read_index([p.with_suffix(".idx") for p in paths], [3, 5])


def _epoch(folder, split, augmentation, rank, world, workers, batch, epoch):
    loader = build_loader(
        folder,
        split,
        augmentation,
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
    p = data_params(
        source="idx", root=str(tmp_path / "raw"), shards=str(tmp_path / "shards"), workers=0
    )
    manifest = run_shard(p)
    cpu = torch.device("cpu")
    loader = build_loader(p.shards, "train", "eval", batch_size=64, img_size=12)
    batches = list(loader)
    assert all(b["image"].dtype == torch.uint8 for b in batches)  # the stored pixels
    images = torch.cat([loader.images(b, cpu) for b in batches])  # normalised on the device
    assert images.shape == (manifest["splits"]["train"]["count"], 1, 12, 12)
    # eval of the training split at native size: normalised with its own statistics
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-3)
    # same-size images: crop and flip happen on the device, one call per batch
    loader = build_loader(p.shards, "train", "pretrain", batch_size=16, img_size=8)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 1, 12, 12) and batch["label"].dtype == torch.int64
    assert loader.images(batch, cpu).shape == (16, 1, 8, 8)
    # the per-image path gives the same shapes without a device step
    loader = build_loader(
        p.shards, "train", "pretrain", batch_size=16, img_size=8, batch_augment=False
    )
    assert loader.device_augment is None
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 1, 8, 8) and batch["image"].dtype == torch.float32


def test_rgb_imagefolder_of_mixed_sizes_loads_as_fixed_size_rgb(tmp_path):
    root = imagefolder(tmp_path / "imgs", {"a": 8, "b": 8})
    p = folder_params(tmp_path, root, val_fraction=0.25, test_fraction=0.25, workers=0)
    run_shard(p)
    aug = Augment(randaugment=True, reprob=0.25)
    for augmentation in ("pretrain", "finetune", "eval"):
        batch = next(
            iter(build_loader(p.shards, "train", augmentation, batch_size=4, img_size=16, aug=aug))
        )
        assert batch["image"].shape == (4, 3, 16, 16)


def test_batches_per_epoch_matches_the_plan():
    assert batches_per_epoch(UNEVEN, world_size=2, batch_size=4, train=True) == 7
    assert batches_per_epoch([10], world_size=1, batch_size=4, train=False) == 3


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")
def test_the_number_of_workers_does_not_change_the_batches(tmp_path):
    folder = shard_set(tmp_path / "shards", UNEVEN)
    for augmentation, split in (("pretrain", "train"), ("eval", "test")):
        runs = [_epoch(folder, split, augmentation, 0, 1, w, 4, 1) for w in (0, 1, 3)]
        keys = [[b["key"] for b in batches] for batches in runs]
        assert keys[0] == keys[1] == keys[2]
        labels = [torch.cat([b["label"] for b in batches]) for batches in runs]
        assert all(torch.equal(labels[0], x) for x in labels[1:])


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")
def test_per_image_augmentations_are_bitwise_the_same_at_0_1_and_3_workers(tmp_path):
    """torchgeo-bench#401: lowering num_workers after a killed worker must not change what
    is trained on. Images of mixed sizes take the per-image path: random resized crops,
    flips, RandAugment and random erasing, each batch seeded by (seed, epoch, rank,
    batch), and the training process's own stream ends where it would at any count."""
    root = imagefolder(tmp_path / "imgs", {"a": 12, "b": 12})
    p = folder_params(tmp_path, root, val_fraction=0.1, test_fraction=0.1, workers=0)
    run_shard(p)
    aug = Augment(randaugment=True, reprob=0.5)
    for augmentation in ("finetune", "pretrain"):
        runs, after = [], []
        for workers in (0, 1, 3):
            loader = build_loader(p.shards, "train", augmentation, batch_size=4, img_size=16,
                                  aug=aug, num_workers=workers, seed=3)  # fmt: skip
            loader.set_epoch(1)
            torch.manual_seed(0)
            runs.append([b["image"] for b in loader])
            after.append(torch.rand(1).item())  # where the training's own stream stands
        assert after[0] == after[1] == after[2]
        assert len(runs[0]) >= 3 and all(len(r) == len(runs[0]) for r in runs)
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))
        assert not torch.equal(runs[0][0], runs[0][1])  # batches differ: not one seed


def test_missing_shards_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no shards at .*manifest.json is missing"):
        build_loader(tmp_path, "train", "eval", batch_size=4, img_size=8)
    folder = shard_set(tmp_path / "shards", [3, 4])
    (folder / "train-000001.tar").unlink()
    with pytest.raises(UserError, match=r"missing: .*train-000001.tar"):
        build_loader(folder, "train", "eval", batch_size=4, img_size=8)


def test_the_pgm_fast_path_reads_what_pil_reads_and_leaves_the_rest_to_pil():
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PPM")  # "L" is written as P5 PGM
    data = buffer.getvalue()
    assert np.array_equal(pgm(data), pixels)
    assert pgm(b"P5\n# a comment\n7 5\n255\n" + pixels.tobytes()) is None
    assert pgm(data[:-1]) is None  # truncated: PIL raises a clear error instead
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    assert pgm(buffer.getvalue()) is None


def test_a_swapped_or_cut_shard_is_named_before_any_sample_is_read(tmp_path):
    import shutil

    idx_dataset(tmp_path / "raw", n_train=200, n_test=40, size=12)
    raw, out = str(tmp_path / "raw"), str(tmp_path / "shards")
    run_shard(data_params(source="idx", root=raw, shards=out, shard_max_count=20, workers=0))
    shards = Path(out)
    build_loader(shards, "test", "eval", batch_size=8, img_size=12)  # as written: fine
    train, test = shards / "train-000000.tar", shards / "test-000000.tar"
    assert train.stat().st_size == test.stat().st_size  # same count, same size: other images
    original = test.read_bytes()
    shutil.copy(train, test)
    with pytest.raises(UserError, match=r"test-000000.tar: its sha256 .* is not the manifest"):
        build_loader(shards, "test", "eval", batch_size=8, img_size=12)
    test.write_bytes(original)
    (shards / "test-000001.tar").write_bytes(b"cut short")
    with pytest.raises(UserError, match=r"test-000001.tar: 9 bytes, the manifest says"):
        build_loader(shards, "test", "eval", batch_size=8, img_size=12)
