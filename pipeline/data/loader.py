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

Worker w of a rank reads that rank's batches w, w + W, ... which the DataLoader returns in
round-robin order: the sequence of batches does not depend on the number of workers.
Images are decoded, transformed, normalised with the manifest's mean/std, and batched.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode, v2

from mae.augment import eval_transform
from pipeline.data.plan import SHUFFLE_WINDOW, batches_per_epoch, rank_batches
from pipeline.data.store import ShardStore, as_store
from pipeline.data.tarindex import ShardIndex, pgm
from pipeline.errors import UserError, os_error_text

Purpose = Literal["pretrain", "finetune", "eval"]


# ------------------------------------------------------------------ transforms
@dataclass(frozen=True)
class Augment:
    scale_min: float = 0.2  # RandomResizedCrop scale (min, 1): 0.2 for MAE pretraining
    hflip: bool = True
    randaugment: bool = False  # finetune only: RandAugment(2 ops, magnitude 9)
    reprob: float = 0.0  # finetune only: random erasing probability
    crop_pct: float = 1.0  # eval: resize to size / crop_pct, then centre crop


def build_transform(
    purpose: Purpose, img_size: int, mean: list[float], std: list[float], aug: Augment = Augment()
) -> v2.Compose:
    if purpose == "eval":
        return eval_transform(img_size, mean, std, aug.crop_pct)
    bicubic = InterpolationMode.BICUBIC
    ops = [v2.RandomResizedCrop(img_size, scale=(aug.scale_min, 1.0), interpolation=bicubic)]
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if purpose == "finetune" and aug.randaugment:
        ops.append(v2.RandAugment(num_ops=2, magnitude=9))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if purpose == "finetune" and aug.reprob > 0:
        ops.append(v2.RandomErasing(p=aug.reprob, value=0))
    return v2.Compose(ops)


