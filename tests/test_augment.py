"""Batched RandomResizedCrop + flip: the same distribution of crops as torchvision's."""

import pytest
import torch

from mae.augment import RandomResizedCropFlip


def test_full_crop_without_flip_is_the_identity():
    x = torch.rand(4, 3, 12, 12)
    aug = RandomResizedCropFlip(12, scale=(1, 1), ratio=(1, 1), hflip=False, mode="bilinear")
    torch.testing.assert_close(aug(x), x, atol=1e-5, rtol=0)


def test_flip_mirrors_the_columns():
    x = torch.rand(64, 1, 8, 8)
    aug = RandomResizedCropFlip(8, scale=(1, 1), ratio=(1, 1), mode="bilinear")
    _, flip = aug.boxes(64, 8, 8, torch.Generator().manual_seed(0))
    y = aug(x, torch.Generator().manual_seed(0))
    assert 10 < flip.sum() < 54
    torch.testing.assert_close(y[flip], x[flip].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[~flip], x[~flip], atol=1e-5, rtol=0)


def test_crops_lie_inside_the_image_with_area_in_scale():
    aug = RandomResizedCropFlip(16, scale=(0.2, 1.0))
    box, _ = aug.boxes(10_000, 28, 28, torch.Generator().manual_seed(1))
    x0, y0, w, h = box.unbind(1)
    assert torch.all(x0 >= 0) and torch.all(y0 >= 0)
    assert torch.all(x0 + w <= 28 + 1e-9) and torch.all(y0 + h <= 28 + 1e-9)
    area = w * h / (28 * 28)
    assert area.min() >= 0.2 * 0.74 and area.max() <= 1.0 + 1e-9  # clamping only shrinks
    assert area.mean().item() == pytest.approx(0.6, abs=0.03)


def test_the_same_generator_gives_the_same_batch_and_output_size():
    x = torch.rand(5, 1, 28, 28)
    aug = RandomResizedCropFlip(20)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert a.shape == (5, 1, 20, 20) and torch.equal(a, b)
