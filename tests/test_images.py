"""Every image the shard stage accepts decodes to the same tensor at predict time (the
MLflow model `mae-cli predict` and `mlflow models serve` run) as in training: 16-bit
grayscale, bilevel, gray with alpha, palettes, RGBA, JPEG with an EXIF orientation."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mae import eval_transform
from mae.images import to_mode
from pipeline.data.imagefolder import list_imagefolder
from pipeline.data.loader import build_loader
from pipeline.data.shard import run_shard
from tests.factory import folder_params

SIZE = 16


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gray_images(rng) -> dict[str, bytes]:
    wide = rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)  # values above 255 too
    gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": not applied, in training or at serving
    return {
        "wide.png": _png(Image.fromarray(wide)),
        "gray.png": _png(Image.fromarray(gray, "L")),
        "bilevel.png": _png(Image.fromarray(gray > 128)),
        "alpha.png": _png(Image.fromarray(np.stack([gray, 255 - gray], -1), "LA")),
        "rotated.jpg": _png(Image.fromarray(gray, "L"), "JPEG", exif=exif),
    }


def _colour_images(rng) -> dict[str, bytes]:
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    return {
        "rgb.jpg": _png(Image.fromarray(rgb, "RGB"), "JPEG"),
        "rgba.png": _png(Image.fromarray(rgba, "RGBA")),
        "palette.png": _png(Image.fromarray(rgb, "RGB").convert("P")),
        "gray.png": _png(Image.fromarray(rgb[..., 0], "L")),  # among colour: read as RGB
    }


@pytest.mark.parametrize(("make", "channels"), [(_gray_images, 1), (_colour_images, 3)])
def test_an_image_gives_the_same_tensor_in_training_and_at_predict_time(tmp_path, make, channels):
    from pipeline.mlflow_model import ImageClassifier

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for name, data in make(rng).items():
            (root / cls / name).write_bytes(data)
    p = folder_params(tmp_path, root, val_fraction=0.0, test_fraction=0.0, workers=0)
    manifest = run_shard(p)
    assert (
        manifest["channels"] == channels
        and manifest["splits"]["train"]["count"] == len(make(rng)) * 2
    )
    listing = list_imagefolder(root, on_bad_input="fail")
    files = {f"{x.index:08d}": x.ref for x in listing.splits["train"]}
    served = ImageClassifier()  # what its load_context sets from the model's config.json
    served.mode = "L" if channels == 1 else "RGB"
    served.transform = eval_transform(SIZE, manifest["mean"], manifest["std"])
    loader = build_loader(p.shards, "train", "eval", batch_size=4, img_size=SIZE)
    seen = 0
    for batch in loader:
        images = loader.images(batch, torch.device("cpu"))
        for key, trained in zip(batch["key"], images, strict=True):
            with open(files[key], "rb") as f:
                at_predict = served._tensor(f.read())
            torch.testing.assert_close(at_predict, trained, rtol=0, atol=1e-5, msg=files[key])
            seen += 1
    assert seen == manifest["splits"]["train"]["count"]


def test_16_bit_gray_keeps_its_top_8_bits_where_convert_would_clip_to_white():
    wide = np.array([[0, 255, 256, 4095, 65535]], dtype=np.uint16)
    img = Image.fromarray(wide)
    assert np.asarray(to_mode(img, "L")).tolist() == [[0, 0, 1, 15, 255]]
    assert np.asarray(img.convert("L")).tolist() != [[0, 0, 1, 15, 255]]  # PIL clips
    assert np.asarray(to_mode(img, "RGB")).shape == (1, 5, 3)
