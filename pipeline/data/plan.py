"""The epoch plan, pure: which samples each rank's batches hold, from the shards' sample
counts, the seed and the epoch alone (the loader's docstring says why)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# The augmentation a loader applies: the pretraining crops, fine-tuning's (RandAugment,
# random erasing: `Augment`), or none (eval: resize and centre crop only).
Augmentation = Literal["pretrain", "finetune", "eval"]
SHUFFLE_WINDOW = 20_000  # samples shuffled together; more than Fashion-MNIST's train split


def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` near-equal contiguous ranges covering range(total)."""
    base, extra = divmod(total, parts)
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(parts)])
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(parts)]


def epoch_order(
    counts: list[int],
    *,
    epoch: int,
    seed: int,
    train: bool,
    window: int = SHUFFLE_WINDOW,
    subset: np.ndarray | None = None,
) -> np.ndarray:
    """Sample ids (positions in the shards concatenated in manifest order) in epoch order;
    with `subset` (sorted ids: a label subset), its ids alone, in the order they have in
    the whole split's epoch order."""
    if subset is not None:
        order = epoch_order(counts, epoch=epoch, seed=seed, train=train, window=window)
        return order[np.isin(order, subset)]
    if not train:
        return np.arange(sum(counts))
    rng = np.random.default_rng([seed, epoch])
    starts = np.cumsum([0, *counts])
    order = [np.arange(starts[s], starts[s + 1]) for s in rng.permutation(len(counts))]
    seq = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    for lo in range(0, len(seq), window):
        seq[lo : lo + window] = rng.permutation(seq[lo : lo + window])
    return seq


def rank_batches(
    counts: list[int],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    train: bool,
    window: int = SHUFFLE_WINDOW,
    subset: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The sample ids of each of `rank`'s batches this epoch, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    order = epoch_order(counts, epoch=epoch, seed=seed, train=train, window=window, subset=subset)
    if train:
        steps = len(order) // (world_size * batch_size)  # the same count on every rank
        return list(
            order[: steps * world_size * batch_size].reshape(steps, world_size, -1)[:, rank]
        )
    lo, hi = _ranges(len(order), world_size)[rank]
    return [order[i : min(i + batch_size, hi)] for i in range(lo, hi, batch_size)]


def batches_per_epoch(
    counts: list[int],
    *,
    world_size: int,
    batch_size: int,
    train: bool,
    rank: int = 0,
    subset: np.ndarray | None = None,
) -> int:
    total = sum(counts) if subset is None else len(subset)
    if train:
        return total // (world_size * batch_size)
    lo, hi = _ranges(total, world_size)[rank]
    return -(-(hi - lo) // batch_size)


@dataclass(frozen=True)
class EpochPlan:
    """`rank_batches` for one split and one rank, epoch after epoch: what both loaders (the
    streaming one and the one over a split held in memory) follow."""

    counts: tuple[int, ...]  # samples per shard, in manifest order
    batch_size: int
    train: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    window: int = SHUFFLE_WINDOW
    subset: np.ndarray | None = field(default=None, compare=False)  # a label subset's ids

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of sample ids in `epoch`, in order."""
        return rank_batches(
            list(self.counts),
            epoch=epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            train=self.train,
            window=self.window,
            subset=self.subset,
        )

    def __len__(self) -> int:
        return batches_per_epoch(
            list(self.counts),
            world_size=self.world_size,
            batch_size=self.batch_size,
            train=self.train,
            rank=self.rank,
            subset=self.subset,
        )
