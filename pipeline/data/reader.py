"""Reading a split's samples by id: the one path from shard bytes to batches, used by the
streaming loader's workers and by the pass that decodes a split to hold it in memory.

The split's index (`tarindex`) gives every sample id its shard and byte range. `read`
takes batches of ids in the order the epoch plan gives them and keeps one descriptor per
shard it reads: opened at the shard's first batch, closed after its last (a cached remote
shard's space is free once the cache removes it). Remote shards are fetched ahead in that
same order (`Prefetch`), so reading starts on the first shard while the next ones arrive.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from mae.images import to_mode
from pipeline.data.store import ShardStore
from pipeline.data.tarindex import ShardIndex, pgm


class SplitReader:
    """The samples of one split: `entries` are its manifest entries, `mode` the PIL mode
    its images are read in ("L" or "RGB")."""

    def __init__(self, store: ShardStore, entries: list[dict], index: ShardIndex, mode: str):
        self.store, self.entries, self.index, self.mode = store, entries, index, mode
        self.counts = tuple(e["count"] for e in entries)

    def encoded(self, i: int) -> bytes:
        """Sample `i` as its shard holds it (PNG, JPEG or PGM bytes)."""
        fd = self.store.open(self.entries[int(self.index.shard[i])])
        try:
            return os.pread(fd, int(self.index.size[i]), int(self.index.offset[i]))
        finally:
            os.close(fd)

    def read(
        self,
        batches: list[np.ndarray],
        transform: Callable | None = None,
        seeds: list[int] | None = None,
    ) -> Iterator[dict]:
        """{"image", "label": (B,) int64, "key": [str]} for each batch of ids, in order.

        Without `transform` (images of one size) `image` is the stored pixels, (B, C, H, W)
        uint8; with it, the stack of `transform(PIL image)`, batch k drawn from torch's
        stream seeded with `seeds[k]` (forked: the caller's stream is left as it was), so a
        batch's random crops, RandAugment and erasing depend on its seed alone, not on
        which process reads it. Raises UserError or OSError naming the shard that cannot
        be read.
        """
        x = self.index
        last = {int(s): k for k, ids in enumerate(batches) for s in np.unique(x.shard[ids])}
        files: dict[int, int] = {}
        ahead = Prefetch(self.store, self.entries, x, batches) if self.store.remote else None
        try:
            for k, ids in enumerate(batches):
                with _seeded(seeds[k] if seeds and transform is not None else None):
                    images = [self._image(i, files, ahead, transform) for i in ids]
                yield {
                    "image": _pixels(images) if transform is None else torch.stack(images),
                    "label": torch.from_numpy(x.label[ids]),
                    "key": x.key[ids].tolist(),
                }
                for shard in [s for s in files if last[s] == k]:  # read for the last time
                    os.close(files.pop(shard))
        finally:
            if ahead is not None:
                ahead.stop()
            for fd in files.values():
                os.close(fd)

    def _image(self, i: int, files: dict[int, int], ahead: Prefetch | None, transform):
        x = self.index
        shard = int(x.shard[i])
        if shard not in files:
            if ahead is not None:
                ahead.advance()
            files[shard] = self.store.open(self.entries[shard])
        data = os.pread(files[shard], int(x.size[i]), int(x.offset[i]))
        if transform is None and self.mode == "L" and (pixels := pgm(data)) is not None:
            return pixels
        with Image.open(io.BytesIO(data)) as img:
            img = to_mode(img, self.mode)  # as the MLflow model reads a user's image
            return np.asarray(img) if transform is None else transform(img)


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 arrays of one size -> (B, C, H, W) uint8."""
    pixels = torch.from_numpy(np.stack(images))
    return pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2).contiguous()


class Prefetch:
    """Fetches a reader's remote shards in a thread, in the order its batches first read
    them, at most `ahead` shards beyond the one being read. A fetch that fails here is
    tried again (and its error raised) when the reader itself needs the shard."""

    def __init__(self, store: ShardStore, entries, index: ShardIndex, batches, ahead: int = 2):
        ids = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        shards = index.shard[ids]
        _, first = np.unique(shards, return_index=True)
        self.order = shards[np.sort(first)].tolist()
        self.store, self.entries = store, entries
        self.room = threading.Semaphore(ahead)  # released as the reader reaches each shard
        self.done = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for shard in self.order:
            self.room.acquire()
            if self.done:
                return
            with contextlib.suppress(Exception):  # the reader's own fetch raises it, named
                self.store.path(self.entries[shard])

    def advance(self) -> None:
        """The reader opens its next shard: one more may be fetched ahead."""
        self.room.release()

    def stop(self) -> None:
        self.done = True
        self.room.release()


@contextlib.contextmanager
def _seeded(seed: int | None):
    """torch's CPU stream seeded with `seed` inside, restored after; None: untouched."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
