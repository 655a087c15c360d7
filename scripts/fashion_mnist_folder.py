"""A small real-image ImageFolder from Fashion-MNIST, for checking recipes on small data:
OUT/train/<class>/<n>.png (the first N training images of each class) and
OUT/test/<class>/<n>.png (the first M test images of each class), 8-bit grayscale PNGs.

    python scripts/fashion_mnist_folder.py OUT --train-per-class 130 --test-per-class 100

Nothing here is committed: generate, run, delete.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]  # fmt: skip


def _idx(path: Path, header: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=header)


def write_split(root: Path, prefix: str, out: Path, per_class: int) -> int:
    images = _idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
    for label, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[i], "L").save(folder / f"{n:05d}.png")
    return per_class * len(CLASSES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--train-per-class", type=int, default=130)
    ap.add_argument("--test-per-class", type=int, default=100)
    args = ap.parse_args()
    n = write_split(args.root, "train", args.out / "train", args.train_per_class)
    m = write_split(args.root, "t10k", args.out / "test", args.test_per_class)
    print(f"{args.out}: {n} training and {m} test images")


if __name__ == "__main__":
    main()
