"""Every image the shard stage accepts decodes to the same tensor at predict time (the
MLflow model `mae-cli predict` and `mlflow models serve` run) as in training: 16-bit
grayscale, bilevel, gray with alpha, palettes, RGBA, JPEG with an EXIF orientation."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae import eval_transform
from mae.augment import normalise
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
        "cmyk.jpg": _png(Image.fromarray(rgb, "RGB").convert("CMYK"), "JPEG"),
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


def _big_set(tmp_path, height: int, width: int, mode: str = "L"):
    """Shards of 8 noise images of height x width per class (two classes): detail far
    finer than a 16 px model sees, which a resize without antialiasing aliases."""
    rng = np.random.default_rng(1)
    root = tmp_path / "big"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            shape = (height, width) if mode == "L" else (height, width, 3)
            img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
            img.save(root / cls / f"{i}.png")
    p = folder_params(tmp_path, root, val_fraction=0.0, test_fraction=0.0, workers=0)
    return p, run_shard(p), root


def _views(loader) -> dict[str, torch.Tensor]:
    views = {}
    for batch in loader:
        images = loader.images(batch, torch.device("cpu"), torch.Generator().manual_seed(0))
        views.update(zip(batch["key"], images, strict=True))
    return views


@pytest.mark.parametrize(
    ("height", "width", "mode", "crop_pct"), [(64, 64, "L", 1.0), (48, 80, "RGB", 0.875)]
)
def test_training_evaluation_and_serving_resample_by_one_rule(
    tmp_path, height, width, mode, crop_pct
):
    """pytorch/vision#2950: images larger than the model were cropped in training without
    antialiasing (pixel std 0.187) but resized with it for evaluation and serving (0.061).
    Every path now gives the tensor PIL's antialiased bicubic resize gives."""
    from pipeline.data.loader import Augment
    from pipeline.mlflow_model import ImageClassifier

    p, manifest, root = _big_set(tmp_path, height, width, mode)
    mean, std = manifest["mean"], manifest["std"]
    aug = Augment(crop_pct=crop_pct)
    load = lambda split_aug, aug=aug, **kw: build_loader(  # noqa: E731
        p.shards, "train", split_aug, batch_size=4, img_size=SIZE, aug=aug, **kw
    )
    on_device = load("eval", in_memory=True)  # held and centre-cropped as one batch
    per_image = load("eval", batch_augment=False)  # in the loader's workers, image by image
    assert on_device.in_memory and not per_image.in_memory
    held, streamed = _views(on_device), _views(per_image)
    served = ImageClassifier()
    served.mode, served.transform = mode, eval_transform(SIZE, mean, std, crop_pct)
    files = {
        f"{x.index:08d}": x.ref for x in list_imagefolder(root, on_bad_input="fail").splits["train"]
    }
    side = min(height, width) * crop_pct
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    scale = torch.tensor(std).view(-1, 1, 1) * 255
    for key, view in held.items():
        with Image.open(files[key]) as img:
            at_predict = served._tensor(Path(files[key]).read_bytes())
            by_pil = torch.from_numpy(np.array(img.resize((SIZE, SIZE), Image.BICUBIC, box=box)))
        by_pil = normalise(by_pil.reshape(SIZE, SIZE, -1).permute(2, 0, 1), mean, std)
        torch.testing.assert_close(streamed[key], view, rtol=0, atol=1e-4)
        torch.testing.assert_close(at_predict, view, rtol=0, atol=1e-4)
        # PIL rounds between its two passes and clamps: within a grey level or two
        assert ((by_pil - view) * scale).abs().max() < 2.5, key
    if (height, width, crop_pct) != (64, 64, 1.0):
        return
    # training's crops (here of the whole area) go through the same resampling: the same
    # contrast as evaluation, on the device and in the workers
    eval_std = torch.stack(list(held.values())).std().item()
    whole = Augment(scale_min=1.0, hflip=False)
    for kw in ({"in_memory": True}, {"batch_augment": False}):
        trained = torch.stack(list(_views(load("pretrain", whole, **kw)).values()))
        assert trained.std().item() == pytest.approx(eval_std, rel=0.2), kw


def _icon(under: int, mode: str) -> Image.Image:
    """A dark square on transparency; `under` is the colour stored where alpha is 0 (which
    a viewer never shows, and dropping alpha does)."""
    a = np.full((SIZE, SIZE, 4), under, np.uint8)
    a[..., 3] = 0
    a[4:12, 4:12] = (40, 40, 40, 255)
    a[4:12, 12:14] = (40, 40, 40, 128)  # half transparent: half way to the background
    rgba = Image.fromarray(a, "RGBA")
    if mode == "P":  # a palette with one transparent entry, as icon tools save GIF-like PNGs
        return rgba.convert("RGB").quantize(4).convert("P")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("channels", [1, 3])
