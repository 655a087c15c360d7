"""Invariants of the MAE model, each checked against the paper's definition."""

import re

import numpy as np
import pytest
import torch

from mae import MaskedAutoencoderViT, create_mae, len_keep, mae_config
from mae.pos_embed import sincos_2d


def tiny(**overrides) -> MaskedAutoencoderViT:
    return create_mae("mae_vit_test", **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"in_chans": 3},
        {"img_size": (12, 20), "patch_size": 4},
        {"img_size": 24, "patch_size": 8},
    ],
)
def test_patchify_unpatchify_round_trip_is_exact(overrides):
    model = tiny(**overrides)
    imgs = torch.randn(3, model.cfg.in_chans, *model.cfg.image_hw)
    patches = model.patchify(imgs)
    assert patches.shape == (3, model.cfg.num_patches, model.cfg.patch_size**2 * model.cfg.in_chans)
    assert torch.equal(model.unpatchify(patches), imgs)


def test_patchify_orders_pixels_like_the_official_code():
    """Patch (i, j) is row i*gw + j; inside it, pixel (r, c, ch) sits at (r*p + c)*C + ch."""
    model = tiny(in_chans=3, img_size=(8, 12), patch_size=4)
    imgs = torch.randn(1, 3, 8, 12)
    patches = model.patchify(imgs)
    p, gw = 4, 3
    for i, j, r, c, ch in [(0, 0, 0, 0, 0), (1, 2, 3, 1, 2), (0, 1, 2, 3, 1)]:
        assert patches[0, i * gw + j, (r * p + c) * 3 + ch] == imgs[0, ch, i * p + r, j * p + c]


def test_random_masking_keeps_exactly_int_L_times_one_minus_ratio():
    model = tiny()
    L, D = model.cfg.num_patches, 5
    x = torch.randn(4, L, D)
    for ratio in (0.0, 0.5, 0.75, 0.9):
        kept, mask, _ids_restore = model.random_masking(x, ratio)
        n_keep = int(L * (1 - ratio))
        assert kept.shape == (4, n_keep, D)
        assert torch.equal(mask.sum(1), torch.full((4,), float(L - n_keep)))
        # the kept tokens are exactly the patches the mask marks visible, in shuffled order
        for b in range(4):
            visible = x[b, mask[b] == 0]
            assert sorted(map(tuple, kept[b].tolist())) == sorted(map(tuple, visible.tolist()))


def test_ids_restore_inverts_the_shuffle():
    model = tiny()
    L = model.cfg.num_patches
    x = torch.arange(2 * L, dtype=torch.float).reshape(2, L, 1)
    noise = torch.rand(2, L)
    ids_shuffle = torch.argsort(noise, dim=1)
    _, _, ids_restore = model.random_masking(x, 0.75, noise)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1)), x)


def test_same_noise_gives_the_same_mask_and_smallest_noise_is_kept():
    model = tiny()
    imgs = torch.randn(2, 1, 16, 16)
    noise = torch.rand(2, model.cfg.num_patches)
    _, _, mask_a = model(imgs, 0.75, noise)
    _, _, mask_b = model(imgs, 0.75, noise.clone())
    assert torch.equal(mask_a, mask_b)
    _, _, mask_c = model(imgs, 0.75, torch.rand(2, model.cfg.num_patches))
    assert not torch.equal(mask_a, mask_c)
    keep = len_keep(model.cfg.num_patches, 0.75)
    smallest = torch.argsort(noise, dim=1)[:, :keep]
    assert torch.all(torch.gather(mask_a, 1, smallest) == 0)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_counts_masked_patches_only(norm_pix_loss):
    model = tiny(norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 1, 16, 16)
    _, _, mask = model(imgs, 0.75)
    target = model.target(imgs)
    pred = target.clone()
    pred[mask == 0] += 10.0  # wrong everywhere visible: must not count
    assert model.forward_loss(imgs, pred, mask).item() == 0.0
    pred[mask == 1] += 1.0  # off by one on every masked pixel: loss is exactly 1
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(1.0)


