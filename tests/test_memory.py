"""A split held in memory gives the batches the streaming loader gives: the same samples in
the same batches, bitwise the same pixels, for any seed, epoch, rank count and batch size;
`data.in_memory` holds what it can and refuses `true` in one line where it cannot."""

import itertools

import pytest
import torch

from pipeline.data import memory
from pipeline.data.loader import Augment, build_loader
from pipeline.data.shard import run_shard
from pipeline.errors import UserError
from tests.factory import data_params, folder_params, idx_dataset, imagefolder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An IDX dataset as the shard stage writes it: 12 x 12 images, uneven shards of 23."""
    tmp = tmp_path_factory.mktemp("held")
    idx_dataset(tmp / "raw", n_train=150, n_test=47, size=12)
    p = data_params(
        source="idx", root=str(tmp / "raw"), shards=str(tmp / "shards"), shard_max_count=23
    )
    run_shard(p)
    return p.shards


def _epoch(shards, split, augmentation, in_memory, *, rank, world, batch, epoch, seed, workers=0):
    loader = build_loader(
        shards,
        split,
        augmentation,
        batch_size=batch,
        img_size=12 if augmentation == "eval" else 8,
        num_workers=workers,
        seed=seed,
        rank=rank,
        world_size=world,
        in_memory=in_memory,
    )
    assert loader.in_memory == in_memory
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    return loader, batches


CASES = list(itertools.product([1, 2], [4, 7, 16], [(0, 0), (3, 5)]))


@pytest.mark.parametrize(("world", "batch", "epoch_seed"), CASES)
def test_held_batches_are_bitwise_the_streamed_ones(shards, world, batch, epoch_seed):
    epoch, seed = epoch_seed
    for split, augmentation in (("train", "pretrain"), ("test", "eval")):
        for rank in range(world):
            kw = dict(rank=rank, world=world, batch=batch, epoch=epoch, seed=seed)
            streamed, a = _epoch(shards, split, augmentation, False, **kw)
            held, b = _epoch(shards, split, augmentation, True, **kw)
            assert [x["key"] for x in a] == [x["key"] for x in b]
            for x, y in zip(a, b, strict=True):
                assert x["image"].dtype == y["image"].dtype == torch.uint8
                assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
                # normalised (and, for training, cropped and flipped) alike
                gx, gy = (torch.Generator().manual_seed(seed) for _ in range(2))
                image_x = streamed.images(x, CPU, gx, rank, world)
                assert torch.equal(image_x, held.images(y, CPU, gy, rank, world))


def test_held_ranks_see_together_what_one_rank_sees_and_workers_change_nothing(shards):
    kw = dict(batch=8, epoch=1, seed=2)
    _, one = _epoch(shards, "train", "pretrain", True, rank=0, world=1, **kw)
    _, streamed = _epoch(shards, "train", "pretrain", False, rank=0, world=1, workers=2, **kw)
    assert [b["key"] for b in one] == [b["key"] for b in streamed]
    halves = [
        _epoch(shards, "train", "pretrain", True, rank=r, world=2, **{**kw, "batch": 4})[1]
        for r in range(2)
    ]
    for step, batch in enumerate(one):
        together = torch.cat([halves[r][step]["image"] for r in range(2)])
        assert torch.equal(together, batch["image"])


def test_a_split_is_decoded_once_per_process_and_shared_by_its_loaders(shards, monkeypatch):
    memory._HELD.clear()
    decoded = []
    real = memory.held

    def counting(reader, key, device, decode):
        def passes(batches):
            decoded.append(key)
            yield from decode(batches)

        return real(reader, key, device, passes)

    monkeypatch.setattr("pipeline.data.loader.held", counting)
    for augmentation, batch in (("pretrain", 8), ("eval", 50), ("pretrain", 16)):
        _epoch(shards, "train", augmentation, True, rank=0, world=1, batch=batch, epoch=0, seed=0)
    assert len(decoded) == 1


def test_auto_holds_small_splits_of_one_size_and_streams_the_rest(shards, tmp_path, monkeypatch):
    def loader(shards, augmentation="pretrain", setting="auto", **kw):
        return build_loader(
            shards, "train", augmentation, batch_size=4, img_size=8, in_memory=setting, **kw
        )

    assert loader(shards).in_memory and not loader(shards, setting=False).in_memory
    monkeypatch.setattr(memory, "AUTO_MAX_BYTES", 1000)  # 130 train images of 144 bytes
    assert not loader(shards).in_memory and loader(shards, setting=True).in_memory
    monkeypatch.undo()
    per_image = {
        "finetune.randaugment": Augment(randaugment=True),
        "finetune.reprob": Augment(reprob=0.25),
    }
    for key, aug in per_image.items():
        assert not loader(shards, "finetune", aug=aug).in_memory
        with pytest.raises(UserError, match=rf"^data.in_memory is true, but .*\({key}\)"):
            loader(shards, "finetune", True, aug=aug)
    # an evaluation at another size resizes the held batch on the device
    assert loader(shards, "eval", True).in_memory
    monkeypatch.setattr(memory, "free_bytes", lambda device: 18_000)  # the split: 18,720 B
    assert not loader(shards).in_memory
    with pytest.raises(UserError, match=r"^data.in_memory is true, but the train split's"):
        loader(shards, setting=True)
    monkeypatch.undo()
    root = imagefolder(tmp_path / "imgs", {"a": 6, "b": 6})
    mixed = folder_params(tmp_path, root, val_fraction=0.25, test_fraction=0.25)
    run_shard(mixed)
    assert not loader(mixed.shards).in_memory
    with pytest.raises(UserError, match=r"^data.in_memory is true, but the images differ in size"):
        loader(mixed.shards, setting=True)


def test_a_pipeline_with_its_splits_in_memory_ends_with_the_weights_of_a_streamed_one(
    tmp_path, monkeypatch
):
    """Pretraining (masks, crops, the k-NN probe) and fine-tuning (drop path from the
    global stream, validation) give bitwise the same weights whether the splits stream
    (through a worker, as `make run` did) or are held."""
    from safetensors.torch import load_file

    from pipeline.params import load_params
    from pipeline.stages import run_training
    from tests.factory import build_project

    weights = {}
    for setting, workers in ((False, 1), (True, 0)):
        folder = tmp_path / str(setting)
        build_project(
            folder,
            data={"in_memory": setting},
            runtime={"num_workers": workers},
            finetune={"epochs": 2, "batch_size": 32, "log_every": 2, "warmup_epochs": 1},
        )
        monkeypatch.chdir(folder)
        p = load_params("params.yaml")
        run_training("pretrain", p)
        run_training("finetune", p)
        weights[setting] = [
            load_file(f"models/{s}/model.safetensors") for s in ("pretrain", "finetune")
        ]
        metrics = (folder / "metrics/finetune.json").read_text()
        weights[setting].append(metrics.replace(str(folder), ""))
    (pre_a, fine_a, metrics_a), (pre_b, fine_b, metrics_b) = weights[False], weights[True]
    for a, b in ((pre_a, pre_b), (fine_a, fine_b)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json_without_times(metrics_a) == json_without_times(metrics_b)


def json_without_times(text: str) -> dict:
    import json

    return {
        k: v
        for k, v in json.loads(text).items()
        if k not in ("minutes", "img_per_s", "data_wait", "model_log_seconds")
    }


def test_a_decode_that_comes_short_is_an_error_not_empty_rows(shards):
    from pipeline.data.loader import build_loader as build

    reader = build(shards, "test", "eval", batch_size=8, img_size=12).reader

    def short(batches):
        yield from reader.read([ids[:-7] for ids in batches])  # 7 samples never arrive

    with pytest.raises(UserError, match=r"the test split gave 40 of its 47 samples"):
        memory.held(reader, (str(shards), "digest", "test"), CPU, short)
