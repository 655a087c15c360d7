"""Mask sampling (the paper's Table 1f, Figure 6) through `random_masking`'s noise: each
type keeps exactly `len_keep` patches and has its defining shape; random is the official
masking bitwise; grid refuses what its cells cannot tile."""

import pytest
import torch

from mae import create_mae
from mae.config import grid_cell, len_keep
from mae.masking import block_masks, mask_noise


def _masks(kind: str, n: int, grid: tuple[int, int], ratio: float, seed: int = 0):
    """-> (N, gh, gw) bool masks as `random_masking` makes them from the noise."""
    g = torch.Generator().manual_seed(seed)
    noise = mask_noise(kind, n, grid, ratio, g)
    model = create_mae("mae_vit_test")
    L = grid[0] * grid[1]
    x = torch.zeros(n, L, 4)
    _, mask, _ = model.random_masking(x, ratio, noise)
    return mask.bool().reshape(n, *grid)


def _components(mask: torch.Tensor) -> int:
    """4-connected components of True in one (gh, gw) mask."""
    seen, count = set(), 0
    cells = {(int(y), int(x)) for y, x in mask.nonzero()}
    for start in cells:
        if start in seen:
            continue
        count, todo = count + 1, [start]
        while todo:
            y, x = todo.pop()
            if (y, x) in seen or (y, x) not in cells:
                continue
            seen.add((y, x))
            todo += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return count


@pytest.mark.parametrize("kind, ratio", [("random", 0.75), ("block", 0.5), ("block", 0.75),
                                         ("grid", 0.75)])  # fmt: skip
@pytest.mark.parametrize("grid", [(4, 4), (14, 14)])
def test_every_type_masks_exactly_the_ratio(kind, ratio, grid):
    masks = _masks(kind, 64, grid, ratio)
    L = grid[0] * grid[1]
    assert (masks.flatten(1).sum(1) == L - len_keep(L, ratio)).all()


def test_random_is_the_official_uniform_noise_bitwise():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(mask_noise("random", 8, (4, 4), 0.75, g1), torch.rand(8, 16, generator=g2))


def test_grid_keeps_one_patch_of_every_cell_at_one_offset_per_sample():
    masks = _masks("grid", 32, (14, 14), 0.75)
    kept = ~masks
    for sample in kept:
        ys, xs = sample.nonzero(as_tuple=True)
        assert len(set((ys % 2).tolist())) == 1 and len(set((xs % 2).tolist())) == 1
        cells = sample.reshape(7, 2, 7, 2).sum((1, 3))
        assert (cells == 1).all()  # one kept patch in every 2x2 cell
    offsets = {(int(s.nonzero()[0, 0]) % 2, int(s.nonzero()[0, 1]) % 2) for s in kept}
    assert len(offsets) > 1  # drawn per sample


def test_blocks_are_contiguous_where_random_masks_are_scattered():
    """On the 14x14 grid at 50 %, block masks form a few large rectangles' union; random
    masking scatters ~100 patches into many small pieces."""
    blocks = [_components(m) for m in _masks("block", 32, (14, 14), 0.5)]
    scattered = [_components(m) for m in _masks("random", 32, (14, 14), 0.5)]
    assert sum(blocks) / len(blocks) < 4 < sum(scattered) / len(scattered)
    raw = block_masks(32, (14, 14), 98, torch.Generator().manual_seed(0))
    assert (raw.flatten(1).sum(1) <= 98).all()  # BEiT's rule: blocks never overshoot


def test_block_masks_are_drawn_for_the_batch_from_the_generator():
    a = mask_noise("block", 16, (4, 4), 0.75, torch.Generator().manual_seed(1))
    b = mask_noise("block", 16, (4, 4), 0.75, torch.Generator().manual_seed(1))
    c = mask_noise("block", 16, (4, 4), 0.75, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "grid, ratio, why",
    [((4, 4), 0.5, "1 - 1/k"), ((7, 7), 0.75, "do not tile the 7x7"), ((4, 4), 0.9, "1 - 1/k")],
)
def test_grid_refuses_ratios_and_grids_its_cells_cannot_tile(grid, ratio, why):
    with pytest.raises(ValueError, match=why):
        grid_cell(grid, ratio)
    assert grid_cell((4, 4), 0.75) == 2 and grid_cell((12, 12), 1 - 1 / 9) == 3
