"""Throughput figures of the data path: the shard stage on a source (img/s, peak memory of
it and its workers) and the loaders (img/s with the training augmentation), this
project's beside a plain `webdataset` pipeline reading the same shards."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from pipeline.data.store import ShardStore, as_store
from pipeline.params import DataParams


@dataclass(frozen=True)
class DataBench:
    shards: str
    reader: str  # "mae" (this project's, streaming) | "memory" (it, over the split held in
    # memory) | "webdataset" (a plain pipeline)
    augmentation: str
    workers: int
    batch_size: int
    img_size: int
    images: int
    seconds: float
    img_per_s: float
    decode_s: float | None = None  # memory: decoding the split once, before the timing

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        once = f"; decoded once in {self.decode_s:.1f} s" if self.decode_s is not None else ""
        return (
            f"{self.reader} loader, {self.augmentation} at {self.img_size} px on {self.shards}, "
            f"{self.workers} workers, batch {self.batch_size}: {self.img_per_s:,.0f} img/s "
            f"({self.images:,} images in {self.seconds:.1f} s{once})"
        )


def bench_loader(
    shards: ShardStore | str,
    img_size: int,
    workers: int,
    batch_size: int = 256,
    augmentation: str = "pretrain",
    max_images: int = 20_000,
    reader: str = "mae",
    device_augment: bool = True,
) -> DataBench:
    """img/s of a train-split loader with its full augmentation (a device-side crop and flip
    too, here on the CPU, unless `device_augment` is off: on a GPU it runs there), worker
    start-up included (as every epoch pays it)."""
    store = as_store(shards)
    decode_s = None
    if reader == "webdataset":
        loader = _webdataset_loader(store, img_size, workers, batch_size, augmentation)
        images = lambda batch: batch[0]  # noqa: E731
    else:
        loader, images, decode_s = _mae_loader(
            store, img_size, workers, batch_size, augmentation, reader, device_augment
        )
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(images(batch))
        if n >= max_images:
            break
    seconds = time.perf_counter() - start
    if reader == "mae" and not device_augment:
        reader = "mae (device crop left out)"
    shape = (workers, batch_size, img_size)
    return DataBench(
        store.location, reader, augmentation, *shape, n, seconds, n / seconds, decode_s
    )


def _mae_loader(store, img_size, workers, batch_size, augmentation, reader, device_augment):
    """-> (this project's loader, batch -> its images, seconds the split took to decode
    when held in memory, else None)."""
    from pipeline.data.loader import build_loader

    loader = build_loader(
        store,
        "train",
        augmentation,
        batch_size=batch_size,
        img_size=img_size,
        num_workers=workers,
        in_memory=reader == "memory",
    )
    if len(loader) == 0:
        count = loader.manifest["splits"]["train"]["count"]
        raise ValueError(f"--batch-size {batch_size} is larger than the train split ({count})")
    decode_s = None
    if reader == "memory":  # decoded once, before the timing: what every epoch reuses
        start = time.perf_counter()
        next(iter(loader))
        decode_s = time.perf_counter() - start
    cpu = torch.device("cpu")
    images = lambda b: loader.images(b, cpu) if device_augment else b["image"]  # noqa: E731
    return loader, images, decode_s


def _webdataset_loader(store: ShardStore, img_size: int, workers: int, batch: int, augmentation):
    """WebDataset as its README writes it, over the same train shards: decode with PIL, this
    project's per-image transform for `augmentation`, a 1,000-sample shuffle buffer, batches."""
    import webdataset as wds

    from pipeline.data.loader import Augment, build_transform

    manifest = store.manifest()
    urls = [str(store.path(e)) for e in manifest["splits"]["train"]["shards"]]
    mode = "L" if manifest["channels"] == 1 else "RGB"
    transform = build_transform(
        augmentation, img_size, manifest["mean"], manifest["std"], Augment()
    )
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg;png;pgm", "cls")
        .map_tuple(lambda img: transform(img.convert(mode)), int)
        .batched(batch)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


@dataclass(frozen=True)
class ShardBench:
    root: str
    workers: int
    images: int
    seconds: float
    img_per_s: float
    peak_rss_mb: float  # the stage's own process
    peak_total_rss_mb: float  # it and its workers together (shared pages counted per process)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"shard {self.root}, {self.workers} workers: {self.img_per_s:,.0f} img/s "
            f"({self.images:,} images in {self.seconds:.1f} s); peak RSS "
            f"{self.peak_rss_mb:,.0f} MB, with workers {self.peak_total_rss_mb:,.0f} MB"
        )


_SHARD = (
    "import sys; from pipeline.params import DataParams; from pipeline.data.shard import "
    "run_shard; m = run_shard(DataParams.model_validate_json(sys.argv[1])); "
    "print(sum(s['count'] for s in m['splits'].values()))"
)


def bench_shard(p: DataParams, workers: int) -> ShardBench:
    """The shard stage on `p`'s source into a temporary folder, in a fresh process (its
    memory starts from nothing); the RSS of it and its workers sampled every 50 ms."""
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        params = p.model_copy(update={"workers": workers, "shards": f"{tmp}/shards"})
        start = time.perf_counter()
        proc = psutil.Popen(
            [sys.executable, "-c", _SHARD, params.model_dump_json()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        peak = peak_total = 0
        while proc.poll() is None:
            try:
                rss = proc.memory_info().rss
                children = sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:  # a worker ended between the two calls
                continue
            peak, peak_total = max(peak, rss), max(peak_total, rss + children)
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise ValueError(f"the shard stage failed: {err.strip().splitlines()[-1:]}")
    images = int(out.strip().splitlines()[-1])
    mb = 2**20
    return ShardBench(
        p.root, workers, images, seconds, images / seconds, peak / mb, peak_total / mb
    )