# ------------------------------------------------------------------ the dataset
class ShardStream(IterableDataset):
    """Batches of {"image": (B, C, H, W), "label": (B,), "key": [str]} for one rank.

    With `transform=None` images are only decoded and normalised, as one batch (fast);
    otherwise each image goes through `transform`.
    """

    def __init__(
        self,
        store: ShardStore,
        entries: list[dict],
        index: ShardIndex,
        *,
        transform,
        mode: str,
        mean: list[float],
        std: list[float],
        batch_size: int,
        train: bool,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        window: int,
    ) -> None:
        self.store, self.entries, self.index = store, entries, index
        self.counts = [e["count"] for e in entries]
        self.transform, self.mode = transform, mode
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.window = window
        self.epoch = 0

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of sample ids this epoch."""
        return rank_batches(
            self.counts,
            epoch=self.epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            train=self.train,
            window=self.window,
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and self.train:  # seed the per-image augmentation of this worker
            torch.manual_seed(hash((self.seed, self.epoch, self.rank, worker)) % 2**62)
        files: dict[int, int] = {}
        mine = self.batches()[worker::workers]
        last = {int(s): k for k, ids in enumerate(mine) for s in np.unique(self.index.shard[ids])}
        ahead = Prefetch(self.store, self.entries, self.index, mine) if self.store.remote else None
        try:
            for k, ids in enumerate(mine):
                yield self._collate(ids, files, ahead)
                for shard in [s for s in files if last[s] == k]:  # read for the last time:
                    os.close(files.pop(shard))  # a cached shard's space is free once removed
        except (UserError, OSError) as err:  # as data: from a worker it would arrive wrapped
            if ahead is not None:
                ahead.stop()  # now: the consumer raises and may never resume this generator
            yield {"error": str(err) if isinstance(err, UserError) else os_error_text(err)}
        finally:
            if ahead is not None:
                ahead.stop()
            for fd in files.values():
                os.close(fd)

    def encoded(self, i: int) -> bytes:
        """Sample `i` of the split as its shard holds it (PNG, JPEG or PGM bytes)."""
        x = self.index
        fd = self.store.open(self.entries[int(x.shard[i])])
        try:
            return os.pread(fd, int(x.size[i]), int(x.offset[i]))
        finally:
            os.close(fd)

    def _decode(self, i: int, files: dict[int, int], ahead: Prefetch | None):
        x = self.index
        shard = int(x.shard[i])
        if shard not in files:
            if ahead is not None:
                ahead.advance()
            files[shard] = self.store.open(self.entries[shard])
        data = os.pread(files[shard], int(x.size[i]), int(x.offset[i]))
        if self.transform is None and self.mode == "L" and (pixels := pgm(data)) is not None:
            return pixels
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert(self.mode)
            return np.asarray(img) if self.transform is None else self.transform(img)

    def _images(self, ids: np.ndarray, files: dict[int, int], ahead) -> torch.Tensor:
        if self.transform is not None:
            return torch.stack([self._decode(i, files, ahead) for i in ids])
        pixels = torch.from_numpy(np.stack([self._decode(i, files, ahead) for i in ids]))
        pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
        return (pixels.float() - self.mean) / self.std

    def _collate(self, ids: np.ndarray, files: dict[int, int], ahead) -> dict:
        return {
            "image": self._images(ids, files, ahead),
            "label": torch.from_numpy(self.index.label[ids]),
            "key": self.index.key[ids].tolist(),
        }


class Prefetch:
    """Fetches a worker's remote shards in a thread, in the order its batches first read
    them, at most `ahead` shards beyond the one being read: training starts on the first
    shard while the next ones arrive. A fetch that fails here is tried again (and its
    error raised) when the worker itself needs the shard."""

    def __init__(self, store: ShardStore, entries, index: ShardIndex, batches, ahead: int = 2):
        ids = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        shards = index.shard[ids]
        _, first = np.unique(shards, return_index=True)
        self.order = shards[np.sort(first)].tolist()
        self.store, self.entries = store, entries
        self.room = threading.Semaphore(ahead)  # released as the worker reaches each shard
        self.done = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for shard in self.order:
            self.room.acquire()
            if self.done:
                return
            with contextlib.suppress(Exception):  # the worker's own fetch raises it, named
                self.store.path(self.entries[shard])

    def advance(self) -> None:
        """The worker opens its next shard: one more may be fetched ahead."""
        self.room.release()

    def stop(self) -> None:
        self.done = True
        self.room.release()


class ShardLoader:
    """A DataLoader over one split for one rank; call `set_epoch` before each epoch.

    When `device_augment` is set, the batches are un-augmented and the training step
    applies it on the device: `images(batch, device, generator, rank, world)`.
    """

    def __init__(
        self,
        dataset: ShardStream,
        loader: DataLoader,
        manifest: dict,
        device_augment: torch.nn.Module | None,
    ) -> None:
        self.dataset, self.loader, self.manifest = dataset, loader, manifest
        self.device_augment = device_augment

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch  # workers are not persistent: they get it at each __iter__

    def images(
        self, batch: dict, device: torch.device, generator=None, rank: int = 0, world: int = 1
    ) -> torch.Tensor:
        """A batch's images on `device`, augmented there when the loader leaves that to the
        device (crops drawn from `generator` for the global batch; this rank's rows kept)."""
        imgs = batch["image"].to(device, non_blocking=True)
        if self.device_augment is None:
            return imgs
        return self.device_augment(imgs, generator, rank, world)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            if "error" in batch:
                raise UserError(batch["error"])
            yield batch

    def __len__(self) -> int:
        d = self.dataset
        return batches_per_epoch(
            d.counts, world_size=d.world_size, batch_size=d.batch_size, train=d.train, rank=d.rank
        )


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_loader(
    shards: ShardStore | Path | str,
    split: str,
    purpose: Purpose,
    *,
    batch_size: int,
    img_size: int,
    num_workers: int = 0,
    seed: int = 0,
    aug: Augment = Augment(),
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_window: int = SHUFFLE_WINDOW,
    pin_memory: bool = False,
    batch_augment: bool = True,
) -> ShardLoader:
    """The loader for `split` ("train", "val", "test") and `purpose` from the shards' manifest.

    Rank and world size default to the process group's. Training purposes shuffle and drop
    the few samples that do not fill a global batch; "eval" reads every sample exactly once.
    See `ShardLoader.device_augment`.
    """
    store = as_store(shards)
    manifest = store.manifest()
    if split not in manifest["splits"]:
        raise UserError(f"{store.url('manifest.json')} has no split {split!r}")
    entries = manifest["splits"][split]["shards"]
    store.verify(entries)
    rank, world_size = _rank_and_world(rank, world_size)
    transform, device_augment = _transforms(manifest, purpose, img_size, aug, batch_augment)
    dataset = ShardStream(
        store,
        entries,
        store.index(entries),
        transform=transform,
        mode="L" if manifest["channels"] == 1 else "RGB",
        mean=manifest["mean"],
        std=manifest["std"],
        batch_size=batch_size,
        train=purpose != "eval",
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        window=shuffle_window,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return ShardLoader(dataset, loader, manifest, device_augment)


def _transforms(manifest: dict, purpose: Purpose, img_size: int, aug: Augment, batch_augment: bool):
    """-> (per-image CPU transform or None, batched device augmentation or None).

    Images that all have one size (IDX sources) skip the per-image path: they are decoded
    and normalised as a batch, and cropped and flipped on the device, in one call. Variable
    sizes, RandAugment and random erasing need the per-image path.
    """
    from mae.augment import RandomResizedCropFlip

    size = manifest.get("image_size")
    if batch_augment and size is not None:
        if purpose == "eval" and tuple(size) == (img_size, img_size) and aug.crop_pct == 1.0:
            return None, None
        if purpose != "eval" and not aug.randaugment and aug.reprob == 0:
            crop = RandomResizedCropFlip(img_size, scale=(aug.scale_min, 1.0), hflip=aug.hflip)
            return None, crop
    return build_transform(purpose, img_size, manifest["mean"], manifest["std"], aug), None
