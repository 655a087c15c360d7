"""Few labels (`data.labels`): a class-balanced subset, a pure function of the shards'
labels, the key and its seed; the loaders' epoch plans over it, on any number of ranks."""

import numpy as np
import pytest

from pipeline.data.labels import label_subset
from pipeline.data.plan import EpochPlan
from pipeline.errors import UserError

CLASSES = ["a", "b", "c", "d"]


def _labels(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"train": rng.integers(0, 4, 1000), "val": rng.integers(0, 4, 120)}


def test_a_subset_is_class_balanced_seeded_and_nested():
    labels = _labels()
    ten = label_subset(labels, CLASSES, 10, seed=0)
    assert ten.per_class["train"] == [10, 10, 10, 10]
    train_c, val_c = np.bincount(labels["train"]), np.bincount(labels["val"])
    assert ten.per_class["val"] == [
        max(1, int(10 / t * v + 0.5)) for t, v in zip(train_c, val_c, strict=True)
    ]
    for split in ("train", "val"):  # the kept ids are of the classes counted, sorted
        kept = ten.ids[split]
        assert np.all(np.diff(kept) > 0)
        assert np.bincount(labels[split][kept], minlength=4).tolist() == ten.per_class[split]
    again = label_subset(labels, CLASSES, 10, seed=0)
    assert again.digest == ten.digest and all(
        np.array_equal(again.ids[s], ten.ids[s]) for s in ("train", "val")
    )
    other = label_subset(labels, CLASSES, 10, seed=1)
    assert other.digest != ten.digest
    twenty = label_subset(labels, CLASSES, 20, seed=0)
    assert set(ten.ids["train"]) < set(twenty.ids["train"])  # 10 per class lies in 20
    tenth = label_subset(labels, CLASSES, 0.1, seed=0)
    assert tenth.per_class["train"] == [int(0.1 * n + 0.5) for n in train_c]
    assert label_subset(labels, CLASSES, 0.0001, seed=0).per_class["val"] == [1, 1, 1, 1]
    assert label_subset(labels, CLASSES, None, seed=0) is None


def test_a_class_with_fewer_images_than_the_key_is_refused_by_name():
    labels = {"train": np.array([0] * 30 + [1] * 30 + [2] * 7 + [3] * 30), "val": np.arange(4)}
    with pytest.raises(UserError, match=r"^data.labels: 10 per class, but class 'c' has 7 train"):
        label_subset(labels, CLASSES, 10, seed=0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_plans_over_the_one_subset(world):
    """Each rank computes the same subset (a pure function); its plans split it: in
    training, disjoint full batches of subset ids alone; in evaluation, all of it once."""
    subset = label_subset(_labels(), CLASSES, 25, seed=3)
    counts, ids = (400, 400, 200), subset.ids["train"]
    seen = []
    for rank in range(world):
        plan = EpochPlan(counts, 8, True, seed=0, rank=rank, world_size=world, subset=ids)
        batches = plan.batches(epoch=1)
        assert len(batches) == len(plan) == len(ids) // (8 * world)
        seen += [i for b in batches for i in b.tolist()]
    assert len(seen) == len(set(seen)) == len(ids) // (8 * world) * 8 * world
    assert set(seen) <= set(ids.tolist())
    evaluated = []
    for rank in range(world):
        plan = EpochPlan(counts, 8, False, rank=rank, world_size=world, subset=ids)
        evaluated += [i for b in plan.batches(0) for i in b.tolist()]
    assert sorted(evaluated) == ids.tolist()
