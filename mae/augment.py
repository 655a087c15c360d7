"""Augmentation and the evaluation view, all resampled by `mae.resample.crop_resize`.

`RandomResizedCropFlip` samples, per image, a crop of `scale` x area with an aspect ratio
in `ratio` (log-uniform), as torchvision's RandomResizedCrop, flips half of them, and
resamples every crop to `size` in one call: on a batch held on the training device, or on
one image in a loader worker. `CentreCrop` is the evaluation view of a batch, and
`eval_transform` the same view of one PIL image: what every image a classifier is
evaluated on or asked about goes through (the loader's evaluation path and the MLflow
model use these). One rule, so training, evaluation and serving see the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mae.resample import centre_box, crop_resize


class RandomResizedCropFlip(nn.Module):
    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
    ) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio, self.hflip = scale, ratio, hflip

    def boxes(
        self,
        n: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        """-> (N, 4) crops as (x0, y0, w, h) in pixels, and (N,) flip flags.

        Under data parallelism every rank draws for the global batch of `world_size` x N
        images and keeps its own rows, so the crops do not depend on how many ranks share it.
        """
        rows = slice(rank * n, (rank + 1) * n)
        u = torch.rand(n * world_size, 4, generator=generator, dtype=torch.float64)[rows]
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        w = torch.sqrt(area * aspect).clamp(1, width)
        h = torch.sqrt(area / aspect).clamp(1, height)
        x0, y0 = (width - w) * u[:, 2], (height - h) * u[:, 3]
        flip = torch.rand(n * world_size, generator=generator)[rows] < 0.5
        flip = flip if self.hflip else torch.zeros(n, dtype=bool)
        return torch.stack([x0, y0, w, h], 1), flip

    def forward(
        self,
        imgs: torch.Tensor,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> torch.Tensor:
        """imgs: (N, C, H, W) float -> (N, C, *size); this rank's share of a global batch."""
        n, _, height, width = imgs.shape
        box, flip = self.boxes(n, height, width, generator, rank, world_size)
        return crop_resize(imgs, box, self.size, flip)


class CentreCrop(nn.Module):
    """The evaluation view of a batch: (N, C, H, W) float -> (N, C, size, size), each
    image's centred square of crop_pct x its shorter side (`resample.centre_box`)."""

    def __init__(self, size: int, crop_pct: float = 1.0) -> None:
        super().__init__()
        self.size, self.crop_pct = size, crop_pct

    def forward(self, imgs: torch.Tensor, generator=None, rank: int = 0, world_size: int = 1):
        n, _, height, width = imgs.shape
        box = centre_box(height, width, self.crop_pct).expand(n, 4)
        return crop_resize(imgs, box, (self.size, self.size))


def pixels(img) -> torch.Tensor:
    """PIL image (L or RGB) -> (C, H, W) uint8 tensor of its stored pixels."""
    a = np.array(img)  # a copy: torch takes no read-only arrays
    return torch.from_numpy(np.ascontiguousarray(a.reshape(*a.shape[:2], -1))).permute(2, 0, 1)


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(C, H, W) pixels on the 0-255 scale -> normalised by the training shards' mean/std
    (given on the 0-1 scale), as `Loader.images` normalises a batch."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255
    return (x.float() - m) / s


class EvalTransform:
    """PIL image (already in the model's mode) -> normalised (C, size, size) float tensor:
    `CentreCrop` of one image (an image of that size, at crop_pct 1, is left as it is)."""

    def __init__(self, size: int, mean: list[float], std: list[float], crop_pct: float = 1.0):
        self.crop, self.mean, self.std = CentreCrop(size, crop_pct), mean, std

    def __call__(self, img) -> torch.Tensor:
        x = pixels(img)
        if x.shape[1:] != (self.crop.size, self.crop.size) or self.crop.crop_pct != 1.0:
            x = self.crop(x[None].float())[0]
        return normalise(x, self.mean, self.std)


def eval_transform(img_size: int, mean: list[float], std: list[float], crop_pct: float = 1.0):
    """The evaluation view of one PIL image (`EvalTransform`)."""
    return EvalTransform(img_size, mean, std, crop_pct)