def test_transparency_is_composited_on_white_at_shard_and_at_serving(tmp_path, channels):
    """NVIDIA/DIGITS#85: two icons that look the same were read as black and as white."""
    from pipeline.mlflow_model import ImageClassifier

    root = tmp_path / "icons"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for under in (0, 255):
            for mode in ("RGBA", "LA"):
                _icon(under, mode).save(root / cls / f"{mode}-{under}.png")
        palette = _icon(0, "P")  # its entry for the black under alpha 0: transparent
        black = palette.getpixel((0, 0))
        palette.save(root / cls / "P.png", transparency=black)
    p = folder_params(
        tmp_path, root, val_fraction=0.0, test_fraction=0.0, workers=0, channels=str(channels)
    )
    manifest = run_shard(p)
    mean, std = manifest["mean"], manifest["std"]
    mode = "L" if channels == 1 else "RGB"
    served = ImageClassifier()
    served.mode, served.transform = mode, eval_transform(SIZE, mean, std)

    def want(opaque_edge: bool) -> torch.Tensor:
        """White, the dark square, and its half-transparent edge half way to white (the
        palette image has no partial alpha: its edge is opaque)."""
        pixels = np.full((SIZE, SIZE), 255.0)
        pixels[4:12, 4:14] = 40
        if not opaque_edge:
            pixels[4:12, 12:14] = np.rint(40 * 128 / 255 + 255 * 127 / 255)
        return normalise(torch.from_numpy(pixels).float().expand(channels, -1, -1), mean, std)

    listing = list_imagefolder(root, on_bad_input="fail").splits["train"]
    files = {f"{x.index:08d}": Path(x.ref) for x in listing}
    views = _views(build_loader(p.shards, "train", "eval", batch_size=4, img_size=SIZE))
    assert len(views) == 10
    for key, view in views.items():
        name = files[key].name
        torch.testing.assert_close(view, want(name == "P.png"), rtol=0, atol=1e-4, msg=name)
        at_predict = served._tensor(files[key].read_bytes())
        torch.testing.assert_close(at_predict, view, rtol=0, atol=1e-5, msg=name)
    # the shards' mean/std are those of the composited pixels
    assert manifest["mean"][0] > 0.7  # dropping alpha: about 0.4


def test_float_and_32_bit_images_are_scaled_or_refused_by_one_rule():
    """Pillow#3159: `convert('L')` clamps float pixels, so a float TIFF in [0, 1] became a
    black image at predict time. Floats in [0, 1] are scaled; what no rule reads is
    refused in one line, at predict and in the served model alike."""
    from mae.images import decode

    ramp = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    tiff = io.BytesIO()
    Image.fromarray(ramp, "F").save(tiff, format="TIFF")
    got = np.asarray(decode(tiff.getvalue(), "L")).astype(int)
    assert got.tolist() == np.rint(ramp * 255).astype(int).tolist()
    assert np.asarray(decode(tiff.getvalue(), "RGB")).shape == (SIZE, SIZE, 3)
    for pixels, message in [
        (ramp * 255, r"float \(mode F\) pixels from 0 to 255: only values in \[0, 1\]"),
        (np.full((4, 4), np.nan, np.float32), r"float \(mode F\) pixels from nan"),
        (np.full((4, 4), 70_000, np.int32), r"32-bit \(mode I\) pixels from 70000 to 70000"),
    ]:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="TIFF")
        with pytest.raises(ValueError, match=message):
            decode(buf.getvalue(), "L")
    wide = io.BytesIO()
    Image.fromarray(np.full((4, 4), 4095, np.int32)).save(wide, format="TIFF")  # 16-bit range
    assert np.asarray(decode(wide.getvalue(), "L")).max() == 15


def test_the_mlflow_input_example_is_decoded_as_the_model_decodes(tmp_path, caplog):
    """wagtail/Willow#106: a CMYK JPEG as the first val image was saved as PNG as stored,
    which PIL cannot do: every finished finetune, scratch and linprobe run failed, and
    again on each resume. With no example to make, the model is logged without one."""
    from types import SimpleNamespace

    from pipeline.stages.downstream import Downstream

    rng = np.random.default_rng(2)
    root = tmp_path / "cmyk"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            rgb = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "RGB")
            rgb.convert("CMYK").save(root / cls / f"{i}.jpg")
    p = folder_params(tmp_path, root, val_fraction=0.25, test_fraction=0.0, workers=0)
    run_shard(p)
    val = build_loader(p.shards, "val", "eval", batch_size=2, img_size=SIZE)
    with Image.open(io.BytesIO(val.reader.encoded(0))) as first:
        assert first.mode == "CMYK"
    example = Downstream.example_image(SimpleNamespace(val_loader=val))
    with Image.open(io.BytesIO(example)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        stored = to_mode(Image.open(io.BytesIO(val.reader.encoded(0))), "RGB")
        assert np.array_equal(np.asarray(img), np.asarray(stored))
    empty = SimpleNamespace(reader=SimpleNamespace(encoded=[].__getitem__, mode="RGB"))
    with caplog.at_level("WARNING"):
        assert Downstream.example_image(SimpleNamespace(val_loader=empty)) is None
    assert "the MLflow model gets no input example" in caplog.text
