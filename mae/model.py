"""The Masked Autoencoder (He et al., 2021), one method per step of the paper.

Shapes: N images, C channels, L = (H/p) * (W/p) patches, D encoder width.
`mask` is 1 on removed patches and 0 on visible ones, as in the official code.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from mae import config
from mae.config import MAEConfig
from mae.pos_embed import sincos_2d

_norm = partial(nn.LayerNorm, eps=1e-6)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    # timm's Block: F.scaled_dot_product_attention; qkv_bias=True as in the official MAE.
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_norm)
        for _ in range(depth)
    )


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder over the visible patches and a lightweight decoder over all of them."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L = cfg.num_patches
        # Encoder: timm/official names so official checkpoints and timm ViTs load.
        self.patch_embed = PatchEmbed(cfg.image_hw, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, cfg.embed_dim), requires_grad=False)
        self.blocks = _blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = _norm(cfg.embed_dim)
        # Decoder: sees encoded visible tokens plus one shared learned mask token.
        dd = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, dd), requires_grad=False)
        self.decoder_blocks = _blocks(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio)
        self.decoder_norm = _norm(dd)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size**2 * cfg.in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Fixed (not learned) 2-D sin-cos position embeddings, MAE's channel layout.
        self.pos_embed.data.copy_(sincos_2d(self.cfg.embed_dim, self.cfg.grid_size))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.cfg.decoder_embed_dim, self.cfg.grid_size))
        # The patch projection is initialised like the linear layer it is, not like a conv.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        # Tokens: normal(0.02), as the official code (timm's trunc_normal_ cut-off at 2 is moot).
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # xavier-uniform, following the official JAX ViT
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def check_images(self, imgs: torch.Tensor) -> None:
        """Raise ValueError unless imgs is (N, C, H, W) with this model's C, H and W."""
        expected = (self.cfg.in_chans, *self.cfg.image_hw)
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(imgs.shape)}"
            )

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, H, W) -> (N, L, p*p*C), pixels of a patch in (row, col, channel) order."""
        self.check_images(imgs)
        p, c = self.cfg.patch_size, self.cfg.in_chans
        n, _, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, p*p*C) -> imgs: (N, C, H, W); the exact inverse of `patchify`."""
        p, c = self.cfg.patch_size, self.cfg.in_chans
        gh, gw = self.cfg.grid_size
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of uniform noise.

        x: (N, L, D) -> x_kept: (N, int(L * (1 - mask_ratio)), D), mask: (N, L),
        ids_restore: (N, L) such that gathering [kept, removed] with it restores patch order.
        noise: (N, L); the patches with the smallest noise are kept.
        """
        n, L, d = x.shape
        len_keep = config.len_keep(L, mask_ratio)
        if noise is None:
            noise = torch.rand(n, L, device=x.device)
        elif noise.shape != (n, L):
            raise ValueError(f"noise must have shape {(n, L)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return x_kept, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: (N, C, H, W) -> latent: (N, 1 + kept, D), mask: (N, L), ids_restore: (N, L)."""
        self.check_images(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        return self._encode(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder on every patch, in order, no masking: (N, C, H, W) -> (N, 1 + L, D)."""
        self.check_images(imgs)
        return self._encode(self.patch_embed(imgs) + self.pos_embed[:, 1:, :])

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, l, D) patch tokens -> (N, 1 + l, D): cls token prepended, blocks, norm."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (N, 1 + kept, D) -> pred: (N, L, p*p*C) for every patch."""
        x = self.decoder_embed(latent)
        n, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # drop cls, append mask tokens
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # drop the cls token

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, H, W) -> what the decoder regresses: (N, L, p*p*C)."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:  # each patch normalised by its own mean and variance
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """Mean squared error per patch, averaged over removed patches only."""
        loss = (pred - self.target(imgs)) ** 2
        loss = loss.mean(dim=-1)  # (N, L)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, pred: (N, L, p*p*C), mask: (N, L))."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's part of a full MAE state dict (official or ours): decoder keys removed.

    A full checkpoint's `mask_token` sends timm's loader down another conversion path, so
    it must go too before loading into a timm ViT.
    """
    return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}


def count_parameters(cfg: MAEConfig) -> int:
    """Total parameters of the MAE for `cfg` (fixed position embeddings included),
    counted on the meta device: no memory, no initialisation cost."""
    with torch.device("meta"):
        return sum(p.numel() for p in MaskedAutoencoderViT(cfg).parameters())
