"""The analytic FLOP count of a training step equals PyTorch's own count of the matmuls."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mae import mae_config
from mae.baseline import MaskTokensInEncoderMAE
from mae.flops import mae_step_flops
from mae.model import MaskedAutoencoderViT


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_analytic_step_flops_match_the_flop_counter(baseline, mask_ratio):
    cfg = mae_config("mae_vit_test")
    model = (MaskTokensInEncoderMAE if baseline else MaskedAutoencoderViT)(cfg)
    for block in [*model.blocks, *model.decoder_blocks]:  # explicit matmuls the counter sees
        block.attn.fused_attn = False  # (its CPU flash-attention kernel has no FLOP formula)
    imgs = torch.randn(3, cfg.in_chans, *cfg.image_hw)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model(imgs, mask_ratio)
        loss.backward()
    assert counter.get_total_flops() == mae_step_flops(cfg, 3, mask_ratio, baseline)


def test_the_encoder_on_visible_patches_only_is_most_of_the_saving():
    cfg = mae_config("mae_vit_large_patch16")
    ratio = mae_step_flops(cfg, 1, 0.75, True) / mae_step_flops(cfg, 1, 0.75)
    assert 3.0 < ratio < 4.0  # the paper times 3.5x for ViT-L (w/ [M] vs MAE, Table 2)


def test_the_baseline_learns_the_same_task_with_every_parameter_trained():
    cfg = mae_config("mae_vit_test")
    model = MaskTokensInEncoderMAE(cfg)
    loss, pred, mask = model(torch.randn(2, 1, 16, 16), 0.75)
    loss.backward()
    assert pred.shape == (2, cfg.num_patches, 16) and mask.sum() == 2 * 12
    assert model.encoder_mask_token.grad is not None and model.blocks[0].attn.qkv.weight.grad.any()
