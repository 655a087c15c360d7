"""Batched RandomResizedCrop + flip: the same distribution of crops as torchvision's,
resampled as PIL resamples."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mae.augment import RandomResizedCropFlip
from mae.resample import crop_resize


def test_full_crop_without_flip_is_the_identity():
    x = torch.rand(4, 3, 12, 12)
    aug = RandomResizedCropFlip(12, scale=(1, 1), ratio=(1, 1), hflip=False)
    torch.testing.assert_close(aug(x), x, atol=1e-5, rtol=0)


def test_flip_mirrors_the_columns():
    x = torch.rand(64, 1, 8, 8)
    aug = RandomResizedCropFlip(8, scale=(1, 1), ratio=(1, 1))
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


def test_crop_resize_is_pils_antialiased_bicubic_for_any_box():
    """The one resampling rule (`mae.resample`) against its reference: PIL's resize with a
    fractional box, shrinking and enlarging; for the whole image, torch's antialiased
    interpolate exactly."""
    from PIL import Image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 48), dtype=np.uint8)
    x = torch.from_numpy(a).float()[None, None]
    for box, size in [((3.3, 7.9, 30.2, 41.7), 16), ((10.5, 2.25, 6.0, 9.5), 24)]:
        x0, y0, w, h = box
        pil = Image.fromarray(a).resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
        ours = crop_resize(x, torch.tensor([box]), (size, size))[0, 0].clamp(0, 255)
        assert (ours - torch.from_numpy(np.array(pil)).float()).abs().max() < 1.0, box
    whole = crop_resize(x, torch.tensor([[0.0, 0.0, 48.0, 64.0]]), (16, 12))
    ref = F.interpolate(x, size=(16, 12), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-3)


def test_a_shrinking_crop_averages_instead_of_aliasing():
    """Noise shrunk 4x keeps a quarter of its std (averaging 16 pixels), not all of it."""
    x = torch.rand(8, 1, 64, 64)
    aug = RandomResizedCropFlip(16, scale=(1, 1), ratio=(1, 1), hflip=False)
    assert aug(x).std() < 0.5 * x.std()
