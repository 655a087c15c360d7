"""The lr rule, schedule and parameter groups of the MAE recipe."""

import itertools
import math

import pytest
import torch

from mae import build_classifier, build_linear_probe, create_mae, mae_config
from mae.optim import (
    absolute_lr,
    build_adamw,
    build_lars,
    finetune_param_groups,
    lr_at,
    pretrain_param_groups,
    set_lr,
)

SCHEDULE = dict(lr=1e-3, epochs=10, warmup_epochs=2, min_lr=1e-5)


def test_absolute_lr_is_blr_times_effective_batch_over_256():
    assert absolute_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # the paper's pretraining
    assert absolute_lr(1e-3, 256) == pytest.approx(1e-3)


def test_lr_schedule_end_points():
    assert lr_at(0.0, **SCHEDULE) == 0.0
    assert lr_at(1.0, **SCHEDULE) == pytest.approx(5e-4)  # linear warm-up
    assert lr_at(2.0, **SCHEDULE) == pytest.approx(1e-3)  # peak at the end of warm-up
    assert lr_at(6.0, **SCHEDULE) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way down the cosine
    assert lr_at(10.0, **SCHEDULE) == pytest.approx(1e-5)  # min_lr at the end
    assert lr_at(12.0, **SCHEDULE) == pytest.approx(1e-5)


def test_lr_schedule_is_monotone_after_warmup_and_works_without_warmup():
    values = [lr_at(2 + i * 0.5, **SCHEDULE) for i in range(17)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_at(0.0, lr=1.0, epochs=4, warmup_epochs=0) == 1.0


def test_set_lr_applies_each_groups_lr_scale():
    clf = build_classifier(mae_config("mae_vit_test"), 10)
    opt = build_adamw(finetune_param_groups(clf, 0.05, layer_decay=0.5), lr=1.0)
    set_lr(opt, 0.1)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(0.1 * group["lr_scale"])


def test_layer_decay_scales_stem_to_head():
    """Depth-2 encoder: stem decay**3, block i decay**(2 - i), head 1 (official lrd)."""
    clf = build_classifier(mae_config("mae_vit_test"), 10)
    groups = finetune_param_groups(clf, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(clf.patch_embed.proj.weight)] == pytest.approx(0.5**3)
    assert scale[id(clf.cls_token)] == pytest.approx(0.5**3)
    assert scale[id(clf.blocks[0].mlp.fc1.weight)] == pytest.approx(0.5**2)
    assert scale[id(clf.blocks[1].mlp.fc1.weight)] == pytest.approx(0.5)
    assert scale[id(clf.head.weight)] == pytest.approx(1.0)
    assert decay[id(clf.head.weight)] == 0.05
    for p in (clf.head.bias, clf.pos_embed, clf.cls_token, clf.fc_norm.weight):
        assert decay[id(p)] == 0.0


def test_pretrain_groups_exempt_biases_and_norms_from_weight_decay():
    model = create_mae("mae_vit_test")
    groups = {g["weight_decay"]: g["params"] for g in pretrain_param_groups(model, 0.05)}
    decayed, exempt = groups[0.05], groups[0.0]
    assert all(p.ndim > 1 for p in decayed) and all(p.ndim <= 1 for p in exempt)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decayed) + len(exempt) == n_trainable


def test_lars_updates_only_the_probe_head_with_trust_ratio_on_weights():
    probe = build_linear_probe(mae_config("mae_vit_test"), 10)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    opt = build_lars(probe, lr=0.1)
    weights, biases = opt.param_groups
    assert weights["always_adapt"] and not biases["always_adapt"]
    assert weights["params"] == [probe.head[1].weight] and biases["params"] == [probe.head[1].bias]
    probe.train()
    loss = torch.nn.functional.cross_entropy(probe(torch.randn(8, 1, 16, 16)), torch.arange(8) % 10)
    loss.backward()
    opt.step()
    changed = {k for k, v in probe.state_dict().items() if not torch.equal(v, before[k])}
    # BatchNorm running statistics move in train mode; nothing of the encoder does
    assert changed == {
        "head.1.weight",
        "head.1.bias",
        "head.0.running_mean",
        "head.0.running_var",
        "head.0.num_batches_tracked",
    }
    # the trust ratio bounds the weight step to ~lr * 0.001 * ||w||
    step = (probe.head[1].weight - before["head.1.weight"]).norm()
    assert step <= 0.1 * 0.001 * before["head.1.weight"].norm() * 1.01
    assert math.isfinite(loss.item())
