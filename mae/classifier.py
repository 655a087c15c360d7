"""Downstream models built from a pretrained MAE encoder: timm ViTs, so timm loads them too.

- `build_classifier`: full fine-tuning, global average pooling + `fc_norm`, drop path
  (the official `models_vit` recipe).
- `build_linear_probe`: frozen encoder, cls token, BatchNorm1d(affine=False) + Linear head
  (the official `main_linprobe` recipe).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from mae.config import MAEConfig
from mae.model import encoder_state_dict

log = logging.getLogger(__name__)


def _vit(cfg: MAEConfig, num_classes: int, img_size, global_pool: str, drop_path_rate: float):
    return VisionTransformer(
        img_size=img_size or cfg.image_hw,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=num_classes,
        global_pool=global_pool,  # "avg" turns `norm` into Identity and adds `fc_norm`
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path_rate,
    )


def load_encoder(vit: VisionTransformer, state: dict[str, torch.Tensor]) -> None:
    """Load an MAE (encoder or full) or classifier state dict into a timm ViT, resampling
    `pos_embed`: an official or timm checkpoint, pretrained or fine-tuned, or this
    pipeline's own.

    A classification head that does not fit this ViT's (another class count, a linear
    probe's BatchNorm + Linear) is left out with a log line, as the official fine-tuning
    code does (main_finetune.py: "Removing key head.weight from pretrained checkpoint").
    Only the head (and `fc_norm` under global pooling, whose `norm` is unused) may stay
    uninitialised; any other missing, unexpected or misshapen key raises ValueError
    naming it.
    """
    state = checkpoint_filter_fn(encoder_state_dict(state), vit)  # timm resamples pos_embed
    if isinstance(vit.fc_norm, nn.LayerNorm):  # global pooling: the encoder's norm is unused
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    own = vit.state_dict()
    other_head = [
        f"{k} {tuple(v.shape)}"
        for k, v in state.items()
        if k.startswith("head.") and (k not in own or v.shape != own[k].shape)
    ]
    if other_head:
        log.info(
            "left out of the checkpoint: %s (the head of another task; this model's has "
            "%d classes)",
            ", ".join(other_head),
            vit.num_classes,
        )
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    wrong = [
        f"{k} {tuple(v.shape)} (ViT has {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"encoder weights do not fit the ViT: {'; '.join(wrong[:3])}")
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise ValueError(
            f"encoder weights do not fit the ViT: missing {missing}, unexpected {unexpected}"
        )


def build_classifier(
    cfg: MAEConfig,
    num_classes: int,
    encoder_state: dict[str, torch.Tensor] | None = None,
    *,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float = 0.1,
) -> VisionTransformer:
    """Fine-tuning model: global average pooling + fc_norm + linear head, drop path."""
    vit = _vit(cfg, num_classes, img_size, "avg", drop_path_rate)
    if encoder_state is not None:
        load_encoder(vit, encoder_state)
    # The official fine-tuning starts the head near zero (std 2e-5).
    trunc_normal_(vit.head.weight, std=2e-5)
    nn.init.zeros_(vit.head.bias)
    return vit


def freeze_all_but_last_blocks(vit: VisionTransformer, k: int) -> list[nn.Module]:
    """Partial fine-tuning (the paper's Sec. 4.3, Figure 9): the last `k` of `vit`'s
    transformer blocks, its final norms and its head keep `requires_grad`; everything
    before them (patch embedding, cls token, position embedding, the first blocks) is
    frozen. k = 0 trains the final norm and the head alone. -> the frozen blocks (to be
    kept in eval mode: no drop path through frozen features). ValueError for k outside
    [0, depth]."""
    depth = len(vit.blocks)
    if not 0 <= k <= depth:
        raise ValueError(f"trainable blocks must be in [0, {depth}], got {k}")
    for param in vit.parameters():
        param.requires_grad_(False)
    for module in (*vit.blocks[depth - k :], vit.norm, vit.fc_norm, vit.head):
        for param in module.parameters():
            param.requires_grad_(True)
    return list(vit.blocks[: depth - k])


def build_linear_probe(
    cfg: MAEConfig,
    num_classes: int,
    encoder_state: dict[str, torch.Tensor] | None = None,
    *,
    img_size: int | tuple[int, int] | None = None,
    global_pool: str = "token",
) -> VisionTransformer:
    """Frozen encoder -> feature -> BatchNorm1d(affine=False) -> Linear; only the head trains.

    The feature is the cls token (`global_pool="token"`, the paper's probe) or the average
    of the patch tokens (`"avg"`).
    """
    vit = _vit(cfg, num_classes, img_size, global_pool, 0.0)
    if encoder_state is not None:
        load_encoder(vit, encoder_state)
    linear = nn.Linear(cfg.embed_dim, num_classes)
    # trunc_normal_ as the official code; at std 0.01 the +-2 cut-off never bites: normal(0.01).
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    # The BatchNorm without affine parameters normalises features, as in the paper's probe.
    vit.head = nn.Sequential(nn.BatchNorm1d(cfg.embed_dim, affine=False, eps=1e-6), linear)
    vit.requires_grad_(False)
    vit.head.requires_grad_(True)
    return vit


class PixelProbe(nn.Module):
    """The linear probe's head on raw pixels, the control of a linear probe: (N, C, H, W)
    normalised images -> flattened (N, C x H x W) -> BatchNorm1d(affine=False) -> Linear.
    `forward_features` / `forward_head` as timm's ViT, so the probe's code serves both."""

    def __init__(self, in_chans: int, img_size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        features = in_chans * img_size[0] * img_size[1]
        linear = nn.Linear(features, num_classes)
        trunc_normal_(linear.weight, std=0.01)  # as the probe's head (`build_linear_probe`)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(features, affine=False, eps=1e-6), linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_pixel_probe(in_chans: int, img_size: tuple[int, int], num_classes: int) -> PixelProbe:
    """The pixels control's classifier (`PixelProbe`)."""
    return PixelProbe(in_chans, img_size, num_classes)


def classifier_from_config(config: dict) -> nn.Module:
    """The classifier a saved `config` describes (its `kind`, `model`, `num_classes` and
    `global_pool`), ready for its saved weights."""
    cfg = MAEConfig.from_dict(config["model"])
    if config["kind"] == "pixels":
        return build_pixel_probe(cfg.in_chans, cfg.image_hw, config["num_classes"])
    if config["kind"] == "linprobe":
        return build_linear_probe(cfg, config["num_classes"], global_pool=config["global_pool"])
    return build_classifier(cfg, config["num_classes"], drop_path_rate=0.0)
