"""Batched augmentation on the training device: one `grid_sample` for a whole batch.

`RandomResizedCropFlip` samples, per image, a crop of `scale` x area with an aspect ratio
in `ratio` (log-uniform), as torchvision's RandomResizedCrop, flips half of them, and
resamples every crop to `size` in one call. On a GPU this costs microseconds instead of a
CPU worker's per-image PIL work.

`eval_transform` is what every image a classifier is evaluated on or asked about goes
through: the loader's evaluation path and the MLflow model use this one function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RandomResizedCropFlip(nn.Module):
    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mode: str = "bicubic",
    ) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio, self.hflip, self.mode = scale, ratio, hflip, mode

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
        x0, y0, w, h = box.unbind(1)
        # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1]
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = (w / width) * torch.where(flip, -1.0, 1.0)
        theta[:, 0, 2] = (2 * x0 + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * y0 + h) / height - 1
        theta = theta.to(imgs.dtype)  # drawn on the host; to a GPU without blocking it:
        theta = (theta.pin_memory() if imgs.is_cuda else theta).to(imgs.device, non_blocking=True)
        grid = F.affine_grid(theta, [n, imgs.shape[1], *self.size], align_corners=False)
        return F.grid_sample(imgs, grid, mode=self.mode, padding_mode="border", align_corners=False)


def eval_transform(img_size: int, mean: list[float], std: list[float], crop_pct: float = 1.0):
    """PIL image (already in the model's mode) -> normalised (C, H, W) float tensor: the
    shorter side resized to `img_size / crop_pct` (bicubic; an image of that size is left
    as it is), the centre `img_size` square, then the training data's mean/std."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose(
        [
            v2.Resize(round(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
            v2.CenterCrop(img_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
