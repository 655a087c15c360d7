"""The paper's ablation baseline for the asymmetric design (Table 1c, "encoder w/ [M]"):
kept apart from model.py, which stays diffable against the official models_mae.py."""

import torch
from torch import nn

from mae.config import MAEConfig
from mae.model import MaskedAutoencoderViT


class MaskTokensInEncoderMAE(MaskedAutoencoderViT):
    """The paper's baseline (Table 1c, "encoder w/ [M]"): the encoder sees all L patches,
    the removed ones replaced by a learned mask token; the decoder is unchanged. It learns
    the same task at a far higher cost: `mae-cli bench step` times the two."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__(cfg)
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.normal_(self.encoder_mask_token, std=0.02)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs: (N, C, H, W) -> latent: (N, 1 + L, D) over every patch, mask, ids_restore."""
        self.check_images(imgs)
        x = self.patch_embed(imgs)
        _, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        x = torch.where(mask.bool().unsqueeze(-1), self.encoder_mask_token.to(x.dtype), x)
        return self._encode(x + self.pos_embed[:, 1:, :]), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (N, 1 + L, D), already in patch order -> pred: (N, L, p*p*C)."""
        x = self.decoder_embed(latent) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
