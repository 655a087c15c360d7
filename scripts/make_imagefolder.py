"""A synthetic ImageNet-like ImageFolder for benchmarks: OUT/<class>/<n>.jpg, RGB JPEGs of
SIZE x SIZE (quality 90), smooth colour fields with noise (~10-20 KB each, as photos
compress), made in parallel. Nothing here is committed: generate, measure, delete.

    python scripts/make_imagefolder.py OUT --images 100000 --classes 100 --size 224
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _write(job: tuple[str, int, int, int, int]) -> int:
    out, start, stop, classes, size = job
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        folder = Path(out) / f"class_{i % classes:04d}"
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            folder / f"{i:08d}.jpg", quality=90
        )
    return stop - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args()
    for c in range(args.classes):
        (args.out / f"class_{c:04d}").mkdir(parents=True, exist_ok=True)
    step = 1000
    jobs = [
        (str(args.out), k, min(k + step, args.images), args.classes, args.size)
        for k in range(0, args.images, step)
    ]
    start = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        done = sum(pool.imap_unordered(_write, jobs))
    seconds = time.perf_counter() - start
    print(f"wrote {done:,} JPEGs of {args.size} px into {args.out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
