"""Loaders over the WebDataset shards that see every sample once, on any number of ranks
and workers.

WebDataset's defaults split shards by rank and worker before shuffling; uneven shards then
give ranks different batch counts (a DDP hang) and non-persistent workers repeat one order.
Here the manifest's per-shard counts let every (rank, worker) read an exact range of one
global, epoch-shuffled sequence of samples:

- training: shard order reshuffled each epoch from (seed, epoch), the same on every rank;
  each rank gets the same number of full batches; at most world_size x batch_size samples
  are dropped per epoch, the rest are used once;
- evaluation: shards in order, every sample exactly once across ranks and workers.

Within a worker, samples pass through a seeded shuffle buffer (training), are decoded,
transformed, normalised with the manifest's mean/std, and batched.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode, v2

from pipeline.errors import UserError

Purpose = Literal["pretrain", "finetune", "eval"]
Segment = tuple[int, int, int]  # (shard index, samples to skip, samples to take)
IMAGE_EXTS = ("pgm", "png", "jpg")


def manifest_digest(shards: Path | str) -> str:
    """sha256 of manifest.json: names the exact data a run saw."""
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no shards at {shards} (run `mae-cli shard` or `dvc repro shard`)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: Path | str) -> dict:
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no shards at {folder}: {path} is missing (run `mae-cli shard`)") from None


# ------------------------------------------------------------------ the plan (pure)
def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` near-equal contiguous ranges covering range(total)."""
    base, extra = divmod(total, parts)
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(parts)])
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(parts)]


def _segments(counts: list[int], order: list[int], start: int, end: int) -> list[Segment]:
    """The samples [start, end) of the shards concatenated in `order`, as per-shard pieces."""
    out, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(end, offset + counts[shard])
        if lo < hi:
            out.append((shard, lo - offset, hi - lo))
        offset += counts[shard]
    return out


def plan_epoch(
    counts: list[int],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    train: bool,
) -> list[list[Segment]]:
    """For each worker of `rank`: the shard pieces it reads this epoch, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    workers = max(num_workers, 1)
    total = sum(counts)
    if train:
        order = list(np.random.default_rng([seed, epoch]).permutation(len(counts)))
        batches = total // (world_size * batch_size)  # the same count on every rank
        rank_start = rank * batches * batch_size
        worker_ranges = [
            (rank_start + a * batch_size, rank_start + b * batch_size)
            for a, b in _ranges(batches, workers)
        ]
    else:
        order = list(range(len(counts)))
        lo, hi = _ranges(total, world_size)[rank]
        worker_ranges = [(lo + a, lo + b) for a, b in _ranges(hi - lo, workers)]
    return [_segments(counts, order, a, b) for a, b in worker_ranges]


def batches_per_epoch(
    counts: list[int],
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    train: bool,
    rank: int = 0,
) -> int:
    plan = plan_epoch(
        counts,
        epoch=0,
        seed=0,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        train=train,
    )
    return sum(-(-sum(take for _, _, take in w) // batch_size) for w in plan)


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
    bicubic = InterpolationMode.BICUBIC
    if purpose == "eval":
        ops = [
            v2.Resize(round(img_size / aug.crop_pct), interpolation=bicubic),
            v2.CenterCrop(img_size),
        ]
    else:
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
def _tar_samples(path: str) -> Iterator[dict]:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as stream:
        files = ({**f, "__url__": path} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)


def _read(paths: list[str], segments: list[Segment]) -> Iterator[dict]:
    for shard, skip, take in segments:
        for i, sample in enumerate(_tar_samples(paths[shard])):
            if i >= skip + take:
                break
            if i >= skip:
                yield sample


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Batches of {"image": (B, C, H, W), "label": (B,), "key": [str]} for one rank.

    With `transform=None` images are only decoded and normalised, as one batch (fast);
    otherwise each image goes through `transform`.
    """

    def __init__(
        self,
        paths: list[str],
        counts: list[int],
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
        shuffle_buffer: int,
    ) -> None:
        self.paths, self.counts = paths, counts
        self.transform, self.mode = transform, mode
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = plan_epoch(
            self.counts,
            epoch=self.epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            train=self.train,
        )
        samples = _read(self.paths, plan[worker])
        if self.train:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            seed = rng.randrange(2**62)
            if info is not None:  # a worker process: seed its per-image augmentation
                torch.manual_seed(seed)  # (in-process, the training RNG is left alone)
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        batch: list[dict] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:  # only in evaluation: training ranges are whole batches
            yield self._collate(batch)

    def _decode(self, sample: dict):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise UserError(f"{sample['__url__']}: sample {sample['__key__']} has no image")
        with Image.open(io.BytesIO(sample[ext])) as img:
            img = img.convert(self.mode)
            return np.asarray(img) if self.transform is None else self.transform(img)

    def _images(self, batch: list[dict]) -> torch.Tensor:
        if self.transform is not None:
            return torch.stack([self._decode(s) for s in batch])
        pixels = torch.from_numpy(np.stack([self._decode(s) for s in batch]))
        pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
        return (pixels.float() - self.mean) / self.std

    def _collate(self, batch: list[dict]) -> dict:
        return {
            "image": self._images(batch),
            "label": torch.tensor([int(s["cls"]) for s in batch]),
            "key": [s["__key__"] for s in batch],
        }


class ShardLoader:
    """A DataLoader over one split for one rank; call `set_epoch` before each epoch.

    When `device_augment` is set, the batches are un-augmented and the training step must
    apply it on the device (`device_augment(images, generator)`).
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

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)

    def __len__(self) -> int:
        d = self.dataset
        return batches_per_epoch(
            d.counts,
            world_size=d.world_size,
            num_workers=d.num_workers,
            batch_size=d.batch_size,
            train=d.train,
            rank=d.rank,
        )


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_loader(
    shards: Path | str,
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
    shuffle_buffer: int = 2000,
    pin_memory: bool = False,
    batch_augment: bool = True,
) -> ShardLoader:
    """The loader for `split` ("train", "val", "test") and `purpose` from the shards' manifest.

    Training purposes shuffle and drop the few samples that do not fill a batch on every
    rank; "eval" reads every sample exactly once. See `ShardLoader.device_augment`.
    """
    manifest = read_manifest(shards)
    if split not in manifest["splits"]:
        raise UserError(f"{shards}/manifest.json has no split {split!r}")
    entries = manifest["splits"][split]["shards"]
    paths = [str(Path(shards) / e["name"]) for e in entries]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"shard listed in the manifest is missing: {missing[0]}")
    rank, world_size = _rank_and_world(rank, world_size)
    train = purpose != "eval"
    transform, device_augment = _transforms(manifest, purpose, img_size, aug, batch_augment)
    dataset = ShardStream(
        paths,
        [e["count"] for e in entries],
        transform=transform,
        mode="L" if manifest["channels"] == 1 else "RGB",
        mean=manifest["mean"],
        std=manifest["std"],
        batch_size=batch_size,
        train=train,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
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