def test_norm_pix_target_is_each_patch_normalised_by_its_own_mean_and_variance():
    model = tiny(norm_pix_loss=True)
    imgs = torch.rand(2, 1, 16, 16)
    patches = model.patchify(imgs)
    expected = (patches - patches.mean(-1, keepdim=True)) / (
        patches.var(-1, keepdim=True) + 1e-6
    ) ** 0.5
    assert torch.allclose(model.target(imgs), expected)


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny()
    loss, _, _ = model(torch.randn(2, 1, 16, 16), 0.75)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name in ("pos_embed", "decoder_pos_embed")


def test_fixed_batch_loss_halves_within_a_few_dozen_steps():
    model = tiny()
    imgs = torch.rand(8, 1, 16, 16)
    noise = torch.rand(8, model.cfg.num_patches)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    first = None
    for _ in range(40):
        loss, _, _ = model(imgs, 0.75, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first / 2


@pytest.mark.parametrize(
    "overrides",
    [{"in_chans": 3}, {"img_size": (16, 32), "in_chans": 2}, {"img_size": 28, "patch_size": 7}],
)
def test_any_channel_count_and_image_shape(overrides):
    model = tiny(**overrides)
    cfg = model.cfg
    loss, pred, mask = model(torch.randn(2, cfg.in_chans, *cfg.image_hw), 0.6)
    assert pred.shape == (2, cfg.num_patches, cfg.patch_size**2 * cfg.in_chans)
    assert mask.shape == (2, cfg.num_patches) and torch.isfinite(loss)


@pytest.mark.parametrize(
    ("overrides", "ratio", "message"),
    [
        ({"img_size": 18}, 0.75, "patch_size 4 does not divide img_size 18"),
        ({}, 1.0, "mask_ratio must be in [0, 1), got 1.0"),
        ({}, -0.1, "mask_ratio must be in [0, 1)"),
        ({}, 0.99, "mask_ratio 0.99 leaves no visible patch out of 16"),
        ({"embed_dim": 33}, 0.75, "embed_dim 33 is not divisible by num_heads 2"),
    ],
)
def test_bad_combinations_raise_a_value_error_naming_the_value(overrides, ratio, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(**overrides)(torch.randn(1, 1, 16, 16), ratio)


def test_wrong_image_or_noise_shape_is_a_value_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 16, 16\)"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(1, 1, 16, 16), 0.75, torch.rand(1, 5))


def test_unknown_preset_or_key_is_named():
    with pytest.raises(ValueError, match="unknown model 'mae_vit_giant'"):
        mae_config("mae_vit_giant")
    with pytest.raises(ValueError, match=r"unknown model config key\(s\): depht"):
        mae_config("mae_vit_test", depht=3)


def _official_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py, transcribed as reference."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)
    )
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_position_embedding_matches_the_official_layout():
    ours = sincos_2d(64, (7, 7))[0].numpy()
    np.testing.assert_allclose(ours, _official_sincos(64, 7), atol=1e-6)


def test_position_embeddings_are_fixed_sincos():
    model = tiny()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed, sincos_2d(32, (4, 4)))
    assert torch.equal(model.decoder_pos_embed, sincos_2d(16, (4, 4)))


def test_initialisation_follows_the_official_code():
    model = create_mae("mae_vit_mini_patch4_28")
    cfg = model.cfg
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert m.eps == 1e-6 and torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, torch.nn.Linear):
            fan_out, fan_in = m.weight.shape
            assert m.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5
            assert torch.all(m.bias == 0)
    w = model.patch_embed.proj.weight
    bound = (6 / (cfg.embed_dim + cfg.in_chans * cfg.patch_size**2)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # xavier as a linear
    for token in (model.cls_token, model.mask_token):
        assert 0.015 < token.std().item() < 0.025
