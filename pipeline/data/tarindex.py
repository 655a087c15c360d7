"""Where each sample of a split lives, and a fast path for the images IDX sources become.

A WebDataset shard is a plain tar: a 512-byte header per member, then its data. Reading
the headers alone (no image data) gives every sample's byte range, so a loader can read
any sample by offset, in any order, without streaming whole shards. Members are grouped
into samples as WebDataset does: `<key>.<ext>`, consecutive members with one key. The
shard stage does this once per shard and writes the result beside it (`<shard>.idx`,
listed in the manifest); loaders read those small files, not the tars' headers.
"""

from __future__ import annotations

import hashlib
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

IMAGE_EXTS = ("pgm", "png", "jpg")


INDEX_DTYPE = [("offset", "<i8"), ("size", "<i8"), ("label", "<i8")]  # + ("key", "S<n>")


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of a split lives: its shard (a position in the split's manifest
    entries), the byte range of its image, its label and key; one entry per sample id."""

    shard: np.ndarray  # (n,) int32
    offset: np.ndarray  # (n,) int64: the image's first byte
    size: np.ndarray  # (n,) int64
    label: np.ndarray  # (n,) int64
    key: np.ndarray  # (n,) str

    def __len__(self) -> int:
        return len(self.shard)


def _tar_members(buf) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a tar (bytes or mmap), from its
    headers alone."""
    offset, next_name, end = 0, None, len(buf)
    while offset + 512 <= end:
        header = buf[offset : offset + 512]
        if header == bytes(512):
            return
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        kind, data = header[156:157], offset + 512
        offset = data + -(-size // 512) * 512
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: the next name
            next_name = _long_name(buf[data : data + size], kind) or next_name
            continue
        name = header[:100].rstrip(b"\0").decode()
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].rstrip(b"\0").decode() + "/" + name
        name, next_name = next_name or name, None
        if kind in (b"0", b"\0", b"7"):
            yield name, data, size


def _long_name(extra: bytes, kind: bytes) -> str | None:
    if kind == b"L":
        return extra.rstrip(b"\0").decode()
    for record in extra.decode().split("\n"):  # "<len> path=<name>"
        key, _, value = record.partition(" ")[2].partition("=")
        if key == "path":
            return value
    return None


def shard_samples(buf, path: str, count: int) -> np.ndarray:
    """The samples of one shard (bytes or mmap) from its headers, in tar order, as a
    structured array (INDEX_DTYPE + key); checked against the manifest's `count`."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for name, offset, size in _tar_members(buf):
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            raise UserError(f"{path}: member {name} has no extension")
        stem, ext = base.split(".", 1)
        samples.setdefault(name[: len(name) - len(base)] + stem, {})[ext.lower()] = (offset, size)
    if len(samples) != count:
        raise UserError(f"{path} holds {len(samples)} samples, the manifest says {count}")
    rows = []
    for key, members in samples.items():
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None or "cls" not in members:
            raise UserError(
                f"{path}: sample {key} has no {'image' if ext is None else 'label (.cls)'}"
            )
        offset, size = members["cls"]
        rows.append((*members[ext], int(buf[offset : offset + size]), key.encode("utf-8")))
    width = max((len(r[3]) for r in rows), default=1)
    return np.array(rows, dtype=[*INDEX_DTYPE, ("key", f"S{width}")])


def write_index(tar: Path, count: int) -> dict:
    """Index `tar` from its headers into `<name>.idx` beside it (a .npy file: fixed bytes
    for the same tar) -> its manifest entry {"name", "bytes", "sha256"}. Written once by
    the shard stage, so no loader on any rank reads a tar's headers again."""
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        samples = shard_samples(buf, str(tar), count)
    out = tar.with_suffix(".idx")
    with open(out, "wb") as f:
        np.save(f, samples, allow_pickle=False)
    data = out.read_bytes()
    return {"name": out.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_index(files: list[Path], counts: list[int]) -> ShardIndex:
    """A split's index from its shards' `.idx` files (in manifest order)."""
    parts = []
    for path, count in zip(files, counts, strict=True):
        try:
            part = np.load(path, allow_pickle=False)
            if part.dtype.names != ("offset", "size", "label", "key"):
                raise ValueError(f"fields {part.dtype.names}")
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"{path}: not a shard index the shard stage wrote ({err})") from None
        if len(part) != count:
            raise UserError(f"{path} lists {len(part)} samples, the manifest says {count}")
        parts.append(part)
    if not parts:
        return ShardIndex(*(np.zeros(0, t) for t in (np.int32, np.int64, np.int64, np.int64, str)))
    return ShardIndex(
        np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)]),
        np.concatenate([p["offset"] for p in parts]),
        np.concatenate([p["size"] for p in parts]),
        np.concatenate([p["label"] for p in parts]),
        np.char.decode(np.concatenate([p["key"] for p in parts]), "utf-8"),
    )


_PGM_HEADER = re.compile(rb"P5\s+(\d+)\s+(\d+)\s+255\s")


def pgm(data: bytes) -> np.ndarray | None:
    """A binary 8-bit PGM (what IDX sources become) as (H, W) uint8 without PIL, ~20x
    faster; None for anything else (comments in the header too), which PIL then reads."""
    m = _PGM_HEADER.match(data)
    if m is None:
        return None
    w, h = int(m[1]), int(m[2])
    if len(data) - m.end() < w * h:
        return None
    return np.frombuffer(data, np.uint8, count=w * h, offset=m.end()).reshape(h, w)
