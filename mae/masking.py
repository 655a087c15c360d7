"""Mask sampling strategies (the paper's Sec. 4.1, Table 1f and Figure 6) as the `noise`
that `MaskedAutoencoderViT.random_masking` sorts: the patches with the smallest noise are
kept, so every strategy goes through the official model's one masking step and keeps
exactly `len_keep` patches.

- "random": uniform noise, the official per-sample random masking (the paper's default).
- "block": BEiT's block-wise masking (Bao et al., 2021, Alg. 1), drawn for the whole
  batch at once: rectangles of random area and aspect ratio (0.3 to 1/0.3) are added to
  each sample's mask while its masked count stays within the target; patches the blocks
  leave short of it are masked at random. BEiT's smallest block, 16 patches of a 14x14
  grid, would be the whole 4x4 grid of the default model: the smallest block here is the
  same share of the grid, `BLOCK_MIN_SHARE` (at least 2 patches).
- "grid": one patch of every k x k cell kept (k = 2 keeps 25 %), at an offset drawn per
  sample, the same in every cell: a regular grid. Only ratios 1 - 1/k^2 on grids that
  k x k cells tile exactly.

Every function draws from the `generator` it is given, on the CPU, for the whole batch
(no per-sample loop); -> noise (N, L), L = gh * gw, in patch order (row-major).
"""

from __future__ import annotations

import math

import torch

from mae.config import MASK_TYPES, grid_cell, len_keep

BLOCK_MIN_SHARE = 16 / 196  # BEiT's smallest block on its 14x14 grid, as a share
BLOCK_ASPECT = (0.3, 1 / 0.3)  # BEiT's range of a block's height / width
BLOCK_TRIES = 24  # candidate blocks per sample; BEiT tries until its target is met


def mask_noise(
    kind: str,
    n: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(N, L) noise for `random_masking` that makes masks of type `kind` (MASK_TYPES) on a
    patch `grid` (gh, gw) at `mask_ratio`; ValueError for an unknown kind or a ratio the
    grid type cannot make."""
    L = grid[0] * grid[1]
    if kind == "random":
        return torch.rand(n, L, generator=generator)  # the official masking, bitwise
    if kind == "block":
        masked = block_masks(n, grid, L - len_keep(L, mask_ratio), generator)
    elif kind == "grid":
        masked = grid_masks(n, grid, grid_cell(grid, mask_ratio), generator)
    else:
        raise ValueError(f"unknown mask type {kind!r}; choose one of {', '.join(MASK_TYPES)}")
    # masked patches sort after every other; ties broken at random (the block top-up)
    return masked.reshape(n, L).float() + 0.5 * torch.rand(n, L, generator=generator)


def grid_masks(n: int, grid: tuple[int, int], k: int, generator=None) -> torch.Tensor:
    """(N, gh, gw) bool, True where masked: all but one patch of every k x k cell, the kept
    one at an offset (dy, dx) drawn per sample."""
    offset = torch.randint(0, k, (n, 2), generator=generator)
    rows = torch.arange(grid[0]) % k
    cols = torch.arange(grid[1]) % k
    keep_row = rows[None, :] == offset[:, :1]  # (N, gh)
    keep_col = cols[None, :] == offset[:, 1:]  # (N, gw)
    return ~(keep_row[:, :, None] & keep_col[:, None, :])


def block_masks(n: int, grid: tuple[int, int], target: int, generator=None) -> torch.Tensor:
    """(N, gh, gw) bool, True where masked: a union of random rectangles per sample, each
    added only while the sample's masked count stays at most `target` (BEiT's rule),
    drawn as BLOCK_TRIES candidates per sample for the batch at once."""
    gh, gw = grid
    L = gh * gw
    low = max(2, round(BLOCK_MIN_SHARE * L))
    high = max(low, target)
    shape = (n, BLOCK_TRIES)
    area = low + torch.rand(shape, generator=generator) * (high - low)
    log_aspect = torch.empty(shape).uniform_(*map(math.log, BLOCK_ASPECT), generator=generator)
    aspect = log_aspect.exp()
    h = (area * aspect).sqrt().round().clamp(1, gh).long()
    w = (area / aspect).sqrt().round().clamp(1, gw).long()
    top = (torch.rand(shape, generator=generator) * (gh - h + 1)).long()
    left = (torch.rand(shape, generator=generator) * (gw - w + 1)).long()
    ys, xs = torch.arange(gh)[None, None, :], torch.arange(gw)[None, None, :]
    in_rows = (ys >= top[..., None]) & (ys < (top + h)[..., None])  # (N, T, gh)
    in_cols = (xs >= left[..., None]) & (xs < (left + w)[..., None])  # (N, T, gw)
    blocks = in_rows[..., :, None] & in_cols[..., None, :]  # (N, T, gh, gw)
    masked = torch.zeros(n, gh, gw, dtype=torch.bool)
    for t in range(BLOCK_TRIES):  # over candidates, not samples: each step is batched
        grown = masked | blocks[:, t]
        fits = grown.flatten(1).sum(1) <= target
        masked = torch.where(fits[:, None, None], grown, masked)
    return masked
