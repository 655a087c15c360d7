import io

import numpy as np
import torch
from PIL import Image

from mae import create_mae
from mae.visualize import reconstruction_grid, to_png


def _grid(model, imgs, mean, std):
    with torch.no_grad():
        _, pred, mask = model(imgs, 0.75)
    return reconstruction_grid(model, imgs, pred, mask, mean, std), mask


def test_grid_has_four_panels_per_image_and_shows_the_mask():
    model = create_mae("mae_vit_test")
    pixels = torch.rand(3, 1, 16, 16)
    mean, std = [0.3], [0.2]
    grid, mask = _grid(model, (pixels - 0.3) / 0.2, mean, std)
    assert grid.dtype == torch.uint8 and grid.shape == (1, 3 * 18 + 2, 4 * 18 + 2)

    def panel(row, col):
        y, x = 2 + row * 18, 2 + col * 18
        return grid[0, y : y + 16, x : x + 16].float() / 255

    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 16))[:, 0]
    for row in range(3):
        original = pixels[row, 0]
        assert torch.allclose(panel(row, 0), original, atol=1 / 255)
        masked = panel(row, 1)
        assert torch.allclose(masked[pixel_mask[row] == 1], torch.tensor(128 / 255), atol=1e-6)
        assert torch.allclose(
            masked[pixel_mask[row] == 0], original[pixel_mask[row] == 0], atol=1 / 255
        )
        pasted = panel(row, 3)  # visible patches pasted back: equal to the original there
        assert torch.allclose(
            pasted[pixel_mask[row] == 0], original[pixel_mask[row] == 0], atol=1 / 255
        )


def test_rgb_and_norm_pix_models_render_and_encode_as_png():
    model = create_mae("mae_vit_test", in_chans=3, norm_pix_loss=True)
    grid, _ = _grid(model, torch.randn(2, 3, 16, 16), [0.5] * 3, [0.25] * 3)
    assert grid.shape[0] == 3
    png = to_png(grid)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (4 * 18 + 2, 2 * 18 + 2)
    assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), grid)


def test_scale_enlarges_each_pixel():
    model = create_mae("mae_vit_test")
    imgs = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        _, pred, mask = model(imgs, 0.75)
    small = reconstruction_grid(model, imgs, pred, mask)
    big = reconstruction_grid(model, imgs, pred, mask, scale=3)
    assert big.shape == (1, 2 * (48 + 2) + 2, 4 * (48 + 2) + 2)
    torch.testing.assert_close(big[0, 2:50:3, 2:50:3], small[0, 2:18, 2:18])
