"""Fixed 2-D sin-cos position embeddings in MAE's channel layout.

The official MAE code fills the first half of the channels from the patch's column index
and the second half from its row index, each half as [sin | cos]. timm's
`build_sincos2d_pos_embed` orders the channels differently, so official checkpoints only
match this layout.
"""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) positions -> (M, embed_dim) as [sin(pos * w) | cos(pos * w)]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for sin-cos embeddings, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """(1, [1 +] gh * gw, embed_dim) float32 embedding for a gh x gw patch grid.

    Patches are numbered row-major, as `PatchEmbed` flattens them. The cls token, if any,
    gets the all-zero embedding.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos, got {embed_dim}")
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # Official order: the first half encodes the column (w), the second the row (h).
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
