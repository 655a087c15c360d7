"""The shard stage: a raw source -> deterministic WebDataset shards + manifest.json.

Same source and params => byte-identical shards (fixed tar metadata, seeded order), so
DVC's cache holds. Images are decoded in `data.workers` processes to validate them and
to measure the training pixels' mean/std; JPEG and PNG bytes are stored as they are.
Output appears atomically: a failed run leaves the previous shards (or none), never half.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline import kept
from pipeline.data.imagefolder import list_imagefolder
from pipeline.data.listing import read_listing
from pipeline.data.manifest import FORMAT
from pipeline.data.shard_worker import Chunk, ChunkResult, Context, init_worker, write_chunk
from pipeline.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MD5,
    Input,
    Skipped,
    SourceListing,
    list_idx,
)
from pipeline.data.store import is_url
from pipeline.errors import UserError
from pipeline.params import DataParams, workspace_path
from pipeline.progress import progress

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def split_inputs(listing: SourceListing, p: DataParams) -> dict[str, list[Input]]:
    """Stratified, seeded train/val (and test, when the source has none) carve-out.

    Each output split comes back in a seeded random order: the order of the shards.
    """
    rng = np.random.default_rng(p.seed)
    out: dict[str, list[Input]] = {s: list(listing.splits.get(s, [])) for s in SPLITS}
    carve = {
        "val": p.val_fraction if "val" not in listing.splits else 0.0,
        "test": p.test_fraction if "test" not in listing.splits else 0.0,
    }
    keep: list[Input] = []
    for label in range(len(listing.classes)):
        members = [x for x in out["train"] if x.label == label]
        members = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for split in ("val", "test"):
            n = round(len(members) * carve[split])
            out[split] += members[start : start + n]
            start += n
        keep += members[start:]
    out["train"] = keep
    for split in SPLITS:
        items = sorted(out[split], key=lambda x: (x.source, x.index))
        out[split] = [items[i] for i in rng.permutation(len(items))]
    return out


def _chunk_results(chunks: list[Chunk], workers: int, ctx: Context) -> Iterator[ChunkResult]:
    """Chunk results in chunk order, whatever the number of workers."""
    if workers <= 1:
        init_worker(ctx)
        yield from map(write_chunk, chunks)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(
        min(workers, max(len(chunks), 1)), initializer=init_worker, initargs=(ctx,)
    ) as pool:
        yield from pool.imap(write_chunk, chunks)


def _list_source(p: DataParams, workdir: Path) -> SourceListing:
    root = Path(p.root)
    if p.source == "imagefolder" and root.is_file():  # a listing (`mae-cli list-images`)
        return read_listing(root, p.on_bad_input)
    if p.source == "imagefolder":
        return list_imagefolder(root, on_bad_input=p.on_bad_input)
    if p.source == "fashion-mnist":
        return list_idx(
            root,
            workdir,
            classes=FASHION_MNIST_CLASSES,
            checksums=FASHION_MNIST_MD5,
            on_bad_input=p.on_bad_input,
        )
    classes = p.class_names or [str(i) for i in range(10)]
    return list_idx(root, workdir, classes=classes, checksums=None, on_bad_input=p.on_bad_input)


def run_shard(p: DataParams) -> dict:
    """Write `p.shards` from `p.source`; -> the manifest (also written as manifest.json)."""
    if is_url(p.shards):
        raise UserError(
            f"data.shards is a URL ({p.shards}): the shard stage writes a local folder; "
            "write the shards there, copy the folder to the store, and read it by URL"
        )
    workspace_path("data.root", p.root)  # under dvc exp --queue/--temp: copied by DVC?
    out = Path(p.shards)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _write(p, staging)
        if out.exists():
            shutil.rmtree(out)
        (staging / "work").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kept.keep(out)  # what a failure under dvc repro puts back
    return manifest


def _write(p: DataParams, staging: Path) -> dict:
    workdir, folder = staging / "raw", staging / "work"
    workdir.mkdir()
    folder.mkdir()
    listing = _list_source(p, workdir)
    splits = split_inputs(listing, p)
    n = p.shard_max_count
    chunks = [
        Chunk(s, i, items[k : k + n])
        for s, items in splits.items()
        for i, k in enumerate(range(0, len(items), n))
    ]
    ctx = Context(str(folder), listing.idx_images, p.shard_max_mb * 1e6, p.on_bad_input == "fail")
    shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
    per_class = {s: [0] * len(listing.classes) for s in SPLITS}
    written = dict.fromkeys(listing.splits, 0)
    skipped = list(listing.bad)  # Skipped.split is always the source split
    stats, color, sizes = np.zeros(9), False, set()
    bar = progress(total=sum(len(c.items) for c in chunks), desc="shard", unit="img")
    for r in _chunk_results(chunks, p.workers, ctx):
        if r.error is not None:
            raise UserError(r.error)
        for part in r.parts:  # final names: consecutive per split, in chunk order
            name = f"{r.split}-{len(shards[r.split]):06d}.tar"
            (folder / part.pop("tmp")).rename(folder / name)
            index = part["index"]  # <shard>.idx: its samples' byte ranges, labels, keys
            (folder / index["name"]).rename(folder / Path(name).with_suffix(".idx"))
            index["name"] = Path(name).with_suffix(".idx").name
            shards[r.split].append({"name": name, **part})
        for label, count in r.per_class.items():
            per_class[r.split][label] += count
        for src, count in r.written.items():
            written[src] += count
        skipped += r.skipped
        stats += r.stats
        color |= r.color and r.split == "train"
        if len(sizes) < 2:
            sizes |= r.sizes
        bar.update(sum(part["count"] for part in r.parts) + len(r.skipped))
    bar.close()
    channels = _channels(p, bool(listing.idx_images), color)
    manifest = _manifest(p, listing, per_class, shards, skipped, written, stats, channels)
    manifest["image_size"] = list(sizes.pop()) if len(sizes) == 1 else None  # None: mixed
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if skipped:
        log.warning(
            "skipped %d bad input(s); each is listed in manifest.json",
            sum(x.count for x in skipped),
        )
    return manifest


def _channels(p: DataParams, is_idx: bool, any_color: bool) -> int:
    if is_idx:
        return 1
    if p.channels == "auto":
        return 3 if any_color else 1
    return int(p.channels)


def _manifest(
    p: DataParams,
    listing: SourceListing,
    per_class: dict,
    shards: dict,
    skipped: list[Skipped],
    written: dict,
    stats: np.ndarray,
    channels: int,
) -> dict:
    mean, std = _mean_std(stats, channels)
    splits = {
        s: {
            "count": sum(per_class[s]),
            "per_class": dict(zip(listing.classes, per_class[s], strict=True)),
            "shards": shards[s],
        }
        for s in SPLITS
    }
    keys = ("val_fraction", "test_fraction", "seed", "shard_max_count", "shard_max_mb")
    return {
        "format": FORMAT,
        "source": {"kind": p.source, **listing.description},
        "params": {k: getattr(p, k) for k in (*keys, "on_bad_input")},
        "classes": listing.classes,
        "channels": channels,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "splits": splits,
        "accounting": _accounting(listing, skipped, written),
        "skipped": [_skip_record(x) for x in skipped],
    }


def _mean_std(stats: np.ndarray, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training pixels from `_stats` sums (0-1 units)."""
    n = max(stats[8], 1.0)
    if channels == 1:
        mean = [stats[0] / n]
        return mean, [max(stats[1] / n - mean[0] ** 2, 0.0) ** 0.5]
    mean = list(stats[2:5] / n)
    return mean, [max(v, 0.0) ** 0.5 for v in stats[5:8] / n - np.square(mean)]


def _accounting(listing: SourceListing, skipped: list[Skipped], written: dict) -> dict:
    """Nothing is dropped silently: per source split, inputs = written + skipped."""
    accounting = {}
    for src, items in listing.splits.items():
        n_bad = sum(x.count for x in skipped if x.split == src)
        n_listed_bad = sum(x.count for x in listing.bad if x.split == src)
        accounting[src] = {
            "inputs": len(items) + n_listed_bad,
            "written": written[src],
            "skipped": n_bad,
        }
        if accounting[src]["inputs"] != written[src] + n_bad:  # a bug, never a user error
            raise RuntimeError(f"shard accounting does not add up: {accounting}")
    return accounting


def _skip_record(x: Skipped) -> dict:
    record = {"split": x.split, "input": x.input, "reason": x.reason}
    return record | ({"count": x.count} if x.count > 1 else {})
