"""Reconstruction grids: original | masked | reconstruction | reconstruction + visible."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.utils import make_grid

from mae.model import MaskedAutoencoderViT


@torch.no_grad()
def reconstruction_grid(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: int = 1,
) -> torch.Tensor:
    """One row per image, four panels: -> uint8 tensor (C, H, W).

    imgs: (N, C, H, W) as the model saw them (normalised with `mean`/`std` if given);
    pred: (N, L, p*p*C) and mask: (N, L) from `model(imgs)`. With `norm_pix_loss` the
    prediction is in per-patch normalised units: it is mapped back with each target patch's
    own mean and variance (the usual way to show such models; it borrows those two numbers).
    Removed patches show as mid-grey in the masked panel. `scale` enlarges every pixel
    (nearest neighbour), so 28 x 28 images stay legible.
    """
    imgs, pred, mask = imgs.float().cpu(), pred.float().cpu(), mask.float().cpu()
    if model.cfg.norm_pix_loss:
        patches = model.patchify(imgs)
        mu, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    recon = model.unpatchify(pred)
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand_as(pred))  # 1 on removed pixels

    c = imgs.shape[1]
    m = torch.tensor(mean if mean is not None else [0.0] * c).view(1, c, 1, 1)
    s = torch.tensor(std if std is not None else [1.0] * c).view(1, c, 1, 1)

    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return (x * s + m).clamp(0, 1)

    original, recon = to_pixels(imgs), to_pixels(recon)
    masked = original * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = original * (1 - pixel_mask) + recon * pixel_mask
    panels = torch.stack([original, masked, recon, pasted], dim=1).flatten(0, 1)
    if scale > 1:
        panels = panels.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    grid = make_grid(panels, nrow=4, padding=2, pad_value=1.0)
    if c == 1:
        grid = grid[:1]  # make_grid repeats one channel to three
    return (grid * 255).round().to(torch.uint8)


def to_png(grid: torch.Tensor) -> bytes:
    """uint8 (C, H, W) with C in {1, 3} -> PNG file bytes (in memory)."""
    array = grid.permute(1, 2, 0).squeeze(-1).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
