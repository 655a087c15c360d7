"""Loaders over the WebDataset shards that see every sample once, in the same order on
any number of ranks and workers.

WebDataset's defaults split shards by rank and worker before shuffling; uneven shards then
give ranks different batch counts (a DDP hang), non-persistent workers repeat one order,
and the data a step sees depends on how many ranks and workers there are. Here the
manifest's per-shard counts and each shard's tar headers (read once, no data) give every
sample an address, and one pure function orders an epoch:

- training: the shards in an order drawn from (seed, epoch), then the samples shuffled
  within windows of `shuffle_window` consecutive samples (locality for the disk); the
  sequence is cut into global batches of world_size x batch_size samples and rank r takes
  the r-th slice of each. Every rank gets the same number of full batches; at most
  world_size x batch_size - 1 samples are left out per epoch, the rest are used once.
  One rank with a batch of 2B sees exactly the samples two ranks with B see together.
- evaluation: in shard order, a contiguous range per rank, every sample exactly once.

The plan (`plan.EpochPlan`) says which samples each batch holds; where they come from is
the loader's source: the shards, read by a DataLoader's workers (`Streamed`, the reading
itself in `reader`), or the split decoded once and held on the training device
(`InMemory`, see `memory` and `data.in_memory`). Both give the same samples in the same
batches, as stored pixels (uint8) that `Loader.images` normalises and augments on the
device; only images that need per-image CPU work (variable sizes, RandAugment, random
erasing) arrive transformed and normalised from the workers, resampled by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from mae.augment import CentreCrop, RandomResizedCropFlip, eval_transform, normalise, pixels
from pipeline.data.memory import held, hold_split
from pipeline.data.plan import SHUFFLE_WINDOW, Augmentation, EpochPlan
from pipeline.data.reader import SplitReader
from pipeline.data.store import ShardStore, as_store
from pipeline.errors import UserError, os_error_text


# ------------------------------------------------------------------ transforms
@dataclass(frozen=True)
class Augment:
    scale_min: float = 0.2  # RandomResizedCrop scale (min, 1): 0.2 for MAE pretraining
    hflip: bool = True
    randaugment: bool = False  # finetune only: RandAugment(2 ops, magnitude 9)
    reprob: float = 0.0  # finetune only: random erasing probability
    crop_pct: float = 1.0  # eval: resize to size / crop_pct, then centre crop


class TrainView:
    """A PIL image -> its normalised training view (C, size, size): the crop and flip of
    the batched device path (`mae.augment.RandomResizedCropFlip`, one image drawn from
    torch's stream, which the reader seeds per batch), then RandAugment on the view's
    pixels rounded to uint8 (its operations are defined on 8-bit levels), then random
    erasing."""

    def __init__(self, crop, mean: list[float], std: list[float], randaugment, erase) -> None:
        self.crop, self.mean, self.std = crop, mean, std
        self.randaugment, self.erase = randaugment, erase

    def __call__(self, img) -> torch.Tensor:
        x = self.crop(pixels(img)[None].float())[0]
        if self.randaugment is not None:
            x = self.randaugment(x.round().clamp(0, 255).to(torch.uint8))
        x = normalise(x, self.mean, self.std)
        return x if self.erase is None else self.erase(x)


def build_transform(
    augmentation: Augmentation,
    img_size: int,
    mean: list[float],
    std: list[float],
    aug: Augment = Augment(),
):
    """The per-image transform of `augmentation`: PIL image -> normalised (C, size, size)."""
    if augmentation == "eval":
        return eval_transform(img_size, mean, std, aug.crop_pct)
    crop = RandomResizedCropFlip(img_size, scale=(aug.scale_min, 1.0), hflip=aug.hflip)
    finetune = augmentation == "finetune"
    randaugment = v2.RandAugment(num_ops=2, magnitude=9) if finetune and aug.randaugment else None
    erase = v2.RandomErasing(p=aug.reprob, value=0) if finetune and aug.reprob > 0 else None
    return TrainView(crop, mean, std, randaugment, erase)


# ------------------------------------------------------------------ the loader
def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The seed of one batch's per-image augmentation (a tuple of ints hashes the same in
    every process)."""
    return hash((seed, epoch, rank, batch)) % 2**62


class ShardStream(IterableDataset):
    """One epoch of a rank's batches, read from the shards by a DataLoader's workers: worker
    w of W reads batches w, w + W, ... which the DataLoader returns in round-robin order, so
    the sequence does not depend on the number of workers. An error arrives as data
    ({"error": its line}); raised in a worker it would arrive wrapped in a traceback."""

    def __init__(self, reader: SplitReader, transform, seed: int, rank: int) -> None:
        self.reader, self.transform, self.seed, self.rank = reader, transform, seed, rank
        self.batches: list[np.ndarray] = []
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the per-image augmentation of batch b: seeded by (seed, epoch, rank, b), the same
        # whichever worker reads it and with none (the training process's own streams are
        # left as they were)
        mine = range(worker, len(self.batches), workers)
        seeds = [batch_seed(self.seed, self.epoch, self.rank, b) for b in mine]
        try:
            yield from self.reader.read(self.batches[worker::workers], self.transform, seeds)
        except (UserError, OSError) as err:
            yield {"error": str(err) if isinstance(err, UserError) else os_error_text(err)}


class Streamed:
    """Batches of ids -> batches read from the shards (workers are not persistent: each
    epoch they get the dataset with its batches anew). Each iteration draws the workers'
    base seed from `generator` (None: the global stream, as any DataLoader)."""

    def __init__(self, reader: SplitReader, transform, workers: int, pin: bool, seed, rank,
                 generator: torch.Generator | None = None):  # fmt: skip
        self.dataset = ShardStream(reader, transform, seed, rank)
        self.loader = DataLoader(
            self.dataset, batch_size=None, num_workers=workers, pin_memory=pin, generator=generator
        )

    def __call__(self, batches: list[np.ndarray], epoch: int = 0) -> Iterator[dict]:
        self.dataset.batches, self.dataset.epoch = batches, epoch
        for batch in self.loader:
            if "error" in batch:
                raise UserError(batch["error"])
            yield batch


class InMemory:
    """Batches of ids -> batches gathered from the split held on `device`, decoded on first
    use (in sample-id order, by `workers` processes)."""

    def __init__(self, reader: SplitReader, workers: int, key: tuple, device: torch.device):
        # its own seed stream: decoding leaves the global streams as they were
        self.decode = Streamed(reader, None, workers, False, 0, 0, torch.Generator())
        self.reader, self.key, self.device = reader, key, device

    def __call__(self, batches: list[np.ndarray], epoch: int = 0) -> Iterator[dict]:
        # a generator, as Streamed: the decoding (once) counts as waiting for data
        split = held(self.reader, self.key, self.device, self.decode)
        # One draw from the global stream, as a DataLoader's iteration makes for its workers'
        # base seed: what uses that stream (drop path) then draws the values it draws when
        # the split streams. Holding a split changes speed, never results.
        torch.empty((), dtype=torch.int64).random_()
        yield from split.batches(batches)


class Loader:
    """One split for one rank: each epoch, the batches of the epoch plan, streamed from the
    shards or gathered from the split held in memory (`in_memory`); call `set_epoch` first.

    A batch is {"image", "label", "key"}; `images(batch, device, ...)` gives its images as
    the model takes them: on `device`, normalised with the manifest's mean/std, and, where
    the loader leaves augmentation to the device (`device_augment`), cropped and flipped
    there (crops drawn from `generator` for the global batch; this rank's rows kept).
    """

    def __init__(self, plan: EpochPlan, reader: SplitReader, manifest: dict, source, augment):
        self.plan, self.reader, self.manifest = plan, reader, manifest
        self.source, self.device_augment = source, augment
        self.in_memory = isinstance(source, InMemory)
        self.epoch = 0
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        return iter(self.source(self.plan.batches(self.epoch), self.epoch))

    def __len__(self) -> int:
        return len(self.plan)

    def images(
        self, batch: dict, device: torch.device, generator=None, rank: int = 0, world: int = 1
    ) -> torch.Tensor:
        imgs = batch["image"].to(device, non_blocking=True)
        if imgs.dtype == torch.uint8:  # stored pixels: normalised here, on the device
            mean, std = self._normalisation(device)
            imgs = (imgs.float() - mean) / std
        if self.device_augment is None:
            return imgs
        return self.device_augment(imgs, generator, rank, world)

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:  # once: a copy per step would wait for the device
            m = self.manifest
            mean = torch.tensor(m["mean"]).view(1, -1, 1, 1) * 255
            std = torch.tensor(m["std"]).view(1, -1, 1, 1) * 255
            self._stats[device] = (mean.to(device), std.to(device))
        return self._stats[device]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_loader(
    shards: ShardStore | Path | str,
    split: str,
    augmentation: Augmentation,
    *,
    batch_size: int,
    img_size: int,
    num_workers: int = 0,
    seed: int = 0,
    aug: Augment = Augment(),
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_window: int = SHUFFLE_WINDOW,
    batch_augment: bool = True,
    in_memory: bool | str = False,
    device: torch.device | None = None,
    subset: np.ndarray | None = None,
) -> Loader:
    """The loader for `split` ("train", "val", "test") and `augmentation` from the shards' manifest.

    Rank and world size default to the process group's. Training augmentations shuffle and drop
    the few samples that do not fill a global batch; "eval" reads every sample exactly once.
    `in_memory` is `data.in_memory` (True, False or "auto", see `memory`); `device` is
    where a held split lives and where batches go (pinned memory for CUDA); `subset`: the
    sample ids read (a label subset, `pipeline.data.labels`), None: all. Raises
    UserError for missing or altered shards and for an `in_memory` that cannot be honoured.
    """
    store = as_store(shards)
    manifest = store.manifest()
    if split not in manifest["splits"]:
        raise UserError(f"{store.url('manifest.json')} has no split {split!r}")
    entries = manifest["splits"][split]["shards"]
    store.verify(entries)
    device = device or torch.device("cpu")
    rank, world_size = _rank_and_world(rank, world_size)
    transform, device_augment, per_image = _transforms(
        manifest, augmentation, img_size, aug, batch_augment
    )
    mode = "L" if manifest["channels"] == 1 else "RGB"
    reader = SplitReader(store, entries, store.index(entries), mode)
    plan = EpochPlan(
        reader.counts,
        batch_size,
        augmentation != "eval",
        seed,
        rank,
        world_size,
        shuffle_window,
        subset,
    )
    if hold_split(in_memory, manifest, split, per_image, device):
        key = (store.location, store.digest(), split)
        source = InMemory(reader, num_workers, key, device)
    else:
        source = Streamed(reader, transform, num_workers, device.type == "cuda", seed, rank)
    return Loader(plan, reader, manifest, source, device_augment)


def _transforms(
    manifest: dict, augmentation: Augmentation, img_size: int, aug: Augment, batch_augment: bool
):
    """-> (per-image CPU transform or None, batched device augmentation or None, why images
    go through the CPU one by one or None).

    Images that all have one size (IDX sources) skip the per-image path: they are decoded
    as a batch, and normalised, cropped and flipped (or centre-cropped for evaluation) on
    the device, in one call. Variable sizes, RandAugment and random erasing need the
    per-image path. Both resample by one rule (`mae.resample.crop_resize`).
    """
    size = manifest.get("image_size")
    if augmentation != "eval" and aug.randaugment:
        why = "RandAugment (finetune.randaugment) runs per image on the CPU"
    elif augmentation != "eval" and aug.reprob > 0:
        why = "random erasing (finetune.reprob) runs per image on the CPU"
    elif size is None:
        why = "the images differ in size"
    elif not batch_augment:
        why = "the augmentation was asked to run per image on the CPU"
    else:
        why = None
    if why is None and augmentation == "eval":
        resized = tuple(size) != (img_size, img_size) or aug.crop_pct != 1.0
        return None, (CentreCrop(img_size, aug.crop_pct) if resized else None), None
    if why is None:
        crop = RandomResizedCropFlip(img_size, scale=(aug.scale_min, 1.0), hflip=aug.hflip)
        return None, crop, None
    return (
        build_transform(augmentation, img_size, manifest["mean"], manifest["std"], aug),
        None,
        why,
    )
