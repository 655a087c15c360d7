"""Training FLOPs of an MAE step, counted analytically from the config.

Matrix multiplications only (they are >99% of the work): the patch projection, per block
the qkv and output projections (4 D^2 per token), the MLP (2 r D^2 per token) and the
attention scores and weighted sum (2 T D per token for T tokens), the decoder's input
projection and the pixel prediction. Norms, softmax, GELU, the loss and the optimizer are
left out. A multiply-add is 2 FLOPs; backward costs twice the forward, except the patch
projection, which needs no gradient for the input images (once, not twice).
`tests/test_flops.py` checks the count against PyTorch's FlopCounterMode.
"""

from __future__ import annotations

from mae.config import MAEConfig, len_keep


def vit_flops(tokens: int, dim: int, depth: int, mlp_ratio: float) -> int:
    """Forward FLOPs of `depth` transformer blocks over `tokens` tokens of width `dim`."""
    hidden = int(dim * mlp_ratio)
    linear = tokens * (4 * dim * dim + 2 * dim * hidden)
    attention = 2 * tokens * tokens * dim
    return 2 * depth * (linear + attention)


def mae_step_flops(
    cfg: MAEConfig, batch: int, mask_ratio: float, mask_tokens_in_encoder: bool = False
) -> int:
    """FLOPs of one training step (forward + backward) on `batch` images.

    `mask_tokens_in_encoder`: the paper's baseline, whose encoder sees all L patches
    (masked ones as a mask token) instead of the visible ones only.
    """
    L, pixels = cfg.num_patches, cfg.patch_size**2 * cfg.in_chans
    seen = L if mask_tokens_in_encoder else len_keep(L, mask_ratio)
    patch_embed = 2 * L * pixels * cfg.embed_dim
    encoder = vit_flops(seen + 1, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    decoder_embed = 2 * (seen + 1) * cfg.embed_dim * cfg.decoder_embed_dim
    decoder = vit_flops(L + 1, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.mlp_ratio)
    prediction = 2 * (L + 1) * cfg.decoder_embed_dim * pixels
    forward = patch_embed + encoder + decoder_embed + decoder + prediction
    return batch * (3 * forward - patch_embed)
