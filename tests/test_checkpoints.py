"""Official parameter counts and checkpoint compatibility with timm."""

import pytest
import timm
import torch

from mae import (
    build_classifier,
    build_linear_probe,
    count_parameters,
    create_mae,
    encoder_state_dict,
    mae_config,
)


@pytest.mark.parametrize(
    ("name", "total"),
    [
        ("mae_vit_base_patch16", 111_907_840),
        ("mae_vit_large_patch16", 329_541_888),
        ("mae_vit_huge_patch14", 657_074_508),
    ],
)
def test_official_parameter_counts(name, total):
    assert count_parameters(mae_config(name)) == total


def test_base_encoder_loads_strictly_into_timm_vit_base_and_gives_the_same_features():
    mae = create_mae("mae_vit_base_patch16").eval()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    vit.load_state_dict(encoder_state_dict(mae.state_dict()), strict=True)
    imgs = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = mae.forward_features(imgs), vit.forward_features(imgs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_encoder_state_dict_uses_official_names():
    keys = set(create_mae("mae_vit_test").state_dict())
    for key in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.1.attn.qkv.bias",
        "norm.weight",
        "mask_token",
        "decoder_embed.weight",
        "decoder_pos_embed",
        "decoder_blocks.0.mlp.fc2.weight",
        "decoder_norm.bias",
        "decoder_pred.weight",
    ):
        assert key in keys, key
    enc = encoder_state_dict(create_mae("mae_vit_test").state_dict())
    assert not any(k.startswith(("decoder_", "mask_token")) for k in enc)


def test_full_state_dict_round_trips_strictly():
    a, b = create_mae("mae_vit_test"), create_mae("mae_vit_test")
    b.load_state_dict(a.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 1, 16, 16), torch.rand(2, 16)
    assert torch.equal(a(imgs, 0.75, noise)[0], b(imgs, 0.75, noise)[0])


def test_classifier_is_a_timm_vit_with_the_encoder_weights_and_a_near_zero_head():
    mae = create_mae("mae_vit_test")
    clf = build_classifier(mae.cfg, 10, mae.state_dict(), drop_path_rate=0.2)
    assert isinstance(clf, timm.models.vision_transformer.VisionTransformer)
    assert clf.global_pool == "avg" and isinstance(clf.fc_norm, torch.nn.LayerNorm)
    assert isinstance(clf.norm, torch.nn.Identity)
    assert torch.equal(clf.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    assert torch.equal(clf.pos_embed, mae.pos_embed)
    assert clf.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert clf.head.weight.abs().max() < 1e-4 and torch.all(clf.head.bias == 0)
    assert clf(torch.randn(3, 1, 16, 16)).shape == (3, 10)


def test_classifier_interpolates_position_embeddings_for_another_image_size():
    mae = create_mae("mae_vit_test")
    clf = build_classifier(mae.cfg, 10, mae.state_dict(), img_size=24)
    assert clf.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(clf.pos_embed[:, :1], mae.pos_embed[:, :1])  # cls position kept as is
    assert clf(torch.randn(2, 1, 24, 24)).shape == (2, 10)


def test_classifier_rejects_weights_of_another_shape_naming_the_key():
    other = create_mae("mae_vit_test", embed_dim=48)
    with pytest.raises(ValueError, match=r"cls_token \(1, 1, 48\) \(ViT has \(1, 1, 32\)\)"):
        build_classifier(mae_config("mae_vit_test"), 10, other.state_dict())
    state = create_mae("mae_vit_test").state_dict()
    del state["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing \['blocks.0.attn.qkv.weight'\]"):
        build_classifier(mae_config("mae_vit_test"), 10, state)


def test_linear_probe_is_frozen_encoder_cls_token_batchnorm_and_linear():
    mae = create_mae("mae_vit_test").eval()
    probe = build_linear_probe(mae.cfg, 10, mae.state_dict()).eval()
    bn, linear = probe.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert 0.005 < linear.weight.std().item() < 0.015
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    imgs = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        feats = probe.forward_head(probe.forward_features(imgs), pre_logits=True)
        torch.testing.assert_close(feats, mae.forward_features(imgs)[:, 0])
    assert probe(imgs).shape == (4, 10)


def _same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Every weight of `a` but its head is `b`'s (a linear probe's `norm` goes unused)."""
    sa, sb = a.state_dict(), b.state_dict()
    shared = [k for k in sa if not k.startswith("head.") and k in sb]
    return len(shared) > 20 and all(torch.equal(sa[k], sb[k]) for k in shared)


def test_a_fine_tuned_checkpoint_with_another_head_starts_a_fine_tune_as_officially(caplog):
    """main_finetune.py removes a head whose shape differs and loads the rest."""
    cfg = mae_config("mae_vit_test")
    imagenet = build_classifier(cfg, 1000)
    with caplog.at_level("INFO", logger="mae.classifier"):
        clf = build_classifier(cfg, 10, encoder_state=imagenet.state_dict())
    assert clf.head.weight.shape == (10, 32) and _same_encoder(imagenet, clf)
    assert "head.weight (1000, 32), head.bias (1000,)" in caplog.text
    assert "this model's has 10 classes" in caplog.text


def test_every_checkpoint_users_bring_loads_and_only_its_head_is_left_out(caplog):
    cfg = mae_config("mae_vit_test")
    probe = build_linear_probe(cfg, 7, global_pool="avg")  # this pipeline's: BatchNorm + Linear
    timm_vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=4,
        in_chans=1, embed_dim=32, depth=2, num_heads=2, global_pool="avg", fc_norm=True,
    )  # fmt: skip
    brought = [(probe, True), (timm_vit, True), (build_classifier(cfg, 10), False)]
    for model, other_head in brought:
        caplog.clear()
        with caplog.at_level("INFO", logger="mae.classifier"):
            clf = build_classifier(cfg, 10, encoder_state=model.state_dict())
        assert _same_encoder(model, clf)
        assert ("left out of the checkpoint: head." in caplog.text) == other_head
    mismatched = build_classifier(cfg, 10).state_dict()
    mismatched["blocks.1.mlp.fc1.weight"] = torch.zeros(64, 16)  # anything but the head
    with pytest.raises(ValueError, match=r"blocks.1.mlp.fc1.weight \(64, 16\)"):
        build_classifier(cfg, 10, encoder_state=mismatched)
