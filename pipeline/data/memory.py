"""A split held in memory: decoded once from the verified shards into (N, C, H, W) uint8
pixels and (N,) labels on the training device, batches gathered there by the epoch plan.

Small datasets (Fashion-MNIST's 54,000 training images are 42 MB of pixels) then cost no
loader worker, no decoding per epoch and no copy to the device per step. Whether a split
is held is `data.in_memory`:

- `auto` (the default): held when it can be and its pixels take at most
  `AUTO_MAX_BYTES` (2 GiB: CIFAR-sized and Fashion-MNIST-sized sets, not ImageNet) and
  half the memory free (the host's, and the GPU's when training there);
- `true`: held, or refused in one line naming the reason (a split that does not fit the
  memory free is one);
- `false`: streamed from the shards.

A split can be held when its images share one size (IDX sources; an ImageFolder whose
images all have one size) and nothing runs per image on the CPU (RandAugment, random
erasing): those stream. Either way the batches hold the same
samples in the same order (`plan.EpochPlan`), and the same pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.data.reader import SplitReader
from pipeline.errors import UserError

log = logging.getLogger(__name__)
AUTO_MAX_BYTES = 2 * 2**30  # `auto` holds a split whose pixels fit this
DECODE_BATCH = 1024  # images per batch of the decoding pass

_HELD: dict[tuple, HeldSplit] = {}  # per process: (shards, digest, split, device) -> split


def hold_split(
    setting: bool | str, manifest: dict, split: str, per_image: str | None, device: torch.device
) -> bool:
    """Whether `split` is held in memory on `device` under `data.in_memory` = `setting`;
    `per_image` says why its images must go through the CPU one by one (None: they need
    not). Raises UserError when `setting` is true and the split cannot be held, or does
    not fit the memory free now (the host's, where it is decoded, and the device's)."""
    if per_image is not None:  # mixed sizes among the reasons: see loader._transforms
        if setting is True:
            raise UserError(
                f"data.in_memory is true, but {per_image}: set data.in_memory to auto or false"
            )
        return False
    if setting is False:
        return False
    height, width = manifest["image_size"]
    pixels = manifest["splits"][split]["count"] * manifest["channels"] * height * width
    room = free_bytes(device)
    if setting == "auto":
        return pixels <= min(AUTO_MAX_BYTES, room // 2)  # half: training needs the rest
    if pixels > room:
        raise UserError(
            f"data.in_memory is true, but the {split} split's {pixels / 1e9:.2f} GB of "
            f"pixels do not fit the {room / 1e9:.2f} GB free on {device}: set "
            "data.in_memory to auto or false"
        )
    return True


def free_bytes(device: torch.device) -> int:
    """Memory free now for a held split: the host's (it is decoded there) and, on a GPU,
    the device's."""
    import psutil

    room = psutil.virtual_memory().available
    if device.type == "cuda":
        room = min(room, torch.cuda.mem_get_info(device)[0])
    return room


class HeldSplit:
    """A split's pixels (N, C, H, W) uint8 and labels (N,) int64 on `device`, in sample-id
    order, and its keys; `batches` gathers the plan's batches there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keys: np.ndarray) -> None:
        self.images, self.labels, self.keys = images, labels, keys

    def batches(self, batches: list[np.ndarray]) -> Iterator[dict]:
        device = self.images.device
        for ids in batches:
            # the ids go through pinned memory without blocking: no host sync per step
            index = to_device(torch.from_numpy(ids), device)
            yield {
                "image": self.images[index],
                "label": self.labels[index],
                "key": self.keys[ids].tolist(),
            }


def held(reader: SplitReader, key: tuple, device: torch.device, decode) -> HeldSplit:
    """The split of `reader`, decoded once per process and `key` (the store, the manifest
    digest, the split): `decode(batches)` yields its batches of uint8 pixels in id order."""
    if device.type == "cuda" and device.index is None:  # one copy for "cuda" and "cuda:0"
        device = torch.device("cuda", torch.cuda.current_device())
    key = (*key, str(device))
    if key not in _HELD:
        n = len(reader.index)
        ids = np.arange(n)
        batches = [ids[i : i + DECODE_BATCH] for i in range(0, n, DECODE_BATCH)]
        images, labels, row = None, torch.empty(n, dtype=torch.int64), 0
        for batch in decode(batches):
            pixels = batch["image"]
            if images is None:
                images = torch.empty((n, *pixels.shape[1:]), dtype=torch.uint8)
            images[row : row + len(pixels)] = pixels
            labels[row : row + len(pixels)] = batch["label"]
            row += len(pixels)
        if row != n:  # never train on rows left empty
            raise UserError(f"{key[0]}: the {key[2]} split gave {row} of its {n} samples")
        if images is None:  # an empty split
            images = torch.empty((0, 1, 1, 1), dtype=torch.uint8)
        _HELD[key] = HeldSplit(images.to(device), labels.to(device), reader.index.key)
        log.info("%s held in memory on %s: %.1f MB", key[2], device, images.numel() / 1e6)
    return _HELD[key]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: on CUDA through pinned memory without blocking the host
    (the copy is ordered on the current stream before the kernels that read it)."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
